//! Prefill GEMM, `y[m, n] = x[m, k] · w[n, k]ᵀ`, for batches past the GEMV's sweet spot: launched
//! through cubek's matmul (CubeCL's kernel library). Its warp-specialized TMA kernel on `mma`
//! measured fastest of cubek's tensor-core strategies on every projection shape tried on the
//! H100 (decode batches of 16–64 rows and 2048-row prefill chunks: benches/RESULTS.md, 2.3–4×
//! cubek's `Auto`); devices without TMA take the tiled kernel on `cmma`, and those without
//! tensor cores (the CPU CI) a unit-tiled kernel. f32 always takes the unit-tiled kernel:
//! cubek's tensor-core kernels stage f32 operands as TF32 (10-bit mantissa), and f32 is asked
//! for to get f32 products (torch's default too: `allow_tf32` is off for matmuls). The weight
//! stays in its HF `[out, in]` layout: the right-hand side is its transposed view.

use cubecl::prelude::*;
use cubecl::server::Handle;
use cubek_matmul::components::tile::TileMatmulKind;
use cubek_matmul::definition::{MatmulElems, MatmulGlobalElems};
use cubek_matmul::launch::launch_ref;
pub use cubek_matmul::launch::Strategy;
use cubek_matmul::routines::double_buffering::DoubleBufferingArgs;
use cubek_matmul::routines::ordered_double_buffering::OrderedSelectionArgs;
use cubek_matmul::routines::simple::SimpleArgs;
use cubek_matmul::routines::BlueprintStrategy;
use cubek_std::InputBinding;

/// `y` `[m, n]` = `x` `[m, k]` · `w` `[n, k]`ᵀ; `Err` names why no kernel could be set up.
#[allow(clippy::too_many_arguments)]
pub fn launch<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    x: &Handle,
    w: &Handle,
    y: &Handle,
    m: usize,
    n: usize,
    k: usize,
) -> Result<(), String> {
    let f32_type = f32::as_type_native_unchecked().storage_type();
    let preferred = if F::as_type_native_unchecked().storage_type() == f32_type {
        vec![Strategy::SimpleUnit(Default::default())]
    } else {
        vec![
            Strategy::SpecializedTmaMma(BlueprintStrategy::Inferred(().into())),
            Strategy::SimpleCyclicCmma(Default::default()),
            Strategy::SimpleUnit(Default::default()),
        ]
    };
    // The first that sets up wins; cubek's own `Auto` does the same but panics where none does.
    let mut why = Vec::new();
    for strategy in &preferred {
        match launch_with::<R, F>(client, strategy, x, w, y, m, n, k) {
            Ok(()) => return Ok(()),
            Err(e) => why.push(format!("{strategy}: {e}")),
        }
    }
    Err(why.join("; "))
}

/// cubek's tensor-core strategies worth comparing on a device, by name (the accelerated set
/// Burn's matmul autotuner tries, with the same arguments).
pub fn candidates() -> Vec<(&'static str, Strategy)> {
    let args = |multi_rows, tile_matmul| SimpleArgs {
        multi_rows,
        tile_matmul,
    };
    let simple =
        |multi_rows, tile_matmul| BlueprintStrategy::Inferred(args(multi_rows, tile_matmul));
    let ordered = |row_count, tile_matmul| {
        BlueprintStrategy::Inferred(OrderedSelectionArgs {
            partition_k: Some(2),
            row_count: Some(row_count),
            rows_per_plane: Some(2),
            tile_matmul,
        })
    };
    let double = |specialized, tile_matmul| {
        BlueprintStrategy::Inferred(DoubleBufferingArgs {
            specialized,
            tile_matmul,
        })
    };
    let (cmma, mma) = (TileMatmulKind::Cmma, TileMatmulKind::Mma);
    vec![
        (
            "simple_cyclic_cmma",
            Strategy::SimpleCyclicCmma(simple(false, cmma)),
        ),
        (
            "simple_cyclic_mma",
            Strategy::SimpleCyclicMma(simple(false, mma)),
        ),
        (
            "simple_cyclic_mma_multirow",
            Strategy::SimpleCyclicMma(simple(true, mma)),
        ),
        (
            "ordered_double_mma_r4",
            Strategy::OrderedDoubleMma(ordered(4, mma)),
        ),
        (
            "ordered_double_mma_r8",
            Strategy::OrderedDoubleMma(ordered(8, mma)),
        ),
        (
            "ordered_double_cmma_r8",
            Strategy::OrderedDoubleCmma(ordered(8, cmma)),
        ),
        (
            "double_cyclic_mma",
            Strategy::DoubleCyclicMma(double(false, mma)),
        ),
        (
            "double_cyclic_mma_specialized",
            Strategy::DoubleCyclicMma(double(true, mma)),
        ),
        (
            "specialized_cyclic_mma",
            Strategy::SpecializedCyclicMma(BlueprintStrategy::Inferred(().into())),
        ),
        (
            "simple_tma_mma",
            Strategy::SimpleTmaMma(BlueprintStrategy::Inferred(args(false, mma))),
        ),
        (
            "simple_tma_mma_multirow",
            Strategy::SimpleTmaMma(BlueprintStrategy::Inferred(args(true, mma))),
        ),
        (
            "specialized_tma_mma",
            Strategy::SpecializedTmaMma(BlueprintStrategy::Inferred(().into())),
        ),
    ]
}

/// [`launch`] with a chosen cubek strategy.
#[allow(clippy::too_many_arguments)]
pub fn launch_with<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    strategy: &Strategy,
    x: &Handle,
    w: &Handle,
    y: &Handle,
    m: usize,
    n: usize,
    k: usize,
) -> Result<(), String> {
    let dtype = F::as_type_native_unchecked().storage_type();
    // SAFETY: each view covers exactly its buffer: x and y row-major, w read transposed.
    let (lhs, rhs, out) = unsafe {
        (
            TensorBinding::<R>::from_raw_parts(x.clone(), [k, 1].into(), [m, k].into()),
            TensorBinding::<R>::from_raw_parts(w.clone(), [1, k].into(), [k, n].into()),
            TensorBinding::<R>::from_raw_parts(y.clone(), [n, 1].into(), [m, n].into()),
        )
    };
    let mut dtypes = MatmulElems::from_globals(&MatmulGlobalElems {
        lhs: dtype,
        rhs: dtype,
        out: dtype,
    });
    launch_ref(
        strategy,
        client,
        InputBinding::new(lhs, dtype),
        InputBinding::new(rhs, dtype),
        out,
        &mut dtypes,
    )
    .map_err(|e| format!("{e:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gemv;
    use crate::test_util::{client, fill, read, rel_err, upload, Elem};

    fn check<F: Elem>(m: usize, n: usize, k: usize, tol: f64) {
        let c = client();
        let x = fill(m * k, 71);
        let w = fill(n * k, 72);
        let y = upload::<F>(&c, &vec![f32::NAN; m * n]);
        launch::<_, F>(&c, &upload::<F>(&c, &x), &upload::<F>(&c, &w), &y, m, n, k).unwrap();
        let expected = gemv::reference(&F::round_trip(&x), &F::round_trip(&w), None, m, n, k);
        let e = rel_err(&read::<F>(&c, y), &expected);
        assert!(e < tol, "{} m {m} n {n} k {k}: rel err {e}", F::NAME);
    }

    #[test]
    fn matches_reference_including_ragged() {
        check::<f32>(64, 96, 128, 1e-5);
        check::<f32>(37, 50, 72, 1e-5);
        check::<half::f16>(40, 64, 256, 3e-3);
    }
}
