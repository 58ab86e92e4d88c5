//! `PromptCache`: the KV state of fixed prompt prefixes, computed once per loaded model and reused by
//! every request that starts with the same prefix. Memory is bounded: least recently used entries go first.

use crate::error::Result;
use qwen2::{KvCache, Logits, Model};

struct Entry {
    ids: Vec<u32>,
    kv: KvCache,
    last_used: u64,
}

pub struct PromptCache {
    entries: Vec<Entry>,
    max_bytes: usize,
    clock: u64,
    pub hits: u64,
    pub misses: u64,
}

/// The result of preparing a request: a cache holding the reused prefix, and how many ids it covers.
pub struct Prepared {
    pub cache: KvCache,
    pub reused: usize,
    pub hit: bool,
}

impl PromptCache {
    /// A cache bounded to `max_bytes`; 0 disables it (every request computes its whole prompt).
    pub fn new(max_bytes: usize) -> Self {
        PromptCache {
            entries: Vec::new(),
            max_bytes,
            clock: 0,
            hits: 0,
            misses: 0,
        }
    }

    pub fn bytes(&self) -> usize {
        self.entries.iter().map(|e| e.kv.used_bytes()).sum()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// Returns a fresh cache of `capacity` positions, already holding `prefix_ids` (computed now if this
    /// prefix was not seen before). `full_ids` must start with `prefix_ids`; if it does not (a tokenizer
    /// merge across the boundary), nothing is reused and the result is still exact.
    pub fn prepare(
        &mut self,
        model: &Model,
        prefix_ids: &[u32],
        full_ids: &[u32],
        capacity: usize,
    ) -> Result<Prepared> {
        let mut cache = KvCache::new(&model.config, capacity)?;
        if self.max_bytes == 0 {
            return Ok(Prepared {
                cache,
                reused: 0,
                hit: false,
            }); // caching disabled
        }
        // Keep at least one token of the request to run, so the caller always gets fresh logits.
        if prefix_ids.is_empty()
            || !full_ids.starts_with(prefix_ids)
            || prefix_ids.len() >= full_ids.len()
        {
            return Ok(Prepared {
                cache,
                reused: 0,
                hit: false,
            });
        }
        self.clock += 1;
        let now = self.clock;
        let found = self.entries.iter_mut().find(|e| e.ids == prefix_ids);
        let hit = found.is_some();
        match found {
            Some(e) => {
                e.last_used = now;
                cache.copy_prefix_from(&e.kv, prefix_ids.len())?;
                self.hits += 1;
            }
            None => {
                let mut kv = KvCache::new(&model.config, prefix_ids.len())?;
                model.forward(prefix_ids, &mut kv, Logits::None)?;
                cache.copy_prefix_from(&kv, prefix_ids.len())?;
                self.misses += 1;
                self.insert(Entry {
                    ids: prefix_ids.to_vec(),
                    kv: kv.snapshot(),
                    last_used: now,
                });
            }
        }
        Ok(Prepared {
            cache,
            reused: prefix_ids.len(),
            hit,
        })
    }

    fn insert(&mut self, e: Entry) {
        let size = e.kv.used_bytes();
        if size > self.max_bytes {
            return; // larger than the whole budget: compute it each time instead
        }
        while self.bytes() + size > self.max_bytes {
            let Some(oldest) = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(i, _)| i)
            else {
                break;
            };
            self.entries.swap_remove(oldest);
        }
        self.entries.push(e);
    }
}
