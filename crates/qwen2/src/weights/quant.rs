//! ggml block quantization formats (Q8_0, Q5_0, Q4_K, Q6_K): layouts and exact dequantization.
//!
//! Each format stores a run of values as fixed-size blocks; a block carries one or more f16 scales and
//! packed integers. The layouts follow ggml's `ggml-common.h`; the arithmetic follows the reference
//! dequantizers (ggml-quants.c and the `gguf` Python package), operation for operation and without fused
//! multiply-adds, so results are bit-identical to theirs. `tests/data/quant_reference.bin` checks that.
//!
//! The per-block functions are public so that fused kernels (dot products straight from blocks) can reuse
//! the exact layouts documented here.

use super::DType;
use half::f16;

/// Values per block of Q8_0 and Q5_0.
pub const QK: usize = 32;
/// Values per super-block of the k-quants (Q4_K, Q6_K).
pub const QK_K: usize = 256;

/// Bytes per Q8_0 block: `d: f16`, then `qs: [i8; 32]`. Value `i` is `qs[i] * d`.
pub const Q8_0_BYTES: usize = 34;
/// Bytes per Q5_0 block: `d: f16`, `qh: u32` (bit `i` is the fifth bit of value `i`), `qs: [u8; 16]` (value `i`
/// in the low nibble of byte `i`, value `i + 16` in the high nibble). Value is `(q - 16) * d`.
pub const Q5_0_BYTES: usize = 22;
/// Bytes per Q4_K super-block: `d: f16`, `dmin: f16`, `scales: [u8; 12]` (eight 6-bit scales and eight 6-bit mins,
/// packed), `qs: [u8; 128]` (nibbles). Sub-block `j` (32 values) is `d * sc[j] * q - dmin * m[j]`.
pub const Q4_K_BYTES: usize = 144;
/// Bytes per Q6_K super-block: `ql: [u8; 128]` (low 4 bits), `qh: [u8; 64]` (high 2 bits), `scales: [i8; 16]`,
/// `d: f16`. Each group of 16 values is `d * scales[g] * (q - 32)`.
pub const Q6_K_BYTES: usize = 210;

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// One Q8_0 block → 32 values.
#[inline]
pub fn dequantize_block_q8_0(block: &[u8; Q8_0_BYTES], out: &mut [f32; QK]) {
    let d = f16_at(block, 0);
    for (o, &q) in out.iter_mut().zip(&block[2..]) {
        *o = (q as i8) as f32 * d;
    }
}

/// One Q5_0 block → 32 values.
#[inline]
pub fn dequantize_block_q5_0(block: &[u8; Q5_0_BYTES], out: &mut [f32; QK]) {
    let d = f16_at(block, 0);
    let qh = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
    let qs = &block[6..22];
    for j in 0..QK / 2 {
        let h0 = (((qh >> j) & 1) << 4) as u8;
        let h1 = (((qh >> (j + 16)) & 1) << 4) as u8;
        let x0 = ((qs[j] & 0x0F) | h0) as i32 - 16;
        let x1 = ((qs[j] >> 4) | h1) as i32 - 16;
        out[j] = x0 as f32 * d;
        out[j + QK / 2] = x1 as f32 * d;
    }
}

/// The 6-bit (scale, min) pair of sub-block `j` (0..8) from Q4_K's (and Q5_K's) 12 packed bytes.
///
/// Bytes 0..4 hold the low 6 bits of scales 0..4, bytes 4..8 the low 6 bits of mins 0..4; for `j >= 4`
/// the low 4 bits come from the nibbles of bytes 8..12 and the top 2 bits from the spare top bits of
/// bytes 0..8.
#[inline]
pub fn q4_k_scale_min(scales: &[u8; 12], j: usize) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        (
            (scales[j + 4] & 0x0F) | ((scales[j - 4] >> 6) << 4),
            (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
        )
    }
}

/// One Q4_K super-block → 256 values.
#[inline]
pub fn dequantize_block_q4_k(block: &[u8; Q4_K_BYTES], out: &mut [f32; QK_K]) {
    let d = f16_at(block, 0);
    let dmin = f16_at(block, 2);
    let mut scales = [0u8; 12];
    scales.copy_from_slice(&block[4..16]);
    let qs = &block[16..];
    // Four chunks of 64 values; each chunk is 32 bytes: low nibbles are sub-block 2c, high nibbles 2c + 1.
    for c in 0..4 {
        let (sc0, m0) = q4_k_scale_min(&scales, 2 * c);
        let (sc1, m1) = q4_k_scale_min(&scales, 2 * c + 1);
        let (d0, dm0) = (d * sc0 as f32, dmin * m0 as f32);
        let (d1, dm1) = (d * sc1 as f32, dmin * m1 as f32);
        let q = &qs[32 * c..32 * c + 32];
        let y = &mut out[64 * c..64 * c + 64];
        for l in 0..32 {
            y[l] = d0 * (q[l] & 0x0F) as f32 - dm0;
            y[l + 32] = d1 * (q[l] >> 4) as f32 - dm1;
        }
    }
}

/// One Q6_K super-block → 256 values.
#[inline]
pub fn dequantize_block_q6_k(block: &[u8; Q6_K_BYTES], out: &mut [f32; QK_K]) {
    let d = f16_at(block, 208);
    // Two halves of 128 values; each uses 64 bytes of `ql`, 32 of `qh` and 8 scales.
    for half in 0..2 {
        let ql = &block[64 * half..64 * half + 64];
        let qh = &block[128 + 32 * half..128 + 32 * half + 32];
        let sc = &block[192 + 8 * half..192 + 8 * half + 8];
        let y = &mut out[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = (d * (sc[is] as i8) as f32) * q1 as f32;
            y[l + 32] = (d * (sc[is + 2] as i8) as f32) * q2 as f32;
            y[l + 64] = (d * (sc[is + 4] as i8) as f32) * q3 as f32;
            y[l + 96] = (d * (sc[is + 6] as i8) as f32) * q4 as f32;
        }
    }
}

/// Applies a block function over whole blocks; `bytes` and `out` must already agree in length.
fn blocks<const B: usize, const N: usize>(
    bytes: &[u8],
    out: &mut [f32],
    f: fn(&[u8; B], &mut [f32; N]),
) {
    for (b, o) in bytes.chunks_exact(B).zip(out.chunks_exact_mut(N)) {
        if let (Ok(b), Ok(o)) = (<&[u8; B]>::try_from(b), <&mut [f32; N]>::try_from(o)) {
            f(b, o);
        }
    }
}

/// `Ok` when `len` bytes hold exactly `n` values of `dtype`.
fn check_len(dtype: DType, len: usize, n: usize) -> Result<(), String> {
    let (elems, _) = dtype.block();
    if !n.is_multiple_of(elems) {
        return Err(format!(
            "{n} values are not a whole number of {} blocks of {elems}",
            dtype.name()
        ));
    }
    if dtype.bytes_for(n) != Some(len) {
        return Err(format!(
            "{len} bytes do not hold {n} {} values",
            dtype.name()
        ));
    }
    Ok(())
}

/// Widens `out.len()` values of type `dtype` from `bytes` into `out`. Works for every [`DType`], including
/// the plain float types, so callers can convert any tensor a row range at a time.
pub fn dequantize_into(dtype: DType, bytes: &[u8], out: &mut [f32]) -> Result<(), String> {
    check_len(dtype, bytes.len(), out.len())?;
    match dtype {
        DType::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        DType::F16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        DType::BF16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        DType::Q8_0 => blocks::<Q8_0_BYTES, QK>(bytes, out, dequantize_block_q8_0),
        DType::Q5_0 => blocks::<Q5_0_BYTES, QK>(bytes, out, dequantize_block_q5_0),
        DType::Q4K => blocks::<Q4_K_BYTES, QK_K>(bytes, out, dequantize_block_q4_k),
        DType::Q6K => blocks::<Q6_K_BYTES, QK_K>(bytes, out, dequantize_block_q6_k),
    }
    Ok(())
}

/// Dequantizes `n` values of type `dtype` from `bytes` (which must hold exactly `n` values).
pub fn dequantize(dtype: DType, bytes: &[u8], n: usize) -> Result<Vec<f32>, String> {
    // Checked before allocating: `n` must match the byte count, which is bounded by real memory.
    check_len(dtype, bytes.len(), n)?;
    let mut out = vec![0f32; n];
    dequantize_into(dtype, bytes, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_sizes_match_dtype_table() {
        assert_eq!(DType::Q8_0.block(), (QK, Q8_0_BYTES));
        assert_eq!(DType::Q5_0.block(), (QK, Q5_0_BYTES));
        assert_eq!(DType::Q4K.block(), (QK_K, Q4_K_BYTES));
        assert_eq!(DType::Q6K.block(), (QK_K, Q6_K_BYTES));
    }

    #[test]
    fn q8_0_simple() {
        let mut b = [0u8; 34];
        b[..2].copy_from_slice(&f16::from_f32(0.5).to_bits().to_le_bytes());
        for i in 0..32 {
            b[2 + i] = (i as i8 - 16) as u8;
        }
        let v = dequantize(DType::Q8_0, &b, 32).unwrap();
        for (i, x) in v.iter().enumerate() {
            assert_eq!(*x, (i as f32 - 16.0) * 0.5);
        }
    }

    #[test]
    fn q5_0_high_bits() {
        let mut b = [0u8; 22];
        b[..2].copy_from_slice(&f16::from_f32(1.0).to_bits().to_le_bytes());
        // value 0: low nibble 15, high bit set → 31 - 16 = 15; value 16: nibble 0, high bit clear → -16.
        b[2..6].copy_from_slice(&1u32.to_le_bytes());
        b[6] = 0x0F;
        let v = dequantize(DType::Q5_0, &b, 32).unwrap();
        assert_eq!(v[0], 15.0);
        assert_eq!(v[16], -16.0);
        assert_eq!(v[1], -16.0);
    }

    #[test]
    fn q4_k_scale_unpacking() {
        // Scales 0..8 = 1..=8 plus 48 on the upper four, mins = 2 * that; pack as ggml does.
        let sc: Vec<u8> = (0..8u8)
            .map(|j| if j < 4 { j + 1 } else { j + 1 + 48 })
            .collect();
        let mn: Vec<u8> = (0..8u8)
            .map(|j| if j < 4 { 2 * j } else { 2 * j + 32 })
            .collect();
        let mut p = [0u8; 12];
        for j in 0..4 {
            p[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
            p[j + 4] = mn[j] | ((mn[j + 4] >> 4) << 6);
            p[j + 8] = (sc[j + 4] & 0x0F) | ((mn[j + 4] & 0x0F) << 4);
        }
        for j in 0..8 {
            assert_eq!(q4_k_scale_min(&p, j), (sc[j], mn[j]), "sub-block {j}");
        }
    }

    #[test]
    fn length_mismatch_is_an_error() {
        assert!(dequantize(DType::Q8_0, &[0u8; 33], 32).is_err());
        assert!(dequantize(DType::Q4K, &[0u8; 144], 255).is_err());
        assert!(dequantize(DType::Q6K, &[0u8; 210], usize::MAX).is_err());
    }
}
