//! A batched decode step ([`Model::forward_multi`]) against single-sequence steps: each
//! sequence's logits must be the same bit for bit whatever else is in the batch, on both
//! models, for batches of 1 to 8 sequences (and one past the kernels' 16-row tile), with
//! prompts of different lengths so that every row sits at its own position, and with patches.

mod common;

use common::model_path;
use lethe::model::{Model, Proj, State, WeightId};
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

/// Token ids in `1..n_vocab` from `seed`.
fn tokens(m: &Model, n: usize, seed: u64) -> Vec<u32> {
    values(n, seed)
        .iter()
        .map(|v| 1 + ((v + 1.0) * 0.5 * (m.cfg.n_vocab - 2) as f32) as u32)
        .collect()
}

const STEPS: usize = 3;

/// Sequence `i` of a test: its prompt (length varies with `i`) and the tokens it decodes.
fn sequence(m: &Model, i: usize) -> (Vec<u32>, Vec<u32>) {
    let prompt = tokens(m, 1 + (i * 7) % 23, 100 + i as u64);
    (prompt, tokens(m, STEPS, 200 + i as u64))
}

fn state(m: &Model, patches: &Option<Arc<PatchSet>>) -> State {
    let mut st = m.new_state(64);
    m.attach_patches(&mut st, patches.clone()).unwrap();
    st
}

/// The logits of each decode step of sequence `i` run alone (`[STEPS][n_vocab]`).
fn alone(m: &Model, i: usize, patches: &Option<Arc<PatchSet>>) -> Vec<Vec<f32>> {
    let (prompt, next) = sequence(m, i);
    let mut st = state(m, patches);
    m.forward(&mut st, &prompt, None).unwrap();
    next.iter()
        .map(|&t| m.forward(&mut st, &[t], None).unwrap().to_vec())
        .collect()
}

/// Sequences `0..n_seq` decoded together must give each the logits it gets alone.
fn check(m: &Model, name: &str, n_seq: usize, patches: &Option<Arc<PatchSet>>) {
    let want: Vec<_> = (0..n_seq).map(|i| alone(m, i, patches)).collect();
    let mut states: Vec<State> = (0..n_seq).map(|_| state(m, patches)).collect();
    let seqs: Vec<_> = (0..n_seq).map(|i| sequence(m, i)).collect();
    for (st, (prompt, _)) in states.iter_mut().zip(&seqs) {
        m.forward(st, prompt, None).unwrap();
    }
    for k in 0..STEPS {
        let toks: Vec<u32> = seqs.iter().map(|(_, next)| next[k]).collect();
        let mut refs: Vec<&mut State> = states.iter_mut().collect();
        m.forward_multi(&mut refs, &toks).unwrap();
        for (i, st) in states.iter().enumerate() {
            assert_eq!(st.pos, seqs[i].0.len() + k + 1);
            let same = st
                .logits
                .iter()
                .zip(&want[i][k])
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "{name}: sequence {i} of {n_seq}, step {k}: logits differ from the sequence alone"
            );
        }
    }
}

#[test]
fn batched_steps_equal_single_steps() {
    for name in ["smollm2", "gemma3"] {
        let m = Model::open(model_path(name), 2).unwrap();
        for n_seq in 1..=8 {
            check(&m, name, n_seq, &None);
        }
        // Past one 16-row tile of the matmul kernels.
        check(&m, name, 17, &None);
    }
}

/// A LoRA on every matrix of block 1 (the fused low-rank path) and on the output head, and a
/// dense delta on block 2's feed-forward output.
fn patches(m: &Model, dir: &std::path::Path) -> Arc<PatchSet> {
    let rank = 4;
    let mut targets: Vec<WeightId> = Proj::ALL.map(|s| WeightId::Block(1, s)).to_vec();
    targets.push(WeightId::Output);
    let lr: Vec<LowRankEntry> = targets
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            let (cols, rows) = m.target_shape(t).unwrap();
            LowRankEntry {
                base: t.tensor_name(),
                cols,
                rows,
                rank,
                a: values(rank * cols, 2 * i as u64 + 1),
                b: values(rows * rank, 2 * i as u64 + 2),
            }
        })
        .collect();
    let t = WeightId::Block(2, Proj::Down);
    let (cols, rows) = m.target_shape(t).unwrap();
    let dense = vec![DeltaEntry::Dense {
        base: t.tensor_name(),
        cols,
        rows,
        ty: GgmlType::F32,
        data: values(rows * cols, 99).iter().map(|v| v * 0.01).collect(),
    }];
    let arch = m.cfg.arch.name();
    let (pl, pd) = (dir.join("lora.gguf"), dir.join("dense.gguf"));
    write_lora(&pl, arch, "t", None, &lr).unwrap();
    write_delta(&pd, arch, "t", &dense).unwrap();
    let lora: Arc<Patch> = Arc::new(load(&pl, m).unwrap());
    let dense: Arc<Patch> = Arc::new(load(&pd, m).unwrap());
    Arc::new(PatchSet::new(m, &[(lora, 0.3), (dense, 1.0)]).unwrap())
}

#[test]
fn batched_steps_equal_single_steps_with_patches() {
    for name in ["smollm2", "gemma3"] {
        let dir = std::env::temp_dir().join(format!("lethe-batch-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let m = Model::open(model_path(name), 2).unwrap();
        let ps = Some(patches(&m, &dir));
        // The patches must change what the model says, or the test shows nothing.
        let (plain, patched) = (alone(&m, 0, &None), alone(&m, 0, &ps));
        assert_ne!(plain, patched, "{name}: the patches should matter");
        for n_seq in [1, 3, 6] {
            check(&m, name, n_seq, &ps);
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}

#[test]
fn a_batch_runs_with_one_patch_set() {
    let dir = std::env::temp_dir().join(format!("lethe-batch-mixed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let m = Model::open(model_path("smollm2"), 2).unwrap();
    let ps = Some(patches(&m, &dir));
    let (mut a, mut b) = (state(&m, &None), state(&m, &ps));
    m.forward(&mut a, &[1, 2], None).unwrap();
    m.forward(&mut b, &[1, 2], None).unwrap();
    let err = m.forward_multi(&mut [&mut a, &mut b], &[3, 4]).unwrap_err();
    assert!(err.to_string().contains("same patches"), "{err}");
    // Nothing moved.
    assert_eq!((a.pos, b.pos), (2, 2));
    let err = m.forward_multi(&mut [&mut a], &[3, 4]).unwrap_err();
    assert!(err.to_string().contains("2 tokens"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
