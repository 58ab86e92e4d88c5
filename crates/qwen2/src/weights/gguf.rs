//! GGUF files (versions 2 and 3, little-endian): a validating reader over a memory map, and the mapping from
//! llama.cpp's names and metadata to the Hugging Face names, [`ModelConfig`] and `tokenizer.json` the rest of
//! Duet uses.
//!
//! Layout (ggml's docs/gguf.md): magic `GGUF`, u32 version, u64 tensor count, u64 metadata count, the metadata
//! key/value pairs, the tensor infos (name, u32 n_dims, u64 dims in ggml order, u32 ggml type, u64 offset), then
//! padding to `general.alignment` (default 32) and the data section the offsets are relative to.
//!
//! Every number in the file is untrusted. GGUF parsers have had a run of memory-safety bugs from lying counts
//! and lengths (ggml PR #709: unchecked string lengths, n_dims > 4 and unknown types overflowing fixed arrays;
//! CVE-2025-53630: overflowing tensor size sums; later: dims whose product wraps, padding arithmetic that
//! wraps). So here every count and length is compared with the bytes actually left in the file *before*
//! anything is allocated or indexed, all size arithmetic is checked, and no buffer is reserved from a count
//! read from the file: vectors grow only as elements are actually parsed.

use super::{Bytes, DType, MappedFile, RawTensor, TensorStore};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Longest metadata string accepted (chat templates are tens of KB; tokens a few bytes).
pub const MAX_STRING_LEN: u64 = 16 << 20;
/// Most elements accepted in one metadata array (vocabularies are a few hundred thousand tokens).
pub const MAX_ARRAY_LEN: u64 = 1 << 24;
/// Deepest nesting of arrays inside arrays.
pub const MAX_ARRAY_DEPTH: usize = 4;
/// Longest metadata key or tensor name accepted.
pub const MAX_NAME_LEN: u64 = 1 << 16;
/// ggml's GGML_MAX_DIMS.
pub const MAX_DIMS: u32 = 4;
/// Default `general.alignment`.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// A tensor info takes at least this many bytes: name length (8), n_dims (4), one dim (8), type (4), offset (8).
const MIN_TENSOR_INFO_BYTES: u64 = 32;
/// A key/value pair takes at least: key length (8), a one-byte key, value type (4), a one-byte value.
const MIN_KV_BYTES: u64 = 14;

/// One metadata value. GGUF value type ids are in the comments.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),                // 0
    I8(i8),                // 1
    U16(u16),              // 2
    I16(i16),              // 3
    U32(u32),              // 4
    I32(i32),              // 5
    F32(f32),              // 6
    Bool(bool),            // 7
    Str(String),           // 8
    Array(Vec<MetaValue>), // 9
    U64(u64),              // 10
    I64(i64),              // 11
    F64(f64),              // 12
    /// An array of strings (type 9 of type 8), validated but left in the mapped file: read with
    /// [`GgufFile::string_array`]. A vocabulary and its merges are ~300,000 strings; making a `String`
    /// of each at parse time cost 0.11–0.15 s of every load on a 2-core Zen 1 VM, before anything else
    /// could start.
    Strings(StrArray),
}

impl MetaValue {
    pub fn type_name(&self) -> &'static str {
        match self {
            MetaValue::U8(_) => "u8",
            MetaValue::I8(_) => "i8",
            MetaValue::U16(_) => "u16",
            MetaValue::I16(_) => "i16",
            MetaValue::U32(_) => "u32",
            MetaValue::I32(_) => "i32",
            MetaValue::F32(_) => "f32",
            MetaValue::Bool(_) => "bool",
            MetaValue::Str(_) => "string",
            MetaValue::Array(_) | MetaValue::Strings(_) => "array",
            MetaValue::U64(_) => "u64",
            MetaValue::I64(_) => "i64",
            MetaValue::F64(_) => "f64",
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// Any integer type holding a non-negative value.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer type whose value fits an i64.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetaValue::I8(v) => Some(v.into()),
            MetaValue::I16(v) => Some(v.into()),
            MetaValue::I32(v) => Some(v.into()),
            MetaValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// A float, or an integer read as one.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v.into()),
            MetaValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where an array of strings lies in the file: its first element's byte offset and its length. Every
/// element was checked (bounds, length limit, UTF-8) when the file was parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct StrArray {
    start: usize,
    len: usize,
}

impl StrArray {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The ggml tensor types whose block sizes we know: (id, name, values per block, bytes per block).
/// Only some of them can be loaded (see [`ggml_dtype`]); the others are still sized so a file using them can
/// be validated and listed.
const GGML_TYPES: &[(u32, &str, u64, u64)] = &[
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2),
    (34, "TQ1_0", 256, 54),
    (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17),
];

fn ggml_type_info(ggml_type: u32) -> Option<(&'static str, u64, u64)> {
    GGML_TYPES
        .iter()
        .find(|t| t.0 == ggml_type)
        .map(|&(_, n, e, b)| (n, e, b))
}

/// The ggml type name ("Q4_K"), or "unknown".
pub fn ggml_type_name(ggml_type: u32) -> &'static str {
    ggml_type_info(ggml_type).map_or("unknown", |t| t.0)
}

/// The [`DType`] Duet reads a ggml type as, if it can.
pub fn ggml_dtype(ggml_type: u32) -> Option<DType> {
    Some(match ggml_type {
        0 => DType::F32,
        1 => DType::F16,
        6 => DType::Q5_0,
        8 => DType::Q8_0,
        12 => DType::Q4K,
        14 => DType::Q6K,
        30 => DType::BF16,
        _ => return None,
    })
}

/// One tensor as the file describes it (validated: the bytes lie inside the file's data section).
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// ggml type id (see [`ggml_type_name`], [`ggml_dtype`]).
    pub ggml_type: u32,
    /// Dimensions in ggml order: `dims[0]` is the row length (the fastest-varying index).
    pub dims: Vec<u64>,
    /// Byte offset relative to the start of the data section (a multiple of the alignment).
    pub offset: u64,
    /// Byte size of the tensor's data.
    pub n_bytes: u64,
}

impl GgufTensorInfo {
    /// The number of values (checked not to overflow when the file was read).
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Dimensions in Hugging Face / row-major order (rows first).
    pub fn hf_shape(&self) -> Vec<usize> {
        // Each dim was checked to fit a usize when the file was read.
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    pub fn dtype(&self) -> Option<DType> {
        ggml_dtype(self.ggml_type)
    }
}

/// A parsed and validated GGUF file, with its memory map.
pub struct GgufFile {
    pub version: u32,
    pub metadata: BTreeMap<String, MetaValue>,
    pub tensors: Vec<GgufTensorInfo>,
    /// `general.alignment`, or 32.
    pub alignment: u64,
    /// Absolute byte offset of the data section.
    pub data_offset: u64,
    pub path: PathBuf,
    map: Arc<MappedFile>,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .finish()
    }
}

impl GgufFile {
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    /// The mapped bytes of a tensor (one of `self.tensors`).
    pub fn tensor_bytes(&self, t: &GgufTensorInfo) -> Result<Bytes> {
        let start = self.data_offset.checked_add(t.offset);
        start
            .and_then(|s| {
                Bytes::new(
                    self.map.clone(),
                    usize::try_from(s).ok()?,
                    usize::try_from(t.n_bytes).ok()?,
                )
            })
            .ok_or_else(|| self.err(format!("tensor {} lies outside the file", t.name)))
    }

    /// The whole mapped file.
    pub fn mapped(&self) -> &Arc<MappedFile> {
        &self.map
    }

    fn err(&self, message: impl Into<String>) -> Error {
        Error::Gguf {
            path: self.path.clone(),
            message: message.into(),
        }
    }

    fn str_key(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(MetaValue::Str(s)) => Ok(Some(s)),
            Some(v) => Err(self.err(format!(
                "metadata `{key}` is a {}, expected a string",
                v.type_name()
            ))),
        }
    }

    fn uint_key(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64().and_then(|v| usize::try_from(v).ok()) {
                Some(n) => Ok(Some(n)),
                None => Err(self.err(format!(
                    "metadata `{key}` ({v:?}) is not a non-negative integer"
                ))),
            },
        }
    }

    fn required_uint(&self, key: &str) -> Result<usize> {
        self.uint_key(key)?
            .ok_or_else(|| self.err(format!("metadata `{key}` is missing")))
    }

    fn float_key(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                self.err(format!(
                    "metadata `{key}` is a {}, expected a number",
                    v.type_name()
                ))
            }),
        }
    }

    /// The strings of an array-of-strings metadata value, borrowed from the mapped file.
    pub fn string_array(&self, key: &str) -> Result<Option<Vec<&str>>> {
        match self.get(key) {
            None => Ok(None),
            Some(MetaValue::Strings(a)) => self.strings(a).map(Some),
            // An empty array's element type is whatever the writer chose.
            Some(MetaValue::Array(a)) if a.is_empty() => Ok(Some(vec![])),
            Some(v) => Err(self.err(format!(
                "metadata `{key}` is a {}, expected an array of strings",
                v.type_name()
            ))),
        }
    }

    /// The elements of `a`, which `parse` found in this file's bytes and checked.
    pub fn strings(&self, a: &StrArray) -> Result<Vec<&str>> {
        let mut c = Cursor {
            buf: self.map.bytes(),
            pos: a.start,
            path: &self.path,
        };
        let mut out = Vec::with_capacity(a.len);
        for _ in 0..a.len {
            out.push(c.str(MAX_STRING_LEN, &|| "a metadata string".into())?);
        }
        Ok(out)
    }
}

/// A byte cursor over the file that refuses to read past the end.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn err(&self, message: impl fmt::Display) -> Error {
        Error::Gguf {
            path: self.path.to_path_buf(),
            message: format!("{message} (at byte {})", self.pos),
        }
    }

    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.err(format!(
                "file truncated: {} needs {n} bytes but only {} remain",
                what(),
                self.remaining()
            )));
        }
        // `n <= remaining` so this fits a usize and stays inside the buffer.
        let n = n as usize;
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N as u64, what)?);
        Ok(a)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A u64 length followed by that many UTF-8 bytes, at most `max` of them.
    fn str(&mut self, max: u64, what: &dyn Fn() -> String) -> Result<&'a str> {
        let len = self.u64(&|| format!("the length of {}", what()))?;
        if len > max {
            return Err(self.err(format!(
                "{}: string length {len} exceeds the limit of {max} bytes",
                what()
            )));
        }
        let bytes = self.take(len, what)?;
        std::str::from_utf8(bytes).map_err(|_| self.err(format!("{} is not valid UTF-8", what())))
    }

    fn string(&mut self, max: u64, what: &dyn Fn() -> String) -> Result<String> {
        self.str(max, what).map(String::from)
    }

    /// Smallest encoded size of one value of a GGUF value type, or `None` for an unknown type.
    fn min_value_size(ty: u32) -> Option<u64> {
        Some(match ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            8 => 8,
            9 => 12,
            10..=12 => 8,
            _ => return None,
        })
    }

    fn value(&mut self, ty: u32, depth: usize, key: &str) -> Result<MetaValue> {
        let what = || format!("the value of metadata `{key}`");
        Ok(match ty {
            0 => MetaValue::U8(u8::from_le_bytes(self.array(&what)?)),
            1 => MetaValue::I8(i8::from_le_bytes(self.array(&what)?)),
            2 => MetaValue::U16(u16::from_le_bytes(self.array(&what)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array(&what)?)),
            4 => MetaValue::U32(u32::from_le_bytes(self.array(&what)?)),
            5 => MetaValue::I32(i32::from_le_bytes(self.array(&what)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array(&what)?)),
            7 => match self.array::<1>(&what)?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => {
                    return Err(self.err(format!(
                        "metadata `{key}`: bool byte {b} is neither 0 nor 1"
                    )))
                }
            },
            8 => MetaValue::Str(self.string(MAX_STRING_LEN, &what)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.err(format!(
                        "metadata `{key}`: arrays nested deeper than {MAX_ARRAY_DEPTH} levels"
                    )));
                }
                let elem = self.u32(&|| format!("the element type of metadata `{key}`"))?;
                let min = Self::min_value_size(elem).ok_or_else(|| {
                    self.err(format!(
                        "metadata `{key}`: unknown array element type {elem}"
                    ))
                })?;
                let len = self.u64(&|| format!("the length of metadata array `{key}`"))?;
                if len > MAX_ARRAY_LEN {
                    return Err(self.err(format!(
                        "metadata `{key}`: array length {len} exceeds the limit of {MAX_ARRAY_LEN}"
                    )));
                }
                // `len <= 2^24` and `min <= 12`, so the product cannot overflow.
                if len * min > self.remaining() {
                    return Err(self.err(format!(
                        "metadata `{key}`: array of {len} elements cannot fit in the {} bytes left",
                        self.remaining()
                    )));
                }
                if elem == 8 {
                    // Checked here, read later (see `MetaValue::Strings`).
                    let start = self.pos;
                    for i in 0..len {
                        self.str(MAX_STRING_LEN, &|| format!("metadata `{key}`[{i}]"))?;
                    }
                    MetaValue::Strings(StrArray {
                        start,
                        len: len as usize,
                    })
                } else {
                    let mut items = Vec::new();
                    for _ in 0..len {
                        items.push(self.value(elem, depth + 1, key)?);
                    }
                    MetaValue::Array(items)
                }
            }
            10 => MetaValue::U64(u64::from_le_bytes(self.array(&what)?)),
            11 => MetaValue::I64(i64::from_le_bytes(self.array(&what)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array(&what)?)),
            t => return Err(self.err(format!("metadata `{key}`: unknown value type {t}"))),
        })
    }
}

/// Parses and validates a GGUF file: header, metadata, tensor infos, alignment and every tensor's byte range.
pub fn read(path: &Path) -> Result<GgufFile> {
    let map = MappedFile::open(path)?;
    parse(path, map)
}

fn parse(path: &Path, map: Arc<MappedFile>) -> Result<GgufFile> {
    let buf = map.bytes();
    let mut c = Cursor { buf, pos: 0, path };
    let magic = c.array::<4>(&|| "the magic number".into())?;
    if magic != *b"GGUF" {
        return Err(c.err(format!(
            "not a GGUF file (magic {magic:02x?}, expected \"GGUF\")"
        )));
    }
    let version = c.u32(&|| "the version".into())?;
    match version {
        2 | 3 => {}
        1 => {
            return Err(
                c.err("GGUF version 1 (32-bit counts) is not supported; re-convert the model")
            )
        }
        v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => {
            return Err(c.err("big-endian GGUF files are not supported"))
        }
        v => {
            return Err(c.err(format!(
                "unsupported GGUF version {v} (2 and 3 are supported)"
            )))
        }
    }
    let n_tensors = c.u64(&|| "the tensor count".into())?;
    let n_kv = c.u64(&|| "the metadata count".into())?;
    if n_kv > c.remaining() / MIN_KV_BYTES {
        return Err(c.err(format!(
            "metadata count {n_kv} cannot fit in the {} bytes left in the file",
            c.remaining()
        )));
    }
    // The metadata comes first, so this is only a first bound on the tensor count; checked again below.
    if n_tensors > c.remaining() / MIN_TENSOR_INFO_BYTES {
        return Err(c.err(format!(
            "tensor count {n_tensors} cannot fit in the {} bytes left in the file",
            c.remaining()
        )));
    }

    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        let key = c.string(MAX_NAME_LEN, &|| format!("metadata key #{i}"))?;
        if key.is_empty() {
            return Err(c.err(format!("metadata key #{i} is empty")));
        }
        let ty = c.u32(&|| format!("the type of metadata `{key}`"))?;
        let value = c.value(ty, 0, &key)?;
        if metadata.contains_key(&key) {
            return Err(c.err(format!("metadata key `{key}` appears twice")));
        }
        metadata.insert(key, value);
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(MetaValue::U32(a)) if a.is_power_of_two() => u64::from(*a),
        Some(v) => {
            return Err(c.err(format!(
                "general.alignment must be a u32 power of two, found {v:?}"
            )));
        }
    };

    if n_tensors > c.remaining() / MIN_TENSOR_INFO_BYTES {
        return Err(c.err(format!(
            "tensor count {n_tensors} cannot fit in the {} bytes left in the file",
            c.remaining()
        )));
    }
    let mut tensors = Vec::new();
    let mut names = HashSet::new();
    for i in 0..n_tensors {
        let name = c.string(MAX_NAME_LEN, &|| format!("the name of tensor #{i}"))?;
        if name.is_empty() {
            return Err(c.err(format!("tensor #{i} has an empty name")));
        }
        let n_dims = c.u32(&|| format!("n_dims of tensor {name}"))?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(c.err(format!(
                "tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)"
            )));
        }
        let mut dims = Vec::new();
        let mut elements: u64 = 1;
        for d in 0..n_dims {
            let dim = c.u64(&|| format!("dimension {d} of tensor {name}"))?;
            if dim == 0 {
                return Err(c.err(format!("tensor {name} has a zero dimension")));
            }
            elements = elements
                .checked_mul(dim)
                .filter(|&e| e <= i64::MAX as u64 && usize::try_from(e).is_ok())
                .ok_or_else(|| c.err(format!("tensor {name}: the number of elements overflows")))?;
            dims.push(dim);
        }
        let ggml_type = c.u32(&|| format!("the type of tensor {name}"))?;
        let Some((type_name, block_elems, block_bytes)) = ggml_type_info(ggml_type) else {
            return Err(c.err(format!("tensor {name} has unknown ggml type {ggml_type}")));
        };
        if !dims[0].is_multiple_of(block_elems) {
            return Err(c.err(format!(
                "tensor {name}: row length {} is not a multiple of the {type_name} block size {block_elems}",
                dims[0]
            )));
        }
        let n_bytes = (elements / block_elems)
            .checked_mul(block_bytes)
            .ok_or_else(|| c.err(format!("tensor {name}: byte size overflows")))?;
        let offset = c.u64(&|| format!("the offset of tensor {name}"))?;
        if !offset.is_multiple_of(alignment) {
            return Err(c.err(format!(
                "tensor {name}: data offset {offset} is not a multiple of the alignment {alignment}"
            )));
        }
        if !names.insert(name.clone()) {
            return Err(c.err(format!("tensor name {name} appears twice")));
        }
        tensors.push(GgufTensorInfo {
            name,
            ggml_type,
            dims,
            offset,
            n_bytes,
        });
    }

    // The data section starts at the next multiple of the alignment.
    let end_of_infos = c.pos as u64;
    let data_offset = end_of_infos
        .checked_next_multiple_of(alignment)
        .ok_or_else(|| c.err("data section offset overflows"))?;
    let file_len = buf.len() as u64;
    if !tensors.is_empty() && data_offset > file_len {
        return Err(c.err(format!(
            "file truncated: the data section would start at {data_offset}, past the end"
        )));
    }
    let data_len = file_len.saturating_sub(data_offset);
    for t in &tensors {
        let end = t.offset.checked_add(t.n_bytes);
        if end.is_none_or(|e| e > data_len) {
            return Err(c.err(format!(
                "tensor {} ({} bytes at data offset {}) extends past the end of the file ({data_len} data bytes)",
                t.name, t.n_bytes, t.offset
            )));
        }
    }
    // Tensors must not overlap (ggml writes them one after another).
    let mut order: Vec<&GgufTensorInfo> = tensors.iter().collect();
    order.sort_by_key(|t| t.offset);
    for w in order.windows(2) {
        // Both ends were checked above not to overflow.
        if w[0].offset + w[0].n_bytes > w[1].offset {
            return Err(c.err(format!("tensors {} and {} overlap", w[0].name, w[1].name)));
        }
    }

    Ok(GgufFile {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
        path: path.to_path_buf(),
        map,
    })
}

/// A GGUF model ready for Duet: config, tensors under Hugging Face names and shapes, and tokenizer.
pub struct GgufModel {
    pub config: ModelConfig,
    pub store: TensorStore,
    /// The tokenizer the `tokenizer.ggml.*` metadata describes.
    pub tokenizer: BpeSpec,
    pub chat_template: Option<String>,
    pub file: GgufFile,
}

impl fmt::Debug for GgufModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufModel")
            .field("config", &self.config)
            .field("tensors", &self.store.tensors.len())
            .field(
                "chat_template",
                &self.chat_template.as_ref().map(|t| t.len()),
            )
            .field("file", &self.file)
            .finish()
    }
}

/// Reads a GGUF file and maps it to Duet's config, Hugging Face tensor names and a tokenizer.json.
pub fn load(path: &Path) -> Result<GgufModel> {
    let (file, config, store) = load_weights(path)?;
    let tokenizer = bpe_spec(&file)?;
    let chat_template = chat_template(&file)?;
    Ok(GgufModel {
        config,
        store,
        tokenizer,
        chat_template,
        file,
    })
}

/// What [`load`] reads but the tokenizer: for a caller that builds the tokenizer ([`bpe_spec`],
/// [`chat_template`]) beside the weights.
pub fn load_weights(path: &Path) -> Result<(GgufFile, ModelConfig, TensorStore)> {
    let file = read(path)?;
    let config = model_config(&file)?;
    let store = tensor_store(&file, &config)?;
    Ok((file, config, store))
}

/// The chat template in the file's metadata, if it has one.
pub fn chat_template(file: &GgufFile) -> Result<Option<String>> {
    Ok(file.str_key("tokenizer.chat_template")?.map(String::from))
}

/// The Hugging Face name of a qwen2 GGUF tensor, or `None` if it has none.
pub fn hf_tensor_name(gguf_name: &str) -> Option<String> {
    let fixed = match gguf_name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    if layer.is_empty()
        || !layer.bytes().all(|b| b.is_ascii_digit())
        || (layer.len() > 1 && layer.starts_with('0'))
    {
        return None;
    }
    let (part, suffix) = rest.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// The layer index of a `blk.N.*` tensor name.
fn layer_of(gguf_name: &str) -> Option<usize> {
    gguf_name
        .strip_prefix("blk.")?
        .split_once('.')?
        .0
        .parse()
        .ok()
}

/// All tensors under their Hugging Face names, in Hugging Face shape order.
pub fn tensor_store(file: &GgufFile, config: &ModelConfig) -> Result<TensorStore> {
    // A tensor's error also names the file it came from.
    tensors_of(file, config).map_err(|e| match e {
        Error::Tensor { name, message } => file.err(format!("tensor {name}: {message}")),
        other => other,
    })
}

fn tensors_of(file: &GgufFile, config: &ModelConfig) -> Result<TensorStore> {
    let mut store = TensorStore::default();
    for t in &file.tensors {
        let hf = hf_tensor_name(&t.name).ok_or_else(|| {
            Error::tensor(
                &t.name,
                "is not a tensor of a qwen2 model (no Hugging Face equivalent is known)",
            )
        })?;
        if let Some(layer) = layer_of(&t.name) {
            if layer >= config.num_hidden_layers {
                return Err(Error::tensor(
                    &t.name,
                    format!(
                        "belongs to layer {layer}, but the model has {} layers",
                        config.num_hidden_layers
                    ),
                ));
            }
        }
        let dtype = t.dtype().ok_or_else(|| {
            Error::tensor(
                &t.name,
                format!(
                    "ggml type {} ({}) is not supported (Duet reads F32, F16, BF16, Q8_0, Q5_0, Q4_K, Q6_K)",
                    t.ggml_type,
                    ggml_type_name(t.ggml_type)
                ),
            )
        })?;
        let shape = t.hf_shape();
        let n: usize = shape.iter().product();
        if dtype.bytes_for(n).map(|b| b as u64) != Some(t.n_bytes) {
            return Err(Error::tensor(
                &t.name,
                format!(
                    "{} bytes do not hold {n} {} values",
                    t.n_bytes,
                    dtype.name()
                ),
            ));
        }
        let bytes = file.tensor_bytes(t)?;
        if store
            .tensors
            .insert(
                hf.clone(),
                RawTensor {
                    dtype,
                    shape,
                    bytes,
                },
            )
            .is_some()
        {
            return Err(Error::tensor(&hf, "appears twice"));
        }
    }
    Ok(store)
}

/// [`ModelConfig`] from the `general.*`, `qwen2.*` and `tokenizer.ggml.*` metadata.
pub fn model_config(file: &GgufFile) -> Result<ModelConfig> {
    let arch = file
        .str_key("general.architecture")?
        .ok_or_else(|| file.err("metadata `general.architecture` is missing"))?;
    if arch != "qwen2" {
        return Err(Error::Architecture {
            found: format!("GGUF architecture {arch}"),
        });
    }
    let hidden_size = file.required_uint("qwen2.embedding_length")?;
    let num_attention_heads = file.required_uint("qwen2.attention.head_count")?;
    let num_key_value_heads = file
        .uint_key("qwen2.attention.head_count_kv")?
        .unwrap_or(num_attention_heads);
    let head_dim = match file.uint_key("qwen2.attention.key_length")? {
        Some(h) => h,
        None if num_attention_heads > 0 && hidden_size.is_multiple_of(num_attention_heads) => {
            hidden_size / num_attention_heads
        }
        None => {
            return Err(Error::Config(format!(
            "embedding_length {hidden_size} is not a multiple of head_count {num_attention_heads}"
        )))
        }
    };
    let tokens = file
        .string_array("tokenizer.ggml.tokens")?
        .ok_or_else(|| file.err("metadata `tokenizer.ggml.tokens` is missing"))?;
    let vocab_size = tokens.len();
    let token_id = |key: &str| -> Result<Option<u32>> {
        match file.uint_key(key)? {
            None => Ok(None),
            Some(id) if id < vocab_size => Ok(Some(id as u32)),
            Some(id) => Err(file.err(format!(
                "metadata `{key}` = {id} is outside the vocabulary of {vocab_size}"
            ))),
        }
    };
    let mut eos_token_ids = Vec::new();
    let mut add_eos = |id: u32| {
        if !eos_token_ids.contains(&id) {
            eos_token_ids.push(id);
        }
    };
    if let Some(id) = token_id("tokenizer.ggml.eos_token_id")? {
        add_eos(id);
    }
    // transformers stops Qwen2 chat models on both of these; GGUF metadata names only one.
    for special in ["<|im_end|>", "<|endoftext|>"] {
        if let Some(id) = tokens.iter().position(|t| *t == special) {
            add_eos(id as u32);
        }
    }
    let rope_theta = file.float_key("qwen2.rope.freq_base")?.unwrap_or(10000.0) as f32;
    let rms_norm_eps = file
        .float_key("qwen2.attention.layer_norm_rms_epsilon")?
        .unwrap_or(1e-6) as f32;
    let config = ModelConfig {
        vocab_size,
        hidden_size,
        intermediate_size: file.required_uint("qwen2.feed_forward_length")?,
        num_hidden_layers: file.required_uint("qwen2.block_count")?,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        max_position_embeddings: file.required_uint("qwen2.context_length")?,
        rms_norm_eps,
        rope_theta,
        tie_word_embeddings: !file.tensors.iter().any(|t| t.name == "output.weight"),
        eos_token_ids,
        bos_token_id: token_id("tokenizer.ggml.bos_token_id")?,
    };
    // Every layer has a dozen tensors: a block count the tensor list cannot hold is a lie, and must not go
    // on to size the model's layer list (found by the `gguf_load` fuzz target).
    if config.num_hidden_layers > file.tensors.len() {
        return Err(file.err(format!(
            "metadata `qwen2.block_count` ({}) claims more layers than the file has tensors ({})",
            config.num_hidden_layers,
            file.tensors.len()
        )));
    }
    config.validate()?;
    Ok(config)
}

/// Qwen2's pre-tokenizer split (from its tokenizer.json).
pub const QWEN2_SPLIT_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GPT-2's byte → printable character table (`bytes_to_unicode`): the alphabet byte-level BPE vocabularies
/// are spelled in.
fn byte_level_alphabet() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for (b, slot) in table.iter_mut().enumerate() {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let code = if printable {
            b as u32
        } else {
            next += 1;
            next - 1
        };
        *slot = char::from_u32(code).unwrap_or('\0');
    }
    table
}

/// One token the file marks as control (type 3, special) or user-defined (type 4): matched in text before
/// BPE runs, never normalized.
#[derive(Debug, Clone, PartialEq)]
pub struct AddedSpec {
    pub id: u32,
    pub content: String,
    pub special: bool,
}

impl AddedSpec {
    /// The token as `tokenizer.json`'s `added_tokens` and `tokenizer_config.json`'s `added_tokens_decoder`
    /// spell it (without the id, which the two files place differently).
    pub fn to_json(&self) -> Value {
        json!({
            "content": self.content, "single_word": false, "lstrip": false, "rstrip": false,
            "normalized": false, "special": self.special,
        })
    }
}

/// A byte-level BPE tokenizer as the `tokenizer.ggml.*` metadata describes it, checked and respelled in
/// GPT-2's byte alphabet: everything `Tokenizer::from_bpe` needs, without a JSON detour (building and
/// re-parsing a 151,936-token `tokenizer.json` was most of the model's load time).
#[derive(Debug, Clone)]
pub struct BpeSpec {
    /// Token strings in id order.
    pub vocab: Vec<String>,
    /// Merge rules in priority order.
    pub merges: Vec<(String, String)>,
    pub added: Vec<AddedSpec>,
}

/// The [`BpeSpec`] of a GGUF file's tokenizer metadata (Qwen2's byte-level BPE only).
pub fn bpe_spec(file: &GgufFile) -> Result<BpeSpec> {
    let model = file.str_key("tokenizer.ggml.model")?.unwrap_or("<missing>");
    if model != "gpt2" {
        return Err(Error::Tokenizer(format!(
            "GGUF tokenizer model {model:?} is not supported (Qwen2 models use \"gpt2\", byte-level BPE)"
        )));
    }
    match file.str_key("tokenizer.ggml.pre")? {
        // Older files have no `pre`; for a qwen2 model Qwen2's split is the right one.
        None | Some("qwen2") | Some("deepseek-r1-qwen") => {}
        Some(other) => {
            return Err(Error::Tokenizer(format!(
                "GGUF pre-tokenizer {other:?} is not supported (expected \"qwen2\")"
            )))
        }
    }
    let tokens = file
        .string_array("tokenizer.ggml.tokens")?
        .ok_or_else(|| Error::Tokenizer("metadata `tokenizer.ggml.tokens` is missing".into()))?;
    let merges = file
        .string_array("tokenizer.ggml.merges")?
        .ok_or_else(|| Error::Tokenizer("metadata `tokenizer.ggml.merges` is missing".into()))?;
    let token_types: Vec<i64> = match file.get("tokenizer.ggml.token_type") {
        None => vec![],
        Some(v) => {
            let arr = v.as_array().ok_or_else(|| {
                Error::Tokenizer(format!(
                    "`tokenizer.ggml.token_type` is a {}, expected an array",
                    v.type_name()
                ))
            })?;
            let types = arr
                .iter()
                .map(MetaValue::as_i64)
                .collect::<Option<Vec<i64>>>()
                .ok_or_else(|| {
                    Error::Tokenizer("`tokenizer.ggml.token_type` holds non-integers".into())
                })?;
            if types.len() != tokens.len() {
                return Err(Error::Tokenizer(format!(
                    "{} token types for {} tokens",
                    types.len(),
                    tokens.len()
                )));
            }
            types
        }
    };
    if u32::try_from(tokens.len()).is_err() {
        return Err(Error::Tokenizer(format!(
            "{} tokens do not fit 32-bit ids",
            tokens.len()
        )));
    }

    let alphabet = byte_level_alphabet();
    // The alphabet is the printable bytes as themselves plus U+0100..=U+0143 for the other 68 bytes.
    let in_alphabet = |t: &str| {
        t.chars()
            .all(|ch| matches!(ch as u32, 33..=126 | 161..=172 | 174..=255 | 256..=323))
    };
    let respell = || {
        let mut vocab = Vec::with_capacity(tokens.len());
        let mut added = Vec::new();
        for (id, &token) in tokens.iter().enumerate() {
            let spelled = in_alphabet(token);
            // Every byte-level token is spelled in the alphabet; respell any that is not, as transformers
            // does.
            vocab.push(if spelled {
                token.to_string()
            } else {
                token.bytes().map(|b| alphabet[b as usize]).collect()
            });
            let special = match token_types.get(id) {
                Some(3) => true,
                Some(4) => false,
                _ => continue,
            };
            if spelled {
                added.push(AddedSpec {
                    id: id as u32,
                    content: token.to_string(),
                    special,
                });
            }
        }
        (vocab, added)
    };
    let split_merges = || {
        merges
            .iter()
            .enumerate()
            .map(|(i, m)| match m.split_once(' ') {
                Some((a, b)) if !b.contains(' ') => Ok((a.to_string(), b.to_string())),
                _ => Err(Error::Tokenizer(format!(
                    "merge #{i} {m:?} is not two tokens separated by one space"
                ))),
            })
            .collect::<Result<Vec<_>>>()
    };
    // Two independent passes over ~150,000 strings each: one per core.
    let ((vocab, added), merges) = rayon::join(respell, split_merges);
    let merges = merges?;
    Ok(BpeSpec {
        vocab,
        merges,
        added,
    })
}

impl BpeSpec {
    /// The same tokenizer as a Hugging Face `tokenizer.json` (what `convert` writes): byte-level BPE with
    /// this vocabulary and these merges, NFC, Qwen2's split regex, and the added tokens.
    pub fn to_json(&self) -> Value {
        let mut vocab = Map::new();
        for (id, token) in self.vocab.iter().enumerate() {
            vocab.insert(token.clone(), json!(id));
        }
        let merges: Vec<String> = self
            .merges
            .iter()
            .map(|(a, b)| format!("{a} {b}"))
            .collect();
        let added: Vec<Value> = self
            .added
            .iter()
            .map(|t| {
                let mut entry = t.to_json();
                entry["id"] = json!(t.id);
                entry
            })
            .collect();
        let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false});
        json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": {"type": "NFC"},
            "pre_tokenizer": {
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT_REGEX}, "behavior": "Isolated", "invert": false},
                    byte_level.clone(),
                ]
            },
            "post_processor": byte_level.clone(),
            "decoder": byte_level,
            "model": {
                "type": "BPE",
                "dropout": null,
                "unk_token": null,
                "continuing_subword_prefix": null,
                "end_of_word_suffix": null,
                "fuse_unk": false,
                "byte_fallback": false,
                "ignore_merges": false,
                "vocab": vocab,
                "merges": merges,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_hugging_face() {
        assert_eq!(
            hf_tensor_name("token_embd.weight").unwrap(),
            "model.embed_tokens.weight"
        );
        assert_eq!(
            hf_tensor_name("blk.12.attn_q.bias").unwrap(),
            "model.layers.12.self_attn.q_proj.bias"
        );
        assert_eq!(
            hf_tensor_name("blk.0.ffn_down.weight").unwrap(),
            "model.layers.0.mlp.down_proj.weight"
        );
        assert_eq!(
            hf_tensor_name("blk.3.ffn_norm.weight").unwrap(),
            "model.layers.3.post_attention_layernorm.weight"
        );
        assert!(hf_tensor_name("blk.x.attn_q.weight").is_none());
        assert!(hf_tensor_name("blk.01.attn_q.weight").is_none());
        assert!(hf_tensor_name("blk.1.attn_q.scale").is_none());
        assert!(hf_tensor_name("rope_freqs.weight").is_none());
    }

    #[test]
    fn alphabet_is_gpt2s() {
        let a = byte_level_alphabet();
        assert_eq!(a[b' ' as usize], 'Ġ');
        assert_eq!(a[b'\n' as usize], 'Ċ');
        assert_eq!(a[b'A' as usize], 'A');
        let distinct: HashSet<char> = a.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
        assert!(a
            .iter()
            .all(|&c| matches!(c as u32, 33..=126 | 161..=172 | 174..=323)));
    }
}
