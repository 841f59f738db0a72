//! Rotary position embedding (rotate-half form), with Llama 3 and per-frequency scaling.

use burn::tensor::{backend::Backend, DType, Int, Tensor, TensorData};

use crate::models::config::{Config, RopeScaling};

/// cos/sin tables for positions `0..max_positions`, `[max_positions, head_dim / 2]` each.
pub struct Rope<B: Backend> {
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
}

/// The rotation frequency of each dimension pair, after scaling.
fn inv_freqs(config: &Config) -> Vec<f64> {
    let d = config.head_dim;
    (0..d / 2)
        .map(|i| {
            let f = config.rope_theta.powf(-((2 * i) as f64) / d as f64);
            match &config.rope_scaling {
                None => f,
                Some(RopeScaling::FreqFactors(factors)) => {
                    f / factors.get(i).copied().unwrap_or(1.0) as f64
                }
                Some(RopeScaling::Llama3 {
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position,
                }) => {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    let low_wavelen = original_max_position / low_freq_factor;
                    let high_wavelen = original_max_position / high_freq_factor;
                    if wavelen > low_wavelen {
                        f / factor
                    } else if wavelen < high_wavelen {
                        f
                    } else {
                        let smooth = (original_max_position / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                }
            }
        })
        .collect()
}

/// Row-major `[max_positions, head_dim / 2]` cos and sin tables of the scaled frequencies.
pub fn cos_sin_tables(config: &Config, max_positions: usize) -> (Vec<f32>, Vec<f32>) {
    let freqs = inv_freqs(config);
    let mut cos = Vec::with_capacity(max_positions * freqs.len());
    let mut sin = Vec::with_capacity(max_positions * freqs.len());
    for p in 0..max_positions {
        for f in &freqs {
            // f32 angle, as HF computes it, so long positions round the same way.
            let angle = (p as f32 * *f as f32) as f64;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    (cos, sin)
}

impl<B: Backend> Rope<B> {
    pub fn new(config: &Config, max_positions: usize, device: &B::Device) -> Self {
        let half = config.head_dim / 2;
        let (cos, sin) = cos_sin_tables(config, max_positions);
        let table = |v: Vec<f32>| {
            Tensor::from_data(
                TensorData::new(v, [max_positions, half]),
                (device, DType::F32),
            )
        };
        Self {
            cos: table(cos),
            sin: table(sin),
        }
    }

    /// The cos/sin rows of `positions`, shaped `[tokens, 1, head_dim / 2]` to broadcast over heads.
    pub fn at(&self, positions: &Tensor<B, 1, Int>) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let pick = |t: &Tensor<B, 2>| t.clone().select(0, positions.clone()).unsqueeze_dim::<3>(1);
        (pick(&self.cos), pick(&self.sin))
    }
}

/// Rotates `x` (`[tokens, heads, head_dim]`) by the angles in `cos`/`sin`, in f32.
pub fn apply_rope<B: Backend>(
    x: Tensor<B, 3>,
    cos: &Tensor<B, 3>,
    sin: &Tensor<B, 3>,
) -> Tensor<B, 3> {
    let dtype = x.dtype();
    let [t, h, d] = x.dims();
    let x = x.cast(DType::F32);
    let x1 = x.clone().narrow(2, 0, d / 2);
    let x2 = x.narrow(2, d / 2, d / 2);
    let cos = cos.clone().expand([t, h, d / 2]);
    let sin = sin.clone().expand([t, h, d / 2]);
    let r1 = x1.clone().mul(cos.clone()).sub(x2.clone().mul(sin.clone()));
    let r2 = x2.mul(cos).add(x1.mul(sin));
    Tensor::cat(vec![r1, r2], 2).cast(dtype)
}
