//! Layer patches: weight deltas applied inside the matmuls at run time, never merged into the
//! quantized weights, and control vectors added to the residual stream after a block; their
//! files; and baking them into a model.
//!
//! ```text
//! y  = W x + sum_i s_i * dW_i x          dW = B A (low rank: LoRA, ablation), dense, or sparse
//! x += sum_j s_j * v_j[N]                after block N (control vectors)
//! ```
//!
//! A [`Patch`] is what one file holds, checked against a model's shapes; a [`PatchSet`] is
//! several patches with their scales. A set is attached to a [`State`](crate::model::State),
//! one per conversation, so the base and any number of patched variants share one copy of the
//! weights; a scale of 0 drops the patch from the set, so it costs nothing.
//!
//! Files: `change` (the three forms of a weight change and their arithmetic), `set` (patches
//! with their scales, per block and matrix), `fused` (the forward pass's matmuls with the
//! deltas applied), [`file`] (reading and writing patch files), [`bake`] (patches merged into
//! a model's weights, written as a new GGUF).

pub mod bake;
mod change;
pub mod file;
mod fused;
mod set;

pub use change::{Change, TensorDelta};
pub use file::{
    inspect, kind_of, load, to_file_tensors, write_cvec, write_delta, write_lora, DeltaEntry,
    LowRankEntry, PatchInfo,
};
pub use set::PatchSet;

use crate::model::Model;
use crate::{Error, Result};
use lethe_kernels::quant::{self, GgmlType};

/// What kind of file a patch came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PatchKind {
    /// llama.cpp's LoRA adapter (`adapter.type = lora`).
    Lora,
    /// llama.cpp's control vector (`general.architecture = controlvector`).
    ControlVector,
    /// lethe's delta adapter (`adapter.type = delta`): dense, sparse or low-rank.
    Delta,
}

impl PatchKind {
    pub fn name(self) -> &'static str {
        match self {
            PatchKind::Lora => "lora",
            PatchKind::ControlVector => "control_vector",
            PatchKind::Delta => "delta",
        }
    }
}

/// One patch file, checked against a model: its weight deltas and control vectors.
pub struct Patch {
    /// Where it came from (for messages and reports).
    pub source: String,
    pub kind: PatchKind,
    pub tensors: Vec<TensorDelta>,
    /// `(block, direction)`: added to the output of the block, `[n_embd]` each.
    pub cvec: Vec<(usize, Vec<f32>)>,
}

impl Patch {
    /// Check every delta against `m`'s shapes and every control vector against its blocks.
    pub fn check(&self, m: &Model) -> Result<()> {
        let bad = |msg: String| Err(Error::Invalid(format!("{}: {msg}", self.source)));
        for d in &self.tensors {
            let (cols, rows) = m
                .target_shape(d.target)
                .map_err(|e| Error::Invalid(format!("{}: {e}", self.source)))?;
            if (cols, rows) != (d.cols, d.rows) {
                return bad(format!(
                    "{} is [{}, {}] here but [{cols}, {rows}] in the model",
                    d.target.tensor_name(),
                    d.cols,
                    d.rows
                ));
            }
        }
        for (n, v) in &self.cvec {
            if *n >= m.cfg.n_layer {
                return bad(format!(
                    "direction.{n}: the model has blocks 0..{}",
                    m.cfg.n_layer - 1
                ));
            }
            if v.len() != m.cfg.n_embd {
                return bad(format!(
                    "direction.{n} has {} elements, the model's n_embd is {}",
                    v.len(),
                    m.cfg.n_embd
                ));
            }
        }
        Ok(())
    }

    pub fn bytes(&self) -> usize {
        self.tensors.iter().map(|d| d.bytes()).sum::<usize>()
            + self.cvec.iter().map(|(_, v)| v.len() * 4).sum::<usize>()
    }
}

/// `sum a[i] * b[i]` with the F32 SIMD kernel.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    quant::vec_dot(GgmlType::F32, n, f32_bytes(&a[..n]), f32_bytes(&b[..n]))
}

/// `y += c * x`.
#[inline]
pub fn axpy(y: &mut [f32], c: f32, x: &[f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += c * x;
    }
}

fn f32_bytes(x: &[f32]) -> &[u8] {
    // SAFETY: any f32 is 4 initialised bytes; u8 has alignment 1.
    unsafe { std::slice::from_raw_parts(x.as_ptr() as *const u8, std::mem::size_of_val(x)) }
}
