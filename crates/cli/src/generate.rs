//! `duet generate`: one prompt in, streamed text out.

use crate::common::{load_model, ms, prefill_progress, print_trace, stream, Global};
use anyhow::{bail, Result};
use qwen2::{GenerateOptions, KvCache, Message, SamplingParams};

#[derive(clap::Args)]
pub struct Args {
    /// Raw prompt text, used as is (no chat template); `-` reads it from stdin, to the last byte.
    #[arg(long, conflicts_with_all = ["system", "user"])]
    pub prompt: Option<String>,
    /// System message (chat mode; default: the model template's own default).
    #[arg(long)]
    pub system: Option<String>,
    /// User message (chat mode): rendered with the model's chat template; `-` reads it from stdin
    /// (without its final line breaks).
    #[arg(long)]
    pub user: Option<String>,
    /// Stop after this many new tokens.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Do not stop at end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Report the K largest logits at the last prompt position.
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub top_logits: usize,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// Sampling temperature (0 = greedy, the default).
    // Negative numbers are taken as values (not as flags), so that they reach the range check below.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f32,
    /// Sample only among the K most likely tokens (0 = no limit).
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub top_k: usize,
    /// Sample only among the most likely tokens whose probabilities add up to P (1 = no limit).
    #[arg(
        long,
        value_name = "P",
        default_value_t = 1.0,
        allow_negative_numbers = true
    )]
    pub top_p: f32,
    /// Make tokens already in the prompt or the output less likely by this factor, as transformers does
    /// (a positive logit divided by it, a negative one multiplied; 1 = off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub repetition_penalty: f32,
    /// Seed of the sampler's random numbers: the same seed gives the same text.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A phrase the text must not contain (ASCII case ignored; repeat for more): where it appears,
    /// generation goes back to the token it began in and takes the best other token there.
    #[arg(long, value_name = "PHRASE")]
    pub avoid: Vec<String>,
}

/// `arg` itself, or for `-` all of stdin.
fn text_or_stdin(arg: &str) -> Result<String> {
    if arg != "-" {
        return Ok(arg.to_string());
    }
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut std::io::stdin(), &mut bytes)
        .map_err(|e| anyhow::anyhow!("reading the prompt from stdin: {e}"))?;
    String::from_utf8(bytes).map_err(|_| anyhow::anyhow!("the prompt on stdin is not valid UTF-8"))
}

pub fn run(g: &Global, a: &Args) -> Result<()> {
    if a.prompt.is_none() && a.user.is_none() {
        bail!("give --prompt TEXT, or --user TEXT (optionally with --system TEXT)");
    }
    if a.avoid.iter().any(|p| p.is_empty()) {
        bail!("--avoid needs a phrase, not an empty string");
    }
    if !(a.temperature >= 0.0 && a.top_p > 0.0 && a.top_p <= 1.0 && a.repetition_penalty > 0.0) {
        bail!(
            "sampling options out of range: temperature ≥ 0, 0 < top-p ≤ 1, repetition-penalty > 0"
        );
    }
    // A long prompt can exceed what one command-line argument may hold (128 KiB on Linux): `-` reads it
    // from stdin, before the model loads. A raw prompt is used to the byte (its last line break may be
    // part of it); a user message drops the line breaks a file or `echo` ends with, as
    // `--user "$(cat FILE)"` would.
    let prompt = a.prompt.as_deref().map(text_or_stdin).transpose()?;
    let user = a.user.as_deref().map(text_or_stdin).transpose()?;
    let user = user.map(|u| u.trim_end_matches(['\n', '\r']).to_string());
    let m = load_model(g)?;
    let text = match prompt {
        Some(p) => p,
        None => {
            let mut msgs = Vec::new();
            if let Some(s) = &a.system {
                msgs.push(Message::system(s));
            }
            msgs.push(Message::user(user.as_deref().unwrap_or_default()));
            m.tokenizer.render_chat(&msgs, true)?
        }
    };
    let prompt_ids = m.tokenizer.encode(&text)?;
    if prompt_ids.is_empty() {
        bail!("the prompt is empty");
    }
    let ctx = m.model.config.max_position_embeddings;
    if prompt_ids.len() >= ctx {
        bail!(
            "the prompt has {} tokens; the model's context holds {ctx}",
            prompt_ids.len()
        );
    }
    if g.trace {
        eprintln!("[trace] tokenizer.render_chat → prompt text:\n{text}");
        eprintln!("[trace] tokenizer.encode → {} tokens:", prompt_ids.len());
        for id in &prompt_ids {
            eprintln!("[trace]   {id:>7} {:?}", m.tokenizer.piece(*id));
        }
    }
    let capacity = (prompt_ids.len() + a.max_new_tokens).min(ctx);
    let mut cache = KvCache::new(&m.model.config, capacity)?;
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        sampling: SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            repetition_penalty: a.repetition_penalty,
            seed: a.seed,
        },
        ignore_eos: a.ignore_eos,
        eos_ids: m.model.config.eos_token_ids.clone(),
        top_candidates: if g.trace { 5 } else { a.top_logits },
        prefill_progress: prefill_progress(),
        avoid: a.avoid.clone(),
    };
    let mut out = std::io::stdout();
    let tok = m.tokenizer.clone();
    let gen = qwen2::generate(
        &m.model,
        &m.tokenizer,
        &mut cache,
        &prompt_ids,
        &opts,
        &mut |ev| {
            if g.trace && !ev.candidates.is_empty() {
                let c: Vec<String> = ev
                    .candidates
                    .iter()
                    .map(|(id, l)| format!("{:?}={l:.2}", tok.piece(*id)))
                    .collect();
                eprintln!(
                    "[trace] sampler → {:>7} {:?}   top: {}",
                    ev.id,
                    tok.piece(ev.id),
                    c.join(" ")
                );
            }
            if let (true, Some(av)) = (g.trace, ev.avoided) {
                print_trace(&tasks::TraceEvent::Avoided {
                    phrase: av.phrase.to_string(),
                    token: av.token + 1,
                    piece: tok.piece(av.id),
                });
            }
            if !a.json {
                stream(&mut out, ev.text.as_bytes());
            }
            true
        },
    )?;
    let n = gen.ids.len();
    let decode_steps = n.saturating_sub(1).max(1) as f64;
    if a.json {
        let top: Vec<_> = gen
            .first_top
            .iter()
            .take(a.top_logits)
            .map(|(id, l)| serde_json::json!({"id": id, "logit": l}))
            .collect();
        let v = serde_json::json!({
            "prompt_ids": prompt_ids,
            "ids": gen.ids,
            "text": gen.text,
            "stop_reason": gen.stop_reason.as_str(),
            "rewinds": gen.rewinds,
            "top_logits": top,
            "timings": {
                "load_ms": ms(m.load_time),
                "prefill_ms": ms(gen.prefill),
                "decode_ms": ms(gen.decode),
                "prefill_tok_s": gen.prefill_tokens as f64 / gen.prefill.as_secs_f64().max(1e-9),
                "decode_tok_s": if n > 1 { decode_steps / gen.decode.as_secs_f64().max(1e-9) } else { 0.0 },
            }
        });
        println!("{v}");
    } else {
        println!();
        if a.top_logits > 0 {
            for (id, l) in gen.first_top.iter().take(a.top_logits) {
                eprintln!("{id:>7} {l:>10.4} {:?}", m.tokenizer.piece(*id));
            }
        }
        eprintln!(
            "[{} prompt tokens in {} ms, {n} tokens in {} ms, stop: {}]",
            gen.prefill_tokens,
            ms(gen.prefill),
            ms(gen.decode),
            gen.stop_reason.as_str()
        );
    }
    Ok(())
}
