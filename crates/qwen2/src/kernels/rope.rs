//! Rotary position embeddings in Qwen's rotate-half (NeoX) layout: dimension `i` is paired with `i + d/2`,
//! not with its neighbour. Frequencies are computed in f32 the way transformers computes them, so angles
//! agree bit for bit with the reference at any position.

pub struct RopeTable {
    inv_freq: Vec<f32>,
}

impl RopeTable {
    pub fn new(head_dim: usize, theta: f32) -> Self {
        let inv_freq = (0..head_dim / 2)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        RopeTable { inv_freq }
    }

    /// (cos, sin) for every frequency at `pos`.
    pub fn cos_sin(&self, pos: usize) -> (Vec<f32>, Vec<f32>) {
        self.inv_freq
            .iter()
            .map(|&f| pos as f32 * f)
            .map(|a| (a.cos(), a.sin()))
            .unzip()
    }
}

/// Rotates one head vector in place: `(x1, x2) → (x1·cos − x2·sin, x2·cos + x1·sin)`.
pub fn rope(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = head.len() / 2;
    let (lo, hi) = head.split_at_mut(half);
    for i in 0..half {
        let (x1, x2) = (lo[i], hi[i]);
        lo[i] = x1 * cos[i] - x2 * sin[i];
        hi[i] = x2 * cos[i] + x1 * sin[i];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_zero_is_identity_and_pairs_are_half_apart() {
        let t = RopeTable::new(4, 10000.0);
        let (c, s) = t.cos_sin(0);
        let mut h = [1.0, 2.0, 3.0, 4.0];
        rope(&mut h, &c, &s);
        assert_eq!(h, [1.0, 2.0, 3.0, 4.0]);
        // pos 1, first frequency is 1 rad: pair (x0, x2) rotates by 1 radian.
        let (c, s) = t.cos_sin(1);
        let mut h = [1.0, 0.0, 0.0, 0.0];
        rope(&mut h, &c, &s);
        assert!((h[0] - 1f32.cos()).abs() < 1e-7 && (h[2] - 1f32.sin()).abs() < 1e-7);
        assert_eq!(h[1], 0.0);
        // second frequency is 10000^(-1/2) = 0.01 rad.
        let mut h = [0.0, 1.0, 0.0, 0.0];
        rope(&mut h, &c, &s);
        assert!((h[3] - 0.01f32.sin()).abs() < 1e-7);
    }
}
