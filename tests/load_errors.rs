//! Broken model files: each gives the specific `kiln::Error`, naming the file and the
//! tensor or key. The broken GGUFs are copies of SmolLM2 with one field patched.

mod common;

use std::path::{Path, PathBuf};

use burn::backend::Flex;
use burn::tensor::DType;
use kiln::models::llama::Llama;
use kiln::{Engine, Error};

fn build(path: &Path) -> Error {
    match Engine::builder().model(path).kv_cache_tokens(64).build() {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e,
    }
}

/// Loads a tokenizer-less HF folder's weights straight into the model.
fn load_weights(dir: &Path) -> Error {
    let files = kiln::loader::open_model(dir).unwrap();
    let device = Default::default();
    match Llama::<Flex>::load(&files.weights, &files.config, 16, DType::F32, &device) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e,
    }
}

/// A scratch folder removed when dropped.
struct Scratch(PathBuf);
impl Scratch {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("kiln-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }
}
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len())
        .position(|w| w == needle)
        .expect("pattern in file")
}

/// Byte offset of the type field of tensor `name` in the tensor directory.
fn tensor_type_offset(bytes: &[u8], name: &str) -> usize {
    let mut key = (name.len() as u64).to_le_bytes().to_vec();
    key.extend_from_slice(name.as_bytes());
    let at = find(bytes, &key) + key.len();
    let n_dims = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    at + 4 + 8 * n_dims
}

#[test]
fn missing_and_junk_files() {
    let missing = Path::new("/nonexistent/model.gguf");
    assert!(matches!(build(missing), Error::ModelNotFound(p) if p == missing));
    let s = Scratch::new("junk");
    let junk = s.write("junk.gguf", b"hello world, not a model");
    assert!(matches!(build(&junk), Error::InvalidModelFile { path, .. } if path == junk));
}

#[test]
fn broken_gguf_files() {
    let original = std::fs::read(common::smollm2()).unwrap();
    let s = Scratch::new("gguf");

    let cut = s.write("cut-header.gguf", &original[..1000]);
    assert!(matches!(build(&cut), Error::Truncated { path, .. } if path == cut));
    let cut = s.write("cut-data.gguf", &original[..4 << 20]);
    match build(&cut) {
        Error::Truncated { path, what, .. } => {
            assert_eq!(path, cut);
            assert!(what.starts_with("tensor `"), "{what}");
        }
        e => panic!("expected Truncated, got {e}"),
    }

    let mut b = original.clone();
    let at = find(&b, b"general.architecture") + "general.architecture".len() + 4 + 8;
    b[at..at + 5].copy_from_slice(b"gpt-j");
    let p = s.write("arch.gguf", &b);
    assert!(matches!(build(&p), Error::UnsupportedArchitecture { arch, .. } if arch == "gpt-j"));

    let mut b = original.clone();
    let at = tensor_type_offset(&b, "blk.3.ffn_up.weight");
    b[at..at + 4].copy_from_slice(&13u32.to_le_bytes()); // Q5_K
    let p = s.write("type.gguf", &b);
    match build(&p) {
        Error::UnsupportedTensorType {
            path,
            tensor,
            dtype,
        } => {
            assert_eq!(
                (path, tensor.as_str(), dtype.as_str()),
                (p, "blk.3.ffn_up.weight", "Q5_K")
            );
        }
        e => panic!("expected UnsupportedTensorType, got {e}"),
    }

    let mut b = original.clone();
    let at = find(&b, b"blk.7.attn_v.weight");
    b[at..at + 19].copy_from_slice(b"blk.7.attn_X.weight");
    let p = s.write("missing.gguf", &b);
    assert!(
        matches!(build(&p), Error::MissingTensor { tensor, .. } if tensor == "blk.7.attn_v.weight")
    );

    let mut b = original;
    let at = tensor_type_offset(&b, "blk.2.attn_norm.weight") - 8; // its only dimension
    b[at..at + 8].copy_from_slice(&577u64.to_le_bytes());
    let p = s.write("shape.gguf", &b);
    match build(&p) {
        Error::TensorShape {
            tensor,
            expected,
            actual,
            ..
        } => {
            assert_eq!(
                (tensor.as_str(), expected, actual),
                ("blk.2.attn_norm.weight", vec![576], vec![577])
            );
        }
        e => panic!("expected TensorShape, got {e}"),
    }
}

#[test]
fn broken_hf_folders() {
    let tiny = common::fixture("tiny/qwen2");
    let s = Scratch::new("hf");
    let config = std::fs::read_to_string(tiny.join("config.json")).unwrap();
    std::fs::copy(
        tiny.join("model.safetensors"),
        s.0.join("model.safetensors"),
    )
    .unwrap();

    s.write(
        "config.json",
        config.replace("\"qwen2\"", "\"gpt_neox\"").as_bytes(),
    );
    assert!(
        matches!(build(&s.0), Error::UnsupportedArchitecture { arch, .. } if arch == "gpt_neox")
    );

    s.write(
        "config.json",
        config
            .replace("\"intermediate_size\": 128", "\"intermediate_size\": 96")
            .as_bytes(),
    );
    match load_weights(&s.0) {
        Error::TensorShape { tensor, .. } => {
            assert_eq!(tensor, "model.layers.0.mlp.gate_proj.weight")
        }
        e => panic!("expected TensorShape, got {e}"),
    }

    s.write(
        "config.json",
        config
            .replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 3")
            .as_bytes(),
    );
    assert!(
        matches!(load_weights(&s.0), Error::MissingTensor { tensor, .. } if tensor.starts_with("model.layers.2."))
    );

    // Loads, but generating needs a tokenizer, which this folder lacks.
    s.write("config.json", config.as_bytes());
    assert!(matches!(build(&s.0), Error::Tokenizer { .. }));
}
