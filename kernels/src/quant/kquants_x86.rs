//! x86-64 SIMD kernels for the K-quants (declared from `kquants.rs`, which picks them at run
//! time): AVX2 + FMA + F16C, and the same source with AVX-512 VNNI's `vpdpwssd`.
//!
//! Every weight quant is decoded to small unsigned integers so that `vpmaddubsw` (u8 x i8)
//! can be used; the constant offsets of Q3_K (-4) and Q6_K (-32) and the mins of
//! Q2_K/Q4_K/Q5_K are folded in through the Q8_K block sums (`bsums`).

use core::arch::x86_64::*;

use super::{
    wrong_type, Family, GgmlType, Q2K_BYTES, Q3K_BYTES, Q4K_BYTES, Q5K_BYTES, Q6K_BYTES, Q8K_BSUMS,
    Q8K_BYTES,
};
use crate::simd_x86::{
    h2f_s, hsum, hsum128, k45_quants, k4_mins_dot, k4_scales_mins, lane_mask, ld128, ld256,
    mul_acc, pair_mask, q6k_quants, rd_f32, rd_u32, scales16_halves,
};

/// `nb` blocks of `ty` at `x` against `nb` Q8_K blocks at `y`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_avx2(ty: GgmlType, nb: usize, x: *const u8, y: *const u8) -> f32 {
    match ty {
        GgmlType::Q2_K => dot_q2k::<false>(nb, x, y),
        GgmlType::Q3_K => dot_q3k::<false>(nb, x, y),
        GgmlType::Q4_K => dot_q45k::<false, false>(nb, x, y),
        GgmlType::Q5_K => dot_q45k::<true, false>(nb, x, y),
        GgmlType::Q6_K => dot_q6k::<false>(nb, x, y),
        GgmlType::Q8_K => dot_q8k(nb, x, y),
        _ => wrong_type(Family::K, ty),
    }
}

/// The same kernels with `vpdpwssd` (AVX-512 VNNI on 256-bit registers).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn dot_vnni(ty: GgmlType, nb: usize, x: *const u8, y: *const u8) -> f32 {
    match ty {
        GgmlType::Q2_K => dot_q2k::<true>(nb, x, y),
        GgmlType::Q3_K => dot_q3k::<true>(nb, x, y),
        GgmlType::Q4_K => dot_q45k::<false, true>(nb, x, y),
        GgmlType::Q5_K => dot_q45k::<true, true>(nb, x, y),
        GgmlType::Q6_K => dot_q6k::<true>(nb, x, y),
        GgmlType::Q8_K => dot_q8k(nb, x, y),
        _ => wrong_type(Family::K, ty),
    }
}

// ---------------------------------------------------------------------------------------------
// Q4_K, Q5_K
// ---------------------------------------------------------------------------------------------

/// Q4_K (`FIVE` false) or Q5_K.
#[inline(always)]
unsafe fn dot_q45k<const FIVE: bool, const V: bool>(nb: usize, w: *const u8, a: *const u8) -> f32 {
    let bytes = if FIVE { Q5K_BYTES } else { Q4K_BYTES };
    let mut acc = _mm256_setzero_ps();
    let mut acc_m = _mm_setzero_ps();
    for i in 0..nb {
        let x = w.add(i * bytes);
        let y = a.add(i * Q8K_BYTES);
        let dy = rd_f32(y);
        let d = dy * h2f_s(x);
        let dmin = -dy * h2f_s(x.add(2));

        let sm = k4_scales_mins(x.add(4));
        let pm = k4_mins_dot(_mm256_extracti128_si256(sm, 1), y.add(Q8K_BSUMS));
        acc_m = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(pm), acc_m);

        let scales = _mm256_permute4x64_epi64(sm, 0x44);
        // Q5_K: 32 bytes of fifth bits, two bits of each byte per 64 quants.
        let mut hb = if FIVE {
            ld256(x.add(16))
        } else {
            _mm256_setzero_si256()
        };
        let q = x.add(if FIVE { 48 } else { 16 });
        let q8 = y.add(4);
        let mut s1 = _mm256_setzero_si256();
        let mut s2 = _mm256_setzero_si256();
        for j in 0..4 {
            let sl = _mm256_shuffle_epi8(scales, lane_mask(2 * j));
            let sh = _mm256_shuffle_epi8(scales, lane_mask(2 * j + 1));
            let [lo, hi] = k45_quants::<FIVE>(ld256(q.add(32 * j)), &mut hb);
            s1 = mul_acc::<V>(s1, lo, ld256(q8.add(64 * j)), sl);
            s2 = mul_acc::<V>(s2, hi, ld256(q8.add(64 * j + 32)), sh);
        }
        let s = _mm256_add_epi32(s1, s2);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(s), acc);
    }
    hsum(acc) + hsum128(acc_m)
}

// ---------------------------------------------------------------------------------------------
// Q6_K
// ---------------------------------------------------------------------------------------------

#[inline(always)]
unsafe fn dot_q6k<const V: bool>(nb: usize, w: *const u8, a: *const u8) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for i in 0..nb {
        let x = w.add(i * Q6K_BYTES);
        let y = a.add(i * Q8K_BYTES);
        let d = rd_f32(y) * h2f_s(x.add(208));

        let sc16 = _mm256_cvtepi8_epi16(ld128(x.add(192)));
        // q is stored +32: subtract 32 * sum_j sc_j * bsums_j.
        let corr = _mm256_madd_epi16(sc16, ld256(y.add(Q8K_BSUMS)));
        let (sc_a, sc_b) = scales16_halves(sc16);

        let mut s1 = _mm256_setzero_si256();
        let mut s2 = _mm256_setzero_si256();
        for n in 0..2 {
            let scales = if n == 0 { sc_a } else { sc_b };
            let [q0, q1, q2, q3] = q6k_quants(x.add(64 * n), x.add(128 + 32 * n));
            let q8 = y.add(4 + 128 * n);
            let sc0 = _mm256_shuffle_epi8(scales, pair_mask(0));
            let sc1 = _mm256_shuffle_epi8(scales, pair_mask(1));
            let sc2 = _mm256_shuffle_epi8(scales, pair_mask(2));
            let sc3 = _mm256_shuffle_epi8(scales, pair_mask(3));
            s1 = mul_acc::<V>(s1, q0, ld256(q8), sc0);
            s2 = mul_acc::<V>(s2, q1, ld256(q8.add(32)), sc1);
            s1 = mul_acc::<V>(s1, q2, ld256(q8.add(64)), sc2);
            s2 = mul_acc::<V>(s2, q3, ld256(q8.add(96)), sc3);
        }
        let s = _mm256_sub_epi32(_mm256_add_epi32(s1, s2), _mm256_slli_epi32(corr, 5));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(s), acc);
    }
    hsum(acc)
}

// ---------------------------------------------------------------------------------------------
// Q3_K
// ---------------------------------------------------------------------------------------------

#[inline(always)]
unsafe fn dot_q3k<const V: bool>(nb: usize, w: *const u8, a: *const u8) -> f32 {
    let m3 = _mm256_set1_epi8(3);
    let m1 = _mm256_set1_epi8(1);
    let mut acc = _mm256_setzero_ps();
    for i in 0..nb {
        let x = w.add(i * Q3K_BYTES);
        let y = a.add(i * Q8K_BYTES);
        let d = rd_f32(y) * h2f_s(x.add(108));

        let w0 = rd_u32(x.add(96));
        let w1 = rd_u32(x.add(100));
        let w2 = rd_u32(x.add(104));
        let a0 = (w0 & 0x0f0f_0f0f) | ((w2 & 0x0303_0303) << 4);
        let a1 = (w1 & 0x0f0f_0f0f) | (((w2 >> 2) & 0x0303_0303) << 4);
        let a2 = ((w0 >> 4) & 0x0f0f_0f0f) | (((w2 >> 4) & 0x0303_0303) << 4);
        let a3 = ((w1 >> 4) & 0x0f0f_0f0f) | (((w2 >> 6) & 0x0303_0303) << 4);
        let sc8 = _mm_sub_epi8(
            _mm_set_epi32(a3 as i32, a2 as i32, a1 as i32, a0 as i32),
            _mm_set1_epi8(32),
        );
        let sc16 = _mm256_cvtepi8_epi16(sc8);
        // q is stored +4: subtract 4 * sum_j sc_j * bsums_j.
        let corr = _mm256_madd_epi16(sc16, ld256(y.add(Q8K_BSUMS)));
        let (sc_a, sc_b) = scales16_halves(sc16);

        let mut hm = ld256(x);
        let mut s1 = _mm256_setzero_si256();
        let mut s2 = _mm256_setzero_si256();
        for n in 0..2 {
            let scales = if n == 0 { sc_a } else { sc_b };
            let mut qs = ld256(x.add(32 + 32 * n));
            let q8 = y.add(4 + 128 * n);
            for j in 0..4 {
                let q2 = _mm256_and_si256(qs, m3);
                let h = _mm256_slli_epi16(_mm256_and_si256(hm, m1), 2);
                qs = _mm256_srli_epi16(qs, 2);
                hm = _mm256_srli_epi16(hm, 1);
                let q = _mm256_or_si256(q2, h);
                let sc = _mm256_shuffle_epi8(scales, pair_mask(j));
                if j.is_multiple_of(2) {
                    s1 = mul_acc::<V>(s1, q, ld256(q8.add(32 * j)), sc);
                } else {
                    s2 = mul_acc::<V>(s2, q, ld256(q8.add(32 * j)), sc);
                }
            }
        }
        let s = _mm256_sub_epi32(_mm256_add_epi32(s1, s2), _mm256_slli_epi32(corr, 2));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(s), acc);
    }
    hsum(acc)
}

// ---------------------------------------------------------------------------------------------
// Q2_K
// ---------------------------------------------------------------------------------------------

#[inline(always)]
unsafe fn dot_q2k<const V: bool>(nb: usize, w: *const u8, a: *const u8) -> f32 {
    let m3 = _mm256_set1_epi8(3);
    let m4 = _mm_set1_epi8(0x0F);
    let mut acc = _mm256_setzero_ps();
    for i in 0..nb {
        let x = w.add(i * Q2K_BYTES);
        let y = a.add(i * Q8K_BYTES);
        let dy = rd_f32(y);
        let d = dy * h2f_s(x.add(80));
        let dmin = -dy * h2f_s(x.add(82));

        let raw = ld128(x);
        let sc16 = _mm256_cvtepu8_epi16(_mm_and_si128(raw, m4));
        let mn16 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw, 4), m4));
        let summ = _mm256_madd_epi16(mn16, ld256(y.add(Q8K_BSUMS)));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(dmin), _mm256_cvtepi32_ps(summ), acc);
        let (sc_a, sc_b) = scales16_halves(sc16);

        let mut s1 = _mm256_setzero_si256();
        let mut s2 = _mm256_setzero_si256();
        for n in 0..2 {
            let scales = if n == 0 { sc_a } else { sc_b };
            let mut qs = ld256(x.add(16 + 32 * n));
            let q8 = y.add(4 + 128 * n);
            for j in 0..4 {
                let q = _mm256_and_si256(qs, m3);
                qs = _mm256_srli_epi16(qs, 2);
                let sc = _mm256_shuffle_epi8(scales, pair_mask(j));
                if j.is_multiple_of(2) {
                    s1 = mul_acc::<V>(s1, q, ld256(q8.add(32 * j)), sc);
                } else {
                    s2 = mul_acc::<V>(s2, q, ld256(q8.add(32 * j)), sc);
                }
            }
        }
        let s = _mm256_add_epi32(s1, s2);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(s), acc);
    }
    hsum(acc)
}

// ---------------------------------------------------------------------------------------------
// Q8_K · Q8_K
// ---------------------------------------------------------------------------------------------

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q8k(nb: usize, w: *const u8, a: *const u8) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for i in 0..nb {
        let x = w.add(i * Q8K_BYTES);
        let y = a.add(i * Q8K_BYTES);
        let d = rd_f32(x) * rd_f32(y);
        let mut s = _mm256_setzero_si256();
        for k in 0..8 {
            let qx = _mm256_cvtepi8_epi16(ld128(x.add(4 + 32 * k)));
            let qy = _mm256_cvtepi8_epi16(ld128(y.add(4 + 32 * k)));
            let qx2 = _mm256_cvtepi8_epi16(ld128(x.add(20 + 32 * k)));
            let qy2 = _mm256_cvtepi8_epi16(ld128(y.add(20 + 32 * k)));
            s = _mm256_add_epi32(s, _mm256_madd_epi16(qx, qy));
            s = _mm256_add_epi32(s, _mm256_madd_epi16(qx2, qy2));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(s), acc);
    }
    hsum(acc)
}

// ---------------------------------------------------------------------------------------------
// Q8_K quantization (bit-exact with ggml's quantize_row_q8_K_ref)
// ---------------------------------------------------------------------------------------------

/// One Q8_K block: 256 floats at `x` to 292 bytes at `y`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quant_q8k_block(x: *const f32, y: *mut u8) {
    let sign = _mm256_set1_ps(-0.0);
    // amax: NaNs are skipped (vmaxps returns its second operand when either is NaN), as in
    // the reference's `fabsf(x) > amax` test.
    let mut m0 = _mm256_setzero_ps();
    let mut m1 = _mm256_setzero_ps();
    for k in 0..16 {
        let a = _mm256_andnot_ps(sign, _mm256_loadu_ps(x.add(16 * k)));
        let b = _mm256_andnot_ps(sign, _mm256_loadu_ps(x.add(16 * k + 8)));
        m0 = _mm256_max_ps(a, m0);
        m1 = _mm256_max_ps(b, m1);
    }
    let m = _mm256_max_ps(m0, m1);
    let h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    let h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    let h = _mm_max_ss(h, _mm_movehdup_ps(h));
    let amax = _mm_cvtss_f32(h);
    if amax == 0.0 {
        core::ptr::write_bytes(y, 0, Q8K_BYTES);
        return;
    }
    // The reference keeps the first element whose magnitude is the maximum (its sign matters).
    let av = _mm256_set1_ps(amax);
    let mut max = amax;
    for k in 0..32 {
        let v = _mm256_loadu_ps(x.add(8 * k));
        let eq = _mm256_cmp_ps(_mm256_andnot_ps(sign, v), av, _CMP_EQ_OQ);
        let bits = _mm256_movemask_ps(eq);
        if bits != 0 {
            max = *x.add(8 * k + bits.trailing_zeros() as usize);
            break;
        }
    }
    let iscale = -127.0f32 / max;
    let vs = _mm256_set1_ps(iscale);
    let magic = _mm256_set1_ps(12_582_912.0);
    let mant = _mm256_set1_epi32(0x007f_ffff);
    let bias = _mm256_set1_epi32(0x0040_0000);
    let lim = _mm256_set1_epi32(127);
    let low8 = _mm256_set1_epi32(0xFF);
    let perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let flip = _mm256_set1_epi8(-128);
    let zero = _mm256_setzero_si256();
    let q = y.add(4);
    let mut sums = [0i64; 4];
    for g in 0..8 {
        let mut v = [_mm256_setzero_si256(); 4];
        for (t, vt) in v.iter_mut().enumerate() {
            let f = _mm256_mul_ps(_mm256_loadu_ps(x.add(32 * g + 8 * t)), vs);
            let r = _mm256_castps_si256(_mm256_add_ps(f, magic));
            let r = _mm256_sub_epi32(_mm256_and_si256(r, mant), bias);
            // MIN(127, v), then the int8_t store truncates.
            *vt = _mm256_and_si256(_mm256_min_epi32(r, lim), low8);
        }
        let p01 = _mm256_packus_epi32(v[0], v[1]);
        let p23 = _mm256_packus_epi32(v[2], v[3]);
        let p = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(p01, p23), perm);
        _mm256_storeu_si256(q.add(32 * g) as *mut __m256i, p);
        // bsums: sum of signed bytes = sum of (byte ^ 0x80) - 128 * count.
        let sad = _mm256_sad_epu8(_mm256_xor_si256(p, flip), zero);
        _mm256_storeu_si256(sums.as_mut_ptr() as *mut __m256i, sad);
        let b0 = (sums[0] + sums[1] - 16 * 128) as i16;
        let b1 = (sums[2] + sums[3] - 16 * 128) as i16;
        let o = y.add(Q8K_BSUMS + 4 * g);
        core::ptr::copy_nonoverlapping(b0.to_le_bytes().as_ptr(), o, 2);
        core::ptr::copy_nonoverlapping(b1.to_le_bytes().as_ptr(), o.add(2), 2);
    }
    let d = 1.0f32 / iscale;
    core::ptr::copy_nonoverlapping(d.to_le_bytes().as_ptr(), y, 4);
}
