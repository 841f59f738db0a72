//! What the tensor-core kernels share: whether the device has `mma` (m16n8k16, f32
//! accumulation) for a type, its register fragments, the instruction emulated through shared
//! memory where the device lacks it (the CPU CI's lavapipe), and a ring of shared-memory stages
//! filled by async copies (`cp.async`, one mbarrier per stage) or, without tensor cores, by
//! plain copies.

use cubecl::frontend::barrier::{copy_async, Barrier};
use cubecl::prelude::*;

/// Units of the `mma` tile layout.
pub(crate) const WARP: usize = 32;

/// Two bf16/f16 values: one register of an `mma` fragment.
pub(crate) type Pair<E> = Vector<E, Const<2>>;

/// Alignment (bytes) of a shared buffer that async copies fill: a stage row that straddles a
/// 128-byte line costs its `cp.async` twice the L2 sectors and extra shared wavefronts (Nsight,
/// `mma_gemm` at 16-byte alignment: 50 % excess sectors and the kernel 1.37× slower).
pub(crate) const STAGE_ALIGN: usize = 128;

/// An mbarrier in shared memory: (bytes, alignment), as [`shared_bound`] takes buffers.
pub(crate) const MBARRIER: (usize, usize) = (8, 8);

/// The most shared memory a kernel's buffers, (bytes, alignment) each, can take: CubeCL places
/// each at the next multiple of its alignment past those placed before it (in an order of its
/// own), so each may add up to its alignment less one byte of padding.
pub(crate) fn shared_bound(buffers: &[(usize, usize)]) -> usize {
    buffers
        .iter()
        .map(|&(bytes, align)| bytes + align - 1)
        .sum()
}

/// Shared f32 scratch the emulated `mma` takes per 32-unit group.
pub(crate) const EMULATION_SCRATCH: usize = 384;

/// Whether the device runs the tensor-core paths for `F` (`mma` m16n8k16, f32 accumulation).
pub(crate) fn has_tensor_cores<R: Runtime, F: CubePrimitive>(client: &ComputeClient<R>) -> bool {
    let f = F::as_type_native_unchecked().storage_type();
    client
        .properties()
        .features
        .matmul
        .mma
        .contains(&cubecl::features::MmaConfig {
            a_type: f,
            b_type: f,
            cd_type: f32::as_type_native_unchecked().storage_type(),
            m: 16,
            n: 8,
            k: 16,
        })
}

/// Elements `e` and `e + 1` of the 8 consecutive values held as `8 / N` vectors from `at`.
#[cube]
pub(crate) fn pair_of<F: Float, N: Size>(
    v: &Array<Vector<F, N>>,
    at: usize,
    #[comptime] e: usize,
) -> Pair<F> {
    let n = N::value();
    let mut p = Pair::<F>::new(F::new(0.0));
    p[0] = v[at + e / n][e % n];
    p[1] = v[at + (e + 1) / n][(e + 1) % n];
    p
}

/// Rows after which [`swizzled`]'s pattern repeats, for stages of `chunk` vectors a row (`vp8`
/// vectors hold 8 values): the groups of a row, at most 8.
pub(crate) const fn swizzle_period(chunk: usize, vp8: usize) -> usize {
    let groups = chunk / vp8;
    if groups < 8 {
        groups
    } else {
        8
    }
}

/// How [`load_fragments`]' four 8×8 matrices are ordered, as the divisors of the matrix index
/// `i` whose lowest bit picks the 8-row half and the 8-value group: A side `i % 2` the rows
/// and `i / 2` the group, B side (`b_side`) the other way round.
const fn matrix_order(b_side: bool) -> (usize, usize) {
    if b_side {
        (2, 1)
    } else {
        (1, 2)
    }
}

/// Where vector `c` of row `row` lies in a stage of `chunk` vectors a row (`vp8` vectors hold 8
/// values; `groups` = chunk / vp8 such groups a row, a power of two): group `o` at
/// `o ^ (row % min(groups, 8))`, so one group of 8 consecutive rows (a phase of `ldmatrix`)
/// and the 8 groups of a row (a phase of copies into the stage) each fall on distinct banks
/// (rows of fewer than 8 groups keep some conflicts, but every row stays unpadded).
#[cube]
pub(crate) fn swizzled(
    row: usize,
    c: usize,
    #[comptime] chunk: usize,
    #[comptime] vp8: usize,
) -> usize {
    let period = comptime![swizzle_period(chunk, vp8)];
    row * chunk + ((c / vp8) ^ (row % period)) * vp8 + c % vp8
}

/// The lane's share of the addresses [`load_fragments`] reads in a [`swizzled`] stage of
/// `chunk` vectors a row (`vp8` vectors hold 8 values), for the 16 rows from `first_row` (a
/// multiple of 8) and each even group `2q` of a row's first 8: with `i = lane / 8`, the row
/// `8·(i % 2)` + lane % 8 at group `2q + i / 2` (A side), or the row `8·(i / 2)` + lane % 8 at
/// group `2q + i % 2` (`b_side`), swizzled. Rows a multiple of 8 further on swizzle the same
/// way, so every fragment's address is one of these plus a constant: computed once a kernel,
/// they leave the loads an add each instead of the swizzle's arithmetic.
#[cube]
pub(crate) fn fragment_lanes(
    first_row: usize,
    #[comptime] chunk: usize,
    #[comptime] vp8: usize,
    #[comptime] b_side: bool,
) -> Array<usize> {
    let period = comptime![swizzle_period(chunk, vp8)];
    let lane = UNIT_POS as usize % WARP;
    let (i, r) = (lane / 8, lane % 8);
    let (row_div, group_div) = comptime![matrix_order(b_side)];
    let row = 8 * ((i / row_div) % 2) + r;
    let step = (i / group_div) % 2;
    let mut out = Array::<usize>::new(comptime![period / 2]);
    #[unroll]
    for q in 0..comptime![period / 2] {
        out[q] = (first_row + row) * chunk + ((2 * q + step) ^ (r % period)) * vp8;
    }
    out
}

/// Where this lane's `ldmatrix` address lies for the four 8×8 matrices at rows `row` (a
/// multiple of 8) past [`fragment_lanes`]' `first_row` and groups `group0`, + 1 (`group0`
/// even) of a stage at vector `base`: one of `lanes` plus a constant.
#[cube]
pub(crate) fn fragment_at(
    base: usize,
    lanes: &Array<usize>,
    row: usize,
    group0: usize,
    #[comptime] chunk: usize,
    #[comptime] vp8: usize,
) -> usize {
    let period = comptime![swizzle_period(chunk, vp8)];
    base + lanes[(group0 % period) / 2] + row * chunk + (group0 / period) * comptime![period * vp8]
}

/// Four 8×8 matrices of a [`swizzled`] stage starting at vector `base`, as `mma` fragment
/// registers: rows `first_row + row` to + 15 (both multiples of 8) at the 8-value groups
/// `group0` and + 1 (`group0` even); lane (g, t) gets values 2t, 2t + 1 of its row g in each
/// register (`ldmatrix` at [`fragment_lanes`]' `lanes` for `first_row`, or plain loads without
/// tensor cores). On the A side, register `i` holds rows + 8·(i % 2) at group `group0 + i / 2`:
/// one k16 step's A fragment of 16 weight rows. On the B side, rows + 8·(i / 2) at group
/// `group0 + i % 2`: the B fragments (two registers each, in the order `mma` takes them) of
/// two 8-row tiles of `x`. No register needs moving before the `mma`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn load_fragments<F: Float, N: Size>(
    ring_s: &SharedMemory<Vector<F, N>>,
    base: usize,
    first_row: usize,
    row: usize,
    group0: usize,
    lanes: &Array<usize>,
    #[comptime] chunk: usize,
    #[comptime] vp8: usize,
    #[comptime] b_side: bool,
    #[comptime] hardware: bool,
) -> Array<Pair<F>> {
    let lane = UNIT_POS as usize % WARP;
    if comptime![hardware] {
        let at = fragment_at(base, lanes, row, group0, chunk, vp8);
        let def = cmma::MmaDefinition::<F, F, f32>::new(16usize, 8usize, 16usize);
        def.load_matrix::<Vector<F, N>, Const<2>>(
            &ring_s.slice(at, at + 1),
            cmma::MatrixIdent::A,
            4usize,
            false,
        )
    } else {
        let n = N::value();
        let (g, t) = (lane / 4, lane % 4);
        let mut out = Array::<Pair<F>>::new(4usize);
        // (The same choice as `let mut` values reassigned under a comptime branch gave wrong
        // sums on lavapipe; not isolated further.)
        let (row_div, group_div) = comptime![matrix_order(b_side)];
        #[unroll]
        for i in 0..4usize {
            let r = 8 * ((i / row_div) % 2);
            let group = group0 + (i / group_div) % 2;
            let c = group * vp8 + 2 * t / n;
            let v = ring_s[base + swizzled(first_row + row + r + g, c, chunk, vp8)];
            let mut p = Pair::<F>::new(F::new(0.0));
            p[0] = v[2 * t % n];
            p[1] = v[(2 * t + 1) % n];
            out[i] = p;
        }
        out
    }
}

/// `c += a · b` for one m16n8k16 tile: the tensor-core instruction, or (no tensor cores) the
/// same product through shared memory by the 32-unit group, in `mma`'s register layout (lane
/// (g, t) holds A rows g, g + 8 at k 2t, 2t + 1 / + 8, B column g at the same k, C rows g, g + 8
/// at columns 2t, 2t + 1). The emulation syncs the cube: every unit must reach it.
#[cube]
pub(crate) fn mma<F: Float>(
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
        let base = (UNIT_POS as usize / WARP) * EMULATION_SCRATCH;
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

/// One vector from global memory into the ring: `cp.async`, or a plain load and store.
#[cube]
pub(crate) fn copy_vec<F: Float, N: Size>(
    src: &Array<Vector<F, N>>,
    at: usize,
    ring_s: &mut SharedMemory<Vector<F, N>>,
    dst: usize,
    #[comptime] vec: usize,
    #[comptime] hardware: bool,
) {
    if comptime![hardware] {
        copy_async(
            &src.slice(at, at + 1),
            &mut ring_s.slice_mut(dst, dst + 1),
            vec as u32,
        );
    } else {
        ring_s[dst] = src[at];
    }
}

/// Stage `st`'s mbarrier (a comptime sequence, so found by a uniform branch): with `wait`, the
/// stage's copies done, the unit's and the cube's (plain copies: a cube barrier); without, the
/// unit's copies queued so far marked as the stage's, its current phase also waiting for them.
#[cube]
pub(crate) fn stage_barrier(
    ready: &Sequence<Shared<Barrier>>,
    st: usize,
    #[comptime] stages: usize,
    #[comptime] hardware: bool,
    #[comptime] wait: bool,
) {
    if comptime![hardware] {
        #[unroll]
        for i in 0..stages {
            if st == i {
                if comptime![wait] {
                    ready.index(i).arrive_and_wait();
                } else {
                    ready.index(i).commit_copy_async();
                }
            }
        }
    } else if comptime![wait] {
        sync_cube();
    }
}
