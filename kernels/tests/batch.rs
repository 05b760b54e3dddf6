//! `vec_dot_batch` (one weight row against several activation rows): every type that has a
//! dot product, fast batch kernels and the generic fallback, against `vec_dot`,
//! `vec_dot_scalar` and an f64 reference (ggml's test-quantize-fns budgets). Batch results are
//! the same bits as `vec_dot`'s and within 1e-4 relative of `vec_dot_scalar`'s.
//!
//! Run: `cargo test --release -p lethe-kernels --test batch`

use lethe_kernels::quant::{self, GgmlType};
use rand::{rngs::StdRng, Rng, SeedableRng};

// ggml tests/test-quantize-fns.cpp budgets.
const MAX_DOT_PRODUCT_ERROR: f32 = 0.02;
const MAX_DOT_PRODUCT_ERROR_LOWBIT: f32 = 0.04;

const LENGTHS: [usize; 7] = [256, 512, 768, 1024, 2048, 3072, 4096];
const MAX_ACT: usize = 9;

fn weight_types() -> impl Iterator<Item = GgmlType> {
    GgmlType::ALL.into_iter().filter(|&t| quant::has_vec_dot(t))
}

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

fn random_floats(rng: &mut StdRng, n: usize) -> Vec<f32> {
    let scale = 10f32.powf(rng.gen_range(-3.0..1.0));
    let mean = if rng.gen_bool(0.3) {
        rng.gen_range(-1.0..1.0) * scale
    } else {
        0.0
    };
    (0..n)
        .map(|_| {
            let u: f32 = (0..4).map(|_| rng.gen_range(-1.0f32..1.0)).sum();
            let outlier = if rng.gen_ratio(1, 200) { 8.0 } else { 1.0 };
            mean + scale * u * outlier
        })
        .collect()
}

/// Offsets of the f16 scale fields inside one block of `ty`.
fn f16_fields(ty: GgmlType) -> &'static [usize] {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q8_1 => &[0, 2],
        GgmlType::Q2_K => &[80, 82],
        GgmlType::Q3_K => &[108],
        GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
        GgmlType::Q6_K => &[208],
        _ => &[],
    }
}

/// Random block bytes with sane f16 scales: every bit pattern of the quants and scale fields,
/// not only what the quantizers emit. Float types get quantized random floats instead.
fn random_blocks(rng: &mut StdRng, ty: GgmlType, n: usize) -> Vec<u8> {
    if !ty.is_quantized() {
        return quantize(ty, &random_floats(rng, n));
    }
    let mut b: Vec<u8> = (0..ty.row_bytes(n)).map(|_| rng.gen()).collect();
    for blk in b.chunks_exact_mut(ty.type_size()) {
        for &off in f16_fields(ty) {
            let v = half::f16::from_f32(rng.gen_range(-0.05f32..0.05));
            blk[off..off + 2].copy_from_slice(&v.to_bits().to_le_bytes());
        }
    }
    b
}

/// `n_act` activation rows of `n` elements in `ty.vec_dot_type()`, `stride` bytes apart
/// (padding between rows filled with junk).
fn activations(rng: &mut StdRng, ty: GgmlType, n: usize, n_act: usize, stride: usize) -> Vec<u8> {
    let vt = ty.vec_dot_type();
    let mut a: Vec<u8> = (0..stride * n_act).map(|_| rng.gen()).collect();
    for j in 0..n_act {
        let q = quantize(vt, &random_floats(rng, n));
        a[j * stride..j * stride + q.len()].copy_from_slice(&q);
    }
    a
}

/// Sum of |w_i * a_i| in f64 (the scale of the rounding error of a dot product).
fn magnitude(ty: GgmlType, n: usize, w: &[u8], a: &[u8]) -> f64 {
    let wd = dequantize(ty, w, n);
    let ad = dequantize(ty.vec_dot_type(), a, n);
    wd.iter()
        .zip(&ad)
        .map(|(&x, &y)| (x as f64 * y as f64).abs())
        .sum()
}

fn check_batch(
    ty: GgmlType,
    n: usize,
    w: &[u8],
    act: &[u8],
    stride: usize,
    n_act: usize,
    what: &str,
) {
    let mut out = vec![f32::NAN; n_act + 1];
    quant::vec_dot_batch(ty, n, w, act, stride, n_act, &mut out);
    assert!(out[n_act].is_nan(), "{ty}: wrote past n_act");
    for (j, &b) in out[..n_act].iter().enumerate() {
        let a = &act[j * stride..];
        let single = quant::vec_dot(ty, n, w, a);
        let scalar = quant::vec_dot_scalar(ty, n, w, a);
        // The batch kernels keep the single-row kernels' integer math and f32 accumulation
        // order: the same bits as `vec_dot` on the same instruction set.
        assert_eq!(
            b.to_bits(),
            single.to_bits(),
            "{ty} n={n} n_act={n_act} row {j} {what}: batch {b} vs vec_dot {single}"
        );
        let mag = magnitude(ty, n, w, &a[..ty.vec_dot_type().row_bytes(n)]);
        for (name, r) in [("vec_dot", single), ("vec_dot_scalar", scalar)] {
            // 1e-4 relative, measured against the value or (under cancellation) a hundredth
            // of the sum of magnitudes.
            let tol = 1e-4 * (r.abs() as f64).max(1e-2 * mag) + 1e-30;
            assert!(
                (b as f64 - r as f64).abs() <= tol,
                "{ty} n={n} n_act={n_act} row {j} {what}: batch {b} vs {name} {r} (mag {mag})"
            );
        }
    }
}

#[test]
fn fast_paths_cover_the_reference_model_types() {
    for ty in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ] {
        assert!(quant::has_batch_fast_path(ty), "{ty}");
    }
    assert!(!quant::has_batch_fast_path(GgmlType::F32));
}

#[test]
fn batch_matches_single_row_on_quantized_data() {
    let mut rng = StdRng::seed_from_u64(1);
    for ty in weight_types() {
        for &n in &LENGTHS {
            let w = quantize(ty, &random_floats(&mut rng, n));
            let ab = ty.vec_dot_type().row_bytes(n);
            let act = activations(&mut rng, ty, n, MAX_ACT, ab);
            for n_act in 1..=MAX_ACT {
                check_batch(ty, n, &w, &act, ab, n_act, "quantized");
            }
        }
    }
}

#[test]
fn batch_matches_single_row_on_random_blocks_with_padded_stride() {
    let mut rng = StdRng::seed_from_u64(2);
    for ty in weight_types() {
        for &n in &LENGTHS {
            let w = random_blocks(&mut rng, ty, n);
            // An odd stride: rows neither aligned nor adjacent.
            let stride = ty.vec_dot_type().row_bytes(n) + 13;
            let act = activations(&mut rng, ty, n, MAX_ACT, stride);
            for n_act in 1..=MAX_ACT {
                check_batch(ty, n, &w, &act, stride, n_act, "random blocks");
            }
        }
    }
}

#[test]
fn batch_extreme_values() {
    // All-ones quant bytes (largest unsigned quants, all fifth/sixth bits set) against
    // activations at the Q8 extremes: the i16/i32 intermediate ranges of the kernels.
    let n = 1024;
    for ty in weight_types().filter(|t| t.is_quantized()) {
        let mut w = vec![0xFFu8; ty.row_bytes(n)];
        for blk in w.chunks_exact_mut(ty.type_size()) {
            for &off in f16_fields(ty) {
                blk[off..off + 2]
                    .copy_from_slice(&half::f16::from_f32(0.01).to_bits().to_le_bytes());
            }
        }
        let xs: Vec<Vec<f32>> = vec![
            (0..n)
                .map(|i| if i % 2 == 0 { 100.0 } else { -100.0 })
                .collect(),
            vec![100.0; n],
            vec![-100.0; n],
            (0..n)
                .map(|i| if i % 3 == 0 { -100.0 } else { 0.5 })
                .collect(),
            (0..n).map(|i| (i as f32).sin() * 100.0).collect(),
        ];
        let vt = ty.vec_dot_type();
        let ab = vt.row_bytes(n);
        let act: Vec<u8> = xs.iter().flat_map(|x| quantize(vt, x)).collect();
        for n_act in 1..=xs.len() {
            check_batch(ty, n, &w, &act, ab, n_act, "extremes");
        }
    }
}

fn generate_data(offset: f32, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| 0.1 + 2.0 * (i as f32 + offset).cos())
        .collect()
}

#[test]
fn ggml_dot_product_error_budget() {
    let n = 32 * 128;
    let x = generate_data(0.0, n);
    for ty in weight_types() {
        let w = quantize(ty, &x);
        let vt = ty.vec_dot_type();
        let ab = vt.row_bytes(n);
        let ys: Vec<Vec<f32>> = (1..=MAX_ACT).map(|k| generate_data(k as f32, n)).collect();
        let act: Vec<u8> = ys.iter().flat_map(|y| quantize(vt, y)).collect();
        let budget = if ty == GgmlType::Q2_K {
            MAX_DOT_PRODUCT_ERROR_LOWBIT
        } else {
            MAX_DOT_PRODUCT_ERROR
        };
        for n_act in 1..=MAX_ACT {
            let mut out = vec![0f32; n_act];
            quant::vec_dot_batch(ty, n, &w, &act, ab, n_act, &mut out);
            for (j, &v) in out.iter().enumerate() {
                let reference: f64 = x
                    .iter()
                    .zip(&ys[j])
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum();
                let err = |v: f32| (v as f64 - reference).abs() as f32 / n as f32;
                let single = err(quant::vec_dot(ty, n, &w, &act[j * ab..]));
                // Row 0 is ggml's data (offset 1): the budget holds as in test-quantize-fns.
                // The other offsets are as good as the single-row dot product on the same data
                // (for a few low-bit types the error there exceeds the budget either way).
                let e = err(v);
                assert!(
                    e < budget || (j > 0 && e <= single * 1.001 + 1e-6),
                    "{ty} n_act={n_act} row {j}: dot product error {e} >= {budget} (single {single})"
                );
                if j == 0 {
                    assert!(
                        single < budget,
                        "{ty}: single-row error {single} >= {budget}"
                    );
                }
            }
        }
    }
}

#[test]
fn zero_rows_and_bounds() {
    let n = 256;
    let ty = GgmlType::Q4_K;
    let w = vec![0u8; ty.row_bytes(n)];
    let mut out: [f32; 0] = [];
    quant::vec_dot_batch(ty, n, &w, &[], 0, 0, &mut out);
    // One row with stride 0 needs only one row of activations.
    let a = quantize(GgmlType::Q8_K, &vec![1.0; n]);
    let mut o = [1.0f32; 1];
    quant::vec_dot_batch(ty, n, &w, &a, 0, 1, &mut o);
    assert_eq!(o[0], 0.0);
}

#[test]
#[should_panic(expected = "activation rows too short")]
fn short_activations_panic() {
    let n = 256;
    let ty = GgmlType::Q6_K;
    let w = vec![0u8; ty.row_bytes(n)];
    let a = vec![0u8; GgmlType::Q8_K.row_bytes(n) * 2];
    let mut out = [0f32; 3];
    quant::vec_dot_batch(ty, n, &w, &a, GgmlType::Q8_K.row_bytes(n), 3, &mut out);
}

/// `vec_dot_tile` over `n_w` weight rows (`w_stride` apart) and `n_act` activation rows
/// against `vec_dot` per element, same bits; the output padding stays untouched.
#[allow(clippy::too_many_arguments)]
fn check_tile(
    ty: GgmlType,
    n: usize,
    w: &[u8],
    w_stride: usize,
    n_w: usize,
    act: &[u8],
    stride: usize,
    n_act: usize,
    what: &str,
) {
    let os = n_act + 3;
    let mut out = vec![f32::NAN; n_w * os];
    quant::vec_dot_tile(ty, n, w, w_stride, n_w, act, stride, n_act, &mut out, os);
    for i in 0..n_w {
        for j in 0..os {
            let v = out[i * os + j];
            if j >= n_act {
                assert!(v.is_nan(), "{ty}: tile wrote padding ({i}, {j})");
                continue;
            }
            let single = quant::vec_dot(ty, n, &w[i * w_stride..], &act[j * stride..]);
            assert_eq!(
                v.to_bits(),
                single.to_bits(),
                "{ty} n={n} n_w={n_w} n_act={n_act} ({i}, {j}) {what}: tile {v} vs vec_dot {single}"
            );
        }
    }
}

#[test]
fn tile_matches_single_row() {
    let mut rng = StdRng::seed_from_u64(3);
    for ty in weight_types() {
        // 96, 608 and 768: odd block counts (the tile's last block goes alone).
        for n in [96usize, 256, 608, 640, 768, 1024, 2048] {
            if !n.is_multiple_of(ty.block_size()) {
                continue;
            }
            // Odd strides: rows neither aligned nor adjacent.
            let rb = ty.row_bytes(n);
            let w_stride = rb + 7;
            let max_w = 5;
            let mut w: Vec<u8> = Vec::new();
            for _ in 0..max_w {
                let row = if rng.gen_bool(0.5) {
                    random_blocks(&mut rng, ty, n)
                } else {
                    quantize(ty, &random_floats(&mut rng, n))
                };
                w.extend_from_slice(&row);
                w.extend((0..w_stride - rb).map(|_| rng.gen::<u8>()));
            }
            let stride = ty.vec_dot_type().row_bytes(n) + 13;
            let act = activations(&mut rng, ty, n, MAX_ACT, stride);
            for n_w in 1..=max_w {
                for n_act in 1..=MAX_ACT {
                    check_tile(ty, n, &w, w_stride, n_w, &act, stride, n_act, "random");
                }
            }
        }
    }
}

#[test]
fn tile_extreme_values() {
    let n = 1024;
    for ty in weight_types().filter(|t| t.is_quantized()) {
        let rb = ty.row_bytes(n);
        let mut w = Vec::new();
        for fill in [0xFFu8, 0x00, 0x80, 0x7F] {
            let mut row = vec![fill; rb];
            for blk in row.chunks_exact_mut(ty.type_size()) {
                for &off in f16_fields(ty) {
                    blk[off..off + 2]
                        .copy_from_slice(&half::f16::from_f32(0.01).to_bits().to_le_bytes());
                }
            }
            w.extend_from_slice(&row);
        }
        let vt = ty.vec_dot_type();
        let ab = vt.row_bytes(n);
        let xs: Vec<Vec<f32>> = vec![
            (0..n)
                .map(|i| if i % 2 == 0 { 100.0 } else { -100.0 })
                .collect(),
            vec![100.0; n],
            vec![-100.0; n],
            (0..n)
                .map(|i| if i % 3 == 0 { -100.0 } else { 0.5 })
                .collect(),
            (0..n).map(|i| (i as f32).sin() * 100.0).collect(),
        ];
        // Nine activation rows (the five above, repeated): tiles of eight and one more.
        let act: Vec<u8> = xs
            .iter()
            .cycle()
            .take(MAX_ACT)
            .flat_map(|x| quantize(vt, x))
            .collect();
        for n_w in 1..=4 {
            for n_act in 1..=MAX_ACT {
                check_tile(ty, n, &w, rb, n_w, &act, ab, n_act, "extremes");
            }
        }
    }
}

#[test]
fn tile_empty_and_bounds() {
    let n = 256;
    let ty = GgmlType::Q5_0;
    let mut out: [f32; 0] = [];
    quant::vec_dot_tile(ty, n, &[], 0, 0, &[], 0, 0, &mut out, 0);
    let w = vec![0u8; ty.row_bytes(n)];
    let a = quantize(GgmlType::Q8_0, &vec![1.0; n]);
    let mut o = [1.0f32; 1];
    quant::vec_dot_tile(ty, n, &w, 0, 1, &a, 0, 1, &mut o, 0);
    assert_eq!(o[0], 0.0);
}

#[test]
#[should_panic(expected = "weight rows too short")]
fn tile_short_weights_panic() {
    let n = 256;
    let ty = GgmlType::Q8_0;
    let rb = ty.row_bytes(n);
    let w = vec![0u8; rb * 2];
    let a = vec![0u8; rb];
    let mut out = [0f32; 3];
    quant::vec_dot_tile(ty, n, &w, rb, 3, &a, rb, 1, &mut out, 1);
}

/// `n_act` activation rows of `n` elements in the interleaved layout, `stride` bytes apart
/// (junk between rows), and the same rows in the usual layout (packed).
fn activations_x8(
    rng: &mut StdRng,
    ty: GgmlType,
    n: usize,
    n_act: usize,
    stride: usize,
    xs: Option<&[Vec<f32>]>,
) -> (Vec<u8>, Vec<u8>) {
    let vt = ty.vec_dot_type();
    let mut a: Vec<u8> = (0..stride * n_act).map(|_| rng.gen()).collect();
    let mut plain = Vec::new();
    for j in 0..n_act {
        let x = xs.map_or_else(|| random_floats(rng, n), |xs| xs[j].clone());
        plain.extend(quantize(vt, &x));
        quant::quantize_row_x8(
            vt,
            &x,
            &mut a[j * stride..j * stride + quant::x8_row_bytes(n)],
        )
        .unwrap();
    }
    (a, plain)
}

/// `vec_dot_tile_x8` against `vec_dot` on the usual layout, same bits; padding untouched.
#[allow(clippy::too_many_arguments)]
fn check_tile_x8(
    ty: GgmlType,
    n: usize,
    w: &[u8],
    w_stride: usize,
    n_w: usize,
    act: &[u8],
    stride: usize,
    plain: &[u8],
    n_act: usize,
    what: &str,
) {
    let ab = ty.vec_dot_type().row_bytes(n);
    let os = n_act + 3;
    let mut out = vec![f32::NAN; n_w * os];
    quant::vec_dot_tile_x8(ty, n, w, w_stride, n_w, act, stride, n_act, &mut out, os);
    for i in 0..n_w {
        for j in 0..os {
            let v = out[i * os + j];
            if j >= n_act {
                assert!(v.is_nan(), "{ty}: x8 tile wrote padding ({i}, {j})");
                continue;
            }
            let a = &plain[j * ab..(j + 1) * ab];
            let wi = &w[i * w_stride..];
            let single = quant::vec_dot(ty, n, wi, a);
            assert_eq!(
                v.to_bits(),
                single.to_bits(),
                "{ty} n={n} n_w={n_w} n_act={n_act} ({i}, {j}) {what}: x8 tile {v} vs vec_dot {single}"
            );
            let scalar = quant::vec_dot_scalar(ty, n, wi, a);
            let mag = magnitude(ty, n, &wi[..ty.row_bytes(n)], a);
            let tol = 1e-4 * (scalar.abs() as f64).max(1e-2 * mag) + 1e-30;
            assert!(
                (v as f64 - scalar as f64).abs() <= tol,
                "{ty} n={n} ({i}, {j}) {what}: x8 tile {v} vs vec_dot_scalar {scalar}"
            );
        }
    }
}

#[test]
fn quantize_row_x8_is_the_usual_quants_interleaved() {
    let mut rng = StdRng::seed_from_u64(5);
    for vt in [GgmlType::Q8_0, GgmlType::Q8_1] {
        for n in [32usize, 96, 256, 576, 608, 1536] {
            let x = random_floats(&mut rng, n);
            let plain = quantize(vt, &x);
            let mut il = vec![0xAAu8; quant::x8_row_bytes(n) + 5];
            quant::quantize_row_x8(vt, &x, &mut il).unwrap();
            assert!(il[quant::x8_row_bytes(n)..].iter().all(|&b| b == 0xAA));
            let (bs, off) = (vt.type_size(), vt.type_size() - 32);
            let nb = n / 32;
            for g in 0..nb.div_ceil(8) {
                let grp = &il[g * 288..(g + 1) * 288];
                for k in 0..8 {
                    let b = 8 * g + k;
                    if b >= nb {
                        assert!(grp[2 * k..2 * k + 2].iter().all(|&v| v == 0));
                        assert!(grp[16 + 2 * k..16 + 2 * k + 2].iter().all(|&v| v == 0));
                        for v in 0..8 {
                            assert_eq!(&grp[32 + 32 * v + 4 * k..][..4], &[0; 4]);
                        }
                        continue;
                    }
                    let blk = &plain[b * bs..(b + 1) * bs];
                    assert_eq!(&grp[2 * k..2 * k + 2], &blk[..2], "{vt} n={n} d of {b}");
                    let second = if vt == GgmlType::Q8_1 {
                        [blk[2], blk[3]]
                    } else {
                        let s: i32 = blk[off..].iter().map(|&q| q as i8 as i32).sum();
                        (s as i16).to_le_bytes()
                    };
                    assert_eq!(&grp[16 + 2 * k..16 + 2 * k + 2], &second);
                    for v in 0..8 {
                        assert_eq!(
                            &grp[32 + 32 * v + 4 * k..][..4],
                            &blk[off + 4 * v..off + 4 * v + 4]
                        );
                    }
                }
            }
        }
    }
}

/// The types whose SIMD kernels sum in eight-block lanes.
const X8_TYPES: [GgmlType; 4] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q8_0,
];

#[test]
fn x8_tiles_run_on_every_simd_level() {
    let simd = lethe_kernels::cpu::isa() != lethe_kernels::cpu::Isa::Scalar;
    for ty in X8_TYPES {
        assert_eq!(quant::has_tile_x8(ty), simd, "{ty}");
    }
    assert!(!quant::has_tile_x8(GgmlType::Q5_1));
    assert!(!quant::has_tile_x8(GgmlType::Q4_K));
}

#[test]
fn tile_x8_matches_single_row() {
    let mut rng = StdRng::seed_from_u64(6);
    for ty in X8_TYPES {
        if !quant::has_tile_x8(ty) {
            continue;
        }
        // Block counts 1, 3, 8, 18 (SmolLM2's 576), 19, 48 (1536), 64: full groups and
        // partial groups of every size class.
        for n in [32usize, 96, 256, 576, 608, 1536, 2048] {
            let rb = ty.row_bytes(n);
            let w_stride = rb + 7;
            let max_w = 5;
            let mut w: Vec<u8> = Vec::new();
            for _ in 0..max_w {
                let row = if rng.gen_bool(0.5) {
                    random_blocks(&mut rng, ty, n)
                } else {
                    quantize(ty, &random_floats(&mut rng, n))
                };
                w.extend_from_slice(&row);
                w.extend((0..w_stride - rb).map(|_| rng.gen::<u8>()));
            }
            // The last weight row ends the buffer: partial groups must not read past it.
            w.truncate((max_w - 1) * w_stride + rb);
            let stride = quant::x8_row_bytes(n) + 13;
            let (act, plain) = activations_x8(&mut rng, ty, n, MAX_ACT, stride, None);
            for n_w in 1..=max_w {
                for n_act in 1..=MAX_ACT {
                    let what = "random";
                    check_tile_x8(ty, n, &w, w_stride, n_w, &act, stride, &plain, n_act, what);
                }
            }
        }
    }
}

#[test]
fn tile_x8_extreme_values() {
    let mut rng = StdRng::seed_from_u64(7);
    for ty in X8_TYPES {
        if !quant::has_tile_x8(ty) {
            continue;
        }
        for n in [1024usize, 608] {
            let rb = ty.row_bytes(n);
            let mut w = Vec::new();
            for fill in [0xFFu8, 0x00, 0x80, 0x7F, 0x81] {
                let mut row = vec![fill; rb];
                for blk in row.chunks_exact_mut(ty.type_size()) {
                    for &off in f16_fields(ty) {
                        blk[off..off + 2]
                            .copy_from_slice(&half::f16::from_f32(0.01).to_bits().to_le_bytes());
                    }
                }
                w.extend_from_slice(&row);
            }
            let xs: Vec<Vec<f32>> = vec![
                (0..n)
                    .map(|i| if i % 2 == 0 { 100.0 } else { -100.0 })
                    .collect(),
                vec![100.0; n],
                vec![-100.0; n],
                (0..n)
                    .map(|i| if i % 3 == 0 { -100.0 } else { 0.5 })
                    .collect(),
                (0..n).map(|i| (i as f32).sin() * 100.0).collect(),
            ];
            let stride = quant::x8_row_bytes(n);
            let (act, plain) = activations_x8(&mut rng, ty, n, xs.len(), stride, Some(&xs));
            for n_w in 1..=5 {
                for n_act in 1..=xs.len() {
                    let what = "extremes";
                    check_tile_x8(ty, n, &w, rb, n_w, &act, stride, &plain, n_act, what);
                }
            }
        }
    }
}

/// Re-runs the agreement tests with `LETHE_ISA=scalar` (the generic fallback) and, where
/// AVX-512 is present, `LETHE_ISA=avx2` (the AVX2 build of the kernels).
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
