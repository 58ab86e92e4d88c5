//! The GGUF reader against lying files: every count, length, offset and dimension is checked before it is used,
//! so each corruption below must come back as an error — no panic, no huge allocation. Also the positive
//! case: a tiny valid qwen2 file loads with the expected config and tensor shapes.

mod gguf_common;

use gguf_common::*;
use qwen2::weights::gguf::{self, MetaValue};
use qwen2::Error;
use std::path::Path;
use std::str::FromStr;

fn small() -> Gguf {
    Gguf::new(
        vec![
            ("general.architecture".into(), V::str("qwen2")),
            ("a.u8".into(), V::U8(7)),
            ("a.u32".into(), V::U32(70000)),
            ("a.i32".into(), V::I32(-5)),
            ("a.f32".into(), V::F32(0.5)),
            ("a.u64".into(), V::U64(1 << 40)),
            ("a.bool".into(), V::Bool(true)),
            ("a.strs".into(), V::strs(&["x", "yz", ""])),
            (
                "a.nested".into(),
                V::Arr(
                    T_ARR,
                    vec![
                        V::Arr(T_U32, vec![V::U32(1), V::U32(2)]),
                        V::Arr(T_U32, vec![]),
                    ],
                ),
            ),
        ],
        vec![
            Tensor::f32("first", &[4, 2], &[1., 2., 3., 4., 5., 6., 7., 8.]),
            Tensor::f32("second", &[3], &[9., 10., 11.]),
        ],
    )
}

fn read_err(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let p = write_bytes(dir, name, bytes);
    match gguf::read(&p) {
        Ok(f) => panic!("{name}: expected an error, parsed {f:?}"),
        Err(e) => e.to_string(),
    }
}

fn err_of(dir: &Path, name: &str, g: &Gguf) -> String {
    read_err(dir, name, &g.bytes())
}

fn patch_u64(bytes: &mut [u8], at: usize, v: u64) {
    bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Byte position of the first occurrence of `needle`.
fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len())
        .position(|w| w == needle)
        .expect("needle present")
}

#[test]
fn small_file_parses() {
    let dir = tempfile::tempdir().unwrap();
    let p = small().write(dir.path(), "ok.gguf");
    let f = gguf::read(&p).unwrap();
    assert_eq!(f.version, 3);
    assert_eq!(f.get("a.u8"), Some(&MetaValue::U8(7)));
    assert_eq!(f.get("a.i32"), Some(&MetaValue::I32(-5)));
    assert_eq!(f.get("a.u64").and_then(MetaValue::as_u64), Some(1 << 40));
    assert_eq!(f.get("a.bool"), Some(&MetaValue::Bool(true)));
    assert_eq!(f.string_array("a.strs").unwrap().unwrap(), ["x", "yz", ""]);
    let nested = f.get("a.nested").and_then(MetaValue::as_array).unwrap();
    assert_eq!(
        nested[0],
        MetaValue::Array(vec![MetaValue::U32(1), MetaValue::U32(2)])
    );
    assert_eq!(f.tensors.len(), 2);
    assert_eq!(f.tensors[0].dims, [4, 2]);
    assert_eq!(f.tensors[0].hf_shape(), [2, 4]);
    assert_eq!(f.tensors[1].offset, 32);
    let b = f.tensor_bytes(&f.tensors[1]).unwrap();
    assert_eq!(
        b.as_slice(),
        [9f32, 10., 11.]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<_>>()
    );

    // Version 2 has the same little-endian layout.
    let mut v2 = small();
    v2.version = 2;
    assert_eq!(
        gguf::read(&v2.write(dir.path(), "v2.gguf"))
            .unwrap()
            .version,
        2
    );
}

#[test]
fn truncated_at_every_byte() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = small().bytes();
    // The last tensor ends exactly at the end of the file, so every shorter prefix is missing something.
    let p = dir.path().join("cut.gguf");
    for cut in 0..bytes.len() {
        std::fs::write(&p, &bytes[..cut]).unwrap();
        assert!(
            gguf::read(&p).is_err(),
            "a file cut to {cut} of {} bytes parsed",
            bytes.len()
        );
    }
    std::fs::write(&p, &bytes).unwrap();
    gguf::read(&p).unwrap();
}

#[test]
fn truncated_real_sized_model_header() {
    // The tiny qwen2 file has a 262-token vocabulary: cut inside its metadata and tensor infos too.
    let dir = tempfile::tempdir().unwrap();
    let (bytes, layout) = tiny_qwen2(&TinyOptions {
        untied: false,
        quantized: true,
    })
    .bytes_and_layout();
    let p = dir.path().join("cut.gguf");
    for cut in (0..layout.data_start + 64).step_by(7) {
        std::fs::write(&p, &bytes[..cut]).unwrap();
        assert!(gguf::load(&p).is_err(), "cut at {cut}");
    }
}

#[test]
fn bad_magic_and_versions() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = small().bytes();
    b[0] = b'X';
    assert!(read_err(dir.path(), "magic", &b).contains("not a GGUF file"));
    for (v, msg) in [
        (1u32, "version 1"),
        (4, "version 4"),
        (0x0300_0000, "big-endian"),
    ] {
        let mut b = small().bytes();
        b[4..8].copy_from_slice(&v.to_le_bytes());
        let e = read_err(dir.path(), "version", &b);
        assert!(e.contains(msg), "{e}");
    }
}

#[test]
fn absurd_counts() {
    let dir = tempfile::tempdir().unwrap();
    for n in [1u64 << 60, u64::MAX, 1 << 40, 1000] {
        let mut b = small().bytes();
        patch_u64(&mut b, 8, n);
        let e = read_err(dir.path(), "tensors", &b);
        assert!(
            e.contains("tensor count") || e.contains("truncated"),
            "{n}: {e}"
        );
        let mut b = small().bytes();
        patch_u64(&mut b, 16, n);
        let e = read_err(dir.path(), "kvs", &b);
        assert!(
            e.contains("metadata count") || e.contains("truncated"),
            "{n}: {e}"
        );
    }
}

#[test]
fn absurd_string_lengths() {
    let dir = tempfile::tempdir().unwrap();
    for len in [u64::MAX, 1 << 40, u64::MAX - 7, (1 << 24) + 1, 10_000] {
        // The first key's length.
        let mut b = small().bytes();
        patch_u64(&mut b, 24, len);
        let e = read_err(dir.path(), "key", &b);
        assert!(e.contains("length") || e.contains("truncated"), "{e}");
        // A string value's length ("qwen2" follows its 8-byte length).
        let mut b = small().bytes();
        let at = find(&b, b"qwen2") - 8;
        patch_u64(&mut b, at, len);
        let e = read_err(dir.path(), "value", &b);
        assert!(e.contains("general.architecture"), "{e}");
        // A tensor name's length.
        let mut b = small().bytes();
        let at = find(&b, b"first") - 8;
        patch_u64(&mut b, at, len);
        let e = read_err(dir.path(), "tensor name", &b);
        assert!(e.contains("tensor #0"), "{e}");
    }
}

#[test]
fn absurd_array_lengths() {
    let dir = tempfile::tempdir().unwrap();
    for len in [u64::MAX, 1 << 60, 1 << 40, (1 << 24) + 1, 1 << 20] {
        let mut b = small().bytes();
        // "a.strs": key, then value type 9, element type 8, then the length.
        let at = find(&b, b"a.strs") + 6 + 4 + 4;
        assert_eq!(u64::from_le_bytes(b[at..at + 8].try_into().unwrap()), 3);
        patch_u64(&mut b, at, len);
        let e = read_err(dir.path(), "array", &b);
        assert!(e.contains("a.strs"), "{len}: {e}");
    }
}

#[test]
fn nested_arrays_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let mut v = V::Arr(T_U8, vec![V::U8(1)]);
    for _ in 0..10 {
        v = V::Arr(T_ARR, vec![v]);
    }
    let g = Gguf::new(vec![("deep".into(), v)], vec![]);
    let e = err_of(dir.path(), "deep", &g);
    assert!(e.contains("nested"), "{e}");
    // 4 levels are fine.
    let mut v = V::Arr(T_U8, vec![V::U8(1)]);
    for _ in 0..3 {
        v = V::Arr(T_ARR, vec![v]);
    }
    let g = Gguf::new(vec![("ok".into(), v)], vec![]);
    gguf::read(&g.write(dir.path(), "ok.gguf")).unwrap();
}

#[test]
fn bad_value_types_and_keys() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = small().bytes();
    let at = find(&b, b"a.u8") + 4;
    b[at..at + 4].copy_from_slice(&13u32.to_le_bytes());
    assert!(read_err(dir.path(), "vtype", &b).contains("unknown value type 13"));

    let mut b = small().bytes();
    let at = find(&b, b"a.strs") + 6 + 4;
    b[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
    assert!(read_err(dir.path(), "etype", &b).contains("element type 99"));

    let mut b = small().bytes();
    let at = find(&b, b"a.bool") + 6 + 4;
    b[at] = 2;
    assert!(read_err(dir.path(), "bool", &b).contains("bool"));

    let mut g = small();
    g.kvs.push(("a.u8".into(), V::U8(1)));
    assert!(err_of(dir.path(), "dupkey", &g).contains("twice"));

    let mut b = small().bytes();
    let at = find(&b, b"a.u8");
    b[at] = 0xFF;
    assert!(read_err(dir.path(), "utf8", &b).contains("UTF-8"));

    // An array's strings are left in the file until asked for, but checked when it is read.
    let mut b = small().bytes();
    let at = find(&b, b"yz");
    b[at + 1] = 0xC3;
    let e = read_err(dir.path(), "utf8-elem", &b);
    assert!(e.contains("`a.strs`[1]") && e.contains("UTF-8"), "{e}");
    let f = gguf::read(&small().write(dir.path(), "ok.gguf")).unwrap();
    let e = f.string_array("a.nested").unwrap_err().to_string();
    assert!(e.contains("expected an array of strings"), "{e}");
}

#[test]
fn bad_tensor_infos() {
    let dir = tempfile::tempdir().unwrap();
    let with = |f: &dyn Fn(&mut Tensor)| {
        let mut g = small();
        f(&mut g.tensors[0]);
        g
    };
    let e = err_of(dir.path(), "type", &with(&|t| t.ggml_type = 99));
    assert!(
        e.contains("unknown ggml type 99") && e.contains("first"),
        "{e}"
    );

    let e = err_of(
        dir.path(),
        "ndims5",
        &with(&|t| t.dims = vec![1, 1, 1, 1, 8]),
    );
    assert!(e.contains("5 dimensions"), "{e}");
    // n_dims says 5 while 2 dims follow: rejected before reading any dim.
    let e = err_of(dir.path(), "ndims5b", &with(&|t| t.n_dims = Some(5)));
    assert!(e.contains("5 dimensions"), "{e}");
    let e = err_of(
        dir.path(),
        "ndims_huge",
        &with(&|t| t.n_dims = Some(u32::MAX)),
    );
    assert!(e.contains("dimensions"), "{e}");
    let e = err_of(dir.path(), "ndims0", &with(&|t| t.n_dims = Some(0)));
    assert!(e.contains("0 dimensions"), "{e}");

    for dims in [
        vec![1u64 << 32, 1 << 32, 2],
        vec![u64::MAX],
        vec![1 << 62, 4],
        vec![4, 1 << 62],
    ] {
        let e = err_of(dir.path(), "overflow", &with(&|t| t.dims = dims.clone()));
        assert!(e.contains("overflow"), "{dims:?}: {e}");
    }
    // Fits in u64 elements but not in bytes (F32 is 4 bytes each), or just far larger than the file.
    for dims in [vec![1u64 << 61], vec![1 << 40, 1 << 20], vec![1 << 30, 4]] {
        let e = err_of(dir.path(), "toolarge", &with(&|t| t.dims = dims.clone()));
        assert!(
            e.contains("overflow") || e.contains("past the end"),
            "{dims:?}: {e}"
        );
    }
    let e = err_of(dir.path(), "zero", &with(&|t| t.dims = vec![4, 0]));
    assert!(e.contains("zero dimension"), "{e}");

    let e = err_of(dir.path(), "misaligned", &with(&|t| t.offset = Some(4)));
    assert!(e.contains("alignment"), "{e}");

    let mut g = small();
    g.tensors[1].name = "first".into();
    assert!(err_of(dir.path(), "dupname", &g).contains("twice"));

    // Q8_0 rows must be whole blocks.
    let e = err_of(
        dir.path(),
        "block",
        &with(&|t| {
            t.ggml_type = Q8_0;
            t.dims = vec![16];
            t.data = vec![0; 17];
        }),
    );
    assert!(e.contains("block size"), "{e}");
}

#[test]
fn tensor_offsets_past_the_end_or_overlapping() {
    let dir = tempfile::tempdir().unwrap();
    for off in [u64::MAX - 31, 1 << 62, 1 << 40, 1 << 33] {
        let mut g = small();
        g.tensors[1].offset = Some(off);
        let e = err_of(dir.path(), "offset", &g);
        assert!(e.contains("past the end"), "{off}: {e}");
    }
    // In range of the offsets the file could hold, but the bytes stop short of the tensor's end.
    let mut g = small();
    g.tensors[1].offset = Some(64);
    let (b, layout) = g.bytes_and_layout();
    assert_eq!(b.len(), layout.data_start + 64 + 12);
    let e = read_err(dir.path(), "short", &b[..b.len() - 1]);
    assert!(e.contains("past the end"), "{e}");
    gguf::read(&write_bytes(dir.path(), "gap", &b)).unwrap();
    // Data offset 0 for both: the second overlaps the first.
    let mut g = small();
    g.tensors[1].offset = Some(0);
    let mut b = g.bytes();
    b.resize(b.len() + 64, 0);
    let e = read_err(dir.path(), "overlap", &b);
    assert!(e.contains("overlap"), "{e}");
}

#[test]
fn bad_alignment() {
    let dir = tempfile::tempdir().unwrap();
    for v in [V::U32(0), V::U32(3), V::U32(48), V::U64(32), V::str("32")] {
        let mut g = small();
        g.kvs.push(("general.alignment".into(), v.clone()));
        let e = err_of(dir.path(), "align", &g);
        assert!(e.contains("general.alignment"), "{v:?}: {e}");
    }
    let mut g = small();
    g.kvs.push(("general.alignment".into(), V::U32(64)));
    g.alignment = 64;
    assert_eq!(
        gguf::read(&g.write(dir.path(), "a64.gguf"))
            .unwrap()
            .alignment,
        64
    );
}

#[test]
fn random_corruption_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let good = tiny_qwen2(&TinyOptions {
        untied: true,
        quantized: true,
    });
    let (bytes, layout) = good.bytes_and_layout();
    let p = dir.path().join("fuzz.gguf");
    let mut rng = Lcg(12345);
    for i in 0..600usize {
        let mut b = bytes.clone();
        for _ in 0..1 + i % 4 {
            // Mostly inside the header and tensor infos, where the numbers are.
            let span = if i.is_multiple_of(3) {
                b.len()
            } else {
                layout.data_start
            };
            let at = rng.next_u32() as usize % span;
            b[at] = match rng.next_u32() % 4 {
                0 => 0xFF,
                1 => 0,
                _ => rng.next_u32() as u8,
            };
        }
        std::fs::write(&p, &b).unwrap();
        // Either outcome is fine; the point is that it returns.
        let _ = gguf::load(&p);
    }
}

fn tiny_path(dir: &Path, opts: &TinyOptions) -> std::path::PathBuf {
    tiny_qwen2(opts).write(dir, "tiny.gguf")
}

#[test]
fn tiny_qwen2_loads() {
    let dir = tempfile::tempdir().unwrap();
    for untied in [false, true] {
        let m = gguf::load(&tiny_path(
            dir.path(),
            &TinyOptions {
                untied,
                quantized: false,
            },
        ))
        .unwrap();
        let c = &m.config;
        assert_eq!(c.vocab_size, VOCAB as usize);
        assert_eq!(c.hidden_size, HIDDEN as usize);
        assert_eq!(c.intermediate_size, FFN as usize);
        assert_eq!(c.num_hidden_layers, LAYERS as usize);
        assert_eq!(c.num_attention_heads, HEADS as usize);
        assert_eq!(c.num_key_value_heads, KV_HEADS as usize);
        assert_eq!(c.head_dim, HEAD_DIM as usize);
        assert_eq!(c.max_position_embeddings, 128);
        assert_eq!(c.rope_theta, 1e6);
        assert_eq!(c.rms_norm_eps, 1e-6);
        assert_eq!(c.tie_word_embeddings, !untied);
        assert_eq!(c.eos_token_ids, [ID_IM_END, ID_ENDOFTEXT]);
        assert_eq!(c.bos_token_id, Some(ID_ENDOFTEXT));
        assert_eq!(
            m.chat_template.as_deref(),
            Some("{% for m in messages %}{{ m.content }}{% endfor %}")
        );

        let s = &m.store;
        assert_eq!(
            s.tensors.len(),
            3 + untied as usize + 12 * LAYERS as usize - 1
        );
        let (h, kv, f, v) = (
            HIDDEN as usize,
            (KV_HEADS * HEAD_DIM) as usize,
            FFN as usize,
            VOCAB as usize,
        );
        s.get_shaped("model.embed_tokens.weight", &[v, h]).unwrap();
        s.get_shaped("model.norm.weight", &[h]).unwrap();
        assert_eq!(s.contains("lm_head.weight"), untied);
        for l in 0..LAYERS {
            let n = |x: &str| format!("model.layers.{l}.{x}");
            s.get_shaped(&n("input_layernorm.weight"), &[h]).unwrap();
            s.get_shaped(&n("post_attention_layernorm.weight"), &[h])
                .unwrap();
            s.get_shaped(&n("self_attn.q_proj.weight"), &[h, h])
                .unwrap();
            s.get_shaped(&n("self_attn.q_proj.bias"), &[h]).unwrap();
            s.get_shaped(&n("self_attn.k_proj.weight"), &[kv, h])
                .unwrap();
            s.get_shaped(&n("self_attn.k_proj.bias"), &[kv]).unwrap();
            s.get_shaped(&n("self_attn.v_proj.weight"), &[kv, h])
                .unwrap();
            s.get_shaped(&n("self_attn.v_proj.bias"), &[kv]).unwrap();
            s.get_shaped(&n("self_attn.o_proj.weight"), &[h, h])
                .unwrap();
            s.get_shaped(&n("mlp.gate_proj.weight"), &[f, h]).unwrap();
            s.get_shaped(&n("mlp.up_proj.weight"), &[f, h]).unwrap();
            s.get_shaped(&n("mlp.down_proj.weight"), &[h, f]).unwrap();
        }
        // Values come through unchanged, row-major: HF [rows, cols] = ggml [cols, rows] in the same bytes.
        let g = tiny_qwen2(&TinyOptions {
            untied,
            quantized: false,
        });
        let src = g
            .tensors
            .iter()
            .find(|t| t.name == "blk.1.ffn_down.weight")
            .unwrap();
        let t = s.get("model.layers.1.mlp.down_proj.weight").unwrap();
        assert_eq!(t.bytes.as_slice(), &src.data[..]);
    }
}

#[test]
fn tiny_qwen2_tokenizer_works() {
    let dir = tempfile::tempdir().unwrap();
    let m = gguf::load(&tiny_path(
        dir.path(),
        &TinyOptions {
            untied: false,
            quantized: true,
        },
    ))
    .unwrap();
    let tok = tokenizers::Tokenizer::from_str(&m.tokenizer.to_json().to_string()).unwrap();
    let enc = tok.encode("<|im_start|>hi t<tool_call>", false).unwrap();
    // "hi" merges; " t" becomes "Ġt"; special and user-defined tokens stay whole.
    assert_eq!(enc.get_ids(), [ID_IM_START, 257, 256, ID_TOOL_CALL]);
    assert_eq!(tok.decode(&[257, 256], false).unwrap(), "hi t");
    let json = m.tokenizer.to_json();
    let added = json["added_tokens"].as_array().unwrap();
    assert_eq!(added.len(), 4);
    assert_eq!(added[3]["content"], "<tool_call>");
    assert_eq!(added[3]["special"], false);
    assert_eq!(added[0]["special"], true);
    assert_eq!(json["normalizer"]["type"], "NFC");
    // The loader's builder (no JSON) agrees with the JSON it stands for.
    let direct = qwen2::Tokenizer::from_bpe(m.tokenizer.clone(), None).unwrap();
    assert_eq!(
        direct.encode("<|im_start|>hi t<tool_call>").unwrap(),
        [ID_IM_START, 257, 256, ID_TOOL_CALL]
    );
    assert_eq!(direct.decode(&[257, 256], false).unwrap(), "hi t");
    assert_eq!(direct.decode(&[ID_IM_START, 257], true).unwrap(), "hi");
    assert_eq!(direct.decode(&[ID_TOOL_CALL], true).unwrap(), "<tool_call>");
}

#[test]
fn load_refuses_what_it_cannot_run() {
    let dir = tempfile::tempdir().unwrap();
    let base = || {
        tiny_qwen2(&TinyOptions {
            untied: false,
            quantized: false,
        })
    };

    let mut g = base();
    g.kvs[0].1 = V::str("llama");
    let e = gguf::load(&g.write(dir.path(), "arch.gguf")).unwrap_err();
    assert!(matches!(e, Error::Architecture { .. }), "{e}");

    let mut g = base();
    g.tensors
        .push(Tensor::f32("rope_freqs.weight", &[4], &[1.; 4]));
    let e = gguf::load(&g.write(dir.path(), "name.gguf"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("rope_freqs.weight"), "{e}");

    let mut g = base();
    g.tensors.push(Tensor::f32(
        "blk.7.attn_norm.weight",
        &[HIDDEN],
        &[1.; HIDDEN as usize],
    ));
    let e = gguf::load(&g.write(dir.path(), "layer.gguf"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("blk.7.attn_norm.weight"), "{e}");

    // Q4_0 (type 2) is a known ggml type, so the file reads, but Duet cannot run it.
    let mut g = base();
    let t = g
        .tensors
        .iter_mut()
        .find(|t| t.name == "blk.0.attn_q.weight")
        .unwrap();
    t.ggml_type = 2;
    t.data = vec![0; (HIDDEN * HIDDEN / 32 * 18) as usize];
    let p = g.write(dir.path(), "q4_0.gguf");
    gguf::read(&p).unwrap();
    let e = gguf::load(&p).unwrap_err().to_string();
    assert!(
        e.contains("blk.0.attn_q.weight") && e.contains("Q4_0") && e.contains('2'),
        "{e}"
    );

    let mut g = base();
    g.kvs.retain(|(k, _)| k != "qwen2.block_count");
    let e = gguf::load(&g.write(dir.path(), "nokey.gguf"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("qwen2.block_count"), "{e}");

    let mut g = base();
    for (k, v) in g.kvs.iter_mut() {
        if k == "tokenizer.ggml.eos_token_id" {
            *v = V::U32(999_999);
        }
    }
    let e = gguf::load(&g.write(dir.path(), "eos.gguf"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("eos_token_id"), "{e}");

    let mut g = base();
    for (k, v) in g.kvs.iter_mut() {
        if k == "tokenizer.ggml.model" {
            *v = V::str("llama");
        }
    }
    let e = gguf::load(&g.write(dir.path(), "tokmodel.gguf"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("llama"), "{e}");
}
