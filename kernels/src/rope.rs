//! Rotary position embedding, rotate-half form (HF's; kiln un-permutes GGUF's interleaved Q/K at
//! load), applied in place to Q `[tokens, heads, head_dim]` and K `[tokens, kv_heads, head_dim]`
//! from an f32 cos/sin table `[max_pos, head_dim / 2]` (any scaling is baked into the table).

use cubecl::prelude::*;
use cubecl::server::Handle;

const THREADS: u32 = 256;

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn rope_kernel<F: Float>(
    q: &mut Array<F>,
    k: &mut Array<F>,
    positions: &Array<u32>,
    cos: &Array<f32>,
    sin: &Array<f32>,
    tokens: usize,
    heads: usize,
    kv_heads: usize,
    half: usize,
) {
    // One unit per (token, head of Q then K, pair i).
    let i = ABSOLUTE_POS % half;
    let th = ABSOLUTE_POS / half;
    let all_heads = heads + kv_heads;
    if th >= tokens * all_heads {
        terminate!();
    }
    let t = th / all_heads;
    let h = th % all_heads;
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
        let base = (t * kv_heads + h - heads) * 2 * half;
        let x1 = f32::cast_from(k[base + i]);
        let x2 = f32::cast_from(k[base + half + i]);
        k[base + i] = F::cast_from(x1 * c - x2 * s);
        k[base + half + i] = F::cast_from(x2 * c + x1 * s);
    }
}

/// Rotates `q` and `k` of `tokens` tokens in place by the table rows of `positions` (u32).
#[allow(clippy::too_many_arguments)]
pub fn launch<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    q: &Handle,
    k: &Handle,
    positions: &Handle,
    cos: &Handle,
    sin: &Handle,
    tokens: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
) {
    let half = head_dim / 2;
    let units = tokens * (heads + kv_heads) * half;
    let table = cos.size() as usize / 4;
    unsafe {
        rope_kernel::launch::<F, R>(
            client,
            CubeCount::Static(units.div_ceil(THREADS as usize) as u32, 1, 1),
            CubeDim::new_1d(THREADS),
            ArrayArg::from_raw_parts(q.clone(), tokens * heads * head_dim),
            ArrayArg::from_raw_parts(k.clone(), tokens * kv_heads * head_dim),
            ArrayArg::from_raw_parts(positions.clone(), tokens),
            ArrayArg::from_raw_parts(cos.clone(), table),
            ArrayArg::from_raw_parts(sin.clone(), table),
            tokens,
            heads,
            kv_heads,
            half,
        );
    }
}

/// The plain reference: rotates `x` (`[tokens, heads, head_dim]`) in place.
pub fn reference(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{client, fill, read, rel_err, upload, Elem};

    fn check<F: Elem>(tokens: usize, heads: usize, kv_heads: usize, head_dim: usize, tol: f64) {
        let c = client();
        let half = head_dim / 2;
        let max_pos = 300;
        let angles: Vec<f32> = (0..max_pos * half)
            .map(|j| (j / half) as f32 * 10000f32.powf(-((j % half) as f32) / half as f32))
            .collect();
        let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
        let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
        let positions: Vec<u32> = (0..tokens as u32)
            .map(|t| (t * 37) % max_pos as u32)
            .collect();
        let mut q = F::round_trip(&fill(tokens * heads * head_dim, 31));
        let mut k = F::round_trip(&fill(tokens * kv_heads * head_dim, 32));
        let (qh, kh) = (upload::<F>(&c, &q), upload::<F>(&c, &k));
        let to = |v: &[f32]| c.create_from_slice(f32::as_bytes(v));
        let ph = c.create_from_slice(u32::as_bytes(&positions));
        launch::<_, F>(
            &c,
            &qh,
            &kh,
            &ph,
            &to(&cos),
            &to(&sin),
            tokens,
            heads,
            kv_heads,
            head_dim,
        );
        reference(&mut q, &positions, &cos, &sin, heads, head_dim);
        reference(&mut k, &positions, &cos, &sin, kv_heads, head_dim);
        let (eq, ek) = (
            rel_err(&read::<F>(&c, qh), &q),
            rel_err(&read::<F>(&c, kh), &k),
        );
        assert!(eq < tol && ek < tol, "{}: q {eq} k {ek}", F::NAME);
    }

    #[test]
    fn matches_reference() {
        check::<f32>(5, 9, 3, 64, 1e-6);
        check::<f32>(1, 4, 4, 128, 1e-6);
        check::<half::f16>(7, 14, 2, 64, 2e-3);
    }
}
