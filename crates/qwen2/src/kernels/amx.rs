//! Prefill products of block-quantized weights on AMX tiles (Intel's Advanced Matrix Extensions, in
//! Xeons since Sapphire Rapids), in bf16 with f32 sums.
//!
//! Why: prefill is compute-bound, and the AVX-512 VNNI panel kernel (`quantized_x86::Panel`) does 32
//! byte products per instruction. One AMX `tdpbf16ps` multiplies a 16 × 32 tile of bf16 weights with a
//! 32 × 16 tile of bf16 activations and adds the 16 × 16 results to f32 sums: 8192 products. The weights
//! are dequantized (each block's values times its scales, minus its min) and rounded to bf16 as the
//! tiles take them, 16 rows at a time, the activations rounded to bf16 once per product, and the sums
//! stay in the tiles across every block of a row: nothing leaves them until the row's end. (A first version multiplied the
//! blocks' i8 values with the 8-bit activations in i32, as the VNNI kernels do: every block's sums then
//! had to leave the tiles to be scaled, and that scaling, 48 vector instructions per block, bounded it.
//! See benches/RESULTS.md.)
//!
//! So this is its own approximation of the exact product, not the VNNI kernels' one: each weight and
//! each activation is rounded to bf16 (8 significant bits, a relative error of at most 2⁻⁹), where the
//! VNNI kernels keep the weights exact and round the activations to 8 bits per 32 values. Decode (one
//! token) and products of fewer than [`MIN_TOKENS`] tokens keep the VNNI kernels.
//!
//! Rows and tokens are padded to 16 (rows repeat the last, tokens are zeros), so any shape runs; only the
//! real rows and tokens are written.

use crate::weights::DType;
use std::arch::asm;
use std::arch::x86_64::*;

/// Weight rows per panel and tokens per tile (the tiles' largest M and N).
pub const ROWS: usize = 16;
const TOKENS: usize = 16;
/// Token tiles multiplied together, and the sums each keeps: block `b` of a row goes into its sum
/// `b mod 2`, added at the end. A product waits for the one before into the same sums, and with one sum
/// per token tile the tile unit sat idle between them. The split never depends on how many tokens a
/// product has, so a token's result has the same bits in any batch (what a chunked prefill relies on).
const GROUP: usize = 2;
const CHAINS: usize = 2;
/// Tokens of one group of token tiles: a product of up to this many dequantizes each block just before
/// the tiles take it (see [`multiply_rows`]).
pub const GROUP_TOKENS: usize = GROUP * TOKENS;
/// Bytes of one block's tile: 16 rows (or 16 pairs of values) × 64 bytes.
const TILE_BYTES: usize = 1024;
/// Fewest tokens a product runs on the tiles with: below, dequantizing the rows costs more than the
/// tiles save (benches/RESULTS.md). The float GEMM's threshold too (`matmul::GEMM_MIN_TOKENS`): a
/// chunked prefill never runs fewer, so its tokens take the same kernels as in one pass.
pub const MIN_TOKENS: usize = 12;

/// Whether this CPU has AMX tiles with bf16 products (and AVX-512 BF16 to round to bf16) and the kernel
/// lets this process use them.
/// Linux keeps the (8 KiB) tile state off until a process asks for it (`arch_prctl`
/// `ARCH_REQ_XCOMP_PERM`); a kernel too old for that refuses, and the VNNI kernels serve instead.
pub fn available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        if !(super::quantized_x86::has_avx512vnni() && is_x86_feature_detected!("avx512bf16")) {
            return false;
        }
        // Leaf 7, sub-leaf 0: the structured feature flags; AMX-BF16 is bit 22 of edx, AMX-TILE 24.
        let leaf7 = __cpuid_count(7, 0);
        let (bf16, tile) = ((leaf7.edx >> 22) & 1 == 1, (leaf7.edx >> 24) & 1 == 1);
        if !(tile && bf16) {
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

/// Whether prefill of `dtype` can run here: every block-quantized format (the panel dequantizes it).
pub fn format(dtype: DType) -> bool {
    matches!(dtype, DType::Q8_0 | DType::Q5_0 | DType::Q4K | DType::Q6K)
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
}

/// One product's activations for the tiles, made once per product: for each tile of 16 tokens and each
/// 32-value block, 16 rows of 64 bytes (row `p` holds values `2p, 2p + 1` of each of the 16 tokens, as
/// bf16: the pairs `tdpbf16ps` multiplies).
pub struct AmxActs {
    t: usize,
    nb: usize,
    /// `[tile][b][p][token][2]` bf16.
    q: Lines,
}

impl AmxActs {
    /// `x`: `t` rows of `cols` values (`cols` a multiple of 32).
    pub fn new(x: &[f32], t: usize, cols: usize) -> AmxActs {
        assert!(cols.is_multiple_of(32) && x.len() == t * cols);
        assert!(available(), "AMX is not available");
        let nb = cols / 32;
        let mut lines = Lines::zeroed(t.div_ceil(TOKENS) * nb * TILE_BYTES);
        for (tile, tokens) in x.chunks(TOKENS * cols).enumerate() {
            for b in 0..nb {
                let out = &mut lines.0[(tile * nb + b) * TILE_BYTES / 64..][..TILE_BYTES / 64];
                // SAFETY: AVX-512 F/BF16 are present (`available`).
                unsafe { put_block(tokens, cols, b, out) };
            }
        }
        AmxActs { t, nb, q: lines }
    }
}

/// Block `b` of up to 16 tokens (`tokens`, rows of `cols` values) as bf16 pairs, pair `p` of every token
/// in line `p` of `out`: each token's 32 values rounded to 16 pairs, one vector a token, then the 16 × 16
/// pairs transposed. Tokens past the last are zeros.
///
/// # Safety
/// The CPU has AVX-512 F/BF16.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn put_block(tokens: &[f32], cols: usize, b: usize, out: &mut [Line]) {
    let by_token: [__m512; TOKENS] = std::array::from_fn(|i| match tokens.get(i * cols..) {
        Some(row) if !row.is_empty() => {
            let block = &row[32 * b..][..32];
            // SAFETY: 32 floats; the bf16 pairs are 64 bytes of plain data.
            unsafe {
                let (lo, hi) = (
                    _mm512_loadu_ps(block.as_ptr()),
                    _mm512_loadu_ps(block.as_ptr().add(16)),
                );
                std::mem::transmute::<__m512bh, __m512>(_mm512_cvtne2ps_pbh(hi, lo))
            }
        }
        _ => _mm512_setzero_ps(),
    });
    for (line, pairs) in out.iter_mut().zip(transpose16(by_token)) {
        // SAFETY: a line is 64 bytes.
        unsafe { _mm512_storeu_ps(line.0.as_mut_ptr().cast(), pairs) };
    }
}

/// `out + t · os + r = row r · token t` for `rows` (one to 16 rows of `dtype`, a [`format()`], of one
/// length) and the tokens `tokens` (a range starting at a multiple of 16).
///
/// Up to 32 tokens (one group of token tiles), each block of the rows is dequantized to bf16 just
/// before the tiles take it, into one of two 1 KiB slots. Dequantizing the whole panel first (28 KiB for
/// 896 values a row, as much again for a tile of activations: not both in the 48 KiB L1) was slower, the
/// profile putting the dequantizing's time on its stores. With more tokens the panel is dequantized once
/// for all groups.
///
/// `panel` holds that dequantized panel between calls, so a caller going through many rows allocates it
/// once; `tiles` is this thread's tile unit, configured by the caller once for all its calls.
///
/// # Safety
/// For every token `t` of `tokens`, `out + t · os` up to `rows.len()` is writable and written by no one
/// else during the call; `os` ≥ `rows.len()`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn multiply_rows(
    dtype: DType,
    rows: &[&[u8]],
    acts: &AmxActs,
    tokens: std::ops::Range<usize>,
    out: *mut f32,
    os: usize,
    panel: &mut Panel,
    _tiles: &Tiles,
) {
    assert!(format(dtype) && (1..=ROWS).contains(&rows.len()));
    let row_bytes = rows[0].len();
    assert!(rows.iter().all(|r| r.len() == row_bytes));
    let (vals, bytes) = dtype.block();
    assert!(row_bytes.is_multiple_of(bytes) && row_bytes / bytes * vals == 32 * acts.nb);
    assert!(tokens.start.is_multiple_of(TOKENS) && tokens.end <= acts.t && os >= rows.len());
    assert!(acts.q.len() >= acts.t.div_ceil(TOKENS) * acts.nb * TILE_BYTES);
    // Rows past the last repeat it: their results are computed and never stored.
    let ptrs: [*const u8; ROWS] = std::array::from_fn(|r| rows[r.min(rows.len() - 1)].as_ptr());
    let n = rows.len();
    // SAFETY: every row holds `acts.nb` blocks of `dtype` and the activations every tile `tokens`
    // covers (checked above); the tile unit is configured on this thread (`_tiles`, which cannot leave
    // it) and AVX-512 F/BW/VL/BF16 are present (`available`, checked by `Tiles::configure`);
    // `out` by the caller's promise.
    unsafe {
        match dtype {
            DType::Q8_0 => run_rows::<Q8_0>(&ptrs, n, row_bytes, acts, tokens, out, os, panel),
            DType::Q5_0 => run_rows::<Q5_0>(&ptrs, n, row_bytes, acts, tokens, out, os, panel),
            DType::Q4K => run_rows::<Q4K>(&ptrs, n, row_bytes, acts, tokens, out, os, panel),
            DType::Q6K => run_rows::<Q6K>(&ptrs, n, row_bytes, acts, tokens, out, os, panel),
            _ => unreachable!("checked: a block-quantized format"),
        }
    }
}

/// [`run`] on rows of `F` in the file's layout.
///
/// # Safety
/// As [`run`].
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn run_rows<F: Block>(
    rows: &[*const u8; ROWS],
    n: usize,
    row_bytes: usize,
    acts: &AmxActs,
    tokens: std::ops::Range<usize>,
    out: *mut f32,
    os: usize,
    panel: &mut Panel,
) {
    let src = Rows {
        rows,
        format: std::marker::PhantomData::<F>,
    };
    // SAFETY: the caller's promise, passed on.
    unsafe { run(&src, rows[0], n, row_bytes, acts, tokens, out, os, panel) }
}

/// [`multiply_rows`] for the first `n` (one to 16) rows of one or two groups of interleaved Q5_0 rows
/// (`groups`, their bytes as stored: see `quantized::interleave_q5_0`), taken as they are.
///
/// # Safety
/// As [`multiply_rows`], for the `n` rows.
#[allow(clippy::too_many_arguments)]
pub unsafe fn multiply_q5_0_groups(
    groups: &[u8],
    n: usize,
    acts: &AmxActs,
    tokens: std::ops::Range<usize>,
    out: *mut f32,
    os: usize,
    panel: &mut Panel,
    _tiles: &Tiles,
) {
    use super::quantized::{GROUP_ROWS as GROUP, Q5_0_BLOCK_BYTES};
    assert!((1..=ROWS).contains(&n));
    let row_bytes = Q5_0_BLOCK_BYTES * acts.nb;
    assert!(acts.nb > 0 && groups.len() == n.div_ceil(GROUP) * GROUP * row_bytes);
    assert!(tokens.start.is_multiple_of(TOKENS) && tokens.end <= acts.t && os >= n);
    assert!(acts.q.len() >= acts.t.div_ceil(TOKENS) * acts.nb * TILE_BYTES);
    // Rows past the last are computed and never stored: a missing second group repeats the first.
    let second = if n > GROUP { GROUP * row_bytes } else { 0 };
    let src = Q5_0Groups {
        groups: [groups.as_ptr(), groups[second..].as_ptr()],
        nb: acts.nb,
    };
    // SAFETY: the groups hold `acts.nb` blocks of Q5_0 each and the activations every tile `tokens`
    // covers (checked above); the tile unit and the CPU features as `multiply_rows` says; `out` by the
    // caller's promise.
    unsafe {
        run(
            &src,
            groups.as_ptr(),
            n,
            row_bytes,
            acts,
            tokens,
            out,
            os,
            panel,
        )
    }
}

/// A weight format's 32-value blocks, dequantized.
trait Block {
    /// Block `b` of the row at `row`, as 32 bf16 at `out`.
    ///
    /// # Safety
    /// `row` holds block `b`; `out` points at 64 writable bytes; the CPU has AVX-512 F/BW/VL/BF16.
    unsafe fn put(row: *const u8, b: usize, out: *mut i8, f16: &F16Table);
}

struct Q8_0;
struct Q5_0;
struct Q4K;
struct Q6K;

impl Block for Q8_0 {
    #[inline(always)]
    unsafe fn put(row: *const u8, b: usize, out: *mut i8, f16: &F16Table) {
        // SAFETY: block b (34 bytes) and `out`, by the caller's promise.
        unsafe {
            let blk = row.add(34 * b);
            let d = f16.widen(blk);
            put_bf16(_mm256_loadu_si256(blk.add(2).cast()), (d, d), out);
        }
    }
}

impl Block for Q5_0 {
    #[inline(always)]
    unsafe fn put(row: *const u8, b: usize, out: *mut i8, f16: &F16Table) {
        // SAFETY: block b (22 bytes) and `out`, by the caller's promise.
        unsafe { put_q5_0(row.add(22 * b), out, f16) }
    }
}

impl Block for Q4K {
    #[inline(always)]
    unsafe fn put(row: *const u8, b: usize, out: *mut i8, f16: &F16Table) {
        let (sb, j) = (b / 8, b % 8);
        // SAFETY: super-block sb (144 bytes) holds block b; `out`, by the caller's promise.
        unsafe {
            let blk = row.add(144 * sb);
            let (d, dmin) = (f16.widen(blk), f16.widen(blk.add(2)));
            let packed: &[u8; 12] = &*blk.add(4).cast();
            let (sc, m) = super::quantized::q4k_scale_min(packed, j);
            let nibbles = _mm256_loadu_si256(blk.add(16 + 32 * (j / 2)).cast());
            let nibbles = if j % 2 == 0 {
                nibbles
            } else {
                _mm256_srli_epi16::<4>(nibbles)
            };
            let values = _mm256_and_si256(nibbles, _mm256_set1_epi8(0x0F));
            // Sixteen values, so sixteen products: a table, as for Q5_0 (`put_q5_0`).
            let table = _mm512_fmsub_ps(
                _mm512_setr_ps(
                    0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0,
                    15.0,
                ),
                _mm512_set1_ps(d * sc as f32),
                _mm512_set1_ps(dmin * m as f32),
            );
            // SAFETY: 32 bytes of plain data.
            let table: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(table));
            let index = _mm512_cvtepu8_epi16(values);
            let bf16 = _mm512_permutexvar_epi16(index, _mm512_castsi256_si512(table));
            _mm512_storeu_si512(out.cast(), bf16);
        }
    }
}

impl Block for Q6K {
    #[inline(always)]
    unsafe fn put(row: *const u8, b: usize, out: *mut i8, f16: &F16Table) {
        let (sb, j) = (b / 8, b % 8);
        let (h, k) = (j / 4, j % 4);
        // SAFETY: super-block sb (210 bytes) holds block b; `out`, by the caller's promise.
        unsafe {
            let blk = row.add(210 * sb);
            let d = f16.widen(blk.add(208));
            let ql = _mm256_loadu_si256(blk.add(64 * h + 32 * (k & 1)).cast());
            let qh = _mm256_loadu_si256(blk.add(128 + 32 * h).cast());
            let ql = if k < 2 {
                ql
            } else {
                _mm256_srli_epi16::<4>(ql)
            };
            let lo = _mm256_and_si256(ql, _mm256_set1_epi8(0x0F));
            let hi = _mm256_and_si256(
                _mm256_srlv_epi16(qh, _mm256_set1_epi16(2 * k as i16)),
                _mm256_set1_epi8(3),
            );
            let values = _mm256_sub_epi8(
                _mm256_or_si256(lo, _mm256_slli_epi16::<4>(hi)),
                _mm256_set1_epi8(32),
            );
            let sc = |i: usize| d * *blk.add(192 + 8 * h + 2 * k + i) as i8 as f32;
            put_bf16(values, (sc(0), sc(1)), out);
        }
    }
}

/// Where [`run`] takes its weights from, a block (16 rows × 32 values) at a time.
trait Source {
    /// Block `b` of the 16 rows as bf16, row `r` at `out + 64 · r`.
    ///
    /// # Safety
    /// The rows hold block `b`; `out` points at 1 KiB writable bytes; the CPU has AVX-512 F/BW/VL/BF16.
    unsafe fn put16(&self, b: usize, out: *mut i8, f16: &F16Table);
}

/// Rows in the file's layout, one pointer a row.
struct Rows<'p, F> {
    rows: &'p [*const u8; ROWS],
    format: std::marker::PhantomData<F>,
}

// The `put16`s carry `run`'s target features: without them a format's `put`, inlined into `put16`
// first, could not take in its intrinsics, which then stayed calls.
impl<F: Block> Source for Rows<'_, F> {
    #[inline]
    #[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn put16(&self, b: usize, out: *mut i8, f16: &F16Table) {
        for (r, &row) in self.rows.iter().enumerate() {
            // SAFETY: block b of the row, row r of `out`: the caller's promise.
            unsafe { F::put(row, b, out.add(64 * r), f16) };
        }
    }
}

/// Two groups of eight interleaved Q5_0 rows (see `quantized::interleave_q5_0`) of `nb` blocks.
struct Q5_0Groups {
    groups: [*const u8; 2],
    nb: usize,
}

impl Source for Q5_0Groups {
    /// Each group's values as its decode takes them (row `r` in lane `r`), transposed to a row per
    /// register: one transpose for eight rows where each row had a shuffle of its nibbles and a masked
    /// add of its fifth bits.
    #[inline]
    #[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn put16(&self, b: usize, out: *mut i8, f16: &F16Table) {
        for (g, &group) in self.groups.iter().enumerate() {
            // SAFETY: block b < nb of the group, its values and its eight scales: the caller's promise.
            unsafe {
                let values = super::quantized_x86::q5_0_group_values(group.add(160 * b));
                let scales = group.add(160 * self.nb + 16 * b);
                for (r, row) in super::quantized_x86::transpose8x8(values)
                    .into_iter()
                    .enumerate()
                {
                    let d = f16.widen(scales.add(2 * r));
                    put_q5_0_values(row, d, out.add(64 * (8 * g + r)));
                }
            }
        }
    }
}

/// [`multiply_rows`] for one format, after its checks.
///
/// # Safety
/// As `multiply_rows` checks and promises: 16 rows of `acts.nb` blocks of `F` (the last `16 - n`
/// repeating a real one), the activations, the tile unit and the CPU features, the output.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn run<S: Source>(
    src: &S,
    first: *const u8,
    n: usize,
    row_bytes: usize,
    acts: &AmxActs,
    tokens: std::ops::Range<usize>,
    out: *mut f32,
    os: usize,
    panel: &mut Panel,
) {
    let nb = acts.nb;
    let f16: &F16Table = &F16_AS_F32;
    // This is where a prefill first reads the weights, from DRAM: the next 16 rows (a hint only, never
    // read) are asked for over the first group's blocks, so they arrive while these rows' tokens run.
    let next = first.wrapping_add(ROWS * row_bytes);
    let lines = ROWS * row_bytes.div_ceil(64);
    let per_block = lines.div_ceil(nb);
    let mut next_line = 0;
    let (first, end) = (tokens.start / TOKENS, tokens.end.div_ceil(TOKENS));
    let whole = end - first > GROUP;
    let Panel {
        whole: panel,
        slots,
        sums,
    } = panel;
    if whole {
        if panel.len() < nb * TILE_BYTES {
            *panel = Lines::zeroed(nb * TILE_BYTES);
        }
        for b in 0..nb {
            // SAFETY: block b < nb of the rows; block b of the panel.
            unsafe { src.put16(b, panel.as_mut_ptr().add(b * TILE_BYTES), f16) };
        }
    }
    let mut loads = 0;
    for g0 in (first..end).step_by(GROUP) {
        let group = g0..(g0 + GROUP).min(end);
        // SAFETY: no operands but the tiles.
        unsafe {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            )
        };
        for b in 0..nb {
            let weights = if whole {
                // SAFETY: block b < nb of the panel.
                unsafe { panel.as_ptr().add(b * TILE_BYTES) }
            } else {
                let slot = slots.0[b % 2].as_mut_ptr();
                // SAFETY: block b < nb of the rows; the slot (16 × 64 bytes).
                unsafe { src.put16(b, slot, f16) };
                slot.cast_const()
            };
            // The weights go to tmm4 or tmm5 by turns, the activations to tmm6 or tmm7, so a load need
            // not wait for the product before it to have read its tile.
            let w_tile = 4 + b % 2;
            // SAFETY: 1 KiB of dequantized weights.
            unsafe { load(w_tile, weights) };
            for (j, tile) in group.clone().enumerate() {
                let a_tile = 6 + loads % 2;
                loads += 1;
                // SAFETY: block b < nb of token tile `tile` of the activations (checked by
                // `multiply_rows`); sums j · 2 + b mod 2 < 4.
                unsafe {
                    load(a_tile, acts.q.as_ptr().add((tile * nb + b) * TILE_BYTES));
                    dot(j * CHAINS + b % CHAINS, w_tile, a_tile);
                }
            }
            for _ in 0..per_block {
                if next_line < lines {
                    let p = next
                        .wrapping_add((next_line % ROWS) * row_bytes)
                        .wrapping_add(64 * (next_line / ROWS));
                    _mm_prefetch::<_MM_HINT_T0>(p as *const i8);
                    next_line += 1;
                }
            }
        }
        let s = sums.0.as_mut_ptr().cast::<f32>();
        // SAFETY: four 16 × 16 f32 buffers, 1 KiB apart.
        unsafe {
            asm!(
                "tilestored [{s} + {s64}*1], tmm0",
                "tilestored [{s} + {s64}*1 + 1024], tmm1",
                "tilestored [{s} + {s64}*1 + 2048], tmm2",
                "tilestored [{s} + {s64}*1 + 3072], tmm3",
                s = in(reg) s,
                s64 = in(reg) 64usize,
                options(nostack),
            )
        };
        // Row r's 16 tokens are row r of a tile's sums, and each token's rows go out side by side: a
        // transpose in registers, where value by value took two loads, an add and a store each.
        let rows_kept = ((1u32 << n) - 1) as u16;
        for (j, tile) in group.clone().enumerate() {
            let (even, odd) = (&sums.0[CHAINS * j], &sums.0[CHAINS * j + 1]);
            let by_row: [__m512; ROWS] = std::array::from_fn(|r| {
                // SAFETY: row r of two 16 × 16 sums.
                unsafe {
                    _mm512_add_ps(
                        _mm512_loadu_ps(even[r * TOKENS..].as_ptr()),
                        _mm512_loadu_ps(odd[r * TOKENS..].as_ptr()),
                    )
                }
            });
            let by_token = transpose16(by_row);
            let t0 = tile * TOKENS;
            for t in t0.max(tokens.start)..(t0 + TOKENS).min(tokens.end) {
                // SAFETY: token t of `tokens`, rows 0..n: the caller's promise.
                unsafe { _mm512_mask_storeu_ps(out.add(t * os), rows_kept, by_token[t - t0]) };
            }
        }
    }
}

/// This thread's tile unit, configured for [`multiply_rows`] (the shapes [`TileConfig`] gives) from
/// [`Tiles::configure`] until dropped. Why a guard: configuring and releasing the tiles cost about half
/// a microsecond; done around each call of 16 rows, a call at 896 values a row took 1.14× as long at 13
/// tokens and 1.09× at 32 (benches/RESULTS.md), so a caller configures them once for all the rows of its
/// task. Released at the end, so a thread switch between tasks need not save the tiles' 8 KiB. Not
/// `Send`: the configuration belongs to the thread that made it.
pub struct Tiles {
    _this_thread: std::marker::PhantomData<*const ()>,
}

thread_local! {
    /// Whether a [`Tiles`] is alive on this thread: a second one would release the tiles under the first.
    static CONFIGURED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl Tiles {
    /// Configures the tiles. Panics if AMX is not [`available`], or if this thread's tiles are
    /// configured already (by a `Tiles` still alive).
    pub fn configure() -> Tiles {
        assert!(available(), "AMX is not available");
        assert!(
            !CONFIGURED.replace(true),
            "the tiles are configured already"
        );
        let config = TileConfig::new();
        // SAFETY: a valid palette-1 configuration (see `TileConfig`); the tile unit is enabled for this
        // process (`available`).
        unsafe { asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly)) };
        Tiles {
            _this_thread: std::marker::PhantomData,
        }
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: no operands; no `Tiles` is left on this thread, so no tile is used again before the
        // next `ldtilecfg`.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
        CONFIGURED.set(false);
    }
}

/// A thread's room for [`multiply_rows`]: the dequantized panel, the two blocks of weights on their way
/// to the tiles, the tiles' sums. Kept between calls: a caller going through many rows allocates them
/// once, and each call overwrites every byte it reads.
#[derive(Default)]
pub struct Panel {
    whole: Lines,
    slots: Slots,
    sums: Sums,
}

#[repr(C, align(64))]
struct Slots([[i8; TILE_BYTES]; 2]);

impl Default for Slots {
    fn default() -> Slots {
        Slots([[0; TILE_BYTES]; 2])
    }
}

#[repr(C, align(64))]
struct Sums([[f32; ROWS * TOKENS]; GROUP * CHAINS]);

impl Default for Sums {
    fn default() -> Sums {
        Sums([[0.0; ROWS * TOKENS]; GROUP * CHAINS])
    }
}

/// The columns of a 16 × 16 block of f32 given as its rows: pairs of rows interleaved by 32 then 64
/// bits (each vector then holds one column of four rows in each of its 128-bit lanes), then the lanes
/// gathered by two rounds of lane shuffles.
#[inline]
#[target_feature(enable = "avx512f")]
fn transpose16(rows: [__m512; 16]) -> [__m512; 16] {
    let pairs: [__m512; 16] = std::array::from_fn(|i| {
        let (a, b) = (rows[i & !1], rows[i | 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_ps(a, b)
        } else {
            _mm512_unpackhi_ps(a, b)
        }
    });
    // quads[4q + e]: in lane L, column 4L + e of rows 4q..4q + 4.
    let quads: [__m512; 16] = std::array::from_fn(|i| {
        let (q, e) = (i / 4, i % 4);
        let (a, b) = (
            _mm512_castps_pd(pairs[4 * q + e / 2]),
            _mm512_castps_pd(pairs[4 * q + e / 2 + 2]),
        );
        _mm512_castpd_ps(if e % 2 == 0 {
            _mm512_unpacklo_pd(a, b)
        } else {
            _mm512_unpackhi_pd(a, b)
        })
    });
    // halves[2e + h]: lanes 2h and 2h + 1 of column-vectors e of rows 0-3 and 4-7, then of rows 8-11
    // and 12-15.
    let halves: [[__m512; 2]; 8] = std::array::from_fn(|i| {
        let (e, h) = (i / 2, i % 2);
        let [a, b, c, d] = [quads[e], quads[4 + e], quads[8 + e], quads[12 + e]];
        if h == 0 {
            [
                _mm512_shuffle_f32x4::<0x44>(a, b),
                _mm512_shuffle_f32x4::<0x44>(c, d),
            ]
        } else {
            [
                _mm512_shuffle_f32x4::<0xEE>(a, b),
                _mm512_shuffle_f32x4::<0xEE>(c, d),
            ]
        }
    });
    // Column 4L + e: lane L of each quarter of the rows.
    std::array::from_fn(|c| {
        let (lane, e) = (c / 4, c % 4);
        let [ab, cd] = halves[2 * e + lane / 2];
        if lane % 2 == 0 {
            _mm512_shuffle_f32x4::<0x88>(ab, cd)
        } else {
            _mm512_shuffle_f32x4::<0xDD>(ab, cd)
        }
    })
}

/// Loads 16 rows of 64 bytes from `p` into tile `tile` (4 to 7).
///
/// # Safety
/// The tiles are configured as [`TileConfig`] says; `p` points at 1 KiB.
#[inline(always)]
unsafe fn load(tile: usize, p: *const i8) {
    macro_rules! load {
        ($t:literal) => {
            // SAFETY: the caller's promise.
            unsafe {
                asm!(concat!("tileloadd tmm", $t, ", [{p} + {s64}*1]"), p = in(reg) p,
                     s64 = in(reg) 64usize, options(nostack, readonly))
            }
        };
    }
    match tile {
        4 => load!("4"),
        5 => load!("5"),
        6 => load!("6"),
        _ => load!("7"),
    }
}

/// Sums tile `c` (0 to 3) += weights tile `w` (4 or 5) × activations tile `a` (6 or 7), in bf16 pairs.
///
/// # Safety
/// The tiles are configured as [`TileConfig`] says and hold what their names say.
#[inline(always)]
unsafe fn dot(c: usize, w: usize, a: usize) {
    macro_rules! dp {
        ($c:literal, $w:literal, $a:literal) => {
            // SAFETY: registers only.
            unsafe {
                asm!(
                    concat!("tdpbf16ps tmm", $c, ", tmm", $w, ", tmm", $a),
                    options(nostack, nomem)
                )
            }
        };
    }
    macro_rules! by_c {
        ($w:literal, $a:literal) => {
            match c {
                0 => dp!("0", $w, $a),
                1 => dp!("1", $w, $a),
                2 => dp!("2", $w, $a),
                _ => dp!("3", $w, $a),
            }
        };
    }
    match (w, a) {
        (4, 6) => by_c!("4", "6"),
        (4, _) => by_c!("4", "7"),
        (_, 6) => by_c!("5", "6"),
        _ => by_c!("5", "7"),
    }
}

/// The tiles' shapes (palette 1): tmm0-3 16 × 16 f32 sums, tmm4-5 a block of 16 weight rows × 32 bf16,
/// tmm6-7 a block of 16 tokens as 16 pairs × 16 tokens × 2 bf16; all 16 × 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn new() -> TileConfig {
        let mut c = [0u8; 64];
        c[0] = 1;
        for t in 0..8 {
            c[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes());
            c[48 + t] = 16;
        }
        TileConfig(c)
    }
}

/// Every f16's value as f32, indexed by its bits: how the fill widens the blocks' scales.
///
/// Why: with F16C a scale took a broadcast and a two-part conversion on the vector ports, which the fill
/// keeps busy (and which the tile products share); from this table it is a load, and the multiply that
/// uses it broadcasts it from memory. 256 KiB, made on first use; a model's scales fall in a few
/// binades, so the entries in use stay in cache.
static F16_AS_F32: std::sync::LazyLock<F16Table> = std::sync::LazyLock::new(|| {
    let all: Vec<f32> = (0..=u16::MAX)
        .map(|b| half::f16::from_bits(b).to_f32())
        .collect();
    F16Table(all.into_boxed_slice().try_into().expect("65536 entries"))
});

struct F16Table(Box<[f32; 1 << 16]>);

impl F16Table {
    /// The little-endian f16 at `p`, widened.
    ///
    /// # Safety
    /// `p` points at two readable bytes.
    #[inline(always)]
    unsafe fn widen(&self, p: *const u8) -> f32 {
        // SAFETY: two bytes at p, by the caller's promise.
        self.0[unsafe { p.cast::<u16>().read_unaligned() } as usize]
    }
}

/// 32 signed byte values times `scale` (low 16 and high 16 each times their own), as 32 bf16 at `out`:
/// the fill of the formats with too many distinct values for a table (Q8_0, and Q6_K with its two scales
/// a block).
///
/// # Safety
/// `out` points at 64 writable bytes; the CPU has AVX-512 F/BW/VL/BF16.
#[inline]
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn put_bf16(values: __m256i, scale: (f32, f32), out: *mut i8) {
    let lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(values)));
    let hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256::<1>(values)));
    let lo = _mm512_mul_ps(lo, _mm512_set1_ps(scale.0));
    let hi = _mm512_mul_ps(hi, _mm512_set1_ps(scale.1));
    // SAFETY: 64 bytes of plain data, stored at `out` (64 bytes by the caller's promise).
    unsafe {
        let bf16: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
        _mm512_storeu_si512(out.cast(), bf16);
    }
}

/// A Q5_0 block's 32 values times its scale, as 32 bf16 at `out`.
///
/// The values are five bits (four in the nibbles, the fifth in `qh`) stored around 16, so a block has
/// at most 32 distinct products: they are made once, as a 32-entry table in one register, and each
/// value picks its own (`vpermw`). Widening every value to f32 to multiply it took more instructions,
/// and filling the panels is most of a short prefill's time. Same bits: each entry is the f32 product
/// rounded to bf16, as each value's was.
///
/// # Safety
/// `blk` points at a whole 22-byte block and `out` at 64 writable bytes; the CPU has AVX-512
/// F/BW/VL/BF16.
#[inline]
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn put_q5_0(blk: *const u8, out: *mut i8, f16: &F16Table) {
    // SAFETY: bytes 0..2, 2..6 and 6..22 of the block, by the caller's promise.
    let (d, qh, nibbles) = unsafe {
        (
            f16.widen(blk),
            blk.add(2).cast::<u32>().read_unaligned(),
            _mm256_broadcastsi128_si256(_mm_loadu_si128(blk.add(6).cast())),
        )
    };
    // Values 0..16 are the nibbles' low halves, 16..32 their high halves; `qh` adds the fifth bit. The
    // values are made as bytes, in 256-bit registers (a third port takes those), then widened.
    let values = _mm256_srlv_epi64(nibbles, _mm256_setr_epi64x(0, 0, 4, 4));
    let values = _mm256_and_si256(values, _mm256_set1_epi8(0x0F));
    let values = _mm256_mask_add_epi8(values, qh, values, _mm256_set1_epi8(16));
    // SAFETY: `out`, by the caller's promise.
    unsafe { put_q5_0_values(values, d, out) }
}

/// A Q5_0 block's 32 stored values (`values`, bytes 0..=31 in order) times its scale `d`, as 32 bf16 at
/// `out`: the table lookup of [`put_q5_0`].
///
/// # Safety
/// `out` points at 64 writable bytes; the CPU has AVX-512 F/BW/VL/BF16.
#[inline]
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn put_q5_0_values(values: __m256i, d: f32, out: *mut i8) {
    let d = _mm512_set1_ps(d);
    let below = _mm512_setr_ps(
        -16.0, -15.0, -14.0, -13.0, -12.0, -11.0, -10.0, -9.0, -8.0, -7.0, -6.0, -5.0, -4.0, -3.0,
        -2.0, -1.0,
    );
    let above = _mm512_setr_ps(
        0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0,
    );
    // SAFETY: 64 bytes of plain data either way.
    let table: __m512i = unsafe {
        std::mem::transmute(_mm512_cvtne2ps_pbh(
            _mm512_mul_ps(above, d),
            _mm512_mul_ps(below, d),
        ))
    };
    let index = _mm512_cvtepu8_epi16(values);
    // SAFETY: 64 bytes at `out`, by the caller's promise.
    unsafe { _mm512_storeu_si512(out.cast(), _mm512_permutexvar_epi16(index, table)) };
}

#[cfg(test)]
mod tests {
    use super::super::quantized::reference_quantizer;
    use super::*;

    fn skip() -> bool {
        if available() {
            return false;
        }
        eprintln!("AMX is not available here: the AMX kernels are not exercised");
        true
    }

    /// The loader's dequantizer is the reference: value times the block's scale, here rounded to
    /// bf16 as the tiles take it. Scales of both signs, zero and subnormal f16 among the blocks.
    #[test]
    fn q5_0_blocks_dequantize_as_the_loader_does_rounded_to_bf16() {
        if skip() {
            return;
        }
        let mut blocks = reference_quantizer::random_blocks(DType::Q5_0, 64, 5);
        for (i, scale) in [0x8000u16, 0x0000, 0x0001, 0x83ff, 0xbc00, 0x7bff]
            .iter()
            .enumerate()
        {
            blocks[22 * i..22 * i + 2].copy_from_slice(&scale.to_le_bytes());
        }
        let want = crate::weights::quant::dequantize(DType::Q5_0, &blocks, 64 * 32).unwrap();
        for (blk, want) in blocks.chunks_exact(22).zip(want.chunks_exact(32)) {
            let mut got = [0u16; 32];
            // SAFETY: a whole block and 64 bytes; `available` implies AVX-512 F/BW/VL/BF16.
            unsafe { put_q5_0(blk.as_ptr(), got.as_mut_ptr().cast(), &F16_AS_F32) };
            let want: Vec<u16> = want
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_bits())
                .collect();
            assert_eq!(got.to_vec(), want);
        }
    }

    #[test]
    fn transpose16_turns_rows_into_columns() {
        if skip() {
            return;
        }
        let m: Vec<f32> = (0..256).map(|i| i as f32).collect();
        // SAFETY: 16 rows of 16 floats; `available` implies AVX-512 F.
        let cols = unsafe {
            transpose16(std::array::from_fn(|r| {
                _mm512_loadu_ps(m[16 * r..].as_ptr())
            }))
        };
        for (c, col) in cols.iter().enumerate() {
            let mut got = [0f32; 16];
            // SAFETY: 16 floats.
            unsafe { _mm512_storeu_ps(got.as_mut_ptr(), *col) };
            let want: Vec<f32> = (0..16).map(|r| m[16 * r + c]).collect();
            assert_eq!(got.to_vec(), want, "column {c}");
        }
    }

    /// One `Tiles` a thread at a time: a second would release the tiles under the first when dropped.
    /// Once the first is dropped, the tiles can be configured again, and multiply.
    #[test]
    fn tiles_are_configured_once_a_thread() {
        if skip() {
            return;
        }
        let first = Tiles::configure();
        assert!(std::panic::catch_unwind(Tiles::configure).is_err());
        drop(first);
        let (dtype, cols) = (DType::Q8_0, 64);
        let w = reference_quantizer::random_blocks(dtype, cols / 32, 3);
        let x = vec![1.0f32; 12 * cols];
        let acts = AmxActs::new(&x, 12, cols);
        let mut out = vec![f32::NAN; 12];
        let tiles = Tiles::configure();
        // SAFETY: `out` holds 12 tokens of one row; stride 1.
        unsafe {
            multiply_rows(
                dtype,
                &[&w],
                &acts,
                0..12,
                out.as_mut_ptr(),
                1,
                &mut Panel::default(),
                &tiles,
            )
        };
        let want: f64 = crate::weights::quant::dequantize(dtype, &w, cols)
            .unwrap()
            .iter()
            .map(|&v| bf16(v))
            .sum();
        assert!(out
            .iter()
            .all(|&o| (o as f64 - want).abs() <= 1e-4 * want.abs().max(1.0)));
    }

    /// A token's results have the same bits whatever else is in its product: alone in a tile, in a
    /// group of two, or in a product long enough to dequantize the panel once for several groups.
    #[test]
    fn a_tokens_bits_do_not_depend_on_its_batch() {
        if skip() {
            return;
        }
        let (dtype, rows, cols) = (DType::Q5_0, 16, 512);
        let w = reference_quantizer::random_blocks(dtype, rows * cols / 32, 9);
        let rows_b: Vec<&[u8]> = w.chunks_exact(cols / 32 * 22).collect();
        let x: Vec<f32> = (0..80 * cols)
            .map(|i| (i % 201) as f32 / 50.0 - 2.0)
            .collect();
        let run = |t: usize| {
            let acts = AmxActs::new(&x[..t * cols], t, cols);
            let mut out = vec![0f32; t * rows];
            // SAFETY: `out` holds t tokens of `rows` values; stride rows.
            let o = out.as_mut_ptr();
            let (mut panel, tiles) = (Panel::default(), Tiles::configure());
            unsafe { multiply_rows(dtype, &rows_b, &acts, 0..t, o, rows, &mut panel, &tiles) };
            out
        };
        let alone = run(12);
        for t in [16, 30, 80] {
            let batch = run(t);
            let (a, b): (Vec<u32>, Vec<u32>) = (
                alone.iter().map(|v| v.to_bits()).collect(),
                batch[..12 * rows].iter().map(|v| v.to_bits()).collect(),
            );
            assert_eq!(a, b, "t={t}");
        }
    }

    fn bf16(v: f32) -> f64 {
        half::bf16::from_f32(v).to_f32() as f64
    }

    /// Every (row, token) of panels of up to 16 rows, against the same sums in f64 over the dequantized
    /// weights and the activations, each rounded to bf16 as the tiles take them: only the order and
    /// rounding of the f32 additions differ. Row, token and block counts that are not multiples of 16,
    /// 16 and 3, and tokens from a later tile.
    #[test]
    fn panels_match_the_bf16_sums() {
        if skip() {
            return;
        }
        for dtype in [DType::Q8_0, DType::Q5_0, DType::Q4K, DType::Q6K] {
            for (cols, rows, t, from) in [
                (256usize, 16, 16, 0),
                (96, 3, 5, 0),
                (512, 11, 37, 16),
                (4864, 16, 70, 32),
            ] {
                let (vals, bytes) = dtype.block();
                let cols = cols.next_multiple_of(vals);
                let rb = cols / vals * bytes;
                let w = reference_quantizer::random_blocks(dtype, rows * cols / vals, cols as u64);
                let x: Vec<f32> = (0..t * cols)
                    .map(|i| ((i * 7919 % 1013) as f32 / 506.0 - 1.0) * (1 + i / 32 % 3) as f32)
                    .collect();
                let rows_b: Vec<&[u8]> = w.chunks_exact(rb).collect();
                let acts = AmxActs::new(&x, t, cols);
                let mut got = vec![f32::NAN; t * rows];
                // SAFETY: `got` holds t tokens of `rows` values; stride rows.
                let (o, mut panel) = (got.as_mut_ptr(), Panel::default());
                let tiles = Tiles::configure();
                unsafe {
                    multiply_rows(dtype, &rows_b, &acts, from..t, o, rows, &mut panel, &tiles)
                };
                for (r, row) in rows_b.iter().enumerate() {
                    let wr = crate::weights::quant::dequantize(dtype, row, cols).unwrap();
                    for ti in 0..t {
                        let g = got[ti * rows + r];
                        if ti < from {
                            assert!(g.is_nan(), "{dtype:?}: token {ti} was not asked for");
                            continue;
                        }
                        let xr = &x[ti * cols..(ti + 1) * cols];
                        let (want, mag) =
                            wr.iter().zip(xr).fold((0f64, 0f64), |(s, m), (&w, &x)| {
                                let p = bf16(w) * bf16(x);
                                (s + p, m + p.abs())
                            });
                        assert!(
                            (g as f64 - want).abs() <= 1e-5 * mag + 1e-30,
                            "{dtype:?} cols={cols} rows={rows} t={t}: row {r} token {ti}: {g} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
