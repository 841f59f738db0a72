//! Causal attention for prefill and chunked prefill over the paged KV cache (varlen: any mix of
//! sequences and chunk lengths in one launch), flash-attention style: tiles of query rows walk
//! their keys in blocks with an online softmax (f32), so scores never reach device memory.
//!
//! A cube serves one (query tile, head): 16 or 32 consecutive query rows of one sequence per
//! plane.
//! For each block of keys (gathered through the block table into shared memory) it computes
//! S = Q·Kᵀ, updates each row's running max and sum, rescales the output rows whose max grew,
//! and adds P·V. Where the device has tensor cores (`mma` m16n8k16, f32 accumulation) each
//! plane keeps S, P and O of its rows in register fragments (FlashAttention-2's structure) and
//! rescales only when a row's max grew by more than a bound (FlashAttention-4's); elsewhere
//! the units compute the same tiles element by element through shared memory (the CPU CI
//! path; same masking and softmax). Query row r of a tile sits at position
//! `first_pos + r` and sees keys `0..=first_pos + r`.

use cubecl::frontend::barrier::{copy_async, Barrier};
use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::mma::{
    fragment_at, fragment_lanes, has_tensor_cores, shared_bound, swizzle_period, swizzled, Pair,
    MBARRIER, STAGE_ALIGN, WARP,
};
use crate::vector::vector_size;

/// Query rows of a row tile (the tensor-core tile's M).
const PLANE_ROWS: usize = 16;
/// How far (scaled, natural log) a row's max may outgrow its running max before the tensor-core
/// path rescales: ln 256.
const RESCALE_ABOVE: f32 = 8.0 * core::f32::consts::LN_2;
/// Paddings of the shared tiles' strides (elements), against bank conflicts; they keep the
/// strides multiples of 16 bytes, as the tensor-core loads and stores need.
const PAD_F: usize = 8;
const PAD_F32: usize = 4;

/// The attention's shape, compile-time constants of the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Shape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
}

/// How the work is tiled on a device: planes per cube, 16-row tiles of query rows per plane,
/// keys per block, and whether the products run on tensor cores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiling {
    pub planes: usize,
    pub row_tiles: usize,
    pub block_keys: usize,
    pub mma: bool,
}

impl Tiling {
    /// The largest tiling whose shared tiles fit the device: on a GPU 4 planes of two row
    /// tiles × 64 keys (FlashAttention-2's 128 × 64 tile; on the H200, with the rescale only
    /// past `RESCALE_ABOVE`, 1–5 % faster than × 32 keys, and one row tile a plane 15–17 %
    /// slower; cubes of 8–16 planes ran 3–73 % slower: benches/RESULTS.md), × 32 keys where
    /// that does not fit.
    pub fn for_device<R: Runtime, F: CubePrimitive>(
        client: &ComputeClient<R>,
        shape: Shape,
    ) -> Self {
        let limit = client.properties().hardware.max_shared_memory_size;
        let mma = has_tensor_cores::<R, F>(client);
        let tilings = [(4, 2, 64), (4, 2, 32), (2, 1, 32), (1, 1, 16)].map(
            |(planes, row_tiles, block_keys)| Tiling {
                planes,
                row_tiles,
                block_keys,
                mma,
            },
        );
        // The smallest one when none fits: its launch then reports the device's refusal.
        let fits = |t: &&Tiling| t.shared_bytes(shape.head_dim, size_of::<F>()) <= limit;
        *tilings
            .iter()
            .find(fits)
            .unwrap_or(&tilings[tilings.len() - 1])
    }

    pub fn tile_rows(&self) -> usize {
        PLANE_ROWS * self.row_tiles * self.planes
    }

    fn shared_bytes(&self, head_dim: usize, elem: usize) -> usize {
        let (br, bc) = (self.tile_rows(), self.block_keys);
        let q = (br * (head_dim + PAD_F) * elem, 16);
        if self.mma {
            // Q; K and V double-buffered (unpadded, swizzled rows) and their two mbarriers; S,
            // P and O stay in registers.
            let kv = (2 * bc * head_dim * elem, STAGE_ALIGN);
            return shared_bound(&[q, kv, kv, MBARRIER, MBARRIER]);
        }
        let kv = (bc * (head_dim + PAD_F) * elem, 16);
        shared_bound(&[
            q,
            kv,
            kv,
            (bc * 4, 4),
            (bc * (br + PAD_F32) * 4, 4),
            (bc * (br + PAD_F) * elem, elem),
            (head_dim * (br + PAD_F32) * 4, 4),
            (br * 4, 4),
            (br * 4, 4),
        ])
    }
}

/// One chunk of query rows of one sequence: its row in the block-table matrix, its first row in
/// the flat batch, its length and the position of its first row.
#[derive(Clone, Copy, Debug)]
pub struct Chunk {
    pub table_row: usize,
    pub first_token: usize,
    pub len: usize,
    pub first_pos: usize,
}

/// The launch's work list: `[table_row, first_token, rows, first_pos]` per query tile of
/// `tile_rows` rows, the tiles with the most keys first (causal tiles' work grows with their
/// position; starting the longest ones first keeps the last wave short).
pub fn tiles(chunks: &[Chunk], tile_rows: usize) -> Vec<u32> {
    let mut list: Vec<[usize; 4]> = Vec::new();
    for c in chunks {
        for start in (0..c.len).step_by(tile_rows) {
            let rows = tile_rows.min(c.len - start);
            list.push([
                c.table_row,
                c.first_token + start,
                rows,
                c.first_pos + start,
            ]);
        }
    }
    list.sort_by_key(|&[_, _, rows, first_pos]| std::cmp::Reverse(first_pos + rows));
    list.into_iter().flatten().map(|v| v as u32).collect()
}

// Fast exp (ex2.approx): the softmax's inputs are finite (masked scores are -3e38, not -inf).
#[cube(launch_unchecked, fast_math = FastMath::ReducedPrecision | FastMath::NotNaN | FastMath::NotInf)]
#[allow(clippy::too_many_arguments)]
fn prefill_attention_kernel<F: Float, N: Size>(
    q: &Array<Vector<F, N>>,
    k_cache: &Array<Vector<F, N>>,
    v_cache: &Array<Vector<F, N>>,
    tiles: &Array<u32>,
    block_tables: &Array<u32>,
    out: &mut Array<F>,
    scale: f32,
    max_blocks: usize,
    #[comptime] heads: usize,
    #[comptime] kv_heads: usize,
    #[comptime] head_dim: usize,
    #[comptime] block_size: usize,
    #[comptime] vec: usize,
    #[comptime] planes: usize,
    #[comptime] row_tiles: usize,
    #[comptime] bc: usize,
    #[comptime] use_mma: bool,
) {
    // Heads vary fastest: the cubes running at once share their tiles' keys in the L2.
    let head = CUBE_POS_X as usize;
    let tile = CUBE_POS_Y as usize;
    let t0 = tiles[tile * 4 + 1] as usize;
    let rows = tiles[tile * 4 + 2] as usize;
    let br = comptime![PLANE_ROWS * row_tiles * planes];
    // Q, K and V tiles are row-major with row stride `qs` (16-byte rows for the matrix loads).
    let qs = comptime![head_dim + PAD_F];
    let mut q_s = SharedMemory::<F>::new_aligned(br * qs, 16usize);
    let units = CUBE_DIM as usize;
    let tid = UNIT_POS as usize;
    let vecs = comptime![head_dim / vec];
    // Q rows in vectors, four loads in flight per unit (zeros past the tile's rows).
    let mut i = tid;
    while i < br * vecs {
        let mut qv = Array::<Vector<F, N>>::new(4usize);
        #[unroll]
        for j in 0..4usize {
            let at = i + j * units;
            let r = at / vecs;
            qv[j] = Vector::new(F::new(0.0));
            if at < br * vecs && r < rows {
                qv[j] = q[((t0 + r) * heads + head) * vecs + at % vecs];
            }
        }
        #[unroll]
        for j in 0..4usize {
            let at = i + j * units;
            if at < br * vecs {
                let base = (at / vecs) * qs + (at % vecs) * vec;
                #[unroll]
                for e in 0..vec {
                    q_s[base + e] = qv[j][e];
                }
            }
        }
        i += 4 * units;
    }
    let at = TileAt {
        t0,
        rows,
        p0: tiles[tile * 4 + 3] as usize,
        head,
        table_row: tiles[tile * 4] as usize,
        max_blocks,
        kvh: head / (heads / kv_heads),
    };
    sync_cube(); // Q is staged
    if comptime![use_mma] {
        attend_mma::<F, N>(
            k_cache,
            v_cache,
            block_tables,
            &q_s,
            out,
            at,
            scale,
            heads,
            kv_heads,
            head_dim,
            block_size,
            vec,
            bc,
            planes,
            row_tiles,
        );
    } else {
        attend_plain::<F, N>(
            k_cache,
            v_cache,
            block_tables,
            &q_s,
            out,
            at,
            scale,
            heads,
            kv_heads,
            head_dim,
            block_size,
            vec,
            br,
            bc,
        );
    }
}

/// Where a cube's query tile is: its first row in the flat batch, its rows, the position of its
/// first row, its head; and where its keys are: its sequence's row of the block-table matrix
/// (of `max_blocks` columns) and its K/V head.
#[derive(CubeType, Clone, Copy)]
struct TileAt {
    t0: usize,
    rows: usize,
    p0: usize,
    head: usize,
    table_row: usize,
    max_blocks: usize,
    kvh: usize,
}

/// Gathers keys `k0 .. k0 + bc` (zeros past `n_keys`) into `k_s` and `v_s` through the block
/// table, four K and four V loads in flight per unit. Starts and ends with a barrier: the
/// previous block's tiles are no longer read, and this block's are complete.
#[cube]
#[allow(clippy::too_many_arguments)]
fn gather_block<F: Float, N: Size>(
    k_cache: &Array<Vector<F, N>>,
    v_cache: &Array<Vector<F, N>>,
    block_tables: &Array<u32>,
    at: TileAt,
    key_rows: &mut SharedMemory<u32>,
    k_s: &mut SharedMemory<F>,
    v_s: &mut SharedMemory<F>,
    k0: usize,
    n_keys: usize,
    #[comptime] kv_heads: usize,
    #[comptime] head_dim: usize,
    #[comptime] block_size: usize,
    #[comptime] vec: usize,
    #[comptime] bc: usize,
) {
    let units = CUBE_DIM as usize;
    let tid = UNIT_POS as usize;
    let vecs = comptime![head_dim / vec];
    let qs = comptime![head_dim + PAD_F];
    sync_cube();
    // The block's K/V row offsets + 1, one table lookup per key (0: past the last key).
    let mut key = tid;
    while key < bc {
        let pos = k0 + key;
        let mut row_at = 0u32;
        if pos < n_keys {
            let block = block_tables[at.table_row * at.max_blocks + pos / block_size] as usize;
            let row = ((block * block_size + pos % block_size) * kv_heads + at.kvh) * vecs;
            row_at = u32::cast_from(row) + 1;
        }
        key_rows[key] = row_at;
        key += units;
    }
    sync_cube();
    let mut i = tid;
    while i < bc * vecs {
        let mut kv = Array::<Vector<F, N>>::new(4usize);
        let mut vv = Array::<Vector<F, N>>::new(4usize);
        #[unroll]
        for j in 0..4usize {
            let e_at = i + j * units;
            kv[j] = Vector::new(F::new(0.0));
            vv[j] = Vector::new(F::new(0.0));
            if e_at < bc * vecs {
                let row = key_rows[e_at / vecs] as usize;
                if row > 0 {
                    kv[j] = k_cache[row - 1 + e_at % vecs];
                    vv[j] = v_cache[row - 1 + e_at % vecs];
                }
            }
        }
        #[unroll]
        for j in 0..4usize {
            let e_at = i + j * units;
            if e_at < bc * vecs {
                let base = (e_at / vecs) * qs + (e_at % vecs) * vec;
                #[unroll]
                for e in 0..vec {
                    k_s[base + e] = kv[j][e];
                    v_s[base + e] = vv[j][e];
                }
            }
        }
        i += 4 * units;
    }
    sync_cube();
}

/// Queues the async copies (16 bytes each) of keys `k0 .. k0 + bc` into the K/V stages at
/// `base` ([`swizzled`] rows of `head_dim / vec` vectors), through the block table. Keys past
/// `n_keys` repeat the last key: finite values, which the mask then ignores. Unrolled over the
/// cube's `planes` warps, every source is found before the first copy, so a unit's block-table
/// reads are in flight together.
#[cube]
#[allow(clippy::too_many_arguments)]
fn copy_block<F: Float, N: Size>(
    k_cache: &Array<Vector<F, N>>,
    v_cache: &Array<Vector<F, N>>,
    block_tables: &Array<u32>,
    at: TileAt,
    k_s: &mut SharedMemory<Vector<F, N>>,
    v_s: &mut SharedMemory<Vector<F, N>>,
    base: usize,
    k0: usize,
    n_keys: usize,
    #[comptime] kv_heads: usize,
    #[comptime] head_dim: usize,
    #[comptime] block_size: usize,
    #[comptime] vec: usize,
    #[comptime] bc: usize,
    #[comptime] planes: usize,
) {
    let vecs = comptime![head_dim / vec];
    // Rounds of the cube's units over the block's bc·vecs vectors: a whole number of them for
    // power-of-two plane counts (bc·head_dim / 8 is a multiple of planes·32 when head_dim is
    // a multiple of 16, as `mma` needs); otherwise the last round's extra units copy nothing.
    let units = comptime![planes * WARP];
    let total = comptime![bc * vecs];
    let steps = comptime![total.div_ceil(units)];
    let whole = comptime![total % units == 0];
    // Where a round covers whole swizzle periods of rows, a unit's destinations are its first
    // plus a round of vectors each (the swizzle depends only on the row within its period):
    // one swizzle a block instead of one per copy.
    let vp8 = comptime![8 / vec];
    let regular = comptime![
        units.is_multiple_of(vecs) && (units / vecs).is_multiple_of(swizzle_period(vecs, vp8))
    ];
    let dst0 = swizzled(
        UNIT_POS as usize / vecs,
        UNIT_POS as usize % vecs,
        vecs,
        vp8,
    );
    // Where a cache block holds whole rounds of rows (and key blocks start on cache blocks),
    // a unit's rounds in one cache block share its table entry: read once (clamped keys stay
    // in the block of the round before, between it and the key they stand for).
    let round_rows = comptime![units / vecs];
    let share = comptime![
        units.is_multiple_of(vecs)
            && block_size.is_multiple_of(round_rows)
            && bc.is_multiple_of(block_size)
    ];
    let mut src = Array::<usize>::new(steps);
    let mut block = 0usize;
    #[unroll]
    for s in 0..steps {
        let i = s * units + UNIT_POS as usize;
        // The extra units' keys are clamped too, so their table reads stay in the row.
        let pos = usize::min(k0 + i / vecs, n_keys - 1);
        if !share || (s * round_rows) % block_size == 0 {
            block = block_tables[at.table_row * at.max_blocks + pos / block_size] as usize;
        }
        src[s] = ((block * block_size + pos % block_size) * kv_heads + at.kvh) * vecs + i % vecs;
    }
    #[unroll]
    for s in 0..steps {
        let i = s * units + UNIT_POS as usize;
        if whole || s + 1 < steps || i < total {
            let dst = if comptime![regular] {
                base + dst0 + s * units
            } else {
                base + swizzled(i / vecs, i % vecs, vecs, vp8)
            };
            copy_async(
                &k_cache.slice(src[s], src[s] + 1),
                &mut k_s.slice_mut(dst, dst + 1),
                vec as u32,
            );
            copy_async(
                &v_cache.slice(src[s], src[s] + 1),
                &mut v_s.slice_mut(dst, dst + 1),
                vec as u32,
            );
        }
    }
}

/// `acc += A·B` for the two 8-column tiles of B one ldmatrix ×4 loaded (`b`: registers 0–1
/// the first tile's, 2–3 the second's), whose accumulators are `acc[at..at + 2]` and
/// `acc[at + 2..at + 4]`.
#[cube]
fn mma_two_tiles<F: Float>(
    def: &cmma::MmaDefinition<F, F, f32>,
    a: &Array<Pair<F>>,
    b: &Array<Pair<F>>,
    acc: &mut Array<Pair<f32>>,
    at: usize,
) {
    #[unroll]
    for t in 0..2usize {
        let mut bt = Array::<Pair<F>>::new(2usize);
        let mut c = Array::<Pair<f32>>::new(2usize);
        #[unroll]
        for j in 0..2usize {
            bt[j] = b[2 * t + j];
            c[j] = acc[at + 2 * t + j];
        }
        def.execute_inplace(a, &bt, &mut c);
        #[unroll]
        for j in 0..2usize {
            acc[at + 2 * t + j] = c[j];
        }
    }
}

/// The tensor-core path, FlashAttention-2 style: each plane keeps its query rows' scores and
/// output in `mma` (m16n8k16, f32 accumulation) register fragments for the whole walk; only
/// K and V pass through shared memory, double-buffered: the next key block's async copies
/// (`cp.async`) are in flight while the current one is multiplied. A lane holds rows `g` and
/// `g + 8` of a fragment (g = lane / 4) at columns `2t, 2t + 1` (t = lane % 4), so a row's max
/// and sum combine the 4 lanes of its quad with two shuffles, and the scores' accumulator
/// registers are, converted, the A fragments of P·V. With two 16-row tiles a plane, each K/V
/// fragment loaded feeds both tiles' products (half the shared reads per product); Q's
/// fragments are re-read from shared memory each block, as held in registers they would push
/// the second tile's output out. Only blocks that reach past the plane's first row (the
/// diagonal, and the keys past the last) pay for the causal mask.
#[cube]
#[allow(clippy::too_many_arguments)]
fn attend_mma<F: Float, N: Size>(
    k_cache: &Array<Vector<F, N>>,
    v_cache: &Array<Vector<F, N>>,
    block_tables: &Array<u32>,
    q_s: &SharedMemory<F>,
    out: &mut Array<F>,
    at: TileAt,
    scale: f32,
    #[comptime] heads: usize,
    #[comptime] kv_heads: usize,
    #[comptime] head_dim: usize,
    #[comptime] block_size: usize,
    #[comptime] vec: usize,
    #[comptime] bc: usize,
    #[comptime] planes: usize,
    #[comptime] row_tiles: usize,
) {
    let qs = comptime![head_dim + PAD_F];
    let vecs = comptime![head_dim / vec];
    let vp8 = comptime![8 / vec];
    // K/V tiles in vectors (16 bytes), two buffers of `bc` swizzled rows.
    let buf = comptime![bc * vecs];
    let mut k_s = SharedMemory::<Vector<F, N>>::new_aligned(2 * buf, STAGE_ALIGN);
    let mut v_s = SharedMemory::<Vector<F, N>>::new_aligned(2 * buf, STAGE_ALIGN);
    let ready0 = Barrier::shared(CUBE_DIM, UNIT_POS == 0);
    let ready1 = Barrier::shared(CUBE_DIM, UNIT_POS == 0);
    sync_cube(); // the barriers are initialized
    let def = cmma::MmaDefinition::<F, F, f32>::new(16usize, 8usize, 16usize);
    let lane = UNIT_POS_PLANE as usize;
    let (g, t) = (lane / 4, lane % 4);
    let r0 = (UNIT_POS / PLANE_DIM) as usize * comptime![PLANE_ROWS * row_tiles];
    let d_tiles = comptime![head_dim / 8];
    // The fragments' addresses: K's as `mma`'s B side, V's (loaded transposed: V is
    // [key][dim]) as its A side, so that lane L addresses key L % 8 + 8·(L / 8 % 2) of a
    // 16-key chunk at columns 8·(L / 16); Q's (ldmatrix ×4 of a 16 × 16 chunk, padded rows)
    // row L % 8 + 8·(L / 8 % 2), column 8·(L / 16).
    let lanes = Lanes {
        k: fragment_lanes(0, vecs, vp8, true),
        v: fragment_lanes(0, vecs, vp8, false),
        q: (r0 + lane % 8 + 8 * ((lane / 8) % 2)) * qs + 8 * (lane / 16),
    };

    // Output fragments (of row tile i: vector 2n, row g, and 2n + 1, row g + 8, of column
    // tile n, from i·2·d_tiles); for rows g and g + 8 of each row tile (index 2i + h): the
    // running max of the raw scores, this lane's share of the running sum, and the last key
    // the row sees (rows past the tile see the tile's keys).
    let mut o = Array::<Pair<f32>>::new(comptime![row_tiles * 2 * d_tiles]);
    #[unroll]
    for i in 0..comptime![row_tiles * 2 * d_tiles] {
        o[i] = Vector::new(0.0);
    }
    let n_keys = at.p0 + at.rows;
    let mut m_run = Array::<f32>::new(comptime![2 * row_tiles]);
    let mut l_run = Array::<f32>::new(comptime![2 * row_tiles]);
    let mut last = Array::<usize>::new(comptime![2 * row_tiles]);
    #[unroll]
    for i in 0..comptime![2 * row_tiles] {
        m_run[i] = f32::new(-3.0e38);
        l_run[i] = f32::new(0.0);
        last[i] = usize::min(at.p0 + r0 + 8 * i + g, n_keys - 1);
    }
    // Blocks ending by here are seen whole by every row of the plane.
    let unmasked_end = usize::min(at.p0 + r0, n_keys - 1) + 1;

    let n_blocks = n_keys.div_ceil(bc);
    copy_block::<F, N>(
        k_cache,
        v_cache,
        block_tables,
        at,
        &mut k_s,
        &mut v_s,
        0,
        0,
        n_keys,
        kv_heads,
        head_dim,
        block_size,
        vec,
        bc,
        planes,
    );
    ready0.commit_copy_async();
    for kb in 0..n_blocks {
        let k0 = kb * bc;
        let cur = kb % 2;
        if kb + 1 < n_blocks {
            // The other buffer was last read in the previous block, behind its closing barrier.
            copy_block::<F, N>(
                k_cache,
                v_cache,
                block_tables,
                at,
                &mut k_s,
                &mut v_s,
                (1 - cur) * buf,
                k0 + bc,
                n_keys,
                kv_heads,
                head_dim,
                block_size,
                vec,
                bc,
                planes,
            );
            if cur == 0 {
                ready1.commit_copy_async();
            } else {
                ready0.commit_copy_async();
            }
        }
        if cur == 0 {
            ready0.arrive_and_wait();
        } else {
            ready1.arrive_and_wait();
        }
        let base = cur * buf;
        // A plane skips the blocks all of its rows are past (the tile's last ones, for the
        // planes nearer its top); it still takes part in the barriers.
        if k0 < at.p0 + r0 + comptime![PLANE_ROWS * row_tiles] {
            if k0 + bc <= unmasked_end {
                attend_block::<F, N>(
                    &def, q_s, &lanes, &k_s, &v_s, &mut o, &mut m_run, &mut l_run, &last, base, k0,
                    scale, head_dim, vec, bc, row_tiles, false,
                );
            } else {
                attend_block::<F, N>(
                    &def, q_s, &lanes, &k_s, &v_s, &mut o, &mut m_run, &mut l_run, &last, base, k0,
                    scale, head_dim, vec, bc, row_tiles, true,
                );
            }
        }
        sync_cube(); // this buffer is free for the block after next
    }

    // Each row's sum over its quad, then the normalized rows out.
    #[unroll]
    for i in 0..comptime![2 * row_tiles] {
        let mut l = l_run[i];
        l += plane_shuffle_xor(l, 1);
        l += plane_shuffle_xor(l, 2);
        // One division a row (IEEE division is a checked sequence with a slow-path call).
        let inv_l = 1.0 / l;
        let r = r0 + 8 * i + g;
        if r < at.rows {
            #[unroll]
            for n in 0..d_tiles {
                #[unroll]
                for e in 0..2usize {
                    let v = o[(i / 2) * 2 * d_tiles + 2 * n + i % 2][e];
                    out[((at.t0 + r) * heads + at.head) * head_dim + n * 8 + 2 * t + e] =
                        F::cast_from(v * inv_l);
                }
            }
        }
    }
}

/// A lane's fragment addresses: [`fragment_lanes`] of the K and V stages, and its Q row's
/// first element in the Q tile.
#[derive(CubeType)]
struct Lanes {
    k: Array<usize>,
    v: Array<usize>,
    q: usize,
}

/// The A fragment of a 16 × 16 chunk of the Q tile, lane L giving the address `at` of row
/// L % 8 + 8·(L / 8 % 2), column 8·(L / 16) of the chunk.
#[cube]
fn q_fragment<F: Float>(
    def: &cmma::MmaDefinition<F, F, f32>,
    q_s: &SharedMemory<F>,
    at: usize,
) -> Array<Pair<F>> {
    def.load_matrix::<F, Const<2>>(&q_s.slice(at, at + 8), cmma::MatrixIdent::A, 4usize, false)
}

/// One key block of [`attend_mma`] for a plane's rows (`base`: the block's K/V buffer):
/// S = Q·Kᵀ, the online softmax (masked: keys past each row's last set to -3e38 first), and
/// O += P·V. The scale (> 0) is applied inside the exponentials, so maxima are of raw scores.
#[cube]
#[allow(clippy::too_many_arguments)]
fn attend_block<F: Float, N: Size>(
    def: &cmma::MmaDefinition<F, F, f32>,
    q_s: &SharedMemory<F>,
    lanes: &Lanes,
    k_s: &SharedMemory<Vector<F, N>>,
    v_s: &SharedMemory<Vector<F, N>>,
    o: &mut Array<Pair<f32>>,
    m_run: &mut Array<f32>,
    l_run: &mut Array<f32>,
    last: &Array<usize>,
    base: usize,
    k0: usize,
    scale: f32,
    #[comptime] head_dim: usize,
    #[comptime] vec: usize,
    #[comptime] bc: usize,
    #[comptime] row_tiles: usize,
    #[comptime] masked: bool,
) {
    let vecs = comptime![head_dim / vec];
    let vp8 = comptime![8 / vec];
    let qs = comptime![head_dim + PAD_F];
    let t = UNIT_POS_PLANE as usize % 4;
    let key_tiles = comptime![bc / 8];
    // Registers a row tile's scores (and P, and output) take.
    let s_len = comptime![2 * bc / 8];
    let o_len = comptime![2 * head_dim / 8];

    // S = Q·Kᵀ: per 16 columns, the row tiles' Q fragments, then two key tiles per ldmatrix
    // ×4, each multiplied into every row tile.
    let mut s = Array::<Pair<f32>>::new(comptime![row_tiles * s_len]);
    #[unroll]
    for i in 0..comptime![row_tiles * s_len] {
        s[i] = Vector::new(0.0);
    }
    #[unroll]
    for kk in 0..comptime![head_dim / 16] {
        let mut a = Array::<Pair<F>>::new(comptime![4 * row_tiles]);
        #[unroll]
        for i in 0..row_tiles {
            let at = lanes.q + comptime![i * PLANE_ROWS * qs] + kk * 16;
            let regs = q_fragment::<F>(def, q_s, at);
            #[unroll]
            for j in 0..4usize {
                a[4 * i + j] = regs[j];
            }
        }
        #[unroll]
        for np in 0..comptime![bc / 16] {
            let start = fragment_at(base, &lanes.k, np * 16, kk * 2, vecs, vp8);
            let b = def.load_matrix::<Vector<F, N>, Const<2>>(
                &k_s.slice(start, start + 1),
                cmma::MatrixIdent::B,
                4usize,
                false,
            );
            #[unroll]
            for i in 0..row_tiles {
                let mut ai = Array::<Pair<F>>::new(4usize);
                #[unroll]
                for j in 0..4usize {
                    ai[j] = a[4 * i + j];
                }
                mma_two_tiles::<F>(def, &ai, &b, &mut s, i * s_len + np * 4);
            }
        }
    }

    // Per row (g, g + 8 of each row tile): the max over its quad (masked scores first set to
    // -3e38; every row saw key 0 in the first block, so its running max is finite even where
    // this block hides all its keys).
    let mut mx = Array::<f32>::new(comptime![2 * row_tiles]);
    let mut grown = false;
    #[unroll]
    for ih in 0..comptime![2 * row_tiles] {
        let (i, h) = (ih / 2, ih % 2);
        let mut m = m_run[ih];
        #[unroll]
        for n in 0..key_tiles {
            let mut v = s[i * s_len + 2 * n + h];
            if comptime![masked] {
                #[unroll]
                for e in 0..2usize {
                    if k0 + n * 8 + 2 * t + e > last[ih] {
                        v[e] = f32::new(-3.0e38);
                    }
                }
                s[i * s_len + 2 * n + h] = v;
            }
            m = f32::max(m, f32::max(v[0], v[1]));
        }
        m = f32::max(m, plane_shuffle_xor(m, 1));
        m = f32::max(m, plane_shuffle_xor(m, 2));
        mx[ih] = m;
        grown = grown || (m - m_run[ih]) * scale > RESCALE_ABOVE;
    }
    // The running maxima move (and the output and sums are rescaled to them) only when some
    // row's max grew by more than `RESCALE_ABOVE`; until then P = exp(scale·(S − max)) stays
    // below e^RESCALE_ABOVE = 256, which bf16 and the f32 sums hold at full precision. After
    // the first blocks a row's max seldom grows that much, so the plane mostly skips the
    // rescale (FlashAttention-4's conditional rescaling).
    if plane_any(grown) {
        #[unroll]
        for ih in 0..comptime![2 * row_tiles] {
            let (i, h) = (ih / 2, ih % 2);
            let alpha = f32::exp((m_run[ih] - mx[ih]) * scale);
            m_run[ih] = mx[ih];
            l_run[ih] *= alpha;
            #[unroll]
            for n in 0..comptime![head_dim / 8] {
                o[i * o_len + 2 * n + h] = o[i * o_len + 2 * n + h] * Vector::new(alpha);
            }
        }
    }
    // P, converted to the A fragments of P·V: keys 16j.. of a row are the accumulator vectors
    // of key tiles 2j and 2j + 1.
    let mut p = Array::<Pair<F>>::new(comptime![row_tiles * s_len]);
    #[unroll]
    for ih in 0..comptime![2 * row_tiles] {
        let (i, h) = (ih / 2, ih % 2);
        let m_scaled = m_run[ih] * scale;
        let mut sum = f32::new(0.0);
        #[unroll]
        for n in 0..key_tiles {
            let mut ev = Vector::<f32, Const<2>>::new(0.0);
            #[unroll]
            for e in 0..2usize {
                ev[e] = f32::exp(s[i * s_len + 2 * n + h][e] * scale - m_scaled);
                sum += ev[e];
            }
            // Tile n = 2j + c lands in A registers 2c + h of chunk j.
            p[i * s_len + (n / 2) * 4 + (n % 2) * 2 + h] = Pair::<F>::cast_from(ev);
        }
        l_run[ih] += sum;
    }

    // O += P·V, two output column tiles per ldmatrix ×4 (transposed), each multiplied into
    // every row tile.
    #[unroll]
    for j in 0..comptime![bc / 16] {
        #[unroll]
        for dp in 0..comptime![head_dim / 16] {
            let start = fragment_at(base, &lanes.v, j * 16, dp * 2, vecs, vp8);
            let b = def.load_matrix::<Vector<F, N>, Const<2>>(
                &v_s.slice(start, start + 1),
                cmma::MatrixIdent::B,
                4usize,
                true,
            );
            #[unroll]
            for i in 0..row_tiles {
                let mut a = Array::<Pair<F>>::new(4usize);
                #[unroll]
                for r in 0..4usize {
                    a[r] = p[i * s_len + j * 4 + r];
                }
                mma_two_tiles::<F>(def, &a, &b, o, i * o_len + 4 * dp);
            }
        }
    }
}

/// The portable path (no tensor cores: the CPU CI runs it): the same tiles element by element,
/// S, P and O column-major in shared memory so the softmax's one unit per row walks them with
/// consecutive units on consecutive addresses (no bank conflicts).
#[cube]
#[allow(clippy::too_many_arguments)]
fn attend_plain<F: Float, N: Size>(
    k_cache: &Array<Vector<F, N>>,
    v_cache: &Array<Vector<F, N>>,
    block_tables: &Array<u32>,
    q_s: &SharedMemory<F>,
    out: &mut Array<F>,
    at: TileAt,
    scale: f32,
    #[comptime] heads: usize,
    #[comptime] kv_heads: usize,
    #[comptime] head_dim: usize,
    #[comptime] block_size: usize,
    #[comptime] vec: usize,
    #[comptime] br: usize,
    #[comptime] bc: usize,
) {
    let d = head_dim;
    let qs = comptime![head_dim + PAD_F];
    let ss = comptime![br + PAD_F32];
    let ps = comptime![br + PAD_F];
    let os = comptime![br + PAD_F32];
    let mut k_s = SharedMemory::<F>::new_aligned(bc * qs, 16usize);
    let mut v_s = SharedMemory::<F>::new_aligned(bc * qs, 16usize);
    let mut key_rows = SharedMemory::<u32>::new(bc);
    let mut s_s = SharedMemory::<f32>::new(bc * ss);
    let mut p_s = SharedMemory::<F>::new(bc * ps);
    let mut o_s = SharedMemory::<f32>::new(d * os);
    let mut m_s = SharedMemory::<f32>::new(br);
    let mut l_s = SharedMemory::<f32>::new(br);
    let units = CUBE_DIM as usize;
    let tid = UNIT_POS as usize;
    let mut i = tid;
    while i < d * os {
        o_s[i] = f32::new(0.0);
        i += units;
    }
    let mut r = tid;
    while r < br {
        m_s[r] = f32::new(-3.0e38);
        l_s[r] = f32::new(0.0);
        r += units;
    }
    let n_keys = at.p0 + at.rows;
    for kb in 0..n_keys.div_ceil(bc) {
        let k0 = kb * bc;
        gather_block::<F, N>(
            k_cache,
            v_cache,
            block_tables,
            at,
            &mut key_rows,
            &mut k_s,
            &mut v_s,
            k0,
            n_keys,
            kv_heads,
            head_dim,
            block_size,
            vec,
            bc,
        );
        // S = Q·Kᵀ for the tile's rows and the block's keys.
        let mut i = tid;
        while i < br * bc {
            let r = i / bc;
            let c = i % bc;
            let mut dot = f32::new(0.0);
            for e in 0..d {
                dot += f32::cast_from(q_s[r * qs + e]) * f32::cast_from(k_s[c * qs + e]);
            }
            s_s[c * ss + r] = dot;
            i += units;
        }
        sync_cube();

        // Online softmax, one unit per row.
        let mut r = tid;
        while r < br {
            let qpos = at.p0 + r;
            let m_old = m_s[r];
            // Keys past the row's position (and rows past the tile's) are masked out.
            let mut last = 0usize;
            if r < at.rows && k0 <= qpos {
                last = usize::min(bc, qpos + 1 - k0);
            }
            let mut m = m_old;
            for c in 0..last {
                m = f32::max(m, s_s[c * ss + r] * scale);
            }
            let mut sum = f32::new(0.0);
            for c in 0..bc {
                let mut p = f32::new(0.0);
                if c < last {
                    p = f32::exp(s_s[c * ss + r] * scale - m);
                }
                p_s[c * ps + r] = F::cast_from(p);
                sum += p;
            }
            // Rescale the row's output if its max grew.
            let alpha = f32::exp(m_old - m);
            if alpha < 1.0 {
                for c in 0..head_dim {
                    o_s[c * os + r] *= alpha;
                }
            }
            l_s[r] = l_s[r] * alpha + sum;
            m_s[r] = m;
            r += units;
        }
        sync_cube();

        // O += P·V.
        let mut i = tid;
        while i < br * d {
            let r = i / d;
            let c = i % d;
            let mut acc = o_s[c * os + r];
            for j in 0..bc {
                acc += f32::cast_from(p_s[j * ps + r]) * f32::cast_from(v_s[j * qs + c]);
            }
            o_s[c * os + r] = acc;
            i += units;
        }
    }
    sync_cube();
    let mut i = tid;
    while i < at.rows * d {
        let r = i / d;
        let c = i % d;
        out[((at.t0 + r) * heads + at.head) * d + c] = F::cast_from(o_s[c * os + r] / l_s[r]);
        i += units;
    }
}

/// Causal attention of the query rows listed by `tiles` (from [`tiles`] with `tiling`'s tile
/// rows, `n_tiles` of them, u32) over the paged K/V. `q` and `out` are `[tokens, heads, head_dim]`; `block_tables`
/// is `[sequences, max_blocks]` u32.
#[allow(clippy::too_many_arguments)]
pub fn launch<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    shape: Shape,
    tiling: Tiling,
    tiles: &Handle,
    n_tiles: usize,
    q: &Handle,
    k_cache: &Handle,
    v_cache: &Handle,
    block_tables: &Handle,
    max_blocks: usize,
    out: &Handle,
    scale: f32,
) {
    let Shape {
        heads,
        kv_heads,
        head_dim,
        block_size,
    } = shape;
    let v = vector_size(client, size_of::<F>(), head_dim);
    let plane = client.properties().hardware.plane_size_max;
    let cache_vecs = k_cache.size() as usize / size_of::<F>() / v;
    let arr = |h: &Handle, len: usize| unsafe { ArrayArg::from_raw_parts(h.clone(), len) };
    let q_len = q.size() as usize / size_of::<F>();
    let q_vecs = q_len / v;
    // Safety: every index stays in bounds by construction (the tiles list, the block tables'
    // rows and the cache's slots); compute-sanitizer's memcheck checks it on the GPU.
    unsafe {
        prefill_attention_kernel::launch_unchecked::<F, R>(
            client,
            CubeCount::Static(heads as u32, n_tiles as u32, 1),
            CubeDim::new_1d(plane * tiling.planes as u32),
            v,
            arr(q, q_vecs),
            arr(k_cache, cache_vecs),
            arr(v_cache, cache_vecs),
            arr(tiles, n_tiles * 4),
            arr(block_tables, block_tables.size() as usize / 4),
            arr(out, q_len),
            scale,
            max_blocks,
            heads,
            kv_heads,
            head_dim,
            block_size,
            v,
            tiling.planes,
            tiling.row_tiles,
            tiling.block_keys,
            tiling.mma,
        );
    }
}

/// The plain reference, f32: causal attention of `chunks` (same layouts as [`launch`]), with
/// `k_cache`/`v_cache` `[slots, kv_heads, head_dim]`.
#[allow(clippy::too_many_arguments)]
pub fn reference(
    shape: Shape,
    chunks: &[Chunk],
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    block_tables: &[u32],
    max_blocks: usize,
    scale: f32,
) -> Vec<f32> {
    let Shape {
        heads,
        kv_heads,
        head_dim: d,
        block_size: bs,
    } = shape;
    let mut out = vec![0f32; q.len()];
    for c in chunks {
        let row_of = |pos: usize, kvh: usize| {
            let block = block_tables[c.table_row * max_blocks + pos / bs] as usize;
            ((block * bs + pos % bs) * kv_heads + kvh) * d
        };
        for r in 0..c.len {
            let pos = c.first_pos + r;
            for h in 0..heads {
                let kvh = h / (heads / kv_heads);
                let qr = &q[((c.first_token + r) * heads + h) * d..][..d];
                let scores: Vec<f64> = (0..=pos)
                    .map(|p| {
                        let kr = &k_cache[row_of(p, kvh)..][..d];
                        qr.iter().zip(kr).map(|(a, b)| (a * b) as f64).sum::<f64>() * scale as f64
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = w.iter().sum();
                let o = &mut out[((c.first_token + r) * heads + h) * d..][..d];
                for (p, wp) in w.iter().enumerate() {
                    let vr = &v_cache[row_of(p, kvh)..][..d];
                    for (x, v) in o.iter_mut().zip(vr) {
                        *x += (wp / total * *v as f64) as f32;
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{client, fill, read, rel_err, upload, Elem};

    /// Sequences of `lens` query rows each, the first `cached` keys of each already in the cache
    /// (chunked prefill), K/V blocks scattered over the pool; `row_tiles` 16-row tiles a plane.
    fn check<F: Elem>(shape: Shape, chunks_of: &[(usize, usize)], row_tiles: usize, tol: f64) {
        let c = client();
        let Shape {
            heads,
            kv_heads,
            head_dim: d,
            block_size: bs,
        } = shape;
        let max_blocks = chunks_of
            .iter()
            .map(|&(cached, len)| (cached + len).div_ceil(bs))
            .max()
            .unwrap_or(1);
        let num_blocks = max_blocks * chunks_of.len() + 3;
        // Sequence s owns blocks s, s + n, s + 2n, ...: interleaved, so tables matter.
        let n = chunks_of.len();
        let tables: Vec<u32> = (0..n)
            .flat_map(|s| (0..max_blocks).map(move |j| (s + j * n) as u32))
            .collect();
        let mut chunks = Vec::new();
        let mut first_token = 0;
        for (s, &(cached, len)) in chunks_of.iter().enumerate() {
            chunks.push(Chunk {
                table_row: s,
                first_token,
                len,
                first_pos: cached,
            });
            first_token += len;
        }
        let q = F::round_trip(&fill(first_token * heads * d, 51));
        let kc = F::round_trip(&fill(num_blocks * bs * kv_heads * d, 52));
        let vc = F::round_trip(&fill(num_blocks * bs * kv_heads * d, 53));
        // The device's rows a cube (so its shared memory still fits), in `row_tiles` a plane.
        let device = Tiling::for_device::<_, F>(&c, shape);
        let tiling = Tiling {
            planes: (device.planes / row_tiles).max(1),
            row_tiles,
            ..device
        };
        let plan = tiles(&chunks, tiling.tile_rows());
        let out = upload::<F>(&c, &vec![f32::NAN; q.len()]);
        let scale = 1.0 / (d as f32).sqrt();
        launch::<_, F>(
            &c,
            shape,
            tiling,
            &c.create_from_slice(u32::as_bytes(&plan)),
            plan.len() / 4,
            &upload::<F>(&c, &q),
            &upload::<F>(&c, &kc),
            &upload::<F>(&c, &vc),
            &c.create_from_slice(u32::as_bytes(&tables)),
            max_blocks,
            &out,
            scale,
        );
        let want = reference(shape, &chunks, &q, &kc, &vc, &tables, max_blocks, scale);
        let e = rel_err(&read::<F>(&c, out), &want);
        assert!(e < tol, "{} {shape:?} {chunks_of:?}: rel err {e}", F::NAME);
    }

    #[test]
    fn ragged_sequences_and_chunks() {
        let shape = Shape {
            heads: 4,
            kv_heads: 2,
            head_dim: 32,
            block_size: 16,
        };
        // Whole prompts, one past a tile, and chunks that start mid-sequence.
        check::<f32>(shape, &[(0, 5), (0, 70), (37, 20), (100, 1)], 1, 1e-5);
        check::<half::f16>(shape, &[(0, 33), (64, 64)], 1, 3e-3);
        // Two row tiles a plane: tiles of twice the rows, the ragged ends inside the second.
        check::<f32>(shape, &[(0, 150), (37, 20), (100, 1)], 2, 1e-5);
    }

    #[test]
    fn tensor_core_tiling_counts_both_key_buffers() {
        // d = 128 in bf16: 64 Q rows of 136 values; 2 × 64 K and 2 × 64 V rows of 128; two
        // mbarriers; each buffer with its alignment's worst padding.
        let tiling = Tiling {
            planes: 4,
            row_tiles: 1,
            block_keys: 64,
            mma: true,
        };
        let padding = 15 + 2 * 127 + 2 * 7;
        assert_eq!(
            tiling.shared_bytes(128, 2),
            64 * 136 * 2 + 4 * 64 * 128 * 2 + 2 * 8 + padding
        );
    }
}
