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
    inspect, kind_of, load, write_cvec, write_delta, write_lora, DeltaEntry, LowRankEntry,
    PatchInfo,
};
pub use set::PatchSet;

use crate::model::{Model, Weight};
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

/// One matrix of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Slot {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Slot {
    pub const ALL: [Slot; 7] = [
        Slot::Q,
        Slot::K,
        Slot::V,
        Slot::O,
        Slot::Gate,
        Slot::Up,
        Slot::Down,
    ];

    /// The tensor's name inside `blk.N.`.
    pub fn tensor(self) -> &'static str {
        match self {
            Slot::Q => "attn_q",
            Slot::K => "attn_k",
            Slot::V => "attn_v",
            Slot::O => "attn_output",
            Slot::Gate => "ffn_gate",
            Slot::Up => "ffn_up",
            Slot::Down => "ffn_down",
        }
    }

    fn from_tensor(s: &str) -> Option<Slot> {
        Slot::ALL.into_iter().find(|x| x.tensor() == s)
    }
}

/// The weight a patch changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// `token_embd.weight` as the embedding lookup (the head is [`Target::Output`], even when
    /// the two are tied).
    Embd,
    /// The output head.
    Output,
    Block(usize, Slot),
}

impl Target {
    /// The target a base tensor name denotes (`blk.3.attn_q.weight`, `token_embd.weight`, ...).
    pub fn parse(name: &str) -> Option<Target> {
        match name {
            "token_embd.weight" => return Some(Target::Embd),
            "output.weight" => return Some(Target::Output),
            _ => {}
        }
        let rest = name.strip_prefix("blk.")?.strip_suffix(".weight")?;
        let (n, slot) = rest.split_once('.')?;
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) || n.len() > 6 {
            return None;
        }
        Some(Target::Block(n.parse().ok()?, Slot::from_tensor(slot)?))
    }

    pub fn tensor_name(self) -> String {
        match self {
            Target::Embd => "token_embd.weight".into(),
            Target::Output => "output.weight".into(),
            Target::Block(n, s) => format!("blk.{n}.{}.weight", s.tensor()),
        }
    }
}

impl Model {
    /// The weight `t` names in this model, if it has it.
    pub fn target_weight(&self, t: Target) -> Option<&Weight> {
        match t {
            Target::Embd => Some(&self.tok_embd),
            Target::Output => Some(&self.output),
            Target::Block(n, s) => {
                let l = self.layers.get(n)?;
                Some(match s {
                    Slot::Q => &l.wq,
                    Slot::K => &l.wk,
                    Slot::V => &l.wv,
                    Slot::O => &l.wo,
                    Slot::Gate => &l.w_gate,
                    Slot::Up => &l.w_up,
                    Slot::Down => &l.w_down,
                })
            }
        }
    }

    /// `[cols, rows]` of the weight `t` names, or a clear error when the model has no such weight.
    pub fn target_shape(&self, t: Target) -> Result<(usize, usize)> {
        match self.target_weight(t) {
            Some(w) => Ok((w.cols, w.rows)),
            None => Err(Error::Model(format!(
                "{}: the model has no such weight (it has {} blocks, 0..{})",
                t.tensor_name(),
                self.cfg.n_layer,
                self.cfg.n_layer.saturating_sub(1)
            ))),
        }
    }
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
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
