//! x86-64 tiles for `quantized.rs`: `R` weight rows × `T` tokens of integer dot products.
//!
//! Each weight format decodes a 32-value piece of a row into one 256-bit register of bytes (signed for
//! Q8_0/Q5_0/Q6_K after removing their offsets, unsigned nibbles for Q4_K) plus an f32 scale vector. The
//! multiply is `vpmaddubsw` (u8 × i8 → i16 pairs) + `vpmaddwd` with ones (→ i32) on AVX2, or one
//! `vpdpbusd` on AVX-512 VNNI. Both need an unsigned left operand, so signed weights use the sign trick:
//! `|w| · (x · sign w)`. No i16 pair can saturate: activations are within ±127 and `|w| ≤ 128` gives at
//! most 2 · 128 · 127 = 32512. Each piece's i32 sums are then converted and scaled once in f32.
//!
//! The AVX-512 VNNI variant differs from the AVX2 one only in that multiply (one macro, two expansions),
//! so the AVX2 tests cover the rest of its logic.

use super::quantized::{ActRow, Backend};
use crate::weights::DType;
use std::arch::x86_64::*;

/// How far ahead of the kernel's position in a weight row (or the rows after it) software prefetch asks for
/// cache lines. Decode streams weights from DRAM; the hardware prefetcher alone left a 151936-row Q8_0
/// product at ~70 % of the read bandwidth on a 2-core Zen 3 VM, prefetching 2 KiB ahead brought it to ~95 %.
const PREFETCH: usize = 2048;

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

/// Byte `j` of the result is 0xFF if bit `j` of `bits` is set, else 0.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn bits_to_bytes(bits: u32) -> __m256i {
    let b = _mm256_set1_epi32(bits as i32);
    // Byte j takes byte j / 8 of `bits` (shuffles stay within 128-bit lanes; every lane holds `bits`).
    let idx = _mm256_setr_epi8(
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3,
        3, 3,
    );
    let sel = _mm256_shuffle_epi8(b, idx);
    // …and keeps bit j % 8 of it.
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    _mm256_cmpeq_epi8(_mm256_and_si256(sel, bit), bit)
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
    type Hdr = ();
    #[inline]
    unsafe fn header(_p: *const u8) {}
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn sub(p: *const u8, _h: &(), _j: usize) -> (__m256i, __m256) {
        // SAFETY: p points at a whole 22-byte block: f16 scale, u32 fifth bits, 16 bytes of nibbles.
        let (d, qh, qs) = unsafe {
            (
                f16_at(p),
                (p.add(2) as *const u32).read_unaligned(),
                _mm_loadu_si128(p.add(6) as *const __m128i),
            )
        };
        let m4 = _mm_set1_epi8(0x0F);
        // Values 0..16 are the low nibbles, 16..32 the high ones.
        let v = _mm256_set_m128i(
            _mm_and_si128(_mm_srli_epi16(qs, 4), m4),
            _mm_and_si128(qs, m4),
        );
        // (v | fifth bit << 4) − 16  ==  v − (16 where the fifth bit is clear).
        let v = _mm256_sub_epi8(
            v,
            _mm256_andnot_si256(bits_to_bytes(qh), _mm256_set1_epi8(16)),
        );
        (v, _mm256_set1_ps(d))
    }
    #[inline]
    unsafe fn mins(_h: &()) -> __m256 {
        unreachable!()
    }
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
    type Hdr = Q4KHdr;
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn header(p: *const u8) -> Q4KHdr {
        // SAFETY: p points at a whole 144-byte super-block: d, dmin, 12 bytes of scales, 128 of nibbles.
        let (d, dmin, s) = unsafe {
            (
                f16_at(p),
                f16_at(p.add(2)),
                std::slice::from_raw_parts(p.add(4), 12),
            )
        };
        let mut h = Q4KHdr::default();
        for j in 0..8 {
            let (sc, m) = super::quantized::q4k_scale_min(s, j);
            h.sc[j] = d * sc as f32;
            h.mins[j] = dmin * m as f32;
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
    unsafe fn mins(h: &Q4KHdr) -> __m256 {
        // SAFETY: reads the eight f32 of an array.
        unsafe { _mm256_loadu_ps(h.mins.as_ptr()) }
    }
}

struct Q6K;
impl Fmt for Q6K {
    const SB_VALS: usize = 256;
    const SB_BYTES: usize = 210;
    const SIGNED: bool = true;
    const MINS: bool = false;
    type Hdr = f32;
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn header(p: *const u8) -> f32 {
        // SAFETY: d is the last two bytes of the 210-byte super-block.
        unsafe { f16_at(p.add(208)) }
    }
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn sub(p: *const u8, d: &f32, j: usize) -> (__m256i, __m256) {
        // Piece j = 32k + 128h of the super-block: low 4 bits from ql[64h + 32(k & 1)..] (low nibble for
        // k < 2, high for k ≥ 2), high 2 bits from bits 2k, 2k+1 of qh[32h..]; scales 8h + 2k (values
        // 0..16) and 8h + 2k + 1 (values 16..32).
        let (h, k) = (j / 4, j % 4);
        // SAFETY: ql (0..128), qh (128..192) and scales (192..208) offsets below stay within the block.
        let (ql, qh, sa, sb) = unsafe {
            (
                load32(p.add(64 * h + 32 * (k & 1))),
                load32(p.add(128 + 32 * h)),
                *p.add(192 + 8 * h + 2 * k) as i8,
                *p.add(192 + 8 * h + 2 * k + 1) as i8,
            )
        };
        let m4 = _mm256_set1_epi8(0x0F);
        let lo = if k < 2 { ql } else { _mm256_srli_epi16(ql, 4) };
        let lo = _mm256_and_si256(lo, m4);
        let hi = _mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * k as i32));
        let hi = _mm256_slli_epi16(_mm256_and_si256(hi, _mm256_set1_epi8(3)), 4);
        let v = _mm256_sub_epi8(_mm256_or_si256(lo, hi), _mm256_set1_epi8(32));
        // The i32 lanes 0..4 hold values 0..16, lanes 4..8 values 16..32.
        let scale = _mm256_set_m128(_mm_set1_ps(d * sb as f32), _mm_set1_ps(d * sa as f32));
        (v, scale)
    }
    #[inline]
    unsafe fn mins(_h: &f32) -> __m256 {
        unreachable!()
    }
}

/// `v`, hidden from the optimiser: it would otherwise turn `splat(a) · splat(b)` into a scalar multiply
/// and a broadcast (two vector operations where one `vmulps` does).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn opaque(mut v: __m256) -> __m256 {
    // SAFETY: an empty asm block that only names a register: no memory access, no effect.
    unsafe {
        std::arch::asm!("/* {0} */", inout(ymm_reg) v, options(pure, nomem, nostack, preserves_flags))
    };
    v
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// The kernels of one instruction set: `$dot(u, s)` is the i32x8 of 4-byte dot products of unsigned
/// bytes `u` with signed bytes `s`. Expanded once for AVX2 and once for AVX-512 VNNI.
macro_rules! instruction_set {
    ($m:ident, $features:literal, |$u:ident, $s:ident| $dot:expr) => {
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
            ) -> (__m256, __m256) {
                // SAFETY: as the caller guarantees.
                let ((v, scale), xv, dx) = unsafe {
                    (
                        F::sub(base, hdr, j),
                        _mm256_loadu_si256(a.qs.add(32 * b) as *const __m256i),
                        _mm256_broadcast_ss(&*a.d.add(b)),
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
                (_mm256_cvtepi32_ps(isum), _mm256_mul_ps(scale, dx))
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
                // Two chains, so a piece need not wait for the previous one's FMA.
                let (mut p0, mut p1) = (acc, _mm256_setzero_ps());
                for j in 0..F::SUBS {
                    // SAFETY: j < SUBS; the activations hold every block of super-block s.
                    let (c, sd) = unsafe { piece::<F>(base, &hdr, j, a, s * F::SUBS + j) };
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
                for r in 0..nrows {
                    // SAFETY: r < nrows.
                    let wr = unsafe { w.add(r * row_bytes) };
                    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                    let mut s = 0;
                    while s + 2 <= nsb {
                        // SAFETY: s + 1 < nsb.
                        unsafe {
                            acc0 = superblock::<F>(wr, s, a, acc0);
                            acc1 = superblock::<F>(wr, s + 1, a, acc1);
                        }
                        s += 2;
                    }
                    if s < nsb {
                        // SAFETY: s < nsb.
                        acc0 = unsafe { superblock::<F>(wr, s, a, acc0) };
                    }
                    // SAFETY: r < nrows.
                    unsafe { out.add(r).write(hsum(_mm256_add_ps(acc0, acc1))) };
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
        }
    };
}

instruction_set!(avx2, "avx2,fma,f16c", |u, s| _mm256_madd_epi16(
    _mm256_maddubs_epi16(u, s),
    _mm256_set1_epi16(1)
));
instruction_set!(
    vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    |u, s| _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)
);

/// Checks that `backend` runs here (AVX2 when not VNNI): the condition for calling its kernels.
fn check_features(backend: Backend) {
    match backend {
        Backend::Avx512Vnni => assert!(has_avx512vnni(), "AVX-512 VNNI is not available"),
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
        Backend::Avx512Vnni => unsafe { vnni::tile::<F, R, T>(wp, ap, nsb) },
        // SAFETY: lengths and CPU features checked above.
        _ => unsafe { avx2::tile::<F, R, T>(wp, ap, nsb) },
    }
}

fn run_rows<F: Fmt>(backend: Backend, w: &[u8], row_bytes: usize, a: ActRow, out: &mut [f32]) {
    let nsb = row_bytes / F::SB_BYTES;
    assert!(row_bytes == nsb * F::SB_BYTES && w.len() == out.len() * row_bytes);
    let ap = act_ptr(&a, nsb * F::SB_VALS);
    check_features(backend);
    let (wp, n, op) = (w.as_ptr(), out.len(), out.as_mut_ptr());
    match backend {
        // SAFETY: lengths and CPU features checked above.
        Backend::Avx512Vnni => unsafe { vnni::rows::<F>(wp, row_bytes, n, ap, nsb, op) },
        // SAFETY: lengths and CPU features checked above.
        _ => unsafe { avx2::rows::<F>(wp, row_bytes, n, ap, nsb, op) },
    }
}

/// `out[r][t] = w[r] · a[t]` for rows of one quantized type (all rows the same length).
#[inline]
pub fn tile<const R: usize, const T: usize>(
    backend: Backend,
    dtype: DType,
    w: [&[u8]; R],
    a: [ActRow; T],
) -> [[f32; T]; R] {
    match dtype {
        DType::Q8_0 => run_tile::<Q8_0, R, T>(backend, w, a),
        DType::Q5_0 => run_tile::<Q5_0, R, T>(backend, w, a),
        DType::Q4K => run_tile::<Q4K, R, T>(backend, w, a),
        DType::Q6K => run_tile::<Q6K, R, T>(backend, w, a),
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
        DType::Q5_0 => run_rows::<Q5_0>(backend, w, row_bytes, a, out),
        DType::Q4K => run_rows::<Q4K>(backend, w, row_bytes, a, out),
        DType::Q6K => run_rows::<Q6K>(backend, w, row_bytes, a, out),
        _ => panic!("{dtype:?} is not block-quantized"),
    }
}

/// AVX2 version of `quantized::quantize_block`, bit for bit: the same scale, the same products
/// `x · (127 / amax)`, the same rounding (to nearest, ties to even), the same clamp.
#[target_feature(enable = "avx2,fma,f16c")]
fn quantize_block_avx2(x: &[f32; 32], q: &mut [i8; 32]) -> (f32, f32) {
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
    let sign = _mm256_set1_ps(-0.0);
    let inf = _mm256_set1_ps(f32::INFINITY);
    let mut amax = _mm256_setzero_ps();
    let mut finite = -1i32;
    for vi in v {
        let a = _mm256_andnot_ps(sign, vi);
        // NaN compares false, so a NaN or an infinity clears a mask bit.
        finite &= _mm256_movemask_ps(_mm256_cmp_ps(a, inf, _CMP_LT_OQ)) | !0xFF;
        amax = _mm256_max_ps(amax, a);
    }
    if finite & 0xFF != 0xFF {
        q.fill(0);
        return (f32::NAN, f32::NAN);
    }
    let m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
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
