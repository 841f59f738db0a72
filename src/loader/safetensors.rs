//! Hugging Face safetensors weights: one `model.safetensors` or shards listed in
//! `model.safetensors.index.json`, memory-mapped, bf16/f16/f32 read as f32.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use super::host_tensor::HostTensor;
use crate::error::{Error, Result};

/// The weights of one model folder.
pub struct SafetensorsWeights {
    shards: Vec<(PathBuf, Mmap)>,
    /// Tensor name → index into `shards`.
    index: HashMap<String, usize>,
}

#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

impl SafetensorsWeights {
    /// Opens the weights of the HF model folder `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index_path.exists() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let index: ShardIndex = serde_json::from_str(&text)
                .map_err(|e| Error::invalid(&index_path, e.to_string()))?;
            let mut names: Vec<String> = index.weight_map.into_values().collect();
            names.sort();
            names.dedup();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            vec![dir.join("model.safetensors")]
        };
        let mut shards = Vec::with_capacity(files.len());
        let mut index = HashMap::new();
        for path in files {
            let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
            // SAFETY: read-only map of a file the caller must not modify while it is open.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
            let (_, meta) = SafeTensors::read_metadata(&map)
                .map_err(|e| Error::invalid(&path, e.to_string()))?;
            for name in meta.tensors().keys() {
                index.insert(name.clone(), shards.len());
            }
            shards.push((path, map));
        }
        Ok(Self { shards, index })
    }

    /// The folder-level path used in error messages for a tensor that is nowhere.
    fn first_path(&self) -> PathBuf {
        self.shards
            .first()
            .map(|(p, _)| p.clone())
            .unwrap_or_default()
    }

    pub fn has(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Reads one tensor as f32.
    pub fn tensor(&self, name: &str) -> Result<HostTensor> {
        let shard = *self.index.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.first_path(),
            tensor: name.to_string(),
        })?;
        let (path, map) = &self.shards[shard];
        let st = SafeTensors::deserialize(map).map_err(|e| Error::invalid(path, e.to_string()))?;
        let view = st
            .tensor(name)
            .map_err(|e| Error::invalid(path, format!("tensor `{name}`: {e}")))?;
        let bytes = view.data();
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(Error::UnsupportedTensorType {
                    path: path.clone(),
                    tensor: name.to_string(),
                    dtype: format!("{other:?}"),
                })
            }
        };
        Ok(HostTensor::new(view.shape().to_vec(), data))
    }
}
