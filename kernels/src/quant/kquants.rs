//! K-quants: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K and Q8_K (256-element super-blocks).
//!
//! Blocks are raw little-endian GGUF bytes, read without alignment assumptions. Layouts
//! (byte offsets inside one block) follow ggml's `block_qX_K` structs:
//!
//! | type | layout | bytes |
//! |------|--------|-------|
//! | Q2_K | `scales[16]` `qs[64]` `d:f16` `dmin:f16` | 84 |
//! | Q3_K | `hmask[32]` `qs[64]` `scales[12]` `d:f16` | 110 |
//! | Q4_K | `d:f16` `dmin:f16` `scales[12]` `qs[128]` | 144 |
//! | Q5_K | `d:f16` `dmin:f16` `scales[12]` `qh[32]` `qs[128]` | 176 |
//! | Q6_K | `ql[128]` `qh[64]` `scales:i8[16]` `d:f16` | 210 |
//! | Q8_K | `d:f32` `qs:i8[256]` `bsums:i16[16]` | 292 |
//!
//! The weight quantizers follow ggml's reference (no importance matrix) algorithms; Q8_K's
//! quantizer is bit-exact with `quantize_row_q8_K_ref` on every path (scalar and SIMD).
//! Dot products pair a K-quant weight row with a Q8_K activation row; the SIMD versions
//! (AVX2+FMA+F16C, optionally AVX-512 VNNI) are chosen at run time.

use super::{wrong_type, Family, GgmlType, QK_K};
use crate::cpu::{self, Isa};

#[cfg(target_arch = "x86_64")]
#[path = "kquants_x86.rs"]
mod x86;

pub(crate) const Q2K_BYTES: usize = 84;
pub(crate) const Q3K_BYTES: usize = 110;
pub(crate) const Q4K_BYTES: usize = 144;
pub(crate) const Q5K_BYTES: usize = 176;
pub(crate) const Q6K_BYTES: usize = 210;
pub(crate) const Q8K_BYTES: usize = 292;
/// Offset of `bsums` inside a Q8_K block.
pub(crate) const Q8K_BSUMS: usize = 4 + QK_K;

const GROUP_MAX_EPS: f32 = 1e-15;

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

#[inline(always)]
fn f16_at(b: &[u8], off: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[off], b[off + 1]])).to_f32()
}

#[inline(always)]
fn put_f16(b: &mut [u8], off: usize, v: f32) {
    b[off..off + 2].copy_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes());
}

#[inline(always)]
fn f32_at(b: &[u8], off: usize) -> f32 {
    f32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

#[inline(always)]
fn i16_at(b: &[u8], off: usize) -> i16 {
    i16::from_le_bytes([b[off], b[off + 1]])
}

/// ggml's `nearest_int`: round half to even via the 1.5*2^23 trick (exact for |x| < 2^22;
/// deterministic, never panicking, for anything else).
#[inline(always)]
pub(crate) fn nearest_int(f: f32) -> i32 {
    let v = f + 12_582_912.0f32;
    (v.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// Q4_K / Q5_K packed 6-bit scales and mins: returns (scales[8], mins[8]).
#[inline(always)]
fn k4_scales_mins(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let w0 = u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
    let w1 = u32::from_le_bytes([s[4], s[5], s[6], s[7]]);
    let w2 = u32::from_le_bytes([s[8], s[9], s[10], s[11]]);
    let sc_lo = w0 & 0x3f3f_3f3f;
    let m_lo = w1 & 0x3f3f_3f3f;
    let sc_hi = (w2 & 0x0f0f_0f0f) | (((w0 >> 6) & 0x0303_0303) << 4);
    let m_hi = ((w2 >> 4) & 0x0f0f_0f0f) | (((w1 >> 6) & 0x0303_0303) << 4);
    let mut sc = [0u8; 8];
    let mut m = [0u8; 8];
    sc[..4].copy_from_slice(&sc_lo.to_le_bytes());
    sc[4..].copy_from_slice(&sc_hi.to_le_bytes());
    m[..4].copy_from_slice(&m_lo.to_le_bytes());
    m[4..].copy_from_slice(&m_hi.to_le_bytes());
    (sc, m)
}

/// Q3_K packed 6-bit scales (12 bytes) -> 16 signed scales (value - 32).
#[inline(always)]
fn q3_scales(s: &[u8]) -> [i8; 16] {
    let mut out = [0i8; 16];
    for (j, o) in out.iter_mut().enumerate() {
        let lo = if j < 8 { s[j] & 0xF } else { s[j - 8] >> 4 };
        let hi = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
        *o = ((lo | (hi << 4)) as i8).wrapping_sub(32);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Block decoders to integer quants (shared by dequantization and the scalar dot products)
// ---------------------------------------------------------------------------------------------

fn q2k_quants(b: &[u8], q: &mut [i8; QK_K]) {
    let qs = &b[16..80];
    for n in 0..2 {
        for j in 0..4 {
            let out = &mut q[n * 128 + j * 32..n * 128 + j * 32 + 32];
            for (o, &v) in out.iter_mut().zip(&qs[n * 32..n * 32 + 32]) {
                *o = ((v >> (2 * j)) & 3) as i8;
            }
        }
    }
}

fn q3k_quants(b: &[u8], q: &mut [i8; QK_K]) {
    let hm = &b[0..32];
    let qs = &b[32..96];
    for n in 0..2 {
        for j in 0..4 {
            let out = &mut q[n * 128 + j * 32..n * 128 + j * 32 + 32];
            let bits = qs[n * 32..n * 32 + 32].iter().zip(hm);
            for (o, (&v, &h)) in out.iter_mut().zip(bits) {
                let high = (h >> (n * 4 + j)) & 1;
                *o = ((v >> (2 * j)) & 3) as i8 - 4 + 4 * high as i8;
            }
        }
    }
}

fn q4k_quants(b: &[u8], q: &mut [i8; QK_K]) {
    let qs = &b[16..144];
    for c in 0..4 {
        for l in 0..32 {
            let byte = qs[c * 32 + l];
            q[c * 64 + l] = (byte & 0xF) as i8;
            q[c * 64 + 32 + l] = (byte >> 4) as i8;
        }
    }
}

fn q5k_quants(b: &[u8], q: &mut [i8; QK_K]) {
    let qh = &b[16..48];
    let qs = &b[48..176];
    for c in 0..4 {
        for l in 0..32 {
            let byte = qs[c * 32 + l];
            let h1 = (qh[l] >> (2 * c)) & 1;
            let h2 = (qh[l] >> (2 * c + 1)) & 1;
            q[c * 64 + l] = ((byte & 0xF) | (h1 << 4)) as i8;
            q[c * 64 + 32 + l] = ((byte >> 4) | (h2 << 4)) as i8;
        }
    }
}

fn q6k_quants(b: &[u8], q: &mut [i8; QK_K]) {
    let ql = &b[0..128];
    let qh = &b[128..192];
    for n in 0..2 {
        let ql = &ql[n * 64..];
        let qh = &qh[n * 32..];
        let q = &mut q[n * 128..];
        for l in 0..32 {
            let h = qh[l];
            q[l] = ((ql[l] & 0xF) | ((h & 3) << 4)) as i8 - 32;
            q[l + 32] = ((ql[l + 32] & 0xF) | (((h >> 2) & 3) << 4)) as i8 - 32;
            q[l + 64] = ((ql[l] >> 4) | (((h >> 4) & 3) << 4)) as i8 - 32;
            q[l + 96] = ((ql[l + 32] >> 4) | (((h >> 6) & 3) << 4)) as i8 - 32;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Dequantization
// ---------------------------------------------------------------------------------------------

fn dequant_q2k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 80);
    let dmin = f16_at(b, 82);
    let mut q = [0i8; QK_K];
    q2k_quants(b, &mut q);
    for (s, (yc, qc)) in y.chunks_exact_mut(16).zip(q.chunks_exact(16)).enumerate() {
        let sc = b[s];
        let dl = d * (sc & 0xF) as f32;
        let ml = dmin * (sc >> 4) as f32;
        for (o, &v) in yc.iter_mut().zip(qc) {
            *o = dl * v as f32 - ml;
        }
    }
}

fn dequant_q3k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 108);
    let sc = q3_scales(&b[96..108]);
    let mut q = [0i8; QK_K];
    q3k_quants(b, &mut q);
    for (s, (yc, qc)) in y.chunks_exact_mut(16).zip(q.chunks_exact(16)).enumerate() {
        let dl = d * sc[s] as f32;
        for (o, &v) in yc.iter_mut().zip(qc) {
            *o = dl * v as f32;
        }
    }
}

fn dequant_q45k(b: &[u8], y: &mut [f32], five: bool) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let (sc, m) = k4_scales_mins(&b[4..16]);
    let mut q = [0i8; QK_K];
    if five {
        q5k_quants(b, &mut q);
    } else {
        q4k_quants(b, &mut q);
    }
    for (s, (yc, qc)) in y.chunks_exact_mut(32).zip(q.chunks_exact(32)).enumerate() {
        let dl = d * sc[s] as f32;
        let ml = dmin * m[s] as f32;
        for (o, &v) in yc.iter_mut().zip(qc) {
            *o = dl * v as f32 - ml;
        }
    }
}

fn dequant_q6k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 208);
    let mut q = [0i8; QK_K];
    q6k_quants(b, &mut q);
    for (s, (yc, qc)) in y.chunks_exact_mut(16).zip(q.chunks_exact(16)).enumerate() {
        let dl = d * (b[192 + s] as i8) as f32;
        for (o, &v) in yc.iter_mut().zip(qc) {
            *o = dl * v as f32;
        }
    }
}

fn dequant_q8k(b: &[u8], y: &mut [f32]) {
    let d = f32_at(b, 0);
    for (o, &v) in y.iter_mut().zip(&b[4..4 + QK_K]) {
        *o = d * (v as i8) as f32;
    }
}

/// Dequantize `dst.len() / 256` blocks of `ty` from `src`.
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    let f: fn(&[u8], &mut [f32]) = match ty {
        GgmlType::Q2_K => dequant_q2k,
        GgmlType::Q3_K => dequant_q3k,
        GgmlType::Q4_K => |b, y| dequant_q45k(b, y, false),
        GgmlType::Q5_K => |b, y| dequant_q45k(b, y, true),
        GgmlType::Q6_K => dequant_q6k,
        GgmlType::Q8_K => dequant_q8k,
        _ => wrong_type(Family::K, ty),
    };
    for (b, y) in src
        .chunks_exact(ty.type_size())
        .zip(dst.chunks_exact_mut(QK_K))
    {
        f(b, y);
    }
}

// ---------------------------------------------------------------------------------------------
// Quantization helpers (ggml's reference algorithms, no importance matrix)
// ---------------------------------------------------------------------------------------------

/// ggml `make_qx_quants` with `qw == NULL`. `l` receives values in `0..2*nmax`.
fn make_qx_quants(nmax: i32, x: &[f32], l: &mut [i8], rmse_type: i32) -> f32 {
    let n = x.len();
    let mut max = 0f32;
    let mut amax = 0f32;
    for &v in x {
        let ax = v.abs();
        if ax > amax {
            amax = ax;
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l[..n].fill(0);
        return 0.0;
    }
    let mut iscale = -(nmax as f32) / max;
    if rmse_type == 0 {
        for (li, &v) in l.iter_mut().zip(x) {
            let q = nearest_int(iscale * v);
            *li = (nmax + q.clamp(-nmax, nmax - 1)) as i8;
        }
        return 1.0 / iscale;
    }
    let (rmse_type, return_early) = if rmse_type < 0 {
        (-rmse_type, true)
    } else {
        (rmse_type, false)
    };
    let weight = |v: f32| -> f32 {
        match rmse_type {
            1 => v * v,
            2 => 1.0,
            3 => v.abs(),
            _ => v.abs().sqrt(),
        }
    };
    let mut sumlx = 0f32;
    let mut suml2 = 0f32;
    for (li, &v) in l.iter_mut().zip(x) {
        let q = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
        *li = (q + nmax) as i8;
        let w = weight(v);
        sumlx += w * v * q as f32;
        suml2 += w * (q * q) as f32;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    if return_early {
        return if suml2 > 0.0 {
            0.5 * (scale + 1.0 / iscale)
        } else {
            1.0 / iscale
        };
    }
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for &v in x {
            let q = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
            let w = weight(v);
            sumlx += w * v * q as f32;
            suml2 += w * (q * q) as f32;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (li, &v) in l.iter_mut().zip(x) {
                let q = nearest_int(iscale * v);
                *li = (nmax + q.clamp(-nmax, nmax - 1)) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// ggml `make_q3_quants`. `l` receives values in `0..2*nmax`.
fn make_q3_quants(nmax: i32, x: &[f32], l: &mut [i8], do_rmse: bool) -> f32 {
    let n = x.len();
    let mut max = 0f32;
    let mut amax = 0f32;
    for &v in x {
        let ax = v.abs();
        if ax > amax {
            amax = ax;
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l[..n].fill(0);
        return 0.0;
    }
    let iscale = -(nmax as f32) / max;
    if do_rmse {
        let mut sumlx = 0f32;
        let mut suml2 = 0f32;
        for (li, &v) in l.iter_mut().zip(x) {
            let q = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
            *li = q as i8;
            let w = v * v;
            sumlx += w * v * q as f32;
            suml2 += w * (q * q) as f32;
        }
        for _ in 0..5 {
            let mut n_changed = 0;
            for i in 0..n {
                let v = x[i];
                let w = v * v;
                let li = l[i] as i32;
                let mut slx = sumlx - w * v * li as f32;
                if slx > 0.0 {
                    let mut sl2 = suml2 - w * (li * li) as f32;
                    let new_l = nearest_int(v * sl2 / slx).clamp(-nmax, nmax - 1);
                    if new_l != li {
                        slx += w * v * new_l as f32;
                        sl2 += w * (new_l * new_l) as f32;
                        if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                            l[i] = new_l as i8;
                            sumlx = slx;
                            suml2 = sl2;
                            n_changed += 1;
                        }
                    }
                }
            }
            if n_changed == 0 {
                break;
            }
        }
        for li in l[..n].iter_mut() {
            *li += nmax as i8;
        }
        return if suml2 > 0.0 { sumlx / suml2 } else { 0.0 };
    }
    for (li, &v) in l.iter_mut().zip(x) {
        let q = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
        *li = (q + nmax) as i8;
    }
    1.0 / iscale
}

/// ggml `make_qkx2_quants`. Returns (scale, -min); `l` receives values in `0..=nmax`.
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    l: &mut [u8],
    laux: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
) -> (f32, f32) {
    let n = x.len();
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l[..n].fill(0);
        return (0.0, -min);
    }
    let err = |d: f32| if use_mad { d.abs() } else { d * d };
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = q as u8;
        let diff = scale * l[i] as f32 + min - x[i];
        best_error += weights[i] * err(diff);
    }
    if nstep < 1 {
        return (scale, -min);
    }
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let mut sum_l = 0f32;
        let mut sum_l2 = 0f32;
        let mut sum_xl = 0f32;
        for i in 0..n {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = q as u8;
            let w = weights[i];
            let lf = q as f32;
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let dd = sum_w * sum_l2 - sum_l * sum_l;
        if dd > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / dd;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / dd;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur_error += weights[i] * err(diff);
            }
            if cur_error < best_error {
                l[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

// ---------------------------------------------------------------------------------------------
// Quantization
// ---------------------------------------------------------------------------------------------

/// Pack 2-bit quants (values 0..3, ggml's Q2_K/Q3_K order) into 64 bytes.
fn pack_2bit(l: &[u8; QK_K], qs: &mut [u8]) {
    for j in (0..QK_K).step_by(128) {
        for i in 0..32 {
            qs[j / 4 + i] =
                l[j + i] | (l[j + i + 32] << 2) | (l[j + i + 64] << 4) | (l[j + i + 96] << 6);
        }
    }
}

fn quant_q2k(x: &[f32], y: &mut [u8]) {
    const Q4SCALE: f32 = 15.0;
    let mut l = [0u8; QK_K];
    let mut laux = [0u8; 16];
    let mut weights = [0f32; 16];
    let mut mins = [0f32; 16];
    let mut scales = [0f32; 16];
    let mut max_scale = 0f32;
    let mut max_min = 0f32;
    for j in 0..16 {
        let xs = &x[16 * j..16 * j + 16];
        for (w, &v) in weights.iter_mut().zip(xs) {
            *w = v.abs();
        }
        let (s, m) = make_qkx2_quants(
            3,
            xs,
            &weights,
            &mut l[16 * j..16 * j + 16],
            &mut laux,
            -0.5,
            0.1,
            15,
            true,
        );
        scales[j] = s;
        mins[j] = m;
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    let mut sc = [0u8; 16];
    if max_scale > 0.0 {
        let iscale = Q4SCALE / max_scale;
        for j in 0..16 {
            sc[j] = nearest_int(iscale * scales[j]) as u8;
        }
        put_f16(y, 80, max_scale / Q4SCALE);
    } else {
        put_f16(y, 80, 0.0);
    }
    if max_min > 0.0 {
        let iscale = Q4SCALE / max_min;
        for j in 0..16 {
            let q = nearest_int(iscale * mins[j]);
            sc[j] |= (q << 4) as u8;
        }
        put_f16(y, 82, max_min / Q4SCALE);
    } else {
        put_f16(y, 82, 0.0);
    }
    y[0..16].copy_from_slice(&sc);
    let dd = f16_at(y, 80);
    let dm = f16_at(y, 82);
    for j in 0..16 {
        let d = dd * (sc[j] & 0xF) as f32;
        if d == 0.0 {
            continue;
        }
        let m = dm * (sc[j] >> 4) as f32;
        for ii in 0..16 {
            let q = nearest_int((x[16 * j + ii] + m) / d);
            l[16 * j + ii] = q.clamp(0, 3) as u8;
        }
    }
    pack_2bit(&l, &mut y[16..80]);
}

fn quant_q3k(x: &[f32], y: &mut [u8]) {
    let mut l = [0i8; QK_K];
    let mut scales = [0f32; 16];
    let mut max_scale = 0f32;
    let mut amax = 0f32;
    for j in 0..16 {
        scales[j] = make_q3_quants(
            4,
            &x[16 * j..16 * j + 16],
            &mut l[16 * j..16 * j + 16],
            true,
        );
        let s = scales[j].abs();
        if s > amax {
            amax = s;
            max_scale = scales[j];
        }
    }
    let mut sb = [0u8; 12];
    if max_scale != 0.0 {
        let iscale = -32.0 / max_scale;
        for j in 0..16 {
            // ggml stores nearest_int into an int8_t before clamping.
            let q = (nearest_int(iscale * scales[j]) as i8).clamp(-32, 31) + 32;
            let q = q as u8;
            if j < 8 {
                sb[j] = q & 0xF;
            } else {
                sb[j - 8] |= (q & 0xF) << 4;
            }
            sb[j % 4 + 8] |= (q >> 4) << (2 * (j / 4));
        }
        put_f16(y, 108, 1.0 / iscale);
    } else {
        put_f16(y, 108, 0.0);
    }
    y[96..108].copy_from_slice(&sb);
    let dd = f16_at(y, 108);
    let sc = q3_scales(&sb);
    for j in 0..16 {
        let d = dd * sc[j] as f32;
        if d == 0.0 {
            continue;
        }
        for ii in 0..16 {
            let q = nearest_int(x[16 * j + ii] / d).clamp(-4, 3);
            l[16 * j + ii] = (q + 4) as i8;
        }
    }
    let hm = &mut y[0..32];
    hm.fill(0);
    let mut lu = [0u8; QK_K];
    for (j, (&v, o)) in l.iter().zip(lu.iter_mut()).enumerate() {
        let mut v = v as u8;
        if v > 3 {
            hm[j % 32] |= 1 << (j / 32);
            v -= 4;
        }
        *o = v;
    }
    pack_2bit(&lu, &mut y[32..96]);
}

/// Shared by Q4_K and Q5_K: returns the quants (0..=nmax) and writes d, dmin, scales.
fn quant_q45k_common(x: &[f32], y: &mut [u8], nmax: i32) -> [u8; QK_K] {
    let (rmin, nstep) = if nmax == 15 { (-1.0, 20) } else { (-0.5, 15) };
    let mut l = [0u8; QK_K];
    let mut laux = [0u8; 32];
    let mut weights = [0f32; 32];
    let mut mins = [0f32; 8];
    let mut scales = [0f32; 8];
    let mut max_scale = 0f32;
    let mut max_min = 0f32;
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, &v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        let (s, m) = make_qkx2_quants(
            nmax,
            xs,
            &weights,
            &mut l[32 * j..32 * j + 32],
            &mut laux,
            rmin,
            0.1,
            nstep,
            false,
        );
        scales[j] = s;
        mins[j] = m;
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut sb = [0u8; 12];
    for j in 0..8 {
        // ggml stores nearest_int into a uint8_t before MIN(63, ..).
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            sb[j] = ls;
            sb[j + 4] = lm;
        } else {
            sb[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            sb[j - 4] |= (ls >> 4) << 6;
            sb[j] |= (lm >> 4) << 6;
        }
    }
    put_f16(y, 0, max_scale / 63.0);
    put_f16(y, 2, max_min / 63.0);
    y[4..16].copy_from_slice(&sb);
    let dd = f16_at(y, 0);
    let dm = f16_at(y, 2);
    let (sc, m) = k4_scales_mins(&sb);
    for j in 0..8 {
        let d = dd * sc[j] as f32;
        if d == 0.0 {
            continue;
        }
        let mm = dm * m[j] as f32;
        for ii in 0..32 {
            let q = nearest_int((x[32 * j + ii] + mm) / d);
            l[32 * j + ii] = q.clamp(0, nmax) as u8;
        }
    }
    l
}

fn quant_q4k(x: &[f32], y: &mut [u8]) {
    let l = quant_q45k_common(x, y, 15);
    let qs = &mut y[16..144];
    for c in 0..4 {
        for i in 0..32 {
            qs[c * 32 + i] = l[c * 64 + i] | (l[c * 64 + 32 + i] << 4);
        }
    }
}

fn quant_q5k(x: &[f32], y: &mut [u8]) {
    let l = quant_q45k_common(x, y, 31);
    let (qh, qs) = y[16..176].split_at_mut(32);
    qh.fill(0);
    for c in 0..4 {
        for i in 0..32 {
            let mut l1 = l[c * 64 + i];
            let mut l2 = l[c * 64 + 32 + i];
            if l1 > 15 {
                l1 -= 16;
                qh[i] |= 1 << (2 * c);
            }
            if l2 > 15 {
                l2 -= 16;
                qh[i] |= 2 << (2 * c);
            }
            qs[c * 32 + i] = l1 | (l2 << 4);
        }
    }
}

fn quant_q6k(x: &[f32], y: &mut [u8]) {
    let mut l = [0i8; QK_K];
    let mut scales = [0f32; 16];
    let mut max_scale = 0f32;
    let mut max_abs_scale = 0f32;
    for ib in 0..16 {
        let s = make_qx_quants(
            32,
            &x[16 * ib..16 * ib + 16],
            &mut l[16 * ib..16 * ib + 16],
            1,
        );
        scales[ib] = s;
        if s.abs() > max_abs_scale {
            max_abs_scale = s.abs();
            max_scale = s;
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        y[..Q6K_BYTES].fill(0);
        return;
    }
    let iscale = -128.0 / max_scale;
    put_f16(y, 208, 1.0 / iscale);
    for ib in 0..16 {
        // MIN(127, ..) then stored as int8_t (wrapping).
        y[192 + ib] = nearest_int(iscale * scales[ib]).min(127) as i8 as u8;
    }
    let dd = f16_at(y, 208);
    for j in 0..16 {
        let d = dd * (y[192 + j] as i8) as f32;
        if d == 0.0 {
            continue;
        }
        for ii in 0..16 {
            let q = nearest_int(x[16 * j + ii] / d).clamp(-32, 31);
            l[16 * j + ii] = (q + 32) as i8;
        }
    }
    let (ql, qh) = y[0..192].split_at_mut(128);
    for n in 0..2 {
        let lb = &l[n * 128..];
        let ql = &mut ql[n * 64..];
        let qh = &mut qh[n * 32..];
        for i in 0..32 {
            let q1 = lb[i] as u8;
            let q2 = lb[i + 32] as u8;
            let q3 = lb[i + 64] as u8;
            let q4 = lb[i + 96] as u8;
            ql[i] = (q1 & 0xF) | ((q3 & 0xF) << 4);
            ql[i + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4);
            qh[i] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
        }
    }
}

/// ggml `quantize_row_q8_K_ref` for one block (scalar).
pub(crate) fn quant_q8k_scalar(x: &[f32], y: &mut [u8]) {
    let mut max = 0f32;
    let mut amax = 0f32;
    for &v in &x[..QK_K] {
        let ax = v.abs();
        if ax > amax {
            amax = ax;
            max = v;
        }
    }
    if amax == 0.0 {
        y[..Q8K_BYTES].fill(0);
        return;
    }
    let iscale = -127.0 / max;
    let mut qs = [0i8; QK_K];
    for (q, &v) in qs.iter_mut().zip(x) {
        *q = nearest_int(iscale * v).min(127) as i8;
    }
    y[0..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
    for (o, &q) in y[4..4 + QK_K].iter_mut().zip(&qs) {
        *o = q as u8;
    }
    for j in 0..16 {
        let s: i32 = qs[16 * j..16 * j + 16].iter().map(|&q| q as i32).sum();
        let off = Q8K_BSUMS + 2 * j;
        y[off..off + 2].copy_from_slice(&(s as i16).to_le_bytes());
    }
}

/// Quantize `src.len() / 256` blocks into `dst`. Q8_K uses SIMD when available; the bytes are
/// identical to the scalar reference.
pub fn quantize_row(ty: GgmlType, src: &[f32], dst: &mut [u8]) {
    if ty == GgmlType::Q8_K {
        let blocks = src.chunks_exact(QK_K).zip(dst.chunks_exact_mut(Q8K_BYTES));
        #[cfg(target_arch = "x86_64")]
        if cpu::isa() != Isa::Scalar {
            for (x, y) in blocks {
                // SAFETY: the CPU runs AVX2, FMA and F16C; `x` holds 256 floats, `y` 292 bytes.
                unsafe { x86::quant_q8k_block(x.as_ptr(), y.as_mut_ptr()) };
            }
            return;
        }
        for (x, y) in blocks {
            quant_q8k_scalar(x, y);
        }
        return;
    }
    let f: fn(&[f32], &mut [u8]) = match ty {
        GgmlType::Q2_K => quant_q2k,
        GgmlType::Q3_K => quant_q3k,
        GgmlType::Q4_K => quant_q4k,
        GgmlType::Q5_K => quant_q5k,
        GgmlType::Q6_K => quant_q6k,
        _ => wrong_type(Family::K, ty),
    };
    for (x, y) in src
        .chunks_exact(QK_K)
        .zip(dst.chunks_exact_mut(ty.type_size()))
    {
        f(x, y);
    }
}

// ---------------------------------------------------------------------------------------------
// Dot products (scalar twins)
// ---------------------------------------------------------------------------------------------

#[inline(always)]
fn dot16(q: &[i8], a: &[u8]) -> i32 {
    q.iter()
        .zip(a)
        .map(|(&x, &y)| x as i32 * (y as i8) as i32)
        .sum()
}

#[inline(always)]
fn bsum(a: &[u8], j: usize) -> i32 {
    i16_at(a, Q8K_BSUMS + 2 * j) as i32
}

fn dot_q2k_scalar(nb: usize, w: &[u8], act: &[u8]) -> f32 {
    let mut sum = 0f32;
    let mut q = [0i8; QK_K];
    for (b, a) in w
        .chunks_exact(Q2K_BYTES)
        .zip(act.chunks_exact(Q8K_BYTES))
        .take(nb)
    {
        let dy = f32_at(a, 0);
        let d = dy * f16_at(b, 80);
        let dmin = dy * f16_at(b, 82);
        q2k_quants(b, &mut q);
        let aq = &a[4..4 + QK_K];
        let mut sumi = 0i32;
        let mut summ = 0i32;
        for j in 0..16 {
            let sc = b[j];
            sumi += (sc & 0xF) as i32 * dot16(&q[16 * j..16 * j + 16], &aq[16 * j..16 * j + 16]);
            summ += (sc >> 4) as i32 * bsum(a, j);
        }
        sum += d * sumi as f32 - dmin * summ as f32;
    }
    sum
}

fn dot_q3k_scalar(nb: usize, w: &[u8], act: &[u8]) -> f32 {
    let mut sum = 0f32;
    let mut q = [0i8; QK_K];
    for (b, a) in w
        .chunks_exact(Q3K_BYTES)
        .zip(act.chunks_exact(Q8K_BYTES))
        .take(nb)
    {
        let d = f32_at(a, 0) * f16_at(b, 108);
        let sc = q3_scales(&b[96..108]);
        q3k_quants(b, &mut q);
        let aq = &a[4..4 + QK_K];
        let mut sumi = 0i32;
        for j in 0..16 {
            sumi += sc[j] as i32 * dot16(&q[16 * j..16 * j + 16], &aq[16 * j..16 * j + 16]);
        }
        sum += d * sumi as f32;
    }
    sum
}

fn dot_q45k_scalar(nb: usize, w: &[u8], act: &[u8], five: bool) -> f32 {
    let bytes = if five { Q5K_BYTES } else { Q4K_BYTES };
    let mut sum = 0f32;
    let mut q = [0i8; QK_K];
    for (b, a) in w
        .chunks_exact(bytes)
        .zip(act.chunks_exact(Q8K_BYTES))
        .take(nb)
    {
        let dy = f32_at(a, 0);
        let d = dy * f16_at(b, 0);
        let dmin = dy * f16_at(b, 2);
        let (sc, m) = k4_scales_mins(&b[4..16]);
        if five {
            q5k_quants(b, &mut q);
        } else {
            q4k_quants(b, &mut q);
        }
        let aq = &a[4..4 + QK_K];
        let mut sumi = 0i32;
        let mut summ = 0i32;
        for j in 0..8 {
            sumi += sc[j] as i32 * dot16(&q[32 * j..32 * j + 32], &aq[32 * j..32 * j + 32]);
            summ += m[j] as i32 * (bsum(a, 2 * j) + bsum(a, 2 * j + 1));
        }
        sum += d * sumi as f32 - dmin * summ as f32;
    }
    sum
}

fn dot_q6k_scalar(nb: usize, w: &[u8], act: &[u8]) -> f32 {
    let mut sum = 0f32;
    let mut q = [0i8; QK_K];
    for (b, a) in w
        .chunks_exact(Q6K_BYTES)
        .zip(act.chunks_exact(Q8K_BYTES))
        .take(nb)
    {
        let d = f32_at(a, 0) * f16_at(b, 208);
        q6k_quants(b, &mut q);
        let aq = &a[4..4 + QK_K];
        let mut sumi = 0i32;
        for j in 0..16 {
            let sc = b[192 + j] as i8 as i32;
            sumi += sc * dot16(&q[16 * j..16 * j + 16], &aq[16 * j..16 * j + 16]);
        }
        sum += d * sumi as f32;
    }
    sum
}

/// Q8_K · Q8_K (not a ggml pairing; provided so that every K type has a dot product).
fn dot_q8k_scalar(nb: usize, w: &[u8], act: &[u8]) -> f32 {
    let mut sum = 0f32;
    for (b, a) in w
        .chunks_exact(Q8K_BYTES)
        .zip(act.chunks_exact(Q8K_BYTES))
        .take(nb)
    {
        let d = f32_at(a, 0) * f32_at(b, 0);
        let sumi: i32 = b[4..4 + QK_K]
            .iter()
            .zip(&a[4..4 + QK_K])
            .map(|(&x, &y)| (x as i8) as i32 * (y as i8) as i32)
            .sum();
        sum += d * sumi as f32;
    }
    sum
}

/// Scalar twin of [`vec_dot`].
pub fn vec_dot_scalar(ty: GgmlType, n: usize, w: &[u8], act: &[u8]) -> f32 {
    let nb = n / QK_K;
    match ty {
        GgmlType::Q2_K => dot_q2k_scalar(nb, w, act),
        GgmlType::Q3_K => dot_q3k_scalar(nb, w, act),
        GgmlType::Q4_K => dot_q45k_scalar(nb, w, act, false),
        GgmlType::Q5_K => dot_q45k_scalar(nb, w, act, true),
        GgmlType::Q6_K => dot_q6k_scalar(nb, w, act),
        GgmlType::Q8_K => dot_q8k_scalar(nb, w, act),
        _ => wrong_type(Family::K, ty),
    }
}

/// Dot product of a K-quant weight row (`n` elements) with a Q8_K activation row.
/// SIMD chosen at run time; rows too short for `n` go to [`vec_dot_scalar`], which reads only
/// the whole blocks they hold.
#[inline]
pub fn vec_dot(ty: GgmlType, n: usize, w: &[u8], act: &[u8]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        let isa = cpu::isa();
        let nb = n / QK_K;
        if isa != Isa::Scalar
            && ty.family() == Family::K
            && w.len() >= nb * ty.type_size()
            && act.len() >= nb * Q8K_BYTES
        {
            let (x, y) = (w.as_ptr(), act.as_ptr());
            // `vpdpwssd` measured faster for Q3_K/Q5_K/Q6_K on Zen 4 and slightly slower for
            // Q2_K/Q4_K (LLVM re-splits much of it into vpmaddwd + vpaddd anyway).
            let vnni =
                cpu::vnni(isa) && matches!(ty, GgmlType::Q3_K | GgmlType::Q5_K | GgmlType::Q6_K);
            // SAFETY: the CPU runs `isa` (and VNNI where `cpu::vnni` says so); `nb` blocks of
            // both operands are in bounds (checked above).
            unsafe {
                return if vnni {
                    x86::dot_vnni(ty, nb, x, y)
                } else {
                    x86::dot_avx2(ty, nb, x, y)
                };
            }
        }
    }
    vec_dot_scalar(ty, n, w, act)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_int_rounds_half_even() {
        assert_eq!(nearest_int(0.5), 0);
        assert_eq!(nearest_int(1.5), 2);
        assert_eq!(nearest_int(-2.5), -2);
        assert_eq!(nearest_int(-2.6), -3);
        assert_eq!(nearest_int(126.7), 127);
    }
}
