//! Helpers for the kernels' tests: a client on the test runtime (wgpu: Mesa lavapipe in CI),
//! seeded random data, and element types seen as f32.

use cubecl::prelude::*;
use cubecl::server::Handle;
use cubecl::wgpu::{WgpuDevice, WgpuRuntime};
use rand::{Rng, SeedableRng};

pub type TestRuntime = WgpuRuntime;

pub fn client() -> ComputeClient<TestRuntime> {
    TestRuntime::client(&WgpuDevice::default())
}

/// `n` values in [-1, 1) from `seed`.
pub fn fill(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
}

/// A float element a kernel can be tested in.
pub trait Elem: Float + CubeElement {
    const NAME: &'static str;
    fn of_f32(v: f32) -> Self;
    fn as_f32(self) -> f32;
    /// `v` rounded to this type and back.
    fn round_trip(v: &[f32]) -> Vec<f32> {
        v.iter().map(|&x| Self::of_f32(x).as_f32()).collect()
    }
}

impl Elem for f32 {
    const NAME: &'static str = "f32";
    fn of_f32(v: f32) -> Self {
        v
    }
    fn as_f32(self) -> f32 {
        self
    }
}

impl Elem for half::f16 {
    const NAME: &'static str = "f16";
    fn of_f32(v: f32) -> Self {
        half::f16::from_f32(v)
    }
    fn as_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
}

pub fn upload<F: Elem>(c: &ComputeClient<TestRuntime>, v: &[f32]) -> Handle {
    let data: Vec<F> = v.iter().map(|&x| F::of_f32(x)).collect();
    c.create_from_slice(F::as_bytes(&data))
}

pub fn read<F: Elem>(c: &ComputeClient<TestRuntime>, h: Handle) -> Vec<f32> {
    let bytes = c.read_one_unchecked(h);
    F::from_bytes(&bytes).iter().map(|x| x.as_f32()).collect()
}

/// ‖a − b‖ / ‖b‖ (NaN anywhere makes it infinite).
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    if a.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// Rows of one fused projection: token t's row is each part's row t (`(values, width)`) in turn.
pub fn fused_rows(parts: &[(&[f32], usize)], tokens: usize) -> Vec<f32> {
    (0..tokens)
        .flat_map(|t| parts.iter().flat_map(move |&(x, w)| &x[t * w..][..w]))
        .copied()
        .collect()
}

/// The output buffer of a kernel that may add into it: `y0` when it accumulates, else poisoned.
pub fn output<F: Elem>(c: &ComputeClient<TestRuntime>, y0: &[f32], accumulate: bool) -> Handle {
    if accumulate {
        upload::<F>(c, y0)
    } else {
        upload::<F>(c, &vec![f32::NAN; y0.len()])
    }
}

/// A product's rows (`[rows, n]`, or `[rows, 2·n]` gate then up for SwiGLU) through the fused
/// kernels' epilogue: + bias on the (gate) columns, SwiGLU, + `y0` where they accumulate.
pub fn epilogue_reference(
    mut y: Vec<f32>,
    n: usize,
    bias: Option<&[f32]>,
    swiglu: bool,
    y0: Option<&[f32]>,
) -> Vec<f32> {
    let width = if swiglu { 2 * n } else { n };
    if let Some(b) = bias {
        for row in y.chunks_mut(width) {
            row[..n].iter_mut().zip(b).for_each(|(v, b)| *v += b);
        }
    }
    if swiglu {
        y = crate::silu_mul::reference(&y, n);
    }
    if let Some(y0) = y0 {
        y.iter_mut().zip(y0).for_each(|(v, a)| *v += a);
    }
    y
}

pub fn read_u32(c: &ComputeClient<TestRuntime>, h: Handle) -> Vec<u32> {
    u32::from_bytes(&c.read_one_unchecked(h)).to_vec()
}
