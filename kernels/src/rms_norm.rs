//! RMSNorm fused with the residual add, one cube per row:
//! `residual += input` (written back), then `output = residual / rms(residual) · weight`.
//! Without a residual it is a plain RMSNorm of `input`. The input may also be a split GEMM's
//! f32 partial sums, added up here instead of by a launch of their own. Statistics in f32, as
//! HF computes them.

use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::mma_gemm::Partials;
use crate::reduce::cube_sum;
use crate::vector::vector_size;

/// Units per cube (a row), and per cube that adds partial sums: a decode batch's few rows are
/// few cubes, so each unit takes one vector (rows of up to 4,096 f32 in vectors of 4) with all
/// its splits' loads in flight at once (256 units, four vectors each in turn, took 13 µs for 64
/// rows on the H200 against 9.7 for a reduction launch and a plain norm).
const THREADS: usize = 256;
const PARTIALS_THREADS: usize = 1024;
/// The most planes `threads` units make up (plane size ≥ 4 everywhere).
fn max_planes(threads: usize) -> usize {
    threads / 4
}

/// `input` holds `parts` addends of `rows × cols` vectors of type `I` one after another (one
/// for a plain input): the residual's new value is its old one plus all of them, summed in f32
/// and rounded once.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn rms_norm_kernel<F: Float, I: Float, N: Size>(
    input: &Array<Vector<I, N>>,
    residual: &mut Array<Vector<F, N>>,
    weight: &Array<Vector<F, N>>,
    output: &mut Array<Vector<F, N>>,
    cols: usize,
    part_stride: usize,
    eps: f32,
    #[comptime] add_residual: bool,
    #[comptime] parts: usize,
    #[comptime] planes: usize,
) {
    let start = CUBE_POS * cols;
    let mut sum_sq = f32::new(0.0);
    let mut i = UNIT_POS as usize;
    while i < cols {
        let v = if comptime![add_residual] {
            let mut sum = Vector::<f32, N>::cast_from(residual[start + i]);
            #[unroll]
            for p in 0..parts {
                sum += Vector::<f32, N>::cast_from(input[p * part_stride + start + i]);
            }
            let v = Vector::<F, N>::cast_from(sum);
            residual[start + i] = v;
            v
        } else {
            Vector::<F, N>::cast_from(input[start + i])
        };
        let f = Vector::<f32, N>::cast_from(v);
        let sq = f * f;
        #[unroll]
        for k in 0..N::value() {
            sum_sq += sq[k];
        }
        i += CUBE_DIM as usize;
    }
    let total = cube_sum(sum_sq, planes);
    let inv = f32::recip(f32::sqrt(total / f32::cast_from(cols * N::value()) + eps));
    let mut i = UNIT_POS as usize;
    while i < cols {
        let v = if comptime![add_residual] {
            residual[start + i]
        } else {
            Vector::<F, N>::cast_from(input[start + i])
        };
        let normed = Vector::<f32, N>::cast_from(v) * Vector::new(inv);
        output[start + i] = Vector::<F, N>::cast_from(normed) * weight[i];
        i += CUBE_DIM as usize;
    }
}

/// Normalizes `rows` rows of `cols` elements. With `residual`, adds `input` into it first and
/// normalizes the sum (vLLM's fused_add_rms_norm). Buffers hold `F` elements, row-major.
#[allow(clippy::too_many_arguments)]
pub fn launch<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    input: &Handle,
    residual: Option<&Handle>,
    weight: &Handle,
    output: &Handle,
    rows: usize,
    cols: usize,
    eps: f32,
) {
    let v = vector_size(client, size_of::<F>(), cols);
    let shape = Shape {
        rows,
        cols,
        v,
        threads: THREADS,
    };
    // Unused without a residual: any valid buffer will do.
    let res = residual.unwrap_or(input);
    let add = residual.is_some();
    launch_kernel::<R, F, F>(client, input, 1, res, add, weight, output, shape, eps);
}

/// As [`launch`] with a residual, the addend being a split GEMM's deferred partial sums
/// (`[splits, rows, cols]` f32, [`crate::mma_gemm::Epilogue::defer_split`]).
#[allow(clippy::too_many_arguments)]
pub fn launch_partials<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    partials: &Partials,
    residual: &Handle,
    weight: &Handle,
    output: &Handle,
    rows: usize,
    cols: usize,
    eps: f32,
) {
    // One vector width for both types: as wide as an f32 load of the device allows.
    let v = vector_size(client, size_of::<F>(), cols).min(vector_size(client, 4, cols));
    let shape = Shape {
        rows,
        cols,
        v,
        threads: PARTIALS_THREADS,
    };
    let (sums, parts) = (&partials.sums, partials.splits);
    launch_kernel::<R, F, f32>(
        client, sums, parts, residual, true, weight, output, shape, eps,
    );
}

/// Rows, columns, the vector width and the units per cube of a launch.
#[derive(Clone, Copy)]
struct Shape {
    rows: usize,
    cols: usize,
    v: usize,
    threads: usize,
}

#[allow(clippy::too_many_arguments)]
fn launch_kernel<R: Runtime, F: Float + CubeElement, I: Float + CubeElement>(
    client: &ComputeClient<R>,
    input: &Handle,
    parts: usize,
    residual: &Handle,
    add_residual: bool,
    weight: &Handle,
    output: &Handle,
    shape: Shape,
    eps: f32,
) {
    let Shape {
        rows,
        cols,
        v,
        threads,
    } = shape;
    let n = rows * cols / v;
    let arr = |h: &Handle, len: usize| unsafe { ArrayArg::from_raw_parts(h.clone(), len) };
    rms_norm_kernel::launch::<F, I, R>(
        client,
        CubeCount::Static(rows as u32, 1, 1),
        CubeDim::new_1d(threads as u32),
        v,
        arr(input, parts * n),
        arr(residual, n),
        arr(weight, cols / v),
        arr(output, n),
        cols / v,
        n,
        eps,
        add_residual,
        parts,
        max_planes(threads),
    );
}

/// The plain reference: f32 in, f32 out; `residual` is updated in place.
pub fn reference(
    input: &[f32],
    residual: Option<&mut [f32]>,
    weight: &[f32],
    cols: usize,
    eps: f32,
) -> Vec<f32> {
    let x: Vec<f32> = match residual {
        Some(r) => {
            r.iter_mut().zip(input).for_each(|(r, i)| *r += i);
            r.to_vec()
        }
        None => input.to_vec(),
    };
    x.chunks(cols)
        .flat_map(|row| {
            let ms = row.iter().map(|v| (v * v) as f64).sum::<f64>() / cols as f64;
            let inv = 1.0 / (ms + eps as f64).sqrt();
            row.iter()
                .zip(weight)
                .map(move |(v, w)| (*v as f64 * inv) as f32 * w)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{client, fill, read, rel_err, upload, Elem};

    /// What the launch adds into the residual before the norm.
    #[derive(Clone, Copy, PartialEq)]
    enum Addend {
        /// A plain norm of the input.
        Nothing,
        /// The input, of the model's type.
        Values,
        /// That many f32 partial sums (a split GEMM's deferred output).
        Partials(usize),
    }

    fn check<F: Elem>(rows: usize, cols: usize, addend: Addend, tol: f64) {
        let c = client();
        let n = rows * cols;
        let splits = match addend {
            Addend::Partials(s) => s,
            _ => 1,
        };
        let parts = fill(splits * n, 1);
        let weight = fill(cols, 2);
        let res = fill(n, 3);
        let (hw, hr) = (upload::<F>(&c, &weight), upload::<F>(&c, &res));
        let out = upload::<F>(&c, &vec![f32::NAN; n]); // poisoned

        // The reference sees the inputs as the kernel does: of type F, or f32 partial sums.
        let round = |v: &[f32]| F::round_trip(v);
        let input = match addend {
            Addend::Partials(_) => {
                let sums = c.create_from_slice(f32::as_bytes(&parts));
                let partials = Partials { sums, splits };
                launch_partials::<_, F>(&c, &partials, &hr, &hw, &out, rows, cols, 1e-5);
                (0..n)
                    .map(|i| (0..splits).map(|s| parts[s * n + i]).sum())
                    .collect()
            }
            _ => {
                let res = (addend == Addend::Values).then_some(&hr);
                let hi = upload::<F>(&c, &parts);
                launch::<_, F>(&c, &hi, res, &hw, &out, rows, cols, 1e-5);
                round(&parts)
            }
        };
        let mut res_ref = round(&res);
        let with_residual = addend != Addend::Nothing;
        let residual = with_residual.then_some(&mut res_ref[..]);
        let expected = reference(&input, residual, &round(&weight), cols, 1e-5);
        let got = read::<F>(&c, out);
        assert!(got.iter().all(|v| v.is_finite()), "unwritten output");
        let e = rel_err(&got, &expected);
        assert!(e < tol, "{} rows {rows} cols {cols}: rel err {e}", F::NAME);
        if with_residual {
            let e = rel_err(&read::<F>(&c, hr), &round(&res_ref));
            assert!(e < tol, "residual: rel err {e}");
        }
    }

    #[test]
    fn f32_matches_reference() {
        for (rows, cols) in [(1, 64), (3, 576), (2, 1000), (5, 7)] {
            check::<f32>(rows, cols, Addend::Nothing, 1e-6);
            check::<f32>(rows, cols, Addend::Values, 1e-6);
        }
    }

    #[test]
    fn f16_matches_reference() {
        check::<half::f16>(3, 576, Addend::Values, 2e-3);
        check::<half::f16>(2, 1000, Addend::Nothing, 2e-3);
    }

    /// A split GEMM's partial sums added into the residual: vectors of 4 and of 1.
    #[test]
    fn partial_sums_into_the_residual() {
        for (rows, cols, splits) in [(3, 576, 1), (2, 1000, 5), (4, 7, 3)] {
            check::<f32>(rows, cols, Addend::Partials(splits), 1e-6);
            check::<half::f16>(rows, cols, Addend::Partials(splits), 2e-3);
        }
    }
}
