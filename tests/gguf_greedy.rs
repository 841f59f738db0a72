//! Real GGUF models, greedy, against an independent numpy forward over gguf-py's dequantized
//! weights (fixtures/greedy-reference.json, made by scripts/reference_greedy.py).

mod common;

use kiln::{Engine, FinishReason, Request, SamplingParams};

fn check(key: &str, engine: &Engine) {
    let fixture = common::read_json("greedy-reference.json");
    let cases = fixture["models"][key]["cases"].as_array().unwrap();
    for case in cases {
        let prompt = case["prompt"].as_str().unwrap();
        let expected = common::token_ids(&case["greedy_ids"]);
        assert_eq!(
            engine.tokenizer().encode(prompt).unwrap(),
            common::token_ids(&case["prompt_ids"]),
            "{key}: prompt ids of {prompt:?}"
        );
        let sampling = SamplingParams {
            max_tokens: expected.len(),
            ignore_eos: true,
            ..SamplingParams::greedy()
        };
        let done = engine
            .generate(Request::new(prompt).sampling(sampling))
            .unwrap();
        assert_eq!(
            done.token_ids, expected,
            "{key}: greedy continuation of {prompt:?}"
        );
        assert_eq!(done.text, case["greedy_text"].as_str().unwrap());
        assert_eq!(done.finish_reason, FinishReason::Length);
    }
}

#[test]
fn smollm2_greedy_matches_reference() {
    let engine = Engine::builder()
        .model(common::smollm2())
        .kv_cache_tokens(1024)
        .build()
        .unwrap();
    check("smollm2", &engine);
    let done = engine
        .generate(
            Request::new("The capital of France is")
                .sampling(SamplingParams::greedy())
                .max_tokens(1),
        )
        .unwrap();
    assert_eq!(done.text, " Paris");
}

#[test]
fn qwen2_greedy_matches_reference() {
    let engine = Engine::builder()
        .model(common::qwen2())
        .kv_cache_tokens(512)
        .build()
        .unwrap();
    check("qwen2", &engine);
}
