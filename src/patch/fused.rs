//! A block's matmuls with the attached patches: low-rank deltas fused into the weights' own
//! job, dense and sparse ones after it; control vectors after the block.

use super::{axpy, Change, PatchSet, SendPtr};
use crate::model::matmul::{Part, MAX_PARTS};
use crate::model::{Layer, Model, Precision, Proj, Scratch, Weight, WeightId};
use half::f16;
use std::sync::atomic::{AtomicUsize, Ordering};

fn weight(l: &Layer, s: Proj) -> &Weight {
    match s {
        Proj::Q => &l.wq,
        Proj::K => &l.wk,
        Proj::V => &l.wv,
        Proj::O => &l.wo,
        Proj::Gate => &l.w_gate,
        Proj::Up => &l.w_up,
        Proj::Down => &l.w_down,
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

impl Scratch {
    /// The matmuls `slots` of block `il` (which share their input: q/k/v, o, gate/up or down)
    /// with the attached patches' deltas. Low-rank deltas are fused into the same job: their
    /// `A x` rows are computed beside the weights' rows, then `B (A x)` is added by one more
    /// job over the output rows.
    pub(crate) fn mm(
        &mut self,
        m: &Model,
        ps: Option<&PatchSet>,
        il: usize,
        slots: &[Proj],
        n: usize,
    ) {
        let l = &m.layers[il];
        let (f, p) = (&*m.file, m.precision);
        debug_assert!(slots.len() <= 3);
        let mut outs = [std::ptr::null_mut::<f32>(); 3];
        for (o, &s) in outs.iter_mut().zip(slots) {
            *o = match s {
                Proj::Q => self.q.as_mut_ptr(),
                Proj::K => self.k.as_mut_ptr(),
                Proj::V => self.v.as_mut_ptr(),
                Proj::O | Proj::Down => self.xb2.as_mut_ptr(),
                Proj::Gate => self.hg.as_mut_ptr(),
                Proj::Up => self.hu.as_mut_ptr(),
            };
        }
        let x: &[f32] = match slots[0] {
            Proj::O => &self.att,
            Proj::Down => &self.hg,
            _ => &self.xb,
        };
        let cols = weight(l, slots[0]).cols;
        let vt = weight(l, slots[0]).ty.vec_dot_type();
        let same_vt = slots.iter().all(|&s| weight(l, s).ty.vec_dot_type() == vt);
        let fused = same_vt
            && p == Precision::Fast
            && ps.is_some_and(|ps| {
                let low_rank = |s: &Proj| {
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
                let mut ex = m.exec(&mut self.act, &mut self.patch_tmp);
                ex.run_parts(&mut table[..1], cols, x, n);
            }
        } else {
            for (&s, &y) in slots.iter().zip(&outs) {
                table[k] = Part::weight(f, weight(l, s), y);
                k += 1;
            }
        }
        let Some(ps) = ps.filter(|_| fused) else {
            if same_vt {
                let mut ex = m.exec(&mut self.act, &mut self.patch_tmp);
                ex.run_parts(&mut table[..k], cols, x, n);
            }
            if let Some(ps) = ps {
                self.patch_block(m, ps, il, slots, n);
            }
            return;
        };
        // The first halves, `t_i = A_i x` (`[n, rank]` each, in the scratch), as more rows of
        // the same job.
        let mut ex = m.exec(&mut self.act, &mut self.patch_tmp);
        let tmp = ex.tmp.as_mut_ptr();
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
        ex.run_parts(&mut table[..k], cols, x, n);
        let second = &second[..k];
        let tmp = &*ex.tmp;
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
            ex.pool.run_dynamic(&job);
        }
        // Dense and sparse deltas, one by one.
        for (&s, &y) in slots.iter().zip(&outs) {
            if !ps.has_slot(il, s) {
                continue;
            }
            let rows = weight(l, s).rows;
            // SAFETY: `y` is the slot's output buffer, at least n * rows long.
            let y = unsafe { std::slice::from_raw_parts_mut(y, n * rows) };
            ps.apply_some(&mut ex, WeightId::Block(il, s), x, n, y, true);
        }
    }

    /// Add the attached patches' deltas of block `il` to the outputs of the matmuls `slots`,
    /// just after the base matmuls wrote them.
    fn patch_block(&mut self, m: &Model, ps: &PatchSet, il: usize, slots: &[Proj], n: usize) {
        for &slot in slots {
            if !ps.has_slot(il, slot) {
                continue;
            }
            let (x, y): (&[f32], &mut [f32]) = match slot {
                Proj::Q => (&self.xb, &mut self.q),
                Proj::K => (&self.xb, &mut self.k),
                Proj::V => (&self.xb, &mut self.v),
                Proj::O => (&self.att, &mut self.xb2),
                Proj::Gate => (&self.xb, &mut self.hg),
                Proj::Up => (&self.xb, &mut self.hu),
                Proj::Down => (&self.hg, &mut self.xb2),
            };
            let mut ex = m.exec(&mut self.act, &mut self.patch_tmp);
            ps.apply(&mut ex, WeightId::Block(il, slot), x, n, y);
        }
    }

    /// Add the control vector of block `il` (if any) to the residual stream of `n` tokens.
    pub(crate) fn add_cvec(&mut self, ps: Option<&PatchSet>, il: usize, n: usize) {
        let Some(v) = ps.and_then(|ps| ps.cvec(il)) else {
            return;
        };
        let e = v.len();
        for x in self.x[..n * e].chunks_exact_mut(e) {
            axpy(x, 1.0, v);
        }
    }
}
