//! The tokenizer: built from GGUF metadata (`tokenizer.ggml.*`, gpt2-style byte-level BPE) or
//! read from a HF `tokenizer.json`, plus the special ids generation needs.

use std::path::Path;

use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use super::gguf::{GgufFile, Value};
use crate::error::{Error, Result};

/// GPT-2's split pattern (llama.cpp's default for byte-level BPE).
const GPT2_SPLIT: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// Llama 3's split pattern: numbers in groups of up to three.
const LLAMA3_SPLIT: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split pattern: single digits.
const QWEN2_SPLIT: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Texts of control tokens that end generation, as llama.cpp recognises them.
const END_OF_GENERATION: &[&str] = &[
    "<|endoftext|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|end_of_text|>",
];

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_CONTROL: u64 = 3;
const TOKEN_USER_DEFINED: u64 = 4;

/// A tokenizer with its special tokens.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    eos_ids: Vec<u32>,
    chat_template: Option<String>,
}

impl Tokenizer {
    /// Builds the tokenizer stored in a GGUF file's metadata.
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let path = g.path();
        let err = |reason: String| Error::Tokenizer {
            path: path.to_path_buf(),
            reason,
        };
        let model = g.str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(err(format!(
                "tokenizer model `{model}` is not supported (supported: gpt2 byte-level BPE)"
            )));
        }
        let pre = g
            .get("tokenizer.ggml.pre")
            .and_then(Value::as_str)
            .unwrap_or("default");
        let (patterns, ignore_merges): (&[&str], bool) = match pre {
            "llama-bpe" | "llama3" | "llama-v3" => (&[LLAMA3_SPLIT], true),
            "qwen2" | "deepseek-r1-qwen" => (&[QWEN2_SPLIT], false),
            "smollm" => (&[r"\p{N}", GPT2_SPLIT], false),
            "default" | "gpt-2" | "gpt2" => (&[GPT2_SPLIT], false),
            other => return Err(err(format!("pre-tokenizer `{other}` is not supported"))),
        };
        let tokens: Vec<&str> = g
            .array("tokenizer.ggml.tokens")?
            .iter()
            .map(|v| v.as_str().ok_or_else(|| err("non-string token".into())))
            .collect::<Result<_>>()?;
        let types: Vec<u64> = match g.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
            Some(a) => a.iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
            None => vec![1; tokens.len()],
        };
        let merges = g
            .array("tokenizer.ggml.merges")?
            .iter()
            .map(|v| {
                let s = v.as_str().ok_or_else(|| err("non-string merge".into()))?;
                let (a, b) = s
                    .split_once(' ')
                    .ok_or_else(|| err(format!("malformed merge `{s}`")))?;
                Ok((a.to_string(), b.to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(ignore_merges)
            .build()
            .map_err(|e| err(e.to_string()))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);

        let mut steps = Vec::new();
        for p in patterns {
            let split = Split::new(
                SplitPattern::Regex(p.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| err(e.to_string()))?;
            steps.push(PreTokenizerWrapper::Split(split));
        }
        steps.push(PreTokenizerWrapper::ByteLevel(ByteLevel::new(
            false, false, false,
        )));
        inner.with_pre_tokenizer(Some(Sequence::new(steps)));
        inner.with_decoder(Some(ByteLevel::default()));

        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == TOKEN_CONTROL || t == TOKEN_USER_DEFINED)
            .map(|(tok, &t)| AddedToken::from(tok.to_string(), t == TOKEN_CONTROL))
            .collect();
        inner.add_special_tokens(&special);

        let id = |key: &str| g.get(key).and_then(Value::as_u64).map(|v| v as u32);
        let add_bos = g
            .get("tokenizer.ggml.add_bos_token")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if let (true, Some(bos)) = (add_bos, id("tokenizer.ggml.bos_token_id")) {
            let bos_text = tokens
                .get(bos as usize)
                .ok_or_else(|| err(format!("bos id {bos} out of range")))?;
            let post = TemplateProcessing::builder()
                .try_single(format!("{bos_text} $A"))
                .and_then(|b| b.try_pair(format!("{bos_text} $A $B")))
                .map_err(|e| err(e.to_string()))?
                .special_tokens(vec![(bos_text.to_string(), bos)])
                .build()
                .map_err(|e| err(e.to_string()))?;
            inner.with_post_processor(Some(post));
        }

        let mut eos_ids: Vec<u32> = ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"]
            .iter()
            .filter_map(|k| id(k))
            .collect();
        eos_ids.extend(
            tokens
                .iter()
                .zip(&types)
                .enumerate()
                .filter(|(_, (tok, &t))| t == TOKEN_CONTROL && END_OF_GENERATION.contains(tok))
                .map(|(i, _)| i as u32),
        );
        eos_ids.sort_unstable();
        eos_ids.dedup();
        let chat_template = g
            .get("tokenizer.chat_template")
            .and_then(Value::as_str)
            .map(str::to_string);
        Ok(Self {
            inner,
            eos_ids,
            chat_template,
        })
    }

    /// Reads `tokenizer.json` of a HF folder, with end-of-sequence ids from
    /// `generation_config.json` / `config.json` and the chat template from `tokenizer_config.json`.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(Error::ModelNotFound(path));
        }
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| Error::Tokenizer {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let read_json = |name: &str| -> Option<serde_json::Value> {
            let text = std::fs::read_to_string(dir.join(name)).ok()?;
            serde_json::from_str(&text).ok()
        };
        let tok_cfg = read_json("tokenizer_config.json");
        let mut eos_ids = Vec::new();
        for name in ["generation_config.json", "config.json"] {
            match read_json(name).as_ref().and_then(|v| v.get("eos_token_id")) {
                Some(serde_json::Value::Number(n)) => eos_ids.extend(n.as_u64().map(|v| v as u32)),
                Some(serde_json::Value::Array(a)) => {
                    eos_ids.extend(a.iter().filter_map(|v| v.as_u64()).map(|v| v as u32))
                }
                _ => {}
            }
        }
        let eos_text = tok_cfg.as_ref().and_then(|c| match c.get("eos_token") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(obj) => obj
                .get("content")
                .and_then(|v| v.as_str())
                .map(str::to_string),
            None => None,
        });
        eos_ids.extend(eos_text.and_then(|t| inner.token_to_id(&t)));
        eos_ids.sort_unstable();
        eos_ids.dedup();
        let chat_template = tok_cfg
            .as_ref()
            .and_then(|c| c.get("chat_template"))
            .and_then(|v| v.as_str())
            .map(str::to_string);
        Ok(Self {
            inner,
            eos_ids,
            chat_template,
        })
    }

    /// Token ids of `text`, with the model's BOS where it wants one. Special-token text
    /// (`<|im_start|>` ...) becomes its special token.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, true)
    }

    /// Token ids of `text`, without BOS or other added tokens.
    pub fn encode_raw(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, false)
    }

    fn encode_with(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        self.inner
            .encode(text, add_special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Error::Tokenize(e.to_string()))
    }

    /// The text of `ids`; `skip_special` drops control tokens.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| Error::Tokenize(e.to_string()))
    }

    /// Token ids that end generation.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// The model's chat template (Jinja source), if it ships one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The underlying `tokenizers::Tokenizer`.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}
