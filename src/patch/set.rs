//! Patches with their scales, sorted by the weight they change, ready to attach to a state.

use super::{axpy, Change, Patch, TensorDelta};
use crate::model::{Arch, Exec, Model, Proj, WeightId, MAX_BATCH};
use crate::{Error, Result};
use half::f16;
use std::sync::Arc;

/// The shapes a patch set was built for.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ShapeKey {
    arch: Arch,
    n_layer: usize,
    n_embd: usize,
    n_ff: usize,
    n_vocab: usize,
    q_dim: usize,
    kv_dim: usize,
}

impl ShapeKey {
    fn of(m: &Model) -> Self {
        let c = &m.cfg;
        Self {
            arch: c.arch,
            n_layer: c.n_layer,
            n_embd: c.n_embd,
            n_ff: c.n_ff,
            n_vocab: c.n_vocab,
            q_dim: c.q_dim(),
            kv_dim: c.kv_dim(),
        }
    }
}

/// A delta of one patch with its effective scale.
pub(crate) struct Applied {
    patch: Arc<Patch>,
    idx: usize,
    pub(crate) scale: f32,
    /// Low-rank factors in f16 for the fused decode path: `A` (rank rows of cols) and `B^T`
    /// (rank rows of rows). Half the bytes of f32, read once per token.
    pub(crate) f16: Option<(Vec<f16>, Vec<f16>)>,
}

impl Applied {
    pub(crate) fn delta(&self) -> &TensorDelta {
        &self.patch.tensors[self.idx]
    }
}

#[derive(Default)]
pub(crate) struct BlockPatches {
    pub(crate) projs: [Vec<Applied>; 7],
    /// The scaled sum of the control vectors for this block's output.
    cvec: Option<Vec<f32>>,
}

/// Patches with their scales, ready to attach to a state.
pub struct PatchSet {
    key: ShapeKey,
    embd: Vec<Applied>,
    output: Vec<Applied>,
    pub(crate) blocks: Vec<BlockPatches>,
    /// The patches and scales it was built from (zero scales left out).
    pub parts: Vec<(Arc<Patch>, f32)>,
    /// Scratch floats a state needs to apply it.
    scratch: usize,
}

impl PatchSet {
    /// Patches `parts` with their scales for model `m`. A scale of 0 leaves a patch out.
    pub fn new(m: &Model, parts: &[(Arc<Patch>, f32)]) -> Result<Self> {
        let c = &m.cfg;
        let mut set = Self {
            key: ShapeKey::of(m),
            embd: Vec::new(),
            output: Vec::new(),
            blocks: (0..c.n_layer).map(|_| BlockPatches::default()).collect(),
            parts: Vec::new(),
            scratch: 0,
        };
        for (p, s) in parts {
            if !s.is_finite() {
                return Err(Error::Invalid(format!(
                    "{}: scale must be finite, got {s}",
                    p.source
                )));
            }
            if *s == 0.0 {
                continue;
            }
            p.check(m)?;
            set.parts.push((p.clone(), *s));
            for (idx, d) in p.tensors.iter().enumerate() {
                let f16 = match &d.change {
                    Change::LowRank { a, bt, .. } => Some((
                        a.iter().map(|&v| f16::from_f32(v)).collect(),
                        bt.iter().map(|&v| f16::from_f32(v)).collect(),
                    )),
                    _ => None,
                };
                let a = Applied {
                    patch: p.clone(),
                    idx,
                    scale: *s,
                    f16,
                };
                let need = match &d.change {
                    Change::LowRank { rank, .. } => MAX_BATCH * rank,
                    Change::Dense { .. } if d.target == WeightId::Output => d.rows,
                    Change::Dense { .. } => MAX_BATCH * d.rows,
                    Change::Sparse { .. } => 0,
                }
                .max(d.cols);
                set.scratch = set.scratch.max(need);
                match d.target {
                    WeightId::Embd => set.embd.push(a),
                    WeightId::Output => set.output.push(a),
                    WeightId::Block(n, proj) => {
                        set.blocks[n].projs[proj as usize].push(a);
                        // The fused path keeps every low-rank `A x` of a block's matmul group
                        // in the scratch at once.
                        let ranks: usize = set.blocks[n]
                            .projs
                            .iter()
                            .flatten()
                            .map(|a| match &a.delta().change {
                                Change::LowRank { rank, .. } => *rank,
                                _ => 0,
                            })
                            .sum();
                        set.scratch = set.scratch.max(MAX_BATCH * ranks);
                    }
                }
            }
            for (n, v) in &p.cvec {
                let acc = set.blocks[*n]
                    .cvec
                    .get_or_insert_with(|| vec![0.0; c.n_embd]);
                axpy(acc, *s, v);
            }
        }
        Ok(set)
    }

    /// True when nothing would change: every scale was 0.
    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// Bytes read per decoded token to apply the set (for the bandwidth ceiling).
    pub fn bytes_per_token(&self) -> usize {
        self.parts.iter().map(|(p, _)| p.bytes()).sum()
    }

    pub(crate) fn check_model(&self, m: &Model) -> Result<()> {
        if self.key != ShapeKey::of(m) {
            return Err(Error::Invalid(
                "these patches were built for a model of other shapes".into(),
            ));
        }
        Ok(())
    }

    pub(crate) fn scratch_len(&self) -> usize {
        self.scratch
    }

    /// `x += deltas of token_embd[tok]` (`x` is `[n_embd]`).
    pub(crate) fn embd_row(&self, tok: usize, x: &mut [f32], tmp: &mut Vec<f32>) {
        for a in &self.embd {
            a.delta().add_row(tok, a.scale, x, tmp);
        }
    }

    pub(crate) fn has_output(&self) -> bool {
        !self.output.is_empty()
    }

    /// The control vector for block `il`'s output, if any.
    pub(crate) fn cvec(&self, il: usize) -> Option<&[f32]> {
        self.blocks[il].cvec.as_deref()
    }

    pub(crate) fn has_proj(&self, il: usize, p: Proj) -> bool {
        !self.blocks[il].projs[p as usize].is_empty()
    }

    /// The deltas of the weight `target`, with their scales.
    pub(crate) fn deltas(&self, target: WeightId) -> &[Applied] {
        match target {
            WeightId::Embd => &self.embd,
            WeightId::Output => &self.output,
            WeightId::Block(il, p) => &self.blocks[il].projs[p as usize],
        }
    }

    /// `y += deltas of the weight `target` times x` for `n` tokens (`x` `[n, cols]`, `y`
    /// `[n, rows]`).
    pub(crate) fn apply(
        &self,
        ex: &mut Exec,
        target: WeightId,
        x: &[f32],
        n: usize,
        y: &mut [f32],
    ) {
        for a in self.deltas(target) {
            a.delta().apply(ex, a.scale, x, n, y);
        }
    }

    /// `out[i] += output deltas at row sel[i]` for one token `x`.
    pub(crate) fn apply_output_rows(&self, ex: &mut Exec, x: &[f32], sel: &[u32], out: &mut [f32]) {
        for a in &self.output {
            a.delta().apply_rows(ex, a.scale, x, sel, out);
        }
    }
}
