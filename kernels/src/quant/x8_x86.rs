//! Q4_0, Q4_1, Q5_0 and Q8_0 dot products in "eight-block lanes" order (declared from
//! `quant/mod.rs`): the single-row kernels behind `vec_dot` and the tile kernels behind
//! `vec_dot_tile_x8`, which must give the same bits.
//!
//! # Order of operations
//!
//! A row of `nb` blocks is taken in groups of eight blocks (the last group may be partial).
//! Per group, for one (weight row, activation row) pair:
//!
//! 1. `isum` (eight i32): lane `k` = the exact integer dot product of block `k`'s quants
//!    (`sum qx * qy`, with Q4_1's `q` in 0..16 and the other kinds' signed). Integer sums are
//!    exact whatever the order, so the two kernels may get them however suits them.
//! 2. `acc = fma(f32(isum), dx * dy, acc)`: one `vcvtdq2ps`, one `vmulps` of the eight
//!    blocks' scales, one `vfmadd` into an eight-lane f32 accumulator (lane `k` sums blocks
//!    `k`, `k + 8`, `k + 16`, ... in that order).
//! 3. Q4_1 only: `acc = fma(mx, sy, acc)` (the `m * s` term of the eight blocks).
//!
//! Lanes of a partial group past `nb` have zero scales and zero sums, so step 2 and 3 leave
//! them unchanged (`fma(0, 0, a) == a`). The result is [`hsum`] of `acc`.
//!
//! The single-row kernels read the usual block layouts: one integer dot per block and an
//! integer `vphaddd` tree (`reduce8`) give `isum`; the scales come from gathers. The tile
//! kernels read the activations in the interleaved layout of [`super::quantize_row_x8`]
//! (see [`GROUP_BYTES`]): there the dot of dword-transposed weights adds block `k`'s
//! products straight into lane `k`, so the three f32 steps are paid once per eight blocks,
//! and the unpacked weights of a row serve every activation row. The weights go unsigned
//! (q + 8, q + 16, q + 128 with VNNI; Q4_1 is unsigned already) and the accumulator starts
//! at minus the offset times the block's quant sum, which the layout carries.
//!
//! Two builds of the same source (`x8_kernels!`): `avx2` (AVX2 + FMA + F16C: `vpmaddubsw`,
//! whose i16 pair sums are summed over several vectors before one `vpmaddwd`, as far as they
//! cannot overflow) and `vnni` (AVX-512 VNNI on 256-bit vectors: `vpdpbusd`). Each build's
//! single-row and tile kernels agree bit for bit; the two builds agree with each other too,
//! since only the integer steps differ.
//!
//! All loads are unaligned and stay inside the blocks the caller passed (masked or skipped
//! loads for a partial group); callers check bounds and CPU features.

#![allow(clippy::missing_safety_doc)]

/// Blocks per group.
pub const GROUP: usize = 8;
/// Bytes of one group of the interleaved activation layout: eight f16 `d`, eight 16-bit
/// second fields (Q8_1: the f16 `s`; Q8_0: the i16 sum of the block's quants), then eight
/// 32-byte vectors `V_0..V_8` where dword `k` of `V_v` holds quants `4v..4v + 4` of block `k`.
pub const GROUP_BYTES: usize = 288;

macro_rules! x8_kernels {
    ($name:ident, $feat:literal, $vnni:literal) => {
        pub mod $name {
            use super::{GROUP, GROUP_BYTES};
            use crate::quant::GgmlType;
            use crate::simd_x86::{by_fours, hsum, ld128, ld256, nibbles, q5_signed, rd_u32};
            use core::arch::x86_64::*;

            const VNNI: bool = $vnni;
            const QOFF: usize = 32;

            // Block kinds (const parameter of the kernels).
            const Q4_0: u8 = 0;
            const Q4_1: u8 = 1;
            const Q5_0: u8 = 2;
            const Q8_0: u8 = 3;

            /// Bytes of a weight block of kind `k`.
            const fn block_bytes(k: u8) -> usize {
                match k {
                    Q4_0 => 18,
                    Q4_1 => 20,
                    Q5_0 => 22,
                    _ => 34,
                }
            }

            /// Bytes of an activation block for kind `k` (Q8_1 for Q4_1, else Q8_0).
            const fn act_bytes(k: u8) -> usize {
                if k == Q4_1 {
                    36
                } else {
                    34
                }
            }

            /// 16 bytes at `p`, or zeros when `on` is false (nothing read then).
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn ld128_if(p: *const u8, on: bool) -> __m128i {
                if on {
                    ld128(p)
                } else {
                    _mm_setzero_si128()
                }
            }

            /// `acc` + the sums of u8(x) * i8(y) over groups of four bytes.
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn dot4(acc: __m256i, x: __m256i, y: __m256i) -> __m256i {
                if VNNI {
                    _mm256_dpbusd_epi32(acc, x, y)
                } else {
                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(x, y), _mm256_set1_epi16(1));
                    _mm256_add_epi32(acc, p)
                }
            }

            /// Step 2 of the order (see the module docs).
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn step(acc: __m256, isum: __m256i, dx: __m256, dy: __m256) -> __m256 {
                _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(dx, dy), acc)
            }

            /// Lane `k` = the sum of the eight i32 lanes of `p[k]`.
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn reduce8(p: &[__m256i; 8]) -> __m256i {
                let a = _mm256_hadd_epi32(p[0], p[1]);
                let b = _mm256_hadd_epi32(p[2], p[3]);
                let c = _mm256_hadd_epi32(p[4], p[5]);
                let d = _mm256_hadd_epi32(p[6], p[7]);
                // Low halves: partial sums of blocks 0..4 (ab) and 4..8 (cd); high halves the
                // rest.
                let ab = _mm256_hadd_epi32(a, b);
                let cd = _mm256_hadd_epi32(c, d);
                _mm256_add_epi32(
                    _mm256_permute2x128_si256::<0x20>(ab, cd),
                    _mm256_permute2x128_si256::<0x31>(ab, cd),
                )
            }

            /// The dwords at `p + k * stride` for the `rem` first of eight blocks, zeros past
            /// them (nothing read there).
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn gather(p: *const u8, stride: usize, rem: usize) -> __m256i {
                let rd = |k: usize| core::ptr::read_unaligned(p.add(k * stride) as *const i32);
                if rem == GROUP {
                    return _mm256_setr_epi32(rd(0), rd(1), rd(2), rd(3), rd(4), rd(5), rd(6), rd(7));
                }
                let mut v = [0i32; GROUP];
                for (k, vk) in v.iter_mut().enumerate().take(rem) {
                    *vk = rd(k);
                }
                _mm256_loadu_si256(v.as_ptr() as *const __m256i)
            }

            /// The f16 in the low (`HI` false) or high half of each dword, as f32.
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn half_f16<const HI: bool>(v: __m256i) -> __m256 {
                if VNNI {
                    let v = if HI { _mm256_srli_epi32::<16>(v) } else { v };
                    _mm256_cvtph_ps(_mm256_cvtepi32_epi16(v))
                } else {
                    let v = if HI {
                        _mm256_srli_epi32::<16>(v)
                    } else {
                        _mm256_and_si256(v, _mm256_set1_epi32(0xFFFF))
                    };
                    // [v0..v3 v0..v3 | v4..v7 v4..v7] as u16, then qwords 0 and 2.
                    let p = _mm256_packus_epi32(v, v);
                    let p = _mm256_permute4x64_epi64::<0x08>(p);
                    _mm256_cvtph_ps(_mm256_castsi256_si128(p))
                }
            }

            /// Transpose of four vectors of two 128-bit halves: dword `i` of half `h` of output
            /// `m` is dword `m` of half `h` of input `i`.
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn transpose4(a: [__m256i; 4]) -> [__m256i; 4] {
                let t0 = _mm256_unpacklo_epi32(a[0], a[1]);
                let t1 = _mm256_unpackhi_epi32(a[0], a[1]);
                let t2 = _mm256_unpacklo_epi32(a[2], a[3]);
                let t3 = _mm256_unpackhi_epi32(a[2], a[3]);
                [
                    _mm256_unpacklo_epi64(t0, t2),
                    _mm256_unpackhi_epi64(t0, t2),
                    _mm256_unpacklo_epi64(t1, t3),
                    _mm256_unpackhi_epi64(t1, t3),
                ]
            }

            /// Dword `k` of output `m` = dword `m` of the 16 bytes at `p + k * stride` (blocks
            /// `k < rem` of eight; zeros past them): with `FULL`, all eight are read.
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn transpose_blocks<const FULL: bool>(
                p: *const u8,
                stride: usize,
                rem: usize,
            ) -> [__m256i; 4] {
                let mut a = [_mm256_setzero_si256(); 4];
                for (k, ak) in a.iter_mut().enumerate() {
                    let (lo, hi) = if FULL {
                        (ld128(p.add(k * stride)), ld128(p.add((k + 4) * stride)))
                    } else {
                        (
                            ld128_if(p.add(k * stride), k < rem),
                            ld128_if(p.add((k + 4) * stride), k + 4 < rem),
                        )
                    };
                    *ak = _mm256_set_m128i(hi, lo);
                }
                transpose4(a)
            }

            // -------------------------------------------------------------------------------
            // Single-row kernels (usual block layouts)
            // -------------------------------------------------------------------------------

            /// The exact integer dot product of one block of kind `K` (at `xb`) with its
            /// activation block (at `yb`), as eight i32 partial sums.
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn block_dot<const K: u8>(xb: *const u8, yb: *const u8) -> __m256i {
                let zero = _mm256_setzero_si256();
                if K == Q4_1 {
                    return dot4(zero, nibbles(xb.add(4)), ld256(yb.add(4)));
                }
                let q = match K {
                    Q4_0 => _mm256_sub_epi8(nibbles(xb.add(2)), _mm256_set1_epi8(8)),
                    Q5_0 => q5_signed::<VNNI>(xb.add(6), rd_u32(xb.add(2))),
                    _ => ld256(xb.add(2)),
                };
                // |q| * (qy with q's sign): exact for qy != -128 (Q8 activations are
                // -127..=127).
                dot4(zero, _mm256_abs_epi8(q), _mm256_sign_epi8(ld256(yb.add(2)), q))
            }

            /// One group (`rem` blocks, at most eight) of kind `K` against its activations.
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn row_group<const K: u8>(
                acc: __m256,
                x: *const u8,
                y: *const u8,
                rem: usize,
            ) -> __m256 {
                let (xs, ys) = (block_bytes(K), act_bytes(K));
                let mut p = [_mm256_setzero_si256(); 8];
                for (k, pk) in p.iter_mut().enumerate().take(rem) {
                    *pk = block_dot::<K>(x.add(xs * k), y.add(ys * k));
                }
                let isum = reduce8(&p);
                let xd = gather(x, xs, rem);
                let yd = gather(y, ys, rem);
                let acc = step(acc, isum, half_f16::<false>(xd), half_f16::<false>(yd));
                if K == Q4_1 {
                    _mm256_fmadd_ps(half_f16::<true>(xd), half_f16::<true>(yd), acc)
                } else {
                    acc
                }
            }

            /// `nb` blocks of kind `K` against their activations, in the module's order.
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn dot_row<const K: u8>(nb: usize, x: *const u8, y: *const u8) -> f32 {
                let (xs, ys) = (block_bytes(K), act_bytes(K));
                let mut acc = _mm256_setzero_ps();
                let mut g = 0;
                while g + GROUP <= nb {
                    acc = row_group::<K>(acc, x.add(g * xs), y.add(g * ys), GROUP);
                    g += GROUP;
                }
                if g < nb {
                    acc = row_group::<K>(acc, x.add(g * xs), y.add(g * ys), nb - g);
                }
                hsum(acc)
            }

            /// `nb` blocks of `ty` (Q4_0, Q4_1, Q5_0 or Q8_0) at `x` against `nb` blocks of
            /// `ty.vec_dot_type()` at `y`, in the module's order.
            #[target_feature(enable = $feat)]
            pub unsafe fn dot(ty: GgmlType, nb: usize, x: *const u8, y: *const u8) -> f32 {
                match ty {
                    GgmlType::Q4_0 => dot_row::<Q4_0>(nb, x, y),
                    GgmlType::Q4_1 => dot_row::<Q4_1>(nb, x, y),
                    GgmlType::Q5_0 => dot_row::<Q5_0>(nb, x, y),
                    GgmlType::Q8_0 => dot_row::<Q8_0>(nb, x, y),
                    _ => unreachable!("x8: no kernel for {ty}"),
                }
            }

            // -------------------------------------------------------------------------------
            // Tile kernels (interleaved activations)
            // -------------------------------------------------------------------------------

            /// The unpacked group of one weight row: `u[v]` pairs with `V_v` of the
            /// activations, lane by lane, as unsigned bytes (the AVX2 build's Q8_0: |q|, with
            /// the signs in `sg`), `dx` and `mx` (Q4_1) per block.
            #[derive(Clone, Copy)]
            struct WGroup {
                u: [__m256i; 8],
                sg: [__m256i; 8],
                dx: __m256,
                mx: __m256,
            }

            /// The offset the unsigned weights of kind `K` carry (0: none).
            const fn offset(k: u8) -> i32 {
                match k {
                    Q4_0 => 8,
                    Q5_0 => 16,
                    Q8_0 if VNNI => 128,
                    _ => 0,
                }
            }

            /// Unpack one group of a weight row of kind `K` (`rem` blocks at `x`).
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn weights<const K: u8, const FULL: bool>(x: *const u8, rem: usize) -> WGroup {
                let xs = block_bytes(K);
                let zero = _mm256_setzero_si256();
                let mut w = WGroup {
                    u: [zero; 8],
                    sg: [zero; 8],
                    dx: _mm256_setzero_ps(),
                    mx: _mm256_setzero_ps(),
                };
                if K == Q8_0 {
                    let lo = transpose_blocks::<FULL>(x.add(2), xs, rem);
                    let hi = transpose_blocks::<FULL>(x.add(18), xs, rem);
                    for m in 0..4 {
                        w.u[m] = lo[m];
                        w.u[m + 4] = hi[m];
                    }
                    for v in 0..8 {
                        if VNNI {
                            w.u[v] = _mm256_xor_si256(w.u[v], _mm256_set1_epi8(0x80u8 as i8));
                        } else {
                            w.sg[v] = w.u[v];
                            w.u[v] = _mm256_abs_epi8(w.u[v]);
                        }
                    }
                } else {
                    // The packed dword `m` of each block gives `V_m` (low nibbles) and
                    // `V_{m+4}` (high).
                    let qs = match K {
                        Q4_0 => 2,
                        Q4_1 => 4,
                        _ => 6,
                    };
                    let p = transpose_blocks::<FULL>(x.add(qs), xs, rem);
                    let m4 = _mm256_set1_epi8(0x0F);
                    for m in 0..4 {
                        w.u[m] = _mm256_and_si256(p[m], m4);
                        w.u[m + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(p[m]), m4);
                    }
                    if K == Q5_0 {
                        // Fifth bit of quant i: bit i of the block's `qh`. Lane k of `V_v`
                        // holds quants 4v..4v + 4: their four bits, spread to bit 4 of each
                        // byte by a multiply (no carries: the copies do not overlap).
                        let qh = gather(x.add(2), xs, rem);
                        let f = _mm256_set1_epi32(0x0F);
                        let spread = _mm256_set1_epi32(0x0204_0810);
                        let keep = _mm256_set1_epi32(0x1010_1010);
                        for v in 0..8 {
                            let t = _mm256_srlv_epi32(qh, _mm256_set1_epi32(4 * v as i32));
                            let t = _mm256_mullo_epi32(_mm256_and_si256(t, f), spread);
                            w.u[v] = _mm256_or_si256(w.u[v], _mm256_and_si256(t, keep));
                        }
                    }
                }
                let d = gather(x, xs, rem);
                w.dx = half_f16::<false>(d);
                if K == Q4_1 {
                    w.mx = half_f16::<true>(d);
                }
                w
            }

            /// The exact integer dot of one unpacked weight group with the interleaved
            /// activation group at `yj` (lane `k`: block `k`), added to `start`.
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn pair_isum<const K: u8>(w: &WGroup, yj: *const u8, start: __m256i) -> __m256i {
                let y = |v: usize| ld256(yj.add(QOFF + 32 * v));
                if VNNI {
                    // Two chains (even and odd vectors) to halve the `vpdpbusd` latency chain.
                    let mut s0 = start;
                    let mut s1 = _mm256_setzero_si256();
                    for v in (0..8).step_by(2) {
                        s0 = _mm256_dpbusd_epi32(s0, w.u[v], y(v));
                        s1 = _mm256_dpbusd_epi32(s1, w.u[v + 1], y(v + 1));
                    }
                    return _mm256_add_epi32(s0, s1);
                }
                let ones = _mm256_set1_epi16(1);
                if K == Q8_0 {
                    let mut s0 = start;
                    let mut s1 = _mm256_setzero_si256();
                    for v in (0..8).step_by(2) {
                        let a = _mm256_sign_epi8(y(v), w.sg[v]);
                        let b = _mm256_sign_epi8(y(v + 1), w.sg[v + 1]);
                        s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(_mm256_maddubs_epi16(w.u[v], a), ones));
                        s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(_mm256_maddubs_epi16(w.u[v + 1], b), ones));
                    }
                    return _mm256_add_epi32(s0, s1);
                }
                // A `vpmaddubsw` lane is at most 2 * 31 * 128 = 7936 (Q5_0) or 2 * 15 * 128 =
                // 3840: four (Q5_0) or all eight of them add up in i16 without overflow.
                let mut h = [_mm256_setzero_si256(); 2];
                for (c, hc) in h.iter_mut().enumerate() {
                    let (a, b) = (_mm256_maddubs_epi16(w.u[4 * c], y(4 * c)), _mm256_maddubs_epi16(w.u[4 * c + 1], y(4 * c + 1)));
                    let (e, f) = (_mm256_maddubs_epi16(w.u[4 * c + 2], y(4 * c + 2)), _mm256_maddubs_epi16(w.u[4 * c + 3], y(4 * c + 3)));
                    *hc = _mm256_add_epi16(_mm256_add_epi16(a, b), _mm256_add_epi16(e, f));
                }
                if K == Q5_0 {
                    let s0 = _mm256_madd_epi16(h[0], ones);
                    let s1 = _mm256_madd_epi16(h[1], ones);
                    _mm256_add_epi32(start, _mm256_add_epi32(s0, s1))
                } else {
                    _mm256_add_epi32(start, _mm256_madd_epi16(_mm256_add_epi16(h[0], h[1]), ones))
                }
            }

            /// One group of `R` weight rows (`xrs` bytes apart from `x`, at the group's first
            /// block) against `N` interleaved activation groups (`ys` bytes apart from `y`).
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn tile_group<const K: u8, const R: usize, const N: usize, const FULL: bool>(
                x: *const u8,
                xrs: usize,
                y: *const u8,
                ys: usize,
                rem: usize,
                acc: &mut [[__m256; N]; R],
            ) {
                let mut w = [weights::<K, FULL>(x, rem); R];
                for (r, wr) in w.iter_mut().enumerate().skip(1) {
                    *wr = weights::<K, FULL>(x.add(r * xrs), rem);
                }
                // Loops by index: `acc` is walked by (row, activation) with the activation
                // outermost.
                #[allow(clippy::needless_range_loop)]
                for j in 0..N {
                    let yj = y.add(j * ys);
                    let dy = _mm256_cvtph_ps(ld128(yj));
                    let second = ld128(yj.add(16));
                    // Start at -offset * (the block's quant sum) to undo the weights' offset.
                    let sum = _mm256_cvtepi16_epi32(second);
                    let start = match offset(K) {
                        8 => _mm256_slli_epi32::<3>(sum),
                        16 => _mm256_slli_epi32::<4>(sum),
                        128 => _mm256_slli_epi32::<7>(sum),
                        _ => _mm256_setzero_si256(),
                    };
                    let start = _mm256_sub_epi32(_mm256_setzero_si256(), start);
                    for (r, wr) in w.iter().enumerate() {
                        let isum = pair_isum::<K>(wr, yj, start);
                        let a = step(acc[r][j], isum, wr.dx, dy);
                        acc[r][j] = if K == Q4_1 {
                            _mm256_fmadd_ps(wr.mx, _mm256_cvtph_ps(second), a)
                        } else {
                            a
                        };
                    }
                }
            }

            /// `R` weight rows against `N` interleaved activation rows: `out[r * os + j]`.
            #[allow(clippy::too_many_arguments)]
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn tile<const K: u8, const R: usize, const N: usize>(
                nb: usize,
                x: *const u8,
                xrs: usize,
                y: *const u8,
                ys: usize,
                out: *mut f32,
                os: usize,
            ) {
                let xs = block_bytes(K);
                let mut acc = [[_mm256_setzero_ps(); N]; R];
                let mut g = 0;
                while g + GROUP <= nb {
                    let (xg, yg) = (x.add(g * xs), y.add(g / GROUP * GROUP_BYTES));
                    tile_group::<K, R, N, true>(xg, xrs, yg, ys, GROUP, &mut acc);
                    g += GROUP;
                }
                if g < nb {
                    let (xg, yg) = (x.add(g * xs), y.add(g / GROUP * GROUP_BYTES));
                    tile_group::<K, R, N, false>(xg, xrs, yg, ys, nb - g, &mut acc);
                }
                for (r, ar) in acc.iter().enumerate() {
                    for (j, &a) in ar.iter().enumerate() {
                        *out.add(r * os + j) = hsum(a);
                    }
                }
            }

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
                for i in 0..n_w {
                    let (x, out) = (x.add(i * xrs), out.add(i * os));
                    // With VNNI, eight activation rows per unpacked weight group where there
                    // are eight (the unpacking costs about as much as four rows' products),
                    // then fours; AVX2's sixteen registers measured no gain from eight.
                    let mut j = 0;
                    while VNNI && j + 8 <= n_act {
                        tile::<K, 1, 8>(nb, x, xrs, y.add(j * ys), ys, out.add(j), os);
                        j += 8;
                    }
                    let (y, out) = (y.add(j * ys), out.add(j));
                    by_fours!(n_act - j, y, ys, out, N => tile::<K, 1, N>(nb, x, xrs, y, ys, out, os));
                }
            }

            /// `out[i * os + j]` = dot of weight row `i` (`nb` blocks of `ty` at `x + i *
            /// xrs`) with the interleaved activation row `j` (at `y + j * ys`), for `i < n_w`,
            /// `j < n_act`; the same bits as [`dot`] on the same data in the usual layout.
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
                    GgmlType::Q4_1 => tile_kind::<Q4_1>(nb, x, xrs, n_w, y, ys, n_act, out, os),
                    GgmlType::Q5_0 => tile_kind::<Q5_0>(nb, x, xrs, n_w, y, ys, n_act, out, os),
                    GgmlType::Q8_0 => tile_kind::<Q8_0>(nb, x, xrs, n_w, y, ys, n_act, out, os),
                    _ => unreachable!("x8 tile: no kernel for {ty}"),
                }
            }
        }
    };
}

x8_kernels!(avx2, "avx2,fma,f16c", false);
x8_kernels!(
    vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    true
);
