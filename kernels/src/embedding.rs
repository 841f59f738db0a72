//! Embedding gather: row `ids[t]` of the table `[vocab, hidden]` into row `t` of the output.

use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::vector::vector_size;

const THREADS: u32 = 256;

#[cube(launch)]
fn embedding_kernel<F: Float, N: Size>(
    table: &Array<Vector<F, N>>,
    ids: &Array<u32>,
    out: &mut Array<Vector<F, N>>,
    width: usize,
    total: usize,
) {
    let i = ABSOLUTE_POS;
    if i < total {
        out[i] = table[ids[i / width] as usize * width + i % width];
    }
}

/// Gathers `tokens` rows of `hidden` elements.
pub fn launch<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    table: &Handle,
    ids: &Handle,
    out: &Handle,
    tokens: usize,
    hidden: usize,
) {
    let vs = vector_size(client, size_of::<F>(), hidden);
    let total = tokens * hidden / vs;
    let table_len = table.size() as usize / size_of::<F>() / vs;
    unsafe {
        embedding_kernel::launch::<F, R>(
            client,
            CubeCount::Static(total.div_ceil(THREADS as usize) as u32, 1, 1),
            CubeDim::new_1d(THREADS),
            vs,
            ArrayArg::from_raw_parts(table.clone(), table_len),
            ArrayArg::from_raw_parts(ids.clone(), tokens),
            ArrayArg::from_raw_parts(out.clone(), total),
            hidden / vs,
            total,
        );
    }
}

/// The plain reference.
pub fn reference(table: &[f32], ids: &[u32], hidden: usize) -> Vec<f32> {
    ids.iter()
        .flat_map(|&i| table[i as usize * hidden..][..hidden].iter().copied())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{client, fill, read, upload, Elem};

    #[test]
    fn gathers_rows() {
        let c = client();
        let (vocab, hidden) = (50, 96);
        let table = f32::round_trip(&fill(vocab * hidden, 51));
        let ids: Vec<u32> = vec![3, 49, 0, 3, 17];
        let out = upload::<f32>(&c, &vec![f32::NAN; ids.len() * hidden]);
        let ih = c.create_from_slice(u32::as_bytes(&ids));
        launch::<_, f32>(&c, &upload::<f32>(&c, &table), &ih, &out, ids.len(), hidden);
        assert_eq!(read::<f32>(&c, out), reference(&table, &ids, hidden));
    }
}
