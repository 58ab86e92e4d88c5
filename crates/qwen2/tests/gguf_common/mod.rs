//! A tiny GGUF writer for tests. It writes exactly what it is told (counts, n_dims, offsets can be forced to
//! lie), so tests can build valid files and then corrupt them.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// GGUF value type ids.
pub const T_U8: u32 = 0;
pub const T_U32: u32 = 4;
pub const T_I32: u32 = 5;
pub const T_F32: u32 = 6;
pub const T_BOOL: u32 = 7;
pub const T_STR: u32 = 8;
pub const T_ARR: u32 = 9;
pub const T_U64: u32 = 10;

/// ggml type ids.
pub const F32: u32 = 0;
pub const Q5_0: u32 = 6;
pub const Q8_0: u32 = 8;

#[derive(Clone, Debug)]
pub enum V {
    U8(u8),
    U32(u32),
    I32(i32),
    F32(f32),
    U64(u64),
    Bool(bool),
    Str(String),
    /// Element type and elements (each written without its own type tag, as GGUF does).
    Arr(u32, Vec<V>),
}

impl V {
    pub fn type_id(&self) -> u32 {
        match self {
            V::U8(_) => T_U8,
            V::U32(_) => T_U32,
            V::I32(_) => T_I32,
            V::F32(_) => T_F32,
            V::U64(_) => T_U64,
            V::Bool(_) => T_BOOL,
            V::Str(_) => T_STR,
            V::Arr(..) => T_ARR,
        }
    }

    pub fn str(s: &str) -> V {
        V::Str(s.to_string())
    }

    pub fn strs<S: AsRef<str>>(items: &[S]) -> V {
        V::Arr(
            T_STR,
            items
                .iter()
                .map(|s| V::Str(s.as_ref().to_string()))
                .collect(),
        )
    }

    fn write(&self, out: &mut Vec<u8>) {
        match self {
            V::U8(v) => out.push(*v),
            V::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
            V::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
            V::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
            V::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
            V::Bool(v) => out.push(*v as u8),
            V::Str(s) => put_str(out, s),
            V::Arr(t, items) => {
                out.extend_from_slice(&t.to_le_bytes());
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for i in items {
                    i.write(out);
                }
            }
        }
    }
}

pub fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

#[derive(Clone, Debug)]
pub struct Tensor {
    pub name: String,
    /// ggml order: dims[0] is the row length.
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    pub data: Vec<u8>,
    /// Forced data offset; `None` places tensors one after another, aligned.
    pub offset: Option<u64>,
    /// Forced n_dims; `None` writes dims.len().
    pub n_dims: Option<u32>,
}

impl Tensor {
    pub fn f32(name: &str, dims: &[u64], values: &[f32]) -> Tensor {
        assert_eq!(dims.iter().product::<u64>() as usize, values.len());
        Tensor {
            name: name.into(),
            dims: dims.to_vec(),
            ggml_type: F32,
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            offset: None,
            n_dims: None,
        }
    }

    pub fn raw(name: &str, dims: &[u64], ggml_type: u32, data: Vec<u8>) -> Tensor {
        Tensor {
            name: name.into(),
            dims: dims.to_vec(),
            ggml_type,
            data,
            offset: None,
            n_dims: None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Gguf {
    pub version: u32,
    pub kvs: Vec<(String, V)>,
    pub tensors: Vec<Tensor>,
    pub alignment: u64,
    /// Forced counts; `None` writes the true ones.
    pub n_tensors: Option<u64>,
    pub n_kv: Option<u64>,
}

/// Positions of interesting fields in the written bytes.
#[derive(Debug, Default)]
pub struct Layout {
    pub tensor_infos_start: usize,
    pub data_start: usize,
}

impl Gguf {
    pub fn new(kvs: Vec<(String, V)>, tensors: Vec<Tensor>) -> Gguf {
        Gguf {
            version: 3,
            kvs,
            tensors,
            alignment: 32,
            n_tensors: None,
            n_kv: None,
        }
    }

    pub fn bytes(&self) -> Vec<u8> {
        self.bytes_and_layout().0
    }

    pub fn bytes_and_layout(&self) -> (Vec<u8>, Layout) {
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(
            &self
                .n_tensors
                .unwrap_or(self.tensors.len() as u64)
                .to_le_bytes(),
        );
        out.extend_from_slice(&self.n_kv.unwrap_or(self.kvs.len() as u64).to_le_bytes());
        for (k, v) in &self.kvs {
            put_str(&mut out, k);
            out.extend_from_slice(&v.type_id().to_le_bytes());
            v.write(&mut out);
        }
        let tensor_infos_start = out.len();
        let mut next = 0u64;
        let mut offsets = Vec::new();
        for t in &self.tensors {
            let off = t.offset.unwrap_or(next);
            offsets.push(off);
            next = (off + t.data.len() as u64).next_multiple_of(self.alignment);
            put_str(&mut out, &t.name);
            out.extend_from_slice(&t.n_dims.unwrap_or(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.ggml_type.to_le_bytes());
            out.extend_from_slice(&off.to_le_bytes());
        }
        out.resize(out.len().next_multiple_of(self.alignment as usize), 0);
        let data_start = out.len();
        for (t, off) in self.tensors.iter().zip(offsets) {
            // Forced offsets may point anywhere; only place data that lands at or after the current end.
            let at = data_start as u64 + off;
            if at >= out.len() as u64 && at < (1 << 32) {
                out.resize(at as usize, 0);
                out.extend_from_slice(&t.data);
            }
        }
        (
            out,
            Layout {
                tensor_infos_start,
                data_start,
            },
        )
    }

    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        write_bytes(dir, name, &self.bytes())
    }
}

pub fn write_bytes(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// GPT-2's bytes_to_unicode: the characters byte-level vocabularies are spelled in.
pub fn byte_alphabet() -> Vec<char> {
    let mut next = 256u32;
    (0..256u32)
        .map(|b| {
            if (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b) {
                char::from_u32(b).unwrap()
            } else {
                next += 1;
                char::from_u32(next - 1).unwrap()
            }
        })
        .collect()
}

/// Shape of the tiny test model.
pub const HIDDEN: u64 = 32;
pub const HEADS: u64 = 4;
pub const KV_HEADS: u64 = 2;
pub const HEAD_DIM: u64 = 8;
pub const FFN: u64 = 64;
pub const LAYERS: u64 = 2;
/// 256 byte tokens, 2 merged tokens, 4 special tokens.
pub const VOCAB: u64 = 262;
pub const ID_ENDOFTEXT: u32 = 258;
pub const ID_IM_START: u32 = 259;
pub const ID_IM_END: u32 = 260;
pub const ID_TOOL_CALL: u32 = 261;

/// Deterministic pseudo-random values.
pub struct Lcg(pub u64);
impl Lcg {
    pub fn next_u32(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
    pub fn f32(&mut self) -> f32 {
        (self.next_u32() % 2001) as f32 / 1000.0 - 1.0
    }
}

/// Random Q8_0 or Q5_0 bytes for `n` values with sane f16 scales.
pub fn random_blocks(ggml_type: u32, n: u64, rng: &mut Lcg) -> Vec<u8> {
    let (bytes, scale_at) = match ggml_type {
        Q8_0 => (34, 0),
        Q5_0 => (22, 0),
        t => panic!("no random blocks for type {t}"),
    };
    let mut out = Vec::new();
    for _ in 0..n / 32 {
        let mut b: Vec<u8> = (0..bytes).map(|_| rng.next_u32() as u8).collect();
        let scale = half::f16::from_f32(rng.f32() * 0.05)
            .to_bits()
            .to_le_bytes();
        b[scale_at..scale_at + 2].copy_from_slice(&scale);
        out.extend(b);
    }
    out
}

pub struct TinyOptions {
    /// Write a separate output.weight (untied embeddings).
    pub untied: bool,
    /// Store the embedding and some projections as Q8_0 / Q5_0.
    pub quantized: bool,
}

/// A small but complete qwen2 GGUF: 2 layers, hidden 32, 4 heads / 2 KV heads, vocab 262.
pub fn tiny_qwen2(opts: &TinyOptions) -> Gguf {
    let alphabet = byte_alphabet();
    let mut tokens: Vec<String> = alphabet.iter().map(|c| c.to_string()).collect();
    tokens.push("Ġt".into()); // 256
    tokens.push("hi".into()); // 257
    tokens.push("<|endoftext|>".into());
    tokens.push("<|im_start|>".into());
    tokens.push("<|im_end|>".into());
    tokens.push("<tool_call>".into());
    let mut types = vec![V::I32(1); 258];
    types.extend([V::I32(3), V::I32(3), V::I32(3), V::I32(4)]);
    let kvs: Vec<(String, V)> = vec![
        ("general.architecture".into(), V::str("qwen2")),
        ("general.name".into(), V::str("tiny")),
        ("qwen2.block_count".into(), V::U32(LAYERS as u32)),
        ("qwen2.context_length".into(), V::U32(128)),
        ("qwen2.embedding_length".into(), V::U32(HIDDEN as u32)),
        ("qwen2.feed_forward_length".into(), V::U32(FFN as u32)),
        ("qwen2.attention.head_count".into(), V::U32(HEADS as u32)),
        (
            "qwen2.attention.head_count_kv".into(),
            V::U32(KV_HEADS as u32),
        ),
        ("qwen2.rope.freq_base".into(), V::F32(1_000_000.0)),
        (
            "qwen2.attention.layer_norm_rms_epsilon".into(),
            V::F32(1e-6),
        ),
        ("general.file_type".into(), V::U32(1)),
        ("tokenizer.ggml.model".into(), V::str("gpt2")),
        ("tokenizer.ggml.pre".into(), V::str("qwen2")),
        ("tokenizer.ggml.tokens".into(), V::strs(&tokens)),
        ("tokenizer.ggml.token_type".into(), V::Arr(T_I32, types)),
        ("tokenizer.ggml.merges".into(), V::strs(&["Ġ t", "h i"])),
        ("tokenizer.ggml.eos_token_id".into(), V::U32(ID_IM_END)),
        (
            "tokenizer.ggml.padding_token_id".into(),
            V::U32(ID_ENDOFTEXT),
        ),
        ("tokenizer.ggml.bos_token_id".into(), V::U32(ID_ENDOFTEXT)),
        ("tokenizer.ggml.add_bos_token".into(), V::Bool(false)),
        (
            "tokenizer.chat_template".into(),
            V::str("{% for m in messages %}{{ m.content }}{% endfor %}"),
        ),
        ("general.quantization_version".into(), V::U32(2)),
    ];
    let mut rng = Lcg(7);
    let mut t = |name: &str, dims: &[u64], q: Option<u32>| -> Tensor {
        let n: u64 = dims.iter().product();
        match q {
            Some(ty) if opts.quantized => {
                Tensor::raw(name, dims, ty, random_blocks(ty, n, &mut rng))
            }
            _ => {
                let v: Vec<f32> = (0..n).map(|_| rng.f32()).collect();
                Tensor::f32(name, dims, &v)
            }
        }
    };
    let kv = KV_HEADS * HEAD_DIM;
    let mut tensors = vec![t("token_embd.weight", &[HIDDEN, VOCAB], Some(Q8_0))];
    if opts.untied {
        tensors.push(t("output.weight", &[HIDDEN, VOCAB], Some(Q8_0)));
    }
    tensors.push(t("output_norm.weight", &[HIDDEN], None));
    for l in 0..LAYERS {
        let b = |s: &str| format!("blk.{l}.{s}");
        tensors.push(t(&b("attn_norm.weight"), &[HIDDEN], None));
        tensors.push(t(&b("attn_q.weight"), &[HIDDEN, HIDDEN], Some(Q8_0)));
        tensors.push(t(&b("attn_q.bias"), &[HIDDEN], None));
        tensors.push(t(&b("attn_k.weight"), &[HIDDEN, kv], Some(Q5_0)));
        tensors.push(t(&b("attn_k.bias"), &[kv], None));
        tensors.push(t(&b("attn_v.weight"), &[HIDDEN, kv], Some(Q8_0)));
        tensors.push(t(&b("attn_v.bias"), &[kv], None));
        tensors.push(t(&b("attn_output.weight"), &[HIDDEN, HIDDEN], Some(Q5_0)));
        tensors.push(t(&b("ffn_norm.weight"), &[HIDDEN], None));
        tensors.push(t(&b("ffn_gate.weight"), &[HIDDEN, FFN], Some(Q5_0)));
        tensors.push(t(&b("ffn_up.weight"), &[HIDDEN, FFN], Some(Q5_0)));
        tensors.push(t(&b("ffn_down.weight"), &[FFN, HIDDEN], Some(Q8_0)));
    }
    Gguf::new(kvs, tensors)
}
