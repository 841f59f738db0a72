//! The forward on kiln's CubeCL kernels (the CUDA engine's path), run through wgpu: the tiny HF
//! models' logits against transformers', prefill then decode through the paged cache.

mod common;

use cubecl::wgpu::{WgpuDevice, WgpuRuntime};
use cubecl::Runtime;
use kiln::loader::open_model;
use kiln::models::llama_kernels::KernelLlama;
use kiln::runner::batch::Batch;
use kiln::runner::Forward;

const BLOCK: usize = 4;
const BLOCK_TABLE: [u32; 4] = [5, 1, 6, 3];

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn check(name: &str) {
    let dir = common::fixture(&format!("tiny/{name}"));
    let fixture = common::read_json(&format!("tiny/{name}/logits.json"));
    let prompt: Vec<u32> = fixture["prompt"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let expected: Vec<Vec<f32>> = fixture["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect()
        })
        .collect();
    let files = open_model(&dir).unwrap();
    let client = WgpuRuntime::client(&WgpuDevice::default());
    let mut model =
        KernelLlama::<WgpuRuntime, f32>::load(client, &files.weights, &files.config, 64, 8, BLOCK)
            .unwrap();
    let vocab = files.config.vocab_size;

    let prefill = 7;
    let mut batch = Batch::default();
    batch.push_seq(&prompt[..prefill], prefill, &BLOCK_TABLE, BLOCK, true);
    batch.logit_indices = (0..prefill).collect();
    let got = model.forward(&batch).unwrap();
    for (i, row) in got.chunks_exact(vocab).enumerate() {
        let e = rel_err(row, &expected[i]);
        assert!(e < 1e-4, "{name}: prefill position {i}: relative error {e}");
    }
    for pos in prefill..prompt.len() {
        let mut batch = Batch::default();
        batch.push_seq(&prompt[pos..=pos], pos + 1, &BLOCK_TABLE, BLOCK, true);
        let got = model.forward(&batch).unwrap();
        let e = rel_err(&got, &expected[pos]);
        assert!(
            e < 1e-4,
            "{name}: decode position {pos}: relative error {e}"
        );
    }
}

#[test]
fn llama_on_kernels() {
    check("llama");
}

#[test]
fn qwen2_on_kernels() {
    check("qwen2");
}

#[test]
fn qwen3_on_kernels() {
    check("qwen3");
}
