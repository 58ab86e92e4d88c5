//! Multi-turn chat state: the turns so far, kept in the chat template, trimmed from the oldest turn when
//! the next prompt would not fit the context — never an error in the middle of a conversation.

use qwen2::{Message, Tokenizer};

#[derive(Debug, Clone, Default)]
pub struct Conversation {
    pub turns: Vec<(String, String)>,
}

impl Conversation {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn reset(&mut self) {
        self.turns.clear();
    }

    pub fn push(&mut self, user: &str, assistant: &str) {
        self.turns.push((user.to_string(), assistant.to_string()));
    }

    pub fn history(&self) -> Vec<Message> {
        self.turns
            .iter()
            .flat_map(|(u, a)| [Message::user(u), Message::assistant(a)])
            .collect()
    }

    /// Drops the oldest turns until `render(history)` fits in `budget` tokens. Returns how many were dropped.
    pub fn trim_to_fit(
        &mut self,
        tok: &Tokenizer,
        budget: usize,
        render: &dyn Fn(&[Message]) -> String,
    ) -> usize {
        let mut dropped = 0;
        while !self.turns.is_empty() {
            let n = tok
                .encode(&render(&self.history()))
                .map(|ids| ids.len())
                .unwrap_or(usize::MAX);
            if n <= budget {
                break;
            }
            self.turns.remove(0);
            dropped += 1;
        }
        dropped
    }
}
