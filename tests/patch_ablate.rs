//! Directional ablation (`lethe::forge::ablate`) on the real SmolLM2: once the written patch is
//! applied, nothing that writes to the residual stream (embedding rows, every block's
//! attn_output and ffn_down) has a component along the direction, and so the residual stream
//! itself has none; the plain model's outputs do. Also: the direction is unit and
//! deterministic, the text reader takes every layout TOFU uses and refuses bad files, bad
//! layers are refused, and llama.cpp's Python reader reads the patch file.

mod common;

use common::TempDir;

use common::python_dump;
use lethe::forge::ablate::{self, Field};
use lethe::model::{Model, Proj, WeightId};
use lethe::patch::{self, DeltaEntry, PatchSet};
use lethe::qa::{self, Example};
use lethe::tokenizer::Tokenizer;
use lethe::Error;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Largest `|r . y| / ||y||` allowed on patched outputs. The base matmul quantizes its input
/// to 8 bits and the delta uses the exact input, so the cancellation is not exact.
const PATCHED_MAX: f64 = 1e-2;

/// TOFU rows kept with the tests (`tests/fixtures/tofu/README.md`).
fn tofu(file: &str) -> PathBuf {
    common::fixture("tofu").join(match file {
        "retain_perturbed.json" => "retain_perturbed_head40.json",
        f => f,
    })
}

fn smollm2() -> (Model, Tokenizer) {
    let m = Model::open(common::model_path("smollm2"), 2).unwrap();
    let tok = Tokenizer::from_gguf(&m.file).unwrap();
    (m, tok)
}

/// The first `n` rows of a TOFU file.
fn first(file: &str, n: usize) -> Vec<Example> {
    let mut v = qa::read_examples(tofu(file)).unwrap();
    v.truncate(n);
    v
}

/// Deterministic values in [-1, 1).
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// The largest `|u . y_t| / ||y_t||` over the rows `y_t` (width `u.len()`) of `y`.
fn max_projection(y: &[f32], u: &[f32]) -> f64 {
    y.chunks_exact(u.len())
        .map(|row| {
            let d: f64 = row.iter().zip(u).map(|(&a, &b)| a as f64 * b as f64).sum();
            let n: f64 = row.iter().map(|&a| a as f64 * a as f64).sum::<f64>().sqrt();
            d.abs() / n
        })
        .fold(0.0, f64::max)
}

fn err_text<T: std::fmt::Debug>(r: lethe::Result<T>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.to_string(),
    }
}

/// The patch written to `path` for `r` on every block, loaded back at scale 1.
fn patched(m: &Model, r: &[f32], path: &Path) -> (Vec<DeltaEntry>, PatchSet) {
    let entries = ablate::ablation_patch(m, r, 0..m.cfg.n_layer).unwrap();
    ablate::write(path, m, "test ablation", &entries).unwrap();
    let p = patch::load(path, m).unwrap();
    let set = PatchSet::new(m, &[(Arc::new(p), 1.0)]).unwrap();
    (entries, set)
}

#[test]
fn ablated_weights_write_nothing_along_the_direction() {
    let (m, tok) = smollm2();
    let (forget, retain) = (first("forget01.json", 4), first("retain_perturbed.json", 4));
    let layer = 12;
    let d = ablate::direction(&m, &tok, &forget, &retain, layer, Field::Question).unwrap();
    let norm: f64 = d.r.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5, "|r| = {norm}");
    assert_eq!((d.forget.texts, d.retain.texts), (4, 4));
    assert!(d.distance > 0.0 && d.cosine > 0.0 && d.cosine < 1.0);
    let again = ablate::direction(&m, &tok, &forget, &retain, layer, Field::Question).unwrap();
    assert_eq!(d.r, again.r, "the direction is deterministic");
    println!(
        "direction: {} + {} texts, {} + {} positions, distance {:.4}, cosine {:.4}",
        d.forget.texts, d.retain.texts, d.forget.tokens, d.retain.tokens, d.distance, d.cosine
    );

    let dir = TempDir::new("smollm2");
    let (entries, set) = patched(&m, &d.r, &dir.0.join("ablate.gguf"));
    assert_eq!(entries.len(), 1 + 2 * m.cfg.n_layer);

    // Every attn_output and ffn_down, on random inputs.
    let n = 4;
    let (mut worst_patched, mut least_base) = (0.0f64, f64::INFINITY);
    for il in 0..m.cfg.n_layer {
        for slot in [Proj::O, Proj::Down] {
            let t = WeightId::Block(il, slot);
            let (cols, _) = m.target_shape(t).unwrap();
            let x = noise(n * cols, (il * 7 + slot as usize) as u64);
            let base = m.apply_weight(t, &x, n, None).unwrap();
            let after = m.apply_weight(t, &x, n, Some(&set)).unwrap();
            worst_patched = worst_patched.max(max_projection(&after, &d.r));
            least_base = least_base.min(max_projection(&base, &d.r));
        }
    }
    println!("blocks: patched max |r.y|/|y| = {worst_patched:.2e}, plain (least) {least_base:.2e}");
    assert!(worst_patched < PATCHED_MAX, "patched: {worst_patched}");
    assert!(least_base > 10.0 * worst_patched, "plain: {least_base}");

    // Embedding rows: the question's tokens and a few others.
    let (ids, _) = qa::chat_tokens(&tok, "llama", &forget[0].question, None).unwrap();
    let mut ids: Vec<f32> = ids.iter().map(|&t| t as f32).collect();
    ids.extend([0.0, 1.0, 100.0, 1000.0, 49151.0]);
    let base = m
        .apply_weight(WeightId::Embd, &ids, ids.len(), None)
        .unwrap();
    let after = m
        .apply_weight(WeightId::Embd, &ids, ids.len(), Some(&set))
        .unwrap();
    let (pe, be) = (max_projection(&after, &d.r), max_projection(&base, &d.r));
    println!("embedding: patched max |r.e|/|e| = {pe:.2e}, plain max {be:.2e}");
    assert!(pe < 1e-5, "patched embedding rows: {pe}");
    assert!(be > 1e-2, "plain embedding rows: {be}");

    // So the residual stream itself has (almost) nothing along r, at every block.
    let (toks, _) = qa::chat_tokens(&tok, "llama", &retain[0].question, None).unwrap();
    let mut st = m.new_state(toks.len());
    let mut pst = m.new_state(toks.len());
    m.attach_patches(&mut pst, Some(Arc::new(set))).unwrap();
    let (mut worst_h, mut base_h) = (0.0f64, 0.0f64);
    for l in [1, layer, m.cfg.n_layer] {
        let h0 = m.residuals(&mut st, &toks, l).unwrap();
        let h1 = m.residuals(&mut pst, &toks, l).unwrap();
        worst_h = worst_h.max(max_projection(&h1, &d.r));
        base_h = base_h.max(max_projection(&h0, &d.r));
    }
    println!("residual stream: patched max |r.h|/|h| = {worst_h:.2e}, plain max {base_h:.2e}");
    assert!(worst_h < PATCHED_MAX, "patched residuals: {worst_h}");
    assert!(base_h > 10.0 * worst_h, "plain residuals: {base_h}");
}

#[test]
fn python_reads_the_patch() {
    let (m, _) = smollm2();
    let r = noise(m.cfg.n_embd, 5);
    let dir = TempDir::new("python");
    let path = dir.0.join("ablate.gguf");
    let entries = ablate::ablation_patch(&m, &r, 3..5).unwrap();
    ablate::write(&path, &m, "test ablation", &entries).unwrap();
    let j = python_dump(&path);
    let field = |k: &str| {
        j["fields"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["key"] == k)
            .unwrap_or_else(|| panic!("no {k}"))["value"]
            .clone()
    };
    assert_eq!(field("general.type"), "adapter");
    assert_eq!(field("adapter.type"), "delta");
    assert_eq!(field("general.architecture"), "llama");
    let tensors = j["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), 2 * entries.len());
    for e in &entries {
        let DeltaEntry::LowRank(e) = e else {
            panic!("ablation entries are low rank")
        };
        for (suf, data, shape) in [("lora_a", &e.a, [e.cols, 1]), ("lora_b", &e.b, [1, e.rows])] {
            let name = format!("{}.{suf}", e.base);
            let t = tensors
                .iter()
                .find(|t| t["name"] == name.as_str())
                .unwrap_or_else(|| panic!("no {name}"));
            assert_eq!(t["type"], 0, "{name} is F32");
            let shape: Vec<u64> = shape.iter().map(|&x| x as u64).collect();
            assert_eq!(t["shape"], serde_json::json!(shape), "{name}");
            let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
            let sha = format!("{:x}", Sha256::digest(&bytes));
            assert_eq!(t["sha256"], sha.as_str(), "{name}'s data");
        }
    }
    let names: Vec<&str> = tensors
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"token_embd.weight.lora_a"));
    assert!(names.contains(&"blk.4.ffn_down.weight.lora_b"));
    assert!(!names.iter().any(|n| n.starts_with("blk.5.")));
}

#[test]
fn gemma3_post_norms_see_nothing_along_the_direction() {
    // gemma3 writes g * y / rms(y) to the residual stream: the patch removes g * r from y.
    let m = Model::open(common::model_path("gemma3"), 2).unwrap();
    let r = noise(m.cfg.n_embd, 11);
    let rn: f64 = r.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    let r: Vec<f32> = r.iter().map(|&x| (x as f64 / rn) as f32).collect();
    let dir = TempDir::new("gemma3");
    let path = dir.0.join("ablate.gguf");
    let entries = ablate::ablation_patch(&m, &r, 0..2).unwrap();
    ablate::write(&path, &m, "test ablation", &entries).unwrap();
    let set = PatchSet::new(&m, &[(Arc::new(patch::load(&path, &m).unwrap()), 1.0)]).unwrap();
    let (mut worst, mut least) = (0.0f64, f64::INFINITY);
    for il in 0..2 {
        for slot in [Proj::O, Proj::Down] {
            let t = WeightId::Block(il, slot);
            let l = &m.layers[il];
            let g = match slot {
                Proj::O => &l.post_attn_norm.as_ref().unwrap().w,
                _ => &l.post_ffn_norm.as_ref().unwrap().w,
            };
            let (cols, _) = m.target_shape(t).unwrap();
            let x = noise(2 * cols, il as u64 + 40);
            let gy = |y: Vec<f32>| -> Vec<f32> {
                y.chunks_exact(g.len())
                    .flat_map(|row| row.iter().zip(g).map(|(&a, &b)| a * b))
                    .collect()
            };
            worst = worst.max(max_projection(
                &gy(m.apply_weight(t, &x, 2, Some(&set)).unwrap()),
                &r,
            ));
            least = least.min(max_projection(
                &gy(m.apply_weight(t, &x, 2, None).unwrap()),
                &r,
            ));
        }
    }
    println!("gemma3: patched max |r.(g*y)|/|g*y| = {worst:.2e}, plain (least) {least:.2e}");
    assert!(worst < PATCHED_MAX, "patched: {worst}");
    assert!(least > 10.0 * worst, "plain: {least}");
}

#[test]
fn answer_probability_is_a_probability() {
    let (m, tok) = smollm2();
    let items = first("forget01.json", 2);
    let mut st = m.new_state(qa::n_ctx_for(&tok, "llama", &items).unwrap());
    let (q, a) = (&items[0].question, items[0].answer.as_deref().unwrap());
    let nll = qa::answer_nll(&m, &tok, &mut st, q, a).unwrap();
    assert!(nll.is_finite() && nll > 0.0, "NLL {nll}");
    assert_eq!(nll, qa::answer_nll(&m, &tok, &mut st, q, a).unwrap());
    let p = qa::answer_prob(&m, &tok, &mut st, &items).unwrap();
    assert!(p > 0.0 && p < 1.0, "p {p}");
    let no_answer = [Example {
        question: "Who?".into(),
        answer: None,
    }];
    assert!(err_text(qa::answer_prob(&m, &tok, &mut st, &no_answer)).contains("no answer"));
}

#[test]
fn bad_layers_and_directions_are_refused() {
    let (m, tok) = smollm2();
    let n = m.cfg.n_layer;
    let (f, r) = (first("forget01.json", 1), first("retain_perturbed.json", 1));
    let e = err_text(ablate::direction(&m, &tok, &f, &r, n + 1, Field::Question));
    assert!(e.contains("out of range") && e.contains("30 blocks"), "{e}");
    assert!(
        ablate::check_layer(&m, n).is_ok(),
        "after the last block is a layer"
    );
    let e = err_text(ablate::direction(&m, &tok, &f, &f, 3, Field::Question));
    assert!(e.contains("no direction"), "{e}");
    let e = err_text(ablate::direction(&m, &tok, &[], &r, 3, Field::Question));
    assert!(e.contains("at least one"), "{e}");
    let lone = [Example {
        question: "Hello".into(),
        answer: None,
    }];
    let e = err_text(ablate::direction(&m, &tok, &lone, &r, 3, Field::Answer));
    assert!(e.contains("no answer"), "{e}");

    assert_eq!(ablate::parse_layers("3..7", n).unwrap(), 3..7);
    assert_eq!(ablate::parse_layers("3..=7", n).unwrap(), 3..8);
    assert_eq!(ablate::parse_layers("29", n).unwrap(), 29..30);
    for bad in [
        "0..31", "30", "5..5", "7..3", "a..b", "", "1..2..3", "-1..4",
    ] {
        assert!(ablate::parse_layers(bad, n).is_err(), "{bad:?} accepted");
    }
    let r0 = vec![0.0f32; m.cfg.n_embd];
    assert!(err_text(ablate::ablation_patch(&m, &r0, 0..n)).contains("norm"));
    let short = vec![1.0f32; 3];
    assert!(err_text(ablate::ablation_patch(&m, &short, 0..n)).contains("n_embd"));
    let one = noise(m.cfg.n_embd, 1);
    assert!(ablate::ablation_patch(&m, &one, 0..n + 1).is_err());
    assert!(ablate::ablation_patch(&m, &one, 4..4).is_err());
    let e = err_text(ablate::output_direction(&m, 0, Proj::Q, &one));
    assert!(e.contains("residual stream"), "{e}");
}

#[test]
fn text_files_in_every_layout() {
    let dir = TempDir::new("texts");
    let qa = |q: &str, a: Option<&str>| Example {
        question: q.into(),
        answer: a.map(Into::into),
    };
    let cases = [
        (
            "qa.json",
            r#"[{"question": "Q1", "answer": "A1", "extra": 3}, {"question": "Q2", "answer": "A2"}]"#,
        ),
        (
            "pr.json",
            r#"[{"prompt": "Q1", "response": "A1"}, {"prompt": "Q2", "response": "A2"}]"#,
        ),
        (
            "qa.jsonl",
            "{\"question\": \"Q1\", \"answer\": \"A1\"}\n\n{\"prompt\": \"Q2\", \"response\": \"A2\"}\n",
        ),
    ];
    for (name, text) in cases {
        let rows = qa::read_examples(dir.file(name, text)).unwrap();
        assert_eq!(
            rows,
            vec![qa("Q1", Some("A1")), qa("Q2", Some("A2"))],
            "{name}"
        );
    }
    let rows = qa::read_examples(dir.file("t.jsonl", "{\"text\": \"hello\"}\n")).unwrap();
    assert_eq!(rows, vec![qa("hello", None)]);
    let rows = qa::read_examples(dir.file("q.json", r#"[{"question": "Q"}]"#)).unwrap();
    assert_eq!(rows, vec![qa("Q", None)]);

    // The TOFU files themselves.
    assert_eq!(qa::read_examples(tofu("forget01.json")).unwrap().len(), 40);
    let retain = qa::read_examples(tofu("retain_perturbed.json")).unwrap();
    assert_eq!(retain.len(), 40);
    assert!(retain.iter().all(|e| e.answer.is_some()));

    let refused = [
        ("empty.json", "", "empty"),
        ("blank.jsonl", " \n\n ", "empty"),
        ("none.json", "[]", "no rows"),
        (
            "broken.json",
            "[{\"question\": \"Q\"",
            "not a valid JSON array",
        ),
        ("broken.jsonl", "{\"text\": \"a\"}\nnot json\n", "line 2"),
        ("object.json", "{\"question\": 3}", "not a string"),
        ("scalar.json", "[1, 2]", "row 1 is not a JSON object"),
        (
            "fields.json",
            r#"[{"q": "Q", "a": "A"}]"#,
            "none of the fields",
        ),
        (
            "emptyq.json",
            r#"[{"question": " ", "answer": "A"}]"#,
            "is empty",
        ),
        (
            "numans.json",
            r#"[{"question": "Q", "answer": 7}]"#,
            "not a string",
        ),
    ];
    for (name, text, want) in refused {
        let p = dir.file(name, text);
        let e = err_text(qa::read_examples(&p));
        assert!(e.contains(want), "{name}: {e}");
        assert!(e.contains(name), "{name}: the message names the file: {e}");
    }
    let missing = dir.0.join("missing.json");
    match qa::read_examples(&missing) {
        Err(Error::Io { context, .. }) => assert!(context.contains("missing.json")),
        other => panic!("expected an I/O error, got {other:?}"),
    }
    assert_eq!(Field::parse("answer").unwrap(), Field::Answer);
    assert!(Field::parse("text").is_err());
}
