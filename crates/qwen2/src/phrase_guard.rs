//! Steering generated text away from phrases it must not contain. A small model out of its depth answers
//! a plain complaint with "I'm sorry, but I can't assist with that."; listing ", but I can't" turns it
//! to "I'm sorry to hear …". When the text comes to contain a listed phrase, generation goes back to the
//! token where the phrase began and takes the best other token there (elsewhere called banned strings
//! with backtracking). So that nothing shown has to be taken back, text that could still grow into a
//! phrase is held back from the stream until it cannot.
//!
//! This module keeps the books — what is safe to show, where a phrase begins, which token is ruled out
//! where — over the generated text and `ends[k]`, its length in bytes after generated token `k`.
//! [`crate::generate()`] does the going back (the KV cache, the logits).

/// Times generation may go back, per generation: each costs a forward pass, and after that many the
/// phrases pass (a reply that keeps returning to one is better finished than stalled).
pub const MAX_REWINDS: usize = 8;

#[derive(Debug, Clone, Default)]
pub struct PhraseGuard {
    /// The phrases as given, and with ASCII letters lowercased: matching ignores ASCII case ("I can't"
    /// = "i can't").
    phrases: Vec<(String, String)>,
    /// Tokens ruled out: (index among the generated tokens, id).
    ruled_out: Vec<(usize, u32)>,
    rewinds: usize,
}

/// A phrase found in the text, and the generated token it began in: the one to replace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// As given.
    pub phrase: String,
    pub token: usize,
}

impl PhraseGuard {
    /// A guard against `phrases` (empty ones are ignored).
    pub fn new(phrases: &[String]) -> Self {
        PhraseGuard {
            phrases: phrases
                .iter()
                .filter(|p| !p.is_empty())
                .map(|p| (p.clone(), p.to_ascii_lowercase()))
                .collect(),
            ..Default::default()
        }
    }

    /// Whether it still steers: it has phrases and has not gone back [`MAX_REWINDS`] times.
    pub fn is_active(&self) -> bool {
        !self.phrases.is_empty() && self.rewinds < MAX_REWINDS
    }

    /// How many times generation went back.
    pub fn rewinds(&self) -> usize {
        self.rewinds
    }

    /// The first phrase in `text` that starts at or after byte `from` (the text not yet shown), if the
    /// guard is active.
    pub fn find(&self, text: &str, from: usize, ends: &[usize]) -> Option<Found> {
        if !self.is_active() {
            return None;
        }
        let rest = text[from..].to_ascii_lowercase();
        let (at, (phrase, _)) = self
            .phrases
            .iter()
            .filter_map(|p| rest.find(p.1.as_str()).map(|at| (at, p)))
            .min_by_key(|&(at, _)| at)?;
        Some(Found {
            phrase: phrase.clone(),
            token: token_at(ends, from + at),
        })
    }

    /// How much of `text` may be shown: all of it, unless some end of it from byte `from` on could still
    /// grow into a phrase; then the text before the token where that end begins.
    pub fn safe_len(&self, text: &str, from: usize, ends: &[usize]) -> usize {
        if !self.is_active() {
            return text.len();
        }
        let rest = text[from..].to_ascii_lowercase();
        for (at, _) in rest.char_indices() {
            let tail = &rest[at..];
            if self
                .phrases
                .iter()
                .any(|(_, p)| p.len() > tail.len() && p.starts_with(tail))
            {
                return token_start(ends, token_at(ends, from + at)).max(from);
            }
        }
        text.len()
    }

    /// Records going back to generated token `token`, whose id was `id`: that id is ruled out there, and
    /// what was ruled out after it no longer applies (it followed text now taken back).
    pub fn go_back(&mut self, token: usize, id: u32) {
        self.ruled_out.retain(|&(at, _)| at <= token);
        self.ruled_out.push((token, id));
        self.rewinds += 1;
    }

    /// Scores `-∞` for the ids ruled out at generated token `token`, in that step's `logits`.
    pub fn rule_out(&self, token: usize, logits: &mut [f32]) {
        for &(at, id) in &self.ruled_out {
            if at == token {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
    }
}

/// Byte offset where generated token `k`'s text begins.
fn token_start(ends: &[usize], k: usize) -> usize {
    if k == 0 {
        0
    } else {
        ends[k - 1]
    }
}

/// The generated token in which the text's byte `at` (< the text's length) begins: the first whose text
/// reaches past it, or an earlier one that added no text of its own — a character split over tokens
/// appears in the text only with its last part, so its first bytes came with those.
fn token_at(ends: &[usize], at: usize) -> usize {
    let mut k = ends.partition_point(|&end| end <= at);
    while k > 0 && token_start(ends, k - 1) == ends[k - 1] {
        k -= 1;
    }
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(phrases: &[&str]) -> PhraseGuard {
        PhraseGuard::new(&phrases.iter().map(|p| p.to_string()).collect::<Vec<_>>())
    }

    /// `ends` of tokens with these texts.
    fn ends(pieces: &[&str]) -> (String, Vec<usize>) {
        let mut text = String::new();
        let ends = pieces
            .iter()
            .map(|p| {
                text.push_str(p);
                text.len()
            })
            .collect();
        (text, ends)
    }

    #[test]
    fn a_phrase_is_found_in_the_token_where_it_begins() {
        let g = guard(&[", but I CAN'T"]);
        let (text, e) = ends(&["I'm", " sorry", ",", " but", " I", " can", "'t"]);
        assert_eq!(
            g.find(&text, 0, &e),
            Some(Found {
                phrase: ", but I CAN'T".into(),
                token: 2
            })
        );
        // Case is ignored for ASCII letters; a phrase starting inside a token goes back to that token.
        let g = guard(&["BUT I"]);
        let (text, e) = ends(&["I'm sorry,", " but I", " can"]);
        assert_eq!(g.find(&text, 0, &e).map(|f| f.token), Some(1));
        // Only the text from `from` on is searched.
        assert_eq!(g.find(&text, 16, &e), None);
    }

    #[test]
    fn the_earliest_phrase_wins() {
        let g = guard(&["无法帮助", "抱歉，我"]);
        let (text, e) = ends(&["抱歉", "，", "我", "无法", "帮助"]);
        let f = g.find(&text, 0, &e).unwrap();
        assert_eq!((f.phrase.as_str(), f.token), ("抱歉，我", 0));
    }

    #[test]
    fn text_that_could_grow_into_a_phrase_is_held_back() {
        let g = guard(&[", but i can't"]);
        // "," and ", but" could; the held text starts where their token does.
        let (text, e) = ends(&["I'm", " sorry", ","]);
        assert_eq!(g.safe_len(&text, 0, &e), "I'm sorry".len());
        let (text, e) = ends(&["I'm", " sorry", ",", " but"]);
        assert_eq!(g.safe_len(&text, 0, &e), "I'm sorry".len());
        // ", to" cannot: all of it is shown.
        let (text, e) = ends(&["I'm", " sorry", ",", " to"]);
        assert_eq!(g.safe_len(&text, 0, &e), text.len());
        // Held text inside a token holds back the whole token.
        let (text, e) = ends(&["Sorry, b"]);
        assert_eq!(g.safe_len(&text, 0, &e), 0);
        // A whole phrase is no longer a prefix of one: finding it is `find`'s part.
        let (text, e) = ends(&["x", ", but I can't"]);
        assert_eq!(g.safe_len(&text, 0, &e), text.len());
        // Never before what was already shown.
        let (text, e) = ends(&["ab", ", b"]);
        assert_eq!(g.safe_len(&text, 2, &e), 2);
    }

    #[test]
    fn a_character_split_over_tokens_begins_in_its_first_token() {
        // "你" (3 bytes) came as two tokens: the first added no text, the second all three bytes.
        let g = guard(&["你不"]);
        let e = vec![3, 3, 6, 9]; // "好", (first bytes of 你), 你, 不
        let text = "好你不";
        assert_eq!(g.find(text, 0, &e).map(|f| f.token), Some(1));
        assert_eq!(token_at(&e, 0), 0);
        assert_eq!(token_at(&e, 6), 3);
        let g = guard(&["你不是"]);
        assert_eq!(g.safe_len(text, 0, &e), 3);
    }

    #[test]
    fn going_back_rules_out_the_token_there_and_forgets_later_ones() {
        let mut g = guard(&["x"]);
        g.go_back(5, 7);
        g.go_back(3, 9);
        let mut logits = vec![0.0f32; 10];
        g.rule_out(5, &mut logits);
        assert!(
            logits.iter().all(|&l| l == 0.0),
            "the ban at 5 followed text taken back"
        );
        g.rule_out(3, &mut logits);
        assert_eq!(logits[9], f32::NEG_INFINITY);
        assert_eq!(logits.iter().filter(|l| l.is_finite()).count(), 9);
        g.go_back(3, 2);
        let mut logits = vec![0.0f32; 10];
        g.rule_out(3, &mut logits);
        assert_eq!(
            (logits[9], logits[2]),
            (f32::NEG_INFINITY, f32::NEG_INFINITY)
        );
    }

    #[test]
    fn it_stops_steering_after_max_rewinds() {
        let mut g = guard(&["no"]);
        let (text, e) = ends(&["n", "o"]);
        for _ in 0..MAX_REWINDS {
            assert!(g.find(&text, 0, &e).is_some());
            g.go_back(0, 1);
        }
        assert!(!g.is_active());
        assert_eq!(g.find(&text, 0, &e), None);
        assert_eq!(g.safe_len("n", 0, &[1]), 1);
        assert!(!guard(&[]).is_active() && !guard(&[""]).is_active());
    }
}
