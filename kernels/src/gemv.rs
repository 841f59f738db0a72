//! Decode GEMV / skinny GEMM: `y[m, n] = Σ_k x[m, k] · w[n, k]` for a few rows of `x` against a
//! row-major weight `[n, k]` (HF's `[out, in]`), the shape of every projection at decode.
//!
//! Decode is bound by reading the weight once, so each plane streams whole weight rows with
//! vector loads (16 bytes where the device allows), `depth` of them in flight per lane, keeps one
//! f32 accumulator per row of `x`, and reduces with `plane_sum`; `x` is tiny and stays in cache.
//! Fused variants, so decode needs no launches between projections: SwiGLU (the fused gate-up
//! weight `[2·n, k]`, gate rows then up rows: each plane walks gate row `j` and up row `j` and
//! writes `silu(gate)·up`); RMSNorm folded in (the norm's weight pre-multiplied into `w`'s
//! columns, the sum of squares gathered from the `x` loads the product makes anyway, the scale
//! applied to the finished dot product); and the residual add as an accumulating epilogue.

use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::vector::vector_size;

/// Rows of `x` one cube handles (its accumulators are registers).
pub const M_TILE: usize = 8;

/// How the weight rows are spread: planes per cube, rows each plane walks together (`planes`
/// apart, their loads side by side, each `x` load shared), and vector loads in flight per lane
/// and row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuning {
    pub planes: u32,
    pub rows_per_plane: usize,
    pub depth: usize,
}

/// The tuning every decode projection uses (Nsight Compute sweep of 13 configurations × 4
/// shapes on the H100, benches/RESULTS.md): at m = 1, Q/K/V 20.0 µs (21.8 with the former
/// 4 × 1 × 4), O 14.6, down 42.5, gate-up + SwiGLU 81.5 — each within 0.1 µs of its shape's
/// best.
pub const DEFAULT_TUNING: Tuning = Tuning {
    planes: 16,
    rows_per_plane: 1,
    depth: 2,
};

/// Adds `w[offsets[j]..] · x[m0 + r]` to `acc[j · m_tile + r]` for `rows` weight rows j
/// (starting at vector `offsets[j]`, walked together: their loads in flight side by side, each
/// `x` load shared) and the cube's `m_tile` rows of `x`, this lane's share, and
/// (`sum_squares`) `x[m0 + r] · x[m0 + r]` to `ss[r]`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn accumulate_rows<F: Float, N: Size>(
    x: &Array<Vector<F, N>>,
    w: &Array<Vector<F, N>>,
    acc: &mut Array<f32>,
    ss: &mut Array<f32>,
    offsets: &Array<usize>,
    m0: usize,
    m: usize,
    k_vecs: usize,
    #[comptime] rows: usize,
    #[comptime] m_tile: usize,
    #[comptime] depth: usize,
    #[comptime] sum_squares: bool,
) {
    let step = PLANE_DIM as usize;
    let mut i = UNIT_POS_PLANE as usize;
    // Kept in the weight's type until used: half the registers of f32.
    let mut wv = Array::<Vector<F, N>>::new(rows * depth);
    // `depth` independent loads of each weight row in flight per lane before their products
    // are needed.
    while i + (depth - 1) * step < k_vecs {
        #[unroll]
        for j in 0..rows {
            #[unroll]
            for d in 0..depth {
                wv[j * depth + d] = w[offsets[j] + i + d * step];
            }
        }
        #[unroll]
        for r in 0..m_tile {
            if m0 + r < m {
                let xr = (m0 + r) * k_vecs + i;
                let mut q = Vector::<f32, N>::new(0.0);
                let mut p = Array::<Vector<f32, N>>::new(rows);
                #[unroll]
                for j in 0..rows {
                    p[j] = Vector::new(0.0);
                }
                #[unroll]
                for d in 0..depth {
                    let xd = Vector::<f32, N>::cast_from(x[xr + d * step]);
                    #[unroll]
                    for j in 0..rows {
                        p[j] += Vector::<f32, N>::cast_from(wv[j * depth + d]) * xd;
                    }
                    if comptime![sum_squares] {
                        q += xd * xd;
                    }
                }
                #[unroll]
                for e in 0..N::value() {
                    #[unroll]
                    for j in 0..rows {
                        acc[j * m_tile + r] += p[j][e];
                    }
                    if comptime![sum_squares] {
                        ss[r] += q[e];
                    }
                }
            }
        }
        i += depth * step;
    }
    while i < k_vecs {
        #[unroll]
        for j in 0..rows {
            wv[j] = w[offsets[j] + i];
        }
        #[unroll]
        for r in 0..m_tile {
            if m0 + r < m {
                let xv = Vector::<f32, N>::cast_from(x[(m0 + r) * k_vecs + i]);
                let q = xv * xv;
                #[unroll]
                for j in 0..rows {
                    let p = Vector::<f32, N>::cast_from(wv[j]) * xv;
                    #[unroll]
                    for e in 0..N::value() {
                        acc[j * m_tile + r] += p[e];
                    }
                }
                if comptime![sum_squares] {
                    #[unroll]
                    for e in 0..N::value() {
                        ss[r] += q[e];
                    }
                }
            }
        }
        i += step;
    }
}

#[cube]
fn zeros(#[comptime] len: usize) -> Array<f32> {
    let mut a = Array::<f32>::new(len);
    #[unroll]
    for r in 0..len {
        a[r] = f32::new(0.0);
    }
    a
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn gemv_kernel<F: Float, N: Size>(
    x: &Array<Vector<F, N>>,
    w: &Array<Vector<F, N>>,
    bias: &Array<F>,
    y: &mut Array<F>,
    m: usize,
    n_out: usize,
    k_vecs: usize,
    eps: f32,
    #[comptime] rows_per_plane: usize,
    #[comptime] m_tile: usize,
    #[comptime] depth: usize,
    #[comptime] has_bias: bool,
    #[comptime] swiglu: bool,
    #[comptime] rms_scale: bool,
    #[comptime] accumulate: bool,
) {
    let planes = (CUBE_DIM_X / PLANE_DIM) as usize;
    let first_row = CUBE_POS_X as usize * planes * rows_per_plane + (UNIT_POS / PLANE_DIM) as usize;
    let m0 = CUBE_POS_Y as usize * m_tile;
    // The plane's rows (`planes` apart) are walked together; SwiGLU adds each one's up row,
    // `n_out` rows below it: `acc` holds the rows' sums, then the up rows'. Rows past the end
    // read the last row (in bounds) and are not written.
    let halves = comptime![if swiglu { 2usize } else { 1usize }];
    let w_rows = comptime![halves * rows_per_plane];
    let mut offsets = Array::<usize>::new(w_rows);
    #[unroll]
    for h in 0..halves {
        #[unroll]
        for rr in 0..rows_per_plane {
            let row = usize::min(first_row + rr * planes, n_out - 1);
            offsets[h * rows_per_plane + rr] = (row + h * n_out) * k_vecs;
        }
    }
    let mut acc = zeros(w_rows * m_tile);
    let mut ss = zeros(m_tile);
    accumulate_rows::<F, N>(
        x, w, &mut acc, &mut ss, &offsets, m0, m, k_vecs, w_rows, m_tile, depth, rms_scale,
    );
    #[unroll]
    for rr in 0..rows_per_plane {
        let row = first_row + rr * planes;
        if row < n_out {
            let b = if comptime![has_bias] {
                f32::cast_from(bias[row])
            } else {
                f32::new(0.0)
            };
            #[unroll]
            for r in 0..m_tile {
                let mut total = plane_sum(acc[rr * m_tile + r]);
                let mut up_total = f32::new(0.0);
                if comptime![swiglu] {
                    up_total = plane_sum(acc[(rows_per_plane + rr) * m_tile + r]);
                }
                if comptime![rms_scale] {
                    let k = f32::cast_from(k_vecs * N::value());
                    let inv = f32::recip(f32::sqrt(plane_sum(ss[r]) / k + eps));
                    total *= inv;
                    up_total *= inv;
                }
                total += b;
                if comptime![swiglu] {
                    total = total / (1.0 + f32::exp(-total)) * up_total;
                }
                let at = (m0 + r) * n_out + row;
                if UNIT_POS_PLANE == 0 && m0 + r < m {
                    if comptime![accumulate] {
                        total += f32::cast_from(y[at]);
                    }
                    y[at] = F::cast_from(total);
                }
            }
        }
    }
}

/// What the GEMV does around the product.
#[derive(Clone, Copy, Default)]
pub struct Options<'a> {
    pub bias: Option<&'a Handle>,
    /// RMSNorm of `x` folded in, with this epsilon: the products are scaled by each row's
    /// 1 / rms(x). The norm's weight must already be folded into `w`'s columns.
    pub rms_eps: Option<f32>,
    /// `w` is `[2·n, k]`, gate rows then up rows; `y` = silu(x · gateᵀ) · (x · upᵀ).
    pub swiglu: bool,
    /// `y` += the product (the residual add, in place: each element has one writer).
    pub accumulate: bool,
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
    let opts = Options {
        bias,
        ..Options::default()
    };
    launch_with::<R, F>(client, x, w, y, m, n, k, opts, DEFAULT_TUNING);
}

/// `y` `[m, n]` from `x` `[m, k]` and `w` as `opts` says.
#[allow(clippy::too_many_arguments)]
pub fn launch_with<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    x: &Handle,
    w: &Handle,
    y: &Handle,
    m: usize,
    n: usize,
    k: usize,
    opts: Options,
    tuning: Tuning,
) {
    let Tuning {
        planes,
        rows_per_plane,
        depth,
    } = tuning;
    let v = vector_size(client, size_of::<F>(), k);
    let plane = client.properties().hardware.plane_size_max;
    let m_tile = M_TILE.min(m.next_power_of_two());
    let cubes_x = n.div_ceil(planes as usize * rows_per_plane) as u32;
    let cubes_y = m.div_ceil(m_tile) as u32;
    let w_rows = if opts.swiglu { 2 * n } else { n };
    let arr = |h: &Handle, len: usize| unsafe { ArrayArg::from_raw_parts(h.clone(), len) };
    // Every index stays in bounds (rows and columns are guarded; the tests and
    // compute-sanitizer check it), so the launch skips CubeCL's per-access bounds checks.
    unsafe {
        gemv_kernel::launch_unchecked::<F, R>(
            client,
            CubeCount::Static(cubes_x, cubes_y, 1),
            CubeDim::new_1d(plane * planes),
            v,
            arr(x, m * k / v),
            arr(w, w_rows * k / v),
            // Unread without a bias: any valid buffer will do.
            arr(opts.bias.unwrap_or(y), n),
            arr(y, m * n),
            m,
            n,
            k / v,
            opts.rms_eps.unwrap_or(0.0),
            rows_per_plane,
            m_tile,
            depth,
            opts.bias.is_some(),
            opts.swiglu,
            opts.rms_eps.is_some(),
            opts.accumulate,
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
    use crate::test_util::{client, epilogue_reference, fill, output, read, rel_err, upload, Elem};

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
        for (planes, rows_per_plane, depth) in [(1, 1, 4), (2, 3, 8), (8, 4, 2)] {
            let y = upload::<f32>(&c, &vec![f32::NAN; m * n]);
            let tuning = Tuning {
                planes,
                rows_per_plane,
                depth,
            };
            launch_with::<_, f32>(
                &c,
                &upload::<f32>(&c, &x),
                &upload::<f32>(&c, &w),
                &y,
                m,
                n,
                k,
                Options::default(),
                tuning,
            );
            let e = rel_err(&read::<f32>(&c, y), &expected);
            assert!(e < 1e-5, "{tuning:?}: rel err {e}");
        }
    }

    /// SwiGLU, the folded RMSNorm and the accumulating epilogue against RMSNorm's (unit
    /// weight), the GEMV's and SiLU·mul's references in sequence.
    #[test]
    fn fused_variants_match_their_unfused_references() {
        let c = client();
        let eps = 1e-5;
        for (m, n, k) in [(1, 40, 256), (5, 13, 100)] {
            for (swiglu, norm, accumulate) in [
                (true, false, false),
                (false, true, false),
                (true, true, false),
                (false, false, true),
            ] {
                let w_rows = if swiglu { 2 * n } else { n };
                let (x, w, y0) = (fill(m * k, 26), fill(w_rows * k, 27), fill(m * n, 28));
                let (xh, wh) = (upload::<f32>(&c, &x), upload::<f32>(&c, &w));
                let y = output::<f32>(&c, &y0, accumulate);
                let opts = Options {
                    bias: None,
                    rms_eps: norm.then_some(eps),
                    swiglu,
                    accumulate,
                };
                launch_with::<_, f32>(&c, &xh, &wh, &y, m, n, k, opts, DEFAULT_TUNING);
                let input = if norm {
                    crate::rms_norm::reference(&x, None, &vec![1.0; k], k, eps)
                } else {
                    x.clone()
                };
                let product = reference(&input, &w, None, m, w_rows, k);
                let y0 = accumulate.then_some(&y0[..]);
                let expected = epilogue_reference(product, n, None, swiglu, y0);
                let e = rel_err(&read::<f32>(&c, y), &expected);
                let what =
                    format!("m {m} n {n} k {k} swiglu {swiglu} norm {norm} acc {accumulate}");
                assert!(e < 1e-5, "{what}: rel err {e}");
            }
        }
    }

    #[test]
    fn f16() {
        check::<half::f16>(2, 96, 1024, true, 2e-3);
    }
}
