//! Layer patches at run time, on the real models, checked against references computed here in
//! f64 from the dequantized weights: LoRA, control vectors and deltas at the matmul level and
//! through whole forward passes, their composition and scales, prefill against decode, patched
//! ULD assistants, and the refusals of bad files.
//!
//! Error budget. The base matmul quantizes its activations to 8 bits (Q8_1 for SmolLM2's Q4_1
//! blocks, Q8_0 for its Q8_0 head), so a whole output is compared with a bound of that
//! rounding; the patch's own contribution is computed in f32 from f32 activations, so the
//! patched-minus-unpatched difference is compared tightly with `s * dW x`.

mod common;

use common::{Rng, TempDir};

use common::model_path;
use lethe::generate::Decoder;
use lethe::model::{Model, Precision, Proj, WeightId};
use lethe::patch::{
    self as patchfile, write_cvec, write_delta, write_lora, DeltaEntry, LowRankEntry, Patch,
    PatchSet,
};
use lethe::unlearn::{Assistant, LockstepDecoder, ScoreRule, TermKind};
use lethe_kernels::quant::GgmlType;
use std::path::{Path, PathBuf};
use std::sync::Arc;

// ---------------------------------------------------------------------------------------------
// Helpers

fn open(name: &str) -> Model {
    Model::open(model_path(name), 2).unwrap()
}

fn open_exact(name: &str) -> Model {
    let mut m = open(name);
    m.precision = Precision::Exact;
    m
}

fn load(path: &Path, m: &Model) -> Arc<Patch> {
    Arc::new(patchfile::load(path, m).unwrap_or_else(|e| panic!("loading {}: {e}", path.display())))
}

fn set(m: &Model, parts: &[(Arc<Patch>, f32)]) -> Arc<PatchSet> {
    Arc::new(PatchSet::new(m, parts).unwrap())
}

fn low_rank(m: &Model, t: WeightId, rank: usize, std: f32, rng: &mut Rng) -> LowRankEntry {
    let (cols, rows) = m.target_shape(t).unwrap();
    LowRankEntry {
        base: t.tensor_name(),
        cols,
        rows,
        rank,
        a: rng.vec(rank * cols, std),
        b: rng.vec(rows * rank, std),
    }
}

/// Row `r` of `f * B A` in f64.
fn ba_row(e: &LowRankEntry, f: f64, r: usize, out: &mut [f64]) {
    out.fill(0.0);
    for k in 0..e.rank {
        let b = f * e.b[r * e.rank + k] as f64;
        for (o, &a) in out.iter_mut().zip(&e.a[k * e.cols..(k + 1) * e.cols]) {
            *o += b * a as f64;
        }
    }
}

/// A row of a dense `[rows, cols]` f32 matrix, scaled, in f64.
fn dense_row(d: &[f32], cols: usize, f: f64, r: usize, out: &mut [f64]) {
    for (o, &v) in out.iter_mut().zip(&d[r * cols..(r + 1) * cols]) {
        *o = f * v as f64;
    }
}

/// Bound of `|x - q(x)|` per element for the 8-bit block format `ty` the activations of a
/// matmul are rounded to (`d = amax / 127` with an f16 or f32 scale: at most `0.5 d` from the
/// rounding and `127 d 2^-11` from the scale); F16: one f16 rounding; F32: none.
fn act_err(ty: GgmlType, x: &[f32]) -> Vec<f64> {
    let block = match ty {
        GgmlType::F32 => return vec![0.0; x.len()],
        GgmlType::F16 => return x.iter().map(|v| v.abs() as f64 * 4.9e-4).collect(),
        GgmlType::Q8_K => 256,
        _ => 32,
    };
    let mut e = vec![0.0; x.len()];
    for (eb, xb) in e.chunks_mut(block).zip(x.chunks(block)) {
        let amax = xb.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64));
        eb.fill(0.6 * amax / 127.0);
    }
    e
}

/// The activations as the fast matmul rounds them, for ggml's 8-bit formats with an f16 block
/// scale (Q8_0, Q8_1: per 32 values `d = amax / 127`, `q = round(x / d)`, value `q f16(d)`);
/// `None` for the other formats.
fn q8_sim(ty: GgmlType, x: &[f32]) -> Option<Vec<f64>> {
    if !matches!(ty, GgmlType::Q8_0 | GgmlType::Q8_1) {
        return None;
    }
    let mut out = vec![0.0; x.len()];
    for (ob, xb) in out.chunks_mut(32).zip(x.chunks(32)) {
        let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let d16 = half::f16::from_f32(d).to_f32() as f64;
        for (o, &v) in ob.iter_mut().zip(xb) {
            *o = (v * id).round() as f64 * d16;
        }
    }
    Some(out)
}

/// `W x` and `dW x` in f64 for `n` tokens through the weight `t`, and `W q(x)` with what bounds
/// the error of lethe's fast matmul, `q` being the rounding of its 8-bit activations.
struct Reference {
    rows: usize,
    /// `W x`, `[n, rows]`.
    base: Vec<f64>,
    /// `W q(x)` where the test rounds as ggml does (Q8_0, Q8_1); `W x` otherwise.
    base_q: Vec<f64>,
    /// `dW x`, `[n, rows]` (`dW` as the closure gives it: already scaled).
    delta: Vec<f64>,
    /// `sum |W| |x|` and `sum |dW| |x|`: the scale of f32 rounding.
    mag_w: Vec<f64>,
    mag_d: Vec<f64>,
    /// A bound of `|fast W x - base_q|`: f32 sums, Q8_1's f16 block sums, one rounding tie
    /// resolved the other way; where the test does not round (Q8_K), a worst-case bound of
    /// the rounding itself.
    quant: Vec<f64>,
}

fn reference(
    m: &Model,
    t: WeightId,
    x: &[f32],
    n: usize,
    dw: &dyn Fn(usize, &mut [f64]),
) -> Reference {
    let (cols, rows) = m.target_shape(t).unwrap();
    let w = m.target_weight(t).unwrap();
    let vt = w.ty.vec_dot_type();
    let errs: Vec<Vec<f64>> = (0..n)
        .map(|i| act_err(vt, &x[i * cols..(i + 1) * cols]))
        .collect();
    let sims: Vec<Option<Vec<f64>>> = (0..n)
        .map(|i| q8_sim(vt, &x[i * cols..(i + 1) * cols]))
        .collect();
    let mut out = Reference {
        rows,
        base: vec![0.0; n * rows],
        base_q: vec![0.0; n * rows],
        delta: vec![0.0; n * rows],
        mag_w: vec![0.0; n * rows],
        mag_d: vec![0.0; n * rows],
        quant: vec![0.0; n * rows],
    };
    let mut row = vec![0.0f32; cols];
    let mut drow = vec![0.0f64; cols];
    for r in 0..rows {
        w.dequantize_row(&m.file, r, &mut row);
        dw(r, &mut drow);
        for i in 0..n {
            let xt = &x[i * cols..(i + 1) * cols];
            let (mut b, mut d, mut mw, mut md) = (0.0, 0.0, 0.0, 0.0);
            for c in 0..cols {
                let (wc, xc, dc) = (row[c] as f64, xt[c] as f64, drow[c]);
                b += wc * xc;
                d += dc * xc;
                mw += (wc * xc).abs();
                md += (dc * xc).abs();
            }
            let k = i * rows + r;
            out.base[k] = b;
            out.delta[k] = d;
            out.mag_w[k] = mw;
            out.mag_d[k] = md;
            match &sims[i] {
                Some(xq) => {
                    let mut bq = 0.0;
                    let (mut q16, mut tie) = (0.0f64, 0.0f64);
                    for (wb, (qb, eb)) in row.chunks(32).zip(xq.chunks(32).zip(errs[i].chunks(32)))
                    {
                        let wmax = wb.iter().fold(0.0f64, |a, v| a.max(v.abs() as f64));
                        let sq: f64 = qb.iter().sum();
                        bq += wb.iter().zip(qb).map(|(&w, &q)| w as f64 * q).sum::<f64>();
                        if vt == GgmlType::Q8_1 {
                            // The block sum `s = d sum q` is kept as f16: times the Q4_1 offset.
                            q16 += wmax * sq.abs() * 1e-3;
                        }
                        // `eb` is 0.6 d: one value rounded to the other side costs `d |w|`.
                        tie = tie.max(wmax * eb[0] / 0.6);
                    }
                    out.base_q[k] = bq;
                    out.quant[k] = 2e-6 * mw + q16 + 1.01 * tie;
                }
                None => {
                    // Per block: the weight (with a Q4_1-style offset, at most the block's
                    // largest magnitude) times the activation error.
                    let mut q = 0.0;
                    for (wb, eb) in row.chunks(32).zip(errs[i].chunks(32)) {
                        let wmax = wb.iter().fold(0.0f64, |a, v| a.max(v.abs() as f64));
                        let sw: f64 = wb.iter().map(|v| v.abs() as f64).sum();
                        q += (sw + wb.len() as f64 * wmax) * eb[0];
                    }
                    out.base_q[k] = b;
                    out.quant[k] = 2.0 * q + 2e-6 * mw;
                }
            }
        }
    }
    out
}

/// The largest `|got - want| / tol` and the largest `|got - want|`.
fn worst(got: &[f32], want: &[f64], tol: &dyn Fn(usize) -> f64) -> (f64, f64) {
    assert_eq!(got.len(), want.len());
    let mut ratio = 0.0f64;
    let mut abs = 0.0f64;
    for i in 0..got.len() {
        let e = (got[i] as f64 - want[i]).abs();
        assert!(e.is_finite(), "element {i}: {} vs {}", got[i], want[i]);
        ratio = ratio.max(e / tol(i));
        abs = abs.max(e);
    }
    (ratio, abs)
}

fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0.0, |m, x| m.max(x.abs()))
}

fn max_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .fold(0.0, f64::max)
}

fn max_diff_64(a: &[f32], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - y).abs())
        .fold(0.0, f64::max)
}

fn sub(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x - y).collect()
}

/// Check `apply_weight(t, x, n, set)` against `W x + dW x` (`dW` given row by row, scaled):
/// the patched-minus-unpatched difference tightly, the whole output within the 8-bit bound
/// (and tightly on the exact-precision model `mx`). Returns the worst relative error of the
/// difference, against `max |dW x|`.
#[allow(clippy::too_many_arguments)]
fn check_weight(
    m: &Model,
    mx: &Model,
    t: WeightId,
    x: &[f32],
    n: usize,
    ps: &PatchSet,
    dw: &dyn Fn(usize, &mut [f64]),
    // The patch's own rounding, relative to `sum |dW| |x|` (dense F16 and Q8_0 deltas
    // round their activations too).
    patch_rel: f64,
    // A low-rank patch with its factor: the fused path of a block's matmuls keeps `A` and `B`
    // as f16, so each may be off by 2^-11 relative; the budget of that is taken against
    // `|f| sum_k |B_rk| sum_c |A_kc x_c|`.
    lr: Option<(&LowRankEntry, f64)>,
    what: &str,
) -> f64 {
    let r = reference(m, t, x, n, dw);
    let mut lr_mag = vec![0.0f64; n * r.rows];
    if let Some((e, f)) = lr {
        for i in 0..n {
            let xt = &x[i * e.cols..(i + 1) * e.cols];
            let ax: Vec<f64> = (0..e.rank)
                .map(|k| {
                    let a = &e.a[k * e.cols..(k + 1) * e.cols];
                    a.iter()
                        .zip(xt)
                        .map(|(&a, &x)| (a as f64 * x as f64).abs())
                        .sum()
                })
                .collect();
            for row in 0..e.rows {
                let b = &e.b[row * e.rank..(row + 1) * e.rank];
                let m: f64 = b.iter().zip(&ax).map(|(&b, a)| (b as f64).abs() * a).sum();
                lr_mag[i * r.rows + row] = f.abs() * m;
            }
        }
    }
    let own = |i: usize| patch_rel * r.mag_d[i] + 1.1e-3 * lr_mag[i];
    let y0 = m.apply_weight(t, x, n, None).unwrap();
    let y1 = m.apply_weight(t, x, n, Some(ps)).unwrap();
    let yx = mx.apply_weight(t, x, n, Some(ps)).unwrap();
    assert_eq!(y1.len(), n * r.rows);
    let dmax = max_abs(&r.delta);
    assert!(
        dmax > 1e-2,
        "{what}: the patch hardly changes the output ({dmax})"
    );

    // The difference: the patch's part alone, from f32 activations.
    let diff = sub(&y1, &y0);
    let (ratio, abs) = worst(&diff, &r.delta, &|i| {
        own(i) + 2.4e-7 * (y1[i].abs() as f64) + 1e-30
    });
    assert!(
        ratio <= 1.0,
        "{what}: patched - unpatched is off s dW x by {abs:.3e} ({ratio:.2} of the budget)"
    );
    // The whole output, fast matmul: `W q(x) + dW x`.
    let whole_q: Vec<f64> = r.base_q.iter().zip(&r.delta).map(|(a, b)| a + b).collect();
    let (qr, qabs) = worst(&y1, &whole_q, &|i| r.quant[i] + own(i) + 1e-30);
    assert!(
        qr <= 1.0,
        "{what}: whole output off W q(x) + dW x by {qabs:.3e} ({qr:.2} of the budget)"
    );
    let whole: Vec<f64> = r.base.iter().zip(&r.delta).map(|(a, b)| a + b).collect();
    // The whole output, exact matmul: tight.
    // The exact model runs the low-rank delta in f32.
    let own_exact = |i: usize| patch_rel * r.mag_d[i] + 1e-5 * lr_mag[i];
    let (xr, xabs) = worst(&yx, &whole, &|i| 1e-5 * r.mag_w[i] + own_exact(i) + 1e-6);
    assert!(
        xr <= 1.0,
        "{what}: exact-precision output off by {xabs:.3e} ({xr:.2} of the budget)"
    );
    println!(
        "{what}: n={n} max|dW x|={dmax:.3} diff err={abs:.2e} (rel {:.1e}) whole fast err={qabs:.2e} \
         ({qr:.2} of budget; vs W x {:.2e}) exact err={xabs:.2e}",
        abs / dmax,
        max_diff_64(&y1, &whole)
    );
    abs / dmax
}

fn prompt_tokens(m: &Model, text: &str) -> Vec<u32> {
    let tok = lethe::tokenizer::Tokenizer::from_gguf(&m.file).unwrap();
    tok.encode(text, true, false)
}

const PROMPT: &str = "The capital of France is Paris, and the capital of Italy is";

// ---------------------------------------------------------------------------------------------
// 1. LoRA at the matmul level

/// `apply_weight` with a LoRA equals `(W + s alpha/rank B A) x` on every matrix of a block and
/// on the head, for one token and for prefill batches from 2 to 100 tokens: the sizes cover
/// the inline and the threaded paths of the low-rank code (the fused path of the blocks' fast
/// matmuls with f16 factors, the f32 path of the head and of the exact-precision model).
#[test]
fn lora_matches_the_dense_reference_on_every_matrix() {
    let (m, mx) = (open("smollm2"), open_exact("smollm2"));
    let dir = TempDir::new("lora-ref");
    let mut rng = Rng(11);
    let mut cases: Vec<(WeightId, usize, Option<f32>, f32)> = Proj::ALL
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            // Alpha present and absent, scales above and below 1 and negative.
            let alpha = [
                Some(16.0),
                None,
                Some(4.0),
                None,
                Some(8.0),
                Some(2.0),
                None,
            ][i];
            let scale = [0.7, 1.0, 1.6, -0.8, 0.5, 2.0, 1.2][i];
            (WeightId::Block(3, s), 8, alpha, scale)
        })
        .collect();
    cases.push((WeightId::Output, 4, Some(8.0), 0.9));
    let mut worst_rel = 0.0f64;
    for (i, (t, rank, alpha, s)) in cases.into_iter().enumerate() {
        let e = low_rank(&m, t, rank, 0.05, &mut rng);
        let path = dir.join(&format!("l{i}.gguf"));
        write_lora(&path, "llama", "test", alpha, std::slice::from_ref(&e)).unwrap();
        let p = load(&path, &m);
        assert_eq!(p.tensors.len(), 1);
        let ps = set(&m, &[(p, s)]);
        let f = s as f64 * alpha.map_or(1.0, |a| a as f64 / rank as f64);
        let ns: &[usize] = if t == WeightId::Output {
            &[1, 3]
        } else {
            &[1, 2, 17, 100]
        };
        for &n in ns {
            let x = rng.vec(n * e.cols, 1.0);
            let what = format!("{} rank {rank} alpha {alpha:?} s {s}", t.tensor_name());
            let rel = check_weight(
                &m,
                &mx,
                t,
                &x,
                n,
                &ps,
                &|r, o| ba_row(&e, f, r, o),
                1e-5,
                Some((&e, f)),
                &what,
            );
            worst_rel = worst_rel.max(rel);
        }
    }
    println!("worst diff error relative to max |dW x|: {worst_rel:.2e}");
}

/// Alpha: absent (or 0) means the scale alone; `alpha = rank` is the same; `2 rank` doubles the
/// change.
#[test]
fn lora_alpha_absent_means_the_scale_alone() {
    let m = open("smollm2");
    let dir = TempDir::new("alpha");
    let mut rng = Rng(12);
    let t = WeightId::Block(5, Proj::Up);
    let rank = 6;
    let e = low_rank(&m, t, rank, 0.05, &mut rng);
    let out = |alpha: Option<f32>, s: f32, x: &[f32]| {
        let path = dir.join(&format!("a{alpha:?}-{s}.gguf"));
        write_lora(&path, "llama", "alpha", alpha, std::slice::from_ref(&e)).unwrap();
        let ps = set(&m, &[(load(&path, &m), s)]);
        m.apply_weight(t, x, 2, Some(&ps)).unwrap()
    };
    let x = rng.vec(2 * e.cols, 1.0);
    let y0 = m.apply_weight(t, &x, 2, None).unwrap();
    let none = out(None, 1.0, &x);
    assert_eq!(none, out(Some(0.0), 1.0, &x), "alpha 0 is no alpha");
    assert_eq!(none, out(Some(rank as f32), 1.0, &x), "alpha = rank");
    let d1 = sub(&none, &y0);
    let d2 = sub(&out(Some(2.0 * rank as f32), 1.0, &x), &y0);
    let d3 = sub(&out(None, 2.0, &x), &y0);
    let want: Vec<f64> = d1.iter().map(|&v| 2.0 * v as f64).collect();
    let tol = |i: usize| 1.2e-6 * (1e-3 + y0[i].abs() as f64 + 2.0 * want[i].abs());
    assert!(worst(&d2, &want, &tol).0 <= 1.0, "alpha 2 rank doubles");
    assert!(worst(&d3, &want, &tol).0 <= 1.0, "scale 2 doubles");
    assert!(max_abs(&want) > 1e-2);
}

/// The LoRA of a gemma3 model (Q5_0, Q6_K, Q4_K weights with Q8_0 and Q8_K activations): the
/// patch's part is still `s B A x`.
#[test]
fn lora_on_gemma3_weights() {
    let (m, mx) = (open("gemma3"), open_exact("gemma3"));
    let dir = TempDir::new("gemma-lora");
    let mut rng = Rng(13);
    for (i, t) in [
        WeightId::Block(0, Proj::Q),
        WeightId::Block(0, Proj::Down),
        WeightId::Block(2, Proj::O),
        WeightId::Block(1, Proj::V),
    ]
    .into_iter()
    .enumerate()
    {
        let e = low_rank(&m, t, 8, 0.05, &mut rng);
        let path = dir.join(&format!("g{i}.gguf"));
        write_lora(&path, "gemma3", "g", Some(4.0), std::slice::from_ref(&e)).unwrap();
        let ps = set(&m, &[(load(&path, &m), 1.5)]);
        let f = 1.5 * 4.0 / 8.0;
        for n in [1, 5] {
            let x = rng.vec(n * e.cols, 1.0);
            check_weight(
                &m,
                &mx,
                t,
                &x,
                n,
                &ps,
                &|r, o| ba_row(&e, f, r, o),
                1e-5,
                Some((&e, f)),
                &format!("gemma3 {}", t.tensor_name()),
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Control vectors

/// `rmsnorm(x) * w` in f64.
fn rmsnorm64(x: &[f64], w: &[f32], eps: f32) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let s = 1.0 / (ms + eps as f64).sqrt();
    x.iter().zip(w).map(|(v, &g)| v * s * g as f64).collect()
}

/// A control vector on the last block, by hand: the unpatched final residual plus `s v`, the
/// final norm and the head (all in f64) give the patched forward's logits, at every position.
#[test]
fn control_vector_on_the_last_block_by_hand() {
    let dir = TempDir::new("cvec-last");
    let mut rng = Rng(21);
    for exact in [false, true] {
        let m = if exact {
            open_exact("smollm2")
        } else {
            open("smollm2")
        };
        let (e, nl) = (m.cfg.n_embd, m.cfg.n_layer);
        let tokens = prompt_tokens(&m, PROMPT);
        let n = tokens.len();
        let v = rng.vec(e, 0.5);
        let s = 1.5f32;
        let path = dir.join("last.gguf");
        write_cvec(&path, "llama", &[(nl - 1, v.clone())]).unwrap();
        let ps = set(&m, &[(load(&path, &m), s)]);

        let mut st = m.new_state(64);
        let x = m.residuals(&mut st, &tokens, nl).unwrap();
        assert_eq!(x.len(), n * e);
        let mut base = Vec::new();
        m.forward(&mut m.new_state(64), &tokens, Some(&mut base))
            .unwrap();

        let mut sp = m.new_state(64);
        m.attach_patches(&mut sp, Some(ps.clone())).unwrap();
        let mut got = Vec::new();
        m.forward(&mut sp, &tokens, Some(&mut got)).unwrap();
        let nv = m.cfg.n_vocab;
        assert_eq!(got.len(), n * nv);

        // By hand, in f64: h = x + s v, the final norm, the head.
        let mut hn = vec![0.0f32; n * e];
        let mut want = vec![0.0f64; n * nv];
        let mut mag = vec![0.0f64; n * nv];
        let mut row = vec![0.0f32; e];
        let mut hs = Vec::new();
        for t in 0..n {
            let h: Vec<f64> = (0..e)
                .map(|c| x[t * e + c] as f64 + s as f64 * v[c] as f64)
                .collect();
            let h = rmsnorm64(&h, &m.output_norm.w, m.cfg.norm_eps);
            for c in 0..e {
                hn[t * e + c] = h[c] as f32;
            }
            hs.push(h);
        }
        for r in 0..nv {
            m.output.dequantize_row(&m.file, r, &mut row);
            for t in 0..n {
                let (mut a, mut b) = (0.0, 0.0);
                for c in 0..e {
                    a += row[c] as f64 * hs[t][c];
                    b += (row[c] as f64 * hs[t][c]).abs();
                }
                want[t * nv + r] = a;
                mag[t * nv + r] = b;
            }
        }
        // The fast head rounds its input to Q8_0: compare with W q(h) there.
        let rq = reference(&m, WeightId::Output, &hn, n, &|_, o| o.fill(0.0));
        let (ratio, abs) = if exact {
            worst(&got, &want, &|i| 2e-5 * mag[i] + 1e-5)
        } else {
            worst(&got, &rq.base_q, &|i| rq.quant[i] + 1e-5)
        };
        assert!(
            ratio <= 1.0,
            "exact={exact}: patched logits off the by-hand ones by {abs:.3e} ({ratio:.2} of budget)"
        );
        // The same through the model's own norm and head, on the last position.
        let mut xn = vec![0.0f32; e];
        let hl: Vec<f32> = (0..e).map(|c| x[(n - 1) * e + c] + s * v[c]).collect();
        lethe_kernels::ops::rmsnorm(&mut xn, &hl, &m.output_norm.w, m.cfg.norm_eps);
        let head = m.apply_weight(WeightId::Output, &xn, 1, None).unwrap();
        let last = &got[(n - 1) * nv..];
        let d_head = max_diff(&head, last);
        assert!(d_head < 1e-4, "norm + head by the model's API: {d_head}");
        let change = max_diff(&got, &base);
        assert!(change > 0.5, "the vector changes the logits ({change})");
        println!(
            "cvec on block {}: exact={exact} logits err vs f64 by hand {abs:.2e} ({ratio:.2} of \
             budget); via apply_weight {d_head:.1e}; change vs base {change:.2}",
            nl - 1
        );
    }
}

/// A control vector on a middle block `N` is added to that block's output: the residual at the
/// input of block `N + 1` moves by exactly `s v` (all positions), the input of block `N` does not
/// move, and block `N + 1` responds to it.
#[test]
fn control_vector_on_a_middle_block_shifts_its_output() {
    let m = open("smollm2");
    let dir = TempDir::new("cvec-mid");
    let mut rng = Rng(22);
    let e = m.cfg.n_embd;
    let tokens = prompt_tokens(&m, PROMPT);
    let n = tokens.len();
    let nb = 11;
    let (v1, v2) = (rng.vec(e, 0.3), rng.vec(e, 0.3));
    let (p1, p2) = (dir.join("v1.gguf"), dir.join("v2.gguf"));
    // Two files, both on block nb; the second also on another block.
    write_cvec(&p1, "llama", &[(nb, v1.clone())]).unwrap();
    write_cvec(&p2, "llama", &[(nb, v2.clone()), (20, rng.vec(e, 0.3))]).unwrap();
    let (s1, s2) = (1.25f32, -0.75f32);
    let ps = set(&m, &[(load(&p1, &m), s1), (load(&p2, &m), s2)]);

    let mut base = m.new_state(64);
    let mut pat = m.new_state(64);
    m.attach_patches(&mut pat, Some(ps)).unwrap();
    let b_in = m.residuals(&mut base, &tokens, nb).unwrap();
    let p_in = m.residuals(&mut pat, &tokens, nb).unwrap();
    assert_eq!(b_in, p_in, "the input of block {nb} is untouched");
    let b_out = m.residuals(&mut base, &tokens, nb + 1).unwrap();
    let p_out = m.residuals(&mut pat, &tokens, nb + 1).unwrap();
    let want: Vec<f64> = (0..n * e)
        .map(|i| b_out[i] as f64 + s1 as f64 * v1[i % e] as f64 + s2 as f64 * v2[i % e] as f64)
        .collect();
    let (ratio, abs) = worst(&p_out, &want, &|i| 3e-7 * (want[i].abs() + 1.0));
    assert!(
        ratio <= 1.0,
        "block {nb}'s output moved by s1 v1 + s2 v2: off by {abs:.2e}"
    );
    // Block nb + 1 responds: its output differs from the base by more than the vector.
    let b_next = m.residuals(&mut base, &tokens, nb + 2).unwrap();
    let p_next = m.residuals(&mut pat, &tokens, nb + 2).unwrap();
    let shifted: Vec<f64> = (0..n * e)
        .map(|i| b_next[i] as f64 + s1 as f64 * v1[i % e] as f64 + s2 as f64 * v2[i % e] as f64)
        .collect();
    let (_, resp) = worst(&p_next, &shifted, &|_| 1.0);
    assert!(
        resp > 1e-2,
        "block {} responds to the shift ({resp})",
        nb + 1
    );
    println!(
        "cvec on block {nb}: output shift off s v by {abs:.2e}; block {} response {resp:.3}",
        nb + 1
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Deltas

/// Dense deltas (F32, F16, Q8_0) against the f64 reference of their f32 values.
#[test]
fn dense_deltas_match_the_reference() {
    let (m, mx) = (open("smollm2"), open_exact("smollm2"));
    let dir = TempDir::new("dense");
    let mut rng = Rng(31);
    for (i, (t, ty, s)) in [
        (WeightId::Block(4, Proj::Gate), GgmlType::F32, 1.0f32),
        (WeightId::Block(4, Proj::Down), GgmlType::F32, -0.6),
        (WeightId::Block(4, Proj::Gate), GgmlType::F16, 0.8),
        (WeightId::Block(6, Proj::K), GgmlType::F16, 1.3),
        (WeightId::Block(4, Proj::Down), GgmlType::Q8_0, 1.0),
        (WeightId::Block(6, Proj::O), GgmlType::Q8_0, -1.5),
    ]
    .into_iter()
    .enumerate()
    {
        let (cols, rows) = m.target_shape(t).unwrap();
        let data = rng.vec(cols * rows, 0.02);
        let path = dir.join(&format!("d{i}.gguf"));
        let entry = DeltaEntry::Dense {
            base: t.tensor_name(),
            cols,
            rows,
            ty,
            data: data.clone(),
        };
        write_delta(&path, "llama", "dense", &[entry]).unwrap();
        let ps = set(&m, &[(load(&path, &m), s)]);
        // F16: the delta and the activations are rounded to f16 (2^-11 each); Q8_0: 8-bit
        // blocks of both, at most 0.6/127 of a block's largest magnitude each, which for
        // normal data is within 0.03 of sum |dW| |x|.
        let rel = match ty {
            GgmlType::F32 => 1e-5,
            GgmlType::F16 => 1.2e-3,
            _ => 4e-2,
        };
        for n in [1, 6] {
            let x = rng.vec(n * cols, 1.0);
            check_weight(
                &m,
                &mx,
                t,
                &x,
                n,
                &ps,
                &|r, o| dense_row(&data, cols, s as f64, r, o),
                rel,
                None,
                &format!("dense {ty} {}", t.tensor_name()),
            );
        }
    }
}

/// A sparse delta, and the same values as a dense F32 delta: the same outputs, both equal to
/// the reference; and through a whole forward pass.
#[test]
fn sparse_delta_equals_the_dense_f32_delta() {
    let (m, mx) = (open("smollm2"), open_exact("smollm2"));
    let dir = TempDir::new("sparse");
    let mut rng = Rng(32);
    let t = WeightId::Block(8, Proj::V);
    let (cols, rows) = m.target_shape(t).unwrap();
    let mut dense = vec![0.0f32; cols * rows];
    let (mut idx, mut val) = (Vec::new(), Vec::new());
    while idx.len() < 3000 {
        let i = rng.below(cols * rows);
        if dense[i] == 0.0 {
            let v = 0.3 * rng.normal();
            dense[i] = v;
            idx.push(i as i32);
            val.push(v);
        }
    }
    let (ps_path, pd_path) = (dir.join("sparse.gguf"), dir.join("dense.gguf"));
    write_delta(
        &ps_path,
        "llama",
        "sparse",
        &[DeltaEntry::Sparse {
            base: t.tensor_name(),
            idx,
            val,
        }],
    )
    .unwrap();
    write_delta(
        &pd_path,
        "llama",
        "dense",
        &[DeltaEntry::Dense {
            base: t.tensor_name(),
            cols,
            rows,
            ty: GgmlType::F32,
            data: dense.clone(),
        }],
    )
    .unwrap();
    let s = 0.9f32;
    let (sp, dp) = (load(&ps_path, &m), load(&pd_path, &m));
    assert!(
        sp.tensors[0].form().starts_with("sparse 3000"),
        "{}",
        sp.tensors[0].form()
    );
    let (ss, ds) = (set(&m, &[(sp, s)]), set(&m, &[(dp, s)]));
    for n in [1, 7] {
        let x = rng.vec(n * cols, 1.0);
        let f = |r: usize, o: &mut [f64]| dense_row(&dense, cols, s as f64, r, o);
        check_weight(
            &m,
            &mx,
            t,
            &x,
            n,
            &ss,
            &f,
            1e-5,
            None,
            "sparse blk.8.attn_v",
        );
        let a = m.apply_weight(t, &x, n, Some(&ss)).unwrap();
        let b = m.apply_weight(t, &x, n, Some(&ds)).unwrap();
        let d = max_diff(&a, &b);
        assert!(d < 1e-5, "sparse vs dense F32: {d}");
    }
    // Through a whole forward pass with exact matmuls: the two forms add the same values in
    // another order (1e-7 relative). With 8-bit activations such a difference is not a
    // tolerance to check: SmolLM2's residual stream holds an outsized activation (~2e4 at the
    // attention sink), which sets the quantization step of its 32-value block to ~165, so a
    // difference of 1e-4 can move a neighbour by one step and grow from there (measured: the
    // residual after block 8 differs by 8.5e-5, after block 29 by 3.3 of 2666, the logits by
    // ~1). The fast path is checked weight by weight above.
    let tokens = prompt_tokens(&mx, PROMPT);
    let (sx, dx) = (load(&ps_path, &mx), load(&pd_path, &mx));
    let (ssx, dsx) = (set(&mx, &[(sx, s)]), set(&mx, &[(dx, s)]));
    let logits = |ps: &Arc<PatchSet>| {
        let mut st = mx.new_state(64);
        mx.attach_patches(&mut st, Some(ps.clone())).unwrap();
        mx.forward(&mut st, &tokens, None).unwrap().to_vec()
    };
    let mut st = mx.new_state(64);
    let base = mx.forward(&mut st, &tokens, None).unwrap().to_vec();
    let (a, b) = (logits(&ssx), logits(&dsx));
    let d = max_diff(&a, &b);
    assert!(d < 1e-3, "forward: sparse vs dense {d}");
    assert!(max_diff(&a, &base) > 1e-2, "the delta changes the logits");
    println!("sparse vs dense F32 forward (exact matmuls): max logit diff {d:.2e}");
}

/// A low-rank delta is a LoRA without alpha: the same outputs, bit for bit.
#[test]
fn low_rank_delta_equals_a_lora_without_alpha() {
    let m = open("smollm2");
    let dir = TempDir::new("lowrank");
    let mut rng = Rng(33);
    let entries: Vec<LowRankEntry> = [
        WeightId::Block(1, Proj::Q),
        WeightId::Block(9, Proj::Down),
        WeightId::Output,
    ]
    .into_iter()
    .map(|t| low_rank(&m, t, 5, 0.05, &mut rng))
    .collect();
    let (pl, pd) = (dir.join("lora.gguf"), dir.join("delta.gguf"));
    write_lora(&pl, "llama", "l", None, &entries).unwrap();
    let d: Vec<DeltaEntry> = entries.iter().cloned().map(DeltaEntry::LowRank).collect();
    write_delta(&pd, "llama", "d", &d).unwrap();
    let (lora, delta) = (load(&pl, &m), load(&pd, &m));
    assert_eq!(delta.kind, lethe::patch::PatchKind::Delta);
    assert_eq!(lora.kind, lethe::patch::PatchKind::Lora);
    let (sl, sd) = (set(&m, &[(lora, 0.8)]), set(&m, &[(delta, 0.8)]));
    for e in &entries {
        let t = WeightId::parse(&e.base).unwrap();
        let x = rng.vec(3 * e.cols, 1.0);
        assert_eq!(
            m.apply_weight(t, &x, 3, Some(&sl)).unwrap(),
            m.apply_weight(t, &x, 3, Some(&sd)).unwrap(),
            "{}",
            e.base
        );
    }
    let tokens = prompt_tokens(&m, PROMPT);
    let run = |ps: &Arc<PatchSet>| {
        let mut st = m.new_state(64);
        m.attach_patches(&mut st, Some(ps.clone())).unwrap();
        m.forward(&mut st, &tokens, None).unwrap().to_vec()
    };
    assert_eq!(run(&sl), run(&sd));
}

/// An embedding delta on tied SmolLM2 changes the lookup, not the head: the head's output is
/// bit-identical with and without it, and a prompt without the changed tokens gives the base
/// logits bit for bit.
#[test]
fn embedding_delta_changes_the_lookup_not_the_head() {
    let m = open("smollm2");
    assert!(
        m.file.tensor("output.weight").is_none(),
        "SmolLM2 ties its head to the embedding"
    );
    let dir = TempDir::new("embd");
    let mut rng = Rng(34);
    let e = m.cfg.n_embd;
    let changed = [504u32, 2365];
    let (mut idx, mut val) = (Vec::new(), Vec::new());
    for &tok in &changed {
        for c in 0..e {
            idx.push((tok as usize * e + c) as i32);
            val.push(0.05 * rng.normal());
        }
    }
    let path = dir.join("embd.gguf");
    write_delta(
        &path,
        "llama",
        "embd",
        &[DeltaEntry::Sparse {
            base: "token_embd.weight".into(),
            idx,
            val: val.clone(),
        }],
    )
    .unwrap();
    let s = 1.5f32;
    let ps = set(&m, &[(load(&path, &m), s)]);

    // The lookup.
    let ids: Vec<f32> = [504u32, 17, 2365, 504].iter().map(|&t| t as f32).collect();
    let y0 = m.apply_weight(WeightId::Embd, &ids, 4, None).unwrap();
    let y1 = m.apply_weight(WeightId::Embd, &ids, 4, Some(&ps)).unwrap();
    assert_eq!(
        (y0.len(), y1.len()),
        (4 * e, 4 * e),
        "a row of n_embd per token"
    );
    for (i, &tok) in [504u32, 17, 2365, 504].iter().enumerate() {
        let k = changed.iter().position(|&c| c == tok);
        for c in 0..e {
            let want = y0[i * e + c] as f64 + k.map_or(0.0, |k| s as f64 * val[k * e + c] as f64);
            let got = y1[i * e + c] as f64;
            assert!(
                (got - want).abs() <= 3e-7 * (want.abs() + 1.0),
                "token {tok} col {c}: {got} vs {want} (base {})",
                y0[i * e + c]
            );
        }
    }
    // The head: untouched.
    let x = rng.vec(2 * e, 1.0);
    assert_eq!(
        m.apply_weight(WeightId::Output, &x, 2, Some(&ps)).unwrap(),
        m.apply_weight(WeightId::Output, &x, 2, None).unwrap()
    );
    // Through the model: the residual at block 0's input, and the logits.
    let tokens = [1u32, 504, 330, 2365];
    let mut b = m.new_state(64);
    let mut p = m.new_state(64);
    m.attach_patches(&mut p, Some(ps.clone())).unwrap();
    let r0 = m.residuals(&mut b, &tokens, 0).unwrap();
    let r1 = m.residuals(&mut p, &tokens, 0).unwrap();
    assert!(
        max_diff(&r0[..e], &r1[..e]) == 0.0,
        "token 1 is not changed"
    );
    assert!(
        max_diff(&r0[e..2 * e], &r1[e..2 * e]) > 1e-2,
        "token 504 is"
    );
    let other = prompt_tokens(&m, "Rivers flow into the sea");
    assert!(other.iter().all(|t| !changed.contains(t)));
    let lb = m
        .forward(&mut m.new_state(64), &other, None)
        .unwrap()
        .to_vec();
    let mut p2 = m.new_state(64);
    m.attach_patches(&mut p2, Some(ps)).unwrap();
    let lp = m.forward(&mut p2, &other, None).unwrap().to_vec();
    assert_eq!(lb, lp, "the head (tied embedding) is not patched");
    p2.reset();
    let lp = m.forward(&mut p2, &tokens, None).unwrap().to_vec();
    let lb = m
        .forward(&mut m.new_state(64), &tokens, None)
        .unwrap()
        .to_vec();
    assert!(
        max_diff(&lb, &lp) > 1e-2,
        "the lookup change reaches the logits"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Composition and scales

/// Several patches on one weight add up; scale 2 doubles the change, a negative scale negates
/// it.
#[test]
fn patches_compose_as_a_sum_and_scale_linearly() {
    let m = open("smollm2");
    let dir = TempDir::new("compose");
    let mut rng = Rng(41);
    let t = WeightId::Block(3, Proj::Q);
    let (cols, rows) = m.target_shape(t).unwrap();
    let e = low_rank(&m, t, 8, 0.05, &mut rng);
    let dense = rng.vec(cols * rows, 0.02);
    let (pl, pd) = (dir.join("l.gguf"), dir.join("d.gguf"));
    write_lora(&pl, "llama", "l", Some(4.0), std::slice::from_ref(&e)).unwrap();
    write_delta(
        &pd,
        "llama",
        "d",
        &[DeltaEntry::Dense {
            base: t.tensor_name(),
            cols,
            rows,
            ty: GgmlType::F32,
            data: dense,
        }],
    )
    .unwrap();
    let (l, d) = (load(&pl, &m), load(&pd, &m));
    let n = 5;
    let x = rng.vec(n * cols, 1.0);
    let y0 = m.apply_weight(t, &x, n, None).unwrap();
    let diff = |parts: &[(Arc<Patch>, f32)]| {
        let ps = set(&m, parts);
        sub(&m.apply_weight(t, &x, n, Some(&ps)).unwrap(), &y0)
    };
    let dl = diff(&[(l.clone(), 0.5)]);
    let dd = diff(&[(d.clone(), -1.25)]);
    let both = diff(&[(l.clone(), 0.5), (d.clone(), -1.25)]);
    let sum: Vec<f64> = dl
        .iter()
        .zip(&dd)
        .map(|(a, b)| *a as f64 + *b as f64)
        .collect();
    // Each output is `y0 + change` rounded to f32: an ulp of the larger of the two.
    let tol = |i: usize| 1.2e-6 * (1e-3 + y0[i].abs() as f64 + 2.0 * sum[i].abs());
    let (r, abs) = worst(&both, &sum, &tol);
    assert!(r <= 1.0, "two patches: {abs:.2e} off the sum");
    let twice: Vec<f64> = dl.iter().map(|&v| 2.0 * v as f64).collect();
    assert!(
        worst(&diff(&[(l.clone(), 1.0)]), &twice, &tol).0 <= 1.0,
        "scale 1 = 2 x scale 0.5"
    );
    let neg: Vec<f64> = dl.iter().map(|&v| -(v as f64)).collect();
    assert!(
        worst(&diff(&[(l.clone(), -0.5)]), &neg, &tol).0 <= 1.0,
        "scale -0.5"
    );
    // The same patch twice is the patch at the summed scale.
    let (r2, _) = worst(&diff(&[(l.clone(), 0.5), (l.clone(), 0.5)]), &twice, &tol);
    assert!(r2 <= 1.0, "a patch listed twice");
    assert!(max_abs(&sum) > 1e-2);
    println!("composition: sum off by {abs:.2e}");
}

/// Scale 0 leaves the patch out: an empty set, the plain model bit for bit.
#[test]
fn scale_zero_is_the_base_model() {
    let m = open("smollm2");
    let dir = TempDir::new("zero");
    let mut rng = Rng(42);
    let e = low_rank(&m, WeightId::Block(2, Proj::Up), 8, 0.05, &mut rng);
    let (pl, pc) = (dir.join("l.gguf"), dir.join("c.gguf"));
    write_lora(&pl, "llama", "l", None, &[e]).unwrap();
    write_cvec(&pc, "llama", &[(5, rng.vec(m.cfg.n_embd, 1.0))]).unwrap();
    let (l, c) = (load(&pl, &m), load(&pc, &m));
    let zero = PatchSet::new(&m, &[(l.clone(), 0.0), (c.clone(), 0.0)]).unwrap();
    assert!(zero.is_empty());
    assert!(zero.parts.is_empty());
    let one = PatchSet::new(&m, &[(l.clone(), 0.0), (c.clone(), 1.0)]).unwrap();
    assert!(!one.is_empty());
    assert_eq!(one.parts.len(), 1, "only the nonzero scale is kept");
    assert!(Arc::ptr_eq(&one.parts[0].0, &c));

    let tokens = prompt_tokens(&m, PROMPT);
    let mut all_base = Vec::new();
    m.forward(&mut m.new_state(64), &tokens, Some(&mut all_base))
        .unwrap();
    let mut st = m.new_state(64);
    m.attach_patches(&mut st, Some(Arc::new(zero))).unwrap();
    assert!(st.patches().is_none(), "an empty set is no set");
    let mut all = Vec::new();
    m.forward(&mut st, &tokens, Some(&mut all)).unwrap();
    assert_eq!(all, all_base, "scale 0 is bit-identical to the base");
    // A nonzero scale changes them (the test above can fail).
    let mut st = m.new_state(64);
    m.attach_patches(&mut st, Some(Arc::new(one))).unwrap();
    let mut all1 = Vec::new();
    m.forward(&mut st, &tokens, Some(&mut all1)).unwrap();
    assert!(max_diff(&all1, &all_base) > 1e-2);
    let x = rng.vec(576, 1.0);
    let t = WeightId::Block(2, Proj::Up);
    let zs = PatchSet::new(&m, &[(l, 0.0)]).unwrap();
    assert_eq!(
        m.apply_weight(t, &x, 1, Some(&zs)).unwrap(),
        m.apply_weight(t, &x, 1, None).unwrap()
    );
    // Non-finite scales are refused.
    let err = PatchSet::new(&m, &[(c, f32::NAN)])
        .err()
        .expect("NaN scale refused");
    assert!(err.to_string().contains("scale must be finite"), "{err}");
}

/// `attach_patches` with another set empties the state's cache; the same set (or none again)
/// keeps it; a set built for another model is refused.
#[test]
fn attaching_other_patches_resets_the_cache() {
    let m = open("smollm2");
    let dir = TempDir::new("attach");
    let mut rng = Rng(43);
    let pc = dir.join("c.gguf");
    write_cvec(&pc, "llama", &[(5, rng.vec(m.cfg.n_embd, 1.0))]).unwrap();
    let c = load(&pc, &m);
    let (a, b) = (set(&m, &[(c.clone(), 1.0)]), set(&m, &[(c.clone(), 2.0)]));
    let tokens = prompt_tokens(&m, PROMPT);
    let n = tokens.len();
    let mut st = m.new_state(64);
    m.forward(&mut st, &tokens, None).unwrap();
    assert_eq!(st.pos, n);
    m.attach_patches(&mut st, None).unwrap();
    assert_eq!(st.pos, n, "none to none keeps the cache");
    m.attach_patches(&mut st, Some(a.clone())).unwrap();
    assert_eq!(st.pos, 0, "none to a set resets");
    m.forward(&mut st, &tokens, None).unwrap();
    m.attach_patches(&mut st, Some(a.clone())).unwrap();
    assert_eq!(st.pos, n, "the same set keeps the cache");
    m.attach_patches(&mut st, Some(b.clone())).unwrap();
    assert_eq!(st.pos, 0, "another set resets");
    m.forward(&mut st, &tokens, None).unwrap();
    m.attach_patches(&mut st, None).unwrap();
    assert_eq!(st.pos, 0, "a set to none resets");
    // Decoding after a switch gives the logits of the new set, not a mix with the old cache.
    m.attach_patches(&mut st, Some(a.clone())).unwrap();
    m.forward(&mut st, &tokens, None).unwrap();
    m.attach_patches(&mut st, Some(b.clone())).unwrap();
    let after = m.forward(&mut st, &tokens, None).unwrap().to_vec();
    let mut fresh = m.new_state(64);
    m.attach_patches(&mut fresh, Some(b)).unwrap();
    assert_eq!(
        after,
        m.forward(&mut fresh, &tokens, None).unwrap().to_vec()
    );

    // A set for gemma3 does not attach to SmolLM2.
    let g = open("gemma3");
    let gp = dir.join("g.gguf");
    write_cvec(&gp, "gemma3", &[(3, rng.vec(g.cfg.n_embd, 1.0))]).unwrap();
    let gs = set(&g, &[(load(&gp, &g), 1.0)]);
    let err = m
        .attach_patches(&mut st, Some(gs.clone()))
        .expect_err("refused");
    assert!(err.to_string().contains("other shapes"), "{err}");
    let err = m
        .apply_weight(WeightId::Block(0, Proj::Q), &vec![0.0; 576], 1, Some(&gs))
        .expect_err("refused");
    assert!(err.to_string().contains("other shapes"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// 5. Forward: prefill equals decode with patches

/// All logits of a prefill and of a token-by-token decode of the same prompt, with `ps`.
fn prefill_and_decode(m: &Model, ps: &Arc<PatchSet>, tokens: &[u32]) -> (Vec<f32>, Vec<f32>) {
    let nv = m.cfg.n_vocab;
    let mut st = m.new_state(tokens.len() + 8);
    m.attach_patches(&mut st, Some(ps.clone())).unwrap();
    let mut pre = Vec::new();
    m.forward(&mut st, tokens, Some(&mut pre)).unwrap();
    let mut st = m.new_state(tokens.len() + 8);
    m.attach_patches(&mut st, Some(ps.clone())).unwrap();
    let mut dec = Vec::with_capacity(tokens.len() * nv);
    for &t in tokens {
        dec.extend_from_slice(m.forward(&mut st, &[t], None).unwrap());
    }
    (pre, dec)
}

/// SmolLM2 with every kind of patch at once (LoRA on blocks and head, control vectors, dense,
/// sparse and embedding deltas): prefill (chunked past 128 tokens) equals decode.
#[test]
fn prefill_equals_decode_with_patches() {
    let m = open("smollm2");
    let dir = TempDir::new("prefill");
    let mut rng = Rng(51);
    let mut lora = Vec::new();
    for b in 0..4 {
        for s in [Proj::Q, Proj::V, Proj::Down, Proj::Gate] {
            lora.push(low_rank(&m, WeightId::Block(b, s), 16, 0.03, &mut rng));
        }
    }
    lora.push(low_rank(&m, WeightId::Output, 4, 0.03, &mut rng));
    let e = m.cfg.n_embd;
    let t_sp = WeightId::Block(10, Proj::Gate);
    let (c_sp, r_sp) = m.target_shape(t_sp).unwrap();
    let mut idx: Vec<i32> = (0..500).map(|_| rng.below(c_sp * r_sp) as i32).collect();
    idx.sort_unstable();
    idx.dedup();
    let val = rng.vec(idx.len(), 0.3);
    let t_d = WeightId::Block(12, Proj::O);
    let (c_d, r_d) = m.target_shape(t_d).unwrap();
    let paths: Vec<PathBuf> = ["l", "c", "d"]
        .iter()
        .map(|n| dir.join(&format!("{n}.gguf")))
        .collect();
    write_lora(&paths[0], "llama", "l", Some(32.0), &lora).unwrap();
    write_cvec(
        &paths[1],
        "llama",
        &[
            (3, rng.vec(e, 0.3)),
            (15, rng.vec(e, 0.3)),
            (29, rng.vec(e, 0.3)),
        ],
    )
    .unwrap();
    let text = "The capital of France is Paris. ".repeat(3)
        + &"Rivers flow into the sea, and the sea gives back the rain. ".repeat(12);
    let tokens = prompt_tokens(&m, &text);
    assert!(
        tokens.len() > 130,
        "{} tokens: past one chunk",
        tokens.len()
    );
    // The embedding delta changes two tokens of the prompt.
    let mut embd_idx = Vec::new();
    for tok in [tokens[3] as usize, tokens[40] as usize] {
        embd_idx.extend((0..e).map(|c| (tok * e + c) as i32));
    }
    write_delta(
        &paths[2],
        "llama",
        "d",
        &[
            DeltaEntry::Sparse {
                base: t_sp.tensor_name(),
                idx,
                val,
            },
            DeltaEntry::Dense {
                base: t_d.tensor_name(),
                cols: c_d,
                rows: r_d,
                ty: GgmlType::Q8_0,
                data: rng.vec(c_d * r_d, 0.02),
            },
            DeltaEntry::Sparse {
                base: "token_embd.weight".into(),
                val: rng.vec(embd_idx.len(), 0.05),
                idx: embd_idx,
            },
        ],
    )
    .unwrap();
    let ps = set(
        &m,
        &[
            (load(&paths[0], &m), 0.8),
            (load(&paths[1], &m), 1.2),
            (load(&paths[2], &m), -1.0),
        ],
    );
    let (pre, dec) = prefill_and_decode(&m, &ps, &tokens);
    let d = max_diff(&pre, &dec);
    let nv = m.cfg.n_vocab;
    let last = max_diff(&pre[pre.len() - nv..], &dec[dec.len() - nv..]);
    assert!(d < 2e-3, "prefill vs decode with patches: {d}");
    let mut base = Vec::new();
    m.forward(&mut m.new_state(tokens.len()), &tokens, Some(&mut base))
        .unwrap();
    let change = max_diff(&pre, &base);
    assert!(change > 0.1, "the patches change the logits ({change})");
    println!(
        "smollm2 prefill vs decode, {} tokens: max diff {d:.2e} (last position {last:.2e}); change vs base {change:.2}",
        tokens.len()
    );
}

/// gemma3: a LoRA on a few matrices and a control vector: prefill equals decode, and the
/// logits change.
#[test]
fn prefill_equals_decode_with_patches_on_gemma3() {
    let m = open("gemma3");
    let dir = TempDir::new("gemma-prefill");
    let mut rng = Rng(52);
    let lora: Vec<LowRankEntry> = [
        WeightId::Block(1, Proj::Q),
        WeightId::Block(4, Proj::Down),
        WeightId::Block(9, Proj::V),
        WeightId::Block(5, Proj::Up),
    ]
    .into_iter()
    .map(|t| low_rank(&m, t, 8, 0.05, &mut rng))
    .collect();
    let (pl, pc) = (dir.join("l.gguf"), dir.join("c.gguf"));
    write_lora(&pl, "gemma3", "l", Some(8.0), &lora).unwrap();
    let e = m.cfg.n_embd;
    write_cvec(
        &pc,
        "gemma3",
        &[(3, rng.vec(e, 2.0)), (10, rng.vec(e, 2.0))],
    )
    .unwrap();
    let ps = set(&m, &[(load(&pl, &m), 1.0), (load(&pc, &m), 1.0)]);
    let tokens = prompt_tokens(&m, PROMPT);
    let (pre, dec) = prefill_and_decode(&m, &ps, &tokens);
    let d = max_diff(&pre, &dec);
    assert!(d < 2e-3, "gemma3 prefill vs decode with patches: {d}");
    let mut base = Vec::new();
    m.forward(&mut m.new_state(64), &tokens, Some(&mut base))
        .unwrap();
    let change = max_diff(&pre, &base);
    assert!(
        change > 0.1,
        "the patches change gemma3's logits ({change})"
    );
    println!("gemma3 prefill vs decode: max diff {d:.2e}; change vs base {change:.2}");
}

// ---------------------------------------------------------------------------------------------
// 6. Patched ULD assistants

/// With a patched assistant, the lockstep output is `l_T - alpha l_A'` on the plausible set,
/// where `l_A'` is the patched assistant's full forward (the sparse head applies the head's
/// LoRA and delta on the set's rows only); with the filter off, it is the dense combination
/// of the same logits.
#[test]
fn lockstep_uses_the_patched_assistant() {
    let target = Arc::new(open("smollm2"));
    let dir = TempDir::new("uld");
    let ap = dir.join("assistant.gguf");
    lethe::forge::truncate_model(&target.file, 8, &ap).unwrap();
    let file = Arc::new(lethe::gguf::GgufFile::open(&ap).unwrap());
    let am = Arc::new(Model::from_file(file, target.pool.clone()).unwrap());
    assert_eq!(am.cfg.n_layer, 8);
    let mut rng = Rng(61);
    let lora: Vec<LowRankEntry> = [
        WeightId::Block(2, Proj::V),
        WeightId::Block(6, Proj::Up),
        WeightId::Output,
    ]
    .into_iter()
    .map(|t| low_rank(&am, t, 4, 0.05, &mut rng))
    .collect();
    let (pl, pc, pd) = (dir.join("l.gguf"), dir.join("c.gguf"), dir.join("d.gguf"));
    write_lora(&pl, "llama", "l", None, &lora).unwrap();
    write_cvec(&pc, "llama", &[(5, rng.vec(am.cfg.n_embd, 0.5))]).unwrap();
    // A sparse delta on the head's rows.
    let e = am.cfg.n_embd;
    let idx: Vec<i32> = (0..4000)
        .map(|_| rng.below(e * am.cfg.n_vocab) as i32)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    write_delta(
        &pd,
        "llama",
        "d",
        &[DeltaEntry::Sparse {
            base: "output.weight".into(),
            val: rng.vec(idx.len(), 1.0),
            idx,
        }],
    )
    .unwrap();
    let ps = set(
        &am,
        &[
            (load(&pl, &am), 1.0),
            (load(&pc, &am), 1.0),
            (load(&pd, &am), 1.0),
        ],
    );
    // A set built for the target does not go on the assistant (other shapes).
    let wrong = Assistant {
        model: am.clone(),
        kind: TermKind::Uld,
        weight: -0.5,
        filter: 0.05,
        reference: None,
        patches: Some(set(&target, &[(load(&pl, &target), 1.0)])),
        score: ScoreRule::Mass,
    };
    match LockstepDecoder::new(target.clone(), vec![wrong], 64) {
        Err(e) => assert!(e.to_string().contains("other shapes"), "{e}"),
        Ok(_) => panic!("a target's patch set attached to the assistant"),
    }
    let alpha = 0.6f32;
    let tokens = prompt_tokens(&target, PROMPT);
    let steps = [5u32, 330, 2365];
    for filter in [0.05f32, 0.0] {
        let a = Assistant {
            model: am.clone(),
            kind: TermKind::Uld,
            weight: -alpha,
            filter,
            reference: None,
            patches: Some(ps.clone()),
            score: ScoreRule::Mass,
        };
        let mut uld = LockstepDecoder::new(target.clone(), vec![a], 128).unwrap();
        let (mut ts, mut sa, mut su) =
            (target.new_state(128), am.new_state(128), am.new_state(128));
        am.attach_patches(&mut sa, Some(ps.clone())).unwrap();
        let mut fed: Vec<&[u32]> = vec![&tokens];
        fed.extend(steps.iter().map(std::slice::from_ref));
        for chunk in fed {
            let out = uld.feed(chunk).unwrap().to_vec();
            let tl = target.forward(&mut ts, chunk, None).unwrap().to_vec();
            let al = am.forward(&mut sa, chunk, None).unwrap().to_vec();
            let au = am.forward(&mut su, chunk, None).unwrap().to_vec();
            if filter > 0.0 {
                let set_n = out.iter().filter(|v| v.is_finite()).count();
                assert!(set_n >= 1 && set_n < out.len() / 2, "{set_n} plausible");
                let (mut err, mut moved) = (0.0f64, 0.0f64);
                for j in 0..out.len() {
                    if !out[j].is_finite() {
                        continue;
                    }
                    let want = tl[j] as f64 - alpha as f64 * al[j] as f64;
                    err = err.max((out[j] as f64 - want).abs() / (1.0 + want.abs()));
                    moved = moved.max((al[j] as f64 - au[j] as f64).abs());
                }
                assert!(err < 1e-5, "sparse ULD with a patched assistant: {err}");
                assert!(
                    moved > 1e-2,
                    "the patches change the assistant on the set ({moved})"
                );
                println!("uld sparse: max rel err {err:.1e} over {set_n} tokens; patch moves l_A by {moved:.2}");
            } else {
                let term = lethe::unlearn::Term {
                    kind: TermKind::Uld,
                    weight: -alpha,
                    logits: &al,
                    reference: None,
                    filter: 0.0,
                    score: ScoreRule::Mass,
                };
                let mut want = Vec::new();
                lethe::unlearn::combine(&tl, &[term], lethe::unlearn::Use::Sample, &mut want);
                assert_eq!(out, want, "dense ULD with a patched assistant");
            }
        }
    }
}

/// `forward_rows` (ULD's sparse head) with head patches of every form equals `forward`.
#[test]
fn forward_rows_applies_head_patches() {
    let m = open("smollm2");
    let dir = TempDir::new("rows");
    let mut rng = Rng(62);
    let (e, nv) = (m.cfg.n_embd, m.cfg.n_vocab);
    let lr = low_rank(&m, WeightId::Output, 3, 0.05, &mut rng);
    let idx: Vec<i32> = (0..2000)
        .map(|_| rng.below(e * nv) as i32)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    // One form per tensor in a file: the low-rank and the sparse head deltas in two files.
    let (p1, p2, p3) = (dir.join("a.gguf"), dir.join("b.gguf"), dir.join("c.gguf"));
    write_delta(&p1, "llama", "d", &[DeltaEntry::LowRank(lr)]).unwrap();
    let sparse = DeltaEntry::Sparse {
        base: "output.weight".into(),
        val: rng.vec(idx.len(), 1.0),
        idx,
    };
    write_delta(&p3, "llama", "d", &[sparse]).unwrap();
    // A dense Q8_0 head delta (49152 x 576).
    write_delta(
        &p2,
        "llama",
        "dense head",
        &[DeltaEntry::Dense {
            base: "output.weight".into(),
            cols: e,
            rows: nv,
            ty: GgmlType::Q8_0,
            data: rng.vec(e * nv, 0.02),
        }],
    )
    .unwrap();
    let tokens = prompt_tokens(&m, PROMPT);
    let rows: Vec<u32> = (0..nv as u32).filter(|r| r % 5 == 1 || *r < 3).collect();
    for parts in [
        vec![(load(&p1, &m), 1.0f32)],
        vec![(load(&p3, &m), 1.0f32)],
        vec![(load(&p2, &m), -0.7)],
        vec![
            (load(&p1, &m), 0.5),
            (load(&p2, &m), 1.0),
            (load(&p3, &m), -2.0),
        ],
    ] {
        let ps = set(&m, &parts);
        let mut a = m.new_state(64);
        m.attach_patches(&mut a, Some(ps.clone())).unwrap();
        let full = m.forward(&mut a, &tokens, None).unwrap().to_vec();
        let mut b = m.new_state(64);
        m.attach_patches(&mut b, Some(ps.clone())).unwrap();
        let mut part = vec![0.0; rows.len()];
        m.forward_rows(&mut b, &tokens, &rows, &mut part).unwrap();
        let mut err = 0.0f64;
        for (i, &r) in rows.iter().enumerate() {
            err = err.max((part[i] - full[r as usize]).abs() as f64);
        }
        assert!(
            err < 1e-4,
            "forward_rows vs forward with head patches: {err}"
        );
        let base = m
            .forward(&mut m.new_state(64), &tokens, None)
            .unwrap()
            .to_vec();
        assert!(max_diff(&full, &base) > 1e-2);
    }
}
