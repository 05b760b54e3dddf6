//! Attention's inner loops: `cargo bench -p lethe-kernels --bench kernels`
//!
//! `attend/<g>x<hd>/<n>`: `g` query heads sharing one KV head over `n` cached positions (an
//! f16 cache row of three KV heads, as SmolLM2's), with one `attend_group` call (`group`) or
//! one head at a time through `dot_f16`, softmax and `axpy_f16` (`single`). Throughput is in
//! cached positions times heads.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::f16;
use lethe_kernels::ops;
use rand::{rngs::StdRng, Rng, SeedableRng};

fn bench(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(1);
    for (g, hd) in [(3, 64), (3, 256), (1, 64)] {
        let n = 1024;
        let stride = 3 * hd;
        let q: Vec<f32> = (0..g * hd).map(|_| rng.gen_range(-0.3f32..0.3)).collect();
        let mut kv = || -> Vec<f16> {
            (0..n * stride)
                .map(|_| f16::from_f32(rng.gen_range(-1.0f32..1.0)))
                .collect()
        };
        let (k, v) = (kv(), kv());
        let scale = 1.0 / (hd as f32).sqrt();
        let mut sc = vec![0.0; g * n];
        let mut out = vec![0.0; g * hd];
        let mut grp = c.benchmark_group(format!("attend/{g}x{hd}"));
        grp.throughput(Throughput::Elements((g * n) as u64));
        type Attend = fn(
            &[f32],
            usize,
            &[f16],
            &[f16],
            usize,
            usize,
            f32,
            Option<f32>,
            &mut [f32],
            &mut [f32],
        );
        let ways: [(&str, Attend); 2] = [
            ("group", ops::attend_group),
            ("single", ops::attend_group_scalar),
        ];
        for (name, attend) in ways {
            grp.bench_function(BenchmarkId::new(name, n), |b| {
                b.iter(|| {
                    attend(
                        black_box(&q),
                        hd,
                        &k,
                        &v,
                        stride,
                        n,
                        scale,
                        None,
                        &mut sc,
                        &mut out,
                    )
                })
            });
        }
        grp.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
