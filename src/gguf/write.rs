//! Writing GGUF files (placeholder: being written).

/// Builds a GGUF file.
pub struct GgufWriter;
