//! Measuring the machine, so engine speeds can be stated as fractions of what it allows: read bandwidth
//! (decode is memory-bound) and FMA peak (prefill is compute-bound), plus peak RSS.

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::kernels::quantized::for_each_decode_rows;
use crate::model::Model;
use crate::weights::arena::{Arena, ArenaBuf};
use rayon::prelude::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Read bandwidth in GB/s: every pool thread sums its own buffer of `bytes_per_thread`; best of `reps`
/// passes. Buffers hold varied data — identical pages can be merged by the host and then read from cache.
///
/// The buffers sit in huge pages, as the weights do (the mapped file asks for them, and the forms
/// converted at load live in `weights::arena`'s huge-page mappings), and are summed with the weight
/// stream's loop, so the two differ only in their pattern. In `Vec`s, in 4 KiB pages, the same loop read
/// a median of 4 % less (10 alternations, each slower; the best pass 11 % less) on a 2-core Zen 3 VM, and
/// the weight stream of the F32 and BF16 forms read up to 1.37× that probe.
pub fn read_bandwidth_gbs(bytes_per_thread: usize, reps: usize) -> Result<f64> {
    let threads = rayon::current_num_threads();
    let len = (bytes_per_thread / 128 * 128).max(128);
    let arena = Arena::new();
    let mut bufs: Vec<ArenaBuf> = (0..threads)
        .map(|_| arena.alloc(len))
        .collect::<Result<_>>()
        .map_err(|e| Error::Invalid(format!("the bandwidth probe's buffers: {e}")))?;
    bufs.par_iter_mut().enumerate().for_each(|(t, b)| {
        for (i, w) in b.bytes_mut().chunks_exact_mut(8).enumerate() {
            let v = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ t as u64;
            w.copy_from_slice(&v.to_le_bytes());
        }
    });
    let mut best = 0.0f64;
    for _ in 0..reps {
        let (s, sums) = on_every_core(threads, |t| {
            crate::kernels::stream::sum_words(bufs[t].bytes())
        });
        std::hint::black_box(sums);
        best = best.max((len * threads) as f64 / s / 1e9);
    }
    Ok(best)
}

/// FMA peak in GFLOP/s (2 flops per lane per FMA), all pool threads, independent accumulators, in the
/// float GEMM's vector width (512 bits where it uses AVX-512: measuring 256-bit FMAs there would
/// credit the GEMM with twice the share of the peak it reaches).
pub fn fma_peak_gflops(reps: usize) -> f64 {
    const ITERS: usize = 20_000_000;
    let threads = rayon::current_num_threads();
    let lanes = crate::kernels::matmul::float_gemm_lanes();
    let mut best = 0.0f64;
    for _ in 0..reps {
        let (s, sums) = on_every_core(threads, |t| {
            crate::kernels::matmul::fma_probe_chains(ITERS, t as f32)
        });
        std::hint::black_box(sums);
        let flops = (threads * (ITERS / 12) * 12 * lanes * 2) as f64;
        best = best.max(flops / s / 1e9);
    }
    best
}

/// Runs `work(0..threads)` on as many threads of its own, started together, and returns the seconds
/// from the first one's start to the last one's end, with the results.
///
/// Why not the pool: a parallel iterator over one item a thread may run both items on one worker while
/// the other still wakes up, and the FMA probe's few milliseconds a thread leave room for that; a probe
/// reading one core's peak for two doubles every prefill share beside it. On a 2-core Xeon VM, 58 of 60
/// best-of-three FMA probes this way read 451–496 GFLOP/s and two about half (the host; nothing here
/// can rule that out). The threads time themselves: the caller may not run again until they are done.
fn on_every_core<R: Send>(threads: usize, work: impl Fn(usize) -> R + Sync) -> (f64, Vec<R>) {
    let barrier = std::sync::Barrier::new(threads);
    let runs: Vec<(Instant, Instant, R)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (barrier, work) = (&barrier, &work);
                scope.spawn(move || {
                    barrier.wait();
                    let start = Instant::now();
                    let r = work(t);
                    (start, Instant::now(), r)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });
    let first = runs.iter().map(|r| r.0).min();
    let last = runs.iter().map(|r| r.1).max();
    let secs = match (first, last) {
        (Some(a), Some(b)) => b.duration_since(a).as_secs_f64(),
        _ => 0.0,
    };
    (secs, runs.into_iter().map(|r| r.2).collect())
}

/// One matrix of a decode step as the weight-stream measure sees it: its stored bytes and row count.
struct Stream<'a> {
    bytes: &'a [u8],
    rows: usize,
}

/// The weight stream: GB/s at which the pool reads the bytes of a decode step of `model` when it does
/// nothing with them but add them up — in the decode's order ([`Model::decode_steps`]), step by step
/// with a barrier after each, each step's rows split between the threads as the decode splits them
/// (`kernels::quantized::for_each_decode_rows`, for quantized and float weights alike). No decode can
/// read its weights much faster, so its share of this is what its arithmetic and the rest of its pass
/// lose ([`products_gbs`] tells the two apart); the stream's share of [`read_bandwidth_gbs`] is what
/// the order and the barriers cost. Best of `reps`.
pub fn weight_stream_gbs(model: &Model, reps: usize) -> f64 {
    let steps: Vec<Vec<Stream>> = model
        .decode_steps()
        .iter()
        .map(|step| {
            step.iter()
                .map(|m| Stream {
                    bytes: m.stored_bytes(),
                    rows: m.rows,
                })
                .collect()
        })
        .collect();
    best_gbs(model.weight_bytes_per_token(), reps, || {
        std::hint::black_box(weight_stream_sum(&steps));
    })
}

/// GB/s of the best of `reps` runs of `pass`, each reading `bytes`.
fn best_gbs(bytes: usize, reps: usize, mut pass: impl FnMut()) -> f64 {
    let mut best = 0.0f64;
    for _ in 0..reps {
        let start = Instant::now();
        pass();
        best = best.max(bytes as f64 / start.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// The decode's products alone: GB/s at which the pool multiplies every matrix of a decode step by one
/// fixed vector of activations, with the decode's kernels, in its order and parallel steps
/// ([`Model::decode_steps`]), and nothing between the steps: no norms, attention, activation function,
/// logits buffer or sampling. It sits between the weight stream and the decode and tells their gap's
/// two parts apart: its share of the stream is what the kernels keep of the memory's pace, the
/// decode's share of it what the rest of a forward pass leaves. Best of `reps`, as the stream.
///
/// On a 2-core Zen 3 VM (medians of 60 alternations in one process) the BF16 products read 0.85–0.95
/// of the weight stream and the decode 0.94–1.01 of the products: the loss is in the kernels (F32
/// 0.92–0.94 and 0.99, Q8_0 0.83 and 0.97, the default model's mixed types 0.74 and 0.98).
pub fn products_gbs(model: &Model, reps: usize) -> f64 {
    let steps = model.decode_steps();
    let cols = steps.iter().flatten().map(|m| m.cols).max().unwrap_or(0);
    // Varied values, as activations are; no product's speed depends on them.
    let x: Vec<f32> = (0..cols).map(|i| ((i % 13) as f32 - 6.0) * 0.05).collect();
    let mut outs: Vec<Vec<Vec<f32>>> = steps
        .iter()
        .map(|step| step.iter().map(|m| vec![0.0; m.rows]).collect())
        .collect();
    let gbs = best_gbs(model.weight_bytes_per_token(), reps, || {
        crate::kernels::pool::install(|| {
            for (step, outs) in steps.iter().zip(outs.iter_mut()) {
                let cols = step.first().map_or(0, |m| m.cols);
                let mut products: Vec<_> = step
                    .iter()
                    .zip(outs.iter_mut())
                    .map(|(m, out)| (m.weights(), m.rows, &mut out[..]))
                    .collect();
                crate::kernels::matmul::matmul_many(&mut products, cols, &x[..cols], 1);
            }
        })
    });
    std::hint::black_box(&outs);
    gbs
}

/// One pass of the weight stream. Returns the wrapping sum of each matrix's little-endian 8-byte words
/// (a last partial word zero-padded), whatever the split, so a test can check that each byte was read
/// exactly once.
fn weight_stream_sum(steps: &[Vec<Stream>]) -> u64 {
    let total = AtomicU64::new(0);
    crate::kernels::pool::install(|| {
        for step in steps {
            let rows_of: Vec<usize> = step.iter().map(|m| m.rows).collect();
            let row_bytes = |m: &Stream| (m.bytes.len() / m.rows.max(1)).max(1);
            let first = step.first().map_or(1, row_bytes);
            for_each_decode_rows(&rows_of, first, |i, rows| {
                let (m, rb) = (&step[i], row_bytes(&step[i]));
                // The last row takes whatever bytes are left over.
                let end = if rows.end == m.rows {
                    m.bytes.len()
                } else {
                    rows.end * rb
                };
                let b = &m.bytes[rows.start * rb..end];
                total.fetch_add(sum_words_at(b, rows.start * rb), Ordering::Relaxed);
            });
        }
    });
    total.into_inner()
}

/// `b`'s part of the wrapping sum of its matrix's little-endian words, `b` starting `offset` bytes into
/// the matrix.
fn sum_words_at(b: &[u8], offset: usize) -> u64 {
    // A byte's place in its word is its offset in the matrix modulo 8.
    let bytes_at = |b: &[u8], at: usize| {
        b.iter().enumerate().fold(0u64, |s, (i, &v)| {
            s.wrapping_add(u64::from(v) << (8 * ((at + i) % 8)))
        })
    };
    let (head, rest) = b.split_at(((8 - offset % 8) % 8).min(b.len()));
    let (body, tail) = rest.split_at(rest.len() / 128 * 128);
    bytes_at(head, offset)
        .wrapping_add(crate::kernels::stream::sum_words(body))
        .wrapping_add(bytes_at(tail, 0))
}

/// Floating-point operations (2 per multiply-add) a prefill of `t` tokens into an empty cache does in
/// its products, as [`Model::forward`] runs it for the last row's logits: every layer's weight products
/// for all `t` rows, except that the last layer's attention output, `o_proj` and MLP are computed for
/// the last row only (its other rows feed nothing); attention's two products (scores, then the weighted
/// sum of values) over the keys each row sees, causally; the output matrix for one row.
///
/// An earlier count took every layer's weight products for all `t` rows and no attention: for the
/// default model's shape 1.032× the work a 128-token prefill does (1.035× at 64 tokens), so the shares
/// of the FMA peak it gave read that much high.
pub fn forward_flops(c: &ModelConfig, t: usize) -> f64 {
    let (h, layers) = (c.hidden_size as f64, c.num_hidden_layers as f64);
    let (tf, qd) = (t as f64, c.q_dim() as f64);
    let qkv = h * (c.q_dim() + 2 * c.kv_dim()) as f64;
    let o_and_mlp = qd * h + 3.0 * h * c.intermediate_size as f64;
    // Row i sees i + 1 keys; each key costs one multiply-add per query lane for its score and one for
    // its value.
    let attend = |keys: f64| keys * 2.0 * qd;
    let full_layer = tf * (qkv + o_and_mlp) + attend(tf * (tf + 1.0) / 2.0);
    let last_layer = tf * qkv + attend(tf) + o_and_mlp;
    let macs = if t == 0 {
        0.0
    } else {
        (layers - 1.0) * full_layer + last_layer + h * c.vocab_size as f64
    };
    2.0 * macs
}

/// This process's memory mapped in huge pages, from `/proc/self/smaps_rollup`: file-backed
/// (`FilePmdMapped`: the mapped model file) and anonymous (`AnonHugePages`: the forms converted at load,
/// and any other memory where the system gives huge pages to all of it); `None` where unknown. A file
/// already in the page cache in small pages when it was mapped stays in them (see `MappedFile::open`),
/// and its weight stream then reads below the bandwidth probe.
pub fn huge_page_bytes() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/self/smaps_rollup").ok()?;
    let kib = |key: &str| {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map(|k| k * 1024)
    };
    Some((kib("FilePmdMapped:")?, kib("AnonHugePages:")?))
}

/// Resets this process's peak resident set size to its current size (Linux ≥ 4.0: `5` written to
/// `/proc/self/clear_refs`), so a peak measured later is the engine's, not the bandwidth probe's buffers.
/// Returns whether it worked.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Peak resident set size of this process (VmHWM), in bytes; 0 where unknown.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// The lowest ratio (lower over higher) of a probe's two readings, before and after the engine's
/// measurements, at which a run's fractions of that probe are still read as the engine's own. On a
/// quiet host the two agree within a few per cent; on a shared 2-core Xeon VM whose neighbours were
/// busy they read 5.8 and 7.7 GB/s, 9.6 and 6.4, 136 and 90 GFLOP/s within single runs, which put the
/// decode at "116 % of bandwidth" and a prefill at "113 % of peak".
pub const PROBE_AGREEMENT: f64 = 0.85;

/// Why a run's fractions of the machine's limits cannot be read as the engine's, or `None` if they
/// can: a probe whose two readings (`name`, unit, readings) disagree beyond [`PROBE_AGREEMENT`], or
/// a fraction over 1 (`what`, fraction) of a limit nothing can pass (the FMA peak), which only a probe
/// that caught the host busy can give.
pub fn unsteady(probes: &[(&str, &str, [f64; 2])], fractions: &[(String, f64)]) -> Option<String> {
    let mut why = Vec::new();
    for (name, unit, [a, b]) in probes {
        let (lo, hi) = (a.min(*b), a.max(*b));
        let agree = a.is_finite() && b.is_finite() && lo > 0.0 && lo >= PROBE_AGREEMENT * hi;
        if !agree {
            why.push(format!("the {name} probe read {a:.1} and {b:.1} {unit}"));
        }
    }
    for (what, f) in fractions {
        if *f > 1.0 {
            why.push(format!("{what} came to {:.0} %", f * 100.0));
        }
    }
    (!why.is_empty()).then(|| why.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hand cases: readings within 15 % of each other and fractions up to 1 pass; each failure is named.
    #[test]
    fn unsteady_names_what_moved() {
        let bw = ("read bandwidth", "GB/s", [20.0, 18.0]);
        let fma = ("FMA peak", "GFLOP/s", [250.0, 240.0]);
        assert_eq!(
            unsteady(
                &[bw, fma],
                &[("prefill".into(), 0.93), ("prefill".into(), 1.0)]
            ),
            None
        );
        let moved = ("read bandwidth", "GB/s", [5.8, 7.7]);
        assert_eq!(
            unsteady(&[moved, fma], &[("prefill".into(), 1.13)]).as_deref(),
            Some("the read bandwidth probe read 5.8 and 7.7 GB/s; prefill came to 113 %")
        );
        // A probe that failed outright (0, or not a number) is unsteady too.
        assert!(unsteady(&[("FMA peak", "GFLOP/s", [f64::NAN, 200.0])], &[]).is_some());
        assert!(unsteady(&[("FMA peak", "GFLOP/s", [0.0, 0.0])], &[]).is_some());
    }

    /// A tiny shape counted by hand: hidden 4, 2 heads of 2 (q 4 wide), 1 KV head (k, v 2 wide each),
    /// MLP 8 wide, 2 layers, 10 tokens in the vocabulary, 3 tokens prefilled.
    #[test]
    fn forward_flops_count_the_work_a_prefill_does() {
        let c = ModelConfig {
            vocab_size: 10,
            hidden_size: 4,
            intermediate_size: 8,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            head_dim: 2,
            max_position_embeddings: 32,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            tie_word_embeddings: true,
            eos_token_ids: vec![],
            bos_token_id: None,
        };
        // A row's weight products: q, k, v 4 × (4 + 2 + 2) = 32, o 4 × 4 = 16, gate, up and down
        // 3 × 4 × 8 = 96 multiply-adds. Attention: rows 1, 2, 3 see 1 + 2 + 3 = 6 keys, each 4 query
        // lanes for the score and 4 for the value: 48.
        // Layer 1: 3 rows × 144 + 48 = 480. Layer 2 (the last): q, k, v for 3 rows (96), attention
        // for the last row only (3 keys × 8 = 24), o and MLP for it (112): 232. Logits: 4 × 10 = 40.
        assert_eq!(forward_flops(&c, 3), 2.0 * (480.0 + 232.0 + 40.0));
        // One token: one row through both layers (144 + 8 each) and the logits.
        assert_eq!(forward_flops(&c, 1), 2.0 * (2.0 * 152.0 + 40.0));
        assert_eq!(forward_flops(&c, 0), 0.0);
    }

    /// The weight stream reads every byte once: its sum is that of the words counted one by one, for
    /// matrices whose rows split unevenly into tasks and whose length is not a multiple of 8 or 128.
    #[test]
    fn the_weight_stream_reads_each_byte_once() {
        let data: Vec<Vec<u8>> = [(7, 4864 * 2), (300, 1101), (1, 13), (5000, 37)]
            .iter()
            .enumerate()
            .map(|(m, &(rows, row_bytes))| {
                (0..rows * row_bytes)
                    .map(|i| ((i * 131 + m * 17) % 251) as u8)
                    .collect()
            })
            .collect();
        let rows = [7, 300, 1, 5000];
        let streams = |r: std::ops::Range<usize>| -> Vec<Stream> {
            r.map(|i| Stream {
                bytes: &data[i],
                rows: rows[i],
            })
            .collect()
        };
        let steps = vec![streams(0..2), streams(2..3), streams(3..4)];
        // By hand: each matrix's words, little-endian, the last one zero-padded.
        let mut expected = 0u64;
        for d in &data {
            for w in d.chunks(8) {
                let mut v = 0u64;
                for (k, &byte) in w.iter().enumerate() {
                    v |= (byte as u64) << (8 * k);
                }
                expected = expected.wrapping_add(v);
            }
        }
        assert_eq!(weight_stream_sum(&steps), expected);
    }
}
