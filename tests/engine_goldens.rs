//! The forward pass against the goldens: teacher-forced logprobs against the exact f64
//! reference, argmax agreement, and greedy generation against llama.cpp's text.

mod common;

use common::{goldens, ids, model_path};
use lethe::model::{Model, Precision};

struct Figures {
    mean_abs: f64,
    max_abs: f64,
    argmax_agree: usize,
    steps: usize,
    confident_miss: usize,
}

fn log_softmax_at(logits: &[f32], id: usize) -> f64 {
    logits[id] as f64 - lethe_kernels::ops::logsumexp(logits)
}

fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

/// The exact top-2 gap of a step, from the reference logprobs of llama.cpp's top ten.
fn ref_gap(step: &serde_json::Value) -> f64 {
    let mut r: Vec<f64> = step["ref"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[1].as_f64().unwrap())
        .collect();
    r.sort_by(|a, b| b.partial_cmp(a).unwrap());
    r[0] - r[1]
}

fn teacher_forced(name: &str, precision: Precision) -> Figures {
    let g = goldens(name);
    let mut model = Model::open(model_path(name), 2).unwrap();
    model.precision = precision;
    let v = model.cfg.n_vocab;
    let (mut sum, mut count, mut max_abs) = (0.0, 0usize, 0.0f64);
    let (mut agree, mut steps, mut confident_miss) = (0, 0, 0);
    for run in g["greedy"].as_array().unwrap() {
        let prompt = ids(&run["prompt_ids"]);
        let out = ids(&run["ids"]);
        let mut tokens = prompt.clone();
        tokens.extend_from_slice(&out[..out.len() - 1]);
        let mut st = model.new_state(512);
        let mut all = Vec::new();
        model.forward(&mut st, &tokens, Some(&mut all)).unwrap();
        for (i, step) in run["steps"].as_array().unwrap().iter().enumerate() {
            let row = &all[(prompt.len() - 1 + i) * v..(prompt.len() + i) * v];
            for pair in step["ref"].as_array().unwrap() {
                let id = pair[0].as_u64().unwrap() as usize;
                let err = (log_softmax_at(row, id) - pair[1].as_f64().unwrap()).abs();
                sum += err;
                count += 1;
                max_abs = max_abs.max(err);
            }
            let ours = argmax(row);
            let exact = step["ref_argmax"].as_u64().unwrap() as usize;
            steps += 1;
            if ours == exact {
                agree += 1;
            } else if ref_gap(step) > 0.5 {
                confident_miss += 1;
            }
        }
    }
    Figures {
        mean_abs: sum / count as f64,
        max_abs,
        argmax_agree: agree,
        steps,
        confident_miss,
    }
}

/// `--precise` must meet the goldens' bar: mean error no larger than llama.cpp's, none above
/// 1.0, the exact argmax wherever the top-2 gap exceeds 0.5 nats, and at least as many argmax
/// agreements as llama.cpp. The default path quantizes activations to 8 bits exactly as
/// llama.cpp does, so it is held to llama.cpp's own figures within run-to-run noise (10% on the
/// mean, 1.5 nats at most), with the same argmax rules.
fn check_parity(name: &str, precision: Precision) {
    let g = goldens(name);
    let lc = &g["llama_cpp_vs_ref"];
    let f = teacher_forced(name, precision);
    eprintln!(
        "{name} {precision:?}: mean |err| {:.4} (llama.cpp {}), max {:.4} (llama.cpp {}), argmax {}/{} (llama.cpp {}/{}), confident misses {}",
        f.mean_abs, lc["mean_abs"], f.max_abs, lc["max_abs"], f.argmax_agree, f.steps, lc["argmax_agree"], lc["steps"], f.confident_miss
    );
    assert_eq!(f.steps as u64, lc["steps"].as_u64().unwrap());
    let (mean_bound, max_bound) = match precision {
        Precision::Exact => (lc["mean_abs"].as_f64().unwrap(), 1.0),
        Precision::Fast => (1.1 * lc["mean_abs"].as_f64().unwrap(), 1.5),
    };
    assert!(
        f.mean_abs <= mean_bound,
        "mean error {} above {mean_bound}",
        f.mean_abs
    );
    assert!(
        f.max_abs <= max_bound,
        "max error {} above {max_bound}",
        f.max_abs
    );
    assert_eq!(
        f.confident_miss, 0,
        "argmax differs where the exact top-2 gap exceeds 0.5"
    );
    assert!(f.argmax_agree as u64 >= lc["argmax_agree"].as_u64().unwrap());
}

/// Greedy decoding from the prompt must reproduce llama.cpp's tokens up to the first step
/// whose exact top-2 gap is below 0.5 nats.
fn check_greedy(name: &str, precision: Precision) {
    let g = goldens(name);
    let mut model = Model::open(model_path(name), 2).unwrap();
    model.precision = precision;
    let tok = lethe::tokenizer::Tokenizer::from_gguf(&model.file).unwrap();
    for run in g["greedy"].as_array().unwrap() {
        let prompt = ids(&run["prompt_ids"]);
        let want = ids(&run["ids"]);
        let steps = run["steps"].as_array().unwrap();
        let decided = steps
            .iter()
            .position(|s| ref_gap(s) < 0.5)
            .unwrap_or(steps.len());
        let mut st = model.new_state(512);
        let mut logits = model.forward(&mut st, &prompt, None).unwrap().to_vec();
        // Decode as far as llama.cpp did, to report how far the two agree in all.
        let mut got = Vec::new();
        for _ in 0..want.len() {
            let next = argmax(&logits) as u32;
            got.push(next);
            if got.len() == want.len() {
                break;
            }
            logits = model.forward(&mut st, &[next], None).unwrap().to_vec();
        }
        let agree = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
        got.truncate(decided);
        assert_eq!(
            got,
            want[..decided],
            "{name}: greedy run from {:?} diverged",
            run["prompt"]
        );
        // The same as text: llama.cpp's content up to that step's offset.
        if decided > 0 {
            let chars = run["prefix_chars"][decided - 1].as_u64().unwrap() as usize;
            let want_text: String = run["content"]
                .as_str()
                .unwrap()
                .chars()
                .take(chars)
                .collect();
            let got_text = tok.decode(&got, false);
            assert_eq!(got_text, want_text);
        }
        eprintln!(
            "{name}: greedy matches llama.cpp through the first near-tie ({decided} tokens), {agree}/{} in all",
            want.len()
        );
    }
}

#[test]
fn smollm2_teacher_forced_fast() {
    check_parity("smollm2", Precision::Fast);
}

#[test]
fn smollm2_teacher_forced_exact() {
    check_parity("smollm2", Precision::Exact);
}

#[test]
fn gemma3_teacher_forced_fast() {
    check_parity("gemma3", Precision::Fast);
}

#[test]
fn gemma3_teacher_forced_exact() {
    check_parity("gemma3", Precision::Exact);
}

#[test]
fn smollm2_greedy() {
    check_greedy("smollm2", Precision::Fast);
}

#[test]
fn gemma3_greedy() {
    check_greedy("gemma3", Precision::Fast);
}
