//! Forward-pass throughput on the reference models: one decode step at a short context, and a
//! 128-token prefill. `lethe bench` reports the same with the bandwidth ceiling.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use lethe::model::Model;

fn bench_model(c: &mut Criterion, name: &str) {
    let path = lethe::hub::resolve_model(name).expect("fetch model");
    let model = Model::open(path, 2).expect("load");
    let mut st = model.new_state(512);
    let prompt: Vec<u32> = (0..128u32)
        .map(|i| (i * 7919 + 13) % model.cfg.n_vocab as u32)
        .collect();

    let mut g = c.benchmark_group(name);
    g.sample_size(10);
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode_step", |b| {
        st.reset();
        model.forward(&mut st, &prompt[..16], None).unwrap();
        b.iter(|| {
            if st.pos >= 500 {
                st.truncate(16);
            }
            model.forward(&mut st, &[prompt[3]], None).unwrap()[0]
        })
    });
    g.throughput(Throughput::Elements(128));
    g.bench_function("prefill_128", |b| {
        b.iter(|| {
            st.reset();
            model.forward(&mut st, &prompt, None).unwrap()[0]
        })
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    bench_model(c, "smollm2");
    bench_model(c, "gemma3");
}

criterion_group!(forward, benches);
criterion_main!(forward);
