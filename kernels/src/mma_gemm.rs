//! GEMM on tensor cores: `y[m, n] = Σ_k x[m, k] · w[n, k]` against a row-major weight `[n, k]`
//! (HF's `[out, in]`), from the 2–64 rows of a decode step with several sequences to prefill
//! chunks of thousands, with the projections' epilogues (bias, SwiGLU, residual add) folded in.
//!
//! Each plane of 32 lanes multiplies 16-row tiles of `w` (`mma` m16n8k16 A fragments, f32
//! accumulation) by 8-row tiles of `x` (the B side). At decode sizes the product is still bound
//! by reading the weight once, but past a few rows the GEMV's FMAs and its re-reads of `x` cost
//! more than the read: all of a cube's planes share one block of up to 64 rows of `x`. Prefill
//! chunks spread a cube's planes over both sides (64 × 64 a plane) and take one cube per block
//! of rows of `x` and of `w`, the blocks of `x` fastest, so the cubes at work together share
//! their weight rows.
//!
//! Both operands reach the planes through a ring of shared-memory stages filled by async copies
//! (`cp.async`, one mbarrier per stage): several chunks of `k` are in flight per cube without
//! holding a register (registers holding the next chunk allowed one, and 64 rows read at a
//! quarter to half of copy; the ring reads the large ones at 44–89 % of it from 32 to 64 rows).
//!
//! Fragments come out of the stages by `ldmatrix`, straight into the registers `mma` takes
//! (reading them as 16-byte rows instead left an A fragment's two rows interleaved, and the
//! register moves that put them in order were half of the kernel's instructions). A dot product
//! may take its `k` in any order as long as both sides take the same one: the `k` of a k16 step
//! are two 8-value groups of the stage rows. Groups are stored swizzled (group `o` of row `r`
//! at `o ^ (r % 8)`), so neither the fragment reads nor the copies meet bank conflicts.
//!
//! Short of cubes (few weight rows, long `k`), the `k` range is split over cubes (as many splits
//! as fill whole waves of the device, priced against their traffic), each writing f32 partial
//! sums that a second launch adds up, with the epilogue (bias, SwiGLU on a fused
//! gate-up weight, residual add); with one split the product kernel applies it itself.
//!
//! The tile layout is `mma`'s, over 32-unit groups of the cube. Devices without the instruction
//! (the CPU CI's lavapipe) run the same kernel with each `mma` emulated through shared memory
//! and plain copies into the stages, which needs no particular plane size.

use cubecl::frontend::barrier::Barrier;
use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::mma::{
    copy_vec, fragment_lanes, has_tensor_cores, load_fragments, mma, shared_bound, stage_barrier,
    swizzle_period, swizzled, Pair, EMULATION_SCRATCH, MBARRIER, STAGE_ALIGN, WARP,
};
use crate::vector::vector_size;

/// Rows of a decode batch: one block of rows of `x` (eight `mma` column tiles of 8) a cube.
pub const MAX_ROWS: usize = 64;
/// `k` must be a multiple of this: one `mma` pair (two k16 steps) per lane read.
pub const K_STEP: usize = 32;

/// How the work is spread: planes per cube along the weight rows (`planes`) and along the rows
/// of `x` (`x_planes`), 16-row weight tiles per plane (even for SwiGLU: half gate rows, half
/// the matching up rows), at most `x_tiles` 8-row tiles of `x` per plane (≤ 8), `K_STEP`s per
/// stage (even), stages in the ring (chunks in flight + the one being multiplied), and, for
/// tests, a forced number of `k` splits. A cube multiplies `16·planes·row_tiles` weight rows by
/// `8·x_planes·x_tiles` rows of `x`; more rows of `x` take more cubes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuning {
    pub planes: usize,
    pub x_planes: usize,
    pub row_tiles: usize,
    pub x_tiles: usize,
    pub chunk_steps: usize,
    pub stages: usize,
    pub splits: Option<usize>,
}

impl Tuning {
    /// The spread for `m` rows of `F` on this device, with or without SwiGLU. Decode batches
    /// (≤ `MAX_ROWS`; host-timed sweep of 9 spreads on Llama-3.1-8B's decode shapes at 16, 32
    /// and 64 rows, H200, benches/RESULTS.md): one block of rows, 8 planes of 2 tiles and 3
    /// stages (best or within 3 % at 16 and 32 rows on the shapes without SwiGLU), SwiGLU 4
    /// planes and 4 stages (best at 32 rows). Past that, prefill chunks: [`PREFILL`].
    /// Stages, then planes, drop until the ring fits the device's shared memory.
    pub fn for_device<R: Runtime, F: CubePrimitive>(
        client: &ComputeClient<R>,
        m: usize,
        swiglu: bool,
    ) -> Tuning {
        let mut tuning = if m > MAX_ROWS {
            PREFILL
        } else if swiglu {
            Tuning {
                planes: 4,
                stages: 4,
                ..DECODE
            }
        } else {
            DECODE
        };
        let limit = client.properties().hardware.max_shared_memory_size;
        let hardware = has_tensor_cores::<R, F>(client);
        let elem = F::as_type_native_unchecked().size();
        while tuning.shared_bytes(m, elem, hardware) > limit {
            if tuning.stages > 2 {
                tuning.stages -= 1;
            } else if tuning.planes > 1 {
                tuning.planes /= 2;
            } else {
                break; // the launch reports it
            }
        }
        tuning
    }

    /// 8-row tiles of `x` per plane for `m` rows.
    fn m_tiles(&self, m: usize) -> usize {
        self.x_tiles.min(m.div_ceil(8 * self.x_planes)).max(1)
    }

    /// Rows of `x` a cube takes for `m` rows.
    fn x_rows(&self, m: usize) -> usize {
        8 * self.x_planes * self.m_tiles(m)
    }

    /// Units of a cube.
    fn units(&self) -> usize {
        self.planes * self.x_planes * WARP
    }

    /// Cubes of this spread an SM holds at once, by shared memory (a cube takes `shared` bytes;
    /// `limit`, the most one cube may take, stands for the SM's) and by an estimate of the
    /// registers (ptxas on sm_90, two row tiles: 54–66 at one or two column tiles, 96 at four,
    /// 142 at eight).
    fn cubes_per_sm(&self, m: usize, shared: usize, limit: usize) -> usize {
        let units = self.units();
        let regs = 64 + 5 * self.row_tiles * self.m_tiles(m);
        let by_shared = (limit + 1024) / (shared + 1024);
        let by_regs = 65536 / (units * regs);
        by_shared.min(by_regs).min(2048 / units).max(1)
    }

    /// Bytes of shared memory a cube of this spread takes for `m` rows of `elem`-byte values
    /// (and the emulated `mma`'s scratch without tensor cores).
    fn shared_bytes(&self, m: usize, elem: usize, hardware: bool) -> usize {
        let rows = 16 * self.planes * self.row_tiles + self.x_rows(m);
        // The kernel's ring, its emulation scratch (one value on tensor cores) and its stages'
        // mbarriers.
        let ring = self.stages * rows * self.chunk_steps * K_STEP * elem;
        let scratch = if hardware {
            4
        } else {
            self.planes * self.x_planes * EMULATION_SCRATCH * 4
        };
        let barriers = if hardware { self.stages } else { 0 };
        let mut buffers = vec![(ring, STAGE_ALIGN), (scratch, 4)];
        buffers.extend(std::iter::repeat_n(MBARRIER, barriers));
        shared_bound(&buffers)
    }
}

/// Decode batches: one block of up to 64 rows, 8 planes of two 16-row weight tiles.
const DECODE: Tuning = Tuning {
    planes: 8,
    x_planes: 1,
    row_tiles: 2,
    x_tiles: 8,
    chunk_steps: 2,
    stages: 3,
    splits: None,
};

/// Prefill chunks: 128 weight rows × 128 rows of `x` a cube, 64 × 64 a plane (the most
/// products per byte read from shared memory that 255 registers hold), two cubes an SM: of 16
/// spreads on Llama-3.1-8B's projections at 2,048 rows the best or within 1 % of it on all
/// four, gate-up with SwiGLU too (H200, benches/RESULTS.md; the tie: 256 × 128 cubes of 8
/// planes, 2 stages of 4 `K_STEP`s). 64 × 32 planes at 3–4 warps a scheduler ran 5–41 %
/// slower: their extra fragment reads cost more than the warps hide.
pub const PREFILL: Tuning = Tuning {
    planes: 2,
    x_planes: 2,
    row_tiles: 4,
    x_tiles: 8,
    chunk_steps: 2,
    stages: 3,
    splits: None,
};

/// What happens to the product before it is stored.
#[derive(Clone, Copy, Default)]
pub struct Epilogue<'a> {
    pub bias: Option<&'a Handle>,
    /// `w` is `[2·n, k]`, gate rows then up rows; `y` = silu(x · gateᵀ) · (x · upᵀ).
    pub swiglu: bool,
    /// `y` += the product (the residual add, in place: each element has one writer).
    pub accumulate: bool,
    /// With `accumulate` alone (no bias or SwiGLU): where the product splits `k`, leave the
    /// splits' partial sums to the consumer (the next RMSNorm adds them into the residual,
    /// [`crate::rms_norm::launch_partials`]) instead of a launch of their own adding them.
    pub defer_split: bool,
}

/// The f32 partial sums `[splits, m, n]` of a split product whose addition was deferred.
pub struct Partials {
    pub sums: Handle,
    pub splits: usize,
}

/// Whether this kernel runs on tensor cores on the device for `F` and these sizes (otherwise:
/// the GEMV or cubek's GEMM).
pub fn supported<R: Runtime, F: CubePrimitive>(
    client: &ComputeClient<R>,
    m: usize,
    k: usize,
) -> bool {
    has_tensor_cores::<R, F>(client) && m >= 2 && k.is_multiple_of(K_STEP)
}

/// The cube's share of `k`.
#[derive(CubeType, Clone, Copy)]
struct Span {
    /// First and last (exclusive) `K_STEP` of the cube's split.
    s0: usize,
    s1: usize,
}

/// The stored value of an output from its sums, `gate` (the product, or its gate half) and
/// `up` (SwiGLU's up half), its column's `bias` and its value `y` before (read only where the
/// epilogue uses them).
#[cube]
fn finish(
    gate: f32,
    up: f32,
    bias: f32,
    y: f32,
    #[comptime] has_bias: bool,
    #[comptime] swiglu: bool,
    #[comptime] accumulate: bool,
) -> f32 {
    let mut v = gate;
    if comptime![has_bias] {
        v += bias;
    }
    if comptime![swiglu] {
        v = v / (1.0 + f32::exp(-v)) * up;
    }
    if comptime![accumulate] {
        v += y;
    }
    v
}

/// The shape of a stage, all comptime: `chunk` vectors per row (`steps` `K_STEP`s), `w_rows`
/// weight rows (the cube's) then `x_rows` rows of `x`; `units` copy `w_slots` weight vectors
/// and `x_slots` `x` vectors each per stage, the first `x_full` of them rows that every cube
/// has. With `same_swizzle`, a unit's slots lie whole swizzle periods of rows apart, so they
/// all swizzle as its first one does.
#[derive(CubeType, Clone, Copy)]
struct Ring {
    #[cube(comptime)]
    chunk: usize,
    #[cube(comptime)]
    per_step: usize,
    #[cube(comptime)]
    vecs_per_8: usize,
    #[cube(comptime)]
    w_rows: usize,
    #[cube(comptime)]
    x_rows: usize,
    #[cube(comptime)]
    units: usize,
    #[cube(comptime)]
    w_slots: usize,
    #[cube(comptime)]
    x_slots: usize,
    #[cube(comptime)]
    x_full: usize,
    #[cube(comptime)]
    same_swizzle: bool,
    #[cube(comptime)]
    stage: usize,
    /// Every split is whole chunks of `k` (no step of a chunk to skip).
    #[cube(comptime)]
    whole_chunks: bool,
}

/// Queues the copies of the chunk starting at `K_STEP` `s` into stage `st`: the unit's weight
/// vectors (source offsets `w_src`, at `s = 0`), then its `x` vectors (`x_src`). A unit always
/// copies vector `c = UNIT_POS % chunk` of its rows, its first one at `dst0` in a stage: one
/// bound check on the split per chunk, and with `same_swizzle` every destination that offset
/// plus a constant. Without tensor cores, plain loads and stores.
#[cube]
#[allow(clippy::too_many_arguments)]
fn issue<F: Float, N: Size>(
    w: &Array<Vector<F, N>>,
    x: &Array<Vector<F, N>>,
    ring_s: &mut SharedMemory<Vector<F, N>>,
    w_src: &Array<usize>,
    x_src: &Array<usize>,
    dst0: usize,
    s: usize,
    span: Span,
    st: usize,
    #[comptime] ring: Ring,
    #[comptime] hardware: bool,
) {
    let vec = comptime![8 / ring.vecs_per_8];
    let c = UNIT_POS as usize % ring.chunk;
    let mut live = s < span.s1;
    if comptime![!ring.whole_chunks] {
        live = s + c / ring.per_step < span.s1;
    }
    if live {
        let off = s * ring.per_step;
        let row0 = UNIT_POS as usize / ring.chunk;
        let rows_per_slot = comptime![ring.units / ring.chunk];
        let at = st * ring.stage;
        #[unroll]
        for i in 0..ring.w_slots {
            let mut dst = at + dst0 + i * comptime![rows_per_slot * ring.chunk];
            if comptime![!ring.same_swizzle] {
                dst = at + swizzled(row0 + i * rows_per_slot, c, ring.chunk, ring.vecs_per_8);
            }
            copy_vec::<F, N>(w, w_src[i] + off, ring_s, dst, vec, hardware);
        }
        #[unroll]
        for i in 0..ring.x_slots {
            let row = row0 + i * rows_per_slot;
            // Slots past `x_full` may hold rows past the stage's `x_rows`.
            if i < ring.x_full || row < ring.x_rows {
                let mut dst = at
                    + dst0
                    + comptime![ring.w_rows * ring.chunk]
                    + i * comptime![rows_per_slot * ring.chunk];
                if comptime![!ring.same_swizzle] {
                    dst = at + swizzled(ring.w_rows + row, c, ring.chunk, ring.vecs_per_8);
                }
                copy_vec::<F, N>(x, x_src[i] + off, ring_s, dst, vec, hardware);
            }
        }
    }
}

/// One k16 step's fragments from stage `base` into half `buf` of the plane's double buffers:
/// the A fragment of each weight tile (`wa`, 4 registers a tile) and the B fragments of each
/// pair of `x` tiles (`xb`, 4 registers a pair, 2 a tile). An odd count's last pair starts a
/// tile early and keeps only its second tile: with an odd count the pairs are counted from 8
/// rows before the plane's first tile (rows of the stage too), the first pairs from row 8.
/// `lanes_w` and `lanes_x`: [`fragment_lanes`] at `w_row0` and `x_row0`, the plane's first
/// weight row and that first row of its pairs.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_step<F: Float, N: Size>(
    ring_s: &SharedMemory<Vector<F, N>>,
    wa: &mut Array<Pair<F>>,
    xb: &mut Array<Pair<F>>,
    lanes_w: &Array<usize>,
    lanes_x: &Array<usize>,
    base: usize,
    w_row0: usize,
    x_row0: usize,
    t: usize,
    buf: usize,
    #[comptime] ring: Ring,
    #[comptime] row_tiles: usize,
    #[comptime] m_tiles: usize,
    #[comptime] hardware: bool,
) {
    let pairs = comptime![m_tiles.div_ceil(2)];
    let (chunk, vp8) = (ring.chunk, ring.vecs_per_8);
    #[unroll]
    for r in 0..row_tiles {
        let q = load_fragments::<F, N>(
            ring_s,
            base,
            w_row0,
            16 * r,
            2 * t,
            lanes_w,
            chunk,
            vp8,
            false,
            hardware,
        );
        #[unroll]
        for i in 0..4usize {
            wa[(buf * row_tiles + r) * 4 + i] = q[i];
        }
    }
    #[unroll]
    for p in 0..pairs {
        // 16·p, + 8 for all but the last pair where the count is odd.
        let shift = comptime![8 * (m_tiles % 2)];
        let row = 16 * p + shift - shift * ((p + 1) / pairs);
        let q = load_fragments::<F, N>(
            ring_s,
            base,
            x_row0,
            row,
            2 * t,
            lanes_x,
            chunk,
            vp8,
            true,
            hardware,
        );
        // The odd last pair's second tile goes where a first tile's registers go.
        let from = shift / 4 * ((p + 1) / pairs);
        let at = (buf * pairs + p) * 4;
        #[unroll]
        for i in 0..4usize {
            xb[at + i] = q[(i + from) % 4];
        }
    }
}

/// The plane's products over the chunk in stage `st` (starting at `K_STEP` `s`), one k16 step
/// at a time, the next step's fragments loaded before this one's products so that the
/// `ldmatrix` latency hides behind them (rows and lanes as [`load_step`] takes them).
#[cube]
#[allow(clippy::too_many_arguments)]
fn multiply<F: Float, N: Size>(
    ring_s: &SharedMemory<Vector<F, N>>,
    acc: &mut Array<Pair<f32>>,
    scratch: &mut SharedMemory<f32>,
    lanes_w: &Array<usize>,
    lanes_x: &Array<usize>,
    w_row0: usize,
    x_row0: usize,
    s: usize,
    span: Span,
    st: usize,
    #[comptime] ring: Ring,
    #[comptime] m_tiles: usize,
    #[comptime] row_tiles: usize,
    #[comptime] steps: usize,
    #[comptime] hardware: bool,
) {
    let pairs = comptime![m_tiles.div_ceil(2)];
    let k16 = comptime![2 * steps];
    let base = st * ring.stage;
    let mut wa = Array::<Pair<F>>::new(comptime![2 * 4 * row_tiles]);
    let mut xb = Array::<Pair<F>>::new(comptime![2 * 4 * pairs]);
    load_step::<F, N>(
        ring_s, &mut wa, &mut xb, lanes_w, lanes_x, base, w_row0, x_row0, 0usize, 0usize, ring,
        row_tiles, m_tiles, hardware,
    );
    #[unroll]
    for t in 0..k16 {
        let buf = t % 2;
        if t < comptime![k16 - 1] {
            load_step::<F, N>(
                ring_s,
                &mut wa,
                &mut xb,
                lanes_w,
                lanes_x,
                base,
                w_row0,
                x_row0,
                t + 1,
                (t + 1) % 2,
                ring,
                row_tiles,
                m_tiles,
                hardware,
            );
        }
        let mut live = true;
        if comptime![!ring.whole_chunks] {
            live = s + t / 2 < span.s1;
        }
        if live {
            // Consecutive products go to different accumulators (a product's result is
            // needed again only m_tiles·row_tiles products later).
            #[unroll]
            for mt in 0..m_tiles {
                let pair = (buf * pairs + mt / 2) * 4 + 2 * (mt % 2);
                let mut b = Array::<Pair<F>>::new(2usize);
                b[0] = xb[pair];
                b[1] = xb[pair + 1];
                #[unroll]
                for r in 0..row_tiles {
                    let mut a = Array::<Pair<F>>::new(4usize);
                    #[unroll]
                    for i in 0..4usize {
                        a[i] = wa[(buf * row_tiles + r) * 4 + i];
                    }
                    let mut cc = Array::<Pair<f32>>::new(2usize);
                    let at = (r * m_tiles + mt) * 2;
                    cc[0] = acc[at];
                    cc[1] = acc[at + 1];
                    mma::<F>(&a, &b, &mut cc, scratch, hardware);
                    acc[at] = cc[0];
                    acc[at + 1] = cc[1];
                }
            }
        }
    }
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn mma_gemm_kernel<F: Float, N: Size>(
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
    #[comptime] x_planes: usize,
    #[comptime] row_tiles: usize,
    #[comptime] steps: usize,
    #[comptime] stages: usize,
    #[comptime] whole_chunks: bool,
    #[comptime] hardware: bool,
    #[comptime] split: bool,
    #[comptime] has_bias: bool,
    #[comptime] swiglu: bool,
    #[comptime] accumulate: bool,
) {
    let per_step = comptime![K_STEP / vec];
    let k_vecs = k_steps * per_step;
    let units = comptime![planes * x_planes * WARP];
    let chunk = comptime![steps * per_step];
    let w_rows = comptime![16 * planes * row_tiles];
    let x_rows = comptime![8 * x_planes * m_tiles];
    let rows_per_slot = comptime![units / chunk];
    let ring = comptime![Ring {
        chunk,
        per_step,
        vecs_per_8: 8 / vec,
        w_rows,
        x_rows,
        units,
        w_slots: w_rows * chunk / units,
        x_slots: (x_rows * chunk).div_ceil(units),
        x_full: x_rows / rows_per_slot,
        same_swizzle: rows_per_slot.is_multiple_of(swizzle_period(chunk, 8 / vec)),
        stage: (w_rows + x_rows) * chunk,
        whole_chunks,
    }];
    let mut ring_s =
        SharedMemory::<Vector<F, N>>::new_aligned(comptime![stages * ring.stage], STAGE_ALIGN);
    let mut scratch = SharedMemory::<f32>::new(comptime![if hardware {
        1
    } else {
        planes * x_planes * EMULATION_SCRATCH
    }]);
    let mut ready = Sequence::<Shared<Barrier>>::new();
    if comptime![hardware] {
        #[unroll]
        for _ in 0..stages {
            ready.push(Barrier::shared(CUBE_DIM, UNIT_POS == 0));
        }
    }

    // SwiGLU: the first half of a plane's tiles are gate rows, the rest the up rows `n_out`
    // below them.
    let halves = comptime![if swiglu { 2usize } else { 1usize }];
    let tiles_per_half = comptime![row_tiles / halves];
    // Cubes: x row blocks (fastest: the cubes at work together share their weight rows, read
    // from memory once), weight row blocks, splits of `k`.
    let (x_block, w_block, split_at) = (
        CUBE_POS_X as usize,
        CUBE_POS_Y as usize,
        CUBE_POS_Z as usize,
    );
    let span = Span {
        s0: split_at * split_steps,
        s1: usize::min((split_at + 1) * split_steps, k_steps),
    };
    // The unit's copy sources at `k = 0`: its rows (clamped in bounds: weight rows past `n_out`
    // and x rows past `m` are read but never stored), vector `UNIT_POS % chunk`.
    let c = UNIT_POS as usize % chunk;
    let row0 = UNIT_POS as usize / chunk;
    let dst0 = swizzled(row0, c, chunk, comptime![8 / vec]);
    // The plane's first weight row and the first row of its `x` tile pairs (8 rows early for
    // an odd count, see `load_step`), and its lanes' fragment addresses from them.
    let plane = UNIT_POS as usize / WARP;
    let (pw, px) = (plane % planes, plane / planes);
    let w_row0 = pw * row_tiles * 16;
    let x_row0 = w_rows + px * m_tiles * 8 - comptime![8 * (m_tiles % 2)];
    let lanes_w = fragment_lanes(w_row0, chunk, comptime![8 / vec], false);
    let lanes_x = fragment_lanes(x_row0, chunk, comptime![8 / vec], true);
    let mut w_src = Array::<usize>::new(ring.w_slots);
    #[unroll]
    for i in 0..ring.w_slots {
        let lr = row0 + i * (units / chunk);
        let (plane, r) = (lr / (16 * row_tiles), (lr / 16) % row_tiles);
        let tile = (w_block * planes + plane) * tiles_per_half + r % tiles_per_half;
        let row = usize::min(tile * 16 + lr % 16, n_out - 1) + (r / tiles_per_half) * n_out;
        w_src[i] = row * k_vecs + c;
    }
    let mut x_src = Array::<usize>::new(ring.x_slots);
    #[unroll]
    for i in 0..ring.x_slots {
        let row = x_block * x_rows + row0 + i * (units / chunk);
        x_src[i] = usize::min(row, m - 1) * k_vecs + c;
    }

    let mut acc = Array::<Pair<f32>>::new(comptime![row_tiles * m_tiles * 2]);
    #[unroll]
    for i in 0..comptime![row_tiles * m_tiles * 2] {
        acc[i] = Vector::new(0.0);
    }
    // The first `stages − 1` chunks in flight, then per chunk: the one `stages − 1` ahead
    // queued into the stage the previous chunk used, this one awaited and multiplied, and a
    // cube barrier before its stage is refilled.
    #[unroll]
    for st in 0..comptime![stages - 1] {
        let s = span.s0 + st * steps;
        issue::<F, N>(
            w,
            x,
            &mut ring_s,
            &w_src,
            &x_src,
            dst0,
            s,
            span,
            st,
            ring,
            hardware,
        );
        stage_barrier(&ready, st, stages, hardware, false);
    }
    let mut s = span.s0;
    let mut st = 0usize;
    while s < span.s1 {
        let ahead = (st + comptime![stages - 1]) % stages;
        let s_ahead = s + comptime![(stages - 1) * steps];
        issue::<F, N>(
            w,
            x,
            &mut ring_s,
            &w_src,
            &x_src,
            dst0,
            s_ahead,
            span,
            ahead,
            ring,
            hardware,
        );
        stage_barrier(&ready, ahead, stages, hardware, false);
        stage_barrier(&ready, st, stages, hardware, true);
        multiply::<F, N>(
            &ring_s,
            &mut acc,
            &mut scratch,
            &lanes_w,
            &lanes_x,
            w_row0,
            x_row0,
            s,
            span,
            st,
            ring,
            m_tiles,
            row_tiles,
            steps,
            hardware,
        );
        sync_cube();
        s += steps;
        st = (st + 1) % stages;
    }

    // Lane (g, t) holds weight rows g, g + 8 of each tile at x rows 8·mt + 2t, + 1.
    let lane = UNIT_POS as usize % WARP;
    let (g, t) = (lane / 4, lane % 4);
    let first_tile = (w_block * planes + pw) * tiles_per_half;
    let first_row = x_block * x_rows + px * m_tiles * 8;
    let w_total = halves * n_out;
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
                    let row = first_row + 8 * mt + 2 * t + e;
                    if col < n_out && row < m {
                        let v = acc[(r * m_tiles + mt) * 2 + h][e];
                        if comptime![split] {
                            let wr = col + (r / tiles_per_half) * n_out;
                            partial[(split_at * m + row) * w_total + wr] = v;
                        } else {
                            let mut up = f32::new(0.0);
                            if comptime![swiglu] {
                                up = acc[((r + tiles_per_half) * m_tiles + mt) * 2 + h][e];
                            }
                            let at = row * n_out + col;
                            let mut b = f32::new(0.0);
                            if comptime![has_bias] {
                                b = f32::cast_from(bias[col]);
                            }
                            let mut before = f32::new(0.0);
                            if comptime![accumulate] {
                                before = f32::cast_from(y[at]);
                            }
                            let out = finish(v, up, b, before, has_bias, swiglu, accumulate);
                            y[at] = F::cast_from(out);
                        }
                    }
                }
            }
        }
    }
}

/// Adds the splits' partial sums `[splits, m, w_rows]` and applies the epilogue, `N` outputs a
/// unit. The split count is comptime so that the loop unrolls and every split's load is in
/// flight at once (H200, Nsight: Q/K/V's reduction at 2 and 64 rows 3.1 → 2.6 and 3.9 → 3.4
/// µs against a runtime loop over scalars; the rest is the launch's own cost).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn reduce_kernel<F: Float, N: Size>(
    partial: &Array<Vector<f32, N>>,
    bias: &Array<Vector<F, N>>,
    y: &mut Array<Vector<F, N>>,
    m: usize,
    n_vecs: usize,
    #[comptime] splits: usize,
    #[comptime] has_bias: bool,
    #[comptime] swiglu: bool,
    #[comptime] accumulate: bool,
) {
    let at = ABSOLUTE_POS;
    if at < m * n_vecs {
        let (row, col) = (at / n_vecs, at % n_vecs);
        let w_vecs = comptime![if swiglu { 2usize } else { 1usize }] * n_vecs;
        let mut gate = Vector::<f32, N>::new(0.0);
        let mut up = Vector::<f32, N>::new(0.0);
        #[unroll]
        for s in 0..splits {
            let base = (s * m + row) * w_vecs + col;
            gate += partial[base];
            if comptime![swiglu] {
                up += partial[base + n_vecs];
            }
        }
        let mut b = Vector::<f32, N>::new(0.0);
        if comptime![has_bias] {
            b = Vector::<f32, N>::cast_from(bias[col]);
        }
        let mut before = Vector::<f32, N>::new(0.0);
        if comptime![accumulate] {
            before = Vector::<f32, N>::cast_from(y[at]);
        }
        let mut out = Vector::<F, N>::empty();
        #[unroll]
        for e in 0..N::value() {
            let v = finish(
                gate[e], up[e], b[e], before[e], has_bias, swiglu, accumulate,
            );
            out[e] = F::cast_from(v);
        }
        y[at] = out;
    }
}

/// `K_STEP`s per split for about `splits` splits (whole chunks; at least a ring's worth).
fn steps_per_split(k_steps: usize, splits: usize, tuning: Tuning) -> usize {
    let max_splits = k_steps.div_ceil(tuning.stages * tuning.chunk_steps).max(1);
    k_steps
        .div_ceil(splits.clamp(1, max_splits))
        .div_ceil(tuning.chunk_steps)
        * tuning.chunk_steps
}

/// The `K_STEP`s per split with the least estimated time: every wave of cubes costs as if it
/// filled all `slots` (a wave's last cubes set its length) plus a pipeline fill, and every
/// split past the first writes and reads back `outputs` f32 partial sums (a 64-row product of
/// k = 4096 adds 6 % of the weight's bytes per split). `blocks`: cubes per split.
fn best_split(
    k_steps: usize,
    blocks: usize,
    slots: usize,
    w_bytes: usize,
    outputs: usize,
    tuning: Tuning,
) -> usize {
    // What a wave costs beyond its bytes (2 µs at 4 TB/s: its pipeline's fill and drain, and
    // the reduction's longer reads per split), fitted to the H200's split sweep (RESULTS.md).
    const FILL_BYTES: f64 = 8e6;
    let cost = |split_steps: usize| {
        let splits = k_steps.div_ceil(split_steps);
        let cubes = blocks * splits;
        let waves = cubes.div_ceil(slots);
        let partial = if splits > 1 { splits * outputs * 8 } else { 0 };
        let bytes = (w_bytes + partial) as f64;
        waves as f64 * (bytes * slots as f64 / cubes as f64 + FILL_BYTES)
    };
    let max_splits = k_steps.div_ceil(tuning.stages * tuning.chunk_steps).max(1);
    (1..=max_splits)
        .map(|s| steps_per_split(k_steps, s, tuning))
        .min_by(|&a, &b| cost(a).total_cmp(&cost(b)).then(b.cmp(&a)))
        .unwrap_or(k_steps)
}

/// `y` `[m, n]` = `x` `[m, k]` · `w` `[n, k]`ᵀ with `epilogue` (`w` `[2·n, k]` for SwiGLU), on
/// tensor cores where [`supported`], else through the emulated `mma` (for tests). Returns the
/// partial sums left for the consumer where `epilogue.defer_split` asked and `k` was split
/// (`y` is then untouched).
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
) -> Option<Partials> {
    let Tuning {
        planes,
        x_planes,
        row_tiles,
        chunk_steps,
        stages,
        splits,
        ..
    } = tuning;
    let v = vector_size(client, size_of::<F>(), 8);
    // A stage's copies spread evenly: whole rows per copy slot, whole weight slots per unit.
    let (chunk, units) = (chunk_steps * K_STEP / v, tuning.units());
    assert!(
        k.is_multiple_of(K_STEP)
            && stages >= 2
            && chunk_steps % 2 == 0
            && tuning.x_tiles <= 8
            && units.is_multiple_of(chunk)
            && (16 * planes * row_tiles * chunk).is_multiple_of(units),
        "mma GEMM shape m {m} k {k}, {tuning:?}"
    );
    assert!(
        !epilogue.defer_split
            || (epilogue.accumulate && !epilogue.swiglu && epilogue.bias.is_none()),
        "only a plain residual add can be deferred"
    );
    let hardware = has_tensor_cores::<R, F>(client);
    let hw = &client.properties().hardware;
    let shared = tuning.shared_bytes(m, size_of::<F>(), hardware);
    assert!(
        shared <= hw.max_shared_memory_size,
        "mma GEMM {tuning:?} at {m} rows takes {shared} bytes of shared memory, the device gives {}",
        hw.max_shared_memory_size
    );
    let halves = if epilogue.swiglu { 2 } else { 1 };
    let row_blocks = n.div_ceil(16 * planes * row_tiles / halves);
    let m_tiles = tuning.m_tiles(m);
    let x_blocks = m.div_ceil(tuning.x_rows(m));
    let k_steps = k / K_STEP;
    let sms = hw.num_streaming_multiprocessors.unwrap_or(1) as usize;
    // A decode batch streams the weight: one cube an SM already draws the device's bandwidth
    // (H200: Llama-3.1-8B's gate-up ran 62 µs unsplit at 4 and 16 rows, 2–3 cubes an SM,
    // against 66–72 with the seven splits that filled every SM's cube slots), so its wave is
    // one cube an SM. A prefill chunk is bound by the tensor cores: every resident cube counts.
    let per_sm = if m <= MAX_ROWS {
        1
    } else {
        tuning.cubes_per_sm(m, shared, hw.max_shared_memory_size)
    };
    let slots = sms * per_sm;
    let w_bytes = halves * n * k * size_of::<F>();
    let split_steps = match splits {
        Some(s) => steps_per_split(k_steps, s, tuning),
        None => best_split(
            k_steps,
            row_blocks * x_blocks,
            slots,
            w_bytes,
            m * halves * n,
            tuning,
        ),
    };
    let splits = k_steps.div_ceil(split_steps);
    let split = splits > 1;
    let w_rows = halves * n;
    let partial = client.empty(if split { splits * m * w_rows * 4 } else { 4 });
    let arr = |h: &Handle, len: usize| unsafe { ArrayArg::from_raw_parts(h.clone(), len) };
    // Unread without a bias: any valid buffer will do.
    let bias = epilogue.bias.unwrap_or(y);
    // Every index stays in bounds (weight and x rows are clamped, stores guarded; the tests and
    // compute-sanitizer check it), so the launch skips CubeCL's per-access bounds checks.
    unsafe {
        mma_gemm_kernel::launch_unchecked::<F, R>(
            client,
            CubeCount::Static(x_blocks as u32, row_blocks as u32, splits as u32),
            CubeDim::new_1d(units as u32),
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
            m_tiles,
            planes,
            x_planes,
            row_tiles,
            chunk_steps,
            stages,
            k_steps.is_multiple_of(chunk_steps),
            hardware,
            split,
            epilogue.bias.is_some(),
            epilogue.swiglu,
            epilogue.accumulate,
        );
        if split && epilogue.defer_split {
            return Some(Partials {
                sums: partial,
                splits,
            });
        }
        if split {
            // Vectors of partial sums (f32) as wide as the device loads and `n` divides.
            let rv = vector_size(client, 4, n);
            let units = 256;
            reduce_kernel::launch_unchecked::<F, R>(
                client,
                CubeCount::Static((m * n / rv).div_ceil(units) as u32, 1, 1),
                CubeDim::new_1d(units as u32),
                rv,
                arr(&partial, splits * m * w_rows / rv),
                arr(bias, n / rv),
                arr(y, m * n / rv),
                m,
                n / rv,
                splits,
                epilogue.bias.is_some(),
                epilogue.swiglu,
                epilogue.accumulate,
            );
        }
    }
    None
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
            ..Default::default()
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

    // lavapipe gives a cube 32 KiB of shared memory (f32 stages of 64 values take 256 bytes a
    // row) and compiles the emulated `mma` slowly (two barriers each, all unrolled): a plane's
    // tiles times the column tiles stay at two.

    /// One plane of two tiles, a ring of three stages (it wraps around within a split).
    const SMALL: Tuning = Tuning {
        planes: 1,
        ..DECODE
    };

    /// Planes of one weight tile.
    const ONE_TILE: Tuning = Tuning {
        planes: 2,
        row_tiles: 1,
        stages: 2,
        ..DECODE
    };

    /// Two planes along the rows of `x`, one 8-row tile each: 16 rows a cube, so a few dozen
    /// rows take several cubes (the prefill spread, scaled to lavapipe's shared memory).
    const ROW_BLOCKS: Tuning = Tuning {
        planes: 1,
        x_planes: 2,
        x_tiles: 1,
        stages: 2,
        ..DECODE
    };
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
        // Outputs a row in vectors of 2 and of 1 partial sum in the reduction.
        let tuning = Tuning {
            splits: Some(2),
            ..SMALL
        };
        check::<f32>(5, 42, 256, (true, false, true), tuning, 1e-5);
        check::<f32>(4, 45, 256, (false, true, false), tuning, 1e-5);
    }

    /// A deferred split leaves `y` alone and returns partial sums that add up to the product
    /// (an unsplit launch adds it in place).
    #[test]
    fn deferred_splits_sum_to_the_product() {
        let c = client();
        let (m, n, k) = (5, 40, 320);
        let (x, w, y0) = (fill(m * k, 41), fill(n * k, 42), fill(m * n, 43));
        let (xh, wh, y) = (
            upload::<f32>(&c, &x),
            upload::<f32>(&c, &w),
            upload::<f32>(&c, &y0),
        );
        let ep = Epilogue {
            accumulate: true,
            defer_split: true,
            ..Default::default()
        };
        let product = reference(&x, &w, None, m, n, k);
        for splits in [3, 1] {
            let tuning = Tuning {
                splits: Some(splits),
                ..SMALL
            };
            let deferred = launch::<_, f32>(&c, &xh, &wh, &y, m, n, k, ep, tuning);
            let got = read::<f32>(&c, y.clone());
            match deferred {
                Some(p) => {
                    assert!(p.splits > 1 && got == y0, "{} splits; y written", p.splits);
                    let sums = read::<f32>(&c, p.sums);
                    let total: Vec<f32> = (0..m * n)
                        .map(|i| (0..p.splits).map(|s| sums[s * m * n + i]).sum())
                        .collect();
                    assert!(rel_err(&total, &product) < 1e-5);
                }
                None => {
                    assert_eq!(splits, 1);
                    let want: Vec<f32> = y0.iter().zip(&product).map(|(a, b)| a + b).collect();
                    assert!(rel_err(&got, &want) < 1e-5);
                }
            }
        }
    }

    #[test]
    fn epilogues_in_the_product_kernel() {
        check::<f32>(4, 40, 128, (true, false, false), SMALL, 1e-5);
        check::<f32>(4, 40, 128, (false, true, false), SMALL, 1e-5);
        check::<f32>(4, 40, 128, (false, false, true), SMALL, 1e-5);
    }

    /// The splits that ran fastest on the H200's 132 SMs (split sweep, RESULTS.md): one wave of
    /// a cube an SM for Llama-3.1-8B's Q/K/V (24 blocks of 256 rows: 5), O (16: 8) and down
    /// (k = 14336: 8), at 4 and 64 rows alike, and none for gate-up's 224 blocks of SwiGLU
    /// cubes or the lm_head's 501.
    #[test]
    fn splits_fill_one_wave() {
        let swiglu = Tuning {
            planes: 4,
            stages: 4,
            ..DECODE
        };
        let splits = |m: usize, k: usize, n: usize, t: Tuning, halves: usize| {
            let k_steps = k / K_STEP;
            let blocks = (halves * n).div_ceil(256 * t.planes / 8);
            let w = halves * n * k * 2;
            k_steps.div_ceil(best_split(k_steps, blocks, 132, w, m * halves * n, t))
        };
        for m in [4, 64] {
            assert_eq!(splits(m, 4096, 6144, DECODE, 1), 5);
            assert_eq!(splits(m, 4096, 4096, DECODE, 1), 8);
            assert_eq!(splits(m, 14336, 4096, DECODE, 1), 8);
            assert_eq!(splits(m, 4096, 14336, swiglu, 2), 1);
            assert_eq!(splits(m, 4096, 128256, DECODE, 1), 1);
        }
    }

    #[test]
    fn blocks_of_rows_with_every_epilogue() {
        for (m, n, k) in [(37, 70, 96), (16, 40, 64)] {
            check::<f32>(m, n, k, (false, false, false), ROW_BLOCKS, 1e-5);
        }
        check::<f32>(50, 40, 128, (true, false, true), ROW_BLOCKS, 1e-5);
        check::<f32>(33, 40, 128, (false, true, false), ROW_BLOCKS, 1e-5);
        let split = Tuning {
            splits: Some(2),
            ..ROW_BLOCKS
        };
        check::<f32>(41, 48, 320, (true, false, false), split, 1e-5);
        // Planes along both the weight rows and the rows of x.
        let grid = Tuning {
            planes: 2,
            row_tiles: 1,
            ..ROW_BLOCKS
        };
        check::<f32>(45, 100, 96, (false, false, true), grid, 1e-5);
    }

    #[test]
    fn one_tile_planes_and_f16() {
        check::<f32>(3, 100, 160, (false, false, false), ONE_TILE, 1e-5);
        check::<half::f16>(8, 64, 256, (true, false, false), SMALL, 3e-3);
    }

    /// Four planes of f16 copy whole swizzle periods of rows apart (every copy's destination the
    /// unit's first plus a constant, as on the GPU); 3 and 20 rows give one and three `x`
    /// tiles, so the odd last tile pair starts a tile early, before the `x` rows at one tile.
    #[test]
    fn copies_a_swizzle_period_apart() {
        let four = Tuning {
            planes: 4,
            row_tiles: 1,
            stages: 2,
            ..DECODE
        };
        for m in [3, 20] {
            check::<half::f16>(m, 100, 96, (false, false, true), four, 3e-3);
        }
    }
}
