//! Prefill GEMM, `y[m, n] = x[m, k] · w[n, k]ᵀ`, for batches past the GEMV's sweet spot: launched
//! through cubek's matmul (CubeCL's kernel library) with its `Auto` strategy — tiled on tensor
//! cores (`cmma`) where the device has them, a unit-tiled kernel elsewhere. The weight stays in
//! its HF `[out, in]` layout: the right-hand side is its transposed view.

use cubecl::prelude::*;
use cubecl::server::Handle;
use cubek_matmul::definition::{MatmulElems, MatmulGlobalElems};
use cubek_matmul::launch::{launch_ref, Strategy};
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
        &Strategy::Auto,
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
