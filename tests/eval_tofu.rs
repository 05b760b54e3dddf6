//! Evaluation on the real model: the scorer against the engine's own teacher-forced logits,
//! `lethe eval` on TOFU forget01 (a few items) with its numbers recomputed from its per-item
//! output, `/score` against the scorer, and the same evaluation through a server.

mod common;

use common::serve::Server;
use common::{model_path, TempDir};
use lethe::generate::sampler::argmax_raw;
use lethe::model::Model;
use lethe::tokenizer::Tokenizer;
use lethe::unlearn::{combine, Assistant, ScoreRule, Scorer, Term, TermKind, Use};
use serde_json::{json, Value};
use std::process::Command;
use std::sync::Arc;

const BIN: &str = env!("CARGO_BIN_EXE_lethe");

fn lethe(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "lethe {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// log-softmax in f64.
fn log_softmax(x: &[f32]) -> Vec<f64> {
    let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let s: f64 = x.iter().map(|&v| (v as f64 - m).exp()).sum();
    x.iter().map(|&v| v as f64 - m - s.ln()).collect()
}

fn chat_prompt(tok: &Tokenizer, model: &Model, q: &str) -> Vec<u32> {
    lethe::qa::chat_tokens(tok, model.cfg.arch.name(), q, None)
        .unwrap()
        .0
}

/// An assistant for ULD: the first 4 blocks of SmolLM2.
fn assistant(dir: &TempDir) -> std::path::PathBuf {
    let path = dir.join("assistant.gguf");
    let m = model_path("smollm2");
    lethe(&[
        "forge",
        "assistant",
        "-m",
        m.to_str().unwrap(),
        "--layers",
        "4",
        "-o",
        path.to_str().unwrap(),
    ]);
    path
}

/// The sparse sweep path (per point only the plausible set) gives the numbers of the whole
/// combination at every point: each token's log-probability, and Min-K%++'s mu and sigma of
/// the combined distribution; pair terms and the raw rule are refused (they take the whole
/// path).
#[test]
fn sparse_sweep_scores_equal_the_whole_combination() {
    let dir = TempDir::new("score-sparse");
    let model = Arc::new(Model::open(model_path("smollm2"), 2).unwrap());
    let tok = Tokenizer::from_gguf(&model.file).unwrap();
    let am = Arc::new(Model::open(assistant(&dir), 2).unwrap());
    let prompt = chat_prompt(&tok, &model, "Who wrote the novel 'Dune'?");
    let cont = tok.encode("It was written by Isaac Asimov in 1965.", false, false);
    let uld = Assistant::uld(am.clone(), 0.75, 0.01);
    let points: Vec<Vec<(f32, f32)>> = vec![
        vec![],
        vec![(-0.25, 0.01)],
        vec![(-2.0, 0.1)],
        vec![(-1.0, 0.0)],
        vec![(-0.5, 0.001)],
    ];
    let mut sc = Scorer::new(model.clone(), vec![uld.clone()], None, 256).unwrap();
    sc.set_prompt(&prompt).unwrap();
    let sparse = sc
        .score_points_sparse(&cont, &points, true)
        .unwrap()
        .unwrap();
    let mut whole_stats = vec![Vec::new(); points.len()];
    let whole = sc
        .score_points(&cont, &points, |k, i, logp| {
            whole_stats[k].push(lethe::eval::mia::mink_stats(logp, cont[i]).unwrap())
        })
        .unwrap();
    let mut moved = 0.0f64;
    for k in 0..points.len() {
        for i in 0..cont.len() {
            let (a, b) = (sparse[k][i], whole_stats[k][i]);
            assert!(
                (a.logprob - whole[k][i]).abs() < 2e-5,
                "point {k} token {i}: {a:?} vs {}",
                whole[k][i]
            );
            assert!(
                (a.mu - b.mu).abs() < 2e-4,
                "point {k} token {i}: {a:?} vs {b:?}"
            );
            assert!(
                (a.sigma - b.sigma).abs() < 2e-4,
                "point {k} token {i}: {a:?} vs {b:?}"
            );
            moved = moved.max((whole[k][i] - whole[0][i]).abs());
        }
    }
    assert!(
        moved > 0.01,
        "the points must differ for the test to mean anything"
    );
    // Without stats the moments are zero and the log-probabilities the same.
    let bare = sc
        .score_points_sparse(&cont, &points, false)
        .unwrap()
        .unwrap();
    for k in 0..points.len() {
        for i in 0..cont.len() {
            assert_eq!(bare[k][i].logprob, sparse[k][i].logprob);
            assert_eq!((bare[k][i].mu, bare[k][i].sigma), (0.0, 0.0));
        }
    }
    for other in [
        Assistant {
            score: ScoreRule::Raw,
            ..uld.clone()
        },
        Assistant {
            kind: TermKind::Whp,
            ..uld.clone()
        },
    ] {
        let mut sc = Scorer::new(model.clone(), vec![other], None, 256).unwrap();
        sc.set_prompt(&prompt).unwrap();
        assert!(sc
            .score_points_sparse(&cont, &points, false)
            .unwrap()
            .is_none());
    }
}

/// The scorer gives, for each continuation token, the log-softmax of the logits the engine
/// computes for the whole sequence in one forward, plain and with a ULD term combined in its
/// scoring use; several continuations reuse one prefill of the prompt.
#[test]
fn scorer_matches_the_engine() {
    let dir = TempDir::new("score-engine");
    let model = Arc::new(Model::open(model_path("smollm2"), 2).unwrap());
    let tok = Tokenizer::from_gguf(&model.file).unwrap();
    let am = Arc::new(Model::open(assistant(&dir), 2).unwrap());
    let prompt = chat_prompt(&tok, &model, "Who wrote the novel 'Dune'?");
    let conts = [
        tok.encode("Frank Herbert wrote Dune in 1965.", false, false),
        tok.encode("It was written by Isaac Asimov.", false, false),
    ];
    let v = model.cfg.n_vocab;
    let all = |m: &Model, toks: &[u32]| {
        let mut st = m.new_state(256);
        let mut out = Vec::new();
        m.forward(&mut st, toks, Some(&mut out)).unwrap();
        out // [n_tok, V]
    };
    let uld = Assistant::uld(am.clone(), 0.75, 0.01);
    for terms in [vec![], vec![uld.clone()]] {
        let mut sc = Scorer::new(model.clone(), terms.clone(), None, 256).unwrap();
        sc.set_prompt(&prompt).unwrap();
        for cont in &conts {
            let got = sc.score(cont).unwrap();
            let full: Vec<u32> = prompt.iter().chain(cont).copied().collect();
            let lt = all(&model, &full);
            let la = all(&am, &full);
            for (i, &t) in cont.iter().enumerate() {
                let p = prompt.len() + i - 1; // the row that predicts cont[i]
                let row = &lt[p * v..(p + 1) * v];
                let want = if terms.is_empty() {
                    log_softmax(row)[t as usize]
                } else {
                    let mut out = Vec::new();
                    let term = Term {
                        kind: TermKind::Uld,
                        weight: -0.75,
                        logits: &la[p * v..(p + 1) * v],
                        reference: None,
                        filter: 0.01,
                        score: ScoreRule::Mass,
                    };
                    combine(row, &[term], Use::Score, &mut out);
                    log_softmax(&out)[t as usize]
                };
                assert!(
                    (got[i] - want).abs() < 2e-4,
                    "terms {} token {i}: {} vs {want}",
                    terms.len(),
                    got[i]
                );
                assert!(got[i].is_finite(), "scoring use keeps every token finite");
            }
        }
        // The context is checked before anything runs.
        let long = vec![1u32; 300];
        assert!(sc.score(&long).is_err());
    }
}

/// An assistant whose logits are all equal (two blocks of SmolLM2 with the final norm's weight
/// set to zero) knows nothing: under the scoring use a profile with it scores every answer
/// exactly as the base does, through `/score`, whatever its alpha and filter.
#[test]
fn a_flat_assistant_scores_as_the_base_through_the_server() {
    let dir = TempDir::new("score-flat");
    let model_file = model_path("smollm2");
    let two = dir.join("two.gguf");
    lethe(&[
        "forge",
        "assistant",
        "-m",
        model_file.to_str().unwrap(),
        "--layers",
        "2",
        "-o",
        two.to_str().unwrap(),
    ]);
    let flat = dir.join("flat.gguf");
    {
        let src = lethe::gguf::GgufFile::open(&two).unwrap();
        let mut w = lethe::gguf::GgufWriter::from_gguf(&src).unwrap();
        let t = src.tensor("output_norm.weight").unwrap();
        assert_eq!(t.ty, lethe_kernels::quant::GgmlType::F32);
        let zeros = vec![0u8; src.tensor_data(t).len()];
        w.set_tensor_data("output_norm.weight", zeros).unwrap();
        w.write(&flat).unwrap();
    }
    let mut toml = String::new();
    for (name, alpha, filter) in [("a", 0.75, 0.01), ("b", 2.0, 0.1), ("c", 5.0, 0.0)] {
        toml += &format!(
            "[[profile]]\nname = {name:?}\nbase = {:?}\n\n[[profile.assistant]]\nmodel = {:?}\n\
             alpha = {alpha}\nfilter = {filter}\n\n",
            model_file.to_str().unwrap(),
            flat.to_str().unwrap()
        );
    }
    let prof = dir.file("flat.toml", &toml);
    let s = Server::start(&[
        "--profile",
        prof.to_str().unwrap(),
        "--alias",
        "base",
        "-t",
        "2",
    ]);
    let data: Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("data/tofu/forget01_perturbed.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let score = |model: &str, item: &Value| -> Vec<f64> {
        let mut conts = vec![item["answer"].clone(), item["paraphrased_answer"].clone()];
        conts.extend(item["perturbed_answer"].as_array().unwrap().iter().cloned());
        let (st, r) = s.post(
            "/score",
            &json!({"model": model, "continuation": conts,
                    "messages": [{"role": "user", "content": item["question"]}]}),
        );
        assert_eq!(st, 200, "{r}");
        r["results"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|c| c["tokens"].as_array().unwrap().clone())
            .map(|t| t["logprob"].as_f64().unwrap())
            .collect()
    };
    let mut n = 0;
    for item in data.as_array().unwrap().iter().take(3) {
        let base = score("base", item);
        for p in ["a", "b", "c"] {
            let got = score(p, item);
            assert_eq!(got.len(), base.len());
            let d = got
                .iter()
                .zip(&base)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(
                d <= 1e-6,
                "profile {p}: scores differ from the base's by {d}"
            );
            n += got.len();
        }
    }
    assert!(n > 300, "{n} tokens compared");
}

/// `lethe eval --sweep` scores every point in one pass: each point's numbers equal, bit for
/// bit, those of a separate evaluation of a profile with that point's alpha and filter.
#[test]
fn sweep_points_equal_separate_runs() {
    let dir = TempDir::new("eval-sweep");
    let asst = assistant(&dir);
    let model_file = model_path("smollm2");
    let profile = |alpha: &str, filter: &str| {
        dir.file(
            &format!("p-{alpha}-{filter}.toml"),
            &format!(
                "[[profile]]\nname = \"uld\"\nbase = {:?}\n\n[[profile.assistant]]\nmodel = {:?}\n\
                 alpha = {alpha}\nfilter = {filter}\n",
                model_file.to_str().unwrap(),
                asst.to_str().unwrap()
            ),
        )
    };
    let common = [
        "--use",
        "uld",
        "--tofu",
        "forget01",
        "--limit",
        "2",
        "--score-only",
    ];
    let common: Vec<&str> = common
        .into_iter()
        .chain(["--no-base", "-t", "2", "--reference", "smollm2"])
        .collect();
    let run = |prof: &std::path::Path, extra: &[&str], out: &std::path::Path| -> Value {
        let mut a = vec!["eval", "--profile", prof.to_str().unwrap()];
        a.extend(&common);
        a.extend(extra);
        a.extend(["--json", out.to_str().unwrap()]);
        lethe(&a);
        serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap()
    };
    let sweep = run(
        &profile("0.75", "0.01"),
        &["--sweep", "alpha=0.5,1.5", "--sweep", "filter=0.01,0.1"],
        &dir.join("sweep.json"),
    );
    let sides = sweep["sides"].as_array().unwrap();
    assert_eq!(sides.len(), 4);
    let mut k = 0;
    for alpha in ["0.5", "1.5"] {
        for filter in ["0.01", "0.1"] {
            let s = &sides[k];
            k += 1;
            assert_eq!(s["name"], format!("uld alpha={alpha} filter={filter}"));
            let one = run(
                &profile(alpha, filter),
                &[],
                &dir.join(&format!("one-{alpha}-{filter}.json")),
            );
            let o = &one["sides"][0];
            assert_eq!(s["forget_quality"], o["forget_quality"]);
            assert_eq!(s["scored_utility"], o["scored_utility"]);
            assert_eq!(s["mia"], o["mia"]);
            assert!(s["model_utility"].is_null(), "score-only: no model utility");
            for (a, b) in s["sets"]
                .as_array()
                .unwrap()
                .iter()
                .zip(o["sets"].as_array().unwrap())
            {
                assert_eq!(a["summary"], b["summary"]);
                for (x, y) in a["items"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .zip(b["items"].as_array().unwrap())
                {
                    for key in ["gt_loss", "paraphrased_loss", "perturbed_loss", "mia"] {
                        assert_eq!(x[key], y[key], "{alpha} {filter} {key}");
                    }
                    assert!(x["generated"].is_null());
                }
            }
        }
    }
    // Different points score differently.
    assert_ne!(
        sides[0]["sets"][0]["summary"],
        sides[3]["sets"][0]["summary"]
    );
    // --answer-at: greedy answers at one point only, equal to a full evaluation at it.
    let full = |prof: &std::path::Path, extra: &[&str], out: &std::path::Path| -> Value {
        let mut a = vec!["eval", "--profile", prof.to_str().unwrap()];
        a.extend(common.iter().filter(|x| **x != "--score-only"));
        a.extend(extra);
        a.extend(["--json", out.to_str().unwrap()]);
        lethe(&a);
        serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap()
    };
    let at = full(
        &profile("0.75", "0.01"),
        &["--sweep", "alpha=0.5,1.5", "--answer-at", "alpha=1.5"],
        &dir.join("answer-at.json"),
    );
    let one = full(&profile("1.5", "0.01"), &[], &dir.join("one-full.json"));
    let (skipped, answered, o) = (&at["sides"][0], &at["sides"][1], &one["sides"][0]);
    assert!(skipped["model_utility"].is_null());
    assert!(o["model_utility"].is_number());
    assert_eq!(answered["model_utility"], o["model_utility"]);
    assert_eq!(answered["forget_quality"], o["forget_quality"]);
    for (a, b) in answered["sets"]
        .as_array()
        .unwrap()
        .iter()
        .zip(o["sets"].as_array().unwrap())
    {
        assert_eq!(a["summary"], b["summary"]);
        for (x, y) in a["items"]
            .as_array()
            .unwrap()
            .iter()
            .zip(b["items"].as_array().unwrap())
        {
            assert!(x["generated"].is_string());
            assert_eq!(x["generated"], y["generated"]);
        }
    }
    for set in skipped["sets"].as_array().unwrap() {
        for x in set["items"].as_array().unwrap() {
            assert!(x["generated"].is_null());
        }
    }
    // A point that is not one of the sweep's is refused.
    let bad = std::process::Command::new(BIN)
        .args([
            "eval",
            "--profile",
            profile("0.75", "0.01").to_str().unwrap(),
        ])
        .args([
            "--use",
            "uld",
            "--tofu",
            "forget01",
            "--limit",
            "1",
            "--no-base",
        ])
        .args(["--sweep", "alpha=0.5", "--answer-at", "alpha=0.7"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a point of the sweep"));
}

/// `lethe calibrate`: every sweep point's numbers, the choice by the stated rule (the highest
/// KS match among the points within the retain bound) with either yardstick (unseen authors'
/// rows, a stand-in model), and a file with TOFU's evaluation fields refused.
#[test]
fn calibrate_chooses_by_its_rule() {
    let dir = TempDir::new("calibrate");
    let asst = assistant(&dir);
    let model_file = model_path("smollm2");
    let prof = dir.file(
        "p.toml",
        &format!(
            "[[profile]]\nname = \"uld\"\nbase = {:?}\n\n[[profile.assistant]]\nmodel = {:?}\n",
            model_file.to_str().unwrap(),
            asst.to_str().unwrap()
        ),
    );
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/tofu");
    let read = |p: &str| -> Value {
        serde_json::from_str(&std::fs::read_to_string(root.join(p)).unwrap()).unwrap()
    };
    let full = read("full.json");
    let para = read("augment/forget01_paraphrases.json");
    let wrong = read("augment/forget10_wrong_answers.json");
    let wrong_of = |q: &Value| {
        wrong
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["question"] == *q)
            .unwrap()["wrong_answers"][2]
            .clone()
    };
    let forget: Vec<Value> = (0..5)
        .map(|i| {
            let q = &full[3960 + i]["question"];
            json!({"question": q, "answer": para[i]["paraphrased_answers"][2],
                   "wrong_answers": [wrong_of(q)]})
        })
        .collect();
    let unseen: Vec<Value> = (0..5)
        .map(|i| {
            let r = &full[3600 + 20 * i];
            json!({"question": r["question"], "answer": r["answer"],
                   "wrong_answers": [wrong_of(&r["question"])]})
        })
        .collect();
    let retain: Vec<Value> = (0..3)
        .map(|i| json!({"question": full[390 + i]["question"], "answer": full[390 + i]["answer"]}))
        .collect();
    let f = dir.file("forget.json", &serde_json::to_string(&forget).unwrap());
    let u = dir.file("unseen.json", &serde_json::to_string(&unseen).unwrap());
    let r = dir.file("retain.json", &serde_json::to_string(&retain).unwrap());
    // One calibration with the yardstick flags `yard`, its JSON and its stdout.
    let calibrate = |yard: [&str; 2], out: &str| -> (Value, String) {
        let out = dir.join(out);
        let mut args = vec![
            "calibrate",
            "--profile",
            prof.to_str().unwrap(),
            "--use",
            "uld",
            "--sweep",
            "alpha=0.1,0.5,2",
            "--forget",
            f.to_str().unwrap(),
        ];
        args.extend(yard);
        args.extend([
            "--retain",
            r.to_str().unwrap(),
            "--max-retain-rise",
            "0.5",
            "-t",
            "2",
            "--json",
            out.to_str().unwrap(),
        ]);
        let stdout = lethe(&args);
        let j = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        (j, stdout)
    };
    let (j, stdout) = calibrate(["--unseen", u.to_str().unwrap()], "cal.json");
    check_calibration(&j, &stdout, "unseen");
    // The stand-in yardstick: the base itself as the model that "never learned" the rows, so
    // its rows are the base's forget rows, matched exactly.
    let (j2, stdout) = calibrate(["--stand-in", model_file.to_str().unwrap()], "cal2.json");
    check_calibration(&j2, &stdout, "stand-in");
    let c2 = &j2["calibration"];
    assert_eq!(
        c2["yardstick_mean_log_r"].as_f64(),
        c2["base_forget_mean_log_r"].as_f64()
    );
    assert_eq!(c2["base_matched"].as_f64(), Some(1.0));
    // The profile's points score the same forget rows either way.
    for (a, b) in j["calibration"]["points"]
        .as_array()
        .unwrap()
        .iter()
        .zip(c2["points"].as_array().unwrap())
    {
        assert_eq!(a["mean_log_r"], b["mean_log_r"]);
        assert_eq!(a["retain_rise"], b["retain_rise"]);
    }
    // An evaluation file is refused.
    let eval = root.join("forget01_perturbed.json");
    let bad = std::process::Command::new(BIN)
        .args([
            "calibrate",
            "--profile",
            prof.to_str().unwrap(),
            "--use",
            "uld",
        ])
        .args(["--sweep", "alpha=1", "--forget", eval.to_str().unwrap()])
        .args(["--unseen", u.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("paraphrased_answer") || err.contains("perturbed_answer"),
        "{err}"
    );
    // One yardstick, not two, not none.
    for extra in [
        vec!["--unseen", u.to_str().unwrap(), "--stand-in", "smollm2"],
        vec![],
    ] {
        let bad = std::process::Command::new(BIN)
            .args(["calibrate", "--profile", prof.to_str().unwrap()])
            .args(["--use", "uld", "--sweep", "alpha=1", "--forget"])
            .arg(f.to_str().unwrap())
            .args(&extra)
            .output()
            .unwrap();
        assert!(!bad.status.success(), "{extra:?}");
        assert!(
            String::from_utf8_lossy(&bad.stderr).contains("--"),
            "{extra:?}"
        );
    }
}

/// The calibration's choice recomputed from its numbers by the rule (the highest KS match among
/// the points within the retain bound of 0.5, ties to the smaller gap to the yardstick).
fn check_calibration(j: &Value, stdout: &str, yardstick: &str) {
    let c = &j["calibration"];
    assert_eq!(c["yardstick"], yardstick);
    let pts = c["points"].as_array().unwrap();
    assert_eq!(pts.len(), 3);
    let unseen_mean = c["yardstick_mean_log_r"].as_f64().unwrap();
    let mut best: Option<usize> = None;
    for (i, p) in pts.iter().enumerate() {
        let rise = p["retain_rise"].as_f64().unwrap();
        assert_eq!(p["allowed"].as_bool().unwrap(), rise <= 0.5);
        if !p["allowed"].as_bool().unwrap() {
            continue;
        }
        let (m, g) = (
            p["matched"].as_f64().unwrap(),
            (p["mean_log_r"].as_f64().unwrap() - unseen_mean).abs(),
        );
        let better = best.is_none_or(|b| {
            let q = &pts[b];
            let (qm, qg) = (
                q["matched"].as_f64().unwrap(),
                (q["mean_log_r"].as_f64().unwrap() - unseen_mean).abs(),
            );
            m > qm || (m == qm && g < qg)
        });
        if better {
            best = Some(i);
        }
    }
    assert_eq!(c["chosen"].as_u64().map(|x| x as usize), best, "{stdout}");
    // The points score differently.
    let lr: Vec<f64> = pts
        .iter()
        .map(|p| p["mean_log_r"].as_f64().unwrap())
        .collect();
    assert!(lr[0] != lr[1] && lr[1] != lr[2], "{lr:?}");
    if let Some(b) = best {
        assert!(
            stdout.contains(&format!(
                "chosen: uld {}",
                pts[b]["name"].as_str().unwrap().trim_start_matches("uld ")
            )),
            "{stdout}"
        );
    }
}

/// `lethe eval -m smollm2 --tofu forget01 --limit 3`: every summary recomputed from the
/// per-item output, the greedy answers equal the engine's greedy decoding, forget quality
/// against the model itself is 1, and the report is one self-contained page.
#[test]
fn eval_forget01_on_smollm2() {
    let dir = TempDir::new("eval-tofu");
    let json_path = dir.join("eval.json");
    let html_path = dir.join("eval.html");
    let out = lethe(&[
        "eval",
        "-m",
        "smollm2",
        "--tofu",
        "forget01",
        "--limit",
        "3",
        "--max-tokens",
        "24",
        "--reference",
        "smollm2",
        "-t",
        "2",
        "--json",
        json_path.to_str().unwrap(),
        "--html",
        html_path.to_str().unwrap(),
    ]);
    assert!(out.contains("| Model utility |"), "{out}");
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    let side = &r["sides"][0];
    let sets = side["sets"].as_array().unwrap();
    assert_eq!(sets.len(), 4);
    let mut nine = Vec::new();
    for s in sets {
        let items = s["items"].as_array().unwrap();
        assert_eq!(items.len(), 3, "{}", s["name"]);
        let kind = s["kind"].as_str().unwrap().to_string();
        let f = |i: &Value, k: &str| i[k].as_f64().unwrap();
        let mean = |g: &dyn Fn(&Value) -> f64| items.iter().map(g).sum::<f64>() / 3.0;
        let p = |l: f64| (-l).exp();
        let prob = if kind == "Retain" {
            mean(&|i| p(f(i, "gt_loss")))
        } else {
            mean(&|i| {
                let pert: f64 = i["perturbed_loss"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| p(x.as_f64().unwrap()))
                    .sum();
                p(f(i, "gt_loss")) / (p(f(i, "gt_loss")) + pert)
            })
        };
        let tr = mean(&|i| {
            let pert = i["perturbed_loss"].as_array().unwrap();
            let mp: f64 = pert.iter().map(|x| x.as_f64().unwrap()).sum::<f64>() / pert.len() as f64;
            let r = (mp - f(i, "paraphrased_loss")).exp();
            if kind == "Forget" {
                r.min(1.0 / r)
            } else {
                (1.0 - 1.0 / r).max(0.0)
            }
        });
        let rouge = mean(&|i| f(i, "rouge_l_recall"));
        let sum = &s["summary"];
        for (got, want, what) in [
            (sum["probability"].as_f64().unwrap(), prob, "probability"),
            (sum["truth_ratio"].as_f64().unwrap(), tr, "truth ratio"),
            (sum["rouge"].as_f64().unwrap(), rouge, "rouge"),
        ] {
            assert!((got - want).abs() < 1e-9, "{kind} {what}: {got} vs {want}");
        }
        if kind != "Forget" {
            nine.extend([prob, tr, rouge]);
        }
    }
    let hm = 9.0 / nine.iter().map(|x| 1.0 / x).sum::<f64>();
    let mu = side["model_utility"].as_f64().unwrap();
    assert!((mu - hm).abs() < 1e-9, "model utility {mu} vs {hm}");
    // The same model as the reference: the same truth ratios, p-value 1.
    assert_eq!(side["forget_quality"].as_f64(), Some(1.0));
    let mia = &side["mia"];
    for k in ["loss", "zlib", "min_k", "min_k_pp"] {
        let a = mia[k].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&a), "{k}: {a}");
    }
    assert_eq!(side["holdout"].as_array().unwrap().len(), 3);

    // The first forget item, independently: its answer loss from one forward over the
    // whole sequence, its greedy answer from step-by-step decoding.
    let model = Model::open(model_path("smollm2"), 2).unwrap();
    let tok = Tokenizer::from_gguf(&model.file).unwrap();
    let item = &sets[0]["items"][0];
    let prompt = chat_prompt(&tok, &model, item["question"].as_str().unwrap());
    let answer = tok.encode(item["answer"].as_str().unwrap(), false, false);
    let full: Vec<u32> = prompt.iter().chain(&answer).copied().collect();
    let mut st = model.new_state(512);
    let mut logits = Vec::new();
    model.forward(&mut st, &full, Some(&mut logits)).unwrap();
    let v = model.cfg.n_vocab;
    let nll: f64 = (0..answer.len())
        .map(|i| {
            let p = prompt.len() + i - 1;
            -log_softmax(&logits[p * v..(p + 1) * v])[answer[i] as usize]
        })
        .sum::<f64>()
        / answer.len() as f64;
    let got = item["gt_loss"].as_f64().unwrap();
    assert!((got - nll).abs() < 1e-4, "gt_loss {got} vs {nll}");
    let mut st = model.new_state(512);
    let mut next = argmax_raw(model.forward(&mut st, &prompt, None).unwrap());
    let mut gen = Vec::new();
    while !tok.is_eog(next) && gen.len() < 24 {
        gen.push(next);
        next = argmax_raw(model.forward(&mut st, &[next], None).unwrap());
    }
    assert_eq!(
        item["generated"].as_str().unwrap(),
        tok.decode(&gen, false).trim()
    );

    let html = std::fs::read_to_string(&html_path).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert!(!html.contains("<script") && !html.contains("https://"));
    assert!(html.contains("<svg"));
}

/// `/score` returns the scorer's log-probabilities (the ULD profile's scoring use), its
/// errors are clear, a locked server scores only profiles, and `lethe eval --server` gives
/// the numbers of the local evaluation.
#[test]
fn score_route_and_eval_through_a_server() {
    let dir = TempDir::new("score-server");
    let asst = assistant(&dir);
    let model_file = model_path("smollm2");
    let prof = dir.file(
        "profiles.toml",
        &format!(
            "[[profile]]\nname = \"uld\"\nbase = {:?}\n\n[[profile.assistant]]\nmodel = {:?}\nalpha = 0.75\n",
            model_file.to_str().unwrap(),
            asst.to_str().unwrap()
        ),
    );
    let s = Server::start(&[
        "--profile",
        prof.to_str().unwrap(),
        "--alias",
        "base",
        "-t",
        "2",
    ]);
    let q = "What is the capital of France?";
    let conts = ["Paris is the capital.", "The capital is Lyon."];
    let (st, r) = s.post(
        "/score",
        &json!({"model": "uld", "messages": [{"role": "user", "content": q}],
                "continuation": conts, "stats": true}),
    );
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["object"], "score");
    assert_eq!(r["generation_settings"]["profile"], "uld");

    let model = Arc::new(Model::open(&model_file, 2).unwrap());
    let tok = Tokenizer::from_gguf(&model.file).unwrap();
    let am = Arc::new(Model::open(&asst, 2).unwrap());
    let uld = Assistant::uld(am, 0.75, 0.01);
    let mut sc = Scorer::new(model.clone(), vec![uld], None, 512).unwrap();
    sc.set_prompt(&chat_prompt(&tok, &model, q)).unwrap();
    for (k, c) in conts.iter().enumerate() {
        let ids = tok.encode(c, false, false);
        let want = sc.score(&ids).unwrap();
        let res = &r["results"][k];
        assert_eq!(res["n_tokens"], ids.len());
        let toks = res["tokens"].as_array().unwrap();
        for (j, t) in toks.iter().enumerate() {
            assert_eq!(t["id"], ids[j]);
            let lp = t["logprob"].as_f64().unwrap();
            assert!(
                (lp - want[j]).abs() < 1e-6,
                "{c} token {j}: {lp} vs {}",
                want[j]
            );
            assert!(t["sigma"].as_f64().unwrap() > 0.0 && t["mu"].as_f64().unwrap() < 0.0);
        }
    }
    // Errors: no continuation, an empty one, an unknown model, prompt and messages both.
    for (body, code) in [
        (json!({"model": "uld", "prompt": "x"}), 400),
        (
            json!({"model": "uld", "prompt": "x", "continuation": ""}),
            400,
        ),
        (
            json!({"model": "nope", "prompt": "x", "continuation": "y"}),
            404,
        ),
        (
            json!({"prompt": "x", "messages": [{"role": "user", "content": "x"}], "continuation": "y"}),
            400,
        ),
    ] {
        let (st, r) = s.post("/score", &body);
        assert_eq!(st, code, "{body}: {r}");
        assert!(r["error"]["message"].as_str().is_some());
    }

    // The same evaluation locally and through the server (the base's id).
    let local = dir.join("local.json");
    let remote = dir.join("remote.json");
    let common_args = ["--tofu", "forget01", "--limit", "2", "--max-tokens", "16"];
    let mut a = vec!["eval", "-m", model_file.to_str().unwrap(), "-t", "2"];
    a.extend(common_args);
    a.extend(["--json", local.to_str().unwrap()]);
    lethe(&a);
    let url = format!("http://{}/v1", s.addr);
    let mut a = vec!["eval", "--server", &url, "-m", "base"];
    a.extend(common_args);
    a.extend(["--json", remote.to_str().unwrap()]);
    lethe(&a);
    let l: Value = serde_json::from_str(&std::fs::read_to_string(&local).unwrap()).unwrap();
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&remote).unwrap()).unwrap();
    for (sl, sr) in l["sides"][0]["sets"]
        .as_array()
        .unwrap()
        .iter()
        .zip(r["sides"][0]["sets"].as_array().unwrap())
    {
        for (il, ir) in sl["items"]
            .as_array()
            .unwrap()
            .iter()
            .zip(sr["items"].as_array().unwrap())
        {
            assert_eq!(il["generated"], ir["generated"], "{}", il["question"]);
            let (a, b) = (
                il["gt_loss"].as_f64().unwrap(),
                ir["gt_loss"].as_f64().unwrap(),
            );
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }
    drop(s);

    // A locked server scores only its profiles.
    let s = Server::start(&[
        "--profile",
        prof.to_str().unwrap(),
        "--alias",
        "base",
        "--lock",
    ]);
    let body = json!({"model": "base", "prompt": "x", "continuation": "y"});
    let (st, r) = s.post("/score", &body);
    assert!(st == 403 || st == 404, "{st}: {r}");
    let (st, r) = s.post(
        "/score",
        &json!({"model": "uld", "prompt": "x", "continuation": "y", "unlearn": {"alpha": 0}}),
    );
    assert_eq!(st, 403, "{r}");
    let (st, r) = s.post(
        "/score",
        &json!({"model": "uld", "prompt": "x", "continuation": "y"}),
    );
    assert_eq!(st, 200, "{r}");
}
