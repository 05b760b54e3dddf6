//! The matmul over weights used in place: activations quantized once per job to the weights'
//! paired format, rows of one or several matrices shared out over the pool.

use super::weights::{Proj, Weight};
use super::{Model, RowPatches, Scratch};
use crate::gguf::GgufFile;
use crate::pool::{SharedMut, ThreadPool};
use lethe_kernels::quant::{self, GgmlType};

/// How activations meet the weights in a matmul.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// As llama.cpp: activations quantized once per matmul to the weight's paired format.
    #[default]
    Fast,
    /// Weights dequantized row by row, dot products with f32 activations accumulated in f64.
    Exact,
}

/// Scratch for quantized activations, sized once.
#[derive(Default)]
pub struct ActBuf {
    pub bytes: Vec<u8>,
}

impl ActBuf {
    pub fn new(max_tokens: usize, max_cols: usize) -> Self {
        // Q8_1 (36 B per 32) is the widest paired format per element, and padded to groups of
        // 256 it is also the interleaved layout's size; F32 for float weights.
        let per_row = (max_cols * 4).max(GgmlType::Q8_1.row_bytes(max_cols.next_multiple_of(256)));
        Self {
            bytes: vec![0u8; max_tokens * per_row],
        }
    }
}

/// What the matmuls of a forward step run with: the pool, the file the weights are in, how
/// activations meet them, and the step's scratch.
pub struct Exec<'a> {
    pub pool: &'a ThreadPool,
    /// The file the weights are in (a model's, or a patch's for its dense deltas).
    pub file: &'a GgufFile,
    pub precision: Precision,
    /// The activations quantized to the weights' paired format.
    pub act: &'a mut ActBuf,
    /// Floats the patches need between their two halves (`A x` of a low-rank delta, a dense
    /// delta's product): [`PatchSet`](crate::patch::PatchSet) says how many.
    pub tmp: &'a mut [f32],
}

/// Most matrices in one job ([`Job`]).
pub const MAX_PARTS: usize = 16;

impl<'a> Exec<'a> {
    /// The same context over the weights of `file`, and the patch scratch apart from it (a
    /// dense delta's product goes there while its matmul runs).
    pub fn with_file<'b>(&'b mut self, file: &'b GgufFile) -> (Exec<'b>, &'b mut [f32]) {
        let ex = Exec {
            pool: self.pool,
            file,
            precision: self.precision,
            act: &mut *self.act,
            tmp: &mut [],
        };
        (ex, &mut *self.tmp)
    }

    /// `y[t, r] = sum_c W[r, c] * x[t, c]` for `n_tok` tokens; `x` is `[n_tok, cols]`, `y` is
    /// `[n_tok, rows]`.
    pub fn matmul(&mut self, w: &Weight, x: &[f32], n_tok: usize, y: &mut [f32]) {
        self.matmul_group(&mut [(w, y)], x, n_tok);
    }

    /// `out[i] = W[rows[i]] · x` for one token `x` (`[cols]`): a head computed only on some
    /// rows.
    pub fn matvec_rows(&mut self, w: &Weight, x: &[f32], rows: &[u32], out: &mut [f32]) {
        let (pool, act) = (self.pool, &mut *self.act);
        let (cols, rb, wd) = (w.cols, w.row_bytes(), w.data(self.file));
        assert!(out.len() >= rows.len());
        let out = SharedMut::new(out);
        const CHUNK: usize = 64;
        match self.precision {
            Precision::Fast => {
                let vt = w.ty.vec_dot_type();
                // The layout `run_parts` uses for this weight, so that the values are its bits.
                let x8 = quant::has_tile_x8(w.ty);
                let ab = if x8 {
                    quant::x8_row_bytes(cols)
                } else {
                    vt.row_bytes(cols)
                };
                quantize_row(vt, x8, &x[..cols], &mut act.bytes[..ab]);
                let a = &act.bytes[..ab];
                pool.for_chunks(rows.len(), CHUNK, |_, chunk| {
                    for (i, &r) in rows.iter().enumerate().skip(chunk.start).take(CHUNK) {
                        let r = r as usize;
                        let wr = &wd[r * rb..(r + 1) * rb];
                        let v = if x8 {
                            let mut o = [0f32];
                            quant::vec_dot_tile_x8(w.ty, cols, wr, rb, 1, a, ab, 1, &mut o, 1);
                            o[0]
                        } else {
                            quant::vec_dot(w.ty, cols, wr, a)
                        };
                        // SAFETY: each i is claimed by one thread.
                        unsafe { out.write(i, v) };
                    }
                });
            }
            Precision::Exact => {
                let mut row = vec![0.0f32; cols];
                for (i, &r) in rows.iter().enumerate() {
                    let r = r as usize;
                    quant::dequantize_row(w.ty, &wd[r * rb..(r + 1) * rb], &mut row)
                        .expect("validated");
                    let v: f64 = row.iter().zip(x).map(|(&a, &b)| a as f64 * b as f64).sum();
                    // SAFETY: single-threaded here.
                    unsafe { out.write(i, v as f32) };
                }
            }
        }
    }

    /// Several matmuls over the same input (q/k/v, gate/up) as one job: the input is quantized
    /// once and the threads split the rows of all of them, so there is one synchronisation instead
    /// of one per weight. Weights whose activation formats differ run one after another.
    pub fn matmul_group(&mut self, parts: &mut [(&Weight, &mut [f32])], x: &[f32], n_tok: usize) {
        let Some((first, _)) = parts.first() else {
            return;
        };
        let (cols, vt) = (first.cols, first.ty.vec_dot_type());
        let same = parts
            .iter()
            .all(|(w, _)| w.cols == cols && w.ty.vec_dot_type() == vt);
        if !same && parts.len() > 1 {
            for part in parts.iter_mut() {
                self.matmul_group(std::slice::from_mut(part), x, n_tok);
            }
            return;
        }
        let mut job = Job::new(cols);
        for (w, y) in parts.iter_mut() {
            debug_assert!(y.len() >= n_tok * w.rows);
            job.push(Part::weight(self.file, w, y.as_mut_ptr()));
        }
        self.run(&mut job, x, n_tok);
    }

    /// Run `job` over the input `x` (`[n_tok, cols]`): all its matrices at once when their
    /// quantized activations are of one format, else one after another.
    pub(crate) fn run(&mut self, job: &mut Job, x: &[f32], n_tok: usize) {
        let cols = job.cols;
        if job.one_format() {
            self.run_parts(job.parts_mut(), cols, x, n_tok);
        } else {
            for p in job.parts_mut() {
                self.run_parts(std::slice::from_mut(p), cols, x, n_tok);
            }
        }
    }

    /// Run the matrices `table` (all with `cols` columns, all quantized ones pairing with one
    /// activation format) over the same input `x` (`[n_tok, cols]`) as one job. Parts made with
    /// [`Part::f16_rows`] (LoRA factors) take `x` in f32.
    pub(crate) fn run_parts(&mut self, table: &mut [Part], cols: usize, x: &[f32], n_tok: usize) {
        let (pool, act) = (self.pool, &mut *self.act);
        debug_assert!(x.len() >= n_tok * cols);
        let mut total = 0;
        for p in table.iter_mut() {
            p.start = total;
            total += p.rows;
        }
        let table = &*table;
        match self.precision {
            Precision::Fast => {
                let vt = table
                    .iter()
                    .find(|p| !p.f32_act)
                    .map(|p| p.ty.vec_dot_type());
                debug_assert!(table
                    .iter()
                    .all(|p| p.f32_act || Some(p.ty.vec_dot_type()) == vt));
                // Q4_0/Q4_1/Q5_0/Q8_0 weights (AVX2 or VNNI) take the activations interleaved in
                // groups of eight blocks (`vec_dot_tile_x8`), one sequence or several alike.
                let x8 =
                    vt.is_some() && table.iter().all(|p| p.f32_act || quant::has_tile_x8(p.ty));
                let ab = match vt {
                    Some(_) if x8 => quant::x8_row_bytes(cols),
                    Some(vt) => vt.row_bytes(cols),
                    None => 0,
                };
                let abuf = &mut act.bytes[..n_tok * ab];
                if let Some(vt) = vt {
                    quantize_rows(pool, vt, x8, &x[..n_tok * cols], cols, abuf);
                }
                let abuf = &*abuf;
                // Threads take chunks of rows as they come, so a thread that starts late or is
                // pre-empted (a shared machine) does not hold the others up at the join.
                let chunk = (total / (pool.n_threads() * 8))
                    .next_multiple_of(16)
                    .max(16);
                pool.for_chunks(total, chunk, |_, rows| {
                    for_rows(table, rows, |p, a, b| {
                        if p.f32_act {
                            p.dot_rows_f16(a..b, cols, x, n_tok)
                        } else {
                            p.dot_rows(a..b, cols, abuf, ab, x8, n_tok)
                        }
                    });
                });
            }
            Precision::Exact => {
                pool.run(&|ith, nth| {
                    let mut row = vec![0.0f32; cols];
                    for_rows(table, ThreadPool::split(total, ith, nth), |p, r0, r1| {
                        for r in r0..r1 {
                            quant::dequantize_row(p.ty, &p.w[r * p.rb..(r + 1) * p.rb], &mut row)
                                .expect("validated");
                            for t in 0..n_tok {
                                let xs = &x[t * cols..(t + 1) * cols];
                                let v: f64 =
                                    row.iter().zip(xs).map(|(&a, &b)| a as f64 * b as f64).sum();
                                // SAFETY: each (t, r) is written by exactly one thread.
                                unsafe { p.y.write(t * p.rows + r, v as f32) };
                            }
                        }
                    });
                });
            }
        }
    }
}

/// Matrices over one input (`cols` wide), run as one job ([`Exec::run`]): a group of a
/// block's weights, and the low-rank halves its patches add.
pub(crate) struct Job<'a> {
    parts: [Part<'a>; MAX_PARTS],
    len: usize,
    cols: usize,
}

impl<'a> Job<'a> {
    pub(crate) fn new(cols: usize) -> Self {
        Job {
            parts: [Part::EMPTY; MAX_PARTS],
            len: 0,
            cols,
        }
    }

    /// Add `p` (with `cols` columns, like the others).
    pub(crate) fn push(&mut self, p: Part<'a>) {
        assert!(self.len < MAX_PARTS, "at most {MAX_PARTS} matrices per job");
        self.parts[self.len] = p;
        self.len += 1;
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn cols(&self) -> usize {
        self.cols
    }

    pub(crate) fn parts(&self) -> &[Part<'a>] {
        &self.parts[..self.len]
    }

    fn parts_mut(&mut self) -> &mut [Part<'a>] {
        &mut self.parts[..self.len]
    }

    /// Whether the quantized matrices pair with one activation format and one layout (the
    /// interleaved one of [`quant::has_tile_x8`] or the usual), so that the input is quantized
    /// once for all of them, and each runs its fastest kernel.
    pub(crate) fn one_format(&self) -> bool {
        let mut vt = self.parts().iter().filter(|p| !p.f32_act);
        match vt.next() {
            Some(first) => vt.all(|p| {
                p.ty.vec_dot_type() == first.ty.vec_dot_type()
                    && quant::has_tile_x8(p.ty) == quant::has_tile_x8(first.ty)
            }),
            None => true,
        }
    }
}

/// One matrix of a job, with its output (`[n_tok, rows]`) and its first row in the job's row
/// numbering.
#[derive(Clone, Copy)]
pub(crate) struct Part<'a> {
    w: &'a [u8],
    ty: GgmlType,
    /// F16 rows multiplied with the f32 input as it is (LoRA factors), not with a quantized copy.
    f32_act: bool,
    rb: usize,
    rows: usize,
    start: usize,
    y: SharedMut<f32>,
}

impl<'a> Part<'a> {
    pub(crate) const EMPTY: Part<'static> = Part {
        w: &[],
        ty: GgmlType::F32,
        f32_act: false,
        rb: 0,
        rows: 0,
        start: 0,
        y: SharedMut::from_ptr(std::ptr::null_mut()),
    };

    /// A weight of the model writing to `y` (`[n_tok, w.rows]`).
    pub(crate) fn weight(f: &'a GgufFile, w: &Weight, y: *mut f32) -> Self {
        Part {
            w: w.data(f),
            ty: w.ty,
            f32_act: false,
            rb: w.row_bytes(),
            rows: w.rows,
            start: 0,
            y: SharedMut::from_ptr(y),
        }
    }

    /// `rows` f16 rows of `cols` (`[cols, rows]`) multiplied with the f32 input, writing to `y`
    /// (`[n_tok, rows]`).
    pub(crate) fn f16_rows(w: &'a [half::f16], cols: usize, rows: usize, y: *mut f32) -> Self {
        debug_assert_eq!(w.len(), rows * cols);
        // SAFETY: f16 is two initialised bytes; u8 has alignment 1.
        let bytes = unsafe { std::slice::from_raw_parts(w.as_ptr() as *const u8, w.len() * 2) };
        Part {
            w: bytes,
            ty: GgmlType::F16,
            f32_act: true,
            rb: cols * 2,
            rows,
            start: 0,
            y: SharedMut::from_ptr(y),
        }
    }

    /// Rows of the matrix.
    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    /// Where the matrix writes its `[n_tok, rows]` output.
    pub(crate) fn out(&self) -> *mut f32 {
        self.y.ptr()
    }

    /// Rows `rows` of an f16 part against `n_tok` f32 input rows.
    fn dot_rows_f16(&self, rows: std::ops::Range<usize>, cols: usize, x: &[f32], n_tok: usize) {
        // SAFETY: built from a `&[f16]` by `f16_rows`.
        let w: &[half::f16] = unsafe {
            std::slice::from_raw_parts(self.w.as_ptr() as *const half::f16, self.w.len() / 2)
        };
        for r in rows {
            let wr = &w[r * cols..(r + 1) * cols];
            for t in 0..n_tok {
                let v = lethe_kernels::ops::dot_f16(&x[t * cols..(t + 1) * cols], wr);
                // SAFETY: each (t, r) is written by exactly one thread.
                unsafe { self.y.write(t * self.rows + r, v) };
            }
        }
    }

    /// Rows `rows` of this weight against `n_tok` quantized activation rows (`ab` bytes each;
    /// interleaved for `vec_dot_tile_x8` when `x8`).
    fn dot_rows(
        &self,
        rows: std::ops::Range<usize>,
        cols: usize,
        abuf: &[u8],
        ab: usize,
        x8: bool,
        n_tok: usize,
    ) {
        let (w, rb, ty) = (self.w, self.rb, self.ty);
        if x8 && n_tok == 1 {
            let n = rows.len();
            let wr = &w[rows.start * rb..rows.end * rb];
            // SAFETY: each row is written by exactly one thread.
            let y = unsafe { self.y.slice(rows.start, n) };
            quant::vec_dot_tile_x8(ty, cols, wr, rb, n, abuf, ab, 1, y, 1);
            return;
        }
        if n_tok == 1 {
            for r in rows {
                let v = quant::vec_dot(ty, cols, &w[r * rb..(r + 1) * rb], abuf);
                // SAFETY: each row is written by exactly one thread.
                unsafe { self.y.write(r, v) };
            }
            return;
        }
        // Prefill: a block of ROW_BLOCK weight rows and TOK_BLOCK activation rows stays in
        // cache while `vec_dot_tile` unpacks each weight block once for several tokens and
        // loads each activation block once for several weight rows.
        const ROW_BLOCK: usize = 16;
        const TOK_BLOCK: usize = 16;
        let mut out = [0f32; ROW_BLOCK * TOK_BLOCK];
        for r0 in rows.clone().step_by(ROW_BLOCK) {
            let nr = (rows.end - r0).min(ROW_BLOCK);
            let wr = &w[r0 * rb..(r0 + nr) * rb];
            for t0 in (0..n_tok).step_by(TOK_BLOCK) {
                let nt = (n_tok - t0).min(TOK_BLOCK);
                let a = &abuf[t0 * ab..(t0 + nt) * ab];
                if x8 {
                    quant::vec_dot_tile_x8(ty, cols, wr, rb, nr, a, ab, nt, &mut out, TOK_BLOCK);
                } else {
                    quant::vec_dot_tile(ty, cols, wr, rb, nr, a, ab, nt, &mut out, TOK_BLOCK);
                }
                // Token by token, so that the stores of one token's rows are consecutive.
                for k in 0..nt {
                    // SAFETY: each (t, r) is written by exactly one thread.
                    let y = unsafe { self.y.slice((t0 + k) * self.rows + r0, nr) };
                    for (i, o) in y.iter_mut().enumerate() {
                        *o = out[i * TOK_BLOCK + k];
                    }
                }
            }
        }
    }
}

/// Call `f(part, r0, r1)` for the local row ranges of each part that `range` (in the group's
/// row numbering) covers.
fn for_rows(parts: &[Part], range: std::ops::Range<usize>, mut f: impl FnMut(&Part, usize, usize)) {
    for p in parts {
        let lo = range.start.max(p.start);
        let hi = range.end.min(p.start + p.rows);
        if lo < hi {
            f(p, lo - p.start, hi - p.start);
        }
    }
}

/// Quantize one row to `vt`, interleaved ([`quant::quantize_row_x8`]) when `x8`.
fn quantize_row(vt: GgmlType, x8: bool, x: &[f32], dst: &mut [u8]) {
    if x8 {
        quant::quantize_row_x8(vt, x, dst)
    } else {
        quant::quantize_row(vt, x, dst)
    }
    .expect("row length checked at load")
}

/// Quantize `x` (`n` rows of `cols`) into `dst` in format `vt` (interleaved when `x8`), rows
/// split across threads.
fn quantize_rows(
    pool: &ThreadPool,
    vt: GgmlType,
    x8: bool,
    x: &[f32],
    cols: usize,
    dst: &mut [u8],
) {
    let n = x.len() / cols;
    let ab = if x8 {
        quant::x8_row_bytes(cols)
    } else {
        vt.row_bytes(cols)
    };
    assert!(dst.len() >= n * ab);
    let dst = SharedMut::new(dst);
    pool.for_chunks(n, 1, |_, ts| {
        for t in ts {
            // SAFETY: each row is claimed by one thread.
            let d = unsafe { dst.slice(t * ab, ab) };
            quantize_row(vt, x8, &x[t * cols..(t + 1) * cols], d);
        }
    });
}

impl Scratch {
    /// Where matrix `p` of a block reads its input and writes its output in the scratch,
    /// `(input, output)` (`[B, cols]` and `[B, rows]`): q/k/v and gate/up read the normed
    /// residual `xb`, o reads the attention `att`, down reads `hg` (the gated feed-forward);
    /// o and down both write `xb2`.
    pub(crate) fn io(&mut self, p: Proj) -> (&mut Vec<f32>, &mut Vec<f32>) {
        match p {
            Proj::Q => (&mut self.xb, &mut self.q),
            Proj::K => (&mut self.xb, &mut self.k),
            Proj::V => (&mut self.xb, &mut self.v),
            Proj::O => (&mut self.att, &mut self.xb2),
            Proj::Gate => (&mut self.xb, &mut self.hg),
            Proj::Up => (&mut self.xb, &mut self.hu),
            Proj::Down => (&mut self.hg, &mut self.xb2),
        }
    }

    /// The matmuls `projs` of block `il`, which share their input (q/k/v, o, gate/up or down),
    /// as one job over the `n` rows of the scratch ([`Scratch::io`]), with the deltas of the
    /// patches `ps` on the rows they cover ([`crate::patch::PatchSet::mm`]).
    pub(crate) fn mm(
        &mut self,
        m: &Model,
        ps: Option<RowPatches>,
        il: usize,
        projs: &[Proj],
        n: usize,
    ) {
        let l = &m.layers[il];
        let w = |p: Proj| {
            l.weight(p)
                .expect("the block's architecture has this matrix")
        };
        let cols = w(projs[0]).cols;
        let mut job = Job::new(cols);
        for &p in projs {
            let y = self.io(p).1.as_mut_ptr();
            job.push(Part::weight(&m.file, w(p), y));
        }
        let x = self.io(projs[0]).0.as_ptr();
        // SAFETY: the input holds `B >= n` rows of `cols`; it is none of the outputs, and
        // nothing writes it until the matmuls are done.
        let x = unsafe { std::slice::from_raw_parts(x, n * cols) };
        let mut ex = m.exec(&mut self.act, &mut self.patch_tmp);
        match ps {
            Some(ps) => ps.set.mm(&mut ex, il, projs, &mut job, x, n, ps.from),
            None => ex.run(&mut job, x, n),
        }
        for &p in projs {
            w(p).add_bias(self.io(p).1, n);
        }
    }
}
