//! lethe's delta adapters: `y = W x + s * dW x` with `dW` dense, sparse or low-rank, per
//! base tensor. llama.cpp does not read them; `lethe patch bake` merges them into a model.

use super::{check_arch, lora, to_f32};
use crate::gguf::{GgufFile, TensorInfo};
use crate::model::{Model, Weight};
use crate::patch::{Change, Patch, PatchKind, TensorDelta};
use crate::{Error, Result};
use lethe_kernels::quant::GgmlType;
use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Default)]
struct Parts<'a> {
    dense: Option<&'a TensorInfo>,
    idx: Option<&'a TensorInfo>,
    val: Option<&'a TensorInfo>,
    a: Option<&'a TensorInfo>,
    b: Option<&'a TensorInfo>,
}

pub(super) fn read(f: &Arc<GgufFile>, model: &Model, source: String) -> Result<Patch> {
    check_arch(f, model, "delta")?;
    let mut by_base: BTreeMap<&str, Parts> = BTreeMap::new();
    for t in f.tensors() {
        let (base, suf) = super::split_suffix(&t.name);
        let p = by_base.entry(base).or_default();
        let slot = match suf {
            "delta" => &mut p.dense,
            "delta_idx" => &mut p.idx,
            "delta_val" => &mut p.val,
            "lora_a" => &mut p.a,
            "lora_b" => &mut p.b,
            _ => {
                return Err(Error::Invalid(format!(
                    "tensor {:?} has an unexpected suffix (a delta has .delta, .delta_idx + \
                     .delta_val, or .lora_a + .lora_b)",
                    t.name
                )))
            }
        };
        *slot = Some(t);
    }
    let mut tensors = Vec::new();
    for (base, p) in by_base {
        let tensor = super::base(base, model)?;
        let (tg, cols, rows) = (tensor.id, tensor.cols, tensor.rows);
        let d = match (p.dense, p.idx, p.val, p.a, p.b) {
            (Some(d), None, None, None, None) => {
                if !matches!(d.ty, GgmlType::F32 | GgmlType::F16 | GgmlType::Q8_0) {
                    return Err(Error::Invalid(format!(
                        "{}: a dense delta is F32, F16 or Q8_0, not {}",
                        d.name, d.ty
                    )));
                }
                if d.shape.len() > 2 || d.row_len() != cols || d.n_rows() as usize != rows {
                    return Err(Error::Invalid(format!(
                        "{}: shape {:?}, the model's weight is [{cols}, {rows}]",
                        d.name, d.shape
                    )));
                }
                let w = Weight::from_info(f, d);
                // Used in place, so checked here like the other forms: once, row by row.
                let mut row = vec![0.0f32; cols];
                for r in 0..rows {
                    w.dequantize_row(f, r, &mut row);
                    if row.iter().any(|x| !x.is_finite()) {
                        return Err(Error::Invalid(format!(
                            "{}: holds NaN or inf (row {r})",
                            d.name
                        )));
                    }
                }
                TensorDelta {
                    target: tg,
                    cols,
                    rows,
                    scale: 1.0,
                    change: Change::Dense { file: f.clone(), w },
                }
            }
            (None, Some(i), Some(v), None, None) => {
                if i.ty != GgmlType::I32 || v.ty != GgmlType::F32 {
                    return Err(Error::Invalid(format!(
                        "{base}: a sparse delta has I32 indices and F32 values, not {} and {}",
                        i.ty, v.ty
                    )));
                }
                if i.shape.len() != 1 || v.shape.len() != 1 || i.shape[0] != v.shape[0] {
                    return Err(Error::Invalid(format!(
                        "{base}: delta_idx {:?} and delta_val {:?} must be 1-D of one length",
                        i.shape, v.shape
                    )));
                }
                let idx = to_f32_exact_i32(f, i);
                let val = to_f32(f, v)?;
                if let Some(&bad) = idx.iter().find(|&&x| x < 0) {
                    return Err(Error::Invalid(format!("{base}: negative index {bad}")));
                }
                if val.iter().any(|x| !x.is_finite()) {
                    return Err(Error::Invalid(format!("{base}: values hold NaN or inf")));
                }
                let mut entries: Vec<(u64, f32)> = idx.iter().map(|&i| i as u64).zip(val).collect();
                TensorDelta::sparse(tg, cols, rows, 1.0, &mut entries)?
            }
            (None, None, None, Some(a), Some(b)) => lora::low_rank(f, &tensor, a, b, 0.0)?,
            _ => {
                return Err(Error::Invalid(format!(
                    "{base}: a delta is one of .delta, .delta_idx + .delta_val, or .lora_a + \
                     .lora_b (this file has another mix)"
                )))
            }
        };
        tensors.extend(tensor.split(d));
    }
    if tensors.is_empty() {
        return Err(Error::Invalid("the delta holds no tensors".into()));
    }
    Ok(Patch {
        source,
        kind: PatchKind::Delta,
        tensors,
        cvec: Vec::new(),
    })
}

fn to_f32_exact_i32(f: &GgufFile, t: &TensorInfo) -> Vec<i32> {
    f.tensor_data(t)
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}
