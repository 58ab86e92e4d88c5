//! Causal attention of new query rows over the KV cache, grouped-query aware.

use super::activation::softmax;
use super::matmul::{dot, load8};
use wide::f32x8;

/// Shapes for one attention call.
pub struct AttentionShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Positions already in the cache before the new tokens (the first new token sits at `start`).
    pub start: usize,
    /// Positions the cache buffers have room for per KV head: the distance between two heads' rows.
    pub capacity: usize,
}

/// `q`: `t × (n_heads·head_dim)` for the new tokens (already rotated); `k_cache`/`v_cache`: this layer's
/// cache, KV-head-major (head `h`, position `p` at `(h · capacity + p) · head_dim`, see `KvCache`), holding
/// positions `0..start+t`. Token `i` attends to positions `0..=start+i`. Writes `t × (n_heads·head_dim)`
/// into `out`.
pub fn attention(q: &[f32], k_cache: &[f32], v_cache: &[f32], s: &AttentionShape, out: &mut [f32]) {
    let hd = s.head_dim;
    let group = s.n_heads / s.n_kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    // One task per (token, KV head): the query heads of a group are consecutive in `q` and `out`, and
    // each key and value row read serves all of them.
    super::pool::for_each_chunk_mut(out, group * hd, |idx, o| {
        let kvh = idx % s.n_kv_heads;
        let len = s.start + idx / s.n_kv_heads + 1;
        let qg = &q[idx * group * hd..][..group * hd];
        let k = &k_cache[kvh * s.capacity * hd..][..len * hd];
        let v = &v_cache[kvh * s.capacity * hd..][..len * hd];
        // scores[h · len + p]: query head h of the group against position p.
        let mut scores = vec![0f32; group * len];
        match hd {
            64 => scores_of::<8>(qg, k, scale, &mut scores),
            128 => scores_of::<16>(qg, k, scale, &mut scores),
            _ => {
                for (p, k) in k.chunks_exact(hd).enumerate() {
                    for (h, qh) in qg.chunks_exact(hd).enumerate() {
                        scores[h * len + p] = dot(k, qh) * scale;
                    }
                }
            }
        }
        for a in scores.chunks_exact_mut(len) {
            softmax(a);
        }
        weighted_values(&scores, len, v, o, hd);
    });
}

/// `scores[h · len + p] = scale · q[h] · k[p]` for the heads of a group, `len` key rows of `8 · N` values
/// in `k` (the common head sizes, 64 and 128, get loops the compiler unrolls, with no bounds checks
/// inside).
///
/// Eight positions at a time: each head's eight dot products are eight independent chains of
/// multiply-adds over the eight key rows (2 KiB at head size 64, so every head after the first reads
/// them from L1), and one 8 × 8 transpose turns the eight accumulators into eight sums. One position at a
/// time needed a horizontal sum per score: over a 3037-token cache, 24 layers' attention for one decode
/// token took 1.8× as long (with the value blocks below; A/B in one process).
fn scores_of<const N: usize>(qg: &[f32], k: &[f32], scale: f32, scores: &mut [f32]) {
    let heads = qg.len() / (8 * N);
    let len = scores.len() / heads;
    let q: Vec<[f32x8; N]> = qg
        .chunks_exact(8 * N)
        .map(|qh| std::array::from_fn(|c| load8(&qh[8 * c..]) * f32x8::splat(scale)))
        .collect();
    let mut blocks = k.chunks_exact(64 * N);
    for (b, rows) in blocks.by_ref().enumerate() {
        let rows: [&[f32]; 8] = std::array::from_fn(|j| &rows[8 * N * j..][..8 * N]);
        for (h, q) in q.iter().enumerate() {
            let mut acc = [f32x8::ZERO; 8];
            for (c, q) in q.iter().enumerate() {
                for (acc, k) in acc.iter_mut().zip(&rows) {
                    *acc = load8(&k[8 * c..]).mul_add(*q, *acc);
                }
            }
            let sums = sum_each(acc);
            scores[h * len + 8 * b..][..8].copy_from_slice(&sums.to_array());
        }
    }
    let p0 = len - blocks.remainder().len() / (8 * N);
    for (p, k) in blocks.remainder().chunks_exact(8 * N).enumerate() {
        for (h, q) in q.iter().enumerate() {
            let mut acc = f32x8::ZERO;
            for (c, q) in q.iter().enumerate() {
                acc = load8(&k[8 * c..]).mul_add(*q, acc);
            }
            scores[h * len + p0 + p] = acc.reduce_add();
        }
    }
}

/// Lane `j` of the result is the sum of the lanes of `v[j]`.
#[inline]
fn sum_each(v: [f32x8; 8]) -> f32x8 {
    let t = f32x8::transpose(v);
    ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]))
}

/// Positions per block of the weighted sum: a block's value rows (16 KiB at head size 64) stay in L1
/// while every head of the group goes over them, so each is read from memory once per token.
const VALUE_BLOCK: usize = 64;

/// `o[h] = Σ_p a[h][p] · v[p]` for the heads of a group (`a` is `heads × len`, `o` `heads × hd`), where
/// `v[p]` is `v[p · hd..][..hd]`.
///
/// Block by block of [`VALUE_BLOCK`] positions, head by head, up to 64 output values in eight vector
/// accumulators: per position one broadcast weight and eight independent multiply-adds with value
/// vectors from L1. Each head's sums run over the positions in order, carried from block to block in `o`.
fn weighted_values(a: &[f32], len: usize, v: &[f32], o: &mut [f32], hd: usize) {
    o.fill(0.0);
    #[cfg(target_arch = "x86_64")]
    let avx512 = super::float_x86::use_avx512();
    for p0 in (0..len).step_by(VALUE_BLOCK) {
        let ps = p0..(p0 + VALUE_BLOCK).min(len);
        let vb = &v[p0 * hd..ps.end * hd];
        for (ah, oh) in a.chunks_exact(len).zip(o.chunks_exact_mut(hd)) {
            let ah = &ah[ps.clone()];
            let mut c = 0;
            #[cfg(target_arch = "x86_64")]
            while avx512 && c + 64 <= hd {
                // SAFETY: the CPU has AVX-512 F (`use_avx512`).
                unsafe { values_block_avx512(ah, vb, hd, oh, c) };
                c += 64;
            }
            while c + 64 <= hd {
                values_block::<8>(ah, vb, hd, oh, c);
                c += 64;
            }
            while c + 8 <= hd {
                values_block::<1>(ah, vb, hd, oh, c);
                c += 8;
            }
            // Head sizes that are not a multiple of eight: the rest one value at a time.
            for c in c..hd {
                for (w, v) in ah.iter().zip(vb.chunks_exact(hd)) {
                    oh[c] += w * v[c];
                }
            }
        }
    }
}

/// Values `c..c + 8 · C` of one head's output `oh` of [`weighted_values`]: `oh += Σ_p ah[p] · vb[p]`
/// over the rows of a block.
#[inline]
fn values_block<const C: usize>(ah: &[f32], vb: &[f32], hd: usize, oh: &mut [f32], c: usize) {
    let mut acc: [f32x8; C] = std::array::from_fn(|j| load8(&oh[c + 8 * j..]));
    for (&w, v) in ah.iter().zip(vb.chunks_exact(hd)) {
        let (w, v) = (f32x8::splat(w), &v[c..][..8 * C]);
        for (j, acc) in acc.iter_mut().enumerate() {
            *acc = load8(&v[8 * j..]).mul_add(w, *acc);
        }
    }
    for (j, acc) in acc.iter().enumerate() {
        oh[c + 8 * j..][..8].copy_from_slice(&acc.to_array());
    }
}

/// [`values_block`] for 64 values in 512-bit vectors: four accumulators of 16 where that has eight of
/// 8, and each lane's sum runs over the positions in the same order, so the same bits with half the
/// instructions (the weighted sum was the larger half of attention's time in a 32-token prefill).
///
/// # Safety
/// The CPU has AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn values_block_avx512(ah: &[f32], vb: &[f32], hd: usize, oh: &mut [f32], c: usize) {
    use std::arch::x86_64::*;
    let oh = &mut oh[c..c + 64];
    assert!(c + 64 <= hd && vb.len() >= ah.len() * hd);
    // SAFETY: 64 floats of `oh`.
    let mut acc: [__m512; 4] =
        std::array::from_fn(|j| unsafe { _mm512_loadu_ps(oh[16 * j..].as_ptr()) });
    for (&w, v) in ah.iter().zip(vb.chunks_exact(hd)) {
        let (w, v) = (_mm512_set1_ps(w), &v[c..c + 64]);
        for (j, acc) in acc.iter_mut().enumerate() {
            // SAFETY: 16 floats of the row's 64 (`v`).
            *acc = _mm512_fmadd_ps(unsafe { _mm512_loadu_ps(v[16 * j..].as_ptr()) }, w, *acc);
        }
    }
    for (j, acc) in acc.iter().enumerate() {
        // SAFETY: 16 floats of `oh`'s 64.
        unsafe { _mm512_storeu_ps(oh[16 * j..].as_mut_ptr(), *acc) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 512-bit weighted sum gives the portable one's bits: blocks of one to `VALUE_BLOCK` positions,
    /// head sizes 64 and 128, the output carried in from a block before.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn values_in_512_bits_have_the_portable_bits() {
        if !super::super::float_x86::use_avx512() {
            eprintln!("no AVX-512 here: the 512-bit weighted sum is not exercised");
            return;
        }
        let f = |i: usize| ((i * 7919 + 13) % 1013) as f32 / 1013.0 * 4.0 - 2.0;
        for (hd, len) in [(64, 1), (64, 37), (128, VALUE_BLOCK)] {
            let a: Vec<f32> = (0..len).map(|i| f(i + 5) / 2.0 + 1.0).collect();
            let v: Vec<f32> = (0..len * hd).map(|i| f(i + 99)).collect();
            let carried: Vec<f32> = (0..hd).map(|i| f(i + 7)).collect();
            for c in (0..hd).step_by(64) {
                let (mut portable, mut wide) = (carried.clone(), carried.clone());
                values_block::<8>(&a, &v, hd, &mut portable, c);
                // SAFETY: AVX-512 F is present (checked above).
                unsafe { values_block_avx512(&a, &v, hd, &mut wide, c) };
                let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&portable), bits(&wide), "hd {hd} len {len} c {c}");
            }
        }
    }

    #[test]
    fn single_position_returns_its_value() {
        // With one cached position the softmax weight is 1: output equals v.
        let s = AttentionShape {
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 2,
            start: 0,
            capacity: 1,
        };
        let q = [1.0, 2.0, -1.0, 0.5];
        let k = [0.3, 0.4];
        let v = [7.0, -2.0];
        let mut out = [0.0; 4];
        attention(&q, &k, &v, &s, &mut out);
        assert_eq!(out, [7.0, -2.0, 7.0, -2.0]);
    }

    #[test]
    fn two_positions_hand_computed() {
        // q·k0 = 0, q·k1 = ln(3)·sqrt(2)/... choose k so scaled scores are 0 and ln 3 → weights 1/4, 3/4.
        let hd = 2;
        let l3 = 3f32.ln() * (hd as f32).sqrt();
        let s = AttentionShape {
            n_heads: 1,
            n_kv_heads: 1,
            head_dim: hd,
            start: 1,
            capacity: 2,
        };
        let q = [1.0, 0.0];
        let k = [0.0, 1.0, l3, 0.0];
        let v = [4.0, 0.0, 0.0, 8.0];
        let mut out = [0.0; 2];
        attention(&q, &k, &v, &s, &mut out);
        assert!(
            (out[0] - 1.0).abs() < 1e-5 && (out[1] - 6.0).abs() < 1e-5,
            "{out:?}"
        );
    }

    /// The definition, in f64 and plain loops: softmax over the causal positions of each query head's
    /// scaled dot products with its KV head's keys, then the weighted sum of the values.
    fn attention_f64(q: &[f32], k: &[f32], v: &[f32], s: &AttentionShape, t: usize) -> Vec<f64> {
        let hd = s.head_dim;
        // KV head `kv` at position `p`, in the cache's KV-head-major layout.
        let at = |kv: usize, p: usize| (kv * s.capacity + p) * hd;
        let group = s.n_heads / s.n_kv_heads;
        let mut out = vec![0f64; t * s.n_heads * hd];
        for ti in 0..t {
            for h in 0..s.n_heads {
                let qh = &q[(ti * s.n_heads + h) * hd..][..hd];
                let kv = h / group;
                let len = s.start + ti + 1;
                let scores: Vec<f64> = (0..len)
                    .map(|p| {
                        let kp = &k[at(kv, p)..][..hd];
                        let d: f64 = qh.iter().zip(kp).map(|(&a, &b)| a as f64 * b as f64).sum();
                        d / (hd as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for (p, e) in e.iter().enumerate() {
                    for c in 0..hd {
                        out[(ti * s.n_heads + h) * hd + c] += e / sum * v[at(kv, p) + c] as f64;
                    }
                }
            }
        }
        out
    }

    /// Head sizes with their own score kernels (64, 128) and without (80: a tail of values too),
    /// groups of one to seven heads (value blocks of one to four heads), several tokens after a
    /// cached prefix.
    #[test]
    fn matches_the_definition() {
        let f = |i: usize| ((i * 7919 + 13) % 1013) as f32 / 1013.0 * 4.0 - 2.0;
        #[cfg(not(miri))]
        let (heads, tokens) = (
            [
                (14, 2, 64),
                (4, 4, 64),
                (6, 2, 128),
                (4, 2, 80),
                (3, 1, 64),
                (8, 1, 16),
            ],
            [(0, 1), (0, 5), (37, 3), (150, 15)],
        );
        // Miri is far too slow for the full list: each path once.
        #[cfg(miri)]
        let (heads, tokens) = ([(14, 2, 64), (4, 4, 128), (4, 2, 80)], [(0, 1), (3, 2)]);
        for (n_heads, n_kv_heads, head_dim) in heads {
            for (start, t) in tokens {
                // Room for a few positions more than are used: the heads' rows are `capacity` apart.
                let capacity = start + t + 3;
                let kv = capacity * n_kv_heads * head_dim;
                let q: Vec<f32> = (0..t * n_heads * head_dim).map(f).collect();
                let k: Vec<f32> = (0..kv).map(|i| f(i + 101)).collect();
                let v: Vec<f32> = (0..kv).map(|i| f(i + 577)).collect();
                let s = AttentionShape {
                    n_heads,
                    n_kv_heads,
                    head_dim,
                    start,
                    capacity,
                };
                let mut out = vec![f32::NAN; q.len()];
                attention(&q, &k, &v, &s, &mut out);
                let want = attention_f64(&q, &k, &v, &s, t);
                for (i, (&got, &want)) in out.iter().zip(&want).enumerate() {
                    assert!(
                        (got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "heads {n_heads}/{n_kv_heads} hd {head_dim} start {start} t {t} [{i}]: {got} vs {want}"
                    );
                }
            }
        }
    }
}
