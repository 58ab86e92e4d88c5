//! `KvCache`: the keys and values of every position a sequence has seen, one preallocated buffer per
//! layer. Each sequence owns one; the model's weights are shared. Truncating back to a shorter length is
//! how a cached prompt prefix is reused: the positions after it are simply overwritten.

use crate::config::ModelConfig;
use crate::error::{Error, Result};

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
