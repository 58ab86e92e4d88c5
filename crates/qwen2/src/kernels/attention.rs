//! Causal attention of new query rows over the KV cache, grouped-query aware.

use super::activation::softmax;
use super::matmul::dot;
use rayon::prelude::*;

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
    // One task per (token, head): they write disjoint head-sized pieces of `out`.
    out.par_chunks_mut(hd).enumerate().for_each(|(idx, o)| {
        let (ti, h) = (idx / s.n_heads, idx % s.n_heads);
        let kvh = h / group;
        let qh = &q[idx * hd..(idx + 1) * hd];
        let len = s.start + ti + 1;
        let mut scores: Vec<f32> = (0..len)
            .map(|p| dot(&k_cache[p * kv_dim + kvh * hd..][..hd], qh) * scale)
            .collect();
        softmax(&mut scores);
        o.fill(0.0);
        for (p, &a) in scores.iter().enumerate() {
            let v = &v_cache[p * kv_dim + kvh * hd..][..hd];
            for (oi, vi) in o.iter_mut().zip(v) {
                *oi += a * vi;
            }
        }
    });
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
}
