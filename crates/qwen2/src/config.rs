//! `ModelConfig`: the shape of a Qwen2-family model, parsed once from config.json (+ generation_config.json)
//! or from GGUF metadata, and validated before any weight is touched.

use crate::error::{Error, Result};
use serde_json::Value;
use std::path::Path;

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Equal to `num_attention_heads` for plain multi-head attention (Qwen1.5); fewer for grouped-query.
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub tie_word_embeddings: bool,
    /// Generation stops on any of these.
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
}

impl ModelConfig {
    /// Reads `config.json` and, if present, `generation_config.json` from a Hugging Face model directory.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let config = read_json(&dir.join("config.json"))?;
        let generation = match std::fs::metadata(dir.join("generation_config.json")) {
            Ok(_) => Some(read_json(&dir.join("generation_config.json"))?),
            Err(_) => None,
        };
        Self::from_hf_json(&config, generation.as_ref())
    }

    pub fn from_hf_json(config: &Value, generation: Option<&Value>) -> Result<Self> {
        let obj = config
            .as_object()
            .ok_or_else(|| Error::Config("config.json is not a JSON object".into()))?;
        let archs: Vec<String> = match obj.get("architectures") {
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect(),
            _ => vec![],
        };
        match archs.first() {
            Some(a) if a == "Qwen2ForCausalLM" => {}
            Some(a) => return Err(Error::Architecture { found: a.clone() }),
            None => {
                let mt = obj
                    .get("model_type")
                    .and_then(Value::as_str)
                    .unwrap_or("<none>");
                if mt != "qwen2" {
                    return Err(Error::Architecture {
                        found: format!("model_type {mt}"),
                    });
                }
            }
        }
        let usize_field = |name: &str| -> Result<usize> {
            obj.get(name)
                .and_then(Value::as_u64)
                .map(|v| v as usize)
                .ok_or_else(|| Error::Config(format!("missing or non-integer field `{name}`")))
        };
        let num_attention_heads = usize_field("num_attention_heads")?;
        let hidden_size = usize_field("hidden_size")?;
        // Absent means plain multi-head attention, as transformers reads it.
        let num_key_value_heads = match obj.get("num_key_value_heads") {
            None | Some(Value::Null) => num_attention_heads,
            Some(_) => usize_field("num_key_value_heads")?,
        };
        let rope_theta = obj
            .get("rope_theta")
            .and_then(Value::as_f64)
            .or_else(|| {
                obj.get("rope_parameters")
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(Value::as_f64)
            })
            .unwrap_or(10000.0) as f32;
        let head_dim = match obj.get("head_dim").and_then(Value::as_u64) {
            Some(h) => h as usize,
            None if num_attention_heads > 0 => hidden_size / num_attention_heads,
            None => 0,
        };
        let mut eos = Vec::new();
        collect_ids(obj.get("eos_token_id"), &mut eos);
        if let Some(g) = generation {
            collect_ids(g.get("eos_token_id"), &mut eos);
        }
        let cfg = ModelConfig {
            vocab_size: usize_field("vocab_size")?,
            hidden_size,
            intermediate_size: usize_field("intermediate_size")?,
            num_hidden_layers: usize_field("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings: obj
                .get("max_position_embeddings")
                .and_then(Value::as_u64)
                .unwrap_or(32768) as usize,
            rms_norm_eps: obj
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6) as f32,
            rope_theta,
            tie_word_embeddings: obj
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            eos_token_ids: eos,
            bos_token_id: obj
                .get("bos_token_id")
                .and_then(Value::as_u64)
                .map(|v| v as u32),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the relations the forward pass relies on, so a bad file fails here with a clear message.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return bad(format!("`{name}` must be positive"));
            }
            if v > 1 << 24 {
                return bad(format!("`{name}` = {v} is implausibly large"));
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return bad(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head_dim ({}) must be even for rotary embeddings",
                self.head_dim
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return bad("rms_norm_eps must be a non-negative number".into());
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad("rope_theta must be a positive number".into());
        }
        Ok(())
    }

    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// The config.json transformers needs to load a converted model.
    pub fn to_hf_json(&self) -> Value {
        serde_json::json!({
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "use_sliding_window": false,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids.first(),
            "torch_dtype": "float32",
        })
    }
}

fn collect_ids(v: Option<&Value>, out: &mut Vec<u32>) {
    let mut push = |id: u64| {
        if let Ok(id) = u32::try_from(id) {
            if !out.contains(&id) {
                out.push(id);
            }
        }
    };
    match v {
        Some(Value::Number(n)) => {
            if let Some(id) = n.as_u64() {
                push(id)
            }
        }
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).for_each(push),
        _ => {}
    }
}

pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({"architectures": ["Qwen2ForCausalLM"], "vocab_size": 100, "hidden_size": 64,
               "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "eos_token_id": 7})
    }

    #[test]
    fn absent_kv_heads_means_multi_head() {
        let c = ModelConfig::from_hf_json(&base(), None).unwrap();
        assert_eq!(c.num_key_value_heads, 4);
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.rope_theta, 10000.0);
    }

    #[test]
    fn rope_parameters_and_eos_lists() {
        let mut v = base();
        v["rope_parameters"] = json!({"rope_theta": 1000000.0, "rope_type": "default"});
        v["num_key_value_heads"] = json!(2);
        let g = json!({"eos_token_id": [8, 7]});
        let c = ModelConfig::from_hf_json(&v, Some(&g)).unwrap();
        assert_eq!(c.rope_theta, 1e6);
        assert_eq!(c.num_key_value_heads, 2);
        assert_eq!(c.eos_token_ids, vec![7, 8]);
    }

    #[test]
    fn other_architecture_is_named() {
        let mut v = base();
        v["architectures"] = json!(["LlamaForCausalLM"]);
        let e = ModelConfig::from_hf_json(&v, None).unwrap_err().to_string();
        assert!(e.contains("LlamaForCausalLM"), "{e}");
    }

    #[test]
    fn kv_heads_must_divide_heads() {
        let mut v = base();
        v["num_key_value_heads"] = json!(3);
        assert!(ModelConfig::from_hf_json(&v, None).is_err());
    }
}
