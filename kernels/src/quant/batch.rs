//! Batched dot products: one weight row against several activation rows (prefill).
//!
//! [`super::vec_dot_batch`] comes here first; the x86 kernels (`batch_x86.rs`) unpack each
//! weight block once and multiply it against up to four activation rows while it stays in
//! registers. Types without a batch kernel, and CPUs without AVX2+FMA+F16C, return `false` and
//! take the generic loop over [`super::vec_dot`].

use super::GgmlType;
#[cfg(target_arch = "x86_64")]
use crate::cpu::{self, Isa};

#[cfg(target_arch = "x86_64")]
#[path = "batch_x86.rs"]
mod x86;

/// Whether `ty` has a SIMD batch kernel (on CPUs with AVX2+FMA+F16C).
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

/// Fast path of [`super::vec_dot_batch`]; `false` when none applies (nothing written then).
/// Bounds were checked by the caller.
#[allow(unused_variables)]
pub(super) fn vec_dot_batch(
    ty: GgmlType,
    n: usize,
    w: &[u8],
    act: &[u8],
    act_stride: usize,
    n_act: usize,
    out: &mut [f32],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let isa = cpu::isa();
        if isa == Isa::Scalar || !has_fast_path(ty) {
            return false;
        }
        // `vpdpbusd`/`vpdpwssd` measured faster for every type on Zen 4 (Q4_K included, unlike
        // the single-row kernel: four rows keep the dependency chains apart).
        let vnni = cpu::vnni(isa);
        if vnni && super::in_x8_order(ty) {
            // `vec_dot` sums these in eight-block lanes (`x8_x86.rs`), which the batch kernels
            // do not reproduce: the generic loop keeps the bits.
            return false;
        }
        // A lone row left over goes to the single-row kernel, which hides latency better.
        let batched = if n_act % 4 == 1 { n_act - 1 } else { n_act };
        let nb = n / ty.block_size();
        debug_assert!(w.len() >= ty.row_bytes(n));
        debug_assert!(
            n_act == 0 || act.len() >= (n_act - 1) * act_stride + ty.vec_dot_type().row_bytes(n)
        );
        debug_assert!(out.len() >= n_act);
        // SAFETY: the CPU runs `isa` (and VNNI where `cpu::vnni` says so); the caller checked
        // that `nb` blocks of the weight row and of each of the `n_act` activation rows, and
        // `n_act` outputs, are in bounds. The kernels only do unaligned loads.
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
            out[j] = super::vec_dot(ty, n, w, &act[j * act_stride..]);
        }
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Fast path of [`super::vec_dot_tile`]; `false` when none applies (nothing written then).
/// Bounds were checked by the caller.
#[allow(unused_variables, clippy::too_many_arguments)]
pub(super) fn vec_dot_tile(
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
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // Q4_1 and Q8_0 tiles take interleaved activations (`vec_dot_tile_x8`); with the usual
        // layout they go through the generic loop.
        if !cpu::vnni(cpu::isa()) || !matches!(ty, GgmlType::Q4_0 | GgmlType::Q5_0) {
            return false;
        }
        let nb = n / ty.block_size();
        // SAFETY: the CPU runs VNNI (checked above); the caller checked that `nb` blocks of each
        // of the `n_w` weight rows and `n_act` activation rows, and the `n_w` x `n_act` outputs,
        // are in bounds. The kernels only do unaligned loads.
        unsafe {
            x86::vnni::dot_tile(
                ty,
                nb,
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
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}
