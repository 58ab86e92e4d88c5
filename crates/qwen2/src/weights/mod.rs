//! Where weight bytes come from. Both file formats end in the same place: a [`TensorStore`] of
//! [`RawTensor`]s named by their Hugging Face checkpoint names, each a shape, a [`DType`] and a byte range
//! inside a memory map. Nothing is copied here; `model.rs` decides what form each tensor is used in.

pub mod arena;
pub mod gguf;
pub mod quant;
pub mod safetensors;

use crate::error::{Error, Result};
use memmap2::Mmap;
use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

/// Element types we can read. Quantized types are stored in blocks (see `quant.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q5_0,
    Q4K,
    Q6K,
}

impl DType {
    /// (elements per block, bytes per block)
    pub fn block(self) -> (usize, usize) {
        match self {
            DType::F32 => (1, 4),
            DType::F16 | DType::BF16 => (1, 2),
            DType::Q8_0 => (32, 34),
            DType::Q5_0 => (32, 22),
            DType::Q4K => (256, 144),
            DType::Q6K => (256, 210),
        }
    }

    /// Bytes needed for `n` elements, or `None` if `n` is not a whole number of blocks or overflows.
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        let (elems, bytes) = self.block();
        if !n.is_multiple_of(elems) {
            return None;
        }
        (n / elems).checked_mul(bytes)
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::Q8_0 => "Q8_0",
            DType::Q5_0 => "Q5_0",
            DType::Q4K => "Q4_K",
            DType::Q6K => "Q6_K",
        }
    }
}

/// A read-only memory map of one model file, shared by every tensor that lives in it.
pub struct MappedFile {
    map: Mmap,
    /// The file itself, for the tables read a row at a time ([`Bytes::read_into`]).
    file: File,
}

impl MappedFile {
    pub fn open(path: &Path) -> Result<Arc<Self>> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the file is mapped read-only. Another process truncating or rewriting a model file while
        // we run is outside what any mmap-based loader (llama.cpp, safetensors) can defend against.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        // Transparent huge pages (a hint, ignored where unsupported). A decode step reads every weight
        // once; in 4 KiB pages that is a page-table entry, often a page walk, per 4 KiB. With this advice
        // Linux reads the file into 2 MiB page-cache folios as the mapping faults, and maps each with one
        // entry. The default model's 128-token decode took 3.41 s in huge pages against 3.85 s in small
        // ones (medians of six runs, alternating, the file evicted and read back before each three).
        // Pages already cached in small folios stay small: see `drop_cached_pages`.
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage);
        let mapped = Arc::new(MappedFile { map, file });
        // Ask for the whole file to be read ahead, on a thread of its own so the load does not wait
        // for the request: a file not in the page cache then streams in while the metadata is parsed
        // and the tokenizer built, and the tensors the load does not read (the default model's
        // `ffn_down`) are there for the first forward pass. On a 2-core VM that drops idle page
        // cache after about a minute, `duet generate` of 8 tokens with the file evicted before each
        // run: 958 ms against 1000 (medians of 18 alternations, 13 faster); the load alone the same,
        // and as much of the file mapped in huge pages. A hint: any failure only leaves the faults
        // to read the file as before.
        #[cfg(unix)]
        {
            let m = Arc::clone(&mapped);
            let _ = std::thread::Builder::new()
                .name("duet-readahead".into())
                .spawn(move || m.map.advise(memmap2::Advice::WillNeed));
        }
        Ok(mapped)
    }

    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// Takes the whole pages inside `offset..offset + len` out of this process's resident set, once a
    /// tensor there has been converted into memory of our own: the file's bytes and the converted copy
    /// are then not both held. The pages stay in the page cache; reading them again faults them back.
    /// `for_good`: the range is never read again, see below.
    fn release(&self, offset: usize, len: usize, for_good: bool) {
        const PAGE: usize = 4096;
        let (start, end) = (offset.next_multiple_of(PAGE), (offset + len) / PAGE * PAGE);
        if end <= start || end > self.map.len() {
            return;
        }
        #[cfg(unix)]
        // SAFETY: the mapping is read-only and file-backed, so MADV_DONTNEED cannot discard anything:
        // the next read of the range faults in the same file contents (the file is not changed under
        // us; see `open`). Borrowed slices of it therefore see no change.
        let _ = unsafe {
            self.map
                .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
        };
        // And never again in huge pages: a read of a tensor beside the range (a norm, a mapped matrix)
        // would otherwise map the whole 2 MiB page it shares with the range back in. With the default
        // model's Q5_0 matrices laid out again at load, that brought ~50 MB of released bytes back (a
        // load, 64-token prefill and 16-token decode: 495 MiB resident, 447 with this, against 450
        // before the Q5_0 copies); its decode ran 1.001× as fast (8 of 16 rounds, alternated). Once a
        // tensor (`for_good`), not for each part released on the way: each such call splits the mapping,
        // and per 1 MiB part the default model's load took 0.30–0.38 s instead of 0.24–0.27.
        #[cfg(target_os = "linux")]
        if for_good {
            let _ = self
                .map
                .advise_range(memmap2::Advice::NoHugePage, start, end - start);
        }
    }
}

/// Drops a synced file's pages from the page cache (a hint), for the model files the engine writes (the
/// fetched GGUF, converted directories). Written pages stay cached as small folios, which a mapping cannot
/// map as huge pages whatever it is advised; read back through [`MappedFile`], the file comes in as 2 MiB
/// folios instead. A freshly copied default model had none of its ~390 MiB read per run mapped in huge
/// pages, the same file evicted first ~370 MiB.
pub fn drop_cached_pages(file: &File) {
    #[cfg(target_os = "linux")]
    let _ = rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::DontNeed);
    #[cfg(not(target_os = "linux"))]
    let _ = file;
}

/// A byte range of a mapped file. Constructed only after the range was checked against the file size.
#[derive(Clone)]
pub struct Bytes {
    file: Arc<MappedFile>,
    offset: usize,
    len: usize,
}

impl Bytes {
    pub fn new(file: Arc<MappedFile>, offset: usize, len: usize) -> Option<Self> {
        let end = offset.checked_add(len)?;
        (end <= file.bytes().len()).then_some(Bytes { file, offset, len })
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.file.bytes()[self.offset..self.offset + self.len]
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies the bytes `start..start + buf.len()` of this range into `buf` by a positioned read of the
    /// file, not through the mapping.
    ///
    /// Why: a page fault maps a whole page-cache folio, and this file is read in 2 MiB folios (see
    /// `MappedFile::open`; Linux 6.18 mapped all of a folio at one fault here, even where the range was
    /// advised out of huge pages). A table read a row at a time through the mapping soon has nearly all of
    /// itself in the process's resident set: the default model's untied embedding table (Q5_0, 94 MB)
    /// after 50 rows spread over the vocabulary, against the 31 KB those rows hold. A read copies only
    /// the row (the page cache keeps the file either way). Should the read fail, the bytes are copied
    /// from the mapping as before.
    pub fn read_into(&self, start: usize, buf: &mut [u8]) {
        let end = start.checked_add(buf.len());
        assert!(
            end.is_some_and(|end| end <= self.len),
            "bytes {start}.. (+{}) outside a range of {}",
            buf.len(),
            self.len
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::FileExt;
            let at = (self.offset + start) as u64;
            if self.file.file.read_exact_at(buf, at).is_ok() {
                return;
            }
        }
        buf.copy_from_slice(&self.as_slice()[start..start + buf.len()]);
    }

    /// See `MappedFile::release`: for a range whose contents now live elsewhere.
    pub fn release(&self) {
        self.file.release(self.offset, self.len, true);
    }

    /// The bytes `start..start + len` of this range (clipped to it) out of the resident set, while the
    /// rest is still being converted; [`Bytes::release`] follows for the whole range.
    pub fn release_part(&self, start: usize, len: usize) {
        let start = start.min(self.len);
        let len = len.min(self.len - start);
        self.file.release(self.offset + start, len, false);
    }
}

/// One tensor as stored: shape in Hugging Face order (rows first), element type, bytes.
#[derive(Clone)]
pub struct RawTensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub bytes: Bytes,
}

impl RawTensor {
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }
}

/// All tensors of a checkpoint, by their Hugging Face names (`model.layers.0.self_attn.q_proj.weight`, ...).
#[derive(Default)]
pub struct TensorStore {
    pub tensors: HashMap<String, RawTensor>,
}

impl TensorStore {
    pub fn get(&self, name: &str) -> Result<&RawTensor> {
        self.tensors
            .get(name)
            .ok_or_else(|| Error::tensor(name, "missing from the checkpoint"))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Checks that a tensor has exactly `shape`, naming both shapes when it does not.
    pub fn get_shaped(&self, name: &str, shape: &[usize]) -> Result<&RawTensor> {
        let t = self.get(name)?;
        if t.shape != shape {
            return Err(Error::tensor(
                name,
                format!(
                    "shape {:?} disagrees with the config, which implies {:?}",
                    t.shape, shape
                ),
            ));
        }
        Ok(t)
    }
}

/// Widens any stored tensor to FP32 values (exactly: every supported type is a subset of f32).
pub fn to_f32_vec(name: &str, t: &RawTensor) -> Result<Vec<f32>> {
    let n = t.elements();
    let bytes = t.bytes.as_slice();
    if t.dtype.bytes_for(n) != Some(bytes.len()) {
        return Err(Error::tensor(
            name,
            format!(
                "{} bytes do not hold {n} {} values",
                bytes.len(),
                t.dtype.name()
            ),
        ));
    }
    Ok(match t.dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
            .collect(),
        q => quant::dequantize(q, bytes, n).map_err(|m| Error::tensor(name, m))?,
    })
}

/// Opens a model: a `.gguf` file, or a Hugging Face directory with safetensors.
pub fn is_gguf(path: &Path) -> bool {
    path.is_file()
        && std::fs::File::open(path)
            .and_then(|mut f| {
                let mut magic = [0u8; 4];
                std::io::Read::read_exact(&mut f, &mut magic).map(|_| magic == *b"GGUF")
            })
            .unwrap_or(false)
}
