//! The forward on kiln's CubeCL kernels (the CUDA engine's path), run through wgpu: the tiny HF
//! models' logits against transformers', prefill then decode through the paged cache.

mod common;

use cubecl::wgpu::{WgpuDevice, WgpuRuntime};
use cubecl::Runtime;
use kiln::loader::open_model;
use kiln::models::llama_kernels::KernelLlama;
use kiln::runner::Forward;

fn check(name: &str) {
    let files = open_model(&common::fixture(&format!("tiny/{name}"))).unwrap();
    let client = WgpuRuntime::client(&WgpuDevice::default());
    let mut model = KernelLlama::<WgpuRuntime, f32>::load(
        client,
        &files.weights,
        &files.config,
        64,
        common::TINY_NUM_BLOCKS,
        common::TINY_BLOCK,
    )
    .unwrap();
    common::check_tiny_logits(name, |batch| model.forward(batch).unwrap());
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
