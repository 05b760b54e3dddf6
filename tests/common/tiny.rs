//! A tiny random llama model written in memory: the training tests' model.

use super::Rng;
use lethe::gguf::{GgufFile, GgufWriter};
use lethe::model::Model;
use lethe::pool::ThreadPool;
use lethe_kernels::quant::{self, GgmlType};
use std::sync::Arc;

pub const E: usize = 32;
pub const N_LAYER: usize = 2;
pub const N_HEAD: usize = 4;
pub const N_HEAD_KV: usize = 2;
pub const FF: usize = 64;
pub const VOCAB: usize = 50;
pub const EPS: f32 = 1e-5;
pub const ROPE_BASE: f32 = 10000.0;

pub fn add_matrix(
    w: &mut GgufWriter,
    rng: &mut Rng,
    name: &str,
    cols: usize,
    rows: usize,
    ty: GgmlType,
    gain: f32,
) {
    let data = rng.vec(rows * cols, gain / (cols as f32).sqrt());
    let rb = ty.row_bytes(cols);
    let mut bytes = vec![0u8; rb * rows];
    for (src, dst) in data.chunks_exact(cols).zip(bytes.chunks_exact_mut(rb)) {
        quant::quantize_row(ty, src, dst).unwrap();
    }
    w.add_tensor(name, &[cols as u64, rows as u64], ty, bytes)
        .unwrap();
}

pub fn add_norm(w: &mut GgufWriter, rng: &mut Rng, name: &str, n: usize) {
    let v: Vec<f32> = (0..n).map(|_| 1.0 + 0.2 * rng.normal()).collect();
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    w.add_tensor(name, &[n as u64], GgmlType::F32, bytes)
        .unwrap();
}

/// The GGUF bytes of a random llama model: matrices in `ty`, the head tied to the embedding
/// or not.
pub fn tiny_bytes(ty: GgmlType, tied: bool, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    let hd = E / N_HEAD;
    let mut w = GgufWriter::new();
    w.set("general.architecture", "llama").unwrap();
    w.set("llama.embedding_length", E as u32).unwrap();
    w.set("llama.block_count", N_LAYER as u32).unwrap();
    w.set("llama.feed_forward_length", FF as u32).unwrap();
    w.set("llama.attention.head_count", N_HEAD as u32).unwrap();
    w.set("llama.attention.head_count_kv", N_HEAD_KV as u32)
        .unwrap();
    w.set("llama.attention.layer_norm_norm_epsilon", EPS)
        .unwrap();
    w.set("llama.rope.freq_base", ROPE_BASE).unwrap();
    w.set("llama.context_length", 256u32).unwrap();
    w.set("llama.vocab_size", VOCAB as u32).unwrap();
    // The embedding's rows are the inputs: unit scale.
    add_matrix(
        &mut w,
        &mut rng,
        "token_embd.weight",
        E,
        VOCAB,
        ty,
        (E as f32).sqrt(),
    );
    for i in 0..N_LAYER {
        let n = |s: &str| format!("blk.{i}.{s}.weight");
        add_norm(&mut w, &mut rng, &n("attn_norm"), E);
        // Larger q and k give attention that is far from uniform.
        add_matrix(&mut w, &mut rng, &n("attn_q"), E, E, ty, 2.0);
        add_matrix(&mut w, &mut rng, &n("attn_k"), E, N_HEAD_KV * hd, ty, 2.0);
        add_matrix(&mut w, &mut rng, &n("attn_v"), E, N_HEAD_KV * hd, ty, 1.0);
        add_matrix(&mut w, &mut rng, &n("attn_output"), E, E, ty, 1.0);
        add_norm(&mut w, &mut rng, &n("ffn_norm"), E);
        add_matrix(&mut w, &mut rng, &n("ffn_gate"), E, FF, ty, 1.0);
        add_matrix(&mut w, &mut rng, &n("ffn_up"), E, FF, ty, 1.0);
        add_matrix(&mut w, &mut rng, &n("ffn_down"), FF, E, ty, 1.0);
    }
    add_norm(&mut w, &mut rng, "output_norm.weight", E);
    if !tied {
        add_matrix(&mut w, &mut rng, "output.weight", E, VOCAB, ty, 2.0);
    }
    w.to_bytes().unwrap()
}

/// A random llama model: matrices in `ty`, the head tied to the embedding or not.
pub fn tiny(ty: GgmlType, tied: bool, seed: u64) -> Model {
    let file = Arc::new(GgufFile::from_bytes(tiny_bytes(ty, tied, seed)).unwrap());
    let m = Model::from_file(file, Arc::new(ThreadPool::new(2))).unwrap();
    assert_eq!(m.cfg.head_dim, E / N_HEAD);
    m
}

/// Both variants: F32 with an untied head, Q8_0 with a tied head.
pub fn variants() -> Vec<(&'static str, Model)> {
    vec![
        ("f32 untied", tiny(GgmlType::F32, false, 11)),
        ("q8_0 tied", tiny(GgmlType::Q8_0, true, 12)),
    ]
}
