//! Whole-model benchmarks on the real default model, in each weight form: one decode step after a
//! 64-token prompt, a 64-token prefill (last position's logits only), and — in the default form — the
//! dual task end to end (sentiment label, then a 32-token reply) with a warm prefix cache.
//!
//! The model is `$DUET_MODEL` if set, else the default model, fetched first if missing (as the tests do).
//! Decode throughput is reported in weight bytes read per step, so `GiB/s` is the effective bandwidth;
//! prefill throughput in tokens.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qwen2::matrix::WeightForm;
use qwen2::{KvCache, Logits};
use std::time::Duration;
use tasks::Lang;

/// A fixed prompt of ordinary token ids.
fn prompt(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| 1000 + (i * 7919) % 50000).collect()
}

fn model(c: &mut Criterion) {
    let path = duet_e2e::default_model_path();
    qwen2::kernels::pool::init(None);
    for form in WeightForm::ALL {
        let m = qwen2::load::load_with(&path, form).expect("load the model");
        let model = &m.model;
        let mut g = c.benchmark_group(format!("model/{}", form.name()));
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

fn dual_task(c: &mut Criterion) {
    let m = qwen2::load::load_with(&duet_e2e::default_model_path(), WeightForm::Native)
        .expect("load the model");
    let (lib, _) = tasks::Library::load(&[tasks::library::shipped_dir()]).unwrap();
    let mut runner = tasks::Runner::new(m.model, m.tokenizer, lib);
    let mut g = c.benchmark_group("dual_task/native");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    // Both ends of the target's "<50 characters" (the shared timing inputs but the longest): the label's
    // time grows with the new tokens.
    for (name, text) in &tasks::pipeline::BENCH_INPUTS[..2] {
        let name = name.replace(' ', "_");
        g.bench_function(format!("sentiment_label/{name}"), |b| {
            b.iter(|| runner.time_dual_task(text, Lang::Zh, None).unwrap())
        });
        g.bench_function(format!("label_and_32_token_reply/{name}"), |b| {
            b.iter(|| runner.time_dual_task(text, Lang::Zh, Some(32)).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, model, dual_task);
criterion_main!(benches);
