//! `duet bench`: the machine's read bandwidth and FMA peak, then the engine on the loaded model —
//! load time, prefill and decode speed as fractions of those limits, the weight stream (the most a
//! decode could reach here), dual-task latency, peak RSS.

use crate::common::{load_runner, Global};
use anyhow::Result;
use qwen2::bench as qb;
use std::collections::BTreeMap;
use std::time::Instant;
use tasks::Lang;

#[derive(clap::Args)]
pub struct Args {
    /// Every figure as one JSON object (progress still goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Repetitions per measurement (the median is reported).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub reps: u32,
    /// Also prefill a context of N tokens and decode after it (as llama-bench's `-d N`): a long chat or
    /// document, where the KV cache read by attention adds to the weights read per token.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub context: u32,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(g: &Global, a: &Args) -> Result<()> {
    let reps = a.reps as usize;
    eprintln!("measuring read bandwidth …");
    let bw = qb::read_bandwidth_gbs(512 << 20, reps.max(3))?; // 512 MiB per thread
    eprintln!("measuring FMA peak …");
    let peak = qb::fma_peak_gflops(reps.max(3));
    // The probe's buffers (512 MiB per thread) are freed; peak RSS from here on is the engine's.
    let rss_is_engines = qb::reset_peak_rss();
    if !rss_is_engines {
        eprintln!(
            "note: cannot reset the peak RSS here; it includes the bandwidth probe's buffers"
        );
    }
    let load_start = Instant::now();
    let mut runner = load_runner(g)?;
    let decode_n = 128;
    let context = a.context as usize;
    let max_positions = runner.model.config.max_position_embeddings;
    if context + decode_n + 1 > max_positions {
        anyhow::bail!(
            "--context {context} leaves no room for {decode_n} decoded tokens in this model's context of {max_positions} tokens"
        );
    }
    let load_s = load_start.elapsed().as_secs_f64();
    let model = runner.model.clone();
    let cfg = &model.config;
    let bytes_per_token = model.weight_bytes_per_token() as f64;

    // Synthetic input: `n` prompt tokens, and the token decoded at step `i`.
    let prompt_ids = |n: usize| -> Vec<u32> {
        (0..n as u32)
            .map(|i| (1000 + i * 7) % cfg.vocab_size as u32)
            .collect()
    };
    let tok = |i: u32| (1000 + i) % cfg.vocab_size as u32;
    // `decode_n` timed decode steps after what `c` holds.
    let decode_s = |c: &mut qwen2::KvCache| -> Result<f64> {
        let t = Instant::now();
        for i in 0..decode_n as u32 {
            model.forward(&[tok(i + 1)], c, qwen2::Logits::Last)?;
        }
        Ok(t.elapsed().as_secs_f64())
    };
    // One timed prefill of `n` synthetic tokens into a fresh cache.
    let prefill_s = |n: usize| -> Result<f64> {
        let ids = prompt_ids(n);
        let mut c = qwen2::KvCache::new(cfg, n + 1)?;
        let t = Instant::now();
        model.forward(&ids, &mut c, qwen2::Logits::Last)?;
        Ok(t.elapsed().as_secs_f64())
    };
    // The first forward pass after a load pays for mapping the weights in, and for reading them from
    // disk when they are not in the page cache: 2.2 s for the F32 directory's first 128-token pass
    // right after `duet convert` (which drops the file from the cache), 0.33 s at 64 tokens for the
    // next process, against ~0.3 s warm. It is reported on its own line, not left in the first timed
    // repetition, where it made the median of three the slower of the other two.
    let first_forward_s = prefill_s(64)?;
    eprintln!("first forward pass (64 tokens) after the load: {first_forward_s:.2} s");

    let mut prefill = BTreeMap::new();
    for n in [64usize, 128] {
        let times: Vec<f64> = (0..reps).map(|_| prefill_s(n)).collect::<Result<_>>()?;
        let s = median(times);
        let flops = qb::forward_flops(cfg, n);
        prefill.insert(n, (n as f64 / s, flops / s / 1e9));
        eprintln!("prefill {n}: {:.1} tok/s", n as f64 / s);
    }
    let decode_times: Vec<f64> = (0..reps)
        .map(|_| {
            let mut c = qwen2::KvCache::new(cfg, decode_n + 2)?;
            model.forward(&[tok(0)], &mut c, qwen2::Logits::Last)?;
            decode_s(&mut c)
        })
        .collect::<Result<_>>()?;
    let decode_tok_s = decode_n as f64 / median(decode_times);
    eprintln!("decode: {decode_tok_s:.1} tok/s");
    // Right after the decode, under the same conditions: the same bytes in the same order, only summed
    // (the weight stream), then multiplied by the decode's kernels with nothing between the steps (the
    // products alone).
    eprintln!("measuring the weight stream and the products alone …");
    let stream_gbs = qb::weight_stream_gbs(&model, reps.max(3));
    let stream_tok_s = stream_gbs * 1e9 / bytes_per_token;
    let products_gbs = qb::products_gbs(&model, reps.max(3));
    // Every weight has now been read: what of it the system maps in huge pages.
    let huge_pages = qb::huge_page_bytes();

    // Decode after a long context: one prefill of it, then each repetition decodes from its end.
    let after_context = if context > 0 {
        let ids = prompt_ids(context);
        let mut c = qwen2::KvCache::new(cfg, context + decode_n + 1)?;
        eprintln!("prefilling a context of {context} tokens …");
        let t = Instant::now();
        model.forward(&ids, &mut c, qwen2::Logits::Last)?;
        let prefill_tok_s = context as f64 / t.elapsed().as_secs_f64();
        let times: Vec<f64> = (0..reps)
            .map(|_| {
                c.truncate(context);
                decode_s(&mut c)
            })
            .collect::<Result<_>>()?;
        let tok_s = decode_n as f64 / median(times);
        eprintln!("decode after {context} tokens: {tok_s:.1} tok/s");
        Some((prefill_tok_s, tok_s))
    } else {
        None
    };

    // Dual task: warm the prefix cache once, then measure, on each of the shared timing inputs.
    let mut dual = Vec::new();
    let mut skipped = Vec::new();
    for (name, text) in tasks::pipeline::BENCH_INPUTS {
        let run_once = |runner: &mut tasks::Runner| runner.time_dual_task(text, Lang::Zh, Some(64));
        // Warm the prefix cache; an input that does not fit a small model's context is reported, not fatal.
        if let Err(e) = run_once(&mut runner) {
            eprintln!("dual task {name}: skipped: {e}");
            skipped.push(serde_json::json!({"input": name, "error": e.to_string()}));
            continue;
        }
        let runs: Vec<tasks::pipeline::DualTaskTimes> = (0..reps)
            .map(|_| run_once(&mut runner))
            .collect::<std::result::Result<_, _>>()?;
        let m =
            |f: fn(&tasks::pipeline::DualTaskTimes) -> f64| median(runs.iter().map(f).collect());
        dual.push((
            name,
            m(|r| r.label_ms),
            m(|r| r.first_token_ms.unwrap_or(0.0)),
            m(|r| r.total_ms),
        ));
    }
    let rss = qb::peak_rss_bytes();
    // The host is shared: a probe that catches it busy reads low, and every fraction of it reads high
    // (prefill at 85 % of a peak probed at half its usual value, once). So the probes run again after the
    // engine's measurements, in this same run, and the best of the two counts. After the RSS reading: the
    // bandwidth probe's buffers are not the engine's.
    eprintln!("measuring read bandwidth and FMA peak again …");
    let (bw_probes, peak_probes) = (
        [bw, qb::read_bandwidth_gbs(512 << 20, reps.max(3))?],
        [peak, qb::fma_peak_gflops(reps.max(3))],
    );
    let (bw, peak) = (
        bw_probes[0].max(bw_probes[1]),
        peak_probes[0].max(peak_probes[1]),
    );
    let eff_bw = bytes_per_token * decode_tok_s / 1e9;
    // The probe's FMAs are as wide as the float GEMM's (512 bits where it uses AVX-512).
    let fma_bits = qwen2::kernels::matmul::float_gemm_lanes() * 32;
    // Whether the host held still enough for the fractions to mean anything (said, not hidden). Only
    // shares of the FMA peak are impossible above 1: weights that fit the caches (a small model) can be
    // read faster than the memory's bandwidth. And only for the forms whose prefill is f32 FMAs: the
    // quantized forms' integer multiply-adds (VNNI) and bf16 tiles (AMX) do several times the work of
    // an f32 FMA an instruction, so their "share of peak" passes 1 on a quiet host (1.6-1.8 on AMX).
    let float_prefill = matches!(
        g.form(),
        qwen2::matrix::WeightForm::Exact | qwen2::matrix::WeightForm::Bf16
    );
    let unsteady = {
        let fractions: Vec<(String, f64)> = prefill
            .iter()
            .filter(|_| float_prefill)
            .map(|(n, (_, gf))| (format!("the {n}-token prefill's share of peak"), gf / peak))
            .collect();
        qb::unsteady(
            &[
                ("read bandwidth", "GB/s", bw_probes),
                ("FMA peak", "GFLOP/s", peak_probes),
            ],
            &fractions,
        )
    };
    let report = serde_json::json!({
        "machine": {"threads": qwen2::kernels::pool::threads(), "simd": qwen2::cpu::compiled_features(),
                     "quantized_kernels": qwen2::kernels::quantized::Backend::best().name(),
                     "read_bandwidth_gbs": bw, "fma_peak_gflops": peak, "fma_probe_bits": fma_bits,
                     "probes_before_and_after": {"read_bandwidth_gbs": bw_probes, "fma_peak_gflops": peak_probes},
                     "steady": unsteady.is_none(), "unsteady_because": unsteady},
        "model": {"path": g.model.as_ref().map(|p| p.display().to_string()), "weight_bytes_per_token": bytes_per_token,
                  "form": g.form().name(),
                  "output_matrix": model.output_matrix().form()},
        "load_s": load_s,
        "first_forward_64_tokens_s": first_forward_s,
        "prefill": prefill.iter().map(|(n, (tps, gf))| serde_json::json!({"tokens": n, "tok_s": tps, "gflops": gf,
            "fraction_of_peak": gf / peak})).collect::<Vec<_>>(),
        "decode": {"tokens": decode_n, "tok_s": decode_tok_s, "effective_gbs": eff_bw, "fraction_of_bandwidth": eff_bw / bw,
                   "weight_stream_gbs": stream_gbs, "fraction_of_weight_stream": eff_bw / stream_gbs,
                   "weight_stream_tok_s": stream_tok_s, "products_gbs": products_gbs,
                   "products_fraction_of_weight_stream": products_gbs / stream_gbs},
        "decode_after_context": after_context.map(|(prefill_tok_s, tok_s)| serde_json::json!({"context": context,
            "prefill_tok_s": prefill_tok_s, "tokens": decode_n, "tok_s": tok_s})),
        "dual_task": dual.iter().map(|(n, l, f, t)| serde_json::json!({"input": n, "sentiment_ms": l, "first_token_ms": f, "total_ms": t})).chain(skipped).collect::<Vec<_>>(),
        "peak_rss_bytes": rss,
        "huge_pages": huge_pages.map(|(file, anon)| serde_json::json!({"file_bytes": file, "anonymous_bytes": anon})),
    });
    if a.json {
        println!("{report}");
        return Ok(());
    }
    println!(
        "machine: {} threads, SIMD {:?}, quantized products on {}",
        qwen2::kernels::pool::threads(),
        qwen2::cpu::compiled_features(),
        qwen2::kernels::quantized::Backend::best().name()
    );
    println!(
        "  read bandwidth      {bw:>8.1} GB/s      (best of {:.1} before, {:.1} after)",
        bw_probes[0], bw_probes[1]
    );
    println!(
        "  FMA peak            {peak:>8.1} GFLOP/s  ({fma_bits}-bit FMAs as the float GEMM's; best of {:.1} before, {:.1} after)",
        peak_probes[0], peak_probes[1]
    );
    println!(
        "model: {} weights, load {load_s:.2} s, {:.2} GB of weights read per token",
        g.form().name(),
        bytes_per_token / 1e9
    );
    println!(
        "  first forward pass  {first_forward_s:>8.2} s        (64 tokens, right after the load)"
    );
    for (n, (tps, gf)) in &prefill {
        println!(
            "  prefill {n:>3} tokens  {tps:>8.1} tok/s  {gf:>6.1} GFLOP/s ({:.0} % of peak)",
            gf / peak * 100.0
        );
    }
    println!("  decode              {decode_tok_s:>8.1} tok/s  {eff_bw:>6.1} GB/s ({:.0} % of bandwidth, {:.0} % of the weight stream)", eff_bw / bw * 100.0, eff_bw / stream_gbs * 100.0);
    println!(
        "  weight stream       {stream_tok_s:>8.1} tok/s  {stream_gbs:>6.1} GB/s ({:.0} % of bandwidth: the decode's bytes in its order, only summed)",
        stream_gbs / bw * 100.0
    );
    println!(
        "  products alone      {:>8.1} tok/s  {products_gbs:>6.1} GB/s ({:.0} % of the weight stream: the decode's products with nothing between them)",
        products_gbs * 1e9 / bytes_per_token,
        products_gbs / stream_gbs * 100.0
    );
    if let Some((file, anon)) = huge_pages {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        println!(
            "  huge pages          {:>8.0} MiB of the file, {:.0} MiB anonymous, for {:.0} MiB of weights read per token",
            mib(file),
            mib(anon),
            bytes_per_token / (1 << 20) as f64
        );
    }
    if let Some((prefill_tok_s, tok_s)) = after_context {
        println!(
            "  decode after {context:<6} {tok_s:>7.1} tok/s  (the {context}-token context prefilled at {prefill_tok_s:.1} tok/s)"
        );
    }
    for (n, l, f, t) in &dual {
        println!("  dual task {n:<18} sentiment {l:>6.0} ms, first reply token {f:>6.0} ms, 64-token reply {t:>6.0} ms");
    }
    println!(
        "  peak RSS            {:>8.0} MiB",
        rss as f64 / (1 << 20) as f64
    );
    if let Some(why) = unsteady {
        println!(
            "note: the machine did not hold still during this run ({why}): the shares of bandwidth and \
             peak above are not the engine's; run again when the host is quieter"
        );
    }
    Ok(())
}
