//! A block's matmuls with a patch set's deltas: low-rank deltas fused into the weights' own
//! job, dense and sparse ones after it.

use super::{Change, PatchSet};
use crate::model::matmul::{Job, Part, MAX_PARTS};
use crate::model::{Exec, Precision, Proj, WeightId};
use crate::pool::{SharedMut, ThreadPool};
use half::f16;

impl PatchSet {
    /// Block `il`'s matrices `projs` (the parts of `job`, in that order) over `x` (`[n, cols]`)
    /// with this set's deltas of them on rows `from..n` (the rows before are another model's
    /// in a shared step, and get the weights alone). Low-rank deltas are fused into the same
    /// job: their `A x` rows are computed beside the weights' rows (for every row: `rank`
    /// rows more of the job), then `B (A x)` is added to rows `from..` by one more job over
    /// the output rows. Dense and sparse deltas follow, one by one. Each row gets the same
    /// numbers whatever `from` and `n` are.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn mm<'a>(
        &'a self,
        ex: &mut Exec,
        il: usize,
        projs: &[Proj],
        job: &mut Job<'a>,
        x: &[f32],
        n: usize,
        from: usize,
    ) {
        let fused = ex.precision == Precision::Fast && job.one_format() && {
            let low_rank = |p: &Proj| {
                let items = &self.blocks[il].projs[*p as usize];
                items.iter().filter(|a| a.f16.is_some()).count()
            };
            let n_low_rank: usize = projs.iter().map(low_rank).sum();
            n_low_rank > 0 && job.len() + n_low_rank <= MAX_PARTS
        };
        let second = fused.then(|| self.first_halves(ex.tmp, il, projs, job, n));
        ex.run(job, x, n);
        if let Some(second) = second {
            second.add(ex.pool, ex.tmp, from..n);
        }
        // The deltas the job did not take.
        let (cols, m) = (job.cols(), n - from);
        for (&p, part) in projs.iter().zip(job.parts()) {
            if !self.has_proj(il, p) {
                continue;
            }
            // SAFETY: the part's output holds `n` rows for this call alone.
            let y = unsafe { std::slice::from_raw_parts_mut(part.out(), n * part.rows()) };
            let (x, y) = (&x[from * cols..n * cols], &mut y[from * part.rows()..]);
            for a in self.deltas(WeightId::Block(il, p)) {
                if !(fused && a.f16.is_some()) {
                    a.delta().apply(ex, a.scale, x, m, y);
                }
            }
        }
    }

    /// Add to `job` the first halves of the low-rank deltas of its matrices `projs`, `t_i =
    /// A_i x` (`[n, rank]` each, into `tmp`), as more rows of the same job; returns their
    /// second halves.
    fn first_halves<'a>(
        &'a self,
        tmp: &mut [f32],
        il: usize,
        projs: &[Proj],
        job: &mut Job<'a>,
        n: usize,
    ) -> SecondHalves<'a> {
        let tmp = tmp.as_mut_ptr();
        let mut s = SecondHalves {
            items: [None; MAX_PARTS],
            rows: 0,
        };
        let (mut k, mut off) = (0, 0);
        for (i, &p) in projs.iter().enumerate() {
            let (y, rows) = (job.parts()[i].out(), job.parts()[i].rows());
            for a in &self.blocks[il].projs[p as usize] {
                let (Some((a16, bt16)), Change::LowRank { rank, .. }) = (&a.f16, &a.delta().change)
                else {
                    continue;
                };
                // SAFETY: the scratch holds MAX_BATCH * (sum of the block's ranks) floats.
                job.push(Part::f16_rows(a16, job.cols(), *rank, unsafe {
                    tmp.add(off)
                }));
                s.items[k] = Some(Second {
                    y: SharedMut::from_ptr(y),
                    rows,
                    rank: *rank,
                    bt: bt16,
                    scale: a.scale * a.delta().scale,
                    off,
                    start: s.rows,
                });
                off += n * rank;
                s.rows += rows;
                k += 1;
            }
        }
        s
    }
}

/// A low-rank delta's second half in the fused path: `y[t] += s * B t_i[t]`.
#[derive(Clone, Copy)]
struct Second<'a> {
    y: SharedMut<f32>,
    rows: usize,
    rank: usize,
    bt: &'a [f16],
    scale: f32,
    /// Offset of `t_i` (`[n, rank]`) in the scratch.
    off: usize,
    /// First row in the second halves' row numbering.
    start: usize,
}

/// The second halves of the low-rank deltas fused into a job.
struct SecondHalves<'a> {
    items: [Option<Second<'a>>; MAX_PARTS],
    /// Their output rows, all together.
    rows: usize,
}

impl SecondHalves<'_> {
    /// `y[t] += s * B t_i[t]` for each and the tokens `ts`, `t_i` in `tmp`, over the output
    /// rows of all of them.
    fn add(&self, pool: &ThreadPool, tmp: &[f32], ts: std::ops::Range<usize>) {
        let second = &self.items;
        let rows_total = self.rows;
        let add = |r0: usize, r1: usize| {
            for s2 in second.iter().flatten() {
                let (lo, hi) = (r0.max(s2.start), r1.min(s2.start + s2.rows));
                if lo >= hi {
                    continue;
                }
                let (lo, hi) = (lo - s2.start, hi - s2.start);
                for t in ts.clone() {
                    // SAFETY: rows lo..hi of token t belong to this call alone.
                    let y = unsafe { s2.y.slice(t * s2.rows + lo, hi - lo) };
                    for kk in 0..s2.rank {
                        let c = s2.scale * tmp[s2.off + t * s2.rank + kk];
                        let b = &s2.bt[kk * s2.rows + lo..kk * s2.rows + hi];
                        lethe_kernels::ops::axpy_f16(y, c, b);
                    }
                }
            }
        };
        let n = ts.len();
        let work: usize = second.iter().flatten().map(|s| s.rows * s.rank * n).sum();
        if work < 1 << 14 {
            add(0, rows_total);
        } else {
            pool.for_chunks(rows_total, 128, |_, r| add(r.start, r.end));
        }
    }
}
