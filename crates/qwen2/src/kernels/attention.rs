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
}

/// `q`: `t × (n_heads·head_dim)` for the new tokens (already rotated); `k_cache`/`v_cache`: this layer's
/// cache rows `0..start+t`, each `n_kv_heads·head_dim` wide. Token `i` attends to positions `0..=start+i`.
/// Writes `t × (n_heads·head_dim)` into `out`.
pub fn attention(q: &[f32], k_cache: &[f32], v_cache: &[f32], s: &AttentionShape, out: &mut [f32]) {
    let hd = s.head_dim;
    let kv_dim = s.n_kv_heads * hd;
    let group = s.n_heads / s.n_kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    // One task per (token, KV head): the query heads of a group are consecutive in `q` and `out`, and
    // each key and value row read serves all of them.
    super::pool::for_each_chunk_mut(out, group * hd, |idx, o| {
        let kvh = idx % s.n_kv_heads;
        let len = s.start + idx / s.n_kv_heads + 1;
        let qg = &q[idx * group * hd..][..group * hd];
        let at = |p: usize| p * kv_dim + kvh * hd;
        // scores[h · len + p]: query head h of the group against position p.
        let mut scores = vec![0f32; group * len];
        match hd {
            64 => scores_of::<8>(qg, k_cache, &at, scale, &mut scores),
            128 => scores_of::<16>(qg, k_cache, &at, scale, &mut scores),
            _ => {
                for p in 0..len {
                    let k = &k_cache[at(p)..][..hd];
                    for (h, qh) in qg.chunks_exact(hd).enumerate() {
                        scores[h * len + p] = dot(k, qh) * scale;
                    }
                }
            }
        }
        for a in scores.chunks_exact_mut(len) {
            softmax(a);
        }
        weighted_values(&scores, len, v_cache, at, o, hd);
    });
}

/// `scores[h · len + p] = scale · q[h] · k[p]` for the heads of a group and a head size of `8 · N`: the
/// common head sizes (64, 128) get a loop the compiler unrolls, with the scaled query rows and each key
/// row in registers and no bounds checks inside.
fn scores_of<const N: usize>(
    qg: &[f32],
    k_cache: &[f32],
    at: &impl Fn(usize) -> usize,
    scale: f32,
    scores: &mut [f32],
) {
    let heads = qg.len() / (8 * N);
    let len = scores.len() / heads;
    let q: Vec<[f32x8; N]> = qg
        .chunks_exact(8 * N)
        .map(|qh| std::array::from_fn(|c| load8(&qh[8 * c..]) * f32x8::splat(scale)))
        .collect();
    for p in 0..len {
        let k = &k_cache[at(p)..][..8 * N];
        let k: [f32x8; N] = std::array::from_fn(|c| load8(&k[8 * c..]));
        for (h, q) in q.iter().enumerate() {
            // Two chains, so each multiply-add waits for the one two before it.
            let mut acc = [f32x8::ZERO; 2];
            for c in 0..N {
                acc[c % 2] = k[c].mul_add(q[c], acc[c % 2]);
            }
            scores[h * len + p] = (acc[0] + acc[1]).reduce_add();
        }
    }
}

/// `o[h] = Σ_p a[h][p] · v[p]` for the heads of a group (`a` is `heads × len`, `o` `heads × hd`), where
/// `v[p]` is `v_cache[at(p)..][..hd]`.
///
/// Blocks of up to four heads × up to 64 output values, eight vectors of accumulators, one position at
/// a time: each value load serves every head of the block, the eight multiply-adds per position are
/// independent (their latency hidden), and a position's values are read once per block, in order.
fn weighted_values(
    a: &[f32],
    len: usize,
    v_cache: &[f32],
    at: impl Fn(usize) -> usize,
    o: &mut [f32],
    hd: usize,
) {
    let heads = a.len() / len;
    for h0 in (0..heads).step_by(4) {
        let hb = (heads - h0).min(4);
        // Vectors of output values per block: eight accumulators in all.
        let cb = [8, 4, 2, 2][hb - 1];
        let mut c = 0;
        while c + 8 <= hd {
            let args = (a, len, v_cache, &at, &mut *o, hd, h0, c);
            c += match (hb, hd - c >= 8 * cb) {
                (1, true) => values_block::<1, 8>(args),
                (2, true) => values_block::<2, 4>(args),
                (3, true) => values_block::<3, 2>(args),
                (4, true) => values_block::<4, 2>(args),
                (1, false) => values_block::<1, 1>(args),
                (2, false) => values_block::<2, 1>(args),
                (3, false) => values_block::<3, 1>(args),
                _ => values_block::<4, 1>(args),
            };
        }
        // Head sizes that are not a multiple of eight: the rest one value at a time.
        for h in h0..h0 + hb {
            for c in c..hd {
                o[h * hd + c] = (0..len).map(|p| a[h * len + p] * v_cache[at(p) + c]).sum();
            }
        }
    }
}

type ValuesArgs<'a, F> = (
    &'a [f32],
    usize,
    &'a [f32],
    &'a F,
    &'a mut [f32],
    usize,
    usize,
    usize,
);

/// Values `c..c + 8 · C` of heads `h0..h0 + H` of [`weighted_values`]; returns how many values it did.
#[inline]
fn values_block<const H: usize, const C: usize>(
    (a, len, v_cache, at, o, hd, h0, c): ValuesArgs<impl Fn(usize) -> usize>,
) -> usize {
    let mut acc = [[f32x8::ZERO; C]; H];
    for p in 0..len {
        let v = &v_cache[at(p) + c..][..8 * C];
        let v: [f32x8; C] = std::array::from_fn(|j| load8(&v[8 * j..]));
        for (h, acc) in acc.iter_mut().enumerate() {
            let w = f32x8::splat(a[(h0 + h) * len + p]);
            for j in 0..C {
                acc[j] = v[j].mul_add(w, acc[j]);
            }
        }
    }
    for (h, acc) in acc.iter().enumerate() {
        for (j, acc) in acc.iter().enumerate() {
            o[(h0 + h) * hd + c + 8 * j..][..8].copy_from_slice(&acc.to_array());
        }
    }
    8 * C
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_position_returns_its_value() {
        // With one cached position the softmax weight is 1: output equals v.
        let s = AttentionShape {
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 2,
            start: 0,
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
        let (hd, kv_dim) = (s.head_dim, s.n_kv_heads * s.head_dim);
        let group = s.n_heads / s.n_kv_heads;
        let mut out = vec![0f64; t * s.n_heads * hd];
        for ti in 0..t {
            for h in 0..s.n_heads {
                let qh = &q[(ti * s.n_heads + h) * hd..][..hd];
                let kv = (h / group) * hd;
                let len = s.start + ti + 1;
                let scores: Vec<f64> = (0..len)
                    .map(|p| {
                        let kp = &k[p * kv_dim + kv..][..hd];
                        let d: f64 = qh.iter().zip(kp).map(|(&a, &b)| a as f64 * b as f64).sum();
                        d / (hd as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for (p, e) in e.iter().enumerate() {
                    for c in 0..hd {
                        out[(ti * s.n_heads + h) * hd + c] +=
                            e / sum * v[p * kv_dim + kv + c] as f64;
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
                let len = start + t;
                let kv = len * n_kv_heads * head_dim;
                let q: Vec<f32> = (0..t * n_heads * head_dim).map(f).collect();
                let k: Vec<f32> = (0..kv).map(|i| f(i + 101)).collect();
                let v: Vec<f32> = (0..kv).map(|i| f(i + 577)).collect();
                let s = AttentionShape {
                    n_heads,
                    n_kv_heads,
                    head_dim,
                    start,
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
