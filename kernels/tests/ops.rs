//! The small ops against f64 references.

use half::f16;
use lethe_kernels::ops;

fn data(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32 * 0.37 + seed as f32).sin() * 2.0) + 0.1)
        .collect()
}

#[test]
fn rmsnorm_matches_f64() {
    for n in [8, 64, 576, 640] {
        let x = data(n, 1);
        let w = data(n, 2);
        let mut out = vec![0.0; n];
        ops::rmsnorm(&mut out, &x, &w, 1e-6);
        let ms: f64 = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / n as f64;
        let s = 1.0 / (ms + 1e-6).sqrt();
        for i in 0..n {
            let r = x[i] as f64 * s * w[i] as f64;
            assert!(
                (out[i] as f64 - r).abs() <= 1e-5 * (1.0 + r.abs()),
                "{i}: {} vs {r}",
                out[i]
            );
        }
    }
}

#[test]
fn softmax_matches_f64_and_sums_to_one() {
    let mut x = data(1000, 3);
    x[5] = 80.0; // large values must not overflow
    let r: Vec<f64> = {
        let m = x.iter().copied().fold(f32::MIN, f32::max) as f64;
        let e: Vec<f64> = x.iter().map(|&v| (v as f64 - m).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|v| v / s).collect()
    };
    ops::softmax_inplace(&mut x);
    let sum: f64 = x.iter().map(|&v| v as f64).sum();
    assert!((sum - 1.0).abs() < 1e-5);
    for (a, b) in x.iter().zip(&r) {
        assert!((*a as f64 - b).abs() < 1e-6);
    }
}

#[test]
fn rope_rotates_pairs_as_ggml() {
    let hd = 64;
    for kind in [ops::RopeKind::Norm, ops::RopeKind::Neox] {
        let t = ops::RopeTable::new(kind, hd, 10000.0, 1.0);
        let mut cs = vec![0.0; hd];
        let pos = 37;
        t.fill(pos, &mut cs);
        let x = data(2 * hd, 4);
        let mut y = x.clone();
        ops::rope_inplace(kind, &mut y, hd, hd, &cs);
        for h in 0..2 {
            for i in 0..hd / 2 {
                let theta = pos as f64 * 10000f64.powf(-2.0 * i as f64 / hd as f64);
                let (a, b) = match kind {
                    ops::RopeKind::Norm => (h * hd + 2 * i, h * hd + 2 * i + 1),
                    ops::RopeKind::Neox => (h * hd + i, h * hd + i + hd / 2),
                };
                let (xa, xb) = (x[a] as f64, x[b] as f64);
                let ra = xa * theta.cos() - xb * theta.sin();
                let rb = xa * theta.sin() + xb * theta.cos();
                assert!(
                    (y[a] as f64 - ra).abs() < 1e-4 && (y[b] as f64 - rb).abs() < 1e-4,
                    "{kind:?} {h} {i}"
                );
            }
        }
        // Norm is preserved.
        let n0: f32 = x.iter().map(|v| v * v).sum();
        let n1: f32 = y.iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() / n0 < 1e-5);
    }
}

#[test]
fn activations_match_f64() {
    for &x in &[-6.0f32, -1.5, -0.1, 0.0, 0.3, 2.0, 9.0] {
        let xd = x as f64;
        let silu = xd / (1.0 + (-xd).exp());
        assert!((ops::silu(x) as f64 - silu).abs() < 1e-6);
        let gelu = 0.5
            * xd
            * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (xd + 0.044715 * xd.powi(3))).tanh());
        assert!((ops::gelu_tanh(x) as f64 - gelu).abs() < 1e-5);
    }
}

#[test]
fn f16_attention_loops_match_scalar() {
    for n in [8, 64, 256, 72] {
        let q = data(n, 5);
        let k: Vec<f16> = data(n, 6).iter().map(|&v| f16::from_f32(v)).collect();
        let r: f64 = q.iter().zip(&k).map(|(&a, &b)| a as f64 * b.to_f64()).sum();
        let d = ops::dot_f16(&q, &k) as f64;
        assert!((d - r).abs() < 1e-4 * (1.0 + r.abs()), "n={n}: {d} vs {r}");
        let mut out = data(n, 7);
        let before = out.clone();
        ops::axpy_f16(&mut out, 0.5, &k);
        for i in 0..n {
            let want = before[i] as f64 + 0.5 * k[i].to_f64();
            assert!((out[i] as f64 - want).abs() < 1e-5);
        }
    }
}

#[test]
fn exp_fast_is_within_2_ulp() {
    let mut worst = 0.0f64;
    let mut x = -103.0f32;
    while x < 88.5 {
        let got = ops::exp_fast(x) as f64;
        let want = (x as f64).exp();
        if want > 1e-37 {
            worst = worst.max(((got - want) / want).abs());
        }
        x += 0.0137;
    }
    assert!(worst < 2.5e-7, "max relative error {worst}");
    assert_eq!(ops::exp_fast(-1000.0), 0.0);
    assert!(ops::exp_fast(1000.0) > 1e38);
    assert_eq!(ops::exp_fast(0.0), 1.0);
}

#[test]
fn layernorm_matches_f64() {
    for n in [8, 128, 2560] {
        let x = data(n, 3);
        let w = data(n, 4);
        let b = data(n, 5);
        let mut out = vec![0.0; n];
        ops::layernorm(&mut out, &x, &w, &b, 1e-5);
        let mut inplace = x.clone();
        ops::layernorm_inplace(&mut inplace, &w, &b, 1e-5);
        assert_eq!(inplace, out, "in place, the same bits");
        let mean: f64 = x.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        let var: f64 = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n as f64;
        let s = 1.0 / (var + 1e-5).sqrt();
        for i in 0..n {
            let r = (x[i] as f64 - mean) * s * w[i] as f64 + b[i] as f64;
            assert!(
                (out[i] as f64 - r).abs() <= 1e-5 * (1.0 + r.abs()),
                "{i}: {} vs {r}",
                out[i]
            );
        }
    }
}

#[test]
fn gelu_inplace_matches_f64() {
    let x = data(1003, 11);
    let mut g = x.clone();
    ops::gelu_tanh_inplace(&mut g);
    for i in 0..x.len() {
        let xd = x[i] as f64;
        let want = 0.5
            * xd
            * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (xd + 0.044715 * xd.powi(3))).tanh());
        assert!(
            (g[i] as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
            "{i}"
        );
    }
}

#[test]
fn fused_activations_match_f64() {
    let x = data(1003, 9);
    let u = data(1003, 10);
    let mut g = x.clone();
    ops::gelu_tanh_mul(&mut g, &u);
    let mut s = x.clone();
    ops::silu_mul(&mut s, &u);
    for i in 0..x.len() {
        let xd = x[i] as f64;
        let gelu = 0.5
            * xd
            * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (xd + 0.044715 * xd.powi(3))).tanh());
        let silu = xd / (1.0 + (-xd).exp());
        let (wg, ws) = (gelu * u[i] as f64, silu * u[i] as f64);
        assert!(
            (g[i] as f64 - wg).abs() <= 1e-5 * (1.0 + wg.abs()),
            "gelu {i}"
        );
        assert!(
            (s[i] as f64 - ws).abs() <= 1e-5 * (1.0 + ws.abs()),
            "silu {i}"
        );
    }
}

/// `attend_group` against the one-head-at-a-time ops (bit for bit: same sums, same order) and
/// against an f64 reference, for every head count, head sizes with and without a 16-wide
/// remainder, strides wider than a head, one to many positions, with and without a softcap.
#[test]
fn attend_group_matches_single_heads_and_f64() {
    for g in 1..=ops::GROUP_MAX {
        for hd in [8, 24, 64, 80, 256] {
            for n in [1, 7, 100] {
                for softcap in [None, Some(20.0f32)] {
                    let stride = 3 * hd;
                    let q: Vec<f32> = data(g * hd, 5).iter().map(|x| x * 0.3).collect();
                    let k: Vec<f16> = data(n * stride, 6)
                        .iter()
                        .map(|&x| f16::from_f32(x))
                        .collect();
                    let v: Vec<f16> = data(n * stride, 7)
                        .iter()
                        .map(|&x| f16::from_f32(x))
                        .collect();
                    let scale = 1.0 / (hd as f32).sqrt();
                    let mut sc = vec![0.0; g * n];
                    let mut out = vec![f32::NAN; g * hd];
                    ops::attend_group(&q, hd, &k, &v, stride, n, scale, softcap, &mut sc, &mut out);
                    let mut sc2 = vec![0.0; g * n];
                    let mut out2 = vec![f32::NAN; g * hd];
                    ops::attend_group_scalar(
                        &q, hd, &k, &v, stride, n, scale, softcap, &mut sc2, &mut out2,
                    );
                    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&out), bits(&out2), "g {g} hd {hd} n {n} {softcap:?}");
                    for i in 0..g {
                        let s: Vec<f64> = (0..n)
                            .map(|j| {
                                let d: f64 = (0..hd)
                                    .map(|c| q[i * hd + c] as f64 * k[j * stride + c].to_f64())
                                    .sum::<f64>()
                                    * scale as f64;
                                softcap.map_or(d, |c| c as f64 * (d / c as f64).tanh())
                            })
                            .collect();
                        let m = s.iter().copied().fold(f64::MIN, f64::max);
                        let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                        let z: f64 = e.iter().sum();
                        for c in 0..hd {
                            let r: f64 =
                                (0..n).map(|j| e[j] / z * v[j * stride + c].to_f64()).sum();
                            let got = out[i * hd + c] as f64;
                            assert!(
                                (got - r).abs() <= 1e-4 * (1.0 + r.abs()),
                                "g {g} hd {hd} n {n} head {i} col {c}: {got} vs {r}"
                            );
                        }
                    }
                }
            }
        }
    }
}
