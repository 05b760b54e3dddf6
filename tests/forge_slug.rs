//! SLUG (`lethe::forge::slug`): the full-matrix gradients taken from the training core's
//! backward pass, against central finite differences on a tiny random llama model; the norms
//! and cosines through the tokens' Gram matrices, against the materialised gradients; the
//! Pareto front on hand-made points; the step search on a known function; and a short run on
//! SmolLM2 with TOFU rows whose patch loads and raises the forget loss more than the retain
//! loss.
//!
//! Error budget of the finite differences. The loss is computed by the f32 training forward
//! (the weights perturbed through a rank-1 adapter `W + h e_r e_c^T`, so nothing is rounded
//! into a file): its rounding is ~1e-7 relative to a loss of ~4 nats, so with `h = 1e-2` the
//! central difference carries ~2e-5 of rounding and `h^2 f''' / 6 ~ 2e-5` of truncation
//! (entries of the tiny model's weights are ~0.2, so a step of 1e-2 is small). Gradient
//! entries reach ~1e-1; they are compared with `|g - fd| <= 1e-3 * max|fd| + 2e-3 * |fd|`
//! per matrix. A wrong or missing term (a transposed `dW`, a missing token, a sequence
//! counted twice) is of the order of the entries themselves.

mod common;

use common::{Rng, TempDir};
use lethe::forge::slug::{
    self, dense_grad, dense_stats, gram_stats, pareto_front, search_step, GradStats, SearchOpts,
    SlugOpts, Tokens,
};
use lethe::forge::train::{Lora, Objective, TrainModel};
use lethe::gguf::{GgufFile, GgufWriter};
use lethe::model::{Model, Proj, WeightId};
use lethe::patch::{PatchKind, PatchSet};
use lethe::pool::ThreadPool;
use lethe::qa::{self, Example};
use lethe::tokenizer::Tokenizer;
use lethe_kernels::quant::{self, GgmlType};
use std::sync::Arc;

const E: usize = 32;
const N_LAYER: usize = 2;
const N_HEAD: usize = 4;
const N_HEAD_KV: usize = 2;
const FF: usize = 64;
const VOCAB: usize = 50;

fn add_matrix(w: &mut GgufWriter, rng: &mut Rng, name: &str, cols: usize, rows: usize, g: f32) {
    let data = rng.vec(rows * cols, g / (cols as f32).sqrt());
    let ty = GgmlType::F32;
    let rb = ty.row_bytes(cols);
    let mut bytes = vec![0u8; rb * rows];
    for (src, dst) in data.chunks_exact(cols).zip(bytes.chunks_exact_mut(rb)) {
        quant::quantize_row(ty, src, dst).unwrap();
    }
    w.add_tensor(name, &[cols as u64, rows as u64], ty, bytes)
        .unwrap();
}

fn add_norm(w: &mut GgufWriter, rng: &mut Rng, name: &str, n: usize) {
    let v: Vec<f32> = (0..n).map(|_| 1.0 + 0.2 * rng.normal()).collect();
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    w.add_tensor(name, &[n as u64], GgmlType::F32, bytes)
        .unwrap();
}

/// A random llama model with F32 weights and an untied head.
fn tiny(seed: u64) -> Model {
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
    w.set("llama.attention.layer_norm_norm_epsilon", 1e-5f32)
        .unwrap();
    w.set("llama.rope.freq_base", 10000f32).unwrap();
    w.set("llama.context_length", 256u32).unwrap();
    w.set("llama.vocab_size", VOCAB as u32).unwrap();
    add_matrix(
        &mut w,
        &mut rng,
        "token_embd.weight",
        E,
        VOCAB,
        (E as f32).sqrt(),
    );
    for i in 0..N_LAYER {
        let n = |s: &str| format!("blk.{i}.{s}.weight");
        add_norm(&mut w, &mut rng, &n("attn_norm"), E);
        add_matrix(&mut w, &mut rng, &n("attn_q"), E, E, 2.0);
        add_matrix(&mut w, &mut rng, &n("attn_k"), E, N_HEAD_KV * hd, 2.0);
        add_matrix(&mut w, &mut rng, &n("attn_v"), E, N_HEAD_KV * hd, 1.0);
        add_matrix(&mut w, &mut rng, &n("attn_output"), E, E, 1.0);
        add_norm(&mut w, &mut rng, &n("ffn_norm"), E);
        add_matrix(&mut w, &mut rng, &n("ffn_gate"), E, FF, 1.0);
        add_matrix(&mut w, &mut rng, &n("ffn_up"), E, FF, 1.0);
        add_matrix(&mut w, &mut rng, &n("ffn_down"), FF, E, 1.0);
    }
    add_norm(&mut w, &mut rng, "output_norm.weight", E);
    add_matrix(&mut w, &mut rng, "output.weight", E, VOCAB, 2.0);
    let file = Arc::new(GgufFile::from_bytes(w.to_bytes().unwrap()).unwrap());
    Model::from_file(file, Arc::new(ThreadPool::new(1))).unwrap()
}

/// Two sequences with their answer labels (the last tokens of each).
fn sequences() -> Vec<(Vec<u32>, Vec<Option<u32>>)> {
    let seqs: [(&[u32], usize); 2] = [
        (&[3, 17, 42, 8, 0, 25, 17, 9], 4),
        (&[11, 2, 30, 30, 7, 49, 1], 3),
    ];
    seqs.iter()
        .map(|&(t, start)| {
            let mut labels = vec![None; t.len()];
            for p in start..t.len() {
                labels[p - 1] = Some(t[p]);
            }
            (t.to_vec(), labels)
        })
        .collect()
}

/// `L = mean over the sequences of each one's mean cross-entropy`, with `tm`'s adapters.
fn set_loss(tm: &TrainModel, seqs: &[(Vec<u32>, Vec<Option<u32>>)]) -> f64 {
    let nv = tm.model.cfg.n_vocab;
    let mut sum = 0.0;
    for (tokens, labels) in seqs {
        let act = tm.forward(tokens).unwrap();
        let mut d = vec![0f32; act.logits.len()];
        sum += Objective::CrossEntropy { labels }
            .loss(&act.logits, nv, &mut d)
            .unwrap();
    }
    sum / seqs.len() as f64
}

/// The captured tokens of every matrix of every block for the gradient of `set_loss`.
fn capture(m: &Model, seqs: &[(Vec<u32>, Vec<Option<u32>>)]) -> Vec<[Tokens; 7]> {
    let lora = Lora::new(m, [], &[], 1, 1.0, 0).unwrap();
    let mut tm = TrainModel::new(m, lora).unwrap();
    let mut mats: Vec<[Tokens; 7]> = (0..N_LAYER).map(|_| Default::default()).collect();
    for (tokens, labels) in seqs {
        let act = tm.forward(tokens).unwrap();
        let mut d = vec![0f32; act.logits.len()];
        Objective::CrossEntropy { labels }
            .loss(&act.logits, m.cfg.n_vocab, &mut d)
            .unwrap();
        d.iter_mut().for_each(|g| *g /= seqs.len() as f32);
        let n = act.n;
        tm.backward_capture(&act, &d, 0, &mut |il, slot, x, dy| {
            let t = &mut mats[il][slot as usize];
            t.n += n;
            t.x.extend_from_slice(x);
            t.dy.extend_from_slice(dy);
        })
        .unwrap();
    }
    mats
}

#[test]
fn full_matrix_gradients_match_finite_differences() {
    let m = tiny(21);
    let seqs = sequences();
    let mats = capture(&m, &seqs);
    let h = 1e-2f32;
    let mut rng = Rng(5);
    for (il, mat) in mats.iter().enumerate() {
        for slot in Proj::ALL {
            let (cols, rows) = m.target_shape(WeightId::Block(il, slot)).unwrap();
            let g = dense_grad(&m.pool, &mat[slot as usize], cols, rows); // [rows, cols]
            let lora = Lora::new(&m, [il], &[slot], 1, 1.0, 0).unwrap();
            let mut tm = TrainModel::new(&m, lora).unwrap();
            // Every entry of one matrix of the lowest block; elsewhere the largest entry and
            // 40 drawn at random.
            let entries: Vec<usize> = if il == 0 && slot == Proj::K {
                (0..rows * cols).collect()
            } else {
                let big = (0..g.len())
                    .max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs()))
                    .unwrap();
                std::iter::once(big)
                    .chain((0..40).map(|_| (rng.uniform() * g.len() as f64) as usize))
                    .collect()
            };
            let mut fd = Vec::with_capacity(entries.len());
            for &i in &entries {
                let (r, c) = (i / cols, i % cols);
                let p = &mut tm.lora.params[0];
                p.b.fill(0.0);
                p.b[r] = 1.0;
                p.a.fill(0.0);
                p.a[c] = h;
                let up = set_loss(&tm, &seqs);
                tm.lora.params[0].a[c] = -h;
                let down = set_loss(&tm, &seqs);
                fd.push((up - down) / (2.0 * h as f64));
            }
            let scale = fd.iter().fold(0f64, |a, &x| a.max(x.abs()));
            assert!(
                scale > 1e-4,
                "blk.{il}.{}: no gradient to compare",
                slot.tensor()
            );
            for (&i, &want) in entries.iter().zip(&fd) {
                let got = g[i] as f64;
                assert!(
                    (got - want).abs() <= 1e-3 * scale + 2e-3 * want.abs(),
                    "blk.{il}.{} [{}, {}]: dW {got} vs finite difference {want} (max {scale})",
                    slot.tensor(),
                    i / cols,
                    i % cols
                );
            }
        }
    }
}

#[test]
fn capture_leaves_the_adapter_gradients_unchanged() {
    let m = tiny(22);
    let seqs = sequences();
    let lora = Lora::new(&m, [0, 1], &Proj::ALL, 2, 4.0, 9).unwrap();
    let mut a = TrainModel::new(&m, lora.clone()).unwrap();
    let mut b = TrainModel::new(&m, lora).unwrap();
    for p in a.lora.params.iter_mut() {
        p.b.iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = 0.01 * (i % 7) as f32);
    }
    b.lora.params = a.lora.params.clone();
    let (tokens, labels) = &seqs[0];
    let act = a.forward(tokens).unwrap();
    let mut d = vec![0f32; act.logits.len()];
    Objective::CrossEntropy { labels }
        .loss(&act.logits, VOCAB, &mut d)
        .unwrap();
    a.backward(&act, &d).unwrap();
    let mut calls = 0;
    b.backward_capture(&act, &d, 1, &mut |il, _, _, _| {
        assert_eq!(il, 1);
        calls += 1;
    })
    .unwrap();
    assert_eq!(calls, 7);
    for (p, q) in a.lora.params.iter().zip(&b.lora.params) {
        assert_eq!(p.grad_a, q.grad_a);
        assert_eq!(p.grad_b, q.grad_b);
    }
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs())
}

fn check_stats(what: &str, g: GradStats, d: GradStats) {
    assert!(
        close(g.ff, d.ff, 1e-5),
        "{what}: ||g_F||^2 {} vs {}",
        g.ff,
        d.ff
    );
    assert!(
        close(g.rr, d.rr, 1e-5),
        "{what}: ||g_R||^2 {} vs {}",
        g.rr,
        d.rr
    );
    assert!(
        (g.cos() - d.cos()).abs() <= 1e-5,
        "{what}: cos {} vs {}",
        g.cos(),
        d.cos()
    );
}

#[test]
fn gram_norms_and_cosines_match_the_materialised_gradients() {
    // Gradients of the tiny model: the two sequences as forget and retain sets.
    let m = tiny(23);
    let seqs = sequences();
    let f = capture(&m, &seqs[..1]);
    let r = capture(&m, &seqs[1..]);
    for il in 0..N_LAYER {
        for slot in Proj::ALL {
            let (cols, rows) = m.target_shape(WeightId::Block(il, slot)).unwrap();
            let (a, b) = (&f[il][slot as usize], &r[il][slot as usize]);
            let g = gram_stats(&m.pool, a, b);
            let d = dense_stats(&m.pool, a, b, cols, rows);
            check_stats(&format!("blk.{il}.{}", slot.tensor()), g, d);
        }
    }
    // Random tokens, with one forget direction shared by the retain set (a cosine far from 0).
    let mut rng = Rng(8);
    let (cols, rows) = (48, 20);
    let mk = |rng: &mut Rng, n: usize| Tokens {
        n,
        x: rng.vec(n * cols, 1.0),
        dy: rng.vec(n * rows, 1.0),
    };
    let a = mk(&mut rng, 30);
    let mut b = mk(&mut rng, 17);
    b.x[..5 * cols].copy_from_slice(&a.x[..5 * cols]);
    b.dy[..5 * rows].copy_from_slice(&a.dy[..5 * rows]);
    let (g, d) = (
        gram_stats(&m.pool, &a, &b),
        dense_stats(&m.pool, &a, &b, cols, rows),
    );
    check_stats("random", g, d);
    assert!(d.cos() > 0.05, "the shared tokens align the gradients");
}

#[test]
fn pareto_front_on_hand_made_points() {
    // (importance, alignment): high importance and low alignment are better.
    let pts = [
        (1.0, 0.9),  // 0: front (the most important)
        (0.5, 0.5),  // 1: front
        (0.4, 0.6),  // 2: dominated by 1
        (0.2, 0.1),  // 3: front (the least aligned)
        (0.2, 0.2),  // 4: dominated by 3
        (0.5, 0.5),  // 5: a tie with 1: neither dominates
        (0.9, 0.95), // 6: dominated by 0
        (f64::NAN, 0.0),
    ];
    assert_eq!(pareto_front(&pts), vec![0, 1, 5, 3]);
    assert_eq!(pareto_front(&[(0.3, 0.3)]), vec![0]);
    assert!(pareto_front(&[]).is_empty());
}

#[test]
fn step_search_finds_the_largest_accepted_step() {
    // forget = 1 + lambda, retain = 2 + lambda^2: the retain bound 0.09 is met up to 0.3.
    let opts = SearchOpts {
        max_retain_increase: 0.09,
        steps: 12,
        lambda0: 0.1,
        lambda_max: 10.0,
    };
    let mut eval = |l: f64| Ok((1.0 + l, 2.0 + l * l));
    let s = search_step((1.0, 2.0), &opts, &mut eval).unwrap();
    let lambdas: Vec<f64> = s.steps.iter().map(|s| s.lambda).collect();
    assert_eq!(&lambdas[..4], &[0.1, 0.2, 0.4, 0.30000000000000004]);
    let best = s.best.unwrap();
    assert!(best.lambda <= 0.3 + 1e-12 && best.lambda > 0.29, "{best:?}");
    assert!(s
        .steps
        .iter()
        .all(|t| t.accepted == (t.lambda <= 0.3 + 1e-12)));
    // A first step too large: down by 4 until one is accepted, then bisect.
    let big = SearchOpts {
        lambda0: 1.0,
        ..opts
    };
    let s = search_step((1.0, 2.0), &big, &mut eval).unwrap();
    let lambdas: Vec<f64> = s.steps.iter().map(|s| s.lambda).collect();
    assert_eq!(&lambdas[..3], &[1.0, 0.25, 0.625]);
    let best = s.best.unwrap();
    assert!(best.lambda <= 0.3 + 1e-12 && best.lambda > 0.29, "{best:?}");
    // Nothing accepted: no step.
    let mut bad = |l: f64| Ok((1.0 + l, 3.0));
    let s = search_step((1.0, 2.0), &opts, &mut bad).unwrap();
    assert!(s.best.is_none() && s.steps.len() == 12);
    // Stops at the largest step allowed.
    let mut flat = |l: f64| Ok((1.0 + l, 2.0));
    let s = search_step((1.0, 2.0), &opts, &mut flat).unwrap();
    assert_eq!(s.best.unwrap().lambda, 10.0);
    assert_eq!(s.steps.len(), 8); // 0.1 .. 6.4, then 10
}

#[test]
fn targets_parse() {
    assert_eq!(slug::parse_slots("all").unwrap(), Proj::ALL.to_vec());
    assert_eq!(
        slug::parse_slots("o, ffn_down,o").unwrap(),
        vec![Proj::O, Proj::Down]
    );
    assert!(slug::parse_slots("attn").is_err());
    assert!(slug::parse_slots(" , ").is_err());
}

fn tofu(file: &str, n: usize) -> Vec<Example> {
    let mut v = qa::read_examples(common::fixture("tofu").join(file)).unwrap();
    v.truncate(n);
    v
}

#[test]
fn slug_on_smollm2_raises_the_forget_loss_more_than_the_retain_loss() {
    let m = Model::open(common::model_path("smollm2"), 2).unwrap();
    let tok = Tokenizer::from_gguf(&m.file).unwrap();
    let forget = tofu("forget01.json", 3);
    let retain = tofu("retain_perturbed_head40.json", 3);
    let dir = TempDir::new("slug");
    let out = dir.join("slug.gguf");
    let opts = SlugOpts {
        layers: 28..30,
        slots: Proj::ALL.to_vec(),
        candidates: 1,
        search: SearchOpts {
            max_retain_increase: 0.1,
            steps: 6,
            lambda0: 0.1,
            lambda_max: 10.0,
        },
        ty: GgmlType::F16,
    };
    let r = slug::slug(&m, &tok, &forget, &retain, &opts, &out).unwrap();
    assert_eq!(r.scored.len(), 14);
    assert!(!r.front.is_empty());
    for s in &r.scored {
        assert!(
            s.importance > 0.0 && (0.0..=1.0).contains(&s.alignment),
            "{s:?}"
        );
    }
    let (i, step) = r.chosen.expect("a step was accepted");
    let chosen = &r.scored[i];
    assert!(r.front.contains(&i));
    assert!(!dir.join("slug.candidate.gguf").exists());

    // The patch loads: one dense delta of the chosen matrix.
    let p = lethe::patch::load(&out, &m).unwrap();
    assert_eq!(p.kind, PatchKind::Delta);
    assert_eq!(p.tensors.len(), 1);
    assert_eq!(
        p.tensors[0].target,
        WeightId::Block(chosen.layer, chosen.slot)
    );
    let set = Arc::new(PatchSet::new(&m, &[(Arc::new(p), 1.0)]).unwrap());
    let f = slug::mean_answer_nll(&m, &tok, &forget, Some(set.clone())).unwrap();
    let rt = slug::mean_answer_nll(&m, &tok, &retain, Some(set)).unwrap();
    let (df, dr) = (f - r.base.0, rt - r.base.1);
    assert!(df > 0.0 && df > dr, "forget {df:+}, retain {dr:+}");
    assert!(dr <= 0.1 + 1e-3, "retain rose {dr}");
    // The file holds the step searched (F16 rounding aside).
    assert!((f - step.forget).abs() < 2e-2 && (rt - step.retain).abs() < 2e-2);
}
