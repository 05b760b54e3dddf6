//! Writing GGUF v3 files, laid out exactly as llama.cpp's `gguf_write_to_buf` lays them out:
//! header, metadata in insertion order, tensor infos, zero padding to the alignment, then each
//! tensor's data followed by zero padding to the alignment (the last tensor included).
//!
//! Tensor data can be held by the writer (owned or borrowed, e.g. from a [`GgufFile`]'s memory
//! map) or supplied one tensor at a time while writing ([`GgufWriter::write_with`]), so a large
//! model never has to be held in memory at once.

use super::{
    Array, GgufError, GgufFile, Result, StrArray, TensorInfo, Value, ValueType, DEFAULT_ALIGNMENT,
    GGUF_MAGIC, MAX_DIMS, MAX_NAME,
};
use lethe_kernels::GgmlType;
use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The GGUF version this writer produces.
pub const GGUF_WRITE_VERSION: u32 = 3;

struct PendingTensor<'a> {
    info: TensorInfo,
    data: Option<Cow<'a, [u8]>>,
}

/// Builds a GGUF v3 file.
///
/// ```no_run
/// # use lethe::gguf::GgufWriter;
/// # use lethe_kernels::GgmlType;
/// let mut w = GgufWriter::new();
/// w.set("general.architecture", "llama")?;
/// w.set("llama.context_length", 2048u32)?;
/// w.add_tensor("token_embd.weight", &[4, 2], GgmlType::F32, vec![0u8; 32])?;
/// w.write("out.gguf")?;
/// # Ok::<(), lethe::gguf::GgufError>(())
/// ```
#[derive(Default)]
pub struct GgufWriter<'a> {
    metadata: Vec<(String, Value)>,
    key_index: HashMap<String, usize>,
    tensors: Vec<PendingTensor<'a>>,
    tensor_index: HashMap<String, usize>,
}

impl<'a> GgufWriter<'a> {
    pub fn new() -> Self {
        Self::default()
    }

    /// A writer holding all of `file`'s metadata and tensors (the data borrowed from its map):
    /// writing it out reproduces the file's contents.
    pub fn from_gguf(file: &'a GgufFile) -> Result<Self> {
        let mut w = Self::new();
        w.copy_metadata(file)?;
        for t in file.tensors() {
            w.copy_tensor(file, &t.name)?;
        }
        Ok(w)
    }

    /// Sets a metadata value. A new key is appended (insertion order is kept); an existing key
    /// keeps its place and gets the new value. `general.alignment` must be a power-of-two `u32`.
    pub fn set(&mut self, key: impl Into<String>, value: impl Into<Value>) -> Result<&mut Self> {
        let key = key.into();
        let value = value.into();
        if key.is_empty() {
            return Err(GgufError::Write("empty metadata key".into()));
        }
        if key == "general.alignment" {
            match value {
                Value::U32(a) if a != 0 && a.is_power_of_two() => {}
                ref other => return Err(GgufError::BadAlignment(format!("{other:?}"))),
            }
        }
        match self.key_index.get(&key) {
            Some(&i) => self.metadata[i].1 = value,
            None => {
                self.key_index.insert(key.clone(), self.metadata.len());
                self.metadata.push((key, value));
            }
        }
        Ok(self)
    }

    /// Sets an array of element type `et` from individual values, which must all be `et`s
    /// (arrays do not nest).
    pub fn set_array(
        &mut self,
        key: impl Into<String>,
        et: ValueType,
        items: impl IntoIterator<Item = Value>,
    ) -> Result<&mut Self> {
        let key = key.into();
        let a = Array::from_values(et, items).map_err(|found| {
            if et == ValueType::Array {
                GgufError::NestedArray { key: key.clone() }
            } else {
                GgufError::WrongType {
                    key: key.clone(),
                    expected: et.name(),
                    found: found.name().into(),
                }
            }
        })?;
        self.set(key, Value::Array(a))
    }

    /// Removes a metadata key (later keys keep their order). Returns its value, if it was set.
    pub fn remove(&mut self, key: &str) -> Option<Value> {
        let i = self.key_index.remove(key)?;
        let (_, v) = self.metadata.remove(i);
        for idx in self.key_index.values_mut() {
            if *idx > i {
                *idx -= 1;
            }
        }
        Some(v)
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.key_index.get(key).map(|&i| &self.metadata[i].1)
    }

    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    /// Copies every metadata entry of `file`, in its order (existing keys are overwritten in place).
    pub fn copy_metadata(&mut self, file: &GgufFile) -> Result<&mut Self> {
        for (k, v) in file.metadata() {
            self.set(k.clone(), v.clone())?;
        }
        Ok(self)
    }

    /// The alignment the file will be written with (`general.alignment`, default 32).
    pub fn alignment(&self) -> usize {
        match self.get("general.alignment") {
            Some(Value::U32(a)) => *a as usize,
            _ => DEFAULT_ALIGNMENT,
        }
    }

    /// Adds a tensor whose data is supplied later, by [`write_with`](Self::write_with).
    /// `shape` is in ggml order (`shape[0]` is the row length).
    pub fn add_tensor_info(
        &mut self,
        name: impl Into<String>,
        shape: &[u64],
        ty: GgmlType,
    ) -> Result<&mut Self> {
        self.push_tensor(name.into(), shape, ty, None)
    }

    /// Adds a tensor with its data (`data.len()` must equal the tensor's size in bytes).
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        shape: &[u64],
        ty: GgmlType,
        data: impl Into<Cow<'a, [u8]>>,
    ) -> Result<&mut Self> {
        self.push_tensor(name.into(), shape, ty, Some(data.into()))
    }

    /// Adds a tensor of `file` under the same name, borrowing its data.
    pub fn copy_tensor(&mut self, file: &'a GgufFile, name: &str) -> Result<&mut Self> {
        self.copy_tensor_as(file, name, name)
    }

    /// Adds a tensor of `file` under a new name, borrowing its data.
    pub fn copy_tensor_as(
        &mut self,
        file: &'a GgufFile,
        name: &str,
        new_name: &str,
    ) -> Result<&mut Self> {
        let t = file
            .tensor(name)
            .ok_or_else(|| GgufError::MissingTensor(name.into()))?;
        self.add_tensor(new_name, &t.shape, t.ty, file.tensor_data(t))
    }

    /// Attaches (or replaces) the data of a tensor already added.
    pub fn set_tensor_data(
        &mut self,
        name: &str,
        data: impl Into<Cow<'a, [u8]>>,
    ) -> Result<&mut Self> {
        let i = *self
            .tensor_index
            .get(name)
            .ok_or_else(|| GgufError::MissingTensor(name.into()))?;
        let data = data.into();
        check_len(&self.tensors[i].info, data.len())?;
        self.tensors[i].data = Some(data);
        Ok(self)
    }

    fn push_tensor(
        &mut self,
        name: String,
        shape: &[u64],
        ty: GgmlType,
        data: Option<Cow<'a, [u8]>>,
    ) -> Result<&mut Self> {
        if name.len() >= MAX_NAME {
            return Err(GgufError::NameTooLong {
                len: name.len(),
                name,
                max: MAX_NAME - 1,
            });
        }
        if self.tensor_index.contains_key(&name) {
            return Err(GgufError::DuplicateTensor(name));
        }
        if shape.is_empty() || shape.len() > MAX_DIMS {
            return Err(GgufError::TooManyDims {
                name,
                n_dims: shape.len() as u32,
                max: MAX_DIMS,
            });
        }
        let bad = |why: &str| GgufError::BadShape {
            name: name.clone(),
            shape: shape.to_vec(),
            why: why.into(),
        };
        if shape.iter().any(|&d| d > i64::MAX as u64) {
            return Err(bad("dimension exceeds INT64_MAX"));
        }
        let n_el = shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .filter(|&n| n <= i64::MAX as u64);
        let Some(n_el) = n_el else {
            return Err(bad("element count overflows"));
        };
        let block = ty.block_size() as u64;
        if !shape[0].is_multiple_of(block) {
            return Err(GgufError::BadBlockMultiple {
                name,
                ty: ty.name().into(),
                ne0: shape[0],
                block: block as usize,
            });
        }
        let Some(size) = (n_el / block).checked_mul(ty.type_size() as u64) else {
            return Err(bad("byte size overflows"));
        };
        let info = TensorInfo {
            name: name.clone(),
            shape: shape.to_vec(),
            ty,
            offset: 0,
            size,
        };
        if let Some(d) = &data {
            check_len(&info, d.len())?;
        }
        self.tensor_index.insert(name, self.tensors.len());
        self.tensors.push(PendingTensor { info, data });
        Ok(self)
    }

    /// The tensors as they will be written, with their offsets in the data section.
    pub fn tensor_infos(&self) -> Vec<TensorInfo> {
        let align = self.alignment() as u64;
        let mut offset = 0u64;
        self.tensors
            .iter()
            .map(|t| {
                let info = TensorInfo {
                    offset,
                    ..t.info.clone()
                };
                offset += t.info.size.div_ceil(align) * align;
                info
            })
            .collect()
    }

    /// Everything before the tensor data: header, metadata, tensor infos and the padding.
    pub fn header_bytes(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&GGUF_MAGIC);
        b.extend_from_slice(&GGUF_WRITE_VERSION.to_le_bytes());
        b.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        b.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_str(&mut b, k);
            b.extend_from_slice(&(v.ty() as u32).to_le_bytes());
            put_value(&mut b, v);
        }
        for t in self.tensor_infos() {
            put_str(&mut b, &t.name);
            b.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
            for d in &t.shape {
                b.extend_from_slice(&d.to_le_bytes());
            }
            b.extend_from_slice(&(t.ty as u32).to_le_bytes());
            b.extend_from_slice(&t.offset.to_le_bytes());
        }
        let align = self.alignment();
        b.resize(b.len().div_ceil(align) * align, 0);
        b
    }

    /// Total size of the file that will be written.
    pub fn file_size(&self) -> u64 {
        let align = self.alignment() as u64;
        let data: u64 = self
            .tensors
            .iter()
            .map(|t| t.info.size.div_ceil(align) * align)
            .sum();
        self.header_bytes().len() as u64 + data
    }

    /// Writes the file to `w`; `data` is asked for the bytes of each tensor that has none
    /// attached, in file order, one at a time.
    pub fn write_to_with<W, F, B, E>(&self, mut w: W, mut data: F) -> std::result::Result<(), E>
    where
        W: Write,
        F: FnMut(&TensorInfo) -> std::result::Result<B, E>,
        B: AsRef<[u8]>,
        E: From<GgufError>,
    {
        let io = |e: std::io::Error| GgufError::Write(e.to_string());
        w.write_all(&self.header_bytes()).map_err(io)?;
        let align = self.alignment() as u64;
        let zeros = vec![0u8; align as usize];
        for (t, info) in self.tensors.iter().zip(self.tensor_infos()) {
            let pad = (info.size.div_ceil(align) * align - info.size) as usize;
            match &t.data {
                Some(d) => w.write_all(d).map_err(io)?,
                None => {
                    let d = data(&info)?;
                    check_len(&info, d.as_ref().len())?;
                    w.write_all(d.as_ref()).map_err(io)?;
                }
            }
            w.write_all(&zeros[..pad]).map_err(io)?;
        }
        w.flush().map_err(io)?;
        Ok(())
    }

    /// Writes the file to `w`; every tensor must have its data attached.
    pub fn write_to(&self, w: impl Write) -> Result<()> {
        self.write_to_with(w, |t: &TensorInfo| -> Result<&[u8]> {
            Err(GgufError::Write(format!(
                "tensor {:?} has no data (use write_with)",
                t.name
            )))
        })
    }

    /// The whole file in memory; every tensor must have its data attached.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut v = Vec::new();
        self.write_to(&mut v)?;
        Ok(v)
    }

    /// Writes the file to `path` atomically (a temporary file beside it, then a rename);
    /// every tensor must have its data attached.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        self.write_with(path, |t: &TensorInfo| -> Result<&[u8]> {
            Err(GgufError::Write(format!(
                "tensor {:?} has no data (use write_with)",
                t.name
            )))
        })
    }

    /// Writes the file to `path` atomically, asking `data` for the bytes of each tensor that
    /// has none attached (in file order, one at a time, so they can be produced on the fly).
    pub fn write_with<F, B, E>(&self, path: impl AsRef<Path>, data: F) -> std::result::Result<(), E>
    where
        F: FnMut(&TensorInfo) -> std::result::Result<B, E>,
        B: AsRef<[u8]>,
        E: From<GgufError>,
    {
        let path = path.as_ref();
        let io = |e: std::io::Error| GgufError::Io {
            path: path.display().to_string(),
            source: e,
        };
        let file_name = path
            .file_name()
            .ok_or_else(|| GgufError::Write(format!("{} is not a file path", path.display())))?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(file_name);
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        tmp_name.push(format!(".tmp{}-{seq}", std::process::id()));
        let tmp = path.with_file_name(tmp_name);
        let result = (|| -> std::result::Result<(), E> {
            let file = std::fs::File::create(&tmp).map_err(io)?;
            let mut buf = std::io::BufWriter::with_capacity(1 << 20, file);
            self.write_to_with(&mut buf, data)?;
            let file = buf.into_inner().map_err(|e| io(e.into_error()))?;
            file.sync_all().map_err(io)?;
            drop(file);
            std::fs::rename(&tmp, path).map_err(io)?;
            Ok(())
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

fn check_len(info: &TensorInfo, len: usize) -> Result<()> {
    if len as u64 != info.size {
        return Err(GgufError::Write(format!(
            "tensor {:?} ({} {:?}) needs {} bytes of data, got {len}",
            info.name,
            info.ty.name(),
            info.shape,
            info.size
        )));
    }
    Ok(())
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u64).to_le_bytes());
    b.extend_from_slice(s.as_bytes());
}

fn put_value(b: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => b.push(*x),
        Value::I8(x) => b.push(*x as u8),
        Value::U16(x) => b.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => b.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => b.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => b.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => b.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => b.push(*x as u8),
        Value::String(s) => put_str(b, s),
        Value::Array(a) => {
            b.extend_from_slice(&(a.elem_type() as u32).to_le_bytes());
            b.extend_from_slice(&(a.len() as u64).to_le_bytes());
            put_array(b, a);
        }
        Value::U64(x) => b.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => b.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => b.extend_from_slice(&x.to_le_bytes()),
    }
}

fn put_array(b: &mut Vec<u8>, a: &Array) {
    macro_rules! le {
        ($v:expr) => {
            for x in $v {
                b.extend_from_slice(&x.to_le_bytes());
            }
        };
    }
    match a {
        Array::U8(v) => b.extend_from_slice(v),
        Array::I8(v) => b.extend(v.iter().map(|&x| x as u8)),
        Array::Bool(v) => b.extend(v.iter().map(|&x| x as u8)),
        Array::U16(v) => le!(v),
        Array::I16(v) => le!(v),
        Array::U32(v) => le!(v),
        Array::I32(v) => le!(v),
        Array::F32(v) => le!(v),
        Array::U64(v) => le!(v),
        Array::I64(v) => le!(v),
        Array::F64(v) => le!(v),
        Array::String(v) => {
            for s in v.iter() {
                put_str(b, s);
            }
        }
    }
}

macro_rules! value_from {
    ($($t:ty => $v:ident),* $(,)?) => {$(
        impl From<$t> for Value {
            fn from(x: $t) -> Value {
                Value::$v(x)
            }
        }
        impl From<Vec<$t>> for Value {
            fn from(x: Vec<$t>) -> Value {
                Value::Array(Array::$v(x))
            }
        }
        impl From<&[$t]> for Value {
            fn from(x: &[$t]) -> Value {
                Value::Array(Array::$v(x.to_vec()))
            }
        }
    )*};
}

value_from!(u8 => U8, i8 => I8, u16 => U16, i16 => I16, u32 => U32, i32 => I32, f32 => F32, bool => Bool,
    u64 => U64, i64 => I64, f64 => F64);

impl From<String> for Value {
    fn from(x: String) -> Value {
        Value::String(x)
    }
}

impl From<Vec<String>> for Value {
    fn from(x: Vec<String>) -> Value {
        Value::Array(Array::String(x.iter().collect()))
    }
}

impl From<&[String]> for Value {
    fn from(x: &[String]) -> Value {
        Value::Array(Array::String(x.iter().collect()))
    }
}

impl From<Array> for Value {
    fn from(x: Array) -> Value {
        Value::Array(x)
    }
}

impl From<StrArray> for Value {
    fn from(x: StrArray) -> Value {
        Value::Array(Array::String(x))
    }
}

impl From<&str> for Value {
    fn from(x: &str) -> Value {
        Value::String(x.into())
    }
}

impl From<&String> for Value {
    fn from(x: &String) -> Value {
        Value::String(x.clone())
    }
}

impl From<Vec<&str>> for Value {
    fn from(x: Vec<&str>) -> Value {
        Value::from(x.as_slice())
    }
}

impl From<&[&str]> for Value {
    fn from(x: &[&str]) -> Value {
        Value::Array(Array::String(x.iter().collect()))
    }
}
