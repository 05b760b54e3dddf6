//! Products of several rows at once (prefill): one weight row against several activation rows
//! ([`vec_dot_batch`]), blocks of weight rows against activation rows ([`vec_dot_tile`]), and
//! the tiles on interleaved activations ([`vec_dot_tile_x8`], [`quantize_row_x8`]).
//!
//! The x86 kernels (`batch_x86.rs`, `x8_x86.rs`) unpack each weight block once and multiply it
//! against several activation rows while it stays in registers. Types without such a kernel,
//! the eight-block-lane types with the usual activation layout, and CPUs without
//! AVX2+FMA+F16C take the generic loop over [`vec_dot`].

use super::{check_len, quantize_row, vec_dot, GgmlType, QK8_0};
use crate::cpu;
#[cfg(target_arch = "x86_64")]
use crate::cpu::Isa;
use crate::KernelError;

#[cfg(target_arch = "x86_64")]
#[path = "batch_x86.rs"]
mod x86;

/// Whether `ty` has SIMD multi-row kernels (on CPUs with AVX2+FMA+F16C): in
/// [`vec_dot_batch`] and [`vec_dot_tile`], or for the eight-block-lane types
/// ([`has_tile_x8`]: Q4_0, Q4_1, Q5_0, Q8_0) in [`vec_dot_tile_x8`], which takes the
/// activations interleaved (with the usual layout those go through the generic loop).
pub fn has_fast_path(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q5_1
            | GgmlType::Q8_0
            | GgmlType::Q8_1
            | GgmlType::Q4_K
            | GgmlType::Q5_K
            | GgmlType::Q6_K
    )
}

/// Batched [`vec_dot`]: `out[j] = vec_dot(ty, n, w, &act[j * act_stride..])` for
/// `j < n_act`. Where a SIMD batch kernel exists (see [`has_fast_path`]) each weight
/// block is unpacked once and multiplied against up to four activation rows; the integer math
/// is the single-row kernels', only the f32 accumulation order may differ slightly.
pub fn vec_dot_batch(
    ty: GgmlType,
    n: usize,
    w: &[u8],
    act: &[u8],
    act_stride: usize,
    n_act: usize,
    out: &mut [f32],
) {
    if n_act == 0 {
        return;
    }
    assert!(
        n.is_multiple_of(ty.block_size()),
        "vec_dot_batch: bad row length"
    );
    assert!(
        w.len() >= ty.row_bytes(n),
        "vec_dot_batch: weight row too short"
    );
    let ab = ty.vec_dot_type().row_bytes(n);
    assert!(
        act.len() >= (n_act - 1) * act_stride + ab,
        "vec_dot_batch: activation rows too short"
    );
    assert!(out.len() >= n_act, "vec_dot_batch: output too short");
    #[cfg(target_arch = "x86_64")]
    {
        let isa = cpu::isa();
        // `vpdpbusd`/`vpdpwssd` measured faster for every type on Zen 4 (Q4_K included, unlike
        // the single-row kernel: four rows keep the dependency chains apart).
        let vnni = cpu::vnni(isa);
        // Q4_0, Q4_1, Q5_0 and Q8_0 sum in eight-block lanes (`x8_x86.rs`), which only their
        // tiles on interleaved activations reproduce: the generic loop keeps the bits.
        if isa != Isa::Scalar && has_fast_path(ty) && !has_tile_x8(ty) {
            // A lone row left over goes to the single-row kernel, which hides latency better.
            let batched = if n_act % 4 == 1 { n_act - 1 } else { n_act };
            let nb = n / ty.block_size();
            // SAFETY: the CPU runs `isa` (and VNNI where `cpu::vnni` says so); `nb` blocks of
            // the weight row and of each of the `n_act` activation rows, and `n_act` outputs,
            // are in bounds (asserted above). The kernels only do unaligned loads.
            unsafe {
                let (x, y, o) = (w.as_ptr(), act.as_ptr(), out.as_mut_ptr());
                if vnni {
                    x86::vnni::dot_batch(ty, nb, x, y, act_stride, batched, o);
                } else {
                    x86::avx2::dot_batch(ty, nb, x, y, act_stride, batched, o);
                }
            }
            if batched < n_act {
                let j = n_act - 1;
                out[j] = vec_dot(ty, n, w, &act[j * act_stride..]);
            }
            return;
        }
    }
    for (j, o) in out[..n_act].iter_mut().enumerate() {
        *o = vec_dot(ty, n, w, &act[j * act_stride..]);
    }
}

/// Tiled [`vec_dot`]: `out[i * out_stride + j] = vec_dot(ty, n, &w[i * w_stride..],
/// &act[j * act_stride..])` for `i < n_w`, `j < n_act`, the same bits. Where a SIMD kernel
/// exists ([`has_fast_path`]; AVX2 or AVX-512 VNNI) blocks of two weight rows by four
/// activation rows share their unpacked weights and loaded activations; other types go
/// through [`vec_dot_batch`] one weight row at a time. Q4_0, Q4_1, Q5_0 and Q8_0 have their
/// fast tiles in [`vec_dot_tile_x8`], which takes the activations interleaved.
#[allow(clippy::too_many_arguments)]
pub fn vec_dot_tile(
    ty: GgmlType,
    n: usize,
    w: &[u8],
    w_stride: usize,
    n_w: usize,
    act: &[u8],
    act_stride: usize,
    n_act: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    if n_w == 0 || n_act == 0 {
        return;
    }
    assert!(
        n.is_multiple_of(ty.block_size()),
        "vec_dot_tile: bad row length"
    );
    assert!(
        w.len() >= (n_w - 1) * w_stride + ty.row_bytes(n),
        "vec_dot_tile: weight rows too short"
    );
    let ab = ty.vec_dot_type().row_bytes(n);
    assert!(
        act.len() >= (n_act - 1) * act_stride + ab,
        "vec_dot_tile: activation rows too short"
    );
    assert!(
        n_w == 1 || out_stride >= n_act,
        "vec_dot_tile: output stride shorter than a row"
    );
    assert!(
        out.len() >= (n_w - 1) * out_stride + n_act,
        "vec_dot_tile: output too short"
    );
    #[cfg(target_arch = "x86_64")]
    {
        let isa = cpu::isa();
        // The eight-block-lane types have their tiles in `vec_dot_tile_x8` (interleaved
        // activations); with the usual layout they go through the generic loop.
        if isa != Isa::Scalar && has_fast_path(ty) && !has_tile_x8(ty) {
            let (nb, x, y, o) = (
                n / ty.block_size(),
                w.as_ptr(),
                act.as_ptr(),
                out.as_mut_ptr(),
            );
            let (ws, ys, os) = (w_stride, act_stride, out_stride);
            // SAFETY: the CPU runs `isa` (and VNNI where `cpu::vnni` says so); `nb` blocks of
            // each of the `n_w` weight rows and `n_act` activation rows, and the `n_w` x
            // `n_act` outputs, are in bounds (asserted above). The kernels only do unaligned
            // loads.
            unsafe {
                if cpu::vnni(isa) {
                    x86::vnni::dot_tile(ty, nb, x, ws, n_w, y, ys, n_act, o, os);
                } else {
                    x86::avx2::dot_tile(ty, nb, x, ws, n_w, y, ys, n_act, o, os);
                }
            }
            return;
        }
    }
    for i in 0..n_w {
        vec_dot_batch(
            ty,
            n,
            &w[i * w_stride..],
            act,
            act_stride,
            n_act,
            &mut out[i * out_stride..],
        );
    }
}

/// Whether [`vec_dot_tile_x8`] runs for weights of `ty` on this CPU (Q4_0, Q4_1, Q5_0 and
/// Q8_0 with AVX2 or AVX-512 VNNI): these types' SIMD dot products sum in eight-block lanes
/// (`x8_x86.rs`), the order their tiles on interleaved activations reproduce. Callers that get
/// `false` use [`vec_dot_tile`] with the usual layout.
pub fn has_tile_x8(ty: GgmlType) -> bool {
    cfg!(target_arch = "x86_64")
        && cpu::isa() != cpu::Isa::Scalar
        && matches!(
            ty,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q8_0
        )
}

/// Bytes of one activation row of `n` elements (a multiple of 32) in the interleaved layout
/// of [`quantize_row_x8`]: groups of eight blocks, the last one padded.
pub fn x8_row_bytes(n: usize) -> usize {
    n.div_ceil(8 * QK8_0) * 288
}

/// Quantize `src` to `vt` (Q8_0 or Q8_1; the same values as [`super::quantize_row`]) in the
/// interleaved layout that [`vec_dot_tile_x8`] reads: per group of eight blocks, the eight
/// `d`, eight second fields (Q8_1: `s`; Q8_0: the i16 sum of the block's quants), then the
/// quants with dword `v` of block `k` at dword `8 * v + k`. `dst` takes
/// [`x8_row_bytes`]`(src.len())` bytes.
pub fn quantize_row_x8(vt: GgmlType, src: &[f32], dst: &mut [u8]) -> Result<(), KernelError> {
    assert!(
        matches!(vt, GgmlType::Q8_0 | GgmlType::Q8_1),
        "quantize_row_x8: {vt} is not Q8_0 or Q8_1"
    );
    check_len(vt, src.len())?;
    let nb = src.len() / QK8_0;
    assert!(
        dst.len() >= x8_row_bytes(src.len()),
        "quantize_row_x8: destination too short"
    );
    // One group at a time through the usual quantizer (same bytes), then rearranged.
    let bs = vt.type_size();
    let mut tmp = [0u8; 8 * 36];
    for (g, out) in dst[..x8_row_bytes(src.len())]
        .chunks_exact_mut(288)
        .enumerate()
    {
        let k = (nb - 8 * g).min(8);
        let x = &src[8 * g * QK8_0..(8 * g + k) * QK8_0];
        quantize_row(vt, x, &mut tmp[..k * bs])?;
        interleave(vt == GgmlType::Q8_1, k, &tmp[..k * bs], out);
    }
    Ok(())
}

/// `nb` blocks of Q8_0 or Q8_1 (`q8_1`) at `src` into one interleaved group (`nb` <= 8).
fn interleave(q8_1: bool, nb: usize, src: &[u8], out: &mut [u8]) {
    let bs = if q8_1 { 36 } else { 34 };
    let off = bs - 32;
    out[..288].fill(0);
    for k in 0..nb {
        let b = &src[k * bs..(k + 1) * bs];
        out[2 * k..2 * k + 2].copy_from_slice(&b[..2]);
        let second = if q8_1 {
            [b[2], b[3]]
        } else {
            let s: i32 = b[off..off + 32].iter().map(|&q| q as i8 as i32).sum();
            (s as i16).to_le_bytes()
        };
        out[16 + 2 * k..16 + 2 * k + 2].copy_from_slice(&second);
        for v in 0..8 {
            let o = 32 + 32 * v + 4 * k;
            out[o..o + 4].copy_from_slice(&b[off + 4 * v..off + 4 * v + 4]);
        }
    }
}

/// [`vec_dot_tile`] with the activations in the interleaved layout of [`quantize_row_x8`]
/// (rows `act_stride` bytes apart): `out[i * out_stride + j]` is the same bits as
/// `vec_dot(ty, n, &w[i * w_stride..], a_j)` where `a_j` is activation row `j` in the usual
/// layout. Weight rows are unpacked once per group of eight blocks for all activation rows.
/// Panics unless [`has_tile_x8`]`(ty)`.
#[allow(clippy::too_many_arguments)]
pub fn vec_dot_tile_x8(
    ty: GgmlType,
    n: usize,
    w: &[u8],
    w_stride: usize,
    n_w: usize,
    act: &[u8],
    act_stride: usize,
    n_act: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    assert!(has_tile_x8(ty), "vec_dot_tile_x8: no kernel for {ty}");
    if n_w == 0 || n_act == 0 {
        return;
    }
    assert!(
        n.is_multiple_of(ty.block_size()),
        "vec_dot_tile_x8: bad row length"
    );
    assert!(
        w.len() >= (n_w - 1) * w_stride + ty.row_bytes(n),
        "vec_dot_tile_x8: weight rows too short"
    );
    assert!(
        act.len() >= (n_act - 1) * act_stride + x8_row_bytes(n),
        "vec_dot_tile_x8: activation rows too short"
    );
    assert!(
        n_w == 1 || out_stride >= n_act,
        "vec_dot_tile_x8: output stride shorter than a row"
    );
    assert!(
        out.len() >= (n_w - 1) * out_stride + n_act,
        "vec_dot_tile_x8: output too short"
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `has_tile_x8` checked the CPU level; the bounds were checked above. The
    // kernel reads only the `n / 32` blocks of each weight row (skipped loads in a partial
    // group) and whole groups of each activation row.
    unsafe {
        let tile = if cpu::vnni(cpu::isa()) {
            super::x8::vnni::dot_tile
        } else {
            super::x8::avx2::dot_tile
        };
        tile(
            ty,
            n / ty.block_size(),
            w.as_ptr(),
            w_stride,
            n_w,
            act.as_ptr(),
            act_stride,
            n_act,
            out.as_mut_ptr(),
            out_stride,
        );
    }
}
