//! `Sampler`: picks the next token from a row of logits. Greedy by default (deterministic); otherwise the
//! transformers order: repetition penalty → temperature → top-k → top-p → draw with a seeded generator.

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means off.
    pub top_k: usize,
    /// 1.0 means off.
    pub top_p: f32,
    /// 1.0 means off; as transformers defines it: positive logits divided by it, negative multiplied.
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self::default()
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: SplitMix64,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = SplitMix64(params.seed);
        Sampler { params, rng }
    }

    /// Chooses a token. `history` is every id seen so far (prompt and generated) for the repetition penalty.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            apply_repetition_penalty(logits, history, p.repetition_penalty);
        }
        if p.temperature <= 0.0 {
            return argmax(logits) as u32;
        }
        let inv_t = 1.0 / p.temperature;
        let scaled: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l * inv_t))
            .collect();
        let limit = if p.top_k > 0 {
            p.top_k.min(scaled.len())
        } else {
            scaled.len()
        };
        let (cand, mut probs) = ranked(scaled, limit, p.top_p);
        if p.top_p < 1.0 {
            // Keep the smallest head whose mass reaches top_p (at least one token).
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, &pr) in probs.iter().enumerate() {
                acc += pr;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            let s: f32 = probs.iter().sum();
            probs.iter_mut().for_each(|x| *x /= s);
        }
        let r = self.rng.next_f32();
        let mut acc = 0.0;
        for (i, &pr) in probs.iter().enumerate() {
            acc += pr;
            if r < acc {
                return cand[i].0;
            }
        }
        cand[probs.len() - 1].0
    }
}

/// The `limit` best candidates (top-k; all when `limit` is their number), best first, with their softmax
/// probabilities over those `limit` — sorted only as far as top-p will read them.
///
/// Sorting all 151936 logits took longer than the rest of a sampled step, so without top-k but with top-p
/// the best `HEAD` are selected and sorted first, their probabilities taken against the normaliser of all;
/// the full sort runs only when they hold less than top-p of the mass.
fn ranked(mut cand: Vec<(u32, f32)>, limit: usize, top_p: f32) -> (Vec<(u32, f32)>, Vec<f32>) {
    const HEAD: usize = 256;
    let best_first = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1);
    let max = cand.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
    let weights = |c: &[(u32, f32)]| -> Vec<f32> { c.iter().map(|x| (x.1 - max).exp()).collect() };
    let n = cand.len();
    let head = if limit <= HEAD {
        limit
    } else if limit == n && top_p < 1.0 {
        HEAD
    } else {
        n
    };
    let z: f32 = if head < limit {
        weights(&cand).iter().sum()
    } else {
        0.0
    };
    if head < n {
        let mut best = cand.clone();
        best.select_nth_unstable_by(head - 1, best_first);
        best.truncate(head);
        best.sort_unstable_by(best_first);
        let mut probs = weights(&best);
        let sum = if head == limit { probs.iter().sum() } else { z };
        probs.iter_mut().for_each(|x| *x /= sum);
        if head == limit || probs.iter().sum::<f32>() >= top_p {
            return (best, probs);
        }
    }
    cand.sort_unstable_by(best_first);
    cand.truncate(limit);
    let mut probs = weights(&cand);
    let sum: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|x| *x /= sum);
    (cand, probs)
}

pub fn apply_repetition_penalty(logits: &mut [f32], history: &[u32], penalty: f32) {
    let mut seen = std::collections::HashSet::new();
    for &id in history {
        if let Some(l) = logits.get_mut(id as usize) {
            if seen.insert(id) {
                *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
            }
        }
    }
}

/// Index of the largest value; the first one on ties (as torch.argmax).
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

/// The `k` largest values with their indices, best first.
pub fn top_k(x: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut v: Vec<(u32, f32)> = x.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
    let k = k.min(v.len());
    if k == 0 {
        return Vec::new();
    }
    v.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
    v.truncate(k);
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v
}

/// A tiny, well-mixed seeded generator: enough for sampling, no dependency.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&mut [0.1, 3.0, 3.0, -1.0], &[]), 1);
    }

    #[test]
    fn repetition_penalty_as_transformers() {
        let mut l = [2.0, -2.0, 1.0];
        apply_repetition_penalty(&mut l, &[0, 1, 1], 2.0);
        assert_eq!(l, [1.0, -4.0, 1.0]);
    }

    #[test]
    fn top_k_one_is_greedy_and_seed_is_deterministic() {
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 1,
            ..Default::default()
        };
        let mut s = Sampler::new(p);
        assert_eq!(s.sample(&mut [0.0, 5.0, 1.0], &[]), 1);
        let p = SamplingParams {
            temperature: 1.0,
            seed: 7,
            ..Default::default()
        };
        let draw = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone());
            (0..20)
                .map(|_| s.sample(&mut [0.0, 0.1, 0.2, 0.3], &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(&p), draw(&p));
    }

    #[test]
    fn top_p_keeps_the_head() {
        // probabilities ≈ [0.84, 0.11, 0.04, ...]: top_p 0.5 keeps only the first.
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            seed: 3,
            ..Default::default()
        };
        let mut s = Sampler::new(p);
        for _ in 0..50 {
            assert_eq!(s.sample(&mut [4.0, 2.0, 1.0, 0.0], &[]), 0);
        }
    }

    #[test]
    fn head_selection_draws_as_the_full_sort_would() {
        // 1000 logits, top-p 0.9: the head path must keep exactly the tokens a full sort keeps, with the
        // same probabilities; checked by the empirical frequencies of many seeded draws against them.
        let logits: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919) % 1000) as f32 / 100.0)
            .collect();
        let p = SamplingParams {
            temperature: 0.7,
            top_p: 0.9,
            seed: 11,
            ..Default::default()
        };
        // The reference: all sorted, softmax over all, smallest head reaching 0.9.
        let mut all: Vec<(usize, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i, (l / 0.7) as f64))
            .collect();
        all.sort_by(|a, b| b.1.total_cmp(&a.1));
        let z: f64 = all.iter().map(|c| (c.1 - all[0].1).exp()).sum();
        let mut acc = 0.0;
        let mut keep = Vec::new();
        for c in &all {
            acc += (c.1 - all[0].1).exp() / z;
            keep.push(c.0);
            if acc >= 0.9 {
                break;
            }
        }
        let mut s = Sampler::new(p);
        let mut counts = std::collections::HashMap::new();
        for _ in 0..4000 {
            *counts
                .entry(s.sample(&mut logits.clone(), &[]) as usize)
                .or_insert(0) += 1;
        }
        assert!(
            counts.keys().all(|k| keep.contains(k)),
            "a token beyond the top-p head was drawn"
        );
        // The best token's share: its probability within the kept head.
        let head_mass: f64 = keep
            .iter()
            .map(|&i| ((logits[i] / 0.7) as f64 - all[0].1).exp() / z)
            .sum();
        let want = (1.0 / z) / head_mass;
        let got = counts[&all[0].0] as f64 / 4000.0;
        assert!((got - want).abs() < 0.03, "{got} vs {want}");
    }

    #[test]
    fn a_flat_distribution_falls_back_to_the_full_sort() {
        // 1000 equal logits: top-p 0.9 keeps 900 of them, far more than the selected head.
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.9,
            seed: 5,
            ..Default::default()
        };
        let mut s = Sampler::new(p);
        let distinct: std::collections::HashSet<u32> = (0..3000)
            .map(|_| s.sample(&mut vec![1.0; 1000], &[]))
            .collect();
        assert!(distinct.len() > 600, "{}", distinct.len());
    }

    #[test]
    fn top_k_lists_best_first() {
        assert_eq!(top_k(&[1.0, 5.0, 3.0, 4.0], 2), vec![(1, 5.0), (3, 4.0)]);
    }
}
