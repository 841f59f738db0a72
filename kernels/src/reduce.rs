//! Reduction across a cube: each plane reduces with plane ops (any `PLANE_DIM`), then the
//! planes' partials meet in shared memory.

use cubecl::prelude::*;

/// Sum of `x` over every unit of the cube; every unit gets the result.
/// `max_planes` bounds `CUBE_DIM / PLANE_DIM` (it sizes the shared memory).
#[cube]
pub fn cube_sum(x: f32, #[comptime] max_planes: usize) -> f32 {
    let mut partials = SharedMemory::<f32>::new(max_planes);
    let plane_total = plane_sum(x);
    let plane = (UNIT_POS / PLANE_DIM) as usize;
    if UNIT_POS_PLANE == 0 {
        partials[plane] = plane_total;
    }
    sync_cube();
    let num_planes = (CUBE_DIM / PLANE_DIM) as usize;
    let mut total = f32::new(0.0);
    for p in 0..num_planes {
        total += partials[p];
    }
    // Keep the partials alive until every unit has read them (a later call reuses them).
    sync_cube();
    total
}
