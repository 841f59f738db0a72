//! GGUF (v2/v3) reader: metadata, tensor directory, and tensors dequantized to f32.
//! The file is memory-mapped; nothing is read until a tensor is asked for.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::ggml_type::GgmlType;
use super::host_tensor::HostTensor;
use crate::error::{Error, Result};

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U64(u64),
    I64(i64),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U64(v) => Some(v),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F64(v) => Some(v),
            Value::U64(v) => Some(v as f64),
            Value::I64(v) => Some(v as f64),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where a tensor's bytes lie and how to read them.
#[derive(Clone, Debug)]
struct TensorInfo {
    /// Row-major shape (GGUF lists dimensions innermost first; this is reversed).
    shape: Vec<usize>,
    ty: std::result::Result<GgmlType, String>,
    /// Absolute offset in the file.
    offset: usize,
}

/// An open GGUF file.
pub struct GgufFile {
    path: PathBuf,
    map: Mmap,
    metadata: HashMap<String, Value>,
    tensors: HashMap<String, TensorInfo>,
}

const MAGIC: &[u8; 4] = b"GGUF";

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only; kiln documents that model files must not be
        // modified while an engine has them open.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let mut cur = Cursor {
            buf: &map,
            pos: 0,
            path,
        };
        if cur.bytes(4, "magic")? != MAGIC {
            return Err(Error::invalid(path, "not a GGUF file (bad magic)"));
        }
        let version = cur.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(Error::invalid(
                path,
                format!("GGUF version {version} (supported: 2, 3)"),
            ));
        }
        let n_tensors = cur.u64("tensor count")?;
        let n_kv = cur.u64("metadata count")?;
        let mut metadata = HashMap::new();
        for _ in 0..n_kv {
            let key = cur.string("metadata key")?;
            let ty = cur.u32(&key)?;
            let value = cur.value(ty, &key, 0)?;
            metadata.insert(key, value);
        }
        let mut infos = Vec::new();
        for _ in 0..n_tensors {
            let name = cur.string("tensor name")?;
            let n_dims = cur.u32(&name)? as usize;
            if n_dims > 8 {
                return Err(Error::invalid(
                    path,
                    format!("tensor `{name}` has {n_dims} dimensions"),
                ));
            }
            let mut shape = (0..n_dims)
                .map(|_| cur.u64(&name).map(|d| d as usize))
                .collect::<Result<Vec<_>>>()?;
            shape.reverse();
            let ty = GgmlType::from_id(cur.u32(&name)?);
            let offset = cur.u64(&name)? as usize;
            infos.push((name, shape, ty, offset));
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(Value::as_u64)
            .unwrap_or(32) as usize;
        if alignment == 0 {
            return Err(Error::invalid(path, "general.alignment is 0"));
        }
        let data_start = cur.pos.div_ceil(alignment) * alignment;
        let tensors = infos
            .into_iter()
            .map(|(name, shape, ty, offset)| {
                let offset = data_start + offset;
                (name, TensorInfo { shape, ty, offset })
            })
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            map,
            metadata,
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    fn require(&self, key: &str) -> Result<&Value> {
        self.get(key).ok_or_else(|| Error::MissingKey {
            path: self.path.clone(),
            key: key.to_string(),
        })
    }

    pub fn str(&self, key: &str) -> Result<&str> {
        self.require(key)?
            .as_str()
            .ok_or_else(|| Error::invalid(&self.path, format!("`{key}` is not a string")))
    }

    pub fn u64(&self, key: &str) -> Result<u64> {
        self.require(key)?
            .as_u64()
            .ok_or_else(|| Error::invalid(&self.path, format!("`{key}` is not an integer")))
    }

    pub fn f64(&self, key: &str) -> Result<f64> {
        self.require(key)?
            .as_f64()
            .ok_or_else(|| Error::invalid(&self.path, format!("`{key}` is not a number")))
    }

    pub fn array(&self, key: &str) -> Result<&[Value]> {
        self.require(key)?
            .as_array()
            .ok_or_else(|| Error::invalid(&self.path, format!("`{key}` is not an array")))
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Reads and dequantizes one tensor to f32.
    pub fn tensor(&self, name: &str) -> Result<HostTensor> {
        let info = self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            tensor: name.to_string(),
        })?;
        let ty = info
            .ty
            .clone()
            .map_err(|dtype| Error::UnsupportedTensorType {
                path: self.path.clone(),
                tensor: name.to_string(),
                dtype,
            })?;
        let n: usize = info.shape.iter().product();
        let len = ty.byte_len(n).ok_or_else(|| {
            Error::invalid(
                &self.path,
                format!("tensor `{name}`: {n} elements is not a whole number of {ty:?} blocks"),
            )
        })?;
        let end = info.offset + len;
        if end > self.map.len() {
            return Err(Error::Truncated {
                path: self.path.clone(),
                what: format!("tensor `{name}`"),
                needed: end as u64,
                len: self.map.len() as u64,
            });
        }
        let mut data = vec![0f32; n];
        ty.dequantize(&self.map[info.offset..end], &mut data);
        Ok(HostTensor::new(info.shape.clone(), data))
    }
}

/// Reads little-endian values from the header, naming what it reads in errors.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn bytes(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let Some(end) = end else {
            return Err(Error::Truncated {
                path: self.path.to_path_buf(),
                what: what.to_string(),
                needed: (self.pos as u64).saturating_add(n as u64),
                len: self.buf.len() as u64,
            });
        };
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N, what)?);
        Ok(a)
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.u64(what)? as usize;
        let b = self.bytes(n, what)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| Error::invalid(self.path, format!("{what}: string is not UTF-8")))
    }
    fn value(&mut self, ty: u32, key: &str, depth: u32) -> Result<Value> {
        Ok(match ty {
            0 => Value::U64(self.array::<1>(key)?[0] as u64),
            1 => Value::I64(self.array::<1>(key)?[0] as i8 as i64),
            2 => Value::U64(u16::from_le_bytes(self.array(key)?) as u64),
            3 => Value::I64(i16::from_le_bytes(self.array(key)?) as i64),
            4 => Value::U64(self.u32(key)? as u64),
            5 => Value::I64(i32::from_le_bytes(self.array(key)?) as i64),
            6 => Value::F64(f32::from_le_bytes(self.array(key)?) as f64),
            7 => Value::Bool(self.array::<1>(key)?[0] != 0),
            8 => Value::Str(self.string(key)?),
            9 if depth < 4 => {
                let item_ty = self.u32(key)?;
                let n = self.u64(key)? as usize;
                // Each item takes at least one byte: bound the reservation by what is left.
                let mut items = Vec::with_capacity(n.min(self.buf.len() - self.pos));
                for _ in 0..n {
                    items.push(self.value(item_ty, key, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            other => {
                return Err(Error::invalid(
                    self.path,
                    format!("metadata `{key}` has unknown value type {other}"),
                ))
            }
        })
    }
}
