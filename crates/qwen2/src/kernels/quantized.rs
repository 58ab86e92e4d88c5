//! Products with weights kept in ggml's block-quantized forms (Q8_0, Q5_0, Q4_K, Q6_K), straight from the
//! mapped file bytes.
//!
//! The activations are quantized once per product to 8-bit blocks of 32 values with one f32 scale each
//! ([`QuantizedActs`]); each 32-value piece of a weight row is then multiplied with integer multiply-adds and
//! scaled once in f32. That is an approximation of the exact product (the activations lose precision; the
//! weights do not), which is why it is a separate weight form: see `WeightForm` in `matrix.rs`.
//!
//! What every format contributes per 32-value piece `j` of a row, with `a_j = dx_j · qx` the dequantized
//! activations and `S_j = dx_j · Σ qx` their sum:
//! - Q8_0: `d · dx_j · Σ q·qx`, `q` the stored i8;
//! - Q5_0: `d · dx_j · Σ (q − 16)·qx`, `q` the 5-bit value;
//! - Q4_K: `d·sc_j · dx_j · Σ q·qx − dmin·m_j · S_j`, `q` the nibble, `sc_j`, `m_j` the 6-bit scale and min;
//! - Q6_K: `d · dx_j · (sc_a · Σ_{first 16} (q − 32)·qx + sc_b · Σ_{last 16} (q − 32)·qx)`.
//!
//! Three implementations compute the same integer sums: a portable one here (also the integer reference),
//! AVX2 (`maddubs`) and AVX-512 VNNI (`vpdpbusd`) in `quantized_x86.rs`, chosen at run time. The
//! definition they are all tested against is [`matmul_reference`]: dequantize both sides to f32 and dot.

use crate::weights::{quant, DType};

/// Values per activation block (and per weight piece that gets one f32 scale).
pub const BLOCK: usize = 32;

/// A block-quantized weight matrix: `rows` rows of `cols / values_per_block` blocks each, laid out as
/// `layout` says.
#[derive(Clone, Copy)]
pub struct QuantSlice<'a> {
    pub dtype: DType,
    pub bytes: &'a [u8],
    pub layout: Layout,
}

impl<'a> QuantSlice<'a> {
    /// Rows as a GGUF file stores them, one after another.
    pub fn rows(dtype: DType, bytes: &'a [u8]) -> Self {
        QuantSlice {
            dtype,
            bytes,
            layout: Layout::Rows,
        }
    }
}

/// How a quantized matrix's rows lie in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Row after row, each a run of its blocks: as the file stores them.
    Rows,
    /// Q8_0 or Q5_0 laid out again at load, eight rows at a time, for the decode kernel: see
    /// [`interleave_q8_0`] and [`interleave_q5_0`].
    Interleaved8,
}

impl Layout {
    /// Rows stored for `rows` rows: interleaved ones in whole groups of eight (the last padded).
    pub fn stored_rows(self, rows: usize) -> usize {
        match self {
            Layout::Rows => rows,
            Layout::Interleaved8 => rows.next_multiple_of(GROUP_ROWS),
        }
    }
}

/// `(values, bytes)` of one (super-)block for the types this module multiplies; `None` for the others.
pub fn block_shape(dtype: DType) -> Option<(usize, usize)> {
    match dtype {
        DType::Q8_0 | DType::Q5_0 | DType::Q4K | DType::Q6K => Some(dtype.block()),
        _ => None,
    }
}

/// Bytes of one row of `cols` values, if `dtype` is a quantized type this module multiplies and a row is a
/// whole number of blocks (rows must start on a block boundary to be multiplied in place).
pub fn row_bytes(dtype: DType, cols: usize) -> Option<usize> {
    let (vals, bytes) = block_shape(dtype)?;
    (cols.is_multiple_of(vals) && cols > 0).then(|| cols / vals * bytes)
}

/// Activations quantized to 8 bits: for each of `t` rows of `cols` values (`cols` a multiple of 32), the
/// i8 values, one scale per 32 values and the dequantized sum of each block (used by Q4_K's mins).
pub struct QuantizedActs {
    pub t: usize,
    pub cols: usize,
    pub qs: Vec<i8>,
    pub d: Vec<f32>,
    pub sums: Vec<f32>,
}

impl QuantizedActs {
    /// Row `i` as a view.
    #[inline]
    pub fn row(&self, i: usize) -> ActRow<'_> {
        let nb = self.cols / BLOCK;
        ActRow {
            qs: &self.qs[i * self.cols..(i + 1) * self.cols],
            d: &self.d[i * nb..(i + 1) * nb],
            sums: &self.sums[i * nb..(i + 1) * nb],
        }
    }

    /// The dequantized values (what the integer products effectively multiply with).
    pub fn dequantize(&self) -> Vec<f32> {
        self.qs
            .iter()
            .enumerate()
            .map(|(i, &q)| q as f32 * self.d[i / BLOCK])
            .collect()
    }
}

/// One token's quantized activations.
#[derive(Clone, Copy)]
pub struct ActRow<'a> {
    pub qs: &'a [i8],
    pub d: &'a [f32],
    pub sums: &'a [f32],
}

/// Quantizes one block of 32 values: scale `amax / 127`, values rounded to nearest (ties to even), so
/// every value is in −127..=127 (never −128, which the sign trick in the SIMD kernels relies on).
/// A block holding a NaN or an infinity gets a NaN scale, so the product is NaN as the exact one would be.
/// Returns the scale and the dequantized sum of the block.
pub fn quantize_block_scalar(x: &[f32; 32], q: &mut [i8; 32]) -> (f32, f32) {
    if !x.iter().all(|v| v.is_finite()) {
        q.fill(0);
        return (f32::NAN, f32::NAN);
    }
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let (d, id) = scales(amax);
    let mut sum = 0i32;
    for (qi, &v) in q.iter_mut().zip(x) {
        let r = (v * id).round_ties_even().clamp(-127.0, 127.0) as i8;
        *qi = r;
        sum += r as i32;
    }
    (d, d * sum as f32)
}

/// A block's scale and inverse scale from its largest magnitude. Blocks below 1e-30 (where `127 / amax`
/// would overflow) count as zeros: their contribution is far below f32 resolution of any real product.
#[inline]
pub(crate) fn scales(amax: f32) -> (f32, f32) {
    if amax > 1e-30 {
        (amax / 127.0, 127.0 / amax)
    } else {
        (0.0, 0.0)
    }
}

/// [`quantize_block_scalar`], with SIMD where available (bit-identical results).
#[inline]
fn quantize_block(x: &[f32], q: &mut [i8]) -> (f32, f32) {
    let (Ok(x), Ok(q)) = (<&[f32; 32]>::try_from(x), <&mut [i8; 32]>::try_from(q)) else {
        unreachable!("blocks are 32 values")
    };
    #[cfg(target_arch = "x86_64")]
    if let Some(r) = super::quantized_x86::quantize_block(x, q) {
        return r;
    }
    quantize_block_scalar(x, q)
}

/// Activations of at least this many values (tokens × columns) are quantized, and laid out for the
/// panels (`quantized_x86::PanelActs`), across the pool; fewer go faster on the calling thread alone
/// than with the other threads woken for them.
pub(crate) const SPLIT_ACTS_MIN: usize = 1 << 16;

/// Quantizes `t` rows of `cols` values (`cols` a multiple of 32). Large inputs are split across threads.
pub fn quantize_acts(x: &[f32], t: usize, cols: usize) -> QuantizedActs {
    assert!(cols.is_multiple_of(BLOCK) && x.len() == t * cols);
    let nb = cols / BLOCK;
    let mut qs = vec![0i8; t * cols];
    let mut d = vec![0f32; t * nb];
    let mut sums = vec![0f32; t * nb];
    // Runs of 256 blocks: a task each for large inputs, one after another on this thread for small ones.
    const RUN: usize = 256;
    let runs: Vec<_> = x
        .chunks(RUN * BLOCK)
        .zip(
            qs.chunks_mut(RUN * BLOCK)
                .zip(d.chunks_mut(RUN).zip(sums.chunks_mut(RUN))),
        )
        .collect();
    type Run<'a> = (&'a [f32], (&'a mut [i8], (&'a mut [f32], &'a mut [f32])));
    let quantize_run = |(x, (q, (d, s))): Run| {
        let blocks = x.chunks_exact(BLOCK).zip(q.chunks_exact_mut(BLOCK));
        for (((x, q), d), s) in blocks.zip(d.iter_mut()).zip(s.iter_mut()) {
            (*d, *s) = quantize_block(x, q);
        }
    };
    super::pool::for_each_item_if(t * cols >= SPLIT_ACTS_MIN, runs, quantize_run);
    QuantizedActs {
        t,
        cols,
        qs,
        d,
        sums,
    }
}

#[inline]
pub(crate) fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// The 6-bit (scale, min) of sub-block `j` of a Q4_K super-block's 12 packed bytes (ggml's layout:
/// bytes 0..4 low 6 bits of scales 0..4, bytes 4..8 low 6 bits of mins 0..4, bytes 8..12 the low nibbles
/// of scales/mins 4..8, whose top 2 bits sit in the spare top bits of bytes 0..8).
#[inline]
pub(crate) fn q4k_scale_min(s: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Portable integer dot of one weight row with one token: the same integer sums and scalings the SIMD
/// kernels compute, in plain Rust (it auto-vectorises reasonably and serves where no SIMD path exists).
pub fn dot_portable(dtype: DType, w: &[u8], a: ActRow) -> f32 {
    let idot = |w: &[i8; 32], x: &[i8]| -> i32 {
        w.iter()
            .zip(x)
            .map(|(&a, &b)| a as i32 * b as i32)
            .sum::<i32>()
    };
    let mut acc = 0f32;
    let mut wv = [0i8; 32];
    match dtype {
        DType::Q8_0 => {
            for (b, blk) in w.chunks_exact(34).enumerate() {
                for (o, &q) in wv.iter_mut().zip(&blk[2..]) {
                    *o = q as i8;
                }
                let s = idot(&wv, &a.qs[b * 32..b * 32 + 32]);
                acc += f16_at(blk, 0) * a.d[b] * s as f32;
            }
        }
        DType::Q5_0 => {
            for (b, blk) in w.chunks_exact(22).enumerate() {
                let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
                for i in 0..16 {
                    let lo = (blk[6 + i] & 0x0F) | ((((qh >> i) & 1) as u8) << 4);
                    let hi = (blk[6 + i] >> 4) | ((((qh >> (i + 16)) & 1) as u8) << 4);
                    wv[i] = lo as i8 - 16;
                    wv[i + 16] = hi as i8 - 16;
                }
                let s = idot(&wv, &a.qs[b * 32..b * 32 + 32]);
                acc += f16_at(blk, 0) * a.d[b] * s as f32;
            }
        }
        DType::Q4K => {
            for (sb, blk) in w.chunks_exact(144).enumerate() {
                let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
                let scales = &blk[4..16];
                for j in 0..8 {
                    let (sc, m) = q4k_scale_min(scales, j);
                    let q = &blk[16 + 32 * (j / 2)..16 + 32 * (j / 2) + 32];
                    for (o, &v) in wv.iter_mut().zip(q) {
                        *o = if j % 2 == 0 { v & 0x0F } else { v >> 4 } as i8;
                    }
                    let b = sb * 8 + j;
                    let s = idot(&wv, &a.qs[b * 32..b * 32 + 32]);
                    acc += d * sc as f32 * a.d[b] * s as f32;
                    acc -= dmin * m as f32 * a.sums[b];
                }
            }
        }
        DType::Q6K => {
            for (sb, blk) in w.chunks_exact(210).enumerate() {
                let d = f16_at(blk, 208);
                for j in 0..8 {
                    let (h, k) = (j / 4, j % 4);
                    let ql = &blk[64 * h + 32 * (k & 1)..][..32];
                    let qh = &blk[128 + 32 * h..][..32];
                    for l in 0..32 {
                        let lo = if k < 2 { ql[l] & 0x0F } else { ql[l] >> 4 };
                        let hi = ((qh[l] >> (2 * k)) & 3) << 4;
                        wv[l] = (lo | hi) as i8 - 32;
                    }
                    let sc_a = blk[192 + 8 * h + 2 * k] as i8 as i32;
                    let sc_b = blk[192 + 8 * h + 2 * k + 1] as i8 as i32;
                    let b = sb * 8 + j;
                    let x = &a.qs[b * 32..b * 32 + 32];
                    let (w0, w1) = wv.split_at(16);
                    let s0: i32 = w0
                        .iter()
                        .zip(&x[..16])
                        .map(|(&p, &q)| p as i32 * q as i32)
                        .sum();
                    let s1: i32 = w1
                        .iter()
                        .zip(&x[16..])
                        .map(|(&p, &q)| p as i32 * q as i32)
                        .sum();
                    acc += d * a.d[b] * (sc_a * s0 + sc_b * s1) as f32;
                }
            }
        }
        _ => unreachable!("not a block-quantized type: {dtype:?}"),
    }
    acc
}

/// Which implementation of the integer products runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Plain Rust.
    Portable,
    /// AVX2 `vpmaddubsw` (x86-64 with AVX2, FMA, F16C).
    Avx2,
    /// AVX-512 VNNI `vpdpbusd` (x86-64 with AVX-512 F/BW/VL/VNNI, F16C).
    Avx512Vnni,
    /// AVX-512 VNNI, with products of `amx::MIN_TOKENS` or more tokens on AMX tiles in bf16 (Xeons
    /// since Sapphire Rapids, on a Linux that grants the tile state). The tiles take the activations in
    /// f32: only [`matmul_many`] (and what calls it) uses them; from 8-bit activations this is VNNI.
    Amx,
}

impl Backend {
    /// Whether this CPU can run it.
    pub fn is_available(self) -> bool {
        match self {
            Backend::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Backend::Avx2 => super::quantized_x86::has_avx2(),
            #[cfg(target_arch = "x86_64")]
            Backend::Avx512Vnni => super::quantized_x86::has_avx512vnni(),
            #[cfg(target_arch = "x86_64")]
            Backend::Amx => super::amx::available(),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Every backend this CPU can run, fastest last.
    pub fn available() -> Vec<Backend> {
        [
            Backend::Portable,
            Backend::Avx2,
            Backend::Avx512Vnni,
            Backend::Amx,
        ]
        .into_iter()
        .filter(|b| b.is_available())
        .collect()
    }

    /// The fastest available backend (detected once), or the one `DUET_BACKEND` names (`portable`,
    /// `avx2`, `avx512-vnni`, `amx`) if this CPU has it: to compare them, or to step around one. The
    /// float GEMM follows it: 512-bit only with an AVX-512 backend (`float_x86::use_avx512`).
    pub fn best() -> Backend {
        static BEST: std::sync::OnceLock<Backend> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            let available = Backend::available();
            let fastest = *available.last().unwrap_or(&Backend::Portable);
            let Ok(name) = std::env::var("DUET_BACKEND") else {
                return fastest;
            };
            match available.iter().find(|b| b.name() == name) {
                Some(&b) => b,
                None => {
                    let names: Vec<&str> = available.iter().map(|b| b.name()).collect();
                    eprintln!(
                        "duet: warning: DUET_BACKEND={name:?} is not one this CPU runs ({}); using {}",
                        names.join(", "),
                        fastest.name()
                    );
                    fastest
                }
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Portable => "portable",
            Backend::Avx2 => "avx2",
            Backend::Avx512Vnni => "avx512-vnni",
            Backend::Amx => "amx",
        }
    }
}

/// Computes a tile of `R` weight rows × `T` tokens: `out[r][t] = w[r] · a[t]`.
/// `R` ≤ 4 and `T` ≤ 4 (the SIMD tiles are instantiated for a few shapes only).
#[inline]
fn tile<const R: usize, const T: usize>(
    backend: Backend,
    dtype: DType,
    w: [&[u8]; R],
    a: [ActRow; T],
) -> [[f32; T]; R] {
    match backend {
        #[cfg(target_arch = "x86_64")]
        Backend::Avx2 | Backend::Avx512Vnni | Backend::Amx => {
            super::quantized_x86::tile::<R, T>(backend, dtype, w, a)
        }
        _ => {
            let mut out = [[0f32; T]; R];
            for r in 0..R {
                for t in 0..T {
                    out[r][t] = dot_portable(dtype, w[r], a[t]);
                }
            }
            out
        }
    }
}

/// `out[r] = row r · a` for `out.len()` consecutive rows of `row_bytes` bytes in `w` (for an
/// interleaved `w`: whole groups of eight rows, from a group's start, the last group's extra rows not
/// written).
fn rows_dot(
    backend: Backend,
    dtype: DType,
    layout: Layout,
    w: &[u8],
    row_bytes: usize,
    a: ActRow,
    out: &mut [f32],
) {
    if layout == Layout::Interleaved8 {
        return match backend {
            #[cfg(target_arch = "x86_64")]
            Backend::Avx2 | Backend::Avx512Vnni | Backend::Amx => {
                super::quantized_x86::rows_interleaved(backend, dtype, w, row_bytes, a, out)
            }
            _ => {
                let mut rows = vec![0u8; GROUP_ROWS * row_bytes];
                for (g, o) in out.chunks_mut(GROUP_ROWS).enumerate() {
                    deinterleave(dtype, w, row_bytes, g * GROUP_ROWS, &mut rows);
                    for (o, wr) in o.iter_mut().zip(rows.chunks_exact(row_bytes)) {
                        *o = dot_portable(dtype, wr, a);
                    }
                }
            }
        };
    }
    match backend {
        #[cfg(target_arch = "x86_64")]
        Backend::Avx2 | Backend::Avx512Vnni | Backend::Amx => {
            super::quantized_x86::rows(backend, dtype, w, row_bytes, a, out)
        }
        _ => {
            for (o, wr) in out.iter_mut().zip(w.chunks_exact(row_bytes)) {
                *o = dot_portable(dtype, wr, a);
            }
        }
    }
}

/// Below this many weight bytes a decode product runs on the calling thread: waking the pool costs more
/// than the second core saves.
const PARALLEL_MIN_BYTES: usize = 192 << 10;

/// Rows per parallel task such that tasks are big enough to amortise scheduling (≥ ~16 KiB of weights)
/// and there are several per thread (`per_thread`: [`TASKS_PER_THREAD`] unless a caller measured
/// another count better for its products), so the threads finish together. Always even.
pub(crate) fn rows_per_task(rows: usize, row_bytes: usize, t: usize, per_thread: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let min_rows = (16384 / (row_bytes * t.max(1)).max(1)).max(2);
    let per = rows.div_ceil(threads * per_thread.max(1)).max(min_rows);
    (per + 1) & !1
}

/// Tasks per thread for a product's rows: enough that a thread slowed by the host is made up for by
/// the other taking more of them.
pub(crate) const TASKS_PER_THREAD: usize = 8;

/// How a decode step's products are split between the threads (quantized and float alike): in units
/// of eight rows (a group of an interleaved layout), numbered across the step's products, handed out by
/// [`super::pool::for_each_run`] in runs of about this many weight bytes: each thread streams one
/// contiguous part of the step, and one that finishes first takes runs from the back of the other's.
///
/// Before, each product was cut into two tasks a thread, claimed in turn (fewer and longer than a
/// prefill's eight: each task starts a new stream from DRAM; two against eight measured 1.02–1.06× on a
/// 2-core Xeon VM). On a 2-core Zen 3 VM the leader then waited for the helper's last task 1.0–1.5 ms
/// of a 29 ms BF16 token, 0.3–0.4 ms with runs; one thread alone decoded at the one-thread probe's pace,
/// and two single-thread processes side by side outran the pool's two threads by 1.09–1.15×. This
/// build against the one before, processes alternated (six rounds of 128 tokens): BF16 1.069× and,
/// reversed, 1.088×; `native` 1.028×; Q8_0 1.036× (six of six faster); F32 1.018× (four of four).
/// Switchable in one build, runs of 1 MiB measured about the same as 256 KiB (1.006–1.034× against
/// the tasks), of 64 KiB no better. Each row's value is the same whichever thread computes it.
pub(crate) const DECODE_RUN_BYTES: usize = 256 << 10;
const DECODE_UNIT_ROWS: usize = 8;

/// `f(m, rows)` for every row of a decode step's products (`rows_of[m]` rows each, of about `row_bytes`
/// bytes), each row in exactly one call, in parallel: the split [`DECODE_RUN_BYTES`] describes.
pub(crate) fn for_each_decode_rows(
    rows_of: &[usize],
    row_bytes: usize,
    f: impl Fn(usize, std::ops::Range<usize>) + Sync,
) {
    // Where each product's units begin, and where the last one ends.
    let mut starts = Vec::with_capacity(rows_of.len() + 1);
    starts.push(0);
    for rows in rows_of {
        starts.push(starts[starts.len() - 1] + rows.div_ceil(DECODE_UNIT_ROWS));
    }
    let units = starts[rows_of.len()];
    let grain = (DECODE_RUN_BYTES / (DECODE_UNIT_ROWS * row_bytes).max(1)).max(1);
    super::pool::for_each_run(units, grain, |run| {
        // A run may span the end of one product and the start of the next.
        let mut u = run.start;
        while u < run.end {
            let m = starts.partition_point(|&s| s <= u) - 1;
            let end = run.end.min(starts[m + 1]);
            let first = DECODE_UNIT_ROWS * (u - starts[m]);
            f(
                m,
                first..(DECODE_UNIT_ROWS * (end - starts[m])).min(rows_of[m]),
            );
            u = end;
        }
    });
}

/// [`for_each_decode_rows`] over the products' outputs: `f(m, r0, out)` gets rows `r0..r0 + out.len()`
/// of product `m` and that part of its output.
pub(crate) fn for_each_decode_run(
    outs: &mut [&mut [f32]],
    row_bytes: usize,
    f: impl Fn(usize, usize, &mut [f32]) + Sync,
) {
    let rows_of: Vec<usize> = outs.iter().map(|o| o.len()).collect();
    let bases: Vec<super::pool::SendPtr<f32>> = outs
        .iter_mut()
        .map(|o| super::pool::SendPtr(o.as_mut_ptr()))
        .collect();
    for_each_decode_rows(&rows_of, row_bytes, |m, rows| {
        // SAFETY: `for_each_decode_rows` passes each row of product m to one call only, within its
        // `rows_of[m]` outputs, and `outs` stays mutably borrowed until it returns.
        let out = unsafe { std::slice::from_raw_parts_mut(bases[m].at(rows.start), rows.len()) };
        f(m, rows.start, out)
    });
}

/// Tasks per thread for a prefill of up to [`SHORT_PREFILL_TOKENS`] tokens (the dual task's requests):
/// fewer than [`TASKS_PER_THREAD`], so each task's start (its first rows read before the prefetch runs
/// ahead; on AMX, configuring the tiles too) is paid fewer times. On AMX (a Xeon VM), measured faster at
/// 13 and 32 tokens, not at 64 (benches/RESULTS.md). The panel kernels' 46-character label on a 2-core
/// Zen 3 VM (30 timed labels a run, medians): with the count switchable in one build, 1.057× (four of
/// four runs faster) and 1.029× (seven of eight) against eight a thread, two 1.024×, six 1.037× (five
/// of eight each); the build against the one before, alternated, 1.008× and, in the other order, 1.052×
/// (seven of eight each). The 15-character label 1.011× (six of six). Prompts of 73 and 142 tokens,
/// which keep eight, measured 1.009× and 0.996× with four. Hosts with AVX-512 VNNI take the same rule,
/// not measured there.
const SHORT_PREFILL_TASKS_PER_THREAD: usize = 4;
/// See [`SHORT_PREFILL_TASKS_PER_THREAD`]: one group of AMX token tiles, where that path measured it.
const SHORT_PREFILL_TOKENS: usize = 32;
#[cfg(target_arch = "x86_64")]
const _: () = assert!(SHORT_PREFILL_TOKENS == super::amx::GROUP_TOKENS);

/// Tasks per thread for a prefill of `t` tokens: a short one's or a longer one's (a decode's products
/// are split by [`for_each_decode_run`] instead).
fn tasks_per_thread(t: usize) -> usize {
    match t {
        2..=SHORT_PREFILL_TOKENS => SHORT_PREFILL_TASKS_PER_THREAD,
        _ => TASKS_PER_THREAD,
    }
}

/// Checks shapes and returns the bytes of one row (in an interleaved layout: a group's bytes / 8).
fn check(w: &QuantSlice, rows: usize, cols: usize) -> usize {
    let rb =
        row_bytes(w.dtype, cols).unwrap_or_else(|| panic!("{:?} rows of {cols} values", w.dtype));
    if w.layout == Layout::Interleaved8 {
        assert!(interleaves(w.dtype), "{:?} is not interleaved", w.dtype);
    }
    let stored = w.layout.stored_rows(rows);
    assert_eq!(w.bytes.len(), stored * rb, "weight bytes vs shape");
    rb
}

/// Rows `r0..r0 + n` of `w` as the file lays them out: the stored bytes themselves, or for an
/// interleaved matrix a copy in `buf` (what the prefill kernels, which read rows, take).
fn plain_rows<'x>(
    w: QuantSlice<'x>,
    rb: usize,
    r0: usize,
    n: usize,
    buf: &'x mut Vec<u8>,
) -> &'x [u8] {
    match w.layout {
        Layout::Rows => &w.bytes[r0 * rb..(r0 + n) * rb],
        Layout::Interleaved8 => {
            buf.resize(n * rb, 0);
            deinterleave(w.dtype, w.bytes, rb, r0, buf);
            buf
        }
    }
}

thread_local! {
    /// Each thread's room for [`plain_rows`]' copies: a prefill task's rows (~300 KB), reused.
    static PLAIN_ROWS: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `f` on rows `r0..r0 + n` of `w` in the file's layout (see [`plain_rows`]).
fn with_plain_rows<R>(
    w: QuantSlice,
    rb: usize,
    r0: usize,
    n: usize,
    f: impl FnOnce(&[u8]) -> R,
) -> R {
    if w.layout == Layout::Rows {
        return f(&w.bytes[r0 * rb..(r0 + n) * rb]);
    }
    PLAIN_ROWS.with_borrow_mut(|buf| f(plain_rows(w, rb, r0, n, buf)))
}

/// `out (t × rows) = x (t × cols) · wᵀ` with the best backend.
pub fn matmul(w: QuantSlice, rows: usize, cols: usize, x: &[f32], t: usize, out: &mut [f32]) {
    matmul_with(Backend::best(), w, rows, cols, x, t, out)
}

/// [`matmul`] with a chosen backend (tests and benches compare them).
pub fn matmul_with(
    backend: Backend,
    w: QuantSlice,
    rows: usize,
    cols: usize,
    x: &[f32],
    t: usize,
    out: &mut [f32],
) {
    assert!(x.len() == t * cols && out.len() == t * rows);
    matmul_many(backend, &mut [Product { w, rows, out }], cols, x, t);
}

/// Several products of `x` (`t` rows of `cols` values) in one step: on AMX tiles those that
/// `uses_amx` takes (bf16, see `amx.rs`), the rest with `x` quantized to 8 bits once
/// ([`matmul_acts_many`]).
pub fn matmul_many(backend: Backend, products: &mut [Product], cols: usize, x: &[f32], t: usize) {
    assert!(x.len() == t * cols);
    let tiles: Vec<bool> = products
        .iter()
        .map(|p| uses_amx(backend, p.w.dtype, t))
        .collect();
    let (mut rest, mut on_tiles): (Vec<Product>, Vec<Product>) = (Vec::new(), Vec::new());
    for (p, &tiles) in products.iter_mut().zip(&tiles) {
        let p = Product {
            w: p.w,
            rows: p.rows,
            out: &mut *p.out,
        };
        if tiles {
            on_tiles.push(p);
        } else {
            rest.push(p);
        }
    }
    if !rest.is_empty() {
        let acts = quantize_acts(x, t, cols);
        matmul_acts_many(backend, &mut rest, cols, &acts);
    }
    #[cfg(target_arch = "x86_64")]
    if !on_tiles.is_empty() {
        amx_many(&mut on_tiles, cols, x, t);
    }
}

/// The products of [`matmul_many`] on AMX tiles: each task owns a block of rows (a multiple of 16)
/// of one product and writes them, for every token, straight into its output.
#[cfg(target_arch = "x86_64")]
fn amx_many(products: &mut [Product], cols: usize, x: &[f32], t: usize) {
    let acts = super::amx::AmxActs::new(x, t, cols);
    let ws: Vec<(QuantSlice, usize, usize)> = products
        .iter()
        .map(|p| {
            let rb = check(&p.w, p.rows, cols);
            assert!(p.out.len() == t * p.rows);
            let per = rows_per_task(p.rows, rb, t, tasks_per_thread(t))
                .next_multiple_of(super::amx::ROWS);
            (p.w, rb, per)
        })
        .collect();
    let mut tasks = Vec::new();
    for (i, p) in products.iter_mut().enumerate() {
        let out = super::pool::SharedOut::new(p.out, t);
        let per = ws[i].2;
        for r0 in (0..p.rows).step_by(per) {
            let rows = per.min(p.rows - r0);
            tasks.push((
                i,
                OutBlock {
                    shared: out,
                    r0,
                    rows,
                },
            ));
        }
    }
    super::pool::for_each(tasks.len(), |k| {
        let (i, block) = tasks[k];
        let (w, rb, _) = ws[i];
        if let Some(groups) = q5_0_task_groups(w, rb, block) {
            return prefill_task_amx(w.dtype, TaskRows::Groups(groups), rb, &acts, block);
        }
        with_plain_rows(w, rb, block.r0, block.rows, |wrows| {
            prefill_task_amx(w.dtype, TaskRows::Rows(wrows), rb, &acts, block)
        });
    });
}

/// The product with activations already quantized (one quantization can serve several matrices).
pub fn matmul_acts(
    backend: Backend,
    w: QuantSlice,
    rows: usize,
    cols: usize,
    acts: &QuantizedActs,
    out: &mut [f32],
) {
    matmul_acts_many(backend, &mut [Product { w, rows, out }], cols, acts);
}

/// One matrix of a [`matmul_acts_many`] call and where its `t × rows` result goes.
pub struct Product<'a, 'o> {
    pub w: QuantSlice<'a>,
    pub rows: usize,
    pub out: &'o mut [f32],
}

/// Several products of the same activations in one parallel step: the tasks of every matrix are
/// scheduled together. Why: a decode step's small products cost more in waking and joining the other
/// thread than in arithmetic (the 128-row k and v products alone are below `PARALLEL_MIN_BYTES` and ran
/// on one core), so q, k and v (and gate and up) go as one step. Each row's value is what the product
/// alone gives, bit for bit: tasks only decide which thread computes a row.
pub fn matmul_acts_many(
    backend: Backend,
    products: &mut [Product],
    cols: usize,
    acts: &QuantizedActs,
) {
    assert!(backend.is_available(), "{backend:?} is not available here");
    let t = acts.t;
    assert!(acts.cols == cols);
    let ws: Vec<(QuantSlice, usize, usize)> = products
        .iter()
        .map(|p| {
            let rb = check(&p.w, p.rows, cols);
            assert!(p.out.len() == t * p.rows);
            // Interleaved rows go in whole groups of eight.
            let per =
                p.w.layout
                    .stored_rows(rows_per_task(p.rows, rb, t, tasks_per_thread(t)));
            (p.w, rb, per)
        })
        .collect();
    if t == 1 {
        // Decode: each task multiplies a run of consecutive rows, one sequential stream.
        let a = acts.row(0);
        let run = |(w, rb, _): (QuantSlice, usize, usize), r0: usize, o: &mut [f32]| {
            let stored = w.layout.stored_rows(o.len());
            let bytes = &w.bytes[r0 * rb..(r0 + stored) * rb];
            rows_dot(backend, w.dtype, w.layout, bytes, rb, a, o);
        };
        let total: usize = ws.iter().map(|(w, ..)| w.bytes.len()).sum();
        if total < PARALLEL_MIN_BYTES {
            for (p, &w) in products.iter_mut().zip(&ws) {
                run(w, 0, p.out);
            }
            return;
        }
        let mut outs: Vec<&mut [f32]> = products.iter_mut().map(|p| &mut *p.out).collect();
        for_each_decode_run(&mut outs, ws[0].1, |m, r0, o| run(ws[m], r0, o));
        return;
    }
    // Prefill: each task owns a block of rows and writes them, for every token, straight into the
    // product's output. Tokens are taken in groups whose activations fit in L2.
    let tok_group = (262144 / cols).clamp(8, 256) & !7;
    let panels: Vec<bool> = ws
        .iter()
        .map(|(w, ..)| uses_panel(backend, w.dtype))
        .collect();
    // Panels take eight rows at a time: tasks of a multiple of eight rows leave none over.
    let pers: Vec<usize> = ws
        .iter()
        .zip(&panels)
        .map(|(&(_, _, per), &panel)| if panel { per.next_multiple_of(8) } else { per })
        .collect();
    // One per panel type, not per matrix: q, k and v (gate and up) are often of one type, and its
    // activation sums are the same for each.
    #[cfg(target_arch = "x86_64")]
    let mut panel_acts: Vec<(DType, super::quantized_x86::PanelActs)> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    for ((w, ..), &panel) in ws.iter().zip(&panels) {
        if panel && !panel_acts.iter().any(|(d, _)| *d == w.dtype) {
            panel_acts.push((w.dtype, super::quantized_x86::PanelActs::new(acts, w.dtype)));
        }
    }
    let mut tasks = Vec::new();
    for (i, p) in products.iter_mut().enumerate() {
        let out = super::pool::SharedOut::new(p.out, t);
        for r0 in (0..p.rows).step_by(pers[i]) {
            let rows = pers[i].min(p.rows - r0);
            let block = OutBlock {
                shared: out,
                r0,
                rows,
            };
            tasks.push((i, block));
        }
    }
    // The blocks share a token's output row, but only a cache line at each edge: copying each task's
    // part into place afterwards (as this once did, to keep every line to one task) cost more than that
    // sharing, a serial pass over every output that also zeroed it first.
    super::pool::for_each(tasks.len(), |k| {
        let (i, block) = tasks[k];
        let (w, rb, _) = ws[i];
        let dtype = w.dtype;
        #[cfg(target_arch = "x86_64")]
        let pacts = panel_acts.iter().find(|(d, _)| *d == dtype).map(|(_, a)| a);
        #[cfg(target_arch = "x86_64")]
        if let (Some(groups), Some(pacts)) = (q5_0_task_groups(w, rb, block), pacts) {
            let groups = TaskRows::Groups(groups);
            return prefill_task_panel(backend, dtype, groups, rb, pacts, tok_group, block);
        }
        with_plain_rows(w, rb, block.r0, block.rows, |wrows| {
            #[cfg(target_arch = "x86_64")]
            if let Some(pacts) = pacts {
                let rows = TaskRows::Rows(wrows);
                return prefill_task_panel(backend, dtype, rows, rb, pacts, tok_group, block);
            }
            // 2 × 3 tiles measured best for Q8_0 on AVX2 (A/B in one process, 13-64 tokens): its
            // pieces are plain bytes, and 2 × 4 spilled an accumulator (2 × 3 was 1-12 % faster).
            prefill_task::<2, 3>((backend, dtype, wrows, rb, acts, tok_group, block))
        })
    });
}

/// One prefill task's block of a product's output: columns `r0..r0 + rows` of every token's row.
#[derive(Clone, Copy)]
struct OutBlock {
    shared: super::pool::SharedOut,
    r0: usize,
    rows: usize,
}

impl OutBlock {
    /// # Safety
    /// No other task writes this block while this one does.
    #[inline]
    unsafe fn put(&self, ti: usize, r: usize, v: f32) {
        assert!(r < self.rows);
        // SAFETY: row r of the block for token ti (both checked) is this task's alone, by the caller's
        // promise.
        unsafe { self.shared.at(ti, self.r0 + r).write(v) }
    }
}

type TaskArgs<'a> = (
    Backend,
    DType,
    &'a [u8],
    usize,
    &'a QuantizedActs,
    usize,
    OutBlock,
);

/// Whether a prefill of `dtype` runs on decoded panels (see `quantized_x86::Panel`).
fn uses_panel(backend: Backend, dtype: DType) -> bool {
    #[cfg(target_arch = "x86_64")]
    if backend != Backend::Portable {
        return super::quantized_x86::panel_format(dtype);
    }
    let _ = (backend, dtype);
    false
}

/// Whether a product of `t` tokens of `dtype` runs on AMX tiles (see `amx.rs`; only through
/// [`matmul_many`], which has the activations in f32).
fn uses_amx(backend: Backend, dtype: DType, t: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    if backend == Backend::Amx {
        return super::amx::format(dtype) && t >= super::amx::MIN_TOKENS;
    }
    let _ = (backend, dtype, t);
    false
}

/// The prefill task on AMX tiles: the block `out` for the rows in `w`, for every token, 16 rows at a
/// time (fewer at the end; see `amx::multiply_rows`).
#[cfg(target_arch = "x86_64")]
fn prefill_task_amx(
    dtype: DType,
    w: TaskRows,
    rb: usize,
    acts: &super::amx::AmxActs,
    out: OutBlock,
) {
    const ROWS: usize = super::amx::ROWS;
    let (nrows, t) = (out.rows, out.shared.tokens);
    w.check(nrows, rb);
    AMX_PANEL.with_borrow_mut(|panel| {
        let tiles = super::amx::Tiles::configure();
        for r in (0..nrows).step_by(ROWS) {
            let n = (nrows - r).min(ROWS);
            // SAFETY (both calls): rows r..r + n of the block (checked: nrows rows), for every token
            // of the product: the task's own elements.
            let (start, os) = (out.shared.at(0, out.r0 + r), out.shared.stride);
            match w {
                TaskRows::Rows(w) => {
                    let rows: [&[u8]; ROWS] =
                        std::array::from_fn(|i| &w[(r + i.min(n - 1)) * rb..][..rb]);
                    let rows = &rows[..n];
                    unsafe {
                        super::amx::multiply_rows(dtype, rows, acts, 0..t, start, os, panel, &tiles)
                    }
                }
                TaskRows::Groups(g) => {
                    let stored = Layout::Interleaved8.stored_rows(n);
                    let groups = &g[r * rb..(r + stored) * rb];
                    unsafe {
                        super::amx::multiply_q5_0_groups(
                            groups,
                            n,
                            acts,
                            0..t,
                            start,
                            os,
                            panel,
                            &tiles,
                        )
                    }
                }
            }
        }
    })
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// Each thread's AMX panel, kept from task to task: a fresh one per task was allocated and zeroed
    /// (28–152 KiB), and `multiply_rows` overwrites every byte it reads.
    static AMX_PANEL: std::cell::RefCell<super::amx::Panel> =
        std::cell::RefCell::new(super::amx::Panel::default());
}

/// A prefill task's weights as the panel kernels and AMX tiles take them: rows in the file's layout, or
/// the whole groups of an interleaved Q5_0 matrix that hold the task's rows.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
enum TaskRows<'a> {
    Rows(&'a [u8]),
    Groups(&'a [u8]),
}

#[cfg(target_arch = "x86_64")]
impl TaskRows<'_> {
    /// Checks that these are the bytes of `nrows` rows of `rb` bytes (in whole groups, for groups).
    fn check(self, nrows: usize, rb: usize) {
        match self {
            TaskRows::Rows(w) => assert!(w.len() == nrows * rb),
            TaskRows::Groups(g) => assert!(g.len() == Layout::Interleaved8.stored_rows(nrows) * rb),
        }
    }
}

/// The groups of an interleaved Q5_0 matrix holding a prefill task's rows, which the panels and AMX
/// tiles take as they are (`Panel::fill_q5_0_group`, `amx::multiply_q5_0_groups`); `None` for any other
/// matrix, which the task reads as rows.
#[cfg(target_arch = "x86_64")]
fn q5_0_task_groups<'a>(w: QuantSlice<'a>, rb: usize, block: OutBlock) -> Option<&'a [u8]> {
    if w.layout != Layout::Interleaved8 || w.dtype != DType::Q5_0 {
        return None;
    }
    // Panel and AMX tasks start at a multiple of eight rows: at a group's start.
    assert!(block.r0.is_multiple_of(GROUP_ROWS));
    let stored = w.layout.stored_rows(block.rows);
    Some(&w.bytes[block.r0 * rb..(block.r0 + stored) * rb])
}

/// The prefill task of the panel formats: the block `out` for the rows in `w`, for every token; each span
/// of eight rows (fewer at the end) is decoded once per token group and multiplied with all of its
/// tokens.
#[cfg(target_arch = "x86_64")]
fn prefill_task_panel(
    backend: Backend,
    dtype: DType,
    w: TaskRows,
    rb: usize,
    acts: &super::quantized_x86::PanelActs,
    tok_group: usize,
    out: OutBlock,
) {
    let (nrows, t) = (out.rows, out.shared.tokens);
    w.check(nrows, rb);
    let mut panel = super::quantized_x86::Panel::default();
    for g0 in (0..t).step_by(tok_group) {
        let tokens = g0..(g0 + tok_group).min(t);
        for r in (0..nrows).step_by(8) {
            let n = (nrows - r).min(8);
            match w {
                TaskRows::Rows(w) => {
                    let rows: [&[u8]; 8] =
                        std::array::from_fn(|i| &w[(r + i.min(n - 1)) * rb..][..rb]);
                    panel.fill(dtype, &rows[..n]);
                }
                TaskRows::Groups(g) => panel.fill_q5_0_group(&g[r * rb..(r + 8) * rb], n),
            }
            // SAFETY: rows r..r + n of the block (checked: nrows rows), for the product's tokens
            // (`run_to` checks those against `acts`): the task's own elements.
            let start = out.shared.at(0, out.r0 + r);
            unsafe { panel.run_to(backend, acts, tokens.clone(), start, out.shared.stride) };
        }
    }
}

/// One prefill task: the block `out` for the rows in `w`, in tiles of `R` rows × `T` tokens; the
/// tokens left over in one tile of their own size, leftover rows one at a time.
fn prefill_task<const R: usize, const T: usize>(args: TaskArgs) {
    let (backend, dtype, w, rb, acts, tok_group, out) = args;
    let t = acts.t;
    let nrows = w.len() / rb;
    assert!(nrows == out.rows && t == out.shared.tokens);
    for g0 in (0..t).step_by(tok_group) {
        let g1 = (g0 + tok_group).min(t);
        let mut r = 0;
        while r < nrows {
            let rows = if r + R <= nrows { R } else { 1 };
            let span = Span {
                backend,
                dtype,
                w,
                rb,
                acts,
                r,
            };
            let mut ti = g0;
            while ti + T <= g1 {
                span.tiles::<R, T>(rows, ti, out);
                ti += T;
            }
            // Fewer than four left: one tile of their own size. One token at a time, each would
            // decode the rows again.
            match g1 - ti {
                0 => {}
                1 => span.tiles::<R, 1>(rows, ti, out),
                2 => span.tiles::<R, 2>(rows, ti, out),
                _ => span.tiles::<R, 3>(rows, ti, out),
            }
            r += rows;
        }
    }
}

/// The rows from `r` of one prefill task, for [`Span::tiles`].
struct Span<'a> {
    backend: Backend,
    dtype: DType,
    w: &'a [u8],
    rb: usize,
    acts: &'a QuantizedActs,
    r: usize,
}

impl Span<'_> {
    /// Tokens `ti..ti + K` of `rows` (`R` or 1) rows from `r`, written into the task's block `out`.
    #[inline]
    fn tiles<const R: usize, const K: usize>(&self, rows: usize, ti: usize, out: OutBlock) {
        let (r, rb) = (self.r, self.rb);
        let wrow = |k: usize| &self.w[(r + k) * rb..(r + k + 1) * rb];
        let a: [ActRow; K] = std::array::from_fn(|k| self.acts.row(ti + k));
        let put = |j: usize, row: &[f32; K]| {
            for (k, &v) in row.iter().enumerate() {
                // SAFETY: the block is this task's alone.
                unsafe { out.put(ti + k, r + j, v) };
            }
        };
        if rows == R {
            let res = tile::<R, K>(self.backend, self.dtype, std::array::from_fn(wrow), a);
            for (j, row) in res.iter().enumerate() {
                put(j, row);
            }
        } else {
            put(0, &tile::<1, K>(self.backend, self.dtype, [wrow(0)], a)[0]);
        }
    }
}

/// Only the listed rows: `out[t][i] = row(ids[i]) · x[t]`.
pub fn matmul_rows(
    w: QuantSlice,
    rows: usize,
    cols: usize,
    ids: &[usize],
    x: &[f32],
    t: usize,
    out: &mut [f32],
) {
    let rb = check(&w, rows, cols);
    assert!(x.len() == t * cols && out.len() == t * ids.len());
    let acts = quantize_acts(x, t, cols);
    let backend = Backend::best();
    // The same kernels as `matmul_acts` for the same `t`, so the values are bit-identical to its.
    if t == 1 {
        for (o, &r) in out.iter_mut().zip(ids) {
            if w.layout == Layout::Interleaved8 {
                // The row's whole group, as a decode task computes it.
                let g = r / GROUP_ROWS * GROUP_ROWS;
                let bytes = &w.bytes[g * rb..(g + GROUP_ROWS) * rb];
                let mut eight = [0f32; GROUP_ROWS];
                rows_dot(
                    backend,
                    w.dtype,
                    w.layout,
                    bytes,
                    rb,
                    acts.row(0),
                    &mut eight,
                );
                *o = eight[r - g];
                continue;
            }
            let wr = &w.bytes[r * rb..(r + 1) * rb];
            rows_dot(
                backend,
                w.dtype,
                w.layout,
                wr,
                rb,
                acts.row(0),
                std::slice::from_mut(o),
            );
        }
        return;
    }
    if w.layout == Layout::Interleaved8 {
        // The listed rows in the file's layout, multiplied as a prefill multiplies them.
        let mut plain = vec![0u8; ids.len() * rb];
        for (row, &r) in plain.chunks_exact_mut(rb).zip(ids) {
            deinterleave(w.dtype, w.bytes, rb, r, row);
        }
        let listed: Vec<usize> = (0..ids.len()).collect();
        let w = QuantSlice::rows(w.dtype, &plain);
        return matmul_rows(w, ids.len(), cols, &listed, x, t, out);
    }
    #[cfg(target_arch = "x86_64")]
    if uses_amx(backend, w.dtype, t) {
        let aacts = super::amx::AmxActs::new(x, t, cols);
        let (mut panel, tiles) = (super::amx::Panel::default(), super::amx::Tiles::configure());
        for (c, ids16) in ids.chunks(super::amx::ROWS).enumerate() {
            let rows: Vec<&[u8]> = ids16.iter().map(|&r| &w.bytes[r * rb..][..rb]).collect();
            let first = &mut out[super::amx::ROWS * c..];
            // What `multiply_rows` asks: the slice holds the last token's rows of this chunk.
            assert!(first.len() >= (t - 1) * ids.len() + ids16.len());
            // SAFETY: `first` is borrowed mutably and holds every token's rows of this chunk (stride
            // ids.len() ≥ the chunk's rows), checked above.
            let (first, os) = (first.as_mut_ptr(), ids.len());
            unsafe {
                let panel = &mut panel;
                super::amx::multiply_rows(w.dtype, &rows, &aacts, 0..t, first, os, panel, &tiles)
            };
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if uses_panel(backend, w.dtype) {
        let pacts = super::quantized_x86::PanelActs::new(&acts, w.dtype);
        let mut panel = super::quantized_x86::Panel::default();
        for (c, ids8) in ids.chunks(8).enumerate() {
            let rows: Vec<&[u8]> = ids8.iter().map(|&r| &w.bytes[r * rb..][..rb]).collect();
            panel.fill(w.dtype, &rows);
            panel.run(backend, &pacts, 0..t, &mut out[8 * c..], ids.len());
        }
        return;
    }
    for ti in 0..t {
        for (i, &r) in ids.iter().enumerate() {
            let wr = &w.bytes[r * rb..(r + 1) * rb];
            out[ti * ids.len() + i] = tile::<1, 1>(backend, w.dtype, [wr], [acts.row(ti)])[0][0];
        }
    }
}

/// The definition, in the plainest way: dequantize the weights exactly (`weights::quant`) and take f32
/// dot products (accumulated in f64) with `x`. Pass `quantized_x = true` to first round `x` as the fast
/// kernels do: then only summation order separates them.
pub fn matmul_reference(
    w: QuantSlice,
    rows: usize,
    cols: usize,
    x: &[f32],
    t: usize,
    quantized_x: bool,
    out: &mut [f32],
) {
    let rb = check(&w, rows, cols);
    let mut plain = Vec::new();
    let w = QuantSlice::rows(w.dtype, plain_rows(w, rb, 0, rows, &mut plain));
    let xs = if quantized_x {
        quantize_acts(x, t, cols).dequantize()
    } else {
        x.to_vec()
    };
    let mut wr = vec![0f32; cols];
    for r in 0..rows {
        quant::dequantize_into(w.dtype, &w.bytes[r * rb..(r + 1) * rb], &mut wr)
            .expect("row length checked");
        for ti in 0..t {
            let xr = &xs[ti * cols..(ti + 1) * cols];
            out[ti * rows + r] = wr
                .iter()
                .zip(xr)
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum::<f64>() as f32;
        }
    }
}

/// Bytes of one Q8_0 block: the f16 scale, then 32 signed values.
pub const Q8_0_BLOCK_BYTES: usize = 34;

/// One block of weights to Q8_0, for the `--dtype q8_0` form: scale `amax / 127` (stored as f16), values
/// `x / scale` rounded half away from zero. Unlike activations ([`quantize_block_scalar`]), weights keep
/// ggml's rounding, and a block holding a NaN or an infinity is quantized as it comes (no real checkpoint
/// has one).
pub fn quantize_weight_block_scalar(x: &[f32; 32], out: &mut [u8; Q8_0_BLOCK_BYTES]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    out[..2].copy_from_slice(&half::f16::from_f32(d).to_bits().to_le_bytes());
    for (o, v) in out[2..].iter_mut().zip(x) {
        *o = ((v * id).round() as i8) as u8;
    }
}

/// Weights (a whole number of 32-value blocks) to Q8_0 blocks in `out`: [`quantize_weight_block_scalar`],
/// with SIMD where available (bit-identical). Loading the default model as `--dtype q8_0` quantizes 494
/// million values: with the scalar code alone that load took 0.92-1.18 s, with SIMD 0.53-0.83 s (old and
/// new binary alternated eight times, each pair faster, 2-core Zen 3 VM).
pub fn quantize_weights_q8_0(values: &[f32], out: &mut [u8]) {
    assert!(
        values.len().is_multiple_of(BLOCK) && out.len() == values.len() / BLOCK * Q8_0_BLOCK_BYTES
    );
    for (x, o) in values
        .chunks_exact(BLOCK)
        .zip(out.chunks_exact_mut(Q8_0_BLOCK_BYTES))
    {
        let (Ok(x), Ok(o)) = (
            <&[f32; 32]>::try_from(x),
            <&mut [u8; Q8_0_BLOCK_BYTES]>::try_from(o),
        ) else {
            unreachable!("whole blocks")
        };
        #[cfg(target_arch = "x86_64")]
        if super::quantized_x86::quantize_weight_block(x, o) {
            continue;
        }
        quantize_weight_block_scalar(x, o);
    }
}

/// The layout of the matrices that interleave ([`interleaves`]: Q8_0 in the Q8_0 and native forms, Q5_0
/// in the native form) where `backend` multiplies them: interleaved wherever the decode runs on x86
/// (AVX2, AVX-512 VNNI, and AMX hosts, whose decode is VNNI's), as the file stores them for the portable
/// kernel, which reads rows. For Q5_0 see [`interleave_q5_0`]. For Q8_0, interleaving cuts the decode's
/// arithmetic by about two thirds. With AMX, prefill's tiles read rows, so each task lays its
/// rows out again: `duet bench --dtype q8_0` on a 2-core Xeon VM (AMX), two alternations, decoded
/// 52.3 and 52.1 tok/s against 42.0 and 41.5 with rows (76 % of the read probe against 62 %), and
/// prefilled 64 tokens 0.77× and 0.83× as fast. A reply decodes many tokens after one prefill, so the
/// decode decides. (An earlier A/B, on a busier Xeon VM, gave 0.96–1.04×, and the decode was judged
/// memory-bound against a bandwidth probe that under-read there, see `kernels::stream`; which
/// of the two kept the gain away that day is not known.)
pub fn decode_layout(backend: Backend) -> Layout {
    match backend {
        Backend::Avx2 | Backend::Avx512Vnni | Backend::Amx => Layout::Interleaved8,
        Backend::Portable => Layout::Rows,
    }
}

/// Rows per group of the [`Layout::Interleaved8`] layout.
pub const GROUP_ROWS: usize = 8;

/// Q8_0 rows (`rb` bytes each, as stored) laid out for the decode kernel, into `out`
/// ([`interleaved_bytes`] long).
///
/// Why: a Q8_0 row taken one at a time costs the decode kernel about twelve vector instructions per
/// 32 weights (load and convert the scale, the sign trick for signed bytes, one multiply-add, a
/// conversion, two scalings, a horizontal sum per row). Eight rows side by side in each register need
/// about four per 32 weights of each row: the token's four activations broadcast, one `vpdpbusd` on
/// eight rows' four values, and per block one conversion and scaling for all eight.
///
/// The layout, per group of eight rows (the last group repeats its last row to fill it), `nb` blocks a
/// row: first `nb × 256` bytes of values — block `b`, four-value group `g`, row `r` at
/// `256·b + 32·g + 4·r`, each stored value plus 128 as an unsigned byte (what `vpdpbusd` takes; the
/// 128 comes off per block from the activations' sums) — then `nb × 16` bytes of scales, row `r` of
/// block `b` at `256·nb + 16·b + 2·r`, as the file's f16. Exactly the bytes of the eight rows' blocks,
/// and the values stay 32-byte aligned.
pub fn interleave_q8_0(rows: &[u8], rb: usize, out: &mut [u8]) {
    assert!(rb > 0 && rb.is_multiple_of(Q8_0_BLOCK_BYTES) && rows.len().is_multiple_of(rb));
    let (n, nb) = (rows.len() / rb, rb / Q8_0_BLOCK_BYTES);
    assert!(n > 0 && out.len() == n.next_multiple_of(GROUP_ROWS) * rb);
    for (g, group) in out.chunks_exact_mut(GROUP_ROWS * rb).enumerate() {
        let (values, scales) = group.split_at_mut(256 * nb);
        for r in 0..GROUP_ROWS {
            let row = &rows[(g * GROUP_ROWS + r).min(n - 1) * rb..][..rb];
            for (b, blk) in row.chunks_exact(Q8_0_BLOCK_BYTES).enumerate() {
                scales[16 * b + 2 * r..][..2].copy_from_slice(&blk[..2]);
                // A four-value group at a time, as a word: a byte at a time, this loop took 23 % of a
                // profile of the default model's load on a 2-core Zen 1 VM (its output matrix is 138 MiB
                // of Q8_0).
                for (k, q) in blk[2..].chunks_exact(4).enumerate() {
                    let word = u32::from_le_bytes([q[0], q[1], q[2], q[3]]) ^ 0x8080_8080;
                    values[256 * b + 32 * k + 4 * r..][..4].copy_from_slice(&word.to_le_bytes());
                }
            }
        }
    }
}

/// Bytes of one Q5_0 block: the f16 scale, 32 fifth bits, 16 bytes of nibbles.
pub const Q5_0_BLOCK_BYTES: usize = 22;

/// Whether the [`Layout::Interleaved8`] layout holds matrices of `dtype`.
pub fn interleaves(dtype: DType) -> bool {
    matches!(dtype, DType::Q8_0 | DType::Q5_0)
}

/// Bytes an interleaved matrix of `rows × cols` occupies (rows padded to whole groups of eight), if
/// `dtype` interleaves and its rows are whole blocks.
pub fn interleaved_bytes(dtype: DType, rows: usize, cols: usize) -> Option<usize> {
    if !interleaves(dtype) {
        return None;
    }
    Some(Layout::Interleaved8.stored_rows(rows) * row_bytes(dtype, cols)?)
}

/// Rows of `dtype` (`rb` bytes each, as stored) laid out for its decode kernel, into `out`
/// ([`interleaved_bytes`] long): [`interleave_q8_0`] or [`interleave_q5_0`].
pub fn interleave(dtype: DType, rows: &[u8], rb: usize, out: &mut [u8]) {
    match dtype {
        DType::Q8_0 => interleave_q8_0(rows, rb, out),
        DType::Q5_0 => interleave_q5_0(rows, rb, out),
        _ => panic!("{dtype:?} is not interleaved"),
    }
}

/// Rows `first..first + out.len() / rb` of an interleaved matrix of `dtype` back in the file's layout:
/// [`deinterleave_q8_0`] or [`deinterleave_q5_0`].
pub fn deinterleave(dtype: DType, w: &[u8], rb: usize, first: usize, out: &mut [u8]) {
    match dtype {
        DType::Q8_0 => deinterleave_q8_0(w, rb, first, out),
        DType::Q5_0 => deinterleave_q5_0(w, rb, first, out),
        _ => panic!("{dtype:?} is not interleaved"),
    }
}

/// Q5_0 rows (`rb` bytes each, as stored) laid out for the decode kernel, into `out`
/// ([`interleaved_bytes`] long).
///
/// Why: the decode kernel works on eight rows side by side, row `r` in lane `r` of each register (as a
/// prefill's panels do), and from the file's layout it built that arrangement for every block of every
/// token: the eight rows' nibble words transposed, their scales gathered, each row's 32 fifth bits
/// spread over the 32 value bytes (a shuffle, two masks and a compare per four-value group). Done once
/// at load, a block of eight rows is five plain loads, the scales one load. On a 2-core Xeon VM, one
/// thread, a 256-row product in cache ran at 37.5 GB/s against 20.5 from rows; whole decodes of the
/// default model (native form, alternated in one process, medians of 16 rounds) 1.064× and 1.062× as
/// fast (16 and 15 of 16 faster); its prefills, whose panels now take the groups as they are, 1.05× at
/// 13 tokens, 1.06× at 32, 1.03× at 64, 1.04× at 128 (10–12 of 12 faster).
///
/// The layout, per group of eight rows (the last group repeats its last row to fill it), `nb` blocks a
/// row: first `nb × 160` bytes of values, then `nb × 16` bytes of scales (row `r` of block `b` at
/// `160·nb + 16·b + 2·r`, the file's f16). Block `b`'s 160 bytes: four 32-byte vectors, byte `4·r + i`
/// of vector `k` holding the row's value `4·k + i` whole (five bits, 0..=31 as stored) and the low
/// three bits of its value `16 + 4·k + i` in bits 5..8; then 32 bytes whose byte `4·r + i` holds the
/// top two bits of value `16 + 4·k + i` in bits `2·k..2·k + 2`. So the first four four-value groups
/// are a mask away and the other four a shift, two masks and a table lookup or a shift
/// (`quantized_x86::q5_0_group_values`), where nibbles and a vector of fifth bits took a
/// shift per group more. Still exactly the eight rows' bytes, and the vectors stay 32-byte aligned.
pub fn interleave_q5_0(rows: &[u8], rb: usize, out: &mut [u8]) {
    const B: usize = Q5_0_BLOCK_BYTES;
    assert!(rb > 0 && rb.is_multiple_of(B) && rows.len().is_multiple_of(rb));
    let (n, nb) = (rows.len() / rb, rb / B);
    assert!(n > 0 && out.len() == n.next_multiple_of(GROUP_ROWS) * rb);
    for (g, group) in out.chunks_exact_mut(GROUP_ROWS * rb).enumerate() {
        let (values, scales) = group.split_at_mut(160 * nb);
        for r in 0..GROUP_ROWS {
            let row = &rows[(g * GROUP_ROWS + r).min(n - 1) * rb..][..rb];
            for (b, blk) in row.chunks_exact(B).enumerate() {
                let blk: &[u8; B] = blk.try_into().expect("a whole block");
                scales[16 * b + 2 * r..][..2].copy_from_slice(&blk[..2]);
                let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
                let v: &mut [u8; 160] = (&mut values[160 * b..][..160])
                    .try_into()
                    .expect("160 bytes");
                let mut top = 0u32;
                // Two nibble words at a time (k and k + 1), eight bytes in a u64.
                for pair in 0..2 {
                    let at = 6 + 8 * pair;
                    let nib = u64::from_le_bytes(blk[at..at + 8].try_into().expect("8 bytes"));
                    // Byte i: value 8·pair + i in its low nibble, value 16 + 8·pair + i in its high one.
                    let (low_fifth, high_fifth) =
                        ((qh >> (8 * pair)) as u8, (qh >> (16 + 8 * pair)) as u8);
                    let whole = (nib & 0x0F0F_0F0F_0F0F_0F0F) | (SPREAD8[low_fifth as usize] << 4);
                    let high_low3 = ((nib >> 4) & 0x0707_0707_0707_0707) << 5;
                    let bytes = (whole | high_low3).to_le_bytes();
                    let k = 2 * pair;
                    v[32 * k + 4 * r..][..4].copy_from_slice(&bytes[..4]);
                    v[32 * (k + 1) + 4 * r..][..4].copy_from_slice(&bytes[4..]);
                    // The high values' bit 3 (their nibble's top bit) and bit 4 (their fifth bit).
                    let top2 =
                        ((nib >> 7) & 0x0101_0101_0101_0101) | (SPREAD8[high_fifth as usize] << 1);
                    top |= ((top2 as u32) << (2 * k)) | (((top2 >> 32) as u32) << (2 * k + 2));
                }
                v[128 + 4 * r..132 + 4 * r].copy_from_slice(&top.to_le_bytes());
            }
        }
    }
}

/// `SPREAD8[q]`: bit `i` of a byte `q` moved to bit 0 of byte `i`: eight values' fifth bits beside
/// their bytes, one lookup where a loop took eight steps (a load lays out every Q5_0 matrix).
const SPREAD8: [u64; 256] = {
    let mut t = [0u64; 256];
    let mut q = 0;
    while q < 256 {
        let mut i = 0;
        while i < 8 {
            t[q] |= ((q as u64 >> i) & 1) << (8 * i);
            i += 1;
        }
        q += 1;
    }
    t
};

/// Rows `first..first + out.len() / rb` of an interleaved Q5_0 matrix (`w`, rows of `rb` bytes as
/// stored) back in the file's layout, into `out`: for the portable kernels, label scoring and lookups,
/// which read rows (a prefill's panels and AMX tiles take the groups as they are).
pub fn deinterleave_q5_0(w: &[u8], rb: usize, first: usize, out: &mut [u8]) {
    const B: usize = Q5_0_BLOCK_BYTES;
    assert!(rb > 0 && rb.is_multiple_of(B) && out.len().is_multiple_of(rb));
    let nb = rb / B;
    for (i, row) in out.chunks_exact_mut(rb).enumerate() {
        let (g, r) = ((first + i) / GROUP_ROWS, (first + i) % GROUP_ROWS);
        let group = &w[g * GROUP_ROWS * rb..][..GROUP_ROWS * rb];
        let (values, scales) = group.split_at(160 * nb);
        for (b, blk) in row.chunks_exact_mut(B).enumerate() {
            let v = &values[160 * b..][..160];
            blk[..2].copy_from_slice(&scales[16 * b + 2 * r..][..2]);
            let mut qh = 0u32;
            for k in 0..4 {
                for j in 0..4 {
                    let (byte, top) = (v[32 * k + 4 * r + j], (v[128 + 4 * r + j] >> (2 * k)) & 3);
                    let low = byte & 31;
                    let high = (byte >> 5) | (top << 3);
                    blk[6 + 4 * k + j] = (low & 15) | (high & 15) << 4;
                    qh |= (u32::from(low >> 4) << (4 * k + j))
                        | (u32::from(high >> 4) << (16 + 4 * k + j));
                }
            }
            blk[2..6].copy_from_slice(&qh.to_le_bytes());
        }
    }
}

/// Rows `first..first + out.len() / rb` of an interleaved Q8_0 matrix (`w`, rows of `rb` bytes as
/// stored) back in the file's layout, into `out`: for prefill, label scoring and lookups, whose kernels
/// read rows.
pub fn deinterleave_q8_0(w: &[u8], rb: usize, first: usize, out: &mut [u8]) {
    assert!(rb > 0 && rb.is_multiple_of(Q8_0_BLOCK_BYTES) && out.len().is_multiple_of(rb));
    let nb = rb / Q8_0_BLOCK_BYTES;
    // Whole groups from a group's start with SIMD where there is some: a prefill lays out again every
    // weight it multiplies, and with only the loop below a 64-token prefill on AMX tiles ran 0.54× as
    // fast as on the file's layout (0.86–0.90× with the transpose).
    let whole = if first.is_multiple_of(GROUP_ROWS) {
        out.len() / rb / GROUP_ROWS * GROUP_ROWS
    } else {
        0
    };
    let (from, to) = (&w[first * rb..(first + whole) * rb], &mut out[..whole * rb]);
    #[cfg(target_arch = "x86_64")]
    let simd = whole > 0 && super::quantized_x86::deinterleave_groups(from, rb, to);
    #[cfg(not(target_arch = "x86_64"))]
    let simd = {
        let _ = (from, to);
        false
    };
    let done = if simd { whole } else { 0 };
    for (i, row) in out.chunks_exact_mut(rb).enumerate().skip(done) {
        let (g, r) = ((first + i) / GROUP_ROWS, (first + i) % GROUP_ROWS);
        let group = &w[g * GROUP_ROWS * rb..][..GROUP_ROWS * rb];
        let (values, scales) = group.split_at(256 * nb);
        for (b, blk) in row.chunks_exact_mut(Q8_0_BLOCK_BYTES).enumerate() {
            blk[..2].copy_from_slice(&scales[16 * b + 2 * r..][..2]);
            for (j, four) in blk[2..].chunks_exact_mut(4).enumerate() {
                let at = 256 * b + 32 * j + 4 * r;
                let v = u32::from_le_bytes([
                    values[at],
                    values[at + 1],
                    values[at + 2],
                    values[at + 3],
                ]);
                four.copy_from_slice(&(v ^ 0x8080_8080).to_le_bytes());
            }
        }
    }
}

/// Simple quantizers producing valid blocks of each type from f32 values, for tests and benchmarks
/// (weights with realistic block structure without needing a model file). They are not ggml's
/// quantizers and make no claim to its rounding choices; the kernels only need valid blocks.
pub mod reference_quantizer {
    use crate::weights::DType;
    use half::f16;

    fn put_f16(out: &mut Vec<u8>, v: f32) {
        out.extend_from_slice(&f16::from_f32(v).to_bits().to_le_bytes());
    }

    fn amax(x: &[f32]) -> f32 {
        x.iter().fold(0f32, |m, v| m.max(v.abs()))
    }

    /// Quantizes `values` (a whole number of blocks) to `dtype`.
    pub fn quantize(dtype: DType, values: &[f32]) -> Vec<u8> {
        let (vals, bytes) = dtype.block();
        assert!(values.len().is_multiple_of(vals));
        let mut out = Vec::with_capacity(values.len() / vals * bytes);
        for x in values.chunks_exact(vals) {
            match dtype {
                DType::Q8_0 => {
                    let mut block = [0u8; super::Q8_0_BLOCK_BYTES];
                    let x = x.try_into().expect("32 values");
                    super::quantize_weight_block_scalar(x, &mut block);
                    out.extend_from_slice(&block);
                }
                DType::Q5_0 => {
                    let d = amax(x) / 15.0;
                    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
                    let q: Vec<u8> = x
                        .iter()
                        .map(|v| ((v * id).round() + 16.0).clamp(0.0, 31.0) as u8)
                        .collect();
                    put_f16(&mut out, d);
                    let mut qh = 0u32;
                    for (i, &v) in q.iter().enumerate() {
                        qh |= ((v >> 4) as u32 & 1) << i;
                    }
                    out.extend_from_slice(&qh.to_le_bytes());
                    out.extend((0..16).map(|i| (q[i] & 0x0F) | ((q[i + 16] & 0x0F) << 4)));
                }
                DType::Q4K => {
                    // Per 32: value ≈ scale·q − min with q in 0..=15; scales and mins as 6-bit multiples
                    // of two f16 super-scales.
                    let mut sc = [0f32; 8];
                    let mut mn = [0f32; 8];
                    for j in 0..8 {
                        let s = &x[32 * j..32 * j + 32];
                        let lo = s.iter().fold(f32::INFINITY, |m, &v| m.min(v)).min(0.0);
                        let hi = s.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                        sc[j] = (hi - lo) / 15.0;
                        mn[j] = -lo;
                    }
                    let d = sc.iter().fold(0f32, |m, &v| m.max(v)) / 63.0;
                    let dmin = mn.iter().fold(0f32, |m, &v| m.max(v)) / 63.0;
                    let (d, dmin) = (f16::from_f32(d).to_f32(), f16::from_f32(dmin).to_f32());
                    let q6 = |v: f32, s: f32| -> u8 {
                        if s > 0.0 {
                            (v / s).round().clamp(0.0, 63.0) as u8
                        } else {
                            0
                        }
                    };
                    let isc: Vec<u8> = sc.iter().map(|&v| q6(v, d)).collect();
                    let imn: Vec<u8> = mn.iter().map(|&v| q6(v, dmin)).collect();
                    put_f16(&mut out, d);
                    put_f16(&mut out, dmin);
                    let mut p = [0u8; 12];
                    for j in 0..4 {
                        p[j] = isc[j] | ((isc[j + 4] >> 4) << 6);
                        p[j + 4] = imn[j] | ((imn[j + 4] >> 4) << 6);
                        p[j + 8] = (isc[j + 4] & 0x0F) | ((imn[j + 4] & 0x0F) << 4);
                    }
                    out.extend_from_slice(&p);
                    let mut q = [0u8; 256];
                    for j in 0..8 {
                        let s = d * isc[j] as f32;
                        let m = dmin * imn[j] as f32;
                        for l in 0..32 {
                            let v = x[32 * j + l] + m;
                            q[32 * j + l] = if s > 0.0 {
                                (v / s).round().clamp(0.0, 15.0) as u8
                            } else {
                                0
                            };
                        }
                    }
                    for c in 0..4 {
                        for l in 0..32 {
                            out.push(q[64 * c + l] | (q[64 * c + 32 + l] << 4));
                        }
                    }
                }
                DType::Q6K => {
                    let mut sc = [0f32; 16];
                    for g in 0..16 {
                        sc[g] = amax(&x[16 * g..16 * g + 16]) / 31.0;
                    }
                    let d = f16::from_f32(amax(&sc) / 127.0).to_f32();
                    let isc: Vec<i8> = sc
                        .iter()
                        .map(|&s| {
                            if d > 0.0 {
                                (s / d).round().clamp(-127.0, 127.0) as i8
                            } else {
                                0
                            }
                        })
                        .collect();
                    let mut q = [0u8; 256];
                    for (i, qi) in q.iter_mut().enumerate() {
                        let s = d * isc[i / 16] as f32;
                        *qi = if s != 0.0 {
                            ((x[i] / s).round() + 32.0).clamp(0.0, 63.0) as u8
                        } else {
                            32
                        };
                    }
                    let mut ql = [0u8; 128];
                    let mut qh = [0u8; 64];
                    for h in 0..2 {
                        for l in 0..32 {
                            let y = |k: usize| q[128 * h + 32 * k + l];
                            ql[64 * h + l] = (y(0) & 0x0F) | ((y(2) & 0x0F) << 4);
                            ql[64 * h + l + 32] = (y(1) & 0x0F) | ((y(3) & 0x0F) << 4);
                            qh[32 * h + l] = (y(0) >> 4)
                                | ((y(1) >> 4) << 2)
                                | ((y(2) >> 4) << 4)
                                | ((y(3) >> 4) << 6);
                        }
                    }
                    out.extend_from_slice(&ql);
                    out.extend_from_slice(&qh);
                    out.extend(isc.iter().map(|&s| s as u8));
                    put_f16(&mut out, d);
                }
                _ => panic!("{dtype:?} is not block-quantized"),
            }
        }
        out
    }

    /// Blocks of arbitrary bits with sane f16 scales: every packed integer field takes all its values
    /// (Q8_0 −128, Q6_K scale −128, 6-bit Q4_K scales/mins of 63 …), which quantizers rarely produce.
    pub fn random_blocks(dtype: DType, blocks: usize, seed: u64) -> Vec<u8> {
        let (_, bytes) = dtype.block();
        let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let mut out = vec![0u8; blocks * bytes];
        out.iter_mut().for_each(|b| *b = next() as u8);
        let scale = |r: u64| {
            f16::from_f32((r % 1000) as f32 / 1000.0 * 0.02 + 1e-4)
                .to_bits()
                .to_le_bytes()
        };
        for blk in out.chunks_exact_mut(bytes) {
            match dtype {
                DType::Q8_0 | DType::Q5_0 => blk[..2].copy_from_slice(&scale(next())),
                DType::Q4K => {
                    blk[..2].copy_from_slice(&scale(next()));
                    blk[2..4].copy_from_slice(&scale(next()));
                }
                DType::Q6K => blk[208..210].copy_from_slice(&scale(next())),
                _ => panic!("{dtype:?} is not block-quantized"),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::reference_quantizer::{quantize, random_blocks};
    use super::*;

    const TYPES: [DType; 4] = [DType::Q8_0, DType::Q5_0, DType::Q4K, DType::Q6K];

    fn data(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                // Varied magnitudes per block, and an outlier now and then, like real activations.
                let v = (s as f32 / u32::MAX as f32) * 2.0 - 1.0;
                let m = if i % 97 == 0 {
                    8.0
                } else {
                    1.0 + (i / 32 % 5) as f32
                };
                v * m
            })
            .collect()
    }

    fn assert_close(got: &[f32], want: &[f32], rel: f32, what: &str) {
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= rel * scale,
                "{what}: at {i}: {g} vs {w} (scale {scale})"
            );
        }
    }

    /// What a backend's product is checked against: the exact sums of the 8-bit activations, to 2e-5
    /// of the largest value; or, for a product on AMX tiles (bf16 weights and activations), the exact
    /// product, to 1e-2 as `close_to_the_exact_product` allows the 8-bit activations (`amx.rs` checks
    /// the tiles' sums to 1e-5).
    #[allow(clippy::too_many_arguments)]
    fn assert_matches_reference(
        backend: Backend,
        w: QuantSlice,
        rows: usize,
        cols: usize,
        x: &[f32],
        t: usize,
        got: &[f32],
        what: &str,
    ) {
        let tiles = uses_amx(backend, w.dtype, t);
        let mut want = vec![0f32; t * rows];
        matmul_reference(w, rows, cols, x, t, !tiles, &mut want);
        assert_close(got, &want, if tiles { 1e-2 } else { 2e-5 }, what);
    }

    /// Where `interleave_q8_0` puts a value and a scale, worked out by hand from its documented layout,
    /// and the way back for every row, from a group's start or not; the padded rows repeat the last.
    #[test]
    fn interleaved_q8_0_places_each_value_and_comes_back() {
        let (rows, cols) = (13, 96);
        let (rb, nb) = (row_bytes(DType::Q8_0, cols).unwrap(), 3);
        let q = random_blocks(DType::Q8_0, rows * nb, 9);
        let mut il = vec![0u8; interleaved_bytes(DType::Q8_0, rows, cols).unwrap()];
        assert_eq!(il.len(), 16 * rb);
        interleave_q8_0(&q, rb, &mut il);
        // Row 10 is lane 2 of the second group; value 13 of its block 2 is byte 1 of four-value group 3.
        let group = 8 * rb;
        assert_eq!(
            il[group + 256 * 2 + 32 * 3 + 4 * 2 + 1],
            q[10 * rb + 34 * 2 + 2 + 13] ^ 0x80
        );
        assert_eq!(
            il[group + 256 * nb + 16 * 2 + 2 * 2..][..2],
            q[10 * rb + 34 * 2..][..2]
        );
        let mut back = vec![0u8; 16 * rb];
        deinterleave_q8_0(&il, rb, 0, &mut back);
        assert_eq!(back[..rows * rb], q[..]);
        for r in rows..16 {
            assert_eq!(back[r * rb..][..rb], q[(rows - 1) * rb..]);
        }
        let mut some = vec![0u8; 3 * rb];
        deinterleave_q8_0(&il, rb, 6, &mut some);
        assert_eq!(some, q[6 * rb..9 * rb]);
    }

    /// Where `interleave_q5_0` puts a row's nibble byte, fifth bit and scale, worked out by hand from its
    /// documented layout, and the way back for every row, from a group's start or not; the padded rows
    /// repeat the last.
    #[test]
    fn interleaved_q5_0_places_each_value_and_comes_back() {
        let (rows, cols) = (11, 96);
        let (rb, nb) = (row_bytes(DType::Q5_0, cols).unwrap(), 3);
        let q = random_blocks(DType::Q5_0, rows * nb, 4);
        let mut il = vec![0u8; interleaved_bytes(DType::Q5_0, rows, cols).unwrap()];
        assert_eq!(il.len(), 16 * rb);
        interleave_q5_0(&q, rb, &mut il);
        // Row 9 is lane 1 of the second group. Its block 2: value 6 (low nibble of stored byte 6, fifth
        // bit 6 of qh) is byte 2 of vector 1 in lane 1, whole in bits 0..5; value 22 (the same byte's
        // high nibble, fifth bit 22) has its low three bits in bits 5..8 of that byte and its top two
        // in bits 2..4 of byte 2 of lane 1 in the last vector (k = 1).
        let (group, blk) = (8 * rb, 9 * rb + 22 * 2);
        let qh = u32::from_le_bytes(q[blk + 2..blk + 6].try_into().unwrap());
        let stored = q[blk + 6 + 6];
        let value6 = (stored & 15) | (((qh >> 6) & 1) as u8) << 4;
        let value22 = (stored >> 4) | (((qh >> 22) & 1) as u8) << 4;
        let byte = il[group + 160 * 2 + 32 + 4 + 2];
        assert_eq!(byte & 31, value6);
        assert_eq!(byte >> 5, value22 & 7);
        assert_eq!((il[group + 160 * 2 + 128 + 4 + 2] >> 2) & 3, value22 >> 3);
        assert_eq!(il[group + 160 * nb + 16 * 2 + 2..][..2], q[blk..blk + 2]);
        let mut back = vec![0u8; 16 * rb];
        deinterleave_q5_0(&il, rb, 0, &mut back);
        assert_eq!(back[..rows * rb], q[..]);
        for r in rows..16 {
            assert_eq!(back[r * rb..][..rb], q[(rows - 1) * rb..]);
        }
        let mut some = vec![0u8; 3 * rb];
        deinterleave_q5_0(&il, rb, 5, &mut some);
        assert_eq!(some, q[5 * rb..8 * rb]);
    }

    /// Interleaved Q8_0 and Q5_0 on every backend: decode (one token, on the interleaved kernels) to
    /// the exact sums of the 8-bit activations; prefill (Q8_0 rows laid out again for the row kernels,
    /// Q5_0 groups taken as they are by the panels and, at 13 and 40 tokens, the AMX tiles) bit for bit
    /// what the file's layout gives; label scoring bit for bit what the whole product gives. Rows not a
    /// multiple of eight, and a product large enough to be split across threads.
    #[test]
    fn interleaved_products_match_the_reference() {
        for (dtype, (rows, cols)) in [DType::Q8_0, DType::Q5_0]
            .into_iter()
            .flat_map(|d| [(13, 96), (64, 256), (515, 512)].map(|s| (d, s)))
        {
            let rb = row_bytes(dtype, cols).unwrap();
            let q = random_blocks(dtype, rows * cols / 32, rows as u64);
            let mut il = vec![0u8; interleaved_bytes(dtype, rows, cols).unwrap()];
            interleave(dtype, &q, rb, &mut il);
            let plain = QuantSlice::rows(dtype, &q);
            let inter = QuantSlice {
                dtype,
                bytes: &il,
                layout: Layout::Interleaved8,
            };
            for t in [1, 2, 5, 13, 40] {
                let x = data(t * cols, 5 + t as u32);
                for backend in Backend::available() {
                    let what = format!("{dtype:?} {rows}x{cols} {backend:?} t={t}");
                    let mut got = vec![f32::NAN; t * rows];
                    matmul_with(backend, inter, rows, cols, &x, t, &mut got);
                    assert_matches_reference(backend, inter, rows, cols, &x, t, &got, &what);
                    if t > 1 {
                        let mut want = vec![0f32; t * rows];
                        matmul_with(backend, plain, rows, cols, &x, t, &mut want);
                        assert!(got == want, "{what}: differs from the file's layout");
                    }
                    if backend == Backend::best() {
                        let ids = [rows - 1, 0, 9];
                        let mut sel = vec![0f32; t * ids.len()];
                        matmul_rows(inter, rows, cols, &ids, &x, t, &mut sel);
                        for ti in 0..t {
                            for (i, &r) in ids.iter().enumerate() {
                                let (a, b) = (sel[ti * ids.len() + i], got[ti * rows + r]);
                                assert!(a.to_bits() == b.to_bits(), "{what}: row {r}: {a} vs {b}");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn activation_quantization_round_trips_within_half_a_step() {
        let x = data(5 * 96, 7);
        let a = quantize_acts(&x, 5, 96);
        let back = a.dequantize();
        for (b, blk) in x.chunks(32).enumerate() {
            let amax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert_eq!(a.d[b], amax / 127.0);
            let sum: i32 = a.qs[b * 32..b * 32 + 32].iter().map(|&q| q as i32).sum();
            assert_eq!(a.sums[b], a.d[b] * sum as f32);
            for i in 0..32 {
                assert!((back[b * 32 + i] - blk[i]).abs() <= a.d[b] * 0.5 + 1e-6);
                assert!(a.qs[b * 32 + i] != -128);
            }
        }
        // All zeros: zero scale, zero values.
        let z = quantize_acts(&[0.0; 32], 1, 32);
        assert_eq!((z.d[0], z.qs[0]), (0.0, 0));
        // A NaN poisons its block only.
        let mut y = vec![1.0f32; 64];
        y[3] = f32::NAN;
        let q = quantize_acts(&y, 1, 64);
        assert!(q.d[0].is_nan() && q.d[1] == 1.0 / 127.0);
    }

    #[test]
    fn simd_activation_quantization_is_bit_identical() {
        let mut blocks: Vec<[f32; 32]> = data(32 * 64, 21)
            .chunks(32)
            .map(|c| c.try_into().unwrap())
            .collect();
        blocks.push([0.0; 32]);
        blocks.push([-0.0; 32]);
        let mut ties = [0.0f32; 32];
        for (i, v) in ties.iter_mut().enumerate() {
            // amax 127 makes id exactly 1: values at .5 exercise ties-to-even.
            *v = if i == 0 { 127.0 } else { i as f32 * 0.5 - 8.0 };
        }
        blocks.push(ties);
        let mut huge = [1e38f32; 32];
        huge[5] = -3e38;
        blocks.push(huge);
        let mut tiny = [1e-40f32; 32];
        tiny[1] = -1e-39;
        tiny[2] = 0.0;
        blocks.push(tiny);
        let mut small = [1e-29f32; 32];
        small[3] = 0.0;
        blocks.push(small);
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut b = [1.0f32; 32];
            b[31] = bad;
            blocks.push(b);
        }
        for b in &blocks {
            let (mut q1, mut q2) = ([0i8; 32], [0i8; 32]);
            let r1 = quantize_block_scalar(b, &mut q1);
            let r2 = quantize_block(b, &mut q2);
            assert_eq!(q1, q2, "{b:?}");
            assert_eq!(r1.0.to_bits(), r2.0.to_bits(), "{b:?}");
            assert_eq!(r1.1.to_bits(), r2.1.to_bits(), "{b:?}");
        }
    }

    /// The weight quantizer's SIMD path against its scalar twin, byte for byte: ordinary blocks at several
    /// magnitudes, exact halves and their neighbours (away from zero, not to even), zeros, huge, tiny and
    /// subnormal blocks (whose inverse scale overflows) and non-finite values (both left to the scalar code).
    #[test]
    fn weight_quantization_is_bit_identical_to_the_scalar_code() {
        let mut blocks: Vec<[f32; 32]> = Vec::new();
        for (k, scale) in [1e-3f32, 0.02, 1.0, 300.0].into_iter().enumerate() {
            blocks.extend(
                data(32 * 64, 40 + k as u32)
                    .chunks(32)
                    .map(|c| std::array::from_fn(|i| c[i] * scale)),
            );
        }
        blocks.push([0.0; 32]);
        blocks.push([-0.0; 32]);
        // amax 127 makes the scale 1 and its inverse 1: the values are rounded as they are.
        for nudge in [0.0f32, 1.0, -1.0] {
            let mut halves = [0.0f32; 32];
            for (i, v) in halves.iter_mut().enumerate() {
                let h = if i == 0 { 127.0 } else { i as f32 - 15.5 };
                *v = if nudge == 0.0 || i == 0 {
                    h
                } else {
                    f32::from_bits((h.to_bits() as i64 + nudge as i64) as u32)
                };
            }
            blocks.push(halves);
        }
        let mut huge = [1e38f32; 32];
        huge[5] = -3e38;
        blocks.push(huge);
        for tiny in [1e-40f32, 1e-44, 1e-30] {
            let mut b = [tiny; 32];
            b[1] = -tiny * 0.5;
            b[2] = 0.0;
            blocks.push(b);
        }
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut b = [1.0f32; 32];
            b[31] = bad;
            blocks.push(b);
        }
        let values: Vec<f32> = blocks.iter().flatten().copied().collect();
        let mut simd = vec![0u8; blocks.len() * Q8_0_BLOCK_BYTES];
        quantize_weights_q8_0(&values, &mut simd);
        for (b, got) in blocks.iter().zip(simd.chunks_exact(Q8_0_BLOCK_BYTES)) {
            let mut want = [0u8; Q8_0_BLOCK_BYTES];
            quantize_weight_block_scalar(b, &mut want);
            assert_eq!(got, want, "{b:?}");
        }
        // The first halves block holds ties (-14.5, -13.5, …), rounded away from zero.
        let mut q = [0u8; Q8_0_BLOCK_BYTES];
        quantize_weight_block_scalar(&blocks[4 * 64 + 2], &mut q);
        assert_eq!([q[3], q[4], q[33]].map(|b| b as i8), [-15, -14, 16]);
    }

    #[test]
    fn parallel_quantization_matches_serial() {
        let (t, cols) = (70, 1024); // ≥ 65536 values: the parallel path
        let x = data(t * cols, 3);
        // On rayon, and on a forward pass's team.
        for a in [
            quantize_acts(&x, t, cols),
            crate::kernels::pool::install(|| quantize_acts(&x, t, cols)),
        ] {
            for i in 0..t {
                let one = quantize_acts(&x[i * cols..(i + 1) * cols], 1, cols);
                let row = a.row(i);
                assert_eq!((one.qs.as_slice(), one.d.as_slice()), (row.qs, row.d));
                assert_eq!(one.sums, row.sums);
            }
        }
    }

    /// Every backend against the definition (dequantize + f32 dot with the same rounded activations), on
    /// random bit patterns and on quantized smooth data, for shapes that are not multiples of any tile.
    #[test]
    fn all_backends_match_the_reference() {
        for dtype in TYPES {
            let (vals, _) = dtype.block();
            #[cfg(not(miri))]
            let shapes = [
                (1, 1, 1),
                (3, 2, 1),
                (5, 3, 2),
                (7, 1, 5),
                (9, 4, 6),
                (18, 2, 9),
                (33, 3, 1),
                // 13 tokens: 2 × 3 tiles with a 1-token tail and an odd row (Q8_0); panels of five
                // rows (eight lanes, three repeated) with a 1-token tail.
                (5, 2, 13),
                // 14 and 15 tokens: the 2- and 3-token panel tails, the 2-token tile tail (Q8_0).
                (5, 2, 14),
                (5, 2, 15),
                // Two token groups (256 tokens each at most).
                (4, 1, 300),
            ];
            // Miri is far too slow for the full list: decode, a token tail, and tiles with both tails.
            #[cfg(miri)]
            let shapes = [(3, 2, 1), (5, 3, 2), (7, 1, 5)];
            for (rows, nblk, t) in shapes {
                let cols = nblk * vals;
                for (kind, w) in [
                    (
                        "random bits",
                        random_blocks(dtype, rows * nblk, (rows * 31 + t) as u64),
                    ),
                    (
                        "quantized",
                        quantize(dtype, &data(rows * cols, rows as u32)),
                    ),
                ] {
                    let w = QuantSlice::rows(dtype, &w);
                    let x = data(t * cols, 11 + t as u32);
                    for backend in Backend::available() {
                        let mut got = vec![f32::NAN; t * rows];
                        matmul_with(backend, w, rows, cols, &x, t, &mut got);
                        let what =
                            format!("{dtype:?} {kind} {backend:?} rows={rows} cols={cols} t={t}");
                        assert_matches_reference(backend, w, rows, cols, &x, t, &got, &what);
                    }
                }
            }
        }
    }

    /// Products big enough to be split across threads, with a row count no task size divides.
    #[test]
    fn threaded_products_match_the_reference() {
        for dtype in TYPES {
            let (vals, bytes) = dtype.block();
            let cols = 4 * vals.max(256);
            let rows = (PARALLEL_MIN_BYTES / (cols / vals * bytes)) * 2 + 3;
            let wq = random_blocks(dtype, rows * cols / vals, 77);
            let w = QuantSlice::rows(dtype, &wq);
            for t in [1, 5, 21] {
                let x = data(t * cols, 12);
                for backend in Backend::available() {
                    let mut got = vec![f32::NAN; t * rows];
                    matmul_with(backend, w, rows, cols, &x, t, &mut got);
                    let what = format!("{dtype:?} {backend:?} t={t}");
                    assert_matches_reference(backend, w, rows, cols, &x, t, &got, &what);
                }
            }
        }
    }

    /// A product of each of `weights` (type, rows, blocks) into the matching buffer of `outs`.
    fn products_into<'a, 'o>(
        weights: &'a [(DType, usize, Vec<u8>)],
        outs: &'o mut [Vec<f32>],
    ) -> Vec<Product<'a, 'o>> {
        weights
            .iter()
            .zip(outs)
            .map(|((dtype, rows, bytes), out)| Product {
                w: QuantSlice::rows(*dtype, bytes),
                rows: *rows,
                out,
            })
            .collect()
    }

    /// One step over several matrices of mixed types (as q, k and v are in the default file): each
    /// result matches the reference, and equals that matrix's product alone bit for bit. Decode (t = 1)
    /// covers small matrices that alone would stay on one thread; the large one makes the step parallel.
    #[test]
    fn several_products_in_one_step_match_the_reference() {
        let cols = 512;
        let shapes = [
            (DType::Q5_0, 1000),
            (DType::Q8_0, 37),
            (DType::Q6K, 20),
            (DType::Q4K, 9),
            // A second matrix of a panel type: it shares the first one's panel activations.
            (DType::Q5_0, 12),
        ];
        let weights: Vec<(DType, usize, Vec<u8>)> = shapes
            .iter()
            .enumerate()
            .map(|(i, &(dtype, rows))| {
                let (vals, _) = dtype.block();
                (
                    dtype,
                    rows,
                    random_blocks(dtype, rows * cols / vals, 30 + i as u64),
                )
            })
            .collect();
        let total: usize = weights.iter().map(|w| w.2.len()).sum();
        assert!(total >= PARALLEL_MIN_BYTES && weights[1].2.len() < PARALLEL_MIN_BYTES);
        for t in [1, 7] {
            let x = data(t * cols, 31);
            let acts = quantize_acts(&x, t, cols);
            for backend in Backend::available() {
                let mut outs: Vec<Vec<f32>> =
                    weights.iter().map(|w| vec![f32::NAN; t * w.1]).collect();
                let mut products = products_into(&weights, &mut outs);
                matmul_acts_many(backend, &mut products, cols, &acts);
                for ((dtype, rows, bytes), got) in weights.iter().zip(&outs) {
                    let w = QuantSlice::rows(*dtype, bytes);
                    let what = format!("{dtype:?} {backend:?} t={t}");
                    let mut want = vec![0f32; t * rows];
                    matmul_reference(w, *rows, cols, &x, t, true, &mut want);
                    assert_close(got, &want, 2e-5, &what);
                    let mut alone = vec![0f32; t * rows];
                    matmul_acts(backend, w, *rows, cols, &acts, &mut alone);
                    assert!(got == &alone, "{what}: differs from the product alone");
                }
            }
        }
        // From f32 activations: with enough tokens, the formats AMX takes go on its tiles, the others
        // (none, today) to the 8-bit products, in one call.
        for t in [1, 7, 13] {
            let x = data(t * cols, 32);
            for backend in Backend::available() {
                let mut outs: Vec<Vec<f32>> =
                    weights.iter().map(|w| vec![f32::NAN; t * w.1]).collect();
                let mut products = products_into(&weights, &mut outs);
                matmul_many(backend, &mut products, cols, &x, t);
                for ((dtype, rows, bytes), got) in weights.iter().zip(&outs) {
                    let w = QuantSlice::rows(*dtype, bytes);
                    let what = format!("{dtype:?} {backend:?} t={t}, from f32");
                    assert_matches_reference(backend, w, *rows, cols, &x, t, got, &what);
                    let mut alone = vec![0f32; t * rows];
                    matmul_with(backend, w, *rows, cols, &x, t, &mut alone);
                    assert!(got == &alone, "{what}: differs from the product alone");
                }
            }
        }
    }

    /// Against the exact product (unrounded activations): the activation rounding costs well under 1 %.
    #[test]
    fn close_to_the_exact_product() {
        for dtype in TYPES {
            let (rows, cols, t) = (24, 512, 3);
            let wq = quantize(dtype, &data(rows * cols, 5));
            let w = QuantSlice::rows(dtype, &wq);
            let x = data(t * cols, 6);
            let mut exact = vec![0f32; t * rows];
            let mut fast = vec![0f32; t * rows];
            matmul_reference(w, rows, cols, &x, t, false, &mut exact);
            matmul(w, rows, cols, &x, t, &mut fast);
            assert_close(&fast, &exact, 1e-2, &format!("{dtype:?}"));
        }
    }

    #[test]
    fn reference_quantizer_round_trips() {
        for dtype in TYPES {
            let x = data(512, 9);
            let q = quantize(dtype, &x);
            let back = quant::dequantize(dtype, &q, 512).unwrap();
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let tol = match dtype {
                DType::Q8_0 => 0.01,
                DType::Q5_0 | DType::Q6K => 0.07,
                _ => 0.2,
            };
            for (a, b) in x.iter().zip(&back) {
                assert!((a - b).abs() <= tol * amax, "{dtype:?}: {a} vs {b}");
            }
        }
    }

    /// The largest stored values times the largest activations, of one sign and alternating: the
    /// integer sums that the kernels add up in i16 before widening (panels) or that `vpmaddubsw`
    /// saturates at must not overflow. Each format's value bits are set to all ones (Q8_0: -128, its
    /// largest magnitude); its scales stay as drawn.
    #[test]
    fn largest_values_do_not_overflow() {
        for dtype in TYPES {
            let (vals, bytes) = dtype.block();
            // The byte range of each block holding values, and what to fill it with.
            let (range, fill) = match dtype {
                DType::Q8_0 => (2..34, 0x80),
                DType::Q5_0 => (2..22, 0xFF),
                DType::Q4K => (16..144, 0xFF),
                DType::Q6K => (0..192, 0xFF),
                _ => unreachable!(),
            };
            let (rows, nblk, t) = (9, 3, 6);
            let mut wq = random_blocks(dtype, rows * nblk, 5);
            for block in wq.chunks_mut(bytes) {
                block[range.clone()].fill(fill);
            }
            let w = QuantSlice::rows(dtype, &wq);
            let cols = nblk * vals;
            for x in [
                vec![1.0f32; t * cols],
                (0..t * cols)
                    .map(|i| if i % 2 == 0 { 1.0 } else { -1.0 })
                    .collect(),
                (0..t * cols)
                    .map(|i| if i % 4 < 2 { -1.0 } else { 1.0 })
                    .collect(),
            ] {
                let mut want = vec![0f32; t * rows];
                matmul_reference(w, rows, cols, &x, t, true, &mut want);
                for backend in Backend::available() {
                    for t in [1, t] {
                        let mut got = vec![f32::NAN; t * rows];
                        matmul_with(backend, w, rows, cols, &x[..t * cols], t, &mut got);
                        let what = format!("{dtype:?} {backend:?} t={t} x={:?}", &x[..4]);
                        assert_close(&got, &want[..t * rows], 2e-5, &what);
                    }
                }
            }
        }
    }

    #[test]
    fn matmul_rows_matches_full_product() {
        // 40 rows: five 8-row panels, 2-row tiles; 7 and 13 tokens: tails. Ten rows asked for: a
        // panel of eight and one of two, in another order than the full product's.
        for dtype in TYPES {
            let (rows, cols) = (40, 256);
            let wq = random_blocks(dtype, rows * cols / dtype.block().0, 4);
            let w = QuantSlice::rows(dtype, &wq);
            for t in [1, 2, 7, 13] {
                let x = data(t * cols, 8);
                let mut full = vec![0f32; t * rows];
                matmul(w, rows, cols, &x, t, &mut full);
                let ids = [39, 0, 17, 5, 6, 30, 8, 9, 10, 21];
                let mut some = vec![0f32; t * ids.len()];
                matmul_rows(w, rows, cols, &ids, &x, t, &mut some);
                for ti in 0..t {
                    for (i, &r) in ids.iter().enumerate() {
                        assert_eq!(
                            some[ti * ids.len() + i].to_bits(),
                            full[ti * rows + r].to_bits(),
                            "{dtype:?} t={t} row {r} token {ti}"
                        );
                    }
                }
            }
        }
    }
}
