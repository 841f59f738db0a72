//! The forward on kiln's CubeCL kernels (the CUDA engine's path), run through wgpu: the tiny HF
//! models' logits against transformers', prefill then decode through the paged cache.

mod common;

use std::path::Path;

use cubecl::wgpu::{WgpuDevice, WgpuRuntime};
use cubecl::Runtime;
use kiln::loader::open_model;
use kiln::models::llama_kernels::KernelLlama;
use kiln::runner::batch::Batch;
use kiln::runner::sampler::argmax;
use kiln::runner::{Forward, Readback, StepOutput};
use kiln_kernels::sample::{self, Settings};

/// The model at `path` on the kernels, in f32, with a paged cache of `num_blocks` blocks of
/// `block` tokens (steps of up to 64 tokens).
fn load_from(path: &Path, num_blocks: usize, block: usize) -> KernelLlama<WgpuRuntime, f32> {
    let files = open_model(path).unwrap();
    let client = WgpuRuntime::client(&WgpuDevice::default());
    KernelLlama::<WgpuRuntime, f32>::load(
        client,
        &files.weights,
        &files.config,
        64,
        num_blocks,
        block,
    )
    .unwrap()
}

fn load(name: &str) -> KernelLlama<WgpuRuntime, f32> {
    let path = common::fixture(&format!("tiny/{name}"));
    load_from(&path, common::TINY_NUM_BLOCKS, common::TINY_BLOCK)
}

fn check(name: &str) {
    let mut model = load(name);
    common::check_tiny_logits(name, |batch| model.forward(batch).unwrap());
}

/// The engine's overlapped decode: a step's token is picked on the device (`readback`, with
/// `sampling` for its row) and the next step, queued before it is collected, takes it as a
/// deferred input. Same token and logits as picking on the host (`pick` over the logits) and
/// feeding the token back.
fn device_pick_feeds_the_next_step(
    readback: Readback,
    sampling: Vec<Settings>,
    pick: impl Fn(&[f32]) -> u32,
) {
    let (table, block) = (&common::TINY_BLOCK_TABLE, common::TINY_BLOCK);
    let prompt: Vec<u32> = (0..9).map(|i| 3 + 7 * i).collect();
    let mut prefill = Batch::default();
    prefill.push_seq(&prompt, prompt.len(), table, block, true);
    let decode = |token: u32| {
        let mut b = Batch::default();
        b.push_seq(&[token], prompt.len() + 1, table, block, true);
        b
    };

    let mut host = load("llama");
    let token = pick(&host.forward(&prefill).unwrap());
    let expected = host.forward(&decode(token)).unwrap();

    let mut device = load("llama");
    prefill.sampling = sampling;
    device.submit(&prefill, readback).unwrap();
    let mut next = decode(u32::MAX);
    next.defer_last(0);
    device.submit(&next, Readback::Logits).unwrap();
    match device.collect().unwrap() {
        StepOutput::Tokens(t) => assert_eq!(t, vec![token]),
        other => panic!("{readback:?} step brought back {other:?}"),
    }
    match device.collect().unwrap() {
        StepOutput::Logits(l) => assert!(common::rel_err(&l, &expected) < 1e-6),
        other => panic!("logits step brought back {other:?}"),
    }
}

#[test]
fn deferred_greedy_tokens_match_host_argmax() {
    device_pick_feeds_the_next_step(Readback::Greedy, Vec::new(), argmax);
}

/// Sampled steps draw on the device: the reference draw's token over the same logits.
#[test]
fn sampled_tokens_are_drawn_on_the_device() {
    let settings = Settings {
        inv_temperature: 1.0 / 0.7,
        top_k: 40,
        top_p: 0.9,
        min_p: 0.01,
        uniform: 0.63,
    };
    device_pick_feeds_the_next_step(Readback::Sampled, vec![settings], |logits| {
        sample::reference(logits, &[settings])[0]
    });
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

/// A real (trained) model on the kernels: SmolLM2-135M from its GGUF (Q/K rows unpermuted on
/// load), the reference's three prompts prefilled in one batch, then decoded together, greedy,
/// for the reference's 16 steps — the same ids as the independent float64 forward
/// (fixtures/greedy-reference.json), whose top-2 margins (≥ 0.14) f32 keeps.
#[test]
fn smollm2_greedy_on_kernels() {
    let block = 16;
    let fixture = common::read_json("greedy-reference.json");
    let cases = fixture["models"]["smollm2"]["cases"].as_array().unwrap();
    let prompts: Vec<Vec<u32>> = cases
        .iter()
        .map(|c| common::token_ids(&c["prompt_ids"]))
        .collect();
    let expected: Vec<Vec<u32>> = cases
        .iter()
        .map(|c| common::token_ids(&c["greedy_ids"]))
        .collect();
    let steps = expected[0].len();
    // Two KV blocks a sequence hold its prompt and continuation (≤ 32 tokens).
    let tables: Vec<[u32; 2]> = (0..prompts.len() as u32)
        .map(|s| [2 * s, 2 * s + 1])
        .collect();
    let mut model = load_from(&common::smollm2(), 2 * prompts.len(), block);
    let vocab = model.config().vocab_size;
    let mut got: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    for step in 0..steps {
        let mut batch = Batch::default();
        for (s, prompt) in prompts.iter().enumerate() {
            let tokens = if step == 0 {
                prompt.clone()
            } else {
                vec![got[s][step - 1]]
            };
            batch.push_seq(&tokens, prompt.len() + step, &tables[s], block, true);
        }
        let logits = model.forward(&batch).unwrap();
        for (s, row) in logits.chunks_exact(vocab).enumerate() {
            got[s].push(argmax(row));
        }
    }
    assert_eq!(got, expected);
}
