//! Softmax and the SwiGLU gate.

use wide::f32x8;

/// In-place softmax; subtracting the max keeps `exp` finite for any logits.
///
/// Eight values at a time with `wide`'s polynomial `exp` (within a few ulp of libm's): attention calls
/// this for every head, token and cached position, and libm's scalar `exp` was a fifth of its time.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    let mut chunks = x.chunks_exact_mut(8);
    let mut acc = f32x8::ZERO;
    for c in &mut chunks {
        let e = (f32x8::from(&*c) - f32x8::splat(max)).exp();
        c.copy_from_slice(&e.to_array());
        acc += e;
    }
    for v in chunks.into_remainder() {
        *v = (*v - max).exp();
        sum += *v;
    }
    sum += acc.reduce_add();
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// `gate[i] = silu(gate[i]) * up[i]` where `silu(g) = g · sigmoid(g)` — the SwiGLU MLP's middle.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len());
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_hand_case() {
        let mut x = [0.0, (2.0f32).ln(), 1000.0];
        softmax(&mut x);
        assert!((x[2] - 1.0).abs() < 1e-6 && x[0] >= 0.0);
        let mut y = [1.0, 1.0 + (3.0f32).ln()];
        softmax(&mut y);
        assert!((y[0] - 0.25).abs() < 1e-6 && (y[1] - 0.75).abs() < 1e-6);
    }

    #[test]
    fn silu_hand_case() {
        let mut g = [0.0, 1.0, -1.0];
        silu_mul(&mut g, &[5.0, 2.0, 1.0]);
        assert_eq!(g[0], 0.0);
        assert!((g[1] - 2.0 / (1.0 + (-1f32).exp())).abs() < 1e-6);
        assert!((g[2] - (-1.0 / (1.0 + 1f32.exp()))).abs() < 1e-6);
    }
}
