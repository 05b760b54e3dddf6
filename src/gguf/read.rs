//! Reading GGUF files: one pass over the header with a bounds-checked cursor, then tensor data
//! used in place from the memory map.

use super::{
    Array, GgufError, Result, StrArray, Value, ValueType, DEFAULT_ALIGNMENT, GGUF_MAGIC, MAX_DIMS,
    MAX_NAME,
};
use lethe_kernels::GgmlType;
use std::collections::HashMap;
use std::path::Path;

enum Storage {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mmap(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `shape[0]` is the contiguous (row) dimension.
    pub shape: Vec<u64>,
    pub ty: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
    /// Size in bytes.
    pub size: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.shape.iter().product()
    }
    /// Number of rows (product of all dims but the first).
    pub fn n_rows(&self) -> u64 {
        self.shape.iter().skip(1).product()
    }
    pub fn row_len(&self) -> usize {
        self.shape.first().map_or(1, |&d| d as usize)
    }
}

pub struct GgufFile {
    storage: Storage,
    pub version: u32,
    pub alignment: usize,
    /// Start of the tensor data section in the file.
    pub data_offset: usize,
    metadata: Vec<(String, Value)>,
    key_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        let have = self.buf.len() - self.pos;
        if n > have {
            return Err(GgufError::Truncated {
                what: what(),
                offset: self.pos,
                need: n,
                have,
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }
    /// A length-prefixed UTF-8 string, borrowed from the buffer.
    fn str_bytes(&mut self, what: &dyn Fn() -> String) -> Result<&'a str> {
        let len = self.u64(&|| format!("length of {}", what()))?;
        let have = self.remaining();
        if len > have as u64 {
            return Err(GgufError::Truncated {
                what: what(),
                offset: self.pos,
                need: usize::try_from(len).unwrap_or(usize::MAX),
                have,
            });
        }
        let start = self.pos;
        let bytes = self.take(len as usize, what)?;
        std::str::from_utf8(bytes).map_err(|_| GgufError::BadUtf8 {
            what: what(),
            offset: start,
        })
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        self.str_bytes(what).map(str::to_string)
    }

    fn scalar(&mut self, ty: ValueType, what: &dyn Fn() -> String) -> Result<Value> {
        let b = |c: &mut Self, n| c.take(n, what);
        Ok(match ty {
            ValueType::U8 => Value::U8(b(self, 1)?[0]),
            ValueType::I8 => Value::I8(b(self, 1)?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(b(self, 2)?.try_into().unwrap())),
            ValueType::I16 => Value::I16(i16::from_le_bytes(b(self, 2)?.try_into().unwrap())),
            ValueType::U32 => Value::U32(u32::from_le_bytes(b(self, 4)?.try_into().unwrap())),
            ValueType::I32 => Value::I32(i32::from_le_bytes(b(self, 4)?.try_into().unwrap())),
            ValueType::F32 => Value::F32(f32::from_le_bytes(b(self, 4)?.try_into().unwrap())),
            ValueType::Bool => Value::Bool(b(self, 1)?[0] != 0),
            ValueType::U64 => Value::U64(u64::from_le_bytes(b(self, 8)?.try_into().unwrap())),
            ValueType::I64 => Value::I64(i64::from_le_bytes(b(self, 8)?.try_into().unwrap())),
            ValueType::F64 => Value::F64(f64::from_le_bytes(b(self, 8)?.try_into().unwrap())),
            ValueType::String => Value::String(self.string(what)?),
            ValueType::Array => unreachable!("arrays are read by value()"),
        })
    }

    fn value(&mut self, key: &str, ty: ValueType) -> Result<Value> {
        if ty != ValueType::Array {
            return self.scalar(ty, &|| format!("value of {key:?}"));
        }
        let et = self.u32(&|| format!("array type of {key:?}"))?;
        let et = ValueType::from_u32(et).ok_or_else(|| GgufError::BadValueType {
            key: key.to_string(),
            ty: et,
        })?;
        if et == ValueType::Array {
            return Err(GgufError::NestedArray {
                key: key.to_string(),
            });
        }
        let n = self.u64(&|| format!("array length of {key:?}"))?;
        // Every element takes at least min_size bytes: bound the count before allocating.
        let fits = n
            .checked_mul(et.min_size() as u64)
            .is_some_and(|b| b <= self.remaining() as u64);
        if !fits {
            return Err(GgufError::Truncated {
                what: format!("array {key:?} of {n} {}", et.name()),
                offset: self.pos,
                need: usize::try_from(n.saturating_mul(et.min_size() as u64)).unwrap_or(usize::MAX),
                have: self.remaining(),
            });
        }
        let n = n as usize;
        let mut a = if et == ValueType::String {
            // Strings are bounded by the bytes they take: grow as they parse.
            let mut a = StrArray::with_capacity(initial_capacity(n as u64), 0);
            for i in 0..n {
                let what = || format!("element {i} of {key:?}");
                let s = self.str_bytes(&what)?;
                if !a.try_push(s) {
                    return Err(GgufError::ArrayTooLarge {
                        key: key.to_string(),
                    });
                }
            }
            Array::String(a)
        } else {
            // Fixed-size elements: the check above guarantees all n are in the file.
            let bytes = self.take(n * et.min_size(), &|| format!("array {key:?}"))?;
            fixed_array(et, bytes)
        };
        a.shrink_to_fit();
        Ok(Value::Array(a))
    }
}

impl GgufFile {
    /// Open and validate a file; tensor data stays in the memory map.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let io = |source| GgufError::Io {
            path: path.display().to_string(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; lethe never writes model files it has open.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Self::parse(Storage::Mmap(mmap))
    }

    /// Parse a file held in memory (tests, generated files).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        Self::parse(Storage::Owned(bytes))
    }

    fn parse(storage: Storage) -> Result<Self> {
        let buf = storage.bytes();
        let file_size = buf.len();
        let mut c = Cursor { buf, pos: 0 };
        let magic: [u8; 4] = c.take(4, &|| "magic".into())?.try_into().unwrap();
        if magic != GGUF_MAGIC {
            return Err(GgufError::BadMagic(magic));
        }
        let version = c.u32(&|| "version".into())?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::UnsupportedVersion(version));
        }
        let n_tensors = c.u64(&|| "tensor count".into())?;
        let n_kv = c.u64(&|| "metadata count".into())?;
        // A tensor info takes at least 8 (name length) + 4 (n_dims) + 4 (type) + 8 (offset)
        // bytes, a kv at least 8 (key length) + 1 (key) + 4 (type) + 1 (value): reject counts
        // the rest of the file cannot hold before allocating anything for them.
        let rest = c.remaining() as u64;
        if n_tensors.saturating_mul(24) > rest {
            return Err(GgufError::CountTooLarge {
                what: "tensor",
                count: n_tensors,
                file_size,
            });
        }
        if n_kv
            .saturating_mul(14)
            .saturating_add(n_tensors.saturating_mul(24))
            > rest
        {
            return Err(GgufError::CountTooLarge {
                what: "metadata",
                count: n_kv,
                file_size,
            });
        }

        let mut metadata = Vec::with_capacity(initial_capacity(n_kv));
        let mut key_index = HashMap::with_capacity(initial_capacity(n_kv));
        for i in 0..n_kv {
            let key_pos = c.pos;
            let key = c.string(&|| format!("key of metadata entry {i}"))?;
            if key.is_empty() {
                return Err(GgufError::EmptyKey(key_pos));
            }
            let ty = c.u32(&|| format!("value type of {key:?}"))?;
            let vt = ValueType::from_u32(ty).ok_or_else(|| GgufError::BadValueType {
                key: key.clone(),
                ty,
            })?;
            let value = c.value(&key, vt)?;
            if key_index.insert(key.clone(), metadata.len()).is_some() {
                return Err(GgufError::DuplicateKey(key));
            }
            metadata.push((key, value));
        }

        let alignment = match key_index.get("general.alignment").map(|&i| &metadata[i].1) {
            None => DEFAULT_ALIGNMENT,
            Some(Value::U32(a)) if *a != 0 && a.is_power_of_two() => *a as usize,
            Some(other) => return Err(GgufError::BadAlignment(format!("{other:?}"))),
        };

        let mut tensors = Vec::with_capacity(initial_capacity(n_tensors));
        let mut tensor_index = HashMap::with_capacity(initial_capacity(n_tensors));
        for i in 0..n_tensors {
            let name = c.string(&|| format!("name of tensor {i}"))?;
            if name.len() >= MAX_NAME {
                return Err(GgufError::NameTooLong {
                    len: name.len(),
                    name,
                    max: MAX_NAME - 1,
                });
            }
            let n_dims = c.u32(&|| format!("dimension count of {name:?}"))?;
            if n_dims as usize > MAX_DIMS {
                return Err(GgufError::TooManyDims {
                    name,
                    n_dims,
                    max: MAX_DIMS,
                });
            }
            let mut shape = Vec::with_capacity(n_dims as usize);
            for d in 0..n_dims {
                shape.push(c.u64(&|| format!("dimension {d} of {name:?}"))?);
            }
            let ty = c.u32(&|| format!("type of {name:?}"))?;
            let ty = GgmlType::from_u32(ty).map_err(|_| GgufError::BadTensorType {
                name: name.clone(),
                ty,
            })?;
            let offset = c.u64(&|| format!("offset of {name:?}"))?;

            if shape.iter().any(|&d| d > i64::MAX as u64) {
                return Err(GgufError::BadShape {
                    name,
                    shape,
                    why: "dimension exceeds INT64_MAX".into(),
                });
            }
            let n_el = shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
            let Some(n_el) = n_el.filter(|&n| n <= i64::MAX as u64) else {
                return Err(GgufError::BadShape {
                    name,
                    shape,
                    why: "element count overflows".into(),
                });
            };
            let ne0 = shape.first().copied().unwrap_or(1);
            if ne0 % ty.block_size() as u64 != 0 {
                return Err(GgufError::BadBlockMultiple {
                    name,
                    ty: ty.name().into(),
                    ne0,
                    block: ty.block_size(),
                });
            }
            let Some(size) = (n_el / ty.block_size() as u64).checked_mul(ty.type_size() as u64)
            else {
                return Err(GgufError::BadShape {
                    name,
                    shape,
                    why: "byte size overflows".into(),
                });
            };
            if offset % alignment as u64 != 0 {
                return Err(GgufError::MisalignedOffset {
                    name,
                    offset,
                    align: alignment,
                });
            }
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                return Err(GgufError::DuplicateTensor(name));
            }
            tensors.push(TensorInfo {
                name,
                shape,
                ty,
                offset,
                size,
            });
        }

        // Data section: packed in order, each tensor padded to the alignment.
        let data_offset = c.pos.div_ceil(alignment) * alignment;
        let mut expected = 0u64;
        for t in &tensors {
            if t.offset != expected {
                return Err(GgufError::UnpackedOffset {
                    name: t.name.clone(),
                    offset: t.offset,
                    expected,
                });
            }
            let start = data_offset as u64 + t.offset;
            let end = start.saturating_add(t.size);
            if end > file_size as u64 {
                return Err(GgufError::DataOutOfBounds {
                    name: t.name.clone(),
                    start,
                    end,
                    file_size,
                });
            }
            expected = t.offset + t.size.div_ceil(alignment as u64) * alignment as u64;
        }

        Ok(Self {
            storage,
            version,
            alignment,
            data_offset,
            metadata,
            key_index,
            tensors,
            tensor_index,
        })
    }

    pub fn bytes(&self) -> &[u8] {
        self.storage.bytes()
    }

    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.key_index.get(key).map(|&i| &self.metadata[i].1)
    }

    pub fn require(&self, key: &str) -> Result<&Value> {
        self.get(key)
            .ok_or_else(|| GgufError::MissingKey { key: key.into() })
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        let v = self.require(key)?;
        v.as_str().ok_or_else(|| wrong(key, "string", v))
    }

    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let v = self.require(key)?;
        v.as_i64()
            .and_then(|x| u64::try_from(x).ok())
            .ok_or_else(|| wrong(key, "unsigned integer", v))
    }

    pub fn get_f32(&self, key: &str) -> Result<f32> {
        let v = self.require(key)?;
        v.as_f64()
            .map(|x| x as f32)
            .ok_or_else(|| wrong(key, "number", v))
    }

    pub fn get_array(&self, key: &str) -> Result<&Array> {
        let v = self.require(key)?;
        v.as_array().ok_or_else(|| wrong(key, "array", v))
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The bytes of a tensor, in place.
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        let start = self.data_offset + t.offset as usize;
        &self.bytes()[start..start + t.size as usize]
    }

    /// Architecture name (`general.architecture`).
    pub fn architecture(&self) -> Result<&str> {
        self.get_str("general.architecture")
    }
}

/// A fixed-size-element array from its little-endian bytes (`bytes.len()` is a multiple of
/// the element size).
fn fixed_array(et: ValueType, bytes: &[u8]) -> Array {
    macro_rules! le {
        ($t:ty, $n:expr) => {
            bytes
                .chunks_exact($n)
                .map(|c| <$t>::from_le_bytes(c.try_into().unwrap()))
                .collect()
        };
    }
    match et {
        ValueType::U8 => Array::U8(bytes.to_vec()),
        ValueType::I8 => Array::I8(bytes.iter().map(|&b| b as i8).collect()),
        ValueType::Bool => Array::Bool(bytes.iter().map(|&b| b != 0).collect()),
        ValueType::U16 => Array::U16(le!(u16, 2)),
        ValueType::I16 => Array::I16(le!(i16, 2)),
        ValueType::U32 => Array::U32(le!(u32, 4)),
        ValueType::I32 => Array::I32(le!(i32, 4)),
        ValueType::F32 => Array::F32(le!(f32, 4)),
        ValueType::U64 => Array::U64(le!(u64, 8)),
        ValueType::I64 => Array::I64(le!(i64, 8)),
        ValueType::F64 => Array::F64(le!(f64, 8)),
        ValueType::String | ValueType::Array => unreachable!("not a fixed-size type"),
    }
}

/// Room reserved up front for `n` parsed items: `n` is only bounded by the file size, so a
/// corrupt count never reserves more than this; the vector grows as items actually parse.
fn initial_capacity(n: u64) -> usize {
    n.min(1 << 10) as usize
}

fn wrong(key: &str, expected: &'static str, v: &Value) -> GgufError {
    GgufError::WrongType {
        key: key.into(),
        expected,
        found: v.ty().name().into(),
    }
}
