//! Generation on the real models: seeded sampling is reproducible, stop strings and n_predict
//! end the answer, the context limit ends it with `length`, and streamed text equals the whole.

mod common;

use common::model_path;
use lethe::generate::{generate, FinishReason, Flow, GenerateParams, ModelDecoder, SamplerParams};
use lethe::model::Model;
use lethe::tokenizer::Tokenizer;
use std::sync::Arc;

fn load() -> (Arc<Model>, Tokenizer) {
    let model = Model::open(model_path("smollm2"), 2).unwrap();
    let tok = Tokenizer::from_gguf(&model.file).unwrap();
    (Arc::new(model), tok)
}

fn prompt(tok: &Tokenizer) -> Vec<u32> {
    tok.encode(
        "<|im_start|>user\nTell me about the sea.<|im_end|>\n<|im_start|>assistant\n",
        true,
        true,
    )
}

fn sampled(model: &Arc<Model>, tok: &Tokenizer, seed: u64) -> String {
    let mut dec = ModelDecoder::new(model.clone(), 256);
    let params = GenerateParams {
        n_predict: 24,
        sampler: SamplerParams {
            temperature: 1.0,
            seed,
            ..Default::default()
        },
        ..Default::default()
    };
    generate(
        &mut dec,
        tok,
        &mut Vec::new(),
        &prompt(tok),
        &params,
        |_| Flow::Continue,
    )
    .unwrap()
    .text
}

#[test]
fn same_seed_same_text() {
    let (model, tok) = load();
    let a = sampled(&model, &tok, 7);
    let b = sampled(&model, &tok, 7);
    assert_eq!(a, b);
    let others: Vec<String> = (8..12).map(|s| sampled(&model, &tok, s)).collect();
    assert!(
        others.iter().any(|o| *o != a),
        "different seeds should not all give the same text"
    );
}

#[test]
fn streamed_text_is_the_whole_text_and_n_predict_holds() {
    let (model, tok) = load();
    let mut dec = ModelDecoder::new(model.clone(), 256);
    let params = GenerateParams {
        n_predict: 20,
        sampler: SamplerParams::greedy(),
        ..Default::default()
    };
    let mut streamed = String::new();
    let g = generate(
        &mut dec,
        &tok,
        &mut Vec::new(),
        &prompt(&tok),
        &params,
        |t| {
            streamed.push_str(t);
            Flow::Continue
        },
    )
    .unwrap();
    assert_eq!(streamed, g.text);
    assert!(g.tokens.len() <= 20);
    if g.tokens.len() == 20 {
        assert_eq!(g.finish, FinishReason::Length);
    }
    assert_eq!(tok.decode(&g.tokens, false), g.text);
}

#[test]
fn stop_strings_cut_the_answer() {
    let (model, tok) = load();
    let mut dec = ModelDecoder::new(model.clone(), 256);
    let params = GenerateParams {
        n_predict: 40,
        sampler: SamplerParams::greedy(),
        ..Default::default()
    };
    let full = generate(
        &mut dec,
        &tok,
        &mut Vec::new(),
        &prompt(&tok),
        &params,
        |_| Flow::Continue,
    )
    .unwrap();
    // Stop on the second word of the greedy answer.
    let word = full
        .text
        .split_whitespace()
        .nth(1)
        .expect("a few words")
        .to_string();
    let params = GenerateParams {
        stop: vec![word.clone()],
        ..params
    };
    let mut dec = ModelDecoder::new(model.clone(), 256);
    let cut = generate(
        &mut dec,
        &tok,
        &mut Vec::new(),
        &prompt(&tok),
        &params,
        |_| Flow::Continue,
    )
    .unwrap();
    assert_eq!(cut.finish, FinishReason::Stop);
    assert_eq!(cut.stopping_word.as_deref(), Some(word.as_str()));
    assert!(!cut.text.contains(&word));
    assert!(full.text.starts_with(&cut.text));
}

#[test]
fn a_full_context_ends_with_length_and_a_long_prompt_is_an_error() {
    let (model, tok) = load();
    let p = prompt(&tok);
    let mut dec = ModelDecoder::new(model.clone(), p.len() + 5);
    let params = GenerateParams {
        n_predict: -1,
        sampler: SamplerParams::greedy(),
        ignore_eos: true,
        ..Default::default()
    };
    let g = generate(&mut dec, &tok, &mut Vec::new(), &p, &params, |_| {
        Flow::Continue
    })
    .unwrap();
    assert_eq!(g.finish, FinishReason::Length);
    assert!(g.tokens.len() <= 6);

    let mut small = ModelDecoder::new(model.clone(), 8);
    let err = generate(&mut small, &tok, &mut Vec::new(), &p, &params, |_| {
        Flow::Continue
    })
    .unwrap_err();
    assert!(matches!(err, lethe::Error::ContextFull { .. }), "{err}");
}

#[test]
fn the_cached_prefix_is_reused() {
    let (model, tok) = load();
    let mut dec = ModelDecoder::new(model.clone(), 256);
    let mut history = Vec::new();
    let params = GenerateParams {
        n_predict: 8,
        sampler: SamplerParams::greedy(),
        ..Default::default()
    };
    let p = prompt(&tok);
    let first = generate(&mut dec, &tok, &mut history, &p, &params, |_| {
        Flow::Continue
    })
    .unwrap();
    assert_eq!(first.n_cached, 0);
    let second = generate(&mut dec, &tok, &mut history, &p, &params, |_| {
        Flow::Continue
    })
    .unwrap();
    assert_eq!(second.n_cached, p.len() - 1);
    assert_eq!(
        first.text, second.text,
        "a reused cache must give the same greedy answer"
    );
}
