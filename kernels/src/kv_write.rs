//! Writes the step's K and V (`[tokens, kv_heads · head_dim]`) into the paged pool
//! (`[slots, kv_heads · head_dim]`) at each token's slot (the slot mapping).

use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::vector::vector_size;

const THREADS: u32 = 256;

#[cube(launch)]
fn kv_write_kernel<F: Float, N: Size>(
    k: &Array<Vector<F, N>>,
    v: &Array<Vector<F, N>>,
    k_cache: &mut Array<Vector<F, N>>,
    v_cache: &mut Array<Vector<F, N>>,
    slots: &Array<u32>,
    width: usize,
    total: usize,
) {
    let i = ABSOLUTE_POS;
    if i < total {
        let t = i / width;
        let dst = slots[t] as usize * width + i % width;
        k_cache[dst] = k[i];
        v_cache[dst] = v[i];
    }
}

/// Copies `tokens` rows of `width` elements of `k`/`v` into row `slots[t]` of the caches.
#[allow(clippy::too_many_arguments)]
pub fn launch<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    k: &Handle,
    v: &Handle,
    k_cache: &Handle,
    v_cache: &Handle,
    slots: &Handle,
    tokens: usize,
    width: usize,
) {
    let vs = vector_size(client, size_of::<F>(), width);
    let total = tokens * width / vs;
    let cache_len = k_cache.size() as usize / size_of::<F>() / vs;
    unsafe {
        kv_write_kernel::launch::<F, R>(
            client,
            CubeCount::Static(total.div_ceil(THREADS as usize) as u32, 1, 1),
            CubeDim::new_1d(THREADS),
            vs,
            ArrayArg::from_raw_parts(k.clone(), total),
            ArrayArg::from_raw_parts(v.clone(), total),
            ArrayArg::from_raw_parts(k_cache.clone(), cache_len),
            ArrayArg::from_raw_parts(v_cache.clone(), cache_len),
            ArrayArg::from_raw_parts(slots.clone(), tokens),
            width / vs,
            total,
        );
    }
}

/// The plain reference.
pub fn reference(src: &[f32], cache: &mut [f32], slots: &[u32], width: usize) {
    for (t, &s) in slots.iter().enumerate() {
        cache[s as usize * width..][..width].copy_from_slice(&src[t * width..][..width]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{client, fill, read, upload, Elem};

    fn check<F: Elem>(tokens: usize, width: usize, slots_total: usize) {
        let c = client();
        let k = F::round_trip(&fill(tokens * width, 41));
        let v = F::round_trip(&fill(tokens * width, 42));
        let mut kc = F::round_trip(&fill(slots_total * width, 43));
        let mut vc = F::round_trip(&fill(slots_total * width, 44));
        let slots: Vec<u32> = (0..tokens as u32)
            .map(|t| (t * 7 + 3) % slots_total as u32)
            .collect();
        let (kch, vch) = (upload::<F>(&c, &kc), upload::<F>(&c, &vc));
        let sh = c.create_from_slice(u32::as_bytes(&slots));
        launch::<_, F>(
            &c,
            &upload::<F>(&c, &k),
            &upload::<F>(&c, &v),
            &kch,
            &vch,
            &sh,
            tokens,
            width,
        );
        reference(&k, &mut kc, &slots, width);
        reference(&v, &mut vc, &slots, width);
        assert_eq!(read::<F>(&c, kch), kc, "{} k", F::NAME);
        assert_eq!(read::<F>(&c, vch), vc, "{} v", F::NAME);
    }

    #[test]
    fn rows_land_in_their_slots() {
        check::<f32>(5, 192, 16);
        check::<f32>(3, 10, 8);
        check::<half::f16>(9, 256, 64);
    }
}
