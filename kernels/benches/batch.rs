//! Batched dot products: `cargo bench -p lethe-kernels --bench batch`
//!
//! `batch/<type>/vec_dot_x4`: one 2048-element weight row against four activation rows with
//! four `vec_dot` calls; `batch/<type>/vec_dot_batch_4`: the same with one `vec_dot_batch`
//! (n_act = 4). `tile/<type>/*`: 16 weight rows against 16 activation rows, one
//! `vec_dot_batch` per weight row or one `vec_dot_tile`. Everything is cache resident (as in prefill's blocked matmul); throughput is
//! in weight-row elements times activation rows (multiply-adds).

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lethe_kernels::quant::{self, GgmlType};
use rand::{rngs::StdRng, Rng, SeedableRng};

const TYPES: [GgmlType; 8] = [
    GgmlType::Q4_1,
    GgmlType::Q8_0,
    GgmlType::Q5_0,
    GgmlType::Q4_K,
    GgmlType::Q6_K,
    GgmlType::Q4_0,
    GgmlType::Q5_1,
    GgmlType::Q5_K,
];
const N: usize = 2048;
const N_ACT: usize = 4;
const N_W: usize = 16;
const TILE_ACT: usize = 16;

fn floats(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
}

fn quantize(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    let mut q = vec![0u8; ty.row_bytes(x.len())];
    quant::quantize_row(ty, x, &mut q).unwrap();
    q
}

fn bench(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(1);
    for ty in TYPES {
        let vt = ty.vec_dot_type();
        let ab = vt.row_bytes(N);
        let w = quantize(ty, &floats(&mut rng, N));
        let act: Vec<u8> = (0..N_ACT)
            .flat_map(|_| quantize(vt, &floats(&mut rng, N)))
            .collect();
        let mut g = c.benchmark_group(format!("batch/{ty}"));
        g.throughput(Throughput::Elements((N * N_ACT) as u64));
        g.bench_function(BenchmarkId::from_parameter("vec_dot_x4"), |b| {
            b.iter(|| {
                let mut out = [0f32; N_ACT];
                for (j, o) in out.iter_mut().enumerate() {
                    *o = quant::vec_dot(ty, N, black_box(&w), black_box(&act[j * ab..]));
                }
                out
            })
        });
        g.bench_function(BenchmarkId::from_parameter("vec_dot_batch_4"), |b| {
            b.iter(|| {
                let mut out = [0f32; N_ACT];
                quant::vec_dot_batch(ty, N, black_box(&w), black_box(&act), ab, N_ACT, &mut out);
                out
            })
        });
        g.finish();

        // Tiles: N_W weight rows against TILE_ACT activation rows.
        let rb = ty.row_bytes(N);
        let ws: Vec<u8> = (0..N_W)
            .flat_map(|_| quantize(ty, &floats(&mut rng, N)))
            .collect();
        let acts: Vec<u8> = (0..TILE_ACT)
            .flat_map(|_| quantize(vt, &floats(&mut rng, N)))
            .collect();
        let mut g = c.benchmark_group(format!("tile/{ty}"));
        g.throughput(Throughput::Elements((N * N_W * TILE_ACT) as u64));
        g.bench_function(BenchmarkId::from_parameter("vec_dot_batch_rows"), |b| {
            b.iter(|| {
                let mut out = [0f32; N_W * TILE_ACT];
                for (i, o) in out.chunks_exact_mut(TILE_ACT).enumerate() {
                    let w = black_box(&ws[i * rb..]);
                    quant::vec_dot_batch(ty, N, w, black_box(&acts), ab, TILE_ACT, o);
                }
                out
            })
        });
        g.bench_function(BenchmarkId::from_parameter("vec_dot_tile"), |b| {
            b.iter(|| {
                let mut out = [0f32; N_W * TILE_ACT];
                quant::vec_dot_tile(
                    ty,
                    N,
                    black_box(&ws),
                    rb,
                    N_W,
                    black_box(&acts),
                    ab,
                    TILE_ACT,
                    &mut out,
                    TILE_ACT,
                );
                out
            })
        });
        if quant::has_tile_x8(ty) {
            let xb = quant::x8_row_bytes(N);
            let mut acts8 = vec![0u8; TILE_ACT * xb];
            for j in 0..TILE_ACT {
                let x = floats(&mut rng, N);
                quant::quantize_row_x8(vt, &x, &mut acts8[j * xb..(j + 1) * xb]).unwrap();
            }
            g.bench_function(BenchmarkId::from_parameter("vec_dot_tile_x8"), |b| {
                b.iter(|| {
                    let mut out = [0f32; N_W * TILE_ACT];
                    quant::vec_dot_tile_x8(
                        ty,
                        N,
                        black_box(&ws),
                        rb,
                        N_W,
                        black_box(&acts8),
                        xb,
                        TILE_ACT,
                        &mut out,
                        TILE_ACT,
                    );
                    out
                })
            });
        }
        g.finish();
    }
    decode(c);
}

/// Decode-shaped: `DEC_W` weight rows of 576 (SmolLM2's width) against one activation row
/// (`vec_dot` per row) and against four (`vec_dot_tile`, `vec_dot_tile_x8`). Throughput in
/// weight rows, so the 4-row cases' cost per row compares directly with one row's.
fn decode(c: &mut Criterion) {
    const DEC_W: usize = 64;
    const DN: usize = 576;
    let mut rng = StdRng::seed_from_u64(2);
    for ty in [GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::Q5_0] {
        let vt = ty.vec_dot_type();
        let (rb, ab) = (ty.row_bytes(DN), vt.row_bytes(DN));
        let ws: Vec<u8> = (0..DEC_W)
            .flat_map(|_| quantize(ty, &floats(&mut rng, DN)))
            .collect();
        let xs: Vec<Vec<f32>> = (0..4).map(|_| floats(&mut rng, DN)).collect();
        let acts: Vec<u8> = xs.iter().flat_map(|x| quantize(vt, x)).collect();
        let mut g = c.benchmark_group(format!("decode/{ty}"));
        g.throughput(Throughput::Elements(DEC_W as u64));
        g.bench_function(BenchmarkId::from_parameter("vec_dot_1"), |b| {
            b.iter(|| {
                let mut out = [0f32; DEC_W];
                for (i, o) in out.iter_mut().enumerate() {
                    *o = quant::vec_dot(ty, DN, black_box(&ws[i * rb..]), black_box(&acts));
                }
                out
            })
        });
        g.bench_function(BenchmarkId::from_parameter("vec_dot_tile_4"), |b| {
            b.iter(|| {
                let mut out = [0f32; DEC_W * 4];
                quant::vec_dot_tile(
                    ty,
                    DN,
                    black_box(&ws),
                    rb,
                    DEC_W,
                    black_box(&acts),
                    ab,
                    4,
                    &mut out,
                    4,
                );
                out
            })
        });
        if quant::has_tile_x8(ty) {
            let xb = quant::x8_row_bytes(DN);
            let mut acts8 = vec![0u8; 4 * xb];
            for (j, x) in xs.iter().enumerate() {
                quant::quantize_row_x8(vt, x, &mut acts8[j * xb..(j + 1) * xb]).unwrap();
            }
            for n_act in [1usize, 4] {
                let name = format!("vec_dot_tile_x8_{n_act}");
                g.bench_function(BenchmarkId::from_parameter(name), |b| {
                    b.iter(|| {
                        let mut out = [0f32; DEC_W * 4];
                        quant::vec_dot_tile_x8(
                            ty,
                            DN,
                            black_box(&ws),
                            rb,
                            DEC_W,
                            black_box(&acts8),
                            xb,
                            n_act,
                            &mut out,
                            4,
                        );
                        out
                    })
                });
            }
        }
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(300))
        .measurement_time(std::time::Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);
