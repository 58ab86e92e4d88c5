//! RMSNorm, as Qwen2 defines it: `x / sqrt(mean(x²) + eps) * weight`, all in f32.

use wide::f32x8;

pub fn rmsnorm(out: &mut [f32], x: &[f32], weight: &[f32], eps: f32) {
    assert!(out.len() == x.len() && weight.len() == x.len());
    let n = x.len();
    let mut acc = f32x8::ZERO;
    let mut i = 0;
    while i + 8 <= n {
        let v = f32x8::from(<[f32; 8]>::try_from(&x[i..i + 8]).unwrap());
        acc = v.mul_add(v, acc);
        i += 8;
    }
    let mut ss = acc.reduce_add();
    for v in &x[i..] {
        ss += v * v;
    }
    let inv = 1.0 / (ss / n as f32 + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = w * (v * inv);
    }
}

/// [`rmsnorm`] of each row of `x` (rows of `weight.len()` values) into the same row of `out`: the
/// forward pass's norms over all its tokens at once.
pub fn rmsnorm_rows(out: &mut [f32], x: &[f32], weight: &[f32], eps: f32) {
    let h = weight.len();
    assert!(out.len() == x.len() && h > 0 && x.len().is_multiple_of(h));
    for (o, r) in out.chunks_exact_mut(h).zip(x.chunks_exact(h)) {
        rmsnorm(o, r, weight, eps);
    }
}

pub fn rmsnorm_scalar(out: &mut [f32], x: &[f32], weight: &[f32], eps: f32) {
    let ss: f32 = x.iter().map(|v| v * v).sum();
    let inv = 1.0 / (ss / x.len() as f32 + eps).sqrt();
    for i in 0..x.len() {
        out[i] = weight[i] * (x[i] * inv);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_scalar_and_hand_case() {
        // Hand case: x = [3, 4], mean of squares 12.5, eps 0 → x / sqrt(12.5).
        let mut out = [0.0; 2];
        rmsnorm(&mut out, &[3.0, 4.0], &[1.0, 2.0], 0.0);
        let r = 12.5f32.sqrt();
        assert!((out[0] - 3.0 / r).abs() < 1e-6 && (out[1] - 8.0 / r).abs() < 1e-6);
        for n in [1, 7, 9, 63, 896, 1023] {
            let x: Vec<f32> = (0..n).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3).collect();
            let w: Vec<f32> = (0..n).map(|i| 1.0 + (i % 5) as f32 * 0.1).collect();
            let (mut a, mut b) = (vec![0.0; n], vec![0.0; n]);
            rmsnorm(&mut a, &x, &w, 1e-6);
            rmsnorm_scalar(&mut b, &x, &w, 1e-6);
            for (p, q) in a.iter().zip(&b) {
                assert!((p - q).abs() <= 1e-5 * (1.0 + q.abs()));
            }
        }
    }

    #[test]
    fn rows_are_normed_one_by_one() {
        // Rows [3, 4] and [6, 8] (mean of squares 12.5 and 50): each over its own root, times the weight.
        let mut out = [0.0; 4];
        rmsnorm_rows(&mut out, &[3.0, 4.0, 6.0, 8.0], &[1.0, 2.0], 0.0);
        let (r1, r2) = (12.5f32.sqrt(), 50f32.sqrt());
        let want = [3.0 / r1, 8.0 / r1, 6.0 / r2, 16.0 / r2];
        for (o, w) in out.iter().zip(want) {
            assert!((o - w).abs() < 1e-6, "{out:?}");
        }
    }
}
