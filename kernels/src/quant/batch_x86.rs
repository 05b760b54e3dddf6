//! x86-64 batched dot products (declared from `batch.rs`): one weight row against up to four
//! activation rows. Each weight block is loaded and unpacked once (nibbles, fifth/sixth bits,
//! K-quant scales and mins) and then multiplied against the matching block of every activation
//! row, so prefill stops paying the unpacking once per token.
//!
//! Two builds of the same source (see `batch_kernels!`), as in `legacy_x86.rs`: `avx2`
//! (AVX2 + FMA + F16C, `vpmaddubsw`/`vpmaddwd`) and `vnni` (adds AVX-512 F/BW/VL/VNNI on
//! 256-bit vectors: `vpdpbusd`/`vpdpwssd` and byte masks). The integer math per block is the
//! one of the single-row kernels; only the order of the f32 accumulation differs.
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
                k4_scales_mins, lane_mask, ld128, ld256, mul_acc, nibbles, pair_mask, q5_signed,
                q5_unsigned, q6k_quants, rd_f32, rd_u32, scales16_halves,
            };
            use core::arch::x86_64::*;

            const VNNI: bool = $vnni;

            // Legacy kinds (const parameter of `legacy`).
            const Q4_0: u8 = 0;
            const Q4_1: u8 = 1;
            const Q5_0: u8 = 2;
            const Q5_1: u8 = 3;
            const Q8_0: u8 = 4;
            const Q8_1: u8 = 5;

            /// One legacy block (kind `K`, at `xb`) against the matching block of `N` activation
            /// rows (`yi`, `ys` bytes apart): f32 partial sums into `acc`, m * s (`_1` formats)
            /// into lane 1 of `accm`. The arithmetic is the single-row kernels', step for step.
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn legacy_block<const K: u8, const N: usize>(
                xb: *const u8,
                yi: *const u8,
                ys: usize,
                acc: &mut [__m256; N],
                accm: &mut [__m128; N],
            ) {
                if matches!(K, Q4_1 | Q5_1) {
                    let q = if K == Q4_1 {
                        nibbles(xb.add(4))
                    } else {
                        q5_unsigned::<VNNI>(xb.add(8), rd_u32(xb.add(4)))
                    };
                    let dm = h2f_pair(xb);
                    for j in 0..N {
                        let yj = yi.add(j * ys);
                        let p = dot_u8i8::<VNNI>(q, ld256(yj.add(4)));
                        // [dx, mx] * [dy, sy] = [dx*dy, mx*sy]
                        let s = _mm_mul_ps(dm, h2f_pair(yj));
                        accm[j] = _mm_add_ps(accm[j], s);
                        acc[j] = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(p),
                            _mm256_broadcastss_ps(s),
                            acc[j],
                        );
                    }
                } else {
                    let (q, yoff) = match K {
                        Q4_0 => (_mm256_sub_epi8(nibbles(xb.add(2)), _mm256_set1_epi8(8)), 2),
                        Q5_0 => (q5_signed::<VNNI>(xb.add(6), rd_u32(xb.add(2))), 2),
                        Q8_0 => (ld256(xb.add(2)), 2),
                        _ => (ld256(xb.add(4)), 4),
                    };
                    // i8 x i8 as |q| x (y with q's sign), |q| shared by every row.
                    let qa = _mm256_abs_epi8(q);
                    let dx = h2f(xb);
                    for j in 0..N {
                        let yj = yi.add(j * ys);
                        let p = dot_u8i8::<VNNI>(qa, _mm256_sign_epi8(ld256(yj.add(yoff)), q));
                        let s = _mm_mul_ss(dx, h2f(yj));
                        acc[j] = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(p),
                            _mm256_broadcastss_ps(s),
                            acc[j],
                        );
                    }
                }
            }

            /// Legacy weight row (`nb` blocks of kind `K` at `x`) against `N` activation rows
            /// (`ys` bytes apart from `y`, Q8_0 or Q8_1 blocks). `out[j]` gets row j's dot,
            /// accumulated in the order of the single-row kernel (even and odd blocks apart),
            /// so the results are the same bits as `vec_dot` on the same instruction set.
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn legacy<const K: u8, const N: usize>(
                nb: usize,
                x: *const u8,
                y: *const u8,
                ys: usize,
                out: *mut f32,
            ) {
                let xs: usize = match K {
                    Q4_0 => 18,
                    Q4_1 => 20,
                    Q5_0 => 22,
                    Q5_1 => 24,
                    Q8_0 => 34,
                    _ => 36,
                };
                // Activation block bytes: Q8_1 for Q4_1/Q5_1/Q8_1, else Q8_0.
                let yb: usize = if matches!(K, Q4_1 | Q5_1 | Q8_1) {
                    36
                } else {
                    34
                };
                let (mut acc0, mut acc1) = ([_mm256_setzero_ps(); N], [_mm256_setzero_ps(); N]);
                let (mut accm0, mut accm1) = ([_mm_setzero_ps(); N], [_mm_setzero_ps(); N]);
                let mut i = 0;
                while i + 2 <= nb {
                    let (xb, yi) = (x.add(i * xs), y.add(i * yb));
                    legacy_block::<K, N>(xb, yi, ys, &mut acc0, &mut accm0);
                    legacy_block::<K, N>(xb.add(xs), yi.add(yb), ys, &mut acc1, &mut accm1);
                    i += 2;
                }
                if i < nb {
                    legacy_block::<K, N>(x.add(i * xs), y.add(i * yb), ys, &mut acc0, &mut accm0);
                }
                for j in 0..N {
                    let mut v = hsum(_mm256_add_ps(acc0[j], acc1[j]));
                    if matches!(K, Q4_1 | Q5_1) {
                        let m = _mm_add_ps(accm0[j], accm1[j]);
                        v += _mm_cvtss_f32(_mm_shuffle_ps::<1>(m, m));
                    }
                    *out.add(j) = v;
                }
            }

            // Only the VNNI build has tiles (`vpdpbusd` on the unsigned weights).
            #[allow(dead_code)]
            /// Quants of a Q4_0/Q5_0/Q8_0 block (kind `K`, at `xb`) as unsigned bytes: q + 8,
            /// q + 16 and q + 128 (see [`tile_offset`]).
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn legacy_unsigned<const K: u8>(xb: *const u8) -> __m256i {
                match K {
                    Q4_0 => nibbles(xb.add(2)),
                    Q5_0 => q5_unsigned::<VNNI>(xb.add(6), rd_u32(xb.add(2))),
                    _ => _mm256_xor_si256(ld256(xb.add(2)), _mm256_set1_epi8(0x80u8 as i8)),
                }
            }

            #[allow(dead_code)]
            /// The bias [`legacy_unsigned`] adds to the signed quants of kind `K`.
            const fn tile_offset(k: u8) -> i8 {
                match k {
                    Q4_0 => 8,
                    Q5_0 => 16,
                    _ => 0x80u8 as i8,
                }
            }

            #[allow(dead_code)]
            /// One block of `R` weight rows (kind `K`, `xrs` bytes apart from `xb`) against
            /// the matching Q8_0 block of `N` activation rows (`ys` bytes apart from `yi`).
            /// The weights go unsigned (q + o) so that `vpdpbusd` takes them as they are; the
            /// accumulator starts at -o * (the activation sums of each group of four bytes),
            /// once per activation row, so every i32 lane is the single-row kernel's exactly,
            /// and so is the f32 step (dx * dy, then one FMA into the pair's accumulator).
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn tile_block<const K: u8, const R: usize, const N: usize>(
                xb: *const u8,
                xrs: usize,
                yi: *const u8,
                ys: usize,
                acc: &mut [[__m256; N]; R],
            ) {
                let zero = _mm256_setzero_si256();
                let off = _mm256_set1_epi8(tile_offset(K));
                let mut qu = [zero; R];
                let mut dx = [_mm256_setzero_ps(); R];
                for r in 0..R {
                    let xr = xb.add(r * xrs);
                    qu[r] = legacy_unsigned::<K>(xr);
                    dx[r] = _mm256_broadcastss_ps(h2f(xr));
                }
                for j in 0..N {
                    let yj = yi.add(j * ys);
                    let y = ld256(yj.add(2));
                    let neg = _mm256_sub_epi32(zero, _mm256_dpbusd_epi32(zero, off, y));
                    let dy = _mm256_broadcastss_ps(h2f(yj));
                    for r in 0..R {
                        let p = _mm256_dpbusd_epi32(neg, qu[r], y);
                        let s = _mm256_mul_ps(dx[r], dy);
                        acc[r][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), s, acc[r][j]);
                    }
                }
            }

            #[allow(dead_code)]
            /// `R` weight rows of kind `K` (`nb` blocks, `xrs` bytes apart from `x`) against
            /// `N` Q8_0 rows: `out[r * os + j]`, in the single-row kernel's order (even and
            /// odd blocks apart), so the same bits as `vec_dot`.
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn legacy_tile<const K: u8, const R: usize, const N: usize>(
                nb: usize,
                x: *const u8,
                xrs: usize,
                y: *const u8,
                ys: usize,
                out: *mut f32,
                os: usize,
            ) {
                let xs: usize = match K {
                    Q4_0 => 18,
                    Q5_0 => 22,
                    _ => 34,
                };
                let mut acc0 = [[_mm256_setzero_ps(); N]; R];
                let mut acc1 = [[_mm256_setzero_ps(); N]; R];
                let mut i = 0;
                while i + 2 <= nb {
                    let (xb, yi) = (x.add(i * xs), y.add(i * 34));
                    tile_block::<K, R, N>(xb, xrs, yi, ys, &mut acc0);
                    tile_block::<K, R, N>(xb.add(xs), xrs, yi.add(34), ys, &mut acc1);
                    i += 2;
                }
                if i < nb {
                    tile_block::<K, R, N>(x.add(i * xs), xrs, y.add(i * 34), ys, &mut acc0);
                }
                for r in 0..R {
                    for j in 0..N {
                        *out.add(r * os + j) = hsum(_mm256_add_ps(acc0[r][j], acc1[r][j]));
                    }
                }
            }

            #[allow(dead_code)]
            #[allow(clippy::too_many_arguments)]
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn tile_rows<const K: u8, const R: usize>(
                nb: usize,
                x: *const u8,
                xrs: usize,
                y: *const u8,
                ys: usize,
                n_act: usize,
                out: *mut f32,
                os: usize,
            ) {
                by_fours!(n_act, y, ys, out, N => {
                    legacy_tile::<K, R, N>(nb, x, xrs, y, ys, out, os)
                });
            }

            #[allow(dead_code)]
            #[allow(clippy::too_many_arguments)]
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn tile_kind<const K: u8>(
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
                let mut i = 0;
                while i + 2 <= n_w {
                    tile_rows::<K, 2>(nb, x.add(i * xrs), xrs, y, ys, n_act, out.add(i * os), os);
                    i += 2;
                }
                if i < n_w {
                    tile_rows::<K, 1>(nb, x.add(i * xrs), xrs, y, ys, n_act, out.add(i * os), os);
                }
            }

            #[allow(dead_code)]
            /// `out[i * os + j]` = dot of weight row `i` (`nb` blocks of `ty` at
            /// `x + i * xrs`) with activation row `j` (at `y + j * ys`), for `i < n_w`,
            /// `j < n_act`: tiles of two weight rows by four activation rows. `ty` is Q4_0 or
            /// Q5_0 (VNNI build only).
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
                match ty {
                    GgmlType::Q4_0 => tile_kind::<Q4_0>(nb, x, xrs, n_w, y, ys, n_act, out, os),
                    GgmlType::Q5_0 => tile_kind::<Q5_0>(nb, x, xrs, n_w, y, ys, n_act, out, os),
                    _ => unreachable!("tile: no kernel for {ty}"),
                }
            }

            /// Q4_K (`FIVE` false) or Q5_K weight row against `N` Q8_K rows.
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn q45k<const FIVE: bool, const N: usize>(
                nb: usize,
                x: *const u8,
                y: *const u8,
                ys: usize,
                out: *mut f32,
            ) {
                let xs = if FIVE { 176 } else { 144 };
                let mut acc = [_mm256_setzero_ps(); N];
                let mut accm = [_mm_setzero_ps(); N];
                for i in 0..nb {
                    let xb = x.add(i * xs);
                    let yi = y.add(i * Q8K_BYTES);
                    let dx = h2f_s(xb);
                    let dmx = h2f_s(xb.add(2));

                    let sm = k4_scales_mins(xb.add(4));
                    let mins = _mm256_extracti128_si256::<1>(sm);
                    let scales = _mm256_permute4x64_epi64::<0x44>(sm);

                    let mut s = [_mm256_setzero_si256(); N];
                    let mut hb = if FIVE {
                        ld256(xb.add(16))
                    } else {
                        _mm256_setzero_si256()
                    };
                    let q = xb.add(if FIVE { 48 } else { 16 });
                    for k in 0..4 {
                        let sl = _mm256_shuffle_epi8(scales, lane_mask(2 * k));
                        let sh = _mm256_shuffle_epi8(scales, lane_mask(2 * k + 1));
                        let [lo, hi] = k45_quants::<FIVE>(ld256(q.add(32 * k)), &mut hb);
                        for j in 0..N {
                            let q8 = yi.add(j * ys + 4 + 64 * k);
                            s[j] = mul_acc::<VNNI>(s[j], lo, ld256(q8), sl);
                            s[j] = mul_acc::<VNNI>(s[j], hi, ld256(q8.add(32)), sh);
                        }
                    }
                    for j in 0..N {
                        let yj = yi.add(j * ys);
                        let dy = rd_f32(yj);
                        // mins: sum_k m_k * (bsums[2k] + bsums[2k+1])
                        let pm = k4_mins_dot(mins, yj.add(Q8K_BSUMS));
                        accm[j] =
                            _mm_fmadd_ps(_mm_set1_ps(-dy * dmx), _mm_cvtepi32_ps(pm), accm[j]);
                        acc[j] = _mm256_fmadd_ps(
                            _mm256_set1_ps(dy * dx),
                            _mm256_cvtepi32_ps(s[j]),
                            acc[j],
                        );
                    }
                }
                for j in 0..N {
                    *out.add(j) = hsum(acc[j]) + hsum128(accm[j]);
                }
            }

            /// Q6_K weight row against `N` Q8_K rows.
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn q6k<const N: usize>(
                nb: usize,
                x: *const u8,
                y: *const u8,
                ys: usize,
                out: *mut f32,
            ) {
                let mut acc = [_mm256_setzero_ps(); N];
                for i in 0..nb {
                    let xb = x.add(i * 210);
                    let yi = y.add(i * Q8K_BYTES);
                    let dx = h2f_s(xb.add(208));
                    let sc16 = _mm256_cvtepi8_epi16(ld128(xb.add(192)));
                    let mut s = [_mm256_setzero_si256(); N];
                    let (sc_a, sc_b) = scales16_halves(sc16);
                    for n in 0..2 {
                        let scales = if n == 0 { sc_a } else { sc_b };
                        let [q0, q1, q2, q3] = q6k_quants(xb.add(64 * n), xb.add(128 + 32 * n));
                        let sc0 = _mm256_shuffle_epi8(scales, pair_mask(0));
                        let sc1 = _mm256_shuffle_epi8(scales, pair_mask(1));
                        let sc2 = _mm256_shuffle_epi8(scales, pair_mask(2));
                        let sc3 = _mm256_shuffle_epi8(scales, pair_mask(3));
                        for j in 0..N {
                            let q8 = yi.add(j * ys + 4 + 128 * n);
                            s[j] = mul_acc::<VNNI>(s[j], q0, ld256(q8), sc0);
                            s[j] = mul_acc::<VNNI>(s[j], q1, ld256(q8.add(32)), sc1);
                            s[j] = mul_acc::<VNNI>(s[j], q2, ld256(q8.add(64)), sc2);
                            s[j] = mul_acc::<VNNI>(s[j], q3, ld256(q8.add(96)), sc3);
                        }
                    }
                    for j in 0..N {
                        let yj = yi.add(j * ys);
                        // q is stored +32: subtract 32 * sum_k sc_k * bsums_k.
                        let corr = _mm256_madd_epi16(sc16, ld256(yj.add(Q8K_BSUMS)));
                        let t = _mm256_sub_epi32(s[j], _mm256_slli_epi32::<5>(corr));
                        let d = rd_f32(yj) * dx;
                        acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(t), acc[j]);
                    }
                }
                for j in 0..N {
                    *out.add(j) = hsum(acc[j]);
                }
            }

            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn group<const N: usize>(
                ty: GgmlType,
                nb: usize,
                x: *const u8,
                y: *const u8,
                ys: usize,
                out: *mut f32,
            ) {
                match ty {
                    GgmlType::Q4_0 => legacy::<Q4_0, N>(nb, x, y, ys, out),
                    GgmlType::Q4_1 => legacy::<Q4_1, N>(nb, x, y, ys, out),
                    GgmlType::Q5_0 => legacy::<Q5_0, N>(nb, x, y, ys, out),
                    GgmlType::Q5_1 => legacy::<Q5_1, N>(nb, x, y, ys, out),
                    GgmlType::Q8_0 => legacy::<Q8_0, N>(nb, x, y, ys, out),
                    GgmlType::Q8_1 => legacy::<Q8_1, N>(nb, x, y, ys, out),
                    GgmlType::Q4_K => q45k::<false, N>(nb, x, y, ys, out),
                    GgmlType::Q5_K => q45k::<true, N>(nb, x, y, ys, out),
                    GgmlType::Q6_K => q6k::<N>(nb, x, y, ys, out),
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
                by_fours!(n_act, y, ys, out, N => group::<N>(ty, nb, x, y, ys, out));
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
