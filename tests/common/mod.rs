//! Shared helpers for kiln's integration tests.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::PathBuf;

/// The model cache `scripts/fetch-models.sh` fills.
pub fn models_dir() -> PathBuf {
    std::env::var_os("KILN_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").expect("HOME is set");
            PathBuf::from(home).join(".cache/kiln/models")
        })
}

fn model(name: &str) -> PathBuf {
    let p = models_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-models.sh first",
        p.display()
    );
    p
}

pub fn smollm2() -> PathBuf {
    model("SmolLM2-135M-Instruct.Q4_1.gguf")
}

pub fn qwen2() -> PathBuf {
    model("qwen2.5-coder-0.5b-instruct.gguf")
}

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub fn read_json(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixture(name)).expect("fixture exists");
    serde_json::from_str(&text).expect("fixture is JSON")
}

/// A fixture's array of token ids.
pub fn token_ids(value: &serde_json::Value) -> Vec<u32> {
    value
        .as_array()
        .expect("an array of ids")
        .iter()
        .map(|v| v.as_u64().expect("an id") as u32)
        .collect()
}

/// ‖a − b‖ / ‖b‖.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// Block size and a non-contiguous, out-of-order block table for the tiny models' checks:
/// attention must follow the table.
pub const TINY_BLOCK: usize = 4;
pub const TINY_BLOCK_TABLE: [u32; 4] = [5, 1, 6, 3];
/// KV blocks the tiny checks' caches need (the table's largest id + 1).
pub const TINY_NUM_BLOCKS: usize = 8;

/// Checks a forward on the tiny HF model `name` (tests/fixtures/tiny) against transformers'
/// logits: a 10-token prefill (past one GEMV tile, so the GEMM path runs) with logits for every
/// position, then one decode step per remaining prompt token through the paged cache; then the
/// same with the prefill in chunks of 4 and 6 (the decode-sized paths). Each row within 1e-4
/// relative error.
pub fn check_tiny_logits(
    name: &str,
    mut forward: impl FnMut(&kiln::runner::batch::Batch) -> Vec<f32>,
) {
    use kiln::runner::batch::Batch;
    let fixture = read_json(&format!("tiny/{name}/logits.json"));
    let prompt = token_ids(&fixture["prompt"]);
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
    let vocab = expected[0].len();
    let prefill = 10;
    // A chunk that wants no logits returns none (the engine's prompt chunks before the last).
    let mut batch = Batch::default();
    batch.push_seq(&prompt[..3], 3, &TINY_BLOCK_TABLE, TINY_BLOCK, false);
    assert!(
        forward(&batch).is_empty(),
        "{name}: logits for a chunk that wants none"
    );
    // The prompt's first `prefill` tokens in one chunk, then again in chunks of 4 and 6 (batches
    // small enough for the decode-sized paths), each followed by the decode steps.
    for chunks in [&[prefill][..], &[4, 6]] {
        let mut start = 0;
        for &len in chunks {
            let end = start + len;
            let mut batch = Batch::default();
            batch.push_seq(
                &prompt[start..end],
                end,
                &TINY_BLOCK_TABLE,
                TINY_BLOCK,
                true,
            );
            batch.logit_indices = (0..len).collect();
            for (i, row) in forward(&batch).chunks_exact(vocab).enumerate() {
                let e = rel_err(row, &expected[start + i]);
                assert!(
                    e < 1e-4,
                    "{name}: chunks {chunks:?}: prefill position {}: relative error {e}",
                    start + i
                );
            }
            start = end;
        }
        decode_steps(name, &prompt, &expected, prefill, &mut forward);
    }
}

fn decode_steps(
    name: &str,
    prompt: &[u32],
    expected: &[Vec<f32>],
    prefill: usize,
    forward: &mut impl FnMut(&kiln::runner::batch::Batch) -> Vec<f32>,
) {
    use kiln::runner::batch::Batch;
    for pos in prefill..prompt.len() {
        let mut batch = Batch::default();
        batch.push_seq(
            &prompt[pos..=pos],
            pos + 1,
            &TINY_BLOCK_TABLE,
            TINY_BLOCK,
            true,
        );
        let e = rel_err(&forward(&batch), &expected[pos]);
        assert!(
            e < 1e-4,
            "{name}: decode position {pos}: relative error {e}"
        );
    }
}
