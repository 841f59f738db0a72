//! Resolving a model path (a `.gguf` file or a HF folder) into weights, config and tokenizer.

use std::path::Path;

use super::gguf::GgufFile;
use super::safetensors::SafetensorsWeights;
use super::tokenizer::Tokenizer;
use super::weights::Weights;
use crate::error::{Error, Result};
use crate::models::config::Config;

/// What a model path holds.
pub struct ModelFiles {
    pub config: Config,
    pub weights: Weights,
    /// `None` for a HF folder without `tokenizer.json` (usable for raw-token forwards only).
    pub tokenizer: Option<Tokenizer>,
}

/// Opens the model at `path`: a GGUF file, or a folder with `config.json` and safetensors.
pub fn open_model(path: &Path) -> Result<ModelFiles> {
    if !path.exists() {
        return Err(Error::ModelNotFound(path.to_path_buf()));
    }
    if path.is_dir() {
        let config = Config::from_hf_json(&path.join("config.json"))?;
        let st = SafetensorsWeights::open(path)?;
        let tokenizer = match Tokenizer::from_hf_dir(path) {
            Ok(t) => Some(t),
            Err(Error::ModelNotFound(_)) => None,
            Err(e) => return Err(e),
        };
        Ok(ModelFiles {
            config,
            weights: Weights::Safetensors {
                dir: path.to_path_buf(),
                st,
            },
            tokenizer,
        })
    } else {
        let gguf = GgufFile::open(path)?;
        let config = Config::from_gguf(&gguf)?;
        let tokenizer = Some(Tokenizer::from_gguf(&gguf)?);
        Ok(ModelFiles {
            config,
            weights: Weights::Gguf(gguf),
            tokenizer,
        })
    }
}
