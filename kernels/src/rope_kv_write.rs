//! Rotary position embedding fused with the KV write. Rotate-half form (HF's; kiln un-permutes
//! GGUF's interleaved Q/K at load) from an f32 cos/sin table `[max_pos, head_dim / 2]` (any
//! scaling is baked into the table). Q `[tokens, heads, head_dim]` is rotated in place; K is
//! rotated on its way into the paged pool and V copied there (`[slots, kv_heads, head_dim]`
//! each), at each token's slot: one launch where a separate RoPE and KV write took two.

use cubecl::prelude::*;
use cubecl::server::Handle;

const THREADS: u32 = 256;

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn rope_kv_write_kernel<F: Float>(
    q: &mut Array<F>,
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
            let base = (t * heads + h) * 2 * half;
            let x1 = f32::cast_from(q[base + i]);
            let x2 = f32::cast_from(q[base + half + i]);
            q[base + i] = F::cast_from(x1 * c - x2 * s);
            q[base + half + i] = F::cast_from(x2 * c + x1 * s);
        } else {
            let kh = h - heads;
            let src = (t * kv_heads + kh) * 2 * half;
            let dst = (slots[t] as usize * kv_heads + kh) * 2 * half;
            let x1 = f32::cast_from(k[src + i]);
            let x2 = f32::cast_from(k[src + half + i]);
            k_cache[dst + i] = F::cast_from(x1 * c - x2 * s);
            k_cache[dst + half + i] = F::cast_from(x2 * c + x1 * s);
        }
    } else {
        let vh = h - heads - kv_heads;
        let src = (t * kv_heads + vh) * 2 * half;
        let dst = (slots[t] as usize * kv_heads + vh) * 2 * half;
        v_cache[dst + i] = v[src + i];
        v_cache[dst + half + i] = v[src + half + i];
    }
}

/// The step's tensors: Q and K/V of `tokens` tokens, their positions and slots (u32).
pub struct Step<'a> {
    pub q: &'a Handle,
    pub k: &'a Handle,
    pub v: &'a Handle,
    pub positions: &'a Handle,
    pub slots: &'a Handle,
    pub tokens: usize,
}

/// Rotates `step.q` in place and writes rotated K and V into row `slots[t]` of the caches.
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
        q,
        k,
        v,
        positions,
        slots,
        tokens,
    } = step;
    let half = head_dim / 2;
    let units = tokens * (heads + 2 * kv_heads) * half;
    let table = cos.size() as usize / 4;
    let cache_len = k_cache.size() as usize / size_of::<F>();
    let kv_len = tokens * kv_heads * head_dim;
    let arr = |h: &Handle, len: usize| unsafe { ArrayArg::from_raw_parts(h.clone(), len) };
    rope_kv_write_kernel::launch::<F, R>(
        client,
        CubeCount::Static(units.div_ceil(THREADS as usize) as u32, 1, 1),
        CubeDim::new_1d(THREADS),
        arr(q, tokens * heads * head_dim),
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
    );
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
    use crate::test_util::{client, fill, read, rel_err, upload, Elem};

    fn check<F: Elem>(tokens: usize, heads: usize, kv_heads: usize, head_dim: usize, tol: f64) {
        let c = client();
        let half = head_dim / 2;
        let (max_pos, slots_total) = (300, 2 * tokens + 5);
        let angles: Vec<f32> = (0..max_pos * half)
            .map(|j| (j / half) as f32 * 10000f32.powf(-((j % half) as f32) / half as f32))
            .collect();
        let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
        let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
        let positions: Vec<u32> = (0..tokens as u32)
            .map(|t| (t * 37) % max_pos as u32)
            .collect();
        let slots: Vec<u32> = (0..tokens as u32)
            .map(|t| (t * 7 + 3) % slots_total as u32)
            .collect();
        let width = kv_heads * head_dim;
        let mut q = F::round_trip(&fill(tokens * heads * head_dim, 31));
        let mut k = F::round_trip(&fill(tokens * width, 32));
        let v = F::round_trip(&fill(tokens * width, 33));
        let mut kc = F::round_trip(&fill(slots_total * width, 34));
        let mut vc = F::round_trip(&fill(slots_total * width, 35));
        let (qh, kch, vch) = (
            upload::<F>(&c, &q),
            upload::<F>(&c, &kc),
            upload::<F>(&c, &vc),
        );
        let to = |v: &[f32]| c.create_from_slice(f32::as_bytes(v));
        let u32s = |v: &[u32]| c.create_from_slice(u32::as_bytes(v));
        let step = Step {
            q: &qh,
            k: &upload::<F>(&c, &k),
            v: &upload::<F>(&c, &v),
            positions: &u32s(&positions),
            slots: &u32s(&slots),
            tokens,
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
        let eq = rel_err(&read::<F>(&c, qh), &q);
        let ek = rel_err(&read::<F>(&c, kch), &kc);
        assert!(eq < tol && ek < tol, "{}: q {eq} k cache {ek}", F::NAME);
        assert_eq!(read::<F>(&c, vch), vc, "{}: v cache", F::NAME);
    }

    #[test]
    fn matches_reference() {
        check::<f32>(5, 9, 3, 64, 1e-6);
        check::<f32>(1, 4, 4, 128, 1e-6);
        check::<half::f16>(7, 14, 2, 64, 2e-3);
    }
}
