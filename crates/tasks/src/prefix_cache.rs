//! `PromptCache`: the KV state of fixed prompt prefixes, computed once per loaded model and reused by
//! every request that starts with the same prefix. Memory is bounded: least recently used entries go first.
//!
//! Optionally a directory keeps them across runs too ([`PromptCache::use_disk`]): a one-shot command
//! then skips the prefix's prefill (~1.3 s for each of the dual task's two prompts on a 2-core machine).

use crate::error::Result;
use qwen2::{KvCache, Logits, Model, PREFILL_CHUNK};
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
    /// The prefix (on a hit) or the library part it starts with (on a miss) was read from the disk
    /// directory.
    pub from_disk: bool,
    /// On a miss, how many of its leading ids were already cached (0: none); only those after them ran.
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
    ///
    /// The first `persist_len` ids of the prefix are library text (system prompt, examples) that may be
    /// kept in the disk directory; 0 if none. A conversation's prefix holds its earlier turns after
    /// them: only that library part goes to disk, shared with one-shot commands. `progress` is told how
    /// far a long prefix has got.
    pub fn prepare(
        &mut self,
        model: &Model,
        prefix_ids: &[u32],
        full_ids: &[u32],
        capacity: usize,
        persist_len: usize,
        progress: &(dyn Fn(usize, usize) + Sync),
    ) -> Result<Prepared> {
        let mut cache = KvCache::new(&model.config, capacity)?;
        let nothing = |cache| {
            Ok(Prepared {
                cache,
                reused: 0,
                hit: false,
                from_disk: false,
                extended_from: 0,
            })
        };
        if self.max_bytes == 0 {
            return nothing(cache); // caching disabled
        }
        // Keep at least one token of the request to run, so the caller always gets fresh logits.
        if prefix_ids.is_empty()
            || !full_ids.starts_with(prefix_ids)
            || prefix_ids.len() >= full_ids.len()
        {
            return nothing(cache);
        }
        self.clock += 1;
        let now = self.clock;
        let persist_len = persist_len.min(prefix_ids.len());
        if let Some(e) = self.entries.iter_mut().find(|e| e.ids == prefix_ids) {
            e.last_used = now;
            cache.copy_prefix_from(&e.kv, prefix_ids.len())?;
            self.hits += 1;
            return Ok(Prepared {
                cache,
                reused: prefix_ids.len(),
                hit: true,
                from_disk: false,
                extended_from: 0,
            });
        }
        // A copy on disk from an earlier run, if the whole prefix may be kept there; else computed.
        let saved = (persist_len == prefix_ids.len())
            .then(|| self.read_disk(model, prefix_ids))
            .flatten();
        let hit = saved.is_some();
        let (kv, from_disk, extended_from) = match saved {
            Some(kv) => {
                self.hits += 1;
                (kv, true, 0)
            }
            None => {
                self.misses += 1;
                self.compute(model, prefix_ids, persist_len, now, progress)?
            }
        };
        cache.copy_prefix_from(&kv, prefix_ids.len())?;
        self.insert(Entry {
            ids: prefix_ids.to_vec(),
            kv,
            last_used: now,
        });
        Ok(Prepared {
            cache,
            reused: prefix_ids.len(),
            hit,
            from_disk,
            extended_from,
        })
    }

    /// The KV state of a prefix that is not cached whole, and as [`Prepared`] has them, `from_disk` and
    /// `extended_from`. The longest cached prefix of it is copied and only the ids after it run: a
    /// conversation's prefix holds its earlier turns, so it is new every turn, and it extends the
    /// previous turn's.
    fn compute(
        &mut self,
        model: &Model,
        prefix_ids: &[u32],
        persist_len: usize,
        now: u64,
        progress: &(dyn Fn(usize, usize) + Sync),
    ) -> Result<(KvCache, bool, usize)> {
        let mut kv = KvCache::new(&model.config, prefix_ids.len())?;
        let mut done = match self
            .entries
            .iter_mut()
            .filter(|e| prefix_ids.starts_with(&e.ids))
            .max_by_key(|e| e.ids.len())
        {
            Some(e) => {
                e.last_used = now;
                kv.copy_prefix_from(&e.kv, e.ids.len())?;
                e.ids.len()
            }
            None => 0,
        };
        let (mut from_disk, mut extended_from) = (false, done);
        if done < persist_len && persist_len < prefix_ids.len() {
            // The library part a conversation's prefix starts with (the first time its system prompt
            // comes up in this process): from disk, or computed and written there, and kept in memory as
            // an entry of its own.
            let base_ids = &prefix_ids[..persist_len];
            let base = match self.read_disk(model, base_ids) {
                Some(base) => {
                    (from_disk, extended_from) = (true, persist_len);
                    base
                }
                None => {
                    let mut base = KvCache::new(&model.config, persist_len)?;
                    base.copy_prefix_from(&kv, done)?;
                    model.prefill(
                        &base_ids[done..],
                        &mut base,
                        Logits::None,
                        PREFILL_CHUNK,
                        progress,
                    )?;
                    self.write_disk(&base, base_ids);
                    base.snapshot()
                }
            };
            kv.copy_prefix_from(&base, persist_len)?;
            done = persist_len;
            self.insert(Entry {
                ids: base_ids.to_vec(),
                kv: base,
                last_used: now,
            });
        }
        model.prefill(
            &prefix_ids[done..],
            &mut kv,
            Logits::None,
            PREFILL_CHUNK,
            progress,
        )?;
        if persist_len == prefix_ids.len() {
            self.write_disk(&kv, prefix_ids);
        }
        Ok((kv.snapshot(), from_disk, extended_from))
    }

    /// The disk directory's copy of `ids`, if it is whole and of their length; anything else (missing,
    /// cut short, another model) is computed again.
    fn read_disk(&self, model: &Model, ids: &[u32]) -> Option<KvCache> {
        let path = self.disk_path(ids)?;
        let kv = KvCache::load(&model.config, &path).ok()?;
        if kv.len() != ids.len() {
            return None;
        }
        // The directory is trimmed oldest first by modification time: a prefix read now is in use, so it
        // should go last, not first because it was written long ago. A hint: failing costs nothing.
        let _ =
            std::fs::File::open(&path).and_then(|f| f.set_modified(std::time::SystemTime::now()));
        Some(kv)
    }

    fn write_disk(&self, kv: &KvCache, ids: &[u32]) {
        if let Some(p) = self.disk_path(ids) {
            keep_on_disk(kv, &p);
        }
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
