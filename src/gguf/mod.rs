//! GGUF: read (memory-mapped, validated as llama.cpp validates) and write.
//!
//! Layout of a file (v2/v3, little-endian):
//! `magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv | kv* | tensor_info* | pad | data`.

mod read;
mod value;
mod write;

pub use read::{GgufFile, TensorInfo};
pub use value::{Array, StrArray, Value, ValueType};
pub use write::GgufWriter;

pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
pub const DEFAULT_ALIGNMENT: usize = 32;
/// ggml's GGML_MAX_NAME: tensor names are shorter than this.
pub const MAX_NAME: usize = 64;
/// ggml's GGML_MAX_DIMS.
pub const MAX_DIMS: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot open {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("not a GGUF file: bad magic {0:02x?} (expected \"GGUF\")")]
    BadMagic([u8; 4]),
    #[error("unsupported GGUF version {0} (lethe reads v2 and v3)")]
    UnsupportedVersion(u32),
    #[error("file truncated: {what} at offset {offset} needs {need} bytes, {have} left")]
    Truncated {
        what: String,
        offset: usize,
        need: usize,
        have: usize,
    },
    #[error("{what} count {count} cannot fit in the {file_size}-byte file")]
    CountTooLarge {
        what: &'static str,
        count: u64,
        file_size: usize,
    },
    #[error("{what} at offset {offset} is not valid UTF-8")]
    BadUtf8 { what: String, offset: usize },
    #[error("metadata key {key:?}: unknown value type {ty}")]
    BadValueType { key: String, ty: u32 },
    #[error("metadata key {key:?}: arrays of arrays are not supported")]
    NestedArray { key: String },
    #[error("metadata key {key:?}: string array of 4 GiB or more")]
    ArrayTooLarge { key: String },
    #[error("duplicate metadata key {0:?}")]
    DuplicateKey(String),
    #[error("empty metadata key at offset {0}")]
    EmptyKey(usize),
    #[error("general.alignment must be a non-zero power of two u32, got {0}")]
    BadAlignment(String),
    #[error("tensor {name:?}: name is {len} bytes, the limit is {max}")]
    NameTooLong {
        name: String,
        len: usize,
        max: usize,
    },
    #[error("duplicate tensor name {0:?}")]
    DuplicateTensor(String),
    #[error("tensor {name:?}: {n_dims} dimensions, at most {max} allowed")]
    TooManyDims {
        name: String,
        n_dims: u32,
        max: usize,
    },
    #[error("tensor {name:?}: bad shape {shape:?}: {why}")]
    BadShape {
        name: String,
        shape: Vec<u64>,
        why: String,
    },
    #[error("tensor {name:?}: unknown ggml type id {ty}")]
    BadTensorType { name: String, ty: u32 },
    #[error("tensor {name:?}: ne[0] = {ne0} is not a multiple of the {ty} block size {block}")]
    BadBlockMultiple {
        name: String,
        ty: String,
        ne0: u64,
        block: usize,
    },
    #[error("tensor {name:?}: offset {offset} is not a multiple of the alignment {align}")]
    MisalignedOffset {
        name: String,
        offset: u64,
        align: usize,
    },
    #[error("tensor {name:?}: offset {offset}, expected {expected} (tensor data must be packed in order)")]
    UnpackedOffset {
        name: String,
        offset: u64,
        expected: u64,
    },
    #[error("tensor {name:?}: data [{start}, {end}) lies outside the file ({file_size} bytes)")]
    DataOutOfBounds {
        name: String,
        start: u64,
        end: u64,
        file_size: usize,
    },
    #[error("metadata key {key:?} not found")]
    MissingKey { key: String },
    #[error("metadata key {key:?}: expected {expected}, found {found}")]
    WrongType {
        key: String,
        expected: &'static str,
        found: String,
    },
    #[error("tensor {0:?} not found")]
    MissingTensor(String),
    #[error("write: {0}")]
    Write(String),
}

pub type Result<T> = std::result::Result<T, GgufError>;
