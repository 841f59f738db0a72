//! Decode attention on tensor-core tiles: the split kernel [`crate::paged_decode_attention`]
//! launches wherever the device has tensor cores and the shape fits ([`supported`]); it beat
//! the one-key-per-unit kernel from one sequence to 64 (H200, benches/RESULTS.md), most where
//! many sequences or long contexts let it stream K/V at the memory's rate.
//!
//! A cube serves one (token, K/V head, split), as the one-key-per-unit kernel does, but walks
//! its keys in stages of `16 · planes` keys copied into a ring of shared-memory stages by async
//! copies (`cp.async`, one mbarrier per stage), so several stages are in flight while one is
//! multiplied. Each plane takes 16 keys of a stage and keeps a flash-attention state of its own
//! in `mma` (m16n8k16) register fragments: the group's query heads are the 16 rows of the A
//! tile (rows past the group are zeros), S = Q·Kᵀ for the plane's keys, an online softmax on
//! the fragments, O += P·V. At the end the planes' states meet in shared memory and the cube
//! writes the split's output (or its partial sums and statistics for the merge).
//!
//! S takes `head_dim` in any order as long as Q and K take the same one (as the `mma` GEMM
//! does): lane (g, t) reads 8 consecutive values of Q rows g, g + 8 and of key g at dimension
//! 32·j + 8·t with one 16-byte read each. K rows keep their 16-byte groups' halves swapped on
//! odd keys (group o at o ^ 4), so a plane's reads fall on distinct banks. P·V needs V
//! transposed (pairs of keys at one dimension): `ldmatrix.trans` on tensor cores, scalar reads
//! in the emulation; V rows are padded by 16 bytes against bank conflicts.

use cubecl::frontend::barrier::Barrier;
use cubecl::prelude::*;

use crate::mma::{
    copy_vec, mma, pair_of, shared_bound, stage_barrier, Pair, EMULATION_SCRATCH, MBARRIER,
    STAGE_ALIGN, WARP,
};
use crate::paged_decode_attention::{key_rows, rotated, split_at, write_new_token, MAX_SPLIT_KEYS};

/// Keys a plane takes per stage: two 8-key tiles of S, one k16 step of P·V.
pub const PLANE_KEYS: usize = 16;
/// Query heads per K/V head the kernel takes (the rows of `mma`'s A tile).
pub const MAX_GROUP: usize = 16;
/// Padding of the V rows in the ring, elements (16 bytes in bf16).
const PAD_V: usize = 8;

/// How a cube is spread: planes (16 keys each per stage) and stages in the ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tiles {
    pub planes: usize,
    pub stages: usize,
}

/// Room for the K/V row offsets of a split of `split_keys` keys: the longest split the plans
/// make (1,024 keys, 4 KB), so one compiled kernel serves every split length up to it (where
/// the device has the room). Keys per split are a launch argument: as a compile-time constant
/// each new context bracket compiled a kernel of its own on its first decode step (H200: the
/// first 8k- and 16k-token requests' time to first token grew by ≈ 1.2 s each,
/// benches/RESULTS.md).
pub fn key_capacity(split_keys: usize) -> usize {
    split_keys.max(MAX_SPLIT_KEYS)
}

impl Tiles {
    /// Keys one stage holds.
    pub fn stage_keys(&self) -> usize {
        PLANE_KEYS * self.planes
    }

    /// Shared memory a cube takes: the ring, the query tile, the K/V row offsets of up to
    /// `split_keys` keys, the planes' states for the final merge, and the emulated `mma`'s
    /// scratch.
    pub fn shared_bytes(
        &self,
        group: usize,
        head_dim: usize,
        split_keys: usize,
        elem: usize,
        hardware: bool,
    ) -> usize {
        // The kernel's buffers: key rows, query tile, ring, emulation scratch (one value on
        // tensor cores), the stages' mbarriers, the planes' (max, sum) pairs and outputs.
        let ring = self.stages * self.stage_keys() * (2 * head_dim + PAD_V) * elem;
        let scratch = if hardware {
            4
        } else {
            self.planes * EMULATION_SCRATCH * 4
        };
        let barriers = if hardware { self.stages } else { 0 };
        let mut buffers = vec![
            (split_keys * 4, 4),
            (MAX_GROUP * head_dim * elem, 16),
            (ring, STAGE_ALIGN),
            (scratch, 4),
            (self.planes * MAX_GROUP * 2 * 4, 4),
            (self.planes * group * head_dim * 4, 4),
        ];
        buffers.extend(std::iter::repeat_n(MBARRIER, barriers));
        shared_bound(&buffers)
    }
}

/// Whether the tile kernel takes this shape: a group that fits the A tile, heads of whole
/// 8-element groups to swizzle (8 of them at least), planes of at least a quad (the softmax
/// combines a row's four lanes by shuffles).
pub fn supported(group: usize, head_dim: usize, plane_size: usize) -> bool {
    group <= MAX_GROUP && head_dim.is_multiple_of(64) && plane_size >= 4
}

/// The async copies (or plain copies) of stage `st`'s keys `k0 .. k0 + stage keys` of the
/// split (past `n_keys`: the last key again, finite values the mask ignores). A unit copies
/// K and V vectors `UNIT_POS + i · units` of the stage.
#[cube]
#[allow(clippy::too_many_arguments)]
fn issue_stage<F: Float, N: Size>(
    k_cache: &Array<Vector<F, N>>,
    v_cache: &Array<Vector<F, N>>,
    rows: &SharedMemory<u32>,
    ring: &mut SharedMemory<Vector<F, N>>,
    st: usize,
    k0: usize,
    n_keys: usize,
    #[comptime] layout: Layout,
    #[comptime] hardware: bool,
) {
    if k0 < n_keys {
        #[unroll]
        for i in 0..comptime![layout.stage_keys * layout.vecs / layout.units] {
            let at = UNIT_POS as usize + i * layout.units;
            let (r, c) = (at / layout.vecs, at % layout.vecs);
            let src = rows[usize::min(k0 + r, n_keys - 1)] as usize + c;
            let base = st * layout.stage;
            copy_vec::<F, N>(
                k_cache,
                src,
                ring,
                base + k_at(r, c, layout),
                layout.vec,
                hardware,
            );
            copy_vec::<F, N>(
                v_cache,
                src,
                ring,
                base + layout.k_part + r * layout.v_row + c,
                layout.vec,
                hardware,
            );
        }
    }
}

/// Where vector `c` of key `r`'s K row lies in a stage: odd keys swap the halves of their
/// 16-byte groups (group `o` at `o ^ 4`).
#[cube]
fn k_at(r: usize, c: usize, #[comptime] layout: Layout) -> usize {
    let vp8 = comptime![8 / layout.vec];
    r * layout.vecs + ((c / vp8) ^ ((r % 2) * 4)) * vp8 + c % vp8
}

/// A stage's layout, all comptime (vectors of `vec` elements): `stage_keys` K rows of `vecs`
/// vectors, then as many V rows of `v_row` (padded); `units` copy it.
#[derive(CubeType, Clone, Copy)]
struct Layout {
    #[cube(comptime)]
    vec: usize,
    #[cube(comptime)]
    vecs: usize,
    #[cube(comptime)]
    v_row: usize,
    #[cube(comptime)]
    stage_keys: usize,
    #[cube(comptime)]
    k_part: usize,
    #[cube(comptime)]
    stage: usize,
    #[cube(comptime)]
    units: usize,
}

/// The B fragments of P·V for output column tiles `2·dp` (registers 0–1) and `2·dp + 1`
/// (2–3): V at keys 2t, 2t + 1 (register 0) and 2t + 8, 2t + 9 (register 1) of the plane's 16,
/// dimension 8·tile + g.
#[cube]
fn v_fragments<F: Float, N: Size>(
    ring: &SharedMemory<Vector<F, N>>,
    v0: usize,
    dp: usize,
    #[comptime] layout: Layout,
    #[comptime] hardware: bool,
) -> Array<Pair<F>> {
    let lane = UNIT_POS as usize % WARP;
    let mut b = Array::<Pair<F>>::new(4usize);
    if comptime![hardware] {
        // ldmatrix ×4, transposed: lane L addresses key L % 8 + 8·(L / 8 % 2), columns
        // 16·dp + 8·(L / 16).
        let def = cmma::MmaDefinition::<F, F, f32>::new(16usize, 8usize, 16usize);
        let key = lane % 8 + 8 * ((lane / 8) % 2);
        let start = v0 + key * layout.v_row + (dp * 16 + 8 * (lane / 16)) / layout.vec;
        let regs = def.load_matrix::<Vector<F, N>, Const<2>>(
            &ring.slice(start, start + 1),
            cmma::MatrixIdent::B,
            4usize,
            true,
        );
        #[unroll]
        for j in 0..4usize {
            b[j] = regs[j];
        }
    } else {
        let (g, t) = (lane / 4, lane % 4);
        #[unroll]
        for u in 0..2usize {
            let d = (2 * dp + u) * 8 + g;
            let (c, e) = (d / layout.vec, d % layout.vec);
            #[unroll]
            for half in 0..2usize {
                let mut p = Pair::<F>::new(F::new(0.0));
                #[unroll]
                for i in 0..2usize {
                    p[i] = ring[v0 + (2 * t + 8 * half + i) * layout.v_row + c][e];
                }
                b[2 * u + half] = p;
            }
        }
    }
    b
}

#[cube(
    launch_unchecked,
    fast_math = FastMath::ReducedPrecision | FastMath::NotNaN | FastMath::NotInf
)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn tile_kernel<F: Float, N: Size>(
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
    split_keys: usize,
    #[comptime] kv_heads: usize,
    #[comptime] group: usize,
    #[comptime] head_dim: usize,
    #[comptime] block_size: usize,
    #[comptime] key_capacity: usize,
    #[comptime] vec: usize,
    #[comptime] planes: usize,
    #[comptime] stages: usize,
    #[comptime] fresh: bool,
    #[comptime] hardware: bool,
) {
    let at = split_at(query_rows, context_lens, split_keys);
    // The query's row in `q` and `out`; its position, the last key.
    let (token, row, kvh, n_keys, pos) = (at.token, at.row, at.kvh, at.n_keys, at.pos);
    let (split, ctx) = (CUBE_POS_Z as usize, pos + 1);
    let heads = kv_heads * group;
    let half = comptime![head_dim / 2];
    let units = comptime![planes * WARP];
    let vecs = comptime![head_dim / vec];
    let vp8 = comptime![8 / vec];
    let layout = comptime![Layout {
        vec,
        vecs,
        v_row: vecs + PAD_V / vec,
        stage_keys: PLANE_KEYS * planes,
        k_part: PLANE_KEYS * planes * vecs,
        stage: PLANE_KEYS * planes * (2 * vecs + PAD_V / vec),
        units,
    }];
    let tid = UNIT_POS as usize;

    // The split's K/V row offsets (vectors), one block-table lookup per key; the query tile
    // (the group's heads, rotated if fresh; zero rows past the group).
    let mut rows = SharedMemory::<u32>::new(key_capacity);
    key_rows(
        block_tables,
        &mut rows,
        at,
        max_blocks,
        kv_heads,
        block_size,
        vecs,
    );
    let mut q_s = SharedMemory::<Vector<F, N>>::new_aligned(comptime![MAX_GROUP * vecs], 16usize);
    let mut i = tid;
    while i < comptime![MAX_GROUP * vecs] {
        let (r, c) = (i / vecs, i % vecs);
        let mut qv = Vector::<F, N>::new(F::new(0.0));
        if r < group {
            let base = row * q_stride + (kvh * group + r) * head_dim;
            #[unroll]
            for e in 0..vec {
                let d = c * vec + e;
                if comptime![fresh] {
                    qv[e] = F::cast_from(rotated::<F>(q, base, d, half, pos, cos, sin));
                } else {
                    qv[e] = q[base + d];
                }
            }
        }
        q_s[i] = qv;
        i += units;
    }
    sync_cube();
    if comptime![fresh] {
        // Before any copy of the new token is queued.
        write_new_token::<F, N>(
            k_new, v_new, cos, sin, k_cache, v_cache, &rows, at, kv_stride, head_dim, vecs,
        );
    }

    let mut ring =
        SharedMemory::<Vector<F, N>>::new_aligned(comptime![stages * layout.stage], STAGE_ALIGN);
    let mut scratch = SharedMemory::<f32>::new(comptime![if hardware {
        1
    } else {
        planes * EMULATION_SCRATCH
    }]);
    let mut ready = Sequence::<Shared<Barrier>>::new();
    if comptime![hardware] {
        #[unroll]
        for _ in 0..stages {
            ready.push(Barrier::shared(CUBE_DIM, UNIT_POS == 0));
        }
        sync_cube(); // the barriers are initialized
    }

    let lane = tid % WARP;
    let plane = tid / WARP;
    let (g, t) = (lane / 4, lane % 4);
    // Q's A fragments, two k16 steps per 32 dimensions: lane (g, t) holds rows g and g + 8 at
    // dimensions 32·j + 8·t .. + 8.
    let mut q_frag = Array::<Pair<F>>::new(comptime![head_dim / 16 * 4]);
    #[unroll]
    for j in 0..comptime![head_dim / 32] {
        let mut qa = Array::<Vector<F, N>>::new(comptime![2 * vp8]);
        #[unroll]
        for v in 0..vp8 {
            let c = (32 * j + 8 * t) / vec + v;
            qa[v] = q_s[g * vecs + c];
            qa[vp8 + v] = q_s[(g + 8) * vecs + c];
        }
        #[unroll]
        for h in 0..2usize {
            let at = (2 * j + h) * 4;
            q_frag[at] = pair_of::<F, N>(&qa, 0, 4 * h);
            q_frag[at + 1] = pair_of::<F, N>(&qa, vp8, 4 * h);
            q_frag[at + 2] = pair_of::<F, N>(&qa, 0, 4 * h + 2);
            q_frag[at + 3] = pair_of::<F, N>(&qa, vp8, 4 * h + 2);
        }
    }

    // The plane's state: output fragments (vector 2n: row g, 2n + 1: row g + 8 of column tile
    // n), each row's running max and this lane's share of its running sum.
    let mut o = Array::<Pair<f32>>::new(comptime![head_dim / 8 * 2]);
    #[unroll]
    for n in 0..comptime![head_dim / 8 * 2] {
        o[n] = Vector::new(0.0);
    }
    let mut m_lo = f32::new(-3.0e38);
    let mut m_hi = f32::new(-3.0e38);
    let mut l_lo = f32::new(0.0);
    let mut l_hi = f32::new(0.0);

    // The first `stages − 1` stages in flight, then per stage: the one `stages − 1` ahead
    // queued into the slot the previous stage used, this one awaited and multiplied, and a
    // cube barrier before its slot is refilled.
    let stage_keys = comptime![PLANE_KEYS * planes];
    #[unroll]
    for st in 0..comptime![stages - 1] {
        issue_stage::<F, N>(
            k_cache,
            v_cache,
            &rows,
            &mut ring,
            st,
            st * stage_keys,
            n_keys,
            layout,
            hardware,
        );
        stage_barrier(&ready, st, stages, hardware, false);
    }
    let n_stages = n_keys.div_ceil(stage_keys);
    let mut s = 0usize;
    let mut st = 0usize;
    while s < n_stages {
        let ahead = (st + comptime![stages - 1]) % stages;
        let k_ahead = (s + comptime![stages - 1]) * stage_keys;
        issue_stage::<F, N>(
            k_cache, v_cache, &rows, &mut ring, ahead, k_ahead, n_keys, layout, hardware,
        );
        stage_barrier(&ready, ahead, stages, hardware, false);
        stage_barrier(&ready, st, stages, hardware, true);

        // S = Q·Kᵀ over the plane's 16 keys (two 8-key tiles).
        let k_row0 = plane * PLANE_KEYS;
        let mut sc = Array::<Pair<f32>>::new(4usize);
        #[unroll]
        for n in 0..4usize {
            sc[n] = Vector::new(0.0);
        }
        #[unroll]
        for j in 0..comptime![head_dim / 32] {
            #[unroll]
            for n in 0..2usize {
                let r = k_row0 + n * 8 + g;
                let mut kb = Array::<Vector<F, N>>::new(vp8);
                #[unroll]
                for v in 0..vp8 {
                    let c = (32 * j + 8 * t) / vec + v;
                    kb[v] = ring[st * layout.stage + k_at(r, c, layout)];
                }
                #[unroll]
                for h in 0..2usize {
                    let mut a = Array::<Pair<F>>::new(4usize);
                    #[unroll]
                    for x in 0..4usize {
                        a[x] = q_frag[(2 * j + h) * 4 + x];
                    }
                    let mut b = Array::<Pair<F>>::new(2usize);
                    b[0] = pair_of::<F, N>(&kb, 0, 4 * h);
                    b[1] = pair_of::<F, N>(&kb, 0, 4 * h + 2);
                    let mut c = Array::<Pair<f32>>::new(2usize);
                    c[0] = sc[2 * n];
                    c[1] = sc[2 * n + 1];
                    mma::<F>(&a, &b, &mut c, &mut scratch, hardware);
                    sc[2 * n] = c[0];
                    sc[2 * n + 1] = c[1];
                }
            }
        }

        // Online softmax on the fragments (lane (g, t): rows g and g + 8 at keys 8n + 2t, + 1):
        // scale and mask, row maxima over the quad, P in A-fragment order for P·V.
        let key0 = s * stage_keys + k_row0;
        let mut mx_lo = m_lo;
        let mut mx_hi = m_hi;
        #[unroll]
        for n in 0..2usize {
            let mut lo = sc[2 * n];
            let mut hi = sc[2 * n + 1];
            #[unroll]
            for e in 0..2usize {
                let valid = key0 + n * 8 + 2 * t + e < n_keys;
                lo[e] = select(valid, lo[e] * scale, f32::new(-3.0e38));
                hi[e] = select(valid, hi[e] * scale, f32::new(-3.0e38));
                mx_lo = f32::max(mx_lo, lo[e]);
                mx_hi = f32::max(mx_hi, hi[e]);
            }
            sc[2 * n] = lo;
            sc[2 * n + 1] = hi;
        }
        mx_lo = f32::max(mx_lo, plane_shuffle_xor(mx_lo, 1));
        mx_lo = f32::max(mx_lo, plane_shuffle_xor(mx_lo, 2));
        mx_hi = f32::max(mx_hi, plane_shuffle_xor(mx_hi, 1));
        mx_hi = f32::max(mx_hi, plane_shuffle_xor(mx_hi, 2));
        let alpha_lo = f32::exp(m_lo - mx_lo);
        let alpha_hi = f32::exp(m_hi - mx_hi);
        m_lo = mx_lo;
        m_hi = mx_hi;
        let mut p = Array::<Pair<F>>::new(4usize);
        let mut sum_lo = f32::new(0.0);
        let mut sum_hi = f32::new(0.0);
        #[unroll]
        for n in 0..2usize {
            let mut e_lo = Vector::<f32, Const<2>>::new(0.0);
            let mut e_hi = Vector::<f32, Const<2>>::new(0.0);
            #[unroll]
            for e in 0..2usize {
                let valid = key0 + n * 8 + 2 * t + e < n_keys;
                e_lo[e] = select(valid, f32::exp(sc[2 * n][e] - mx_lo), f32::new(0.0));
                e_hi[e] = select(valid, f32::exp(sc[2 * n + 1][e] - mx_hi), f32::new(0.0));
                sum_lo += e_lo[e];
                sum_hi += e_hi[e];
            }
            // Key tile n: A registers 2n (row g) and 2n + 1 (row g + 8).
            p[2 * n] = Pair::<F>::cast_from(e_lo);
            p[2 * n + 1] = Pair::<F>::cast_from(e_hi);
        }
        l_lo = l_lo * alpha_lo + sum_lo;
        l_hi = l_hi * alpha_hi + sum_hi;
        #[unroll]
        for n in 0..comptime![head_dim / 8] {
            o[2 * n] = o[2 * n] * Vector::new(alpha_lo);
            o[2 * n + 1] = o[2 * n + 1] * Vector::new(alpha_hi);
        }

        // O += P·V, two output column tiles per fragment load.
        let v0 = st * layout.stage + layout.k_part + k_row0 * layout.v_row;
        #[unroll]
        for dp in 0..comptime![head_dim / 16] {
            let b = v_fragments::<F, N>(&ring, v0, dp, layout, hardware);
            #[unroll]
            for u in 0..2usize {
                let mut bt = Array::<Pair<F>>::new(2usize);
                let mut c = Array::<Pair<f32>>::new(2usize);
                #[unroll]
                for x in 0..2usize {
                    bt[x] = b[2 * u + x];
                    c[x] = o[2 * (2 * dp + u) + x];
                }
                mma::<F>(&p, &bt, &mut c, &mut scratch, hardware);
                #[unroll]
                for x in 0..2usize {
                    o[2 * (2 * dp + u) + x] = c[x];
                }
            }
        }
        sync_cube(); // this slot is free for the stage `stages` ahead
        s += 1;
        st = (st + 1) % stages;
    }

    // The planes' states meet: each row's sum over its quad, then (max, sum) per plane and row
    // and the output rows of the group, in shared memory.
    l_lo += plane_shuffle_xor(l_lo, 1);
    l_lo += plane_shuffle_xor(l_lo, 2);
    l_hi += plane_shuffle_xor(l_hi, 1);
    l_hi += plane_shuffle_xor(l_hi, 2);
    let mut ml = SharedMemory::<f32>::new(comptime![planes * MAX_GROUP * 2]);
    let mut acc = SharedMemory::<f32>::new(comptime![planes * group * head_dim]);
    if t == 0 {
        ml[(plane * MAX_GROUP + g) * 2] = m_lo;
        ml[(plane * MAX_GROUP + g) * 2 + 1] = l_lo;
        ml[(plane * MAX_GROUP + g + 8) * 2] = m_hi;
        ml[(plane * MAX_GROUP + g + 8) * 2 + 1] = l_hi;
    }
    #[unroll]
    for n in 0..comptime![head_dim / 8] {
        #[unroll]
        for e in 0..2usize {
            let d = n * 8 + 2 * t + e;
            if g < group {
                acc[(plane * group + g) * head_dim + d] = o[2 * n][e];
            }
            if g + 8 < group {
                acc[(plane * group + g + 8) * head_dim + d] = o[2 * n + 1][e];
            }
        }
    }
    sync_cube();

    // One unit per (head, dimension) of the group: the planes' states rescaled to the largest
    // max; the split's output, or its partial sums and statistics for the merge.
    let n_splits = ctx.div_ceil(split_keys);
    let mut i = tid;
    while i < comptime![group * head_dim] {
        let (r, d) = (i / head_dim, i % head_dim);
        let mut m = ml[r * 2];
        #[unroll]
        for pl in 1..planes {
            m = f32::max(m, ml[(pl * MAX_GROUP + r) * 2]);
        }
        let mut sum = f32::new(0.0);
        let mut total = f32::new(0.0);
        #[unroll]
        for pl in 0..planes {
            let w = f32::exp(ml[(pl * MAX_GROUP + r) * 2] - m);
            sum += w * ml[(pl * MAX_GROUP + r) * 2 + 1];
            total += w * acc[(pl * group + r) * head_dim + d];
        }
        let h = kvh * group + r;
        if n_splits == 1 {
            out[(row * heads + h) * head_dim + d] = F::cast_from(total / sum);
        } else {
            let at = (token * heads + h) * max_splits + split;
            part_acc[at * head_dim + d] = total;
            if d == 0 {
                part_ml[at * 2] = m;
                part_ml[at * 2 + 1] = sum;
            }
        }
        i += units;
    }
}
