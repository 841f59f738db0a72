//! Tiny random Llama / Qwen2 / Qwen3 models made with HF transformers
//! (scripts/make_tiny_models.py): kiln's f32 logits (Burn reference forward) against
//! transformers', prefill and decode.

mod common;

use burn::backend::Flex;
use burn::tensor::DType;
use kiln::loader::open_model;
use kiln::models::llama::Llama;
use kiln::ops::attention::ReferenceAttention;
use kiln::ops::kv_cache::KvCache;

fn check(name: &str) {
    let files = open_model(&common::fixture(&format!("tiny/{name}"))).unwrap();
    let device = Default::default();
    let model =
        Llama::<Flex>::load(&files.weights, &files.config, 64, DType::F32, &device).unwrap();
    let c = &files.config;
    let mut cache = KvCache::<Flex>::new(
        c.num_layers,
        common::TINY_NUM_BLOCKS,
        common::TINY_BLOCK,
        c.num_kv_heads,
        c.head_dim,
        DType::F32,
        &device,
    );
    common::check_tiny_logits(name, |batch| {
        let logits = model.forward(batch, &mut cache, &ReferenceAttention);
        logits.into_data().to_vec().unwrap()
    });
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
