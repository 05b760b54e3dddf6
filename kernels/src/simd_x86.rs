//! x86-64 helpers shared by the SIMD kernels (`quant/*_x86.rs`, `ops`): unaligned loads, f16
//! scales, horizontal sums, and the unpacking of nibbles, fifth bits and K-quant scales.
//!
//! Each is `#[inline]` with AVX2 + FMA + F16C, which every kernel build includes, or
//! `#[inline(always)]` where a `VNNI` parameter picks the instruction (the AVX-512 VNNI forms
//! take the features of the kernel they inline into), so all of them inline into the kernels.

#![allow(clippy::missing_safety_doc)]

use core::arch::x86_64::*;

/// Runs the multi-row kernel call `$body` over the activation rows `0..$n` (`$y` the first,
/// `$ys` bytes apart; `$out` the first output) in groups of four, then once over the three,
/// two or one left: in each run `$y` and `$out` are the group's first row and output and `$N`
/// (a const) is its size.
macro_rules! by_fours {
    ($n:expr, $y:ident, $ys:expr, $out:ident, $N:ident => $body:expr) => {{
        let (n, ys) = ($n, $ys);
        let mut j = 0;
        while j + 4 <= n {
            const $N: usize = 4;
            let ($y, $out) = ($y.add(j * ys), $out.add(j));
            $body;
            j += 4;
        }
        let ($y, $out) = ($y.add(j * ys), $out.add(j));
        match n - j {
            3 => {
                const $N: usize = 3;
                $body
            }
            2 => {
                const $N: usize = 2;
                $body
            }
            1 => {
                const $N: usize = 1;
                $body
            }
            _ => {}
        }
    }};
}
pub(crate) use by_fours;

// ---------------------------------------------------------------------------------------------
// Loads
// ---------------------------------------------------------------------------------------------

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn ld256(p: *const u8) -> __m256i {
    _mm256_loadu_si256(p as *const __m256i)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn ld128(p: *const u8) -> __m128i {
    _mm_loadu_si128(p as *const __m128i)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn rd_u32(p: *const u8) -> u32 {
    core::ptr::read_unaligned(p as *const u32)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn rd_f32(p: *const u8) -> f32 {
    core::ptr::read_unaligned(p as *const f32)
}

// ---------------------------------------------------------------------------------------------
// f16 scales
// ---------------------------------------------------------------------------------------------

/// The f16 at `p` as f32 in lane 0 (one `vmovd`, one `vcvtph2ps`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn h2f(p: *const u8) -> __m128 {
    let bits = core::ptr::read_unaligned(p as *const u16) as u32;
    _mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32))
}

/// The f16 at `p` as f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn h2f_s(p: *const u8) -> f32 {
    _mm_cvtss_f32(h2f(p))
}

/// Two consecutive f16 at `p` to [p0, p1, 0, 0].
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn h2f_pair(p: *const u8) -> __m128 {
    _mm_cvtph_ps(_mm_cvtsi32_si128(rd_u32(p) as i32))
}

// ---------------------------------------------------------------------------------------------
// Horizontal sums
// ---------------------------------------------------------------------------------------------

/// The sum of the eight lanes: halves, then pairs, then the last two.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn hsum(v: __m256) -> f32 {
    hsum128(_mm_add_ps(
        _mm256_castps256_ps128(v),
        _mm256_extractf128_ps::<1>(v),
    ))
}

/// The sum of the four lanes: pairs, then the last two.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn hsum128(s: __m128) -> f32 {
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

// ---------------------------------------------------------------------------------------------
// Integer dot steps
// ---------------------------------------------------------------------------------------------

/// Sums of u8(x) * i8(y) over groups of four bytes, as eight i32 (`vpdpbusd` with `VNNI`).
#[inline(always)]
pub unsafe fn dot_u8i8<const VNNI: bool>(x: __m256i, y: __m256i) -> __m256i {
    if VNNI {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), x, y)
    } else {
        _mm256_madd_epi16(_mm256_maddubs_epi16(x, y), _mm256_set1_epi16(1))
    }
}

/// `acc` + the (u8 x i8) pair products of `q` and `q8`, scaled pairwise by the i16 `scale`, as
/// eight i32. With `VNNI`, `vpdpwssd` fuses the scaling multiply and the accumulation.
#[inline(always)]
pub unsafe fn mul_acc<const VNNI: bool>(
    acc: __m256i,
    q: __m256i,
    q8: __m256i,
    scale: __m256i,
) -> __m256i {
    let p = _mm256_maddubs_epi16(q, q8);
    if VNNI {
        _mm256_dpwssd_epi32(acc, p, scale)
    } else {
        _mm256_add_epi32(acc, _mm256_madd_epi16(scale, p))
    }
}

// ---------------------------------------------------------------------------------------------
// Legacy block unpacking
// ---------------------------------------------------------------------------------------------

/// 16 packed bytes at `p` to 32 nibbles: low nibbles in bytes 0..16, high in 16..32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn nibbles(p: *const u8) -> __m256i {
    let t = ld128(p);
    let hi = _mm_srli_epi16::<4>(t);
    _mm256_and_si256(_mm256_set_m128i(hi, t), _mm256_set1_epi8(0x0F))
}

/// Byte j = 0xFF where bit j of `qh` is set, else 0.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn bits_to_bytes(qh: u32) -> __m256i {
    let v = _mm256_set1_epi32(qh as i32);
    let idx = _mm256_set_epi64x(
        0x0303_0303_0303_0303,
        0x0202_0202_0202_0202,
        0x0101_0101_0101_0101,
        0,
    );
    let b = _mm256_shuffle_epi8(v, idx);
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    _mm256_cmpeq_epi8(_mm256_and_si256(b, bit), bit)
}

/// 5-bit quants of a Q5_0/Q5_1 block (nibbles at `qs`, fifth bits `qh`) as 0..=31. With
/// `VNNI`, a byte mask adds the fifth bits.
#[inline(always)]
pub unsafe fn q5_unsigned<const VNNI: bool>(qs: *const u8, qh: u32) -> __m256i {
    let lo = nibbles(qs);
    if VNNI {
        _mm256_mask_add_epi8(lo, qh, lo, _mm256_set1_epi8(16))
    } else {
        let hb = _mm256_and_si256(bits_to_bytes(qh), _mm256_set1_epi8(16));
        _mm256_or_si256(lo, hb)
    }
}

/// Same, minus 16 (Q5_0): -16..=15.
#[inline(always)]
pub unsafe fn q5_signed<const VNNI: bool>(qs: *const u8, qh: u32) -> __m256i {
    let lo = nibbles(qs);
    if VNNI {
        _mm256_mask_sub_epi8(lo, !qh, lo, _mm256_set1_epi8(16))
    } else {
        // lo | 0xF0 == lo - 16 for lo in 0..16: set where the fifth bit is clear.
        let hb = _mm256_andnot_si256(bits_to_bytes(qh), _mm256_set1_epi8(0xF0u8 as i8));
        _mm256_or_si256(lo, hb)
    }
}

// ---------------------------------------------------------------------------------------------
// K-quant unpacking
// ---------------------------------------------------------------------------------------------

/// Broadcast i16 lane `k` (0..8) of each 128-bit half across that half.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn lane_mask(k: usize) -> __m256i {
    _mm256_set1_epi16((2 * k) as i16 | (((2 * k + 1) as i16) << 8))
}

/// Byte-shuffle masks that broadcast one i16 lane within each 128-bit half: for pair `p`
/// (0..4) the low half gets i16 lane `2p`, the high half i16 lane `2p + 1`. Applied to a
/// register holding the same eight i16 scales in both halves, this gives the scales of two
/// consecutive 16-element sub-blocks for the two halves of a 32-element vector.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn pair_mask(p: usize) -> __m256i {
    let lo = (4 * p) as i16 | (((4 * p + 1) as i16) << 8);
    let hi = (4 * p + 2) as i16 | (((4 * p + 3) as i16) << 8);
    _mm256_set_m128i(_mm_set1_epi16(hi), _mm_set1_epi16(lo))
}

/// 16 signed scales (i16) -> two registers of i16 scales for pairs 0..4 and 4..8, each with
/// the same eight values in both halves.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn scales16_halves(sc16: __m256i) -> (__m256i, __m256i) {
    (
        _mm256_permute4x64_epi64::<0x44>(sc16),
        _mm256_permute4x64_epi64::<0xEE>(sc16),
    )
}

/// The packed 6-bit scales and mins of a Q4_K/Q5_K block (12 bytes at `p`) as 16 i16: the
/// eight scales in the low half, the eight mins in the high half.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn k4_scales_mins(p: *const u8) -> __m256i {
    let w0 = rd_u32(p);
    let w1 = rd_u32(p.add(4));
    let w2 = rd_u32(p.add(8));
    let sc_lo = w0 & 0x3f3f_3f3f;
    let m_lo = w1 & 0x3f3f_3f3f;
    let sc_hi = (w2 & 0x0f0f_0f0f) | (((w0 >> 6) & 0x0303_0303) << 4);
    let m_hi = ((w2 >> 4) & 0x0f0f_0f0f) | (((w1 >> 6) & 0x0303_0303) << 4);
    _mm256_cvtepu8_epi16(_mm_set_epi32(
        m_hi as i32,
        m_lo as i32,
        sc_hi as i32,
        sc_lo as i32,
    ))
}

/// The mins term of a Q4_K/Q5_K block: `sum_j m_j * (bsums[2j] + bsums[2j+1])` as four i32
/// partial sums, for the eight `mins` (i16) and the 16 `bsums` (i16) of a Q8_K block at `bs`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn k4_mins_dot(mins: __m128i, bs: *const u8) -> __m128i {
    let bs = ld256(bs);
    let bs2 = _mm_hadd_epi16(
        _mm256_castsi256_si128(bs),
        _mm256_extracti128_si256::<1>(bs),
    );
    _mm_madd_epi16(mins, bs2)
}

/// Quants `64k..64k + 32` (`lo`) and `64k + 32..64k + 64` (`hi`) of a Q4_K block (`FIVE`
/// false; `bits` its 32 packed bytes `32k..32k + 32`) or a Q5_K block, whose fifth bits are
/// taken from the low two bits of `hb`'s bytes, which then move on by two.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn k45_quants<const FIVE: bool>(bits: __m256i, hb: &mut __m256i) -> [__m256i; 2] {
    let m4 = _mm256_set1_epi8(0x0F);
    let mut lo = _mm256_and_si256(bits, m4);
    let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(bits), m4);
    if FIVE {
        let m1 = _mm256_set1_epi8(1);
        let hl = _mm256_slli_epi16::<4>(_mm256_and_si256(*hb, m1));
        let hh = _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<1>(*hb), m1));
        *hb = _mm256_srli_epi16::<2>(*hb);
        lo = _mm256_or_si256(lo, hl);
        hi = _mm256_or_si256(hi, hh);
    }
    [lo, hi]
}

/// The 128 quants of one half of a Q6_K block (low nibbles: 64 bytes at `ql`; high bits: 32
/// bytes at `qh`) as 0..64 (stored +32), 32 consecutive quants per vector.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q6k_quants(ql: *const u8, qh: *const u8) -> [__m256i; 4] {
    let m4 = _mm256_set1_epi8(0x0F);
    let m30 = _mm256_set1_epi8(0x30);
    let qh = ld256(qh);
    let qa = ld256(ql);
    let qb = ld256(ql.add(32));
    [
        _mm256_or_si256(
            _mm256_and_si256(qa, m4),
            _mm256_and_si256(_mm256_slli_epi16::<4>(qh), m30),
        ),
        _mm256_or_si256(
            _mm256_and_si256(qb, m4),
            _mm256_and_si256(_mm256_slli_epi16::<2>(qh), m30),
        ),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16::<4>(qa), m4),
            _mm256_and_si256(qh, m30),
        ),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16::<4>(qb), m4),
            _mm256_and_si256(_mm256_srli_epi16::<2>(qh), m30),
        ),
    ]
}
