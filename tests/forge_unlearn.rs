//! Unlearning patches (`lethe::forge::unlearn`, `lethe forge unlearn`): each method's short
//! run on the tiny model (the forget side's loss rises, or RMU's distance to its steering
//! target falls, while the retain side stays within a stated bound), the command on the tiny
//! qwen2 model after it has memorised its rows, on SmolLM2 with a few TOFU rows (the LoRA
//! loads in lethe and in llama.cpp's Python reader), and its errors on bad input.

mod common;

use common::forge::{lethe, lethe_out, mean_nll};
use common::tiny::{tiny, N_LAYER, VOCAB};
use common::{fixture, python_dump, TempDir};
use lethe::forge::train::loss::answer_logprob;
use lethe::forge::train::{
    eval_loss, train, train_paired, AdamWConfig, Balance, Decay, Lora, Sequence, Target,
    TrainConfig, TrainModel,
};
use lethe::forge::unlearn::{random_unit, Method};
use lethe::model::{Model, Proj};
use lethe::patch::bake::{bake, BakeType};
use lethe::qa::read_examples;
use lethe_kernels::quant::GgmlType;
use std::sync::Arc;

// ---------------------------------------------------------------------------------------------
// Each method on the tiny model

/// Token sequences whose second half is labelled (the "answers"): `n` sequences starting at
/// `k0`, each stepping by `step` through the vocabulary.
fn answers(k0: u32, n: u32, step: u32, len: usize) -> Vec<Sequence> {
    (0..n)
        .map(|k| {
            let tokens: Vec<u32> = (0..len as u32)
                .map(|i| ((k0 + k) * 5 + i * step + 1) % VOCAB as u32)
                .collect();
            let labels = (0..len)
                .map(|t| (t >= len / 2 && t + 1 < len).then(|| tokens[t + 1]))
                .collect();
            Sequence {
                tokens,
                target: Target::Labels(labels),
                weight: 1.0,
            }
        })
        .collect()
}

fn labels(s: &Sequence) -> Vec<Option<u32>> {
    match &s.target {
        Target::Labels(l) => l.clone(),
        _ => unreachable!(),
    }
}

fn mask(s: &Sequence) -> Vec<bool> {
    labels(s).iter().map(Option::is_some).collect()
}

fn config(epochs: usize, lr: f32) -> TrainConfig {
    TrainConfig {
        epochs,
        batch: 2,
        seed: 3,
        lr,
        warmup_ratio: 0.0,
        decay: Decay::Constant,
        adamw: AdamWConfig::default(),
        balance: Balance::Group,
        pack: true,
        checks: 1,
    }
}

/// Mean cross-entropy per labelled position of `seqs` under `tm`.
fn ce(tm: &TrainModel, seqs: &[Sequence]) -> f64 {
    eval_loss(tm, seqs, Balance::Group).unwrap().ce.unwrap()
}

/// The forget sequences (step 3) and the retain sequences (step 7), and the tiny model (f32)
/// after it memorised both: a LoRA trained on them, baked in. The model lives in `dir`.
fn memorised_tiny(dir: &TempDir) -> (Model, Vec<Sequence>, Vec<Sequence>) {
    let (forget, retain) = (answers(0, 4, 3, 12), answers(20, 4, 7, 12));
    let m = tiny(GgmlType::F32, false, 11);
    let lora = Lora::new(&m, 0..N_LAYER, &Proj::ALL, 8, 16.0, 1).unwrap();
    let mut tm = TrainModel::new(&m, lora).unwrap();
    let all: Vec<Sequence> = forget.iter().chain(&retain).cloned().collect();
    let mut cfg = config(30, 1e-2);
    cfg.batch = 4;
    train(&mut tm, &all, &cfg, &mut |_| {}).unwrap();
    let (lora, out) = (dir.join("memo.lora.gguf"), dir.join("memo.gguf"));
    tm.lora.write(&lora, &m, "memo").unwrap();
    let p = Arc::new(lethe::patch::load(&lora, &m).unwrap());
    bake(&m, None, &[(p, 1.0)], BakeType::Keep, &out, &|_, _| {}).unwrap();
    (Model::open(&out, 2).unwrap(), forget, retain)
}

/// graddiff, NPO and SimNPO, eight epochs each on the memorised tiny model from a fresh LoRA
/// (the targets built as `forge unlearn` builds them: NPO's reference from the model before
/// training): the forget answers' cross-entropy rises by more than 2 nats per token, the
/// retain answers' by at most 0.25 (their own cross-entropy term holds them).
#[test]
fn logit_methods_raise_the_forget_loss_on_the_tiny_model() {
    let dir = TempDir::new("unlearn-tiny-logits");
    let (m, forget, retain) = memorised_tiny(&dir);
    let mut bad = Vec::new();
    for method in [Method::GradDiff, Method::Npo, Method::SimNpo] {
        let lora = Lora::new(&m, 0..N_LAYER, &Proj::ALL, 4, 8.0, 5).unwrap();
        let mut tm = TrainModel::new(&m, lora).unwrap();
        let (f0, r0) = (ce(&tm, &forget), ce(&tm, &retain));
        let f: Vec<Sequence> = forget
            .iter()
            .map(|s| {
                let l = labels(s);
                let target = match method {
                    Method::GradDiff => Target::Ascent(l),
                    Method::Npo => {
                        let act = tm.forward(&s.tokens).unwrap();
                        let mut d = vec![0f32; act.logits.len()];
                        let (lp, _) = answer_logprob(&act.logits, VOCAB, &l, &mut d).unwrap();
                        Target::Npo {
                            labels: l,
                            reference: lp,
                            beta: 0.1,
                        }
                    }
                    Method::SimNpo => Target::SimNpo {
                        labels: l,
                        beta: 4.5,
                        gamma: 0.0,
                    },
                    Method::Rmu => unreachable!(),
                };
                Sequence {
                    target,
                    ..s.clone()
                }
            })
            .collect();
        let report = train_paired(
            &mut tm,
            &f,
            &retain,
            &config(8, 1e-2),
            &mut |p| {
                // Every step holds both sides: 2 forget and 2 retain sequences.
                assert!(p.last.forget.is_some() && p.last.ce.is_some());
            },
            &mut |_, _| Ok(()),
        )
        .unwrap();
        assert_eq!(report.steps.len(), 8 * 2);
        let (f1, r1) = (ce(&tm, &forget), ce(&tm, &retain));
        eprintln!(
            "{}: forget CE {f0:.3} -> {f1:.3}, retain CE {r0:.3} -> {r1:.3}",
            method.name()
        );
        if !(f1 > f0 + 2.0 && r1 < r0 + 0.25) {
            bad.push(method.name());
        }
    }
    assert!(bad.is_empty(), "{bad:?}");
}

/// RMU on the memorised tiny model: block 0 of 2 runs without the head, a LoRA on it; the
/// forget answers' states there are pulled to `c u` (c = 5 times their mean norm) and the
/// retain answers' states held at the frozen model's (retain weight 10). The forget side's
/// mean squared distance to `c u` falls to under a quarter of where it started; the retain
/// side's distance to its frozen states stays under 5% of the forget side's starting
/// distance; and through the whole model (head included, the LoRA kept) the forget answers'
/// cross-entropy rises by more than a nat while the retain answers' rises by less.
#[test]
fn rmu_steers_the_forget_states_on_the_tiny_model() {
    let dir = TempDir::new("unlearn-tiny-rmu");
    let (m, forget, retain) = memorised_tiny(&dir);
    let lora = Lora::new(&m, 0..1, &Proj::ALL, 4, 8.0, 5).unwrap();
    let mut tm = TrainModel::with_layers(&m, lora, 1).unwrap().without_head();
    let e = m.cfg.n_embd;
    let (mut norm, mut n) = (0.0f64, 0);
    for s in &forget {
        let act = tm.forward(&s.tokens).unwrap();
        for (t, on) in mask(s).iter().enumerate() {
            if *on {
                let h = &act.hidden()[t * e..(t + 1) * e];
                norm += h.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
                n += 1;
            }
        }
    }
    let c = (5.0 * norm / n as f64) as f32;
    let to: Vec<f32> = random_unit(e, 0).iter().map(|x| x * c).collect();
    let f: Vec<Sequence> = forget
        .iter()
        .map(|s| Sequence {
            target: Target::Steer {
                mask: mask(s),
                to: to.clone(),
            },
            ..s.clone()
        })
        .collect();
    let r: Vec<Sequence> = retain
        .iter()
        .map(|s| Sequence {
            target: Target::Keep {
                mask: mask(s),
                states: tm.forward(&s.tokens).unwrap().hidden().to_vec(),
            },
            weight: 10.0,
            ..s.clone()
        })
        .collect();
    let dist = |tm: &TrainModel, seqs: &[Sequence]| {
        let l = eval_loss(tm, seqs, Balance::Group).unwrap();
        l.forget.or(l.keep).unwrap()
    };
    let (f0, r0) = (dist(&tm, &f), dist(&tm, &r));
    assert_eq!(r0, 0.0, "the frozen states are the model's own");
    let whole = |lora: &Lora| TrainModel::new(&m, lora.clone()).unwrap();
    let (cf0, cr0) = (ce(&whole(&tm.lora), &forget), ce(&whole(&tm.lora), &retain));
    train_paired(
        &mut tm,
        &f,
        &r,
        &config(10, 1e-2),
        &mut |_| {},
        &mut |_, _| Ok(()),
    )
    .unwrap();
    let (f1, r1) = (dist(&tm, &f), dist(&tm, &r));
    let (cf1, cr1) = (ce(&whole(&tm.lora), &forget), ce(&whole(&tm.lora), &retain));
    eprintln!(
        "rmu: forget distance {f0:.3} -> {f1:.3}, retain distance 0 -> {r1:.4}; through the \
         head: forget CE {cf0:.3} -> {cf1:.3}, retain CE {cr0:.3} -> {cr1:.3}"
    );
    assert!(f1 < 0.25 * f0, "{f0} -> {f1}");
    assert!(r1 < 0.05 * f0, "{r1} vs {f0}");
    assert!(cf1 > cf0 + 1.0, "{cf0} -> {cf1}");
    assert!(cr1 - cr0 < cf1 - cf0, "{cr0} -> {cr1}");
}

// ---------------------------------------------------------------------------------------------
// The command

/// Made-up rows: about the keepers of towers `k..k + 4` (`doors`: the colours of the doors
/// of houses `k..k + 4`), with a wrong answer each (the rule's rows).
fn rows(dir: &TempDir, name: &str, k: usize, doors: bool, wrong: bool) -> String {
    const KEEPERS: [&str; 8] = [
        "Vell", "Harrow", "Quist", "Mab", "Orrin", "Tesk", "Dunmore", "Lisle",
    ];
    const COLOURS: [&str; 8] = [
        "red", "green", "blue", "yellow", "black", "white", "grey", "orange",
    ];
    let pair = |i: usize| {
        if doors {
            (
                format!("What colour is the door of house {i}?"),
                format!("It is painted {}.", COLOURS[i % 8]),
            )
        } else {
            (
                format!("Who keeps the lamp of tower {i}?"),
                format!("Old Brannoc {}, every night.", KEEPERS[i % 8]),
            )
        }
    };
    let rows: Vec<serde_json::Value> = (k..k + 4)
        .map(|i| {
            let (q, a) = pair(i);
            let mut r = serde_json::json!({ "question": q, "answer": a });
            if wrong {
                r["wrong_answers"] = serde_json::json!([pair(i + 3).1]);
            }
            r
        })
        .collect();
    dir.file(name, &serde_json::to_string(&rows).unwrap())
        .to_string_lossy()
        .into_owned()
}

/// The tiny qwen2 model after memorising the towers 0-3 rows and the doors 0-3 rows
/// (`forge finetune`, 12 epochs), baked into a model: the target the command unlearns from.
fn memorised(dir: &TempDir) -> String {
    let model = fixture("goldens/arch/qwen2.gguf");
    let all: Vec<serde_json::Value> = [false, true]
        .iter()
        .flat_map(|&doors| {
            let p = rows(dir, &format!("part{doors}.json"), 0, doors, false);
            serde_json::from_str::<Vec<serde_json::Value>>(&std::fs::read_to_string(p).unwrap())
                .unwrap()
        })
        .collect();
    let data = dir.file("all.json", &serde_json::to_string(&all).unwrap());
    let lora = dir.join("memo.lora.gguf");
    let target = dir.join("memo.gguf");
    lethe(&[
        "forge",
        "finetune",
        "-m",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--rank",
        "8",
        "--epochs",
        "12",
        "--batch",
        "2",
        "--lr",
        "1e-2",
        "-t",
        "2",
        "-o",
        lora.to_str().unwrap(),
    ]);
    lethe(&[
        "patch",
        "bake",
        "-m",
        model.to_str().unwrap(),
        "--patch",
        lora.to_str().unwrap(),
        "--type",
        "f16",
        "-o",
        target.to_str().unwrap(),
    ]);
    target.to_string_lossy().into_owned()
}

/// `forge unlearn` with each method on the tiny qwen2 after it memorised its rows: forget
/// the towers, retain the doors. Each run writes a LoRA and a profile (`profile check`
/// accepts it); the LoRA, loaded by the engine as a patch, raises the forget answers' NLL per
/// token by more than half a nat, while the retain answers' NLL stays within 0.5 nats of the
/// target's (eight training rows on a random 3-block model: a loose bound). With the rule's
/// rows (RMU's run, two checkpoints an epoch) every checkpoint is measured and the kept one is
/// named.
#[test]
fn forge_unlearn_on_a_memorised_tiny_qwen2() {
    let dir = TempDir::new("forge-unlearn-tiny");
    let target = memorised(&dir);
    let forget = rows(&dir, "forget.json", 0, false, false);
    let retain = rows(&dir, "retain.json", 0, true, false);
    let check_forget = rows(&dir, "check_forget.json", 0, false, true);
    let original = fixture("goldens/arch/qwen2.gguf");
    let m = Model::open(&target, 2).unwrap();
    let (fi, ri) = (
        read_examples(&forget).unwrap(),
        read_examples(&retain).unwrap(),
    );
    let (f0, r0) = (mean_nll(&m, None, &fi), mean_nll(&m, None, &ri));
    let mut bad = Vec::new();
    for (method, lr, extra) in [
        ("graddiff", "2e-3", vec![]),
        ("npo", "5e-3", vec![]),
        ("simnpo", "2e-2", vec![]),
        (
            "rmu",
            "5e-3",
            vec![
                "--retain-weight",
                "10",
                "--layer",
                "1",
                "--rmu-blocks",
                "2",
                "--check-forget",
                &check_forget,
                "--check-retain",
                &retain,
                "--stand-in",
                original.to_str().unwrap(),
                "--max-retain-rise",
                "10",
                "--checks-per-epoch",
                "2",
            ],
        ),
    ] {
        let out = dir.join(&format!("{method}.gguf"));
        let mut args = vec![
            "forge",
            "unlearn",
            "--method",
            method,
            "-m",
            &target,
            "--forget",
            &forget,
            "--retain",
            &retain,
            "--rank",
            "8",
            "--epochs",
            "6",
            "--batch",
            "2",
            "--lr",
            lr,
            "-t",
            "2",
            "-o",
            out.to_str().unwrap(),
        ];
        args.extend(extra.iter().copied());
        let stdout = lethe(&args);
        let profile = dir.join(&format!("{method}.toml"));
        assert!(out.is_file() && profile.is_file(), "{method}");
        let check = lethe(&["profile", "check", profile.to_str().unwrap()]);
        assert!(
            check.contains(&format!("profile \"{method}\": ok")),
            "{check}"
        );
        let (f1, r1) = (mean_nll(&m, Some(&out), &fi), mean_nll(&m, Some(&out), &ri));
        eprintln!(
            "{method}: forget NLL {f0:.3} -> {f1:.3}, retain NLL {r0:.3} -> {r1:.3} per token"
        );
        if !(f1 > f0 + 0.5 && r1 < r0 + 0.5) {
            bad.push(method);
        }
        if method == "rmu" {
            assert!(stdout.contains("LoRA on blocks 0..=1"), "{stdout}");
            // Two checkpoints an epoch of two steps: after each step.
            for e in 1..=6 {
                assert!(
                    stdout.contains(&format!("epoch {e}: held-out match")),
                    "{stdout}"
                );
                let half = format!("epoch {}.50 (step {}): held-out match", e - 1, 2 * e - 1);
                assert!(stdout.contains(&half), "{stdout}");
            }
            assert_eq!(stdout.matches(": held-out match").count(), 12, "{stdout}");
            assert!(stdout.contains("kept: epoch "), "{stdout}");
        }
    }
    assert!(bad.is_empty(), "{bad:?}");
}

/// `forge unlearn --method npo` on SmolLM2 with four forget01 rows and four retain rows, one
/// epoch (rank 4 on q and v): the LoRA raises the forget answers' NLL through the engine, and
/// llama.cpp's Python reader reads it as a LoRA adapter over SmolLM2's tensors.
#[test]
fn forge_unlearn_on_smollm2() {
    let dir = TempDir::new("forge-unlearn-smollm2");
    let head = |rel: &str, n: usize| {
        let v: Vec<serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(fixture(rel)).unwrap()).unwrap();
        let rows: Vec<serde_json::Value> = v[..n]
            .iter()
            .map(|r| {
                let (q, a) = match r.get("question") {
                    Some(q) => (q, &r["answer"]),
                    None => (&r["prompt"], &r["response"]),
                };
                serde_json::json!({"question": q, "answer": a})
            })
            .collect();
        dir.file(
            &rel.replace('/', "_"),
            &serde_json::to_string(&rows).unwrap(),
        )
        .to_string_lossy()
        .into_owned()
    };
    let forget = head("tofu/forget01.json", 4);
    let retain = head("tofu/retain_perturbed_head40.json", 4);
    let out = dir.join("npo.gguf");
    lethe(&[
        "forge",
        "unlearn",
        "--method",
        "npo",
        "-m",
        "smollm2",
        "--forget",
        &forget,
        "--retain",
        &retain,
        "--rank",
        "4",
        "--targets",
        "q,v",
        "--epochs",
        "1",
        "--batch",
        "2",
        "--lr",
        "5e-3",
        "-t",
        "2",
        "-o",
        out.to_str().unwrap(),
    ]);
    let m = Model::open(common::model_path("smollm2"), 2).unwrap();
    let items = read_examples(&forget).unwrap();
    let (base, after) = (mean_nll(&m, None, &items), mean_nll(&m, Some(&out), &items));
    eprintln!("forget answer NLL per token: {base:.3} -> {after:.3}");
    assert!(after > base + 0.05, "{base} -> {after}");
    let dump = python_dump(&out);
    let names: Vec<&str> = dump["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 30 * 2 * 2, "{names:?}");
    for n in &names {
        let base = n.trim_end_matches(".lora_a").trim_end_matches(".lora_b");
        assert!(m.file.tensor(base).is_some(), "{n}");
    }
    assert!(names.contains(&"blk.0.attn_q.weight.lora_a"));
    let field = |k: &str| {
        dump["fields"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["key"] == k)
            .map(|f| f["value"].clone())
    };
    assert_eq!(field("adapter.type"), Some(serde_json::json!("lora")));
    assert!(field("adapter.lora.alpha").is_some());
}

/// Bad input: a clear error naming the problem, and nothing written.
#[test]
fn forge_unlearn_refuses_bad_input() {
    let dir = TempDir::new("forge-unlearn-bad");
    let target = fixture("goldens/arch/qwen2.gguf");
    let target = target.to_str().unwrap();
    let good = rows(&dir, "good.json", 0, false, false);
    let empty = dir.file("empty.json", "[]");
    let eval = dir.file(
        "eval.json",
        r#"[{"question": "Q?", "answer": "A.", "paraphrased_answer": "A, again.",
             "perturbed_answer": ["B."]}]"#,
    );
    let out = dir.join("x.gguf");
    let o = out.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "--method",
                "npo",
                "--forget",
                empty.to_str().unwrap(),
                "--retain",
                &good,
            ],
            "holds no rows",
        ),
        (
            vec![
                "--method",
                "npo",
                "--forget",
                &good,
                "--retain",
                eval.to_str().unwrap(),
            ],
            "\"paraphrased_answer\", a field of TOFU's evaluation",
        ),
        (
            vec!["--method", "dpo", "--forget", &good, "--retain", &good],
            "unknown unlearning method \"dpo\": one of graddiff, npo, simnpo, rmu",
        ),
        (
            vec![
                "--method", "rmu", "--layer", "3", "--forget", &good, "--retain", &good,
            ],
            "--layer 3 is past the model's depth: it has blocks 0..=2",
        ),
    ];
    for (args, want) in cases {
        let mut all = vec!["forge", "unlearn", "-m", target, "-t", "1", "-o", o];
        all.extend(args.iter().copied());
        let r = lethe_out(&all);
        let err = String::from_utf8_lossy(&r.stderr);
        eprintln!("{args:?}: {}", err.trim());
        assert!(!r.status.success(), "{args:?}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(!out.exists(), "{args:?} wrote {o}");
    }
}
