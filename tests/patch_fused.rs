//! The fused low-rank path of a forward pass (a LoRA's `A x` computed in the weights' own
//! matmul job from f16 factors, then `B (A x)` added over the output rows) against the same
//! delta materialised as a dense F32 matrix and applied by the plain path, on both models,
//! for one token and for a prefill batch, through every matrix of a block.

mod common;

use common::model_path;
use lethe::model::{Model, Proj, WeightId};
use lethe::patch::{load, write_delta, write_lora, DeltaEntry, LowRankEntry, Patch, PatchSet};
use lethe_kernels::quant::GgmlType;
use std::sync::Arc;

/// Deterministic pseudo-random values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// A rank-`rank` LoRA on `targets`, and the same deltas as dense F32 matrices.
fn lora_and_dense(
    m: &Model,
    dir: &std::path::Path,
    rank: usize,
    targets: &[WeightId],
) -> (Arc<Patch>, Arc<Patch>) {
    let (mut lr, mut dense) = (Vec::new(), Vec::new());
    for (i, &t) in targets.iter().enumerate() {
        let (cols, rows) = m.target_shape(t).unwrap();
        let a: Vec<f32> = values(rank * cols, 2 * i as u64 + 1)
            .iter()
            .map(|v| v * 0.2)
            .collect();
        let b: Vec<f32> = values(rows * rank, 2 * i as u64 + 2)
            .iter()
            .map(|v| v * 0.2)
            .collect();
        // dW[r, c] = sum_k B[r, k] A[k, c], in f64.
        let mut d = vec![0.0f32; rows * cols];
        for r in 0..rows {
            for c in 0..cols {
                let v: f64 = (0..rank)
                    .map(|k| b[r * rank + k] as f64 * a[k * cols + c] as f64)
                    .sum();
                d[r * cols + c] = v as f32;
            }
        }
        let base = t.tensor_name();
        dense.push(DeltaEntry::Dense {
            base: base.clone(),
            cols,
            rows,
            ty: GgmlType::F32,
            data: d,
        });
        lr.push(LowRankEntry {
            base,
            cols,
            rows,
            rank,
            a,
            b,
        });
    }
    let arch = m.cfg.arch.name();
    let (pl, pd) = (
        dir.join(format!("lora{rank}.gguf")),
        dir.join(format!("dense{rank}.gguf")),
    );
    write_lora(&pl, arch, "t", None, &lr).unwrap();
    write_delta(&pd, arch, "t", &dense).unwrap();
    (
        Arc::new(load(&pl, m).unwrap()),
        Arc::new(load(&pd, m).unwrap()),
    )
}

fn max_abs_diff(x: &[f32], y: &[f32]) -> f32 {
    x.iter()
        .zip(y)
        .map(|(p, q)| (p - q).abs())
        .fold(0.0f32, f32::max)
}

#[test]
fn fused_low_rank_matches_the_dense_delta() {
    for name in ["smollm2", "gemma3"] {
        let dir = std::env::temp_dir().join(format!("lethe-fused-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let m = Model::open(model_path(name), 2).unwrap();
        let targets: Vec<WeightId> = Proj::ALL.map(|s| WeightId::Block(3, s)).to_vec();
        // Rank 2 adds B (A x) on the calling thread, rank 16 as a pool job.
        for rank in [2, 16] {
            let (lora, dense) = lora_and_dense(&m, &dir, rank, &targets);
            let fused = PatchSet::new(&m, &[(lora, 1.5)]).unwrap();
            let plain = PatchSet::new(&m, &[(dense, 1.5)]).unwrap();
            for &t in &targets {
                let (cols, _) = m.target_shape(t).unwrap();
                for n in [1, 9] {
                    let x = values(n * cols, 7 + n as u64);
                    let y0 = m.apply_weight(t, &x, n, None).unwrap();
                    let y1 = m.apply_weight(t, &x, n, Some(&fused)).unwrap();
                    let y2 = m.apply_weight(t, &x, n, Some(&plain)).unwrap();
                    let (d, effect) = (max_abs_diff(&y1, &y2), max_abs_diff(&y2, &y0));
                    // f16 factors: about 2^-11 relative per factor, on deltas of this size.
                    assert!(
                        effect > 0.05,
                        "{name} {t:?}: the delta should matter ({effect})"
                    );
                    assert!(
                        d < 4e-3 * effect,
                        "{name} {t:?} rank {rank} n {n}: fused {d} vs effect {effect}"
                    );
                }
            }
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}
