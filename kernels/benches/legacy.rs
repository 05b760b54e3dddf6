//! Dot products of a 4096-element row for the float and legacy formats (throughput in bytes of
//! weights), each ISA the CPU has, and the Q8_0/Q8_1 activation quantizers.
//!
//! cargo bench -p lethe-kernels --bench legacy

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lethe_kernels::cpu::Isa;
use lethe_kernels::quant::{self, float, legacy, GgmlType};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const N: usize = 4096;

fn row(rng: &mut StdRng) -> Vec<f32> {
    (0..N).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
}

fn quantize(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    let mut q = vec![0u8; ty.row_bytes(x.len())];
    quant::quantize_row(ty, x, &mut q).unwrap();
    q
}

fn isas() -> Vec<Isa> {
    let mut v = vec![Isa::Scalar];
    for isa in [Isa::Avx2, Isa::Avx512] {
        if legacy::effective_isa(isa) == isa {
            v.push(isa);
        }
    }
    v
}

fn bench_vec_dot(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(1);
    let (x, y) = (row(&mut rng), row(&mut rng));
    let mut g = c.benchmark_group("vec_dot_4096");
    for ty in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q8_1,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::F32,
    ] {
        let w = quantize(ty, &x);
        let a = quantize(ty.vec_dot_type(), &y);
        g.throughput(Throughput::Bytes(w.len() as u64));
        for isa in isas() {
            let id = BenchmarkId::new(ty.name(), format!("{isa:?}"));
            if ty.is_quantized() {
                g.bench_function(id, |b| {
                    b.iter(|| legacy::vec_dot_isa(isa, ty, N, black_box(&w), black_box(&a)))
                });
            } else {
                g.bench_function(id, |b| {
                    b.iter(|| float::vec_dot_isa(isa, ty, N, black_box(&w), black_box(&a)))
                });
            }
        }
    }
    g.finish();
}

fn bench_quantize(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(2);
    let x = row(&mut rng);
    let mut g = c.benchmark_group("quantize_row_4096");
    g.throughput(Throughput::Bytes((N * 4) as u64));
    for ty in [GgmlType::Q8_0, GgmlType::Q8_1] {
        let mut out = vec![0u8; ty.row_bytes(N)];
        for isa in isas() {
            g.bench_function(BenchmarkId::new(ty.name(), format!("{isa:?}")), |b| {
                b.iter(|| legacy::quantize_row_isa(isa, ty, black_box(&x), &mut out))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench_vec_dot, bench_quantize);
criterion_main!(benches);
