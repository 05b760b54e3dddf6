//! Baking: layer patches merged into the weights they change, written as a GGUF llama.cpp runs.
//!
//! Every changed tensor is rebuilt row by row:
//!
//! ```text
//! W' = Q(W + sum_i s_i * dW_i)      W dequantized, the scaled deltas summed in f32,
//!                                   Q: quantized to the chosen type (ggml's reference rounding)
//! ```
//!
//! and every other tensor is copied byte for byte, with all the metadata. `general.name` gets
//! a ` (baked)` suffix and two keys say what was baked: `lethe.baked.patches` (file names with
//! their scales, `r16.gguf:1`) and `lethe.baked.type`. `general.file_type` is left as it is: it
//! names the bulk of the weights, which are the base's.
//!
//! Tied embeddings (no `output.weight`: the head reads `token_embd.weight`). A patch names the
//! embedding lookup ([`WeightId::Embd`]) and the head ([`WeightId::Output`]) apart, so a change to
//! one must leave the other as it was: the baked file unties them by adding `output.weight`,
//! which llama.cpp (llama, gemma3) uses for the head when the file has one:
//!
//! | changed | `token_embd.weight` | `output.weight` (added) |
//! |---|---|---|
//! | embedding | merged | byte copy of the original `token_embd.weight` |
//! | head | unchanged | merged: the original `token_embd.weight` plus the head deltas |
//! | both | merged (embedding deltas) | merged: the original `token_embd.weight` plus the head deltas |
//!
//! The [`BakeReport`] says, for each merged tensor, how large the change was (`||dW|| / ||W||`),
//! how far the written weight is from the exact sum (`||Q(W + dW) - (W + dW)|| / ||W + dW||`),
//! and how much of the delta survived the requantization: `kept = <Q(W + dW) - W, dW> /
//! ||dW||^2` and `residual = ||Q(W + dW) - W - dW|| / ||dW||` ([`Survival`]). A delta much
//! smaller than the step of a 4-bit type is mostly rounded away (kept near 0): bake it to
//! `f16` or `q8_0`, or keep applying it at run time.
//!
//! Control vectors add to the residual stream, not to a weight: they cannot be baked and are
//! refused (pass them at run time).
//!
//! The work runs on the model's pool, one tensor at a time, so memory holds one merged tensor
//! at most.

use super::{Patch, PatchKind, TensorDelta};
use crate::gguf::{GgufFile, GgufWriter, TensorInfo, Value};
use crate::model::{Model, WeightId};
use crate::pool::{SharedMut, ThreadPool};
use crate::{Error, Result};
use lethe_kernels::quant::{dequantize_row, quantize_row, GgmlType};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Below this share of the delta kept (`<Q(W + dW) - W, dW> / ||dW||^2`), a delta is mostly lost
/// below the quantization step of the type it was written in.
pub const LOST_KEPT: f64 = 0.5;

/// Above this residual (`||Q(W + dW) - (W + dW)|| / ||dW||`), the requantization error is more
/// than half the delta: the baked weight is a noisy copy of the patched one.
pub const NOISY_RESIDUAL: f64 = 0.5;

/// Rows merged per parallel job.
const CHUNK_ROWS: usize = 64;

/// The type changed tensors are written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BakeType {
    /// The base tensor's own type.
    #[default]
    Keep,
    F16,
    Q8_0,
}

impl BakeType {
    pub fn name(self) -> &'static str {
        match self {
            BakeType::Keep => "keep",
            BakeType::F16 => "f16",
            BakeType::Q8_0 => "q8_0",
        }
    }

    /// The type a tensor of type `base` is written in.
    pub fn resolve(self, base: GgmlType) -> GgmlType {
        match self {
            BakeType::Keep => base,
            BakeType::F16 => GgmlType::F16,
            BakeType::Q8_0 => GgmlType::Q8_0,
        }
    }
}

impl std::str::FromStr for BakeType {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "keep" => Ok(BakeType::Keep),
            "f16" => Ok(BakeType::F16),
            "q8_0" => Ok(BakeType::Q8_0),
            other => Err(Error::Invalid(format!(
                "bake type {other:?}: one of keep, f16, q8_0"
            ))),
        }
    }
}

/// What baking did to one tensor.
#[derive(Debug, Clone)]
pub struct TensorReport {
    /// The tensor written, e.g. `blk.3.attn_q.weight`.
    pub name: String,
    /// The tensor `W` was read from: `name`, or `token_embd.weight` for a tied head.
    pub base: String,
    pub ty_in: GgmlType,
    pub ty_out: GgmlType,
    /// `[cols, rows]`.
    pub shape: [usize; 2],
    /// How many deltas were summed into it.
    pub n_deltas: usize,
    /// `||dW|| / ||W||`: the size of the change.
    pub delta_rel: f64,
    /// `||Q(W + dW) - (W + dW)|| / ||W + dW||`: the error of the written weight against the
    /// exact sum.
    pub error: f64,
    /// `<Q(W + dW) - W, dW> / ||dW||^2`: the share of the delta the written weight carries
    /// (1: all of it; NaN when `dW` is 0).
    pub kept: f64,
    /// `||(Q(W + dW) - W) - dW|| / ||dW||`: what of the delta was lost or distorted (0: none;
    /// NaN when `dW` is 0).
    pub residual: f64,
}

/// How much of a delta a baked weight carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Survival {
    /// The delta is there, with an error under half its size.
    Kept,
    /// The delta is there on the whole ([`TensorReport::kept`] >= [`LOST_KEPT`]), but the
    /// requantization error is more than half its size ([`NOISY_RESIDUAL`]).
    Noisy,
    /// Less than half of the delta survived: it vanished below the quantization step.
    Lost,
}

impl TensorReport {
    /// How much of the delta survived (a zero delta counts as kept).
    pub fn survival(&self) -> Survival {
        if self.kept < LOST_KEPT {
            Survival::Lost
        } else if self.residual > NOISY_RESIDUAL {
            Survival::Noisy
        } else {
            Survival::Kept
        }
    }
}

/// What [`bake`] wrote.
#[derive(Debug, Clone)]
pub struct BakeReport {
    /// The merged tensors, in file order.
    pub changed: Vec<TensorReport>,
    /// Tensors copied byte for byte from the base (a tied head's copy not counted).
    pub copied: usize,
    /// True when `output.weight` was added as a byte copy of the original `token_embd.weight`
    /// (tied embeddings, embedding changed, head kept).
    pub head_copied: bool,
    /// The patches baked (zero scales left out) with their scales.
    pub patches: Vec<(String, f32)>,
    /// Size of the written file in bytes.
    pub bytes: u64,
}

/// Loads the patch files `specs` (path, scale) against `model` for baking: each is checked
/// against the model's architecture and shapes, and control vectors are refused.
pub fn load_patches(model: &Model, specs: &[(PathBuf, f32)]) -> Result<Vec<(Arc<Patch>, f32)>> {
    let mut parts = Vec::with_capacity(specs.len());
    for (path, scale) in specs {
        let p = super::load(path, model)?;
        refuse_cvec(&p)?;
        parts.push((Arc::new(p), *scale));
    }
    Ok(parts)
}

fn refuse_cvec(p: &Patch) -> Result<()> {
    if p.kind == PatchKind::ControlVector || !p.cvec.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: a control vector adds to the residual stream after a block, not to a weight, \
             so it cannot be baked into a model; pass it at run time with --control-vector",
            p.source
        )));
    }
    Ok(())
}

/// The patches that change something: control vectors and non-finite scales refused, zero
/// scales left out, each checked against `model`.
fn active_parts(model: &Model, parts: &[(Arc<Patch>, f32)]) -> Result<Vec<(Arc<Patch>, f32)>> {
    let mut out = Vec::new();
    for (p, s) in parts {
        refuse_cvec(p)?;
        if !s.is_finite() {
            return Err(Error::Invalid(format!(
                "{}: scale must be finite, got {s}",
                p.source
            )));
        }
        p.check(model)?;
        if *s != 0.0 && !p.tensors.is_empty() {
            out.push((p.clone(), *s));
        }
    }
    if out.is_empty() {
        return Err(Error::Invalid(
            "nothing to bake: no patch with a non-zero scale changes a weight".into(),
        ));
    }
    Ok(out)
}

/// One tensor to write merged: where its `W` comes from and the deltas summed into it.
struct Merge<'a> {
    name: String,
    /// `W`: the tensor read (`token_embd.weight` for a tied head).
    base: &'a TensorInfo,
    ty: GgmlType,
    /// Each delta with the user's scale and its first row in the tensor (0 unless the tensor
    /// is fused: phi3's `attn_qkv` holds q, k and v).
    deltas: Vec<Scaled<'a>>,
}

/// A delta, the user's scale, and its first row in the merged tensor.
type Scaled<'a> = (&'a TensorDelta, f32, usize);

impl Merge<'_> {
    fn cols(&self) -> usize {
        self.base.row_len()
    }

    fn rows(&self) -> usize {
        self.base.n_rows() as usize
    }
}

/// One merge per changed target, its deltas summed over the patches. On a tied model the head
/// is a new `output.weight` whose `W` is `token_embd.weight`.
fn merges<'a>(
    model: &Model,
    file: &'a GgufFile,
    parts: &'a [(Arc<Patch>, f32)],
    ty: BakeType,
) -> Result<Vec<Merge<'a>>> {
    // By the file's tensor: a fused one gathers the deltas of the matrices it holds.
    let mut by_tensor: Vec<(String, Vec<Scaled>)> = Vec::new();
    for (p, s) in parts {
        for d in &p.tensors {
            let (name, row0) = match (d.target, model.target_weight(d.target)) {
                (WeightId::Block(..), Some(w)) => (w.name.clone(), w.row0),
                _ => (d.target.tensor_name(), 0),
            };
            match by_tensor.iter_mut().find(|(n, _)| *n == name) {
                Some((_, v)) => v.push((d, *s, row0)),
                None => by_tensor.push((name, vec![(d, *s, row0)])),
            }
        }
    }
    let mut out = Vec::with_capacity(by_tensor.len());
    for (name, deltas) in by_tensor {
        let base_name = match (name.as_str(), file.tensor(&name)) {
            ("output.weight", None) => "token_embd.weight".to_string(),
            _ => name.clone(),
        };
        let base = file
            .tensor(&base_name)
            .ok_or_else(|| Error::Model(format!("the base model has no tensor {base_name}")))?;
        let m = Merge {
            name,
            base,
            ty: ty.resolve(base.ty),
            deltas,
        };
        check_merge(&m)?;
        out.push(m);
    }
    Ok(out)
}

/// The merged tensor can be written in its type: a matrix whose rows are a whole number of
/// blocks, and deltas of its shape.
fn check_merge(m: &Merge) -> Result<()> {
    let (cols, block) = (m.cols(), m.ty.block_size());
    if m.base.shape.len() != 2 {
        return Err(Error::Model(format!(
            "{}: shape {:?} is not a matrix",
            m.base.name, m.base.shape
        )));
    }
    if !cols.is_multiple_of(block) {
        return Err(Error::Invalid(format!(
            "{}: rows of {cols} are not a whole number of {} blocks of {block}; bake with \
             --type f16",
            m.name, m.ty
        )));
    }
    for (d, _, row0) in &m.deltas {
        if d.cols != cols || row0 + d.rows > m.rows() {
            return Err(Error::Invalid(format!(
                "{}: a delta of [{}, {}] at row {row0} for a [{cols}, {}] weight",
                m.name,
                d.cols,
                d.rows,
                m.rows()
            )));
        }
    }
    if matches!(m.base.ty, GgmlType::I32 | GgmlType::Q8_K) {
        return Err(Error::Model(format!(
            "{}: a {} tensor is not a weight lethe can merge into",
            m.base.name, m.base.ty
        )));
    }
    Ok(())
}

/// Sums over the rows of a merged tensor (`q` = the written row dequantized, `m = w + d`).
#[derive(Debug, Default, Clone, Copy)]
struct Sums {
    w2: f64,
    d2: f64,
    m2: f64,
    /// `||q - m||^2`.
    e2: f64,
    /// `<q - w, d>`.
    kd: f64,
}

impl std::ops::Add for Sums {
    type Output = Sums;
    fn add(self, o: Sums) -> Sums {
        Sums {
            w2: self.w2 + o.w2,
            d2: self.d2 + o.d2,
            m2: self.m2 + o.m2,
            e2: self.e2 + o.e2,
            kd: self.kd + o.kd,
        }
    }
}

impl Sums {
    /// One row: `w` the base, `d` the summed delta, `q` the written row dequantized.
    fn row(w: &[f32], d: &[f32], q: &[f32]) -> Sums {
        let mut s = Sums::default();
        for ((&w, &d), &q) in w.iter().zip(d).zip(q) {
            let (w, d, q) = (w as f64, d as f64, q as f64);
            let m = w + d;
            s.w2 += w * w;
            s.d2 += d * d;
            s.m2 += m * m;
            s.e2 += (q - m) * (q - m);
            s.kd += (q - w) * d;
        }
        s
    }
}

/// Scratch rows for merging, `[cols]` each.
struct Rows {
    w: Vec<f32>,
    d: Vec<f32>,
    m: Vec<f32>,
    q: Vec<f32>,
    tmp: Vec<f32>,
}

impl Rows {
    fn new(cols: usize) -> Self {
        Self {
            w: vec![0.0; cols],
            d: vec![0.0; cols],
            m: vec![0.0; cols],
            q: vec![0.0; cols],
            tmp: Vec::new(),
        }
    }
}

/// Merges rows `r0..` of `m` into `dst` (whole rows of the written type).
fn merge_rows(file: &GgufFile, m: &Merge, r0: usize, dst: &mut [u8]) -> Result<Sums> {
    let cols = m.cols();
    let (rb_in, rb_out) = (m.base.ty.row_bytes(cols), m.ty.row_bytes(cols));
    let src = file.tensor_data(m.base);
    let mut s = Rows::new(cols);
    let mut sums = Sums::default();
    for (i, out) in dst.chunks_exact_mut(rb_out).enumerate() {
        let r = r0 + i;
        dequantize_row(m.base.ty, &src[r * rb_in..(r + 1) * rb_in], &mut s.w)?;
        s.d.fill(0.0);
        for (delta, scale, row0) in &m.deltas {
            if (*row0..row0 + delta.rows).contains(&r) {
                delta.add_row(r - row0, *scale, &mut s.d, &mut s.tmp);
            }
        }
        for ((m, &w), &d) in s.m.iter_mut().zip(&s.w).zip(&s.d) {
            *m = w + d;
        }
        if let Some(c) = s.m.iter().position(|x| !x.is_finite()) {
            return Err(Error::Invalid(format!(
                "{}: the merged weight is not finite at row {r}, column {c} (is a scale too \
                 large?)",
                m.name
            )));
        }
        quantize_row(m.ty, &s.m, out)?;
        dequantize_row(m.ty, out, &mut s.q)?;
        sums = sums + Sums::row(&s.w, &s.d, &s.q);
    }
    Ok(sums)
}

/// Progress over every merged row of a bake.
struct Progress<'a> {
    done: AtomicUsize,
    total: usize,
    f: &'a (dyn Fn(usize, usize) + Sync),
}

impl Progress<'_> {
    fn add(&self, n: usize) {
        let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
        (self.f)(done, self.total);
    }
}

/// Merges one tensor on the threads of `pool`: its bytes in the written type and its report.
fn merge(
    pool: &ThreadPool,
    file: &GgufFile,
    m: &Merge,
    progress: &Progress,
) -> Result<(Vec<u8>, TensorReport)> {
    let (cols, rows) = (m.cols(), m.rows());
    let rb_out = m.ty.row_bytes(cols);
    let mut bytes = vec![0u8; rows * rb_out]; // [cols, rows] in m.ty
    let dst = SharedMut::new(&mut bytes);
    let sums = pool.map(rows.div_ceil(CHUNK_ROWS), |i| {
        let (r0, r1) = (i * CHUNK_ROWS, ((i + 1) * CHUNK_ROWS).min(rows));
        // SAFETY: rows r0..r1 of the output are chunk i's alone.
        let dst = unsafe { dst.slice(r0 * rb_out, (r1 - r0) * rb_out) };
        let s = merge_rows(file, m, r0, dst)?;
        progress.add(r1 - r0);
        Ok(s)
    });
    let sums = sums
        .into_iter()
        .collect::<Result<Vec<Sums>>>()?
        .into_iter()
        .fold(Sums::default(), |a, b| a + b);
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    let report = TensorReport {
        name: m.name.clone(),
        base: m.base.name.clone(),
        ty_in: m.base.ty,
        ty_out: m.ty,
        shape: [cols, rows],
        n_deltas: m.deltas.len(),
        delta_rel: ratio(sums.d2.sqrt(), sums.w2.sqrt()),
        error: ratio(sums.e2.sqrt(), sums.m2.sqrt()),
        kept: ratio(sums.kd, sums.d2),
        residual: ratio(sums.e2.sqrt(), sums.d2.sqrt()),
    };
    Ok((bytes, report))
}

/// The file name of a patch's source, for the metadata.
fn short_name(source: &str) -> String {
    Path::new(source)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| source.to_string())
}

/// Refuses to write over the base model (it is memory-mapped while being read).
fn check_output(model_path: Option<&Path>, out: &Path) -> Result<()> {
    let (Some(base), Ok(o)) = (model_path, out.canonicalize()) else {
        return Ok(());
    };
    if base.canonicalize().is_ok_and(|b| b == o) {
        return Err(Error::Invalid(format!(
            "{}: the output would replace the base model; write to another file",
            out.display()
        )));
    }
    Ok(())
}

/// Merges the weight deltas of `parts` (patches with their scales; several compose as the sum
/// of their scaled deltas) into `model`'s weights and writes the result to `out` (atomically).
/// Changed tensors are written in `ty`; every other tensor and all metadata are copied (see the
/// module docs for the metadata and for tied embeddings). `progress(done, total)` is called
/// with merged rows, from the worker threads.
///
/// `model_path`, when given, is the base's file, and `out` must not be it.
///
/// Fails with [`Error::Invalid`] for a control vector, a non-finite scale, a patch for other
/// shapes, a type the rows cannot be written in, or nothing to bake (no patch, or every scale
/// 0).
pub fn bake(
    model: &Model,
    model_path: Option<&Path>,
    parts: &[(Arc<Patch>, f32)],
    ty: BakeType,
    out: &Path,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<BakeReport> {
    let parts = active_parts(model, parts)?;
    check_output(model_path, out)?;
    let file = &*model.file;
    let merges = merges(model, file, &parts, ty)?;
    let tied = file.tensor("output.weight").is_none();
    let has = |n: &str| merges.iter().any(|m| m.name == n);
    let head_copied = tied && has("token_embd.weight") && !has("output.weight");

    let mut w = GgufWriter::new();
    w.copy_metadata(file)?;
    set_metadata(&mut w, file, &parts, ty)?;
    let mut copied = 0;
    for t in file.tensors() {
        add_tensor(&mut w, file, &merges, &t.name, &t.name, &mut copied)?;
        if tied && t.name == "token_embd.weight" {
            if head_copied {
                w.copy_tensor_as(file, "token_embd.weight", "output.weight")?;
            } else if has("output.weight") {
                add_tensor(&mut w, file, &merges, "output.weight", &t.name, &mut copied)?;
            }
        }
    }
    let bytes = w.file_size();
    let by_name: HashMap<&str, &Merge> = merges.iter().map(|m| (m.name.as_str(), m)).collect();
    let progress = Progress {
        done: AtomicUsize::new(0),
        total: merges.iter().map(|m| m.rows()).sum(),
        f: progress,
    };
    let mut changed = Vec::with_capacity(merges.len());
    w.write_with(out, |info: &TensorInfo| -> Result<Vec<u8>> {
        let m = by_name
            .get(info.name.as_str())
            .ok_or_else(|| Error::Model(format!("{}: no data to write", info.name)))?;
        let (data, report) = merge(&model.pool, file, m, &progress)?;
        changed.push(report);
        Ok(data)
    })?;
    Ok(BakeReport {
        changed,
        copied,
        head_copied,
        patches: parts.iter().map(|(p, s)| (p.source.clone(), *s)).collect(),
        bytes,
    })
}

/// Adds tensor `name` to `w`: merged later when it is in `merges` (shape of `base`), else a
/// byte copy of the base's tensor of that name.
fn add_tensor<'a>(
    w: &mut GgufWriter<'a>,
    file: &'a GgufFile,
    merges: &[Merge],
    name: &str,
    base: &str,
    copied: &mut usize,
) -> Result<()> {
    match merges.iter().find(|m| m.name == name) {
        Some(m) => {
            let shape = file
                .tensor(base)
                .map(|t| t.shape.clone())
                .ok_or_else(|| Error::Model(format!("the base model has no tensor {base}")))?;
            w.add_tensor_info(name, &shape, m.ty)?;
        }
        None => {
            w.copy_tensor(file, name)?;
            *copied += 1;
        }
    }
    Ok(())
}

/// `general.name` suffixed ` (baked)`; `lethe.baked.patches` and `lethe.baked.type`.
fn set_metadata(
    w: &mut GgufWriter,
    file: &GgufFile,
    parts: &[(Arc<Patch>, f32)],
    ty: BakeType,
) -> Result<()> {
    let base = match file.get("general.name") {
        Some(Value::String(s)) => s.clone(),
        _ => file.architecture().unwrap_or("model").to_string(),
    };
    w.set("general.name", format!("{base} (baked)"))?;
    let list: Vec<String> = parts
        .iter()
        .map(|(p, s)| format!("{}:{s}", short_name(&p.source)))
        .collect();
    w.set("lethe.baked.patches", list)?;
    w.set("lethe.baked.type", ty.name())?;
    Ok(())
}
