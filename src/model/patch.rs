//! Layer patches at run time: weight deltas applied inside the matmuls, never merged into the
//! quantized weights, and control vectors added to the residual stream after a block.
//!
//! ```text
//! y  = W x + sum_i s_i * dW_i x          dW = B A (low rank: LoRA, ablation), dense, or sparse
//! x += sum_j s_j * v_j[N]                after block N (control vectors)
//! ```
//!
//! A [`Patch`] is what one file holds, checked against a model's shapes (the readers are in
//! `unlearn::patch`); a [`PatchSet`] is several patches with their scales. A set is attached
//! to a [`State`](super::State), one per conversation, so the base and any number of patched
//! variants share one copy of the weights; a scale of 0 drops the patch from the set, so it
//! costs nothing.

use super::weights::{matmul, matvec_rows, ActBuf, Weight};
use super::{Arch, Model, Precision, MAX_BATCH};
use crate::gguf::GgufFile;
use crate::pool::ThreadPool;
use crate::{Error, Result};
use lethe_kernels::quant::{self, GgmlType};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

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

/// How a weight changes: `dW` (`[cols, rows]`, ggml order) in one of three forms.
pub enum Change {
    /// `dW = B A` with `A` `[cols, rank]` (rank rows of `cols`) and `B` `[rank, rows]`, kept
    /// transposed (`bt`: rank rows of `rows`) so that `B t` is `rank` contiguous axpys.
    LowRank {
        rank: usize,
        a: Vec<f32>,
        bt: Vec<f32>,
    },
    /// A full matrix in its file (F32, F16 or Q8_0), used in place like a weight.
    Dense { file: Arc<GgufFile>, w: Weight },
    /// Non-zero entries by row (CSR): row `r` holds `col[start[r]..start[r + 1]]`.
    Sparse {
        start: Vec<u32>,
        col: Vec<u32>,
        val: Vec<f32>,
    },
}

/// One changed weight of a patch.
pub struct TensorDelta {
    pub target: Target,
    pub cols: usize,
    pub rows: usize,
    /// The file's own factor (LoRA: `alpha / rank`, or 1), times the user's scale at use.
    pub scale: f32,
    pub change: Change,
}

impl TensorDelta {
    /// A sparse delta from `(flat index, value)` pairs (`index = row * cols + col`).
    pub fn sparse(
        target: Target,
        cols: usize,
        rows: usize,
        scale: f32,
        entries: &mut [(u64, f32)],
    ) -> Result<Self> {
        entries.sort_unstable_by_key(|e| e.0);
        if let Some(w) = entries.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(Error::Invalid(format!(
                "{}: sparse index {} appears twice",
                target.tensor_name(),
                w[0].0
            )));
        }
        let total = (cols * rows) as u64;
        if let Some(e) = entries.iter().find(|e| e.0 >= total) {
            return Err(Error::Invalid(format!(
                "{}: sparse index {} is outside the {rows} x {cols} weight",
                target.tensor_name(),
                e.0
            )));
        }
        let mut start = vec![0u32; rows + 1];
        for &(i, _) in entries.iter() {
            start[i as usize / cols + 1] += 1;
        }
        for r in 0..rows {
            start[r + 1] += start[r];
        }
        let col = entries.iter().map(|e| (e.0 % cols as u64) as u32).collect();
        let val = entries.iter().map(|e| e.1).collect();
        Ok(Self {
            target,
            cols,
            rows,
            scale,
            change: Change::Sparse { start, col, val },
        })
    }

    /// `out += s * dW[r, :]` (`out` is `[cols]`): row `r` of the delta, scaled.
    pub fn add_row(&self, r: usize, s: f32, out: &mut [f32], tmp: &mut Vec<f32>) {
        let s = s * self.scale;
        match &self.change {
            Change::LowRank { rank, a, bt } => {
                for k in 0..*rank {
                    let c = s * bt[k * self.rows + r];
                    axpy(
                        &mut out[..self.cols],
                        c,
                        &a[k * self.cols..(k + 1) * self.cols],
                    );
                }
            }
            Change::Dense { file, w } => {
                tmp.resize(self.cols, 0.0);
                w.dequantize_row(file, r, tmp);
                axpy(&mut out[..self.cols], s, tmp);
            }
            Change::Sparse { start, col, val } => {
                let (a, b) = (start[r] as usize, start[r + 1] as usize);
                for (&c, &v) in col[a..b].iter().zip(&val[a..b]) {
                    out[c as usize] += s * v;
                }
            }
        }
    }

    /// Bytes read to apply this delta to one token (for the bandwidth ceiling).
    pub fn bytes(&self) -> usize {
        match &self.change {
            Change::LowRank { rank, .. } => rank * (self.cols + self.rows) * 4,
            Change::Dense { w, .. } => w.len_bytes(),
            Change::Sparse { val, .. } => val.len() * 8 + (self.rows + 1) * 4,
        }
    }

    /// A short description: `rank 16`, `dense Q8_0`, `sparse 1200 entries`.
    pub fn form(&self) -> String {
        match &self.change {
            Change::LowRank { rank, .. } => format!("rank {rank}"),
            Change::Dense { w, .. } => format!("dense {}", w.ty),
            Change::Sparse { val, .. } => format!("sparse {} entries", val.len()),
        }
    }

    /// `y[t] += s * dW x[t]` for `n` tokens (`x` `[n, cols]`, `y` `[n, rows]`).
    #[allow(clippy::too_many_arguments)]
    fn apply(
        &self,
        pool: &ThreadPool,
        s: f32,
        x: &[f32],
        n: usize,
        y: &mut [f32],
        tmp: &mut [f32],
        act: &mut ActBuf,
        precision: Precision,
    ) {
        let (cols, rows, s) = (self.cols, self.rows, s * self.scale);
        match &self.change {
            Change::LowRank { rank, a, bt } => {
                let rank = *rank;
                let yp = SendPtr(y.as_mut_ptr());
                let tp = SendPtr(tmp.as_mut_ptr());
                let one = |t: usize| {
                    // SAFETY: token t's rows of y and tmp are touched by one thread only.
                    let (yt, tt) = unsafe {
                        (
                            std::slice::from_raw_parts_mut(yp.get().add(t * rows), rows),
                            std::slice::from_raw_parts_mut(tp.get().add(t * rank), rank),
                        )
                    };
                    let xt = &x[t * cols..(t + 1) * cols];
                    for (k, v) in tt.iter_mut().enumerate() {
                        *v = s * dot(&a[k * cols..(k + 1) * cols], xt);
                    }
                    for (k, &v) in tt.iter().enumerate() {
                        axpy(yt, v, &bt[k * rows..(k + 1) * rows]);
                    }
                };
                // One token of a small adapter is a few microseconds: not worth a pool job.
                if n == 1 || n * rank * (cols + rows) < 1 << 16 {
                    (0..n).for_each(one);
                } else {
                    let next = AtomicUsize::new(0);
                    pool.run_dynamic(&|_, _| loop {
                        let t = next.fetch_add(1, Ordering::Relaxed);
                        if t >= n {
                            break;
                        }
                        one(t);
                    });
                }
            }
            Change::Dense { file, w } => {
                let per = (tmp.len() / rows).max(1);
                for t0 in (0..n).step_by(per) {
                    let m = per.min(n - t0);
                    let xs = &x[t0 * cols..(t0 + m) * cols];
                    matmul(pool, file, w, xs, m, &mut tmp[..m * rows], act, precision);
                    axpy(&mut y[t0 * rows..(t0 + m) * rows], s, &tmp[..m * rows]);
                }
            }
            Change::Sparse { start, col, val } => {
                for t in 0..n {
                    let xt = &x[t * cols..(t + 1) * cols];
                    let yt = &mut y[t * rows..(t + 1) * rows];
                    for (r, yr) in yt.iter_mut().enumerate() {
                        let (a, b) = (start[r] as usize, start[r + 1] as usize);
                        if a < b {
                            let d: f32 = col[a..b]
                                .iter()
                                .zip(&val[a..b])
                                .map(|(&c, &v)| v * xt[c as usize])
                                .sum();
                            *yr += s * d;
                        }
                    }
                }
            }
        }
    }

    /// `out[i] += s * (dW x)[rows[i]]` for one token `x` (`[cols]`): a head on some rows.
    #[allow(clippy::too_many_arguments)]
    fn apply_rows(
        &self,
        pool: &ThreadPool,
        s: f32,
        x: &[f32],
        sel: &[u32],
        out: &mut [f32],
        tmp: &mut [f32],
        act: &mut ActBuf,
        precision: Precision,
    ) {
        let (cols, s) = (self.cols, s * self.scale);
        match &self.change {
            Change::LowRank { rank, a, bt } => {
                for k in 0..*rank {
                    let c = s * dot(&a[k * cols..(k + 1) * cols], x);
                    let b = &bt[k * self.rows..(k + 1) * self.rows];
                    for (o, &r) in out.iter_mut().zip(sel) {
                        *o += c * b[r as usize];
                    }
                }
            }
            Change::Dense { file, w } => {
                for (o, s0) in out.chunks_mut(tmp.len()).zip(sel.chunks(tmp.len())) {
                    let t = &mut tmp[..s0.len()];
                    matvec_rows(pool, file, w, x, s0, t, act, precision);
                    axpy(o, s, t);
                }
            }
            Change::Sparse { start, col, val } => {
                for (o, &r) in out.iter_mut().zip(sel) {
                    let (a, b) = (start[r as usize] as usize, start[r as usize + 1] as usize);
                    let d: f32 = col[a..b]
                        .iter()
                        .zip(&val[a..b])
                        .map(|(&c, &v)| v * x[c as usize])
                        .sum();
                    *o += s * d;
                }
            }
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
struct Applied {
    patch: Arc<Patch>,
    idx: usize,
    scale: f32,
}

impl Applied {
    fn delta(&self) -> &TensorDelta {
        &self.patch.tensors[self.idx]
    }
}

#[derive(Default)]
struct BlockPatches {
    slots: [Vec<Applied>; 7],
    /// The scaled sum of the control vectors for this block's output.
    cvec: Option<Vec<f32>>,
}

/// Patches with their scales, ready to attach to a state.
pub struct PatchSet {
    key: ShapeKey,
    embd: Vec<Applied>,
    output: Vec<Applied>,
    blocks: Vec<BlockPatches>,
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
                let a = Applied {
                    patch: p.clone(),
                    idx,
                    scale: *s,
                };
                let need = match &d.change {
                    Change::LowRank { rank, .. } => MAX_BATCH * rank,
                    Change::Dense { .. } if d.target == Target::Output => d.rows,
                    Change::Dense { .. } => MAX_BATCH * d.rows,
                    Change::Sparse { .. } => 0,
                }
                .max(d.cols);
                set.scratch = set.scratch.max(need);
                match d.target {
                    Target::Embd => set.embd.push(a),
                    Target::Output => set.output.push(a),
                    Target::Block(n, slot) => set.blocks[n].slots[slot as usize].push(a),
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

    pub(super) fn check_model(&self, m: &Model) -> Result<()> {
        if self.key != ShapeKey::of(m) {
            return Err(Error::Invalid(
                "these patches were built for a model of other shapes".into(),
            ));
        }
        Ok(())
    }

    pub(super) fn scratch_len(&self) -> usize {
        self.scratch
    }

    /// `x += deltas of token_embd[tok]` (`x` is `[n_embd]`).
    pub(super) fn embd_row(&self, tok: usize, x: &mut [f32], tmp: &mut Vec<f32>) {
        for a in &self.embd {
            a.delta().add_row(tok, a.scale, x, tmp);
        }
    }

    pub(super) fn has_output(&self) -> bool {
        !self.output.is_empty()
    }

    /// The control vector for block `il`'s output, if any.
    pub(super) fn cvec(&self, il: usize) -> Option<&[f32]> {
        self.blocks[il].cvec.as_deref()
    }

    pub(super) fn has_slot(&self, il: usize, slot: Slot) -> bool {
        !self.blocks[il].slots[slot as usize].is_empty()
    }

    /// `y += deltas of (il, slot) times x` for `n` tokens.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn apply(
        &self,
        pool: &ThreadPool,
        target: Target,
        x: &[f32],
        n: usize,
        y: &mut [f32],
        tmp: &mut [f32],
        act: &mut ActBuf,
        precision: Precision,
    ) {
        let items = match target {
            Target::Embd => &self.embd,
            Target::Output => &self.output,
            Target::Block(il, slot) => &self.blocks[il].slots[slot as usize],
        };
        for a in items {
            a.delta().apply(pool, a.scale, x, n, y, tmp, act, precision);
        }
    }

    /// `out[i] += output deltas at row sel[i]` for one token `x`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn apply_output_rows(
        &self,
        pool: &ThreadPool,
        x: &[f32],
        sel: &[u32],
        out: &mut [f32],
        tmp: &mut [f32],
        act: &mut ActBuf,
        precision: Precision,
    ) {
        for a in &self.output {
            a.delta()
                .apply_rows(pool, a.scale, x, sel, out, tmp, act, precision);
        }
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

impl super::State {
    /// Add the attached patches' deltas of block `il` to the outputs of the matmuls `slots`,
    /// just after the base matmuls wrote them.
    pub(super) fn patch_block(
        &mut self,
        pool: &ThreadPool,
        p: Precision,
        il: usize,
        slots: &[Slot],
        n: usize,
    ) {
        let Some(ps) = self.patches.as_deref() else {
            return;
        };
        for &slot in slots {
            if !ps.has_slot(il, slot) {
                continue;
            }
            let (x, y): (&[f32], &mut [f32]) = match slot {
                Slot::Q => (&self.xb, &mut self.q),
                Slot::K => (&self.xb, &mut self.k),
                Slot::V => (&self.xb, &mut self.v),
                Slot::O => (&self.att, &mut self.xb2),
                Slot::Gate => (&self.xb, &mut self.hg),
                Slot::Up => (&self.xb, &mut self.hu),
                Slot::Down => (&self.hg, &mut self.xb2),
            };
            let t = Target::Block(il, slot);
            ps.apply(pool, t, x, n, y, &mut self.patch_tmp, &mut self.act, p);
        }
    }

    /// Add the control vector of block `il` (if any) to the residual stream of `n` tokens.
    pub(super) fn add_cvec(&mut self, il: usize, n: usize) {
        let Some(v) = self.patches.as_deref().and_then(|ps| ps.cvec(il)) else {
            return;
        };
        let e = v.len();
        for x in self.x[..n * e].chunks_exact_mut(e) {
            axpy(x, 1.0, v);
        }
    }
}
