//! RMSNorm over the last dimension, computed in f32 as HF does.

use burn::tensor::{backend::Backend, DType, Tensor};

/// `x / sqrt(mean(x²) + eps) · weight`, with `weight` broadcast over the last dimension.
pub fn rms_norm<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: &Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, D> {
    let dtype = x.dtype();
    let x = x.cast(DType::F32);
    let rms = x
        .clone()
        .powi_scalar(2)
        .mean_dim(D - 1)
        .add_scalar(eps)
        .sqrt();
    let normed = x.div(rms).cast(dtype);
    let mut shape = [1usize; D];
    shape[D - 1] = weight.dims()[0];
    normed.mul(weight.clone().reshape(shape))
}
