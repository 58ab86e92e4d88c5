//! Softmax and the SwiGLU gate.

use wide::{f32x8, CmpLt};

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
///
/// Eight values at a time with `wide`'s `exp`, as in [`softmax`]: with libm's scalar `exp` this was 8 %
/// of a 14-token prefill of the default model (4864 values per token and layer, on one thread).
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len());
    let mut g8 = gate.chunks_exact_mut(8);
    let mut u8 = up.chunks_exact(8);
    for (g, u) in (&mut g8).zip(&mut u8) {
        let gv = f32x8::from(&*g);
        let s = gv / (f32x8::ONE + (-gv).exp());
        // `wide`'s `exp` returns 0 for arguments past ±87 (where libm's overflows or underflows): right
        // for large positive g (silu(g) → g), wrong for large negative g, where silu is below 1e-35.
        let s = gv.cmp_lt(f32x8::splat(-87.0)).blend(f32x8::ZERO, s) * f32x8::from(u);
        g.copy_from_slice(&s.to_array());
    }
    for (g, &u) in g8.into_remainder().iter_mut().zip(u8.remainder()) {
        *g = silu_scalar(*g) * u;
    }
}

/// [`silu_mul`] over a forward pass's `gate.len() / row` rows (tokens) at once, split across the compute
/// threads. On one thread, 128 rows of 4864 values took 767 µs on a 2-core Xeon VM, with the other core
/// spinning through it; split, 378 µs (medians of 400, alternated in one process): ~9 ms of a 128-token
/// prefill of the 0.5B models. One row (a decode step) stays on the caller. Every piece is whole
/// eight-value vectors, so each value takes the same path (vector or scalar tail) as in one pass.
pub fn silu_mul_rows(gate: &mut [f32], up: &[f32], row: usize) {
    assert!(gate.len() == up.len() && row > 0);
    let rows = gate.len() / row;
    if rows <= 1 {
        return silu_mul(gate, up);
    }
    let per = (rows.div_ceil(super::pool::threads() * 4) * row).next_multiple_of(8);
    super::pool::for_each_chunk_mut(gate, per, |i, g| silu_mul(g, &up[i * per..][..g.len()]));
}

fn silu_scalar(g: f32) -> f32 {
    g / (1.0 + (-g).exp())
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

    /// The vector path against libm's `exp`, over the range activations take and past where `exp`
    /// overflows, where silu must go to 0 (large negative) or to the value itself (large positive).
    #[test]
    fn silu_vector_matches_scalar() {
        let mut g: Vec<f32> = (-2000..=2000).map(|i| i as f32 * 0.05).collect();
        g.extend([
            -1e4, -300.0, -89.0, -88.5, 88.5, 89.0, 300.0, 1e4, 0.0, -0.0, 1e-30, -1e-30,
        ]);
        let up: Vec<f32> = (0..g.len()).map(|i| 1.0 + (i % 7) as f32 * 0.25).collect();
        let mut out = g.clone();
        silu_mul(&mut out, &up);
        for ((&x, &u), &y) in g.iter().zip(&up).zip(&out) {
            let want = (x as f64 / (1.0 + (-(x as f64)).exp())) * u as f64;
            let err = (y as f64 - want).abs();
            assert!(
                y.is_finite() && err <= 4e-7 * want.abs() + 1e-35,
                "silu({x}) · {u} = {y}, want {want}"
            );
        }
    }

    /// Split over the threads, every value is the one [`silu_mul`] gives, rows of any length (its vector
    /// `exp` and libm's in the tail differ in the last bits).
    #[test]
    fn silu_rows_match_one_pass() {
        for (rows, row) in [(1, 13), (2, 8), (7, 37), (33, 64)] {
            let g: Vec<f32> = (0..rows * row)
                .map(|i| (i % 29) as f32 * 0.3 - 4.0)
                .collect();
            let up: Vec<f32> = (0..rows * row).map(|i| 0.5 + (i % 5) as f32).collect();
            let (mut a, mut b) = (g.clone(), g);
            silu_mul(&mut a, &up);
            silu_mul_rows(&mut b, &up, row);
            assert_eq!(a, b, "{rows} rows of {row}");
        }
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
