//! K-quant tests: fixtures from independent oracles (gguf-py dequantizers, ggml's C reference
//! quantizers, see tests/fixtures/kquants_gen.py), ggml's test-quantize-fns error budgets, and
//! every SIMD kernel against its scalar twin and an f64 reference.
//!
//! Run: `cargo test --release -p lethe-kernels --test kquants`

use lethe_kernels::quant::{kquants, GgmlType, QK_K};
use rand::{rngs::StdRng, Rng, SeedableRng};

const K_TYPES: [GgmlType; 5] = [
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

// ggml tests/test-quantize-fns.cpp budgets.
const MAX_QUANTIZATION_TOTAL_ERROR: f32 = 0.002;
const MAX_QUANTIZATION_TOTAL_ERROR_2BITS: f32 = 0.0075;
const MAX_QUANTIZATION_TOTAL_ERROR_3BITS: f32 = 0.0040;
const MAX_DOT_PRODUCT_ERROR: f32 = 0.02;
const MAX_DOT_PRODUCT_ERROR_LOWBIT: f32 = 0.04;

fn fixture(name: &str) -> (Vec<u8>, Vec<u8>) {
    let path = format!(
        "{}/tests/fixtures/kquants_{name}.bin",
        env!("CARGO_MANIFEST_DIR")
    );
    let b = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let n = u32::from_le_bytes(b[0..4].try_into().unwrap()) as usize;
    let inp = b[4..4 + n].to_vec();
    let m = u32::from_le_bytes(b[4 + n..8 + n].try_into().unwrap()) as usize;
    let out = b[8 + n..8 + n + m].to_vec();
    (inp, out)
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn quantize(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    let mut q = vec![0u8; ty.row_bytes(x.len())];
    kquants::quantize_row(ty, x, &mut q);
    q
}

fn dequantize(ty: GgmlType, q: &[u8], n: usize) -> Vec<f32> {
    let mut y = vec![0f32; n];
    kquants::dequantize_row(ty, q, &mut y);
    y
}

fn ty_tag(ty: GgmlType) -> String {
    ty.name().to_lowercase()
}

/// A Rust transcription of ggml's `quantize_row_q8_K_ref`, independent of the library.
fn q8k_reference(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for blk in x.chunks_exact(QK_K) {
        let (mut max, mut amax) = (0f32, 0f32);
        for &v in blk {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        let mut y = vec![0u8; 292];
        if amax != 0.0 {
            let iscale = -127.0f32 / max;
            let nearest = |f: f32| {
                let v = f + 12_582_912.0f32;
                (v.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
            };
            let qs: Vec<i8> = blk
                .iter()
                .map(|&v| nearest(iscale * v).min(127) as i8)
                .collect();
            y[0..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
            for (o, &q) in y[4..260].iter_mut().zip(&qs) {
                *o = q as u8;
            }
            for j in 0..16 {
                let s: i32 = qs[16 * j..16 * j + 16].iter().map(|&q| q as i32).sum();
                y[260 + 2 * j..262 + 2 * j].copy_from_slice(&(s as i16).to_le_bytes());
            }
        }
        out.extend_from_slice(&y);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

#[test]
fn q8k_quantize_matches_ggml_c_reference_bit_exact() {
    let (inp, expected) = fixture("q8k_quant");
    let x = f32s(&inp);
    let got = quantize(GgmlType::Q8_K, &x);
    assert_eq!(got.len(), expected.len());
    for (b, (g, e)) in got.chunks(292).zip(expected.chunks(292)).enumerate() {
        assert_eq!(
            g, e,
            "Q8_K block {b} differs from ggml's quantize_row_q8_K_ref"
        );
    }
    assert_eq!(q8k_reference(&x), expected);
}

#[test]
fn q8k_dequantize_matches_ggml_c_reference() {
    let (inp, expected) = fixture("q8k_dequant");
    let n = inp.len() / 292 * QK_K;
    let got = dequantize(GgmlType::Q8_K, &inp, n);
    let exp = f32s(&expected);
    for (i, (g, e)) in got.iter().zip(&exp).enumerate() {
        assert_eq!(g.to_bits(), e.to_bits(), "element {i}: {g} vs {e}");
    }
}

#[test]
fn dequantize_matches_gguf_py() {
    for ty in K_TYPES {
        let (inp, expected) = fixture(&format!("{}_dequant", ty_tag(ty)));
        let n = inp.len() / ty.type_size() * QK_K;
        let got = dequantize(ty, &inp, n);
        let exp = f32s(&expected);
        assert_eq!(got.len(), exp.len());
        for (i, (g, e)) in got.iter().zip(&exp).enumerate() {
            // gguf-py evaluates in f32 too, with its own operation order: allow 2 ulp-ish.
            let tol = 2.5e-7 * e.abs().max(g.abs()) + 1e-30;
            assert!(
                (g - e).abs() <= tol,
                "{ty} element {i}: got {g}, gguf-py {e}"
            );
        }
    }
}

#[test]
fn weight_quantizers_match_ggml_c_reference() {
    for ty in K_TYPES {
        let (inp, expected) = fixture(&format!("{}_quant", ty_tag(ty)));
        let x = f32s(&inp);
        let got = quantize(ty, &x);
        assert_eq!(got.len(), expected.len());
        let bs = ty.type_size();
        let differing: Vec<usize> = got
            .chunks(bs)
            .zip(expected.chunks(bs))
            .enumerate()
            .filter(|(_, (g, e))| g != e)
            .map(|(b, _)| b)
            .collect();
        assert!(
            differing.is_empty(),
            "{ty}: blocks {differing:?} differ from ggml's _ref"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// ggml test-quantize-fns method
// ---------------------------------------------------------------------------------------------

fn generate_data(offset: f32, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| 0.1 + 2.0 * (i as f32 + offset).cos())
        .collect()
}

fn array_rmse(a: &[f32], b: &[f32]) -> f32 {
    let sum: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum();
    sum.sqrt() as f32 / a.len() as f32
}

fn dot_f64(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

#[test]
fn ggml_quantize_fns_error_budgets() {
    let n = 32 * 128;
    let x = generate_data(0.0, n);
    let x2 = generate_data(1.0, n);
    for ty in K_TYPES.iter().copied().chain([GgmlType::Q8_K]) {
        let q = quantize(ty, &x);
        let err = array_rmse(&x, &dequantize(ty, &q, n));
        let budget = match ty {
            GgmlType::Q2_K => MAX_QUANTIZATION_TOTAL_ERROR_2BITS,
            GgmlType::Q3_K => MAX_QUANTIZATION_TOTAL_ERROR_3BITS,
            _ => MAX_QUANTIZATION_TOTAL_ERROR,
        };
        assert!(
            err < budget,
            "{ty} absolute quantization error {err} >= {budget}"
        );
        if ty == GgmlType::Q8_K {
            continue;
        }
        let a = quantize(GgmlType::Q8_K, &x2);
        let reference = dot_f64(&x, &x2) as f32;
        let budget = if ty == GgmlType::Q2_K {
            MAX_DOT_PRODUCT_ERROR_LOWBIT
        } else {
            MAX_DOT_PRODUCT_ERROR
        };
        for (which, v) in [
            ("vec_dot", kquants::vec_dot(ty, n, &q, &a)),
            ("vec_dot_scalar", kquants::vec_dot_scalar(ty, n, &q, &a)),
        ] {
            let err = (v - reference).abs() / n as f32;
            assert!(
                err < budget,
                "{ty} {which} dot product error {err} >= {budget}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Fast vs scalar vs f64, random data
// ---------------------------------------------------------------------------------------------

const LENGTHS: [usize; 6] = [256, 512, 1024, 2048, 3072, 4096];

fn random_floats(rng: &mut StdRng, n: usize) -> Vec<f32> {
    let scale = 10f32.powf(rng.gen_range(-3.0..1.0));
    let mean = if rng.gen_bool(0.3) {
        rng.gen_range(-1.0..1.0) * scale
    } else {
        0.0
    };
    (0..n)
        .map(|_| {
            // Roughly normal, heavy-ish tails.
            let u: f32 = (0..4).map(|_| rng.gen_range(-1.0f32..1.0)).sum();
            let outlier = if rng.gen_ratio(1, 200) { 8.0 } else { 1.0 };
            mean + scale * u * outlier
        })
        .collect()
}

/// Random block bytes with sane f16 scales: exercises every bit pattern of the quants and
/// scale fields, not only what our quantizer emits.
fn random_blocks(rng: &mut StdRng, ty: GgmlType, n: usize) -> Vec<u8> {
    let mut b: Vec<u8> = (0..ty.row_bytes(n)).map(|_| rng.gen()).collect();
    let fields: &[usize] = match ty {
        GgmlType::Q2_K => &[80, 82],
        GgmlType::Q3_K => &[108],
        GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
        GgmlType::Q6_K => &[208],
        _ => &[],
    };
    for blk in b.chunks_exact_mut(ty.type_size()) {
        for &off in fields {
            let v = half::f16::from_f32(rng.gen_range(-0.05f32..0.05));
            blk[off..off + 2].copy_from_slice(&v.to_bits().to_le_bytes());
        }
    }
    b
}

fn check_dot(ty: GgmlType, n: usize, w: &[u8], a: &[u8], what: &str) {
    let wd = dequantize(ty, w, n);
    let ad = dequantize(GgmlType::Q8_K, a, n);
    let reference: f64 = wd.iter().zip(&ad).map(|(&x, &y)| x as f64 * y as f64).sum();
    let mag: f64 = wd
        .iter()
        .zip(&ad)
        .map(|(&x, &y)| (x as f64 * y as f64).abs())
        .sum();
    let fast = kquants::vec_dot(ty, n, w, a) as f64;
    let scalar = kquants::vec_dot_scalar(ty, n, w, a) as f64;
    // Integer partial sums are exact; only the f32 scale products and accumulation round.
    let tol = 2e-6 * mag + 1e-30;
    assert!(
        (scalar - reference).abs() <= tol,
        "{ty} n={n} {what}: scalar {scalar} vs f64 {reference} (mag {mag})"
    );
    assert!(
        (fast - reference).abs() <= tol,
        "{ty} n={n} {what}: fast {fast} vs f64 {reference} (mag {mag})"
    );
    assert!(
        (fast - scalar).abs() <= tol,
        "{ty} n={n} {what}: fast {fast} vs scalar {scalar} (mag {mag})"
    );
}

#[test]
fn vec_dot_fast_scalar_and_f64_agree_on_quantized_data() {
    let mut rng = StdRng::seed_from_u64(7);
    for ty in K_TYPES.iter().copied().chain([GgmlType::Q8_K]) {
        for &n in &LENGTHS {
            for _ in 0..4 {
                let w = quantize(ty, &random_floats(&mut rng, n));
                let a = quantize(GgmlType::Q8_K, &random_floats(&mut rng, n));
                check_dot(ty, n, &w, &a, "quantized");
            }
        }
    }
}

#[test]
fn vec_dot_fast_scalar_and_f64_agree_on_random_blocks() {
    let mut rng = StdRng::seed_from_u64(11);
    for ty in K_TYPES {
        for &n in &LENGTHS {
            for _ in 0..4 {
                let w = random_blocks(&mut rng, ty, n);
                let a = quantize(GgmlType::Q8_K, &random_floats(&mut rng, n));
                check_dot(ty, n, &w, &a, "random blocks");
            }
        }
    }
}

#[test]
fn vec_dot_extreme_activations() {
    // Activations at the Q8_K extremes (+-127) and all-max weights stress i16/i32 ranges.
    let mut rng = StdRng::seed_from_u64(3);
    for ty in K_TYPES {
        let n = 4096;
        let mut w = random_blocks(&mut rng, ty, n);
        // Max quants and scales (keep the f16 fields from random_blocks).
        let keep: &[usize] = match ty {
            GgmlType::Q2_K => &[80, 81, 82, 83],
            GgmlType::Q3_K => &[108, 109],
            GgmlType::Q4_K | GgmlType::Q5_K => &[0, 1, 2, 3],
            _ => &[208, 209],
        };
        for blk in w.chunks_exact_mut(ty.type_size()) {
            for (i, v) in blk.iter_mut().enumerate() {
                if !keep.contains(&i) {
                    *v = if ty == GgmlType::Q6_K && (192..208).contains(&i) {
                        0x80
                    } else {
                        0xFF
                    };
                }
            }
        }
        for sign in [1.0f32, -1.0] {
            let x: Vec<f32> = (0..n)
                .map(|i| {
                    if i.is_multiple_of(3) {
                        sign
                    } else {
                        sign * 0.999
                    }
                })
                .collect();
            let a = quantize(GgmlType::Q8_K, &x);
            check_dot(ty, n, &w, &a, "extremes");
        }
    }
}

#[test]
fn q8k_simd_bit_exact_on_random_rows() {
    let mut rng = StdRng::seed_from_u64(5);
    for _ in 0..200 {
        let n = QK_K * rng.gen_range(1..=16);
        let mut x = random_floats(&mut rng, n);
        // Sprinkle exact ties, duplicated +-max and zeros.
        for _ in 0..rng.gen_range(0..8) {
            let i = rng.gen_range(0..n);
            let j = rng.gen_range(0..n);
            x[j] = -x[i];
        }
        if rng.gen_bool(0.1) {
            let b = rng.gen_range(0..n / QK_K);
            x[b * QK_K..(b + 1) * QK_K].fill(0.0);
        }
        assert_eq!(quantize(GgmlType::Q8_K, &x), q8k_reference(&x));
    }
}

#[test]
fn round_trip_errors_are_small_on_random_data() {
    let mut rng = StdRng::seed_from_u64(9);
    for ty in K_TYPES {
        let n = 4096;
        let x = random_floats(&mut rng, n);
        let y = dequantize(ty, &quantize(ty, &x), n);
        let rms_x = (x.iter().map(|v| (v * v) as f64).sum::<f64>() / n as f64).sqrt();
        let rms_e = (x
            .iter()
            .zip(&y)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum::<f64>()
            / n as f64)
            .sqrt();
        let bound = match ty {
            GgmlType::Q2_K => 0.45,
            GgmlType::Q3_K => 0.25,
            GgmlType::Q4_K => 0.12,
            GgmlType::Q5_K => 0.06,
            _ => 0.03,
        };
        assert!(
            rms_e / rms_x < bound,
            "{ty}: relative rms error {}",
            rms_e / rms_x
        );
    }
}

#[test]
fn degenerate_inputs_do_not_panic() {
    for ty in K_TYPES.iter().copied().chain([GgmlType::Q8_K]) {
        for x in [
            vec![0f32; 512],
            vec![1e-30f32; 512],
            vec![-3.5f32; 512],
            vec![65504f32; 512],
        ] {
            let q = quantize(ty, &x);
            let y = dequantize(ty, &q, 512);
            assert!(y.iter().all(|v| v.is_finite()), "{ty}");
            let a = quantize(GgmlType::Q8_K, &x);
            let _ = kquants::vec_dot(ty, 512, &q, &a);
            // Short buffers must not read out of bounds or panic.
            let _ = kquants::vec_dot(ty, 512, &q[..q.len() / 2], &a);
            let _ = kquants::vec_dot_scalar(ty, 512, &q, &a[..10]);
        }
    }
}

/// Re-runs the bit-exact and agreement tests in a child process with `LETHE_ISA=scalar`
/// (and `avx2` where AVX-512 is present), so every dispatch level of the library is covered.
#[test]
fn other_isa_levels_in_child_process() {
    if std::env::var("LETHE_ISA").is_ok() {
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let mut levels = vec!["scalar"];
    if lethe_kernels::cpu::isa() == lethe_kernels::cpu::Isa::Avx512 {
        levels.push("avx2");
    }
    for level in levels {
        let out = std::process::Command::new(&exe)
            .env("LETHE_ISA", level)
            .args([
                "--test-threads",
                "2",
                "--skip",
                "other_isa_levels_in_child_process",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "LETHE_ISA={level} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
