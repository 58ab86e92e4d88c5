//! `KvCache`: the keys and values of every position a sequence has seen, one preallocated buffer per
//! layer. Each sequence owns one; the model's weights are shared. Truncating back to a shorter length is
//! how a cached prompt prefix is reused: the positions after it are simply overwritten.

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use std::io::Write;
use std::path::Path;

/// The first bytes of a file [`KvCache::save`] wrote (02: with a checksum at the end).
const FILE_MAGIC: &[u8; 8] = b"DUETKV02";

/// A 64-bit checksum of `bytes`, to refuse a kept cache file whose contents changed on disk: a wrong
/// value of the right size would otherwise go into every later answer unnoticed. Not cryptographic;
/// each step is a bijection of the state, so a change in any one 8-byte word always changes the result,
/// and it costs well under a millisecond for a prefix's few MiB.
fn checksum(bytes: &[u8]) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut words = bytes.chunks_exact(8);
    let mut h = K ^ bytes.len() as u64;
    for w in words.by_ref() {
        h = (h.rotate_left(23) ^ u64::from_le_bytes(w.try_into().unwrap())).wrapping_mul(K);
    }
    for &b in words.remainder() {
        h = (h.rotate_left(23) ^ b as u64).wrapping_mul(K);
    }
    h ^ (h >> 29)
}

#[derive(Clone)]
pub struct KvCache {
    /// Per layer: `capacity × kv_dim` keys (already rotated) and values.
    pub(crate) k: Vec<Vec<f32>>,
    pub(crate) v: Vec<Vec<f32>>,
    kv_dim: usize,
    len: usize,
    capacity: usize,
}

impl KvCache {
    /// A cache for up to `capacity` positions (at most the model's context length).
    pub fn new(config: &ModelConfig, capacity: usize) -> Result<Self> {
        let capacity = capacity.min(config.max_position_embeddings).max(1);
        let kv_dim = config.kv_dim();
        let per_layer = capacity
            .checked_mul(kv_dim)
            .ok_or_else(|| Error::Invalid("KV cache size overflows".into()))?;
        // vec![0.0; n] is a zeroed allocation: pages are only committed as positions are written.
        Ok(KvCache {
            k: (0..config.num_hidden_layers)
                .map(|_| vec![0.0; per_layer])
                .collect(),
            v: (0..config.num_hidden_layers)
                .map(|_| vec![0.0; per_layer])
                .collect(),
            kv_dim,
            len: 0,
            capacity,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets every position from `len` on.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Room check before a forward pass writes `n` more positions.
    pub(crate) fn reserve(&self, n: usize) -> Result<()> {
        let needed = self.len + n;
        if needed > self.capacity {
            return Err(Error::ContextOverflow {
                needed,
                max: self.capacity,
            });
        }
        Ok(())
    }

    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }

    pub(crate) fn kv_dim(&self) -> usize {
        self.kv_dim
    }

    /// Bytes held by the positions in use (what copying this state costs).
    pub fn used_bytes(&self) -> usize {
        2 * self.k.len() * self.len * self.kv_dim * 4
    }

    /// Copies the first `len` positions of `other` into this cache (both for the same model).
    pub fn copy_prefix_from(&mut self, other: &KvCache, len: usize) -> Result<()> {
        if len > other.len
            || len > self.capacity
            || other.kv_dim != self.kv_dim
            || other.k.len() != self.k.len()
        {
            return Err(Error::Invalid(
                "KV cache prefix copy between mismatched caches".into(),
            ));
        }
        let n = len * self.kv_dim;
        for l in 0..self.k.len() {
            self.k[l][..n].copy_from_slice(&other.k[l][..n]);
            self.v[l][..n].copy_from_slice(&other.v[l][..n]);
        }
        self.len = len;
        Ok(())
    }

    /// Writes the used positions to `path`, for a prefix cache kept across runs: a header (layers, kv_dim,
    /// positions as u64), every layer's keys and every layer's values as little-endian f32, then a
    /// checksum of all that (u64). Written to a temporary file and renamed into place, so a reader never
    /// sees half a file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let n = self.len * self.kv_dim;
        let mut bytes = Vec::with_capacity(32 + 2 * self.k.len() * n * 4 + 8);
        bytes.extend_from_slice(FILE_MAGIC);
        for n in [self.k.len(), self.kv_dim, self.len] {
            bytes.extend_from_slice(&(n as u64).to_le_bytes());
        }
        for layer in self.k.iter().chain(&self.v) {
            for x in &layer[..n] {
                bytes.extend_from_slice(&x.to_le_bytes());
            }
        }
        bytes.extend_from_slice(&checksum(&bytes).to_le_bytes());
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::io(path, e)
        })
    }

    /// Reads a file [`save`](Self::save) wrote, checking that it fits `config`'s model: a cache with
    /// exactly the saved positions.
    pub fn load(config: &ModelConfig, path: &Path) -> Result<KvCache> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let bad = |why: &str| {
            Error::Invalid(format!(
                "{}: not a usable KV cache file: {why}",
                path.display()
            ))
        };
        let (magic, _) = bytes.split_at_checked(8).ok_or_else(|| bad("too short"))?;
        if magic != FILE_MAGIC {
            return Err(bad("wrong magic"));
        }
        let (body, sum) = bytes
            .split_at_checked(bytes.len().saturating_sub(8))
            .filter(|(body, _)| body.len() >= 32)
            .ok_or_else(|| bad("too short"))?;
        if checksum(body).to_le_bytes() != sum {
            return Err(bad(
                "checksum mismatch (the file changed after it was written)",
            ));
        }
        // The body holds at least the magic and the three header words (checked above).
        let word = |i: usize| {
            let at = 8 + 8 * i;
            u64::from_le_bytes(body[at..at + 8].try_into().unwrap()) as usize
        };
        let (layers, kv_dim, len) = (word(0), word(1), word(2));
        if layers != config.num_hidden_layers || kv_dim != config.kv_dim() {
            return Err(bad("made for a different model"));
        }
        if len == 0 || len > config.max_position_embeddings {
            return Err(bad("bad length"));
        }
        let data = &body[32..];
        if Some(data.len()) != (2 * layers).checked_mul(len * kv_dim * 4) {
            return Err(bad("wrong size"));
        }
        let mut layers_data = data.chunks_exact(len * kv_dim * 4).map(|layer| {
            layer
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect::<Vec<f32>>()
        });
        let k = layers_data.by_ref().take(layers).collect();
        let v = layers_data.collect();
        Ok(KvCache {
            k,
            v,
            kv_dim,
            len,
            capacity: len,
        })
    }

    /// A compact copy holding only the used positions (for a prefix cache).
    pub fn snapshot(&self) -> KvCache {
        let n = self.len * self.kv_dim;
        KvCache {
            k: self.k.iter().map(|l| l[..n].to_vec()).collect(),
            v: self.v.iter().map(|l| l[..n].to_vec()).collect(),
            kv_dim: self.kv_dim,
            len: self.len,
            capacity: self.len,
        }
    }
}
