//! Kernel benchmarks on synthetic weights (no model file needed): matrix-vector products (decode) for each
//! weight form at Qwen2.5-0.5B's real shapes, matrix-matrix products (prefill) at 64 and 128 tokens, and
//! attention over the KV cache (one decode token over long caches, a 128-token prefill).
//!
//! Matvec throughput is reported in bytes of weights per second (effective bandwidth: compare with the
//! machine's read bandwidth); matmul throughput in elements per second where one element is one flop
//! (2 per multiply-add), so `Gelem/s` reads as GFLOP/s. Attention throughput is in bytes of keys and
//! values read.
//!
//! `cargo bench --bench kernels -- matvec/q8_0` runs a subset; `DUET_BENCH_QUICK=1` shortens every run.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use qwen2::kernels::matmul::{bf16, f16, matmul, WeightSlice};
use qwen2::kernels::quantized::{self, reference_quantizer, Backend, Layout, QuantSlice};
use qwen2::weights::DType;
use std::time::Duration;

/// (rows, cols) of every matrix one decode step multiplies: q/o, k/v, gate/up, down, output.
const SHAPES: [(usize, usize); 5] = [
    (896, 896),
    (128, 896),
    (4864, 896),
    (896, 4864),
    (151936, 896),
];

/// Varied values (identical pages could be merged by the host and read from cache).
fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

enum Weights {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
    Quant(DType, Layout, Vec<u8>),
    /// Q8_0 rows multiplied in f32 on their exact values (the exact form's output matrix).
    Q8_0Exact(Vec<u8>),
}

impl Weights {
    fn make(form: &str, rows: usize, cols: usize) -> Option<Weights> {
        let n = rows * cols;
        let q = |dtype: DType| {
            let (vals, _) = dtype.block();
            cols.is_multiple_of(vals).then(|| {
                Weights::Quant(
                    dtype,
                    Layout::Rows,
                    reference_quantizer::random_blocks(dtype, n / vals, n as u64),
                )
            })
        };
        match form {
            "f32" => Some(Weights::F32(data(n, 1))),
            "bf16" => Some(Weights::Bf16(
                data(n, 2).into_iter().map(bf16::from_f32).collect(),
            )),
            "f16" => Some(Weights::F16(
                data(n, 3).into_iter().map(f16::from_f32).collect(),
            )),
            "q8_0" => q(DType::Q8_0),
            "q8_0_exact" => cols.is_multiple_of(32).then(|| {
                Weights::Q8_0Exact(reference_quantizer::random_blocks(
                    DType::Q8_0,
                    n / 32,
                    n as u64,
                ))
            }),
            // Q8_0 and Q5_0 as the x86 decode holds them (`quantized::decode_layout`): eight rows
            // interleaved.
            "q8_0x8" | "q5_0x8" => {
                let dtype = if form == "q8_0x8" {
                    DType::Q8_0
                } else {
                    DType::Q5_0
                };
                let rows_bytes = reference_quantizer::random_blocks(dtype, n / 32, n as u64);
                let rb = quantized::row_bytes(dtype, cols)?;
                let mut b = vec![0u8; quantized::interleaved_bytes(dtype, rows, cols)?];
                quantized::interleave(dtype, &rows_bytes, rb, &mut b);
                Some(Weights::Quant(dtype, Layout::Interleaved8, b))
            }
            "q5_0" => q(DType::Q5_0),
            "q4_k" => q(DType::Q4K),
            "q6_k" => q(DType::Q6K),
            _ => None,
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Weights::F32(w) => w.len() * 4,
            Weights::Bf16(w) => w.len() * 2,
            Weights::F16(w) => w.len() * 2,
            Weights::Quant(_, _, b) | Weights::Q8_0Exact(b) => b.len(),
        }
    }

    fn run(
        &self,
        backend: Backend,
        rows: usize,
        cols: usize,
        x: &[f32],
        t: usize,
        out: &mut [f32],
    ) {
        match self {
            Weights::F32(w) => matmul(WeightSlice::F32(w), rows, cols, x, t, out),
            Weights::Bf16(w) => matmul(WeightSlice::BF16(w), rows, cols, x, t, out),
            Weights::F16(w) => matmul(WeightSlice::F16(w), rows, cols, x, t, out),
            Weights::Q8_0Exact(b) => matmul(WeightSlice::Q8_0Exact(b), rows, cols, x, t, out),
            Weights::Quant(dtype, layout, b) => {
                let w = QuantSlice {
                    dtype: *dtype,
                    bytes: b,
                    layout: *layout,
                };
                quantized::matmul_with(backend, w, rows, cols, x, t, out)
            }
        }
    }
}

const FORMS: [&str; 10] = [
    "f32",
    "bf16",
    "f16",
    "q8_0",
    "q8_0x8",
    "q5_0",
    "q5_0x8",
    "q4_k",
    "q6_k",
    "q8_0_exact",
];

fn config() -> Criterion {
    let c = Criterion::default();
    if std::env::var_os("DUET_BENCH_QUICK").is_some() {
        c.warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(1))
    } else {
        c
    }
}

fn matvec(c: &mut Criterion) {
    let best = Backend::best();
    for form in FORMS {
        let mut g = c.benchmark_group(format!("matvec/{form}"));
        for (rows, cols) in SHAPES {
            let Some(w) = Weights::make(form, rows, cols) else {
                continue;
            };
            let x = data(cols, 9);
            let mut out = vec![0f32; rows];
            g.throughput(Throughput::Bytes(w.bytes() as u64));
            if rows * cols > 10_000_000 {
                g.sample_size(10);
            }
            g.bench_function(BenchmarkId::from_parameter(format!("{rows}x{cols}")), |b| {
                b.iter(|| w.run(best, rows, cols, &x, 1, &mut out))
            });
        }
        g.finish();
    }
}

fn matmul_prefill(c: &mut Criterion) {
    let best = Backend::best();
    // The exact Q8_0 rows are only ever multiplied for one token in a pass (the output matrix); more
    // tokens run the f32 GEMM on bands of them dequantized.
    for form in FORMS.into_iter().filter(|&f| f != "q8_0_exact") {
        let mut g = c.benchmark_group(format!("matmul/{form}"));
        g.sample_size(10);
        for (rows, cols) in [(4864, 896), (896, 4864)] {
            let Some(w) = Weights::make(form, rows, cols) else {
                continue;
            };
            for t in [64, 128] {
                let x = data(t * cols, 9);
                let mut out = vec![0f32; t * rows];
                g.throughput(Throughput::Elements((2 * rows * cols * t) as u64));
                g.bench_function(
                    BenchmarkId::from_parameter(format!("{rows}x{cols}/t{t}")),
                    |b| b.iter(|| w.run(best, rows, cols, &x, t, &mut out)),
                );
            }
        }
        g.finish();
    }
}

/// The quantized kernels on every backend this CPU has, at the shape that dominates decode, and the
/// K-quants at the only one the default file gives them (`ffn_down`).
fn backends(c: &mut Criterion) {
    let mut g = c.benchmark_group("backends");
    let shapes = [(4864, 896); 4].into_iter().chain([(896, 4864); 2]);
    for (form, (rows, cols)) in ["q8_0", "q8_0x8", "q5_0", "q5_0x8", "q4_k", "q6_k"]
        .into_iter()
        .zip(shapes)
    {
        let w = Weights::make(form, rows, cols).unwrap();
        let x = data(cols, 9);
        let mut out = vec![0f32; rows];
        g.throughput(Throughput::Bytes(w.bytes() as u64));
        for backend in Backend::available() {
            g.bench_function(format!("{form}/{}/{rows}x{cols}", backend.name()), |b| {
                b.iter(|| w.run(backend, rows, cols, &x, 1, &mut out))
            });
        }
    }
    g.finish();
}

/// Attention at the default model's shape (14 query heads, 2 KV heads of 64), for every layer of one
/// forward pass: 24 caches, so that long ones are read from memory as in a real decode step.
fn attention(c: &mut Criterion) {
    use qwen2::kernels::attention::{attention, AttentionShape};
    let (n_heads, n_kv_heads, head_dim, layers) = (14, 2, 64, 24);
    let mut g = c.benchmark_group("attention");
    g.sample_size(10);
    // (cached positions before the new tokens, new tokens): decode over long caches, a short prompt,
    // and the last run of 256 tokens of a 3072-token prompt (`Model::prefill`)
    for (start, t) in [(511, 1), (2047, 1), (4095, 1), (0, 128), (2816, 256)] {
        let capacity = start + t;
        let n = capacity * n_kv_heads * head_dim;
        let k: Vec<Vec<f32>> = (0..layers).map(|l| data(n, 20 + l as u64)).collect();
        let v: Vec<Vec<f32>> = (0..layers).map(|l| data(n, 50 + l as u64)).collect();
        let q = data(t * n_heads * head_dim, 11);
        let mut out = vec![0f32; q.len()];
        let s = AttentionShape {
            n_heads,
            n_kv_heads,
            head_dim,
            start,
            capacity,
        };
        g.throughput(Throughput::Bytes((2 * layers * n * 4) as u64));
        let name = if t == 1 { "decode" } else { "prefill" };
        g.bench_function(format!("{name}/{t}_after_{start}/24_layers"), |b| {
            b.iter(|| {
                for l in 0..layers {
                    attention(&q, &k[l], &v[l], &s, &mut out);
                }
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = config();
    targets = matvec, matmul_prefill, backends, attention
}
criterion_main!(benches);
