//! Legacy block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1): bit-exact quantizers against
//! fixtures from llama.cpp's gguf-py, ggml's test-quantize-fns budgets, and every SIMD dot product
//! against its scalar twin and an f64 reference.

mod common;

use common::*;
use lethe_kernels::cpu::{self, Isa};
use lethe_kernels::quant::{self, legacy, GgmlType};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const LEGACY: [GgmlType; 6] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q8_1,
];
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

fn f16(b: &[u8], off: usize) -> f64 {
    half::f16::from_bits(u16::from_le_bytes([b[off], b[off + 1]])).to_f64()
}

/// Dot product in f64 of the dequantized operands, with Q8_1's `s` standing in for
/// d * sum(q) in the `_1` formats (that is the quantity the kernels use: m * s).
fn reference_dot(ty: GgmlType, n: usize, w: &[u8], a: &[u8]) -> (f64, f64) {
    let wd = dequantize(ty, w, n);
    let ad = dequantize(ty.vec_dot_type(), a, n);
    let (xs, ys) = (ty.type_size(), ty.vec_dot_type().type_size());
    let (mut dot, mut mag) = (0f64, 0f64);
    for b in 0..n / 32 {
        let (xb, yb) = (&w[b * xs..], &a[b * ys..]);
        let r = b * 32..b * 32 + 32;
        match ty {
            GgmlType::Q4_1 | GgmlType::Q5_1 => {
                // x = d*q + m: sum(x*y) = sum(d*q*y) + m * s
                let (d, m, s) = (f16(xb, 0), f16(xb, 2), f16(yb, 2));
                for i in r {
                    // recover the integer quant from the f32 dequantization
                    let q = if d == 0.0 {
                        0.0
                    } else {
                        ((wd[i] as f64 - m) / d).round()
                    };
                    let t = d * q * ad[i] as f64;
                    dot += t;
                    mag += t.abs();
                }
                dot += m * s;
                mag += (m * s).abs();
            }
            _ => {
                for i in r {
                    let t = wd[i] as f64 * ad[i] as f64;
                    dot += t;
                    mag += t.abs();
                }
            }
        }
    }
    (dot, mag)
}

fn random_row(rng: &mut StdRng, n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    for b in 0..n / 32 {
        // Vary scale and offset per block: weights have blocks of very different magnitude.
        let scale = 10f32.powf(rng.gen_range(-3.0..1.5));
        let offset = if b.is_multiple_of(4) {
            rng.gen_range(-1.0..1.0) * scale
        } else {
            0.0
        };
        for _ in 0..32 {
            v.push(rng.gen_range(-1.0f32..1.0) * scale + offset);
        }
    }
    v
}

#[test]
fn isa_dispatch_and_fallback() {
    let f = cpu::features();
    // Asking for more than the CPU has falls back; asking for less is honoured.
    assert_eq!(legacy::effective_isa(Isa::Scalar), Isa::Scalar);
    let e2 = legacy::effective_isa(Isa::Avx2);
    let e5 = legacy::effective_isa(Isa::Avx512);
    if f.avx2_fma && f.f16c && cfg!(target_arch = "x86_64") {
        assert_eq!(e2, Isa::Avx2);
        assert_eq!(e5, if f.avx512 { Isa::Avx512 } else { Isa::Avx2 });
    } else {
        assert_eq!(e2, Isa::Scalar);
        assert_eq!(e5, Isa::Scalar);
    }
    assert_ne!(e2, Isa::Avx512);
    if legacy::uses_vnni() {
        assert!(f.avx512_vnni && f.avx512);
    }
    eprintln!(
        "features {f:?}, isa {:?}, legacy avx512 -> {e5:?}, vnni {}",
        cpu::isa(),
        legacy::uses_vnni()
    );

    // Isa::Scalar through the dispatcher is exactly the scalar twin.
    let mut rng = StdRng::seed_from_u64(5);
    let x = random_row(&mut rng, 256);
    let y = random_row(&mut rng, 256);
    for ty in LEGACY {
        let w = quantize(ty, &x);
        let a = quantize(ty.vec_dot_type(), &y);
        let s = legacy::vec_dot_scalar(ty, 256, &w, &a);
        assert_eq!(
            legacy::vec_dot_isa(Isa::Scalar, ty, 256, &w, &a).to_bits(),
            s.to_bits()
        );
    }
}

/// Re-runs this test binary with LETHE_ISA=scalar and checks the run-time choice follows it.
#[test]
fn isa_env_cap_to_scalar() {
    if std::env::var("LETHE_LEGACY_CHILD").is_ok() {
        assert_eq!(cpu::isa(), Isa::Scalar);
        let mut rng = StdRng::seed_from_u64(6);
        let x = random_row(&mut rng, 512);
        let y = random_row(&mut rng, 512);
        for ty in LEGACY {
            let w = quantize(ty, &x);
            let a = quantize(ty.vec_dot_type(), &y);
            let fast = quant::vec_dot(ty, 512, &w, &a);
            assert_eq!(
                fast.to_bits(),
                quant::vec_dot_scalar(ty, 512, &w, &a).to_bits()
            );
        }
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args(["--exact", "isa_env_cap_to_scalar", "--test-threads=1"])
        .env("LETHE_ISA", "scalar")
        .env("LETHE_LEGACY_CHILD", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("1 passed"),
        "child failed:\n{text}"
    );
}

#[test]
fn quantize_bit_exact_with_gguf_py() {
    let x = f32s(&fixture("legacy_input.f32"));
    assert_eq!(x.len(), 2048);
    for ty in LEGACY {
        let name = ty.name().to_lowercase();
        let want = fixture(&format!("legacy_{name}.bin"));
        assert_eq!(want.len(), ty.row_bytes(x.len()));
        let mut got = vec![0u8; want.len()];
        legacy::quantize_row_ref(ty, &x, &mut got);
        check_bytes(ty, "ref", &got, &want);
        for isa in ISAS {
            let mut got = vec![0xAAu8; want.len()];
            legacy::quantize_row_isa(isa, ty, &x, &mut got);
            check_bytes(ty, &format!("{isa:?}"), &got, &want);
        }
        check_bytes(ty, "dispatch", &quantize(ty, &x), &want);
    }
}

fn check_bytes(ty: GgmlType, what: &str, got: &[u8], want: &[u8]) {
    let bs = ty.type_size();
    for (b, (g, w)) in got.chunks(bs).zip(want.chunks(bs)).enumerate() {
        assert_eq!(g, w, "{ty} ({what}) block {b} differs");
    }
}

#[test]
fn dequantize_matches_gguf_py() {
    let x = f32s(&fixture("legacy_input.f32"));
    for ty in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
    ] {
        let name = ty.name().to_lowercase();
        let q = fixture(&format!("legacy_{name}.bin"));
        let want = f32s(&fixture(&format!("legacy_{name}.deq.f32")));
        let got = dequantize(ty, &q, x.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                "{ty} element {i}: {g} vs {w}"
            );
        }
    }
    // Q8_1 dequantizes like Q8_0 (s is only used by dot products).
    let q80 = dequantize(GgmlType::Q8_0, &fixture("legacy_q8_0.bin"), x.len());
    let q81 = dequantize(GgmlType::Q8_1, &fixture("legacy_q8_1.bin"), x.len());
    assert!(q80
        .iter()
        .zip(&q81)
        .all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())));
}

/// Quantizer edge cases: rounding ties, zero blocks, the Q8_1 sum.
#[test]
fn quantize_edge_cases() {
    // Exact ties: amax 127 -> d = 1, x*id = k + 0.5 rounds away from zero.
    let mut x = vec![0f32; 64];
    x[0] = 127.0;
    for (k, v) in x[1..32].iter_mut().enumerate() {
        *v = (k as f32 + 0.5) * if k.is_multiple_of(2) { 1.0 } else { -1.0 };
    }
    for isa in ISAS {
        for ty in [GgmlType::Q8_0, GgmlType::Q8_1] {
            let mut q = vec![0u8; ty.row_bytes(64)];
            legacy::quantize_row_isa(isa, ty, &x, &mut q);
            let off = if ty == GgmlType::Q8_0 { 2 } else { 4 };
            let qs: Vec<i8> = q[off..off + 32].iter().map(|&b| b as i8).collect();
            assert_eq!(qs[0], 127);
            for k in 0..31usize {
                let want = (k as i8 + 1) * if k.is_multiple_of(2) { 1 } else { -1 };
                assert_eq!(qs[k + 1], want, "{ty} {isa:?} tie {k}");
            }
            // second block is all zeros: d = 0, quants 0 (and s = 0)
            assert!(
                q[ty.type_size()..].iter().all(|&b| b == 0),
                "{ty} {isa:?} zero block"
            );
            if ty == GgmlType::Q8_1 {
                let sum: i32 = qs.iter().map(|&v| v as i32).sum();
                assert_eq!(f16(&q, 2), half::f16::from_f32(sum as f32).to_f64());
            }
        }
    }
}

/// The SIMD Q8 quantizers against the scalar reference on many random rows.
#[test]
fn q8_fast_quantizer_identical_bytes() {
    let mut rng = StdRng::seed_from_u64(11);
    for round in 0..200usize {
        let n = 32 * rng.gen_range(1..64);
        let mut x = random_row(&mut rng, n);
        if round.is_multiple_of(5) {
            // integers and halves hit exact rounding ties after scaling
            for v in x.iter_mut() {
                *v = (*v * 8.0).round() / 2.0;
            }
        }
        for ty in [GgmlType::Q8_0, GgmlType::Q8_1] {
            let mut want = vec![0u8; ty.row_bytes(n)];
            legacy::quantize_row_ref(ty, &x, &mut want);
            for isa in [Isa::Avx2, Isa::Avx512] {
                let mut got = vec![0u8; ty.row_bytes(n)];
                legacy::quantize_row_isa(isa, ty, &x, &mut got);
                check_bytes(ty, &format!("{isa:?}"), &got, &want);
            }
        }
    }
}

/// ggml's tests/test-quantize-fns.cpp, for the legacy types, on every ISA.
#[test]
fn ggml_test_quantize_fns() {
    const MAX_QUANTIZATION_TOTAL_ERROR: f32 = 0.002;
    const MAX_QUANTIZATION_REFERENCE_ERROR: f32 = 0.0001;
    const MAX_DOT_PRODUCT_ERROR: f32 = 0.02;
    let n = 32 * 128;
    let gen = |offset: f32| -> Vec<f32> {
        (0..n)
            .map(|i| (0.1 + 2.0 * ((i as f32) + offset).cos() as f64) as f32)
            .collect()
    };
    let (data1, data2) = (gen(0.0), gen(1.0));
    let rmse = |a: &[f32], b: &[f32]| -> f32 {
        let s: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
        (s.sqrt() as f32) / a.len() as f32
    };
    for ty in LEGACY {
        let q = quantize(ty, &data1);
        let total = rmse(&data1, &dequantize(ty, &q, n));
        assert!(
            total < MAX_QUANTIZATION_TOTAL_ERROR,
            "{ty} total quantization error {total}"
        );

        let mut q_ref = vec![0u8; q.len()];
        legacy::quantize_row_ref(ty, &data1, &mut q_ref);
        let reference = rmse(&dequantize(ty, &q, n), &dequantize(ty, &q_ref, n));
        assert!(
            reference < MAX_QUANTIZATION_REFERENCE_ERROR,
            "{ty} reference error {reference}"
        );
        assert_eq!(q, q_ref, "{ty}: fast quantizer differs from the reference");

        let a = quantize(ty.vec_dot_type(), &data2);
        let dot_ref: f64 = data1.iter().zip(&data2).map(|(x, y)| (x * y) as f64).sum();
        for isa in ISAS {
            let got = legacy::vec_dot_isa(isa, ty, n, &q, &a);
            let err = (got - dot_ref as f32).abs() / n as f32;
            assert!(
                err < MAX_DOT_PRODUCT_ERROR,
                "{ty} {isa:?} dot product error {err}"
            );
        }
    }
}

/// Every SIMD dot product against the scalar twin and the f64 reference, over lengths and data.
#[test]
fn vec_dot_fast_vs_scalar_vs_f64() {
    let mut rng = StdRng::seed_from_u64(42);
    let lengths = [32usize, 64, 96, 160, 256, 512, 1024, 2080, 4096];
    for &n in &lengths {
        for trial in 0..4 {
            let x = random_row(&mut rng, n);
            let y = if trial == 3 {
                x.clone()
            } else {
                random_row(&mut rng, n)
            };
            for ty in LEGACY {
                let w = quantize(ty, &x);
                let a = quantize(ty.vec_dot_type(), &y);
                let (want, mag) = reference_dot(ty, n, &w, &a);
                let tol = 1e-5 * mag + 1e-30;
                let scalar = legacy::vec_dot_scalar(ty, n, &w, &a);
                assert!(
                    (scalar as f64 - want).abs() <= tol,
                    "{ty} n={n} scalar {scalar} vs f64 {want} (tol {tol})"
                );
                for isa in ISAS {
                    let fast = legacy::vec_dot_isa(isa, ty, n, &w, &a);
                    assert!(
                        (fast as f64 - want).abs() <= tol,
                        "{ty} n={n} {isa:?} {fast} vs f64 {want} (tol {tol})"
                    );
                    assert!(
                        (fast - scalar).abs() as f64 <= tol,
                        "{ty} n={n} {isa:?} {fast} vs scalar {scalar} (tol {tol})"
                    );
                }
                let disp = quant::vec_dot(ty, n, &w, &a);
                assert_eq!(
                    disp.to_bits(),
                    legacy::vec_dot_isa(cpu::isa(), ty, n, &w, &a).to_bits()
                );
            }
        }
    }
}

/// Extreme quants (all ±127, all nibbles 0 or 15, every fifth bit set): integer paths must not
/// saturate, and unaligned operands must work.
#[test]
fn vec_dot_extremes_and_unaligned() {
    let mut rng = StdRng::seed_from_u64(9);
    let n = 1024;
    for ty in LEGACY {
        let (xs, ys) = (ty.type_size(), ty.vec_dot_type().type_size());
        let nb = n / 32;
        // Raw blocks with random scales and extreme quant bytes.
        let mut w = vec![0u8; nb * xs + 1];
        let mut a = vec![0u8; nb * ys + 3];
        for b in 0..nb {
            let pattern = [0x00u8, 0xFF, 0x0F, 0xF0][b % 4];
            let blk = &mut w[1 + b * xs..1 + (b + 1) * xs];
            let d = half::f16::from_f32(rng.gen_range(0.001..0.1))
                .to_bits()
                .to_le_bytes();
            blk[..2].copy_from_slice(&d);
            let hdr = match ty {
                GgmlType::Q4_0 => 2,
                GgmlType::Q5_0 => 2,
                GgmlType::Q8_0 => 2,
                _ => {
                    let m = half::f16::from_f32(rng.gen_range(-0.5..0.5))
                        .to_bits()
                        .to_le_bytes();
                    blk[2..4].copy_from_slice(&m);
                    4
                }
            };
            for v in blk[hdr..].iter_mut() {
                *v = if matches!(ty, GgmlType::Q8_0 | GgmlType::Q8_1) {
                    [0x81u8, 0x7F, 0x81, 0x7F][b % 4] // -127 / 127
                } else {
                    pattern
                };
            }
            let ablk = &mut a[3 + b * ys..3 + (b + 1) * ys];
            let qs: Vec<i8> = (0..32)
                .map(|j| if (j + b).is_multiple_of(3) { -127 } else { 127 })
                .collect();
            let d = rng.gen_range(0.001f32..0.1);
            ablk[..2].copy_from_slice(&half::f16::from_f32(d).to_bits().to_le_bytes());
            let off = ys - 32;
            if off == 4 {
                let s: i32 = qs.iter().map(|&q| q as i32).sum();
                ablk[2..4]
                    .copy_from_slice(&half::f16::from_f32(d * s as f32).to_bits().to_le_bytes());
            }
            for (o, q) in ablk[off..].iter_mut().zip(&qs) {
                *o = *q as u8;
            }
        }
        let (w, a) = (&w[1..], &a[3..]);
        let (want, mag) = reference_dot(ty, n, w, a);
        let tol = 1e-5 * mag;
        for isa in ISAS {
            let got = legacy::vec_dot_isa(isa, ty, n, w, a);
            assert!(
                (got as f64 - want).abs() <= tol,
                "{ty} {isa:?}: {got} vs {want}"
            );
        }
    }
}

#[test]
fn round_trip_error_budgets() {
    // dequantize(quantize(x)): RMS error relative to RMS(x), per format (uniform data).
    let mut rng = StdRng::seed_from_u64(3);
    let n = 4096;
    let x: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    let rms =
        |v: &[f32]| (v.iter().map(|a| (*a as f64).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
    for (ty, budget) in [
        (GgmlType::Q4_0, 0.11),
        (GgmlType::Q4_1, 0.07),
        (GgmlType::Q5_0, 0.055),
        (GgmlType::Q5_1, 0.035),
        (GgmlType::Q8_0, 0.007),
        (GgmlType::Q8_1, 0.007),
    ] {
        let y = dequantize(ty, &quantize(ty, &x), n);
        let err: Vec<f32> = x.iter().zip(&y).map(|(a, b)| a - b).collect();
        let rel = rms(&err) / rms(&x);
        assert!(
            rel < budget,
            "{ty}: relative RMS error {rel} over budget {budget}"
        );
        let max = x
            .iter()
            .zip(&y)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let bits = match ty {
            GgmlType::Q4_0 | GgmlType::Q4_1 => 4,
            GgmlType::Q5_0 | GgmlType::Q5_1 => 5,
            _ => 8,
        };
        // Max error: half a step (2 / 2^bits) plus fp16 rounding of the scale, except for the
        // symmetric _0 formats where the value opposite the extreme can clip by a full step.
        let symmetric = matches!(ty, GgmlType::Q4_0 | GgmlType::Q5_0);
        let levels = if symmetric {
            1 << bits
        } else {
            (1 << bits) - 1
        };
        let step = 2.0 / levels as f32;
        let limit = if symmetric { step } else { step / 2.0 };
        assert!(max < limit * 1.01 + 1e-3, "{ty}: max error {max}");
    }
}

#[test]
fn empty_rows() {
    for ty in LEGACY {
        for isa in ISAS {
            assert_eq!(legacy::vec_dot_isa(isa, ty, 0, &[], &[]), 0.0);
        }
        let mut out: [u8; 0] = [];
        legacy::quantize_row(ty, &[], &mut out);
        legacy::dequantize_row(ty, &[], &mut []);
    }
}
