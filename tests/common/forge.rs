//! Helpers of the training tests: running the `lethe` binary, and an answer's NLL through the
//! engine with an optional LoRA.

use lethe::model::Model;
use lethe::patch::PatchSet;
use lethe::qa::{answer_nll, n_ctx_for, Example};
use lethe::tokenizer::Tokenizer;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

/// `lethe ARGS`, whatever its exit status.
pub fn lethe_out(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lethe"))
        .args(args)
        .output()
        .unwrap()
}

/// `lethe ARGS`, which must succeed; its stdout (echoed for the test log).
pub fn lethe(args: &[&str]) -> String {
    let out = lethe_out(args);
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "lethe {args:?} failed:\n{so}\n{se}");
    eprintln!("{so}");
    so.into_owned()
}

/// Mean over `items` of the mean NLL per answer token, with `model` and an optional LoRA.
pub fn mean_nll(model: &Model, lora: Option<&Path>, items: &[Example]) -> f64 {
    let tok = Tokenizer::from_gguf(&model.file).unwrap();
    let n_ctx = n_ctx_for(&tok, model.cfg.arch.name(), items).unwrap();
    let mut st = model.new_state(n_ctx);
    if let Some(l) = lora {
        let p = lethe::patch::load(l, model).unwrap();
        let ps = PatchSet::new(model, &[(Arc::new(p), 1.0)]).unwrap();
        model.attach_patches(&mut st, Some(Arc::new(ps))).unwrap();
    }
    let sum: f64 = items
        .iter()
        .map(|e| {
            answer_nll(
                model,
                &tok,
                &mut st,
                &e.question,
                e.answer.as_deref().unwrap(),
            )
            .unwrap()
        })
        .sum();
    sum / items.len() as f64
}
