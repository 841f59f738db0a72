//! Skinny GEMM on tensor cores: `y[m, n] = Σ_k x[m, k] · w[n, k]` for the 2–64 rows of a decode
//! step with several sequences, against a row-major weight `[n, k]` (HF's `[out, in]`).
//!
//! Still bound by reading the weight once, but past a few rows the GEMV's FMAs and its re-reads
//! of `x` cost more than the read: here each plane of 32 lanes streams 16-row tiles of `w`
//! straight from memory into `mma` (m16n8k16, f32 accumulation) A fragments, and the rows of
//! `x` are the B side (eight per column tile, up to eight tiles), staged per chunk of `k` in
//! shared memory once for the whole cube. No fragment needs a shuffle or a shared-memory pass
//! for `w`: a dot product may take its `k` in any order as long as both sides take the same
//! one, so lane (g, t) loads 8 consecutive values of its weight rows g and g + 8, and of its `x`
//! row g, at `k = 32·j + 8·t`, and puts values 0–3 where `mma` wants `k = 2t, 2t + 1, 2t + 8,
//! 2t + 9` of the first k16 step and values 4–7 there in the second.
//!
//! Short of cubes (few weight rows, long `k`), the `k` range is split over cubes, each writing
//! f32 partial sums that a second launch adds up, with the epilogue (bias, SwiGLU on a fused
//! gate-up weight, residual add); with one split the product kernel applies it itself.
//!
//! The tile layout is `mma`'s, over 32-unit groups of the cube. Devices without the instruction
//! (the CPU CI's lavapipe) run the same kernel with each `mma` emulated through shared memory,
//! which needs no particular plane size.

use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::prefill_attention::has_tensor_cores;
use crate::vector::vector_size;

/// Rows of `x` one launch takes (eight `mma` column tiles of 8).
pub const MAX_ROWS: usize = 64;
/// `k` must be a multiple of this: one `mma` pair (two k16 steps) per lane load.
pub const K_STEP: usize = 32;
/// Units of the `mma` tile layout.
const WARP: usize = 32;

/// Two bf16/f16 values: one register of an `mma` fragment.
type Pair<E> = Vector<E, Const<2>>;

/// How the work is spread: planes per cube, 16-row weight tiles per plane (even for SwiGLU:
/// half gate rows, half the matching up rows), `K_STEP`s per shared-memory chunk of `x` (even),
/// whether each chunk's weight loads go out during the previous chunk's products, and, for
/// tests, a forced number of `k` splits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuning {
    pub planes: usize,
    pub row_tiles: usize,
    pub chunk_steps: usize,
    pub prefetch: bool,
    pub splits: Option<usize>,
}

impl Tuning {
    /// The spread for `m` rows of a product with or without SwiGLU (host-timed sweep of 7
    /// spreads on Llama-3.1-8B's decode shapes at 16, 32 and 64 rows, H200,
    /// benches/RESULTS.md): 2-step chunks with the next chunk's weights loading during this
    /// chunk's products everywhere; up to 16 rows 4 planes of 2 tiles (the best or within 4 %
    /// of it on every shape), past 16 rows 8 planes of 1 tile (more cubes, fewer registers:
    /// best or within 3 % at 32 and 64 rows), SwiGLU keeping 2 tiles (a gate and an up tile).
    pub fn for_rows(m: usize, swiglu: bool) -> Tuning {
        let (planes, row_tiles) = if m <= 16 || swiglu { (4, 2) } else { (8, 1) };
        Tuning {
            planes,
            row_tiles,
            chunk_steps: 2,
            prefetch: true,
            splits: None,
        }
    }
}

/// What happens to the product before it is stored.
#[derive(Clone, Copy, Default)]
pub struct Epilogue<'a> {
    pub bias: Option<&'a Handle>,
    /// `w` is `[2·n, k]`, gate rows then up rows; `y` = silu(x · gateᵀ) · (x · upᵀ).
    pub swiglu: bool,
    /// `y` += the product (the residual add, in place: each element has one writer).
    pub accumulate: bool,
}

/// Whether this kernel runs on the device for `F` and these sizes (otherwise: the GEMV or the
/// general GEMM).
pub fn supported<R: Runtime, F: CubePrimitive>(
    client: &ComputeClient<R>,
    m: usize,
    k: usize,
) -> bool {
    has_tensor_cores::<R, F>(client) && (2..=MAX_ROWS).contains(&m) && k.is_multiple_of(K_STEP)
}

/// The cube's share of `k`.
#[derive(CubeType, Clone, Copy)]
struct Span {
    /// First and last (exclusive) `K_STEP` of the cube's split.
    s0: usize,
    s1: usize,
}

/// The stored value of output `(row, col)` from its sums: `gate` (the product, or its gate
/// half) and `up` (SwiGLU's up half).
#[cube]
#[allow(clippy::too_many_arguments)]
fn finish<F: Float>(
    gate: f32,
    up: f32,
    bias: &Array<F>,
    y: &Array<F>,
    col: usize,
    at: usize,
    #[comptime] has_bias: bool,
    #[comptime] swiglu: bool,
    #[comptime] accumulate: bool,
) -> F {
    let mut v = gate;
    if comptime![has_bias] {
        v += f32::cast_from(bias[col]);
    }
    if comptime![swiglu] {
        v = v / (1.0 + f32::exp(-v)) * up;
    }
    if comptime![accumulate] {
        v += f32::cast_from(y[at]);
    }
    F::cast_from(v)
}

/// Elements `e` and `e + 1` of the 8 consecutive values held as `8 / N` vectors from `at`.
#[cube]
fn pair_of<F: Float, N: Size>(v: &Array<Vector<F, N>>, at: usize, #[comptime] e: usize) -> Pair<F> {
    let n = N::value();
    let mut p = Pair::<F>::new(F::new(0.0));
    p[0] = v[at + e / n][e % n];
    p[1] = v[at + (e + 1) / n][(e + 1) % n];
    p
}

/// `c += a · b` for one m16n8k16 tile: the tensor-core instruction, or (no tensor cores) the
/// same product through shared memory by the 32-unit group, in `mma`'s register layout (lane
/// (g, t) holds A rows g, g + 8 at k 2t, 2t + 1 / + 8, B column g at the same k, C rows g, g + 8
/// at columns 2t, 2t + 1). The emulation syncs the cube: every unit must reach it.
#[cube]
fn mma<F: Float>(
    a: &Array<Pair<F>>,
    b: &Array<Pair<F>>,
    c: &mut Array<Pair<f32>>,
    scratch: &mut SharedMemory<f32>,
    #[comptime] hardware: bool,
) {
    if comptime![hardware] {
        let def = cmma::MmaDefinition::<F, F, f32>::new(16usize, 8usize, 16usize);
        def.execute_inplace(a, b, c);
    } else {
        let lane = UNIT_POS as usize % WARP;
        let (g, t) = (lane / 4, lane % 4);
        // A 16×16 row-major, then B 16×8 (k-major), per 32-unit group.
        let base = (UNIT_POS as usize / WARP) * 384;
        #[unroll]
        for e in 0..2usize {
            scratch[base + g * 16 + 2 * t + e] = f32::cast_from(a[0][e]);
            scratch[base + (g + 8) * 16 + 2 * t + e] = f32::cast_from(a[1][e]);
            scratch[base + g * 16 + 2 * t + 8 + e] = f32::cast_from(a[2][e]);
            scratch[base + (g + 8) * 16 + 2 * t + 8 + e] = f32::cast_from(a[3][e]);
            scratch[base + 256 + (2 * t + e) * 8 + g] = f32::cast_from(b[0][e]);
            scratch[base + 256 + (2 * t + 8 + e) * 8 + g] = f32::cast_from(b[1][e]);
        }
        sync_cube();
        #[unroll]
        for h in 0..2usize {
            let mut acc = c[h];
            #[unroll]
            for e in 0..2usize {
                let mut s = f32::new(0.0);
                for p in 0..16usize {
                    s += scratch[base + (g + 8 * h) * 16 + p]
                        * scratch[base + 256 + p * 8 + 2 * t + e];
                }
                acc[e] += s;
            }
            c[h] = acc;
        }
        sync_cube();
    }
}

/// Stages the `x` chunk starting at `K_STEP` `s` (`steps` of them, zeros past the split and
/// past row `m`) in `regs`: the loads go out before the current chunk's products.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_x<F: Float, N: Size>(
    x: &Array<Vector<F, N>>,
    regs: &mut Array<Vector<F, N>>,
    s: usize,
    span: Span,
    m: usize,
    k_vecs: usize,
    #[comptime] rows: usize,
    #[comptime] steps: usize,
    #[comptime] units: usize,
    #[comptime] vec: usize,
) {
    let per_step = comptime![K_STEP / vec];
    let row_vecs = comptime![steps * K_STEP / vec];
    #[unroll]
    for i in 0..comptime![(rows * row_vecs).div_ceil(units)] {
        let idx = i * units + UNIT_POS as usize;
        let (row, c) = (idx / row_vecs, idx % row_vecs);
        regs[i] = Vector::new(F::new(0.0));
        if idx < rows * row_vecs && row < m && s + c / per_step < span.s1 {
            regs[i] = x[row * k_vecs + s * per_step + c];
        }
    }
}

/// Writes the staged chunk into buffer `at` of `x_s` (rows `stride` vectors apart).
#[cube]
fn store_x<F: Float, N: Size>(
    regs: &Array<Vector<F, N>>,
    x_s: &mut SharedMemory<Vector<F, N>>,
    at: usize,
    #[comptime] rows: usize,
    #[comptime] steps: usize,
    #[comptime] units: usize,
    #[comptime] stride: usize,
    #[comptime] vec: usize,
) {
    let row_vecs = comptime![steps * K_STEP / vec];
    #[unroll]
    for i in 0..comptime![(rows * row_vecs).div_ceil(units)] {
        let idx = i * units + UNIT_POS as usize;
        if idx < rows * row_vecs {
            x_s[at + (idx / row_vecs) * stride + idx % row_vecs] = regs[i];
        }
    }
}

/// Loads the lane's weight values of the chunk starting at `K_STEP` `s` into `wv` from `at`:
/// for each row (g and g + 8 of each tile) and step, 8 consecutive values.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_w<F: Float, N: Size>(
    w: &Array<Vector<F, N>>,
    wv: &mut Array<Vector<F, N>>,
    at: usize,
    w_at: &Array<usize>,
    s: usize,
    span: Span,
    #[comptime] row_tiles: usize,
    #[comptime] steps: usize,
    #[comptime] vec: usize,
) {
    let vecs_per_8 = comptime![8 / vec];
    let per_step = comptime![K_STEP / vec];
    #[unroll]
    for j in 0..steps {
        if s + j < span.s1 {
            #[unroll]
            for r in 0..comptime![2 * row_tiles] {
                #[unroll]
                for v in 0..vecs_per_8 {
                    wv[at + (r * steps + j) * vecs_per_8 + v] = w[w_at[r] + (s + j) * per_step + v];
                }
            }
        }
    }
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn skinny_gemm_kernel<F: Float, N: Size>(
    x: &Array<Vector<F, N>>,
    w: &Array<Vector<F, N>>,
    bias: &Array<F>,
    y: &mut Array<F>,
    partial: &mut Array<f32>,
    m: usize,
    n_out: usize,
    k_steps: usize,
    split_steps: usize,
    #[comptime] vec: usize,
    #[comptime] m_tiles: usize,
    #[comptime] planes: usize,
    #[comptime] row_tiles: usize,
    #[comptime] steps: usize,
    #[comptime] prefetch: bool,
    #[comptime] hardware: bool,
    #[comptime] split: bool,
    #[comptime] has_bias: bool,
    #[comptime] swiglu: bool,
    #[comptime] accumulate: bool,
) {
    let vecs_per_8 = comptime![8 / vec];
    let per_step = comptime![K_STEP / vec];
    let k_vecs = k_steps * per_step;
    let units = comptime![planes * WARP];
    let x_rows = comptime![8 * m_tiles];
    // Rows of a chunk in shared memory: one step's worth of padding keeps the lanes of a
    // 16-byte load phase (two rows, four lanes each) on distinct banks.
    let stride = comptime![(steps + 1) * K_STEP / vec];
    let buf = comptime![x_rows * stride];
    let mut x_s = SharedMemory::<Vector<F, N>>::new_aligned(2 * buf, 16usize);
    let mut scratch = SharedMemory::<f32>::new(comptime![if hardware { 1 } else { planes * 384 }]);

    let lane = UNIT_POS as usize % WARP;
    let plane = UNIT_POS as usize / WARP;
    let (g, t) = (lane / 4, lane % 4);
    // SwiGLU: the first half of a plane's tiles are gate rows, the rest the up rows `n_out`
    // below them.
    let halves = comptime![if swiglu { 2usize } else { 1usize }];
    let tiles_per_half = comptime![row_tiles / halves];
    // The plane's first 16-row tile (of each half), and the vector offsets of the lane's
    // weight rows g and g + 8 of each tile (clamped in bounds: rows past `n_out` are read but
    // never stored).
    let first_tile = (CUBE_POS_X as usize * planes + plane) * tiles_per_half;
    let mut w_at = Array::<usize>::new(comptime![2 * row_tiles]);
    #[unroll]
    for r in 0..row_tiles {
        let tile = first_tile + r % tiles_per_half;
        #[unroll]
        for h in 0..2usize {
            let row = usize::min(tile * 16 + g + 8 * h, n_out - 1) + (r / tiles_per_half) * n_out;
            w_at[2 * r + h] = row * k_vecs + t * vecs_per_8;
        }
    }
    let span = Span {
        s0: CUBE_POS_Y as usize * split_steps,
        s1: usize::min((CUBE_POS_Y as usize + 1) * split_steps, k_steps),
    };

    let mut acc = Array::<Pair<f32>>::new(comptime![row_tiles * m_tiles * 2]);
    #[unroll]
    for i in 0..comptime![row_tiles * m_tiles * 2] {
        acc[i] = Vector::new(0.0);
    }
    let mut xr =
        Array::<Vector<F, N>>::new(comptime![(x_rows * steps * K_STEP / vec).div_ceil(units)]);
    load_x::<F, N>(
        x, &mut xr, span.s0, span, m, k_vecs, x_rows, steps, units, vec,
    );
    store_x::<F, N>(&xr, &mut x_s, 0, x_rows, steps, units, stride, vec);
    sync_cube();

    // The weight values of a chunk; with `prefetch`, a second set holds the next chunk's,
    // whose loads are in flight while this chunk's products run.
    let w_buf = comptime![2 * row_tiles * steps * vecs_per_8];
    let mut wv = Array::<Vector<F, N>>::new(comptime![if prefetch { 2 * w_buf } else { w_buf }]);
    if comptime![prefetch] {
        load_w::<F, N>(w, &mut wv, 0, &w_at, span.s0, span, row_tiles, steps, vec);
    }
    let mut s = span.s0;
    let mut cur = 0usize;
    while s < span.s1 {
        let next = s + steps;
        if comptime![prefetch] {
            if next < span.s1 {
                load_w::<F, N>(w, &mut wv, w_buf, &w_at, next, span, row_tiles, steps, vec);
            }
        } else {
            load_w::<F, N>(w, &mut wv, 0, &w_at, s, span, row_tiles, steps, vec);
        }
        if next < span.s1 {
            load_x::<F, N>(x, &mut xr, next, span, m, k_vecs, x_rows, steps, units, vec);
        }
        #[unroll]
        for j in 0..steps {
            if s + j < span.s1 {
                // The lane's 8 values of each x row 8·mt + g at this step: B fragments for
                // both k16 halves.
                let mut xb = Array::<Vector<F, N>>::new(comptime![m_tiles * vecs_per_8]);
                #[unroll]
                for mt in 0..m_tiles {
                    #[unroll]
                    for v in 0..vecs_per_8 {
                        xb[mt * vecs_per_8 + v] = x_s
                            [cur * buf + (8 * mt + g) * stride + j * per_step + t * vecs_per_8 + v];
                    }
                }
                // Consecutive products go to different accumulators (a product's result is
                // needed again only 2·m_tiles·row_tiles products later).
                #[unroll]
                for half in 0..2usize {
                    #[unroll]
                    for mt in 0..m_tiles {
                        let mut b = Array::<Pair<F>>::new(2usize);
                        b[0] = pair_of::<F, N>(&xb, mt * vecs_per_8, 4 * half);
                        b[1] = pair_of::<F, N>(&xb, mt * vecs_per_8, 4 * half + 2);
                        #[unroll]
                        for r in 0..row_tiles {
                            let lo = (2 * r * steps + j) * vecs_per_8;
                            let hi = ((2 * r + 1) * steps + j) * vecs_per_8;
                            let mut a = Array::<Pair<F>>::new(4usize);
                            a[0] = pair_of::<F, N>(&wv, lo, 4 * half);
                            a[1] = pair_of::<F, N>(&wv, hi, 4 * half);
                            a[2] = pair_of::<F, N>(&wv, lo, 4 * half + 2);
                            a[3] = pair_of::<F, N>(&wv, hi, 4 * half + 2);
                            let mut c = Array::<Pair<f32>>::new(2usize);
                            let at = (r * m_tiles + mt) * 2;
                            c[0] = acc[at];
                            c[1] = acc[at + 1];
                            mma::<F>(&a, &b, &mut c, &mut scratch, hardware);
                            acc[at] = c[0];
                            acc[at + 1] = c[1];
                        }
                    }
                }
            }
        }
        if next < span.s1 {
            // The other buffer was last read in the previous chunk, behind its closing barrier.
            store_x::<F, N>(
                &xr,
                &mut x_s,
                (1 - cur) * buf,
                x_rows,
                steps,
                units,
                stride,
                vec,
            );
        }
        sync_cube();
        if comptime![prefetch] {
            #[unroll]
            for i in 0..w_buf {
                wv[i] = wv[w_buf + i];
            }
        }
        cur = 1 - cur;
        s = next;
    }

    // Lane (g, t) holds weight rows g, g + 8 of each tile at x rows 8·mt + 2t, + 1.
    let w_rows = halves * n_out;
    #[unroll]
    for r in 0..comptime![if split { row_tiles } else { tiles_per_half }] {
        let tile = first_tile + r % tiles_per_half;
        #[unroll]
        for h in 0..2usize {
            let col = tile * 16 + g + 8 * h;
            #[unroll]
            for mt in 0..m_tiles {
                #[unroll]
                for e in 0..2usize {
                    let row = 8 * mt + 2 * t + e;
                    if col < n_out && row < m {
                        let v = acc[(r * m_tiles + mt) * 2 + h][e];
                        if comptime![split] {
                            let wr = col + (r / tiles_per_half) * n_out;
                            partial[(CUBE_POS_Y as usize * m + row) * w_rows + wr] = v;
                        } else {
                            let mut up = f32::new(0.0);
                            if comptime![swiglu] {
                                up = acc[((r + tiles_per_half) * m_tiles + mt) * 2 + h][e];
                            }
                            let at = row * n_out + col;
                            let out =
                                finish::<F>(v, up, bias, y, col, at, has_bias, swiglu, accumulate);
                            y[at] = out;
                        }
                    }
                }
            }
        }
    }
}

/// Adds the splits' partial sums `[splits, m, w_rows]` and applies the epilogue.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn reduce_kernel<F: Float>(
    partial: &Array<f32>,
    bias: &Array<F>,
    y: &mut Array<F>,
    m: usize,
    n_out: usize,
    splits: usize,
    #[comptime] has_bias: bool,
    #[comptime] swiglu: bool,
    #[comptime] accumulate: bool,
) {
    let at = ABSOLUTE_POS;
    if at < m * n_out {
        let (row, col) = (at / n_out, at % n_out);
        let w_rows = comptime![if swiglu { 2usize } else { 1usize }] * n_out;
        let mut gate = f32::new(0.0);
        let mut up = f32::new(0.0);
        for s in 0..splits {
            let base = (s * m + row) * w_rows + col;
            gate += partial[base];
            if comptime![swiglu] {
                up += partial[base + n_out];
            }
        }
        let out = finish::<F>(gate, up, bias, y, col, at, has_bias, swiglu, accumulate);
        y[at] = out;
    }
}

/// `y` `[m, n]` = `x` `[m, k]` · `w` `[n, k]`ᵀ with `epilogue` (`w` `[2·n, k]` for SwiGLU), on
/// tensor cores where [`supported`], else through the emulated `mma` (for tests).
#[allow(clippy::too_many_arguments)]
pub fn launch<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    x: &Handle,
    w: &Handle,
    y: &Handle,
    m: usize,
    n: usize,
    k: usize,
    epilogue: Epilogue,
    tuning: Tuning,
) {
    let Tuning {
        planes,
        row_tiles,
        chunk_steps,
        prefetch,
        splits,
    } = tuning;
    assert!(
        m <= MAX_ROWS && k.is_multiple_of(K_STEP),
        "skinny GEMM shape m {m} k {k}"
    );
    let v = vector_size(client, size_of::<F>(), 8);
    let hardware = has_tensor_cores::<R, F>(client);
    let halves = if epilogue.swiglu { 2 } else { 1 };
    let row_blocks = n.div_ceil(16 * planes * row_tiles / halves);
    let k_steps = k / K_STEP;
    // Enough cubes to keep every SM streaming; each split at least two chunks long.
    let sms = client
        .properties()
        .hardware
        .num_streaming_multiprocessors
        .unwrap_or(1) as usize;
    let wanted = splits.unwrap_or_else(|| (2 * sms).div_ceil(row_blocks));
    let max_splits = k_steps.div_ceil(2 * chunk_steps).max(1);
    let split_steps = k_steps
        .div_ceil(wanted.clamp(1, max_splits))
        .div_ceil(chunk_steps)
        * chunk_steps;
    let splits = k_steps.div_ceil(split_steps);
    let split = splits > 1;
    let w_rows = halves * n;
    let partial = client.empty(if split { splits * m * w_rows * 4 } else { 4 });
    let arr = |h: &Handle, len: usize| unsafe { ArrayArg::from_raw_parts(h.clone(), len) };
    // Unread without a bias: any valid buffer will do.
    let bias = epilogue.bias.unwrap_or(y);
    // Every index stays in bounds (weight rows are clamped, stores guarded; the tests and
    // compute-sanitizer check it), so the launch skips CubeCL's per-access bounds checks.
    unsafe {
        skinny_gemm_kernel::launch_unchecked::<F, R>(
            client,
            CubeCount::Static(row_blocks as u32, splits as u32, 1),
            CubeDim::new_1d((planes * WARP) as u32),
            v,
            arr(x, m * k / v),
            arr(w, w_rows * k / v),
            arr(bias, n),
            arr(y, m * n),
            arr(&partial, if split { splits * m * w_rows } else { 1 }),
            m,
            n,
            k_steps,
            split_steps,
            v,
            m.div_ceil(8),
            planes,
            row_tiles,
            chunk_steps,
            prefetch,
            hardware,
            split,
            epilogue.bias.is_some(),
            epilogue.swiglu,
            epilogue.accumulate,
        );
        if split {
            let units = 256;
            reduce_kernel::launch_unchecked::<F, R>(
                client,
                CubeCount::Static((m * n).div_ceil(units) as u32, 1, 1),
                CubeDim::new_1d(units as u32),
                arr(&partial, splits * m * w_rows),
                arr(bias, n),
                arr(y, m * n),
                m,
                n,
                splits,
                epilogue.bias.is_some(),
                epilogue.swiglu,
                epilogue.accumulate,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gemv::reference;
    use crate::test_util::{client, epilogue_reference, fill, output, read, rel_err, upload, Elem};

    /// One launch against the GEMV's reference (and SiLU·mul's, and the residual add).
    fn check<F: Elem>(
        m: usize,
        n: usize,
        k: usize,
        epilogue: (bool, bool, bool),
        tuning: Tuning,
        tol: f64,
    ) {
        let (with_bias, swiglu, accumulate) = epilogue;
        let c = client();
        let w_rows = if swiglu { 2 * n } else { n };
        let x = F::round_trip(&fill(m * k, 31));
        let w = F::round_trip(&fill(w_rows * k, 32));
        let b = F::round_trip(&fill(n, 33));
        let y0 = F::round_trip(&fill(m * n, 34));
        let bh = upload::<F>(&c, &b);
        let y = output::<F>(&c, &y0, accumulate);
        let ep = Epilogue {
            bias: with_bias.then_some(&bh),
            swiglu,
            accumulate,
        };
        launch::<_, F>(
            &c,
            &upload::<F>(&c, &x),
            &upload::<F>(&c, &w),
            &y,
            m,
            n,
            k,
            ep,
            tuning,
        );
        let product = reference(&x, &w, None, m, w_rows, k);
        let want = epilogue_reference(
            product,
            n,
            with_bias.then_some(&b[..]),
            swiglu,
            accumulate.then_some(&y0[..]),
        );
        let e = rel_err(&read::<F>(&c, y), &want);
        assert!(
            e < tol,
            "{} m {m} n {n} k {k} {tuning:?}: rel err {e}",
            F::NAME
        );
    }

    const SMALL: Tuning = Tuning {
        planes: 2,
        row_tiles: 2,
        chunk_steps: 2,
        prefetch: true,
        splits: None,
    };

    /// Planes of one weight tile (the spread past 16 rows).
    const ONE_TILE: Tuning = Tuning {
        planes: 3,
        row_tiles: 1,
        chunk_steps: 2,
        prefetch: false,
        splits: None,
    };

    // lavapipe compiles the emulated `mma` slowly (two barriers each, all unrolled): a plane's
    // tiles times the column tiles stay at two.
    #[test]
    fn ragged_rows_and_columns() {
        for (m, n, k) in [(2, 64, 64), (5, 40, 96)] {
            check::<f32>(m, n, k, (false, false, false), SMALL, 1e-5);
        }
        check::<f32>(9, 70, 128, (false, false, false), ONE_TILE, 1e-5);
    }

    #[test]
    fn splits_of_k_add_up() {
        for splits in [2, 3] {
            let tuning = Tuning {
                splits: Some(splits),
                ..SMALL
            };
            check::<f32>(6, 48, 320, (false, false, false), tuning, 1e-5);
            check::<f32>(6, 48, 320, (true, false, true), tuning, 1e-5);
            check::<f32>(3, 40, 256, (false, true, false), tuning, 1e-5);
        }
    }

    #[test]
    fn epilogues_in_the_product_kernel() {
        check::<f32>(4, 40, 128, (true, false, false), SMALL, 1e-5);
        check::<f32>(4, 40, 128, (false, true, false), SMALL, 1e-5);
        check::<f32>(4, 40, 128, (false, false, true), SMALL, 1e-5);
    }

    #[test]
    fn one_tile_planes_and_f16() {
        check::<f32>(3, 100, 160, (false, false, false), ONE_TILE, 1e-5);
        check::<half::f16>(8, 64, 256, (true, false, false), SMALL, 3e-3);
    }
}
