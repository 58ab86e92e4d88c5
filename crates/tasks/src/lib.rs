//! Prompts as data (being written).
