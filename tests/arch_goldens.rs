//! Every architecture against llama.cpp: tiny random-weight F32 models
//! (tests/fixtures/goldens/arch/, README there) with llama.cpp's greedy runs and the top-20
//! log-probabilities of every step.
//!
//! The bar, per architecture: teacher-forced over `prompt_ids + ids`, every `top` entry's
//! log-probability within 0.05 of llama.cpp's (mean within 0.01); greedy decoding from the
//! prompt reproduces llama.cpp's ids at least up to the first step whose top-2 gap is under
//! 0.05 nats (a near-tie that rounding may break either way).

mod common;

use common::{fixture, ids};
use lethe::model::Model;

const ARCHS: [&str; 7] = ["llama", "qwen2", "qwen3", "phi3", "phi2", "gemma2", "olmo2"];

fn golden(arch: &str) -> serde_json::Value {
    let path = fixture(&format!("goldens/arch/{arch}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_json::from_str(&text).expect("golden json")
}

fn model(arch: &str) -> Model {
    Model::open(fixture(&format!("goldens/arch/{arch}.gguf")), 2)
        .unwrap_or_else(|e| panic!("{arch}: {e}"))
}

fn log_softmax(l: &[f32]) -> Vec<f64> {
    let lse = lethe_kernels::ops::logsumexp(l);
    l.iter().map(|&v| v as f64 - lse).collect()
}

/// `(max, mean)` |logprob difference| over all `top` entries, teacher-forced.
fn teacher_forced(arch: &str) -> (f64, f64, usize) {
    let m = model(arch);
    let g = golden(arch);
    let (mut max, mut sum, mut count) = (0f64, 0f64, 0usize);
    for p in g["prompts"].as_array().unwrap() {
        let prompt = ids(&p["prompt_ids"]);
        let gen = ids(&p["ids"]);
        let mut toks = prompt.clone();
        toks.extend_from_slice(&gen);
        let mut st = m.new_state(256);
        let mut all = Vec::new();
        m.forward(&mut st, &toks, Some(&mut all)).unwrap();
        let v = m.cfg.n_vocab;
        for (i, step) in p["steps"].as_array().unwrap().iter().enumerate() {
            let pos = prompt.len() - 1 + i;
            let lp = log_softmax(&all[pos * v..(pos + 1) * v]);
            for e in step["top"].as_array().unwrap() {
                let (id, want) = (e[0].as_u64().unwrap() as usize, e[1].as_f64().unwrap());
                let d = (lp[id] - want).abs();
                max = max.max(d);
                sum += d;
                count += 1;
            }
        }
    }
    (max, sum / count as f64, count)
}

/// Greedy ids from each prompt must equal llama.cpp's up to its first near-tie; returns the
/// steps compared and the steps equal in all.
fn greedy(arch: &str) -> (usize, usize) {
    let m = model(arch);
    let g = golden(arch);
    let (mut compared, mut equal) = (0, 0);
    for (pi, p) in g["prompts"].as_array().unwrap().iter().enumerate() {
        let prompt = ids(&p["prompt_ids"]);
        let want = ids(&p["ids"]);
        let steps = p["steps"].as_array().unwrap();
        // The first step whose golden top-2 gap is a near-tie: compare up to and including it
        // only when it is not one.
        let stop = steps
            .iter()
            .position(|s| {
                let t = s["top"].as_array().unwrap();
                t[0][1].as_f64().unwrap() - t[1][1].as_f64().unwrap() < 0.05
            })
            .unwrap_or(want.len());
        let mut st = m.new_state(256);
        let mut logits = m.forward(&mut st, &prompt, None).unwrap().to_vec();
        for (i, &w) in want.iter().enumerate() {
            let got = argmax(&logits);
            if i < stop {
                assert_eq!(
                    got,
                    w,
                    "{arch} prompt {pi} step {i}: greedy {got}, llama.cpp {w} (ids so far {:?})",
                    &want[..i]
                );
                compared += 1;
            }
            if got == w {
                equal += 1;
            }
            if i + 1 < want.len() {
                logits = m.forward(&mut st, &[w], None).unwrap().to_vec();
            }
        }
    }
    (compared, equal)
}

fn argmax(l: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in l.iter().enumerate() {
        if v > l[best] {
            best = i;
        }
    }
    best as u32
}

fn check(arch: &str) {
    let (max, mean, n) = teacher_forced(arch);
    let (compared, equal) = greedy(arch);
    println!(
        "{arch}: {n} top entries, max |dlogprob| {max:.4}, mean {mean:.4}; greedy {compared} steps \
         compared, {equal} equal to llama.cpp"
    );
    assert!(max <= 0.05, "{arch}: max |logprob diff| {max:.4} > 0.05");
    assert!(mean <= 0.01, "{arch}: mean |logprob diff| {mean:.4} > 0.01");
}

#[test]
fn llama() {
    check("llama");
}

#[test]
fn qwen2() {
    check("qwen2");
}

#[test]
fn qwen3() {
    check("qwen3");
}

#[test]
fn phi3() {
    check("phi3");
}

#[test]
fn phi2() {
    check("phi2");
}

#[test]
fn gemma2() {
    check("gemma2");
}

#[test]
fn olmo2() {
    check("olmo2");
}

#[test]
fn every_golden_is_tested() {
    let mut found: Vec<String> = std::fs::read_dir(fixture("goldens/arch"))
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            (p.extension()? == "gguf").then(|| p.file_stem().unwrap().to_string_lossy().into())
        })
        .collect();
    found.sort();
    let mut want: Vec<String> = ARCHS.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(found, want);
}

/// A batched decode step gives each sequence bit for bit what decoding it alone gives, on
/// every architecture (three sequences at different positions, over two steps).
#[test]
fn batched_decode_equals_alone() {
    for arch in ARCHS {
        let m = model(arch);
        let g = golden(arch);
        let prompts: Vec<Vec<u32>> = (0..3)
            .map(|i| ids(&g["prompts"][i]["prompt_ids"]))
            .collect();
        let mut alone: Vec<_> = prompts.iter().map(|_| m.new_state(64)).collect();
        let mut batch: Vec<_> = prompts.iter().map(|_| m.new_state(64)).collect();
        for (i, p) in prompts.iter().enumerate() {
            m.forward(&mut alone[i], p, None).unwrap();
            m.forward(&mut batch[i], p, None).unwrap();
        }
        for step in 0..2u32 {
            let toks: Vec<u32> = (0..3).map(|i| 10 + 7 * i + step).collect();
            for (i, st) in alone.iter_mut().enumerate() {
                m.forward(st, &[toks[i]], None).unwrap();
            }
            let mut refs: Vec<&mut lethe::model::State> = batch.iter_mut().collect();
            m.forward_multi(&mut refs, &toks).unwrap();
            for i in 0..3 {
                assert_eq!(
                    alone[i].logits, batch[i].logits,
                    "{arch} sequence {i} step {step}"
                );
            }
        }
    }
}

/// The tiny phi3 with LongRoPE's tensors and keys added: `rope_factors_short`/`_long`
/// (`[n_rot/2]`), `rope.scaling.attn_factor`, `rope.scaling.original_context_length`.
fn phi3_longrope(short: &[f32], long: &[f32], attn_factor: f32, n_ctx_orig: u32) -> Model {
    use lethe::gguf::{GgufFile, GgufWriter};
    use lethe_kernels::quant::GgmlType;
    use std::sync::Arc;
    let src = GgufFile::open(fixture("goldens/arch/phi3.gguf")).unwrap();
    let mut w = GgufWriter::from_gguf(&src).unwrap();
    let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let n = short.len() as u64;
    w.add_tensor(
        "rope_factors_short.weight",
        &[n],
        GgmlType::F32,
        bytes(short),
    )
    .unwrap();
    w.add_tensor("rope_factors_long.weight", &[n], GgmlType::F32, bytes(long))
        .unwrap();
    w.set("phi3.rope.scaling.attn_factor", attn_factor).unwrap();
    w.set("phi3.rope.scaling.original_context_length", n_ctx_orig)
        .unwrap();
    let f = Arc::new(GgufFile::from_bytes(w.to_bytes().unwrap()).unwrap());
    Model::from_file(f, Arc::new(lethe::pool::ThreadPool::new(1))).unwrap()
}

/// Logits of the first golden prompt with a context of `n_ctx`.
fn logits(m: &Model, n_ctx: usize) -> Vec<f32> {
    let prompt = ids(&golden("phi3")["prompts"][2]["prompt_ids"]);
    let mut st = m.new_state(n_ctx);
    m.forward(&mut st, &prompt, None).unwrap().to_vec()
}

/// LongRoPE: factors of 1 and an attention factor of 1 change nothing; the short factors
/// apply up to the trained context and the long ones above it (as llama.cpp picks them by the
/// context size); the attention factor scales the rotated pairs.
#[test]
fn phi3_longrope_factors() {
    let plain = logits(&model("phi3"), 64);
    let half = 16; // n_rot 32
    let ones = vec![1.0f32; half];
    assert_eq!(logits(&phi3_longrope(&ones, &ones, 1.0, 32), 64), plain);
    let short: Vec<f32> = (0..half).map(|i| 1.0 + 0.5 * i as f32).collect();
    let long: Vec<f32> = (0..half).map(|i| 1.0 + 3.0 * i as f32).collect();
    let m = phi3_longrope(&short, &long, 1.0, 32);
    let (at_orig, above) = (logits(&m, 32), logits(&m, 64));
    assert_eq!(at_orig, logits(&phi3_longrope(&short, &short, 1.0, 32), 32));
    assert_eq!(above, logits(&phi3_longrope(&long, &long, 1.0, 32), 64));
    assert_ne!(
        at_orig, above,
        "the long factors differ from the short ones"
    );
    assert_ne!(at_orig, plain);
    let scaled = logits(&phi3_longrope(&ones, &ones, 1.2, 32), 64);
    assert_ne!(
        scaled, plain,
        "the attention factor scales q and k's rotated pairs"
    );
}
