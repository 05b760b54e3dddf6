//! llama.cpp's LoRA adapters, as `convert_lora_to_gguf.py` writes them:
//! `y = W x + s * (alpha / rank) * B (A x)` (just `s` when alpha is absent or 0).

use super::{base, check_arch, to_f32, transpose, Base};
use crate::gguf::{GgufFile, TensorInfo};
use crate::model::{Model, WeightId};
use crate::patch::{Change, Patch, PatchKind, TensorDelta};
use crate::{Error, Result};
use std::collections::BTreeMap;

pub(super) fn read(f: &GgufFile, model: &Model, source: String) -> Result<Patch> {
    check_arch(f, model, "LoRA")?;
    let alpha = f.get_f32("adapter.lora.alpha").unwrap_or(0.0);
    let pairs = pairs(f)?;
    let mut tensors = Vec::with_capacity(pairs.len());
    for (name, (a, b)) in pairs {
        let base = base(&name, model)?;
        if base.id == WeightId::Embd {
            return Err(Error::Invalid(format!(
                "{name}: a LoRA on the token embedding is not supported; write it as a delta"
            )));
        }
        tensors.extend(base.split(low_rank(f, &base, a, b, alpha)?));
    }
    if tensors.is_empty() {
        return Err(Error::Invalid("the LoRA holds no tensors".into()));
    }
    Ok(Patch {
        source,
        kind: PatchKind::Lora,
        tensors,
        cvec: Vec::new(),
    })
}

/// The `.lora_a` / `.lora_b` pairs by base name; any other tensor is an error.
pub(super) fn pairs(f: &GgufFile) -> Result<BTreeMap<String, (&TensorInfo, &TensorInfo)>> {
    let mut half: BTreeMap<String, (Option<&TensorInfo>, Option<&TensorInfo>)> = BTreeMap::new();
    for t in f.tensors() {
        if let Some(base) = t.name.strip_suffix(".lora_a") {
            half.entry(base.into()).or_default().0 = Some(t);
        } else if let Some(base) = t.name.strip_suffix(".lora_b") {
            half.entry(base.into()).or_default().1 = Some(t);
        } else {
            return Err(Error::Invalid(format!(
                "tensor {:?} has an unexpected suffix (a LoRA has .lora_a and .lora_b)",
                t.name
            )));
        }
    }
    half.into_iter()
        .map(|(base, ab)| match ab {
            (Some(a), Some(b)) => Ok((base, (a, b))),
            _ => Err(Error::Invalid(format!(
                "the LoRA pair of {base:?} is missing its {}",
                if ab.0.is_none() { "lora_a" } else { "lora_b" }
            ))),
        })
        .collect()
}

/// A low-rank delta `B A` of `base` from `a` (`[cols, rank]`) and `b` (`[rank, rows]`), with
/// factor `alpha / rank` (1 when alpha is 0).
pub(super) fn low_rank(
    f: &GgufFile,
    base: &Base,
    a: &TensorInfo,
    b: &TensorInfo,
    alpha: f32,
) -> Result<TensorDelta> {
    let (name, cols, rows) = (base.name, base.cols, base.rows);
    let dim = |t: &TensorInfo, i: usize| t.shape.get(i).copied().unwrap_or(1) as usize;
    if a.shape.len() > 2 || b.shape.len() > 2 {
        return Err(Error::Invalid(format!(
            "{name}: lora_a and lora_b must be 2-D"
        )));
    }
    let rank = dim(a, 1);
    if dim(a, 0) != cols || dim(b, 1) != rows {
        return Err(Error::Invalid(format!(
            "{name}: lora_a is {:?} and lora_b {:?}; the model's weight is [{cols}, {rows}], so \
             they must be [{cols}, r] and [r, {rows}]",
            a.shape, b.shape
        )));
    }
    if dim(b, 0) != rank {
        return Err(Error::Invalid(format!(
            "{name}: lora_a is {:?} and lora_b {:?}: their ranks differ (is lora_a transposed?)",
            a.shape, b.shape
        )));
    }
    if rank == 0 {
        return Err(Error::Invalid(format!("{name}: rank 0")));
    }
    let a_f = to_f32(f, a)?;
    let b_f = to_f32(f, b)?;
    if a_f.iter().chain(&b_f).any(|v| !v.is_finite()) {
        return Err(Error::Invalid(format!(
            "{name}: lora_a or lora_b holds NaN or inf"
        )));
    }
    let scale = if alpha != 0.0 {
        alpha / rank as f32
    } else {
        1.0
    };
    Ok(TensorDelta {
        target: base.id,
        cols,
        rows,
        scale,
        change: Change::LowRank {
            rank,
            a: a_f,
            bt: transpose(&b_f, rows, rank),
        },
    })
}
