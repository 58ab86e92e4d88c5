//! `PromptCache`: the KV state of fixed prompt prefixes, computed once per loaded model and reused by
//! every request that starts with the same prefix. Memory is bounded: least recently used entries go first.
//!
//! Optionally a directory keeps them across runs too ([`PromptCache::use_disk`]): a one-shot command
//! then skips the prefix's prefill (~1.3 s for each of the dual task's two prompts on a 2-core machine).

use crate::error::Result;
use qwen2::{KvCache, Logits, Model};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// Prefix files kept in the directory; older ones are removed (each is a few MiB).
pub const DISK_MAX_FILES: usize = 64;

/// Where prefixes are kept across runs, for one model, weight form and engine build: `key` names all
/// three, so a file is only ever read back by the computation that wrote it.
struct DiskTier {
    dir: PathBuf,
    key: String,
}

struct Entry {
    ids: Vec<u32>,
    kv: KvCache,
    last_used: u64,
}

pub struct PromptCache {
    entries: Vec<Entry>,
    max_bytes: usize,
    clock: u64,
    disk: Option<DiskTier>,
    pub hits: u64,
    pub misses: u64,
}

/// The result of preparing a request: a cache holding the reused prefix, and how many ids it covers.
pub struct Prepared {
    pub cache: KvCache,
    pub reused: usize,
    pub hit: bool,
    /// The hit was read from the disk directory.
    pub from_disk: bool,
    /// On a miss, the length of a shorter cached prefix the new one was computed from (0: none).
    pub extended_from: usize,
}

impl PromptCache {
    /// A cache bounded to `max_bytes`; 0 disables it (every request computes its whole prompt).
    pub fn new(max_bytes: usize) -> Self {
        PromptCache {
            entries: Vec::new(),
            max_bytes,
            clock: 0,
            disk: None,
            hits: 0,
            misses: 0,
        }
    }

    /// Also keeps prefixes in `dir` across runs. `key` must change whenever the KV values of a prefix
    /// could: another model file, weight form or engine build.
    pub fn use_disk(&mut self, dir: PathBuf, key: String) {
        self.disk = Some(DiskTier { dir, key });
    }

    /// The file for `ids` in the disk directory, if there is one.
    fn disk_path(&self, ids: &[u32]) -> Option<PathBuf> {
        let d = self.disk.as_ref()?;
        let mut h = Sha256::new();
        h.update(d.key.as_bytes());
        h.update([0]);
        for id in ids {
            h.update(id.to_le_bytes());
        }
        Some(d.dir.join(format!("{:x}.kv", h.finalize())))
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
        persist: bool,
    ) -> Result<Prepared> {
        let mut cache = KvCache::new(&model.config, capacity)?;
        if self.max_bytes == 0 {
            return Ok(Prepared {
                cache,
                reused: 0,
                hit: false,
                from_disk: false,
                extended_from: 0,
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
                from_disk: false,
                extended_from: 0,
            });
        }
        self.clock += 1;
        let now = self.clock;
        let found = self.entries.iter_mut().find(|e| e.ids == prefix_ids);
        let hit = found.is_some();
        let (mut from_disk, mut extended_from) = (false, 0);
        match found {
            Some(e) => {
                e.last_used = now;
                cache.copy_prefix_from(&e.kv, prefix_ids.len())?;
                self.hits += 1;
            }
            None => {
                // A copy on disk from an earlier run, if it is whole and of this prefix's length;
                // anything else (missing, cut short, another model) is computed again.
                let path = if persist {
                    self.disk_path(prefix_ids)
                } else {
                    None
                };
                let saved = path
                    .as_deref()
                    .and_then(|p| KvCache::load(&model.config, p).ok())
                    .filter(|kv| kv.len() == prefix_ids.len());
                let kv = match saved {
                    Some(kv) => {
                        from_disk = true;
                        self.hits += 1;
                        kv
                    }
                    None => {
                        // The longest cached prefix of this one is copied and only the tokens after it
                        // run: a conversation's prefix holds its earlier turns, so it is new every turn,
                        // and it extends the previous turn's.
                        let mut kv = KvCache::new(&model.config, prefix_ids.len())?;
                        extended_from = self
                            .entries
                            .iter_mut()
                            .filter(|e| prefix_ids.starts_with(&e.ids))
                            .max_by_key(|e| e.ids.len())
                            .map_or(Ok(0), |e| {
                                e.last_used = now;
                                kv.copy_prefix_from(&e.kv, e.ids.len())
                                    .map(|()| e.ids.len())
                            })?;
                        model.forward(&prefix_ids[extended_from..], &mut kv, Logits::None)?;
                        self.misses += 1;
                        if let Some(p) = &path {
                            keep_on_disk(&kv, p);
                        }
                        kv.snapshot()
                    }
                };
                cache.copy_prefix_from(&kv, prefix_ids.len())?;
                self.insert(Entry {
                    ids: prefix_ids.to_vec(),
                    kv,
                    last_used: now,
                });
            }
        }
        Ok(Prepared {
            cache,
            reused: prefix_ids.len(),
            hit: hit || from_disk,
            from_disk,
            extended_from,
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

/// Writes `kv` to `path` and trims the directory to [`DISK_MAX_FILES`], oldest first. Failing to keep a
/// prefix costs only its recomputation next time, so errors are ignored.
fn keep_on_disk(kv: &KvCache, path: &Path) {
    let Some(dir) = path.parent() else { return };
    if std::fs::create_dir_all(dir).is_err() || kv.save(path).is_err() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut files: Vec<(std::time::SystemTime, PathBuf)> = entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "kv"))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    if files.len() > DISK_MAX_FILES {
        files.sort();
        for (_, p) in &files[..files.len() - DISK_MAX_FILES] {
            let _ = std::fs::remove_file(p);
        }
    }
}
