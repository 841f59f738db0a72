//! Decode GEMV / skinny GEMM: `y[m, n] = Σ_k x[m, k] · w[n, k]` for a few rows of `x` against a
//! row-major weight `[n, k]` (HF's `[out, in]`), the shape of every projection at decode.
//!
//! Decode is bound by reading the weight once, so each plane streams whole weight rows with
//! vector loads (16 bytes where the device allows), keeps one f32 accumulator per row of `x`,
//! and reduces with `plane_sum`; `x` is tiny and stays in cache.

use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::vector::vector_size;

/// Planes per cube, and weight rows each plane walks.
const PLANES: u32 = 4;
const ROWS_PER_PLANE: usize = 1;
/// Rows of `x` one cube handles (its accumulators are registers).
pub const M_TILE: usize = 8;

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn gemv_kernel<F: Float, N: Size>(
    x: &Array<Vector<F, N>>,
    w: &Array<Vector<F, N>>,
    bias: &Array<F>,
    y: &mut Array<F>,
    m: usize,
    n_out: usize,
    k_vecs: usize,
    rows_per_plane: usize,
    #[comptime] m_tile: usize,
    #[comptime] has_bias: bool,
) {
    let planes = (CUBE_DIM_X / PLANE_DIM) as usize;
    let first_row = CUBE_POS_X as usize * planes * rows_per_plane + (UNIT_POS / PLANE_DIM) as usize;
    let m0 = CUBE_POS_Y as usize * m_tile;
    let lane = UNIT_POS_PLANE as usize;
    let step = PLANE_DIM as usize;
    // Each plane walks `rows_per_plane` rows, `planes` apart, so that a cube lives long enough
    // to keep loads streaming.
    for rr in 0..rows_per_plane {
        let row = first_row + rr * planes;
        if row < n_out {
            let mut acc = Array::<f32>::new(m_tile);
            #[unroll]
            for r in 0..m_tile {
                acc[r] = f32::new(0.0);
            }
            let w_row = row * k_vecs;
            // Four independent weight loads in flight per lane before their products are needed.
            let mut i = lane;
            while i + 3 * step < k_vecs {
                let w0 = Vector::<f32, N>::cast_from(w[w_row + i]);
                let w1 = Vector::<f32, N>::cast_from(w[w_row + i + step]);
                let w2 = Vector::<f32, N>::cast_from(w[w_row + i + 2 * step]);
                let w3 = Vector::<f32, N>::cast_from(w[w_row + i + 3 * step]);
                #[unroll]
                for r in 0..m_tile {
                    if m0 + r < m {
                        let xr = (m0 + r) * k_vecs + i;
                        let p = w0 * Vector::<f32, N>::cast_from(x[xr])
                            + w1 * Vector::<f32, N>::cast_from(x[xr + step])
                            + w2 * Vector::<f32, N>::cast_from(x[xr + 2 * step])
                            + w3 * Vector::<f32, N>::cast_from(x[xr + 3 * step]);
                        #[unroll]
                        for e in 0..N::value() {
                            acc[r] += p[e];
                        }
                    }
                }
                i += 4 * step;
            }
            while i < k_vecs {
                let wv = Vector::<f32, N>::cast_from(w[w_row + i]);
                #[unroll]
                for r in 0..m_tile {
                    if m0 + r < m {
                        let p = wv * Vector::<f32, N>::cast_from(x[(m0 + r) * k_vecs + i]);
                        #[unroll]
                        for e in 0..N::value() {
                            acc[r] += p[e];
                        }
                    }
                }
                i += step;
            }
            let b = if comptime![has_bias] {
                f32::cast_from(bias[row])
            } else {
                f32::new(0.0)
            };
            #[unroll]
            for r in 0..m_tile {
                let total = plane_sum(acc[r]);
                if lane == 0 && m0 + r < m {
                    y[(m0 + r) * n_out + row] = F::cast_from(total + b);
                }
            }
        }
    }
}

/// `y` `[m, n]` = `x` `[m, k]` · `w` `[n, k]`ᵀ (+ `bias` `[n]`).
#[allow(clippy::too_many_arguments)]
pub fn launch<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    x: &Handle,
    w: &Handle,
    bias: Option<&Handle>,
    y: &Handle,
    m: usize,
    n: usize,
    k: usize,
) {
    launch_tuned::<R, F>(client, x, w, bias, y, m, n, k, PLANES, ROWS_PER_PLANE);
}

/// [`launch`] with the cube's plane count and the rows each plane walks chosen by the caller
/// (the benchmark sweeps them).
#[allow(clippy::too_many_arguments)]
pub fn launch_tuned<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    x: &Handle,
    w: &Handle,
    bias: Option<&Handle>,
    y: &Handle,
    m: usize,
    n: usize,
    k: usize,
    planes: u32,
    rows_per_plane: usize,
) {
    let v = vector_size(client, size_of::<F>(), k);
    let plane = client.properties().hardware.plane_size_max;
    let m_tile = M_TILE.min(m.next_power_of_two());
    let cubes_x = n.div_ceil(planes as usize * rows_per_plane) as u32;
    let cubes_y = m.div_ceil(m_tile) as u32;
    unsafe {
        gemv_kernel::launch::<F, R>(
            client,
            CubeCount::Static(cubes_x, cubes_y, 1),
            CubeDim::new_1d(plane * planes),
            v,
            ArrayArg::from_raw_parts(x.clone(), m * k / v),
            ArrayArg::from_raw_parts(w.clone(), n * k / v),
            // Unread without a bias: any valid buffer will do.
            ArrayArg::from_raw_parts(bias.unwrap_or(y).clone(), n),
            ArrayArg::from_raw_parts(y.clone(), m * n),
            m,
            n,
            k / v,
            rows_per_plane,
            m_tile,
            bias.is_some(),
        );
    }
}

/// The plain reference.
pub fn reference(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    m: usize,
    n: usize,
    k: usize,
) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    for r in 0..m {
        for c in 0..n {
            let dot = (0..k)
                .map(|i| x[r * k + i] as f64 * w[c * k + i] as f64)
                .sum::<f64>();
            y[r * n + c] = (dot + bias.map_or(0.0, |b| b[c] as f64)) as f32;
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{client, fill, read, rel_err, upload, Elem};

    fn check<F: Elem>(m: usize, n: usize, k: usize, with_bias: bool, tol: f64) {
        let c = client();
        let x = fill(m * k, 21);
        let w = fill(n * k, 22);
        let b = F::round_trip(&fill(n, 23));
        let bh = upload::<F>(&c, &b);
        let y = upload::<F>(&c, &vec![f32::NAN; m * n]);
        launch::<_, F>(
            &c,
            &upload::<F>(&c, &x),
            &upload::<F>(&c, &w),
            with_bias.then_some(&bh),
            &y,
            m,
            n,
            k,
        );
        let expected = reference(
            &F::round_trip(&x),
            &F::round_trip(&w),
            with_bias.then_some(&b[..]),
            m,
            n,
            k,
        );
        let e = rel_err(&read::<F>(&c, y), &expected);
        assert!(e < tol, "{} m {m} n {n} k {k}: rel err {e}", F::NAME);
    }

    #[test]
    fn shapes_including_ragged() {
        for (m, n, k) in [
            (1, 64, 576),
            (3, 130, 256),
            (8, 33, 96),
            (11, 17, 100),
            (1, 5, 7),
        ] {
            check::<f32>(m, n, k, false, 1e-5);
            check::<f32>(m, n, k, true, 1e-5);
        }
    }

    #[test]
    fn tuned_cube_shapes_agree() {
        let c = client();
        let (m, n, k) = (2, 37, 200);
        let x = fill(m * k, 24);
        let w = fill(n * k, 25);
        let expected = reference(&x, &w, None, m, n, k);
        for (planes, rows) in [(1, 1), (2, 3), (8, 4)] {
            let y = upload::<f32>(&c, &vec![f32::NAN; m * n]);
            launch_tuned::<_, f32>(
                &c,
                &upload::<f32>(&c, &x),
                &upload::<f32>(&c, &w),
                None,
                &y,
                m,
                n,
                k,
                planes,
                rows,
            );
            let e = rel_err(&read::<f32>(&c, y), &expected);
            assert!(e < 1e-5, "planes {planes} rows {rows}: rel err {e}");
        }
    }

    #[test]
    fn f16() {
        check::<half::f16>(2, 96, 1024, true, 2e-3);
    }
}
