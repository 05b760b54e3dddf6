//! x86-64 kernels for the legacy block formats (declared from `legacy.rs`).
//!
//! Dot products exist in two builds of the same source (see `dot_kernels!`): `avx2`
//! (AVX2 + FMA + F16C, `vpmaddubsw`/`vpmaddwd`) and `vnni` (adds AVX-512 F/BW/VL/VNNI on 256-bit
//! vectors: `vpdpbusd` and byte masks for the fifth bit). Each block's integer dot product is
//! converted to f32 and accumulated with FMA into float vectors, two blocks per iteration.
//!
//! All loads are unaligned; callers check bounds and CPU features.

#![allow(clippy::missing_safety_doc)]

use super::inv;
use core::arch::x86_64::*;

macro_rules! dot_kernels {
    ($name:ident, $feat:literal, $vnni:literal) => {
        pub mod $name {
            use crate::quant::{wrong_type, Family, GgmlType};
            use crate::simd_x86::{dot_u8i8, h2f_pair, hsum, ld256, q5_unsigned, rd_u32};
            use core::arch::x86_64::*;

            const VNNI: bool = $vnni;

            /// dx * dy for the f16 scales at the starts of blocks `x` and `y`, broadcast.
            /// Both halves go through one `vmovd`: converting each alone makes LLVM use
            /// `vpinsrw`, which merges into a live register and chains the blocks together.
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn dxdy(x: *const u8, y: *const u8) -> __m256 {
                let dx = core::ptr::read_unaligned(x as *const u16) as u32;
                let dy = core::ptr::read_unaligned(y as *const u16) as u32;
                let v = _mm_cvtph_ps(_mm_cvtsi32_si128((dx | (dy << 16)) as i32));
                _mm256_broadcastss_ps(_mm_mul_ss(v, _mm_movehdup_ps(v)))
            }

            /// Sums of i8(x) * i8(y) over groups of four bytes, as eight i32 (x, y in -127..=127;
            /// x = -128 would saturate).
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn dot_i8i8(x: __m256i, y: __m256i) -> __m256i {
                dot_u8i8::<VNNI>(_mm256_abs_epi8(x), _mm256_sign_epi8(y, x))
            }

            /// acc += f32(integer block dot `p`) * dx * dy (`_0` formats).
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn fma_block(acc: __m256, p: __m256i, x: *const u8, y: *const u8) -> __m256 {
                _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), dxdy(x, y), acc)
            }

            /// Block of a `_1` format with Q8_1: returns the new float accumulator and adds
            /// m * s to `accm` (lane 1).
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn fma_block_1(
                acc: __m256,
                accm: &mut __m128,
                p: __m256i,
                x: *const u8,
                y: *const u8,
            ) -> __m256 {
                // [dx, mx] * [dy, sy] = [dx*dy, mx*sy]
                let dm = _mm_mul_ps(h2f_pair(x), h2f_pair(y));
                *accm = _mm_add_ps(*accm, dm);
                _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_broadcastss_ps(dm), acc)
            }

            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn finish_1(acc: __m256, accm: __m128) -> f32 {
                hsum(acc) + _mm_cvtss_f32(_mm_shuffle_ps::<1>(accm, accm))
            }

            #[target_feature(enable = $feat)]
            pub unsafe fn dot_q5_1(nb: usize, x: *const u8, y: *const u8) -> f32 {
                const XS: usize = 24;
                const YS: usize = 36;
                let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                let (mut accm0, mut accm1) = (_mm_setzero_ps(), _mm_setzero_ps());
                let mut i = 0;
                while i + 2 <= nb {
                    let (x0, y0) = (x.add(i * XS), y.add(i * YS));
                    let (x1, y1) = (x0.add(XS), y0.add(YS));
                    let q0 = q5_unsigned::<VNNI>(x0.add(8), rd_u32(x0.add(4)));
                    let q1 = q5_unsigned::<VNNI>(x1.add(8), rd_u32(x1.add(4)));
                    let p0 = dot_u8i8::<VNNI>(q0, ld256(y0.add(4)));
                    let p1 = dot_u8i8::<VNNI>(q1, ld256(y1.add(4)));
                    acc0 = fma_block_1(acc0, &mut accm0, p0, x0, y0);
                    acc1 = fma_block_1(acc1, &mut accm1, p1, x1, y1);
                    i += 2;
                }
                if i < nb {
                    let (x0, y0) = (x.add(i * XS), y.add(i * YS));
                    let q0 = q5_unsigned::<VNNI>(x0.add(8), rd_u32(x0.add(4)));
                    acc0 = fma_block_1(
                        acc0,
                        &mut accm0,
                        dot_u8i8::<VNNI>(q0, ld256(y0.add(4))),
                        x0,
                        y0,
                    );
                }
                finish_1(_mm256_add_ps(acc0, acc1), _mm_add_ps(accm0, accm1))
            }

            /// Q8_0·Q8_0 (`BS` = 34, `OFF` = 2) and Q8_1·Q8_1 (36, 4).
            #[target_feature(enable = $feat)]
            pub unsafe fn dot_q8<const BS: usize, const OFF: usize>(
                nb: usize,
                x: *const u8,
                y: *const u8,
            ) -> f32 {
                let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                let mut i = 0;
                while i + 2 <= nb {
                    let (x0, y0) = (x.add(i * BS), y.add(i * BS));
                    let (x1, y1) = (x0.add(BS), y0.add(BS));
                    let p0 = dot_i8i8(ld256(x0.add(OFF)), ld256(y0.add(OFF)));
                    let p1 = dot_i8i8(ld256(x1.add(OFF)), ld256(y1.add(OFF)));
                    acc0 = fma_block(acc0, p0, x0, y0);
                    acc1 = fma_block(acc1, p1, x1, y1);
                    i += 2;
                }
                if i < nb {
                    let (x0, y0) = (x.add(i * BS), y.add(i * BS));
                    let p0 = dot_i8i8(ld256(x0.add(OFF)), ld256(y0.add(OFF)));
                    acc0 = fma_block(acc0, p0, x0, y0);
                }
                hsum(_mm256_add_ps(acc0, acc1))
            }

            /// Dispatch on the weight type. `x` holds `nb` blocks of `ty`, `y` `nb` blocks of
            /// `ty.vec_dot_type()`. Q4_0, Q4_1, Q5_0 and Q8_0 go to the eight-block-lane
            /// kernels of `x8_x86.rs` (the order their tile kernels reproduce).
            pub unsafe fn dot(ty: GgmlType, nb: usize, x: *const u8, y: *const u8) -> f32 {
                match ty {
                    GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q8_0 => {
                        crate::quant::x8::$name::dot(ty, nb, x, y)
                    }
                    GgmlType::Q5_1 => dot_q5_1(nb, x, y),
                    GgmlType::Q8_1 => dot_q8::<36, 4>(nb, x, y),
                    _ => wrong_type(Family::Legacy, ty),
                }
            }
        }
    };
}

dot_kernels!(avx2, "avx2,fma,f16c", false);
dot_kernels!(
    vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    true
);

// ---------------------------------------------------------------------------------------------
// Q8_0 / Q8_1 quantization, bit-exact with the scalar reference
// ---------------------------------------------------------------------------------------------

/// f32 to f16 bits, round-to-nearest-even (as `half::f16::from_f32`).
#[inline]
#[target_feature(enable = "f16c")]
unsafe fn f2h(x: f32) -> u16 {
    _mm_extract_epi16::<0>(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(x))) as u16
}

/// C `roundf` (half-way cases away from zero), exactly: t = trunc(v) and v - t are exact, so
/// adding ±1 where |v - t| >= 0.5 reproduces it bit for bit.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn roundf_avx2(v: __m256) -> __m256 {
    let sign = _mm256_set1_ps(-0.0);
    let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(v);
    let frac = _mm256_andnot_ps(sign, _mm256_sub_ps(v, t));
    let ge = _mm256_cmp_ps::<_CMP_GE_OQ>(frac, _mm256_set1_ps(0.5));
    let one = _mm256_or_ps(_mm256_and_ps(v, sign), _mm256_set1_ps(1.0));
    _mm256_add_ps(t, _mm256_and_ps(ge, one))
}

/// `nb` blocks of 32 floats at `x` to Q8_0 (`sum` false) or Q8_1 blocks at `y`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn quantize_q8_avx2(x: *const f32, nb: usize, y: *mut u8, sum: bool) {
    let (bs, off) = if sum { (36, 4) } else { (34, 2) };
    let sign = _mm256_set1_ps(-0.0);
    let perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for i in 0..nb {
        let p = x.add(i * 32);
        let v0 = _mm256_loadu_ps(p);
        let v1 = _mm256_loadu_ps(p.add(8));
        let v2 = _mm256_loadu_ps(p.add(16));
        let v3 = _mm256_loadu_ps(p.add(24));
        let m = _mm256_max_ps(
            _mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
            _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)),
        );
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_max_ss(m, _mm_shuffle_ps::<1>(m, m));
        let amax = _mm_cvtss_f32(m);
        let d = amax / 127.0;
        let id = _mm256_set1_ps(inv(d));
        let i0 = _mm256_cvtps_epi32(roundf_avx2(_mm256_mul_ps(v0, id)));
        let i1 = _mm256_cvtps_epi32(roundf_avx2(_mm256_mul_ps(v1, id)));
        let i2 = _mm256_cvtps_epi32(roundf_avx2(_mm256_mul_ps(v2, id)));
        let i3 = _mm256_cvtps_epi32(roundf_avx2(_mm256_mul_ps(v3, id)));
        let b = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        let b = _mm256_permutevar8x32_epi32(b, perm);
        let out = y.add(i * bs);
        _mm256_storeu_si256(out.add(off) as *mut __m256i, b);
        core::ptr::write_unaligned(out as *mut u16, f2h(d));
        if sum {
            let s = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
            let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
            let s = _mm_cvtsi128_si32(s);
            core::ptr::write_unaligned(out.add(2) as *mut u16, f2h(s as f32 * d));
        }
    }
}

#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn roundf_avx512(v: __m512) -> __m512 {
    let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(v);
    let frac = _mm512_abs_ps(_mm512_sub_ps(v, t));
    let ge = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(frac, _mm512_set1_ps(0.5));
    let sign = _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(i32::MIN));
    let one = _mm512_castsi512_ps(_mm512_or_si512(
        sign,
        _mm512_castps_si512(_mm512_set1_ps(1.0)),
    ));
    _mm512_mask_add_ps(t, ge, t, one)
}

/// AVX-512 version of [`quantize_q8_avx2`] (same bytes).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
pub unsafe fn quantize_q8_avx512(x: *const f32, nb: usize, y: *mut u8, sum: bool) {
    let (bs, off) = if sum { (36, 4) } else { (34, 2) };
    for i in 0..nb {
        let p = x.add(i * 32);
        let v0 = _mm512_loadu_ps(p);
        let v1 = _mm512_loadu_ps(p.add(16));
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        let d = amax / 127.0;
        let id = _mm512_set1_ps(inv(d));
        let i0 = _mm512_cvtps_epi32(roundf_avx512(_mm512_mul_ps(v0, id)));
        let i1 = _mm512_cvtps_epi32(roundf_avx512(_mm512_mul_ps(v1, id)));
        let out = y.add(i * bs);
        _mm_storeu_si128(out.add(off) as *mut __m128i, _mm512_cvtepi32_epi8(i0));
        _mm_storeu_si128(out.add(off + 16) as *mut __m128i, _mm512_cvtepi32_epi8(i1));
        core::ptr::write_unaligned(out as *mut u16, f2h(d));
        if sum {
            let s = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
            core::ptr::write_unaligned(out.add(2) as *mut u16, f2h(s as f32 * d));
        }
    }
}
