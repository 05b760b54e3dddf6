//! Weight tensors used in place from the memory-mapped file, and the matmul over them.

use crate::gguf::{GgufFile, TensorInfo};
use crate::pool::ThreadPool;
use crate::{Error, Result};
use lethe_kernels::quant::{self, GgmlType};

/// A 2-D weight `[cols, rows]` in ggml order: `rows` rows of `cols` contiguous elements.
#[derive(Debug, Clone)]
pub struct Weight {
    pub name: String,
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
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
            start: f.data_offset + t.offset as usize,
            len: t.size as usize,
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

/// How activations meet the weights in a matmul.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// As llama.cpp: activations quantized once per matmul to the weight's paired format.
    #[default]
    Fast,
    /// Weights dequantized row by row, dot products with f32 activations accumulated in f64.
    Exact,
}

/// Raw pointer that may be shared across the pool's threads for disjoint writes.
#[derive(Clone, Copy)]
pub struct SyncPtr(pub *mut f32);
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

/// Scratch for quantized activations, sized once.
pub struct ActBuf {
    pub bytes: Vec<u8>,
}

impl ActBuf {
    pub fn new(max_tokens: usize, max_cols: usize) -> Self {
        // Q8_1 (36 B per 32) is the widest paired format per element; F32 for float weights.
        let per_row = (max_cols * 4).max(GgmlType::Q8_1.row_bytes(max_cols.next_multiple_of(256)));
        Self {
            bytes: vec![0u8; max_tokens * per_row],
        }
    }
}

/// `y[t, r] = sum_c W[r, c] * x[t, c]` for `n_tok` tokens; `x` is `[n_tok, cols]`, `y` is
/// `[n_tok, rows]` (or rows `row_range` only, for partial heads).
// `let yp = yp;` in the closures is not redundant: it makes them capture the whole `SyncPtr`
// (Sync) rather than its raw-pointer field (edition 2021 disjoint captures).
#[allow(clippy::too_many_arguments, clippy::redundant_locals)]
pub fn matmul(
    pool: &ThreadPool,
    f: &GgufFile,
    w: &Weight,
    x: &[f32],
    n_tok: usize,
    y: &mut [f32],
    act: &mut ActBuf,
    precision: Precision,
) {
    let cols = w.cols;
    let rows = w.rows;
    debug_assert!(x.len() >= n_tok * cols);
    debug_assert!(y.len() >= n_tok * rows);
    let wd = w.data(f);
    let rb = w.row_bytes();
    let yp = SyncPtr(y.as_mut_ptr());
    match precision {
        Precision::Fast => {
            let vt = w.ty.vec_dot_type();
            let ab = vt.row_bytes(cols);
            let abuf = &mut act.bytes[..n_tok * ab];
            quantize_rows(pool, vt, &x[..n_tok * cols], cols, abuf);
            let abuf = &*abuf;
            // Prefill: a block of ROW_BLOCK weight rows and TOK_BLOCK activation rows stays in
            // cache while `vec_dot_batch` unpacks each weight block once for up to four tokens.
            const ROW_BLOCK: usize = 16;
            const TOK_BLOCK: usize = 16;
            pool.run(&|ith, nth| {
                let yp = yp;
                let range = ThreadPool::split(rows, ith, nth);
                if n_tok == 1 {
                    for r in range {
                        let v = quant::vec_dot(w.ty, cols, &wd[r * rb..(r + 1) * rb], abuf);
                        // SAFETY: each r is written by exactly one thread.
                        unsafe { *yp.0.add(r) = v };
                    }
                    return;
                }
                let mut out = [0f32; TOK_BLOCK];
                for r0 in range.clone().step_by(ROW_BLOCK) {
                    let r1 = (r0 + ROW_BLOCK).min(range.end);
                    for t0 in (0..n_tok).step_by(TOK_BLOCK) {
                        let nt = (n_tok - t0).min(TOK_BLOCK);
                        let a = &abuf[t0 * ab..(t0 + nt) * ab];
                        for r in r0..r1 {
                            let wr = &wd[r * rb..(r + 1) * rb];
                            quant::vec_dot_batch(w.ty, cols, wr, a, ab, nt, &mut out[..nt]);
                            for (k, &v) in out[..nt].iter().enumerate() {
                                // SAFETY: each (t, r) is written by exactly one thread.
                                unsafe { *yp.0.add((t0 + k) * rows + r) = v };
                            }
                        }
                    }
                }
            });
        }
        Precision::Exact => {
            pool.run(&|ith, nth| {
                let yp = yp;
                let mut row = vec![0.0f32; cols];
                for r in ThreadPool::split(rows, ith, nth) {
                    quant::dequantize_row(w.ty, &wd[r * rb..(r + 1) * rb], &mut row)
                        .expect("validated");
                    for t in 0..n_tok {
                        let xs = &x[t * cols..(t + 1) * cols];
                        let v: f64 = row.iter().zip(xs).map(|(&a, &b)| a as f64 * b as f64).sum();
                        // SAFETY: each (t, r) is written by exactly one thread.
                        unsafe { *yp.0.add(t * rows + r) = v as f32 };
                    }
                }
            });
        }
    }
}

/// Quantize `x` (`n` rows of `cols`) into `dst` in format `vt`, rows split across threads.
fn quantize_rows(pool: &ThreadPool, vt: GgmlType, x: &[f32], cols: usize, dst: &mut [u8]) {
    let n = x.len() / cols;
    let ab = vt.row_bytes(cols);
    if n == 1 {
        quant::quantize_row(vt, x, &mut dst[..ab]).expect("row length checked at load");
        return;
    }
    let dp = dst.as_mut_ptr() as usize;
    pool.run(&|ith, nth| {
        for t in ThreadPool::split(n, ith, nth) {
            // SAFETY: disjoint row ranges per thread.
            let d = unsafe { std::slice::from_raw_parts_mut((dp as *mut u8).add(t * ab), ab) };
            quant::quantize_row(vt, &x[t * cols..(t + 1) * cols], d)
                .expect("row length checked at load");
        }
    });
}
