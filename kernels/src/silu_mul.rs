//! SwiGLU's activation: `out = silu(gate) · up`, where each row of the input holds `gate` then
//! `up` (the fused gate-up projection's output, as in vLLM). Computed in f32.

use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::vector::vector_size;

const THREADS: u32 = 256;

#[cube(launch)]
fn silu_mul_kernel<F: Float, N: Size>(
    gate_up: &Array<Vector<F, N>>,
    output: &mut Array<Vector<F, N>>,
    cols: usize,
    total: usize,
) {
    let i = ABSOLUTE_POS;
    if i < total {
        let row = i / cols;
        let col = i % cols;
        let g = Vector::<f32, N>::cast_from(gate_up[row * 2 * cols + col]);
        let u = Vector::<f32, N>::cast_from(gate_up[row * 2 * cols + cols + col]);
        let one = Vector::<f32, N>::new(1.0);
        let silu = g / (one + Vector::exp(Vector::new(0.0) - g));
        output[i] = Vector::cast_from(silu * u);
    }
}

/// `gate_up` is `[rows, 2·cols]`; writes `output` `[rows, cols]`.
pub fn launch<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    gate_up: &Handle,
    output: &Handle,
    rows: usize,
    cols: usize,
) {
    let v = vector_size(client, size_of::<F>(), cols);
    let n = rows * cols / v;
    let cubes = n.div_ceil(THREADS as usize) as u32;
    unsafe {
        silu_mul_kernel::launch::<F, R>(
            client,
            CubeCount::Static(cubes, 1, 1),
            CubeDim::new_1d(THREADS),
            v,
            ArrayArg::from_raw_parts(gate_up.clone(), 2 * n),
            ArrayArg::from_raw_parts(output.clone(), n),
            cols / v,
            n,
        );
    }
}

/// The plain reference.
pub fn reference(gate_up: &[f32], cols: usize) -> Vec<f32> {
    gate_up
        .chunks(2 * cols)
        .flat_map(|row| {
            let (g, u) = row.split_at(cols);
            g.iter().zip(u).map(|(&g, &u)| g / (1.0 + (-g).exp()) * u)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{client, fill, read, rel_err, upload, Elem};

    fn check<F: Elem>(rows: usize, cols: usize, tol: f64) {
        let c = client();
        let x: Vec<f32> = fill(rows * 2 * cols, 5).iter().map(|v| v * 4.0).collect();
        let out = upload::<F>(&c, &vec![f32::NAN; rows * cols]);
        launch::<_, F>(&c, &upload::<F>(&c, &x), &out, rows, cols);
        let e = rel_err(&read::<F>(&c, out), &reference(&F::round_trip(&x), cols));
        assert!(e < tol, "{} {rows}x{cols}: rel err {e}", F::NAME);
    }

    #[test]
    fn matches_reference() {
        for (rows, cols) in [(1, 1536), (3, 100), (7, 13)] {
            check::<f32>(rows, cols, 1e-6);
            check::<half::f16>(rows, cols, 2e-3);
        }
    }
}
