//! Q4_1 and Q8_0 dot products for AVX-512 VNNI in "eight-block lanes" order (declared from
//! `quant/mod.rs`): the single-row kernels behind `vec_dot` and the tile kernels behind
//! `vec_dot_tile_x8`, which must give the same bits.
//!
//! # Order of operations
//!
//! A row of `nb` blocks is taken in groups of eight blocks (the last group may be partial).
//! Per group, for one (weight row, activation row) pair:
//!
//! 1. `isum` (eight i32): lane `k` = the exact integer dot product of block `k`'s quants
//!    (Q8_0: `sum qx * qy`; Q4_1: `sum q * qy` with `q` in 0..16). Integer sums are exact
//!    whatever the order, so the two kernels may get them however suits them.
//! 2. `acc = fma(f32(isum), dx * dy, acc)`: one `vcvtdq2ps`, one `vmulps` of the eight
//!    blocks' scales, one `vfmadd` into an eight-lane f32 accumulator (lane `k` sums blocks
//!    `k`, `k + 8`, `k + 16`, ... in that order).
//! 3. Q4_1 only: `acc = fma(mx, sy, acc)` (the `m * s` term of the eight blocks).
//!
//! Lanes of a partial group past `nb` have zero scales and zero sums, so step 2 and 3 leave
//! them unchanged (`fma(0, 0, a) == a`). The result is [`hsum`] of `acc`.
//!
//! The single-row kernels read the usual block layouts: one `vpdpbusd` per block and an
//! integer `vphaddd` tree ([`reduce8`]) give `isum`; the scales come from gathers. The tile
//! kernels read the activations in the interleaved layout of [`super::quantize_row_x8`]
//! (see [`GROUP_BYTES`]): there `vpdpbusd` on dword-transposed weights adds block `k`'s
//! products straight into lane `k`, so a pair costs eight `vpdpbusd` and the three f32 steps
//! per eight blocks, and the unpacked weights of a row serve every activation row.
//!
//! All loads are unaligned and stay inside the blocks the caller passed (masked loads and
//! gathers for a partial group); callers check bounds and CPU features.

#![allow(clippy::missing_safety_doc)]

use super::GgmlType;
use crate::simd_x86::{by_fours, hsum, ld128, ld256, nibbles};
use core::arch::x86_64::*;

/// Blocks per group.
pub const GROUP: usize = 8;
/// Bytes of one group of the interleaved activation layout: eight f16 `d`, eight 16-bit
/// second fields (Q8_1: the f16 `s`; Q8_0: the i16 sum of the block's quants), then eight
/// 32-byte vectors `V_0..V_8` where dword `k` of `V_v` holds quants `4v..4v + 4` of block `k`.
pub const GROUP_BYTES: usize = 288;
const QOFF: usize = 32;

// Block kinds (const parameter of the kernels).
const Q4_1: u8 = 0;
const Q8_0: u8 = 1;

/// 16 bytes at `p`, or zeros when `on` is false (nothing read then).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn ld128_if(p: *const u8, on: bool) -> __m128i {
    _mm_maskz_loadu_epi32(if on { 0xF } else { 0 }, p as *const i32)
}

/// Step 2 of the order (see the module docs).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn step(acc: __m256, isum: __m256i, dx: __m256, dy: __m256) -> __m256 {
    _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(dx, dy), acc)
}

/// Lane `k` = the sum of the eight i32 lanes of `p[k]`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn reduce8(p: &[__m256i; 8]) -> __m256i {
    let a = _mm256_hadd_epi32(p[0], p[1]);
    let b = _mm256_hadd_epi32(p[2], p[3]);
    let c = _mm256_hadd_epi32(p[4], p[5]);
    let d = _mm256_hadd_epi32(p[6], p[7]);
    // Low halves: partial sums of blocks 0..4 (ab) and 4..8 (cd); high halves the rest.
    let ab = _mm256_hadd_epi32(a, b);
    let cd = _mm256_hadd_epi32(c, d);
    _mm256_add_epi32(
        _mm256_permute2x128_si256::<0x20>(ab, cd),
        _mm256_permute2x128_si256::<0x31>(ab, cd),
    )
}

/// The dwords at `p + k * stride` for the `rem` first of eight blocks, zeros past them.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn gather(p: *const u8, stride: i32, rem: usize) -> __m256i {
    if rem == GROUP {
        let s = stride as usize;
        let rd = |k: usize| core::ptr::read_unaligned(p.add(k * s) as *const i32);
        return _mm256_setr_epi32(rd(0), rd(1), rd(2), rd(3), rd(4), rd(5), rd(6), rd(7));
    }
    let idx = _mm256_mullo_epi32(
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        _mm256_set1_epi32(stride),
    );
    let mask = (0xFFu32 >> (8 - rem)) as __mmask8;
    _mm256_mmask_i32gather_epi32::<1>(_mm256_setzero_si256(), mask, idx, p as *const i32)
}

/// The f16 in the low (`HI` false) or high half of each dword, as f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn half_f16<const HI: bool>(v: __m256i) -> __m256 {
    let v = if HI { _mm256_srli_epi32::<16>(v) } else { v };
    _mm256_cvtph_ps(_mm256_cvtepi32_epi16(v))
}

/// Transpose of four vectors of two 128-bit halves: dword `i` of half `h` of output `m` is
/// dword `m` of half `h` of input `i`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
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

/// Dword `k` of output `m` = dword `m` of the 16 bytes at `p + k * stride` (blocks `k <
/// rem` of eight; zeros past them): with `FULL`, all eight are read.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
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

// ---------------------------------------------------------------------------------------------
// Single-row kernels (usual block layouts)
// ---------------------------------------------------------------------------------------------

/// One group (`rem` blocks, at most eight) of Q4_1 x Q8_1.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q4_1_group(acc: __m256, x: *const u8, y: *const u8, rem: usize) -> __m256 {
    let zero = _mm256_setzero_si256();
    let mut p = [zero; 8];
    for (k, pk) in p.iter_mut().enumerate().take(rem) {
        *pk = _mm256_dpbusd_epi32(zero, nibbles(x.add(20 * k + 4)), ld256(y.add(36 * k + 4)));
    }
    let isum = reduce8(&p);
    let xs = gather(x, 20, rem);
    let ys = gather(y, 36, rem);
    let acc = step(acc, isum, half_f16::<false>(xs), half_f16::<false>(ys));
    _mm256_fmadd_ps(half_f16::<true>(xs), half_f16::<true>(ys), acc)
}

/// One group of Q8_0 x Q8_0.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q8_0_group(acc: __m256, x: *const u8, y: *const u8, rem: usize) -> __m256 {
    let zero = _mm256_setzero_si256();
    let mut p = [zero; 8];
    for (k, pk) in p.iter_mut().enumerate().take(rem) {
        let qx = ld256(x.add(34 * k + 2));
        let qy = ld256(y.add(34 * k + 2));
        // |qx| * (qy with qx's sign): exact for qy != -128 (Q8 activations are -127..=127).
        *pk = _mm256_dpbusd_epi32(zero, _mm256_abs_epi8(qx), _mm256_sign_epi8(qy, qx));
    }
    let isum = reduce8(&p);
    let dx = half_f16::<false>(gather(x, 34, rem));
    let dy = half_f16::<false>(gather(y, 34, rem));
    step(acc, isum, dx, dy)
}

/// `nb` blocks of kind `K` (Q4_1 x Q8_1 or Q8_0 x Q8_0), in the module's order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn dot_row<const K: u8>(nb: usize, x: *const u8, y: *const u8) -> f32 {
    let (xs, ys) = if K == Q4_1 { (20, 36) } else { (34, 34) };
    let group = |acc, g: usize, rem| {
        let (x, y) = (x.add(g * xs), y.add(g * ys));
        if K == Q4_1 {
            q4_1_group(acc, x, y, rem)
        } else {
            q8_0_group(acc, x, y, rem)
        }
    };
    let mut acc = _mm256_setzero_ps();
    let mut g = 0;
    while g + GROUP <= nb {
        acc = group(acc, g, GROUP);
        g += GROUP;
    }
    if g < nb {
        acc = group(acc, g, nb - g);
    }
    hsum(acc)
}

/// Q4_1 x Q8_1, `nb` blocks, in the module's order.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn dot_q4_1(nb: usize, x: *const u8, y: *const u8) -> f32 {
    dot_row::<Q4_1>(nb, x, y)
}

/// Q8_0 x Q8_0, `nb` blocks, in the module's order.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn dot_q8_0(nb: usize, x: *const u8, y: *const u8) -> f32 {
    dot_row::<Q8_0>(nb, x, y)
}

// ---------------------------------------------------------------------------------------------
// Tile kernels (interleaved activations)
// ---------------------------------------------------------------------------------------------

/// The unpacked group of one weight row: `u[v]` pairs with `V_v` of the activations, lane
/// by lane (unsigned: Q8_0 quants + 128), `dx` and `mx` (Q4_1) per block.
#[derive(Clone, Copy)]
struct WGroup {
    u: [__m256i; 8],
    dx: __m256,
    mx: __m256,
}

/// Q4_1: the packed dword `m` of each block gives `V_m` (low nibbles) and `V_{m+4}` (high).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q4_1_weights<const FULL: bool>(x: *const u8, rem: usize) -> WGroup {
    let p = transpose_blocks::<FULL>(x.add(4), 20, rem);
    let m4 = _mm256_set1_epi8(0x0F);
    let mut u = [_mm256_setzero_si256(); 8];
    for m in 0..4 {
        u[m] = _mm256_and_si256(p[m], m4);
        u[m + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(p[m]), m4);
    }
    let dm = gather(x, 20, rem);
    WGroup {
        u,
        dx: half_f16::<false>(dm),
        mx: half_f16::<true>(dm),
    }
}

/// Q8_0: dwords 0..4 and 4..8 of each block, + 128.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q8_0_weights<const FULL: bool>(x: *const u8, rem: usize) -> WGroup {
    let lo = transpose_blocks::<FULL>(x.add(2), 34, rem);
    let hi = transpose_blocks::<FULL>(x.add(18), 34, rem);
    let bias = _mm256_set1_epi8(0x80u8 as i8);
    let mut u = [_mm256_setzero_si256(); 8];
    for m in 0..4 {
        u[m] = _mm256_xor_si256(lo[m], bias);
        u[m + 4] = _mm256_xor_si256(hi[m], bias);
    }
    WGroup {
        u,
        dx: half_f16::<false>(gather(x, 34, rem)),
        mx: _mm256_setzero_ps(),
    }
}

/// One group of `R` weight rows (`xrs` bytes apart from `x`, at the group's first block)
/// against `N` interleaved activation groups (`ys` bytes apart from `y`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn tile_group<const K: u8, const R: usize, const N: usize, const FULL: bool>(
    x: *const u8,
    xrs: usize,
    y: *const u8,
    ys: usize,
    rem: usize,
    acc: &mut [[__m256; N]; R],
) {
    let z = _mm256_setzero_ps();
    let mut w = [WGroup {
        u: [_mm256_setzero_si256(); 8],
        dx: z,
        mx: z,
    }; R];
    for (r, wr) in w.iter_mut().enumerate() {
        let xr = x.add(r * xrs);
        *wr = if K == Q4_1 {
            q4_1_weights::<FULL>(xr, rem)
        } else {
            q8_0_weights::<FULL>(xr, rem)
        };
    }
    // Loops by index: `acc` is walked by (row, activation) with the activation outermost.
    #[allow(clippy::needless_range_loop)]
    for j in 0..N {
        let yj = y.add(j * ys);
        let dy = _mm256_cvtph_ps(ld128(yj));
        let second = ld128(yj.add(16));
        // Q8_0: start at -128 * (the block's sum) to undo the weights' bias.
        let start = if K == Q8_0 {
            _mm256_sub_epi32(
                _mm256_setzero_si256(),
                _mm256_slli_epi32::<7>(_mm256_cvtepi16_epi32(second)),
            )
        } else {
            _mm256_setzero_si256()
        };
        for (r, wr) in w.iter().enumerate() {
            // Two chains (even and odd vectors) to halve the `vpdpbusd` latency chain.
            let mut s0 = start;
            let mut s1 = _mm256_setzero_si256();
            for v in (0..8).step_by(2) {
                s0 = _mm256_dpbusd_epi32(s0, wr.u[v], ld256(yj.add(QOFF + 32 * v)));
                s1 = _mm256_dpbusd_epi32(s1, wr.u[v + 1], ld256(yj.add(QOFF + 32 * v + 32)));
            }
            let isum = _mm256_add_epi32(s0, s1);
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
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn tile<const K: u8, const R: usize, const N: usize>(
    nb: usize,
    x: *const u8,
    xrs: usize,
    y: *const u8,
    ys: usize,
    out: *mut f32,
    os: usize,
) {
    let xs = if K == Q4_1 { 20 } else { 34 };
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
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
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
        by_fours!(n_act, y, ys, out, N => tile::<K, 1, N>(nb, x, xrs, y, ys, out, os));
    }
}

/// `out[i * os + j]` = dot of weight row `i` (`nb` blocks of `ty` at `x + i * xrs`) with the
/// interleaved activation row `j` (at `y + j * ys`), for `i < n_w`, `j < n_act`; the same
/// bits as [`dot_q4_1`] / [`dot_q8_0`] on the same data in the usual layout.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
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
        GgmlType::Q4_1 => tile_kind::<Q4_1>(nb, x, xrs, n_w, y, ys, n_act, out, os),
        GgmlType::Q8_0 => tile_kind::<Q8_0>(nb, x, xrs, n_w, y, ys, n_act, out, os),
        _ => unreachable!("x8 tile: no kernel for {ty}"),
    }
}
