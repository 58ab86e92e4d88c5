//! x86-64 tiles for `quantized.rs`: `R` weight rows × `T` tokens of integer dot products.
//!
//! Each weight format decodes a 32-value piece of a row into one 256-bit register of bytes (signed for
//! Q8_0/Q6_K after removing their offsets, unsigned nibbles for Q4_K) plus an f32 scale vector; Q5_0 is
//! decoded eight rows at a time instead, straight into the panel layout below (from the file's layout,
//! or, held interleaved as the native form holds it on x86, read in that layout as it lies). The
//! multiply is `vpmaddubsw` (u8 × i8 → i16 pairs) + `vpmaddwd` with ones (→ i32) on AVX2, or one
//! `vpdpbusd` on AVX-512 VNNI. Both need an unsigned left operand, so signed weights use the sign trick:
//! `|w| · (x · sign w)`. No i16 pair can saturate: activations are within ±127 and `|w| ≤ 128` gives at
//! most 2 · 128 · 127 = 32512. Each piece's i32 sums are then converted and scaled once in f32.
//!
//! Decode (`rows`) and the prefill tiles of Q8_0 decode each piece as they go. Prefill of Q4_K, Q5_0 and
//! Q6_K decodes eight rows once into a [`Panel`], row `r` in lane `r` of every register, and multiplies
//! it with every token: the stored values, unsigned, times the token's signed activations broadcast four
//! at a time (no sign trick), the zero point or min taken off per piece from the activations' sums.
//!
//! The AVX-512 VNNI variant differs from the AVX2 one only in that multiply and in how the panel kernel
//! adds up its products (one macro, two expansions), so the AVX2 tests cover the rest of its logic. The
//! one kernel of its own is the K-quants' decode ([`rows_k512`]: two pieces to a 512-bit register), which
//! a test holds to the AVX2 kernel's bits.

use super::quantized::{ActRow, Backend, QuantizedActs};
use crate::weights::DType;
use std::arch::x86_64::*;
use std::cell::RefCell;

/// How far ahead of the kernel's position in a weight row (or the rows after it) software prefetch asks for
/// cache lines. Decode streams weights from DRAM; the hardware prefetcher alone left a 151936-row Q8_0
/// product at ~70 % of the read bandwidth on a 2-core Zen 3 VM, prefetching 2 KiB ahead brought it to ~95 %.
const PREFETCH: usize = 2048;

/// How far ahead an interleaved group's decode asks for its lines into L2 (the `T1` hint): further
/// than [`PREFETCH`].
/// On a 2-core Xeon VM, a build with the hint and the distance switchable at run time, whole decodes
/// alternated in one process (medians of 12 rounds of 8 tokens, against `T0` 2 KiB ahead): the default
/// model with `T1` 2, 4, 8, 16 and 24 KiB ahead 0.97×, 1.04×, 1.11–1.15× (four runs, 12 of 12 faster
/// in each), 1.12×, 1.12×; `--dtype q8_0` 4, 8 and 16 KiB ahead 1.03×, 1.06–1.08×, 1.04×; `T0` 8 KiB
/// ahead 1.01–1.03× and 1.00×. Built in as here, `duet bench` alternated with the build before: the
/// default model 1.01–1.04× (six pairs, none slower), `q8_0` 1.00–1.06× (three). The switchable build
/// ran 1.09–1.15× against that same build before. The likely reason for the gap, found a session
/// later: where the compiler put the prefetches (side by side at the end of the block before, in the
/// built-in form); they are now pinned a line apart, [`prefetch_group_line`].
const GROUP_PREFETCH_L2: usize = 8192;

pub fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

pub fn has_avx512vnni() -> bool {
    has_avx2()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
}

/// One token's activations as raw pointers (lengths checked by [`tile`]).
#[derive(Clone, Copy)]
struct ActPtr {
    qs: *const i8,
    d: *const f32,
    sums: *const f32,
}

/// A weight format, as the tiles see it. Methods are `unsafe`: `p` must point at a whole super-block and
/// the CPU must have AVX2, FMA and F16C.
trait Fmt {
    /// Values and bytes per super-block; 32-value pieces per super-block.
    const SB_VALS: usize;
    const SB_BYTES: usize;
    const SUBS: usize = Self::SB_VALS / 32;
    /// Whether `sub` returns signed bytes (multiplied with the sign trick) rather than unsigned ones.
    const SIGNED: bool;
    /// Whether the format subtracts per-piece mins (`mins` is then used).
    const MINS: bool;
    /// What a super-block's header decodes to, once per row and super-block.
    type Hdr: Copy + Default;
    unsafe fn header(p: *const u8) -> Self::Hdr;
    /// Piece `j`: 32 weights as bytes, and the f32 scale of each of the eight i32 lanes of their sums.
    unsafe fn sub(p: *const u8, h: &Self::Hdr, j: usize) -> (__m256i, __m256);
    /// `dmin · m_j` for the eight pieces (formats with mins only).
    unsafe fn mins(h: &Self::Hdr) -> __m256;
    /// `dmin · m_j` of piece `j` (formats with mins only).
    fn min(_h: &Self::Hdr, _j: usize) -> f32 {
        unreachable!()
    }
    /// For formats with several pieces a super-block: their lane scales times the activations' block
    /// scales (`dx`, one a piece), multiplied for the whole super-block at once, as
    /// [`Fmt::piece_scale`] reads them. `None`: the row kernel's `piece` multiplies each piece's.
    #[inline]
    unsafe fn scaled(_h: &Self::Hdr, _dx: *const f32) -> Option<[f32; 16]> {
        None
    }
    /// Piece `j`'s lane scales, from [`Fmt::scaled`]'s products: the same values as `sub`'s scale
    /// times the block's activation scale.
    #[inline]
    unsafe fn piece_scale(_s: &[f32; 16], _j: usize) -> __m256 {
        unreachable!()
    }
    /// The zero point of the stored values (`sub` returns them minus it), and whether a piece's two
    /// 16-value halves have scales of their own (Q6_K): what a [`Panel`] needs.
    const ZERO: i8 = 0;
    const HALVES: bool = false;
    /// For a [`Panel`]: how many groups of four stored values `vpmaddubsw`'s i16 pair sums can be
    /// added up for before they are widened: `PANEL_G · 2 · max · 127 ≤ 32767` (0: no panel form).
    const PANEL_G: usize = 0;
    /// For a [`Panel`]: the scales of piece `j` of eight rows' super-blocks at `p`, row `r` in lane
    /// `r`, where the format can gather them in a few vector operations (Q5_0); `None` otherwise.
    #[inline]
    unsafe fn panel_scales(_p: &[*const u8; 8], _j: usize) -> Option<__m256> {
        None
    }
    /// For a [`Panel`]: piece `j` of eight rows' super-blocks at `p` already in the panel's layout
    /// (group `g` in register `g`, row `r` in lane `r`), where the format decodes it so without a
    /// transpose ([`Rows8`]); `None` otherwise.
    #[inline]
    unsafe fn panel_values(_p: &[*const u8; 8], _j: usize) -> Option<[__m256i; 8]> {
        None
    }
    /// Piece `j` as stored: `sub`'s values plus `ZERO`, unsigned.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn raw(p: *const u8, h: &Self::Hdr, j: usize) -> (__m256i, __m256) {
        // SAFETY: as the caller guarantees for `sub`.
        let (v, scale) = unsafe { Self::sub(p, h, j) };
        (_mm256_add_epi8(v, _mm256_set1_epi8(Self::ZERO)), scale)
    }
}

/// Every f16 bit pattern's f32 value (256 KiB, built at compile time). A per-block scale lookup here is
/// one load, where `vcvtph2ps` and the moves around it are three vector operations per 32 weights on the
/// decode path, which is compute-bound for Q5_0.
static F16_TO_F32: [f32; 65536] = {
    let mut t = [0f32; 65536];
    let mut i = 0;
    while i < 65536 {
        t[i] = half::f16::from_bits(i as u16).to_f32_const();
        i += 1;
    }
    t
};

#[inline]
unsafe fn f16_at(p: *const u8) -> f32 {
    // SAFETY: the caller guarantees two readable bytes at p; read_unaligned has no alignment requirement.
    let bits = unsafe { (p as *const u16).read_unaligned() };
    F16_TO_F32[bits as usize]
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load32(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 32 readable bytes at p; loadu has no alignment requirement.
    unsafe { _mm256_loadu_si256(p as *const __m256i) }
}

struct Q8_0;
impl Fmt for Q8_0 {
    const SB_VALS: usize = 32;
    const SB_BYTES: usize = 34;
    const SIGNED: bool = true;
    const MINS: bool = false;
    type Hdr = ();
    #[inline]
    unsafe fn header(_p: *const u8) {}
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn sub(p: *const u8, _h: &(), _j: usize) -> (__m256i, __m256) {
        // SAFETY: p points at a whole 34-byte block: f16 scale, then 32 i8.
        unsafe { (load32(p.add(2)), _mm256_set1_ps(f16_at(p))) }
    }
    #[inline]
    unsafe fn mins(_h: &()) -> __m256 {
        unreachable!()
    }
}

struct Q5_0;
impl Fmt for Q5_0 {
    const SB_VALS: usize = 32;
    const SB_BYTES: usize = 22;
    const SIGNED: bool = true;
    const MINS: bool = false;
    const ZERO: i8 = 16;
    const PANEL_G: usize = 4;
    type Hdr = ();
    #[inline]
    unsafe fn header(_p: *const u8) {}
    /// Never called: Q5_0 in the file's layout is decoded eight rows at a time, straight into a panel's
    /// layout ([`Rows8::piece8`]), both for decode (`rows8`) and for a prefill's [`Panel`]
    /// (`panel_values`); interleaved Q5_0 is already in it ([`q5_0_group_values`]).
    unsafe fn sub(_p: *const u8, _h: &(), _j: usize) -> (__m256i, __m256) {
        unreachable!("Q5_0 pieces are decoded eight rows at a time")
    }
    /// The eight f16 scales side by side, widened in one `vcvtph2ps`: a lookup per row in the 256 KiB
    /// table, and a store per row, were a fifth of a panel's fill.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn panel_scales(p: &[*const u8; 8], _j: usize) -> Option<__m256> {
        // SAFETY: each p[r] points at a whole block, whose first two bytes are its f16 scale.
        let d: [i16; 8] = std::array::from_fn(|r| unsafe { (p[r] as *const i16).read_unaligned() });
        let d = _mm_setr_epi16(d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]);
        Some(_mm256_cvtph_ps(d))
    }
    /// About half the vector operations of decoding each row and transposing the eight. Filling every
    /// gate and up panel of the default model on one thread, six alternations: 1.20× as fast in cache,
    /// 1.125× from memory (5 of 6 faster each); the fill is a quarter of a 13-token prefill.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn panel_values(p: &[*const u8; 8], _j: usize) -> Option<[__m256i; 8]> {
        // SAFETY: as the caller guarantees: each p[r] points at a whole block.
        Some(unsafe { Self::piece8(p) })
    }
    #[inline]
    unsafe fn mins(_h: &()) -> __m256 {
        unreachable!()
    }
}

/// A format whose decode runs eight rows at a time (`rows8`): one 32-value block per super-block, no
/// header, no mins, and a piece of eight rows decoded straight into a [`Panel`]'s layout.
trait Rows8: Fmt {
    /// Block `p[r]` of row `r` for eight rows: values `4g..4g + 4` of row `r` in lane `r` of register
    /// `g`, unsigned as stored.
    ///
    /// # Safety
    /// Each `p[r]` points at a whole block; the CPU has AVX2, FMA and F16C.
    unsafe fn piece8(p: &[*const u8; 8]) -> [__m256i; 8];
}

/// `vpshufb` indices copying byte `b` of each 32-bit lane to all four of its bytes, for `b` in `0..4`.
const REPLICATE: [[i8; 32]; 4] = {
    let mut t = [[0i8; 32]; 4];
    let mut b = 0;
    while b < 4 {
        let mut i = 0;
        while i < 32 {
            t[b][i] = (4 * ((i % 16) / 4) + b) as i8;
            i += 1;
        }
        b += 1;
    }
    t
};

impl Rows8 for Q5_0 {
    /// Straight into the panel's layout, without decoding rows and transposing them: the nibble bytes
    /// are transposed as stored (a 4 × 4 of 32-bit words per half), each word giving the low nibbles of
    /// one group and the high nibbles of another; the fifth bits come from the eight rows' bit words
    /// side by side, each group's four bits spread to its four bytes.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn piece8(p: &[*const u8; 8]) -> [__m256i; 8] {
        // SAFETY: each p[r] points at a whole 22-byte block: f16 scale, u32 fifth bits, 16 bytes of
        // nibbles.
        let (y, qh) = unsafe {
            let y: [__m256i; 4] = std::array::from_fn(|r| {
                _mm256_loadu2_m128i(
                    p[r + 4].add(6) as *const __m128i,
                    p[r].add(6) as *const __m128i,
                )
            });
            let qh: [i32; 8] =
                std::array::from_fn(|r| (p[r].add(2) as *const i32).read_unaligned());
            (y, qh)
        };
        // z[k]: nibble word k of row r in lane r (rows 0..4 in the low 128 bits, 4..8 in the high).
        let t = [
            _mm256_unpacklo_epi32(y[0], y[1]),
            _mm256_unpackhi_epi32(y[0], y[1]),
            _mm256_unpacklo_epi32(y[2], y[3]),
            _mm256_unpackhi_epi32(y[2], y[3]),
        ];
        let z = [
            _mm256_unpacklo_epi64(t[0], t[2]),
            _mm256_unpackhi_epi64(t[0], t[2]),
            _mm256_unpacklo_epi64(t[1], t[3]),
            _mm256_unpackhi_epi64(t[1], t[3]),
        ];
        let m4 = _mm256_set1_epi8(0x0F);
        let qh = _mm256_setr_epi32(qh[0], qh[1], qh[2], qh[3], qh[4], qh[5], qh[6], qh[7]);
        let sixteen = _mm256_set1_epi8(16);
        std::array::from_fn(|g| {
            // Values 0..16 are the low nibbles, 16..32 the high ones.
            let nib = if g < 4 {
                _mm256_and_si256(z[g], m4)
            } else {
                _mm256_and_si256(_mm256_srli_epi16(z[g - 4], 4), m4)
            };
            // Bits 4g..4g + 4 of each row's word: byte g / 2 copied to the four bytes of its lane,
            // each byte then testing its own bit.
            // SAFETY: REPLICATE[g / 2] holds 32 bytes.
            let idx = unsafe { _mm256_loadu_si256(REPLICATE[g / 2].as_ptr() as *const __m256i) };
            let rep = _mm256_shuffle_epi8(qh, idx);
            let bit = _mm256_set1_epi32(if g % 2 == 0 {
                0x0804_0201
            } else {
                0x8040_2010u32 as i32
            });
            let set = _mm256_cmpeq_epi8(_mm256_and_si256(rep, bit), bit);
            _mm256_or_si256(nib, _mm256_and_si256(set, sixteen))
        })
    }
}

/// Block `b` of a group of eight interleaved Q5_0 rows (see `quantized::interleave_q5_0`; `v` points at
/// the block's 160 bytes of values) as a [`Panel`] holds it: values `4g..4g + 4` of row `r` in lane `r`
/// of register `g`, unsigned as stored (0..=31). The first four registers are one mask each; the other
/// four take their low three bits from the top of the same bytes (a shift and a mask) and their top two
/// from the last vector, each pair moved into bits 3..5 by a table lookup (`vpshufb`) or a shift.
///
/// Why this layout: on a 2-core Zen 1 VM, where a 256-bit shift takes two cycles on one pipe, the
/// decode's block loop is bound by its instruction count, not by memory; nibbles beside a vector of
/// fifth bits took eleven shifts and 35 operations a block, this takes six and 24. The decode kernel on
/// one thread, a 4864-row matrix in cache, fastest of 400 calls: 53.5 and 56.8 cycles a block of
/// eight rows against 61.4 and 59.9. Whole `native` decodes of the default model (128 tokens, the two
/// builds alternated): medians 1.031× and 1.016× (12 and 10 rounds); label scoring, whose prefill fills
/// its panels through this function, 30 sentences, four alternations: mean latency 0.78–0.99× (all
/// four faster).
///
/// # Safety
/// `v` points at 160 readable bytes; the CPU has AVX2.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn q5_0_group_values(v: *const u8) -> [__m256i; 8] {
    // SAFETY: the 160 bytes, by the caller's promise.
    let (whole, top) = unsafe {
        (
            [0, 1, 2, 3].map(|k| _mm256_loadu_si256(v.add(32 * k) as *const __m256i)),
            _mm256_loadu_si256(v.add(128) as *const __m256i),
        )
    };
    // Index 0..4 (bits 0..2) and 0, 4, 8, 12 (bits 2..4) to the pair's value times eight.
    let (times8_low, times8_next) = (
        _mm256_setr_epi8(
            0, 8, 16, 24, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 16, 24, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0, 0,
        ),
        _mm256_setr_epi8(
            0, 0, 0, 0, 8, 0, 0, 0, 16, 0, 0, 0, 24, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 16, 0, 0, 0,
            24, 0, 0, 0,
        ),
    );
    std::array::from_fn(|g| {
        if g < 4 {
            return _mm256_and_si256(whole[g], _mm256_set1_epi8(0x1F));
        }
        // 16-bit shifts: the bits a shift carries across a byte are masked off before or after.
        let low3 = _mm256_and_si256(_mm256_srli_epi16(whole[g - 4], 5), _mm256_set1_epi8(7));
        let top2 = match g {
            4 => _mm256_shuffle_epi8(times8_low, _mm256_and_si256(top, _mm256_set1_epi8(0x03))),
            5 => _mm256_shuffle_epi8(times8_next, _mm256_and_si256(top, _mm256_set1_epi8(0x0C))),
            6 => _mm256_srli_epi16(_mm256_and_si256(top, _mm256_set1_epi8(0x30)), 1),
            _ => _mm256_srli_epi16(_mm256_and_si256(top, _mm256_set1_epi8(0xC0u8 as i8)), 3),
        };
        _mm256_or_si256(low3, top2)
    })
}

#[derive(Clone, Copy, Default)]
struct Q4KHdr {
    /// `d · sc_j` and `dmin · m_j` for the eight pieces.
    sc: [f32; 8],
    mins: [f32; 8],
}

struct Q4K;
impl Fmt for Q4K {
    const SB_VALS: usize = 256;
    const SB_BYTES: usize = 144;
    const SIGNED: bool = false;
    const MINS: bool = true;
    const PANEL_G: usize = 8;
    type Hdr = Q4KHdr;
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn header(p: *const u8) -> Q4KHdr {
        // SAFETY: p points at a whole 144-byte super-block: d, dmin, 12 bytes of scales, 128 of nibbles.
        let (d, dmin, s) = unsafe {
            (
                f16_at(p),
                f16_at(p.add(2)),
                [0, 1, 2].map(|i| (p.add(4 + 4 * i) as *const u32).read_unaligned()),
            )
        };
        // `quantized::q4k_scale_min` for all eight pieces at once, four bytes a word: pieces 0..4 keep
        // the low six bits of bytes 0..4 (scales) and 4..8 (mins); pieces 4..8 take a nibble of bytes
        // 8..12 and the top two bits of bytes 0..4 or 4..8 above it. (The shifts carry bits across
        // bytes; the masks keep only each byte's own.) Eight scalar decodes, conversions and products
        // a scale and a min had been half of the decode kernel's instructions.
        let (low6, low4, top2) = (0x3F3F_3F3F_u32, 0x0F0F_0F0F_u32, 0x0303_0303_u32);
        let scales = [s[0] & low6, (s[2] & low4) | (((s[0] >> 6) & top2) << 4)];
        let mins = [
            s[1] & low6,
            ((s[2] >> 4) & low4) | (((s[1] >> 6) & top2) << 4),
        ];
        let widen = |w: [u32; 2], by: f32| {
            let bytes = _mm_cvtsi64_si128(((u64::from(w[1]) << 32) | u64::from(w[0])) as i64);
            _mm256_mul_ps(
                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)),
                _mm256_set1_ps(by),
            )
        };
        let mut h = Q4KHdr::default();
        // SAFETY: each array holds eight f32.
        unsafe {
            _mm256_storeu_ps(h.sc.as_mut_ptr(), widen(scales, d));
            _mm256_storeu_ps(h.mins.as_mut_ptr(), widen(mins, dmin));
        }
        h
    }
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn sub(p: *const u8, h: &Q4KHdr, j: usize) -> (__m256i, __m256) {
        // SAFETY: nibble bytes 16 + 32·(j/2) .. +32 lie within the 144-byte super-block (j < 8).
        let q = unsafe { load32(p.add(16 + 32 * (j / 2))) };
        let q = if j.is_multiple_of(2) {
            q
        } else {
            _mm256_srli_epi16(q, 4)
        };
        (
            _mm256_and_si256(q, _mm256_set1_epi8(0x0F)),
            _mm256_set1_ps(h.sc[j]),
        )
    }
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn scaled(h: &Q4KHdr, dx: *const f32) -> Option<[f32; 16]> {
        let mut t = [0f32; 16];
        // SAFETY: eight activation scales at dx (caller), eight f32 in `h.sc` and in `t`.
        unsafe {
            let p = _mm256_mul_ps(_mm256_loadu_ps(h.sc.as_ptr()), _mm256_loadu_ps(dx));
            _mm256_storeu_ps(t.as_mut_ptr(), p);
        }
        Some(t)
    }
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn piece_scale(s: &[f32; 16], j: usize) -> __m256 {
        _mm256_broadcast_ss(&s[j])
    }
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn mins(h: &Q4KHdr) -> __m256 {
        // SAFETY: reads the eight f32 of an array.
        unsafe { _mm256_loadu_ps(h.mins.as_ptr()) }
    }
    fn min(h: &Q4KHdr, j: usize) -> f32 {
        h.mins[j]
    }
}

struct Q6K;
impl Fmt for Q6K {
    const SB_VALS: usize = 256;
    const SB_BYTES: usize = 210;
    const SIGNED: bool = true;
    const MINS: bool = false;
    const ZERO: i8 = 32;
    const HALVES: bool = true;
    const PANEL_G: usize = 2;
    /// The sixteen scales times `d`, decoded once per super-block: one product per scale, in two
    /// vector multiplies, where each piece had converted and multiplied its two in scalar code.
    type Hdr = [f32; 16];
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn header(p: *const u8) -> [f32; 16] {
        // SAFETY: the sixteen i8 scales are bytes 192..208 of the 210-byte super-block, d the last two.
        let (sc, d) = unsafe {
            (
                _mm_loadu_si128(p.add(192) as *const __m128i),
                f16_at(p.add(208)),
            )
        };
        let d = _mm256_set1_ps(d);
        let lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc));
        let hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(sc, sc)));
        let mut h = [0f32; 16];
        // SAFETY: h holds sixteen f32.
        unsafe {
            _mm256_storeu_ps(h.as_mut_ptr(), _mm256_mul_ps(lo, d));
            _mm256_storeu_ps(h.as_mut_ptr().add(8), _mm256_mul_ps(hi, d));
        }
        h
    }
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn sub(p: *const u8, sd: &[f32; 16], j: usize) -> (__m256i, __m256) {
        // Piece j = 32k + 128h of the super-block: low 4 bits from ql[64h + 32(k & 1)..] (low nibble for
        // k < 2, high for k ≥ 2), high 2 bits from bits 2k, 2k+1 of qh[32h..]; scales 8h + 2k (values
        // 0..16) and 8h + 2k + 1 (values 16..32), that is 2j and 2j + 1, from the header.
        let (h, k) = (j / 4, j % 4);
        // SAFETY: the ql (0..128) and qh (128..192) offsets below stay within the block.
        let (ql, qh) = unsafe {
            (
                load32(p.add(64 * h + 32 * (k & 1))),
                load32(p.add(128 + 32 * h)),
            )
        };
        let m4 = _mm256_set1_epi8(0x0F);
        let lo = if k < 2 { ql } else { _mm256_srli_epi16(ql, 4) };
        let lo = _mm256_and_si256(lo, m4);
        let hi = _mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * k as i32));
        let hi = _mm256_slli_epi16(_mm256_and_si256(hi, _mm256_set1_epi8(3)), 4);
        let v = _mm256_sub_epi8(_mm256_or_si256(lo, hi), _mm256_set1_epi8(32));
        // The i32 lanes 0..4 hold values 0..16, lanes 4..8 values 16..32.
        let scale = _mm256_set_m128(_mm_set1_ps(sd[2 * j + 1]), _mm_set1_ps(sd[2 * j]));
        (v, scale)
    }
    /// Lane `m`: scale `m` (of sixteen values) times its piece's activation scale, that of block
    /// `m / 2`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn scaled(sd: &[f32; 16], dx: *const f32) -> Option<[f32; 16]> {
        let mut t = [0f32; 16];
        // SAFETY: eight activation scales at dx (caller), sixteen f32 in `sd` and in `t`.
        unsafe {
            let dx = _mm256_loadu_ps(dx);
            for half in 0..2 {
                let from = 4 * half as i32;
                let idx = _mm256_setr_epi32(
                    from,
                    from,
                    from + 1,
                    from + 1,
                    from + 2,
                    from + 2,
                    from + 3,
                    from + 3,
                );
                let p = _mm256_mul_ps(
                    _mm256_loadu_ps(sd.as_ptr().add(8 * half)),
                    _mm256_permutevar8x32_ps(dx, idx),
                );
                _mm256_storeu_ps(t.as_mut_ptr().add(8 * half), p);
            }
        }
        Some(t)
    }
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn piece_scale(s: &[f32; 16], j: usize) -> __m256 {
        _mm256_set_m128(_mm_broadcast_ss(&s[2 * j + 1]), _mm_broadcast_ss(&s[2 * j]))
    }
    #[inline]
    unsafe fn mins(_h: &[f32; 16]) -> __m256 {
        unreachable!()
    }
}

/// `v`, hidden from the optimiser: it would otherwise turn `splat(a) · splat(b)` into a scalar multiply
/// and a broadcast (two vector operations where one `vmulps` does).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn opaque(v: __m256) -> __m256 {
    // Miri runs no inline assembly; the block leaves the value as it is, so Miri checks the rest.
    #[cfg(miri)]
    return v;
    #[cfg(not(miri))]
    {
        let mut v = v;
        // SAFETY: an empty asm block that only names a register: no memory access, no effect.
        unsafe {
            std::arch::asm!("/* {0} */", inout(ymm_reg) v, options(pure, nomem, nostack, preserves_flags))
        };
        v
    }
}

/// The row loop of the decode kernels that take a row a super-block at a time: `out[r]` for `nrows`
/// rows of `nsb` super-blocks, `row_bytes` apart from `w`, where `superblock(row, s, acc)` adds
/// super-block `s` of the row starting at `row` to `acc`. Two chains per row (even and odd
/// super-blocks), so a super-block need not wait for the one before; added and summed at the row's end.
///
/// # Safety
/// `w` holds `nrows` rows of `row_bytes` bytes, `out` room for `nrows` values, and `superblock` may be
/// called with any row's start and `s < nsb`; the CPU has AVX2.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn rows_by_superblock(
    w: *const u8,
    row_bytes: usize,
    nrows: usize,
    nsb: usize,
    out: *mut f32,
    superblock: impl Fn(*const u8, usize, __m256) -> __m256,
) {
    for r in 0..nrows {
        let wr = w.wrapping_add(r * row_bytes);
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut s = 0;
        while s + 2 <= nsb {
            acc0 = superblock(wr, s, acc0);
            acc1 = superblock(wr, s + 1, acc1);
            s += 2;
        }
        if s < nsb {
            acc0 = superblock(wr, s, acc0);
        }
        // SAFETY: r < nrows.
        unsafe { out.add(r).write(hsum(_mm256_add_ps(acc0, acc1))) };
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// Decode's prefetch in an interleaved group's stream: the line `ahead` of `at` (one stream, the
/// groups one after another), asked for right before the loads of the line at `at`, and pinned there
/// ([`pinned_prefetch_t1`](crate::kernels::float_x86::pinned_prefetch_t1)). Compiled from the
/// intrinsic, a block's four (Q8_0) or three (Q5_0) prefetches sat side by side at the end of the
/// block before. Spread a line apart, `duet bench` alternated with the build before (2-core Xeon VM,
/// three pairs each): `--dtype q8_0` decode 63.7, 64.1, 63.9 against 60.8, 58.1, 59.1 tok/s; the
/// default model, Q8_0 spread, 72.3, 70.9, 70.8 against 68.0, 68.3, 69.1, then Q5_0 spread too, 77.5,
/// 77.8, 78.1 against 74.5, 72.2, 71.7. A hint: never faults, so it may point past the matrix.
///
/// Where the far hint goes into L2, a second one asks for the line [`PREFETCH`] ahead into L1, meant
/// to let the loads find their lines there rather than in L2 (as the F32 decode does,
/// `float_x86::dot_f32_decode`). `duet bench` of the default model on a 2-core Xeon VM, rotated
/// with the build before: 0.96–1.11× over eight rotations (median 1.05×, seven faster); `--dtype
/// q8_0` 1.00×, 1.01×. The near one 1 or 4 KiB ahead instead measured about the same (two rotations
/// each); adding a far `T1` to the Q4_K/Q6_K rows' near `T0` (`superblock`) 1.01–1.04× alone, 0.94×
/// beside this change: not kept.
#[inline(always)]
fn prefetch_group_line(at: *const u8) {
    crate::kernels::float_x86::pinned_prefetch_t1(at.wrapping_add(GROUP_PREFETCH_L2));
    crate::kernels::float_x86::pinned_prefetch_t0(at.wrapping_add(PREFETCH));
}

/// Every fourth block, the next line of an interleaved group's scales, pinned as [`prefetch_group_line`].
#[inline(always)]
fn prefetch_group_scales(scales: *const u8, b: usize) {
    if b.is_multiple_of(4) {
        crate::kernels::float_x86::pinned_prefetch_t1(scales.wrapping_add(16 * b + 512));
    }
}

/// A group's eight sums (row `r` in lane `r`) into its first `n` rows at `out`.
///
/// # Safety
/// `out` has room for `n ≤ 8` values; the CPU has AVX.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn store_group(acc: __m256, out: *mut f32, n: usize) {
    // SAFETY: n values at `out`, by the caller's promise.
    unsafe {
        if n == 8 {
            _mm256_storeu_ps(out, acc);
        } else {
            let mut v = [0f32; 8];
            _mm256_storeu_ps(v.as_mut_ptr(), acc);
            std::ptr::copy_nonoverlapping(v.as_ptr(), out, n);
        }
    }
}

/// The kernels of one instruction set: `$dot(u, s)` is the i32x8 of 4-byte dot products of unsigned
/// bytes `u` with signed bytes `s`. Expanded once for AVX2 and once for AVX-512 VNNI.
macro_rules! instruction_set {
    (
        $m:ident,
        $features:literal,
        dot: |$u:ident, $s:ident| $dot:expr,
        step: |$a16:ident, $w:ident, $x:ident| $step:expr,
        flush: |$a32:ident, $s16:ident| $flush:expr,
        q8: |$qa:ident, $qw:ident, $qx:ident| $q8:expr,
        q8_zero: $q8_zero:expr $(,)?
    ) => {
        mod $m {
            use super::*;

            /// Piece `j` of the super-block at `base` times the activations at block `b`: the i32 sums
            /// converted to f32, and the f32 scale of each lane (weight scale × activation scale).
            ///
            /// # Safety
            /// `base` points at a whole super-block, `a` holds block `b`; the CPU has `$features`.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn piece<F: Fmt>(
                base: *const u8,
                hdr: &F::Hdr,
                j: usize,
                a: ActPtr,
                b: usize,
                scaled: Option<&[f32; 16]>,
            ) -> (__m256, __m256) {
                // SAFETY: as the caller guarantees.
                let ((v, scale), xv) = unsafe {
                    (
                        F::sub(base, hdr, j),
                        _mm256_loadu_si256(a.qs.add(32 * b) as *const __m256i),
                    )
                };
                let (mag, xs) = if F::SIGNED {
                    (_mm256_sign_epi8(v, v), _mm256_sign_epi8(xv, v))
                } else {
                    (v, xv)
                };
                let isum = {
                    let ($u, $s) = (mag, xs);
                    $dot
                };
                let sd = match scaled {
                    // SAFETY: `scaled` holds this super-block's products (caller).
                    Some(t) => unsafe { F::piece_scale(t, j) },
                    // SAFETY: the activations hold block b (caller).
                    None => _mm256_mul_ps(scale, unsafe { _mm256_broadcast_ss(&*a.d.add(b)) }),
                };
                (_mm256_cvtepi32_ps(isum), sd)
            }

            /// Super-block `s` of the row at `w` times the activations, added to `acc`.
            ///
            /// # Safety
            /// The row holds super-block `s`, the activations its values; the CPU has `$features`.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn superblock<F: Fmt>(w: *const u8, s: usize, a: ActPtr, acc: __m256) -> __m256 {
                // SAFETY: super-block s lies within the row.
                let base = unsafe { w.add(s * F::SB_BYTES) };
                // A prefetch is a hint and never faults, so it may point past the row (`wrapping_add`).
                for off in (0..F::SB_BYTES).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(PREFETCH + off) as *const i8);
                }
                // SAFETY: base points at a whole super-block.
                let hdr = unsafe { F::header(base) };
                // The K-quants' eight piece scales times the activations', in one or two multiplies
                // rather than one a piece, the same products. On AVX2 (a 2-core Xeon VM, 896 × 4864
                // in cache, alternated 2000 times in one process): Q4_K 1.12× and 1.13× as fast,
                // Q6_K 1.03× and 1.09×.
                // SAFETY: the activations hold the SUBS block scales of super-block s.
                let scaled = unsafe { F::scaled(&hdr, a.d.add(s * F::SUBS)) };
                // Two chains, so a piece need not wait for the previous one's FMA.
                let (mut p0, mut p1) = (acc, _mm256_setzero_ps());
                for j in 0..F::SUBS {
                    // SAFETY: j < SUBS; the activations hold every block of super-block s.
                    let (c, sd) =
                        unsafe { piece::<F>(base, &hdr, j, a, s * F::SUBS + j, scaled.as_ref()) };
                    if j % 2 == 0 {
                        p0 = _mm256_fmadd_ps(c, sd, p0);
                    } else {
                        p1 = _mm256_fmadd_ps(c, sd, p1);
                    }
                }
                if F::MINS {
                    // SAFETY: the eight block sums of super-block s exist; hdr is this format's.
                    let (mv, sx) = unsafe { (F::mins(&hdr), _mm256_loadu_ps(a.sums.add(8 * s))) };
                    p0 = _mm256_fnmadd_ps(mv, sx, p0);
                }
                if F::SUBS > 1 {
                    _mm256_add_ps(p0, p1)
                } else {
                    p0
                }
            }

            /// Decode: `out[r] = row r · a` for `nrows` consecutive rows of `row_bytes` bytes from `w`,
            /// one row at a time (a single sequential stream for the hardware prefetcher), two
            /// accumulator chains per row.
            ///
            /// # Safety
            /// `w` holds `nrows` rows of `nsb` super-blocks, `out` has room for `nrows` values, the
            /// activations hold `nsb` super-blocks' worth of blocks; the CPU has `$features`.
            #[target_feature(enable = $features)]
            pub unsafe fn rows<F: Fmt>(
                w: *const u8,
                row_bytes: usize,
                nrows: usize,
                a: ActPtr,
                nsb: usize,
                out: *mut f32,
            ) {
                // SAFETY: as the caller guarantees; each call gets a row's start and an s < nsb.
                unsafe {
                    rows_by_superblock(w, row_bytes, nrows, nsb, out, |wr, s, acc| {
                        superblock::<F>(wr, s, a, acc)
                    })
                }
            }

            /// The i32 sums of one block of eight rows held as a panel holds them (`g`: values
            /// `4k..4k + 4` of row `r` in lane `r` of register `k`, unsigned) times a block of the
            /// activations: per four-value group `gi` the token's four values broadcast (`x(gi)`) and
            /// `$step`, flushed every `g16` groups.
            ///
            /// # Safety
            /// The CPU has `$features`.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn block_sums8(
                g: &[__m256i; 8],
                g16: usize,
                x: impl Fn(usize) -> __m256i,
            ) -> __m256i {
                let mut a32 = _mm256_setzero_si256();
                for c in 0..8 / g16 {
                    let mut a16 = _mm256_setzero_si256();
                    for k in 0..g16 {
                        let gi = c * g16 + k;
                        let ($a16, $w, $x) = (a16, g[gi], x(gi));
                        a16 = $step;
                    }
                    let ($a32, $s16) = (a32, a16);
                    a32 = $flush;
                }
                a32
            }

            /// Values `4gi..4gi + 4` of block `b` of the activations, broadcast to every lane.
            ///
            /// # Safety
            /// The activations hold block `b`, `gi < 8`; the CPU has `$features`.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn group_broadcast(a: ActPtr, b: usize, gi: usize) -> __m256i {
                // SAFETY: values 32b + 4gi .. + 4 of the activations, by the caller's promise.
                _mm256_set1_epi32(unsafe {
                    (a.qs.add(32 * b + 4 * gi) as *const i32).read_unaligned()
                })
            }

            /// Decode of a [`Rows8`] format (Q5_0 in the file's layout; the native form holds it
            /// interleaved on x86, see `rows_interleaved_q5_0`): `out[r] = row r · a` for `nrows`
            /// consecutive rows,
            /// eight at a time decoded into a panel's layout in registers — row `r` in lane `r` — and
            /// multiplied as [`panel_tile`] does, the token's four activations broadcast per group.
            /// Per eight row blocks that is one decode of the eight, eight multiplies, one widening
            /// per `PANEL_G` groups and one scaling, where a row at a time needs eight of each and the
            /// sign trick.
            ///
            /// # Safety
            /// As [`rows`].
            #[target_feature(enable = $features)]
            pub unsafe fn rows8<F: Rows8>(
                w: *const u8,
                row_bytes: usize,
                nrows: usize,
                a: ActPtr,
                nsb: usize,
                out: *mut f32,
            ) {
                const { assert!(F::SUBS == 1 && F::PANEL_G > 0 && !F::MINS && !F::HALVES) };
                let g16 = F::PANEL_G;
                let zero = _mm256_set1_ps(F::ZERO as f32);
                let nta = crate::kernels::float_x86::decode_prefetch_nta();
                for r0 in (0..nrows).step_by(8) {
                    let n = (nrows - r0).min(8);
                    // Lanes past the last row repeat it; only n are stored.
                    // SAFETY: rows r0..r0 + n exist.
                    let base: [*const u8; 8] =
                        std::array::from_fn(|r| unsafe { w.add((r0 + r.min(n - 1)) * row_bytes) });
                    let mut acc = _mm256_setzero_ps();
                    for b in 0..nsb {
                        // SAFETY: block b of every row lies within it.
                        let p: [*const u8; 8] =
                            std::array::from_fn(|r| unsafe { base[r].add(b * F::SB_BYTES) });
                        // The next eight rows (contiguous), at the pace these are read: one
                        // sequential stream ahead of the kernel's eight. Without it, this read
                        // 4.4 GB/s from DRAM where one row at a time reads 11 (a hint; never faults).
                        // Non-temporal on AMD only, as the float decode's (`decode_prefetch_nta`):
                        // on the Zen 3 host `native` decoded 1.041× and 1.044× as fast as with `T0`
                        // (16 of 24, 9 of 16 pairs faster); on the Xeon host `T0` ran 1.087× and
                        // 1.029× as fast (medians of 12 rounds of 8 tokens alternated in one
                        // process, faster in 12 and 10). The same hint in the row-at-a-time kernel
                        // changed nothing measurable for `--dtype q8_0` on Zen 3 (0.997×, 1.029×),
                        // so that one keeps `T0`.
                        let next = base[0].wrapping_add(8 * row_bytes + 8 * b * F::SB_BYTES);
                        for off in (0..8 * F::SB_BYTES).step_by(64) {
                            let at = next.wrapping_add(off) as *const i8;
                            crate::kernels::float_x86::decode_prefetch::<_MM_HINT_T0>(at, nta);
                        }
                        // SAFETY: as above.
                        let (g, s) = unsafe {
                            (
                                F::piece8(&p),
                                F::panel_scales(&p, 0).expect("a Rows8 format gathers its scales"),
                            )
                        };
                        // SAFETY: block b of the activations.
                        let a32 = unsafe { block_sums8(&g, g16, |gi| group_broadcast(a, b, gi)) };
                        // SAFETY: block b's scale and sum.
                        let (d, sum) = unsafe {
                            (
                                _mm256_broadcast_ss(&*a.d.add(b)),
                                _mm256_broadcast_ss(&*a.sums.add(b)),
                            )
                        };
                        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a32), _mm256_mul_ps(s, d), acc);
                        acc = _mm256_fnmadd_ps(_mm256_mul_ps(s, zero), sum, acc);
                    }
                    let mut v = [0f32; 8];
                    // SAFETY: eight f32; rows r0..r0 + n of `out`.
                    unsafe {
                        _mm256_storeu_ps(v.as_mut_ptr(), acc);
                        std::ptr::copy_nonoverlapping(v.as_ptr(), out.add(r0), n);
                    }
                }
            }

            /// Decode of interleaved Q8_0 (see `quantized::interleave_q8_0`): `out[r] = row r · a` for
            /// `ngroups` groups of eight rows at `w`, `nb` blocks a row; only the first `nrows` rows
            /// are written. Per block of a group: the token's four activations broadcast per
            /// four-value group and `$q8` on the eight rows' values (`Σ (q + 128) · x` with VNNI, or
            /// `Σ q · x` with the sign trick on AVX2, where the pair sums of `q + 128` would overflow),
            /// then one conversion and scaling for eight rows and, with VNNI, `128 · d · Σ x` off.
            ///
            /// # Safety
            /// `w` holds `ngroups` groups of `nb` blocks, `out` room for `nrows ≤ 8 · ngroups`
            /// values, the activations `nb` blocks; the CPU has `$features`.
            #[target_feature(enable = $features)]
            pub unsafe fn rows_interleaved(
                w: *const u8,
                ngroups: usize,
                nb: usize,
                a: ActPtr,
                nrows: usize,
                out: *mut f32,
            ) {
                let zero = _mm256_set1_ps($q8_zero);
                for g8 in 0..ngroups {
                    // SAFETY (for the offsets below): group g8 < ngroups of nb blocks.
                    let values = unsafe { w.add(g8 * nb * 272) };
                    let scales = values.wrapping_add(nb * 256);
                    // Two sums, so a block's scaling need not wait for the previous one's.
                    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                    for b in 0..nb {
                        let v = values.wrapping_add(256 * b);
                        prefetch_group_scales(scales, b);
                        // Two chains of four multiply-adds, not one of eight.
                        let (mut s0, mut s1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                        for g in (0..8).step_by(2) {
                            // Each line's prefetch right before that line's loads.
                            prefetch_group_line(v.wrapping_add(32 * g));
                            // SAFETY: groups g, g + 1 of block b, and values 4g .. 4g + 8 of block
                            // b of the activations.
                            let (w0, w1, x0, x1) = unsafe {
                                let x = a.qs.add(32 * b + 4 * g) as *const i32;
                                (
                                    _mm256_loadu_si256(v.add(32 * g) as *const __m256i),
                                    _mm256_loadu_si256(v.add(32 * g + 32) as *const __m256i),
                                    _mm256_set1_epi32(x.read_unaligned()),
                                    _mm256_set1_epi32(x.add(1).read_unaligned()),
                                )
                            };
                            s0 = {
                                let ($qa, $qw, $qx) = (s0, w0, x0);
                                $q8
                            };
                            s1 = {
                                let ($qa, $qw, $qx) = (s1, w1, x1);
                                $q8
                            };
                        }
                        // SAFETY: block b's eight scales; its activation scale and sum.
                        let (sc, d, sum) = unsafe {
                            (
                                _mm256_cvtph_ps(_mm_loadu_si128(
                                    scales.add(16 * b) as *const __m128i
                                )),
                                _mm256_broadcast_ss(&*a.d.add(b)),
                                _mm256_broadcast_ss(&*a.sums.add(b)),
                            )
                        };
                        let isum = _mm256_cvtepi32_ps(_mm256_add_epi32(s0, s1));
                        acc0 = _mm256_fmadd_ps(isum, _mm256_mul_ps(sc, d), acc0);
                        if $q8_zero != 0.0 {
                            acc1 = _mm256_fnmadd_ps(_mm256_mul_ps(sc, zero), sum, acc1);
                        }
                    }
                    let acc = _mm256_add_ps(acc0, acc1);
                    // SAFETY: rows 8 · g8 .. min(8 · g8 + 8, nrows) of `out`.
                    unsafe { store_group(acc, out.add(8 * g8), (nrows - 8 * g8).min(8)) };
                }
            }

            /// Decode of interleaved Q5_0 (see `quantized::interleave_q5_0`): `out[r] = row r · a`
            /// for `ngroups` groups of eight rows at `w`, `nb` blocks a row; only the first `nrows`
            /// rows are written. Per block of a group: its values ([`q5_0_group_values`]), per
            /// four-value group the token's four activations broadcast and `$step` on the eight rows'
            /// values, then one conversion and scaling for eight rows and `16 · d · Σ x` off (the
            /// stored values are `q + 16`).
            ///
            /// # Safety
            /// `w` holds `ngroups` groups of `nb` blocks, `out` room for `nrows ≤ 8 · ngroups`
            /// values, the activations `nb` blocks; the CPU has `$features`.
            #[target_feature(enable = $features)]
            pub unsafe fn rows_interleaved_q5_0<const WIDE: bool>(
                w: *const u8,
                ngroups: usize,
                nb: usize,
                a: ActPtr,
                wide: *const __m256i,
                nrows: usize,
                out: *mut f32,
            ) {
                let g16 = Q5_0::PANEL_G;
                let zero = _mm256_set1_ps(Q5_0::ZERO as f32);
                for g8 in 0..ngroups {
                    // SAFETY (for the offsets below): group g8 < ngroups of nb blocks.
                    let values = unsafe { w.add(g8 * nb * 8 * Q5_0::SB_BYTES) };
                    let scales = values.wrapping_add(nb * 160);
                    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                    for b in 0..nb {
                        let v = values.wrapping_add(160 * b);
                        prefetch_group_scales(scales, b);
                        // The block's 2.5 lines: two asked for before its loads, the third after
                        // its sums, so that the prefetches stay spread among the loads.
                        prefetch_group_line(v);
                        prefetch_group_line(v.wrapping_add(64));
                        // SAFETY: block b's 160 bytes of values.
                        let q = unsafe { q5_0_group_values(v) };
                        // SAFETY: block b of the activations, and with `WIDE` its eight registers
                        // (`broadcast_acts`).
                        let a32 = unsafe {
                            if WIDE {
                                block_sums8(&q, g16, |gi| _mm256_load_si256(wide.add(8 * b + gi)))
                            } else {
                                block_sums8(&q, g16, |gi| group_broadcast(a, b, gi))
                            }
                        };
                        prefetch_group_line(v.wrapping_add(128));
                        // SAFETY: block b's eight scales; its activation scale and sum.
                        let (sc, d, sum) = unsafe {
                            (
                                _mm256_cvtph_ps(_mm_loadu_si128(
                                    scales.add(16 * b) as *const __m128i
                                )),
                                _mm256_broadcast_ss(&*a.d.add(b)),
                                _mm256_broadcast_ss(&*a.sums.add(b)),
                            )
                        };
                        // The zero point off within the block: two sums (the products' and the
                        // zero point's) would each grow to ~16× what their difference is.
                        let off = _mm256_mul_ps(_mm256_mul_ps(sc, zero), sum);
                        let blk =
                            _mm256_fmsub_ps(_mm256_cvtepi32_ps(a32), _mm256_mul_ps(sc, d), off);
                        if b % 2 == 0 {
                            acc0 = _mm256_add_ps(acc0, blk);
                        } else {
                            acc1 = _mm256_add_ps(acc1, blk);
                        }
                    }
                    let acc = _mm256_add_ps(acc0, acc1);
                    // SAFETY: rows 8 · g8 .. min(8 · g8 + 8, nrows) of `out`.
                    unsafe { store_group(acc, out.add(8 * g8), (nrows - 8 * g8).min(8)) };
                }
            }

            /// Prefill: `out[r][t] = w[r] · a[t]` for `R` rows × `T` tokens; each decoded piece of a
            /// weight row serves all `T` tokens.
            ///
            /// # Safety
            /// Every `w[r]` points at `nsb` super-blocks; every activation row holds `nsb · SB_VALS`
            /// values, their scales and sums; the CPU has `$features`.
            #[target_feature(enable = $features)]
            pub unsafe fn tile<F: Fmt, const R: usize, const T: usize>(
                w: [*const u8; R],
                a: [ActPtr; T],
                nsb: usize,
            ) -> [[f32; T]; R] {
                let mut acc = [[_mm256_setzero_ps(); T]; R];
                for s in 0..nsb {
                    let mut hdr = [F::Hdr::default(); R];
                    let mut base = [std::ptr::null::<u8>(); R];
                    for r in 0..R {
                        // SAFETY: s < nsb, so super-block s lies within row r.
                        base[r] = unsafe { w[r].add(s * F::SB_BYTES) };
                        // SAFETY: base[r] points at a whole super-block.
                        hdr[r] = unsafe { F::header(base[r]) };
                    }
                    for j in 0..F::SUBS {
                        let b = s * F::SUBS + j;
                        let mut wv = [_mm256_setzero_si256(); R];
                        let mut mag = [_mm256_setzero_si256(); R];
                        let mut sc = [_mm256_setzero_ps(); R];
                        for r in 0..R {
                            // SAFETY: as above; j < SUBS.
                            let (v, scale) = unsafe { F::sub(base[r], &hdr[r], j) };
                            wv[r] = v;
                            sc[r] = opaque(scale);
                            mag[r] = if F::SIGNED { _mm256_sign_epi8(v, v) } else { v };
                        }
                        for t in 0..T {
                            // SAFETY: block b < nsb · SUBS of each activation row: 32 values, one scale.
                            let (xv, dx) = unsafe {
                                (
                                    _mm256_loadu_si256(a[t].qs.add(32 * b) as *const __m256i),
                                    _mm256_broadcast_ss(&*a[t].d.add(b)),
                                )
                            };
                            for r in 0..R {
                                let xs = if F::SIGNED {
                                    _mm256_sign_epi8(xv, wv[r])
                                } else {
                                    xv
                                };
                                let isum = {
                                    let ($u, $s) = (mag[r], xs);
                                    $dot
                                };
                                acc[r][t] = _mm256_fmadd_ps(
                                    _mm256_cvtepi32_ps(isum),
                                    _mm256_mul_ps(sc[r], dx),
                                    acc[r][t],
                                );
                            }
                        }
                    }
                    if F::MINS {
                        for r in 0..R {
                            // SAFETY: hdr[r] came from this format's header.
                            let mv = unsafe { F::mins(&hdr[r]) };
                            for t in 0..T {
                                // SAFETY: the eight block sums of super-block s exist in each row.
                                let sx = unsafe { _mm256_loadu_ps(a[t].sums.add(8 * s)) };
                                acc[r][t] = _mm256_fnmadd_ps(mv, sx, acc[r][t]);
                            }
                        }
                    }
                }
                let mut out = [[0f32; T]; R];
                for r in 0..R {
                    for t in 0..T {
                        out[r][t] = hsum(acc[r][t]);
                    }
                }
                out
            }

            /// Prefill on a [`Panel`]: tokens `t0..t0 + T` times the panel's eight rows, row `r` in lane `r`
            /// of every register, into `out[t · os + r]` for `r < n`.
            ///
            /// Per 4-value group `g` of piece `b`, one register holds the eight rows' four bytes and the
            /// token's four activations are broadcast to every lane, so one `$step` does four values of
            /// eight row × token products, and the sums come out one row per lane: no horizontal adds,
            /// and the conversion and scaling happen once per unit (a piece, or a half-piece when
            /// `F::HALVES`) for eight rows. On AVX2 `$step` adds `vpmaddubsw`'s i16 pairs for
            /// `F::PANEL_G` groups before widening them (`$flush`): as many as the format's value range
            /// allows without overflowing i16. A zero point comes off in the integers: each unit's
            /// sums start at `-zero · Σ x` (`PanelActs::zero_sums`). Against taking off
            /// `zero · scale · (dx · Σ x)` after the scaling, as the mins still are (`m · (dx · Σ x)`),
            /// that is one fused multiply-add and two operands fewer per token and unit: with the
            /// sums no longer spilled, 46-character labels ran 1.072× as fast (seven of eight,
            /// alternated in batch mode on a 2-core Zen 3 VM), and the sums are exact until they are
            /// scaled.
            ///
            /// # Safety
            /// `p` describes a panel of `F` filled with `nb` pieces; the activations hold tokens
            /// `t0..t0 + T` (`nb` blocks and the sums of their units each); `out` has room for those
            /// tokens (stride `os`) of `n ≤ 8` rows; the CPU has `$features`.
            #[target_feature(enable = $features)]
            #[inline]
            pub unsafe fn panel_tile<F: Fmt, const T: usize>(
                p: &PanelPtr,
                a: &PanelActPtr,
                t0: usize,
                out: *mut f32,
                os: usize,
                n: usize,
            ) {
                const { assert!(F::PANEL_G > 0) };
                let (units, g16) = (if F::HALVES { 2 } else { 1 }, F::PANEL_G);
                let gu = 8 / units;
                // The span of tokens t0..t0 + T, interleaved per block (see `PanelActs`).
                // SAFETY (for the offsets below): the span lies within the activations.
                let (xq, dx, sx, zx) = unsafe {
                    (
                        a.qs.add(t0 * 32 * p.nb),
                        a.d.add(t0 * p.nb),
                        a.sums.add(t0 * p.nb * units),
                        a.zero_sums.add(t0 * p.nb * units),
                    )
                };
                let mut acc = [_mm256_setzero_ps(); T];
                for b in 0..p.nb {
                    // The next panel's lines for this block (see `Panel::run_to`); a hint, never faults.
                    let first = (p.blocks_before + b) * p.per_block;
                    for i in first..(first + p.per_block).min(p.lines) {
                        let line = p.next.wrapping_add((i % 8) * p.row_bytes + 64 * (i / 8));
                        _mm_prefetch::<_MM_HINT_T0>(line as *const i8);
                    }
                    for u in 0..units {
                        let unit = units * b + u;
                        // Without mins, each token's sums start at `-zero · Σ x`: the zero point
                        // comes off in the integers, not as a product added after the scaling.
                        let mut a32: [__m256i; T] = std::array::from_fn(|t| {
                            if F::MINS {
                                _mm256_setzero_si256()
                            } else {
                                // SAFETY: unit < nb · units of each token's sums.
                                _mm256_set1_epi32(unsafe { *zx.add(T * unit + t) })
                            }
                        });
                        for c in 0..gu / g16 {
                            let mut a16 = [_mm256_setzero_si256(); T];
                            for k in 0..g16 {
                                let g = u * gu + c * g16 + k;
                                // SAFETY: b < nb and g < 8: within the panel's 8 · nb groups.
                                let $w = unsafe { *p.w.add(8 * b + g) };
                                for t in 0..T {
                                    // SAFETY: values 4g .. + 4 of block b of token t0 + t.
                                    let $x = _mm256_set1_epi32(unsafe {
                                        (xq.add(32 * (T * b + t) + 4 * g) as *const i32)
                                            .read_unaligned()
                                    });
                                    let $a16 = a16[t];
                                    a16[t] = $step;
                                }
                            }
                            for t in 0..T {
                                let ($a32, $s16) = (a32[t], a16[t]);
                                a32[t] = $flush;
                            }
                        }
                        // SAFETY: unit < nb · units of the panel and of each token's sums.
                        let s = unsafe { *p.s.add(unit) };
                        for t in 0..T {
                            // SAFETY: as above; block b of token t0 + t.
                            let d = unsafe { _mm256_broadcast_ss(&*dx.add(T * b + t)) };
                            acc[t] = _mm256_fmadd_ps(
                                _mm256_cvtepi32_ps(a32[t]),
                                _mm256_mul_ps(s, d),
                                acc[t],
                            );
                            if F::MINS {
                                // SAFETY: as above.
                                let (m, sum) = unsafe {
                                    (*p.m.add(unit), _mm256_broadcast_ss(&*sx.add(T * unit + t)))
                                };
                                acc[t] = _mm256_fnmadd_ps(m, sum, acc[t]);
                            }
                        }
                    }
                }
                for (t, acc) in acc.iter().enumerate() {
                    // SAFETY: row r < n of token t0 + t is within `out`.
                    unsafe {
                        let o = out.add((t0 + t) * os);
                        if n == 8 {
                            _mm256_storeu_ps(o, *acc);
                        } else {
                            let mut v = [0f32; 8];
                            _mm256_storeu_ps(v.as_mut_ptr(), *acc);
                            std::ptr::copy_nonoverlapping(v.as_ptr(), o, n);
                        }
                    }
                }
            }
        }
    };
}

instruction_set!(
    avx2,
    "avx2,fma,f16c",
    dot: |u, s| _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)),
    step: |acc, w, x| _mm256_add_epi16(acc, _mm256_maddubs_epi16(w, x)),
    flush: |acc, s16| _mm256_add_epi32(acc, _mm256_madd_epi16(s16, _mm256_set1_epi16(1))),
    q8: |acc, w, x| {
        let q = _mm256_xor_si256(w, _mm256_set1_epi8(-128));
        let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(x, q));
        _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    },
    q8_zero: 0.0,
);
// VNNI accumulates in i32 as it goes: its `step` cannot overflow, and `flush` only adds.
instruction_set!(
    vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    dot: |u, s| _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s),
    step: |acc, w, x| _mm256_dpbusd_epi32(acc, w, x),
    flush: |acc, s| _mm256_add_epi32(acc, s),
    q8: |acc, w, x| _mm256_dpbusd_epi32(acc, w, x),
    q8_zero: 128.0,
);

/// Checks that `backend` runs here (AVX2 when not VNNI): the condition for calling its kernels.
fn check_features(backend: Backend) {
    match backend {
        Backend::Avx512Vnni | Backend::Amx => {
            assert!(has_avx512vnni(), "AVX-512 VNNI is not available")
        }
        _ => assert!(has_avx2(), "AVX2/FMA/F16C are not available"),
    }
}

fn act_ptr(a: &ActRow, vals: usize) -> ActPtr {
    // These checks make the raw-pointer reads in the kernels sound.
    assert!(a.qs.len() >= vals && a.d.len() >= vals / 32 && a.sums.len() >= vals / 32);
    ActPtr {
        qs: a.qs.as_ptr(),
        d: a.d.as_ptr(),
        sums: a.sums.as_ptr(),
    }
}

fn run_tile<F: Fmt, const R: usize, const T: usize>(
    backend: Backend,
    w: [&[u8]; R],
    a: [ActRow; T],
) -> [[f32; T]; R] {
    let nsb = w[0].len() / F::SB_BYTES;
    assert!(w.iter().all(|r| r.len() == nsb * F::SB_BYTES));
    let ap = a.map(|a| act_ptr(&a, nsb * F::SB_VALS));
    let wp = w.map(|r| r.as_ptr());
    check_features(backend);
    match backend {
        // SAFETY: lengths and CPU features checked above.
        Backend::Avx512Vnni | Backend::Amx => unsafe { vnni::tile::<F, R, T>(wp, ap, nsb) },
        // SAFETY: lengths and CPU features checked above.
        _ => unsafe { avx2::tile::<F, R, T>(wp, ap, nsb) },
    }
}

/// A decode kernel's arguments, after the checks that make its raw-pointer reads sound: rows, their
/// count, the activations, super-blocks per row, the output.
fn rows_args<F: Fmt>(
    backend: Backend,
    w: &[u8],
    row_bytes: usize,
    a: ActRow,
    out: &mut [f32],
) -> (*const u8, usize, ActPtr, usize, *mut f32) {
    let nsb = row_bytes / F::SB_BYTES;
    assert!(row_bytes == nsb * F::SB_BYTES && w.len() == out.len() * row_bytes);
    let ap = act_ptr(&a, nsb * F::SB_VALS);
    check_features(backend);
    (w.as_ptr(), out.len(), ap, nsb, out.as_mut_ptr())
}

fn run_rows<F: Fmt>(backend: Backend, w: &[u8], row_bytes: usize, a: ActRow, out: &mut [f32]) {
    let (wp, n, ap, nsb, op) = rows_args::<F>(backend, w, row_bytes, a, out);
    match backend {
        // SAFETY: `rows_args` checked the lengths and CPU features.
        Backend::Avx512Vnni | Backend::Amx => unsafe {
            vnni::rows::<F>(wp, row_bytes, n, ap, nsb, op)
        },
        // SAFETY: as above.
        _ => unsafe { avx2::rows::<F>(wp, row_bytes, n, ap, nsb, op) },
    }
}

fn run_rows8<F: Rows8>(backend: Backend, w: &[u8], row_bytes: usize, a: ActRow, out: &mut [f32]) {
    let (wp, n, ap, nsb, op) = rows_args::<F>(backend, w, row_bytes, a, out);
    match backend {
        // SAFETY: `rows_args` checked the lengths and CPU features.
        Backend::Avx512Vnni | Backend::Amx => unsafe {
            vnni::rows8::<F>(wp, row_bytes, n, ap, nsb, op)
        },
        // SAFETY: as above.
        _ => unsafe { avx2::rows8::<F>(wp, row_bytes, n, ap, nsb, op) },
    }
}

/// A K-quant format's decode in 512-bit vectors ([`rows_k512`]): two 32-value pieces of a super-block
/// in one register, piece `2i` in the low eight i32 lanes of their sums and `2i + 1` in the high eight.
trait KPairs: Fmt {
    /// Per pair `i`, the lane of [`Fmt::scaled`]'s sixteen products that each of its sixteen i32
    /// lanes takes.
    const SCALE_IDX: [[i32; 16]; 4];
    /// Pair `i`'s i32 sums with the activations `x` (the pair's 64 bytes): the same sums as the row
    /// kernel's `piece` makes of each piece, in the low and high eight lanes.
    ///
    /// # Safety
    /// `p` points at a whole super-block, `i < 4`; the CPU has AVX-512 F, BW and VNNI.
    unsafe fn pair_sums(p: *const u8, i: usize, x: __m512i) -> __m512i;
}

/// Per pair `i`, for every lane, `2i + lane / group` (lane `group` wide runs of the same scale).
const fn scale_idx(per_pair: usize, group: usize) -> [[i32; 16]; 4] {
    let mut t = [[0i32; 16]; 4];
    let mut i = 0;
    while i < 4 {
        let mut l = 0;
        while l < 16 {
            t[i][l] = (per_pair * i + l / group) as i32;
            l += 1;
        }
        i += 1;
    }
    t
}

impl KPairs for Q4K {
    /// One scale a piece: piece `2i`'s in the low eight lanes, `2i + 1`'s in the high eight.
    const SCALE_IDX: [[i32; 16]; 4] = scale_idx(2, 8);
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn pair_sums(p: *const u8, i: usize, x: __m512i) -> __m512i {
        // Pieces 2i and 2i + 1 are the low and the high nibbles of the same 32 bytes: those bytes in
        // both halves, the high half's 16-bit words shifted down by four, then every byte masked.
        // SAFETY: bytes 16 + 32i .. + 32 lie within the 144-byte super-block (i < 4).
        let q = unsafe { _mm512_broadcast_i64x4(load32(p.add(16 + 32 * i))) };
        let q = _mm512_mask_srli_epi16(q, 0xFFFF_0000, q, 4);
        let v = _mm512_and_si512(q, _mm512_set1_epi8(0x0F));
        _mm512_dpbusd_epi32(_mm512_setzero_si512(), v, x)
    }
}

impl KPairs for Q6K {
    /// Two scales a piece, one per sixteen values (i32 lanes 0..4 and 4..8 of a piece's sums).
    const SCALE_IDX: [[i32; 16]; 4] = scale_idx(4, 4);
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn pair_sums(p: *const u8, i: usize, x: __m512i) -> __m512i {
        // Pieces 32k + 128h for k = 2(i % 2) + (0, 1) and h = i / 2: low four bits from the 64 bytes
        // ql[64h..] (the low nibbles for k < 2, the high ones for k ≥ 2), each piece's high two from
        // bits 2k, 2k + 1 of the same 32 bytes qh[32h..], moved to bits 4 and 5.
        let (h, k0) = (i / 2, 2 * (i % 2));
        // SAFETY: ql (0..128) and qh (128..192) offsets within the block (i < 4).
        let (ql, qh) = unsafe {
            (
                _mm512_loadu_si512(p.add(64 * h).cast()),
                _mm512_broadcast_i64x4(load32(p.add(128 + 32 * h))),
            )
        };
        let lo = if k0 == 0 {
            ql
        } else {
            _mm512_srli_epi16(ql, 4)
        };
        // Bits 2k, 2k + 1 of each byte to bits 4, 5: the 16-bit words shifted left by 4 - 2k for
        // k < 2, right by 2k - 4 for k ≥ 2 (piece 2i's count in the low half, 2i + 1's in the high
        // half); the mask drops the bits shifted in from the neighbouring byte.
        let counts = |lo: i16, hi: i16| {
            _mm512_inserti64x4::<1>(_mm512_set1_epi16(lo), _mm256_set1_epi16(hi))
        };
        let hi = if k0 == 0 {
            _mm512_sllv_epi16(qh, counts(4, 2))
        } else {
            _mm512_srlv_epi16(qh, counts(0, 2))
        };
        let hi = _mm512_and_si512(hi, _mm512_set1_epi8(0x30));
        // (lo & 0x0F) | hi: the stored value, 0..63.
        let v = _mm512_ternarylogic_epi32::<0xEA>(lo, _mm512_set1_epi8(0x0F), hi);
        // Σ (v - 32) · x = Σ v · x - 32 · Σ x, four values a lane: the same i32 sums as the sign trick.
        _mm512_sub_epi32(
            _mm512_dpbusd_epi32(_mm512_setzero_si512(), v, x),
            _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(32), x),
        )
    }
}

/// Decode of K-quant rows (Q4_K, Q6_K) where the CPU has AVX-512 VNNI: `out[r] = row r · a`, the
/// same sums as `vnni::rows`, bit for bit. That kernel takes a piece of 32 values at a time in 256-bit
/// vectors; here a pair of pieces shares each instruction, and each pair takes its scales from the
/// super-block's products ([`Fmt::scaled`]) by one permute. The row kernel's two accumulator chains
/// per super-block (even pieces, odd pieces) are the low and high halves of one register, added in
/// the same order.
///
/// # Safety
/// As `vnni::rows`: `w` holds `nrows` rows of `nsb` super-blocks of `row_bytes` bytes, `out` room for
/// `nrows` values, the activations `nsb` super-blocks' values; the CPU has AVX-512 F, BW, VL, VNNI.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn rows_k512<F: KPairs>(
    w: *const u8,
    row_bytes: usize,
    nrows: usize,
    a: ActPtr,
    nsb: usize,
    out: *mut f32,
) {
    const { assert!(F::SUBS == 8) };
    // Super-block `s` of the row at `wr`, added to `acc` as `superblock` adds it.
    let superblock = |wr: *const u8, s: usize, acc: __m256| {
        let base = wr.wrapping_add(s * F::SB_BYTES);
        for off in (0..F::SB_BYTES).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(PREFETCH + off) as *const i8);
        }
        // SAFETY: super-block s lies within the row, the activations hold its values (caller).
        unsafe {
            let hdr = F::header(base);
            let scaled = F::scaled(&hdr, a.d.add(8 * s))
                .unwrap_or_else(|| unreachable!("the K-quants scale a super-block at once"));
            let scaled = _mm512_loadu_ps(scaled.as_ptr());
            // The even pieces' chain starts at `acc`, the odd pieces' at zero.
            let mut p = _mm512_zextps256_ps512(acc);
            for i in 0..4 {
                let x = _mm512_loadu_si512(a.qs.add(F::SB_VALS * s + 64 * i).cast());
                let sums = _mm512_cvtepi32_ps(F::pair_sums(base, i, x));
                let idx = _mm512_loadu_si512(F::SCALE_IDX[i].as_ptr().cast());
                p = _mm512_fmadd_ps(sums, _mm512_permutexvar_ps(idx, scaled), p);
            }
            let mut p0 = _mm512_castps512_ps256(p);
            if F::MINS {
                p0 = _mm256_fnmadd_ps(F::mins(&hdr), _mm256_loadu_ps(a.sums.add(8 * s)), p0);
            }
            let p1 = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(p)));
            _mm256_add_ps(p0, p1)
        }
    };
    // SAFETY: as the caller guarantees.
    unsafe { rows_by_superblock(w, row_bytes, nrows, nsb, out, superblock) }
}

/// `out[r][t] = w[r] · a[t]` for rows of one quantized type that decodes in the tile (all rows the same
/// length); the [`panel_format`]s go through [`Panel`] instead.
#[inline]
pub fn tile<const R: usize, const T: usize>(
    backend: Backend,
    dtype: DType,
    w: [&[u8]; R],
    a: [ActRow; T],
) -> [[f32; T]; R] {
    match dtype {
        DType::Q8_0 => run_tile::<Q8_0, R, T>(backend, w, a),
        _ if panel_format(dtype) => panic!("{dtype:?} prefill runs on a `Panel`"),
        _ => panic!("{dtype:?} is not block-quantized"),
    }
}

/// `out[r] = row r · a` for `out.len()` consecutive rows of `row_bytes` bytes in `w`.
pub fn rows(
    backend: Backend,
    dtype: DType,
    w: &[u8],
    row_bytes: usize,
    a: ActRow,
    out: &mut [f32],
) {
    match dtype {
        DType::Q8_0 => run_rows::<Q8_0>(backend, w, row_bytes, a, out),
        DType::Q5_0 => run_rows8::<Q5_0>(backend, w, row_bytes, a, out),
        DType::Q4K => run_rows_k::<Q4K>(backend, w, row_bytes, a, out),
        DType::Q6K => run_rows_k::<Q6K>(backend, w, row_bytes, a, out),
        _ => panic!("{dtype:?} is not block-quantized"),
    }
}

/// [`run_rows`] for a K-quant, in 512-bit vectors where the backend has VNNI ([`rows_k512`]).
fn run_rows_k<F: KPairs>(backend: Backend, w: &[u8], row_bytes: usize, a: ActRow, out: &mut [f32]) {
    match backend {
        Backend::Avx512Vnni | Backend::Amx => {
            let (wp, n, ap, nsb, op) = rows_args::<F>(backend, w, row_bytes, a, out);
            // SAFETY: `rows_args` checked the lengths and that the CPU has AVX-512 VNNI (with F, BW
            // and VL, which `has_avx512vnni` requires).
            unsafe { rows_k512::<F>(wp, row_bytes, n, ap, nsb, op) }
        }
        _ => run_rows::<F>(backend, w, row_bytes, a, out),
    }
}

/// Decode of interleaved Q8_0 on AVX2 where [`amd_zen3_on`](crate::kernels::float_x86::amd_zen3_on):
/// the same sums as `avx2::rows_interleaved`, bit for bit, each group's blocks written out in asm in
/// the shape a C compiler gave the same loop (below).
///
/// Why: on a 2-core Zen 3 VM, in a harness (two threads streaming 1 GiB of interleaved Q8_0 groups of
/// 896-value rows in huge pages, a spin barrier every four tasks), the kernel as rustc compiled it read
/// 32.3–34.8 GB/s where the same kernel compiled by gcc read 36.0–37.3, and this asm, written after
/// gcc's loop, 35.9–36.9. Its shape: a block's four pairs of 32-byte groups in a loop of four passes
/// (written out four times instead, 34.6–35.0), the far hint addressed from a register of its own
/// plus the pass's pointer, the near one through a pointer that steps with the pass. For rows of 4864
/// values the three read alike (34–35 GB/s). The bf16 decode's row on the same host showed the same
/// kind of gap (see `float_x86::half_pair_loop`).
///
/// # Safety
/// As `avx2::rows_interleaved`: `w` holds `ngroups` groups of `nb > 0` blocks, `out` room for
/// `nrows ≤ 8 · ngroups` values, the activations `nb` blocks; the CPU has AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_groups_written(
    w: *const u8,
    ngroups: usize,
    nb: usize,
    a: ActPtr,
    nrows: usize,
    out: *mut f32,
) {
    let flip = _mm256_set1_epi8(-128);
    let ones = _mm256_set1_epi16(1);
    for g8 in 0..ngroups {
        // SAFETY (for the offsets below): group g8 < ngroups of nb blocks.
        let values = unsafe { w.add(g8 * nb * 272) };
        let scales = values.wrapping_add(nb * 256);
        let mut acc = _mm256_setzero_ps();
        // Per block b: its four pairs of groups (values 8g .. 8g + 8 of each of the eight rows), each
        // pass asking for the line GROUP_PREFETCH_L2 ahead into L2 and the one PREFETCH ahead into
        // L1 (as `prefetch_group_line`), and every fourth block the scales' next line (as
        // `prefetch_group_scales`); the sign trick on the stored `q + 128` flipped back to `q`, the
        // even groups into `s0` and the odd into `s1`; then `acc += f32(s0 + s1) · (scales · d)`.
        // SAFETY: reads the nb blocks of values and scales of group g8 and nb blocks of the
        // activations' values and scales (the caller's promise); hints may point anywhere; AVX2,
        // FMA and F16C are enabled for this function.
        unsafe {
            std::arch::asm!(
                "xor {b:e}, {b:e}",
                "2:",
                "test {b:l}, 3",
                "jne 3f",
                "prefetcht1 [{sc} + 512]",
                "3:",
                "lea {near}, [{v} + {near_ahead}]",
                "vpxor {s0:x}, {s0:x}, {s0:x}",
                "mov {xp}, {x}",
                "mov {vp}, {v}",
                "vmovdqa {s1}, {s0}",
                "4:",
                "prefetcht1 [{far} + {vp}]",
                "prefetcht0 [{near}]",
                "vpxor {w1}, {flip}, ymmword ptr [{vp} + 32]",
                "vpbroadcastd {x1}, dword ptr [{xp} + 4]",
                "vpxor {w0}, {flip}, ymmword ptr [{vp}]",
                "vpbroadcastd {x0}, dword ptr [{xp}]",
                "vpsignb {x0}, {x0}, {w0}",
                "vpsignb {x1}, {x1}, {w1}",
                "vpsignb {w0}, {w0}, {w0}",
                "vpsignb {w1}, {w1}, {w1}",
                "vpmaddubsw {w0}, {w0}, {x0}",
                "vpmaddubsw {w1}, {w1}, {x1}",
                "vpmaddwd {w0}, {w0}, {ones}",
                "vpmaddwd {w1}, {w1}, {ones}",
                "vpaddd {s0}, {w0}, {s0}",
                "vpaddd {s1}, {w1}, {s1}",
                "add {vp}, 64",
                "add {xp}, 8",
                "add {near}, 64",
                "cmp {vp}, {vend}",
                "jne 4b",
                "vpaddd {s0}, {s0}, {s1}",
                "add {b:e}, 1",
                "add {d}, 4",
                "add {x}, 32",
                "vbroadcastss {s1}, dword ptr [{d} - 4]",
                "add {sc}, 16",
                "vcvtdq2ps {s0}, {s0}",
                "vcvtph2ps {w0}, xmmword ptr [{sc} - 16]",
                "add {vend}, 256",
                "add {v}, 256",
                "cmp {b:e}, {nb:e}",
                "vmulps {w0}, {s1}, {w0}",
                "vfmadd231ps {acc}, {s0}, {w0}",
                "jne 2b",
                b = out(reg) _,
                sc = inout(reg) scales => _,
                v = inout(reg) values => _,
                vend = inout(reg) values.wrapping_add(256) => _,
                x = inout(reg) a.qs => _,
                d = inout(reg) a.d => _,
                near = out(reg) _,
                xp = out(reg) _,
                vp = out(reg) _,
                far = in(reg) GROUP_PREFETCH_L2,
                near_ahead = const PREFETCH,
                nb = in(reg) nb,
                flip = in(ymm_reg) flip,
                ones = in(ymm_reg) ones,
                w0 = out(ymm_reg) _,
                w1 = out(ymm_reg) _,
                x0 = out(ymm_reg) _,
                x1 = out(ymm_reg) _,
                s0 = out(ymm_reg) _,
                s1 = out(ymm_reg) _,
                acc = inout(ymm_reg) acc,
                options(nostack, readonly),
            );
        }
        // `avx2::rows_interleaved` adds its second sum, zero for Q8_0 on AVX2: the same bits here
        // (a zero sum of -0.0 comes out +0.0 there).
        let acc = _mm256_add_ps(acc, _mm256_setzero_ps());
        // SAFETY: rows 8 · g8 .. min(8 · g8 + 8, nrows) of `out`.
        unsafe { store_group(acc, out.add(8 * g8), (nrows - 8 * g8).min(8)) };
    }
}

/// `out[r] = row r · a` for the rows of interleaved groups of `dtype` (Q8_0 or Q5_0) in `w`
/// (`row_bytes` a row as stored; whole groups, `out` as many rows as they hold or up to seven fewer).
pub fn rows_interleaved(
    backend: Backend,
    dtype: DType,
    w: &[u8],
    row_bytes: usize,
    a: ActRow,
    out: &mut [f32],
) {
    assert!(
        super::quantized::interleaves(dtype),
        "{dtype:?} is not interleaved"
    );
    let block = dtype.block().1;
    let nb = row_bytes / block;
    let ngroups = out.len().div_ceil(8);
    // These checks make the kernel's raw-pointer reads and writes sound.
    assert!(row_bytes == nb * block && w.len() == ngroups * 8 * row_bytes);
    let ap = act_ptr(&a, 32 * nb);
    check_features(backend);
    let (wp, n, op) = (w.as_ptr(), out.len(), out.as_mut_ptr());
    let vnni = matches!(backend, Backend::Avx512Vnni | Backend::Amx);
    match (dtype, vnni) {
        // SAFETY: checked above: the groups, the activations, the output, the CPU features.
        (DType::Q8_0, true) => unsafe { vnni::rows_interleaved(wp, ngroups, nb, ap, n, op) },
        // SAFETY: as above.
        // SAFETY: as above, and nb > 0 (a group of no blocks has no rows to multiply).
        (DType::Q8_0, false) if nb > 0 && crate::kernels::float_x86::amd_zen3_on() => unsafe {
            q8_0_groups_written(wp, ngroups, nb, ap, n, op)
        },
        // SAFETY: as above.
        (DType::Q8_0, false) => unsafe { avx2::rows_interleaved(wp, ngroups, nb, ap, n, op) },
        // SAFETY: as above (`WIDE` off: the pointer is not read).
        (_, true) => unsafe {
            vnni::rows_interleaved_q5_0::<false>(wp, ngroups, nb, ap, std::ptr::null(), n, op)
        },
        (_, false) => BROADCAST_ACTS.with_borrow_mut(|wide| {
            // SAFETY: as above (the CPU features), and then `wide` holds the nb blocks' eight
            // registers each.
            unsafe {
                broadcast_acts(&a, nb, wide);
                avx2::rows_interleaved_q5_0::<true>(wp, ngroups, nb, ap, wide.as_ptr(), n, op)
            }
        }),
    }
}

thread_local! {
    /// The current decode product's activations as `broadcast_acts` lays them out, per thread.
    static BROADCAST_ACTS: RefCell<Vec<__m256i>> = const { RefCell::new(Vec::new()) };
}

/// The first `nb` blocks of `a`'s 8-bit values, each four-value group broadcast to a register of its
/// own (eight a block), for the AVX2 Q5_0 decode: its multiplies then read them from memory, where each
/// group took a broadcast of its own for every group of eight rows (the compiler had hoisted a block's
/// eight broadcasts into registers, leaving too few for the values). On a 2-core Zen 1 VM, where this
/// decode is bound by its instruction count: the kernel on one thread, a 4864-row matrix in cache,
/// fastest of 400 calls, 42.0–43.1 against 51.2–59.9 cycles a block of eight rows (three
/// alternations); on two threads from DRAM 67.3 and 70.9 against 76.8 and 76.9. Whole `native`
/// decodes of the default model (128 tokens, alternated): medians 1.015× and 1.093× (10 and 12
/// rounds; 1.04× over all 22, 16 faster). 7 KiB for a 896-value row, rebuilt for each task.
///
/// # Safety
/// The CPU has AVX2.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn broadcast_acts(a: &ActRow, nb: usize, wide: &mut Vec<__m256i>) {
    wide.clear();
    wide.extend(a.qs[..32 * nb].chunks_exact(4).map(|q| {
        _mm256_set1_epi32(i32::from_le_bytes([
            q[0] as u8, q[1] as u8, q[2] as u8, q[3] as u8,
        ]))
    }));
}

/// Whether prefill of `dtype` runs on decoded [`Panel`]s: the formats whose stored values are unsigned
/// and small — Q4_K (0..=15), Q5_0 (0..=31), Q6_K (0..=63) — so they can be `vpmaddubsw`'s unsigned
/// operand as they are, times the signed activations, with a few of its i16 pair sums added before
/// widening (2 · 63 · 127 · 2 = 32004 at most). Q8_0's values are signed: it keeps the sign trick and
/// its tiles, which multiply plain bytes.
pub fn panel_format(dtype: DType) -> bool {
    matches!(dtype, DType::Q4K | DType::Q5_0 | DType::Q6K)
}

/// Tokens per span of the panel kernel: `Panel::run` takes tokens four at a time from a multiple of four.
const SPAN: usize = 4;

/// One product's activations as the panel kernels read them, made once per product, with the tokens of
/// each span of four side by side per block in each of its arrays: their 32 values, their scales `dx`,
/// and per unit (a 32-value block, or for Q6_K each 16-value half) what the format's zero point or
/// mins need of the values' sum.
///
/// Why: with each token in its own row, the kernel kept a pointer per token and array (twelve for four
/// tokens) and recomputed or spilled them; a fifth of its instructions were address arithmetic. With the
/// span's tokens side by side, one pointer per array walks the blocks and every token is a fixed offset
/// from it.
pub struct PanelActs<'a> {
    acts: &'a QuantizedActs,
    units: usize,
    /// `[span][b][t][32]`: token `4s + t`'s values of block `b` (a last span may hold fewer tokens).
    qs: Vec<i8>,
    /// `[span][b][t]`.
    d: Vec<f32>,
    /// `[span][b][u][t]`: for a format with mins (Q4_K), each unit's `dx · Σ x`, which the rows' mins
    /// multiply; zeros otherwise.
    sums: Vec<f32>,
    /// `[span][b][u][t]`: for a format with a zero point (Q5_0, Q6_K), each unit's `-zero · Σ x`, where
    /// the kernel starts that unit's integer sums; zeros otherwise.
    zero_sums: Vec<i32>,
}

impl<'a> PanelActs<'a> {
    pub fn new(acts: &'a QuantizedActs, dtype: DType) -> PanelActs<'a> {
        // Units per piece (the format's `HALVES`), and how its zero point or mins come off: as
        // `Panel::fill` and `panel_tile` do.
        let (halves, mins, zero) = match dtype {
            DType::Q4K => (Q4K::HALVES, Q4K::MINS, Q4K::ZERO),
            DType::Q5_0 => (Q5_0::HALVES, Q5_0::MINS, Q5_0::ZERO),
            DType::Q6K => (Q6K::HALVES, Q6K::MINS, Q6K::ZERO),
            _ => panic!("{dtype:?} has no panel form"),
        };
        let units = if halves { 2 } else { 1 };
        let (t, nb) = (acts.t, acts.cols / 32);
        let (mut qs, mut d, mut sums, mut zero_sums) = (
            vec![0i8; t * 32 * nb],
            vec![0f32; t * nb],
            vec![0f32; t * nb * units],
            vec![0i32; t * nb * units],
        );
        // One span's part of each array: its `k` tokens side by side per block.
        type SpanOut<'s> = (&'s mut [i8], &'s mut [f32], &'s mut [f32], &'s mut [i32]);
        let fill_span = |(s, (qs, d, sums, zero_sums)): (usize, SpanOut)| {
            let t0 = s * SPAN;
            let k = (t - t0).min(SPAN);
            for i in 0..k {
                let r = acts.row(t0 + i);
                for b in 0..nb {
                    qs[32 * (k * b + i)..][..32].copy_from_slice(&r.qs[32 * b..][..32]);
                    d[k * b + i] = r.d[b];
                    for (u, unit) in r.qs[32 * b..][..32].chunks_exact(32 / units).enumerate() {
                        let q: i32 = unit.iter().map(|&q| q as i32).sum();
                        if mins {
                            sums[k * (units * b + u) + i] = r.d[b] * q as f32;
                        } else {
                            zero_sums[k * (units * b + u) + i] = -i32::from(zero) * q;
                        }
                    }
                }
            }
        };
        let spans: Vec<(usize, SpanOut)> = qs
            .chunks_mut(SPAN * 32 * nb)
            .zip(d.chunks_mut(SPAN * nb))
            .zip(sums.chunks_mut(SPAN * nb * units))
            .zip(zero_sums.chunks_mut(SPAN * nb * units))
            .map(|(((q, d), s), z)| (q, d, s, z))
            .enumerate()
            .collect();
        // The leader made these alone while the other thread waited: 1.3 % of a 46-character label's
        // samples, mostly `ffn_down`'s (4864 values a token). Large products split them by span.
        let split = t * acts.cols >= super::quantized::SPLIT_ACTS_MIN;
        super::pool::for_each_item_if(split, spans, fill_span);
        PanelActs {
            acts,
            units,
            qs,
            d,
            sums,
            zero_sums,
        }
    }

    fn ptr(&self) -> PanelActPtr {
        let (t, nb) = (self.acts.t, self.acts.cols / 32);
        assert!(self.qs.len() == t * 32 * nb && self.d.len() == t * nb);
        assert!(self.sums.len() == t * nb * self.units);
        assert!(self.zero_sums.len() == t * nb * self.units);
        PanelActPtr {
            qs: self.qs.as_ptr(),
            d: self.d.as_ptr(),
            sums: self.sums.as_ptr(),
            zero_sums: self.zero_sums.as_ptr(),
        }
    }
}

/// [`PanelActs`] as raw pointers for the kernels.
struct PanelActPtr {
    qs: *const i8,
    d: *const f32,
    sums: *const f32,
    zero_sums: *const i32,
}

/// A [`Panel`] as raw pointers for the kernels, and the prefetch of the next panel's rows that its
/// span kernel spreads over its blocks.
struct PanelPtr {
    nb: usize,
    w: *const __m256i,
    s: *const __m256,
    m: *const __m256,
    /// The rows eight on (only ever prefetched, never read), their length, and their cache lines in
    /// the prefetch's order: line `i` is line `i / 8` of row `i % 8`.
    next: *const u8,
    row_bytes: usize,
    lines: usize,
    /// Lines asked for per block the kernel runs, and how many blocks this run of the panel has run
    /// before the current span (`nb` per span).
    per_block: usize,
    blocks_before: usize,
}

/// Up to eight weight rows decoded once for a prefill, interleaved so that row `r` is lane `r`: for
/// each 32-value piece, eight registers of four values (one group) from each row, and per unit (piece or
/// half-piece) a vector of the rows' scales and one of what their zero point or min takes off.
///
/// Why: prefill multiplies every weight piece with every token. A register holding one row's 32 values
/// costs a multiply, a widening, a conversion, a scale and an add per row × token, and a horizontal sum
/// at the end; with eight rows across the lanes, the token's four values are broadcast and one multiply
/// serves eight rows, and the widening, conversion and scaling are shared by eight rows and several
/// groups. Decoding the pieces (and transposing eight of them) happens once per panel, for all tokens.
#[derive(Default)]
pub struct Panel {
    /// Rows filled (the other lanes are zeros); pieces per row; units per piece.
    rows: usize,
    nb: usize,
    units: usize,
    dtype: Option<DType>,
    /// The address of the rows eight on from the first (a prefetch hint: never read) and the row length.
    next: usize,
    row_bytes: usize,
    /// `[8 · b + g]`: group `g` of piece `b`, row `r` in the i32 lane `r`.
    w: Vec<__m256i>,
    /// `[units · b + u]`: the rows' scales of unit `u` of piece `b`, and for a format with mins, their
    /// mins (a zero point comes off the integer sums instead: see `panel_tile`).
    s: Vec<__m256>,
    m: Vec<__m256>,
}

impl Panel {
    /// Decodes `rows` (one to eight rows of `dtype`, a [`panel_format`], of one length).
    pub fn fill(&mut self, dtype: DType, rows: &[&[u8]]) {
        assert!((1..=8).contains(&rows.len()));
        assert!(rows.iter().all(|r| r.len() == rows[0].len()));
        assert!(has_avx2(), "AVX2/FMA/F16C are not available");
        // SAFETY: lengths and CPU features checked above.
        unsafe {
            match dtype {
                DType::Q4K => self.fill_fmt::<Q4K>(rows),
                DType::Q5_0 => self.fill_fmt::<Q5_0>(rows),
                DType::Q6K => self.fill_fmt::<Q6K>(rows),
                _ => panic!("{dtype:?} has no panel form"),
            }
        }
        self.dtype = Some(dtype);
    }

    /// Takes the first `rows` (one to eight) rows of a group of interleaved Q5_0 rows (`group`, its
    /// bytes as stored: see `quantized::interleave_q5_0`). The layout is the panel's own: per block
    /// [`q5_0_group_values`] and one conversion of the eight scales, no transposes or gathers.
    pub fn fill_q5_0_group(&mut self, group: &[u8], rows: usize) {
        const GROUP_BLOCK: usize = 8 * Q5_0::SB_BYTES;
        assert!((1..=8).contains(&rows));
        assert!(!group.is_empty() && group.len().is_multiple_of(GROUP_BLOCK));
        assert!(has_avx2(), "AVX2/FMA/F16C are not available");
        let nb = group.len() / GROUP_BLOCK;
        (self.rows, self.nb, self.units) = (rows, nb, 1);
        // The next group lies right after this one: the same eight rows' bytes as `fill` points at.
        let row_bytes = Q5_0::SB_BYTES * nb;
        (self.next, self.row_bytes) =
            (group.as_ptr().wrapping_add(group.len()) as usize, row_bytes);
        // SAFETY: the group holds nb blocks of 160 bytes of values and nb × 16 bytes of scales
        // (checked above, with the CPU features).
        unsafe { self.fill_q5_0_group_avx2(group.as_ptr(), nb) };
        self.dtype = Some(DType::Q5_0);
    }

    /// # Safety
    /// `g` points at a group of `nb` interleaved Q5_0 blocks; the CPU has AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn fill_q5_0_group_avx2(&mut self, g: *const u8, nb: usize) {
        self.w.resize(8 * nb, _mm256_setzero_si256());
        self.s.resize(nb, _mm256_setzero_ps());
        self.m.clear();
        for b in 0..nb {
            // SAFETY: block b < nb of the group, by the caller's promise.
            let (values, scales) = unsafe {
                (
                    q5_0_group_values(g.add(160 * b)),
                    _mm256_cvtph_ps(_mm_loadu_si128(g.add(160 * nb + 16 * b) as *const __m128i)),
                )
            };
            self.w[8 * b..8 * b + 8].copy_from_slice(&values);
            self.s[b] = scales;
        }
    }

    /// # Safety
    /// `rows` holds one to eight rows of one length; the CPU has AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn fill_fmt<F: Fmt>(&mut self, rows: &[&[u8]]) {
        let row_bytes = rows[0].len();
        let nsb = row_bytes / F::SB_BYTES;
        assert!(nsb * F::SB_BYTES == row_bytes && nsb > 0);
        let (nb, units) = (nsb * F::SUBS, if F::HALVES { 2 } else { 1 });
        (self.rows, self.nb, self.units) = (rows.len(), nb, units);
        (self.next, self.row_bytes) = (
            rows[0].as_ptr().wrapping_add(8 * row_bytes) as usize,
            row_bytes,
        );
        self.w.resize(8 * nb, _mm256_setzero_si256());
        self.s.resize(units * nb, _mm256_setzero_ps());
        self.m.clear();
        if F::MINS {
            self.m.resize(units * nb, _mm256_setzero_ps());
        }
        // Lanes past the last row repeat it (`run` stores only the rows filled), so every loop below
        // has eight rows.
        let base: [*const u8; 8] = std::array::from_fn(|r| rows[r.min(rows.len() - 1)].as_ptr());
        let w_out = self.w.as_mut_ptr();
        // The scales go into place one by one, not through a register: no shuffles to gather them,
        // and nothing reads them before the tokens run.
        let (s_out, m_out) = (
            self.s.as_mut_ptr() as *mut f32,
            self.m.as_mut_ptr() as *mut f32,
        );
        let mut hdr = [F::Hdr::default(); 8];
        // One row at a time, pieces kept in memory for the transpose: measured 1.1-1.3× faster than
        // decoding the eight rows as one unrolled expression, whose values spilled anyway.
        let mut v = [_mm256_setzero_si256(); 8];
        for sb in 0..nsb {
            for r in 0..8 {
                // SAFETY: super-block sb of row r lies within it.
                let p = unsafe { base[r].add(sb * F::SB_BYTES) };
                // SAFETY: p points at a whole super-block.
                hdr[r] = unsafe { F::header(p) };
            }
            for j in 0..F::SUBS {
                let b = sb * F::SUBS + j;
                let p: [*const u8; 8] =
                    std::array::from_fn(|r| base[r].wrapping_add(sb * F::SB_BYTES));
                // SAFETY: as above.
                let gathered = unsafe { F::panel_scales(&p, j) };
                if let Some(sv) = gathered {
                    assert!(units == 1 && !F::MINS);
                    // SAFETY: b < nb: within `s`, one unit per piece.
                    unsafe { (s_out as *mut __m256).add(b).write(sv) };
                }
                // SAFETY: as above.
                if let Some(groups) = unsafe { F::panel_values(&p, j) } {
                    assert!(gathered.is_some());
                    for (k, g) in groups.into_iter().enumerate() {
                        // SAFETY: 8b + k < 8 · nb, the length of `w`.
                        unsafe { w_out.add(8 * b + k).write(g) };
                    }
                    continue;
                }
                for r in 0..8 {
                    // SAFETY: as above; j < SUBS.
                    let (vr, scale) = unsafe { F::raw(p[r], &hdr[r], j) };
                    v[r] = vr;
                    if gathered.is_some() {
                        continue;
                    }
                    // Lane 0 scales the piece (its first half for Q6_K), lane 4 the second half.
                    let s = [
                        _mm256_cvtss_f32(scale),
                        _mm_cvtss_f32(_mm256_extractf128_ps::<1>(scale)),
                    ];
                    for (u, s) in s.iter().enumerate().take(units) {
                        let k = 8 * (units * b + u) + r;
                        // SAFETY: b < nb, u < units, r < 8: k < 8 · units · nb, the f32 length of
                        // `s`, and of `m` for a format with mins, as resized above. Unchecked: this
                        // runs once per piece and row of every panel.
                        unsafe {
                            s_out.add(k).write(*s);
                            if F::MINS {
                                m_out.add(k).write(F::min(&hdr[r], j));
                            }
                        }
                    }
                }
                for (k, g) in transpose8x8(v).into_iter().enumerate() {
                    // SAFETY: 8b + k < 8 · nb, the length of `w`.
                    unsafe { w_out.add(8 * b + k).write(g) };
                }
            }
        }
    }

    /// `out[t · os + r] = row r · token t` for the panel's rows and the tokens in `tokens`.
    pub fn run(
        &self,
        backend: Backend,
        acts: &PanelActs,
        tokens: std::ops::Range<usize>,
        out: &mut [f32],
        os: usize,
    ) {
        // What `run_to` asks of its caller: the slice holds the last token's rows. (It checks the rest.)
        assert!(out.len() >= tokens.end.saturating_sub(1) * os + self.rows);
        // SAFETY: `out` holds those tokens' rows, checked above, and is borrowed mutably.
        unsafe { self.run_to(backend, acts, tokens, out.as_mut_ptr(), os) }
    }

    /// `run`, into rows `0..n` (the panel's rows) of each of `tokens` at `out + t · os`, where `out` is
    /// a block of a larger output that other threads write other blocks of (see `quantized::OutBlock`).
    ///
    /// # Safety
    /// For every token `t` of `tokens`, `out + t · os` up to the panel's row count is writable and
    /// written by no one else during the call; `os` ≥ that row count.
    pub unsafe fn run_to(
        &self,
        backend: Backend,
        acts: &PanelActs,
        tokens: std::ops::Range<usize>,
        out: *mut f32,
        os: usize,
    ) {
        let dtype = self.dtype.expect("an unfilled panel");
        let (units, nb, n) = (self.units, self.nb, self.rows);
        assert!(acts.acts.cols == 32 * nb && acts.units == units);
        assert!(tokens.end <= acts.acts.t && !tokens.is_empty() && os >= n);
        // Spans start at multiples of four, as `PanelActs` interleaves them.
        assert!(
            tokens.start.is_multiple_of(SPAN),
            "tokens from {}",
            tokens.start
        );
        check_features(backend);
        // This is where a prefill first reads the weights, from DRAM. Each span asks for a share of the
        // next panel's rows (eight on: the next panel's, for consecutive rows) block by block, so they
        // arrive while this panel's tokens run. Asked for all at once in the fill, many came late: whole
        // passes of the default model alternated in one process ran 1.03-1.12× as fast with 13 new
        // tokens, 1.02-1.03× with 32 and 1.00-1.01× with 128 (benches/RESULTS.md).
        let lines = 8 * self.row_bytes.div_ceil(64);
        let blocks = nb * (tokens.end - tokens.start).div_ceil(SPAN);
        let mut p = PanelPtr {
            nb,
            w: self.w.as_ptr(),
            s: self.s.as_ptr(),
            m: self.m.as_ptr(),
            next: self.next as *const u8,
            row_bytes: self.row_bytes,
            lines,
            per_block: lines.div_ceil(blocks),
            blocks_before: 0,
        };
        let a = acts.ptr();
        type Span = unsafe fn(&PanelPtr, &PanelActPtr, usize, usize, *mut f32, usize, usize);
        let span: Span = match (backend, dtype) {
            (Backend::Avx512Vnni | Backend::Amx, DType::Q4K) => vnni_span::<Q4K>,
            (Backend::Avx512Vnni | Backend::Amx, DType::Q5_0) => vnni_span::<Q5_0>,
            (Backend::Avx512Vnni | Backend::Amx, DType::Q6K) => vnni_span::<Q6K>,
            (_, DType::Q4K) => avx2_span::<Q4K>,
            (_, DType::Q5_0) => avx2_span::<Q5_0>,
            (_, DType::Q6K) => avx2_span::<Q6K>,
            _ => unreachable!("`fill` takes only panel formats"),
        };
        // Four tokens at a time: their accumulators fit the sixteen registers with the weights (three
        // at a time measured no faster).
        let mut t0 = tokens.start;
        while t0 < tokens.end {
            let k = (tokens.end - t0).min(SPAN);
            // A span cut short by `tokens` would not match the interleaving: only the last may be.
            assert!(
                k == SPAN || t0 + k == acts.acts.t,
                "a span cut at {}",
                t0 + k
            );
            // SAFETY: the panel holds nb pieces of `units` units, the activations every token of
            // `tokens` (checked above, with the CPU features), `out` those tokens (stride os ≥ n) of n
            // rows by the caller's promise.
            unsafe { span(&p, &a, t0, k, out, os, n) };
            p.blocks_before += nb;
            t0 += k;
        }
    }
}

/// Expands to a function running `panel_tile` of one instruction set on `k ≤ 4` tokens.
macro_rules! panel_span {
    ($name:ident, $m:ident) => {
        /// # Safety
        /// As `panel_tile`, for tokens `t0..t0 + k`.
        #[allow(clippy::too_many_arguments)]
        unsafe fn $name<F: Fmt>(
            p: &PanelPtr,
            a: &PanelActPtr,
            t0: usize,
            k: usize,
            o: *mut f32,
            os: usize,
            n: usize,
        ) {
            // SAFETY: as the caller guarantees.
            unsafe {
                match k {
                    4 => $m::panel_tile::<F, 4>(p, a, t0, o, os, n),
                    3 => $m::panel_tile::<F, 3>(p, a, t0, o, os, n),
                    2 => $m::panel_tile::<F, 2>(p, a, t0, o, os, n),
                    _ => $m::panel_tile::<F, 1>(p, a, t0, o, os, n),
                }
            }
        }
    };
}
panel_span!(avx2_span, avx2);
panel_span!(vnni_span, vnni);

/// Whole groups of interleaved Q8_0 rows (`w`, `row_bytes` a row as stored) back in the file's layout,
/// into `out`: the SIMD form of `quantized::deinterleave_q8_0` (an 8 × 8 transpose of each block's
/// four-value groups). Returns false, doing nothing, where the CPU lacks AVX2.
pub fn deinterleave_groups(w: &[u8], row_bytes: usize, out: &mut [u8]) -> bool {
    if !has_avx2() {
        return false;
    }
    let nb = row_bytes / 34;
    let groups = w.len() / (8 * row_bytes);
    // These checks make the raw-pointer reads and writes below sound.
    assert!(row_bytes == 34 * nb && w.len() == groups * 8 * row_bytes && out.len() == w.len());
    // SAFETY: checked: `groups` whole groups in and out; the CPU has AVX2.
    unsafe { deinterleave_avx2(w.as_ptr(), groups, nb, out.as_mut_ptr()) };
    true
}

/// # Safety
/// `w` and `out` hold `groups` groups of eight rows of `nb` Q8_0 blocks; the CPU has AVX2.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn deinterleave_avx2(w: *const u8, groups: usize, nb: usize, out: *mut u8) {
    let rb = 34 * nb;
    let flip = _mm256_set1_epi8(-128);
    for g in 0..groups {
        // SAFETY (for every offset below): within group g of `w` and rows 8g..8g + 8 of `out`.
        unsafe {
            let values = w.add(8 * rb * g);
            let scales = values.add(256 * nb) as *const u16;
            let rows = out.add(8 * rb * g);
            for b in 0..nb {
                let v: [__m256i; 8] = std::array::from_fn(|i| {
                    _mm256_loadu_si256(values.add(256 * b + 32 * i) as *const __m256i)
                });
                for (r, row) in transpose8x8(v).into_iter().enumerate() {
                    let blk = rows.add(r * rb + 34 * b);
                    (blk as *mut u16).write_unaligned(scales.add(8 * b + r).read_unaligned());
                    _mm256_storeu_si256(blk.add(2) as *mut __m256i, _mm256_xor_si256(row, flip));
                }
            }
        }
    }
}

/// `out[g]` lane `r` = i32 lane `g` of `v[r]`: an 8 × 8 transpose of 32-bit values.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) fn transpose8x8(v: [__m256i; 8]) -> [__m256i; 8] {
    // Pairs of rows interleaved, then quadruples; both stay within 128-bit lanes, so rows 0..4 and
    // 4..8 are then joined across lanes: the low lanes hold values 0..4, the high ones 4..8.
    let t: [__m256i; 8] = std::array::from_fn(|i| {
        let (a, b) = (v[2 * (i / 2)], v[2 * (i / 2) + 1]);
        if i % 2 == 0 {
            _mm256_unpacklo_epi32(a, b)
        } else {
            _mm256_unpackhi_epi32(a, b)
        }
    });
    // q[4h + k]: rows 4h..4h + 4, value k of each 128-bit lane.
    let q: [__m256i; 8] = std::array::from_fn(|i| {
        let (h, k) = (i / 4, i % 4);
        let (a, b) = (t[4 * h + k / 2], t[4 * h + 2 + k / 2]);
        if k % 2 == 0 {
            _mm256_unpacklo_epi64(a, b)
        } else {
            _mm256_unpackhi_epi64(a, b)
        }
    });
    std::array::from_fn(|g| {
        let k = g % 4;
        if g < 4 {
            _mm256_permute2x128_si256::<0x20>(q[k], q[4 + k])
        } else {
            _mm256_permute2x128_si256::<0x31>(q[k], q[4 + k])
        }
    })
}

/// A 32-value block as four vectors and its largest magnitude; `None` if it holds a NaN or an infinity.
#[target_feature(enable = "avx2,fma,f16c")]
fn load_block(x: &[f32; 32]) -> Option<([__m256; 4], f32)> {
    let p = x.as_ptr();
    // SAFETY: x holds 32 f32: four loads of eight.
    let v = unsafe {
        [
            _mm256_loadu_ps(p),
            _mm256_loadu_ps(p.add(8)),
            _mm256_loadu_ps(p.add(16)),
            _mm256_loadu_ps(p.add(24)),
        ]
    };
    let (sign, inf) = (_mm256_set1_ps(-0.0), _mm256_set1_ps(f32::INFINITY));
    let mut amax = _mm256_setzero_ps();
    let mut finite = 0xFF;
    for vi in v {
        let a = _mm256_andnot_ps(sign, vi);
        // NaN compares false, so a NaN or an infinity clears a mask bit.
        finite &= _mm256_movemask_ps(_mm256_cmp_ps(a, inf, _CMP_LT_OQ));
        amax = _mm256_max_ps(amax, a);
    }
    let m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    (finite == 0xFF).then(|| (v, _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)))))
}

/// AVX2 version of `quantized::quantize_block`, bit for bit: the same scale, the same products
/// `x · (127 / amax)`, the same rounding (to nearest, ties to even), the same clamp.
#[target_feature(enable = "avx2,fma,f16c")]
fn quantize_block_avx2(x: &[f32; 32], q: &mut [i8; 32]) -> (f32, f32) {
    let Some((v, amax)) = load_block(x) else {
        q.fill(0);
        return (f32::NAN, f32::NAN);
    };
    let (d, id) = super::quantized::scales(amax);
    let id = _mm256_set1_ps(id);
    let (lo, hi) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
    let i = v.map(|vi| {
        let r = _mm256_round_ps(
            _mm256_mul_ps(vi, id),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi))
    });
    let s = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
    let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
    let s = _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01)));
    // Packing works within 128-bit lanes; the permute restores element order.
    let p = _mm256_packs_epi16(
        _mm256_packs_epi32(i[0], i[1]),
        _mm256_packs_epi32(i[2], i[3]),
    );
    let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    // SAFETY: q holds 32 bytes; storeu needs no alignment.
    unsafe { _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, p) };
    (d, d * s as f32)
}

/// AVX2 version of `quantized::quantize_weight_block_scalar`, bit for bit: the same scale, the same
/// products `x · (1 / scale)`, the same rounding (half away from zero: the truncation plus one step away
/// from zero where the dropped fraction is at least a half, both exact below 2^23). Returns false, having
/// written nothing, for a block the scalar code should take: a NaN or an infinity in it, or a scale so
/// small that its inverse overflows (the scalar casts saturate those).
#[target_feature(enable = "avx2,fma,f16c")]
fn quantize_weight_block_avx2(x: &[f32; 32], out: &mut [u8; 34]) -> bool {
    let Some((v, amax)) = load_block(x) else {
        return false;
    };
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    if !id.is_finite() {
        return false;
    }
    let sign = _mm256_set1_ps(-0.0);
    let (id, half, one) = (_mm256_set1_ps(id), _mm256_set1_ps(0.5), _mm256_set1_ps(1.0));
    let i = v.map(|vi| {
        let y = _mm256_mul_ps(vi, id);
        let t = _mm256_round_ps(y, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
        let away = _mm256_cmp_ps(
            _mm256_andnot_ps(sign, _mm256_sub_ps(y, t)),
            half,
            _CMP_GE_OQ,
        );
        let step = _mm256_and_ps(away, _mm256_or_ps(one, _mm256_and_ps(sign, y)));
        _mm256_cvtps_epi32(_mm256_add_ps(t, step))
    });
    // Packing saturates as the scalar casts do, within 128-bit lanes; the permute restores order.
    let q = _mm256_packs_epi16(
        _mm256_packs_epi32(i[0], i[1]),
        _mm256_packs_epi32(i[2], i[3]),
    );
    let q = _mm256_permutevar8x32_epi32(q, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    out[..2].copy_from_slice(&half::f16::from_f32(d).to_bits().to_le_bytes());
    // SAFETY: out[2..] holds 32 bytes; storeu needs no alignment.
    unsafe { _mm256_storeu_si256(out[2..].as_mut_ptr() as *mut __m256i, q) };
    true
}

/// Quantizes one 32-value weight block to Q8_0 if AVX2 is present and the block is one it takes (see
/// [`quantize_weight_block_avx2`]); false otherwise.
#[inline]
pub fn quantize_weight_block(x: &[f32; 32], out: &mut [u8; 34]) -> bool {
    // SAFETY: the CPU features are checked first.
    has_avx2() && unsafe { quantize_weight_block_avx2(x, out) }
}

/// Quantizes one 32-value activation block if AVX2 is present; `None` otherwise.
#[inline]
pub fn quantize_block(x: &[f32; 32], q: &mut [i8; 32]) -> Option<(f32, f32)> {
    if has_avx2() {
        // SAFETY: the CPU features were just checked.
        Some(unsafe { quantize_block_avx2(x, q) })
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::quantized::{
        interleave_q8_0, interleaved_bytes, quantize_acts, reference_quantizer::random_blocks,
    };

    /// The written-out Q8_0 groups give the compiled AVX2 kernel's sums bit for bit, whatever CPU
    /// picks which: rows not a multiple of eight, rows of one block and of the model's lengths,
    /// activations with zero blocks (whose rows sum to zero).
    #[test]
    fn written_q8_0_groups_match_the_compiled_kernel() {
        if !has_avx2() {
            return;
        }
        for (rows, cols) in [(13, 32), (8, 96), (64, 896), (515, 512), (24, 4864)] {
            let rb = cols / 32 * 34;
            let q = random_blocks(DType::Q8_0, rows * cols / 32, (rows * cols) as u64);
            let mut il = vec![0u8; interleaved_bytes(DType::Q8_0, rows, cols).unwrap()];
            interleave_q8_0(&q, rb, &mut il);
            let mut x: Vec<f32> = (0..cols)
                .map(|i| ((i * 7919 % 203) as f32 - 101.0) * 0.013)
                .collect();
            x[32.min(cols - 32)..][..32].fill(0.0);
            let acts = quantize_acts(&x, 1, cols);
            let a = act_ptr(&acts.row(0), cols);
            let (nb, ngroups) = (cols / 32, rows.div_ceil(8));
            let (mut got, mut want) = (vec![f32::NAN; rows], vec![f32::NAN; rows]);
            // SAFETY: `il` holds `ngroups` groups of `nb` blocks, the outputs `rows` values, the
            // activations `nb` blocks; AVX2, FMA and F16C were checked above.
            unsafe {
                q8_0_groups_written(il.as_ptr(), ngroups, nb, a, rows, got.as_mut_ptr());
                avx2::rows_interleaved(il.as_ptr(), ngroups, nb, a, rows, want.as_mut_ptr());
            }
            for (r, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(g.is_finite(), "{rows}x{cols}, row {r}: {g}");
                assert_eq!(
                    g.to_bits(),
                    w.to_bits(),
                    "{rows}x{cols}, row {r}: {g} vs {w}"
                );
            }
        }
    }

    /// The 512-bit K-quant decode gives the 256-bit row kernel's sums bit for bit: one super-block
    /// and several, an odd count (the last one on the first chain alone), activations with a zero
    /// block, Q4_K's mins and Q6_K's two scales a piece.
    #[test]
    fn k_quant_pairs_match_the_row_kernel() {
        if !has_avx512vnni() {
            eprintln!("k_quant_pairs_match_the_row_kernel: this CPU has no AVX-512 VNNI, nothing to check");
            return;
        }
        fn check<F: KPairs>(dtype: DType) {
            for (rows, nsb) in [(1, 1), (3, 2), (9, 3), (5, 19)] {
                let cols = nsb * F::SB_VALS;
                let w = random_blocks(dtype, rows * nsb, (rows * 131 + nsb) as u64);
                let mut x: Vec<f32> = (0..cols)
                    .map(|i| ((i * 7919 % 203) as f32 - 101.0) * 0.013)
                    .collect();
                x[32..64].fill(0.0);
                let acts = quantize_acts(&x, 1, cols);
                let a = act_ptr(&acts.row(0), cols);
                let (mut got, mut want) = (vec![f32::NAN; rows], vec![f32::NAN; rows]);
                let rb = nsb * F::SB_BYTES;
                // SAFETY: `w` holds `rows` rows of `nsb` super-blocks, the outputs `rows` values, the
                // activations `cols` values; AVX-512 VNNI (and so AVX2) was checked above.
                unsafe {
                    rows_k512::<F>(w.as_ptr(), rb, rows, a, nsb, got.as_mut_ptr());
                    avx2::rows::<F>(w.as_ptr(), rb, rows, a, nsb, want.as_mut_ptr());
                }
                for (r, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(g.is_finite(), "{dtype:?} {rows}x{nsb}, row {r}: {g}");
                    assert_eq!(
                        g.to_bits(),
                        w.to_bits(),
                        "{dtype:?} {rows}x{nsb}, row {r}: {g} vs {w}"
                    );
                }
            }
        }
        check::<Q4K>(DType::Q4K);
        check::<Q6K>(DType::Q6K);
    }
}
