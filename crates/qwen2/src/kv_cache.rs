//! `KvCache`: the keys and values of every position a sequence has seen, one preallocated buffer per
//! layer. Each sequence owns one; the model's weights are shared. Truncating back to a shorter length is
//! how a cached prompt prefix is reused: the positions after it are simply overwritten.
//!
//! A layer's buffer is KV-head-major: head `h`'s rows for all positions, then head `h + 1`'s. Attention
//! runs one task per KV head, so each task reads one contiguous stream. With position-major rows (all
//! heads of a position side by side), the two tasks of a decode step read alternate halves of the same
//! rows, and a 3037-token cache was read at two thirds of the speed (24 layers' attention, A/B in one
//! process).

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use std::io::Write;
use std::path::Path;

/// The first bytes of a file [`KvCache::save`] wrote (02: with a checksum at the end; 03: KV-head-major).
const FILE_MAGIC: &[u8; 8] = b"DUETKV03";

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
    /// Per layer: keys (already rotated) and values, `n_kv_heads × capacity × head_dim`.
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    n_kv_heads: usize,
    head_dim: usize,
    len: usize,
    capacity: usize,
}

impl KvCache {
    /// A cache for up to `capacity` positions (at most the model's context length).
    pub fn new(config: &ModelConfig, capacity: usize) -> Result<Self> {
        let capacity = capacity.min(config.max_position_embeddings).max(1);
        let per_layer = capacity
            .checked_mul(config.kv_dim())
            .ok_or_else(|| Error::Invalid("KV cache size overflows".into()))?;
        // vec![0.0; n] is a zeroed allocation: pages are only committed as positions are written.
        let layers = || {
            (0..config.num_hidden_layers)
                .map(|_| vec![0.0; per_layer])
                .collect()
        };
        Ok(KvCache {
            k: layers(),
            v: layers(),
            n_kv_heads: config.num_key_value_heads,
            head_dim: config.head_dim,
            len: 0,
            capacity,
        })
    }

    /// Whether this cache was made for a model of `config`'s shape.
    pub(crate) fn fits(&self, config: &ModelConfig) -> bool {
        self.k.len() == config.num_hidden_layers
            && self.n_kv_heads == config.num_key_value_heads
            && self.head_dim == config.head_dim
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
        self.n_kv_heads * self.head_dim
    }

    /// Stores the keys and values of `k.len() / kv_dim` new positions from `start` in layer `l`; `k` and
    /// `v` hold one row of all KV heads per position, as the projections make them.
    pub(crate) fn store(&mut self, l: usize, start: usize, k: &[f32], v: &[f32]) {
        let (hd, cap) = (self.head_dim, self.capacity);
        for (i, (kr, vr)) in k
            .chunks_exact(self.kv_dim())
            .zip(v.chunks_exact(self.kv_dim()))
            .enumerate()
        {
            for h in 0..self.n_kv_heads {
                let at = (h * cap + start + i) * hd;
                self.k[l][at..at + hd].copy_from_slice(&kr[h * hd..][..hd]);
                self.v[l][at..at + hd].copy_from_slice(&vr[h * hd..][..hd]);
            }
        }
    }

    /// Layer `l`'s keys and values: KV head `h` at position `p` is at `(h · capacity + p) · head_dim`.
    pub(crate) fn layer(&self, l: usize) -> (&[f32], &[f32]) {
        (&self.k[l], &self.v[l])
    }

    /// The first `len` positions of every KV head of one layer buffer laid out for `capacity` positions.
    fn heads<'a>(
        &self,
        layer: &'a [f32],
        capacity: usize,
        len: usize,
    ) -> impl Iterator<Item = &'a [f32]> {
        let hd = self.head_dim;
        (0..self.n_kv_heads).map(move |h| &layer[h * capacity * hd..][..len * hd])
    }

    /// Bytes held by the positions in use (what copying this state costs).
    pub fn used_bytes(&self) -> usize {
        2 * self.k.len() * self.len * self.kv_dim() * 4
    }

    /// Copies the first `len` positions of `other` into this cache (both for the same model).
    pub fn copy_prefix_from(&mut self, other: &KvCache, len: usize) -> Result<()> {
        if len > other.len
            || len > self.capacity
            || (other.n_kv_heads, other.head_dim) != (self.n_kv_heads, self.head_dim)
            || other.k.len() != self.k.len()
        {
            return Err(Error::Invalid(
                "KV cache prefix copy between mismatched caches".into(),
            ));
        }
        let (hd, cap) = (self.head_dim, self.capacity);
        let pairs = self.k.iter_mut().zip(&other.k);
        for (dst, src) in pairs.chain(self.v.iter_mut().zip(&other.v)) {
            for (h, src) in other.heads(src, other.capacity, len).enumerate() {
                dst[h * cap * hd..][..len * hd].copy_from_slice(src);
            }
        }
        self.len = len;
        Ok(())
    }

    /// Writes the used positions to `path`, for a prefix cache kept across runs: a header (layers, kv_dim,
    /// positions as u64), every layer's keys and every layer's values as little-endian f32 (KV head by KV
    /// head, each its positions in order), then a checksum of all that (u64). Written to a temporary file
    /// and renamed into place, so a reader never sees half a file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let mut bytes = Vec::with_capacity(32 + self.used_bytes() + 8);
        bytes.extend_from_slice(FILE_MAGIC);
        for n in [self.k.len(), self.kv_dim(), self.len] {
            bytes.extend_from_slice(&(n as u64).to_le_bytes());
        }
        for layer in self.k.iter().chain(&self.v) {
            for head in self.heads(layer, self.capacity, self.len) {
                for x in head {
                    bytes.extend_from_slice(&x.to_le_bytes());
                }
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
        // Saved head by head with `len` positions each: the layout of a cache of capacity `len`.
        let k = layers_data.by_ref().take(layers).collect();
        let v = layers_data.collect();
        Ok(KvCache {
            k,
            v,
            n_kv_heads: config.num_key_value_heads,
            head_dim: config.head_dim,
            len,
            capacity: len,
        })
    }

    /// A compact copy holding only the used positions (for a prefix cache).
    pub fn snapshot(&self) -> KvCache {
        let compact = |l: &Vec<f32>| {
            self.heads(l, self.capacity, self.len)
                .flatten()
                .copied()
                .collect()
        };
        KvCache {
            k: self.k.iter().map(compact).collect(),
            v: self.v.iter().map(compact).collect(),
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            len: self.len,
            capacity: self.len,
        }
    }
}
