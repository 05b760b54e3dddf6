//! Lockstep decoding with assistants on the real model.

mod common;

use common::model_path;
use lethe::generate::{generate, Decoder, Flow, GenerateParams, ModelDecoder, SamplerParams};
use lethe::model::Model;
use lethe::tokenizer::Tokenizer;
use lethe::unlearn::{Assistant, LockstepDecoder, TermKind};
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
    };
    let mut uld = LockstepDecoder::new(model.clone(), vec![a], 64).unwrap();
    let out = uld.feed(&[504, 2365, 6354]).unwrap().to_vec();
    let finite = out.iter().filter(|x| x.is_finite()).count();
    assert!(
        finite >= 1 && finite < out.len() / 2,
        "{finite} plausible tokens"
    );
}
