//! Tokenizers built from GGUF metadata against llama.cpp's token ids
//! (fixtures/tokenize-reference.json), and decode round-trips.

mod common;

use kiln::loader::gguf::GgufFile;
use kiln::loader::tokenizer::Tokenizer;

fn check(model_key: &str, path: std::path::PathBuf) {
    let tok = Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    let fixture = common::read_json("tokenize-reference.json");
    let cases = fixture["models"][model_key]["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 19);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let expected = common::token_ids(&case["ids"]);
        let ids = tok.encode_raw(text).unwrap();
        assert_eq!(ids, expected, "{model_key}: encode {text:?}");
        assert_eq!(
            tok.decode(&ids, false).unwrap(),
            text,
            "{model_key}: decode {text:?}"
        );
    }
}

#[test]
fn smollm2_matches_llama_cpp() {
    check("smollm2", common::smollm2());
}

#[test]
fn qwen2_matches_llama_cpp() {
    check("qwen2", common::qwen2());
}

#[test]
fn end_of_generation_ids() {
    let tok = Tokenizer::from_gguf(&GgufFile::open(&common::smollm2()).unwrap()).unwrap();
    // <|endoftext|> = 0, <|im_end|> = 2 (the GGUF's eos).
    assert_eq!(tok.eos_ids(), &[0, 2]);
    let tok = Tokenizer::from_gguf(&GgufFile::open(&common::qwen2()).unwrap()).unwrap();
    // <|endoftext|> = 151643, <|im_end|> = 151645.
    assert_eq!(tok.eos_ids(), &[151643, 151645]);
}

#[test]
fn incremental_detokenizer_never_splits_characters() {
    use kiln::text::detokenizer::Detokenizer;
    let text = "naïve café 日本語のテキスト 🚀🔥👍🏽 ≤≥∑ done";
    for path in [common::smollm2(), common::qwen2()] {
        let tok = Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
        let ids = tok.encode_raw(text).unwrap();
        let mut d = Detokenizer::new();
        let mut out = String::new();
        let mut held = 0;
        for &id in &ids {
            let delta = d.push(&tok, id).unwrap();
            assert!(!delta.contains('\u{FFFD}'), "broken character in {delta:?}");
            held += delta.is_empty() as usize;
            out.push_str(&delta);
        }
        out.push_str(&d.flush(&tok).unwrap());
        assert_eq!(out, text);
        assert!(
            held > 0,
            "multi-token characters were held back at least once"
        );
    }
}
