//! The router: which task or pipeline a text should go to. Keyword rules first (data, in
//! `library/router.toml`), then optionally the model itself through the `intent` task.

use crate::error::Result;
use crate::lang::Lang;
use crate::runner::{ClassifyMode, Runner};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub target: String,
    /// Why: the keyword that matched, the intent label, or "default".
    pub reason: String,
}

impl Runner {
    pub fn route(&mut self, text: &str, lang: Lang) -> Result<Route> {
        let rules = self.library.router.clone();
        let lower = text.to_lowercase();
        for r in &rules.rules {
            if let Some(k) = r
                .keywords
                .iter()
                .find(|k| lower.contains(&k.to_lowercase()))
            {
                return Ok(Route {
                    target: r.target.clone(),
                    reason: format!("keyword {k:?}"),
                });
            }
        }
        let default = if rules.default.is_empty() {
            "analyze".to_string()
        } else {
            rules.default.clone()
        };
        if rules.use_model && self.library.tasks.contains_key("intent") {
            let c = self.classify(
                "intent",
                text,
                lang,
                &BTreeMap::new(),
                ClassifyMode::Scoring,
                &mut |_| {},
            )?;
            if let Some(label) = c.label {
                if let Some(t) = rules.intent_targets.get(&label) {
                    return Ok(Route {
                        target: t.clone(),
                        reason: format!("intent {label} ({:.2})", c.confidence),
                    });
                }
            }
        }
        Ok(Route {
            target: default,
            reason: "default".into(),
        })
    }
}
