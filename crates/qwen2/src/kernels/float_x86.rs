//! AVX2 + FMA tiles for weights stored as f32, bf16 or f16: `R` weight rows × `T` tokens of dot
//! products, all accumulated in f32.
//!
//! Weights are widened to f32 in registers, exactly: bf16 is the top half of an f32 (zero-extend each
//! 16-bit value to 32 bits and shift left by 16), f16 goes through F16C's `vcvtph2ps`. Each weight vector
//! loaded serves `T` tokens and each activation vector `R` rows; the 4 × 3 prefill tile keeps its twelve
//! accumulators, three weight vectors and one activation vector in the sixteen AVX2 registers.

use half::{bf16, f16};
use std::arch::x86_64::*;

pub fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// A weight element type the tiles can widen eight at a time.
pub trait Elem: Copy {
    /// # Safety
    /// Eight elements must be readable at `p`; the CPU must have AVX2, FMA and F16C.
    unsafe fn load8_avx2(p: *const Self) -> __m256;
}

impl Elem for f32 {
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load8_avx2(p: *const f32) -> __m256 {
        // SAFETY: the caller guarantees eight readable f32 at p; loadu needs no alignment.
        unsafe { _mm256_loadu_ps(p) }
    }
}

impl Elem for bf16 {
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load8_avx2(p: *const bf16) -> __m256 {
        // SAFETY: the caller guarantees eight readable bf16 (16 bytes) at p; loadu needs no alignment.
        let h = unsafe { _mm_loadu_si128(p as *const __m128i) };
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
    }
}

impl Elem for f16 {
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load8_avx2(p: *const f16) -> __m256 {
        // SAFETY: the caller guarantees eight readable f16 (16 bytes) at p; loadu needs no alignment.
        _mm256_cvtph_ps(unsafe { _mm_loadu_si128(p as *const __m128i) })
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// `out[r][t] = Σ_k w[r][k] · x[t][k]` over `n` values.
///
/// # Safety
/// Every `w[r]` and `x[t]` points at `n` readable elements; the CPU has AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_raw<W: super::matmul::WeightElem, const R: usize, const T: usize>(
    w: [*const W; R],
    x: [*const f32; T],
    n: usize,
) -> [[f32; T]; R] {
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    let mut i = 0;
    while i + 8 <= n {
        let mut wv = [_mm256_setzero_ps(); R];
        for r in 0..R {
            // SAFETY: i + 8 <= n.
            wv[r] = unsafe { W::load8_avx2(w[r].add(i)) };
        }
        for t in 0..T {
            // SAFETY: i + 8 <= n.
            let xv = unsafe { _mm256_loadu_ps(x[t].add(i)) };
            for r in 0..R {
                acc[r][t] = _mm256_fmadd_ps(wv[r], xv, acc[r][t]);
            }
        }
        i += 8;
    }
    let mut out = [[0f32; T]; R];
    for r in 0..R {
        for t in 0..T {
            out[r][t] = hsum(acc[r][t]);
        }
    }
    if i < n {
        for r in 0..R {
            for t in 0..T {
                for k in i..n {
                    // SAFETY: k < n.
                    let (wk, xk) = unsafe { (*w[r].add(k), *x[t].add(k)) };
                    out[r][t] += wk.to_f32() * xk;
                }
            }
        }
    }
    out
}

/// Safe wrapper: checks lengths and CPU features, then runs the tile.
#[inline]
pub fn tile<W: super::matmul::WeightElem, const R: usize, const T: usize>(
    w: [&[W]; R],
    x: [&[f32]; T],
) -> [[f32; T]; R] {
    let n = x[0].len();
    assert!(w.iter().all(|r| r.len() == n) && x.iter().all(|r| r.len() == n));
    assert!(has_avx2());
    // SAFETY: every row holds n elements (checked above), and the features were just checked.
    unsafe { tile_raw::<W, R, T>(w.map(|r| r.as_ptr()), x.map(|r| r.as_ptr()), n) }
}
