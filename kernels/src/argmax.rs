//! Greedy sampling on the device: the index of each logits row's maximum (the first one on
//! ties), so only one u32 per sequence crosses to the host.

use cubecl::prelude::*;
use cubecl::server::Handle;

const THREADS: u32 = 256;
const MAX_PLANES: usize = 64;

#[cube(launch)]
fn argmax_kernel<F: Float>(logits: &Array<F>, out: &mut Array<u32>, vocab: usize) {
    let row = CUBE_POS * vocab;
    let mut best = f32::new(-3.0e38);
    let mut best_i = vocab;
    let mut i = UNIT_POS as usize;
    while i < vocab {
        let v = f32::cast_from(logits[row + i]);
        if v > best {
            best = v;
            best_i = i;
        }
        i += CUBE_DIM as usize;
    }
    // Max over the cube, then the smallest index holding it.
    let mut vals = SharedMemory::<f32>::new(MAX_PLANES);
    let mut idxs = SharedMemory::<u32>::new(MAX_PLANES);
    let m = plane_max(best);
    let cand = if best == m {
        best_i as u32
    } else {
        vocab as u32
    };
    let first = plane_min(cand);
    let plane = (UNIT_POS / PLANE_DIM) as usize;
    if UNIT_POS_PLANE == 0 {
        vals[plane] = m;
        idxs[plane] = first;
    }
    sync_cube();
    if UNIT_POS == 0 {
        let mut bv = vals[0];
        let mut bi = idxs[0];
        for p in 1..(CUBE_DIM / PLANE_DIM) as usize {
            if vals[p] > bv || (vals[p] == bv && idxs[p] < bi) {
                bv = vals[p];
                bi = idxs[p];
            }
        }
        out[CUBE_POS] = bi;
    }
}

/// Row-wise argmax of `rows` × `vocab` logits into `out` (u32 per row).
pub fn launch<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    logits: &Handle,
    out: &Handle,
    rows: usize,
    vocab: usize,
) {
    unsafe {
        argmax_kernel::launch::<F, R>(
            client,
            CubeCount::Static(rows as u32, 1, 1),
            CubeDim::new_1d(THREADS),
            ArrayArg::from_raw_parts(logits.clone(), rows * vocab),
            ArrayArg::from_raw_parts(out.clone(), rows),
            vocab,
        );
    }
}

/// The plain reference.
pub fn reference(logits: &[f32], vocab: usize) -> Vec<u32> {
    logits
        .chunks(vocab)
        .map(|row| {
            let mut best = 0;
            for (i, &v) in row.iter().enumerate() {
                if v > row[best] {
                    best = i;
                }
            }
            best as u32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{client, fill, upload, Elem};

    #[test]
    fn finds_first_maximum() {
        let c = client();
        let vocab = 49_152 + 7;
        let mut logits = fill(4 * vocab, 61);
        logits[vocab + 1000] = 5.0; // row 1: a clear winner
        logits[2 * vocab + 10] = 5.0; // row 2: a tie, the first wins
        logits[2 * vocab + 20_000] = 5.0;
        logits[4 * vocab - 1] = 7.0; // row 3: the last element
        let out = c.create_from_slice(u32::as_bytes(&[u32::MAX; 4]));
        launch::<_, f32>(&c, &upload::<f32>(&c, &logits), &out, 4, vocab);
        let got = u32::from_bytes(&c.read_one_unchecked(out)).to_vec();
        assert_eq!(got, reference(&f32::round_trip(&logits), vocab));
        assert_eq!(&got[1..], &[1000, 10, (vocab - 1) as u32]);
    }
}
