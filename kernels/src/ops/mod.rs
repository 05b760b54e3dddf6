//! Small ops of the forward pass: norms, rotary embeddings, softmax, activations, and the
//! attention inner loops over an F16 KV cache. Plain loops the compiler vectorises; each has
//! an f64 reference in the tests.

mod act;
mod attn;
mod norm;
mod rope;

pub use act::{exp_fast, gelu_tanh, gelu_tanh_inplace, gelu_tanh_mul, silu, silu_mul};
pub use attn::{
    attend_group, attend_group_scalar, axpy_f16, dot_f16, f16_to_f32_slice, f32_to_f16_slice,
    GROUP_MAX,
};
pub use norm::{layernorm, layernorm_inplace, rmsnorm, rmsnorm_inplace};
pub use rope::{rope_inplace, RopeKind, RopeTable};

/// Numerically stable softmax in place.
pub fn softmax_inplace(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// `log_softmax` of a logit row, in f64 for accuracy: returns (max, log-sum-exp).
pub fn logsumexp(x: &[f32]) -> f64 {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let s: f64 = x.iter().map(|&v| (v as f64 - max).exp()).sum();
    max + s.ln()
}

pub fn add_inplace(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

pub fn scale_inplace(x: &mut [f32], s: f32) {
    for a in x.iter_mut() {
        *a *= s;
    }
}
