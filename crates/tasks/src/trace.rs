//! What the teaching view (`--trace`) shows: each event names the function that produced it.

use crate::runner::LabelScore;

#[derive(Debug, Clone)]
pub enum TraceEvent {
    /// `prompt::build`: the rendered chat prompt and where the fixed prefix ends.
    Prompt {
        task: String,
        text: String,
        prefix_chars: usize,
    },
    /// `Tokenizer::encode`: ids with their text pieces; the first `cached` came from the prefix cache.
    Tokens {
        ids: Vec<(u32, String)>,
        cached: usize,
    },
    /// `PromptCache::prefix`: hit or miss, and the cache's memory.
    Cache {
        hit: bool,
        /// The hit, or a miss's first `extended_from` ids, came from the disk directory (an earlier run).
        from_disk: bool,
        /// A miss computed after this many leading ids that were cached (a conversation's previous turn).
        extended_from: usize,
        prefix_tokens: usize,
        cache_bytes: usize,
        entries: usize,
    },
    /// `Runner::classify`: every label's log-probability and normalised probability.
    Labels { scores: Vec<LabelScore> },
    /// `qwen2::generate` → `Sampler::sample`: the chosen token and the best candidates.
    Token {
        id: u32,
        piece: String,
        candidates: Vec<(String, f32)>,
    },
    /// `PhraseGuard`: the text came to contain a phrase to avoid; generation went back to new token
    /// `token` (counted from 1) and ruled out `piece` there.
    Avoided {
        phrase: String,
        token: usize,
        piece: String,
    },
    /// Time spent in a stage.
    Timing { stage: String, ms: f64 },
}
