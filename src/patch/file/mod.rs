//! Layer patch files: llama.cpp's LoRA adapters and control vectors, and lethe's delta
//! adapters, read and checked against the base model they patch; and written back.
//!
//! | kind | how it is told apart | tensors |
//! |---|---|---|
//! | LoRA | `general.type = adapter`, `adapter.type = lora` | `<base>.lora_a` `[cols, r]`, `<base>.lora_b` `[r, rows]` |
//! | control vector | `general.architecture = controlvector` | `direction.N` F32 `[n_embd]`, N >= 1 |
//! | delta | `general.type = adapter`, `adapter.type = delta` | `<base>.delta` (dense F32/F16/Q8_0), `<base>.delta_idx` I32 + `<base>.delta_val` F32 (sparse, `idx = row * cols + col`), or `<base>.lora_a` + `<base>.lora_b` (low rank, `dW = B A`) |
//!
//! `<base>` is the name of the base tensor changed (`blk.3.attn_q.weight`); LoRA and delta
//! files carry the base's `general.architecture`.

mod cvec;
mod delta;
mod lora;
pub mod write;

use super::{Patch, PatchKind, TensorDelta};
use crate::gguf::{GgufFile, TensorInfo};
use crate::model::{Model, WeightId};
use crate::{Error, Result};
use lethe_kernels::quant;
use std::path::Path;
use std::sync::Arc;

pub use write::{write_cvec, write_delta, write_lora, DeltaEntry, LowRankEntry};

/// The kind of patch file `f` is, or why it is none.
pub fn kind_of(f: &GgufFile) -> Result<PatchKind> {
    let arch = f.get_str("general.architecture").unwrap_or("");
    if arch == "controlvector" {
        return Ok(PatchKind::ControlVector);
    }
    let gtype = f.get_str("general.type").unwrap_or("");
    if gtype != "adapter" {
        return Err(Error::Invalid(format!(
            "not a patch: general.type is {gtype:?} (an adapter has \"adapter\"; a control \
             vector has general.architecture \"controlvector\")"
        )));
    }
    match f.get_str("adapter.type").unwrap_or("") {
        "lora" => Ok(PatchKind::Lora),
        "delta" => Ok(PatchKind::Delta),
        other => Err(Error::Invalid(format!(
            "adapter.type is {other:?}; lethe reads \"lora\" and \"delta\""
        ))),
    }
}

/// Open the patch file at `path` and check it against `model`: its kind, architecture,
/// tensor names, shapes and block indices.
pub fn load(path: impl AsRef<Path>, model: &Model) -> Result<Patch> {
    let path = path.as_ref();
    let ctx = |e: Error| Error::Invalid(format!("{}: {}", path.display(), strip(e)));
    let f = Arc::new(GgufFile::open(path).map_err(|e| ctx(e.into()))?);
    let kind = kind_of(&f).map_err(ctx)?;
    let source = path.display().to_string();
    let patch = match kind {
        PatchKind::Lora => lora::read(&f, model, source),
        PatchKind::ControlVector => cvec::read(&f, model, source),
        PatchKind::Delta => delta::read(&f, model, source),
    }
    .map_err(ctx)?;
    patch.check(model)?;
    Ok(patch)
}

/// What `lethe patch inspect` shows of a patch file, without a base model.
#[derive(Debug, Clone)]
pub struct PatchInfo {
    pub kind: PatchKind,
    /// `general.architecture` (LoRA, delta) or `controlvector.model_hint`.
    pub arch: Option<String>,
    /// LoRA alpha, when present.
    pub alpha: Option<f32>,
    /// `(target tensor, form, bytes)`, e.g. `("blk.0.attn_q.weight", "rank 16 F32", 73728)`.
    pub targets: Vec<(String, String, u64)>,
    pub file_size: u64,
}

pub fn inspect(path: impl AsRef<Path>) -> Result<PatchInfo> {
    let path = path.as_ref();
    let ctx = |e: Error| Error::Invalid(format!("{}: {}", path.display(), strip(e)));
    let f = GgufFile::open(path).map_err(|e| ctx(e.into()))?;
    let kind = kind_of(&f).map_err(ctx)?;
    let s = |k: &str| f.get_str(k).ok().map(str::to_string);
    let arch = match kind {
        PatchKind::ControlVector => s("controlvector.model_hint"),
        _ => s("general.architecture"),
    };
    let alpha = f.get_f32("adapter.lora.alpha").ok();
    let mut targets: Vec<(String, String, u64)> = Vec::new();
    let mut seen = std::collections::BTreeMap::<String, (Vec<&TensorInfo>, u64)>::new();
    for t in f.tensors() {
        let (base, _) = split_suffix(&t.name);
        let e = seen.entry(base.to_string()).or_default();
        e.0.push(t);
        e.1 += t.size;
    }
    for (base, (ts, bytes)) in seen {
        let form = match kind {
            PatchKind::ControlVector => format!("vector [{}] {}", ts[0].shape[0], ts[0].ty),
            _ => {
                let get = |suf: &str| ts.iter().find(|t| t.name.ends_with(suf));
                if let (Some(a), Some(b)) = (get(".lora_a"), get(".lora_b")) {
                    format!("rank {} {}/{}", a.shape.get(1).unwrap_or(&0), a.ty, b.ty)
                } else if let Some(d) = get(".delta") {
                    format!("dense {}", d.ty)
                } else if let Some(v) = get(".delta_val") {
                    format!("sparse {} entries", v.n_elements())
                } else {
                    let names: Vec<&str> = ts.iter().map(|t| t.name.as_str()).collect();
                    format!("? {}", names.join(" "))
                }
            }
        };
        targets.push((base, form, bytes));
    }
    let file_size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    Ok(PatchInfo {
        kind,
        arch,
        alpha,
        targets,
        file_size,
    })
}

/// `blk.0.attn_q.weight.lora_a` -> (`blk.0.attn_q.weight`, `lora_a`).
fn split_suffix(name: &str) -> (&str, &str) {
    for suf in ["lora_a", "lora_b", "delta_idx", "delta_val", "delta"] {
        if let Some(base) = name.strip_suffix(suf).and_then(|b| b.strip_suffix('.')) {
            return (base, suf);
        }
    }
    (name, "")
}

/// A base tensor a patch file changes: its name, the first weight it holds, its shape
/// (`[cols, rows]`), and the model's weights it holds.
struct Base<'a> {
    name: &'a str,
    id: WeightId,
    cols: usize,
    rows: usize,
    /// `(weight, first row in the tensor, rows)`: one, or several for a fused tensor (phi3's
    /// `attn_qkv`: q, k, v; its `ffn_up`: gate, up).
    parts: Vec<(WeightId, usize, usize)>,
}

impl Base<'_> {
    /// The delta `d` of the whole tensor as deltas of the weights it holds.
    fn split(&self, d: TensorDelta) -> Vec<TensorDelta> {
        match self.parts.as_slice() {
            [(id, 0, rows)] if *rows == d.rows => vec![TensorDelta { target: *id, ..d }],
            parts => parts
                .iter()
                .map(|&(id, r0, n)| d.slice_rows(id, r0, n))
                .collect(),
        }
    }
}

/// The base tensor `name` denotes, checked against the model: a tensor of the model's file
/// (plain or fused, as llama.cpp names it), or one of the matrices a fused tensor holds by
/// its own name (`blk.N.attn_q.weight` on phi3).
fn base<'a>(name: &'a str, model: &Model) -> Result<Base<'a>> {
    let inside = model.weights_in_tensor(name);
    if let Some((id, w)) = inside.first() {
        return Ok(Base {
            name,
            id: *id,
            cols: w.cols,
            rows: inside.iter().map(|(_, w)| w.rows).sum(),
            parts: inside.iter().map(|(id, w)| (*id, w.row0, w.rows)).collect(),
        });
    }
    let id = WeightId::parse(name).ok_or_else(|| {
        Error::Invalid(format!(
            "{name:?} is not a weight lethe can patch (token_embd.weight, output.weight, or \
             blk.N.{{attn_q,attn_k,attn_v,attn_qkv,attn_output,ffn_gate,ffn_up,ffn_down}}.weight)"
        ))
    })?;
    let (cols, rows) = model.target_shape(id)?;
    Ok(Base {
        name,
        id,
        cols,
        rows,
        parts: vec![(id, 0, rows)],
    })
}

/// Low-rank entries named by weight (`blk.0.attn_q.weight`) as the tensors of `model`'s file
/// name them, so that llama.cpp loads the LoRA: the entries of the matrices a fused tensor
/// holds (phi3's `attn_qkv`, its gate+up `ffn_up`) become one entry of that tensor, their
/// ranks side by side (`A` stacked, `B` block-diagonal, zero on rows no entry changes). With
/// `alpha`, each tensor's factor is `alpha / rank`, so a merged entry's `B` is rescaled to keep
/// every part's change as it was.
pub fn to_file_tensors(
    model: &Model,
    entries: Vec<LowRankEntry>,
    alpha: Option<f32>,
) -> Result<Vec<LowRankEntry>> {
    let mut out: Vec<LowRankEntry> = Vec::new();
    let mut fused: Vec<(String, Vec<(usize, LowRankEntry)>)> = Vec::new();
    for e in entries {
        let w = WeightId::parse(&e.base).and_then(|id| model.target_weight(id));
        match w {
            Some(w) if w.is_view(&model.file) => {
                let (name, row0) = (w.name.clone(), w.row0);
                match fused.iter_mut().find(|(n, _)| *n == name) {
                    Some((_, v)) => v.push((row0, e)),
                    None => fused.push((name, vec![(row0, e)])),
                }
            }
            _ => out.push(e),
        }
    }
    for (name, parts) in fused {
        let t = model
            .file
            .tensor(&name)
            .ok_or_else(|| Error::Model(format!("the model has no tensor {name}")))?;
        let (cols, rows) = (t.row_len(), t.n_rows() as usize);
        let rank: usize = parts.iter().map(|(_, e)| e.rank).sum();
        let mut a = Vec::with_capacity(rank * cols);
        let mut b = vec![0.0f32; rows * rank]; // [rank, rows]: rows of `rank`
        let mut k0 = 0;
        for (row0, e) in &parts {
            if e.cols != cols || row0 + e.rows > rows {
                return Err(Error::Invalid(format!(
                    "{}: [{}, {}] does not fit {name} [{cols}, {rows}] at row {row0}",
                    e.base, e.cols, e.rows
                )));
            }
            a.extend_from_slice(&e.a);
            let f = if alpha.is_some_and(|a| a != 0.0) {
                rank as f32 / e.rank as f32
            } else {
                1.0
            };
            for r in 0..e.rows {
                for k in 0..e.rank {
                    b[(row0 + r) * rank + k0 + k] = f * e.b[r * e.rank + k];
                }
            }
            k0 += e.rank;
        }
        out.push(LowRankEntry {
            base: name,
            cols,
            rows,
            rank,
            a,
            b,
        });
    }
    Ok(out)
}

/// A whole tensor as f32 (adapter tensors are small).
fn to_f32(f: &GgufFile, t: &TensorInfo) -> Result<Vec<f32>> {
    let mut out = vec![0.0f32; t.n_elements() as usize];
    let rb = t.ty.row_bytes(t.row_len());
    let data = f.tensor_data(t);
    for (r, row) in out.chunks_mut(t.row_len().max(1)).enumerate() {
        quant::dequantize_row(t.ty, &data[r * rb..(r + 1) * rb], row)?;
    }
    Ok(out)
}

/// `general.architecture` of an adapter must be the model's.
fn check_arch(f: &GgufFile, model: &Model, what: &str) -> Result<()> {
    let arch = f.get_str("general.architecture").unwrap_or("");
    let want = model.cfg.arch.name();
    if arch != want {
        return Err(Error::Invalid(format!(
            "this {what} is for architecture {arch:?}, the model is {want:?}"
        )));
    }
    Ok(())
}

/// `B` (`rows` rows of `rank`) transposed: `rank` rows of `rows`.
fn transpose(b: &[f32], rows: usize, rank: usize) -> Vec<f32> {
    let mut bt = vec![0.0f32; rows * rank];
    for r in 0..rows {
        for k in 0..rank {
            bt[k * rows + r] = b[r * rank + k];
        }
    }
    bt
}

/// The message of `e` without the `invalid input: ` prefix of [`Error::Invalid`].
fn strip(e: Error) -> String {
    match e {
        Error::Invalid(m) => m,
        e => e.to_string(),
    }
}
