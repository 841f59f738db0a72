//! RMSNorm fused with the residual add, one cube per row:
//! `residual += input` (written back), then `output = residual / rms(residual) · weight`.
//! Without a residual it is a plain RMSNorm of `input`. Statistics in f32, as HF computes them.

use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::reduce::cube_sum;
use crate::vector::vector_size;

/// Units per cube, and the most planes that can make it up (plane size ≥ 4 everywhere).
const THREADS: u32 = 256;
const MAX_PLANES: usize = 64;

#[cube(launch)]
fn rms_norm_kernel<F: Float, N: Size>(
    input: &Array<Vector<F, N>>,
    residual: &mut Array<Vector<F, N>>,
    weight: &Array<Vector<F, N>>,
    output: &mut Array<Vector<F, N>>,
    cols: usize,
    eps: f32,
    #[comptime] add_residual: bool,
) {
    let start = CUBE_POS * cols;
    let mut sum_sq = f32::new(0.0);
    let mut i = UNIT_POS as usize;
    while i < cols {
        let mut v = input[start + i];
        if comptime![add_residual] {
            v += residual[start + i];
            residual[start + i] = v;
        }
        let f = Vector::<f32, N>::cast_from(v);
        let sq = f * f;
        #[unroll]
        for k in 0..N::value() {
            sum_sq += sq[k];
        }
        i += CUBE_DIM as usize;
    }
    let total = cube_sum(sum_sq, MAX_PLANES);
    let inv = f32::recip(f32::sqrt(total / f32::cast_from(cols * N::value()) + eps));
    let mut i = UNIT_POS as usize;
    while i < cols {
        let v = if comptime![add_residual] {
            residual[start + i]
        } else {
            input[start + i]
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
    let n = rows * cols / v;
    let arr = |h: &Handle, len: usize| unsafe { ArrayArg::from_raw_parts(h.clone(), len) };
    rms_norm_kernel::launch::<F, R>(
        client,
        CubeCount::Static(rows as u32, 1, 1),
        CubeDim::new_1d(THREADS),
        v,
        arr(input, n),
        // Unused without a residual: any valid buffer will do.
        arr(residual.unwrap_or(input), n),
        arr(weight, cols / v),
        arr(output, n),
        cols / v,
        eps,
        residual.is_some(),
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

    fn check<F: Elem>(rows: usize, cols: usize, with_residual: bool, tol: f64) {
        let c = client();
        let input = fill(rows * cols, 1);
        let weight = fill(cols, 2);
        let mut res = fill(rows * cols, 3);
        let (hi, hw, hr) = (
            upload::<F>(&c, &input),
            upload::<F>(&c, &weight),
            upload::<F>(&c, &res),
        );
        let out = upload::<F>(&c, &vec![f32::NAN; rows * cols]); // poisoned
        launch::<_, F>(
            &c,
            &hi,
            with_residual.then_some(&hr),
            &hw,
            &out,
            rows,
            cols,
            1e-5,
        );
        // The reference sees the inputs as rounded to F.
        let round = |v: &[f32]| F::round_trip(v);
        let mut res_ref = round(&res);
        let expected = reference(
            &round(&input),
            with_residual.then_some(&mut res_ref[..]),
            &round(&weight),
            cols,
            1e-5,
        );
        let got = read::<F>(&c, out);
        assert!(got.iter().all(|v| v.is_finite()), "unwritten output");
        let e = rel_err(&got, &expected);
        assert!(e < tol, "{} rows {rows} cols {cols}: rel err {e}", F::NAME);
        if with_residual {
            let e = rel_err(&read::<F>(&c, hr), &res_ref);
            assert!(e < tol, "residual: rel err {e}");
            res.clear();
        }
    }

    #[test]
    fn f32_matches_reference() {
        for (rows, cols) in [(1, 64), (3, 576), (2, 1000), (5, 7)] {
            check::<f32>(rows, cols, false, 1e-6);
            check::<f32>(rows, cols, true, 1e-6);
        }
    }

    #[test]
    fn f16_matches_reference() {
        check::<half::f16>(3, 576, true, 2e-3);
        check::<half::f16>(2, 1000, false, 2e-3);
    }
}
