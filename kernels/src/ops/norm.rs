/// RMSNorm: `out = x / sqrt(mean(x^2) + eps) * w`. The sum runs in f64 like ggml's (ggml_float).
pub fn rmsnorm(out: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
    debug_assert_eq!(out.len(), x.len());
    debug_assert_eq!(w.len(), x.len());
    let ss: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
    let scale = 1.0 / ((ss / x.len() as f64) as f32 + eps).sqrt();
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = v * scale * g;
    }
}

pub fn rmsnorm_inplace(x: &mut [f32], w: &[f32], eps: f32) {
    let ss: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
    let scale = 1.0 / ((ss / x.len() as f64) as f32 + eps).sqrt();
    for (v, &g) in x.iter_mut().zip(w) {
        *v = *v * scale * g;
    }
}

/// LayerNorm: `out = (x - mean(x)) / sqrt(var(x) + eps) * w + b` (phi2). Mean and variance are
/// summed in f64 like ggml's `ggml_norm`.
pub fn layernorm(out: &mut [f32], x: &[f32], w: &[f32], b: &[f32], eps: f32) {
    debug_assert_eq!(out.len(), x.len());
    debug_assert_eq!(w.len(), x.len());
    debug_assert_eq!(b.len(), x.len());
    let (mean, scale) = layernorm_stats(x, eps);
    for (((o, &v), &g), &c) in out.iter_mut().zip(x).zip(w).zip(b) {
        *o = (v - mean) * scale * g + c;
    }
}

/// [`layernorm`] in place.
pub fn layernorm_inplace(x: &mut [f32], w: &[f32], b: &[f32], eps: f32) {
    let (mean, scale) = layernorm_stats(x, eps);
    for ((v, &g), &c) in x.iter_mut().zip(w).zip(b) {
        *v = (*v - mean) * scale * g + c;
    }
}

/// `(mean(x), 1 / sqrt(var(x) + eps))`, the sums in f64.
fn layernorm_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f64;
    let mean = (x.iter().map(|&v| v as f64).sum::<f64>() / n) as f32;
    let var: f64 = x.iter().map(|&v| ((v - mean) as f64).powi(2)).sum::<f64>() / n;
    (mean, 1.0 / (var as f32 + eps).sqrt())
}
