//! Float formats (F32, F16, BF16): conversions bit-exact with numpy / gguf-py fixtures and ggml's
//! rules, and every SIMD dot product against its scalar twin and an f64 reference.

mod common;

use common::*;
use lethe_kernels::cpu::{self, Isa};
use lethe_kernels::quant::{self, float, GgmlType};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const FLOATS: [GgmlType; 3] = [GgmlType::F32, GgmlType::F16, GgmlType::BF16];
fn quantize(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    let mut q = vec![0u8; ty.row_bytes(x.len())];
    quant::quantize_row(ty, x, &mut q).unwrap();
    q
}

fn dequantize(ty: GgmlType, q: &[u8], n: usize) -> Vec<f32> {
    let mut y = vec![0f32; n];
    quant::dequantize_row(ty, q, &mut y).unwrap();
    y
}

#[test]
fn f16_bit_exact_with_numpy() {
    let x = f32s(&fixture("legacy_float_input.f32"));
    let want = u16s(&fixture("legacy_float_f16.bin"));
    let got = u16s(&quantize(GgmlType::F16, &x));
    assert_eq!(got.len(), want.len());
    for (i, ((g, w), v)) in got.iter().zip(&want).zip(&x).enumerate() {
        if v.is_nan() {
            // ggml (F16C) and `half` quiet NaNs; numpy keeps signalling payloads. Same sign, NaN.
            assert!(
                (g & 0x7C00) == 0x7C00 && (g & 0x03FF) != 0,
                "element {i}: {g:#x} not NaN"
            );
            assert_eq!(g & 0x8000, w & 0x8000);
            if v.to_bits() & 0x0040_0000 != 0 {
                assert_eq!(g, w, "quiet NaN {:#x}", v.to_bits());
            }
        } else {
            assert_eq!(g, w, "element {i}: f16({v:e}) = {g:#x}, numpy {w:#x}");
        }
    }
    // and back: f16 -> f32 is exact
    let back = dequantize(GgmlType::F16, &fixture("legacy_float_f16.bin"), x.len());
    for (b, w) in back.iter().zip(&want) {
        let h = half::f16::from_bits(*w).to_f32();
        assert!(b.to_bits() == h.to_bits() || (b.is_nan() && h.is_nan()));
    }
}

#[test]
fn bf16_bit_exact_with_gguf_py() {
    let x = f32s(&fixture("legacy_float_input.f32"));
    let want = u16s(&fixture("legacy_float_bf16.bin"));
    let got = u16s(&quantize(GgmlType::BF16, &x));
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(
            g,
            w,
            "element {i}: bf16({:e} = {:#x})",
            x[i],
            x[i].to_bits()
        );
    }
    // dequantize is the exact widening
    let back = dequantize(GgmlType::BF16, &fixture("legacy_float_bf16.bin"), x.len());
    for (b, w) in back.iter().zip(&want) {
        assert_eq!(b.to_bits(), (*w as u32) << 16);
    }
}

#[test]
fn bf16_rules() {
    // round to nearest, ties to even; NaN quieted; overflow to inf
    assert_eq!(float::fp32_to_bf16(1.0), 0x3F80);
    assert_eq!(float::fp32_to_bf16(f32::from_bits(0x3F80_8000)), 0x3F80); // tie, even stays
    assert_eq!(float::fp32_to_bf16(f32::from_bits(0x3F81_8000)), 0x3F82); // tie, odd rounds up
    assert_eq!(float::fp32_to_bf16(f32::from_bits(0x3F80_8001)), 0x3F81);
    assert_eq!(float::fp32_to_bf16(f32::from_bits(0x7F80_0001)), 0x7FC0);
    assert_eq!(float::fp32_to_bf16(f32::from_bits(0xFF80_0001)), 0xFFC0);
    assert_eq!(float::fp32_to_bf16(f32::MAX), 0x7F80);
    assert_eq!(float::fp32_to_bf16(f32::INFINITY), 0x7F80);
    assert_eq!(float::bf16_to_fp32(0x4049), f32::from_bits(0x4049_0000));
}

#[test]
fn f32_round_trip() {
    let x = f32s(&fixture("legacy_float_input.f32"));
    let q = quantize(GgmlType::F32, &x);
    assert_eq!(q, fixture("legacy_float_input.f32"));
    let y = dequantize(GgmlType::F32, &q, x.len());
    assert!(x.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits()));
}

#[test]
fn isa_dispatch_and_fallback() {
    let f = cpu::features();
    let e2 = float::effective_isa(Isa::Avx2);
    let e5 = float::effective_isa(Isa::Avx512);
    assert_eq!(float::effective_isa(Isa::Scalar), Isa::Scalar);
    if cfg!(target_arch = "x86_64") && f.avx2_fma && f.f16c {
        // no 512-bit float kernels: Avx512 runs the AVX2 ones
        assert_eq!((e2, e5), (Isa::Avx2, Isa::Avx2));
    } else {
        assert_eq!((e2, e5), (Isa::Scalar, Isa::Scalar));
    }
    let mut rng = StdRng::seed_from_u64(1);
    let x: Vec<f32> = (0..300).map(|_| rng.gen_range(-1.0..1.0)).collect();
    for ty in FLOATS {
        let q = quantize(ty, &x);
        let s = float::vec_dot_scalar(ty, 300, &q, &q);
        assert_eq!(
            float::vec_dot_isa(Isa::Scalar, ty, 300, &q, &q).to_bits(),
            s.to_bits()
        );
        let d = quant::vec_dot(ty, 300, &q, &q);
        assert_eq!(
            d.to_bits(),
            float::vec_dot_isa(cpu::isa(), ty, 300, &q, &q).to_bits()
        );
    }
}

#[test]
fn vec_dot_fast_vs_scalar_vs_f64() {
    let mut rng = StdRng::seed_from_u64(77);
    let lengths = [
        0usize, 1, 3, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 255, 1000, 4096, 4099,
    ];
    for &n in &lengths {
        for trial in 0..3 {
            let scale = 10f32.powi(trial * 2 - 2);
            let x: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0..1.0) * scale).collect();
            let y: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
            for ty in FLOATS {
                let (w, a) = (quantize(ty, &x), quantize(ty, &y));
                // Unaligned copies (odd offsets) to check the loads.
                let mut wb = vec![0u8; w.len() + 1];
                wb[1..].copy_from_slice(&w);
                let mut ab = vec![0u8; a.len() + 3];
                ab[3..].copy_from_slice(&a);
                let (wu, au) = (&wb[1..], &ab[3..]);
                let (xd, yd) = (dequantize(ty, &w, n), dequantize(ty, &a, n));
                let want: f64 = xd.iter().zip(&yd).map(|(p, q)| *p as f64 * *q as f64).sum();
                let mag: f64 = xd
                    .iter()
                    .zip(&yd)
                    .map(|(p, q)| (*p as f64 * *q as f64).abs())
                    .sum();
                let tol = 2e-6 * mag + 1e-30;
                let scalar = float::vec_dot_scalar(ty, n, wu, au);
                assert!(
                    (scalar as f64 - want).abs() <= tol,
                    "{ty} n={n} scalar {scalar} vs {want}"
                );
                for isa in ISAS {
                    let fast = float::vec_dot_isa(isa, ty, n, wu, au);
                    assert!(
                        (fast as f64 - want).abs() <= tol,
                        "{ty} n={n} {isa:?} {fast} vs {want}"
                    );
                    assert!(
                        ((fast - scalar) as f64).abs() <= tol,
                        "{ty} n={n} {isa:?} vs scalar"
                    );
                }
            }
        }
    }
}

/// ggml's test-quantize-fns checks for the float types (quantization error, dot product error).
#[test]
fn ggml_test_quantize_fns() {
    let n = 32 * 128;
    let gen = |offset: f32| -> Vec<f32> {
        (0..n)
            .map(|i| (0.1 + 2.0 * ((i as f32) + offset).cos() as f64) as f32)
            .collect()
    };
    let (d1, d2) = (gen(0.0), gen(1.0));
    let rmse = |a: &[f32], b: &[f32]| -> f32 {
        let s: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
        (s.sqrt() as f32) / a.len() as f32
    };
    let dot_ref: f64 = d1.iter().zip(&d2).map(|(x, y)| (x * y) as f64).sum();
    for ty in FLOATS {
        let q = quantize(ty, &d1);
        let total = rmse(&d1, &dequantize(ty, &q, n));
        assert!(total < 0.002, "{ty} total quantization error {total}");
        let a = quantize(ty, &d2);
        for isa in ISAS {
            let got = float::vec_dot_isa(isa, ty, n, &q, &a);
            let err = (got - dot_ref as f32).abs() / n as f32;
            assert!(err < 0.02, "{ty} {isa:?} dot product error {err}");
        }
    }
}

#[test]
fn f16_to_f32_all_patterns() {
    for h in 0..=u16::MAX {
        let want = half::f16::from_bits(h).to_f32();
        assert_eq!(
            float::f16_to_f32(h).to_bits(),
            want.to_bits(),
            "f16 {h:#06x}"
        );
    }
    let bytes: Vec<u8> = (0..=u16::MAX).flat_map(|h| h.to_le_bytes()).collect();
    let all = dequantize(GgmlType::F16, &bytes, 1 << 16);
    for (h, v) in all.iter().enumerate() {
        assert_eq!(
            v.to_bits(),
            half::f16::from_bits(h as u16).to_f32().to_bits()
        );
    }
}
