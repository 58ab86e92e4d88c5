//! `Matrix`: a weight matrix in the form the kernels read it — mapped F32/BF16/F16 bytes straight from the
//! checkpoint (no copy), owned F32 values (dequantized GGUF blocks, or a mapping that was misaligned), or
//! GGUF quantized blocks left in the mapping (the [`WeightForm::Native`] form).

use crate::error::{Error, Result};
use crate::kernels::quantized::{self, Layout, QuantSlice};
use crate::kernels::{matmul, WeightSlice};
use crate::weights::arena::{Arena, ArenaBuf};
use crate::weights::quant::dequantize_into;
use crate::weights::{quant, to_f32_vec, Bytes, DType, RawTensor};
use half::{bf16, f16};
use rayon::prelude::*;

/// How a checkpoint's block-quantized tensors (GGUF Q8_0, Q5_0, Q4_K, Q6_K) are held and multiplied.
/// F32, BF16 and F16 tensors are exact in either form (mapped, widened to f32 in registers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightForm {
    /// f32 arithmetic on the stored values: F32/BF16/F16 stay in the mapping, quantized blocks are
    /// dequantized to f32 at load (4 bytes a weight in memory). What the golden tests check.
    #[default]
    Exact,
    /// Each tensor as the file stores it: quantized blocks stay in the mapping (no copy; Q8_0 and Q5_0
    /// matrices excepted where the decode reads them interleaved, see [`quantized::decode_layout`]:
    /// those are laid out again at load, block for block, never requantized) and each product quantizes the activations to 8 bits per 32 values for
    /// integer multiply-adds — approximate: the activations are rounded. F32/BF16/F16 tensors are used
    /// as in `Exact`. A quantized matrix whose rows do not hold whole blocks falls back to `Exact`.
    Native,
    /// Every tensor rounded to bf16 (matrices held as bf16, widened to f32 in registers): exact for a bf16
    /// file, rounded otherwise — the same values a bf16 checkpoint of the model holds.
    Bf16,
    /// Every matrix held as Q8_0 (a scale per 32 weights, 8-bit integers), multiplied like `Native`:
    /// quantized at load unless the file stores Q8_0 already. Where the decode runs on x86 (AVX2,
    /// AVX-512 VNNI, AMX), the rows are laid out eight side by side for its kernel
    /// (`quantized::decode_layout`).
    Q8_0,
}

impl WeightForm {
    pub const ALL: [WeightForm; 4] = [
        WeightForm::Exact,
        WeightForm::Native,
        WeightForm::Bf16,
        WeightForm::Q8_0,
    ];

    /// The name used on the command line (`--dtype`).
    pub fn name(self) -> &'static str {
        match self {
            WeightForm::Exact => "f32",
            WeightForm::Native => "native",
            WeightForm::Bf16 => "bf16",
            WeightForm::Q8_0 => "q8_0",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|f| f.name().eq_ignore_ascii_case(name))
            .or_else(|| {
                name.eq_ignore_ascii_case("exact")
                    .then_some(WeightForm::Exact)
            })
    }
}

enum Storage {
    /// f32 values converted at load (arena memory, viewed as f32).
    Owned(ArenaBuf),
    /// bf16 values converted at load (arena memory, viewed as bf16).
    OwnedBF16(ArenaBuf),
    MappedF32(Bytes),
    MappedBF16(Bytes),
    MappedF16(Bytes),
    /// Block-quantized rows (`dtype` is Q8_0, Q5_0, Q4_K or Q6_K; each row a whole number of blocks),
    /// as the file lays them out or (Q8_0, owned) interleaved.
    Quant(DType, Layout, QuantBytes),
    /// Q8_0 rows as the file stores them, multiplied in f32 on their exact values (the exact form's
    /// output matrix, see [`Matrix::output_from_raw_in`]).
    Q8_0Exact(Bytes),
}

enum QuantBytes {
    Mapped(Bytes),
    Owned(ArenaBuf),
}

impl QuantBytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            QuantBytes::Mapped(b) => b.as_slice(),
            QuantBytes::Owned(v) => v.bytes(),
        }
    }
}

pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    storage: Storage,
}

/// Element types a byte buffer may be viewed as: plain old data, every bit pattern a valid value.
trait Plain: Copy {}
impl Plain for f32 {}
impl Plain for bf16 {}
impl Plain for f16 {}
impl Plain for u8 {}

/// Views bytes as `T` if they are aligned for it.
fn cast<T: Plain>(bytes: &[u8]) -> Option<&[T]> {
    // SAFETY: T is plain old data (`Plain`). align_to never produces a misaligned middle; we accept it
    // only when it covers every byte.
    let (pre, mid, post) = unsafe { bytes.align_to::<T>() };
    (pre.is_empty() && post.is_empty()).then_some(mid)
}

/// Views bytes as mutable `T` if they are aligned for it.
fn cast_mut<T: Plain>(bytes: &mut [u8]) -> Option<&mut [T]> {
    // SAFETY: as in `cast`; any values written through the view are valid bytes.
    let (pre, mid, post) = unsafe { bytes.align_to_mut::<T>() };
    (pre.is_empty() && post.is_empty()).then_some(mid)
}

/// A stored tensor converted to another element form, a band of rows at a time on the pool: each task
/// widens its rows to f32 in a small buffer, and `write` turns them into its `per_row` outputs per row.
/// Converting whole tensors held a full f32 copy of the largest one (the 151936-row embedding, 544 MB)
/// beside its result, on one core. The output holds rows in whole groups of `group` (the last padded;
/// `write` is given the real rows' values and the padded group's outputs).
#[allow(clippy::too_many_arguments)]
fn convert_rows<T: Plain + Send>(
    arena: &Arena,
    name: &str,
    t: &RawTensor,
    rows: usize,
    cols: usize,
    per_row: usize,
    group: usize,
    write: impl Fn(&[f32], &mut [T]) + Sync,
) -> Result<ArenaBuf> {
    let bytes = t.bytes.as_slice();
    let stored_rows = rows.next_multiple_of(group);
    let mut buf = arena.alloc(stored_rows * per_row * std::mem::size_of::<T>())?;
    let out: &mut [T] = cast_mut(buf.bytes_mut()).expect("arena buffers are 64-byte aligned");
    // Rows a task takes: ~64 KiB of f32, in whole groups.
    let band = (16384 / cols.max(1)).max(1).next_multiple_of(group);
    match t.dtype.bytes_for(cols) {
        Some(rb) if rows * rb == bytes.len() && per_row > 0 => {
            out.par_chunks_mut(band * per_row)
                .enumerate()
                .try_for_each(|(i, o)| {
                    let r0 = i * band;
                    let n = (o.len() / per_row).min(rows - r0);
                    let mut values = vec![0f32; n * cols];
                    dequantize_into(t.dtype, &bytes[r0 * rb..(r0 + n) * rb], &mut values)
                        .map_err(|m| Error::tensor(name, m))?;
                    write(&values, o);
                    Ok(())
                })?;
        }
        // Rows that are not whole blocks (or an empty matrix): the whole tensor at once.
        _ => write(&to_f32_vec(name, t)?, out),
    }
    Ok(buf)
}

/// A Q8_0 or Q5_0 tensor's rows (`t`, as the file stores them) interleaved for the decode kernel, a band
/// of groups at a time on the pool: its blocks as they are, never requantized.
///
/// Each band's file bytes are released as soon as they are copied: released only after the whole
/// tensor, the default model's output matrix (145 MB) was resident twice for a moment, and that moment
/// was the process's peak (~140 MB above what it held after the load).
fn interleave_rows(
    arena: &Arena,
    dtype: DType,
    t: &RawTensor,
    rows: usize,
    cols: usize,
) -> Result<ArenaBuf> {
    let bytes = t.bytes.as_slice();
    let rb = quantized::row_bytes(dtype, cols).expect("whole blocks");
    let len = quantized::interleaved_bytes(dtype, rows, cols).expect("an interleaved type");
    let mut buf = arena.alloc(len)?;
    // ~1 MiB a band: a release is a system call (and on a huge-page mapping, a split of it).
    let band = (1 << 20) / rb;
    let band = band.max(1).next_multiple_of(quantized::GROUP_ROWS);
    buf.bytes_mut()
        .par_chunks_mut(band * rb)
        .enumerate()
        .for_each(|(i, o)| {
            let r0 = i * band;
            let n = (o.len() / rb).min(rows - r0);
            quantized::interleave(dtype, &bytes[r0 * rb..(r0 + n) * rb], rb, o);
            t.bytes.release_part(r0 * rb, n * rb);
        });
    Ok(buf)
}

/// Whether `form` holds stored matrices of `dtype` interleaved where the CPU's decode reads them so:
/// Q8_0 in the Q8_0 and native forms, Q5_0 in the native form.
fn interleaves_in(form: WeightForm, dtype: DType) -> bool {
    match dtype {
        DType::Q8_0 => matches!(form, WeightForm::Q8_0 | WeightForm::Native),
        DType::Q5_0 => form == WeightForm::Native,
        _ => false,
    }
}

impl Matrix {
    /// Takes a checkpoint tensor as a `rows × cols` matrix. F32/BF16/F16 stay in the mapping; block-quantized
    /// types are dequantized to exact f32 values (the [`WeightForm::Exact`] form).
    pub fn from_raw(name: &str, t: &RawTensor, rows: usize, cols: usize) -> Result<Self> {
        Self::from_raw_with(name, t, rows, cols, WeightForm::Exact)
    }

    /// Like [`Matrix::from_raw`], in the given form.
    pub fn from_raw_with(
        name: &str,
        t: &RawTensor,
        rows: usize,
        cols: usize,
        form: WeightForm,
    ) -> Result<Self> {
        Self::from_raw_in(&Arena::new(), name, t, rows, cols, form)
    }

    /// Like [`Matrix::from_raw_with`], with values converted at load placed in `arena` (a model's
    /// matrices share one, so they pack into huge pages back to back).
    pub fn from_raw_in(
        arena: &Arena,
        name: &str,
        t: &RawTensor,
        rows: usize,
        cols: usize,
        form: WeightForm,
    ) -> Result<Self> {
        let layout = quantized::decode_layout(quantized::Backend::best());
        Self::from_raw_laid_out(arena, name, t, rows, cols, form, layout)
    }

    /// Like [`Matrix::from_raw_in`], with the layout of the matrices that interleave given, not chosen
    /// for this CPU (tests check both).
    pub fn from_raw_laid_out(
        arena: &Arena,
        name: &str,
        t: &RawTensor,
        rows: usize,
        cols: usize,
        form: WeightForm,
        layout: Layout,
    ) -> Result<Self> {
        if t.shape != [rows, cols] {
            return Err(Error::tensor(
                name,
                format!(
                    "shape {:?} disagrees with the config, which implies [{rows}, {cols}]",
                    t.shape
                ),
            ));
        }
        if t.dtype.bytes_for(rows * cols) != Some(t.bytes.len()) {
            return Err(Error::tensor(
                name,
                "byte length does not match its shape and type",
            ));
        }
        let b = t.bytes.as_slice();
        let whole_q8_blocks = quantized::row_bytes(DType::Q8_0, cols).is_some();
        let interleave = layout == Layout::Interleaved8;
        let storage = match (form, t.dtype) {
            (WeightForm::Exact | WeightForm::Native, DType::F32) if cast::<f32>(b).is_some() => {
                Storage::MappedF32(t.bytes.clone())
            }
            (WeightForm::Exact | WeightForm::Native | WeightForm::Bf16, DType::BF16)
                if cast::<bf16>(b).is_some() =>
            {
                Storage::MappedBF16(t.bytes.clone())
            }
            (WeightForm::Exact | WeightForm::Native, DType::F16) if cast::<f16>(b).is_some() => {
                Storage::MappedF16(t.bytes.clone())
            }
            // Q8_0 and (in `Native`) Q5_0 rows go interleaved where the decode reads them so (see
            // `decode_layout`): a copy made at load, after which the mapped bytes are never read (and
            // are released), so resident memory does not grow. In the default model that is its output
            // matrix (Q8_0, 145 MB of the 392 MB a decode step reads) and every Q5_0 matrix (q, k, o,
            // gate, up and half of v; 173 MB). For the output: `duet bench` (native), two alternations
            // on a 2-core Xeon VM, decoded 49.2 and 51.7 tok/s against 43.5 and 42.6 mapped; load
            // 0.18–0.19 s against 0.14–0.16, peak RSS 471–472 MiB against 474–484. For Q5_0 see
            // `quantized::interleave_q5_0`.
            (WeightForm::Native, q) | (WeightForm::Q8_0, q @ DType::Q8_0)
                if quantized::row_bytes(q, cols).is_some()
                    && !(interleave && interleaves_in(form, q)) =>
            {
                Storage::Quant(q, Layout::Rows, QuantBytes::Mapped(t.bytes.clone()))
            }
            (WeightForm::Q8_0 | WeightForm::Native, q)
                if interleave
                    && interleaves_in(form, q)
                    && quantized::row_bytes(q, cols).is_some() =>
            {
                Storage::Quant(
                    q,
                    Layout::Interleaved8,
                    QuantBytes::Owned(interleave_rows(arena, q, t, rows, cols)?),
                )
            }
            (WeightForm::Bf16, _) => Storage::OwnedBF16(convert_rows(
                arena,
                name,
                t,
                rows,
                cols,
                cols,
                1,
                |v, o| {
                    o.iter_mut()
                        .zip(v)
                        .for_each(|(o, &v)| *o = bf16::from_f32(v));
                },
            )?),
            (WeightForm::Q8_0, _) if whole_q8_blocks => {
                let rb = quantized::row_bytes(DType::Q8_0, cols).unwrap_or(0);
                let quantize = |v: &[f32], o: &mut [u8]| {
                    if interleave {
                        let mut plain = vec![0u8; v.len() / cols * rb];
                        quantized::quantize_weights_q8_0(v, &mut plain);
                        quantized::interleave_q8_0(&plain, rb, o);
                    } else {
                        quantized::quantize_weights_q8_0(v, o);
                    }
                };
                let group = if interleave { quantized::GROUP_ROWS } else { 1 };
                Storage::Quant(
                    DType::Q8_0,
                    layout,
                    QuantBytes::Owned(convert_rows(
                        arena, name, t, rows, cols, rb, group, quantize,
                    )?),
                )
            }
            _ => Storage::Owned(convert_rows(
                arena,
                name,
                t,
                rows,
                cols,
                cols,
                1,
                |v, o| o.copy_from_slice(v),
            )?),
        };
        let mapped = matches!(
            storage,
            Storage::MappedF32(_)
                | Storage::MappedBF16(_)
                | Storage::MappedF16(_)
                | Storage::Quant(_, _, QuantBytes::Mapped(_))
        );
        if !mapped {
            // The values now live in memory of our own; the file's copy need not stay resident too.
            t.bytes.release();
        }
        Ok(Matrix {
            rows,
            cols,
            storage,
        })
    }

    /// Like [`Matrix::from_raw_in`], for the output matrix (the logits' projection): in the exact form a
    /// Q8_0 one stays as the file stores it, multiplied in f32 on its exact values
    /// ([`matmul::matmul_q8_0_exact`]: the same bits as dequantized at load).
    ///
    /// Why only the output matrix: it is the one multiplied for a single token in every pass, prefill
    /// included (only the last position's logits), so its bytes are read at the memory's pace each
    /// time, and it is the largest (the default model's: 545 MB as f32, 145 MB as stored). The other
    /// matrices of a prefill are multiplied for every token by the f32 GEMM, which wants f32 rows; the
    /// default model's other Q8_0 matrices (the v projections) are 2 % of its bytes.
    pub fn output_from_raw_in(
        arena: &Arena,
        name: &str,
        t: &RawTensor,
        rows: usize,
        cols: usize,
        form: WeightForm,
    ) -> Result<Self> {
        let exact_q8_0 = form == WeightForm::Exact
            && t.dtype == DType::Q8_0
            && t.shape == [rows, cols]
            && quantized::row_bytes(DType::Q8_0, cols).map(|rb| rb * rows) == Some(t.bytes.len());
        if !exact_q8_0 {
            return Self::from_raw_in(arena, name, t, rows, cols, form);
        }
        Ok(Matrix {
            rows,
            cols,
            storage: Storage::Q8_0Exact(t.bytes.clone()),
        })
    }

    /// Block-quantized rows copied into memory of our own (tests build matrices this way), multiplied as in
    /// [`WeightForm::Native`]. `bytes` must hold exactly `rows × cols` values of `dtype`, whole blocks per row.
    pub fn from_quantized(dtype: DType, rows: usize, cols: usize, bytes: Vec<u8>) -> Result<Self> {
        let what = format!("{} matrix {rows}x{cols}", dtype.name());
        let rb = quantized::row_bytes(dtype, cols)
            .ok_or_else(|| Error::tensor(&what, "rows are not whole quantized blocks"))?;
        if rows.checked_mul(rb) != Some(bytes.len()) {
            return Err(Error::tensor(
                &what,
                "byte length does not match its shape and type",
            ));
        }
        Ok(Matrix {
            rows,
            cols,
            storage: Storage::Quant(
                dtype,
                Layout::Rows,
                QuantBytes::Owned(Arena::new().copy_of(&bytes)?),
            ),
        })
    }

    pub fn weights(&self) -> WeightSlice<'_> {
        // The casts were checked at construction; a failure here would be a bug, not bad input.
        let bad = "alignment checked at construction";
        match &self.storage {
            Storage::Owned(v) => WeightSlice::F32(cast(v.bytes()).expect(bad)),
            Storage::OwnedBF16(v) => WeightSlice::BF16(cast(v.bytes()).expect(bad)),
            Storage::MappedF32(b) => WeightSlice::F32(cast(b.as_slice()).expect(bad)),
            Storage::MappedBF16(b) => WeightSlice::BF16(cast(b.as_slice()).expect(bad)),
            Storage::MappedF16(b) => WeightSlice::F16(cast(b.as_slice()).expect(bad)),
            Storage::Quant(dtype, layout, b) => WeightSlice::Quant(QuantSlice {
                dtype: *dtype,
                bytes: b.as_slice(),
                layout: *layout,
            }),
            Storage::Q8_0Exact(b) => WeightSlice::Q8_0Exact(b.as_slice()),
        }
    }

    /// The form the weights are held in, for reports.
    pub fn form(&self) -> &'static str {
        match &self.storage {
            Storage::Owned(_) => "f32 (owned)",
            Storage::OwnedBF16(_) => "bf16 (owned)",
            Storage::MappedF32(_) => "f32 (mapped)",
            Storage::MappedBF16(_) => "bf16 (mapped)",
            Storage::MappedF16(_) => "f16 (mapped)",
            Storage::Quant(DType::Q5_0, Layout::Interleaved8, _) => "q5_0 (interleaved)",
            Storage::Quant(_, Layout::Interleaved8, _) => "q8_0 (interleaved)",
            Storage::Quant(d, Layout::Rows, b) => match (d, b) {
                (DType::Q8_0, QuantBytes::Mapped(_)) => "q8_0 (mapped)",
                (DType::Q5_0, QuantBytes::Mapped(_)) => "q5_0 (mapped)",
                (DType::Q4K, QuantBytes::Mapped(_)) => "q4_k (mapped)",
                (DType::Q6K, QuantBytes::Mapped(_)) => "q6_k (mapped)",
                (_, QuantBytes::Mapped(_)) => "quantized (mapped)",
                (_, QuantBytes::Owned(_)) => "quantized (owned)",
            },
            Storage::Q8_0Exact(_) => "q8_0 (mapped, f32 math)",
        }
    }

    /// Bytes the matrix occupies (what one pass over it reads).
    pub fn bytes(&self) -> usize {
        self.stored_bytes().len()
    }

    /// The stored bytes themselves, row after row, whatever their form (the weight-stream measure in
    /// `bench` reads them as a decode step does, without multiplying).
    pub fn stored_bytes(&self) -> &[u8] {
        match &self.storage {
            Storage::Owned(v) | Storage::OwnedBF16(v) => v.bytes(),
            Storage::MappedF32(b) | Storage::MappedBF16(b) | Storage::MappedF16(b) => b.as_slice(),
            Storage::Quant(_, _, b) => b.as_slice(),
            Storage::Q8_0Exact(b) => b.as_slice(),
        }
    }

    /// Copies row `r` widened to f32 into `out` (embedding lookup).
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        let c = self.cols;
        match self.weights() {
            WeightSlice::F32(w) => out.copy_from_slice(&w[r * c..(r + 1) * c]),
            WeightSlice::BF16(w) => out
                .iter_mut()
                .zip(&w[r * c..(r + 1) * c])
                .for_each(|(o, v)| *o = v.to_f32()),
            WeightSlice::F16(w) => out
                .iter_mut()
                .zip(&w[r * c..(r + 1) * c])
                .for_each(|(o, v)| *o = v.to_f32()),
            WeightSlice::Quant(q) => {
                let rb = quantized::row_bytes(q.dtype, c)
                    .expect("whole blocks, checked at construction");
                let mut row = Vec::new();
                let row = match q.layout {
                    Layout::Rows => &q.bytes[r * rb..(r + 1) * rb],
                    Layout::Interleaved8 => {
                        row.resize(rb, 0);
                        quantized::deinterleave(q.dtype, q.bytes, rb, r, &mut row);
                        &row[..]
                    }
                };
                quant::dequantize_into(q.dtype, row, out)
                    .expect("row length checked at construction");
            }
            WeightSlice::Q8_0Exact(w) => {
                let rb = w.len() / self.rows;
                quant::dequantize_into(DType::Q8_0, &w[r * rb..(r + 1) * rb], out)
                    .expect("row length checked at construction");
            }
        }
    }

    /// `out (t × rows) = x (t × cols) · selfᵀ`.
    pub fn matmul(&self, x: &[f32], t: usize, out: &mut [f32]) {
        matmul(self.weights(), self.rows, self.cols, x, t, out);
    }

    /// Only the listed rows: `out[t][i] = row(ids[i]) · x[t]` (label scoring needs a handful of vocab rows).
    pub fn matmul_rows(&self, ids: &[usize], x: &[f32], t: usize, out: &mut [f32]) {
        use crate::kernels::matmul::dot_row as dot;
        if let WeightSlice::Quant(q) = self.weights() {
            return quantized::matmul_rows(q, self.rows, self.cols, ids, x, t, out);
        }
        let c = self.cols;
        let mut row = vec![0f32; if t > 1 { c } else { 0 }];
        for ti in 0..t {
            let xr = &x[ti * c..(ti + 1) * c];
            for (i, &r) in ids.iter().enumerate() {
                out[ti * ids.len() + i] = match self.weights() {
                    WeightSlice::F32(w) => dot(&w[r * c..(r + 1) * c], xr, t),
                    WeightSlice::BF16(w) => dot(&w[r * c..(r + 1) * c], xr, t),
                    WeightSlice::F16(w) => dot(&w[r * c..(r + 1) * c], xr, t),
                    WeightSlice::Q8_0Exact(w) => {
                        let rb = w.len() / self.rows;
                        let stored = &w[r * rb..(r + 1) * rb];
                        if t == 1 {
                            // As the whole product's decode kernel reads the row.
                            crate::kernels::matmul::dot_q8_0_row(stored, xr)
                        } else {
                            quant::dequantize_into(DType::Q8_0, stored, &mut row)
                                .expect("row length checked at construction");
                            dot(&row, xr, t)
                        }
                    }
                    WeightSlice::Quant(_) => unreachable!("handled above"),
                };
            }
        }
    }
}

/// A table read one row at a time: the token embeddings, when they are not also the output matrix.
///
/// Why not a [`Matrix`] in the weight form: every row is looked up, never multiplied, so converting the
/// whole table at load only holds a copy of it. Kept as stored instead (mapped, only the rows looked up
/// become resident), each row is rounded as it is looked up just as the form rounds a matrix at load, so
/// it holds the same values. For the default model that is 545 MB of f32 (`--exact`), 272 MB of bf16 or
/// 145 MB of Q8_0 not held.
pub struct LookupTable {
    /// The rows as held: as stored, or in the weight form when the table is also multiplied.
    pub matrix: Matrix,
    rounding: Rounding,
    /// A table only looked up: its type and bytes as stored, each row read from the file as it is
    /// needed ([`Bytes::read_into`]), so that the rows a prompt uses do not map the table into memory.
    stored: Option<(DType, Bytes)>,
}

/// What a weight form's conversion at load ([`Matrix::from_raw_in`]) does to a stored tensor's values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rounding {
    /// Nothing: the values widen exactly, or the form holds this type as it is.
    None,
    /// Each value to the nearest bf16 (which leaves bf16 values as they are).
    Bf16,
    /// Each 32-value block requantized to Q8_0 (a Q8_0 tensor is held as it is).
    Q8_0,
}

impl LookupTable {
    /// A table that is only looked up, kept as stored, its rows rounded as `form` rounds a matrix.
    pub fn from_raw_in(
        arena: &Arena,
        name: &str,
        t: &RawTensor,
        rows: usize,
        cols: usize,
        form: WeightForm,
    ) -> Result<Self> {
        let rounding = match form {
            WeightForm::Bf16 => Rounding::Bf16,
            WeightForm::Q8_0
                if t.dtype != DType::Q8_0 && quantized::row_bytes(DType::Q8_0, cols).is_some() =>
            {
                Rounding::Q8_0
            }
            _ => Rounding::None,
        };
        // `Native` in the rows layout: every block type stays in the mapping, Q8_0 too (the decode's
        // interleaved layout is for matrices that are multiplied; a lookup reads one row).
        let matrix = Matrix::from_raw_laid_out(
            arena,
            name,
            t,
            rows,
            cols,
            WeightForm::Native,
            Layout::Rows,
        )?;
        Ok(LookupTable {
            matrix,
            rounding,
            stored: Some((t.dtype, t.bytes.clone())),
        })
    }

    /// A table that is also multiplied (tied embeddings), so held in the weight form like every matrix.
    pub fn of_matrix(matrix: Matrix) -> Self {
        LookupTable {
            matrix,
            rounding: Rounding::None,
            stored: None,
        }
    }

    /// Copies row `r`, widened to f32 and rounded as the weight form rounds, into `out`.
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        match &self.stored {
            Some((dtype, bytes)) => {
                let rb = dtype
                    .bytes_for(self.matrix.cols)
                    .expect("whole blocks, checked at construction");
                let mut raw = vec![0u8; rb];
                bytes.read_into(r * rb, &mut raw);
                dequantize_into(*dtype, &raw, out).expect("row length checked at construction");
            }
            None => self.matrix.row_into(r, out),
        }
        match self.rounding {
            Rounding::None => {}
            Rounding::Bf16 => out
                .iter_mut()
                .for_each(|v| *v = bf16::from_f32(*v).to_f32()),
            Rounding::Q8_0 => {
                let rb = quantized::row_bytes(DType::Q8_0, out.len()).expect("whole Q8_0 blocks");
                let mut blocks = vec![0u8; rb];
                quantized::quantize_weights_q8_0(out, &mut blocks);
                dequantize_into(DType::Q8_0, &blocks, out).expect("whole Q8_0 blocks");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::quantized::reference_quantizer::{quantize, random_blocks};
    use crate::weights::MappedFile;
    use std::io::Write;

    fn data(n: usize, seed: u32) -> Vec<f32> {
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

    /// A tensor of `bytes` as a loader would hand it over: a range of a mapped file (at an odd offset, as
    /// GGUF blocks may be).
    fn mapped(
        dtype: DType,
        shape: [usize; 2],
        bytes: &[u8],
    ) -> (tempfile::NamedTempFile, RawTensor) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[7u8; 3]).unwrap();
        f.write_all(bytes).unwrap();
        f.flush().unwrap();
        let file = MappedFile::open(f.path()).unwrap();
        let t = RawTensor {
            dtype,
            shape: shape.to_vec(),
            bytes: Bytes::new(file, 3, bytes.len()).unwrap(),
        };
        (f, t)
    }

    fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        a.iter()
            .zip(b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs() / scale))
    }

    #[test]
    fn fast_form_keeps_blocks_mapped_and_agrees_with_exact() {
        for (dtype, rows, cols) in [
            (DType::Q8_0, 5, 64),
            (DType::Q5_0, 7, 96),
            (DType::Q4K, 3, 512),
            (DType::Q6K, 9, 256),
        ] {
            let q = quantize(dtype, &data(rows * cols, rows as u32));
            let (_f, t) = mapped(dtype, [rows, cols], &q);
            let exact = Matrix::from_raw("w", &t, rows, cols).unwrap();
            let fast = Matrix::from_raw_with("w", &t, rows, cols, WeightForm::Native).unwrap();
            assert_eq!(exact.form(), "f32 (owned)");
            // Q8_0 and Q5_0 are laid out again where the decode reads them interleaved; every other
            // type stays mapped.
            let interleaved = quantized::interleaves(dtype)
                && quantized::decode_layout(quantized::Backend::best()) == Layout::Interleaved8;
            if interleaved {
                let name = if dtype == DType::Q8_0 { "q8_0" } else { "q5_0" };
                assert_eq!(fast.form(), format!("{name} (interleaved)"));
                assert_eq!(
                    Some(fast.bytes()),
                    quantized::interleaved_bytes(dtype, rows, cols)
                );
            } else {
                assert!(fast.form().ends_with("(mapped)"), "{}", fast.form());
                assert_eq!(fast.bytes(), q.len());
            }
            assert_eq!(exact.bytes(), rows * cols * 4);

            for tokens in [1, 6] {
                let x = data(tokens * cols, 3);
                let mut e = vec![0f32; tokens * rows];
                let mut f = vec![0f32; tokens * rows];
                exact.matmul(&x, tokens, &mut e);
                fast.matmul(&x, tokens, &mut f);
                assert!(max_rel_diff(&f, &e) < 0.02, "{dtype:?} t={tokens}");

                let ids = [rows - 1, 0];
                let mut sel = vec![0f32; tokens * 2];
                exact.matmul_rows(&ids, &x, tokens, &mut sel);
                for ti in 0..tokens {
                    assert_eq!(sel[ti * 2], e[ti * rows + rows - 1]);
                    assert_eq!(sel[ti * 2 + 1], e[ti * rows]);
                }
                let mut sel = vec![0f32; tokens * 2];
                fast.matmul_rows(&ids, &x, tokens, &mut sel);
                for ti in 0..tokens {
                    assert_eq!(sel[ti * 2], f[ti * rows + rows - 1]);
                    assert_eq!(sel[ti * 2 + 1], f[ti * rows]);
                }
            }
            // Embedding rows come out exactly dequantized in both forms.
            let (mut a, mut b) = (vec![0f32; cols], vec![0f32; cols]);
            exact.row_into(rows - 1, &mut a);
            fast.row_into(rows - 1, &mut b);
            assert_eq!(a, b);
        }
    }

    /// The exact form's Q8_0 output matrix, kept as stored, multiplies to the same bits as the same
    /// rows dequantized at load, on every path: one token (its decode kernel, with an odd row count so
    /// a row goes alone), a few tokens (the same kernel in the tiles' order, four tokens and then one),
    /// many (the GEMM on bands of dequantized rows that do not divide the row count), selected rows,
    /// embedding lookups. Other forms and types build the output matrix as any other.
    #[test]
    fn exact_q8_0_output_gives_the_dequantized_bits() {
        for (rows, cols) in [(37, 64), (1201, 896), (5, 4864)] {
            let q = quantize(DType::Q8_0, &data(rows * cols, rows as u32));
            let (_f, t) = mapped(DType::Q8_0, [rows, cols], &q);
            let arena = Arena::new();
            let stored =
                Matrix::output_from_raw_in(&arena, "o", &t, rows, cols, WeightForm::Exact).unwrap();
            let widened = Matrix::from_raw("o", &t, rows, cols).unwrap();
            assert_eq!(stored.form(), "q8_0 (mapped, f32 math)");
            assert_eq!(widened.form(), "f32 (owned)");
            assert_eq!(stored.bytes(), q.len());
            for tokens in [1, 2, 5, 12, 40] {
                let x = data(tokens * cols, 9 + tokens as u32);
                let (mut got, mut want) = (vec![0f32; tokens * rows], vec![0f32; tokens * rows]);
                stored.matmul(&x, tokens, &mut got);
                widened.matmul(&x, tokens, &mut want);
                assert!(
                    got.iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{rows}x{cols}, {tokens} tokens"
                );
                let ids = [rows - 1, 0, rows / 2];
                let (mut a, mut b) = (vec![0f32; tokens * 3], vec![0f32; tokens * 3]);
                stored.matmul_rows(&ids, &x, tokens, &mut a);
                widened.matmul_rows(&ids, &x, tokens, &mut b);
                assert!(a.iter().zip(&b).all(|(a, b)| a.to_bits() == b.to_bits()));
            }
            let (mut a, mut b) = (vec![0f32; cols], vec![0f32; cols]);
            stored.row_into(rows - 1, &mut a);
            widened.row_into(rows - 1, &mut b);
            assert_eq!(a, b);
        }
        let (rows, cols) = (9, 64);
        let q = quantize(DType::Q8_0, &data(rows * cols, 2));
        let (_f, t) = mapped(DType::Q8_0, [rows, cols], &q);
        let arena = Arena::new();
        let native = Matrix::output_from_raw_in(&arena, "o", &t, rows, cols, WeightForm::Native);
        assert_ne!(native.unwrap().form(), "q8_0 (mapped, f32 math)");
        let q5 = quantize(DType::Q5_0, &data(rows * cols, 2));
        let (_f, t) = mapped(DType::Q5_0, [rows, cols], &q5);
        let exact = Matrix::output_from_raw_in(&arena, "o", &t, rows, cols, WeightForm::Exact);
        assert_eq!(exact.unwrap().form(), "f32 (owned)");
    }

    /// Converting forms a band of rows at a time gives every value the whole-tensor definition gives
    /// (widen exactly; then round to bf16, or quantize each 32-value block to Q8_0), and the source
    /// bytes read the same after their pages were released. A lookup table kept as stored gives each
    /// row those values too, as it is looked up.
    #[test]
    fn converted_forms_hold_the_definitions_values() {
        let (rows, cols) = (150, 256); // three bands of 64 rows, the last partial
        let values = data(rows * cols, 11);
        let sources: Vec<(DType, Vec<u8>)> = vec![
            (DType::Q8_0, quantize(DType::Q8_0, &values)),
            (DType::Q5_0, quantize(DType::Q5_0, &values)),
            (DType::Q4K, quantize(DType::Q4K, &values)),
            (DType::Q6K, quantize(DType::Q6K, &values)),
            (
                DType::F32,
                values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            (
                DType::F16,
                values
                    .iter()
                    .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                    .collect(),
            ),
            (
                DType::BF16,
                values
                    .iter()
                    .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
                    .collect(),
            ),
        ];
        for (dtype, bytes) in sources {
            let (_f, t) = mapped(dtype, [rows, cols], &bytes);
            let widened = quant::dequantize(dtype, &bytes, rows * cols).unwrap();
            let via_q8 =
                quant::dequantize(DType::Q8_0, &quantize(DType::Q8_0, &widened), rows * cols)
                    .unwrap();
            for (form, want) in [
                (WeightForm::Exact, widened.clone()),
                (
                    WeightForm::Bf16,
                    widened
                        .iter()
                        .map(|&v| bf16::from_f32(v).to_f32())
                        .collect(),
                ),
                (WeightForm::Q8_0, via_q8.clone()),
            ] {
                let m = Matrix::from_raw_with("w", &t, rows, cols, form).unwrap();
                // The Q8_0 form in the layout this CPU does not choose, too.
                let other = (form == WeightForm::Q8_0).then(|| {
                    let layout = match quantized::decode_layout(quantized::Backend::best()) {
                        Layout::Rows => Layout::Interleaved8,
                        Layout::Interleaved8 => Layout::Rows,
                    };
                    let arena = Arena::new();
                    Matrix::from_raw_laid_out(&arena, "w", &t, rows, cols, form, layout).unwrap()
                });
                let table =
                    LookupTable::from_raw_in(&Arena::new(), "w", &t, rows, cols, form).unwrap();
                if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
                    // Kept as stored: not a copy of the table in the form.
                    assert!(
                        table.matrix.form().ends_with("(mapped)"),
                        "{dtype:?} {form:?}"
                    );
                }
                let mut row = vec![0f32; cols];
                for r in 0..rows {
                    m.row_into(r, &mut row);
                    assert_eq!(
                        row,
                        want[r * cols..(r + 1) * cols],
                        "{dtype:?} {form:?} row {r}"
                    );
                    table.row_into(r, &mut row);
                    assert_eq!(
                        row,
                        want[r * cols..(r + 1) * cols],
                        "{dtype:?} {form:?} row {r}, looked up"
                    );
                    if let Some(other) = &other {
                        other.row_into(r, &mut row);
                        assert_eq!(
                            row,
                            want[r * cols..(r + 1) * cols],
                            "{dtype:?} {form:?} row {r}, {}",
                            other.form()
                        );
                    }
                }
                assert_eq!(t.bytes.as_slice(), &bytes[..], "{dtype:?} {form:?}");
            }
        }
    }

    #[test]
    fn fast_form_falls_back_when_rows_are_not_whole_blocks() {
        // 2 × 128 Q4_K values are one 256-value super-block spanning both rows.
        let q = random_blocks(DType::Q4K, 1, 5);
        let (_f, t) = mapped(DType::Q4K, [2, 128], &q);
        let m = Matrix::from_raw_with("w", &t, 2, 128, WeightForm::Native).unwrap();
        assert_eq!(m.form(), "f32 (owned)");
    }

    #[test]
    fn from_quantized_checks_its_shape() {
        let q = random_blocks(DType::Q8_0, 4, 1);
        assert!(Matrix::from_quantized(DType::Q8_0, 2, 64, q.clone()).is_ok());
        assert!(Matrix::from_quantized(DType::Q8_0, 4, 64, q.clone()).is_err());
        assert!(Matrix::from_quantized(DType::Q8_0, 8, 16, q).is_err());
    }
}
