//! The ULD assistant base (`lethe::forge::truncate_model`): a target model cut after K blocks
//! runs exactly like the target stopped after K blocks, is read by llama.cpp's Python reader
//! (PyPI `gguf`), and bad block counts or architectures are refused.

mod common;

use common::python_dump;

use lethe::forge::truncate_model;
use lethe::gguf::{GgufFile, GgufWriter, Value};
use lethe::model::Model;
use lethe::pool::ThreadPool;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let d = std::env::temp_dir().join(format!("lethe-forge-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn open(name: &str) -> GgufFile {
    GgufFile::open(common::model_path(name)).unwrap()
}

fn block_of(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split_once('.')?.0.parse().ok()
}

/// The tensor names the assistant must hold, in the target's order.
fn expected_names(src: &GgufFile, k: usize) -> Vec<String> {
    src.tensors()
        .iter()
        .filter(|t| block_of(&t.name).is_none_or(|i| i < k))
        .map(|t| t.name.clone())
        .collect()
}

/// Metadata, tensors and bytes of the assistant as lethe reads it back.
fn check_file(src: &GgufFile, out: &GgufFile, k: usize) {
    let arch = src.architecture().unwrap();
    let bc_key = format!("{arch}.block_count");
    assert_eq!(out.get_u64(&bc_key).unwrap(), k as u64);
    assert_eq!(
        out.get(&bc_key).unwrap().ty(),
        src.get(&bc_key).unwrap().ty(),
        "block_count keeps its type"
    );
    let name = out.get_str("general.name").unwrap();
    assert!(
        name.ends_with(&format!(" (assistant, {k} blocks)")),
        "{name}"
    );
    // Every other key is copied unchanged and in order.
    let skip = |k: &str| k == bc_key || k == "general.name";
    let a: Vec<_> = src.metadata().iter().filter(|(k, _)| !skip(k)).collect();
    let b: Vec<_> = out.metadata().iter().filter(|(k, _)| !skip(k)).collect();
    assert_eq!(a, b);
    assert_eq!(out.metadata().len(), src.metadata().len());

    let names: Vec<String> = out.tensors().iter().map(|t| t.name.clone()).collect();
    assert_eq!(names, expected_names(src, k));
    for required in ["token_embd.weight", "output_norm.weight"] {
        assert!(out.tensor(required).is_some(), "{required}");
    }
    assert_eq!(
        out.tensor("output.weight").is_some(),
        src.tensor("output.weight").is_some()
    );
    for t in out.tensors() {
        let s = src.tensor(&t.name).unwrap();
        assert_eq!(
            (&t.shape, t.ty, t.size),
            (&s.shape, s.ty, s.size),
            "{}",
            t.name
        );
        assert_eq!(out.tensor_data(t), src.tensor_data(s), "{}", t.name);
    }
}

/// Logits of every position of `tokens`.
fn logits(m: &Model, tokens: &[u32]) -> Vec<f32> {
    let mut st = m.new_state(64);
    let mut all = Vec::new();
    m.forward(&mut st, tokens, Some(&mut all)).unwrap();
    assert_eq!(all.len(), tokens.len() * m.cfg.n_vocab);
    all
}

/// The assistant's logits equal those of the target with its blocks cut to `k` in memory.
fn check_logits(src_path: &Path, out: &Path, k: usize, tokens: &[u32]) {
    let pool = Arc::new(ThreadPool::new(2));
    let assistant = Model::from_file(Arc::new(GgufFile::open(out).unwrap()), pool.clone()).unwrap();
    assert_eq!(assistant.cfg.n_layer, k);
    assert_eq!(assistant.layers.len(), k);
    let mut target = Model::from_file(Arc::new(GgufFile::open(src_path).unwrap()), pool).unwrap();
    assert!(target.layers.len() > k);
    target.layers.truncate(k);

    let a = logits(&assistant, tokens);
    let b = logits(&target, tokens);
    let max_diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(a.iter().all(|x| x.is_finite()));
    assert!(max_diff < 1e-5, "max abs logit diff {max_diff}");

    // And through Model::open, as a user would load it.
    let opened = Model::open(out, 2).unwrap();
    let c = logits(&opened, tokens);
    let max_diff = a
        .iter()
        .zip(&c)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(
        max_diff < 1e-3,
        "Model::open: max abs logit diff {max_diff}"
    );
}

/// What llama.cpp's Python reader sees: block_count K, the right tensors, the whole vocabulary.
fn check_python(src: &GgufFile, path: &Path, k: usize) {
    let py = python_dump(path);
    let arch = src.architecture().unwrap();
    let fields = py["fields"].as_array().unwrap();
    let field = |key: &str| {
        fields
            .iter()
            .find(|f| f["key"] == json!(key))
            .unwrap_or_else(|| panic!("python reader lacks {key}"))
    };
    assert_eq!(field(&format!("{arch}.block_count"))["value"], json!(k));
    assert_eq!(
        field("general.architecture")["value"],
        json!(src.architecture().unwrap())
    );
    let n_tokens = src.get_array("tokenizer.ggml.tokens").unwrap().len();
    let py_tokens = field("tokenizer.ggml.tokens")["value"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(py_tokens, n_tokens);
    assert_eq!(fields.len(), src.metadata().len());
    let names: Vec<String> = py["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, expected_names(src, k));
}

/// A short prompt's ids (within every reference model's vocabulary).
const TOKENS: [u32; 9] = [1, 504, 3458, 282, 4649, 314, 2683, 30, 216];

#[test]
fn smollm2_assistant_matches_target_cut_after_8_blocks() {
    let src_path = common::model_path("smollm2");
    let src = GgufFile::open(&src_path).unwrap();
    let dir = TempDir::new("smollm2");
    let out = dir.0.join("assistant-8.gguf");
    truncate_model(&src, 8, &out).unwrap();
    let f = GgufFile::open(&out).unwrap();
    check_file(&src, &f, 8);
    assert!(
        std::fs::metadata(&out).unwrap().len() < std::fs::metadata(&src_path).unwrap().len(),
        "the assistant is smaller than its target"
    );
    check_logits(&src_path, &out, 8, &TOKENS);
}

#[test]
fn smollm2_assistant_is_read_by_python_gguf() {
    let src = open("smollm2");
    let dir = TempDir::new("smollm2-py");
    let out = dir.0.join("assistant-8.gguf");
    truncate_model(&src, 8, &out).unwrap();
    check_python(&src, &out, 8);
}

#[test]
fn gemma3_assistant_matches_target_cut_after_7_blocks() {
    // Seven blocks: past gemma3's first global-attention layer (block 5).
    let src_path = common::model_path("gemma3");
    let src = GgufFile::open(&src_path).unwrap();
    let dir = TempDir::new("gemma3");
    let out = dir.0.join("assistant-7.gguf");
    truncate_model(&src, 7, &out).unwrap();
    check_file(&src, &GgufFile::open(&out).unwrap(), 7);
    check_python(&src, &out, 7);
    check_logits(&src_path, &out, 7, &TOKENS);
}

#[test]
fn bad_block_counts_are_refused() {
    let src = open("smollm2");
    let n_layer = src.get_u64("llama.block_count").unwrap() as usize;
    let dir = TempDir::new("bad-k");
    for k in [0, n_layer + 1, usize::MAX] {
        let out = dir.0.join(format!("k{k}.gguf"));
        let e = truncate_model(&src, k, &out);
        assert!(matches!(e, Err(lethe::Error::Invalid(_))), "K={k}: {e:?}");
        assert!(!out.exists(), "K={k}: nothing written");
    }
    // K = n_layer is allowed: every tensor kept.
    let out = dir.0.join("full.gguf");
    truncate_model(&src, n_layer, &out).unwrap();
    let f = GgufFile::open(&out).unwrap();
    check_file(&src, &f, n_layer);
    assert_eq!(f.tensors().len(), src.tensors().len());
}

#[test]
fn unsupported_architecture_is_refused() {
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String("gpt2".into()))
        .unwrap();
    w.set("gpt2.block_count", Value::U32(4)).unwrap();
    let f = GgufFile::from_bytes(w.to_bytes().unwrap()).unwrap();
    let dir = TempDir::new("arch");
    let out = dir.0.join("a.gguf");
    let e = truncate_model(&f, 2, &out);
    assert!(
        matches!(e, Err(lethe::Error::UnsupportedArch(ref a)) if a == "gpt2"),
        "{e:?}"
    );
    assert!(!out.exists());
}
