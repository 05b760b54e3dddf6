//! Named models: fetch on first use, verify by sha256 (being written).
use std::path::PathBuf;

/// A path to an existing file, or a model name from `models/manifest.json`, fetched on first use.
pub fn resolve_model(model: &str) -> crate::Result<PathBuf> {
    let p = PathBuf::from(model);
    if p.exists() {
        return Ok(p);
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let dir = std::env::var("LETHE_MODELS").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from(home).join(".cache/lethe/models"));
    let f = match model {
        "smollm2" => "SmolLM2-135M-Instruct.Q4_1.gguf",
        "gemma3" => "gemma-3-270m-q4_k_m.gguf",
        _ => return Err(crate::Error::Fetch(format!("unknown model {model:?}"))),
    };
    Ok(dir.join(f))
}
