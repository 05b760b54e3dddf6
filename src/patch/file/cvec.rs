//! llama.cpp's control vectors: F32 tensors `direction.N` (N >= 1), each added to the output
//! of block N, as llama.cpp numbers blocks (from 0; block 0 has none).

use crate::gguf::GgufFile;
use crate::model::Model;
use crate::patch::{Patch, PatchKind};
use crate::{Error, Result};
use lethe_kernels::quant::GgmlType;

pub(super) fn read(f: &GgufFile, model: &Model, source: String) -> Result<Patch> {
    if let Ok(hint) = f.get_str("controlvector.model_hint") {
        let want = model.cfg.arch.name();
        // repeng writes the Hugging Face model_type (`llama`, `gemma3_text`).
        if !hint.is_empty() && !hint.starts_with(want) {
            return Err(Error::Invalid(format!(
                "this control vector was made for {hint:?}, the model is {want:?}"
            )));
        }
    }
    let mut cvec = Vec::new();
    for t in f.tensors() {
        let n = t
            .name
            .strip_prefix("direction.")
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "tensor {:?}: a control vector holds only direction.N tensors",
                    t.name
                ))
            })?;
        if n == 0 {
            return Err(Error::Invalid(
                "direction.0: control vectors start at block 1".into(),
            ));
        }
        if t.ty != GgmlType::F32 || t.shape.len() != 1 {
            return Err(Error::Invalid(format!(
                "{}: must be a 1-D F32 tensor, is {} {:?}",
                t.name, t.ty, t.shape
            )));
        }
        if n >= model.cfg.n_layer {
            return Err(Error::Invalid(format!(
                "{}: the model has blocks 0..{}",
                t.name,
                model.cfg.n_layer - 1
            )));
        }
        if t.shape[0] as usize != model.cfg.n_embd {
            return Err(Error::Invalid(format!(
                "{} has {} elements, the model's n_embd is {}",
                t.name, t.shape[0], model.cfg.n_embd
            )));
        }
        let v = super::to_f32(f, t)?;
        if v.iter().any(|x| !x.is_finite()) {
            return Err(Error::Invalid(format!("{}: holds NaN or inf", t.name)));
        }
        cvec.push((n, v));
    }
    if cvec.is_empty() {
        return Err(Error::Invalid(
            "the control vector holds no directions".into(),
        ));
    }
    Ok(Patch {
        source,
        kind: PatchKind::ControlVector,
        tensors: Vec::new(),
        cvec,
    })
}
