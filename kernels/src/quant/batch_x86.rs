//! x86-64 multi-row dot products (declared from `batch.rs`) for the K-quants, Q5_1 and Q8_1:
//! tiles of up to two weight rows against up to four activation rows. Each weight block is
//! loaded and unpacked once (fifth/sixth bits, K-quant scales and mins) and each activation
//! block loaded once for the whole tile, so prefill stops paying them once per pair. (Q4_0,
//! Q4_1, Q5_0 and Q8_0 have theirs in `x8_x86.rs`.)
//!
//! Two builds of the same source (see `batch_kernels!`), as in `legacy_x86.rs`: `avx2`
//! (AVX2 + FMA + F16C, `vpmaddubsw`/`vpmaddwd`) and `vnni` (adds AVX-512 F/BW/VL/VNNI on
//! 256-bit vectors: `vpdpbusd`/`vpdpwssd` and byte masks). The arithmetic of every (weight row,
//! activation row) pair is the single-row kernel's, in its order, so the results are the same
//! bits as `vec_dot`.
//!
//! All loads are unaligned; callers check bounds and CPU features.

#![allow(clippy::missing_safety_doc)]

macro_rules! batch_kernels {
    ($name:ident, $feat:literal, $vnni:literal) => {
        pub mod $name {
            use crate::quant::kquants::{Q8K_BSUMS, Q8K_BYTES};
            use crate::quant::GgmlType;
            use crate::simd_x86::{
                by_fours, dot_u8i8, h2f, h2f_pair, h2f_s, hsum, hsum128, k45_quants, k4_mins_dot,
                k4_scales_mins, lane_mask, ld128, ld256, mul_acc, pair_mask,
                q5_unsigned, q6k_quants, rd_f32, rd_u32, scales16_halves,
            };
            use core::arch::x86_64::*;

            const VNNI: bool = $vnni;

            // Legacy kinds (const parameter of `legacy`).
            const Q5_1: u8 = 0;
            const Q8_1: u8 = 1;

            /// One legacy block of `R` weight rows (kind `K`, `xrs` bytes apart from `xb`)
            /// against the matching block of `N` activation rows (`yi`, `ys` bytes apart):
            /// f32 partial sums into `acc[r][j]`, m * s (`_1` formats) into lane 1 of
            /// `accm[r][j]`. Each weight block is unpacked once and each activation block
            /// loaded once for the whole tile; the arithmetic of every (row, activation) pair
            /// is the single-row kernel's, step for step.
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn legacy_block<const K: u8, const R: usize, const N: usize>(
                xb: *const u8,
                xrs: usize,
                yi: *const u8,
                ys: usize,
                acc: &mut [[__m256; N]; R],
                accm: &mut [[__m128; N]; R],
            ) {
                if K == Q5_1 {
                    let mut q = [_mm256_setzero_si256(); R];
                    let mut dm = [_mm_setzero_ps(); R];
                    for r in 0..R {
                        let xr = xb.add(r * xrs);
                        q[r] = q5_unsigned::<VNNI>(xr.add(8), rd_u32(xr.add(4)));
                        dm[r] = h2f_pair(xr);
                    }
                    for j in 0..N {
                        let yj = yi.add(j * ys);
                        let y = ld256(yj.add(4));
                        let dmy = h2f_pair(yj);
                        for r in 0..R {
                            let p = dot_u8i8::<VNNI>(q[r], y);
                            // [dx, mx] * [dy, sy] = [dx*dy, mx*sy]
                            let s = _mm_mul_ps(dm[r], dmy);
                            accm[r][j] = _mm_add_ps(accm[r][j], s);
                            acc[r][j] = _mm256_fmadd_ps(
                                _mm256_cvtepi32_ps(p),
                                _mm256_broadcastss_ps(s),
                                acc[r][j],
                            );
                        }
                    }
                } else {
                    let mut q = [_mm256_setzero_si256(); R];
                    let mut qa = [_mm256_setzero_si256(); R];
                    let mut dx = [_mm256_setzero_ps(); R];
                    for r in 0..R {
                        let xr = xb.add(r * xrs);
                        q[r] = ld256(xr.add(4));
                        // i8 x i8 as |q| x (y with q's sign).
                        qa[r] = _mm256_abs_epi8(q[r]);
                        dx[r] = _mm256_broadcastss_ps(h2f(xr));
                    }
                    for j in 0..N {
                        let yj = yi.add(j * ys);
                        let y = ld256(yj.add(4));
                        let dy = _mm256_broadcastss_ps(h2f(yj));
                        for r in 0..R {
                            let p = dot_u8i8::<VNNI>(qa[r], _mm256_sign_epi8(y, q[r]));
                            // dx * dy in every lane: the single-row kernel's product.
                            let s = _mm256_mul_ps(dx[r], dy);
                            acc[r][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), s, acc[r][j]);
                        }
                    }
                }
            }

            /// Legacy weight rows (`R` of them, `nb` blocks of kind `K`, `xrs` bytes apart
            /// from `x`) against `N` activation rows (`ys` bytes apart from `y`, Q8_1 blocks): `out[r * os + j]`. The single-row kernel sums even and odd blocks
            /// apart; here the even blocks go first, then the odd ones (the tile's data is in
            /// L1 by then), so each pass needs only one accumulator per pair and the results
            /// are the same bits as `vec_dot` on the same instruction set.
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn legacy<const K: u8, const R: usize, const N: usize>(
                nb: usize,
                x: *const u8,
                xrs: usize,
                y: *const u8,
                ys: usize,
                out: *mut f32,
                os: usize,
            ) {
                let xs: usize = if K == Q5_1 { 24 } else { 36 };
                // Activation blocks: Q8_1.
                let yb: usize = 36;
                let mut sums = [[[_mm256_setzero_ps(); N]; R]; 2];
                let mut sums_m = [[[_mm_setzero_ps(); N]; R]; 2];
                for pass in 0..2 {
                    let (mut acc, mut accm) = ([[_mm256_setzero_ps(); N]; R], [[_mm_setzero_ps(); N]; R]);
                    let mut i = pass;
                    while i < nb {
                        legacy_block::<K, R, N>(x.add(i * xs), xrs, y.add(i * yb), ys, &mut acc, &mut accm);
                        i += 2;
                    }
                    sums[pass] = acc;
                    sums_m[pass] = accm;
                }
                for r in 0..R {
                    for j in 0..N {
                        let mut v = hsum(_mm256_add_ps(sums[0][r][j], sums[1][r][j]));
                        if K == Q5_1 {
                            let m = _mm_add_ps(sums_m[0][r][j], sums_m[1][r][j]);
                            v += _mm_cvtss_f32(_mm_shuffle_ps::<1>(m, m));
                        }
                        *out.add(r * os + j) = v;
                    }
                }
            }

            /// Q4_K (`FIVE` false) or Q5_K weight rows (`R` of them, `xrs` bytes apart from
            /// `x`) against `N` Q8_K rows: `out[r * os + j]`, each pair summed as the
            /// single-row kernel sums it.
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn q45k<const FIVE: bool, const R: usize, const N: usize>(
                nb: usize,
                x: *const u8,
                xrs: usize,
                y: *const u8,
                ys: usize,
                out: *mut f32,
                os: usize,
            ) {
                let xs = if FIVE { 176 } else { 144 };
                let mut acc = [[_mm256_setzero_ps(); N]; R];
                let mut accm = [[_mm_setzero_ps(); N]; R];
                for i in 0..nb {
                    let yi = y.add(i * Q8K_BYTES);
                    let mut dx = [0f32; R];
                    let mut dmx = [0f32; R];
                    let mut mins = [_mm_setzero_si128(); R];
                    let mut scales = [_mm256_setzero_si256(); R];
                    let mut hb = [_mm256_setzero_si256(); R];
                    for r in 0..R {
                        let xb = x.add(r * xrs + i * xs);
                        dx[r] = h2f_s(xb);
                        dmx[r] = h2f_s(xb.add(2));
                        let sm = k4_scales_mins(xb.add(4));
                        mins[r] = _mm256_extracti128_si256::<1>(sm);
                        scales[r] = _mm256_permute4x64_epi64::<0x44>(sm);
                        if FIVE {
                            hb[r] = ld256(xb.add(16));
                        }
                    }
                    let mut s = [[_mm256_setzero_si256(); N]; R];
                    for k in 0..4 {
                        let mut q = [[_mm256_setzero_si256(); 2]; R];
                        let mut sc = [[_mm256_setzero_si256(); 2]; R];
                        for r in 0..R {
                            let qb = x.add(r * xrs + i * xs + if FIVE { 48 } else { 16 });
                            sc[r] = [
                                _mm256_shuffle_epi8(scales[r], lane_mask(2 * k)),
                                _mm256_shuffle_epi8(scales[r], lane_mask(2 * k + 1)),
                            ];
                            q[r] = k45_quants::<FIVE>(ld256(qb.add(32 * k)), &mut hb[r]);
                        }
                        for j in 0..N {
                            let q8 = yi.add(j * ys + 4 + 64 * k);
                            let (ylo, yhi) = (ld256(q8), ld256(q8.add(32)));
                            for r in 0..R {
                                s[r][j] = mul_acc::<VNNI>(s[r][j], q[r][0], ylo, sc[r][0]);
                                s[r][j] = mul_acc::<VNNI>(s[r][j], q[r][1], yhi, sc[r][1]);
                            }
                        }
                    }
                    for j in 0..N {
                        let yj = yi.add(j * ys);
                        let dy = rd_f32(yj);
                        for r in 0..R {
                            // mins: sum_k m_k * (bsums[2k] + bsums[2k+1])
                            let pm = k4_mins_dot(mins[r], yj.add(Q8K_BSUMS));
                            accm[r][j] = _mm_fmadd_ps(
                                _mm_set1_ps(-dy * dmx[r]),
                                _mm_cvtepi32_ps(pm),
                                accm[r][j],
                            );
                            acc[r][j] = _mm256_fmadd_ps(
                                _mm256_set1_ps(dy * dx[r]),
                                _mm256_cvtepi32_ps(s[r][j]),
                                acc[r][j],
                            );
                        }
                    }
                }
                for r in 0..R {
                    for j in 0..N {
                        *out.add(r * os + j) = hsum(acc[r][j]) + hsum128(accm[r][j]);
                    }
                }
            }

            /// Q6_K weight rows (`R` of them, `xrs` bytes apart) against `N` Q8_K rows.
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn q6k<const R: usize, const N: usize>(
                nb: usize,
                x: *const u8,
                xrs: usize,
                y: *const u8,
                ys: usize,
                out: *mut f32,
                os: usize,
            ) {
                let mut acc = [[_mm256_setzero_ps(); N]; R];
                for i in 0..nb {
                    let yi = y.add(i * Q8K_BYTES);
                    let mut dx = [0f32; R];
                    let mut sc16 = [_mm256_setzero_si256(); R];
                    for r in 0..R {
                        let xb = x.add(r * xrs + i * 210);
                        dx[r] = h2f_s(xb.add(208));
                        sc16[r] = _mm256_cvtepi8_epi16(ld128(xb.add(192)));
                    }
                    let mut s = [[_mm256_setzero_si256(); N]; R];
                    for n in 0..2 {
                        for half in 0..2 {
                            let mut q = [[_mm256_setzero_si256(); 2]; R];
                            let mut sc = [[_mm256_setzero_si256(); 2]; R];
                            for r in 0..R {
                                let xb = x.add(r * xrs + i * 210);
                                let (sc_a, sc_b) = scales16_halves(sc16[r]);
                                let scales = if n == 0 { sc_a } else { sc_b };
                                let [q0, q1, q2, q3] =
                                    q6k_quants(xb.add(64 * n), xb.add(128 + 32 * n));
                                q[r] = if half == 0 { [q0, q1] } else { [q2, q3] };
                                sc[r] = [
                                    _mm256_shuffle_epi8(scales, pair_mask(2 * half)),
                                    _mm256_shuffle_epi8(scales, pair_mask(2 * half + 1)),
                                ];
                            }
                            for j in 0..N {
                                let q8 = yi.add(j * ys + 4 + 128 * n + 64 * half);
                                let (ya, yb) = (ld256(q8), ld256(q8.add(32)));
                                for r in 0..R {
                                    s[r][j] = mul_acc::<VNNI>(s[r][j], q[r][0], ya, sc[r][0]);
                                    s[r][j] = mul_acc::<VNNI>(s[r][j], q[r][1], yb, sc[r][1]);
                                }
                            }
                        }
                    }
                    for j in 0..N {
                        let yj = yi.add(j * ys);
                        let bsums = ld256(yj.add(Q8K_BSUMS));
                        let dy = rd_f32(yj);
                        for r in 0..R {
                            // q is stored +32: subtract 32 * sum_k sc_k * bsums_k.
                            let corr = _mm256_madd_epi16(sc16[r], bsums);
                            let t = _mm256_sub_epi32(s[r][j], _mm256_slli_epi32::<5>(corr));
                            acc[r][j] = _mm256_fmadd_ps(
                                _mm256_set1_ps(dy * dx[r]),
                                _mm256_cvtepi32_ps(t),
                                acc[r][j],
                            );
                        }
                    }
                }
                for r in 0..R {
                    for j in 0..N {
                        *out.add(r * os + j) = hsum(acc[r][j]);
                    }
                }
            }

            /// `R` weight rows of `ty` against `N` activation rows.
            #[allow(clippy::too_many_arguments)]
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn group<const R: usize, const N: usize>(
                ty: GgmlType,
                nb: usize,
                x: *const u8,
                xrs: usize,
                y: *const u8,
                ys: usize,
                out: *mut f32,
                os: usize,
            ) {
                match ty {
                    GgmlType::Q5_1 => legacy::<Q5_1, R, N>(nb, x, xrs, y, ys, out, os),
                    GgmlType::Q8_1 => legacy::<Q8_1, R, N>(nb, x, xrs, y, ys, out, os),
                    GgmlType::Q4_K => q45k::<false, R, N>(nb, x, xrs, y, ys, out, os),
                    GgmlType::Q5_K => q45k::<true, R, N>(nb, x, xrs, y, ys, out, os),
                    GgmlType::Q6_K => q6k::<R, N>(nb, x, xrs, y, ys, out, os),
                    _ => unreachable!("batch: no kernel for {ty}"),
                }
            }

            /// `out[j]` = dot of the weight row `x` (`nb` blocks of `ty`) with the activation
            /// row at `y + j * ys`, for `j < n_act`, four rows at a time. `ty` must be one of
            /// the types `group` handles.
            #[target_feature(enable = $feat)]
            pub unsafe fn dot_batch(
                ty: GgmlType,
                nb: usize,
                x: *const u8,
                y: *const u8,
                ys: usize,
                n_act: usize,
                out: *mut f32,
            ) {
                by_fours!(n_act, y, ys, out, N => group::<1, N>(ty, nb, x, 0, y, ys, out, 0));
            }

            /// `out[i * os + j]` = dot of weight row `i` (`nb` blocks of `ty` at
            /// `x + i * xrs`) with activation row `j` (at `y + j * ys`), for `i < n_w`,
            /// `j < n_act`: tiles of two weight rows by four activation rows. `ty` must be one of
            /// the types `group` handles.
            #[allow(clippy::too_many_arguments)]
            #[target_feature(enable = $feat)]
            pub unsafe fn dot_tile(
                ty: GgmlType,
                nb: usize,
                x: *const u8,
                xrs: usize,
                n_w: usize,
                y: *const u8,
                ys: usize,
                n_act: usize,
                out: *mut f32,
                os: usize,
            ) {
                // With VNNI a K-quant pair is two instructions per 32 quants and two weight
                // rows' unpacked blocks spill: one row at a time measured faster.
                let pairs = !(VNNI && matches!(ty, GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K));
                let mut i = 0;
                while pairs && i + 2 <= n_w {
                    let (x, out) = (x.add(i * xrs), out.add(i * os));
                    by_fours!(n_act, y, ys, out, N => group::<2, N>(ty, nb, x, xrs, y, ys, out, os));
                    i += 2;
                }
                while i < n_w {
                    let (x, out) = (x.add(i * xrs), out.add(i * os));
                    // With VNNI (32 vector registers) eight activation rows per unpacked
                    // K-quant block where there are eight, then fours.
                    let mut j = 0;
                    while !pairs && j + 8 <= n_act {
                        group::<1, 8>(ty, nb, x, xrs, y.add(j * ys), ys, out.add(j), os);
                        j += 8;
                    }
                    let (y, out) = (y.add(j * ys), out.add(j));
                    by_fours!(n_act - j, y, ys, out, N => group::<1, N>(ty, nb, x, xrs, y, ys, out, os));
                    i += 1;
                }
            }
        }
    };
}

batch_kernels!(avx2, "avx2,fma,f16c", false);
batch_kernels!(
    vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    true
);
