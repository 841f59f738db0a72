//! Paged attention for decode (one query token per sequence), GQA-aware and split-K
//! (flash-decoding).
//!
//! A cube serves one (token, K/V head, split): it holds the `group` query heads that share that
//! K/V head in shared memory, so each K/V row is read once for all of them. Short chains of
//! dependent instructions matter more than anything at decode's sizes (a cube is one of few on
//! its SM, so nothing hides their latency): each key's score is split over `lanes` units that
//! each take a slice of the head and meet by plane shuffles, and short splits spread a short
//! context over the whole device. Within a split the softmax is exact (scores in shared memory,
//! f32); splits are merged by `combine`, which rescales each split's partial sums by its running
//! maximum. Keys are found through the block table: slot = block_table[pos / block_size] ·
//! block_size + pos % block_size.
//!
//! Decode-only steps can fold RoPE and the KV write in ([`Query::Fresh`]): the cube rotates its
//! queries as it loads them, and the cube whose split holds the new token rotates that token's
//! key and writes it and its value into the caches before reading them back with the rest.
//!
//! Where the device has tensor cores and the shape fits, the splits run on
//! [`crate::decode_attention_tiles`] instead (K/V through a ring of async copies, the products
//! on `mma`; faster at every batch and context measured); both write the same partial sums for
//! the same merge.

use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::decode_attention_tiles::{self as tiles, Tiles};
use crate::mma::has_tensor_cores;
use crate::rope_kv_write::Projections;
use crate::vector::vector_size;

/// Keys one split covers at most (its scores live in shared memory: group × split f32).
pub(crate) const MAX_SPLIT_KEYS: usize = 1024;
/// Shortest split: shorter ones add merge work faster than they shorten the split (Nsight
/// Compute, one token at 516 keys: 32-key splits 10.3 + 5.8 µs, 64-key 10.9 + 5.0).
const MIN_SPLIT_KEYS: usize = 64;
/// Cubes worth launching before splits get shorter. Nsight Compute, one token, split + merge
/// (benches/RESULTS.md): 128-key splits at 2k keys (128 cubes) 13.3 + 5.4 µs against 13.0 + 7.1
/// for 64-key ones; 512-key splits at 8k 26.9 + 5.4 against 32.6 + 7.1 for 256-key ones.
const TARGET_CUBES: usize = 128;
/// Splits one merge can take: the most a context of `max_context` keys makes (shared memory).
const MAX_COMBINED: usize = 2048;
/// Partial rows the merge has in flight per unit.
const MERGE_IN_FLIGHT: usize = 16;
/// V rows each unit has in flight in P·V.
const V_IN_FLIGHT: usize = 8;
/// Units per cube of the split kernel at most.
const MAX_THREADS: usize = 512;
/// Units per key in the scores phase while the cube has room for them.
const LANES_PER_KEY: usize = 4;
/// Upper bound on planes per cube, for the reductions' shared memory (head_dim ≤ 256, plane ≥ 4).
const MAX_PLANES: usize = 64;

/// The tile kernel's spread: 4 planes (64 keys a stage), 2 stages in the ring (host-timed
/// sweep on the H200 from 1 to 64 sequences, benches/RESULTS.md: the best of five spreads on 7
/// of the 9 shapes, within 11 % on the other two).
const TILES: Tiles = Tiles {
    planes: 4,
    stages: 2,
};

/// Keys per split for the tile kernel: the longest (up to `MAX_SPLIT_KEYS`, at least two
/// stages) that still gives 7/8 of the `sms` SMs a cube. Longer splits stream longer and merge
/// less; a few idle SMs cost less than halving them (H200 sweep: one sequence of 8k keys
/// 21.9 µs at 512-key splits (128 cubes) against 22.2 at 256 and 31.3 at 1,024; 16 of 576
/// 17.5 at 1,024 (128 cubes) against 19.9 at 512).
pub fn tile_split_keys(
    tokens: usize,
    kv_heads: usize,
    max_context: usize,
    sms: usize,
    spread: Tiles,
) -> usize {
    let mut split = MAX_SPLIT_KEYS;
    while split > 2 * spread.stage_keys()
        && 8 * tokens * kv_heads * max_context.div_ceil(split) < 7 * sms
    {
        split /= 2;
    }
    split
}

/// What the tile kernel's choice needs to know of a device with tensor cores.
#[derive(Clone, Copy, Debug)]
struct TileDevice {
    sms: usize,
    max_shared: usize,
    plane_size: usize,
    /// Bytes of the attention's element type.
    elem: usize,
}

/// The tile kernel's spread and keys per split for this batch, if it takes the shape and its
/// cube fits the device's shared memory (wide heads can need more than a smaller device gives).
fn tile_plan(
    device: TileDevice,
    tokens: usize,
    kv_heads: usize,
    group: usize,
    head_dim: usize,
    max_context: usize,
) -> Option<(Tiles, usize)> {
    let spread = TILES;
    // As `Workspace::with_split_keys` will take it: long enough for one merge.
    let split = tile_split_keys(tokens, kv_heads, max_context, device.sms, spread)
        .max(max_context.div_ceil(MAX_COMBINED));
    let shared = spread.shared_bytes(group, head_dim, split, device.elem, true);
    (tiles::supported(group, head_dim, device.plane_size) && shared <= device.max_shared)
        .then_some((spread, split))
}

/// Keys per split: long enough to amortise the merge, short enough to fill the device.
pub fn split_keys(tokens: usize, kv_heads: usize, max_context: usize) -> usize {
    let mut split = MAX_SPLIT_KEYS;
    while split > MIN_SPLIT_KEYS && tokens * kv_heads * max_context.div_ceil(split) < TARGET_CUBES {
        split /= 2;
    }
    split
}

/// Units per cube for splits of `split_keys`: `LANES_PER_KEY` per key up to 128-key splits
/// (128 to 512 units), one per key beyond (up to 512: at 8k keys 256-key splits ran 25.7 µs
/// with 256 units, 32.6 with 512 at two per key).
pub fn split_threads(split_keys: usize) -> usize {
    if split_keys <= 128 {
        (split_keys * LANES_PER_KEY).clamp(128, MAX_THREADS)
    } else {
        split_keys.min(MAX_THREADS)
    }
}

/// The attention's shape. All but `max_blocks` are compile-time constants of the kernel (the
/// loops over heads and dimensions unroll); `max_blocks` changes as sequences grow, so it is
/// a runtime argument and never triggers a recompilation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Shape {
    pub kv_heads: usize,
    /// Query heads per K/V head.
    pub group: usize,
    pub head_dim: usize,
    pub block_size: usize,
    /// Columns of the block-table matrix.
    pub max_blocks: usize,
}

/// Rotate-half RoPE of element `d` of a head whose elements are at `x[base..base + 2·half]`,
/// at table row `pos` of the f32 cos/sin tables `[max_pos, half]`.
#[cube]
pub(crate) fn rotated<F: Float>(
    x: &Array<F>,
    base: usize,
    d: usize,
    half: usize,
    pos: usize,
    cos: &Array<f32>,
    sin: &Array<f32>,
) -> f32 {
    let j = d % half;
    let first_half = d < half;
    // Pairs (j, j + half): x_j' = x_j·c − x_{j+half}·s, x_{j+half}' = x_{j+half}·c + x_j·s.
    let other = f32::cast_from(x[base + select(first_half, d + half, j)]);
    let sign = select(first_half, f32::new(-1.0), f32::new(1.0));
    f32::cast_from(x[base + d]) * cos[pos * half + j] + sign * other * sin[pos * half + j]
}

/// Where a split cube works: its query (`token`, at `row` of `q` and `out`), K/V head, first
/// key and key count, and the query's position (its context's last key).
#[derive(CubeType, Clone, Copy)]
pub(crate) struct SplitAt {
    pub token: usize,
    pub row: usize,
    pub kvh: usize,
    pub first: usize,
    pub n_keys: usize,
    pub pos: usize,
}

/// The split cube's place (cube → query token, K/V head, split of `split_keys` keys); a cube
/// whose split starts past its context leaves at once (uniform across the cube).
#[cube]
pub(crate) fn split_at(
    query_rows: &Array<u32>,
    context_lens: &Array<u32>,
    split_keys: usize,
) -> SplitAt {
    let token = CUBE_POS_X as usize;
    let ctx = context_lens[token] as usize;
    let first = CUBE_POS_Z as usize * split_keys;
    if first >= ctx {
        terminate!();
    }
    SplitAt {
        token,
        row: query_rows[token] as usize,
        kvh: CUBE_POS_Y as usize,
        first,
        n_keys: usize::min(split_keys, ctx - first),
        pos: ctx - 1,
    }
}

/// The offsets (in vectors, `vecs` to a head's row) of the split's K/V rows, one block-table
/// lookup per key, into `rows`.
#[cube]
pub(crate) fn key_rows(
    block_tables: &Array<u32>,
    rows: &mut SharedMemory<u32>,
    at: SplitAt,
    max_blocks: usize,
    #[comptime] kv_heads: usize,
    #[comptime] block_size: usize,
    #[comptime] vecs: usize,
) {
    let mut kk = UNIT_POS as usize;
    while kk < at.n_keys {
        let p = at.first + kk;
        let block = block_tables[at.token * max_blocks + p / block_size] as usize;
        rows[kk] = (((block * block_size + p % block_size) * kv_heads + at.kvh) * vecs) as u32;
        kk += CUBE_DIM as usize;
    }
}

/// Decode-only steps: the split holding the new token (its last key) rotates the token's key
/// and writes it and its value into the caches, then fences them before any unit reads them
/// back. `rows` must be complete (a cube barrier after [`key_rows`]); `vecs` vectors to a row.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_new_token<F: Float, N: Size>(
    k_new: &Array<F>,
    v_new: &Array<F>,
    cos: &Array<f32>,
    sin: &Array<f32>,
    k_cache: &mut Array<Vector<F, N>>,
    v_cache: &mut Array<Vector<F, N>>,
    rows: &SharedMemory<u32>,
    at: SplitAt,
    kv_stride: usize,
    #[comptime] head_dim: usize,
    #[comptime] vecs: usize,
) {
    let tid = UNIT_POS as usize;
    let half = comptime![head_dim / 2];
    if at.pos < at.first + at.n_keys {
        if tid < vecs {
            let dst = rows[at.n_keys - 1] as usize + tid;
            let base = at.row * kv_stride + at.kvh * head_dim;
            let mut kv = Vector::<F, N>::empty();
            let mut vv = Vector::<F, N>::empty();
            #[unroll]
            for e in 0..N::value() {
                let d = tid * N::value() + e;
                kv[e] = F::cast_from(rotated::<F>(k_new, base, d, half, at.pos, cos, sin));
                vv[e] = v_new[base + d];
            }
            k_cache[dst] = kv;
            v_cache[dst] = vv;
        }
        sync_storage();
        sync_cube();
    }
}

/// Issues the loads of this unit's V vectors (lane `lane`) for keys `kk + j · key_groups`, j <
/// `V_IN_FLIGHT` (zeros past the split's last key).
#[cube]
fn load_v<F: Float, N: Size>(
    v_cache: &Array<Vector<F, N>>,
    rows: &SharedMemory<u32>,
    vs: &mut Array<Vector<F, N>>,
    kk: usize,
    lane: usize,
    n_keys: usize,
    #[comptime] key_groups: usize,
) {
    #[unroll]
    for j in 0..V_IN_FLIGHT {
        let key = kk + j * key_groups;
        vs[j] = Vector::new(F::new(0.0));
        if key < n_keys {
            vs[j] = v_cache[rows[key] as usize + lane];
        }
    }
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn split_kernel<F: Float, N: Size>(
    query_rows: &Array<u32>,
    q: &Array<F>,
    k_new: &Array<F>,
    v_new: &Array<F>,
    cos: &Array<f32>,
    sin: &Array<f32>,
    k_cache: &mut Array<Vector<F, N>>,
    v_cache: &mut Array<Vector<F, N>>,
    block_tables: &Array<u32>,
    context_lens: &Array<u32>,
    out: &mut Array<F>,
    part_acc: &mut Array<f32>,
    part_ml: &mut Array<f32>,
    scale: f32,
    q_stride: usize,
    kv_stride: usize,
    max_splits: usize,
    max_blocks: usize,
    #[comptime] kv_heads: usize,
    #[comptime] group: usize,
    #[comptime] head_dim: usize,
    #[comptime] block_size: usize,
    #[comptime] split_keys: usize,
    #[comptime] vec: usize,
    #[comptime] threads: usize,
    #[comptime] lanes: usize,
    #[comptime] fresh: bool,
) {
    let at = split_at(query_rows, context_lens, split_keys);
    // The query's row in `q` and `out`; its position, the last key.
    let (token, row, kvh, n_keys, pos) = (at.token, at.row, at.kvh, at.n_keys, at.pos);
    let (split, ctx) = (CUBE_POS_Z as usize, pos + 1);
    let heads = kv_heads * group;
    let vecs = comptime![head_dim / vec];
    let half = comptime![head_dim / 2];

    // The group's query heads, pre-scaled (and rotated, fresh).
    let mut q_s = SharedMemory::<f32>::new(group * head_dim);
    let mut scores = SharedMemory::<f32>::new(group * split_keys);
    // Offset (in vectors) of each key's K/V row, found once through the block table.
    let mut rows = SharedMemory::<u32>::new(split_keys);
    let tid = UNIT_POS as usize;
    let mut i = tid;
    while i < group * head_dim {
        let base = row * q_stride + (kvh * group + i / head_dim) * head_dim;
        let d = i % head_dim;
        let x = if comptime![fresh] {
            rotated::<F>(q, base, d, half, pos, cos, sin)
        } else {
            f32::cast_from(q[base + d])
        };
        q_s[i] = x * scale;
        i += threads;
    }
    key_rows(
        block_tables,
        &mut rows,
        at,
        max_blocks,
        kv_heads,
        block_size,
        vecs,
    );
    sync_cube();

    if comptime![fresh] {
        write_new_token::<F, N>(
            k_new, v_new, cos, sin, k_cache, v_cache, &rows, at, kv_stride, head_dim, vecs,
        );
    }

    // P·V's first V rows' loads go out now, so they travel with the K loads instead of after
    // the softmax: `vecs` units share a V row (one vector each); the cube's units form
    // threads / vecs key groups that walk the keys side by side, `V_IN_FLIGHT` rows in flight
    // per unit.
    let lane = tid % vecs;
    let key_groups = comptime![threads / vecs];
    let kg = tid / vecs;
    let mut vs = Array::<Vector<F, N>>::new(V_IN_FLIGHT);
    load_v::<F, N>(v_cache, &rows, &mut vs, kg, lane, n_keys, key_groups);

    // Scores: `lanes` units per key, each a slice of the head (vectors part, part + lanes, …,
    // so a key's loads are contiguous), summed by shuffles; every unit runs every round, so
    // the shuffles see their whole plane.
    let slots = comptime![threads / lanes];
    let slot = tid / lanes;
    let part = tid % lanes;
    #[unroll]
    for r in 0..comptime![split_keys.div_ceil(threads / lanes)] {
        let kk = slot + r * slots;
        let mut dots = Array::<f32>::new(group);
        #[unroll]
        for g in 0..group {
            dots[g] = f32::new(0.0);
        }
        if kk < n_keys {
            let base = rows[kk] as usize;
            let mut ks = Array::<Vector<f32, N>>::new(comptime![vecs / lanes]);
            // All of the key's loads in flight before the first product needs one.
            #[unroll]
            for j in 0..comptime![vecs / lanes] {
                ks[j] = Vector::<f32, N>::cast_from(k_cache[base + part + j * lanes]);
            }
            #[unroll]
            for j in 0..comptime![vecs / lanes] {
                let at = (part + j * lanes) * N::value();
                #[unroll]
                for e in 0..N::value() {
                    #[unroll]
                    for g in 0..group {
                        dots[g] += q_s[g * head_dim + at + e] * ks[j][e];
                    }
                }
            }
        }
        #[unroll]
        for g in 0..group {
            let mut s = dots[g];
            let mut mask = 1u32;
            while mask < comptime![lanes as u32] {
                s += plane_shuffle_xor(s, mask);
                mask *= 2;
            }
            if kk < n_keys && part == 0 {
                scores[g * split_keys + kk] = s;
            }
        }
    }
    sync_cube();

    // Softmax statistics per head over this split; scores become exp(s - max). The heads'
    // reductions share their barriers: one exchange of plane partials for all maxima, one for
    // all sums (the second also publishes the rewritten scores to the P·V phase).
    let plane = (UNIT_POS / PLANE_DIM) as usize;
    let num_planes = (CUBE_DIM / PLANE_DIM) as usize;
    let mut max_parts = SharedMemory::<f32>::new(group * MAX_PLANES);
    let mut sum_parts = SharedMemory::<f32>::new(group * MAX_PLANES);
    #[unroll]
    for g in 0..group {
        let mut m = f32::new(-3.0e38);
        let mut kk = tid;
        while kk < n_keys {
            m = f32::max(m, scores[g * split_keys + kk]);
            kk += threads;
        }
        let m = plane_max(m);
        if UNIT_POS_PLANE == 0 {
            max_parts[g * MAX_PLANES + plane] = m;
        }
    }
    sync_cube();
    let mut maxes = Array::<f32>::new(group);
    let mut sums = Array::<f32>::new(group);
    #[unroll]
    for g in 0..group {
        let mut m = max_parts[g * MAX_PLANES];
        for p in 1..num_planes {
            m = f32::max(m, max_parts[g * MAX_PLANES + p]);
        }
        maxes[g] = m;
        let mut s = f32::new(0.0);
        let mut kk = tid;
        while kk < n_keys {
            let p = f32::exp(scores[g * split_keys + kk] - m);
            scores[g * split_keys + kk] = p;
            s += p;
            kk += threads;
        }
        let s = plane_sum(s);
        if UNIT_POS_PLANE == 0 {
            sum_parts[g * MAX_PLANES + plane] = s;
        }
    }
    sync_cube();
    #[unroll]
    for g in 0..group {
        let mut s = f32::new(0.0);
        for p in 0..num_planes {
            s += sum_parts[g * MAX_PLANES + p];
        }
        sums[g] = s;
    }

    let mut acc = Array::<Vector<f32, N>>::new(group);
    #[unroll]
    for g in 0..group {
        acc[g] = Vector::new(0.0);
    }
    let mut kk = kg;
    while kk < n_keys {
        #[unroll]
        for j in 0..V_IN_FLIGHT {
            let key = kk + j * key_groups;
            if key < n_keys {
                let v = Vector::<f32, N>::cast_from(vs[j]);
                #[unroll]
                for g in 0..group {
                    acc[g] += v * Vector::new(scores[g * split_keys + key]);
                }
            }
        }
        kk += V_IN_FLIGHT * key_groups;
        load_v::<F, N>(v_cache, &rows, &mut vs, kk, lane, n_keys, key_groups);
    }
    // Sum the key groups' partials: [key group][head][dim] in shared memory; the split's
    // statistics beside them.
    let mut red = SharedMemory::<f32>::new(comptime![threads / vecs * group * head_dim]);
    #[unroll]
    for g in 0..group {
        #[unroll]
        for e in 0..N::value() {
            red[(kg * group + g) * head_dim + lane * N::value() + e] = acc[g][e];
        }
    }
    let mut stats = SharedMemory::<f32>::new(2 * group);
    if tid == 0 {
        #[unroll]
        for g in 0..group {
            stats[2 * g] = maxes[g];
            stats[2 * g + 1] = sums[g];
        }
    }
    sync_cube();

    // One unit per (head, dimension) of the group.
    let n_splits = ctx.div_ceil(split_keys);
    let mut i = tid;
    while i < group * head_dim {
        let (g, d) = (i / head_dim, i % head_dim);
        let mut total = f32::new(0.0);
        for j in 0..key_groups {
            total += red[(j * group + g) * head_dim + d];
        }
        let h = kvh * group + g;
        if n_splits == 1 {
            out[(row * heads + h) * head_dim + d] = F::cast_from(total / stats[2 * g + 1]);
        } else {
            let at = (token * heads + h) * max_splits + split;
            part_acc[at * head_dim + d] = total;
            if d == 0 {
                part_ml[at * 2] = stats[2 * g];
                part_ml[at * 2 + 1] = stats[2 * g + 1];
            }
        }
        i += threads;
    }
}

/// Merges the splits of sequences longer than one split; one cube per (token, head).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn combine_kernel<F: Float>(
    query_rows: &Array<u32>,
    context_lens: &Array<u32>,
    part_acc: &Array<f32>,
    part_ml: &Array<f32>,
    out: &mut Array<F>,
    max_splits: usize,
    split_keys: usize,
    #[comptime] heads: usize,
    #[comptime] head_dim: usize,
) {
    let token = CUBE_POS_X as usize;
    let h = CUBE_POS_Y as usize;
    let n_splits = (context_lens[token] as usize).div_ceil(split_keys);
    if n_splits <= 1 {
        terminate!();
    }
    let d = UNIT_POS as usize;
    let base = (token * heads + h) * max_splits;
    // The splits' (max, sum) pairs into shared memory in one round of loads, then every
    // unit takes the global max from there: the partial sums' loads that follow are
    // independent of each other and issue back to back (a running rescale would chain them).
    let mut ml = SharedMemory::<f32>::new(2 * MAX_COMBINED);
    let mut s = d;
    while s < n_splits {
        ml[2 * s] = part_ml[(base + s) * 2];
        ml[2 * s + 1] = part_ml[(base + s) * 2 + 1];
        s += head_dim;
    }
    sync_cube();
    let mut m = ml[0];
    for s in 1..n_splits {
        m = f32::max(m, ml[2 * s]);
    }
    let mut num = f32::new(0.0);
    let mut den = f32::new(0.0);
    let mut s = 0usize;
    while s < n_splits {
        // Several splits' loads in flight (past the last split: its row re-read, then skipped).
        let mut parts = Array::<f32>::new(MERGE_IN_FLIGHT);
        #[unroll]
        for j in 0..MERGE_IN_FLIGHT {
            let at = usize::min(s + j, n_splits - 1);
            parts[j] = part_acc[(base + at) * head_dim + d];
        }
        #[unroll]
        for j in 0..MERGE_IN_FLIGHT {
            if s + j < n_splits {
                let w = f32::exp(ml[2 * (s + j)] - m);
                num += w * parts[j];
                den += w * ml[2 * (s + j) + 1];
            }
        }
        s += MERGE_IN_FLIGHT;
    }
    let row = query_rows[token] as usize;
    out[(row * heads + h) * head_dim + d] = F::cast_from(num / den);
}

/// Scratch for sequences that need more than one split: f32 partial sums and (max, sum) pairs.
pub struct Workspace {
    pub acc: Handle,
    pub ml: Handle,
    pub max_splits: usize,
    pub split_keys: usize,
    /// Units per cube of the split kernel.
    pub threads: usize,
    /// Units per key in the scores phase (capped by the plane and a head's vectors).
    pub lanes: usize,
    /// The splits run on the tensor-core tile kernel with this spread (`None`: one key per
    /// unit).
    pub tiles: Option<Tiles>,
}

impl Workspace {
    /// Room for `tokens` decode tokens of up to `max_context` keys each of `F`, and the
    /// kernel and splits for them on this device.
    pub fn new<R: Runtime, F: CubePrimitive>(
        client: &ComputeClient<R>,
        tokens: usize,
        kv_heads: usize,
        heads: usize,
        head_dim: usize,
        max_context: usize,
    ) -> Self {
        let hw = &client.properties().hardware;
        let device = TileDevice {
            sms: hw.num_streaming_multiprocessors.unwrap_or(1) as usize,
            max_shared: hw.max_shared_memory_size,
            plane_size: hw.plane_size_min as usize,
            elem: F::as_type_native_unchecked().size(),
        };
        let tiled = has_tensor_cores::<R, F>(client)
            .then(|| {
                tile_plan(
                    device,
                    tokens,
                    kv_heads,
                    heads / kv_heads,
                    head_dim,
                    max_context,
                )
            })
            .flatten();
        match tiled {
            Some((spread, split)) => Self {
                tiles: Some(spread),
                ..Self::with_split_keys(client, tokens, heads, head_dim, max_context, split)
            },
            None => {
                let split = split_keys(tokens, kv_heads, max_context);
                Self::with_split_keys(client, tokens, heads, head_dim, max_context, split)
            }
        }
    }

    /// [`Workspace::new`] with the keys per split chosen by the caller (32 to 1,024; the
    /// benchmark sweeps them).
    pub fn with_split_keys<R: Runtime>(
        client: &ComputeClient<R>,
        tokens: usize,
        heads: usize,
        head_dim: usize,
        max_context: usize,
        split_keys: usize,
    ) -> Self {
        // Long enough that one merge takes every split of the longest context.
        let split_keys = split_keys.max(max_context.div_ceil(MAX_COMBINED));
        let max_splits = max_context.div_ceil(split_keys).max(1);
        let n = tokens * heads * max_splits;
        Self {
            acc: client.empty(n * head_dim * 4),
            ml: client.empty(n * 2 * 4),
            max_splits,
            split_keys,
            threads: split_threads(split_keys),
            lanes: (split_threads(split_keys) / split_keys).max(1),
            tiles: None,
        }
    }
}

/// The decode queries of a launch (u32 buffers): `count` of them; query i is row `rows[i]` of
/// `q` and `out`, with `block_tables` row i (`[count, max_blocks]`) and `context_lens[i]` keys
/// (≤ the workspace's max context).
#[derive(Clone, Copy)]
pub struct Queries<'a> {
    pub count: usize,
    pub rows: &'a Handle,
    pub block_tables: &'a Handle,
    pub context_lens: &'a Handle,
}

/// Where the queries come from.
#[derive(Clone, Copy)]
pub enum Query<'a> {
    /// Rotated queries `[rows, heads, head_dim]`; the new tokens' K and V already in the caches.
    Rotated(&'a Handle),
    /// The step's projections before RoPE: RoPE and the KV write happen here.
    Fresh(Fresh<'a>),
}

/// The step's projections (query i's token at row `rows[i]`) and the f32 RoPE tables
/// `[max_pos, head_dim / 2]`. The token's position is its context length − 1, its slot the
/// block table's for that position.
#[derive(Clone, Copy)]
pub struct Fresh<'a> {
    pub projections: &'a Projections,
    pub cos: &'a Handle,
    pub sin: &'a Handle,
}

/// Attention of the decode queries (`query`) over their paged K/V (`[slots, kv_heads,
/// head_dim]` each), into rows `[heads, head_dim]` of `out` (row `rows[i]` for query i).
#[allow(clippy::too_many_arguments)]
pub fn launch<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    shape: Shape,
    queries: Queries,
    query: Query,
    k_cache: &Handle,
    v_cache: &Handle,
    out: &Handle,
    ws: &Workspace,
    scale: f32,
) {
    let Queries {
        count: tokens,
        rows,
        block_tables,
        context_lens,
    } = queries;
    let Shape {
        kv_heads,
        group,
        head_dim,
        block_size,
        max_blocks,
    } = shape;
    let heads = kv_heads * group;
    // The widest vector that splits a head evenly.
    let v = vector_size(client, size_of::<F>(), head_dim);
    let cache_vecs = k_cache.size() as usize / size_of::<F>() / v;
    let arr = |h: &Handle, len: usize| unsafe { ArrayArg::from_raw_parts(h.clone(), len) };
    let len = |h: &Handle, elem: usize| h.size() as usize / elem;
    let n_part = tokens * heads * ws.max_splits;
    let out_len = len(out, size_of::<F>());
    // Lanes per key: what the cube's units allow, within a plane and a head's vectors.
    let plane = client.properties().hardware.plane_size_min as usize;
    let lanes = ws.lanes.clamp(1, (head_dim / v).min(plane));
    // Without fresh tokens the K/V and table arguments are unread: any valid buffer will do.
    let (q, k_new, v_new, cos, sin, q_stride, kv_stride, fresh) = match query {
        Query::Rotated(q) => (q, q, q, rows, rows, heads * head_dim, 0, false),
        Query::Fresh(f) => {
            let p = f.projections;
            (
                &p.q,
                &p.k,
                &p.v,
                f.cos,
                f.sin,
                p.q_stride,
                p.kv_stride,
                true,
            )
        }
    };
    // Every index stays in bounds (the tests poison outputs, compute-sanitizer checks the
    // rest), so the launches skip CubeCL's per-access bounds checks: at decode's sizes the
    // kernel is a chain of dependent instructions, and each check lengthens it.
    unsafe {
        if let Some(spread) = ws.tiles {
            let hardware = has_tensor_cores::<R, F>(client);
            let hw = &client.properties().hardware;
            let bytes = |keys| spread.shared_bytes(group, head_dim, keys, size_of::<F>(), hardware);
            let room = hw.max_shared_memory_size;
            let keys = Some(tiles::key_capacity(ws.split_keys))
                .filter(|&keys| bytes(keys) <= room)
                .unwrap_or(ws.split_keys);
            let shared = bytes(keys);
            assert!(
                shared <= room,
                "decode attention {spread:?}: {shared} bytes of shared memory, the device gives {room}"
            );
            // 16-byte groups of 8 elements at most: the K rows' swizzle works on them.
            let v8 = vector_size(client, size_of::<F>(), 8);
            let cache_vecs = k_cache.size() as usize / size_of::<F>() / v8;
            tiles::tile_kernel::launch_unchecked::<F, R>(
                client,
                CubeCount::Static(tokens as u32, kv_heads as u32, ws.max_splits as u32),
                CubeDim::new_1d((spread.planes * crate::mma::WARP) as u32),
                v8,
                arr(rows, tokens),
                arr(q, len(q, size_of::<F>())),
                arr(k_new, len(k_new, size_of::<F>())),
                arr(v_new, len(v_new, size_of::<F>())),
                arr(cos, len(cos, 4)),
                arr(sin, len(sin, 4)),
                arr(k_cache, cache_vecs),
                arr(v_cache, cache_vecs),
                arr(block_tables, tokens * max_blocks),
                arr(context_lens, tokens),
                arr(out, out_len),
                arr(&ws.acc, n_part * head_dim),
                arr(&ws.ml, n_part * 2),
                scale,
                q_stride,
                kv_stride,
                ws.max_splits,
                max_blocks,
                ws.split_keys,
                kv_heads,
                group,
                head_dim,
                block_size,
                keys,
                v8,
                spread.planes,
                spread.stages,
                fresh,
                hardware,
            );
        } else {
            split_kernel::launch_unchecked::<F, R>(
                client,
                CubeCount::Static(tokens as u32, kv_heads as u32, ws.max_splits as u32),
                CubeDim::new_1d(ws.threads as u32),
                v,
                arr(rows, tokens),
                arr(q, len(q, size_of::<F>())),
                arr(k_new, len(k_new, size_of::<F>())),
                arr(v_new, len(v_new, size_of::<F>())),
                arr(cos, len(cos, 4)),
                arr(sin, len(sin, 4)),
                arr(k_cache, cache_vecs),
                arr(v_cache, cache_vecs),
                arr(block_tables, tokens * max_blocks),
                arr(context_lens, tokens),
                arr(out, out_len),
                arr(&ws.acc, n_part * head_dim),
                arr(&ws.ml, n_part * 2),
                scale,
                q_stride,
                kv_stride,
                ws.max_splits,
                max_blocks,
                kv_heads,
                group,
                head_dim,
                block_size,
                ws.split_keys,
                v,
                ws.threads,
                lanes,
                fresh,
            );
        }
        if ws.max_splits > 1 {
            combine_kernel::launch_unchecked::<F, R>(
                client,
                CubeCount::Static(tokens as u32, heads as u32, 1),
                CubeDim::new_1d(head_dim as u32),
                arr(rows, tokens),
                arr(context_lens, tokens),
                arr(&ws.acc, n_part * head_dim),
                arr(&ws.ml, n_part * 2),
                arr(out, out_len),
                ws.max_splits,
                ws.split_keys,
                heads,
                head_dim,
            );
        }
    }
}

/// The plain reference, f32: same layouts as [`launch`].
#[allow(clippy::too_many_arguments)]
pub fn reference(
    shape: Shape,
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    block_tables: &[u32],
    context_lens: &[u32],
    scale: f32,
) -> Vec<f32> {
    let Shape {
        kv_heads,
        group,
        head_dim: hd,
        block_size,
        max_blocks,
    } = shape;
    let heads = kv_heads * group;
    let mut out = vec![0f32; q.len()];
    for (t, &ctx) in context_lens.iter().enumerate() {
        for h in 0..heads {
            let kvh = h / group;
            let qrow = &q[(t * heads + h) * hd..][..hd];
            let rows: Vec<usize> = (0..ctx as usize)
                .map(|p| {
                    let block = block_tables[t * max_blocks + p / block_size] as usize;
                    ((block * block_size + p % block_size) * kv_heads + kvh) * hd
                })
                .collect();
            let s: Vec<f64> = rows
                .iter()
                .map(|&r| {
                    qrow.iter()
                        .zip(&k_cache[r..r + hd])
                        .map(|(a, b)| (*a * *b) as f64)
                        .sum::<f64>()
                        * scale as f64
                })
                .collect();
            let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let p: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = p.iter().sum();
            for d in 0..hd {
                let v: f64 = rows
                    .iter()
                    .zip(&p)
                    .map(|(&r, &p)| p * v_cache[r + d] as f64)
                    .sum();
                out[(t * heads + h) * hd + d] = (v / z) as f32;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rope_kv_write::{plain_tables, rope_reference, write_reference};
    use crate::test_util::{client, fill, fused_rows, read, rel_err, upload, Elem};

    /// Decode queries of contexts `ctxs`, each over a shuffled, disjoint set of the pool's
    /// blocks; query i at row `tokens - 1 - i` of the step. `fresh`: the step's tokens come as
    /// one fused Q/K/V projection before RoPE, their cache rows hold garbage until the kernel
    /// writes them, and the caches are checked too.
    /// `tiled`: the tile kernel with this spread and these keys per split (otherwise the
    /// device's choice: one key per unit on lavapipe).
    #[allow(clippy::too_many_arguments)]
    fn check<F: Elem>(
        kv_heads: usize,
        group: usize,
        head_dim: usize,
        block_size: usize,
        ctxs: &[u32],
        fresh: bool,
        tol: f64,
        tiled: Option<(Tiles, usize)>,
    ) {
        let c = client();
        let tokens = ctxs.len();
        let heads = kv_heads * group;
        let (q_width, kv_width) = (heads * head_dim, kv_heads * head_dim);
        let max_ctx = *ctxs.iter().max().unwrap() as usize;
        let max_blocks = max_ctx.div_ceil(block_size);
        let num_blocks = tokens * max_blocks + 3;
        let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
        ids.reverse();
        ids.rotate_left(2);
        let block_tables: Vec<u32> = (0..tokens * max_blocks).map(|i| ids[i]).collect();
        let slots = num_blocks * block_size;
        let mut q = F::round_trip(&fill(tokens * q_width, 11));
        let mut k = F::round_trip(&fill(slots * kv_width, 12));
        let mut v = F::round_trip(&fill(slots * kv_width, 13));
        let (kh, vh) = (upload::<F>(&c, &k), upload::<F>(&c, &v));
        let shape = Shape {
            kv_heads,
            group,
            head_dim,
            block_size,
            max_blocks,
        };
        let scale = 1.0 / (head_dim as f32).sqrt();
        let out = upload::<F>(&c, &vec![f32::NAN; q.len()]);
        let ws = match tiled {
            Some((spread, split)) => Workspace {
                tiles: Some(spread),
                ..Workspace::with_split_keys(&c, tokens, heads, head_dim, max_ctx, split)
            },
            None => Workspace::new::<_, F>(&c, tokens, kv_heads, heads, head_dim, max_ctx),
        };
        let bt = c.create_from_slice(u32::as_bytes(&block_tables));
        let cl = c.create_from_slice(u32::as_bytes(ctxs));
        let rows: Vec<u32> = (0..tokens as u32).rev().collect();
        let queries = Queries {
            count: tokens,
            rows: &c.create_from_slice(u32::as_bytes(&rows)),
            block_tables: &bt,
            context_lens: &cl,
        };
        // Row r of the step: its position and slot (the last key of its query).
        let mut positions = vec![0u32; tokens];
        let mut new_slots = vec![0u32; tokens];
        for (i, &r) in rows.iter().enumerate() {
            let p = ctxs[i] as usize - 1;
            positions[r as usize] = p as u32;
            let block = block_tables[i * max_blocks + p / block_size] as usize;
            new_slots[r as usize] = (block * block_size + p % block_size) as u32;
        }
        let (cos, sin) = plain_tables(max_ctx, head_dim);
        if fresh {
            let mut k_new = F::round_trip(&fill(tokens * kv_width, 14));
            let v_new = F::round_trip(&fill(tokens * kv_width, 15));
            let parts = [(&q[..], q_width), (&k_new, kv_width), (&v_new, kv_width)];
            let all = upload::<F>(&c, &fused_rows(&parts, tokens));
            let projections = Projections::fused(&all, q_width, kv_width, size_of::<F>());
            let to = |v: &[f32]| c.create_from_slice(f32::as_bytes(v));
            let (cos_h, sin_h) = (to(&cos), to(&sin));
            let query = Query::Fresh(Fresh {
                projections: &projections,
                cos: &cos_h,
                sin: &sin_h,
            });
            launch::<_, F>(&c, shape, queries, query, &kh, &vh, &out, &ws, scale);
            rope_reference(&mut q, &positions, &cos, &sin, heads, head_dim);
            rope_reference(&mut k_new, &positions, &cos, &sin, kv_heads, head_dim);
            write_reference(&k_new, &mut k, &new_slots, kv_width);
            write_reference(&v_new, &mut v, &new_slots, kv_width);
            let ek = rel_err(&read::<F>(&c, kh), &k);
            assert!(ek < tol, "{} k cache: rel err {ek}", F::NAME);
            assert_eq!(read::<F>(&c, vh), v, "{}: v cache", F::NAME);
        } else {
            let query = Query::Rotated(&upload::<F>(&c, &q));
            launch::<_, F>(&c, shape, queries, query, &kh, &vh, &out, &ws, scale);
        }
        let in_query_order: Vec<f32> = rows
            .iter()
            .flat_map(|&r| q[r as usize * q_width..][..q_width].to_vec())
            .collect();
        let by_query = reference(shape, &in_query_order, &k, &v, &block_tables, ctxs, scale);
        let mut expected = vec![0f32; q.len()];
        for (i, &r) in rows.iter().enumerate() {
            expected[r as usize * q_width..][..q_width]
                .copy_from_slice(&by_query[i * q_width..][..q_width]);
        }
        let e = rel_err(&read::<F>(&c, out), &expected);
        assert!(
            e < tol,
            "{} kvh {kv_heads} g {group} d {head_dim} bs {block_size} ctx {ctxs:?} fresh {fresh} \
             {tiled:?}: rel err {e}",
            F::NAME
        );
    }

    #[test]
    fn one_split_ragged_contexts() {
        check::<f32>(2, 4, 64, 16, &[1, 17, 100, 512], false, 1e-5, None);
        check::<f32>(3, 3, 64, 16, &[33], false, 1e-5, None);
    }

    #[test]
    fn several_splits_are_merged() {
        check::<f32>(1, 2, 32, 16, &[513, 1300, 40], false, 1e-5, None);
        check::<f32>(2, 4, 128, 16, &[45, 300], false, 1e-5, None);
    }

    #[test]
    fn f16() {
        check::<half::f16>(2, 4, 64, 16, &[700, 9], false, 3e-3, None);
    }

    #[test]
    fn rope_and_kv_write_folded_in() {
        check::<f32>(2, 4, 64, 16, &[1, 17, 100, 512], true, 1e-5, None);
        check::<f32>(1, 2, 32, 16, &[513, 1300, 40], true, 1e-5, None);
        check::<half::f16>(2, 4, 128, 16, &[700, 9, 64], true, 3e-3, None);
    }

    /// The tile kernel's plan on an H200-like device (132 SMs, 227 KiB a cube) and on one
    /// giving a cube 99 KiB: Llama-3.1-8B's heads fit both, 256-wide heads only the first.
    #[test]
    fn tile_plan_fits_the_device() {
        let h200 = TileDevice {
            sms: 132,
            max_shared: 227 * 1024,
            plane_size: 32,
            elem: 2,
        };
        let small = TileDevice {
            max_shared: 99 * 1024,
            ..h200
        };
        let spread = Some((TILES, 1024));
        assert_eq!(tile_plan(h200, 64, 8, 4, 128, 576), spread);
        assert_eq!(tile_plan(small, 64, 8, 4, 128, 576), spread);
        assert_eq!(tile_plan(h200, 64, 8, 4, 256, 576), spread);
        assert_eq!(tile_plan(small, 64, 8, 4, 256, 576), None);
        // One sequence of 8k keys: 512-key splits (128 cubes); a group past the tile: none.
        assert_eq!(tile_plan(h200, 1, 8, 4, 128, 8192), Some((TILES, 512)));
        assert_eq!(tile_plan(h200, 1, 2, 32, 128, 8192), None);
    }

    // The tile kernel under the emulated `mma` is slow to build and run on lavapipe (and gets
    // 32 KiB of shared memory): three kernels cover its paths — several planes and the upper
    // rows of the tile, a deeper ring and an odd group with RoPE and the KV write folded in,
    // f32 — each over ragged contexts of one to several stages and splits.
    fn tiled(planes: usize, stages: usize, split: usize) -> Option<(Tiles, usize)> {
        Some((Tiles { planes, stages }, split))
    }

    #[test]
    fn tiles_planes_and_upper_rows() {
        let ctxs = [1, 17, 45, 161, 300];
        check::<half::f16>(1, 12, 64, 16, &ctxs, false, 3e-3, tiled(2, 2, 64));
    }

    #[test]
    fn tiles_ring_rope_and_kv_write_folded_in() {
        check::<half::f16>(3, 3, 64, 16, &[33, 200], true, 3e-3, tiled(1, 3, 128));
    }

    #[test]
    fn tiles_f32() {
        check::<f32>(2, 4, 64, 16, &[1, 17, 100], false, 1e-5, tiled(1, 2, 64));
    }
}
