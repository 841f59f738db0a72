//! Choosing the vector width of a kernel's loads and stores.

use cubecl::prelude::*;

/// Widest vector (elements) that divides `cols` and that the device loads in one go.
pub fn vector_size<R: Runtime>(client: &ComputeClient<R>, elem_bytes: usize, cols: usize) -> usize {
    client
        .io_optimized_vector_sizes(elem_bytes)
        .filter(|&v| cols.is_multiple_of(v))
        .max()
        .unwrap_or(1)
}
