//! Tiny random Llama / Qwen2 / Qwen3 models made with HF transformers
//! (scripts/make_tiny_models.py): kiln's f32 logits against transformers', prefill and decode.

mod common;

use burn::backend::Flex;
use burn::tensor::DType;
use kiln::loader::open_model;
use kiln::models::llama::Llama;
use kiln::ops::attention::ReferenceAttention;
use kiln::ops::kv_cache::KvCache;
use kiln::runner::batch::Batch;

type B = Flex;
const BLOCK: usize = 4;
/// Non-contiguous, out of order: attention must follow the block table.
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
    let device = Default::default();
    let model = Llama::<B>::load(&files.weights, &files.config, 64, DType::F32, &device).unwrap();
    let c = &files.config;
    let mut cache = KvCache::<B>::new(
        c.num_layers,
        8,
        BLOCK,
        c.num_kv_heads,
        c.head_dim,
        DType::F32,
        &device,
    );

    // Prefill the first 7 tokens (a ragged block), logits for every position.
    let prefill = 7;
    let mut batch = Batch::default();
    batch.push_seq(&prompt[..prefill], prefill, &BLOCK_TABLE, BLOCK, true);
    batch.logit_indices = (0..prefill).collect();
    let logits = model.forward(&batch, &mut cache, &ReferenceAttention);
    let got: Vec<f32> = logits.into_data().to_vec().unwrap();
    let vocab = c.vocab_size;
    for (i, row) in got.chunks_exact(vocab).enumerate() {
        let e = rel_err(row, &expected[i]);
        assert!(e < 1e-4, "{name}: prefill position {i}: relative error {e}");
    }
    // Then decode the rest one token at a time through the cache.
    for pos in prefill..prompt.len() {
        let mut batch = Batch::default();
        batch.push_seq(&prompt[pos..=pos], pos + 1, &BLOCK_TABLE, BLOCK, true);
        let got: Vec<f32> = model
            .forward(&batch, &mut cache, &ReferenceAttention)
            .into_data()
            .to_vec()
            .unwrap();
        let e = rel_err(&got, &expected[pos]);
        assert!(
            e < 1e-4,
            "{name}: decode position {pos}: relative error {e}"
        );
    }
}

#[test]
fn llama_sharded_f32_llama3_rope() {
    check("llama");
}

#[test]
fn qwen2_bf16_bias_tied() {
    check("qwen2");
}

#[test]
fn qwen3_f16_qk_norm() {
    check("qwen3");
}
