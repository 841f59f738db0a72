//! The Engine end to end on SmolLM2 (GGUF): concurrency, batch invariance, streaming,
//! cancellation, sampling, stop handling and bad input.

mod common;

use std::sync::OnceLock;

use futures::StreamExt;
use kiln::{Engine, Error, FinishReason, LlmBackend, Request, SamplingParams, TokenStream};

/// One engine for the whole file: loading the model once keeps the tests quick.
fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        Engine::builder()
            .model(common::smollm2())
            .kv_cache_tokens(2048)
            .max_model_len(512)
            .build()
            .unwrap()
    })
}

fn greedy(n: usize) -> SamplingParams {
    SamplingParams {
        max_tokens: n,
        ignore_eos: true,
        ..SamplingParams::greedy()
    }
}

const PROMPTS: [&str; 4] = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, there was a",
    "The three primary colors are",
];

/// Greedy tokens of each prompt run alone, then of all submitted at once (sharing batches).
fn solo_and_together(e: &Engine, prompts: &[&str], n: usize) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    let req = |p: &str| Request::new(p).sampling(greedy(n));
    let solo = prompts
        .iter()
        .map(|p| e.generate(req(p)).unwrap().token_ids)
        .collect();
    // All submitted before any is read.
    let streams: Vec<TokenStream> = prompts.iter().map(|p| e.stream(req(p)).unwrap()).collect();
    let together = streams
        .into_iter()
        .map(|s| s.into_completion().unwrap().token_ids)
        .collect();
    (solo, together)
}

#[test]
fn concurrent_requests_match_solo_runs() {
    let e = engine();
    let (solo, together) = solo_and_together(e, &PROMPTS, 12);
    assert_eq!(together, solo);
}

#[test]
fn stream_chunks_join_to_the_full_decode() {
    let e = engine();
    let text = "Emoji and accents: ";
    let stream = e
        .stream(Request::new(text).sampling(SamplingParams {
            seed: Some(3),
            max_tokens: 40,
            ..Default::default()
        }))
        .unwrap();
    let chunks: Vec<_> = Iterator::map(stream, |c| c.unwrap()).collect();
    let joined: String = chunks.iter().map(|c| c.text.as_str()).collect();
    let ids: Vec<u32> = chunks.iter().map(|c| c.token_id).collect();
    let eos = e.tokenizer().eos_ids();
    let text_ids: Vec<u32> = ids.iter().copied().filter(|t| !eos.contains(t)).collect();
    assert_eq!(joined, e.tokenizer().decode(&text_ids, true).unwrap());
    assert!(chunks.last().unwrap().finish_reason.is_some());
    assert!(chunks[..chunks.len() - 1]
        .iter()
        .all(|c| c.finish_reason.is_none()));
}

#[test]
fn async_stream_gives_the_same_tokens() {
    let e = engine();
    let want = e
        .generate(Request::new(PROMPTS[0]).sampling(greedy(6)))
        .unwrap();
    let got: Vec<u32> = futures::executor::block_on(async {
        let s = e
            .stream(Request::new(PROMPTS[0]).sampling(greedy(6)))
            .unwrap();
        StreamExt::map(s, |c| c.unwrap().token_id).collect().await
    });
    assert_eq!(got, want.token_ids);
}

#[test]
fn same_seed_same_output() {
    let e = engine();
    let run = |seed| {
        let p = SamplingParams {
            temperature: 0.9,
            top_p: 0.95,
            top_k: 50,
            seed: Some(seed),
            max_tokens: 16,
            ignore_eos: true,
            ..Default::default()
        };
        e.generate(Request::new("My favourite food is").sampling(p))
            .unwrap()
            .token_ids
    };
    assert_eq!(run(11), run(11));
    assert_ne!(run(11), run(12));
}

/// Greedy and sampled requests share batches (the engine switching between argmax and per-row
/// draws every few steps as they start and end) and give what each gives alone.
#[test]
fn greedy_and_sampled_requests_share_batches() {
    let e = engine();
    let sampled = SamplingParams {
        temperature: 0.9,
        seed: Some(5),
        max_tokens: 6,
        ignore_eos: true,
        ..Default::default()
    };
    let greedy_req = |p: &str| Request::new(p).sampling(greedy(14));
    let solo_greedy = e.generate(greedy_req(PROMPTS[1])).unwrap().token_ids;
    let solo_sampled = e
        .generate(Request::new(PROMPTS[3]).sampling(sampled.clone()))
        .unwrap()
        .token_ids;
    let streams = [
        e.stream(greedy_req(PROMPTS[1])).unwrap(),
        e.stream(Request::new(PROMPTS[3]).sampling(sampled))
            .unwrap(),
    ];
    let [g, s] = streams.map(|s| s.into_completion().unwrap().token_ids);
    assert_eq!(g, solo_greedy);
    assert_eq!(s, solo_sampled);
}

#[test]
fn stop_string_ends_generation_and_is_not_emitted() {
    let e = engine();
    let full = e
        .generate(Request::new(PROMPTS[0]).sampling(greedy(8)))
        .unwrap();
    assert!(full.text.starts_with(" Paris."), "{:?}", full.text);
    // " Paris." then "\n\n": stop on "s." which spans the tokens " Paris" and ".".
    let mut p = greedy(8);
    p.stop = vec!["s.".into()];
    let done = e.generate(Request::new(PROMPTS[0]).sampling(p)).unwrap();
    assert_eq!(done.text, " Pari");
    assert_eq!(done.finish_reason, FinishReason::Stop);
}

#[test]
fn stop_token_ids_and_eos() {
    let e = engine();
    let full = e
        .generate(Request::new(PROMPTS[0]).sampling(greedy(8)))
        .unwrap();
    let mut p = greedy(8);
    p.stop_token_ids = vec![full.token_ids[2]];
    let done = e.generate(Request::new(PROMPTS[0]).sampling(p)).unwrap();
    assert_eq!(done.token_ids, full.token_ids[..3]);
    assert_eq!(done.finish_reason, FinishReason::Stop);
    assert_eq!(
        done.text,
        e.tokenizer().decode(&full.token_ids[..2], true).unwrap()
    );
    // The instruct model answering a chat turn ends with <|im_end|> (eos) well before 200 tokens.
    let chat = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
    let p = SamplingParams {
        max_tokens: 200,
        ..SamplingParams::greedy()
    };
    let done = e.generate(Request::new(chat).sampling(p)).unwrap();
    assert_eq!(done.finish_reason, FinishReason::Stop);
    assert!(e
        .tokenizer()
        .eos_ids()
        .contains(done.token_ids.last().unwrap()));
    assert!(!done.text.contains("<|im_end|>"));
}

#[test]
fn logprobs_are_reported() {
    let e = engine();
    let p = SamplingParams {
        logprobs: Some(3),
        ..greedy(3)
    };
    let done = e.generate(Request::new(PROMPTS[0]).sampling(p)).unwrap();
    let lps = done.logprobs.unwrap();
    assert_eq!(lps.len(), 3);
    for (lp, &tok) in lps.iter().zip(&done.token_ids) {
        assert_eq!(lp.chosen.token_id, tok);
        assert_eq!(lp.top.len(), 3);
        assert_eq!(
            lp.top[0].token_id, tok,
            "greedy picks the most likely token"
        );
        assert!(lp.chosen.logprob <= 0.0 && lp.top[0].logprob >= lp.top[1].logprob);
    }
}

#[test]
fn dropping_a_stream_cancels_it_and_others_continue() {
    let e = engine();
    let mut a = e
        .stream(Request::new(PROMPTS[2]).sampling(greedy(400)))
        .unwrap();
    let b = e
        .stream(Request::new(PROMPTS[0]).sampling(greedy(8)))
        .unwrap();
    assert!(Iterator::next(&mut a).unwrap().is_ok());
    drop(a);
    let done = b.into_completion().unwrap();
    assert_eq!(done.token_ids.len(), 8);
}

#[test]
fn bad_input_is_an_error_and_the_engine_keeps_serving() {
    let e = engine();
    let d = SamplingParams::default;
    let cases = [
        (
            "temperature",
            SamplingParams {
                temperature: -1.0,
                ..d()
            },
        ),
        ("top_p", SamplingParams { top_p: 0.0, ..d() }),
        (
            "top_p",
            SamplingParams {
                top_p: f32::NAN,
                ..d()
            },
        ),
        ("min_p", SamplingParams { min_p: 1.5, ..d() }),
        (
            "repetition_penalty",
            SamplingParams {
                repetition_penalty: 0.0,
                ..d()
            },
        ),
        (
            "presence_penalty",
            SamplingParams {
                presence_penalty: 3.0,
                ..d()
            },
        ),
        (
            "max_tokens",
            SamplingParams {
                max_tokens: 0,
                ..d()
            },
        ),
        (
            "stop",
            SamplingParams {
                stop: vec![String::new()],
                ..d()
            },
        ),
        (
            "logprobs",
            SamplingParams {
                logprobs: Some(1000),
                ..d()
            },
        ),
    ];
    for (expected, params) in cases {
        match e.generate(Request::new("hi").sampling(params)) {
            Err(Error::InvalidSampling { name, .. }) => assert_eq!(name, expected),
            other => panic!("{expected}: expected InvalidSampling, got {other:?}"),
        }
    }
    assert!(matches!(
        e.generate(Request::new("")),
        Err(Error::EmptyPrompt)
    ));
    assert!(matches!(
        e.generate(Request::from_tokens(vec![1, 999_999])),
        Err(Error::Tokenize(_))
    ));
    let long = "word ".repeat(600);
    match e.generate(Request::new(long).max_tokens(4)) {
        Err(Error::PromptTooLong {
            context: 512,
            max_tokens: 4,
            ..
        }) => {}
        other => panic!("expected PromptTooLong, got {other:?}"),
    }
    match e.generate(Request::new("hi").max_tokens(600)) {
        Err(Error::PromptTooLong { .. }) => {}
        other => panic!("expected PromptTooLong, got {other:?}"),
    }
    let done = e
        .generate(Request::new(PROMPTS[0]).sampling(greedy(1)))
        .unwrap();
    assert_eq!(done.text, " Paris");
}

#[test]
fn small_kv_cache_preempts_without_losing_requests() {
    // 6 blocks of 16 tokens: three 40-token sequences cannot all fit at once.
    let e = Engine::builder()
        .model(common::smollm2())
        .kv_cache_tokens(96)
        .block_size(16)
        .max_model_len(1024)
        .build()
        .unwrap();
    let (solo, together) = solo_and_together(&e, &PROMPTS[..3], 32);
    assert_eq!(together, solo);
    match e.generate(Request::new(PROMPTS[0]).max_tokens(200)) {
        Err(Error::KvCacheExhausted {
            needed: 13,
            capacity: 6,
        }) => {}
        other => panic!("expected KvCacheExhausted, got {other:?}"),
    }
}

/// A mock standing in for the engine, as RAG code would use one in its tests.
struct Canned;
impl LlmBackend for Canned {
    fn generate(&self, r: Request) -> kiln::Result<kiln::Completion> {
        self.stream(r)?.into_completion()
    }
    fn stream(&self, _: Request) -> kiln::Result<TokenStream> {
        let chunk = kiln::Chunk {
            text: "42".into(),
            token_id: 7,
            logprobs: None,
            finish_reason: Some(FinishReason::Stop),
        };
        Ok(TokenStream::from_items(3, vec![Ok(chunk)]))
    }
}

#[test]
fn llm_backend_can_be_mocked() {
    let backends: Vec<Box<dyn LlmBackend>> = vec![Box::new(Canned), Box::new(engine().clone())];
    let answers: Vec<String> = backends
        .iter()
        .map(|b| {
            b.generate(Request::new(PROMPTS[0]).sampling(greedy(1)))
                .unwrap()
                .text
        })
        .collect();
    assert_eq!(answers, vec!["42".to_string(), " Paris".to_string()]);
}
