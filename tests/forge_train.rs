//! LoRA training (`lethe::forge::train::{optim, trainer, data}`, `lethe forge finetune`,
//! `lethe forge uld`): AdamW and the schedule against steps computed by hand, the loop on the
//! tiny model of `common::tiny` (the loss falls; a seed fixes the adapter's bytes; the written
//! adapter, loaded by the engine as a patch, computes what was trained), the readers, and both
//! commands on SmolLM2 with a handful of TOFU rows.

mod common;

use common::forge::{lethe, mean_nll};
use common::tiny::{tiny, N_LAYER, VOCAB};
use common::{fixture, model_path, TempDir};
use lethe::forge::train::data::{
    answer_sequence, end_of_turn, read_paraphrases, read_wrong_answers, uniform_sequence,
};
use lethe::forge::train::trainer::Progress;
use lethe::forge::train::trainer::{batch_grad, factors};
use lethe::forge::train::{
    eval_loss, train, AdamW, AdamWConfig, Balance, Decay, Lora, Schedule, Sequence, Target,
    TrainConfig, TrainModel,
};
use lethe::model::{Model, Precision, Proj};
use lethe::patch::PatchSet;
use lethe::qa::{read_examples, Example};
use lethe::tokenizer::Tokenizer;
use lethe_kernels::quant::GgmlType;
use std::process::Command;
use std::sync::Arc;

// ---------------------------------------------------------------------------------------------
// AdamW and the schedule

/// Two AdamW steps on a few entries, against the update written out by hand in f64: the first
/// step of Adam moves every entry by `lr` against the sign of its gradient (`m^ = g`,
/// `sqrt(v^) = |g|`), after the decoupled decay `p *= 1 - lr * wd`; the second uses both
/// moments. Clipping scales the whole gradient by `max / (||g|| + 1e-6)` when `||g|| > max`.
#[test]
fn adamw_matches_hand_computed_steps() {
    let m = tiny(GgmlType::F32, false, 3);
    let mut lora = Lora::new(&m, [0], &[Proj::Q], 2, 4.0, 1).unwrap();
    let (lr, wd) = (0.01f32, 0.1f32);
    let sched = Schedule {
        lr,
        warmup: 0,
        total: 100,
        decay: Decay::Constant,
    };
    let cfg = AdamWConfig {
        weight_decay: wd,
        max_grad_norm: Some(1.0),
        ..AdamWConfig::default()
    };
    let mut opt = AdamW::new(&lora, cfg, sched).unwrap();
    let p0_a = lora.params[0].a.clone();
    let p0_b = vec![0.5f32; lora.params[0].b.len()];
    lora.params[0].b = p0_b.clone();
    // Gradients with a global norm of 10 (clipped to 1), then 0.5 (not clipped).
    let g1: Vec<f32> = (0..p0_a.len())
        .map(|i| if i % 2 == 0 { 1.0 } else { -1.0 })
        .collect();
    let g1_b = vec![0f32; p0_b.len()];
    let norm1 = ((g1.len()) as f64).sqrt();
    let s1 = 10.0 / norm1;
    lora.params[0].grad_a = g1.iter().map(|&g| (g as f64 * s1) as f32).collect();
    lora.params[0].grad_b = g1_b.clone();
    let info = opt.step(&mut lora).unwrap();
    assert!((info.grad_norm - 10.0).abs() < 1e-4, "{}", info.grad_norm);
    assert_eq!(info.lr, lr);
    let clip = 1.0 / (10.0 + 1e-6);
    let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
    let (lr, wd) = (lr as f64, wd as f64);
    let mut want_a = Vec::new();
    let mut state = Vec::new();
    for (i, &p) in p0_a.iter().enumerate() {
        let g = g1[i] as f64 * s1 * clip;
        // The gradient is left as clipped.
        assert!((lora.params[0].grad_a[i] as f64 - g).abs() < 1e-7);
        let (mm, vv) = ((1.0 - b1) * g, (1.0 - b2) * g * g);
        let p1 =
            p as f64 * (1.0 - lr * wd) - lr * (mm / (1.0 - b1)) / ((vv / (1.0 - b2)).sqrt() + eps);
        // = p (1 - lr wd) - lr sign(g), up to eps.
        assert!((p1 - (p as f64 * (1.0 - lr * wd) - lr * g.signum())).abs() < 1e-8);
        want_a.push(p1);
        state.push((mm, vv));
    }
    for (i, &p) in p0_a.iter().enumerate() {
        let _ = p;
        assert!(
            (lora.params[0].a[i] as f64 - want_a[i]).abs() < 1e-6,
            "a[{i}]"
        );
    }
    // B had no gradient: only the decay moved it.
    for (&b, &b0) in lora.params[0].b.iter().zip(&p0_b) {
        assert!((b as f64 - b0 as f64 * (1.0 - lr * wd)).abs() < 1e-7);
    }

    // Step 2: a small gradient, no clipping.
    let g2: Vec<f32> = (0..p0_a.len()).map(|i| 0.01 * (i % 5) as f32).collect();
    let n2 = g2.iter().map(|&g| (g as f64).powi(2)).sum::<f64>().sqrt();
    assert!(n2 < 1.0);
    lora.params[0].grad_a = g2.clone();
    lora.params[0].grad_b = g1_b;
    let a1: Vec<f32> = lora.params[0].a.clone();
    let info = opt.step(&mut lora).unwrap();
    assert!((info.grad_norm - n2).abs() < 1e-6);
    for i in 0..a1.len() {
        let g = g2[i] as f64;
        let (m0, v0) = state[i];
        let mm = b1 * m0 + (1.0 - b1) * g;
        let vv = b2 * v0 + (1.0 - b2) * g * g;
        let (bc1, bc2) = (1.0 - b1 * b1, 1.0 - b2 * b2);
        let want = a1[i] as f64 * (1.0 - lr * wd) - lr * (mm / bc1) / ((vv / bc2).sqrt() + eps);
        assert!(
            (lora.params[0].a[i] as f64 - want).abs() < 1e-6,
            "a[{i}]: {} vs {want}",
            lora.params[0].a[i]
        );
    }
    assert_eq!(opt.step, 2);
}

/// `transformers`' schedules: linear warm-up from 0, then linear or cosine decay to 0.
#[test]
fn schedule_warms_up_then_decays() {
    let lin = Schedule {
        lr: 2e-4,
        warmup: 4,
        total: 20,
        decay: Decay::Linear,
    };
    let close = |a: f32, b: f64| (a as f64 - b).abs() < 1e-10;
    assert!(close(lin.lr_at(0), 0.0));
    assert!(close(lin.lr_at(1), 0.5e-4));
    assert!(close(lin.lr_at(4), 2e-4));
    assert!(close(lin.lr_at(12), 1e-4));
    assert!(close(lin.lr_at(19), 2e-4 / 16.0));
    assert!(close(lin.lr_at(20), 0.0));
    let cos = Schedule {
        decay: Decay::Cosine,
        ..lin
    };
    assert!(close(cos.lr_at(2), 1e-4));
    assert!(close(cos.lr_at(12), 1e-4));
    let q = 0.5 * (1.0 + (std::f64::consts::PI / 4.0).cos());
    assert!(close(cos.lr_at(8), 2e-4 * q));
    assert_eq!(Schedule::warmup_steps(0.1, 20), 2);
    assert_eq!(Schedule::warmup_steps(0.1, 21), 3);
}

// ---------------------------------------------------------------------------------------------
// The loop on the tiny model

/// Memorise a few fixed token sequences (cross-entropy on their second half), with a uniform
/// side on two others.
fn tiny_data() -> Vec<Sequence> {
    let mut out = Vec::new();
    for k in 0..6u32 {
        let tokens: Vec<u32> = (0..10)
            .map(|i| (k * 7 + i * 3 + 1) % VOCAB as u32)
            .collect();
        let labels = (0..10)
            .map(|t| (t >= 4 && t + 1 < 10).then(|| tokens[t + 1]))
            .collect();
        out.push(Sequence {
            tokens,
            target: Target::Labels(labels),
            weight: 1.0,
        });
    }
    for k in 0..2u32 {
        let tokens: Vec<u32> = (0..8)
            .map(|i| (k * 11 + i * 5 + 2) % VOCAB as u32)
            .collect();
        out.push(Sequence {
            target: Target::Uniform(vec![true; 8]),
            tokens,
            weight: 0.5,
        });
    }
    out
}

fn tiny_config(seed: u64, epochs: usize) -> TrainConfig {
    TrainConfig {
        epochs,
        batch: 3,
        seed,
        lr: 1e-2,
        warmup_ratio: 0.1,
        decay: Decay::Linear,
        adamw: AdamWConfig::default(),
        balance: Balance::Group,
        pack: true,
        checks: 1,
    }
}

/// Train an adapter of rank 4 on every matrix of the tiny model; the model keeps it.
fn train_tiny<'m>(m: &'m Model, seed: u64, epochs: usize) -> (TrainModel<'m>, Vec<f64>) {
    let lora = Lora::new(m, 0..N_LAYER, &Proj::ALL, 4, 8.0, seed).unwrap();
    let mut tm = TrainModel::new(m, lora).unwrap();
    let mut seen = 0;
    let mut cb = |p: &Progress| {
        seen += 1;
        assert_eq!(p.step, seen);
        assert!(p.tokens > 0 && p.last.loss.is_finite());
    };
    let report = train(&mut tm, &tiny_data(), &tiny_config(seed, epochs), &mut cb).unwrap();
    assert_eq!(report.steps.len(), epochs * 3); // 8 sequences, batches of 3
    assert_eq!(seen, report.steps.len());
    let losses = (0..epochs).map(|e| report.epoch_loss(e).unwrap()).collect();
    (tm, losses)
}

#[test]
fn training_lowers_the_loss_on_the_tiny_model() {
    let m = tiny(GgmlType::Q8_0, true, 21);
    let (_, losses) = train_tiny(&m, 0, 12);
    eprintln!("epoch losses: {losses:.3?}");
    assert!(
        losses[11] < 0.5 * losses[0],
        "the loss did not fall: {losses:?}"
    );
    // Mostly monotone: each of the last epochs below the first ones.
    assert!(losses[8..].iter().all(|&l| l < losses[1]));
}

/// The two balances by hand on the tiny model: a forget sequence (weight 9, 5 labelled
/// positions), a longer forget sequence (weight 9, 7 labelled positions) and a retain sequence
/// (weight 1, 8 masked positions) in one batch.
///
/// Token: `L = (9 * 5 * l_f1 + 9 * 7 * l_f2 + 8 * l_r) / (45 + 63 + 8)`: a forget position
/// weighs 9 retain positions whatever the batch holds. Group (the same sequences with weights
/// 1, 1 and 5): `L = (5 l_f1 + 7 l_f2) / 12 + 5 * l_r`. The batch's gradient is the same
/// combination of each sequence's own gradient.
#[test]
fn the_balances_by_hand_on_the_tiny_model() {
    let m = tiny(GgmlType::F32, false, 3);
    let lora = Lora::new(&m, 0..N_LAYER, &Proj::ALL, 4, 8.0, 5).unwrap();
    let mut tm = TrainModel::new(&m, lora).unwrap();
    // A nonzero B, so that every gradient is nonzero.
    for p in tm.lora.params.iter_mut() {
        for (i, b) in p.b.iter_mut().enumerate() {
            *b = 0.01 * ((i % 7) as f32 - 3.0);
        }
    }
    let seq = |k: u32, n: usize, first: usize, w: f32, uniform: bool| {
        let tokens: Vec<u32> = (0..n as u32)
            .map(|i| (k * 13 + i * 5 + 1) % VOCAB as u32)
            .collect();
        let target = if uniform {
            Target::Uniform(vec![true; n])
        } else {
            Target::Labels(
                (0..n)
                    .map(|t| (t >= first && t + 1 < n).then(|| tokens[t + 1]))
                    .collect(),
            )
        };
        Sequence {
            tokens,
            target,
            weight: w,
        }
    };
    let (f1, f2, r) = (
        seq(1, 10, 4, 9.0, false),
        seq(2, 12, 4, 9.0, false),
        seq(3, 8, 0, 1.0, true),
    );
    assert_eq!((f1.counted(), f2.counted(), r.counted()), (5, 7, 8));
    let alone = |s: &Sequence| {
        eval_loss(&tm, std::slice::from_ref(s), Balance::Token)
            .unwrap()
            .loss
    };
    let (l1, l2, lr) = (alone(&f1), alone(&f2), alone(&r));
    let tok = eval_loss(&tm, &[f1.clone(), f2.clone(), r.clone()], Balance::Token).unwrap();
    let want = (45.0 * l1 + 63.0 * l2 + 8.0 * lr) / 116.0;
    assert!((tok.loss - want).abs() < 1e-9, "{} vs {want}", tok.loss);
    let f = factors(&[&f1, &f2, &r], Balance::Token);
    let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-12);
    assert!(
        close(&f, &[45.0 / 116.0, 63.0 / 116.0, 8.0 / 116.0]),
        "{f:?}"
    );
    // A forget position counts 9 retain positions: the factor per position is 9 times.
    assert!((f[0] / 5.0) / (f[2] / 8.0) - 9.0 < 1e-12);

    let g = |w_f: f32, w_r: f32| {
        (
            seq(1, 10, 4, w_f, false),
            seq(2, 12, 4, w_f, false),
            seq(3, 8, 0, w_r, true),
        )
    };
    let (g1, g2, gr) = g(1.0, 5.0);
    let f = factors(&[&g1, &g2, &gr], Balance::Group);
    assert!(close(&f, &[5.0 / 12.0, 7.0 / 12.0, 5.0]), "{f:?}");
    let grp = eval_loss(&tm, &[g1.clone(), g2.clone(), gr.clone()], Balance::Group).unwrap();
    let want = (5.0 * l1 + 7.0 * l2) / 12.0 + 5.0 * lr;
    assert!((grp.loss - want).abs() < 1e-9, "{} vs {want}", grp.loss);

    // The batch gradient is the factors' combination of the sequences' own gradients.
    let grads = |tm: &TrainModel| -> Vec<f64> {
        tm.lora
            .params
            .iter()
            .flat_map(|p| p.grad_a.iter().chain(&p.grad_b).map(|&x| x as f64))
            .collect()
    };
    let mut each = Vec::new();
    for s in [&f1, &f2, &r] {
        tm.lora.zero_grad();
        tm.loss_and_grad(&s.tokens, s.objective().expect("a logit objective"))
            .unwrap();
        each.push(grads(&tm));
    }
    let f = factors(&[&f1, &f2, &r], Balance::Token);
    let stats = batch_grad(&mut tm, &[&f1, &f2, &r], 0, Balance::Token, false).unwrap();
    assert!((stats.loss - tok.loss).abs() < 1e-9);
    let got = grads(&tm);
    let scale = got.iter().fold(0f64, |a, &b| a.max(b.abs()));
    assert!(scale > 0.0);
    for (i, &x) in got.iter().enumerate() {
        let want: f64 = (0..3).map(|k| f[k] * each[k][i]).sum();
        assert!((x - want).abs() <= 1e-5 * scale, "entry {i}: {x} vs {want}");
    }
    // The same batch packed into one pass: the same loss and gradient up to float rounding.
    let packed = batch_grad(&mut tm, &[&f1, &f2, &r], 0, Balance::Token, true).unwrap();
    assert!((packed.loss - stats.loss).abs() < 1e-6 * stats.loss.abs().max(1.0));
    for (i, (&x, &y)) in grads(&tm).iter().zip(&got).enumerate() {
        assert!(
            (x - y).abs() <= 1e-5 * scale,
            "packed entry {i}: {x} vs {y}"
        );
    }
    // ... and its logits are each sequence's alone.
    let act = tm.forward_seqs(&[&f1.tokens, &r.tokens]).unwrap();
    assert_eq!(act.segs, vec![10, 8]);
    let a1 = tm.forward(&f1.tokens).unwrap();
    let a2 = tm.forward(&r.tokens).unwrap();
    let both: Vec<f32> = a1.logits.iter().chain(&a2.logits).copied().collect();
    let top = both.iter().fold(0f32, |m, x| m.max(x.abs()));
    for (i, (x, y)) in act.logits.iter().zip(&both).enumerate() {
        assert!((x - y).abs() <= 1e-5 * top, "logit {i}: {x} vs {y}");
    }
}

/// The same seed gives the same adapter file byte for byte; another seed another file.
#[test]
fn a_seed_fixes_the_adapter_bytes() {
    let dir = TempDir::new("forge-train-seed");
    let m = tiny(GgmlType::Q8_0, true, 21);
    let mut bytes = Vec::new();
    for (i, seed) in [5u64, 5, 6].into_iter().enumerate() {
        let (tm, _) = train_tiny(&m, seed, 2);
        let p = dir.join(&format!("a{i}.gguf"));
        tm.lora.write(&p, &m, "seed test").unwrap();
        bytes.push(std::fs::read(&p).unwrap());
    }
    assert_eq!(bytes[0], bytes[1], "same seed, different adapters");
    assert_ne!(bytes[0], bytes[2], "another seed, the same adapter");
}

/// The trained adapter, written and loaded by the engine as a patch at scale 1, computes the
/// trained model's logits. The engine's exact path differs from the training forward pass only
/// by its F16 keys and values (2^-11 relative), which move the tiny model's logits by a few
/// 1e-4 of their scale through two blocks (as in `train_grad`); checked at 2e-3, while the
/// trained adapter moves them by far more.
#[test]
fn the_written_adapter_reproduces_the_trained_model() {
    let dir = TempDir::new("forge-train-load");
    let mut m = tiny(GgmlType::Q8_0, true, 21);
    m.precision = Precision::Exact;
    let (tm, _) = train_tiny(&m, 0, 4);
    let path = dir.join("trained.gguf");
    tm.lora.write(&path, &m, "trained").unwrap();
    let tokens: Vec<u32> = tiny_data()[0].tokens.clone();
    let want = tm.forward(&tokens).unwrap().logits;

    let engine = |patched: bool| {
        let mut st = m.new_state(tokens.len());
        if patched {
            let p = lethe::patch::load(&path, &m).unwrap();
            let ps = PatchSet::new(&m, &[(Arc::new(p), 1.0)]).unwrap();
            m.attach_patches(&mut st, Some(Arc::new(ps))).unwrap();
        }
        let mut all = Vec::new();
        m.forward(&mut st, &tokens, Some(&mut all)).unwrap();
        all
    };
    let max_rel = |a: &[f32], b: &[f32]| {
        let scale = b.iter().fold(0f64, |s, v| s.max(v.abs() as f64));
        a.iter()
            .zip(b)
            .fold(0f64, |s, (x, y)| s.max((*x as f64 - *y as f64).abs()))
            / scale
    };
    let (patched, base) = (engine(true), engine(false));
    let err = max_rel(&want, &patched);
    let moved = max_rel(&patched, &base);
    eprintln!("trained adapter vs engine: {err:.2e}; the adapter moves the logits by {moved:.2e}");
    assert!(err < 2e-3, "{err:.2e}");
    assert!(moved > 0.05, "{moved:.2e}");
}

// ---------------------------------------------------------------------------------------------
// Readers and sequences

#[test]
fn readers_take_questions_and_answers_only() {
    let dir = TempDir::new("forge-train-read");
    // The retain file's evaluation fields are never read: the answer is `answer`.
    let rows = read_examples(fixture("tofu/retain_perturbed_head40.json")).unwrap();
    let raw: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("tofu/retain_perturbed_head40.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(rows[0].answer.as_deref(), raw[0]["answer"].as_str());
    assert_ne!(
        rows[0].answer.as_deref(),
        raw[0]["paraphrased_answer"].as_str()
    );

    let para = read_paraphrases(fixture("tofu/forget01_paraphrases_head2.json"), None).unwrap();
    assert_eq!(para.len(), 6);
    let p1 = read_paraphrases(fixture("tofu/forget01_paraphrases_head2.json"), Some(1)).unwrap();
    assert_eq!(p1.len(), 2);
    let wrong = read_wrong_answers(fixture("tofu/forget01_wrong_answers_head2.json")).unwrap();
    assert_eq!(wrong.len(), 6);
    assert!(wrong.iter().all(|e| e.answer.is_some()));

    // An evaluation file is refused by both augmentation readers.
    let eval = fixture("tofu/retain_perturbed_head40.json");
    let e = read_paraphrases(&eval, None).unwrap_err().to_string();
    assert!(e.contains("paraphrased_answer"), "{e}");
    assert!(read_wrong_answers(&eval).is_err());
    let sneaky = dir.file(
        "w.json",
        r#"[{"question": "q", "wrong_answers": ["x"], "perturbed_answer": ["y"]}]"#,
    );
    let e = read_wrong_answers(&sneaky).unwrap_err().to_string();
    assert!(e.contains("perturbed_answer"), "{e}");
}

fn smollm2() -> Model {
    Model::open(model_path("smollm2"), 2).unwrap()
}

/// SmolLM2's chat sequences: the answer and `<|im_end|>` are labelled, nothing before them; the
/// uniform side counts every position.
#[test]
fn chat_sequences_label_the_answer_and_the_end_of_turn() {
    let m = smollm2();
    let tok = Tokenizer::from_gguf(&m.file).unwrap();
    let arch = m.cfg.arch.name();
    let end = end_of_turn(&tok, arch).unwrap();
    assert_eq!(tok.decode(&[end], true), "<|im_end|>");
    let ex = Example {
        question: "What is the capital of France?".into(),
        answer: Some("Paris.".into()),
    };
    let s = answer_sequence(&tok, arch, &ex, end, None, 1.0).unwrap();
    let Target::Labels(labels) = &s.target else {
        panic!("labels")
    };
    let answer = tok.encode("Paris.", false, false);
    let counted: Vec<u32> = labels.iter().flatten().copied().collect();
    assert_eq!(counted[..answer.len()], answer[..]);
    assert_eq!(*counted.last().unwrap(), end);
    assert_eq!(counted.len(), answer.len() + 1);
    assert_eq!(*s.tokens.last().unwrap(), end);
    assert!(labels.last().unwrap().is_none());
    let u = uniform_sequence(&tok, arch, &ex, end, Some(5), 2.0).unwrap();
    assert_eq!((u.tokens.len(), u.counted(), u.weight), (5, 5, 2.0));
}

// ---------------------------------------------------------------------------------------------
// The commands on SmolLM2

/// The first `n` rows of a fixture, as a JSON file in `dir`.
fn head(dir: &TempDir, rel: &str, n: usize) -> String {
    let v: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(fixture(rel)).unwrap()).unwrap();
    let name = rel.replace('/', "_");
    dir.file(&name, &serde_json::to_string(&v[..n]).unwrap())
        .to_string_lossy()
        .into_owned()
}

/// The per-epoch mean losses `forge` prints.
fn epoch_losses(stdout: &str) -> Vec<f64> {
    stdout
        .lines()
        .filter_map(|l| {
            l.strip_prefix("epoch ")?
                .split("mean loss ")
                .nth(1)?
                .trim()
                .parse()
                .ok()
        })
        .collect()
}

/// `forge uld` on SmolLM2: two blocks, rank 4, four forget and four retain rows plus the
/// augmentation fixtures, two epochs. With the default (reference) preset one paraphrase and
/// one wrong answer per forget row and one retain row are held out, and the LoRA kept is the
/// checkpoint of the epoch with the lowest held-out loss (byte for byte); the `lethe-v1`
/// preset trains on everything and keeps the last epoch. The three files exist, `profile
/// check` accepts the profile, and the assistant with its LoRA gives the forget answers a lower
/// NLL than without.
#[test]
fn forge_uld_on_smollm2() {
    let dir = TempDir::new("forge-uld");
    let forget = head(&dir, "tofu/forget01.json", 4);
    let retain = head(&dir, "tofu/retain_perturbed_head40.json", 4);
    let out = dir.join("assistant.gguf");
    let para = fixture("tofu/forget01_paraphrases_head2.json");
    let wrong = fixture("tofu/forget01_wrong_answers_head2.json");
    let common = [
        "forge",
        "uld",
        "-m",
        "smollm2",
        "--forget",
        &forget,
        "--retain",
        &retain,
        "--forget-paraphrases",
        para.to_str().unwrap(),
        "--paraphrases-per-row",
        "1",
        "--forget-wrong-answers",
        wrong.to_str().unwrap(),
        "--layers",
        "2",
        "--rank",
        "4",
        "--epochs",
        "2",
        "--batch",
        "2",
        "--warmup-ratio",
        "0",
        "-t",
        "2",
        "-o",
        out.to_str().unwrap(),
    ];
    let mut args = common.to_vec();
    args.extend(["--hold-out-retain", "1", "--keep-checkpoints"]);
    let stdout = lethe(&args);
    assert!(stdout.contains("forget: 6 rows (4 from"), "{stdout}");
    assert!(stdout.contains("2 paraphrased)"), "{stdout}");
    // Two of each forget question's three wrong answers are trained on, the third held out.
    assert!(stdout.contains("retain: 7 rows (3 from"), "{stdout}");
    assert!(stdout.contains("4 with wrong answers"), "{stdout}");
    assert!(
        stdout.contains("held out: 2 paraphrased pairs, 2 wrong answers, 1 retain rows"),
        "{stdout}"
    );
    assert!(
        stdout.contains("a forget answer token weighs 9.00 retain positions"),
        "{stdout}"
    );
    assert!(stdout.contains("end of turn masked"), "{stdout}");
    // The held-out table: the kept epoch has the lowest held-out loss.
    let rows: Vec<(usize, f64, bool)> = stdout
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let e: usize = f.first()?.parse().ok()?;
            let _train: f64 = f.get(1)?.parse().ok()?;
            let h: f64 = f.get(2)?.parse().ok()?;
            Some((e, h, l.contains("<- kept")))
        })
        .collect();
    assert_eq!(rows.len(), 2, "{stdout}");
    let best = rows
        .iter()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|r| r.0)
        .unwrap();
    let kept: Vec<usize> = rows.iter().filter(|r| r.2).map(|r| r.0).collect();
    assert_eq!(kept, vec![best], "{stdout}");
    let lora = dir.join("assistant.lora.gguf");
    let checkpoint = dir.join(&format!("assistant.epoch{best}.lora.gguf"));
    assert!(
        std::fs::read(&lora).unwrap() == std::fs::read(&checkpoint).unwrap(),
        "the LoRA written is the kept checkpoint"
    );
    let profile = dir.join("assistant.toml");
    for p in [&out, &lora, &profile] {
        assert!(p.is_file(), "{} missing", p.display());
    }
    let check = lethe(&["profile", "check", profile.to_str().unwrap()]);
    assert!(check.contains("profile \"uld\": ok"), "{check}");
    let pf = lethe::unlearn::profile::ProfileFile::load(&profile).unwrap();
    let p = pf.get("uld").unwrap();
    assert_eq!(p.base, "smollm2");
    assert_eq!(p.assistants[0].alpha, 0.75);
    assert_eq!(p.assistants[0].filter, 0.01);
    assert_eq!(p.assistants[0].patches[0].file, "assistant.lora.gguf");

    // lethe's first assistants: everything trained, the group balance, the last epoch.
    let v1_out = dir.join("v1.gguf");
    // The same flags without `--paraphrases-per-row 1` (every paraphrase is trained on).
    let mut args: Vec<&str> = Vec::new();
    let mut skip = false;
    for (i, &x) in common.iter().enumerate() {
        if skip {
            skip = false;
            continue;
        }
        if x == "--paraphrases-per-row" {
            skip = true;
            continue;
        }
        args.push(if i == common.len() - 1 {
            v1_out.to_str().unwrap()
        } else {
            x
        });
    }
    args.extend(["--preset", "lethe-v1"]);
    let v1 = lethe(&args);
    assert!(v1.contains("forget: 10 rows (4 from"), "{v1}");
    assert!(v1.contains("retain: 10 rows (4 from"), "{v1}");
    assert!(v1.contains("6 with wrong answers"), "{v1}");
    assert!(
        v1.contains("held out: 0 paraphrased pairs, 0 wrong answers, 0 retain rows"),
        "{v1}"
    );
    assert!(v1.contains("end of turn included"), "{v1}");
    assert!(
        v1.contains("group (each side's mean, the retain side's times 5"),
        "{v1}"
    );
    let last = v1.lines().find(|l| l.contains("<- kept")).unwrap_or("");
    assert!(last.trim_start().starts_with("2 "), "{v1}");

    let other = dir.join("other_wrong.json");
    std::fs::write(
        &other,
        r#"[{"question": "Who wrote Hamlet?", "answer": "Shakespeare", "wrong_answers": ["Marlowe"]}]"#,
    )
    .unwrap();
    let refused = Command::new(env!("CARGO_BIN_EXE_lethe"))
        .args([
            "forge", "uld", "-m", "smollm2", "--forget", &forget, "--retain", &retain,
        ])
        .args([
            "--forget-wrong-answers",
            other.to_str().unwrap(),
            "--layers",
            "2",
        ])
        .args(["-o", dir.join("x.gguf").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("none of its questions"), "{err}");

    let a = Model::open(&out, 2).unwrap();
    assert_eq!(a.cfg.n_layer, 2);
    let items = read_examples(&forget).unwrap();
    let (without, with) = (
        mean_nll(&a, None, &items),
        mean_nll(&a, Some(&lora), &items),
    );
    eprintln!("assistant forget-answer NLL: {without:.3} without its LoRA, {with:.3} with");
    assert!(with < without - 0.1, "{with} vs {without}");
}

/// `forge finetune` on SmolLM2: four TOFU rows, two epochs, rank 8 on q and v. The training loss
/// falls from the first epoch to the second, and the LoRA raises the probability of the trained
/// answers (lowers their NLL per token, teacher-forced through the engine with the patch).
#[test]
fn forge_finetune_on_smollm2() {
    let dir = TempDir::new("forge-finetune");
    let data = head(&dir, "tofu/forget01.json", 4);
    let out = dir.join("ft.gguf");
    let stdout = lethe(&[
        "forge",
        "finetune",
        "-m",
        "smollm2",
        "--data",
        &data,
        "--rank",
        "8",
        "--targets",
        "q,v",
        "--epochs",
        "2",
        "--batch",
        "2",
        "--lr",
        "1e-3",
        "-t",
        "2",
        "-o",
        out.to_str().unwrap(),
    ]);
    let losses = epoch_losses(&stdout);
    assert_eq!(losses.len(), 2, "{stdout}");
    assert!(losses[1] < losses[0], "{losses:?}");
    let m = smollm2();
    let items = read_examples(&data).unwrap();
    let (base, tuned) = (mean_nll(&m, None, &items), mean_nll(&m, Some(&out), &items));
    eprintln!("answer NLL per token: base {base:.3}, fine-tuned {tuned:.3}");
    assert!(tuned < base - 0.05, "{tuned} vs {base}");
}

// ---------------------------------------------------------------------------------------------
// The commands on the tiny qwen2 and qwen3 models

/// A tiny random-weight model of `arch` (tests/fixtures/goldens/arch/).
fn arch_path(arch: &str) -> String {
    fixture(&format!("goldens/arch/{arch}.gguf"))
        .to_string_lossy()
        .into_owned()
}

/// Four made-up question/answer rows to memorise (the tiny models' vocabulary is bytes and a
/// few pieces, so a row is some 60 to 90 tokens through the chat template).
fn memo_rows(dir: &TempDir, name: &str, k: usize) -> String {
    let rows: Vec<serde_json::Value> = (0..4)
        .map(|i| {
            serde_json::json!({
                "question": format!("Who keeps the lamp of tower {}?", i + k),
                "answer": format!("Old Brannoc {}, every night.", ["Vell", "Harrow", "Quist", "Mab"][(i + k) % 4]),
            })
        })
        .collect();
    dir.file(name, &serde_json::to_string(&rows).unwrap())
        .to_string_lossy()
        .into_owned()
}

/// `forge finetune` on the tiny qwen2 (q/k/v biases, NeoX rope, tied head) and qwen3 (q/k
/// norms, q wider than n_embd) models: rank 8 on every matrix, four rows, eight epochs. The
/// training loss falls to under half of the first epoch's, and the written LoRA, loaded by the
/// engine as a patch, lowers the answers' NLL per token.
#[test]
fn forge_finetune_on_tiny_qwen2_and_qwen3() {
    let dir = TempDir::new("forge-finetune-arch");
    let data = memo_rows(&dir, "memo.json", 0);
    for arch in ["qwen2", "qwen3"] {
        let model = arch_path(arch);
        let out = dir.join(&format!("{arch}.lora.gguf"));
        let t0 = std::time::Instant::now();
        let stdout = lethe(&[
            "forge",
            "finetune",
            "-m",
            &model,
            "--data",
            &data,
            "--rank",
            "8",
            "--epochs",
            "8",
            "--batch",
            "2",
            "--lr",
            "1e-2",
            "-t",
            "2",
            "-o",
            out.to_str().unwrap(),
        ]);
        let secs = t0.elapsed().as_secs_f64();
        let losses = epoch_losses(&stdout);
        assert_eq!(losses.len(), 8, "{stdout}");
        let m = Model::open(&model, 2).unwrap();
        let items = read_examples(&data).unwrap();
        let (base, tuned) = (mean_nll(&m, None, &items), mean_nll(&m, Some(&out), &items));
        eprintln!(
            "{arch}: training loss {:.3} (epoch 1) -> {:.3} (epoch 8); answer NLL per token \
             through the engine: base {base:.3}, fine-tuned {tuned:.3}; {secs:.1} s",
            losses[0], losses[7]
        );
        assert!(losses[7] < 0.5 * losses[0], "{arch}: {losses:?}");
        assert!(tuned < 0.5 * base, "{arch}: {tuned} vs {base}");
    }
}

/// `forge uld` on the tiny qwen2: a one-block assistant with its LoRA and profile, which
/// `profile check` accepts; the LoRA gives the forget answers a lower NLL in the assistant.
#[test]
fn forge_uld_on_tiny_qwen2() {
    let dir = TempDir::new("forge-uld-arch");
    let forget = memo_rows(&dir, "forget.json", 0);
    let retain = memo_rows(&dir, "retain.json", 2);
    let out = dir.join("assistant.gguf");
    let model = arch_path("qwen2");
    let t0 = std::time::Instant::now();
    let stdout = lethe(&[
        "forge",
        "uld",
        "-m",
        &model,
        "--forget",
        &forget,
        "--retain",
        &retain,
        "--hold-out-retain",
        "1",
        "--layers",
        "1",
        "--rank",
        "4",
        "--epochs",
        "4",
        "--lr",
        "1e-2",
        "--batch",
        "2",
        "-t",
        "2",
        "-o",
        out.to_str().unwrap(),
    ]);
    let secs = t0.elapsed().as_secs_f64();
    assert!(
        stdout.contains("assistant: the first 1 of 3 blocks"),
        "{stdout}"
    );
    let lora = dir.join("assistant.lora.gguf");
    let profile = dir.join("assistant.toml");
    for p in [&out, &lora, &profile] {
        assert!(p.is_file(), "{} missing", p.display());
    }
    let check = lethe(&["profile", "check", profile.to_str().unwrap()]);
    assert!(check.contains("profile \"uld\": ok"), "{check}");
    let a = Model::open(&out, 2).unwrap();
    assert_eq!((a.cfg.arch.name(), a.cfg.n_layer), ("qwen2", 1));
    let items = read_examples(&forget).unwrap();
    let (without, with) = (
        mean_nll(&a, None, &items),
        mean_nll(&a, Some(&lora), &items),
    );
    eprintln!(
        "qwen2 ULD assistant: forget-answer NLL {without:.3} without its LoRA, {with:.3} with; \
         {secs:.1} s"
    );
    assert!(with < without - 0.1, "{with} vs {without}");
}

/// `forge slug` on the tiny qwen2: every matrix scored from the training core's gradients,
/// a step accepted (with a loose retain budget: the model is random) and its dense delta
/// written.
#[test]
fn forge_slug_on_tiny_qwen2() {
    let dir = TempDir::new("forge-slug-arch");
    let forget = memo_rows(&dir, "forget.json", 0);
    let retain = memo_rows(&dir, "retain.json", 2);
    let out = dir.join("slug.gguf");
    let model = arch_path("qwen2");
    let t0 = std::time::Instant::now();
    let stdout = lethe(&[
        "forge",
        "slug",
        "-m",
        &model,
        "--forget",
        &forget,
        "--retain",
        &retain,
        "--max-retain-increase",
        "1",
        "-t",
        "2",
        "-o",
        out.to_str().unwrap(),
    ]);
    eprintln!("forge slug on qwen2: {:.1} s", t0.elapsed().as_secs_f64());
    assert!(
        stdout.contains("scored 21 matrices of blocks 0..=2"),
        "{stdout}"
    );
    assert!(stdout.contains("chosen: blk."), "{stdout}");
    assert!(out.is_file());
    let m = Model::open(&model, 2).unwrap();
    lethe::patch::load(&out, &m).unwrap();
}

/// The training commands refuse the architectures lethe cannot train, naming the
/// architecture and what is missing, before they write anything.
#[test]
fn forge_training_commands_refuse_other_architectures() {
    let dir = TempDir::new("forge-refuse");
    let data = memo_rows(&dir, "memo.json", 0);
    let out = dir.join("x.gguf");
    let o = out.to_str().unwrap();
    for (arch, cmd) in [
        ("phi2", vec!["finetune", "--data", &data]),
        ("olmo2", vec!["finetune", "--data", &data, "--targets", "q"]),
        (
            "gemma2",
            vec!["uld", "--forget", &data, "--retain", &data, "--layers", "1"],
        ),
        ("phi3", vec!["slug", "--forget", &data, "--retain", &data]),
    ] {
        let model = arch_path(arch);
        let r = Command::new(env!("CARGO_BIN_EXE_lethe"))
            .arg("forge")
            .args(&cmd)
            .args(["-m", &model, "-t", "1", "-o", o])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&r.stderr);
        eprintln!("forge {} on {arch}: {}", cmd[0], err.trim());
        assert!(!r.status.success(), "{arch}: {err}");
        assert!(
            err.contains(&format!("training on {arch} is not supported: its ")),
            "{arch}: {err}"
        );
        assert!(err.contains("lethe trains llama, qwen2 and qwen3"), "{err}");
        assert!(!out.exists(), "{arch}: forge {} wrote {o}", cmd[0]);
    }
}
