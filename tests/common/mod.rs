//! Shared helpers for the integration tests.
#![allow(dead_code)]

pub mod serve;

use std::path::PathBuf;

pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

pub fn goldens(model: &str) -> serde_json::Value {
    let file = match model {
        "smollm2" => "goldens/smollm2-135m-instruct-q4_1.json",
        "gemma3" => "goldens/gemma3-270m-q4_k_m.json",
        other => panic!("no goldens for {other}"),
    };
    let text = std::fs::read_to_string(fixture(file)).expect("golden file");
    serde_json::from_str(&text).expect("golden json")
}

pub fn model_path(name: &str) -> PathBuf {
    lethe::hub::resolve_model(name).unwrap_or_else(|e| panic!("fetch {name}: {e}"))
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The Python interpreter for the tests that use Python packages: `LETHE_PYTHON` if set, else
/// the virtual environment `.ci/run` creates (`~/.cache/lethe/venv`), else `python3`.
pub fn python() -> String {
    if let Ok(p) = std::env::var("LETHE_PYTHON") {
        return p;
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")));
    if let Some(cache) = cache {
        let venv = cache.join("lethe/venv/bin/python");
        if venv.exists() {
            return venv.to_string_lossy().into_owned();
        }
    }
    "python3".into()
}

/// Reads `path` with llama.cpp's Python reader (`tests/fixtures/gguf_dump.py`, JSON out).
/// Fails (never skips) when it is not installed.
pub fn python_dump(path: &std::path::Path) -> serde_json::Value {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf_dump.py");
    let out = std::process::Command::new(python()).arg(&script).arg(path).output().unwrap_or_else(|e| {
        panic!("cannot run {}: {e}; this test needs Python 3 with llama.cpp's reader: pip install gguf numpy", python())
    });
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(3) {
        panic!("{stderr}\nthis test needs llama.cpp's Python reader: pip install gguf numpy");
    }
    assert!(
        out.status.success(),
        "gguf_dump.py failed on {}: {stderr}",
        path.display()
    );
    serde_json::from_slice(&out.stdout).expect("gguf_dump.py prints JSON")
}
