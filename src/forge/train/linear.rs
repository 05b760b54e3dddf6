//! Matrix products of training: the frozen quantized weights of the model (`y = W x` and
//! `dx += W^T dy`, one dequantized row at a time, never the whole matrix) and the LoRA factors
//! beside them.
//!
//! Activations are f32 throughout (the inference pass rounds them to 8 bits per matmul; here
//! they meet the weights' exact dequantized values, so the loss is a smooth function of the
//! adapter and finite differences check its gradients).

use super::kern::{axpy_rows, axpy_rows2, dot2x4};
use super::lora::LoraParam;
use crate::gguf::GgufFile;
use crate::model::Weight;
use crate::pool::{SharedMut, ThreadPool};
use lethe_kernels::quant;

/// Weight rows dequantized at once by one thread (a multiple of 4, the width of the forward
/// kernel).
const ROWS: usize = 16;

/// The four rows of `w` (`[nr, cols]`, `nr <= 4` rows from `i`), the last repeated to fill.
#[inline]
fn four(w: &[f32], cols: usize, i: usize, nr: usize) -> [&[f32]; 4] {
    let row = |k: usize| {
        let r = i + k.min(nr - 1);
        &w[r * cols..(r + 1) * cols]
    };
    [row(0), row(1), row(2), row(3)]
}

/// `y = W x`: `x` `[n, cols]`, `y` `[n, rows]` (overwritten), `W` `[cols, rows]` as stored in
/// the file; rows split over the pool's threads.
pub fn linear_forward(
    pool: &ThreadPool,
    f: &GgufFile,
    w: &Weight,
    x: &[f32],
    n: usize,
    y: &mut [f32],
) {
    let (cols, rows) = (w.cols, w.rows);
    assert!(x.len() >= n * cols && y.len() >= n * rows);
    let nth = pool.n_threads();
    let mut scratch = vec![0f32; nth * ROWS * cols]; // [n_threads, ROWS, cols]
    let sp = SharedMut::new(&mut scratch);
    let yp = SharedMut::new(&mut *y);
    pool.for_chunks(rows, ROWS, |ith, range| {
        // SAFETY: thread `ith` alone uses its scratch; each row of `y` is one chunk's.
        let wb = unsafe { sp.slice(ith * ROWS * cols, ROWS * cols) }; // [ROWS, cols]
        let nr = range.len();
        for (k, r) in range.clone().enumerate() {
            w.dequantize_row(f, r, &mut wb[k * cols..(k + 1) * cols]);
        }
        // Two tokens at a time against four rows.
        for t in (0..n).step_by(2) {
            let t1 = (t + 1).min(n - 1);
            let xs = [&x[t * cols..(t + 1) * cols], &x[t1 * cols..(t1 + 1) * cols]];
            for i in (0..nr).step_by(4) {
                let m = (nr - i).min(4);
                let d = dot2x4(xs, four(wb, cols, i, m));
                for (k, tk) in [t, t1].into_iter().enumerate() {
                    // SAFETY: rows `range` of `y` belong to this chunk.
                    let out = unsafe { yp.slice(tk * rows + range.start + i, m) };
                    out.copy_from_slice(&d[k][..m]);
                }
            }
        }
    });
}

/// `dx += W^T dy`: `dy` `[n, rows]`, `dx` `[n, cols]`. The columns are split into segments
/// of whole quantization blocks, one thread per segment: it dequantizes its segment of every
/// row (a byte range of the row, so no row is dequantized twice) and adds
/// `dy[t, r] * W[r, segment]` to `dx[t, segment]`, rows in order. No thread shares an output
/// and every sum runs in the same order, so the result is the same whatever the threads do.
/// Groups of rows whose `dy` is zero for a token (positions without loss, at the head) are
/// skipped.
pub fn linear_backward(
    pool: &ThreadPool,
    f: &GgufFile,
    w: &Weight,
    dy: &[f32],
    n: usize,
    dx: &mut [f32],
) {
    let (cols, rows, ty) = (w.cols, w.rows, w.ty);
    assert!(dy.len() >= n * rows && dx.len() >= n * cols);
    // Segments of whole blocks, about four per thread, at least 32 columns.
    let block = ty.block_size().max(8);
    let n_blocks = cols.div_ceil(block);
    let per = (n_blocks / (4 * pool.n_threads()))
        .max(32usize.div_ceil(block))
        .max(1);
    let seg = per * block;
    let n_seg = cols.div_ceil(seg);
    let (data, rb) = (w.data(f), w.row_bytes());
    let dxp = SharedMut::new(&mut *dx);
    pool.for_chunks(n_seg, 1, |_, segs| {
        let mut wb = vec![0f32; ROWS * seg]; // [ROWS, seg]
        for sg in segs {
            let (c0, c1) = (sg * seg, ((sg + 1) * seg).min(cols));
            let width = c1 - c0;
            let (b0, b1) = (ty.row_bytes(c0), ty.row_bytes(c1));
            for r0 in (0..rows).step_by(ROWS) {
                let m = (rows - r0).min(ROWS);
                for k in 0..m {
                    let row = &data[(r0 + k) * rb..(r0 + k + 1) * rb];
                    quant::dequantize_row(ty, &row[b0..b1], &mut wb[k * width..(k + 1) * width])
                        .expect("validated at load");
                }
                // Two tokens at a time share each dequantized row.
                let zero = |a: &[f32]| a.iter().all(|&v| v == 0.0);
                let mut t = 0;
                while t < n {
                    let a = &dy[t * rows + r0..t * rows + r0 + m]; // [m]
                    if t + 1 < n {
                        let b = &dy[(t + 1) * rows + r0..(t + 1) * rows + r0 + m]; // [m]
                        if !zero(a) && !zero(b) {
                            // SAFETY: columns c0..c1 of every token belong to this segment.
                            let d0 = unsafe { dxp.slice(t * cols + c0, width) }; // [width]
                            let d1 = unsafe { dxp.slice((t + 1) * cols + c0, width) };
                            axpy_rows2(d0, d1, a, b, &wb[..m * width], width);
                            t += 2;
                            continue;
                        }
                    }
                    if !zero(a) {
                        // SAFETY: as above.
                        let dxt = unsafe { dxp.slice(t * cols + c0, width) }; // [width]
                        axpy_rows(dxt, a, &wb[..m * width], width);
                    }
                    t += 1;
                }
            }
        }
    });
}

/// `out[t, j] = x_t · w_j` for `n` rows of `x` (`[n, len]`) and `m` rows of `w` (`[m, len]`),
/// into `out` (`[n, m]`, row stride `m`), two rows of `x` against four of `w` at a time.
fn dots(x: &[f32], n: usize, w: &[f32], m: usize, len: usize, out: &mut [f32]) {
    for t in (0..n).step_by(2) {
        let t1 = (t + 1).min(n - 1);
        let xs = [&x[t * len..(t + 1) * len], &x[t1 * len..(t1 + 1) * len]];
        for j in (0..m).step_by(4) {
            let k = (m - j).min(4);
            let d = dot2x4(xs, four(w, len, j, k));
            for (i, tk) in [t, t1].into_iter().enumerate() {
                out[tk * m + j..tk * m + j + k].copy_from_slice(&d[i][..k]);
            }
        }
    }
}

/// LoRA's forward: `u = A x` (`[n, r]`, kept for the backward pass) and `y += s B u`
/// (`y` `[n, rows]`).
pub fn lora_forward(
    pool: &ThreadPool,
    p: &LoraParam,
    s: f32,
    x: &[f32],
    n: usize,
    u: &mut [f32],
    y: &mut [f32],
) {
    let (cols, rows, rank) = (p.cols, p.rows, p.rank());
    let (up, yp) = (SharedMut::new(&mut *u), SharedMut::new(&mut *y));
    // u = A x: chunks of tokens (each chunk writes its own rows of u).
    pool.for_chunks(n, 4, |_, ts| {
        // SAFETY: tokens `ts`'s rows of `u` belong to this chunk.
        let ut = unsafe { up.slice(ts.start * rank, ts.len() * rank) }; // [len, r]
        dots(
            &x[ts.start * cols..ts.end * cols],
            ts.len(),
            &p.a,
            rank,
            cols,
            ut,
        );
    });
    // y += s B u: chunks of output rows, all tokens.
    pool.for_chunks(rows, 64, |_, rs| {
        let mut d = vec![0f32; n * rs.len()]; // [n, len]
        dots(
            u,
            n,
            &p.b[rs.start * rank..rs.end * rank],
            rs.len(),
            rank,
            &mut d,
        );
        for t in 0..n {
            // SAFETY: columns `rs` of every token's row of `y` belong to this chunk.
            let yt = unsafe { yp.slice(t * rows + rs.start, rs.len()) };
            for (o, &v) in yt.iter_mut().zip(&d[t * rs.len()..(t + 1) * rs.len()]) {
                *o += s * v;
            }
        }
    });
}

/// LoRA's backward, given its input `x` (`[n, cols]`), `u = A x` (`[n, r]`) and `dy`
/// (`[n, rows]`): with `du = s B^T dy` (`[n, r]`),
/// `grad_b += s dy^T u`, `grad_a += du^T x`, and, when `dx` is given, `dx += A^T du`.
#[allow(clippy::too_many_arguments)]
pub fn lora_backward(
    pool: &ThreadPool,
    p: &mut LoraParam,
    s: f32,
    x: &[f32],
    u: &[f32],
    dy: &[f32],
    n: usize,
    dx: Option<&mut [f32]>,
) {
    let (cols, rows, rank) = (p.cols, p.rows, p.rank());
    // du[t, k] = s sum_r B[r, k] dy[t, r]
    let mut du = vec![0f32; n * rank]; // [n, r]
    let dup = SharedMut::new(&mut du);
    let b = &p.b;
    pool.for_chunks(n, 4, |_, ts| {
        for t in ts {
            // SAFETY: token `t`'s row of `du` belongs to this chunk.
            let dut = unsafe { dup.slice(t * rank, rank) }; // [r]
            axpy_rows(dut, &dy[t * rows..(t + 1) * rows], b, rank);
            for v in dut.iter_mut() {
                *v *= s;
            }
        }
    });
    // grad_b[r, k] += s sum_t dy[t, r] u[t, k]
    let gbp = SharedMut::new(&mut p.grad_b);
    pool.for_chunks(rows, 64, |_, rs| {
        // SAFETY: rows `rs` of grad_b belong to this chunk.
        let gb = unsafe { gbp.slice(rs.start * rank, rs.len() * rank) }; // [len, r]
        let mut col = vec![0f32; n]; // [n] s * dy[:, r]
        for (i, r) in rs.clone().enumerate() {
            for (t, c) in col.iter_mut().enumerate() {
                *c = s * dy[t * rows + r];
            }
            axpy_rows(&mut gb[i * rank..(i + 1) * rank], &col, u, rank);
        }
    });
    // grad_a[k] += sum_t du[t, k] x[t]
    let gap = SharedMut::new(&mut p.grad_a);
    pool.for_chunks(rank, 1, |_, ks| {
        let mut col = vec![0f32; n]; // [n] du[:, k]
        for k in ks {
            // SAFETY: row `k` of grad_a belongs to this chunk.
            let ga = unsafe { gap.slice(k * cols, cols) }; // [cols]
            for (t, c) in col.iter_mut().enumerate() {
                *c = du[t * rank + k];
            }
            axpy_rows(ga, &col, x, cols);
        }
    });
    // dx[t] += sum_k du[t, k] A[k]
    if let Some(dx) = dx {
        let dxp = SharedMut::new(&mut *dx);
        let a = &p.a;
        pool.for_chunks(n, 4, |_, ts| {
            for t in ts {
                // SAFETY: token `t`'s row of dx belongs to this chunk.
                let dxt = unsafe { dxp.slice(t * cols, cols) }; // [cols]
                axpy_rows(dxt, &du[t * rank..(t + 1) * rank], a, cols);
            }
        });
    }
}
