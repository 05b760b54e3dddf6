//! The three forms of a weight change (low rank, dense, sparse) and what they compute.

use super::{axpy, dot};
use crate::gguf::GgufFile;
use crate::model::{Exec, Weight, WeightId};
use crate::pool::SharedMut;
use crate::{Error, Result};
use std::sync::Arc;

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
    pub target: WeightId,
    pub cols: usize,
    pub rows: usize,
    /// The file's own factor (LoRA: `alpha / rank`, or 1), times the user's scale at use.
    pub scale: f32,
    pub change: Change,
}

impl TensorDelta {
    /// A sparse delta from `(flat index, value)` pairs (`index = row * cols + col`).
    pub fn sparse(
        target: WeightId,
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

    /// Rows `r0..r0 + n` of this delta as a delta of `target` (a fused tensor's change split
    /// into the weights it holds: phi3's `attn_qkv` into q, k and v).
    pub fn slice_rows(&self, target: WeightId, r0: usize, n: usize) -> TensorDelta {
        assert!(r0 + n <= self.rows, "a slice inside the delta");
        let change = match &self.change {
            Change::LowRank { rank, a, bt } => Change::LowRank {
                rank: *rank,
                a: a.clone(),
                bt: (0..*rank)
                    .flat_map(|k| {
                        bt[k * self.rows + r0..k * self.rows + r0 + n]
                            .iter()
                            .copied()
                    })
                    .collect(),
            },
            Change::Dense { file, w } => Change::Dense {
                file: file.clone(),
                w: w.view(r0, n),
            },
            Change::Sparse { start, col, val } => {
                let (a, b) = (start[r0] as usize, start[r0 + n] as usize);
                Change::Sparse {
                    start: start[r0..=r0 + n].iter().map(|&x| x - start[r0]).collect(),
                    col: col[a..b].to_vec(),
                    val: val[a..b].to_vec(),
                }
            }
        };
        TensorDelta {
            target,
            cols: self.cols,
            rows: n,
            scale: self.scale,
            change,
        }
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

    /// `y[t] += s * dW x[t]` for `n` tokens (`x` `[n, cols]`, `y` `[n, rows]`), with the
    /// scratch of `ex`.
    pub(crate) fn apply(&self, ex: &mut Exec, s: f32, x: &[f32], n: usize, y: &mut [f32]) {
        let (cols, rows, s) = (self.cols, self.rows, s * self.scale);
        match &self.change {
            Change::LowRank { rank, a, bt } => {
                let rank = *rank;
                assert!(y.len() >= n * rows && ex.tmp.len() >= n * rank);
                let (yp, tp) = (SharedMut::new(y), SharedMut::new(ex.tmp));
                let one = |t: usize| {
                    // SAFETY: token t's rows of y and tmp are touched by one thread only.
                    let (yt, tt) = unsafe { (yp.slice(t * rows, rows), tp.slice(t * rank, rank)) };
                    let xt = &x[t * cols..(t + 1) * cols];
                    for (k, v) in tt.iter_mut().enumerate() {
                        *v = s * dot(&a[k * cols..(k + 1) * cols], xt);
                    }
                    for (k, &v) in tt.iter().enumerate() {
                        axpy(yt, v, &bt[k * rows..(k + 1) * rows]);
                    }
                };
                // One token of a small adapter is a few microseconds: not worth a pool job.
                if n * rank * (cols + rows) < 1 << 16 {
                    (0..n).for_each(one);
                } else {
                    ex.pool.for_chunks(n, 1, |_, ts| ts.for_each(&one));
                }
            }
            Change::Dense { file, w } => {
                let (mut ex, tmp) = ex.with_file(file);
                let per = (tmp.len() / rows).max(1);
                for t0 in (0..n).step_by(per) {
                    let m = per.min(n - t0);
                    let xs = &x[t0 * cols..(t0 + m) * cols];
                    ex.matmul(w, xs, m, &mut tmp[..m * rows]);
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

    /// `out[i] += s * (dW x)[sel[i]]` for one token `x` (`[cols]`): a head on some rows.
    pub(crate) fn apply_rows(
        &self,
        ex: &mut Exec,
        s: f32,
        x: &[f32],
        sel: &[u32],
        out: &mut [f32],
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
                let (mut ex, tmp) = ex.with_file(file);
                for (o, s0) in out.chunks_mut(tmp.len()).zip(sel.chunks(tmp.len())) {
                    let t = &mut tmp[..s0.len()];
                    ex.matvec_rows(w, x, s0, t);
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
