//! AVX2 + FMA tiles for weights stored as f32, bf16 or f16: `R` weight rows × `T` tokens of dot
//! products, all accumulated in f32; and the packed GEMM of prefill, in AVX2 or, where the CPU has it,
//! AVX-512 (twice the lanes and registers: the same sums in the same order, so the same bits).
//!
//! Weights are widened to f32 in registers, exactly: bf16 is the top half of an f32 (zero-extend each
//! 16-bit value to 32 bits and shift left by 16), f16 goes through F16C's `vcvtph2ps`. Decode of bf16
//! rows on AVX-512 widens a whole line at once instead (`dot_bf16_avx512`). Each weight vector
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
    /// bf16, whose decode rows on AVX-512 go through `dot_bf16_avx512`.
    const BF16: bool = false;
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
    const BF16: bool = true;
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

/// Whether decode's prefetch of the next row is non-temporal (`NTA`) rather than into every cache
/// level (`T0`): on AMD CPUs only. The hint keeps weights, read once per token, from displacing what
/// is reused (the activations, the KV cache): on a 2-core Zen 3 VM the F32 directory decoded 1.062× and
/// 1.054× as fast with it (11 of 16 and 16 of 24 pairs faster, alternated in one process). On a 2-core
/// Xeon VM (AVX-512, AMX) it did the opposite: the dequantized default model's F32 decode ran 1.51× and
/// 1.40× as fast with `T0` (medians of 12 rounds of 4 tokens, alternated in one process, host busy);
/// `NTA` was the fastest of three variants (it, `T0`, `T0` with a second FMA chain) in 1 and 2 of the
/// 12 rounds. The quantized eight-row decode kernel (`rows8`) follows the same rule, measured there too.
/// The F32 row itself has since gone without a hint on Zen 3 and later ([`f32_row_hint`]).
pub(crate) fn decode_prefetch_nta() -> bool {
    static NTA: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *NTA.get_or_init(|| {
        // Leaf 0 names the vendor in ebx, edx, ecx: "AuthenticAMD" (ebx = "Auth").
        let leaf0 = __cpuid(0);
        leaf0.ebx.to_le_bytes() == *b"Auth" && leaf0.ecx.to_le_bytes() == *b"cAMD"
    })
}

/// How the F32 decode row ([`dot_f32_decode`]) asks for the lines ahead of the one it reads.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum F32RowHint {
    /// It does not: the hardware prefetchers alone. AMD Zen 3 and later (family 19h on).
    None,
    /// The same place in the next row, non-temporal. Earlier AMD CPUs ([`decode_prefetch_nta`]).
    NextNta,
    /// The same place in the next row into L1 (`T0`) and two rows ahead into L2 (`T1`). Elsewhere.
    NextT0FarT1,
}

/// The [`F32RowHint`] for this CPU ([`decode_cpu`]).
///
/// On a 2-core Zen 3 VM (family 19h), whole F32 decodes of the default model alternated in one process
/// (a build with the hint switchable at run time, 128 tokens a round): without a hint 1.196× as fast
/// as with `NTA` on the next row over eight rounds (1.17–1.31×, eight of eight faster) and 1.27× over
/// five more (five of five), where `T0` on the next row ran 1.09× and `T1` 1.06×; in `duet bench
/// --dtype f32`, alternated twice, 89–91 % of the bandwidth probe against 69–71 %. The same host
/// measured the opposite for the other decode streams, in the same session: the 16-bit rows without
/// their `NTA` 0.935×, the interleaved quantized groups without their two hints 0.75×, the Q4_K/Q6_K
/// rows without theirs 0.97×. On a Xeon the F32 row without a hint had run 0.66× (see
/// [`dot_f32_decode`]); no Zen 1 or Zen 2 CPU has been measured without one, so they keep `NTA`.
pub(crate) fn f32_row_hint() -> F32RowHint {
    match decode_cpu() {
        DecodeCpu::NotAmd => F32RowHint::NextT0FarT1,
        DecodeCpu::AmdBeforeZen3 => F32RowHint::NextNta,
        DecodeCpu::AmdZen3On => F32RowHint::None,
    }
}

/// The kinds of CPU the decode rows' rules ([`f32_row_hint`], [`half_row_loop`], [`amd_zen3_on`])
/// tell apart.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum DecodeCpu {
    /// Not AMD ([`decode_prefetch_nta`] false).
    NotAmd,
    /// AMD before family 19h (Zen 1 and 2).
    AmdBeforeZen3,
    /// AMD family 19h or later (Zen 3 on).
    AmdZen3On,
}

/// This CPU's [`DecodeCpu`], looked up once.
fn decode_cpu() -> DecodeCpu {
    static CPU: std::sync::OnceLock<DecodeCpu> = std::sync::OnceLock::new();
    *CPU.get_or_init(|| {
        if !decode_prefetch_nta() {
            return DecodeCpu::NotAmd;
        }
        // Leaf 1's eax: the base family in bits 8–11, plus the extended family (bits 20–27) when
        // the base is 0xF, as every AMD family since the K8 has it.
        let eax = __cpuid(1).eax;
        let family = ((eax >> 8) & 0xF) + ((eax >> 20) & 0xFF);
        if family >= 0x19 {
            DecodeCpu::AmdZen3On
        } else {
            DecodeCpu::AmdBeforeZen3
        }
    })
}

/// Whether this CPU is AMD Zen 3 or later ([`decode_cpu`]), where the decode's written-out loops were
/// measured (`quantized_x86::q8_0_groups_written`).
pub(crate) fn amd_zen3_on() -> bool {
    decode_cpu() == DecodeCpu::AmdZen3On
}

/// How the AVX2 decode row of 16-bit weights ([`dot_raw`]) walks its row and asks for the next.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum HalfRowLoop {
    /// Written out in asm a 64-byte line a pass ([`half_line_loop`]), asking for the line two rows
    /// ahead into L2 (`T1`). Everywhere but on AMD.
    WrittenFarT1,
    /// The same loop asking for the same place in the next row, `NTA`. AMD before Zen 3.
    WrittenNextNta,
    /// Written out in asm two vectors (sixteen values) a pass ([`half_pair_loop`]), asking for the
    /// same place in the next row (`NTA`) every other pass. AMD Zen 3 and later.
    WrittenPairsNextNta,
}

/// The [`HalfRowLoop`] for this CPU ([`decode_cpu`]).
///
/// On a 2-core Zen 3 VM, whole BF16 decodes of the default model (128 tokens) alternated in one
/// process, a build with both switchable at run time, against the written-out loop with the
/// activations as they came: the compiled loop (sixteen values a pass from intrinsics, the hint
/// behind a test of the index) with them 64-byte aligned ([`decode_acts`]) 1.090× (8 of 8 rounds
/// faster), 1.061× (6 of 6) and 1.034× (10 of 12), where the aligned activations alone ran 1.035× and
/// 1.015×. That compiled loop was then written out as [`half_pair_loop`], in the shape a C compiler
/// gave the same loop, which kept the memory's pace in a harness where the compiled one did not (see
/// [`half_pair_loop`]); whole decodes, build against build: 1.055× (8 of 8), and 1.054× with the
/// order reversed (8 of 8), though level an hour later (1.003×, 1.004×). Not measured on Zen 1 or 2,
/// which keep the one-line-a-pass loop.
pub(crate) fn half_row_loop() -> HalfRowLoop {
    match decode_cpu() {
        DecodeCpu::NotAmd => HalfRowLoop::WrittenFarT1,
        DecodeCpu::AmdBeforeZen3 => HalfRowLoop::WrittenNextNta,
        DecodeCpu::AmdZen3On => HalfRowLoop::WrittenPairsNextNta,
    }
}

/// Asks for the cache line at `at` ahead of decode's read of it: non-temporal where
/// [`decode_prefetch_nta`] chose so (passed in, so that it is looked up once per kernel call, not once
/// per line), else with `HINT`. The float tiles and `rows8` take `T0`. The interleaved quantized groups
/// do not follow this rule: on every CPU they ask for their lines far ahead into L2, with
/// [`pinned_prefetch_t1`] (see `quantized_x86::GROUP_PREFETCH_L2`), and nearer into L1, with
/// [`pinned_prefetch_t0`]. They had kept `NTA` on AMD CPUs with Zen 3's features (VAES) while a Zen 1
/// VM went without it (1.35× its default-model decode); measured on a 2-core Zen 3 VM since, whole
/// decodes alternated in one process (medians of six rounds of 128 tokens, a build with the rule
/// switchable at run time), the two hints ran 1.19× as fast as `NTA` for the default model (1.12–1.28×,
/// six of six faster) and 1.06× for `--dtype q8_0` (1.04–1.07×, six of six).
/// The F32 decode's row prefetch with `T1` instead of `T0` ran 1.031× and 1.039× as fast in one
/// process (12 of 12 rounds faster each) on a 2-core Xeon VM but 0.96–1.01× in `duet bench`
/// alternated with the `T0` build, so it kept `T0`; written out in asm since, it asks for both, at two
/// distances ([`dot_f32_decode`]).
#[inline]
pub(crate) fn decode_prefetch<const HINT: i32>(at: *const i8, nta: bool) {
    // SAFETY: SSE is part of every x86-64 CPU; a prefetch is a hint and never faults.
    unsafe {
        if nta {
            _mm_prefetch::<_MM_HINT_NTA>(at);
        } else {
            _mm_prefetch::<HINT>(at);
        }
    }
}

/// A `T1` prefetch of `at`, kept in its place: written as an `asm!` block that the
/// compiler must assume touches memory, so it can neither move the prefetch past the loads around it
/// nor gather several into a bunch. Where the prefetch of a line sits beside that line's loads
/// decides how fast a decode streams on Xeon (see `dot_bf16_avx512`): the compiler moved the four
/// prefetches of an interleaved Q8_0 block to the end of the block before, side by side.
#[inline(always)]
pub(crate) fn pinned_prefetch_t1(at: *const u8) {
    // SAFETY: a prefetch is a hint: it reads nothing the program sees and never faults, wherever `at`
    // points. The block is left free to touch memory only to keep its place among the loads.
    unsafe {
        std::arch::asm!("prefetcht1 [{0}]", in(reg) at, options(nostack, preserves_flags));
    }
}

/// A `T0` prefetch of `at`, kept in its place as [`pinned_prefetch_t1`] is: the near half of a decode
/// stream's two hints (see `quantized_x86::prefetch_group_line`).
#[inline(always)]
pub(crate) fn pinned_prefetch_t0(at: *const u8) {
    // SAFETY: a prefetch is a hint: it reads nothing the program sees and never faults, wherever `at`
    // points. The block is left free to touch memory only to keep its place among the loads.
    unsafe {
        std::arch::asm!("prefetcht0 [{0}]", in(reg) at, options(nostack, preserves_flags));
    }
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
    let line = 64 / std::mem::size_of::<W>();
    let nta = T == 1 && decode_prefetch_nta();
    while i + 8 <= n {
        // Decode streams the weights from DRAM once, `R` consecutive rows per tile (one, in `matmul`):
        // ask for the same place in the next tile's rows. On a 2-core Zen 3 VM, with one row per tile,
        // a 151936-row bf16 product went from 8 to ~15 GB/s (f32 from 12 to ~14); fixed 1-4 KiB
        // distances did worse; one more row ahead ran 0.965×. A prefetch is a hint and never faults,
        // so it may point past the matrix (`wrapping_add`). Which hint: see [`decode_prefetch_nta`].
        if T == 1 && i % line == 0 {
            for row in w {
                decode_prefetch::<_MM_HINT_T0>(row.wrapping_add(i + R * n) as *const i8, nta);
            }
        }
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

/// `Σ_k w[k] · x[k]` over `n` values for decode of 16-bit weights: one row streamed from memory.
///
/// Not `tile_raw::<1, 1>`: a single accumulator is one chain of FMAs, each waiting ~4 cycles for the
/// last, so eight bf16 weights per 4 cycles, ~12 GB/s a core, below what two cores can stream. Two
/// chains (even and odd vectors) read the model's bf16 decode products from DRAM at 25.8-26.7 GB/s
/// against 18.1-19.4 with one (A/B in one process, three runs, 2-core Zen 3 VM); the BF16 directory
/// decoded 1.27× and 1.09× faster (medians of 8 and 6 alternating runs; 7 and 6 faster), the whole pass
/// holding more than the products. F32 weights keep one chain: it moves 32 bytes per FMA, enough, and
/// with two the F32 directory decoded 0.90× and 0.89× as fast (two sets of 8 alternating runs).
///
/// The 16-bit rows (the only ones [`decode_dot`] sends here) go a 64-byte line a pass through
/// [`half_line_loop`], which asks for the line two rows ahead into L2 (`T1`), as
/// [`dot_bf16_avx512`] does. On a 2-core Xeon VM with the AVX-512 kernels switched off
/// (`DUET_BACKEND=avx2`), whole BF16 decodes of the default model (128 tokens, three per process,
/// processes alternated three times): the loop written out with the former prefetch (`T0`, the next
/// row) 1.01× the compiled loop, then `T1` two rows ahead 1.05–1.07× that, `T1` three rows ahead
/// 1.06–1.07×, `T0` two rows ahead 1.00–1.02×, `T1` the next row 0.95–0.96×. `duet bench --dtype
/// bf16` there, alternated with the build before three times: 33.1, 33.7, 33.5 against 31.4, 31.5,
/// 31.5 tok/s (87 % of the bandwidth probe against 82-83 %).
///
/// Except on AMD ([`decode_prefetch_nta`]), where it asks for the same place in the next row, `NTA`,
/// as the F32 decode does there: on a 2-core Zen 3 VM, whole BF16 decodes of the default model
/// alternated in one process (six rounds of 128 tokens, a build with the hint switchable at run time),
/// `NTA` the next row ran 1.10× as fast as `T1` two rows ahead (1.07–1.12×, six of six faster); `T1`
/// the next row 1.06×, `T0` the next row 1.05×, `NTA` two or three rows ahead 1.01×. And on Zen 3
/// and later, a loop of sixteen values a pass with the same hint once a line ran faster there
/// ([`half_pair_loop`], [`half_row_loop`]). `walk` says which.
///
/// # Safety
/// `w` and `x` point at `n` readable elements; the CPU has AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_raw<W: super::matmul::WeightElem>(
    w: *const W,
    x: *const f32,
    n: usize,
    walk: HalfRowLoop,
) -> f32 {
    let (mut even, mut odd) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let nta = walk != HalfRowLoop::WrittenFarT1;
    // Whole 64-byte lines of 16-bit weights first, written out (see `half_line_loop`), or on Zen 3
    // and later whole runs of sixteen values (see `half_pair_loop`); then the rest (and any other
    // weights) by the compiled loop below.
    let half = std::mem::size_of::<W>() == 2;
    let lines = if half && walk != HalfRowLoop::WrittenPairsNextNta {
        n / 32
    } else {
        0
    };
    if lines > 0 {
        // Which line to ask for, and how (`nta`: [`decode_prefetch_nta`]): see the doc above.
        let ahead = w.wrapping_add(if nta { n } else { 2 * n }) as *const u8;
        // SAFETY: `lines` whole lines of weights (32 values each) and their activations lie within the
        // rows (the caller's promise); AVX2, FMA and F16C are enabled for this function.
        (even, odd) = unsafe {
            if W::BF16 {
                half_line_loop!(bf16, w, x, ahead, nta, lines, even, odd)
            } else {
                half_line_loop!(f16, w, x, ahead, nta, lines, even, odd)
            }
        };
    }
    let mut i = lines * 32;
    // The loop counts values in 32 bits (see `half_pair_loop`): rows of 2³¹ values or more, which no
    // model has, go through the compiled loop below.
    if half && walk == HalfRowLoop::WrittenPairsNextNta && (16..1 << 31).contains(&n) {
        let pairs = n / 16;
        // The same place in the next row.
        let ahead = w.wrapping_add(n) as *const u8;
        // SAFETY: `pairs` runs of 16 values of weights and activations lie within the rows (the
        // caller's promise), 0 < 16 · pairs < 2³¹; AVX2, FMA and F16C are enabled for this function.
        (even, odd) = unsafe {
            if W::BF16 {
                half_pair_loop!(bf16, w, x, ahead, pairs, even, odd)
            } else {
                half_pair_loop!(f16, w, x, ahead, pairs, even, odd)
            }
        };
        i = pairs * 16;
    }
    let line = 64 / std::mem::size_of::<W>();
    while i + 16 <= n {
        // The same place in the next row, as in `tile_raw` (non-temporal on AMD).
        if i % line == 0 {
            decode_prefetch::<_MM_HINT_T0>(w.wrapping_add(i + n) as *const i8, nta);
        }
        // SAFETY: i + 16 <= n.
        unsafe {
            even = _mm256_fmadd_ps(W::load8_avx2(w.add(i)), _mm256_loadu_ps(x.add(i)), even);
            odd = _mm256_fmadd_ps(
                W::load8_avx2(w.add(i + 8)),
                _mm256_loadu_ps(x.add(i + 8)),
                odd,
            );
        }
        i += 16;
    }
    if i + 8 <= n {
        // SAFETY: i + 8 <= n.
        even = unsafe { _mm256_fmadd_ps(W::load8_avx2(w.add(i)), _mm256_loadu_ps(x.add(i)), even) };
        i += 8;
    }
    let mut s = hsum(_mm256_add_ps(even, odd));
    for k in i..n {
        // SAFETY: k < n.
        let (wk, xk) = unsafe { (*w.add(k), *x.add(k)) };
        s += wk.to_f32() * xk;
    }
    s
}

/// The loop of [`dot_raw`] over 16-bit weights (`bf16`: zero-extended and shifted into the top half of
/// an f32; `f16`: `vcvtph2ps`), written out a 64-byte line of weights a pass: ask for the line at
/// the same place in the row at `$ahead` (`NTA` if `$nta`, else `T1`), then four vectors of eight,
/// the first and third into the `even` chain and the second and fourth into `odd` — the order of
/// `dot_raw`'s vector loop, so the same sums. Evaluates to the new `(even, odd)`.
///
/// Compiled from intrinsics, the loop asked for its prefetch behind a test of the index and came out
/// with two tests and jumps around every line, the shape that cost the F32 decode 1.12× (see
/// [`dot_f32_decode`]); written out, the prefetch stays beside its line's loads in every build.
///
/// Its caller's safety: `$lines` > 0 lines of weights are readable at `$w`, and twice their bytes of
/// activations at `$x`; the CPU has AVX2, FMA and F16C. The prefetch address may point anywhere.
macro_rules! half_line_loop {
    (bf16, $($args:tt)*) => {
        half_line_loop!(@hint
            ["vpmovzxwd {t0}, xmmword ptr [{w} + {i}]", "vpslld {t0}, {t0}, 16"],
            ["vpmovzxwd {t1}, xmmword ptr [{w} + {i} + 0x10]", "vpslld {t1}, {t1}, 16"],
            ["vpmovzxwd {t0}, xmmword ptr [{w} + {i} + 0x20]", "vpslld {t0}, {t0}, 16"],
            ["vpmovzxwd {t1}, xmmword ptr [{w} + {i} + 0x30]", "vpslld {t1}, {t1}, 16"],
            $($args)*)
    };
    (f16, $($args:tt)*) => {
        half_line_loop!(@hint
            ["vcvtph2ps {t0}, xmmword ptr [{w} + {i}]"],
            ["vcvtph2ps {t1}, xmmword ptr [{w} + {i} + 0x10]"],
            ["vcvtph2ps {t0}, xmmword ptr [{w} + {i} + 0x20]"],
            ["vcvtph2ps {t1}, xmmword ptr [{w} + {i} + 0x30]"],
            $($args)*)
    };
    (@hint [$($a:literal),+], [$($b:literal),+], [$($c:literal),+], [$($d:literal),+],
     $w:expr, $x:expr, $ahead:expr, $nta:expr, $lines:expr, $even:expr, $odd:expr) => {
        if $nta {
            half_line_loop!(@loop "prefetchnta [{ahead} + {i}]", [$($a),+], [$($b),+], [$($c),+],
                [$($d),+], $w, $x, $ahead, $lines, $even, $odd)
        } else {
            half_line_loop!(@loop "prefetcht1 [{ahead} + {i}]", [$($a),+], [$($b),+], [$($c),+],
                [$($d),+], $w, $x, $ahead, $lines, $even, $odd)
        }
    };
    (@loop $prefetch:literal, [$($a:literal),+], [$($b:literal),+], [$($c:literal),+], [$($d:literal),+],
     $w:expr, $x:expr, $ahead:expr, $lines:expr, $even:expr, $odd:expr) => {{
        let (mut even, mut odd): (__m256, __m256) = ($even, $odd);
        std::arch::asm!(
            "2:",
            $prefetch,
            $($a,)+
            "vfmadd231ps {even}, {t0}, ymmword ptr [{x} + 2*{i}]",
            $($b,)+
            "vfmadd231ps {odd}, {t1}, ymmword ptr [{x} + 2*{i} + 0x20]",
            $($c,)+
            "vfmadd231ps {even}, {t0}, ymmword ptr [{x} + 2*{i} + 0x40]",
            $($d,)+
            "vfmadd231ps {odd}, {t1}, ymmword ptr [{x} + 2*{i} + 0x60]",
            "add {i}, 0x40",
            "cmp {i}, {end}",
            "jb 2b",
            ahead = in(reg) $ahead,
            w = in(reg) $w,
            x = in(reg) $x,
            i = inout(reg) 0usize => _,
            end = in(reg) 64 * $lines,
            even = inout(ymm_reg) even,
            odd = inout(ymm_reg) odd,
            t0 = out(ymm_reg) _,
            t1 = out(ymm_reg) _,
            options(nostack, readonly),
        );
        (even, odd)
    }};
}
use half_line_loop;

/// The loop of [`dot_raw`] over 16-bit weights on AMD Zen 3 and later ([`HalfRowLoop`]), written out:
/// two vectors of eight a pass, the first into the `even` chain and the second into `odd` (the order
/// of `dot_raw`'s vector loop, so the same sums), and every other pass (each 64-byte line of weights)
/// an `NTA` hint for the line at `$ahead`, through a pointer of its own that steps with the row.
///
/// Why this exact shape: on a 2-core Zen 3 VM, in a harness (two threads streaming 1 GiB of bf16 rows
/// in huge pages, a spin barrier every four tasks), the loop as rustc compiled it from intrinsics (the
/// same instructions, the hint addressed as base plus index) read 0.88–0.94 of a loop that only loads
/// the bytes; the same loop as a C compiler emitted it, written out here, read 0.99–1.01 of it. Small
/// changes to this shape gave some of that back: without the separate value counter 0.93–0.96, the
/// hint addressed as base plus index 0.96, the first load at a negative offset 0.94, a hint every pass
/// 0.95, a whole line a pass ([`half_line_loop`]'s shape) 0.89. Why is not known: measured, not
/// reasoned.
///
/// Its caller's safety: `0 < 16 · $pairs < 2³¹` values of weights are readable at `$w` and of
/// activations at `$x`; the CPU has AVX2, FMA and F16C. The hint's address may point anywhere.
macro_rules! half_pair_loop {
    (bf16, $($args:tt)*) => {
        half_pair_loop!(@loop
            ["vpmovzxwd {t0}, xmmword ptr [{w} + {j}]", "vpmovzxwd {t1}, xmmword ptr [{j} + {w} + 0x10]"],
            ["vpslld {t0}, {t0}, 16", "vpslld {t1}, {t1}, 16"],
            $($args)*)
    };
    (f16, $($args:tt)*) => {
        half_pair_loop!(@loop
            ["vcvtph2ps {t0}, xmmword ptr [{w} + {j}]", "vcvtph2ps {t1}, xmmword ptr [{j} + {w} + 0x10]"],
            [],
            $($args)*)
    };
    (@loop [$($load:literal),+], [$($widen:literal),*],
     $w:expr, $x:expr, $ahead:expr, $pairs:expr, $even:expr, $odd:expr) => {{
        let (mut even, mut odd): (__m256, __m256) = ($even, $odd);
        std::arch::asm!(
            "xor {j:e}, {j:e}",
            "xor {c:e}, {c:e}",
            "jmp 4f",
            "3:",
            "prefetchnta [{pf}]",
            "2:",
            $($load,)+
            "add {c:e}, 16",
            "add {pf}, 32",
            $($widen,)*
            "vfmadd231ps {even}, {t0}, ymmword ptr [{x} + 2*{j}]",
            "vfmadd231ps {odd}, {t1}, ymmword ptr [{x} + 2*{j} + 0x20]",
            "add {j}, 32",
            "cmp {c:e}, {n:e}",
            "jae 5f",
            "4:",
            "test {c:l}, 31",
            "jne 2b",
            "jmp 3b",
            "5:",
            w = in(reg) $w,
            x = in(reg) $x,
            n = in(reg) 16 * $pairs,
            pf = inout(reg) $ahead => _,
            j = out(reg) _,
            c = out(reg) _,
            even = inout(ymm_reg) even,
            odd = inout(ymm_reg) odd,
            t0 = out(ymm_reg) _,
            t1 = out(ymm_reg) _,
            options(nostack, readonly),
        );
        (even, odd)
    }};
}
use half_pair_loop;

/// `Σ_k w[k] · x[k]` over `n` f32 weights for decode: one row streamed from memory, each line read
/// asking for the lines ahead of it that [`f32_row_hint`] chose for this CPU: two, one, or none (see
/// [`tile_raw`] for why rows ahead, and [`decode_prefetch`] for the hints).
///
/// The sums are [`tile_raw`]'s for one row and one token, in the same order and so the same bits: one
/// chain of FMAs over the vectors of eight, then a scalar tail. What differs is the loop, written out
/// in [`f32_line_loop`] a 64-byte line a pass, so that no build changes it (as with the bandwidth
/// probe, `stream::sum_words`). Compiled from intrinsics the same loop came out three ways: the tile's
/// (a vector a pass, the prefetch behind a test of the index: a knot of tests and jumps around every
/// line), unrolled four lines a pass with the prefetches paired, or a line a pass. On a 2-core Xeon VM
/// (AVX-512), whole F32 decodes of the default model alternated in one process (medians of 10 rounds of
/// 8 tokens) ran 16.4 tok/s with the first two and 18.4–18.5 with a line a pass, compiled or written
/// out, and written out a line or two lines a pass (1.12–1.13×, 10 of 10 rounds faster each). Tried
/// beside it: no prefetch 0.93×, two chains 1.07×, 512-bit loads (one or two chains) 1.04–1.06×, `T1`
/// 1.06–1.10×, fixed distances of 1–16 KiB ahead instead of the next row 0.94–1.04× (against the tile).
/// In `duet bench`, alternated with the tile's build: 1.02–1.05× (three pairs). Builds alternated with
/// this one there: 512-bit loads in two chains four lines a pass 0.94×, `T1` 0.99–1.01×, no prefetch
/// 0.66–0.67×.
///
/// Two prefetches a line (not on AMD: Zen 1 and 2 keep one `NTA` of the next row, Zen 3 and later
/// none, see [`f32_row_hint`]): the same place in
/// the next row into L1 (`T0`) and two rows ahead into L2 (`T1`), so the far one covers the memory's
/// latency and the near one only L2's. `duet bench --dtype f32` on a 2-core Xeon VM, builds rotated
/// in one run, against `T0` the next row alone: 1.04–1.11× in 9 of 9 rotations (16.5–18.3 tok/s;
/// 0.91–0.99 of the bandwidth probe, median 0.95, against 0.84–0.90, median 0.88); the far one three
/// rows ahead 1.04–1.06×, 4 KiB past the next row 1.02–1.06×, one and a half rows 0.97–1.03×,
/// `T1` two rows ahead alone 0.99–1.02×; a second FMA chain (with `T0` alone) 0.99–1.00×: the loop
/// waits on memory, not on its adds.
///
/// # Safety
/// `w` and `x` point at `n` readable values; the CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_f32_decode(w: *const f32, x: *const f32, n: usize, hint: F32RowHint) -> f32 {
    let lines = n / 16;
    let next_row = w.wrapping_add(n) as *const u8;
    let two_rows = w.wrapping_add(2 * n) as *const u8;
    let mut acc = _mm256_setzero_ps();
    if lines > 0 {
        // SAFETY: `lines` whole lines of 16 values lie within both rows (the caller's promise).
        acc = unsafe {
            match hint {
                F32RowHint::None => f32_line_loop!(w, x, lines, acc),
                F32RowHint::NextNta => {
                    f32_line_loop!(w, x, lines, acc; "prefetchnta [{next} + {i}]"; next = next_row)
                }
                F32RowHint::NextT0FarT1 => f32_line_loop!(w, x, lines, acc;
                    "prefetcht0 [{next} + {i}]", "prefetcht1 [{far} + {i}]";
                    next = next_row, far = two_rows),
            }
        };
    }
    let mut i = 16 * lines;
    if i + 8 <= n {
        // SAFETY: i + 8 <= n.
        acc = unsafe { _mm256_fmadd_ps(_mm256_loadu_ps(w.add(i)), _mm256_loadu_ps(x.add(i)), acc) };
        i += 8;
    }
    let mut s = hsum(acc);
    for k in i..n {
        // SAFETY: k < n.
        s += unsafe { *w.add(k) * *x.add(k) };
    }
    s
}

/// The loop of [`dot_f32_decode`]: over `$lines` 64-byte lines of weights at `$w` and activations at
/// `$x`, run the prefetch instructions `$prefetch`, if given (each addressed `[{base} + {i}]`, `i` the
/// line's offset, with its bases given as `$base = $at`), then `acc = w·x + acc` for the line's two vectors of
/// eight, in order. Evaluates to the new `acc`.
///
/// Its caller's safety: `$lines` lines are readable at `$w` and `$x`, `$lines` > 0, the CPU has AVX2
/// and FMA. The prefetch addresses may point anywhere: a prefetch never faults.
macro_rules! f32_line_loop {
    ($w:expr, $x:expr, $lines:expr, $acc:expr
     $(; $($prefetch:literal),+; $($base:ident = $at:expr),+)?) => {{
        let mut acc: __m256 = $acc;
        std::arch::asm!(
            "2:",
            $($($prefetch,)+)?
            "vmovups {lo}, [{w} + {i}]",
            "vmovups {hi}, [{w} + {i} + 0x20]",
            "vfmadd231ps {acc}, {lo}, [{x} + {i}]",
            "vfmadd231ps {acc}, {hi}, [{x} + {i} + 0x20]",
            "add {i}, 0x40",
            "cmp {i}, {end}",
            "jb 2b",
            $($($base = in(reg) $at,)+)?
            w = in(reg) $w,
            x = in(reg) $x,
            i = inout(reg) 0usize => _,
            end = in(reg) 64 * $lines,
            acc = inout(ymm_reg) acc,
            lo = out(ymm_reg) _,
            hi = out(ymm_reg) _,
            options(nostack, readonly),
        );
        acc
    }};
}
use f32_line_loop;

/// Values per pass of [`dot_bf16_avx512`]: one 64-byte line of bf16 weights.
const PAIRED: usize = 32;

/// Whether decode rows of `n` values of `W` go through [`dot_bf16_avx512`], which reads the
/// activations as [`pair_split`] reorders them.
fn splits_pairs<W: Elem>(n: usize) -> bool {
    W::BF16 && n.is_multiple_of(PAIRED) && use_avx512()
}

/// Each 32 activations reordered as [`dot_bf16_avx512`] multiplies them: the 16 of even index, then
/// the 16 of odd index.
/// Into `out`, as long as `x`.
fn pair_split(x: &[f32], out: &mut [f32]) {
    out.copy_from_slice(x);
    for (o, b) in out.chunks_exact_mut(PAIRED).zip(x.chunks_exact(PAIRED)) {
        let (even, odd) = o.split_at_mut(PAIRED / 2);
        for (j, pair) in b.chunks_exact(2).enumerate() {
            even[j] = pair[0];
            odd[j] = pair[1];
        }
    }
}

/// A decode product's activations as [`decode_dot`] reads them, starting on a 64-byte boundary.
///
/// Why a copy: the caller's buffer comes from the allocator, 16-byte aligned, and a row's loop reads
/// 32 bytes of activations per vector, so at a 16-byte offset every other read spans two cache
/// lines. The copy is a few KiB per product, beside megabytes of weights. On a 2-core Zen 3 VM
/// (where 64–74 % of a BF16 decode's products had their activations at such an offset), whole
/// decodes of the default model alternated in one process with the activations as they came: BF16
/// 1.015× (11 of 12 rounds faster), F32 1.030× (5 of 6); see benches/RESULTS.md.
pub struct DecodeActs {
    /// The values from `start` to the end.
    buf: Vec<f32>,
    start: usize,
}

impl std::ops::Deref for DecodeActs {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.buf[self.start..]
    }
}

/// The activations of a decode product as [`decode_dot`] reads them for rows of `W`, 64-byte aligned
/// ([`DecodeActs`]): reordered once per product where the rows go through [`dot_bf16_avx512`], else
/// as they are.
pub fn decode_acts<W: super::matmul::WeightElem>(x: &[f32]) -> DecodeActs {
    // Sixteen values of slack: enough to reach a 64-byte boundary from any 4-byte aligned start.
    let mut buf = vec![0f32; x.len() + 16];
    let start = match buf.as_ptr().align_offset(64) {
        off if off < 16 => off,
        _ => 0,
    };
    buf.truncate(start + x.len());
    let out = &mut buf[start..];
    if splits_pairs::<W>(x.len()) {
        pair_split(x, out);
    } else {
        out.copy_from_slice(x);
    }
    DecodeActs { buf, start }
}

/// The decode kernel for one weight row, `acts` from [`decode_acts`]: [`dot_bf16_avx512`] for bf16
/// rows where the CPU has AVX-512, [`dot_raw`] for other 16-bit weights, [`dot_f32_decode`] for f32.
#[inline]
pub fn decode_dot<W: super::matmul::WeightElem>(w: &[W], acts: &[f32]) -> f32 {
    assert!(w.len() == acts.len());
    assert!(has_avx2());
    if let Some(w) = W::as_f32(w) {
        // SAFETY: both hold acts.len() values and AVX2 and FMA are present (checked above).
        return unsafe { dot_f32_decode(w.as_ptr(), acts.as_ptr(), acts.len(), f32_row_hint()) };
    }
    if splits_pairs::<W>(acts.len()) {
        // SAFETY: `W` is bf16 (`splits_pairs`), two bytes each like u16; both hold acts.len() values,
        // a multiple of 32; `use_avx512` (in `splits_pairs`) checked AVX-512F.
        return unsafe { dot_bf16_avx512(w.as_ptr() as *const u16, acts.as_ptr(), acts.len()) };
    }
    // SAFETY: both hold acts.len() elements (checked above), and the features were just checked.
    unsafe { dot_raw(w.as_ptr(), acts.as_ptr(), acts.len(), half_row_loop()) }
}

/// One row's decode product with the activations as given (label scoring's few rows): the same
/// kernel and the same bits as a whole decode product's row.
pub fn dot<W: super::matmul::WeightElem>(w: &[W], x: &[f32]) -> f32 {
    decode_dot(w, &decode_acts::<W>(x))
}

/// Bytes of a Q8_0 block: an f16 scale, then 32 signed bytes.
const Q8_0_BLOCK: usize = 34;

/// `R` rows of Q8_0 blocks (`blocks` each, `rb` bytes apart from `w`) times `T` tokens' activations
/// `x`, each value widened to its exact f32 (`q · d`: an 8-bit integer times an f16 needs at most 19
/// significant bits, so the product is exact) and summed as [`dot_f32_decode`] and [`tile_raw`] sum
/// the same values stored as f32 in rows of whole 32-value blocks: one chain of eight lanes per row
/// and token, in order, then [`hsum`]. So the same bits as the f32 rows, from a quarter of the bytes.
/// A row's chain waits on its FMAs' latency, so [`decode_q8_0`] takes four rows a call.
/// The rows `R` ahead are asked for into L1 as these are read: without that the product took 1.7–2.1×
/// as long on a 2-core Xeon VM (alternated in one process; not measured on AMD). The widening (three
/// instructions per eight values) keeps it from the memory's pace there: the default model's output
/// product took 8.0–9.7 ms (15–18 GB/s of blocks against a 19–24 GB/s probe) where its f32 rows took
/// 21.5–24.0 ms, alternated in one process; two rows a call 9.7–9.9 ms, eight as fast as four; the
/// blocks widened sixteen values at a time in 512-bit registers (then summed eight lanes at a time, as
/// here) as fast as this.
///
/// # Safety
/// `R` rows of `blocks` whole blocks are readable at `w + r · rb`, `32 · blocks` f32 at each `x[t]`;
/// the CPU has AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q8_0_rows<const R: usize, const T: usize>(
    w: *const u8,
    rb: usize,
    x: [*const f32; T],
    blocks: usize,
) -> [[f32; T]; R] {
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    for b in 0..blocks {
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: block b of row r is readable, and so are the 32 activations of block b of
            // each token (caller); a prefetch never faults.
            unsafe {
                let block = w.add(r * rb + b * Q8_0_BLOCK);
                _mm_prefetch::<_MM_HINT_T0>(block.wrapping_add(R * rb) as *const i8);
                let d = f16::from_bits(std::ptr::read_unaligned(block as *const u16)).to_f32();
                let d = _mm256_set1_ps(d);
                for j in 0..4 {
                    let q = _mm_loadl_epi64(block.add(2 + 8 * j) as *const __m128i);
                    let v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d);
                    for (a, xt) in acc.iter_mut().zip(x) {
                        *a = _mm256_fmadd_ps(v, _mm256_loadu_ps(xt.add(32 * b + 8 * j)), *a);
                    }
                }
            }
        }
    }
    acc.map(|row| row.map(|a| hsum(a)))
}

/// `out[r] = row r · x` for the Q8_0 rows `w` (`rb` bytes each, as a GGUF file stores them) of a
/// decode product, in f32 on the rows' exact values: the bits of the same product with the rows
/// dequantized to f32 ([`decode_dot`]), reading a quarter of the bytes. Rows are split among the
/// threads as every decode product's are.
pub fn decode_q8_0(w: &[u8], rb: usize, x: &[f32], out: &mut [f32]) {
    let blocks = rb / Q8_0_BLOCK;
    assert!(rb == blocks * Q8_0_BLOCK && x.len() == 32 * blocks && w.len() >= out.len() * rb);
    assert!(has_avx2());
    let acts = decode_acts::<f32>(x);
    super::quantized::for_each_decode_run(&mut [out], rb, |_, r0, o| {
        let mut r = 0;
        while r < o.len() {
            let at = w[(r0 + r) * rb..].as_ptr();
            // SAFETY: rows r0 + r (to r0 + r + 3 when four are taken) lie within `w` (asserted: it
            // holds a row per output), each `blocks` whole blocks, and `acts` holds 32 · blocks
            // values; AVX2, FMA and F16C were checked.
            unsafe {
                if r + 4 <= o.len() {
                    let v = dot_q8_0_rows::<4, 1>(at, rb, [acts.as_ptr()], blocks);
                    o[r..r + 4].copy_from_slice(&v.map(|[s]| s));
                    r += 4;
                } else {
                    o[r] = dot_q8_0_rows::<1, 1>(at, rb, [acts.as_ptr()], blocks)[0][0];
                    r += 1;
                }
            }
        }
    });
}

/// One Q8_0 row's decode product ([`decode_q8_0`]'s kernel and bits), for label scoring's few rows.
pub fn dot_q8_0(row: &[u8], x: &[f32]) -> f32 {
    let blocks = row.len() / Q8_0_BLOCK;
    assert!(row.len() == blocks * Q8_0_BLOCK && x.len() == 32 * blocks);
    assert!(has_avx2());
    let acts = decode_acts::<f32>(x);
    // SAFETY: the row holds `blocks` whole blocks and `acts` 32 · blocks values (asserted); AVX2, FMA
    // and F16C were checked.
    unsafe { dot_q8_0_rows::<1, 1>(row.as_ptr(), row.len(), [acts.as_ptr()], blocks)[0][0] }
}

/// `out (t × rows) = x (t × cols) · wᵀ` for the Q8_0 rows `w` (`rb` bytes each) of a short prefill's
/// product (2 to `GEMM_MIN_TOKENS - 1` tokens), in f32 on the rows' exact values, with the bits of
/// the tiles ([`tile`]) on the rows dequantized: each (row, token) one chain of eight lanes over the
/// row in order, then [`hsum`], as there (the rows hold whole 32-value blocks, so no scalar tail).
/// Two rows and up to four tokens a call, each block widened once for all of them: the matrix is
/// read once per four tokens. Dequantizing bands of rows for the tiles instead took 1.4× as long as
/// the f32 rows at two tokens (the default model's output matrix on a 2-core Xeon VM).
pub fn tiles_q8_0(w: &[u8], rb: usize, x: &[f32], t: usize, out: &mut [f32]) {
    let blocks = rb / Q8_0_BLOCK;
    let cols = 32 * blocks;
    let rows = out.len() / t.max(1);
    assert!(rb == blocks * Q8_0_BLOCK && x.len() == t * cols && out.len() == t * rows);
    assert!(w.len() >= rows * rb && has_avx2());
    let threads = rayon::current_num_threads().max(1);
    let per = rows.div_ceil(threads * 8).max(2).next_multiple_of(2);
    // Rows × tokens, each task's rows contiguous; transposed into `out` at the end.
    let mut out_t = vec![0f32; rows * t];
    super::pool::for_each_chunk_mut(&mut out_t, per * t, |c, o| {
        let r0 = c * per;
        let nrows = o.len() / t;
        for t0 in (0..t).step_by(4) {
            let nt = (t - t0).min(4);
            let xs: [*const f32; 4] =
                std::array::from_fn(|i| x[(t0 + i.min(nt - 1)) * cols..].as_ptr());
            let mut r = 0;
            while r < nrows {
                let two = r + 2 <= nrows;
                let at = w[(r0 + r) * rb..].as_ptr();
                macro_rules! call {
                    ($rows:literal, $toks:literal) => {{
                        // SAFETY: rows r0 + r .. r0 + r + $rows lie within `w` (asserted), each
                        // `blocks` whole blocks; each token's row of `x` holds `cols` values; AVX2,
                        // FMA and F16C were checked.
                        let v = unsafe {
                            dot_q8_0_rows::<$rows, $toks>(
                                at,
                                rb,
                                std::array::from_fn(|i| xs[i]),
                                blocks,
                            )
                        };
                        for (k, row) in v.iter().enumerate() {
                            o[(r + k) * t + t0..][..$toks].copy_from_slice(row);
                        }
                    }};
                }
                match (two, nt) {
                    (true, 1) => call!(2, 1),
                    (true, 2) => call!(2, 2),
                    (true, 3) => call!(2, 3),
                    (true, _) => call!(2, 4),
                    (false, 1) => call!(1, 1),
                    (false, 2) => call!(1, 2),
                    (false, 3) => call!(1, 3),
                    (false, _) => call!(1, 4),
                }
                r += if two { 2 } else { 1 };
            }
        }
    });
    for r in 0..rows {
        for ti in 0..t {
            out[ti * rows + r] = out_t[r * t + ti];
        }
    }
}

/// `Σ_k w[k] · x[k]` over `n` bf16 weights (bits in `w`, `n` a multiple of 32) for decode on AVX-512,
/// with `xs` the activations as [`pair_split`] reorders them.
///
/// A 64-byte load holds 32 weights, a pair in each 32-bit lane: shifted left by 16 the lanes are the
/// even weights as f32, with their low halves masked off the odd ones, two instructions for 32 values
/// where [`dot_raw`] widens 8 per load. Two FMA chains, one for each half. The lines two rows ahead
/// are asked for into L2 (`T1`), not L1. Whole BF16 decodes of the default model alternated in one
/// process against [`dot_raw`] (its `T0` prefetch of the next row; 2-core Xeon VM): 1.082× (medians
/// of 16 rounds of 8 tokens, 16 faster) and 1.066× (8 rounds of 64 tokens, 8 faster); `duet bench
/// --dtype bf16`, the two builds alternated three times, 1.04×, 1.00×, 1.06×. Variants in a first
/// harness (16 rounds each): with `T0` and the next row 1.046× where this kernel ran 1.114×, with `T1`
/// and the next row 1.036×, `T1` 4 or 6 KiB ahead 1.106× and 1.102×; [`dot_raw`] itself with `T1` two
/// rows ahead 1.02–1.06×; 512-bit loads widened by `vpmovzxwd` with `T0` 0.90–0.96×.
///
/// The loop is written out, four lines a pass, each line's prefetch right before its load (as
/// [`dot_f32_decode`]'s is, for the same reason). Compiled from intrinsics it came out two ways with
/// the same instructions: with the prefetches spread a line apart, or paired (two after the first
/// line, two after the third). Whole BF16 decodes, 128 tokens after a prefill as `duet bench` runs
/// them (2-core Xeon VM): 35.3–36.1 tok/s spread, 32.8–33.2 paired, the pairing only in some builds;
/// written out as spread, 0.997× the spread compiled form in one process, and a line a pass 0.974×.
///
/// # Safety
/// `w` and `xs` point at `n` readable values; the CPU has AVX-512F.
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn dot_bf16_avx512(w: *const u16, xs: *const f32, n: usize) -> f32 {
    let (mut even, mut odd) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let high = _mm512_set1_epi32(0xffff_0000_u32 as i32);
    // Two rows ahead, in bytes.
    let ahead = 4 * n;
    let quads = n / (4 * PAIRED);
    if quads > 0 {
        // SAFETY: reads 4 · `quads` lines of weights at `w` and twice as many bytes of activations at
        // `xs`, within the `n` values of each (the caller's promise); writes only registers. A
        // prefetch never faults, wherever it points.
        unsafe {
            std::arch::asm!(
                "2:",
                "prefetcht1 [{w} + {ahead}]",
                "vmovdqu64 {pairs}, [{w}]",
                "vpslld {lo}, {pairs}, 16",
                "vpandd {pairs}, {pairs}, {high}",
                "vfmadd231ps {even}, {lo}, [{x}]",
                "vfmadd231ps {odd}, {pairs}, [{x} + 0x40]",
                "prefetcht1 [{w} + {ahead} + 0x40]",
                "vmovdqu64 {pairs}, [{w} + 0x40]",
                "vpslld {lo}, {pairs}, 16",
                "vpandd {pairs}, {pairs}, {high}",
                "vfmadd231ps {even}, {lo}, [{x} + 0x80]",
                "vfmadd231ps {odd}, {pairs}, [{x} + 0xc0]",
                "prefetcht1 [{w} + {ahead} + 0x80]",
                "vmovdqu64 {pairs}, [{w} + 0x80]",
                "vpslld {lo}, {pairs}, 16",
                "vpandd {pairs}, {pairs}, {high}",
                "vfmadd231ps {even}, {lo}, [{x} + 0x100]",
                "vfmadd231ps {odd}, {pairs}, [{x} + 0x140]",
                "prefetcht1 [{w} + {ahead} + 0xc0]",
                "vmovdqu64 {pairs}, [{w} + 0xc0]",
                "vpslld {lo}, {pairs}, 16",
                "vpandd {pairs}, {pairs}, {high}",
                "vfmadd231ps {even}, {lo}, [{x} + 0x180]",
                "vfmadd231ps {odd}, {pairs}, [{x} + 0x1c0]",
                "add {w}, 0x100",
                "add {x}, 0x200",
                "sub {left}, 1",
                "jnz 2b",
                w = inout(reg) w => _,
                x = inout(reg) xs => _,
                ahead = in(reg) ahead,
                left = inout(reg) quads => _,
                high = in(zmm_reg) high,
                even = inout(zmm_reg) even,
                odd = inout(zmm_reg) odd,
                pairs = out(zmm_reg) _,
                lo = out(zmm_reg) _,
                options(nostack, readonly),
            );
        }
    }
    // The lines past the last four, in the same order.
    let mut i = quads * 4 * PAIRED;
    while i + PAIRED <= n {
        // A prefetch is a hint and never faults, so it may point past the matrix (`wrapping_add`).
        _mm_prefetch::<_MM_HINT_T1>(w.wrapping_add(i + 2 * n) as *const i8);
        // SAFETY: i + 32 <= n, for the 64 bytes of weights and the 32 activations.
        unsafe {
            let pairs = _mm512_loadu_si512(w.add(i) as *const __m512i);
            let lo = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(pairs));
            let hi = _mm512_castsi512_ps(_mm512_and_si512(pairs, high));
            even = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xs.add(i)), even);
            odd = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xs.add(i + PAIRED / 2)), odd);
        }
        i += PAIRED;
    }
    _mm512_reduce_add_ps(_mm512_add_ps(even, odd))
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

/// Tokens per packed activation panel (three 8-lane vectors).
const NR: usize = 24;
/// Weight rows per micro-kernel call.
const MR: usize = 4;
/// The longest reduction block. A row of up to 896 values (the hidden size of the 0.5B models) is one
/// block; longer rows are cut into equal blocks of at most this. Every block ends in a pass over its
/// outputs (read, add, store) and needs its own packing, so fewer, longer blocks do less of both. 896
/// against the former 256, whole forward passes alternated in one process: the F32 directory prefilled
/// 128 tokens 1.055×, 1.032×, 1.019× and 1.057× as fast (medians of 20, 16, 16 and 14 pairs) and 64
/// tokens 1.055× (15 of 20 faster), the BF16 directory 128 tokens 1.049× and 1.092× (14 of 20, 7 of 10).
/// The panel block (`KC_MAX × NR` f32, 84 KiB) now streams from L2 instead of sitting in L1: the
/// micro-kernel alone ran at 93-97 % of the FMA peak reading it from L2, 95-99 % from L1. 1664 measured
/// the same or a little better (1.04-1.10×), but its pack buffer (406 KiB) and panel block would not fit
/// a 512 KiB L2 together; 448, and 896 with 32-row blocks, gained less (1.00-1.07×).
const KC_MAX: usize = 896;
/// Weight rows per block: `MC × kc` weights (up to 224 KiB as f32) stay in L2 across the token panels.
const MC: usize = 64;

/// The reduction block for rows of `cols` values: the fewest blocks of at most `KC_MAX`, equal up to a
/// multiple of eight. It depends on `cols` alone, so a token's sums are grouped the same way in every
/// product of a matrix, whatever the number of tokens.
fn kc_for(cols: usize) -> usize {
    cols.div_ceil(cols.div_ceil(KC_MAX).max(1))
        .next_multiple_of(8)
        .max(8)
}

/// The activations repacked for the GEMM: panel `p` holds the tokens `spans[p]` (at most 24) as
/// `[k][24]`, so the micro-kernel reads three contiguous vectors per `k`. Lanes past a panel's tokens
/// are zeros.
struct Panels {
    data: Vec<f32>,
    /// Where panel 0 begins in `data`: the first element on a 64-byte line, so that none of the
    /// micro-kernels' vector loads straddles two lines. A `Vec` this large comes from `mmap` with
    /// malloc's 16-byte header in front of it, and its panels began 16 bytes into a line: whole F32
    /// forward passes with the panels aligned ran 1.075× (128 tokens) and 1.071× (64 tokens) as
    /// fast, 20 of 20 alternated pairs each, on a 2-core Xeon VM (AVX-512).
    start: usize,
    cols: usize,
    /// Tokens per panel: [`NR`] for the AVX2 kernel, [`NR512`] for the AVX-512 one.
    nr: usize,
    /// Each panel's first token and token count.
    spans: Vec<(usize, usize)>,
}

/// How `t` tokens are cut into panels: 24 at a time, except that a remainder of one to eight tokens
/// is not left alone in a panel of eight. Such a panel has only four accumulators, too few to cover
/// the FMA latency, and runs at half speed (45-49 % of the FMA peak in a micro-benchmark against
/// 76-87 % for 16 and 24 tokens); the last full panel and the remainder become 16 + 9..=16 tokens.
/// Every token's sums run over `k` in the same order in any panel, so the cut changes no bits.
///
/// The AVX-512 kernel's panels (`nr` = [`NR512`]) are simply cut 32 at a time: a remainder of 16 or
/// fewer tokens fills one 16-lane vector, whose eight accumulators (one per row) are enough.
fn panel_spans(t: usize, nr: usize) -> Vec<(usize, usize)> {
    let (full, rest) = (t / nr, t % nr);
    let mut sizes = vec![nr; full];
    if nr == NR && (1..=8).contains(&rest) && full > 0 {
        sizes.pop();
        sizes.extend([16, NR + rest - 16]);
    } else if rest > 0 {
        sizes.push(rest);
    }
    let mut start = 0;
    sizes
        .into_iter()
        .map(|n| {
            start += n;
            (start - n, n)
        })
        .collect()
}

/// Panel buffers up to this size (16 MiB) are kept for the next product on the same thread: a fresh
/// one costs a page fault per 4 KiB written (~700 for a 128-token down projection's 2.8 MB).
const PANELS_KEPT_BYTES: usize = 16 << 20;

thread_local! {
    static SPARE_PANELS: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

impl Panels {
    fn pack(x: &[f32], t: usize, cols: usize, nr: usize) -> Panels {
        let spans = panel_spans(t, nr);
        // Every element is written below, so a kept buffer is not cleared first.
        let mut data = SPARE_PANELS.with(|spare| spare.take());
        let len = spans.len() * cols * nr;
        // Up to 15 elements of slack to start on a line (see `start`).
        data.resize(len + 15, 0.0);
        let start = data.as_ptr().align_offset(64).min(15);
        super::pool::for_each_chunk_mut(&mut data[start..start + len], cols * nr, |p, panel| {
            let (start, nt) = spans[p];
            // The span's tokens (rows of x) become the columns of [k][nr]; the rest are padding.
            transpose(&x[start * cols..], nt, cols, cols, panel, nr);
            if nt < nr {
                for k in 0..cols {
                    panel[k * nr + nt..(k + 1) * nr].fill(0.0);
                }
            }
        });
        Panels {
            data,
            start,
            cols,
            nr,
            spans,
        }
    }

    /// Panel `p` from reduction index `k0` on.
    fn at(&self, p: usize, k0: usize) -> &[f32] {
        let nr = self.nr;
        let panel = &self.data[self.start..][p * self.cols * nr..(p + 1) * self.cols * nr];
        &panel[k0 * nr..]
    }
}

impl Drop for Panels {
    fn drop(&mut self) {
        if self.data.len() * 4 <= PANELS_KEPT_BYTES {
            let data = std::mem::take(&mut self.data);
            SPARE_PANELS.with(|spare| spare.set(data));
        }
    }
}

/// Transposes the 8 × 8 block at `src` (row stride `ss`) into `dst` (row stride `ds`).
///
/// # Safety
/// Eight rows of eight f32 are readable at `src` and writable at `dst` with those strides; the CPU has
/// AVX2.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn transpose8(src: *const f32, ss: usize, dst: *mut f32, ds: usize) {
    // SAFETY: rows 0..8 of the source block are readable (caller).
    let r: [__m256; 8] = std::array::from_fn(|i| unsafe { _mm256_loadu_ps(src.add(i * ss)) });
    let top = interleave4(r[0], r[1], r[2], r[3]);
    let bottom = interleave4(r[4], r[5], r[6], r[7]);
    // top[i] holds columns i (low half) and i + 4 (high half) of rows 0..4, bottom[i] of rows 4..8.
    for (i, (t, b)) in top.into_iter().zip(bottom).enumerate() {
        let lo = _mm256_permute2f128_ps::<0x20>(t, b);
        let hi = _mm256_permute2f128_ps::<0x31>(t, b);
        // SAFETY: rows i and i + 4 of the destination block are writable (caller).
        unsafe {
            _mm256_storeu_ps(dst.add(i * ds), lo);
            _mm256_storeu_ps(dst.add((i + 4) * ds), hi);
        }
    }
}

/// `dst[c][r] = src[r][c]` for an `rows × cols` block (source row stride `ss`, destination `ds`).
fn transpose(src: &[f32], rows: usize, cols: usize, ss: usize, dst: &mut [f32], ds: usize) {
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(src.len() >= (rows - 1) * ss + cols && dst.len() >= (cols - 1) * ds + rows);
    assert!(has_avx2());
    let (r8, c8) = (rows / 8 * 8, cols / 8 * 8);
    for r in (0..r8).step_by(8) {
        for c in (0..c8).step_by(8) {
            // SAFETY: r + 8 <= rows and c + 8 <= cols, so the block lies within both (asserted);
            // AVX2 was checked.
            unsafe {
                transpose8(
                    src[r * ss + c..].as_ptr(),
                    ss,
                    dst[c * ds + r..].as_mut_ptr(),
                    ds,
                )
            };
        }
    }
    for r in 0..rows {
        let c0 = if r < r8 { c8 } else { 0 };
        for c in c0..cols {
            dst[c * ds + r] = src[r * ss + c];
        }
    }
}

/// `out[tok][r] (+)= Σ_k w[r][k] · panel[k][tok]` for `r < R`, `tok < nt`, from `R` f32 weight rows
/// `rs` apart (where they lie, or widened from bf16/f16 by [`gemm_rows`]): with `V = 3`, twelve
/// accumulators, three panel vectors and one broadcast weight fill the sixteen registers. `V = 2`
/// serves a panel of 16 or fewer tokens without multiplying a third vector of padding.
///
/// The accumulators hold rows × tokens, the output is tokens × rows: each 4 × 8 block is transposed
/// in registers and stored as eight 4-float runs, one per token, straight into the output (instead
/// of a rows × tokens buffer per product, allocated, zeroed and transposed back on one thread).
/// Along the way it prefetches `pf` (the next block's weights).
///
/// # Safety
/// `wp` holds `R` rows of `kc` f32 at stride `rs`; `xp` holds `kc · 24` f32; `out` holds, for each
/// token `tok < nt <= 8V`, `R` writable f32 at `out + tok · os`; `V <= 3`; the CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn micro<const R: usize, const V: usize>(
    wp: *const f32,
    rs: usize,
    xp: *const f32,
    kc: usize,
    out: *mut f32,
    os: usize,
    nt: usize,
    accumulate: bool,
    pf: Prefetch,
) {
    let mut acc = [[_mm256_setzero_ps(); V]; MR];
    // Each token's sums run over k in order, whatever panel it sits in and however many tokens the
    // product has, so a prompt prefilled in two parts (after a cached prefix) gets the same bits as in
    // one when both parts take the GEMM. (A second accumulator set for odd k would speed up narrow
    // panels, but would give their tokens other bits.) A part under `GEMM_MIN_TOKENS` goes through the
    // tiles, which sum eight lanes of k and then across them: on the tiny test model that moved the
    // logits by up to ~1e-5, which is why the prefix cache promises the whole prompt's results within
    // a tolerance, not bit for bit.
    let mut line = 0;
    for k0 in (0..kc).step_by(16) {
        pf.fetch_line(&mut line);
        for k in k0..(k0 + 16).min(kc) {
            // SAFETY: k < kc: within the panel block and the weight rows.
            unsafe {
                let mut xv = [_mm256_setzero_ps(); V];
                for (j, v) in xv.iter_mut().enumerate() {
                    *v = _mm256_loadu_ps(xp.add(k * NR + 8 * j));
                }
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    if r >= R {
                        break;
                    }
                    let b = _mm256_broadcast_ss(&*wp.add(r * rs + k));
                    for j in 0..V {
                        acc_r[j] = _mm256_fmadd_ps(b, xv[j], acc_r[j]);
                    }
                }
            }
        }
    }
    // SAFETY: tok < nt, and the token's R = 4 values are writable (caller).
    let store = |tok: usize, v: __m128| unsafe { store4(out.add(tok * os), v, accumulate) };
    if R == MR && nt == 8 * V {
        let [a0, a1, a2, a3] = acc;
        for (j, (((a, b), c), d)) in a0.into_iter().zip(a1).zip(a2).zip(a3).enumerate() {
            // u_i holds tokens i (low half) and i + 4 (high half) of this vector, rows a b c d.
            let u = interleave4(a, b, c, d);
            for (i, ui) in u.into_iter().enumerate() {
                store(8 * j + i, _mm256_castps256_ps128(ui));
                store(8 * j + i + 4, _mm256_extractf128_ps::<1>(ui));
            }
        }
        return;
    }
    // Fewer rows or tokens than the tile: through a buffer, one value at a time.
    let mut vals = [[0f32; NR]; MR];
    for (r, acc_r) in acc.iter().enumerate() {
        for (j, a) in acc_r.iter().enumerate() {
            // SAFETY: 8j + 8 <= 8V <= NR.
            unsafe { _mm256_storeu_ps(vals[r][8 * j..].as_mut_ptr(), *a) };
        }
    }
    // SAFETY: R rows of nt <= NR tokens are writable at out (caller).
    unsafe { store_each(&vals[..R], nt, out, os, accumulate) }
}

/// The FMA peak probe's loop in 512-bit vectors: `iters` FMAs over twelve independent chains (more
/// than latency × ports, so the ports, not the chains, bound it). Returns a checksum to keep.
pub fn fma_chains_avx512(iters: usize, seed: f32) -> f32 {
    assert!(is_x86_feature_detected!("avx512f"));
    #[target_feature(enable = "avx512f")]
    fn chains(iters: usize, seed: f32) -> f32 {
        let (m, a) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
        let mut acc = [_mm512_set1_ps(seed); 12];
        for _ in 0..iters / 12 {
            for v in acc.iter_mut() {
                *v = _mm512_fmadd_ps(*v, m, a);
            }
        }
        _mm512_reduce_add_ps(
            acc.iter()
                .fold(_mm512_setzero_ps(), |s, v| _mm512_add_ps(s, *v)),
        )
    }
    // SAFETY: AVX-512 F was checked above.
    unsafe { chains(iters, seed) }
}

/// Tokens per AVX-512 panel (two 16-lane vectors).
const NR512: usize = 32;
/// Weight rows per AVX-512 micro-kernel call (three times the AVX2 kernel's [`MR`]).
const MR512: usize = 12;
/// Weight rows per AVX-512 block: eight calls' rows, `MC512 × kc` weights (up to 336 KiB as f32) kept
/// in L2 across the token panels.
const MC512: usize = 96;

/// [`micro`] in 512-bit vectors: 12 rows × 32 tokens, twenty-four accumulators, two panel vectors and
/// a broadcast weight of the thirty-two registers. Twenty-four FMAs for two vector loads and twelve
/// broadcasts a step keep both FMA ports busy (4 × 24 in AVX2 needed twelve FMAs for three loads and
/// four broadcasts, at half the width). `V = 1` serves a panel of 16 or fewer tokens.
///
/// Measured on a 2-core Xeon VM (AVX-512, two FMA ports), whole F32 forward passes against the AVX2
/// kernel, alternated: 64 and 128 tokens 1.43-1.48× as fast (three pairs of runs). Products at the
/// model's shapes, alternated builds: 48-token panels (8 × 3 vectors) ran 0.88×, 12 rows × 2 vectors
/// (compiled) 0.95× of 8 rows, f32 rows packed like bf16 ones 0.96×; the k loop in whole 16-step
/// chunks (without a bound check per step) 1.02×. A loop of only this kernel's loads, broadcasts and
/// FMAs, its panel in L2, ran at 93-98 % of the FMA probe; the kernel runs nearer 75 % of it inside
/// the GEMM. Twelve f32 rows in place with a full panel, the F32 prefill's case, go through the
/// written-out loop [`steps_12x32`], with which twelve rows a call beat eight (see there).
///
/// Each token's sums run over `k` in order, as in [`micro`], so both kernels give the same bits.
///
/// # Safety
/// `wp` holds `R` rows of `kc` f32 at stride `rs`; `xp` holds `kc · 32` f32; `out` holds, for each
/// token `tok < nt <= 16V`, `R` writable f32 at `out + tok · os`; `V <= 2`; the CPU has AVX-512 F,
/// AVX2 and FMA.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn micro512<const R: usize, const V: usize>(
    wp: *const f32,
    rs: usize,
    xp: *const f32,
    kc: usize,
    out: *mut f32,
    os: usize,
    nt: usize,
    accumulate: bool,
    pf: Prefetch,
) {
    let mut acc = [[_mm512_setzero_ps(); V]; R];
    // Each row's weight at k is `rows[r] + k`: a base register per row and one index, where
    // `wp + r · rs + k` computed in the loop cost more integer steps than it had FMAs. (The compiler
    // still turns the bases into a chain of adds of `rs`, which is why the main case runs the
    // written-out [`steps_12x32`].)
    let rows: [*const f32; R] = std::array::from_fn(|r| wp.wrapping_add(r * rs));
    let fma_step = |acc: &mut [[__m512; V]; R], k: usize| {
        // SAFETY: k < kc: within the panel block and the weights (caller).
        unsafe {
            let mut xv = [_mm512_setzero_ps(); V];
            for (j, v) in xv.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(xp.add(k * NR512 + 16 * j));
            }
            for (acc_r, row) in acc.iter_mut().zip(rows) {
                let b = _mm512_set1_ps(*row.add(k));
                for j in 0..V {
                    acc_r[j] = _mm512_fmadd_ps(b, xv[j], acc_r[j]);
                }
            }
        }
    };
    let full = kc / 16 * 16;
    if R == MR512 && V == 2 {
        // SAFETY: R = 12 and V = 2, so `acc` is a `[[__m512; 2]; 12]`; the 12 rows hold kc values at
        // stride rs from wp and the panel kc · 32 (caller), and full <= kc.
        unsafe {
            let acc12 = &mut *acc.as_mut_ptr().cast::<[[__m512; 2]; 12]>();
            *acc12 = steps_12x32(*acc12, wp, rs, xp, full / 16, pf);
        }
    } else {
        let mut line = 0;
        for k0 in (0..full).step_by(16) {
            pf.fetch_line(&mut line);
            for k in k0..k0 + 16 {
                fma_step(&mut acc, k);
            }
        }
    }
    for k in full..kc {
        fma_step(&mut acc, k);
    }
    // SAFETY: tok < nt and row + 4 <= R: the token's four values are writable (caller).
    let store = |row: usize, tok: usize, v: __m128| unsafe {
        store4(out.add(tok * os + row), v, accumulate)
    };
    if R.is_multiple_of(4) && nt == 16 * V {
        // Four rows × eight tokens at a time, transposed as in `micro`: rows 0-3, 4-7, ..., each
        // vector's low eight tokens then its high eight.
        for (g, rows4) in acc.chunks_exact(4).enumerate() {
            // `j` picks the same vector of each of the four rows.
            #[allow(clippy::needless_range_loop)]
            for j in 0..V {
                for h in 0..2 {
                    let half = |r: usize| {
                        let v = rows4[r][j];
                        if h == 0 {
                            _mm512_castps512_ps256(v)
                        } else {
                            _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)))
                        }
                    };
                    let u = interleave4(half(0), half(1), half(2), half(3));
                    let first = 16 * j + 8 * h;
                    for (i, ui) in u.into_iter().enumerate() {
                        store(4 * g, first + i, _mm256_castps256_ps128(ui));
                        store(4 * g, first + i + 4, _mm256_extractf128_ps::<1>(ui));
                    }
                }
            }
        }
        return;
    }
    // Fewer rows or tokens than the tile: through a buffer, one value at a time.
    let mut vals = [[0f32; NR512]; R];
    for (r, acc_r) in acc.iter().enumerate() {
        for (j, a) in acc_r.iter().enumerate() {
            // SAFETY: 16j + 16 <= 16V <= NR512.
            unsafe { _mm512_storeu_ps(vals[r][16 * j..].as_mut_ptr(), *a) };
        }
    }
    // SAFETY: R rows of nt <= NR512 tokens are writable at out (caller).
    unsafe { store_each(&vals, nt, out, os, accumulate) }
}

/// One reduction step of [`steps_12x32`]: the panel's two vectors of 16 tokens at byte `$x` past
/// `{x}`, and each row's weight at byte `$w` past its start, broadcast and multiplied into the row's
/// two accumulators. Rows 0-3 are addressed from `{p0}`, 4-7 from `{p4}` and 8-11 from `{p8}`, with
/// the row stride `{s}` (or `{s3}`, three strides) as the index, so a step costs no address arithmetic.
/// `{rNvJ}` is row N's accumulator for the panel's vector J.
#[rustfmt::skip]
macro_rules! step_12x32 {
    ($w:literal, $x:literal) => {
        concat!(
            "vmovups zmm29, [{x} + ", $x, "]\n",
            "vmovups zmm30, [{x} + ", $x, " + 64]\n",
            "vbroadcastss zmm31, [{p0} + ", $w, "]\n",
            "vfmadd231ps {r0v0:z}, zmm31, zmm29\n",
            "vfmadd231ps {r0v1:z}, zmm31, zmm30\n",
            "vbroadcastss zmm31, [{p0} + {s} + ", $w, "]\n",
            "vfmadd231ps {r1v0:z}, zmm31, zmm29\n",
            "vfmadd231ps {r1v1:z}, zmm31, zmm30\n",
            "vbroadcastss zmm31, [{p0} + {s}*2 + ", $w, "]\n",
            "vfmadd231ps {r2v0:z}, zmm31, zmm29\n",
            "vfmadd231ps {r2v1:z}, zmm31, zmm30\n",
            "vbroadcastss zmm31, [{p0} + {s3} + ", $w, "]\n",
            "vfmadd231ps {r3v0:z}, zmm31, zmm29\n",
            "vfmadd231ps {r3v1:z}, zmm31, zmm30\n",
            "vbroadcastss zmm31, [{p4} + ", $w, "]\n",
            "vfmadd231ps {r4v0:z}, zmm31, zmm29\n",
            "vfmadd231ps {r4v1:z}, zmm31, zmm30\n",
            "vbroadcastss zmm31, [{p4} + {s} + ", $w, "]\n",
            "vfmadd231ps {r5v0:z}, zmm31, zmm29\n",
            "vfmadd231ps {r5v1:z}, zmm31, zmm30\n",
            "vbroadcastss zmm31, [{p4} + {s}*2 + ", $w, "]\n",
            "vfmadd231ps {r6v0:z}, zmm31, zmm29\n",
            "vfmadd231ps {r6v1:z}, zmm31, zmm30\n",
            "vbroadcastss zmm31, [{p4} + {s3} + ", $w, "]\n",
            "vfmadd231ps {r7v0:z}, zmm31, zmm29\n",
            "vfmadd231ps {r7v1:z}, zmm31, zmm30\n",
            "vbroadcastss zmm31, [{p8} + ", $w, "]\n",
            "vfmadd231ps {r8v0:z}, zmm31, zmm29\n",
            "vfmadd231ps {r8v1:z}, zmm31, zmm30\n",
            "vbroadcastss zmm31, [{p8} + {s} + ", $w, "]\n",
            "vfmadd231ps {r9v0:z}, zmm31, zmm29\n",
            "vfmadd231ps {r9v1:z}, zmm31, zmm30\n",
            "vbroadcastss zmm31, [{p8} + {s}*2 + ", $w, "]\n",
            "vfmadd231ps {r10v0:z}, zmm31, zmm29\n",
            "vfmadd231ps {r10v1:z}, zmm31, zmm30\n",
            "vbroadcastss zmm31, [{p8} + {s3} + ", $w, "]\n",
            "vfmadd231ps {r11v0:z}, zmm31, zmm29\n",
            "vfmadd231ps {r11v1:z}, zmm31, zmm30\n",
        )
    };
}

/// `chunks` × 16 reduction steps of [`micro512`] for twelve f32 rows in place and a full panel (two
/// vectors of tokens), written out: the same FMAs into the same accumulators in the same order as
/// its compiled loop, so the same bits. Between chunks it asks for a line of the next block's rows
/// (`pf`), as the compiled loop does.
///
/// Why written out: compiled, each step reached the rows' weights through a chain of adds of the row
/// stride (the base register per row that `micro512` sets up did not survive), about ten integer
/// instructions for 16 FMAs with eight rows, on a core whose two FMA ports also take integer work.
/// Here each weight is base + index · scale + displacement, four steps a pass, and the accumulators
/// stay in registers for the whole call. On a 2-core Xeon VM (AVX-512), alternated in one process
/// (medians of 12-16 rounds, the same output bits each time):
/// - eight rows a call, written out against compiled: whole F32 forward passes of the default model
///   1.126× and 1.127× as fast at 128 tokens (15 of 16 faster each), 1.140× at 64; products at the
///   model's shapes (128 tokens) 1.113–1.143×;
/// - then twelve rows a call (96-row blocks) against eight, both written out: whole F32 passes 1.077×,
///   1.076×, 1.037×, 1.093× at 128 tokens, 1.066× at 256, 1.022–1.028× at 96, 192 and 200, level at
///   32 and 64 (0.98–1.02×); BF16 (compiled, packed) 1.062× and 1.067× at 128, level at 64. Alone on one
///   thread, its panels cycling through L2, the twelve-row loop multiplied 1.04× as fast as the
///   eight-row one and a fourteen-row one 1.02×: each panel load serves more FMAs.
///
/// The same loop called once per 16 steps, its accumulators stored and reloaded around each call,
/// gained 1.03–1.09× over the compiled one; with each broadcast folded into its two FMAs (`{1to16}`,
/// twice the loads) it ran 0.89× and 0.93× the compiled loop.
///
/// # Safety
/// Rows 0-11 of `16 · chunks` f32 are readable at `w` + r · `rs` (elements), the panel's `16 · chunks`
/// steps of 32 f32 at `xp`; the CPU has AVX-512 F.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn steps_12x32(
    mut acc: [[__m512; 2]; 12],
    w: *const f32,
    rs: usize,
    xp: *const f32,
    chunks: usize,
    pf: Prefetch,
) -> [[__m512; 2]; 12] {
    let stride = rs * std::mem::size_of::<f32>();
    let mut line = 0;
    for c in 0..chunks {
        pf.fetch_line(&mut line);
        // SAFETY: steps 16c..16c + 16 of the twelve rows and of the panel are readable (caller);
        // AVX-512 F is enabled here. The block reads memory only and leaves the stack alone.
        unsafe {
            std::arch::asm!(
                "2:",
                step_12x32!("0", "0"),
                step_12x32!("4", "128"),
                step_12x32!("8", "256"),
                step_12x32!("12", "384"),
                "add {p0}, 16",
                "add {p4}, 16",
                "add {p8}, 16",
                "add {x}, 512",
                "dec {n}",
                "jnz 2b",
                p0 = inout(reg) w.add(16 * c) => _,
                p4 = inout(reg) w.add(16 * c + 4 * rs) => _,
                p8 = inout(reg) w.add(16 * c + 8 * rs) => _,
                s = in(reg) stride,
                s3 = in(reg) 3 * stride,
                x = inout(reg) xp.add(16 * c * NR512) => _,
                n = inout(reg) 4usize => _,
                r0v0 = inout(zmm_reg) acc[0][0],
                r0v1 = inout(zmm_reg) acc[0][1],
                r1v0 = inout(zmm_reg) acc[1][0],
                r1v1 = inout(zmm_reg) acc[1][1],
                r2v0 = inout(zmm_reg) acc[2][0],
                r2v1 = inout(zmm_reg) acc[2][1],
                r3v0 = inout(zmm_reg) acc[3][0],
                r3v1 = inout(zmm_reg) acc[3][1],
                r4v0 = inout(zmm_reg) acc[4][0],
                r4v1 = inout(zmm_reg) acc[4][1],
                r5v0 = inout(zmm_reg) acc[5][0],
                r5v1 = inout(zmm_reg) acc[5][1],
                r6v0 = inout(zmm_reg) acc[6][0],
                r6v1 = inout(zmm_reg) acc[6][1],
                r7v0 = inout(zmm_reg) acc[7][0],
                r7v1 = inout(zmm_reg) acc[7][1],
                r8v0 = inout(zmm_reg) acc[8][0],
                r8v1 = inout(zmm_reg) acc[8][1],
                r9v0 = inout(zmm_reg) acc[9][0],
                r9v1 = inout(zmm_reg) acc[9][1],
                r10v0 = inout(zmm_reg) acc[10][0],
                r10v1 = inout(zmm_reg) acc[10][1],
                r11v0 = inout(zmm_reg) acc[11][0],
                r11v1 = inout(zmm_reg) acc[11][1],
                out("zmm29") _,
                out("zmm30") _,
                out("zmm31") _,
                options(nostack, readonly),
            );
        }
    }
    acc
}

/// [`micro512`] for `rows` weight rows (1 to 12) and a panel of `vecs` 16-lane vectors (1 or 2).
///
/// # Safety
/// As [`micro512`] with `R = rows`.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn micro_any512(
    rows: usize,
    vecs: usize,
    wp: *const f32,
    rs: usize,
    xp: *const f32,
    kc: usize,
    out: *mut f32,
    os: usize,
    nt: usize,
    acc: bool,
    pf: Prefetch,
) {
    macro_rules! by_rows {
        ($($r:literal)*) => {
            match (rows, vecs) {
                $(
                    ($r, 1) => micro512::<$r, 1>(wp, rs, xp, kc, out, os, nt, acc, pf),
                    ($r, _) => micro512::<$r, 2>(wp, rs, xp, kc, out, os, nt, acc, pf),
                )*
                (_, 1) => micro512::<MR512, 1>(wp, rs, xp, kc, out, os, nt, acc, pf),
                _ => micro512::<MR512, 2>(wp, rs, xp, kc, out, os, nt, acc, pf),
            }
        };
    }
    // SAFETY: forwarded from the caller, R = rows.
    unsafe { by_rows!(1 2 3 4 5 6 7 8 9 10 11) }
}

/// Weight rows of the next block for a micro-kernel call to fetch into the cache while it works
/// (`rows` rows of `bytes` bytes, `stride` apart, from `p`): one line of each per 16 steps of its loop.
/// A prefetch is a hint and never faults. Asking for a whole row at the start of each call instead
/// (56 lines of f32 at once) put ~17 % of a one-thread GEMM's samples on the prefetch instruction;
/// spread over the loop, whole F32 forward passes ran 1.030×, 1.012× (128 tokens; 12 of 20, 19 of 30
/// pairs faster) and 1.028× (64 tokens, 13 of 20) as fast, BF16 0.99× (7 of 16), alternated in one
/// process on a 2-core Zen 3 VM.
#[derive(Clone, Copy)]
struct Prefetch {
    p: *const u8,
    stride: usize,
    rows: usize,
    bytes: usize,
}

impl Prefetch {
    const NONE: Prefetch = Prefetch {
        p: std::ptr::null(),
        stride: 0,
        rows: 0,
        bytes: 0,
    };

    /// Asks for line `line` (a byte offset) of each row, if the rows have one, and moves on to the next.
    #[inline]
    fn fetch_line(&self, line: &mut usize) {
        if *line < self.bytes {
            for r in 0..self.rows {
                let at = self.p.wrapping_add(r * self.stride + *line) as *const i8;
                // SAFETY: SSE is part of every x86-64 CPU; a prefetch never faults.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(at) };
            }
            *line += 64;
        }
    }
}

/// Adds (or, unless `accumulate`, writes) four values at `p`: one token's run of four rows.
///
/// # Safety
/// Four f32 are readable and writable at `p`.
#[inline]
unsafe fn store4(p: *mut f32, v: __m128, accumulate: bool) {
    // SAFETY: four f32 at p (caller); loadu/storeu need no alignment.
    unsafe {
        let v = if accumulate {
            _mm_add_ps(_mm_loadu_ps(p), v)
        } else {
            v
        };
        _mm_storeu_ps(p, v);
    }
}

/// The micro-kernels' path for fewer rows or tokens than their tile: `vals[r][tok]` (a copy of the
/// accumulators) added to, or written into, `out[tok · os + r]` one value at a time.
///
/// # Safety
/// For each `tok < nt` and `r < vals.len()`, `out + tok · os + r` is writable; `nt <= N`.
unsafe fn store_each<const N: usize>(
    vals: &[[f32; N]],
    nt: usize,
    out: *mut f32,
    os: usize,
    accumulate: bool,
) {
    for tok in 0..nt {
        for (r, v) in vals.iter().enumerate() {
            // SAFETY: tok < nt and r < vals.len() (caller).
            unsafe {
                let p = out.add(tok * os + r);
                *p = if accumulate { *p + v[tok] } else { v[tok] };
            }
        }
    }
}

/// Four 8-lane vectors `a b c d` regrouped by lane: `u[i]` holds lane `i` of each (low half) and lane
/// `i + 4` of each (high half), in the order `a b c d`. The first stage of every transpose here: the
/// activations' 8 × 8 blocks and the accumulators into per-token runs of four rows.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn interleave4(a: __m256, b: __m256, c: __m256, d: __m256) -> [__m256; 4] {
    let (t0, t1) = (_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
    let (t2, t3) = (_mm256_unpacklo_ps(c, d), _mm256_unpackhi_ps(c, d));
    [
        _mm256_shuffle_ps::<0x44>(t0, t2),
        _mm256_shuffle_ps::<0xEE>(t0, t2),
        _mm256_shuffle_ps::<0x44>(t1, t3),
        _mm256_shuffle_ps::<0xEE>(t1, t3),
    ]
}

thread_local! {
    /// This thread's room for the widened bf16/f16 weight block of [`gemm_rows`], kept between calls
    /// (up to `MC512 × KC_MAX` f32, 336 KiB): every row read is written first, so it is never cleared.
    /// A fresh zeroed buffer per call (one per task, eight tasks a product) cost its allocation and a
    /// pass of zeros: whole BF16 forward passes alternated in one process on a 2-core Xeon VM ran
    /// 1.025× and 1.017× as fast kept (128 tokens; 16 and 18 of 20 faster), 1.036× at 64 (17 of 20).
    static WIDENED: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// The first `dst.len()` values of a bf16/f16 weight row, widened to f32 into `dst`.
#[target_feature(enable = "avx2,fma,f16c")]
fn widen_row<W: super::matmul::WeightElem>(row: &[W], dst: &mut [f32]) {
    let kc = dst.len();
    assert!(row.len() >= kc);
    let mut k = 0;
    while k + 8 <= kc {
        // SAFETY: k + 8 <= kc <= both lengths (asserted above).
        unsafe { _mm256_storeu_ps(dst.as_mut_ptr().add(k), W::load8_avx2(row.as_ptr().add(k))) };
        k += 8;
    }
    for k in k..kc {
        dst[k] = row[k].to_f32();
    }
}

/// One task's rows of the GEMM, `r0..r0 + nrows`, stored into their columns of the output, by the
/// AVX-512 micro-kernel if `wide` (the panels then hold [`NR512`] tokens each), else the AVX2 one.
///
/// # Safety
/// If `wide`, the CPU has AVX-512 F (AVX2, FMA and F16C are enabled here).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemm_rows<W: super::matmul::WeightElem>(
    w: &[W],
    cols: usize,
    r0: usize,
    nrows: usize,
    panels: &Panels,
    out: super::pool::SharedOut,
    wide: bool,
) {
    let kc_max = kc_for(cols);
    let mr = if wide { MR512 } else { MR };
    // f32 weights are broadcast from their rows where they lie (copied into the kernel's order first,
    // whole F32 passes alternated in one process took 1.069× and 1.110× as long at 128 and 64 tokens).
    // bf16/f16 rows are widened to f32 once per block, into rows of their own that every token panel
    // then reads from L2 in the same way.
    // (They were packed four rows to a `[k][4]` run before, which took the compiled AVX-512 loop
    // instead of the written-out one, `steps_12x32`: whole BF16 forward passes alternated in one
    // process on a 2-core Xeon VM, rows instead of packs, the same bits, ran 1.055×, 1.054×, 1.021×
    // (128 tokens; 15, 17 and 10 of 16-20 faster), 1.029× and 1.054× (64) and 1.027× (256) as fast;
    // the AVX2 kernel, there through `DUET_BACKEND=avx2`, 1.014× and 1.015×.)
    let in_place = W::as_f32(w);
    let mcb = if wide { MC512 } else { MC };
    let mut widened = WIDENED.take();
    if in_place.is_none() {
        widened.resize(mcb * kc_max, 0.0);
    }
    // Row blocks outside, reduction blocks inside: a row block's outputs (MC rows × t) stay in cache
    // while its sums build up. Reduction blocks outside read and wrote the whole output once per
    // block: 3-5 % slower at 128 tokens in two harness runs, within the host's noise in a later A/B.
    let blocks: Vec<(usize, usize)> = (0..nrows)
        .step_by(mcb)
        .flat_map(|m0| (0..cols).step_by(kc_max).map(move |k0| (k0, m0)))
        .collect();
    for (bi, &(k0, m0)) in blocks.iter().enumerate() {
        let kc = kc_max.min(cols - k0);
        let mc = mcb.min(nrows - m0);
        // A bf16/f16 weight block, widened once, serves every token panel from L2.
        let row = |r: usize| &w[(r0 + m0 + r) * cols + k0..][..kc];
        if in_place.is_none() {
            for r in 0..mc {
                widen_row(row(r), &mut widened[r * kc..(r + 1) * kc]);
            }
        }
        // While this block is multiplied, the next one is fetched from memory a few rows per
        // micro-kernel call (see `Prefetch`), so the loads in `widen_row` (or the first panel's, for
        // f32) hit the cache instead of stalling.
        let next = blocks.get(bi + 1).map(|&(k1, m1)| {
            let (kn, mn) = (kc_max.min(cols - k1), mcb.min(nrows - m1));
            let calls = panels.spans.len() * mc.div_ceil(mr);
            (k1, m1, kn, mn, mn.div_ceil(calls))
        });
        let mut call = 0;
        for (p, &(start, nt)) in panels.spans.iter().enumerate() {
            // The vectors holding this panel's tokens.
            let vecs = nt.div_ceil(if wide { 16 } else { 8 });
            let xp = panels.at(p, k0);
            assert!(xp.len() >= kc * panels.nr);
            for q in 0..mc.div_ceil(mr) {
                let r = q * mr;
                // This call's share of the next block's rows, fetched while it multiplies.
                let mut pf = Prefetch::NONE;
                if let Some((k1, m1, kn, mn, per_call)) = next {
                    let first = call * per_call;
                    if first < mn {
                        pf = Prefetch {
                            p: w[(r0 + m1 + first) * cols + k1..].as_ptr() as *const u8,
                            stride: cols * std::mem::size_of::<W>(),
                            rows: per_call.min(mn - first),
                            bytes: kn * std::mem::size_of::<W>(),
                        };
                    }
                    call += 1;
                }
                let xp = xp.as_ptr();
                let (acc, os, left) = (k0 > 0, out.stride, (mc - r).min(mr));
                // SAFETY: the weights hold `left` rows of kc values from wp at stride `rs`: the
                // matrix's own (f32) or the widened block's (`widened` holds MC · kc_max values and
                // r + left <= mc <= MC); xp holds kc · nr values (asserted). The output holds tokens
                // start + nt <= t at stride `os`, and its columns r0 + m0 + r + (0..left), below
                // r0 + nrows <= os, are this task's alone. AVX2 is enabled here, AVX-512 F present if
                // `wide` (caller).
                unsafe {
                    let op = out.at(start, r0 + m0 + r);
                    let (wp, rs) = match in_place {
                        Some(w) => (w[(r0 + m0 + r) * cols + k0..].as_ptr(), cols),
                        None => (widened[r * kc..].as_ptr(), kc),
                    };
                    if wide {
                        micro_any512(left, vecs, wp, rs, xp, kc, op, os, nt, acc, pf)
                    } else {
                        micro_any(left, vecs, wp, rs, xp, kc, op, os, nt, acc, pf)
                    }
                }
            }
        }
    }
    WIDENED.set(widened);
}

/// [`micro`] for `rows` weight rows (1 to 4) and a panel of `vecs` vectors. Two vectors also serve a
/// panel of eight or fewer tokens, which `panel_spans` makes only for a whole product that small
/// (never from `matmul_float`).
///
/// # Safety
/// As [`micro`] with `R = rows`.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn micro_any(
    rows: usize,
    vecs: usize,
    wp: *const f32,
    rs: usize,
    xp: *const f32,
    kc: usize,
    out: *mut f32,
    os: usize,
    nt: usize,
    acc: bool,
    pf: Prefetch,
) {
    // SAFETY: forwarded from the caller, R = rows.
    unsafe {
        match (rows, vecs) {
            (1, ..=2) => micro::<1, 2>(wp, rs, xp, kc, out, os, nt, acc, pf),
            (1, _) => micro::<1, 3>(wp, rs, xp, kc, out, os, nt, acc, pf),
            (2, ..=2) => micro::<2, 2>(wp, rs, xp, kc, out, os, nt, acc, pf),
            (2, _) => micro::<2, 3>(wp, rs, xp, kc, out, os, nt, acc, pf),
            (3, ..=2) => micro::<3, 2>(wp, rs, xp, kc, out, os, nt, acc, pf),
            (3, _) => micro::<3, 3>(wp, rs, xp, kc, out, os, nt, acc, pf),
            (_, ..=2) => micro::<MR, 2>(wp, rs, xp, kc, out, os, nt, acc, pf),
            (_, _) => micro::<MR, 3>(wp, rs, xp, kc, out, os, nt, acc, pf),
        }
    }
}

/// Prefill `outs[i] (t × rowsᵢ) = x (t × cols) · wᵢᵀ` as a packed GEMM, for one matrix or several of
/// the same activations (q, k and v; gate and up): activations repacked into 24-token panels once, not
/// once per matrix; weights read in `MC × kc` blocks (widened once per block for bf16/f16) and
/// broadcast, 4 rows × 24 tokens per micro-kernel. Every matrix's rows are split into tasks of one
/// parallel step, so the pool waits for its slowest thread once; each task stores its own columns of
/// its matrix's output.
pub fn gemm_many<W: super::matmul::WeightElem>(
    products: &mut [(&[W], usize, &mut [f32])],
    cols: usize,
    x: &[f32],
    t: usize,
) {
    assert!(x.len() == t * cols);
    assert!(products
        .iter()
        .all(|(w, rows, out)| w.len() >= rows * cols && out.len() == t * rows));
    gemm_many_with(products, cols, x, t, use_avx512())
}

/// Whether the float GEMM (and the FMA probe of `duet bench`) use 512-bit vectors: where the CPU has
/// AVX-512 F and the quantized kernels chosen ([`Backend::best`], which `DUET_BACKEND` can set) are
/// AVX-512 ones too, so that `DUET_BACKEND=avx2` steps around every 512-bit kernel.
///
/// [`Backend::best`]: super::quantized::Backend::best
pub fn use_avx512() -> bool {
    use super::quantized::Backend;
    is_x86_feature_detected!("avx512f")
        && matches!(Backend::best(), Backend::Avx512Vnni | Backend::Amx)
}

/// [`gemm_many`] by the AVX-512 micro-kernel if `wide`, else the AVX2 one: the same bits either way
/// (each token's sums run over `k` in the same order).
fn gemm_many_with<W: super::matmul::WeightElem>(
    products: &mut [(&[W], usize, &mut [f32])],
    cols: usize,
    x: &[f32],
    t: usize,
    wide: bool,
) {
    assert!(has_avx2() && (!wide || is_x86_feature_detected!("avx512f")));
    let (nr, mr) = if wide { (NR512, MR512) } else { (NR, MR) };
    let panels = Panels::pack(x, t, cols, nr);
    // (matrix, its output, first row, rows) per task: four tasks per thread and matrix, in whole
    // micro-kernel calls.
    let mut tasks = Vec::new();
    for (w, rows, out) in products.iter_mut() {
        let (w, rows) = (*w, *rows);
        let row_bytes = cols * std::mem::size_of::<W>();
        let per = super::quantized::rows_per_task(rows, row_bytes, t, 4).next_multiple_of(mr);
        let shared = super::pool::SharedOut::new(out, t);
        tasks.extend(
            (0..rows)
                .step_by(per)
                .map(|r0| (w, shared, r0, per.min(rows - r0))),
        );
    }
    super::pool::for_each(tasks.len(), |i| {
        let (w, out, r0, nrows) = tasks[i];
        // SAFETY: the CPU features were checked above; the task writes only columns r0..r0 + nrows
        // of its matrix's output, which `out` points into for the whole call.
        unsafe { gemm_rows(w, cols, r0, nrows, &panels, out, wide) }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_awkward_blocks() {
        if !has_avx2() {
            return;
        }
        for (rows, cols) in [(1, 1), (3, 17), (8, 8), (9, 16), (16, 9), (23, 41)] {
            let (ss, ds) = (cols + 3, rows + 5);
            let src: Vec<f32> = (0..rows * ss).map(|i| i as f32).collect();
            let mut dst = vec![-1f32; cols * ds];
            transpose(&src, rows, cols, ss, &mut dst, ds);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(dst[c * ds + r], src[r * ss + c], "{rows}x{cols} at {r},{c}");
                }
                // Padding columns of the destination are untouched.
                for c in 0..cols {
                    for pad in rows..ds.min(rows + 5) {
                        assert_eq!(dst[c * ds + pad], -1.0);
                    }
                }
            }
        }
    }

    /// A token's outputs do not depend on the other tokens of the GEMM: a prompt prefilled in two parts
    /// of at least `GEMM_MIN_TOKENS` gets the bits of one.
    #[test]
    fn tokens_get_the_same_bits_in_any_batch() {
        if !has_avx2() {
            return;
        }
        // Rows of 1000 values are two reduction blocks: the sums are also added to across blocks.
        let (rows, cols, t) = (70, 1000, 53);
        let val = |i: usize| ((i * 7919 % 1000) as f32 - 500.0) / 700.0;
        let w: Vec<f32> = (0..rows * cols).map(val).collect();
        let x: Vec<f32> = (0..t * cols).map(|i| val(i + 13)).collect();
        let mut whole = vec![0f32; t * rows];
        gemm_many(&mut [(&w[..], rows, &mut whole[..])], cols, &x, t);
        for start in [1, 5, 21, 29, 41, 45, 52] {
            let n = t - start;
            let mut part = vec![0f32; n * rows];
            gemm_many(
                &mut [(&w[..], rows, &mut part[..])],
                cols,
                &x[start * cols..],
                n,
            );
            let mut same = part.iter().zip(&whole[start * rows..]);
            assert!(
                same.all(|(a, b)| a.to_bits() == b.to_bits()),
                "from token {start}"
            );
        }
    }

    /// The AVX-512 micro-kernel gives the AVX2 kernel's bits (each token summed over `k` in the same
    /// order), for every weight type, edge rows, narrow panels and rows of two reduction blocks; and
    /// both stay near the f64 product.
    #[test]
    fn avx512_gives_the_avx2_bits() {
        if !has_avx2() || !is_x86_feature_detected!("avx512f") {
            eprintln!("no AVX-512 F here: the 512-bit GEMM was not exercised");
            return;
        }
        fn check<W: crate::kernels::matmul::WeightElem>(from: fn(f32) -> W) {
            let val = |i: usize| ((i * 7919 % 1000) as f32 - 500.0) / 700.0;
            for (rows, cols, t) in [
                (8, 16, 32),
                (13, 40, 12),
                (70, 1000, 53),
                (5, 23, 17),
                (64, 896, 128),
                (9, 8, 48),
                (16, 4864, 32),
                (36, 896, 64),
            ] {
                let w: Vec<W> = (0..rows * cols).map(|i| from(val(i))).collect();
                let x: Vec<f32> = (0..t * cols).map(|i| val(i + 13)).collect();
                let mut wide = vec![f32::NAN; t * rows];
                let mut narrow = vec![f32::NAN; t * rows];
                gemm_many_with(&mut [(&w[..], rows, &mut wide[..])], cols, &x, t, true);
                gemm_many_with(&mut [(&w[..], rows, &mut narrow[..])], cols, &x, t, false);
                for tok in 0..t {
                    for r in 0..rows {
                        let exact: f64 = (0..cols)
                            .map(|k| w[r * cols + k].to_f32() as f64 * x[tok * cols + k] as f64)
                            .sum();
                        let (a, b) = (wide[tok * rows + r], narrow[tok * rows + r]);
                        assert_eq!(
                            a.to_bits(),
                            b.to_bits(),
                            "{rows}x{cols}, t {t}: token {tok} row {r}"
                        );
                        assert!(
                            (a as f64 - exact).abs() < 1e-4 * cols as f64,
                            "{a} vs {exact}"
                        );
                    }
                }
            }
        }
        check::<f32>(|v| v);
        check::<bf16>(bf16::from_f32);
        check::<f16>(f16::from_f32);
    }

    #[test]
    fn reduction_blocks_are_few_and_even() {
        assert_eq!(kc_for(896), 896);
        assert_eq!(kc_for(897), 456);
        assert_eq!(kc_for(1000), 504);
        assert_eq!(kc_for(4864), 816);
        assert_eq!(kc_for(1), 8);
        assert_eq!(kc_for(0), 8);
        for cols in 1..3000 {
            let kc = kc_for(cols);
            assert!(kc.is_multiple_of(8) && kc <= KC_MAX, "{cols}: {kc}");
            assert_eq!(cols.div_ceil(kc), cols.div_ceil(KC_MAX), "{cols}: {kc}");
        }
    }

    #[test]
    fn panels_cover_the_tokens_without_a_lone_eight() {
        let sizes = |t: usize| panel_spans(t, NR).iter().map(|s| s.1).collect::<Vec<_>>();
        assert_eq!(sizes(12), [12]);
        assert_eq!(sizes(24), [24]);
        assert_eq!(sizes(25), [16, 9]);
        assert_eq!(sizes(32), [16, 16]);
        assert_eq!(sizes(33), [24, 9]);
        assert_eq!(sizes(64), [24, 24, 16]);
        assert_eq!(sizes(128), [24, 24, 24, 24, 16, 16]);
        assert_eq!(sizes(130), [24, 24, 24, 24, 24, 10]);
        for t in 1..200 {
            let spans = panel_spans(t, NR);
            let mut next = 0;
            for &(start, n) in &spans {
                assert!(start == next && (1..=NR).contains(&n), "{t}: {spans:?}");
                next = start + n;
            }
            assert_eq!(next, t);
        }
    }

    /// The activations every decode row reads start on a 64-byte boundary and hold `x` (pair split
    /// where the AVX-512 bf16 kernel takes them), whatever the offset of `x` itself.
    #[test]
    fn decode_acts_are_aligned_copies() {
        let x: Vec<f32> = (0..4864 + 16).map(|i| i as f32 * 0.5).collect();
        for off in 0..16 {
            let x = &x[off..off + 4864];
            let plain = decode_acts::<f32>(x);
            assert_eq!(plain.as_ptr() as usize % 64, 0, "offset {off}");
            assert_eq!(&plain[..], x);
            let half = decode_acts::<bf16>(x);
            assert_eq!(half.as_ptr() as usize % 64, 0, "offset {off}");
            if splits_pairs::<bf16>(x.len()) {
                let mut want = vec![0.0; x.len()];
                pair_split(x, &mut want);
                assert_eq!(&half[..], &want[..]);
            } else {
                assert_eq!(&half[..], x);
            }
        }
    }

    #[test]
    fn pair_split_puts_evens_then_odds() {
        let x: Vec<f32> = (0..70).map(|i| i as f32).collect();
        let mut s = vec![f32::NAN; x.len()];
        pair_split(&x, &mut s);
        let block = |b: usize| -> Vec<f32> {
            let evens = (0..16).map(|j| (b + 2 * j) as f32);
            evens
                .chain((0..16).map(|j| (b + 2 * j + 1) as f32))
                .collect()
        };
        assert_eq!(s[..32], block(0)[..]);
        assert_eq!(s[32..64], block(32)[..]);
        // A tail shorter than a block stays in place (rows of such lengths never take the kernel).
        assert_eq!(s[64..], x[64..]);
    }

    /// `hsum` of eight lanes written out in scalars, in its order: lanes `j` and `j + 4` first, then
    /// those four pairwise (0 with 2, 1 with 3), then the two.
    fn hsum_lanes(lane: [f32; 8]) -> f32 {
        let half: [f32; 4] = std::array::from_fn(|j| lane[j] + lane[j + 4]);
        (half[0] + half[2]) + (half[1] + half[3])
    }

    /// A decode test's weight row (varied exponents, both signs) and activations of `n` values.
    fn decode_row(n: usize) -> (Vec<f32>, Vec<f32>) {
        let w = (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013 * (1 + i % 7) as f32)
            .collect();
        let x = (0..n)
            .map(|i| ((i * 53 % 89) as f32 - 44.0) * 0.021)
            .collect();
        (w, x)
    }

    /// The f32 decode row sums as the tiles do, written out in scalars: lane `j` of one chain of fused
    /// multiply-adds takes every value at `k ≡ j (mod 8)` in order, the lanes are added pairwise (as
    /// `hsum` does), then the tail past the last whole vector, value by value. Bit for bit, so the
    /// decode keeps the bits the golden tests saw.
    #[test]
    fn f32_decode_sums_in_the_tiles_order() {
        if !has_avx2() {
            return;
        }
        for n in [1, 7, 8, 15, 16, 24, 33, 130, 896, 4864] {
            let (w, x) = decode_row(n);
            let whole = n / 8 * 8;
            let mut lane = [0f32; 8];
            for k in 0..whole {
                lane[k % 8] = w[k].mul_add(x[k], lane[k % 8]);
            }
            let mut want = hsum_lanes(lane);
            for k in whole..n {
                want += w[k] * x[k];
            }
            let got = decode_dot(&w, &decode_acts::<f32>(&x));
            assert_eq!(got.to_bits(), want.to_bits(), "n={n}: {got} vs {want}");
            let tiled = tile::<f32, 1, 1>([&w], [&x])[0][0];
            assert_eq!(got.to_bits(), tiled.to_bits(), "n={n}");
            // Every CPU's loop, not only this one's: the hints change what is fetched, never the sums.
            for hint in [
                F32RowHint::None,
                F32RowHint::NextNta,
                F32RowHint::NextT0FarT1,
            ] {
                // SAFETY: both rows hold n values; AVX2 and FMA checked above.
                let hinted = unsafe { dot_f32_decode(w.as_ptr(), x.as_ptr(), n, hint) };
                assert_eq!(hinted.to_bits(), want.to_bits(), "n={n}, {hint:?}");
            }
        }
    }

    /// [`dot_raw`] (the AVX2 decode row of bf16 and f16 weights) against its sums written out in
    /// scalars: lanes of two chains of fused multiply-adds, the first eight values of every sixteen
    /// into `even` and the next eight into `odd` (a last lone eight into `even`), the chains added and
    /// their lanes pairwise (as `hsum` does), then the tail value by value. Bit for bit, over lengths
    /// with and without whole lines, sixteens, eights and tails.
    #[test]
    fn half_decode_sums_in_its_order() {
        if !has_avx2() {
            return;
        }
        fn check<W: crate::kernels::matmul::WeightElem>(from: fn(f32) -> W) {
            for n in [
                1, 7, 8, 16, 24, 31, 32, 33, 48, 56, 63, 96, 130, 896, 4864, 4888,
            ] {
                let (w, x) = decode_row(n);
                let w: Vec<W> = w.into_iter().map(from).collect();
                let (mut even, mut odd) = ([0f32; 8], [0f32; 8]);
                let sixteens = n / 16 * 16;
                for k in 0..sixteens {
                    let chain = if k % 16 < 8 { &mut even } else { &mut odd };
                    chain[k % 8] = w[k].to_f32().mul_add(x[k], chain[k % 8]);
                }
                let mut vectors = sixteens;
                if vectors + 8 <= n {
                    for k in vectors..vectors + 8 {
                        even[k % 8] = w[k].to_f32().mul_add(x[k], even[k % 8]);
                    }
                    vectors += 8;
                }
                let lane: [f32; 8] = std::array::from_fn(|j| even[j] + odd[j]);
                let mut want = hsum_lanes(lane);
                for k in vectors..n {
                    want += w[k].to_f32() * x[k];
                }
                // Every CPU's loop, whichever this one takes: neither the loop nor its hint
                // changes the sums.
                for walk in [
                    HalfRowLoop::WrittenFarT1,
                    HalfRowLoop::WrittenNextNta,
                    HalfRowLoop::WrittenPairsNextNta,
                ] {
                    // SAFETY: both rows hold n values; AVX2, FMA and F16C were checked above.
                    let got = unsafe { dot_raw(w.as_ptr(), x.as_ptr(), n, walk) };
                    assert_eq!(
                        got.to_bits(),
                        want.to_bits(),
                        "n={n}, {walk:?}: {got} vs {want}"
                    );
                }
            }
        }
        check(bf16::from_f32);
        check(f16::from_f32);
    }

    /// The bf16 decode kernel this CPU selects ([`dot_bf16_avx512`] where it has AVX-512) against the
    /// plain sum, over row lengths of the model (896, 4864) and short ones, on weights with varied
    /// exponents and both signs.
    #[test]
    fn bf16_decode_matches_the_definition() {
        for n in [32, 64, 96, 160, 480, 896, 4864] {
            let (w, x) = decode_row(n);
            let w: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let want: f64 = w.iter().zip(&x).map(|(a, b)| a.to_f64() * *b as f64).sum();
            let scale: f64 = w
                .iter()
                .zip(&x)
                .map(|(a, b)| (a.to_f64() * *b as f64).abs())
                .sum();
            let got = decode_dot(&w, &decode_acts::<bf16>(&x));
            assert!(
                (got as f64 - want).abs() <= 1e-6 * scale,
                "n={n}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn widen_row_gives_every_value_as_f32() {
        if !has_avx2() {
            return;
        }
        let val = |k: usize| ((k * 7919 % 1000) as f32 - 500.0) / 7.0;
        for kc in [1, 7, 8, 19, 896] {
            let b: Vec<bf16> = (0..kc + 3).map(|k| bf16::from_f32(val(k))).collect();
            let h: Vec<f16> = (0..kc + 3).map(|k| f16::from_f32(val(k))).collect();
            let (mut wb, mut wh) = (vec![f32::NAN; kc], vec![f32::NAN; kc]);
            // SAFETY: AVX2 was checked above.
            unsafe { (widen_row(&b, &mut wb), widen_row(&h, &mut wh)) };
            for k in 0..kc {
                assert_eq!(wb[k].to_bits(), b[k].to_f32().to_bits(), "bf16, {kc}: {k}");
                assert_eq!(wh[k].to_bits(), h[k].to_f32().to_bits(), "f16, {kc}: {k}");
            }
        }
    }
}
