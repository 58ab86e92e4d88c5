//! `Matrix`: a weight matrix in the form the kernels read it — mapped F32/BF16/F16 bytes straight from the
//! checkpoint (no copy), or owned F32 values (dequantized GGUF blocks, or a mapping that was misaligned).

use crate::error::{Error, Result};
use crate::kernels::{matmul, WeightSlice};
use crate::weights::{to_f32_vec, Bytes, DType, RawTensor};
use half::{bf16, f16};

enum Storage {
    Owned(Vec<f32>),
    MappedF32(Bytes),
    MappedBF16(Bytes),
    MappedF16(Bytes),
}

pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    storage: Storage,
}

/// Views mapped bytes as `T` if they are aligned for it.
fn cast<T: Copy>(bytes: &[u8]) -> Option<&[T]> {
    // SAFETY: T is only ever f32, bf16 or f16: plain-old-data for which every bit pattern is a valid value.
    // align_to never produces a misaligned middle; we accept it only when it covers every byte.
    let (pre, mid, post) = unsafe { bytes.align_to::<T>() };
    (pre.is_empty() && post.is_empty()).then_some(mid)
}

impl Matrix {
    /// Takes a checkpoint tensor as a `rows × cols` matrix. F32/BF16/F16 stay in the mapping; block-quantized
    /// types are dequantized to exact f32 values.
    pub fn from_raw(name: &str, t: &RawTensor, rows: usize, cols: usize) -> Result<Self> {
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
        let storage = match t.dtype {
            DType::F32 if cast::<f32>(b).is_some() => Storage::MappedF32(t.bytes.clone()),
            DType::BF16 if cast::<bf16>(b).is_some() => Storage::MappedBF16(t.bytes.clone()),
            DType::F16 if cast::<f16>(b).is_some() => Storage::MappedF16(t.bytes.clone()),
            _ => Storage::Owned(to_f32_vec(name, t)?),
        };
        Ok(Matrix {
            rows,
            cols,
            storage,
        })
    }

    pub fn from_f32(rows: usize, cols: usize, values: Vec<f32>) -> Self {
        assert_eq!(values.len(), rows * cols);
        Matrix {
            rows,
            cols,
            storage: Storage::Owned(values),
        }
    }

    pub fn weights(&self) -> WeightSlice<'_> {
        // The casts were checked at construction; a failure here would be a bug, not bad input.
        let bad = "alignment checked at construction";
        match &self.storage {
            Storage::Owned(v) => WeightSlice::F32(v),
            Storage::MappedF32(b) => WeightSlice::F32(cast(b.as_slice()).expect(bad)),
            Storage::MappedBF16(b) => WeightSlice::BF16(cast(b.as_slice()).expect(bad)),
            Storage::MappedF16(b) => WeightSlice::F16(cast(b.as_slice()).expect(bad)),
        }
    }

    /// The form the weights are held in, for reports.
    pub fn form(&self) -> &'static str {
        match &self.storage {
            Storage::Owned(_) => "f32 (owned)",
            Storage::MappedF32(_) => "f32 (mapped)",
            Storage::MappedBF16(_) => "bf16 (mapped)",
            Storage::MappedF16(_) => "f16 (mapped)",
        }
    }

    /// Bytes the matrix occupies (what one pass over it reads).
    pub fn bytes(&self) -> usize {
        match &self.storage {
            Storage::Owned(v) => v.len() * 4,
            Storage::MappedF32(b) | Storage::MappedBF16(b) | Storage::MappedF16(b) => b.len(),
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
        }
    }

    /// `out (t × rows) = x (t × cols) · selfᵀ`.
    pub fn matmul(&self, x: &[f32], t: usize, out: &mut [f32]) {
        matmul(self.weights(), self.rows, self.cols, x, t, out);
    }

    /// Only the listed rows: `out[t][i] = row(ids[i]) · x[t]` (label scoring needs a handful of vocab rows).
    pub fn matmul_rows(&self, ids: &[usize], x: &[f32], t: usize, out: &mut [f32]) {
        use crate::kernels::matmul::dot;
        let c = self.cols;
        for ti in 0..t {
            let xr = &x[ti * c..(ti + 1) * c];
            for (i, &r) in ids.iter().enumerate() {
                out[ti * ids.len() + i] = match self.weights() {
                    WeightSlice::F32(w) => dot(&w[r * c..(r + 1) * c], xr),
                    WeightSlice::BF16(w) => dot(&w[r * c..(r + 1) * c], xr),
                    WeightSlice::F16(w) => dot(&w[r * c..(r + 1) * c], xr),
                };
            }
        }
    }
}
