//! Matrix-vector (decode) and matrix-matrix (prefill) products against a weight matrix in any stored form.
//!
//! Weights are `rows × cols`, row-major, as checkpoints store linear layers (`out_features × in_features`).
//! Activations are `t × cols`; the result is `t × rows`. Weights are widened to f32 in registers and all
//! accumulation is f32, so BF16/F16 weights give exactly the products of their f32 values (up to summation
//! order).

use super::pool;
/// The element types of [`WeightSlice`], re-exported so callers need no `half` dependency of their own.
pub use half::{bf16, f16};
use wide::f32x8;

#[cfg(target_arch = "x86_64")]
pub use super::float_x86::Elem as SimdElem;

/// What the SIMD tiles need of an element type (nothing, where there are no SIMD tiles).
#[cfg(not(target_arch = "x86_64"))]
pub trait SimdElem {}
#[cfg(not(target_arch = "x86_64"))]
impl SimdElem for f32 {}
#[cfg(not(target_arch = "x86_64"))]
impl SimdElem for bf16 {}
#[cfg(not(target_arch = "x86_64"))]
impl SimdElem for f16 {}

/// A stored weight element that can be widened to f32, eight at a time.
pub trait WeightElem: SimdElem + Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    /// Widens `s[..8]` (the caller guarantees `s.len() >= 8`).
    fn load8(s: &[Self]) -> f32x8;
    /// The slice itself where the elements are f32 already.
    fn as_f32(_s: &[Self]) -> Option<&[f32]> {
        None
    }
}

impl WeightElem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn load8(s: &[f32]) -> f32x8 {
        let a: [f32; 8] = s[..8].try_into().unwrap();
        f32x8::from(a)
    }
    fn as_f32(s: &[f32]) -> Option<&[f32]> {
        Some(s)
    }
}

impl WeightElem for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    fn load8(s: &[bf16]) -> f32x8 {
        // bf16 is the top half of an f32: widening is a zero-extend and a shift, exact and vectorisable.
        let s = &s[..8];
        let mut a = [0f32; 8];
        for i in 0..8 {
            a[i] = f32::from_bits((s[i].to_bits() as u32) << 16);
        }
        f32x8::from(a)
    }
}

impl WeightElem for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn load8(s: &[f16]) -> f32x8 {
        let s = &s[..8];
        let mut a = [0f32; 8];
        for i in 0..8 {
            a[i] = s[i].to_f32();
        }
        f32x8::from(a)
    }
}

/// A weight matrix's elements in whichever form they are stored.
#[derive(Clone, Copy)]
pub enum WeightSlice<'a> {
    F32(&'a [f32]),
    BF16(&'a [bf16]),
    F16(&'a [f16]),
    /// Block-quantized rows, multiplied with quantized activations (see `quantized.rs`).
    Quant(super::quantized::QuantSlice<'a>),
    /// Q8_0 rows as a GGUF file stores them, multiplied in f32 on their exact values (each `q · d`)
    /// with the products and bits of the same rows dequantized to f32 ([`matmul_q8_0_exact`]).
    Q8_0Exact(&'a [u8]),
}

#[inline(always)]
pub(crate) fn load8(s: &[f32]) -> f32x8 {
    f32::load8(s)
}

/// Dot product of one weight row with one activation row: four independent accumulators so the FMA
/// latency is hidden, then a scalar tail for lengths that are not a multiple of 8.
#[inline]
pub fn dot<W: WeightElem>(w: &[W], x: &[f32]) -> f32 {
    let n = x.len();
    debug_assert!(w.len() >= n);
    let mut acc = [f32x8::ZERO; 4];
    let mut i = 0;
    while i + 32 <= n {
        for (j, a) in acc.iter_mut().enumerate() {
            let o = i + 8 * j;
            *a = W::load8(&w[o..]).mul_add(load8(&x[o..]), *a);
        }
        i += 32;
    }
    let mut sum = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    while i + 8 <= n {
        sum = W::load8(&w[i..]).mul_add(load8(&x[i..]), sum);
        i += 8;
    }
    let mut s = sum.reduce_add();
    while i < n {
        s += w[i].to_f32() * x[i];
        i += 1;
    }
    s
}

/// One weight row · one activation row of a `t`-token product with the kernel `matmul_float` uses for
/// it — the decode kernel for one token, the tiles' summation order for fewer than `GEMM_MIN_TOKENS` —
/// so a product of a few selected rows equals those entries of the full product bit for bit (label
/// scoring multiplies only the label rows of the output matrix). The GEMM sums in another order.
pub fn dot_row<W: WeightElem>(w: &[W], x: &[f32], t: usize) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::float_x86::has_avx2() {
        if t == 1 {
            return super::float_x86::dot(w, x);
        }
        return super::float_x86::tile::<W, 1, 1>([w], [x])[0][0];
    }
    let _ = t;
    dot(w, x)
}

/// One Q8_0 row (as stored) · `x`, for one token: the bits of that row's entry in
/// [`matmul_q8_0_exact`]'s product, and of [`dot_row`] on the row dequantized.
pub fn dot_q8_0_row(w: &[u8], x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::float_x86::has_avx2() {
        return super::float_x86::dot_q8_0(w, x);
    }
    let mut row = vec![0f32; x.len()];
    crate::weights::quant::dequantize_into(crate::weights::DType::Q8_0, w, &mut row)
        .expect("a row of whole Q8_0 blocks");
    dot_row(&row, x, 1)
}

pub fn dot_scalar<W: WeightElem>(w: &[W], x: &[f32]) -> f32 {
    w.iter().zip(x).map(|(a, b)| a.to_f32() * b).sum()
}

/// Rows handed to one task: large enough to amortise scheduling, small enough that two cores finish together.
const ROWS_PER_TASK: usize = 16;

/// `out[r] = w[r] · x` for every row (decode: one token).
pub fn matvec<W: WeightElem>(w: &[W], rows: usize, cols: usize, x: &[f32], out: &mut [f32]) {
    assert!(w.len() >= rows * cols && x.len() == cols && out.len() == rows);
    pool::for_each_chunk_mut(out, ROWS_PER_TASK, |c, o| {
        let r0 = c * ROWS_PER_TASK;
        for (i, y) in o.iter_mut().enumerate() {
            let r = r0 + i;
            *y = dot(&w[r * cols..(r + 1) * cols], x);
        }
    });
}

/// Four tokens × two weight rows at a time: each weight vector loaded is used four times and each
/// activation vector twice, eight accumulators live in registers.
#[inline]
fn tile_4x2<W: WeightElem>(w0: &[W], w1: &[W], x: [&[f32]; 4]) -> [[f32; 4]; 2] {
    let n = w0.len();
    let mut a0 = [f32x8::ZERO; 4];
    let mut a1 = [f32x8::ZERO; 4];
    let mut i = 0;
    while i + 8 <= n {
        let v0 = W::load8(&w0[i..]);
        let v1 = W::load8(&w1[i..]);
        for t in 0..4 {
            let xv = load8(&x[t][i..]);
            a0[t] = v0.mul_add(xv, a0[t]);
            a1[t] = v1.mul_add(xv, a1[t]);
        }
        i += 8;
    }
    let mut r = [[0f32; 4]; 2];
    for t in 0..4 {
        let mut s0 = a0[t].reduce_add();
        let mut s1 = a1[t].reduce_add();
        for k in i..n {
            s0 += w0[k].to_f32() * x[t][k];
            s1 += w1[k].to_f32() * x[t][k];
        }
        r[0][t] = s0;
        r[1][t] = s1;
    }
    r
}

/// `out[t][r] = w[r] · x[t]` for `t` tokens (prefill: the whole prompt in one pass over the weights).
pub fn matmul_typed<W: WeightElem>(
    w: &[W],
    rows: usize,
    cols: usize,
    x: &[f32],
    t: usize,
    out: &mut [f32],
) {
    assert!(w.len() >= rows * cols && x.len() == t * cols && out.len() == t * rows);
    if t == 1 {
        return matvec(w, rows, cols, x, out);
    }
    // Each task owns a block of weight rows and writes them for every token into a transposed buffer
    // (rows × t), so tasks never share an output cache line; one transpose at the end restores t × rows.
    let mut out_t = vec![0f32; rows * t];
    pool::for_each_chunk_mut(&mut out_t, ROWS_PER_TASK * t, |c, o| {
        let r0 = c * ROWS_PER_TASK;
        let nrows = o.len() / t;
        let xrow = |i: usize| &x[i * cols..(i + 1) * cols];
        let wrow = |r: usize| &w[r * cols..(r + 1) * cols];
        let mut r = 0;
        while r + 2 <= nrows {
            let (w0, w1) = (wrow(r0 + r), wrow(r0 + r + 1));
            let mut ti = 0;
            while ti + 4 <= t {
                let res = tile_4x2(w0, w1, [xrow(ti), xrow(ti + 1), xrow(ti + 2), xrow(ti + 3)]);
                o[r * t + ti..r * t + ti + 4].copy_from_slice(&res[0]);
                o[(r + 1) * t + ti..(r + 1) * t + ti + 4].copy_from_slice(&res[1]);
                ti += 4;
            }
            for ti in ti..t {
                o[r * t + ti] = dot(w0, xrow(ti));
                o[(r + 1) * t + ti] = dot(w1, xrow(ti));
            }
            r += 2;
        }
        if r < nrows {
            let w0 = wrow(r0 + r);
            for ti in 0..t {
                o[r * t + ti] = dot(w0, xrow(ti));
            }
        }
    });
    for r in 0..rows {
        for ti in 0..t {
            out[ti * rows + r] = out_t[r * t + ti];
        }
    }
}

/// From this many tokens on, prefill uses the packed GEMM (24-token panels: fewer tokens would be
/// mostly padding).
pub const GEMM_MIN_TOKENS: usize = 12;

/// `out (t × rows) = x (t × cols) · wᵀ` with the register-tiled SIMD kernels where the CPU has them,
/// else the portable ones.
pub fn matmul_float<W: WeightElem>(
    w: &[W],
    rows: usize,
    cols: usize,
    x: &[f32],
    t: usize,
    out: &mut [f32],
) {
    matmul_float_many(&mut [(w, rows, out)], cols, x, t)
}

/// The SIMD driver for a short prefill (2 to `GEMM_MIN_TOKENS - 1` tokens): rows split into tasks
/// (several per thread, so both cores finish together), 3 rows × 4 tokens per tile, with the tokens
/// in groups whose activations stay in L2.
#[cfg(target_arch = "x86_64")]
fn matmul_tiled<W: WeightElem>(
    w: &[W],
    rows: usize,
    cols: usize,
    x: &[f32],
    t: usize,
    out: &mut [f32],
) {
    use super::float_x86::tile;
    assert!(w.len() >= rows * cols && x.len() == t * cols && out.len() == t * rows);
    let wrow = |r: usize| &w[r * cols..(r + 1) * cols];
    let xrow = |i: usize| &x[i * cols..(i + 1) * cols];
    let row_bytes = cols * std::mem::size_of::<W>();
    let threads = rayon::current_num_threads().max(1);
    let per = rows
        .div_ceil(threads * 8)
        .max(16384 / (row_bytes * t).max(1))
        .max(3)
        .next_multiple_of(3);
    let tok_group = (131072 / (cols * 4)).clamp(4, 256) & !3;
    let mut out_t = vec![0f32; rows * t];
    pool::for_each_chunk_mut(&mut out_t, per * t, |c, o| {
        let r0 = c * per;
        let nrows = o.len() / t;
        for g0 in (0..t).step_by(tok_group) {
            let g1 = (g0 + tok_group).min(t);
            let mut r = 0;
            while r < nrows {
                let three = r + 3 <= nrows;
                let mut ti = g0;
                while ti + 4 <= g1 {
                    let xs = [xrow(ti), xrow(ti + 1), xrow(ti + 2), xrow(ti + 3)];
                    if three {
                        let ws = [wrow(r0 + r), wrow(r0 + r + 1), wrow(r0 + r + 2)];
                        let res = tile::<W, 3, 4>(ws, xs);
                        for (k, row) in res.iter().enumerate() {
                            o[(r + k) * t + ti..(r + k) * t + ti + 4].copy_from_slice(row);
                        }
                    } else {
                        let res = tile::<W, 1, 4>([wrow(r0 + r)], xs);
                        o[r * t + ti..r * t + ti + 4].copy_from_slice(&res[0]);
                    }
                    ti += 4;
                }
                for ti in ti..g1 {
                    if three {
                        let ws = [wrow(r0 + r), wrow(r0 + r + 1), wrow(r0 + r + 2)];
                        let res = tile::<W, 3, 1>(ws, [xrow(ti)]);
                        for (k, row) in res.iter().enumerate() {
                            o[(r + k) * t + ti] = row[0];
                        }
                    } else {
                        o[r * t + ti] = tile::<W, 1, 1>([wrow(r0 + r)], [xrow(ti)])[0][0];
                    }
                }
                r += if three { 3 } else { 1 };
            }
        }
    });
    for r in 0..rows {
        for ti in 0..t {
            out[ti * rows + r] = out_t[r * t + ti];
        }
    }
}

/// Decode of several matrices of the same activations (q, k and v; gate and up) in one parallel step:
/// each thread takes runs of consecutive rows ([`super::quantized::for_each_decode_run`]), one row
/// at a time — a single sequential stream per thread, with a later row prefetched (see
/// `float_x86::decode_dot`). Four rows per pass (four streams) read a 151936-row bf16 product from
/// DRAM at ~11 GB/s on a 2-core Zen 3 VM; one row reached ~15 GB/s (f32 about level), A/B in one
/// process.
#[cfg(target_arch = "x86_64")]
fn matvec_many<W: WeightElem>(products: &mut [(&[W], usize, &mut [f32])], cols: usize, x: &[f32]) {
    use super::quantized;
    assert!(x.len() == cols);
    let row_bytes = cols * std::mem::size_of::<W>();
    let mut ws = Vec::with_capacity(products.len());
    let mut outs = Vec::with_capacity(products.len());
    for (w, rows, out) in products.iter_mut() {
        assert!(w.len() >= *rows * cols && out.len() == *rows);
        ws.push(*w);
        outs.push(&mut **out);
    }
    let acts = super::float_x86::decode_acts::<W>(x);
    // The quantized decode's split, which the weight stream (`bench::weight_stream_gbs`) measures.
    quantized::for_each_decode_run(&mut outs, row_bytes, |m, r0, o| {
        for (k, y) in (r0..).zip(o.iter_mut()) {
            *y = super::float_x86::decode_dot(&ws[m][k * cols..(k + 1) * cols], &acts);
        }
    });
}

/// [`matmul_float`] for several matrices of the same activations, `outs[i] = x · wᵢᵀ`, and the one
/// place that picks the float kernel: decode and the packed GEMM take all the matrices in one parallel
/// step (the GEMM packing the activations once); a short prefill takes the tiles one matrix at a time.
fn matmul_float_many<W: WeightElem>(
    products: &mut [(&[W], usize, &mut [f32])],
    cols: usize,
    x: &[f32],
    t: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if super::float_x86::has_avx2() {
        if t >= GEMM_MIN_TOKENS {
            return super::float_x86::gemm_many(products, cols, x, t);
        }
        if t == 1 {
            return matvec_many(products, cols, x);
        }
        for (w, rows, out) in products.iter_mut() {
            matmul_tiled(w, *rows, cols, x, t, out);
        }
        return;
    }
    for (w, rows, out) in products.iter_mut() {
        matmul_typed(w, *rows, cols, x, t, out);
    }
}

/// Lanes of the float GEMM's vectors: 16 where it runs in 512 bits (AVX-512), else 8.
pub fn float_gemm_lanes() -> usize {
    #[cfg(target_arch = "x86_64")]
    if super::float_x86::use_avx512() {
        return 16;
    }
    8
}

/// The FMA peak probe's loop (`bench::fma_peak_gflops`) in the float GEMM's vectors
/// ([`float_gemm_lanes`]), so its prefill is measured against the peak of its own instructions:
/// `iters` FMAs over twelve independent chains. Returns a checksum to keep.
pub fn fma_probe_chains(iters: usize, seed: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if float_gemm_lanes() == 16 {
        return super::float_x86::fma_chains_avx512(iters, seed);
    }
    let (m, a) = (f32x8::splat(0.999_999), f32x8::splat(1e-7));
    let mut acc = [f32x8::splat(seed); 12];
    for _ in 0..iters / 12 {
        for v in acc.iter_mut() {
            *v = v.mul_add(m, a);
        }
    }
    acc.iter().fold(f32x8::ZERO, |s, v| s + *v).reduce_add()
}

/// Dispatches on the weight form.
pub fn matmul(w: WeightSlice, rows: usize, cols: usize, x: &[f32], t: usize, out: &mut [f32]) {
    match w {
        WeightSlice::F32(w) => matmul_float(w, rows, cols, x, t, out),
        WeightSlice::BF16(w) => matmul_float(w, rows, cols, x, t, out),
        WeightSlice::F16(w) => matmul_float(w, rows, cols, x, t, out),
        WeightSlice::Quant(w) => super::quantized::matmul(w, rows, cols, x, t, out),
        WeightSlice::Q8_0Exact(w) => matmul_q8_0_exact(w, rows, cols, x, t, out),
    }
}

/// Rows of Q8_0 weights dequantized at a time by [`matmul_q8_0_exact`] outside decode: ~4 MiB of f32.
const EXACT_BAND_BYTES: usize = 4 << 20;

/// `out (t × rows) = x (t × cols) · wᵀ` for Q8_0 rows `w` (as stored), in f32 on their exact values:
/// the same bits as [`matmul_float`] on the rows dequantized to f32.
///
/// Why: in the exact form the output matrix (the default model's is Q8_0, 151936 × 896) was held
/// dequantized, 545 MB of f32 read at the memory's pace for every token decoded and once per prefill
/// (its last position); as stored it is 145 MB. Its decode product widens each block in registers
/// (`float_x86::decode_q8_0`), and so do a short prefill's tiles (`float_x86::tiles_q8_0`, the tiles'
/// bits). A product the GEMM would take (`GEMM_MIN_TOKENS` tokens or more: every position's logits of
/// a prompt) dequantizes a band of rows at a time into f32 and runs the GEMM on it, so its bits are
/// the GEMM's too.
pub fn matmul_q8_0_exact(w: &[u8], rows: usize, cols: usize, x: &[f32], t: usize, out: &mut [f32]) {
    use crate::weights::{quant, DType};
    let rb = super::quantized::row_bytes(DType::Q8_0, cols).expect("rows of whole Q8_0 blocks");
    assert!(w.len() >= rows * rb && x.len() == t * cols && out.len() == t * rows);
    #[cfg(target_arch = "x86_64")]
    if super::float_x86::has_avx2() {
        if t == 1 {
            return super::float_x86::decode_q8_0(&w[..rows * rb], rb, x, out);
        }
        if t < GEMM_MIN_TOKENS {
            return super::float_x86::tiles_q8_0(&w[..rows * rb], rb, x, t, out);
        }
    }
    let band = (EXACT_BAND_BYTES / (4 * cols)).clamp(1, rows.max(1));
    let mut values = vec![0f32; band * cols];
    let mut band_out = vec![0f32; t * band];
    for r0 in (0..rows).step_by(band) {
        let n = band.min(rows - r0);
        let per = 64;
        pool::for_each_chunk_mut(&mut values[..n * cols], per * cols, |i, v| {
            let first = r0 + i * per;
            let bytes = &w[first * rb..(first + v.len() / cols) * rb];
            quant::dequantize_into(DType::Q8_0, bytes, v).expect("whole blocks, checked above");
        });
        matmul_float(&values[..n * cols], n, cols, x, t, &mut band_out[..t * n]);
        for ti in 0..t {
            out[ti * rows + r0..][..n].copy_from_slice(&band_out[ti * n..][..n]);
        }
    }
}

/// Several products of the same `x` (`t × cols`): `outs[i] = x · wᵢᵀ`. Block-quantized matrices share
/// one quantization of `x` and one parallel step (see `quantized::matmul_acts_many`); float matrices of
/// one form share one parallel step too, and in prefill one packing of `x` (see `float_x86::gemm_many`).
/// Mixed forms are multiplied one by one. Values are those of [`matmul`] for each matrix alone.
pub fn matmul_many(
    products: &mut [(WeightSlice, usize, &mut [f32])],
    cols: usize,
    x: &[f32],
    t: usize,
) {
    use super::quantized::{self as q, Product};
    if products
        .iter()
        .all(|p| matches!(p.0, WeightSlice::Quant(_)))
    {
        assert!(x.len() == t * cols);
        let mut qs: Vec<Product> = products
            .iter_mut()
            .map(|(w, rows, out)| match w {
                WeightSlice::Quant(w) => Product {
                    w: *w,
                    rows: *rows,
                    out,
                },
                _ => unreachable!("all quantized"),
            })
            .collect();
        return q::matmul_many(q::Backend::best(), &mut qs, cols, x, t);
    }
    macro_rules! all_of {
        ($form:ident) => {
            if products
                .iter()
                .all(|p| matches!(p.0, WeightSlice::$form(_)))
            {
                let mut typed: Vec<_> = products
                    .iter_mut()
                    .map(|(w, rows, out)| match w {
                        WeightSlice::$form(w) => (*w, *rows, &mut **out),
                        _ => unreachable!("all {}", stringify!($form)),
                    })
                    .collect();
                return matmul_float_many(&mut typed, cols, x, t);
            }
        };
    }
    all_of!(F32);
    all_of!(BF16);
    all_of!(F16);
    for (w, rows, out) in products.iter_mut() {
        matmul(*w, *rows, cols, x, t, out);
    }
}

/// The definition: one dot product per (token, row), in order.
pub fn matmul_scalar<W: WeightElem>(
    w: &[W],
    rows: usize,
    cols: usize,
    x: &[f32],
    t: usize,
    out: &mut [f32],
) {
    for ti in 0..t {
        for r in 0..rows {
            out[ti * rows + r] =
                dot_scalar(&w[r * cols..(r + 1) * cols], &x[ti * cols..(ti + 1) * cols]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        // A small deterministic generator: values in [-1, 1) with varied magnitudes.
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn close(a: &[f32], b: &[f32], tol: f32) {
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "at {i}: {x} vs {y}");
        }
    }

    #[test]
    fn dot_matches_scalar_on_awkward_lengths() {
        for n in [
            0, 1, 7, 8, 9, 15, 16, 17, 24, 31, 33, 40, 64, 100, 895, 896, 897,
        ] {
            let (w, x) = (data(n, 1), data(n, 2));
            let s = dot_scalar(&w, &x);
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let sb = dot_scalar(&wb, &x);
            // The portable kernel, then the decode kernel (t = 1) and the tiles' order (t = 2).
            for (d, want) in [
                (dot(&w, &x), s),
                (dot_row(&w, &x, 1), s),
                (dot_row(&w, &x, 2), s),
                (dot_row(&wb, &x, 1), sb),
                (dot_row(&wb, &x, 2), sb),
            ] {
                assert!(
                    (d - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "n={n}: {d} vs {want}"
                );
            }
        }
    }

    #[test]
    fn matmul_matches_scalar_all_forms() {
        #[cfg(not(miri))]
        let shapes = [
            (1, 1, 1),
            (3, 7, 1),
            (17, 33, 5),
            (33, 100, 4),
            (50, 96, 7),
            (2, 9, 13),
            (7, 64, 9),
            (4, 8, 4),
            (5, 15, 3),
            (101, 40, 2),
            (12, 896, 1),
            (9, 300, 12),
            (70, 520, 25),
            (5, 24, 48),
            (130, 257, 13),
            (600, 40, 12),
            // 32 tokens (cut into two panels of 16) with an odd reduction tail, then a smaller
            // product after larger ones (the kept panel buffer holds stale values).
            (70, 521, 32),
            (67, 259, 128),
            (9, 300, 13),
            // Rows longer than one reduction block: 1000 values as blocks of 504 and 496, 1800 as
            // three of 600, so outputs are added to across blocks.
            (9, 1000, 13),
            (21, 1800, 30),
        ];
        // Miri is far too slow for the full list: one shape per path (decode, small tiles with row and
        // token tails, packed GEMM with K, M and token-panel tails).
        #[cfg(miri)]
        let shapes = [
            (1, 1, 1),
            (5, 15, 3),
            (12, 40, 1),
            (9, 300, 12),
            (70, 40, 12),
            (5, 24, 25),
        ];
        for (rows, cols, t) in shapes {
            let w = data(rows * cols, 3);
            let x = data(t * cols, 4);
            let mut got = vec![0.0; t * rows];
            let mut want = vec![0.0; t * rows];
            // Both sides round in f32, in different orders, and their difference grows with the row
            // length: the one shape with rows of more than 1000 values gets a bound that grows with it.
            let tol = if cols > 1000 {
                1e-5 * cols as f32 / 500.0
            } else {
                1e-5
            };
            matmul(WeightSlice::F32(&w), rows, cols, &x, t, &mut got);
            matmul_scalar(&w, rows, cols, &x, t, &mut want);
            close(&got, &want, tol);

            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            matmul(WeightSlice::BF16(&wb), rows, cols, &x, t, &mut got);
            matmul_scalar(&wb, rows, cols, &x, t, &mut want);
            close(&got, &want, tol);

            let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            matmul(WeightSlice::F16(&wh), rows, cols, &x, t, &mut got);
            matmul_scalar(&wh, rows, cols, &x, t, &mut want);
            close(&got, &want, tol);
        }
    }

    /// Several matrices of one input in one step (q, k and v; gate and up): each output is the
    /// definition's, for every float form, in decode, the small tiles and the packed GEMM (whose
    /// activations are packed once for all three), with row counts that split unevenly into tasks.
    #[test]
    fn matmul_many_matches_scalar_float_forms() {
        let cols = 130;
        let rows = [67, 9, 22];
        for t in [1, 3, 13, 40] {
            let ws: Vec<Vec<f32>> = rows
                .iter()
                .enumerate()
                .map(|(i, &r)| data(r * cols, 10 + i as u32))
                .collect();
            let x = data(t * cols, 5);
            let wb: Vec<Vec<bf16>> = ws
                .iter()
                .map(|w| w.iter().map(|&v| bf16::from_f32(v)).collect())
                .collect();
            let wh: Vec<Vec<f16>> = ws
                .iter()
                .map(|w| w.iter().map(|&v| f16::from_f32(v)).collect())
                .collect();
            for form in 0..3 {
                let slice = |i: usize| match form {
                    0 => WeightSlice::F32(&ws[i]),
                    1 => WeightSlice::BF16(&wb[i]),
                    _ => WeightSlice::F16(&wh[i]),
                };
                let mut outs: Vec<Vec<f32>> = rows.iter().map(|&r| vec![0.0; t * r]).collect();
                let mut products: Vec<_> = outs
                    .iter_mut()
                    .enumerate()
                    .map(|(i, o)| (slice(i), rows[i], o.as_mut_slice()))
                    .collect();
                matmul_many(&mut products, cols, &x, t);
                for (i, got) in outs.iter().enumerate() {
                    let mut want = vec![0.0; t * rows[i]];
                    match form {
                        0 => matmul_scalar(&ws[i], rows[i], cols, &x, t, &mut want),
                        1 => matmul_scalar(&wb[i], rows[i], cols, &x, t, &mut want),
                        _ => matmul_scalar(&wh[i], rows[i], cols, &x, t, &mut want),
                    }
                    close(got, &want, 1e-5);
                }
            }
        }
    }

    /// The portable path (what runs without AVX2) against the definition too.
    #[test]
    fn portable_matmul_matches_scalar() {
        for &(rows, cols, t) in &[(3, 7, 1), (17, 33, 5), (50, 96, 7)] {
            let w = data(rows * cols, 3);
            let x = data(t * cols, 4);
            let mut got = vec![0.0; t * rows];
            let mut want = vec![0.0; t * rows];
            matmul_typed(&w, rows, cols, &x, t, &mut got);
            matmul_scalar(&w, rows, cols, &x, t, &mut want);
            close(&got, &want, 1e-5);
        }
    }

    /// Label scoring multiplies single rows (`dot_row`); each must equal that row of the whole decode
    /// product bit for bit, whichever kernel the row length selects (bf16 rows of a multiple of 32
    /// values take the AVX-512 kernel where present, with activations reordered once per product).
    #[test]
    fn decode_rows_equal_single_row_products() {
        let rows = 37;
        for cols in [32, 64, 96, 130, 896] {
            let w = data(rows * cols, 6);
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let x = data(cols, 7);
            let mut got = vec![0.0; rows];
            matmul(WeightSlice::BF16(&wb), rows, cols, &x, 1, &mut got);
            for (r, g) in got.iter().enumerate() {
                let one = dot_row(&wb[r * cols..(r + 1) * cols], &x, 1);
                assert_eq!(g.to_bits(), one.to_bits(), "cols {cols}, row {r}");
            }
            matmul(WeightSlice::F32(&w), rows, cols, &x, 1, &mut got);
            for (r, g) in got.iter().enumerate() {
                let one = dot_row(&w[r * cols..(r + 1) * cols], &x, 1);
                assert_eq!(g.to_bits(), one.to_bits(), "cols {cols}, row {r}");
            }
        }
    }

    #[test]
    fn bf16_widening_is_exact() {
        for v in [0.0f32, -0.0, 1.0, -3.5, 1e-30, 6.5e4, f32::MIN_POSITIVE] {
            let b = bf16::from_f32(v);
            assert_eq!(WeightElem::to_f32(b), b.to_f32());
        }
    }
}
