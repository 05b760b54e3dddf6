//! Weight tensors used in place from the memory-mapped file, and their names: the matrices of
//! a block ([`Proj`]) and the weights a patch can change ([`WeightId`]).

use crate::gguf::{GgufFile, TensorInfo};
use crate::{Error, Result};
use lethe_kernels::quant::{self, GgmlType};
use std::sync::Arc;

/// A 2-D weight `[cols, rows]` in ggml order: `rows` rows of `cols` contiguous elements.
///
/// A weight may be some of the rows of its tensor: phi3's fused `attn_qkv` holds q, k and v,
/// its `ffn_up` the gate and the up projection, one after the other; each is a view
/// ([`Weight::view`]) that starts at row `row0` of the tensor `name`.
#[derive(Debug, Clone)]
pub struct Weight {
    /// The tensor in the file.
    pub name: String,
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    /// First row of this weight in its tensor (0 unless the tensor is fused).
    pub row0: usize,
    /// Added to the outputs (`[rows]`: qwen2's q/k/v, phi2's everywhere), when the file has it.
    pub bias: Option<Arc<[f32]>>,
    /// Byte range in the file.
    start: usize,
    len: usize,
}

impl Weight {
    pub fn from_info(f: &GgufFile, t: &TensorInfo) -> Self {
        let rows = t.n_rows() as usize;
        Self {
            name: t.name.clone(),
            ty: t.ty,
            rows,
            cols: t.row_len(),
            row0: 0,
            bias: None,
            start: f.data_offset + t.offset as usize,
            len: t.size as usize,
        }
    }

    /// Rows `row0..row0 + rows` of this weight, with their part of the bias.
    pub fn view(&self, row0: usize, rows: usize) -> Weight {
        assert!(row0 + rows <= self.rows, "a view inside the weight");
        let rb = self.row_bytes();
        Weight {
            name: self.name.clone(),
            ty: self.ty,
            rows,
            cols: self.cols,
            row0: self.row0 + row0,
            bias: self.bias.as_ref().map(|b| b[row0..row0 + rows].into()),
            start: self.start + row0 * rb,
            len: rows * rb,
        }
    }

    /// Whether this weight is part of a larger (fused) tensor.
    pub fn is_view(&self, f: &GgufFile) -> bool {
        self.row0 != 0
            || f.tensor(&self.name)
                .is_some_and(|t| t.n_rows() as usize != self.rows)
    }

    /// Add the bias (if any) to each of the `n` output rows in `y` (`[n, rows]`).
    pub fn add_bias(&self, y: &mut [f32], n: usize) {
        if let Some(b) = &self.bias {
            for row in y[..n * self.rows].chunks_exact_mut(self.rows) {
                lethe_kernels::ops::add_inplace(row, b);
            }
        }
    }

    #[inline]
    pub fn data<'a>(&self, f: &'a GgufFile) -> &'a [u8] {
        &f.bytes()[self.start..self.start + self.len]
    }

    #[inline]
    pub fn row_bytes(&self) -> usize {
        self.ty.row_bytes(self.cols)
    }

    /// Dequantize row `r` into `out` (`cols` floats): embedding lookups.
    pub fn dequantize_row(&self, f: &GgufFile, r: usize, out: &mut [f32]) {
        let rb = self.row_bytes();
        let d = &self.data(f)[r * rb..(r + 1) * rb];
        quant::dequantize_row(self.ty, d, &mut out[..self.cols]).expect("validated at load");
    }
}

/// One matrix of a block: a projection of its attention or its feed-forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    pub const ALL: [Proj; 7] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
    ];

    /// The tensor's name inside `blk.N.`.
    pub fn tensor(self) -> &'static str {
        match self {
            Proj::Q => "attn_q",
            Proj::K => "attn_k",
            Proj::V => "attn_v",
            Proj::O => "attn_output",
            Proj::Gate => "ffn_gate",
            Proj::Up => "ffn_up",
            Proj::Down => "ffn_down",
        }
    }

    /// The short name the command line uses: `q`, `k`, `v`, `o`, `gate`, `up`, `down`.
    pub fn short(self) -> &'static str {
        match self {
            Proj::Q => "q",
            Proj::K => "k",
            Proj::V => "v",
            Proj::O => "o",
            Proj::Gate => "gate",
            Proj::Up => "up",
            Proj::Down => "down",
        }
    }

    /// The matrix whose tensor name ([`Proj::tensor`]) is `s`.
    pub fn from_tensor(s: &str) -> Option<Proj> {
        Proj::ALL.into_iter().find(|x| x.tensor() == s)
    }

    /// The matrix whose short name ([`Proj::short`]) is `s`.
    pub fn from_short(s: &str) -> Option<Proj> {
        Proj::ALL.into_iter().find(|x| x.short() == s)
    }
}

/// A weight of the model by name: what a patch changes, or what
/// [`Model::apply_weight`](super::Model::apply_weight) runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightId {
    /// `token_embd.weight` as the embedding lookup (the head is [`WeightId::Output`], even when
    /// the two are tied).
    Embd,
    /// The output head.
    Output,
    Block(usize, Proj),
}

impl WeightId {
    /// The target a base tensor name denotes (`blk.3.attn_q.weight`, `token_embd.weight`, ...).
    pub fn parse(name: &str) -> Option<WeightId> {
        match name {
            "token_embd.weight" => return Some(WeightId::Embd),
            "output.weight" => return Some(WeightId::Output),
            _ => {}
        }
        let rest = name.strip_prefix("blk.")?.strip_suffix(".weight")?;
        let (n, proj) = rest.split_once('.')?;
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) || n.len() > 6 {
            return None;
        }
        Some(WeightId::Block(n.parse().ok()?, Proj::from_tensor(proj)?))
    }

    pub fn tensor_name(self) -> String {
        match self {
            WeightId::Embd => "token_embd.weight".into(),
            WeightId::Output => "output.weight".into(),
            WeightId::Block(n, s) => format!("blk.{n}.{}.weight", s.tensor()),
        }
    }
}

/// Load a weight, checking its shape `[cols, rows]`.
pub fn load(f: &GgufFile, name: &str, cols: usize, rows: usize) -> Result<Weight> {
    let t = f
        .tensor(name)
        .ok_or_else(|| Error::Model(format!("tensor {name:?} not found")))?;
    let w = Weight::from_info(f, t);
    if w.cols != cols || w.rows != rows || t.shape.len() > 2 {
        return Err(Error::Model(format!(
            "tensor {name:?} has shape {:?}, expected [{cols}, {rows}]",
            t.shape
        )));
    }
    if rows > 1 && !quant::has_vec_dot(w.ty) {
        return Err(Error::Model(format!(
            "tensor {name:?}: type {} cannot be a matmul weight",
            w.ty
        )));
    }
    Ok(w)
}

/// Load a weight and its bias `<name without .weight>.bias` when the file has one.
pub fn load_biased(f: &GgufFile, name: &str, cols: usize, rows: usize) -> Result<Weight> {
    let mut w = load(f, name, cols, rows)?;
    w.bias = load_bias(f, name, rows)?;
    Ok(w)
}

/// The bias `[rows]` of the weight `name` (`blk.0.attn_q.weight` -> `blk.0.attn_q.bias`).
pub fn load_bias(f: &GgufFile, name: &str, rows: usize) -> Result<Option<Arc<[f32]>>> {
    let bias = format!("{}.bias", name.strip_suffix(".weight").unwrap_or(name));
    match f.tensor(&bias) {
        Some(_) => Ok(Some(load_vec(f, &bias, rows)?.into())),
        None => Ok(None),
    }
}

/// A 1-D F32 vector (norm weights), copied out (they are tiny).
pub fn load_vec(f: &GgufFile, name: &str, n: usize) -> Result<Vec<f32>> {
    let t = f
        .tensor(name)
        .ok_or_else(|| Error::Model(format!("tensor {name:?} not found")))?;
    if t.n_elements() as usize != n {
        return Err(Error::Model(format!(
            "tensor {name:?} has shape {:?}, expected [{n}]",
            t.shape
        )));
    }
    let mut out = vec![0.0; n];
    quant::dequantize_row(t.ty, f.tensor_data(t), &mut out)?;
    Ok(out)
}
