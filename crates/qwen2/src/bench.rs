//! Measuring the machine, so engine speeds can be stated as fractions of what it allows: read bandwidth
//! (decode is memory-bound) and FMA peak (prefill is compute-bound), plus peak RSS.

use crate::config::ModelConfig;
use rayon::prelude::*;
use std::time::Instant;
use wide::f32x8;

/// Read bandwidth in GB/s: every pool thread sums its own buffer of `bytes_per_thread`; best of `reps`
/// passes. Buffers hold varied data — identical pages can be merged by the host and then read from cache.
pub fn read_bandwidth_gbs(bytes_per_thread: usize, reps: usize) -> f64 {
    let threads = rayon::current_num_threads();
    let per = bytes_per_thread / 32 * 32 / 4;
    let bufs: Vec<Vec<f32>> = (0..threads)
        .map(|t| {
            (0..per)
                .map(|i| ((i as u32).wrapping_mul(2654435761) ^ t as u32) as f32 * 1e-9)
                .collect()
        })
        .collect();
    let mut best = 0.0f64;
    for _ in 0..reps {
        let start = Instant::now();
        let sums: Vec<f32> = bufs
            .par_iter()
            .map(|b| {
                let mut acc = [f32x8::ZERO; 4];
                for c in b.chunks_exact(32) {
                    for (j, a) in acc.iter_mut().enumerate() {
                        *a += f32x8::from(<[f32; 8]>::try_from(&c[j * 8..j * 8 + 8]).unwrap());
                    }
                }
                (acc[0] + acc[1] + acc[2] + acc[3]).reduce_add()
            })
            .collect();
        let s = start.elapsed().as_secs_f64();
        std::hint::black_box(sums);
        best = best.max((per * 4 * threads) as f64 / s / 1e9);
    }
    best
}

/// FMA peak in GFLOP/s (2 flops per lane per FMA), all pool threads, independent accumulators.
pub fn fma_peak_gflops(reps: usize) -> f64 {
    const ITERS: usize = 20_000_000;
    let threads = rayon::current_num_threads();
    let mut best = 0.0f64;
    for _ in 0..reps {
        let start = Instant::now();
        let r: Vec<f32> = (0..threads)
            .into_par_iter()
            .map(|t| {
                let m = f32x8::splat(0.999_999);
                let a0 = f32x8::splat(1e-7);
                let mut acc = [f32x8::splat(t as f32); 12];
                for _ in 0..ITERS / 12 {
                    for a in acc.iter_mut() {
                        *a = a.mul_add(m, a0);
                    }
                }
                acc.iter().fold(f32x8::ZERO, |x, y| x + *y).reduce_add()
            })
            .collect();
        let s = start.elapsed().as_secs_f64();
        std::hint::black_box(r);
        let flops = (threads * (ITERS / 12) * 12 * 8 * 2) as f64;
        best = best.max(flops / s / 1e9);
    }
    best
}

/// Floating-point operations of a forward pass over `t` new tokens (matmuls only, logits for one row).
pub fn forward_flops(c: &ModelConfig, t: usize) -> f64 {
    let h = c.hidden_size as f64;
    let per_layer = h * (c.q_dim() + 2 * c.kv_dim()) as f64
        + c.q_dim() as f64 * h
        + 3.0 * h * c.intermediate_size as f64;
    2.0 * (t as f64 * per_layer * c.num_hidden_layers as f64 + h * c.vocab_size as f64)
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
