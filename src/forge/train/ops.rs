//! Element-wise and per-row ops with their backward passes: RMSNorm with a frozen weight,
//! rotary embeddings, SwiGLU. Backward functions add their input gradients to `dx`
//! (`+=`), so gradients from several paths (the residual stream) sum in place.

use lethe_kernels::ops::{self as kops, RopeTable};

/// `out[t] = x[t] * rstd[t] * w` for the `n` rows of `x` (`[n, e]`, `e = w.len()`), with
/// `rstd[t] = 1 / sqrt(mean(x[t]^2) + eps)` kept for the backward pass (`[n]`). The same
/// arithmetic as the inference kernel (sum of squares in f64), so the outputs match it bit
/// for bit.
pub fn rmsnorm_forward(x: &[f32], w: &[f32], eps: f32, out: &mut [f32], rstd: &mut [f32]) {
    let e = w.len();
    for ((xr, or), r) in x.chunks_exact(e).zip(out.chunks_exact_mut(e)).zip(rstd) {
        let ss: f64 = xr.iter().map(|&v| v as f64 * v as f64).sum();
        let s = 1.0 / ((ss / e as f64) as f32 + eps).sqrt();
        *r = s;
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(w) {
            *o = v * s * g;
        }
    }
}

/// Backward of [`rmsnorm_forward`]: with `r = rstd[t]`, `g = w * dy[t]`,
/// `dx[t] += r * (g - x[t] * r^2 * mean(g * x[t]))`. `x`, `dy`, `dx`: `[n, e]`.
pub fn rmsnorm_backward(x: &[f32], w: &[f32], rstd: &[f32], dy: &[f32], dx: &mut [f32]) {
    let e = w.len();
    for (((xr, dyr), dxr), &r) in x
        .chunks_exact(e)
        .zip(dy.chunks_exact(e))
        .zip(dx.chunks_exact_mut(e))
        .zip(rstd)
    {
        let dot: f64 = xr
            .iter()
            .zip(dyr)
            .zip(w)
            .map(|((&v, &d), &g)| v as f64 * d as f64 * g as f64)
            .sum();
        let c = (dot / e as f64) as f32 * r * r;
        for (((o, &v), &d), &g) in dxr.iter_mut().zip(xr).zip(dyr).zip(w) {
            *o += r * (g * d - v * c);
        }
    }
}

/// Rotate each of the `n` rows of `x` (`[n, n_heads * head_dim]`, row `t` at position
/// `pos0 + t`) in place: the inference pass's own kernel.
pub fn rope_forward(table: &RopeTable, x: &mut [f32], n: usize, head_dim: usize, pos0: usize) {
    rope_rows(table, x, n, head_dim, pos0, 1.0);
}

/// Backward of [`rope_forward`], in place: a rotation's transpose is the rotation by
/// `-theta`, so `dx = R(-theta) dy`. `dy`: `[n, n_heads * head_dim]`.
pub fn rope_backward(table: &RopeTable, dy: &mut [f32], n: usize, head_dim: usize, pos0: usize) {
    rope_rows(table, dy, n, head_dim, pos0, -1.0);
}

fn rope_rows(table: &RopeTable, x: &mut [f32], n: usize, hd: usize, pos0: usize, sign: f32) {
    if n == 0 {
        return;
    }
    let width = x.len() / n;
    let mut cs = vec![0f32; table.n_rot]; // [n_rot]: cos at 2i, sin at 2i+1
    for (t, row) in x.chunks_exact_mut(width).enumerate() {
        table.fill(pos0 + t, &mut cs);
        for s in cs.iter_mut().skip(1).step_by(2) {
            *s *= sign;
        }
        kops::rope_inplace(table.kind, row, hd, table.n_rot, &cs);
    }
}

/// `h = silu(g) * u` element-wise (`[n, n_ff]` each), with the inference pass's kernel.
pub fn swiglu_forward(g: &[f32], u: &[f32], h: &mut [f32]) {
    h.copy_from_slice(g);
    kops::silu_mul(h, u);
}

/// Backward of [`swiglu_forward`]: `dg += dh * u * silu'(g)`, `du += dh * silu(g)`, with
/// `silu'(g) = sigmoid(g) * (1 + g * (1 - sigmoid(g)))`.
pub fn swiglu_backward(g: &[f32], u: &[f32], dh: &[f32], dg: &mut [f32], du: &mut [f32]) {
    for i in 0..g.len() {
        let x = g[i];
        let sig = 1.0 / (1.0 + (-x).exp());
        let silu = x * sig;
        dg[i] += dh[i] * u[i] * sig * (1.0 + x * (1.0 - sig));
        du[i] += dh[i] * silu;
    }
}
