//! K-quant kernels: `cargo bench -p lethe-kernels --bench kquants`
//!
//! - `vec_dot/<type>`: one 4096-element row (cache resident), throughput in weight bytes;
//! - `vec_dot_scalar/<type>`: the scalar twin, same row;
//! - `matvec/<type>`: a ~96 MiB weight matrix streamed from DRAM, one thread, throughput in
//!   weight bytes (what bounds decode speed);
//! - `quantize_q8k`: Q8_K activation quantization of a 4096-element row.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lethe_kernels::quant::{kquants, GgmlType};
use rand::{rngs::StdRng, Rng, SeedableRng};

const TYPES: [GgmlType; 5] = [
    GgmlType::Q4_K,
    GgmlType::Q6_K,
    GgmlType::Q5_K,
    GgmlType::Q3_K,
    GgmlType::Q2_K,
];
const N: usize = 4096;

fn floats(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
}

fn quantize(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    let mut q = vec![0u8; ty.row_bytes(x.len())];
    kquants::quantize_row(ty, x, &mut q);
    q
}

fn bench(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(1);
    let x = floats(&mut rng, N);
    let act = quantize(GgmlType::Q8_K, &floats(&mut rng, N));

    let mut g = c.benchmark_group("vec_dot");
    for ty in TYPES {
        let w = quantize(ty, &x);
        g.throughput(Throughput::Bytes(w.len() as u64));
        g.bench_function(BenchmarkId::from_parameter(ty), |b| {
            b.iter(|| kquants::vec_dot(ty, N, black_box(&w), black_box(&act)))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("vec_dot_scalar");
    for ty in TYPES {
        let w = quantize(ty, &x);
        g.throughput(Throughput::Bytes(w.len() as u64));
        g.bench_function(BenchmarkId::from_parameter(ty), |b| {
            b.iter(|| kquants::vec_dot_scalar(ty, N, black_box(&w), black_box(&act)))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("matvec");
    g.sample_size(10);
    for ty in TYPES {
        let row = quantize(ty, &x);
        let rows = (96 << 20) / row.len();
        let mut m = Vec::with_capacity(rows * row.len());
        for _ in 0..rows {
            m.extend_from_slice(&row);
        }
        let mut out = vec![0f32; rows];
        g.throughput(Throughput::Bytes(m.len() as u64));
        g.bench_function(BenchmarkId::from_parameter(ty), |b| {
            b.iter(|| {
                for (o, w) in out.iter_mut().zip(m.chunks_exact(row.len())) {
                    *o = kquants::vec_dot(ty, N, w, &act);
                }
                black_box(&out);
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("quantize_q8k");
    let mut q = vec![0u8; GgmlType::Q8_K.row_bytes(N)];
    g.throughput(Throughput::Bytes((N * 4) as u64));
    g.bench_function("4096", |b| {
        b.iter(|| kquants::quantize_row(GgmlType::Q8_K, black_box(&x), black_box(&mut q)))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
