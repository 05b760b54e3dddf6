//! Lockstep decoding with assistants on the real model.

mod common;

use common::model_path;
use lethe::generate::{generate, Decoder, Flow, GenerateParams, ModelDecoder, SamplerParams};
use lethe::model::Model;
use lethe::tokenizer::Tokenizer;
use lethe::unlearn::{Assistant, LockstepDecoder, ScoreRule, TermKind};
use std::sync::Arc;

fn load() -> (Arc<Model>, Tokenizer) {
    let model = Model::open(model_path("smollm2"), 2).unwrap();
    let tok = Tokenizer::from_gguf(&model.file).unwrap();
    (Arc::new(model), tok)
}

#[test]
fn the_sparse_head_equals_the_dense_one() {
    let (model, _) = load();
    let tokens = [504u32, 2365, 6354, 16438, 27003];
    let mut a = model.new_state(64);
    let dense = model.forward(&mut a, &tokens, None).unwrap().to_vec();
    let rows: Vec<u32> = (0..dense.len() as u32)
        .filter(|r| r % 7 == 3 || *r < 5)
        .collect();
    let mut b = model.new_state(64);
    let mut sparse = vec![0.0; rows.len()];
    model
        .forward_rows(&mut b, &tokens, &rows, &mut sparse)
        .unwrap();
    for (i, &r) in rows.iter().enumerate() {
        assert_eq!(sparse[i], dense[r as usize], "row {r}");
    }
    assert!(model
        .forward_rows(&mut b, &[1], &[u32::MAX], &mut [0.0])
        .is_err());
}

/// With the target itself as the assistant and 0 < alpha < 1, the combination is
/// (1 - alpha) * l_T on the plausible set: greedy decoding must not change.
#[test]
fn the_target_as_its_own_assistant_keeps_greedy_output() {
    let (model, tok) = load();
    let prompt = tok.encode(
        "<|im_start|>user\nName three rivers.<|im_end|>\n<|im_start|>assistant\n",
        true,
        true,
    );
    let params = GenerateParams {
        n_predict: 24,
        sampler: SamplerParams::greedy(),
        ..Default::default()
    };
    let mut base = ModelDecoder::new(model.clone(), 256);
    let want = generate(&mut base, &tok, &mut Vec::new(), &prompt, &params, |_| {
        Flow::Continue
    })
    .unwrap();
    for filter in [0.01f32, 0.0] {
        let a = Assistant {
            model: model.clone(),
            kind: TermKind::Uld,
            weight: -0.5,
            filter,
            reference: None,
            patches: None,
            score: ScoreRule::Mass,
        };
        let mut uld = LockstepDecoder::new(model.clone(), vec![a], 256).unwrap();
        let got = generate(&mut uld, &tok, &mut Vec::new(), &prompt, &params, |_| {
            Flow::Continue
        })
        .unwrap();
        assert_eq!(got.tokens, want.tokens, "filter {filter}");
        assert_eq!(uld.pos(), prompt.len() + got.tokens.len() - 1);
    }
}

#[test]
fn sampling_gives_minus_infinity_outside_the_plausible_set() {
    let (model, _) = load();
    let a = Assistant::uld(model.clone(), 0.75, 0.1);
    let mut uld = LockstepDecoder::new(model.clone(), vec![a], 64).unwrap();
    let out = uld.feed(&[504, 2365, 6354]).unwrap().to_vec();
    let finite = out.iter().filter(|x| x.is_finite()).count();
    assert!(
        finite >= 1 && finite < out.len() / 2,
        "{finite} plausible tokens"
    );
}

/// The sparse path (one ULD term, filter on) gives the same sampling distribution as the dense
/// combination over full logits: softmax over the plausible set is shift-invariant.
#[test]
fn the_sparse_path_samples_as_the_dense_combination() {
    let (model, _) = load();
    // A different assistant: the target's first 8 blocks with its norm and head.
    let mut small = Model::from_file(model.file.clone(), model.pool.clone()).unwrap();
    small.layers.truncate(8);
    let small = Arc::new(small);
    let tokens = [504u32, 2365, 6354, 16438];
    let a = Assistant::uld(small.clone(), 0.75, 0.01);
    let mut uld = LockstepDecoder::new(model.clone(), vec![a], 64).unwrap();
    let sparse = uld.feed(&tokens).unwrap().to_vec();

    let (mut st, mut sa) = (model.new_state(64), small.new_state(64));
    let tl = model.forward(&mut st, &tokens, None).unwrap().to_vec();
    let al = small.forward(&mut sa, &tokens, None).unwrap().to_vec();
    let term = lethe::unlearn::Term {
        kind: TermKind::Uld,
        weight: -0.75,
        logits: &al,
        reference: None,
        filter: 0.01,
        score: ScoreRule::Mass,
    };
    let mut dense = Vec::new();
    lethe::unlearn::combine(&tl, &[term], lethe::unlearn::Use::Sample, &mut dense);

    let softmax = |x: &[f32]| -> Vec<f64> {
        let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let e: Vec<f64> = x.iter().map(|&v| (v as f64 - m).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|v| v / s).collect()
    };
    let (p, q) = (softmax(&sparse), softmax(&dense));
    for j in 0..p.len() {
        assert_eq!(
            sparse[j].is_finite(),
            dense[j].is_finite(),
            "token {j} in one set only"
        );
        assert!(
            (p[j] - q[j]).abs() < 1e-5,
            "token {j}: {} vs {}",
            p[j],
            q[j]
        );
    }
}

/// A random LoRA for `model` written to `out` by `lethe patch random` with `args`.
fn random_lora(model: &std::path::Path, out: &std::path::Path, args: &[&str]) {
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_lethe"))
        .args(["patch", "random", "-m"])
        .arg(model)
        .args(args)
        .arg("-o")
        .arg(out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
}

/// An assistant of `k` blocks of SmolLM2, written into a temporary folder.
fn truncated(k: usize, dir: &common::TempDir) -> Arc<Model> {
    let path = dir.join(&format!("assistant{k}.gguf"));
    let src = lethe::gguf::GgufFile::open(model_path("smollm2")).unwrap();
    lethe::forge::truncate_model(&src, k, &path).unwrap();
    Arc::new(Model::open(&path, 2).unwrap())
}

/// Lockstep decoders stepped together by `feed_each` (the targets in one batched forward, the
/// assistants in another, the sparse heads per sequence) give each decoder, bit for bit, the
/// logits it gets stepping alone: the sparse ULD path, the dense path (filter off; two terms,
/// ULD and WHP), an assistant with a LoRA, decoders of different alphas in one group, prompts
/// of different lengths, and decoders of other kinds in the same call.
#[test]
fn batched_lockstep_steps_equal_single_steps() {
    let dir = common::TempDir::new("lockstep-batch");
    let (model, tok) = load();
    let a4 = truncated(4, &dir);
    let a2 = truncated(2, &dir);
    let lora = dir.join("a4-lora.gguf");
    random_lora(
        &dir.join("assistant4.gguf"),
        &lora,
        &["--rank", "4", "--blocks", "0..2"],
    );
    let p = lethe::patch::load(&lora, &a4).unwrap();
    let a4_patches = Some(Arc::new(
        lethe::patch::PatchSet::new(&a4, &[(Arc::new(p), 1.0)]).unwrap(),
    ));
    let uld = |m: &Arc<Model>, alpha: f32, filter: f32, patches| Assistant {
        model: m.clone(),
        kind: TermKind::Uld,
        weight: -alpha,
        filter,
        reference: None,
        patches,
        score: ScoreRule::Mass,
    };
    let whp = Assistant {
        kind: TermKind::Whp,
        ..uld(&a2, 1.0, 0.05, None)
    };
    // Each decoder's terms; several share a group (same models, same path).
    let specs: Vec<Vec<Assistant>> = vec![
        vec![uld(&a4, 0.75, 0.01, None)],
        vec![uld(&a4, 2.0, 0.1, None)],
        vec![uld(&a4, 0.75, 0.01, a4_patches.clone())],
        vec![uld(&a4, 1.0, 0.01, a4_patches.clone())],
        vec![uld(&a4, 0.75, 0.0, None)],
        vec![uld(&a4, 0.5, 0.0, None)],
        vec![uld(&a4, 0.75, 0.01, None), whp.clone()],
        vec![uld(&a4, 1.5, 0.02, None), whp],
        vec![uld(&a4, 0.75, 0.01, None)],
    ];
    let prompt = |i: usize| {
        tok.encode(
            &format!("Question {i}: name {} rivers of Europe and say why.", i + 2),
            true,
            false,
        )[..4 + (i * 3) % 9]
            .to_vec()
    };
    let steps: Vec<Vec<u32>> = (0..specs.len())
        .map(|i| (0..4).map(|k| (1000 + 97 * i + 31 * k) as u32).collect())
        .collect();
    let make = |s: &Vec<Assistant>| LockstepDecoder::new(model.clone(), s.clone(), 64).unwrap();
    // Alone.
    let mut want: Vec<Vec<Vec<f32>>> = Vec::new();
    for (i, s) in specs.iter().enumerate() {
        let mut d = make(s);
        d.feed(&prompt(i)).unwrap();
        want.push(
            steps[i]
                .iter()
                .map(|&t| d.feed(&[t]).unwrap().to_vec())
                .collect(),
        );
    }
    // Together, with a plain decoder in the same call.
    let mut decs: Vec<Box<dyn Decoder>> = specs.iter().map(|s| Box::new(make(s)) as _).collect();
    decs.push(Box::new(ModelDecoder::new(model.clone(), 64)));
    for (i, d) in decs.iter_mut().enumerate() {
        d.feed(&prompt(i.min(specs.len() - 1))).unwrap();
    }
    for k in 0..4 {
        let toks: Vec<u32> = (0..decs.len())
            .map(|i| steps[i.min(specs.len() - 1)][k])
            .collect();
        let mut refs: Vec<&mut dyn Decoder> = Vec::with_capacity(decs.len());
        for d in decs.iter_mut() {
            refs.push(d.as_mut());
        }
        let mut got: Vec<Option<Vec<f32>>> = vec![None; refs.len()];
        lethe::generate::feed_each(&mut refs, &toks, |i, r| got[i] = Some(r.unwrap().to_vec()));
        for (i, w) in want.iter().enumerate() {
            let g = got[i].as_ref().expect("every decoder stepped");
            let same = g.iter().zip(&w[k]).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "decoder {i}, step {k}: batched logits differ from stepping alone"
            );
        }
        assert!(got[specs.len()].is_some());
    }
}

/// A truncated assistant shares its blocks with the target (the same bytes, found without
/// being told), and decode steps that run both models' rows through those blocks together
/// give, bit for bit, what each model alone gives: one decoder and several stepped together,
/// with and without patches on the assistant (a LoRA on the shared blocks, a control vector),
/// on SmolLM2 and on gemma3 (whose embeddings are scaled).
#[test]
fn shared_blocks_give_the_same_bits() {
    let dir = common::TempDir::new("lockstep-shared");
    let smol = Arc::new(Model::open(model_path("smollm2"), 2).unwrap());
    let gemma = Arc::new(Model::open(model_path("gemma3"), 2).unwrap());
    assert_eq!(
        smol.shared_blocks(&gemma),
        None,
        "different models share nothing"
    );
    for (name, model, k, arch) in [
        ("smollm2", &smol, 6, "llama"),
        ("gemma3", &gemma, 7, "gemma3"),
    ] {
        let model = model.clone();
        let path = dir.join(&format!("{name}-a{k}.gguf"));
        lethe::forge::truncate_model(&model.file, k, &path).unwrap();
        let am = Arc::new(Model::open(&path, 2).unwrap());
        assert_eq!(model.shared_blocks(&am).map(|s| s.k()), Some(k), "{name}");
        assert_eq!(
            model.shared_blocks(&model).map(|s| s.k()),
            Some(model.cfg.n_layer),
            "{name}: a model shares all its blocks with itself"
        );
        // A LoRA over blocks 0..3 and a control vector on block 1.
        let lora = dir.join(&format!("{name}-lora.gguf"));
        random_lora(
            &path,
            &lora,
            &["--rank", "4", "--blocks", "0..3", "--std", "0.01"],
        );
        let cvec = dir.join(&format!("{name}-cvec.gguf"));
        let mut rng = common::Rng(17);
        lethe::patch::write_cvec(&cvec, arch, &[(1, rng.vec(am.cfg.n_embd, 0.3))]).unwrap();
        let parts = vec![
            (Arc::new(lethe::patch::load(&lora, &am).unwrap()), 1.0),
            (Arc::new(lethe::patch::load(&cvec, &am).unwrap()), 1.0),
        ];
        let patched = Some(Arc::new(lethe::patch::PatchSet::new(&am, &parts).unwrap()));
        for patches in [None, patched] {
            let a = Assistant {
                model: am.clone(),
                kind: TermKind::Uld,
                weight: -0.8,
                filter: 0.01,
                reference: None,
                patches: patches.clone(),
                score: ScoreRule::Mass,
            };
            let make = |share: bool| {
                LockstepDecoder::new(model.clone(), vec![a.clone()], 64)
                    .unwrap()
                    .with_shared_blocks(share)
            };
            assert_eq!(make(true).shared_blocks(), k);
            assert_eq!(make(false).shared_blocks(), 0);
            let prompts: Vec<Vec<u32>> = (0..3)
                .map(|i| {
                    (0..3 + 2 * i)
                        .map(|j| (300 + 41 * i + 7 * j) as u32)
                        .collect()
                })
                .collect();
            let steps: Vec<Vec<u32>> = (0..3)
                .map(|i| (0..4).map(|j| (900 + 53 * i + 13 * j) as u32).collect())
                .collect();
            // Each model alone, one decoder at a time.
            let mut want = Vec::new();
            for (p, s) in prompts.iter().zip(&steps) {
                let mut d = make(false);
                d.feed(p).unwrap();
                let w: Vec<Vec<f32>> = s.iter().map(|&t| d.feed(&[t]).unwrap().to_vec()).collect();
                want.push(w);
            }
            let bits =
                |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            let what = if patches.is_some() {
                "patched"
            } else {
                "plain"
            };
            // Shared, one decoder at a time.
            for (i, (p, s)) in prompts.iter().zip(&steps).enumerate() {
                let mut d = make(true);
                d.feed(p).unwrap();
                for (j, &t) in s.iter().enumerate() {
                    let got = d.feed(&[t]).unwrap();
                    assert!(
                        bits(got, &want[i][j]),
                        "{name} {what}: decoder {i} step {j} alone"
                    );
                }
            }
            // Shared, stepped together.
            let mut decs: Vec<Box<dyn Decoder>> = prompts
                .iter()
                .map(|p| {
                    let mut d = make(true);
                    d.feed(p).unwrap();
                    Box::new(d) as _
                })
                .collect();
            for j in 0..4 {
                let toks: Vec<u32> = steps.iter().map(|s| s[j]).collect();
                let mut refs: Vec<&mut dyn Decoder> =
                    decs.iter_mut().map(|d| d.as_mut() as _).collect();
                let mut got: Vec<Option<Vec<f32>>> = vec![None; refs.len()];
                lethe::generate::feed_each(&mut refs, &toks, |i, r| {
                    got[i] = Some(r.unwrap().to_vec())
                });
                for (i, g) in got.iter().enumerate() {
                    let g = g.as_ref().expect("every decoder stepped");
                    assert!(
                        bits(g, &want[i][j]),
                        "{name} {what}: decoder {i} step {j} batched"
                    );
                }
            }
        }
    }
}
