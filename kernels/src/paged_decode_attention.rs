//! Paged attention for decode (one query token per sequence), GQA-aware and split-K
//! (flash-decoding).
//!
//! A cube serves one (token, K/V head, split), one unit per key of the split (up to 512): it
//! holds the `group` query heads that share that K/V head in shared memory, so each K/V row is
//! read once for all of them. Within a split the
//! softmax is exact (scores kept in shared memory, f32); splits are merged by `combine`, which
//! rescales each split's partial sums by its running maximum. Keys are found through the block
//! table: slot = block_table[pos / block_size] · block_size + pos % block_size.

use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::vector::vector_size;

/// Keys one split covers at most (its scores live in shared memory: group × split f32).
const MAX_SPLIT_KEYS: usize = 1024;
/// Shorter splits add merge work faster than they add parallelism: on the H100, one token at
/// 2,048 keys ran 22 µs with 128-key splits and 26–28 µs with 64-key ones (a tie at 516 keys).
const MIN_SPLIT_KEYS: usize = 128;
/// Cubes worth launching before splits get shorter. Nsight Compute, one token, split + merge
/// (benches/RESULTS.md): at 8k keys 256-key splits (256 cubes) 34 µs against 39 for 128-key
/// ones (512 cubes); at 32k 1,024-key splits (256 cubes) 95 µs against 120 for 512-key ones.
const TARGET_CUBES: usize = 256;
/// Splits one merge can take: the most a context of `max_context` keys makes (shared memory).
const MAX_COMBINED: usize = 2048;
/// V rows each unit has in flight in P·V.
const V_IN_FLIGHT: usize = 8;
/// Units per cube of the split kernel: one per key of the split, up to this many (a unit's
/// registers hold one K row).
const MAX_THREADS: usize = 512;
/// Upper bound on planes per cube, for the reductions' shared memory (head_dim ≤ 256, plane ≥ 4).
const MAX_PLANES: usize = 64;

/// Keys per split: long enough to amortise the merge, short enough to fill the device.
pub fn split_keys(tokens: usize, kv_heads: usize, max_context: usize) -> usize {
    let mut split = MAX_SPLIT_KEYS;
    while split > MIN_SPLIT_KEYS && tokens * kv_heads * max_context.div_ceil(split) < TARGET_CUBES {
        split /= 2;
    }
    split
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

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn split_kernel<F: Float, N: Size>(
    query_rows: &Array<u32>,
    q: &Array<F>,
    k_cache: &Array<Vector<F, N>>,
    v_cache: &Array<Vector<F, N>>,
    block_tables: &Array<u32>,
    context_lens: &Array<u32>,
    out: &mut Array<F>,
    part_acc: &mut Array<f32>,
    part_ml: &mut Array<f32>,
    scale: f32,
    max_splits: usize,
    max_blocks: usize,
    #[comptime] kv_heads: usize,
    #[comptime] group: usize,
    #[comptime] head_dim: usize,
    #[comptime] block_size: usize,
    #[comptime] split_keys: usize,
    #[comptime] vec: usize,
    #[comptime] threads: usize,
) {
    let token = CUBE_POS_X as usize;
    let row = query_rows[token] as usize; // the query's row in `q` and `out`
    let kvh = CUBE_POS_Y as usize;
    let split = CUBE_POS_Z as usize;
    let ctx = context_lens[token] as usize;
    let first = split * split_keys;
    // Uniform across the cube: the whole cube leaves together.
    if first >= ctx {
        terminate!();
    }
    let n_keys = usize::min(split_keys, ctx - first);
    let heads = kv_heads * group;
    let vecs = head_dim / N::value();

    let mut q_s = SharedMemory::<f32>::new(group * head_dim);
    let mut scores = SharedMemory::<f32>::new(group * split_keys);
    // Offset (in vectors) of each key's K/V row, found once through the block table.
    let mut rows = SharedMemory::<u32>::new(split_keys);
    let tid = UNIT_POS as usize;
    // The group's query heads are contiguous in `q`.
    let mut i = tid;
    while i < group * head_dim {
        q_s[i] = f32::cast_from(q[(row * heads + kvh * group) * head_dim + i]);
        i += threads;
    }
    let mut kk = tid;
    while kk < n_keys {
        let pos = first + kk;
        let block = block_tables[token * max_blocks + pos / block_size] as usize;
        rows[kk] = (((block * block_size + pos % block_size) * kv_heads + kvh) * vecs) as u32;
        kk += threads;
    }
    sync_cube();

    // Scores: each unit takes keys tid, tid + threads, ..., reading K rows in vectors.
    let mut kk = tid;
    while kk < n_keys {
        let row = rows[kk] as usize;
        let mut dots = Array::<f32>::new(group);
        #[unroll]
        for g in 0..group {
            dots[g] = f32::new(0.0);
        }
        // Unrolled: the row's loads are all in flight before the first product needs one.
        #[unroll]
        for i in 0..comptime![head_dim / vec] {
            let kv = Vector::<f32, N>::cast_from(k_cache[row + i]);
            #[unroll]
            for e in 0..N::value() {
                #[unroll]
                for g in 0..group {
                    dots[g] += q_s[g * head_dim + i * N::value() + e] * kv[e];
                }
            }
        }
        #[unroll]
        for g in 0..group {
            scores[g * split_keys + kk] = dots[g] * scale;
        }
        kk += threads;
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

    // P·V: `vecs` units share a V row (one vector each); the cube's units form
    // threads / vecs key groups that walk the keys side by side, `V_IN_FLIGHT` V rows' loads in
    // flight per unit.
    let lane = tid % vecs;
    let key_groups = threads / vecs;
    let kg = tid / vecs;
    let mut acc = Array::<Vector<f32, N>>::new(group);
    #[unroll]
    for g in 0..group {
        acc[g] = Vector::new(0.0);
    }
    let mut kk = kg;
    while kk < n_keys {
        let mut vs = Array::<Vector<f32, N>>::new(V_IN_FLIGHT);
        #[unroll]
        for j in 0..V_IN_FLIGHT {
            let key = kk + j * key_groups;
            vs[j] = Vector::new(0.0);
            if key < n_keys {
                vs[j] = Vector::<f32, N>::cast_from(v_cache[rows[key] as usize + lane]);
            }
        }
        #[unroll]
        for j in 0..V_IN_FLIGHT {
            let key = kk + j * key_groups;
            if key < n_keys {
                #[unroll]
                for g in 0..group {
                    acc[g] += vs[j] * Vector::new(scores[g * split_keys + key]);
                }
            }
        }
        kk += V_IN_FLIGHT * key_groups;
    }
    // Sum the key groups' partials: [key group][head][dim] in shared memory; the split's
    // statistics beside them.
    let mut red =
        SharedMemory::<f32>::new(comptime![threads / (head_dim / vec) * group * head_dim]);
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
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn combine_kernel<F: Float>(
    query_rows: &Array<u32>,
    context_lens: &Array<u32>,
    part_acc: &Array<f32>,
    part_ml: &Array<f32>,
    out: &mut Array<F>,
    max_splits: usize,
    #[comptime] heads: usize,
    #[comptime] head_dim: usize,
    #[comptime] split_keys: usize,
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
        // Four splits' loads in flight (past the last split: its row re-read, then skipped).
        let mut parts = Array::<f32>::new(4usize);
        #[unroll]
        for j in 0..4usize {
            let at = usize::min(s + j, n_splits - 1);
            parts[j] = part_acc[(base + at) * head_dim + d];
        }
        #[unroll]
        for j in 0..4usize {
            if s + j < n_splits {
                let w = f32::exp(ml[2 * (s + j)] - m);
                num += w * parts[j];
                den += w * ml[2 * (s + j) + 1];
            }
        }
        s += 4;
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
}

impl Workspace {
    /// Room for `tokens` decode tokens of up to `max_context` keys each.
    pub fn new<R: Runtime>(
        client: &ComputeClient<R>,
        tokens: usize,
        kv_heads: usize,
        heads: usize,
        head_dim: usize,
        max_context: usize,
    ) -> Self {
        let split_keys = split_keys(tokens, kv_heads, max_context);
        Self::with_split_keys(client, tokens, heads, head_dim, max_context, split_keys)
    }

    /// [`Workspace::new`] with the keys per split chosen by the caller (64 to 1,024; the
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

/// Attention of the decode queries in `q` `[rows, heads, head_dim]` over their paged K/V
/// (`[slots, kv_heads, head_dim]` each), into the same rows of `out`.
#[allow(clippy::too_many_arguments)]
pub fn launch<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    shape: Shape,
    queries: Queries,
    q: &Handle,
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
    let n_part = tokens * heads * ws.max_splits;
    let q_len = q.size() as usize / size_of::<F>();
    // One unit per key of a split (the scores phase then takes one round of K loads).
    let threads = ws.split_keys.clamp(head_dim, MAX_THREADS);
    split_kernel::launch::<F, R>(
        client,
        CubeCount::Static(tokens as u32, kv_heads as u32, ws.max_splits as u32),
        CubeDim::new_1d(threads as u32),
        v,
        arr(rows, tokens),
        arr(q, q_len),
        arr(k_cache, cache_vecs),
        arr(v_cache, cache_vecs),
        arr(block_tables, tokens * max_blocks),
        arr(context_lens, tokens),
        arr(out, q_len),
        arr(&ws.acc, n_part * head_dim),
        arr(&ws.ml, n_part * 2),
        scale,
        ws.max_splits,
        max_blocks,
        kv_heads,
        group,
        head_dim,
        block_size,
        ws.split_keys,
        v,
        threads,
    );
    if ws.max_splits > 1 {
        combine_kernel::launch::<F, R>(
            client,
            CubeCount::Static(tokens as u32, heads as u32, 1),
            CubeDim::new_1d(head_dim as u32),
            arr(rows, tokens),
            arr(context_lens, tokens),
            arr(&ws.acc, n_part * head_dim),
            arr(&ws.ml, n_part * 2),
            arr(out, q_len),
            ws.max_splits,
            heads,
            head_dim,
            ws.split_keys,
        );
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
    use crate::test_util::{client, fill, read, rel_err, upload, Elem};

    fn check<F: Elem>(
        kv_heads: usize,
        group: usize,
        head_dim: usize,
        block_size: usize,
        ctxs: &[u32],
        tol: f64,
    ) {
        let c = client();
        let tokens = ctxs.len();
        let heads = kv_heads * group;
        let max_ctx = *ctxs.iter().max().unwrap() as usize;
        let max_blocks = max_ctx.div_ceil(block_size);
        let num_blocks = tokens * max_blocks + 3;
        // Each token's blocks: a shuffled, disjoint set of the pool.
        let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
        ids.reverse();
        ids.rotate_left(2);
        let block_tables: Vec<u32> = (0..tokens * max_blocks).map(|i| ids[i]).collect();
        let slots = num_blocks * block_size;
        let q = fill(tokens * heads * head_dim, 11);
        let k = fill(slots * kv_heads * head_dim, 12);
        let v = fill(slots * kv_heads * head_dim, 13);
        let shape = Shape {
            kv_heads,
            group,
            head_dim,
            block_size,
            max_blocks,
        };
        let scale = 1.0 / (head_dim as f32).sqrt();
        let out = upload::<F>(&c, &vec![f32::NAN; q.len()]);
        let ws = Workspace::new(&c, tokens, kv_heads, heads, head_dim, max_ctx);
        let bt = c.create_from_slice(u32::as_bytes(&block_tables));
        let cl = c.create_from_slice(u32::as_bytes(ctxs));
        // Query i sits at row `tokens - 1 - i` of `q` and `out`.
        let rows: Vec<u32> = (0..tokens as u32).rev().collect();
        let queries = Queries {
            count: tokens,
            rows: &c.create_from_slice(u32::as_bytes(&rows)),
            block_tables: &bt,
            context_lens: &cl,
        };
        launch::<_, F>(
            &c,
            shape,
            queries,
            &upload::<F>(&c, &q),
            &upload::<F>(&c, &k),
            &upload::<F>(&c, &v),
            &out,
            &ws,
            scale,
        );
        let (q, k, v) = (F::round_trip(&q), F::round_trip(&k), F::round_trip(&v));
        let row_len = heads * head_dim;
        let in_query_order: Vec<f32> = rows
            .iter()
            .flat_map(|&r| q[r as usize * row_len..][..row_len].to_vec())
            .collect();
        let by_query = reference(shape, &in_query_order, &k, &v, &block_tables, ctxs, scale);
        let mut expected = vec![0f32; q.len()];
        for (i, &r) in rows.iter().enumerate() {
            expected[r as usize * row_len..][..row_len]
                .copy_from_slice(&by_query[i * row_len..][..row_len]);
        }
        let e = rel_err(&read::<F>(&c, out), &expected);
        assert!(
            e < tol,
            "{} kvh {kv_heads} g {group} d {head_dim} bs {block_size} ctx {ctxs:?}: rel err {e}",
            F::NAME
        );
    }

    #[test]
    fn one_split_ragged_contexts() {
        check::<f32>(2, 4, 64, 16, &[1, 17, 100, 512], 1e-5);
        check::<f32>(3, 3, 64, 16, &[33], 1e-5);
    }

    #[test]
    fn several_splits_are_merged() {
        check::<f32>(1, 2, 32, 16, &[513, 1300, 40], 1e-5);
    }

    #[test]
    fn f16() {
        check::<half::f16>(2, 4, 64, 16, &[700, 9], 3e-3);
    }
}
