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
    let a = Assistant {
        model: model.clone(),
        kind: TermKind::Uld,
        weight: -0.75,
        filter: 0.1,
        reference: None,
        patches: None,
        score: ScoreRule::Mass,
    };
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
    let a = Assistant {
        model: small.clone(),
        kind: TermKind::Uld,
        weight: -0.75,
        filter: 0.01,
        reference: None,
        patches: None,
        score: ScoreRule::Mass,
    };
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
