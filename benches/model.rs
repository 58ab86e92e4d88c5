//! Whole-model benchmarks on the real default model, in each weight form: one decode step after a
//! 64-token prompt, and a 64-token prefill (last position's logits only).
//!
//! The model is `$DUET_MODEL` if set, else the default model, fetched first if missing (as the tests do). Decode throughput is reported in weight bytes read per
//! step, so `GiB/s` is the effective bandwidth; prefill throughput in tokens.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qwen2::matrix::WeightForm;
use qwen2::{KvCache, Logits};
use std::time::Duration;

/// A fixed prompt of ordinary token ids.
fn prompt(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| 1000 + (i * 7919) % 50000).collect()
}

fn model(c: &mut Criterion) {
    let path = duet_e2e::default_model_path();
    qwen2::kernels::pool::init(None);
    for (name, form) in [("exact", WeightForm::Exact), ("fast", WeightForm::Fast)] {
        let m = qwen2::load::load_with(&path, form).expect("load the model");
        let model = &m.model;
        let mut g = c.benchmark_group(format!("model/{name}"));
        g.sample_size(10).measurement_time(Duration::from_secs(8));

        let p = prompt(64);
        let mut cache = KvCache::new(&model.config, 80).unwrap();
        g.throughput(Throughput::Elements(64));
        g.bench_function("prefill_64", |b| {
            b.iter(|| {
                cache.truncate(0);
                model.forward(&p, &mut cache, Logits::Last).unwrap()
            })
        });

        cache.truncate(0);
        model.forward(&p, &mut cache, Logits::Last).unwrap();
        g.throughput(Throughput::Bytes(model.weight_bytes_per_token() as u64));
        g.bench_function("decode_step", |b| {
            b.iter(|| {
                cache.truncate(64);
                model.forward(&[4242], &mut cache, Logits::Last).unwrap()
            })
        });
        g.finish();
    }
}

criterion_group!(benches, model);
criterion_main!(benches);
