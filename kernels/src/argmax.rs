//! Greedy sampling on the device: the index of each logits row's maximum (the first one on
//! ties), so only one u32 per sequence crosses to the host.

use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::vector::vector_size;

/// Units per row at most: a row (128k logits) is one cube's work, so the whole cube's loads
/// in flight are what hides their latency.
const MAX_THREADS: u32 = 1024;
const MAX_PLANES: usize = 64;
/// Vector loads in flight per unit.
const IN_FLIGHT: usize = 4;

/// Keeps `v` (logit `at`) if it beats `best`: a unit visits its logits in increasing index
/// order, so a strict comparison keeps the first of equals.
#[cube]
fn keep_max(v: f32, at: usize, best: &mut f32, best_i: &mut usize) {
    if v > *best {
        *best = v;
        *best_i = at;
    }
}

#[cube(launch_unchecked)]
fn argmax_kernel<F: Float, N: Size>(
    logits: &Array<Vector<F, N>>,
    out: &mut Array<u32>,
    row_vecs: usize,
) {
    let row = CUBE_POS * row_vecs;
    let vocab = row_vecs * N::value();
    let step = CUBE_DIM as usize;
    let mut best = f32::new(-3.0e38);
    let mut best_i = vocab;
    let mut i = UNIT_POS as usize;
    // `IN_FLIGHT` loads out before the first comparison needs one.
    while i + (IN_FLIGHT - 1) * step < row_vecs {
        let mut vs = Array::<Vector<F, N>>::new(IN_FLIGHT);
        #[unroll]
        for j in 0..IN_FLIGHT {
            vs[j] = logits[row + i + j * step];
        }
        #[unroll]
        for j in 0..IN_FLIGHT {
            #[unroll]
            for e in 0..N::value() {
                let at = (i + j * step) * N::value() + e;
                keep_max(f32::cast_from(vs[j][e]), at, &mut best, &mut best_i);
            }
        }
        i += IN_FLIGHT * step;
    }
    while i < row_vecs {
        let v = logits[row + i];
        #[unroll]
        for e in 0..N::value() {
            keep_max(
                f32::cast_from(v[e]),
                i * N::value() + e,
                &mut best,
                &mut best_i,
            );
        }
        i += step;
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

/// Row-wise argmax of `rows` × `vocab` logits into `out` (u32 per row): one cube a row.
pub fn launch<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    logits: &Handle,
    out: &Handle,
    rows: usize,
    vocab: usize,
) {
    let v = vector_size(client, size_of::<F>(), vocab);
    let hw = &client.properties().hardware;
    let threads = MAX_THREADS
        .min(hw.max_units_per_cube)
        .min(MAX_PLANES as u32 * hw.plane_size_min);
    // Every index stays below rows × vocab by construction (compute-sanitizer checks it on
    // the GPU), so the launch skips CubeCL's per-access bounds checks.
    unsafe {
        argmax_kernel::launch_unchecked::<F, R>(
            client,
            CubeCount::Static(rows as u32, 1, 1),
            CubeDim::new_1d(threads),
            v,
            ArrayArg::from_raw_parts(logits.clone(), rows * vocab / v),
            ArrayArg::from_raw_parts(out.clone(), rows),
            vocab / v,
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

    /// Rows with a clear winner, ties (within one vector and across units: the first wins)
    /// and the last element, at a vocabulary of scalar loads and one of vector loads.
    #[test]
    fn finds_first_maximum() {
        let c = client();
        for vocab in [49_152 + 7, 32_768 + 8] {
            let mut logits = fill(5 * vocab, 61);
            logits[vocab + 1000] = 5.0; // row 1: a clear winner
            logits[2 * vocab + 10] = 5.0; // row 2: a tie, the first wins
            logits[2 * vocab + 20_000] = 5.0;
            logits[4 * vocab - 1] = 7.0; // row 3: the last element
            logits[4 * vocab + 17] = 6.0; // row 4: a tie inside one vector
            logits[4 * vocab + 18] = 6.0;
            let out = c.create_from_slice(u32::as_bytes(&[u32::MAX; 5]));
            launch::<_, f32>(&c, &upload::<f32>(&c, &logits), &out, 5, vocab);
            let got = u32::from_bytes(&c.read_one_unchecked(out)).to_vec();
            assert_eq!(got, reference(&f32::round_trip(&logits), vocab));
            assert_eq!(&got[1..], &[1000, 10, (vocab - 1) as u32, 17]);
        }
    }
}
