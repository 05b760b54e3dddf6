//! `lethe::patch::bake` on the real SmolLM2 (Q4_1, tied embeddings): patches merged into the
//! weights give the model the runtime patches give, within the error of the type written;
//! unchanged tensors are byte copies; a tied embedding or head is untied so the other keeps the
//! original weights; llama.cpp's Python reader reads the result; and what cannot be baked is
//! refused with a clear message.
//!
//! Log-probabilities are compared as the largest absolute difference of the log-softmax over
//! every position of a 19-token prompt and the whole vocabulary: the strictest measure, since
//! it includes the tokens far in the tail (the Q4_1 bake, whose error is a full quantization
//! step, is compared by KL divergence instead; see that test). Both models run with
//! `Precision::Exact` (f32 activations, f64 sums): in the default precision the activations
//! are quantized to the weight's paired type, which differs between a Q4_1 weight plus an f32
//! delta (runtime) and an F16 weight (baked), and small input changes flip 8-bit roundings;
//! that difference (measured 0.4 to 1.2 in the far tail) would hide the one under test.

mod common;

use common::TempDir;

use common::python_dump;
use lethe::gguf::{GgufFile, Value};
use lethe::model::{Model, Precision};
use lethe::patch::bake::{self, BakeReport, BakeType, Survival, TensorReport};
use lethe::patch::{
    self, write_cvec, write_delta, write_lora, DeltaEntry, LowRankEntry, Patch, PatchSet,
};
use lethe::tokenizer::Tokenizer;
use lethe_kernels::quant::{dequantize_row, quantize_row, GgmlType};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const PROMPT: &str =
    "The capital of France is Paris. The largest planet of the solar system is Jupiter, and the";

fn open(path: &Path) -> Model {
    let mut m = Model::open(path, 2).unwrap();
    m.precision = Precision::Exact;
    m
}

fn base() -> (Model, PathBuf) {
    let path = common::model_path("smollm2");
    (open(&path), path)
}

fn prompt(m: &Model) -> Vec<u32> {
    let tok = Tokenizer::from_gguf(&m.file).unwrap();
    let ids = tok.encode(PROMPT, true, false);
    assert!(ids.len() >= 18, "{} tokens", ids.len());
    ids
}

/// Log-softmax of every position of `toks` (`[n_tok, n_vocab]`), with `patches` attached.
fn log_probs(m: &Model, patches: &[(Arc<Patch>, f32)], toks: &[u32]) -> Vec<f32> {
    let mut st = m.new_state(64);
    let set = (!patches.is_empty()).then(|| Arc::new(PatchSet::new(m, patches).unwrap()));
    m.attach_patches(&mut st, set).unwrap();
    let mut all = Vec::new();
    m.forward(&mut st, toks, Some(&mut all)).unwrap();
    for row in all.chunks_mut(m.cfg.n_vocab) {
        let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let lse = max + row.iter().map(|&x| (x - max).exp()).sum::<f32>().ln();
        row.iter_mut().for_each(|x| *x -= lse);
    }
    all
}

/// Mean over positions of `KL(p || q)`, both given as log-probabilities `[n_tok, n_vocab]`.
fn mean_kl(p: &[f32], q: &[f32], n_vocab: usize) -> f64 {
    assert_eq!(p.len(), q.len());
    let rows = p.len() / n_vocab;
    let total: f64 = p
        .chunks(n_vocab)
        .zip(q.chunks(n_vocab))
        .map(|(p, q)| {
            p.iter()
                .zip(q)
                .map(|(&a, &b)| (a as f64).exp() * (a as f64 - b as f64))
                .sum::<f64>()
        })
        .sum();
    total / rows as f64
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).abs())
        .fold(0.0, f64::max)
}

/// Deterministic smooth values of size about `amp`.
fn wave(n: usize, seed: f32, amp: f32) -> Vec<f32> {
    (0..n)
        .map(|i| amp * (0.37 * i as f32 + seed).sin() * (0.011 * i as f32 + 2.0 * seed).cos())
        .collect()
}

fn low_rank(m: &Model, name: &str, rank: usize, seed: f32, amp: f32) -> LowRankEntry {
    let t = m
        .file
        .tensor(name)
        .unwrap_or_else(|| m.file.tensor("token_embd.weight").unwrap());
    let (cols, rows) = (t.shape[0] as usize, t.shape[1] as usize);
    LowRankEntry {
        base: name.into(),
        cols,
        rows,
        rank,
        a: wave(rank * cols, seed, amp),
        b: wave(rows * rank, seed + 1.0, amp),
    }
}

/// A rank-4 LoRA (alpha 8: factor 2) on four matrices of three blocks, and a delta patch with
/// a dense, a sparse and a low-rank change; the dense one on a matrix the LoRA changes too.
fn write_patches(m: &Model, dir: &TempDir) -> (PathBuf, PathBuf) {
    let mut lora = Vec::new();
    for (i, n) in [1usize, 4, 7].into_iter().enumerate() {
        for (j, s) in ["attn_q", "attn_v", "ffn_up", "ffn_down"]
            .iter()
            .enumerate()
        {
            let seed = (i * 4 + j) as f32;
            lora.push(low_rank(m, &format!("blk.{n}.{s}.weight"), 4, seed, 0.2));
        }
    }
    let lora_path = dir.join("lora.gguf");
    write_lora(&lora_path, "llama", "test lora", Some(8.0), &lora).unwrap();

    let (cols, rows) = (576, 576);
    let dense = DeltaEntry::Dense {
        base: "blk.4.attn_q.weight".into(),
        cols,
        rows,
        ty: GgmlType::F32,
        data: wave(cols * rows, 7.0, 0.15),
    };
    // 4000 distinct entries of the [576, 1536] ffn_gate (2311 is prime to 576 * 1536).
    let n: i32 = 576 * 1536;
    let (idx, val): (Vec<i32>, Vec<f32>) = (0..4000)
        .map(|i| (i * 2311 % n, if i % 2 == 0 { 0.2 } else { -0.15 }))
        .unzip();
    let sparse = DeltaEntry::Sparse {
        base: "blk.2.ffn_gate.weight".into(),
        idx,
        val,
    };
    let lr = DeltaEntry::LowRank(low_rank(m, "blk.5.attn_output.weight", 2, 3.0, 0.2));
    let delta_path = dir.join("delta.gguf");
    write_delta(&delta_path, "llama", "test delta", &[dense, sparse, lr]).unwrap();
    (lora_path, delta_path)
}

/// The two patches, loaded for baking, with their scales.
fn parts(m: &Model, lora: &Path, delta: &Path) -> Vec<(Arc<Patch>, f32)> {
    bake::load_patches(m, &[(lora.to_path_buf(), 1.0), (delta.to_path_buf(), 0.7)]).unwrap()
}

fn do_bake(
    m: &Model,
    path: &Path,
    parts: &[(Arc<Patch>, f32)],
    ty: BakeType,
    out: &Path,
) -> BakeReport {
    let r = bake::bake(m, Some(path), parts, ty, out, &|_, _| {}).unwrap();
    for t in &r.changed {
        print_tensor(t);
    }
    r
}

fn print_tensor(t: &TensorReport) {
    println!(
        "  {:<26} {} -> {}  |dW|/|W| {:.4}  error {:.5}  kept {:.4}  residual {:.4}",
        t.name, t.ty_in, t.ty_out, t.delta_rel, t.error, t.kept, t.residual
    );
}

/// Names of the tensors `r` merged.
fn changed(r: &BakeReport) -> Vec<&str> {
    r.changed.iter().map(|t| t.name.as_str()).collect()
}

/// Every tensor of `base` that is not in `skip` is in `baked` with the same type, shape and
/// bytes.
fn assert_copied(base: &GgufFile, baked: &GgufFile, skip: &[&str]) -> usize {
    let mut n = 0;
    for t in base
        .tensors()
        .iter()
        .filter(|t| !skip.contains(&t.name.as_str()))
    {
        let b = baked
            .tensor(&t.name)
            .unwrap_or_else(|| panic!("{} missing", t.name));
        assert_eq!((b.ty, &b.shape), (t.ty, &t.shape), "{}", t.name);
        assert!(
            base.tensor_data(t) == baked.tensor_data(b),
            "{}: bytes differ",
            t.name
        );
        n += 1;
    }
    n
}

#[test]
fn f16_bake_matches_runtime_patches() {
    let dir = TempDir::new("f16");
    let (m, path) = base();
    let (lora, delta) = write_patches(&m, &dir);
    let parts = parts(&m, &lora, &delta);
    let out = dir.join("baked-f16.gguf");
    let r = do_bake(&m, &path, &parts, BakeType::F16, &out);

    // 12 LoRA matrices, of which blk.4.attn_q.weight also has the dense delta; 2 more deltas.
    assert_eq!(r.changed.len(), 14, "{:?}", changed(&r));
    assert!(!r.head_copied);
    for t in &r.changed {
        assert_eq!(
            (t.ty_in, t.ty_out),
            (GgmlType::Q4_1, GgmlType::F16),
            "{}",
            t.name
        );
        assert!(t.delta_rel > 0.01, "{}: delta too small to test", t.name);
        assert!(t.error < 1e-3, "{}: f16 error {}", t.name, t.error);
        assert!((t.kept - 1.0).abs() < 1e-2, "{}: kept {}", t.name, t.kept);
        assert!(t.residual < 2e-2, "{}: residual {}", t.name, t.residual);
        assert_eq!(t.survival(), Survival::Kept, "{}", t.name);
    }
    let q4 = r
        .changed
        .iter()
        .find(|t| t.name == "blk.4.attn_q.weight")
        .unwrap();
    assert_eq!(q4.n_deltas, 2);

    let toks = prompt(&m);
    let plain = log_probs(&m, &[], &toks);
    let runtime = log_probs(&m, &parts, &toks);
    let baked = open(&out);
    let lp_baked = log_probs(&baked, &[], &toks);
    let effect = max_abs_diff(&plain, &runtime);
    let diff = max_abs_diff(&lp_baked, &runtime);
    println!(
        "f16 bake: max |log p(baked) - log p(runtime)| = {diff:.5} over {} positions x {} \
         tokens; the patches themselves move log p by up to {effect:.3}",
        toks.len(),
        m.cfg.n_vocab
    );
    assert!(
        effect > 1.0,
        "the patches should change the outputs visibly: {effect}"
    );
    assert!(
        diff < 0.05,
        "baked f16 differs from the runtime patches by {diff}"
    );

    // Everything else is a byte copy, and the metadata says what was baked.
    let names = changed(&r);
    let n = assert_copied(&m.file, &baked.file, &names);
    assert_eq!(n, r.copied);
    assert_eq!(baked.file.tensors().len(), m.file.tensors().len());
    assert!(baked.file.tensor("output.weight").is_none());
    let name = baked.file.get_str("general.name").unwrap();
    assert!(name.ends_with(" (baked)"), "{name}");
    assert_eq!(baked.file.get_str("lethe.baked.type").unwrap(), "f16");
    match baked.file.get("lethe.baked.patches") {
        Some(Value::Array(a)) => assert_eq!(a.len(), 2),
        other => panic!("lethe.baked.patches: {other:?}"),
    }
    assert_eq!(
        r.bytes,
        std::fs::metadata(&out).unwrap().len(),
        "reported size"
    );

    // llama.cpp's reader: the changed tensors are F16 of the same shape, the others have the
    // base's bytes.
    let dump = python_dump(&out);
    let base_dump = python_dump(&path);
    let tensors = dump["tensors"].as_array().unwrap();
    let base_tensors = base_dump["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), base_tensors.len());
    for t in tensors {
        let tname = t["name"].as_str().unwrap();
        let b = base_tensors
            .iter()
            .find(|b| b["name"] == t["name"])
            .unwrap();
        assert_eq!(t["shape"], b["shape"], "{tname}");
        if names.contains(&tname) {
            assert_eq!(t["type"], GgmlType::F16 as u32, "{tname}");
        } else {
            assert_eq!(
                (&t["type"], &t["sha256"]),
                (&b["type"], &b["sha256"]),
                "{tname}"
            );
        }
    }
}

/// The requantization error `E = Q(W + dW) - (W + dW)` of tensor `name` in `baked`
/// (`[cols, rows]`), checking on the way that every row of it is exactly `Q(W + dW)`: ggml's
/// rounding of the base row plus the scaled deltas.
fn requantization_error(
    base: &GgufFile,
    baked: &GgufFile,
    parts: &[(Arc<Patch>, f32)],
    name: &str,
) -> (usize, usize, Vec<f32>) {
    let (t, tb) = (base.tensor(name).unwrap(), baked.tensor(name).unwrap());
    let (cols, rows) = (t.row_len(), t.n_rows() as usize);
    let (rb, rbb) = (t.ty.row_bytes(cols), tb.ty.row_bytes(cols));
    let (data, data_b) = (base.tensor_data(t), baked.tensor_data(tb));
    let mut err = vec![0.0f32; cols * rows]; // [cols, rows]
    let (mut w, mut q, mut tmp) = (vec![0.0f32; cols], vec![0.0f32; cols], Vec::new());
    let mut expect = vec![0u8; rbb];
    for r in 0..rows {
        dequantize_row(t.ty, &data[r * rb..(r + 1) * rb], &mut w).unwrap();
        let mut d = vec![0.0f32; cols];
        for (p, s) in parts {
            for delta in p.tensors.iter().filter(|d| d.target.tensor_name() == name) {
                delta.add_row(r, *s, &mut d, &mut tmp);
            }
        }
        let merged: Vec<f32> = w.iter().zip(&d).map(|(w, d)| w + d).collect();
        quantize_row(tb.ty, &merged, &mut expect).unwrap();
        let row_b = &data_b[r * rbb..(r + 1) * rbb];
        assert!(row_b == &expect[..], "{name}: row {r} is not Q(W + dW)");
        dequantize_row(tb.ty, row_b, &mut q).unwrap();
        for c in 0..cols {
            err[r * cols + c] = q[c] - merged[c];
        }
    }
    (cols, rows, err)
}

/// `err` (`[cols, rows]`) with its rows rotated by `shift`.
fn rotate_rows(cols: usize, rows: usize, err: &[f32], shift: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; cols * rows];
    for r in 0..rows {
        let dst = (r + shift) % rows;
        out[dst * cols..(dst + 1) * cols].copy_from_slice(&err[r * cols..(r + 1) * cols]);
    }
    out
}

#[test]
fn keep_bake_is_within_the_requantization_error() {
    let dir = TempDir::new("keep");
    let (m, path) = base();
    let (lora, delta) = write_patches(&m, &dir);
    let parts = parts(&m, &lora, &delta);
    let toks = prompt(&m);
    let v = m.cfg.n_vocab;
    let plain = log_probs(&m, &[], &toks);
    let runtime = log_probs(&m, &parts, &toks);
    let effect = mean_kl(&runtime, &plain, v);

    let out = dir.join("baked-keep.gguf");
    println!("keep:");
    let r = do_bake(&m, &path, &parts, BakeType::Keep, &out);
    for t in &r.changed {
        assert_eq!(
            (t.ty_in, t.ty_out),
            (GgmlType::Q4_1, GgmlType::Q4_1),
            "{}",
            t.name
        );
        assert!(t.error < 0.2, "{}: Q4_1 error {}", t.name, t.error);
    }
    let baked = open(&out);
    let lp_keep = log_probs(&baked, &[], &toks);
    let kl = mean_kl(&runtime, &lp_keep, v);
    let max_keep = max_abs_diff(&lp_keep, &runtime);

    let out8 = dir.join("baked-q8_0.gguf");
    println!("q8_0:");
    let r8 = do_bake(&m, &path, &parts, BakeType::Q8_0, &out8);
    for t in &r8.changed {
        assert_eq!(t.ty_out, GgmlType::Q8_0, "{}", t.name);
        assert!(t.error < 1e-2, "{}: Q8_0 error {}", t.name, t.error);
        assert!((t.kept - 1.0).abs() < 0.05, "{}: kept {}", t.name, t.kept);
    }
    let lp8 = log_probs(&open(&out8), &[], &toks);
    let kl8 = mean_kl(&runtime, &lp8, v);
    let max8 = max_abs_diff(&lp8, &runtime);

    // The bound. Requantizing W + dW to Q4_1 adds an error E = Q(W + dW) - (W + dW) to every
    // changed matrix (checked above to be exactly ggml's rounding), of the size of Q4_1's
    // step. What an error of that size does to the outputs is measured on stand-ins: E with
    // its rows rotated (the same size and statistics, not correlated with the actual error),
    // added at run time to the runtime patches; the reference is the mean over three
    // rotations. The baked model must be as close to the runtime patches as such noise is,
    // within a factor 2 for the spread between draws (measured: 0.7 to 1.4 times the mean).
    // The measure is the mean KL divergence over the prompt's positions, which weighs tokens
    // by their probability: the largest difference over the whole vocabulary is set by tokens
    // of log p near -30, which any noise of this size moves by several units (printed too).
    // A bake that lost the deltas is off by the patches' own effect, checked to be above the
    // bound, so the test can fail.
    let errors: Vec<(usize, usize, Vec<f32>)> = changed(&r)
        .iter()
        .map(|n| requantization_error(&m.file, &baked.file, &parts, n))
        .collect();
    let mut noise_kl = Vec::new();
    let mut noise_max: f64 = 0.0;
    for shift in [1usize, 7, 31] {
        let entries: Vec<DeltaEntry> = changed(&r)
            .iter()
            .zip(&errors)
            .map(|(n, (cols, rows, e))| DeltaEntry::Dense {
                base: n.to_string(),
                cols: *cols,
                rows: *rows,
                ty: GgmlType::F32,
                data: rotate_rows(*cols, *rows, e, shift),
            })
            .collect();
        let noise = dir.join(&format!("noise{shift}.gguf"));
        write_delta(&noise, "llama", "requantization-sized noise", &entries).unwrap();
        let mut with_noise = parts.clone();
        with_noise.push((Arc::new(patch::load(&noise, &m).unwrap()), 1.0));
        let lp_noise = log_probs(&m, &with_noise, &toks);
        noise_kl.push(mean_kl(&runtime, &lp_noise, v));
        noise_max = noise_max.max(max_abs_diff(&lp_noise, &runtime));
    }
    let reference = noise_kl.iter().sum::<f64>() / noise_kl.len() as f64;
    let bound = 2.0 * reference;
    println!(
        "keep (Q4_1) bake: mean KL(runtime || baked) = {kl:.5}; requantization-sized noise: \
         {noise_kl:.5?} (bound 2 x {reference:.5} = {bound:.5}); q8_0 bake: {kl8:.6}; the \
         patches themselves: {effect:.5}"
    );
    println!(
        "  max |log p - log p(runtime)|: keep {max_keep:.3}, noise {noise_max:.3}, q8_0 \
         {max8:.3}"
    );
    assert!(
        effect > bound,
        "the patches' effect {effect} should exceed the bound {bound}"
    );
    assert!(kl <= bound, "keep bake: KL {kl} > {bound}");
    // Q8_0's step is about a sixteenth of Q4_1's: its KL (quadratic in the error) is far lower.
    assert!(kl8 < kl / 20.0, "q8_0 KL {kl8} vs Q4_1 {kl}");
}

#[test]
fn tied_embedding_delta_keeps_the_head() {
    let dir = TempDir::new("embd");
    let (m, path) = base();
    assert!(
        m.file.tensor("output.weight").is_none(),
        "SmolLM2 ties its embeddings"
    );
    let delta = dir.join("embd.gguf");
    let e = DeltaEntry::LowRank(low_rank(&m, "token_embd.weight", 2, 5.0, 0.15));
    write_delta(&delta, "llama", "embedding delta", &[e]).unwrap();
    let parts = bake::load_patches(&m, &[(delta, 1.0)]).unwrap();
    let out = dir.join("baked.gguf");
    let r = do_bake(&m, &path, &parts, BakeType::F16, &out);
    assert_eq!(changed(&r), ["token_embd.weight"]);
    assert!(r.head_copied);

    let baked = open(&out);
    let (f, bf) = (&*m.file, &*baked.file);
    let (embd, head) = (
        bf.tensor("token_embd.weight").unwrap(),
        bf.tensor("output.weight").unwrap(),
    );
    let orig = f.tensor("token_embd.weight").unwrap();
    assert_eq!(embd.ty, GgmlType::F16);
    assert_eq!((head.ty, &head.shape), (orig.ty, &orig.shape));
    assert!(
        bf.tensor_data(head) == f.tensor_data(orig),
        "output.weight is not the original"
    );
    assert_copied(f, bf, &["token_embd.weight"]);

    let toks = prompt(&m);
    let runtime = log_probs(&m, &parts, &toks);
    let effect = max_abs_diff(&log_probs(&m, &[], &toks), &runtime);
    let diff = max_abs_diff(&log_probs(&baked, &[], &toks), &runtime);
    println!("tied embedding delta, f16: max |log p(baked) - log p(runtime)| = {diff:.5}; the delta moves log p by {effect:.3}");
    assert!(effect > 1.0, "{effect}");
    assert!(diff < 0.05, "{diff}");

    let dump = python_dump(&out);
    let t = dump["tensors"].as_array().unwrap();
    let get = |n: &str| t.iter().find(|x| x["name"] == n).unwrap().clone();
    assert_eq!(get("output.weight")["type"], GgmlType::Q8_0 as u32);
    assert_eq!(get("token_embd.weight")["type"], GgmlType::F16 as u32);
    assert_eq!(
        get("output.weight")["shape"],
        get("token_embd.weight")["shape"]
    );
}

#[test]
fn tied_head_delta_keeps_the_embedding() {
    let dir = TempDir::new("head");
    let (m, path) = base();
    let delta = dir.join("head.gguf");
    let e = DeltaEntry::LowRank(low_rank(&m, "output.weight", 2, 9.0, 0.15));
    write_delta(&delta, "llama", "head delta", &[e]).unwrap();
    let parts = bake::load_patches(&m, &[(delta, 1.0)]).unwrap();
    let out = dir.join("baked.gguf");
    let r = do_bake(&m, &path, &parts, BakeType::F16, &out);
    assert_eq!(changed(&r), ["output.weight"]);
    assert_eq!(r.changed[0].base, "token_embd.weight");
    assert!(!r.head_copied);

    let baked = open(&out);
    let head = baked.file.tensor("output.weight").unwrap();
    assert_eq!(head.ty, GgmlType::F16);
    assert_copied(&m.file, &baked.file, &[]);

    let toks = prompt(&m);
    let runtime = log_probs(&m, &parts, &toks);
    let effect = max_abs_diff(&log_probs(&m, &[], &toks), &runtime);
    let diff = max_abs_diff(&log_probs(&baked, &[], &toks), &runtime);
    println!("tied head delta, f16: max |log p(baked) - log p(runtime)| = {diff:.5}; the delta moves log p by {effect:.3}");
    assert!(effect > 1.0, "{effect}");
    assert!(diff < 0.05, "{diff}");
}

#[test]
fn small_deltas_are_reported_lost_in_q4_1() {
    let dir = TempDir::new("small");
    let (m, path) = base();
    let lora = dir.join("small.gguf");
    let e = low_rank(&m, "blk.1.attn_v.weight", 4, 0.0, 0.2);
    write_lora(&lora, "llama", "small lora", None, &[e]).unwrap();
    // At scale 0.01 the delta is about 0.5% of the weight, far below Q4_1's step.
    let parts = bake::load_patches(&m, &[(lora, 0.01)]).unwrap();
    let keep = do_bake(&m, &path, &parts, BakeType::Keep, &dir.join("keep.gguf"));
    let f16 = do_bake(&m, &path, &parts, BakeType::F16, &dir.join("f16.gguf"));
    let (k, f) = (&keep.changed[0], &f16.changed[0]);
    assert!(k.delta_rel < 0.01, "{}", k.delta_rel);
    assert_eq!(k.survival(), Survival::Lost, "kept {}", k.kept);
    assert_eq!(
        f.survival(),
        Survival::Kept,
        "kept {} residual {}",
        f.kept,
        f.residual
    );
}

fn bake_err(m: &Model, path: &Path, parts: &[(Arc<Patch>, f32)], out: &Path) -> String {
    match bake::bake(m, Some(path), parts, BakeType::Keep, out, &|_, _| {}) {
        Ok(_) => panic!("baked"),
        Err(e) => e.to_string(),
    }
}

fn load_err(m: &Model, p: &Path) -> String {
    match bake::load_patches(m, &[(p.to_path_buf(), 1.0)]) {
        Ok(_) => panic!("loaded {}", p.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn what_cannot_be_baked_is_refused() {
    let dir = TempDir::new("refuse");
    let (m, path) = base();
    let out = dir.join("out.gguf");

    let cvec = dir.join("cvec.gguf");
    write_cvec(&cvec, "llama", &[(3, wave(576, 1.0, 0.1))]).unwrap();
    let e = load_err(&m, &cvec);
    println!("control vector: {e}");
    assert!(
        e.contains("cannot be baked") && e.contains("--control-vector"),
        "{e}"
    );
    // Also when it reaches bake itself.
    let p = Arc::new(patch::load(&cvec, &m).unwrap());
    let e = bake_err(&m, &path, &[(p, 1.0)], &out);
    assert!(e.contains("--control-vector"), "{e}");

    let other = dir.join("gemma.gguf");
    let mut lr = low_rank(&m, "blk.0.attn_q.weight", 2, 0.0, 0.1);
    write_lora(&other, "gemma3", "other arch", None, &[lr.clone()]).unwrap();
    let e = load_err(&m, &other);
    println!("other architecture: {e}");
    assert!(e.contains("architecture") && e.contains("gemma3"), "{e}");

    let shape = dir.join("shape.gguf");
    lr.cols = 640;
    lr.a = wave(lr.rank * 640, 0.0, 0.1);
    write_lora(&shape, "llama", "other shape", None, &[lr]).unwrap();
    let e = load_err(&m, &shape);
    println!("other shape: {e}");
    assert!(
        e.contains("blk.0.attn_q.weight") && e.contains("576"),
        "{e}"
    );

    let block = dir.join("block.gguf");
    let lr = low_rank(&m, "blk.0.attn_q.weight", 2, 0.0, 0.1);
    let lr = LowRankEntry {
        base: "blk.30.attn_q.weight".into(),
        ..lr
    };
    write_lora(&block, "llama", "no such block", None, &[lr]).unwrap();
    let e = load_err(&m, &block);
    println!("no such block: {e}");
    assert!(e.contains("blk.30.attn_q.weight"), "{e}");

    let (lora, _) = write_patches(&m, &dir);
    let p = Arc::new(patch::load(&lora, &m).unwrap());
    for parts in [vec![], vec![(p.clone(), 0.0)]] {
        let e = bake_err(&m, &path, &parts, &out);
        assert!(e.contains("nothing to bake"), "{e}");
    }
    let e = bake_err(&m, &path, &[(p.clone(), f32::NAN)], &out);
    assert!(e.contains("finite"), "{e}");
    assert!(!out.exists(), "a refused bake wrote {}", out.display());

    // Never over the base: a copy of it, baked onto itself.
    let copy = dir.join("base-copy.gguf");
    std::fs::copy(&path, &copy).unwrap();
    let mc = open(&copy);
    let e = bake_err(&mc, &copy, &[(p, 1.0)], &copy);
    println!("output = base: {e}");
    assert!(e.contains("replace the base model"), "{e}");
}
