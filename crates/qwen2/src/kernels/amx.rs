//! Prefill products of block-quantized weights on AMX tiles (Intel's Advanced Matrix Extensions, in
//! Xeons since Sapphire Rapids).
//!
//! Why: prefill is compute-bound, and the AVX-512 VNNI panel kernel (`quantized_x86::Panel`) does 32
//! byte products per instruction. One AMX `tdpbssd` multiplies a 16 × 32 tile of i8 weights with a
//! 32 × 16 tile of i8 activations into 16 × 16 i32 sums: 8192 products. The integer sums are the ones
//! the other kernels compute (i8 × i8, exact in i32), so only the order of the f32 additions differs.
//!
//! The shape of the work: 16 weight rows are decoded once into a [`AmxPanel`] (each 32-value block of
//! each row as 32 signed bytes, the block's scale, and for Q4_K its min), the activations once per
//! product into [`AmxActs`] (16 tokens a tile, laid out as `tdpbssd`'s right operand wants: four
//! consecutive values of one token side by side). Then for each tile of 16 tokens, four blocks at a time
//! go through the tiles (`tmul4`) into four buffers of i32 sums, and each block's sums are converted,
//! scaled by the token's and the row's scales, and added into 16 accumulators, one per row, 16 tokens
//! in the lanes. Blocks have their own scales, so every block's sums leave the tiles: four at a time,
//! while the next four are multiplied, keep the tile unit busy.
//!
//! Rows, tokens and blocks are padded to 16, 16 and 4 with zeros (zero values, zero scales), so any
//! shape runs; only the real rows and tokens are written.

use super::quantized::{q4k_scale_min, QuantizedActs};
use crate::weights::DType;
use std::arch::asm;
use std::arch::x86_64::*;

/// Weight rows per panel and tokens per tile (`tdpbssd`'s largest M and N).
pub const ROWS: usize = 16;
const TOKENS: usize = 16;
/// Fewest tokens a product runs on the tiles with.
pub const MIN_TOKENS: usize = 12;
/// Bytes of one block's tile of 16 rows (or 16 tokens) × 32 values.
const TILE_BYTES: usize = 512;

/// Whether this CPU has AMX tiles with i8 products and the kernel lets this process use them.
/// Linux keeps the (8 KiB) tile state off until a process asks for it (`arch_prctl`
/// `ARCH_REQ_XCOMP_PERM`); a kernel too old for that refuses, and the VNNI kernels serve instead.
pub fn available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        if !super::quantized_x86::has_avx512vnni() {
            return false;
        }
        // Leaf 7, sub-leaf 0: the structured feature flags.
        let leaf7 = __cpuid_count(7, 0);
        let (tile, int8) = ((leaf7.edx >> 24) & 1 == 1, (leaf7.edx >> 25) & 1 == 1);
        if !(tile && int8) {
            return false;
        }
        const SYS_ARCH_PRCTL: isize = 158;
        const ARCH_REQ_XCOMP_PERM: usize = 0x1023;
        const XFEATURE_XTILEDATA: usize = 18;
        let ret: isize;
        // SAFETY: a plain Linux system call that only changes this process's permissions; it reads no
        // memory of ours, and `syscall` clobbers only rcx and r11 besides its return register.
        unsafe {
            asm!(
                "syscall",
                inlateout("rax") SYS_ARCH_PRCTL => ret,
                in("rdi") ARCH_REQ_XCOMP_PERM,
                in("rsi") XFEATURE_XTILEDATA,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            );
        }
        ret == 0
    })
}

/// Whether prefill of `dtype` can run here: the formats whose 32-value blocks each have one scale.
/// (Q6_K scales every 16 values; it stays on the VNNI panel.)
pub fn format(dtype: DType) -> bool {
    matches!(dtype, DType::Q8_0 | DType::Q5_0 | DType::Q4K)
}

/// Bytes in 64-byte aligned lines: a tile row that crosses a cache line loads several times slower (a
/// block of loads and products took 40-47 ns unaligned, 7.5-8 ns aligned, in a loop on one core).
#[derive(Default)]
struct Lines(Vec<Line>);

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([i8; 64]);

impl Lines {
    fn zeroed(bytes: usize) -> Lines {
        Lines(vec![Line([0; 64]); bytes.div_ceil(64)])
    }

    fn len(&self) -> usize {
        64 * self.0.len()
    }

    fn as_ptr(&self) -> *const i8 {
        self.0.as_ptr().cast()
    }

    fn as_mut_ptr(&mut self) -> *mut i8 {
        self.0.as_mut_ptr().cast()
    }

    fn bytes_mut(&mut self) -> &mut [i8] {
        // SAFETY: the lines are plain bytes, contiguous (`repr(C)`, size 64), borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.as_mut_ptr(), self.len()) }
    }
}

/// One product's activations for the tiles, made once per product: for each tile of 16 tokens and each
/// block, eight rows of 64 bytes (row `g` holds values `4g..4g + 4` of each of the 16 tokens), and the
/// tokens' scales and block sums side by side.
pub struct AmxActs {
    t: usize,
    /// Blocks per token, padded to a multiple of four (`tmul4`).
    nb: usize,
    /// `[tile][b][g][token][4]`.
    q: Lines,
    /// `[tile][b][token]`.
    d: Vec<f32>,
    sums: Vec<f32>,
}

impl AmxActs {
    pub fn new(acts: &QuantizedActs) -> AmxActs {
        let (t, nb_real) = (acts.t, acts.cols / 32);
        let nb = nb_real.next_multiple_of(4);
        let tiles = t.div_ceil(TOKENS);
        let mut lines = Lines::zeroed(tiles * nb * TILE_BYTES);
        let q = lines.bytes_mut();
        let mut d = vec![0f32; tiles * nb * TOKENS];
        let mut sums = vec![0f32; tiles * nb * TOKENS];
        for i in 0..t {
            let (tile, n) = (i / TOKENS, i % TOKENS);
            let row = acts.row(i);
            for b in 0..nb_real {
                let at = (tile * nb + b) * TILE_BYTES + 4 * n;
                for g in 0..8 {
                    q[at + 64 * g..at + 64 * g + 4]
                        .copy_from_slice(&row.qs[32 * b + 4 * g..32 * b + 4 * g + 4]);
                }
                d[(tile * nb + b) * TOKENS + n] = row.d[b];
                sums[(tile * nb + b) * TOKENS + n] = row.sums[b];
            }
        }
        AmxActs {
            t,
            nb,
            q: lines,
            d,
            sums,
        }
    }
}

/// Up to 16 weight rows decoded for the tiles: for each block, the rows' 32 values as signed bytes
/// (row-major: `tdpbssd`'s left operand), their scales and (Q4_K) mins.
#[derive(Default)]
pub struct AmxPanel {
    rows: usize,
    /// Blocks per row, padded to a multiple of four, and how many of them are real.
    nb: usize,
    nb_real: usize,
    mins: bool,
    /// `[b][row][32]`.
    q: Lines,
    /// `[b][row]`: the scale of the block's values; and what the min takes off per unit of the
    /// activations' block sum.
    d: Vec<f32>,
    m: Vec<f32>,
    /// The rows after this panel's (a prefetch hint, never read) and their length in bytes.
    next: usize,
    row_bytes: usize,
}

impl AmxPanel {
    /// Decodes `rows` (one to 16 rows of `dtype`, a [`format`], of one length).
    pub fn fill(&mut self, dtype: DType, rows: &[&[u8]]) {
        assert!(format(dtype) && (1..=ROWS).contains(&rows.len()));
        let row_bytes = rows[0].len();
        assert!(rows.iter().all(|r| r.len() == row_bytes));
        let (vals, bytes) = dtype.block();
        assert!(row_bytes.is_multiple_of(bytes) && row_bytes > 0);
        let nb_real = row_bytes / bytes * vals / 32;
        let nb = nb_real.next_multiple_of(4);
        (self.rows, self.mins) = (rows.len(), dtype == DType::Q4K);
        (self.next, self.row_bytes) = (
            rows[0].as_ptr().wrapping_add(ROWS * row_bytes) as usize,
            row_bytes,
        );
        if (self.nb, self.nb_real) != (nb, nb_real) || self.q.len() != nb * TILE_BYTES {
            (self.nb, self.nb_real) = (nb, nb_real);
            self.q = Lines::zeroed(nb * TILE_BYTES);
            self.d = vec![0.0; nb * ROWS];
            self.m = vec![0.0; nb * ROWS];
        }
        // The padding blocks stay zero (values and scales); every other byte is written below. Rows
        // past the last repeat it: their results are computed and never stored.
        assert!(available(), "AMX is not available");
        for r in 0..ROWS {
            let row = rows[r.min(rows.len() - 1)];
            // SAFETY: `row` holds nb_real blocks of `dtype` (checked above); the panel holds nb ≥
            // nb_real blocks of 16 rows; AVX-512 BW/VL and F16C are present (`available`).
            unsafe {
                match dtype {
                    DType::Q8_0 => self.fill_q8_0(row.as_ptr(), r, nb_real),
                    DType::Q5_0 => self.fill_q5_0(row.as_ptr(), r, nb_real),
                    DType::Q4K => self.fill_q4k(row.as_ptr(), r, nb_real / 8),
                    _ => unreachable!("checked: a format with one scale per block"),
                }
            }
        }
    }

    /// # Safety
    /// `row` points at `nb` Q8_0 blocks; `r` < 16 and `nb` ≤ the panel's blocks.
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn fill_q8_0(&mut self, row: *const u8, r: usize, nb: usize) {
        let (q, d) = (self.q.as_mut_ptr(), self.d.as_mut_ptr());
        for b in 0..nb {
            // SAFETY: block b of the row (34 bytes) and of the panel, by the caller's promise.
            unsafe {
                let blk = row.add(34 * b);
                let values = _mm256_loadu_si256(blk.add(2).cast());
                _mm256_storeu_si256(q.add(b * TILE_BYTES + 32 * r).cast(), values);
                *d.add(b * ROWS + r) = f16_to_f32(blk);
            }
        }
    }

    /// # Safety
    /// `row` points at `nb` Q5_0 blocks; `r` < 16 and `nb` ≤ the panel's blocks.
    #[target_feature(enable = "avx2,f16c,avx512f,avx512bw,avx512vl")]
    unsafe fn fill_q5_0(&mut self, row: *const u8, r: usize, nb: usize) {
        let (q, d) = (self.q.as_mut_ptr(), self.d.as_mut_ptr());
        for b in 0..nb {
            // SAFETY: block b of the row (22 bytes) and of the panel, by the caller's promise.
            unsafe {
                let blk = row.add(22 * b);
                let signed = q5_0_values(blk);
                _mm256_storeu_si256(q.add(b * TILE_BYTES + 32 * r).cast(), signed);
                *d.add(b * ROWS + r) = f16_to_f32(blk);
            }
        }
    }

    /// # Safety
    /// `row` points at `nsb` Q4_K super-blocks; `r` < 16 and `8 · nsb` ≤ the panel's blocks.
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn fill_q4k(&mut self, row: *const u8, r: usize, nsb: usize) {
        let (q, d, m) = (
            self.q.as_mut_ptr(),
            self.d.as_mut_ptr(),
            self.m.as_mut_ptr(),
        );
        let low = _mm256_set1_epi8(0x0F);
        for sb in 0..nsb {
            // SAFETY: super-block sb of the row (144 bytes) and blocks 8sb..8sb + 8 of the panel, by
            // the caller's promise.
            unsafe {
                let blk = row.add(144 * sb);
                let (dd, dmin) = (f16_to_f32(blk), f16_to_f32(blk.add(2)));
                let packed = std::slice::from_raw_parts(blk.add(4), 12);
                for pair in 0..4 {
                    let b = 8 * sb + 2 * pair;
                    let nibbles = _mm256_loadu_si256(blk.add(16 + 32 * pair).cast());
                    let lo = _mm256_and_si256(nibbles, low);
                    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(nibbles), low);
                    _mm256_storeu_si256(q.add(b * TILE_BYTES + 32 * r).cast(), lo);
                    _mm256_storeu_si256(q.add((b + 1) * TILE_BYTES + 32 * r).cast(), hi);
                    for j in 0..2 {
                        let (sc, mn) = q4k_scale_min(packed, 2 * pair + j);
                        *d.add((b + j) * ROWS + r) = dd * sc as f32;
                        *m.add((b + j) * ROWS + r) = dmin * mn as f32;
                    }
                }
            }
        }
    }

    /// `out + t · os + r = row r · token t` for the panel's rows `r` and the tokens `tokens` (a range
    /// starting at a multiple of 16).
    ///
    /// # Safety
    /// For every token `t` of `tokens`, `out + t · os` up to the panel's row count is writable and
    /// written by no one else during the call; `os` ≥ that row count.
    pub unsafe fn run_to(
        &self,
        acts: &AmxActs,
        tokens: std::ops::Range<usize>,
        out: *mut f32,
        os: usize,
    ) {
        assert!(
            self.rows > 0 && acts.nb == self.nb,
            "an unfilled or mismatched panel"
        );
        assert!(tokens.start.is_multiple_of(TOKENS) && tokens.end <= acts.t && os >= self.rows);
        assert!(self.q.len() == self.nb * TILE_BYTES && self.d.len() == self.nb * ROWS);
        assert!(acts.q.len() >= acts.t.div_ceil(TOKENS) * self.nb * TILE_BYTES);
        assert!(available(), "AMX is not available");
        // SAFETY: the tile unit is enabled for this process (`available`); the panel and the
        // activations hold every block of every tile `tokens` covers (checked above); `out` by the
        // caller's promise.
        unsafe { self.run_unchecked(acts, tokens, out, os) }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn run_unchecked(
        &self,
        acts: &AmxActs,
        tokens: std::ops::Range<usize>,
        out: *mut f32,
        os: usize,
    ) {
        let nb = self.nb;
        let config = TileConfig::new();
        // SAFETY: a valid palette-1 configuration (see `TileConfig`).
        unsafe { asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly)) };
        // Two sets of four blocks' i32 sums: the tiles fill one while the other is scaled.
        let mut sums = Sums([[[0; ROWS * TOKENS]; 4]; 2]);
        let sums = sums.0.as_mut_ptr() as *mut i32;
        const SET: usize = 4 * ROWS * TOKENS;
        // This is where a prefill first reads the weights, from DRAM: the next panel's rows are asked
        // for over the first tile's blocks, so they arrive while this panel's tokens run.
        let lines = ROWS * self.row_bytes.div_ceil(64);
        let per_group = lines.div_ceil(nb / 4);
        let mut next_line = 0;
        for tile in tokens.start / TOKENS..tokens.end.div_ceil(TOKENS) {
            let mut acc = [_mm512_setzero_ps(); ROWS];
            // SAFETY (for the offsets below): block b < nb of the panel and of this tile.
            let w = |b: usize| unsafe { self.q.as_ptr().add(b * TILE_BYTES) };
            let a = |b: usize| unsafe { acts.q.as_ptr().add((tile * nb + b) * TILE_BYTES) };
            // SAFETY: four blocks from 0 < nb, into the first set.
            unsafe {
                tmul4(w(0), a(0));
                store4(sums);
            }
            for g in 0..nb / 4 {
                // The next four blocks go through the tiles while these are scaled. (Storing their
                // sums only after the scaling, so that no tile store comes before its loads, was
                // 0.87-0.98x as fast.)
                if g + 1 < nb / 4 {
                    // SAFETY: blocks 4g + 4 .. 4g + 8 ≤ nb, into the set not read below.
                    unsafe {
                        tmul4(w(4 * g + 4), a(4 * g + 4));
                        store4(sums.add(SET * ((g + 1) % 2)));
                    }
                }
                for _ in 0..per_group {
                    if next_line < lines {
                        let p = (self.next as *const u8)
                            .wrapping_add((next_line % ROWS) * self.row_bytes)
                            .wrapping_add(64 * (next_line / ROWS));
                        _mm_prefetch::<_MM_HINT_T0>(p as *const i8);
                        next_line += 1;
                    }
                }
                for k in 0..4 {
                    let b = 4 * g + k;
                    // SAFETY: b < nb: the block's scales and sums (tile · nb + b < tiles · nb).
                    let (da, sa) = unsafe {
                        let at = (tile * nb + b) * TOKENS;
                        (
                            _mm512_loadu_ps(acts.d.as_ptr().add(at)),
                            _mm512_loadu_ps(acts.sums.as_ptr().add(at)),
                        )
                    };
                    let s = sums.wrapping_add(SET * (g % 2) + ROWS * TOKENS * k);
                    for (r, acc) in acc.iter_mut().enumerate() {
                        // SAFETY: row r < 16 of the block's 16 × 16 sums; b · 16 + r < nb · 16.
                        unsafe {
                            let v = _mm512_cvtepi32_ps(_mm512_load_si512(s.add(ROWS * r).cast()));
                            let dw = _mm512_set1_ps(*self.d.get_unchecked(b * ROWS + r));
                            *acc = _mm512_fmadd_ps(_mm512_mul_ps(v, da), dw, *acc);
                            if self.mins {
                                let mw = _mm512_set1_ps(*self.m.get_unchecked(b * ROWS + r));
                                *acc = _mm512_fnmadd_ps(sa, mw, *acc);
                            }
                        }
                    }
                }
            }
            // Row r's 16 tokens are in acc[r]; each token's rows go out side by side.
            let mut by_row = [[0f32; TOKENS]; ROWS];
            for (o, acc) in by_row.iter_mut().zip(&acc) {
                // SAFETY: 16 floats.
                unsafe { _mm512_storeu_ps(o.as_mut_ptr(), *acc) };
            }
            let t0 = tile * TOKENS;
            for t in t0.max(tokens.start)..(t0 + TOKENS).min(tokens.end) {
                for (r, row) in by_row.iter().enumerate().take(self.rows) {
                    // SAFETY: token t of `tokens`, row r < the panel's rows: the caller's promise.
                    unsafe { out.add(t * os + r).write(row[t - t0]) };
                }
            }
        }
        // Leaves the tile state empty: a thread switch then need not save 8 KiB of it.
        // SAFETY: no operands; the tiles are not used again before the next `ldtilecfg`.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}

#[repr(C, align(64))]
struct Sums([[[i32; ROWS * TOKENS]; 4]; 2]);

/// The tiles' shapes (palette 1): tmm0-3 the 16 × 16 i32 sums of four blocks, tmm4-5 a block of 16
/// weight rows × 32 bytes, tmm6-7 a block of 16 tokens as 8 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn new() -> TileConfig {
        let mut c = [0u8; 64];
        c[0] = 1;
        let shapes: [(u8, u16); 8] = [
            (16, 64),
            (16, 64),
            (16, 64),
            (16, 64),
            (16, 32),
            (16, 32),
            (8, 64),
            (8, 64),
        ];
        for (t, (rows, bytes)) in shapes.into_iter().enumerate() {
            c[16 + 2 * t..18 + 2 * t].copy_from_slice(&bytes.to_le_bytes());
            c[48 + t] = rows;
        }
        TileConfig(c)
    }
}

/// The i32 sums of blocks `0..4` from `w` (four panel blocks of 16 rows × 32 bytes) and `a` (four
/// activation blocks of 8 × 64 bytes) into tiles 0-3; [`store4`] writes them out.
///
/// # Safety
/// The tiles are configured as [`TileConfig`] says; `w` and `a` point at 2 KiB each.
#[inline(always)]
unsafe fn tmul4(w: *const i8, a: *const i8) {
    // SAFETY: the caller's promise: every load below lies within those ranges.
    unsafe {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            "tileloadd tmm4, [{w} + {s32}*1]",
            "tileloadd tmm6, [{a} + {s64}*1]",
            "tdpbssd tmm0, tmm4, tmm6",
            "tileloadd tmm5, [{w} + {s32}*1 + 512]",
            "tileloadd tmm7, [{a} + {s64}*1 + 512]",
            "tdpbssd tmm1, tmm5, tmm7",
            "tileloadd tmm4, [{w} + {s32}*1 + 1024]",
            "tileloadd tmm6, [{a} + {s64}*1 + 1024]",
            "tdpbssd tmm2, tmm4, tmm6",
            "tileloadd tmm5, [{w} + {s32}*1 + 1536]",
            "tileloadd tmm7, [{a} + {s64}*1 + 1536]",
            "tdpbssd tmm3, tmm5, tmm7",
            w = in(reg) w,
            a = in(reg) a,
            s32 = in(reg) 32usize,
            s64 = in(reg) 64usize,
            options(nostack, readonly),
        );
    }
}

/// Tiles 0-3 (the sums of [`tmul4`]) into `out`: four 16 × 16 i32 buffers, 1 KiB apart.
///
/// # Safety
/// The tiles are configured as [`TileConfig`] says; `out` points at 4 KiB.
#[inline(always)]
unsafe fn store4(out: *mut i32) {
    // SAFETY: the caller's promise: every store below lies within that range.
    unsafe {
        asm!(
            "tilestored [{out} + {s64}*1], tmm0",
            "tilestored [{out} + {s64}*1 + 1024], tmm1",
            "tilestored [{out} + {s64}*1 + 2048], tmm2",
            "tilestored [{out} + {s64}*1 + 3072], tmm3",
            out = in(reg) out,
            s64 = in(reg) 64usize,
            options(nostack),
        );
    }
}

/// A little-endian f16 at `p`, widened.
///
/// # Safety
/// `p` points at two readable bytes; the CPU has F16C.
#[inline]
#[target_feature(enable = "f16c")]
unsafe fn f16_to_f32(p: *const u8) -> f32 {
    // SAFETY: two bytes at p, by the caller's promise.
    let bits = unsafe { p.cast::<u16>().read_unaligned() };
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// A Q5_0 block's 32 values as signed bytes (stored 0..=31 around 16: four low bits in the nibbles,
/// the fifth in `qh`).
///
/// # Safety
/// `blk` points at a whole 22-byte block; the CPU has AVX-512 BW and VL.
#[inline]
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl")]
unsafe fn q5_0_values(blk: *const u8) -> __m256i {
    // SAFETY: bytes 2..6 and 6..22 of the block, by the caller's promise.
    let (qh, nibbles) = unsafe {
        (
            blk.add(2).cast::<u32>().read_unaligned(),
            _mm_loadu_si128(blk.add(6).cast()),
        )
    };
    let low = _mm_set1_epi8(0x0F);
    let values = _mm256_set_m128i(
        _mm_and_si128(_mm_srli_epi16::<4>(nibbles), low),
        _mm_and_si128(nibbles, low),
    );
    let fifth = _mm256_maskz_mov_epi8(qh, _mm256_set1_epi8(0x10));
    _mm256_sub_epi8(_mm256_or_si256(values, fifth), _mm256_set1_epi8(16))
}

/// The scalar reference for [`q5_0_values`].
#[cfg(test)]
fn q5_0_values_scalar(blk: &[u8; 22], out: &mut [i8; 32]) {
    let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
    for i in 0..16 {
        let lo = (blk[6 + i] & 0x0F) | ((((qh >> i) & 1) as u8) << 4);
        let hi = (blk[6 + i] >> 4) | ((((qh >> (i + 16)) & 1) as u8) << 4);
        out[i] = lo as i8 - 16;
        out[i + 16] = hi as i8 - 16;
    }
}

#[cfg(test)]
mod tests {
    use super::super::quantized::{dot_portable, quantize_acts, reference_quantizer};
    use super::*;

    #[test]
    fn q5_0_values_match_the_scalar_reference() {
        if !available() {
            eprintln!("AMX is not available here: the AMX kernels are not exercised");
            return;
        }
        let blocks = reference_quantizer::random_blocks(DType::Q5_0, 64, 5);
        for blk in blocks.chunks_exact(22) {
            let blk: &[u8; 22] = blk.try_into().unwrap();
            let (mut got, mut want) = ([0i8; 32], [0i8; 32]);
            // SAFETY: a whole block; `available` implies AVX-512 BW/VL.
            unsafe { _mm256_storeu_si256(got.as_mut_ptr().cast(), q5_0_values(blk.as_ptr())) };
            q5_0_values_scalar(blk, &mut want);
            assert_eq!(got, want);
        }
    }

    /// Every (row, token) of panels of up to 16 rows, against the portable dot product, with row,
    /// token and block counts that are not multiples of 16, 16 and 4, and tokens from a later tile.
    #[test]
    fn panels_match_the_portable_dot() {
        if !available() {
            eprintln!("AMX is not available here: the AMX kernels are not exercised");
            return;
        }
        for dtype in [DType::Q8_0, DType::Q5_0, DType::Q4K] {
            for (cols, rows, t, from) in [
                (256usize, 16, 16, 0),
                (96, 3, 5, 0),
                (512, 11, 37, 16),
                (4864, 16, 33, 32),
            ] {
                let (vals, bytes) = dtype.block();
                let cols = cols.next_multiple_of(vals);
                let rb = cols / vals * bytes;
                let w = reference_quantizer::random_blocks(dtype, rows * cols / vals, cols as u64);
                let x: Vec<f32> = (0..t * cols)
                    .map(|i| ((i * 7919 % 1013) as f32 / 506.0 - 1.0) * (1 + i / 32 % 3) as f32)
                    .collect();
                let acts = quantize_acts(&x, t, cols);
                let rows_b: Vec<&[u8]> = w.chunks_exact(rb).collect();
                let mut panel = AmxPanel::default();
                panel.fill(dtype, &rows_b);
                let amx_acts = AmxActs::new(&acts);
                let mut got = vec![f32::NAN; t * rows];
                // SAFETY: `got` holds t tokens of `rows` values; stride rows.
                unsafe { panel.run_to(&amx_acts, from..t, got.as_mut_ptr(), rows) };
                for ti in 0..t {
                    for r in 0..rows {
                        let g = got[ti * rows + r];
                        if ti < from {
                            assert!(g.is_nan(), "{dtype:?}: token {ti} was not asked for");
                            continue;
                        }
                        let want = dot_portable(dtype, rows_b[r], acts.row(ti));
                        let tol = 1e-5 * (1.0 + want.abs()) * (cols as f32).sqrt();
                        assert!(
                            (g - want).abs() <= tol,
                            "{dtype:?} cols={cols} rows={rows} t={t}: row {r} token {ti}: {g} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
