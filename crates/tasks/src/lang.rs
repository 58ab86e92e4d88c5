//! Which language a text is in, to pick prompt variants and label names (正面 or positive).

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Lang {
    Zh,
    En,
}

impl Lang {
    /// Chinese if the text has any Han character, English otherwise.
    pub fn detect(text: &str) -> Lang {
        if text.chars().any(|c| matches!(c as u32, 0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0xF900..=0xFAFF | 0x20000..=0x2A6DF)) {
            Lang::Zh
        } else {
            Lang::En
        }
    }

    pub fn parse(s: &str) -> Option<Lang> {
        match s {
            "zh" => Some(Lang::Zh),
            "en" => Some(Lang::En),
            _ => None,
        }
    }

    pub fn code(self) -> &'static str {
        match self {
            Lang::Zh => "zh",
            Lang::En => "en",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects() {
        assert_eq!(Lang::detect("今天很好"), Lang::Zh);
        assert_eq!(Lang::detect("great day 😀"), Lang::En);
        assert_eq!(Lang::detect("OK，谢谢"), Lang::Zh);
    }
}
