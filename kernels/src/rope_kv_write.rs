//! Rotary position embedding fused with the KV write. Rotate-half form (HF's; kiln un-permutes
//! GGUF's interleaved Q/K at load) from an f32 cos/sin table `[max_pos, head_dim / 2]` (any
//! scaling is baked into the table). Q is rotated into its own `[tokens, heads, head_dim]`
//! buffer; K is rotated on its way into the paged pool and V copied there (`[slots, kv_heads,
//! head_dim]` each), at each token's slot: one launch where a separate RoPE and KV write took
//! two. Q, K and V are read with a row stride per token, so they can be the three parts of one
//! fused Q/K/V projection's rows (`[tokens, heads + 2·kv_heads, head_dim]`).

use cubecl::prelude::*;
use cubecl::server::Handle;

const THREADS: u32 = 256;

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn rope_kv_write_kernel<F: Float>(
    q: &Array<F>,
    q_out: &mut Array<F>,
    k: &Array<F>,
    v: &Array<F>,
    k_cache: &mut Array<F>,
    v_cache: &mut Array<F>,
    positions: &Array<u32>,
    slots: &Array<u32>,
    cos: &Array<f32>,
    sin: &Array<f32>,
    tokens: usize,
    heads: usize,
    kv_heads: usize,
    half: usize,
    q_stride: usize,
    kv_stride: usize,
) {
    // One unit per (token, head among Q's, then K's, then V's, pair i).
    let i = ABSOLUTE_POS % half;
    let th = ABSOLUTE_POS / half;
    let all_heads = heads + 2 * kv_heads;
    if th >= tokens * all_heads {
        terminate!();
    }
    let t = th / all_heads;
    let h = th % all_heads;
    if h < heads + kv_heads {
        let p = positions[t] as usize;
        let c = cos[p * half + i];
        let s = sin[p * half + i];
        if h < heads {
            let src = t * q_stride + h * 2 * half;
            let dst = (t * heads + h) * 2 * half;
            let x1 = f32::cast_from(q[src + i]);
            let x2 = f32::cast_from(q[src + half + i]);
            q_out[dst + i] = F::cast_from(x1 * c - x2 * s);
            q_out[dst + half + i] = F::cast_from(x2 * c + x1 * s);
        } else {
            let kh = h - heads;
            let src = t * kv_stride + kh * 2 * half;
            let dst = (slots[t] as usize * kv_heads + kh) * 2 * half;
            let x1 = f32::cast_from(k[src + i]);
            let x2 = f32::cast_from(k[src + half + i]);
            k_cache[dst + i] = F::cast_from(x1 * c - x2 * s);
            k_cache[dst + half + i] = F::cast_from(x2 * c + x1 * s);
        }
    } else {
        let vh = h - heads - kv_heads;
        let src = t * kv_stride + vh * 2 * half;
        let dst = (slots[t] as usize * kv_heads + vh) * 2 * half;
        v_cache[dst + i] = v[src + i];
        v_cache[dst + half + i] = v[src + half + i];
    }
}

/// A step's Q/K/V projections: token t's Q row at `t · q_stride` of `q`, its K and V rows at
/// `t · kv_stride` of `k` and `v` (elements).
#[derive(Clone)]
pub struct Projections {
    pub q: Handle,
    pub k: Handle,
    pub v: Handle,
    pub q_stride: usize,
    pub kv_stride: usize,
}

impl Projections {
    /// Views into one fused projection's rows `[tokens, q_width + 2 · kv_width]` (Q, K, V),
    /// of `elem` bytes an element.
    pub fn fused(rows: &Handle, q_width: usize, kv_width: usize, elem: usize) -> Self {
        let at = |elems: usize| rows.clone().offset_start((elems * elem) as u64);
        let width = q_width + 2 * kv_width;
        Self {
            q: rows.clone(),
            k: at(q_width),
            v: at(q_width + kv_width),
            q_stride: width,
            kv_stride: width,
        }
    }

    /// Three contiguous projections `[tokens, q_width]`, `[tokens, kv_width]` × 2.
    pub fn separate(q: Handle, k: Handle, v: Handle, q_width: usize, kv_width: usize) -> Self {
        Self {
            q,
            k,
            v,
            q_stride: q_width,
            kv_stride: kv_width,
        }
    }
}

/// The step's tensors: Q and K/V of `tokens` tokens, their positions and slots (u32), and where
/// the rotated Q goes.
pub struct Step<'a> {
    pub projections: &'a Projections,
    pub positions: &'a Handle,
    pub slots: &'a Handle,
    pub tokens: usize,
    pub q_out: &'a Handle,
}

/// Rotates `step.q` into `step.q_out` and writes rotated K and V into row `slots[t]` of the
/// caches.
#[allow(clippy::too_many_arguments)]
pub fn launch<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    step: Step,
    k_cache: &Handle,
    v_cache: &Handle,
    cos: &Handle,
    sin: &Handle,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
) {
    let Step {
        projections,
        positions,
        slots,
        tokens,
        q_out,
    } = step;
    let Projections {
        q,
        k,
        v,
        q_stride,
        kv_stride,
    } = projections;
    let (q_stride, kv_stride) = (*q_stride, *kv_stride);
    let half = head_dim / 2;
    let units = tokens * (heads + 2 * kv_heads) * half;
    let table = cos.size() as usize / 4;
    let cache_len = k_cache.size() as usize / size_of::<F>();
    // The elements each view spans: its last token's row ends there.
    let span = |stride: usize, width: usize| tokens.saturating_sub(1) * stride + width;
    let kv_len = span(kv_stride, kv_heads * head_dim);
    let arr = |h: &Handle, len: usize| unsafe { ArrayArg::from_raw_parts(h.clone(), len) };
    rope_kv_write_kernel::launch::<F, R>(
        client,
        CubeCount::Static(units.div_ceil(THREADS as usize) as u32, 1, 1),
        CubeDim::new_1d(THREADS),
        arr(q, span(q_stride, heads * head_dim)),
        arr(q_out, tokens * heads * head_dim),
        arr(k, kv_len),
        arr(v, kv_len),
        arr(k_cache, cache_len),
        arr(v_cache, cache_len),
        arr(positions, tokens),
        arr(slots, tokens),
        arr(cos, table),
        arr(sin, table),
        tokens,
        heads,
        kv_heads,
        half,
        q_stride,
        kv_stride,
    );
}

/// Plain RoPE tables (base 10,000, no scaling) for references and tests: cos and sin
/// `[max_pos, head_dim / 2]`, the layout [`launch`] reads.
pub fn plain_tables(max_pos: usize, head_dim: usize) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let angles: Vec<f32> = (0..max_pos * half)
        .map(|j| (j / half) as f32 * 10000f32.powf(-((j % half) as f32) / half as f32))
        .collect();
    (
        angles.iter().map(|a| a.cos()).collect(),
        angles.iter().map(|a| a.sin()).collect(),
    )
}

/// The plain reference of the rotation: rotates `x` (`[tokens, heads, head_dim]`) in place.
pub fn rope_reference(
    x: &mut [f32],
    positions: &[u32],
    cos: &[f32],
    sin: &[f32],
    heads: usize,
    head_dim: usize,
) {
    let half = head_dim / 2;
    for (t, &p) in positions.iter().enumerate() {
        for h in 0..heads {
            let row = &mut x[(t * heads + h) * head_dim..][..head_dim];
            for i in 0..half {
                let (c, s) = (cos[p as usize * half + i], sin[p as usize * half + i]);
                let (x1, x2) = (row[i], row[half + i]);
                row[i] = x1 * c - x2 * s;
                row[half + i] = x2 * c + x1 * s;
            }
        }
    }
}

/// The plain reference of the write: copies row `t` of `src` to row `slots[t]` of `cache`.
pub fn write_reference(src: &[f32], cache: &mut [f32], slots: &[u32], width: usize) {
    for (t, &s) in slots.iter().enumerate() {
        cache[s as usize * width..][..width].copy_from_slice(&src[t * width..][..width]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{client, fill, fused_rows, read, rel_err, upload, Elem};

    /// `fused`: Q, K and V as the three parts of one projection's rows.
    fn check<F: Elem>(
        tokens: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        fused: bool,
        tol: f64,
    ) {
        let c = client();
        let (max_pos, slots_total) = (300, 2 * tokens + 5);
        let (cos, sin) = plain_tables(max_pos, head_dim);
        let positions: Vec<u32> = (0..tokens as u32)
            .map(|t| (t * 37) % max_pos as u32)
            .collect();
        let slots: Vec<u32> = (0..tokens as u32)
            .map(|t| (t * 7 + 3) % slots_total as u32)
            .collect();
        let (q_width, width) = (heads * head_dim, kv_heads * head_dim);
        let mut q = F::round_trip(&fill(tokens * q_width, 31));
        let mut k = F::round_trip(&fill(tokens * width, 32));
        let v = F::round_trip(&fill(tokens * width, 33));
        let mut kc = F::round_trip(&fill(slots_total * width, 34));
        let mut vc = F::round_trip(&fill(slots_total * width, 35));
        let (kch, vch) = (upload::<F>(&c, &kc), upload::<F>(&c, &vc));
        let q_out = upload::<F>(&c, &vec![f32::NAN; q.len()]);
        let to = |v: &[f32]| c.create_from_slice(f32::as_bytes(v));
        let u32s = |v: &[u32]| c.create_from_slice(u32::as_bytes(v));
        let (positions_h, slots_h) = (u32s(&positions), u32s(&slots));
        let projections = if fused {
            let rows = fused_rows(&[(&q, q_width), (&k, width), (&v, width)], tokens);
            Projections::fused(&upload::<F>(&c, &rows), q_width, width, size_of::<F>())
        } else {
            let (qh, kh, vh) = (
                upload::<F>(&c, &q),
                upload::<F>(&c, &k),
                upload::<F>(&c, &v),
            );
            Projections::separate(qh, kh, vh, q_width, width)
        };
        let step = Step {
            projections: &projections,
            positions: &positions_h,
            slots: &slots_h,
            tokens,
            q_out: &q_out,
        };
        launch::<_, F>(
            &c,
            step,
            &kch,
            &vch,
            &to(&cos),
            &to(&sin),
            heads,
            kv_heads,
            head_dim,
        );
        rope_reference(&mut q, &positions, &cos, &sin, heads, head_dim);
        rope_reference(&mut k, &positions, &cos, &sin, kv_heads, head_dim);
        write_reference(&k, &mut kc, &slots, width);
        write_reference(&v, &mut vc, &slots, width);
        let eq = rel_err(&read::<F>(&c, q_out), &q);
        let ek = rel_err(&read::<F>(&c, kch), &kc);
        assert!(
            eq < tol && ek < tol,
            "{} fused {fused}: q {eq} k cache {ek}",
            F::NAME
        );
        assert_eq!(read::<F>(&c, vch), vc, "{} fused {fused}: v cache", F::NAME);
    }

    #[test]
    fn matches_reference() {
        check::<f32>(5, 9, 3, 64, false, 1e-6);
        check::<f32>(1, 4, 4, 128, false, 1e-6);
        check::<half::f16>(7, 14, 2, 64, false, 2e-3);
    }

    #[test]
    fn reads_a_fused_projection() {
        check::<f32>(5, 9, 3, 64, true, 1e-6);
        check::<half::f16>(7, 14, 2, 64, true, 2e-3);
    }
}
