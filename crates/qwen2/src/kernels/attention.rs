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

/// Consecutive new tokens handled together by one task of a prefill: each block of key and value rows
/// is brought into L1 once for all of them instead of once per token. One token's results do not
/// depend on the others in its tile: its sums run in the same order either way (a test checks the bits).
/// On a 2-core Zen 3 VM the last 256 tokens of a 3072-token prompt (criterion,
/// `attention/prefill/256_after_2816`) took 691 ms instead of 837 (1.21×), 128 tokens from an empty
/// cache 1.06×, decode level; whole prefills of a 3000-token prompt, old and new binary alternated,
/// 1.02–1.06× (attention is about a third of them).
const QUERY_TILE: usize = 8;

/// `q`: `t × (n_heads·head_dim)` for the new tokens (already rotated); `k_cache`/`v_cache`: this layer's
/// cache, KV-head-major (head `h`, position `p` at `(h · capacity + p) · head_dim`, see `KvCache`), holding
/// positions `0..start+t`. Token `i` attends to positions `0..=start+i`. Writes `t × (n_heads·head_dim)`
/// into `out`.
pub fn attention(q: &[f32], k_cache: &[f32], v_cache: &[f32], s: &AttentionShape, out: &mut [f32]) {
    let hd = s.head_dim;
    let group = s.n_heads / s.n_kv_heads;
    let qd = s.n_heads * hd;
    let t = out.len() / qd;
    let cache = |kvh: usize, len: usize| {
        let at = kvh * s.capacity * hd;
        (&k_cache[at..][..len * hd], &v_cache[at..][..len * hd])
    };
    if t < 2 * QUERY_TILE {
        // Decode and short runs: one task per (token, KV head), so that even a single token keeps every
        // thread busy. The query heads of a group are consecutive in `q` and `out`, and each key and
        // value row read serves all of them.
        super::pool::for_each_chunk_mut(out, group * hd, |idx, o| {
            let len = s.start + idx / s.n_kv_heads + 1;
            let (k, v) = cache(idx % s.n_kv_heads, len);
            let queries = Queries {
                q: &q[idx * group * hd..][..group * hd],
                stride: group * hd,
                tokens: 1,
                first_len: len,
                group,
                hd,
            };
            attend(&queries, k, v, o);
        });
        return;
    }
    // Prefill: one task per tile of tokens, over every KV head in turn.
    super::pool::for_each_chunk_mut(out, QUERY_TILE * qd, |tile, o| {
        let first = tile * QUERY_TILE;
        let tokens = o.len() / qd;
        let first_len = s.start + first + 1;
        for kvh in 0..s.n_kv_heads {
            let (k, v) = cache(kvh, first_len + tokens - 1);
            let queries = Queries {
                q: &q[first * qd + kvh * group * hd..],
                stride: qd,
                tokens,
                first_len,
                group,
                hd,
            };
            attend(&queries, k, v, &mut o[kvh * group * hd..]);
        }
    });
}

/// The query heads of one KV head for consecutive new tokens: token `j`'s `group` heads, `hd` values
/// each, at `q[j · stride..]`; it attends to the first `first_len + j` positions.
struct Queries<'a> {
    q: &'a [f32],
    stride: usize,
    tokens: usize,
    first_len: usize,
    group: usize,
    hd: usize,
}

impl Queries<'_> {
    /// Positions the last token attends to: the rows of `k` and `v` in use, and a score row's length.
    fn longest(&self) -> usize {
        self.first_len + self.tokens - 1
    }

    /// Query head `h` of token `j`.
    fn head(&self, j: usize, h: usize) -> &[f32] {
        &self.q[j * self.stride + h * self.hd..][..self.hd]
    }
}

/// Attention of `qs` over the key and value rows `k` and `v` of their KV head; token `j`'s output heads
/// go where its queries are in `q`, at `out[j · stride..]`.
fn attend(qs: &Queries, k: &[f32], v: &[f32], out: &mut [f32]) {
    let (hd, group, longest) = (qs.hd, qs.group, qs.longest());
    let scale = 1.0 / (hd as f32).sqrt();
    // scores[(j · group + h) · longest + p]: query head h of token j against position p (p < its
    // length; the rest of a row is never read). A prefill tile's scores are a few hundred KiB over a
    // long cache: kept per thread rather than allocated per task, which handed fresh pages to the
    // kernel to zero each time. A thread keeps the largest it has needed: 1.7 MiB after a prompt of
    // 8,000 tokens (eight tokens × seven heads × 8,000 positions), at most 7 MiB at 32,768.
    SCORES.with_borrow_mut(|scores| {
        let need = qs.tokens * group * longest;
        if scores.len() < need {
            scores.resize(need, 0.0);
        }
        let scores = &mut scores[..need];
        match hd {
            64 => scores_of::<8>(qs, k, scale, scores),
            128 => scores_of::<16>(qs, k, scale, scores),
            _ => {
                for j in 0..qs.tokens {
                    for (p, k) in k.chunks_exact(hd).take(qs.first_len + j).enumerate() {
                        for h in 0..group {
                            scores[(j * group + h) * longest + p] = dot(k, qs.head(j, h)) * scale;
                        }
                    }
                }
            }
        }
        for (row, a) in scores.chunks_exact_mut(longest).enumerate() {
            softmax(&mut a[..qs.first_len + row / group]);
        }
        weighted_values(qs, scores, v, out);
    });
}

thread_local! {
    /// [`attend`]'s scores, kept for the thread's next call.
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The scores of [`attend`] for key rows of `8 · N` values (the common head sizes, 64 and 128, get loops
/// the compiler unrolls, with no bounds checks inside).
///
/// Eight positions at a time: each head's eight dot products are eight independent chains of
/// multiply-adds over the eight key rows (2 KiB at head size 64, so every head and token after the
/// first reads them from L1), and one reduction ([`sum_each`]) turns the eight accumulators into eight sums. A
/// token's last positions short of a block of eight are summed one at a time. One position at a time
/// throughout needed a horizontal sum per score: over a 3037-token cache, 24 layers' attention for one
/// decode token took 1.8× as long (with the value blocks below; A/B in one process).
fn scores_of<const N: usize>(qs: &Queries, k: &[f32], scale: f32, scores: &mut [f32]) {
    let (group, longest) = (qs.group, qs.longest());
    let q: Vec<[f32x8; N]> = (0..qs.tokens * group)
        .map(|i| {
            let qh = qs.head(i / group, i % group);
            std::array::from_fn(|c| load8(&qh[8 * c..]) * f32x8::splat(scale))
        })
        .collect();
    // Token j's scores against the key rows `rows`, positions from p0, one position at a time.
    let one_by_one = |j: usize, p0: usize, rows: &[f32], scores: &mut [f32]| {
        for (p, k) in rows.chunks_exact(8 * N).enumerate() {
            for (h, q) in q[j * group..][..group].iter().enumerate() {
                let mut acc = f32x8::ZERO;
                for (c, q) in q.iter().enumerate() {
                    acc = load8(&k[8 * c..]).mul_add(*q, acc);
                }
                scores[(j * group + h) * longest + p0 + p] = acc.reduce_add();
            }
        }
    };
    #[cfg(target_arch = "x86_64")]
    let avx512 = super::float_x86::use_avx512();
    let mut blocks = k.chunks_exact(64 * N);
    for (b, block) in blocks.by_ref().enumerate() {
        let p0 = 8 * b;
        for j in 0..qs.tokens {
            let len = qs.first_len + j;
            if p0 + 8 > len {
                one_by_one(j, p0, &block[..len.saturating_sub(p0) * 8 * N], scores);
                continue;
            }
            let (q, out) = (&q[j * group..][..group], &mut scores[j * group * longest..]);
            #[cfg(target_arch = "x86_64")]
            if avx512 {
                // SAFETY: the CPU has AVX-512 F (`use_avx512`).
                unsafe { block_scores_avx512(block, q, out, longest, p0) };
                continue;
            }
            block_scores(block, q, out, longest, p0);
        }
    }
    // The rows after the last whole block of eight, which only the last tokens reach.
    let p0 = longest - blocks.remainder().len() / (8 * N);
    for j in 0..qs.tokens {
        let len = qs.first_len + j;
        let rows = &blocks.remainder()[..len.saturating_sub(p0) * 8 * N];
        one_by_one(j, p0, rows, scores);
    }
}

/// Each head's scores (`q`, one `[f32x8; N]` per head, already scaled) against one block of eight key
/// rows of `8 · N` values, written to `out[h · longest + p0..][..8]`: eight independent chains of
/// multiply-adds, one per row, then [`sum_each`] for the eight sums.
fn block_scores<const N: usize>(
    block: &[f32],
    q: &[[f32x8; N]],
    out: &mut [f32],
    longest: usize,
    p0: usize,
) {
    let rows: [&[f32]; 8] = std::array::from_fn(|r| &block[8 * N * r..][..8 * N]);
    for (h, q) in q.iter().enumerate() {
        let mut acc = [f32x8::ZERO; 8];
        for (c, q) in q.iter().enumerate() {
            for (acc, k) in acc.iter_mut().zip(&rows) {
                *acc = load8(&k[8 * c..]).mul_add(*q, *acc);
            }
        }
        out[h * longest + p0..][..8].copy_from_slice(&sum_each(acc).to_array());
    }
}

/// [`block_scores`] in 512-bit vectors: two key rows to a vector (row 2i's eight values of a chunk in
/// the low half, row 2i + 1's in the high half, each query chunk in both), so four chains of
/// multiply-adds do the work of eight and each lane sums the same products in the same order: the same
/// bits. The paired rows are put together once per block and serve every head. Attention alone, 24
/// layers at the default model's shape, alternated in one process on a 2-core Xeon VM (AVX-512), with
/// the weighted sum's heads in pairs ([`values_pair_avx512`]) as well: the last 256 tokens of a
/// 3072-token prompt 1.32× and 1.44× as fast as with neither (the pairs alone 1.18× and 1.22×); a
/// decode token after 511 positions 1.22× and 1.20×, after 2047 1.09× and 1.08×, after 4095 1.00× and
/// 1.02× (there the memory bounds it); these scores alone after 511 positions 1.06× and 1.08×. Whole
/// generations of the default model after a 2900-token prompt, binaries before and after alternated
/// seven times: the prompt 1.15× as fast (median; 1.00–1.54×), the 64 tokens after it 1.03×, the
/// same text every time. CPUs without AVX-512 keep the 256-bit loop.
///
/// # Safety
/// The CPU has AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn block_scores_avx512<const N: usize>(
    block: &[f32],
    q: &[[f32x8; N]],
    out: &mut [f32],
    longest: usize,
    p0: usize,
) {
    use std::arch::x86_64::*;
    assert!(block.len() >= 64 * N);
    assert!(q.is_empty() || out.len() >= (q.len() - 1) * longest + p0 + 8);
    let kp = block.as_ptr();
    // SAFETY: rows 2i and 2i + 1 of the block (asserted), eight values from 8c < 8N each.
    let pair = |i: usize, c: usize| unsafe {
        let low = _mm512_castps256_ps512(_mm256_loadu_ps(kp.add(16 * N * i + 8 * c)));
        let high = _mm256_castps_pd(_mm256_loadu_ps(kp.add(16 * N * i + 8 * N + 8 * c)));
        _mm512_castpd_ps(_mm512_insertf64x4::<1>(_mm512_castps_pd(low), high))
    };
    let rows: [[__m512; N]; 4] = std::array::from_fn(|i| std::array::from_fn(|c| pair(i, c)));
    for (h, qh) in q.iter().enumerate() {
        let mut acc = [_mm512_setzero_ps(); 4];
        for (c, qc) in qh.iter().enumerate() {
            // SAFETY: the chunk's eight f32.
            let qc = unsafe { _mm256_loadu_pd(qc.as_array_ref().as_ptr() as *const f64) };
            let qq = _mm512_castpd_ps(_mm512_broadcast_f64x4(qc));
            for (a, r) in acc.iter_mut().zip(&rows) {
                *a = _mm512_fmadd_ps(r[c], qq, *a);
            }
        }
        let halves: [f32x8; 8] = std::array::from_fn(|r| {
            let v = acc[r / 2];
            let half = if r % 2 == 0 {
                _mm512_castps512_ps256(v)
            } else {
                _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)))
            };
            // SAFETY: both are 32 bytes holding eight f32 lanes in order.
            unsafe { std::mem::transmute::<__m256, f32x8>(half) }
        });
        out[h * longest + p0..][..8].copy_from_slice(&sum_each(halves).to_array());
    }
}

/// Lane `j` of the result is the sum of the lanes of `v[j]`, as `((l0 + l1) + (l2 + l3)) + ((l4 + l5) +
/// (l6 + l7))`.
///
/// Where the build has AVX, by adding neighbours: each step shuffles the even and the odd lanes of two
/// vectors apart and adds them, three steps and one exchange of halves, 14 shuffles where the transpose
/// ([`sum_each_transposed`], the reference and the fallback) takes 24, for the same tree of additions
/// and so the same bits. Attention alone, 24 layers at the default model's shape, alternated in one
/// process on a 2-core Xeon VM: a decode token after 511 positions 1.073× and 1.050× as fast, after
/// 4095 1.088× and 1.065×, the last 256 tokens of a 3072-token prompt 1.151× and 1.145×; with the
/// AVX-512 kernels switched off (`DUET_BACKEND=avx2`, the 256-bit scores) 1.04–1.10×. Whole prefills
/// of a 2900-token prompt (attention about a third of them) did not show it through that host's noise:
/// twenty pairs of binaries alternated, medians 0.93× and 1.02×. Not measured on an AMD host.
#[inline]
fn sum_each(v: [f32x8; 8]) -> f32x8 {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx"))]
    {
        use std::arch::x86_64::*;
        // SAFETY: both are eight f32 lanes in order, 32 bytes each.
        let v = unsafe { std::mem::transmute::<[f32x8; 8], [__m256; 8]>(v) };
        // Per 128-bit half: [a0 + a1, a2 + a3, b0 + b1, b2 + b3].
        // SAFETY: the build has AVX (cfg above).
        let pairs = |a: __m256, b: __m256| unsafe {
            _mm256_add_ps(
                _mm256_shuffle_ps::<0x88>(a, b),
                _mm256_shuffle_ps::<0xDD>(a, b),
            )
        };
        // Halves: the sums of lanes 0-3 (low) and 4-7 (high) of rows 0-3, then of rows 4-7.
        let first = pairs(pairs(v[0], v[1]), pairs(v[2], v[3]));
        let second = pairs(pairs(v[4], v[5]), pairs(v[6], v[7]));
        // SAFETY: as above.
        let sums = unsafe {
            _mm256_add_ps(
                _mm256_permute2f128_ps::<0x20>(first, second),
                _mm256_permute2f128_ps::<0x31>(first, second),
            )
        };
        // SAFETY: as above.
        unsafe { std::mem::transmute::<__m256, f32x8>(sums) }
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx")))]
    sum_each_transposed(v)
}

/// [`sum_each`] by a transpose: eight vectors of one lane each, added in the same tree.
#[cfg(any(test, not(all(target_arch = "x86_64", target_feature = "avx"))))]
#[inline]
fn sum_each_transposed(v: [f32x8; 8]) -> f32x8 {
    let t = f32x8::transpose(v);
    ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]))
}

/// Positions per block of the weighted sum: a block's value rows (16 KiB at head size 64) stay in L1
/// while every head of the group goes over them (and every token of a prefill tile), so each is read
/// from memory once per token, or per tile.
const VALUE_BLOCK: usize = 64;

/// `out[j][h] = Σ_p a[j][h][p] · v[p]` for the tokens and heads of `qs` (`a` the softmaxed `scores` of
/// [`attend`], `out` laid out as `qs.q`), where `v[p]` is `v[p · hd..][..hd]`.
///
/// Block by block of [`VALUE_BLOCK`] positions, token by token, head by head, up to 64 output values in
/// eight vector accumulators: per position one broadcast weight and eight independent multiply-adds with
/// value vectors from L1. Each head's sums run over the positions in order, carried from block to block
/// in `out`.
fn weighted_values(qs: &Queries, a: &[f32], v: &[f32], out: &mut [f32]) {
    let (hd, group, longest) = (qs.hd, qs.group, qs.longest());
    for j in 0..qs.tokens {
        out[j * qs.stride..][..group * hd].fill(0.0);
    }
    #[cfg(target_arch = "x86_64")]
    let avx512 = super::float_x86::use_avx512();
    for p0 in (0..longest).step_by(VALUE_BLOCK) {
        for j in 0..qs.tokens {
            let len = qs.first_len + j;
            if p0 >= len {
                continue;
            }
            let ps = p0..(p0 + VALUE_BLOCK).min(len);
            let vb = &v[p0 * hd..ps.end * hd];
            let o = &mut out[j * qs.stride..][..group * hd];
            let a = &a[j * group * longest..][..group * longest];
            // Two heads at a time where the CPU has AVX-512: each value vector loaded serves both.
            #[cfg(target_arch = "x86_64")]
            if avx512 && hd.is_multiple_of(64) {
                let mut heads = a.chunks_exact(longest).zip(o.chunks_exact_mut(hd));
                while let Some((a0, o0)) = heads.next() {
                    let (a0, mut second) = (&a0[ps.clone()], heads.next());
                    for c in (0..hd).step_by(64) {
                        // SAFETY: the CPU has AVX-512 F (`use_avx512`).
                        unsafe {
                            match second.as_mut() {
                                Some((a1, o1)) => {
                                    values_pair_avx512(a0, &a1[ps.clone()], vb, hd, o0, o1, c)
                                }
                                None => values_block_avx512(a0, vb, hd, o0, c),
                            }
                        }
                    }
                }
                continue;
            }
            for (ah, oh) in a.chunks_exact(longest).zip(o.chunks_exact_mut(hd)) {
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

/// [`values_block_avx512`] for two heads' weights `a0` and `a1` and outputs `o0` and `o1`: each value
/// vector loaded once serves both heads, and the eight accumulators make eight independent chains where
/// one head has four. Each head's sums run as in [`values_block_avx512`]: the same bits. Measured with
/// [`block_scores_avx512`].
///
/// # Safety
/// The CPU has AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn values_pair_avx512(
    a0: &[f32],
    a1: &[f32],
    vb: &[f32],
    hd: usize,
    o0: &mut [f32],
    o1: &mut [f32],
    c: usize,
) {
    use std::arch::x86_64::*;
    let (o0, o1) = (&mut o0[c..c + 64], &mut o1[c..c + 64]);
    assert!(c + 64 <= hd && a0.len() == a1.len() && vb.len() >= a0.len() * hd);
    // SAFETY: 64 floats of each output.
    let mut acc: [[__m512; 4]; 2] = std::array::from_fn(|h| {
        let o = if h == 0 { &*o0 } else { &*o1 };
        std::array::from_fn(|j| unsafe { _mm512_loadu_ps(o[16 * j..].as_ptr()) })
    });
    for ((&w0, &w1), v) in a0.iter().zip(a1).zip(vb.chunks_exact(hd)) {
        let (w0, w1, v) = (_mm512_set1_ps(w0), _mm512_set1_ps(w1), &v[c..c + 64]);
        for j in 0..4 {
            // SAFETY: 16 floats of the row's 64 (`v`).
            let x = unsafe { _mm512_loadu_ps(v[16 * j..].as_ptr()) };
            acc[0][j] = _mm512_fmadd_ps(x, w0, acc[0][j]);
            acc[1][j] = _mm512_fmadd_ps(x, w1, acc[1][j]);
        }
    }
    for (o, acc) in [o0, o1].into_iter().zip(acc) {
        for (j, acc) in acc.iter().enumerate() {
            // SAFETY: 16 floats of the output's 64.
            unsafe { _mm512_storeu_ps(o[16 * j..].as_mut_ptr(), *acc) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test values spread over [-2, 2), the same for the same index.
    fn spread(i: usize) -> f32 {
        ((i * 7919 + 13) % 1013) as f32 / 1013.0 * 4.0 - 2.0
    }

    /// The bit patterns of `x`, for comparisons that must be exact.
    fn bits(x: &[f32]) -> Vec<u32> {
        x.iter().map(|v| v.to_bits()).collect()
    }

    /// The 512-bit weighted sum gives the portable one's bits: blocks of one to `VALUE_BLOCK` positions,
    /// head sizes 64 and 128, the output carried in from a block before.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn values_in_512_bits_have_the_portable_bits() {
        if !super::super::float_x86::use_avx512() {
            eprintln!("no AVX-512 here: the 512-bit weighted sum is not exercised");
            return;
        }
        for (hd, len) in [(64, 1), (64, 37), (128, VALUE_BLOCK)] {
            let a: Vec<f32> = (0..len).map(|i| spread(i + 5) / 2.0 + 1.0).collect();
            let v: Vec<f32> = (0..len * hd).map(|i| spread(i + 99)).collect();
            let carried: Vec<f32> = (0..hd).map(|i| spread(i + 7)).collect();
            for c in (0..hd).step_by(64) {
                let (mut portable, mut wide) = (carried.clone(), carried.clone());
                values_block::<8>(&a, &v, hd, &mut portable, c);
                // SAFETY: AVX-512 F is present (checked above).
                unsafe { values_block_avx512(&a, &v, hd, &mut wide, c) };
                assert_eq!(bits(&portable), bits(&wide), "hd {hd} len {len} c {c}");
            }
        }
    }

    /// The 512-bit scores give the 256-bit ones' bits, at head sizes 64 and 128, for seven heads.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn scores_in_512_bits_have_the_portable_bits() {
        if !super::super::float_x86::use_avx512() {
            eprintln!("no AVX-512 here: the 512-bit scores are not exercised");
            return;
        }
        fn check<const N: usize>() {
            let block: Vec<f32> = (0..64 * N).map(|i| spread(i + 3)).collect();
            let q: Vec<[f32x8; N]> = (0..7)
                .map(|h| {
                    std::array::from_fn(|c| {
                        f32x8::from(
                            [0, 1, 2, 3, 4, 5, 6, 7].map(|l| spread(h * 64 * N + 8 * c + l + 11)),
                        )
                    })
                })
                .collect();
            let (longest, p0) = (37, 16);
            let (mut portable, mut wide) = (vec![0f32; 7 * longest], vec![0f32; 7 * longest]);
            block_scores(&block, &q, &mut portable, longest, p0);
            // SAFETY: AVX-512 F is present (checked above).
            unsafe { block_scores_avx512(&block, &q, &mut wide, longest, p0) };
            assert_eq!(bits(&portable), bits(&wide), "head size {}", 8 * N);
            assert!(portable.iter().filter(|v| **v != 0.0).count() == 7 * 8);
        }
        check::<8>();
        check::<16>();
    }

    /// The neighbour-adding sums give the transpose's bits: values of many magnitudes, where another
    /// order of additions rounds differently.
    #[test]
    fn sums_of_lanes_have_the_transposes_bits() {
        let f = |i: usize| spread(i) * 10f32.powi((i % 9) as i32 - 4);
        for round in 0..50 {
            let v: [f32x8; 8] = std::array::from_fn(|r| {
                f32x8::from([0, 1, 2, 3, 4, 5, 6, 7].map(|l| f(round * 64 + r * 8 + l)))
            });
            let bits = |x: f32x8| x.to_array().map(f32::to_bits);
            assert_eq!(
                bits(sum_each(v)),
                bits(sum_each_transposed(v)),
                "round {round}"
            );
        }
    }

    /// Two heads' weighted sums at once give each head's bits alone.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn value_pairs_have_each_heads_bits() {
        if !super::super::float_x86::use_avx512() {
            eprintln!("no AVX-512 here: the paired weighted sum is not exercised");
            return;
        }
        for (hd, len) in [(64, 1), (64, 37), (128, VALUE_BLOCK)] {
            let a0: Vec<f32> = (0..len).map(|i| spread(i + 5) / 2.0 + 1.0).collect();
            let a1: Vec<f32> = (0..len).map(|i| spread(i + 500) / 2.0 + 1.0).collect();
            let v: Vec<f32> = (0..len * hd).map(|i| spread(i + 99)).collect();
            let c0: Vec<f32> = (0..hd).map(|i| spread(i + 7)).collect();
            let c1: Vec<f32> = (0..hd).map(|i| spread(i + 77)).collect();
            for c in (0..hd).step_by(64) {
                let (mut alone0, mut alone1) = (c0.clone(), c1.clone());
                let (mut pair0, mut pair1) = (c0.clone(), c1.clone());
                // SAFETY: AVX-512 F is present (checked above).
                unsafe {
                    values_block_avx512(&a0, &v, hd, &mut alone0, c);
                    values_block_avx512(&a1, &v, hd, &mut alone1, c);
                    values_pair_avx512(&a0, &a1, &v, hd, &mut pair0, &mut pair1, c);
                }
                assert_eq!(bits(&alone0), bits(&pair0), "hd {hd} len {len} c {c}");
                assert_eq!(bits(&alone1), bits(&pair1), "hd {hd} len {len} c {c}");
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

    /// A token's output in a prefill's tiles of tokens has the bits it has alone, as decode computes it:
    /// tiles of whole and partial length, head sizes with and without their own score kernels, after
    /// caches that end inside and at the end of a block of eight positions.
    #[test]
    fn tiles_of_tokens_give_each_token_its_bits_alone() {
        #[cfg(not(miri))]
        let (heads, tokens) = (
            [(14, 2, 64), (4, 4, 128), (4, 2, 80)],
            [(0, 2 * QUERY_TILE), (37, 2 * QUERY_TILE + 5), (64, 41)],
        );
        #[cfg(miri)]
        let (heads, tokens) = ([(2, 1, 64)], [(3, 2 * QUERY_TILE + 1)]);
        for (n_heads, n_kv_heads, head_dim) in heads {
            for (start, t) in tokens {
                let capacity = start + t + 3;
                let kv = capacity * n_kv_heads * head_dim;
                let qd = n_heads * head_dim;
                let q: Vec<f32> = (0..t * qd).map(spread).collect();
                let k: Vec<f32> = (0..kv).map(|i| spread(i + 101)).collect();
                let v: Vec<f32> = (0..kv).map(|i| spread(i + 577)).collect();
                let shape = |start| AttentionShape {
                    n_heads,
                    n_kv_heads,
                    head_dim,
                    start,
                    capacity,
                };
                let mut tiled = vec![f32::NAN; t * qd];
                attention(&q, &k, &v, &shape(start), &mut tiled);
                for i in 0..t {
                    let mut alone = vec![f32::NAN; qd];
                    let qi = &q[i * qd..][..qd];
                    attention(qi, &k, &v, &shape(start + i), &mut alone);
                    assert_eq!(
                        bits(&tiled[i * qd..][..qd]),
                        bits(&alone),
                        "heads {n_heads}/{n_kv_heads} hd {head_dim} start {start} t {t} token {i}"
                    );
                }
            }
        }
    }

    /// Head sizes with their own score kernels (64, 128) and without (80: a tail of values too),
    /// groups of one to seven heads (value blocks of one to four heads), several tokens after a
    /// cached prefix.
    #[test]
    fn matches_the_definition() {
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
            [(0, 1), (0, 5), (37, 3), (150, 15), (0, 16), (150, 37)],
        );
        // Miri is far too slow for the full list: each path once.
        #[cfg(miri)]
        let (heads, tokens) = ([(14, 2, 64), (4, 4, 128), (4, 2, 80)], [(0, 1), (3, 2)]);
        for (n_heads, n_kv_heads, head_dim) in heads {
            for (start, t) in tokens {
                // Room for a few positions more than are used: the heads' rows are `capacity` apart.
                let capacity = start + t + 3;
                let kv = capacity * n_kv_heads * head_dim;
                let q: Vec<f32> = (0..t * n_heads * head_dim).map(spread).collect();
                let k: Vec<f32> = (0..kv).map(|i| spread(i + 101)).collect();
                let v: Vec<f32> = (0..kv).map(|i| spread(i + 577)).collect();
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
