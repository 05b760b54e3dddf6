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

use super::weights::{matmul, matvec_rows, run_parts, ActBuf, Part, Weight, MAX_PARTS};
use super::{Arch, Layer, Model, Precision, MAX_BATCH};
use crate::gguf::GgufFile;
use crate::pool::ThreadPool;
use crate::{Error, Result};
use half::f16;
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
    /// Low-rank factors in f16 for the fused decode path: `A` (rank rows of cols) and `B^T`
    /// (rank rows of rows). Half the bytes of f32, read once per token.
    f16: Option<(Vec<f16>, Vec<f16>)>,
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
                    Change::Dense { .. } if d.target == Target::Output => d.rows,
                    Change::Dense { .. } => MAX_BATCH * d.rows,
                    Change::Sparse { .. } => 0,
                }
                .max(d.cols);
                set.scratch = set.scratch.max(need);
                match d.target {
                    Target::Embd => set.embd.push(a),
                    Target::Output => set.output.push(a),
                    Target::Block(n, slot) => {
                        set.blocks[n].slots[slot as usize].push(a);
                        // The fused path keeps every low-rank `A x` of a block's matmul group
                        // in the scratch at once.
                        let ranks: usize = set.blocks[n]
                            .slots
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
        self.apply_some(pool, target, x, n, y, tmp, act, precision, false)
    }

    /// [`PatchSet::apply`], leaving out the low-rank deltas when `skip_low_rank` (the fused
    /// path did them).
    #[allow(clippy::too_many_arguments)]
    fn apply_some(
        &self,
        pool: &ThreadPool,
        target: Target,
        x: &[f32],
        n: usize,
        y: &mut [f32],
        tmp: &mut [f32],
        act: &mut ActBuf,
        precision: Precision,
        skip_low_rank: bool,
    ) {
        let items = match target {
            Target::Embd => &self.embd,
            Target::Output => &self.output,
            Target::Block(il, slot) => &self.blocks[il].slots[slot as usize],
        };
        for a in items {
            if skip_low_rank && a.f16.is_some() {
                continue;
            }
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

fn weight(l: &Layer, s: Slot) -> &Weight {
    match s {
        Slot::Q => &l.wq,
        Slot::K => &l.wk,
        Slot::V => &l.wv,
        Slot::O => &l.wo,
        Slot::Gate => &l.w_gate,
        Slot::Up => &l.w_up,
        Slot::Down => &l.w_down,
    }
}

/// A low-rank delta's second half in the fused path: `y[t] += s * B t_i[t]`.
#[derive(Clone, Copy)]
struct Second<'a> {
    y: SendPtr,
    rows: usize,
    rank: usize,
    bt: &'a [f16],
    scale: f32,
    /// Offset of `t_i` (`[n, rank]`) in the scratch.
    off: usize,
    /// First row in the job's row numbering.
    start: usize,
}

impl super::State {
    /// The matmuls `slots` of block `il` (which share their input: q/k/v, o, gate/up or down)
    /// with the attached patches' deltas. Low-rank deltas are fused into the same job: their
    /// `A x` rows are computed beside the weights' rows, then `B (A x)` is added by one more
    /// job over the output rows.
    pub(super) fn mm(
        &mut self,
        m: &Model,
        ps: Option<&PatchSet>,
        il: usize,
        slots: &[Slot],
        n: usize,
    ) {
        let l = &m.layers[il];
        let (pool, f, p) = (&*m.pool, &*m.file, m.precision);
        debug_assert!(slots.len() <= 3);
        let mut outs = [std::ptr::null_mut::<f32>(); 3];
        for (o, &s) in outs.iter_mut().zip(slots) {
            *o = match s {
                Slot::Q => self.q.as_mut_ptr(),
                Slot::K => self.k.as_mut_ptr(),
                Slot::V => self.v.as_mut_ptr(),
                Slot::O | Slot::Down => self.xb2.as_mut_ptr(),
                Slot::Gate => self.hg.as_mut_ptr(),
                Slot::Up => self.hu.as_mut_ptr(),
            };
        }
        let x: &[f32] = match slots[0] {
            Slot::O => &self.att,
            Slot::Down => &self.hg,
            _ => &self.xb,
        };
        let cols = weight(l, slots[0]).cols;
        let vt = weight(l, slots[0]).ty.vec_dot_type();
        let same_vt = slots.iter().all(|&s| weight(l, s).ty.vec_dot_type() == vt);
        let fused = same_vt
            && p == Precision::Fast
            && ps.is_some_and(|ps| {
                let low_rank = |s: &Slot| {
                    let items = &ps.blocks[il].slots[*s as usize];
                    items.iter().filter(|a| a.f16.is_some()).count()
                };
                let n_low_rank: usize = slots.iter().map(low_rank).sum();
                n_low_rank > 0 && slots.len() + n_low_rank <= MAX_PARTS
            });
        let mut table = [Part::EMPTY; MAX_PARTS];
        let mut k = 0;
        if !same_vt {
            for (&s, &y) in slots.iter().zip(&outs) {
                table[0] = Part::weight(f, weight(l, s), y);
                run_parts(pool, &mut table[..1], cols, x, n, &mut self.act, p);
            }
        } else {
            for (&s, &y) in slots.iter().zip(&outs) {
                table[k] = Part::weight(f, weight(l, s), y);
                k += 1;
            }
        }
        let Some(ps) = ps.filter(|_| fused) else {
            if same_vt {
                run_parts(pool, &mut table[..k], cols, x, n, &mut self.act, p);
            }
            if let Some(ps) = ps {
                self.patch_block(ps, pool, p, il, slots, n);
            }
            return;
        };
        // The first halves, `t_i = A_i x` (`[n, rank]` each, in the scratch), as more rows of
        // the same job.
        let tmp = self.patch_tmp.as_mut_ptr();
        let mut second = [None::<Second>; MAX_PARTS];
        let (mut off, mut rows_total) = (0, 0);
        for (&s, &y) in slots.iter().zip(&outs) {
            for a in &ps.blocks[il].slots[s as usize] {
                let (Some((a16, bt16)), Change::LowRank { rank, .. }) = (&a.f16, &a.delta().change)
                else {
                    continue;
                };
                // SAFETY: the scratch holds MAX_BATCH * (sum of the block's ranks) floats.
                table[k] = Part::f16_rows(a16, cols, *rank, unsafe { tmp.add(off) });
                let rows = weight(l, s).rows;
                second[k] = Some(Second {
                    y: SendPtr(y),
                    rows,
                    rank: *rank,
                    bt: bt16,
                    scale: a.scale * a.delta().scale,
                    off,
                    start: rows_total,
                });
                off += n * rank;
                rows_total += rows;
                k += 1;
            }
        }
        run_parts(pool, &mut table[..k], cols, x, n, &mut self.act, p);
        let second = &second[..k];
        let tmp = &self.patch_tmp;
        let add = |r0: usize, r1: usize| {
            for s2 in second.iter().flatten() {
                let (lo, hi) = (r0.max(s2.start), r1.min(s2.start + s2.rows));
                if lo >= hi {
                    continue;
                }
                let (lo, hi) = (lo - s2.start, hi - s2.start);
                for t in 0..n {
                    // SAFETY: rows lo..hi of token t belong to this call alone.
                    let y = unsafe {
                        std::slice::from_raw_parts_mut(s2.y.get().add(t * s2.rows + lo), hi - lo)
                    };
                    for kk in 0..s2.rank {
                        let c = s2.scale * tmp[s2.off + t * s2.rank + kk];
                        let b = &s2.bt[kk * s2.rows + lo..kk * s2.rows + hi];
                        lethe_kernels::ops::axpy_f16(y, c, b);
                    }
                }
            }
        };
        let work: usize = second.iter().flatten().map(|s| s.rows * s.rank * n).sum();
        if work < 1 << 14 {
            add(0, rows_total);
        } else {
            let next = AtomicUsize::new(0);
            const CHUNK: usize = 128;
            let add = &add;
            let job = move |_: usize, _: usize| loop {
                let r0 = next.fetch_add(CHUNK, Ordering::Relaxed);
                if r0 >= rows_total {
                    break;
                }
                add(r0, (r0 + CHUNK).min(rows_total));
            };
            pool.run_dynamic(&job);
        }
        // Dense and sparse deltas, one by one.
        for (&s, &y) in slots.iter().zip(&outs) {
            if !ps.has_slot(il, s) {
                continue;
            }
            let rows = weight(l, s).rows;
            // SAFETY: `y` is the slot's output buffer, at least n * rows long.
            let y = unsafe { std::slice::from_raw_parts_mut(y, n * rows) };
            let (tmp, act) = (&mut self.patch_tmp, &mut self.act);
            let t = Target::Block(il, s);
            ps.apply_some(pool, t, x, n, y, tmp, act, p, true);
        }
    }

    /// Add the attached patches' deltas of block `il` to the outputs of the matmuls `slots`,
    /// just after the base matmuls wrote them.
    fn patch_block(
        &mut self,
        ps: &PatchSet,
        pool: &ThreadPool,
        p: Precision,
        il: usize,
        slots: &[Slot],
        n: usize,
    ) {
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
    pub(super) fn add_cvec(&mut self, ps: Option<&PatchSet>, il: usize, n: usize) {
        let Some(v) = ps.and_then(|ps| ps.cvec(il)) else {
            return;
        };
        let e = v.len();
        for x in self.x[..n * e].chunks_exact_mut(e) {
            axpy(x, 1.0, v);
        }
    }
}
