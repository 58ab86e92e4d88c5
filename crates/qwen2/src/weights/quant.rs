//! ggml block quantization formats (Q8_0, Q5_0, Q4_K, Q6_K): layouts and exact dequantization.
//! (stub — being written)

use super::DType;

/// Dequantizes `n` values of type `dtype` from `bytes` (which must hold exactly `n` values).
pub fn dequantize(dtype: DType, bytes: &[u8], n: usize) -> Result<Vec<f32>, String> {
    let _ = (bytes, n);
    Err(format!("{} dequantization not implemented yet", dtype.name()))
}
