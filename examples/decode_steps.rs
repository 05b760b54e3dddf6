//! Batched decode steps for `perf stat`: `cargo run --release --example decode_steps -- SEQS STEPS [THREADS]`.
//! Runs STEPS decode steps of SEQS sequences together (after one warm-up step) and prints the
//! tokens/s; instruction counts per token are then comparable between SEQS values.

use lethe::model::Model;
use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let n_seq: usize = args.next().map_or(4, |s| s.parse().unwrap());
    let steps: usize = args.next().map_or(128, |s| s.parse().unwrap());
    let threads: usize = args.next().map_or(2, |s| s.parse().unwrap());
    let path = lethe::hub::resolve_model("smollm2").expect("model");
    let model = Model::open(path, threads).expect("load");
    let vocab = model.cfg.n_vocab as u32;
    let mut states: Vec<_> = (0..n_seq).map(|_| model.new_state(512)).collect();
    let mut next: Vec<u32> = (0..n_seq as u32).map(|i| (i * 7919 + 13) % vocab).collect();
    let t = Instant::now();
    for _ in 0..steps {
        let mut refs: Vec<_> = states.iter_mut().collect();
        model.forward_multi(&mut refs, &next).unwrap();
        for (n, st) in next.iter_mut().zip(&states) {
            *n = lethe::generate::sampler::argmax_raw(&st.logits);
        }
    }
    let s = t.elapsed().as_secs_f64();
    println!(
        "{n_seq} seqs x {steps} steps: {:.1} tok/s",
        (n_seq * steps) as f64 / s
    );
}
