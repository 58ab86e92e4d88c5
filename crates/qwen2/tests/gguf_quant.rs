//! Dequantization must equal the `gguf` Python package's bit for bit. The reference blocks and values
//! live in tests/data/quant_reference.bin (made by tests/data/make_quant_reference.py from real blocks of the
//! default model plus random blocks).

use qwen2::weights::quant;
use qwen2::weights::DType;

fn dtype_of(ggml_type: u32) -> DType {
    match ggml_type {
        8 => DType::Q8_0,
        6 => DType::Q5_0,
        12 => DType::Q4K,
        14 => DType::Q6K,
        t => panic!("unexpected ggml type {t} in the reference file"),
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

#[test]
fn dequantization_matches_gguf_python_bit_for_bit() {
    let data = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/quant_reference.bin"
    ))
    .unwrap();
    let mut at = 0;
    let mut seen = std::collections::BTreeMap::new();
    while at < data.len() {
        let dtype = dtype_of(u32_at(&data, at));
        let n_blocks = u32_at(&data, at + 4) as usize;
        at += 8;
        let (elems, bytes) = dtype.block();
        let raw = &data[at..at + n_blocks * bytes];
        at += n_blocks * bytes;
        let expected: Vec<f32> = data[at..at + n_blocks * elems * 4]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        at += n_blocks * elems * 4;

        let got = quant::dequantize(dtype, raw, n_blocks * elems).unwrap();
        for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
            assert_eq!(
                g.to_bits(),
                e.to_bits(),
                "{} value {i}: got {g:e}, expected {e:e}",
                dtype.name()
            );
        }
        // The per-block entry points agree with the whole-tensor one.
        let mut one = vec![0f32; elems];
        quant::dequantize_into(dtype, &raw[..bytes], &mut one).unwrap();
        assert_eq!(&one[..], &got[..elems]);
        *seen.entry(dtype.name()).or_insert(0) += n_blocks;
    }
    assert_eq!(seen.len(), 4, "reference covers {seen:?}");
}

#[test]
fn per_block_functions_match_the_slice_function() {
    let mut b = [0u8; quant::Q6_K_BYTES];
    for (i, x) in b.iter_mut().enumerate() {
        *x = (i * 37 % 251) as u8;
    }
    b[208..210].copy_from_slice(&half::f16::from_f32(0.01).to_bits().to_le_bytes());
    let mut out = [0f32; quant::QK_K];
    quant::dequantize_block_q6_k(&b, &mut out);
    assert_eq!(
        quant::dequantize(DType::Q6K, &b, 256).unwrap(),
        out.to_vec()
    );

    let mut b = [0u8; quant::Q4_K_BYTES];
    for (i, x) in b.iter_mut().enumerate() {
        *x = (i * 53 % 241) as u8;
    }
    b[0..2].copy_from_slice(&half::f16::from_f32(0.02).to_bits().to_le_bytes());
    b[2..4].copy_from_slice(&half::f16::from_f32(-0.01).to_bits().to_le_bytes());
    quant::dequantize_block_q4_k(&b, &mut out);
    assert_eq!(
        quant::dequantize(DType::Q4K, &b, 256).unwrap(),
        out.to_vec()
    );
}
