//! Activations. The slice forms run a polynomial `exp` that the compiler vectorises (inside an
//! AVX2+FMA copy of the loop where the CPU has it); the scalar forms are their references.

#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_C: f32 = 0.044_715;

/// GELU, tanh approximation (gemma's `gelu_pytorch_tanh`).
#[inline]
pub fn gelu_tanh(x: f32) -> f32 {
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + GELU_C * x * x)).tanh())
}

/// `e^x` for f32 without a libm call: range reduction by `ln 2` and a degree-6 polynomial,
/// within 2 ulp over the whole range; underflows to 0 and saturates to `inf` like `expf`.
#[inline(always)]
pub fn exp_fast(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Round to nearest with the 1.5 * 2^23 trick (vectorises without SSE4.1's roundps).
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-104.0, 88.7);
    let n = (x * LOG2E + MAGIC) - MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    // e^r on [-ln2/2, ln2/2]: Taylor terms to r^6.
    let p = 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    // Scale by 2^n in two steps so n down to -150 still gives subnormals.
    let n = n as i32;
    let n1 = n / 2;
    let n2 = n - n1;
    let s1 = f32::from_bits(((n1 + 127).max(0) as u32) << 23);
    let s2 = f32::from_bits(((n2 + 127).max(0) as u32) << 23);
    p * s1 * s2
}

#[inline(always)]
fn silu_mul_loop(g: &mut [f32], u: &[f32]) {
    for (a, &b) in g.iter_mut().zip(u) {
        let x = *a;
        *a = x / (1.0 + exp_fast(-x)) * b;
    }
}

#[inline(always)]
fn gelu_tanh_mul_loop(g: &mut [f32], u: &[f32]) {
    // 0.5 x (1 + tanh(z)) = x / (1 + e^(-2z))
    for (a, &b) in g.iter_mut().zip(u) {
        let x = *a;
        let z = SQRT_2_OVER_PI * x * (1.0 + GELU_C * x * x);
        *a = x / (1.0 + exp_fast(-2.0 * z)) * b;
    }
}

#[inline(always)]
fn gelu_tanh_loop(x: &mut [f32]) {
    for a in x.iter_mut() {
        let v = *a;
        let z = SQRT_2_OVER_PI * v * (1.0 + GELU_C * v * v);
        *a = v / (1.0 + exp_fast(-2.0 * z));
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_tanh_avx2(x: &mut [f32]) {
    gelu_tanh_loop(x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_avx2(g: &mut [f32], u: &[f32]) {
    silu_mul_loop(g, u)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_tanh_mul_avx2(g: &mut [f32], u: &[f32]) {
    gelu_tanh_mul_loop(g, u)
}

fn use_avx2() -> bool {
    crate::cpu::isa() != crate::cpu::Isa::Scalar
}

/// `g = silu(g) * u` (SwiGLU).
pub fn silu_mul(g: &mut [f32], u: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: AVX2 and FMA are present (isa() is at least Avx2).
        return unsafe { silu_mul_avx2(g, u) };
    }
    silu_mul_loop(g, u)
}

/// `x = gelu_tanh(x)` (phi2's ungated feed-forward).
pub fn gelu_tanh_inplace(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: AVX2 and FMA are present (isa() is at least Avx2).
        return unsafe { gelu_tanh_avx2(x) };
    }
    gelu_tanh_loop(x)
}

/// `g = gelu_tanh(g) * u` (GeGLU).
pub fn gelu_tanh_mul(g: &mut [f32], u: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: AVX2 and FMA are present (isa() is at least Avx2).
        return unsafe { gelu_tanh_mul_avx2(g, u) };
    }
    gelu_tanh_mul_loop(g, u)
}
