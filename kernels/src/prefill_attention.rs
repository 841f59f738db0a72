//! Causal attention for prefill and chunked prefill over the paged KV cache (varlen: any mix of
//! sequences and chunk lengths in one launch), flash-attention style: tiles of query rows walk
//! their keys in blocks with an online softmax (f32), so scores never leave shared memory.
//!
//! A cube serves one (query tile, head): 16 consecutive query rows of one sequence per plane.
//! For each block of keys (gathered through the block table) it computes S = Q·Kᵀ, updates each
//! row's running max and sum, rescales the output rows whose max grew, and adds P·V. Where the device has tensor cores (`cmma`, 16×16×16, f32 accumulation) each
//! plane owns 16 query rows and runs both products on them; elsewhere the units compute the
//! same tiles element by element (the CPU CI path; identical layouts, masking and softmax).
//! Query row r of a tile sits at position `first_pos + r` and sees keys `0..=first_pos + r`.

use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::vector::vector_size;

/// Query rows per plane (the tensor-core tile's M).
const PLANE_ROWS: usize = 16;
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

/// How the work is tiled on a device: planes per cube (16 query rows each), keys per block, and
/// whether the products run on tensor cores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiling {
    pub planes: usize,
    pub block_keys: usize,
    pub cmma: bool,
}

impl Tiling {
    /// The largest tiling whose shared tiles fit the device (4 planes × 64 keys on a GPU).
    pub fn for_device<R: Runtime, F: CubePrimitive>(
        client: &ComputeClient<R>,
        shape: Shape,
    ) -> Self {
        let limit = client.properties().hardware.max_shared_memory_size;
        let cmma = has_tensor_cores::<R, F>(client);
        let tilings = [(4, 64), (2, 32), (1, 16)].map(|(planes, block_keys)| Tiling {
            planes,
            block_keys,
            cmma,
        });
        // The smallest one when none fits: its launch then reports the device's refusal.
        let fits = |t: &&Tiling| t.shared_bytes(shape.head_dim, size_of::<F>()) <= limit;
        *tilings.iter().find(fits).unwrap_or(&tilings[2])
    }

    pub fn tile_rows(&self) -> usize {
        PLANE_ROWS * self.planes
    }

    fn shared_bytes(&self, head_dim: usize, elem: usize) -> usize {
        let (br, bc) = (self.tile_rows(), self.block_keys);
        (br + 2 * bc) * (head_dim + PAD_F) * elem
            + bc * (br + PAD_F32) * 4
            + bc * (br + PAD_F) * elem
            + head_dim * (br + PAD_F32) * 4
            + 2 * br * 4
            + bc * 4
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
/// `tile_rows` rows.
pub fn tiles(chunks: &[Chunk], tile_rows: usize) -> Vec<u32> {
    let mut out = Vec::new();
    for c in chunks {
        for start in (0..c.len).step_by(tile_rows) {
            let rows = tile_rows.min(c.len - start);
            out.extend(
                [
                    c.table_row,
                    c.first_token + start,
                    rows,
                    c.first_pos + start,
                ]
                .map(|v| v as u32),
            );
        }
    }
    out
}

/// `acc += A·B` for one 16×16×16 tensor-core tile, A and B read from shared memory.
#[cube]
#[allow(clippy::too_many_arguments)]
fn mma_tile<F: Float>(
    acc: &cmma::Matrix<f32>,
    a: &Slice<F>,
    a_layout: cmma::MatrixLayout,
    b: &Slice<F>,
    b_layout: cmma::MatrixLayout,
    a_stride: u32,
    b_stride: u32,
) {
    let a = cmma::Matrix::<F>::from_slice(
        cmma::MatrixIdent::A,
        16usize,
        16usize,
        16usize,
        a_layout,
        a,
        a_stride,
    );
    let b = cmma::Matrix::<F>::from_slice(
        cmma::MatrixIdent::B,
        16usize,
        16usize,
        16usize,
        b_layout,
        b,
        b_stride,
    );
    cmma::execute::<F, F, f32, f32>(&a, &b, acc, acc);
}

#[cube(launch)]
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
    #[comptime] bc: usize,
    #[comptime] use_cmma: bool,
) {
    let tile = CUBE_POS_X as usize;
    let head = CUBE_POS_Y as usize;
    let kvh = head / (heads / kv_heads);
    let table_row = tiles[tile * 4] as usize;
    let t0 = tiles[tile * 4 + 1] as usize;
    let rows = tiles[tile * 4 + 2] as usize;
    let p0 = tiles[tile * 4 + 3] as usize;
    let n_keys = p0 + rows;

    let br = comptime![PLANE_ROWS * planes];
    let d = head_dim;
    // Q, K and V are row-major with row stride `qs`. S, P and O are column-major (column
    // strides `ss`, `ps`, `os`), so the softmax's one unit per row walks them with consecutive
    // units on consecutive addresses (no bank conflicts).
    let qs = comptime![head_dim + PAD_F];
    let ss = comptime![PLANE_ROWS * planes + PAD_F32];
    let ps = comptime![PLANE_ROWS * planes + PAD_F];
    let os = comptime![PLANE_ROWS * planes + PAD_F32];
    let mut q_s = SharedMemory::<F>::new(br * qs);
    let mut k_s = SharedMemory::<F>::new(bc * qs);
    let mut v_s = SharedMemory::<F>::new(bc * qs);
    let mut s_s = SharedMemory::<f32>::new(bc * ss);
    let mut p_s = SharedMemory::<F>::new(bc * ps);
    let mut o_s = SharedMemory::<f32>::new(d * os);
    let mut m_s = SharedMemory::<f32>::new(br);
    let mut l_s = SharedMemory::<f32>::new(br);
    let mut key_rows = SharedMemory::<u32>::new(bc);

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

    let plane = (UNIT_POS / PLANE_DIM) as usize;
    let n_blocks = n_keys.div_ceil(bc);
    for kb in 0..n_blocks {
        let k0 = kb * bc;
        sync_cube(); // the previous block's tiles are no longer read
                     // The block's K/V row offsets + 1, one table lookup per key (0: past the last key).
        let mut key = tid;
        while key < bc {
            let pos = k0 + key;
            let mut at = 0u32;
            if pos < n_keys {
                let block = block_tables[table_row * max_blocks + pos / block_size] as usize;
                let row = ((block * block_size + pos % block_size) * kv_heads + kvh) * vecs;
                at = u32::cast_from(row) + 1;
            }
            key_rows[key] = at;
            key += units;
        }
        sync_cube();
        // Gather the rows, four K and four V loads in flight per unit.
        let mut i = tid;
        while i < bc * vecs {
            let mut kv = Array::<Vector<F, N>>::new(4usize);
            let mut vv = Array::<Vector<F, N>>::new(4usize);
            #[unroll]
            for j in 0..4usize {
                let at = i + j * units;
                kv[j] = Vector::new(F::new(0.0));
                vv[j] = Vector::new(F::new(0.0));
                if at < bc * vecs {
                    let row = key_rows[at / vecs] as usize;
                    if row > 0 {
                        kv[j] = k_cache[row - 1 + at % vecs];
                        vv[j] = v_cache[row - 1 + at % vecs];
                    }
                }
            }
            #[unroll]
            for j in 0..4usize {
                let at = i + j * units;
                if at < bc * vecs {
                    let base = (at / vecs) * qs + (at % vecs) * vec;
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

        // S = Q·Kᵀ for the tile's rows and the block's keys.
        if comptime![use_cmma] {
            let r0 = plane * PLANE_ROWS;
            #[unroll]
            for nb in 0..comptime![bc / 16] {
                let acc = cmma::Matrix::<f32>::from_value(
                    cmma::MatrixIdent::Accumulator,
                    16usize,
                    16usize,
                    16usize,
                    cmma::MatrixLayout::Undefined,
                    f32::new(0.0),
                );
                #[unroll]
                for kk in 0..comptime![head_dim / 16] {
                    mma_tile::<F>(
                        &acc,
                        &q_s.slice(r0 * qs + kk * 16, br * qs),
                        cmma::MatrixLayout::RowMajor,
                        &k_s.slice(nb * 16 * qs + kk * 16, bc * qs),
                        cmma::MatrixLayout::ColMajor,
                        qs as u32,
                        qs as u32,
                    );
                }
                cmma::store(
                    &mut s_s.slice_mut(nb * 16 * ss + r0, bc * ss),
                    &acc,
                    ss as u32,
                    cmma::MatrixLayout::ColMajor,
                );
            }
        } else {
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
        }
        sync_cube();

        // Online softmax, one unit per row.
        let mut r = tid;
        while r < br {
            let qpos = p0 + r;
            let m_old = m_s[r];
            // Keys past the row's position (and rows past the tile's) are masked out.
            let mut last = 0usize;
            if r < rows && k0 <= qpos {
                last = usize::min(bc, qpos + 1 - k0);
            }
            // Unrolled (the block and head sizes are compile-time): no loop overhead, and the
            // shared-memory loads issue back to back.
            let mut m = m_old;
            #[unroll]
            for c in 0..bc {
                if c < last {
                    m = f32::max(m, s_s[c * ss + r] * scale);
                }
            }
            let mut sum = f32::new(0.0);
            #[unroll]
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
                #[unroll]
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
        if comptime![use_cmma] {
            let r0 = plane * PLANE_ROWS;
            #[unroll]
            for nb in 0..comptime![head_dim / 16] {
                let acc = cmma::Matrix::<f32>::from_value(
                    cmma::MatrixIdent::Accumulator,
                    16usize,
                    16usize,
                    16usize,
                    cmma::MatrixLayout::Undefined,
                    f32::new(0.0),
                );
                cmma::load_with_layout(
                    &acc,
                    &o_s.slice(nb * 16 * os + r0, d * os),
                    os as u32,
                    cmma::MatrixLayout::ColMajor,
                );
                #[unroll]
                for kk in 0..comptime![bc / 16] {
                    mma_tile::<F>(
                        &acc,
                        &p_s.slice(kk * 16 * ps + r0, bc * ps),
                        cmma::MatrixLayout::ColMajor,
                        &v_s.slice(kk * 16 * qs + nb * 16, bc * qs),
                        cmma::MatrixLayout::RowMajor,
                        ps as u32,
                        qs as u32,
                    );
                }
                cmma::store(
                    &mut o_s.slice_mut(nb * 16 * os + r0, d * os),
                    &acc,
                    os as u32,
                    cmma::MatrixLayout::ColMajor,
                );
            }
        } else {
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
    }
    sync_cube();
    let mut i = tid;
    while i < rows * d {
        let r = i / d;
        let c = i % d;
        out[((t0 + r) * heads + head) * d + c] = F::cast_from(o_s[c * os + r] / l_s[r]);
        i += units;
    }
}

/// Whether the device runs the kernel's tensor-core path for `F` (16×16×16, f32 accumulation).
pub fn has_tensor_cores<R: Runtime, F: CubePrimitive>(client: &ComputeClient<R>) -> bool {
    let f = F::as_type_native_unchecked().storage_type();
    client
        .properties()
        .features
        .matmul
        .cmma
        .contains(&cubecl::features::MmaConfig {
            a_type: f,
            b_type: f,
            cd_type: f32::as_type_native_unchecked().storage_type(),
            m: 16,
            n: 16,
            k: 16,
        })
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
    prefill_attention_kernel::launch::<F, R>(
        client,
        CubeCount::Static(n_tiles as u32, heads as u32, 1),
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
        tiling.block_keys,
        tiling.cmma,
    );
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
    /// (chunked prefill), K/V blocks scattered over the pool.
    fn check<F: Elem>(shape: Shape, chunks_of: &[(usize, usize)], tol: f64) {
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
        let tiling = Tiling::for_device::<_, F>(&c, shape);
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
        check::<f32>(shape, &[(0, 5), (0, 70), (37, 20), (100, 1)], 1e-5);
        check::<half::f16>(shape, &[(0, 33), (64, 64)], 3e-3);
    }
}
