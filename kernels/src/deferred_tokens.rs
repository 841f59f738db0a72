//! Input tokens chosen on the device by the previous step: `ids[at[i]] = previous[rows[i]]`.
//! With it the engine queues step n+1 before step n's greedy tokens have reached the host, so
//! the GPU never idles while the host reads and streams them.

use cubecl::prelude::*;
use cubecl::server::Handle;

const THREADS: u32 = 64;

#[cube(launch)]
fn fill_kernel(ids: &mut Array<u32>, at: &Array<u32>, rows: &Array<u32>, previous: &Array<u32>) {
    let i = ABSOLUTE_POS;
    if i < at.len() {
        let slot = at[i] as usize;
        ids[slot] = previous[rows[i] as usize];
    }
}

/// Writes `previous[rows[i]]` into `ids[at[i]]` for each of the `count` pairs (u32 buffers).
pub fn launch<R: Runtime>(
    client: &ComputeClient<R>,
    ids: &Handle,
    at: &Handle,
    rows: &Handle,
    previous: &Handle,
    count: usize,
) {
    let len = |h: &Handle| h.size() as usize / size_of::<u32>();
    unsafe {
        fill_kernel::launch::<R>(
            client,
            CubeCount::Static(count.div_ceil(THREADS as usize) as u32, 1, 1),
            CubeDim::new_1d(THREADS),
            ArrayArg::from_raw_parts(ids.clone(), len(ids)),
            ArrayArg::from_raw_parts(at.clone(), count),
            ArrayArg::from_raw_parts(rows.clone(), count),
            ArrayArg::from_raw_parts(previous.clone(), len(previous)),
        );
    }
}

/// The plain reference.
pub fn reference(ids: &[u32], at: &[u32], rows: &[u32], previous: &[u32]) -> Vec<u32> {
    let mut out = ids.to_vec();
    for (&a, &r) in at.iter().zip(rows) {
        out[a as usize] = previous[r as usize];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::client;

    #[test]
    fn fills_the_deferred_slots() {
        let c = client();
        // Five tokens: a 3-token prompt chunk and two decodes whose inputs are the previous
        // step's rows 2 and 0 (out of order, as after a sequence left the batch).
        let ids = [11u32, 12, 13, u32::MAX, u32::MAX];
        let (at, rows, previous) = ([4u32, 3], [0u32, 2], [900u32, 901, 902]);
        let up = |v: &[u32]| c.create_from_slice(u32::as_bytes(v));
        let ih = up(&ids);
        launch(&c, &ih, &up(&at), &up(&rows), &up(&previous), at.len());
        let got = u32::from_bytes(&c.read_one_unchecked(ih)).to_vec();
        assert_eq!(got, reference(&ids, &at, &rows, &previous));
        assert_eq!(got, [11, 12, 13, 902, 900]);
    }
}
