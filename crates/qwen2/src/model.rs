//! `Model`: the Qwen2 network, immutable once loaded and shared (`Arc`) by any number of sequences.
//! Its `forward` reads top to bottom like llama2.c's: embed → layers → final norm → logits.

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::kernels::attention::AttentionShape;
use crate::kernels::matmul::matmul_many;
use crate::kernels::{attention, pool, rmsnorm_rows, rope, silu_mul_rows, RopeTable};
use crate::kv_cache::KvCache;
use crate::matrix::{LookupTable, Matrix, WeightForm};
use crate::weights::arena::Arena;
use crate::weights::{to_f32_vec, TensorStore};

/// A linear layer with an optional bias (Qwen2 has biases on q, k and v only).
pub struct Linear {
    pub weight: Matrix,
    pub bias: Option<Vec<f32>>,
}

impl Linear {
    /// `out (t × out_features) = x · Wᵀ + b`.
    fn forward(&self, x: &[f32], t: usize, out: &mut [f32]) {
        self.weight.matmul(x, t, out);
        self.add_bias(out);
    }

    fn add_bias(&self, out: &mut [f32]) {
        if let Some(b) = &self.bias {
            for row in out.chunks_mut(b.len()) {
                row.iter_mut().zip(b).for_each(|(o, bi)| *o += bi);
            }
        }
    }
}

/// `outs[i] = x · Wᵢᵀ + bᵢ` for layers that share their input (q, k and v; gate and up), computed
/// in one step: quantized weights then share one quantization of `x`, float ones one packing of it
/// (in prefill), and all of them one parallel pass.
fn forward_shared<const N: usize>(mut layers: [(&Linear, &mut [f32]); N], x: &[f32], t: usize) {
    let cols = layers[0].0.weight.cols;
    let mut products: Vec<_> = layers
        .iter_mut()
        .map(|(l, out)| (l.weight.weights(), l.weight.rows, &mut **out))
        .collect();
    matmul_many(&mut products, cols, x, t);
    for (l, out) in layers {
        l.add_bias(out);
    }
}

pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
}

pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

pub struct DecoderLayer {
    pub input_layernorm: Vec<f32>,
    pub self_attn: Attention,
    pub post_attention_layernorm: Vec<f32>,
    pub mlp: Mlp,
}

pub struct Model {
    pub config: ModelConfig,
    /// Read one row per token; also the output matrix when the embeddings are tied.
    pub embed_tokens: LookupTable,
    pub layers: Vec<DecoderLayer>,
    pub norm: Vec<f32>,
    /// `None` when the output projection is tied to the embeddings.
    pub lm_head: Option<Matrix>,
    rope: RopeTable,
}

/// Which positions' logits a forward pass should compute. Only the last is needed to pick the next token;
/// computing all 151936 × t logits would double a short prompt's cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    None,
    Last,
    All,
}

/// Tokens a long prompt runs at a time in [`Model::prefill`]: a progress report every second or two, and
/// no slower than one pass (a 2000-token prompt: 10.0 s in runs of 256 against 10.7 s in one, medians
/// of six alternations, each faster; 2-core Zen 3 VM).
pub const PREFILL_CHUNK: usize = 256;

/// Calls `each(run, cache, is_last)` for the runs of [`chunks`], and `progress` after each when
/// there is more than one.
fn in_runs(
    tokens: &[u32],
    cache: &mut KvCache,
    chunk: usize,
    progress: &(dyn Fn(usize, usize) + Sync),
    mut each: impl FnMut(&[u32], &mut KvCache, bool) -> Result<()>,
) -> Result<()> {
    let runs = chunks(tokens.len(), chunk);
    for (range, last) in &runs {
        each(&tokens[range.clone()], cache, *last)?;
        if runs.len() > 1 {
            progress(range.end, tokens.len());
        }
    }
    Ok(())
}

/// The runs of [`Model::prefill`] over `n` tokens: one, or `chunk` at a time with the last taking the
/// rest; each with whether it is the last.
fn chunks(n: usize, chunk: usize) -> Vec<(std::ops::Range<usize>, bool)> {
    // Products over fewer tokens sum in another order (see `GEMM_MIN_TOKENS`).
    let chunk = chunk.max(crate::kernels::matmul::GEMM_MIN_TOKENS);
    let mut runs = Vec::new();
    let mut start = 0;
    while n - start > 2 * chunk {
        runs.push((start..start + chunk, false));
        start += chunk;
    }
    runs.push((start..n, true));
    runs
}

impl Model {
    /// Builds the network from checkpoint tensors, looked up here — and only here — by their
    /// Hugging Face names.
    pub fn from_store(config: ModelConfig, store: &TensorStore) -> Result<Self> {
        Self::from_store_with(config, store, WeightForm::Exact)
    }

    /// Like `from_store`, choosing the form the weight matrices are held and multiplied in
    /// ([`WeightForm`]: exact f32 math on the stored values, the file's own quantization, bf16 or Q8_0).
    pub fn from_store_with(
        config: ModelConfig,
        store: &TensorStore,
        form: WeightForm,
    ) -> Result<Self> {
        let c = &config;
        let (h, q, kv, inter) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        // Values converted at load (every form but the mapped ones) share one arena.
        let arena = Arena::new();
        let matrix = |name: &str, rows: usize, cols: usize| -> Result<Matrix> {
            Matrix::from_raw_in(&arena, name, store.get(name)?, rows, cols, form)
        };
        // The logits' projection (`lm_head`, or the embedding table where tied).
        let output = |name: &str| -> Result<Matrix> {
            let t = store.get(name)?;
            Matrix::output_from_raw_in(&arena, name, t, c.vocab_size, h, form)
        };
        let vector = |name: &str, len: usize| -> Result<Vec<f32>> {
            let mut v = to_f32_vec(name, store.get_shaped(name, &[len])?)?;
            if form == WeightForm::Bf16 {
                // The bf16 form rounds every tensor, as a bf16 checkpoint of the same model would.
                v.iter_mut()
                    .for_each(|x| *x = half::bf16::from_f32(*x).to_f32());
            }
            Ok(v)
        };
        let linear = |prefix: &str, rows: usize, cols: usize, bias: bool| -> Result<Linear> {
            Ok(Linear {
                weight: matrix(&format!("{prefix}.weight"), rows, cols)?,
                bias: if bias {
                    Some(vector(&format!("{prefix}.bias"), rows)?)
                } else {
                    None
                },
            })
        };
        // Grown layer by layer, not reserved: a config may claim millions of layers, and only the tensors
        // actually found (the first missing one is an error) may size anything.
        let mut layers = Vec::new();
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            layers.push(DecoderLayer {
                input_layernorm: vector(&format!("{p}.input_layernorm.weight"), h)?,
                self_attn: Attention {
                    q_proj: linear(&format!("{p}.self_attn.q_proj"), q, h, true)?,
                    k_proj: linear(&format!("{p}.self_attn.k_proj"), kv, h, true)?,
                    v_proj: linear(&format!("{p}.self_attn.v_proj"), kv, h, true)?,
                    o_proj: linear(&format!("{p}.self_attn.o_proj"), h, q, false)?,
                },
                post_attention_layernorm: vector(
                    &format!("{p}.post_attention_layernorm.weight"),
                    h,
                )?,
                mlp: Mlp {
                    gate_proj: linear(&format!("{p}.mlp.gate_proj"), inter, h, false)?,
                    up_proj: linear(&format!("{p}.mlp.up_proj"), inter, h, false)?,
                    down_proj: linear(&format!("{p}.mlp.down_proj"), h, inter, false)?,
                },
            });
        }
        // Tied models use the embedding matrix as the output projection; a redundant `lm_head.weight`
        // in such a checkpoint (some Qwen1.5 files have one) is ignored, as transformers ignores it.
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(output("lm_head.weight")?)
        };
        // Untied, the embedding table is only looked up, a row per token: it stays as stored and each
        // row is read from the file and rounded to the weight form as it is needed (`LookupTable`),
        // rather than held converted or mapped in.
        let name = "model.embed_tokens.weight";
        let embed_tokens = if c.tie_word_embeddings {
            LookupTable::of_matrix(output(name)?)
        } else {
            LookupTable::from_raw_in(&arena, name, store.get(name)?, c.vocab_size, h, form)?
        };
        Ok(Model {
            embed_tokens,
            layers,
            norm: vector("model.norm.weight", h)?,
            lm_head,
            rope: RopeTable::new(c.head_dim, c.rope_theta),
            config,
        })
    }

    pub fn output_matrix(&self) -> &Matrix {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens.matrix)
    }

    /// Bytes of weights one decode step reads (every matrix once; the embedding table only if tied).
    pub fn weight_bytes_per_token(&self) -> usize {
        self.decode_steps()
            .iter()
            .flatten()
            .map(|m| m.bytes())
            .sum()
    }

    /// The matrices a decode step reads, in its order and grouped as its parallel steps: per layer q, k
    /// and v (which share their input), o, gate and up (likewise), down; then the output matrix. The
    /// embedding table is read for one row only, unless it is also the output matrix.
    pub fn decode_steps(&self) -> Vec<Vec<&Matrix>> {
        let mut steps = Vec::with_capacity(4 * self.layers.len() + 1);
        for l in &self.layers {
            let (a, m) = (&l.self_attn, &l.mlp);
            steps.push(vec![&a.q_proj.weight, &a.k_proj.weight, &a.v_proj.weight]);
            steps.push(vec![&a.o_proj.weight]);
            steps.push(vec![&m.gate_proj.weight, &m.up_proj.weight]);
            steps.push(vec![&m.down_proj.weight]);
        }
        steps.push(vec![self.output_matrix()]);
        steps
    }

    /// Runs `tokens` (appended after what `cache` holds) through the network in one batched pass.
    /// Returns the logits asked for: `vocab` values per returned position.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache, logits: Logits) -> Result<Vec<f32>> {
        // One hop onto the compute pool for the whole pass, rather than one per parallel kernel.
        pool::install(|| self.forward_on_pool(tokens, cache, logits))
    }

    fn forward_on_pool(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        logits: Logits,
    ) -> Result<Vec<f32>> {
        let keep = match logits {
            Logits::None => 0,
            Logits::Last => 1,
            Logits::All => tokens.len(),
        };
        let hidden = self.hidden_states(tokens, cache, keep)?;
        if keep == 0 {
            return Ok(Vec::new());
        }
        let mut out = vec![0.0; keep * self.config.vocab_size];
        self.output_matrix().matmul(&hidden, keep, &mut out);
        Ok(out)
    }

    /// Like `forward`, but returns the final-normed hidden state of the last new position, so a caller
    /// can multiply only the output rows it needs (label scoring).
    pub fn forward_last_hidden(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        pool::install(|| self.hidden_states(tokens, cache, 1))
    }

    /// `forward` for a prompt that may be long: more than two `chunk`s of tokens run `chunk` at a time
    /// (the last run takes the rest), with `progress(done, total)` after each, so a caller can show how
    /// far a prompt of thousands of tokens (tens of seconds here) has got. The results are those of
    /// one pass, bit for bit: runs are never shorter than `GEMM_MIN_TOKENS`, and from there every kernel
    /// gives a token the same bits whatever else is in its batch (checked on the default model in each
    /// weight form, and by a test on the tiny ones).
    pub fn prefill(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        logits: Logits,
        chunk: usize,
        progress: &(dyn Fn(usize, usize) + Sync),
    ) -> Result<Vec<f32>> {
        pool::install(|| {
            let mut out = Vec::new();
            in_runs(tokens, cache, chunk, progress, |run, cache, last| {
                let want = match logits {
                    Logits::Last if !last => Logits::None,
                    other => other,
                };
                out.extend(self.forward_on_pool(run, cache, want)?);
                Ok(())
            })?;
            Ok(out)
        })
    }

    /// `forward_last_hidden` in runs, as [`Model::prefill`].
    pub fn prefill_last_hidden(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        chunk: usize,
        progress: &(dyn Fn(usize, usize) + Sync),
    ) -> Result<Vec<f32>> {
        pool::install(|| {
            let mut hidden = Vec::new();
            in_runs(tokens, cache, chunk, progress, |run, cache, last| {
                hidden = self.hidden_states(run, cache, usize::from(last))?;
                Ok(())
            })?;
            Ok(hidden)
        })
    }

    /// Runs the layers over `tokens` and returns the final-normed hidden states of the last `keep` of
    /// them.
    fn hidden_states(&self, tokens: &[u32], cache: &mut KvCache, keep: usize) -> Result<Vec<f32>> {
        let c = &self.config;
        let t = tokens.len();
        if t == 0 {
            return Err(Error::Invalid("forward pass over zero tokens".into()));
        }
        cache.reserve(t)?;
        if !cache.fits(c) {
            return Err(Error::Invalid(
                "KV cache was made for a different model".into(),
            ));
        }
        let (h, qd, kvd, hd) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.head_dim);
        let inter = c.intermediate_size;
        let start = cache.len();

        // Buffers, each named for what it holds; every one is `t` rows.
        let mut x = vec![0.0f32; t * h]; // the residual stream
        let mut xb = vec![0.0f32; t * h]; // x after rmsnorm
        let mut q = vec![0.0f32; t * qd];
        let mut k = vec![0.0f32; t * kvd];
        let mut v = vec![0.0f32; t * kvd];
        let mut att = vec![0.0f32; t * qd]; // attention output, all heads
        let mut proj = vec![0.0f32; t * h]; // o_proj / down_proj output, added to x
        let mut gate = vec![0.0f32; t * inter];
        let mut up = vec![0.0f32; t * inter];

        // 1. Embed.
        for (i, &tok) in tokens.iter().enumerate() {
            if tok as usize >= c.vocab_size {
                return Err(Error::Invalid(format!(
                    "token id {tok} is outside the vocabulary ({})",
                    c.vocab_size
                )));
            }
            self.embed_tokens
                .row_into(tok as usize, &mut x[i * h..(i + 1) * h]);
        }
        let angles: Vec<(Vec<f32>, Vec<f32>)> =
            (0..t).map(|i| self.rope.cos_sin(start + i)).collect();

        let last_layer = self.layers.len() - 1;
        for (l, layer) in self.layers.iter().enumerate() {
            // Every layer's keys and values go into the cache for all `t` tokens, but what the last layer
            // computes after them feeds only the hidden states asked for: its `n` rows are those.
            let n = if l == last_layer { keep.min(t) } else { t };
            let tail = t - n;

            // 2. Attention block: rmsnorm → q, k, v (+bias) → rope → attention over the cache → o_proj → residual.
            rmsnorm_rows(&mut xb, &x, &layer.input_layernorm, c.rms_norm_eps);
            let a = &layer.self_attn;
            forward_shared(
                [
                    (&a.q_proj, &mut q),
                    (&a.k_proj, &mut k),
                    (&a.v_proj, &mut v),
                ],
                &xb,
                t,
            );
            for (i, (cos, sin)) in angles.iter().enumerate() {
                k[i * kvd..(i + 1) * kvd]
                    .chunks_mut(hd)
                    .for_each(|head| rope(head, cos, sin));
            }
            cache.store(l, start, &k, &v);
            if n == 0 {
                break;
            }
            let q = &mut q[tail * qd..];
            for (i, (cos, sin)) in angles[tail..].iter().enumerate() {
                q[i * qd..(i + 1) * qd]
                    .chunks_mut(hd)
                    .for_each(|head| rope(head, cos, sin));
            }
            let shape = AttentionShape {
                n_heads: c.num_attention_heads,
                n_kv_heads: c.num_key_value_heads,
                head_dim: hd,
                start: start + tail,
                capacity: cache.capacity(),
            };
            let att = &mut att[..n * qd];
            let (kc, vc) = cache.layer(l);
            attention(q, kc, vc, &shape, att);
            let (x, xb, proj) = (&mut x[tail * h..], &mut xb[..n * h], &mut proj[..n * h]);
            a.o_proj.forward(att, n, proj);
            x.iter_mut().zip(&*proj).for_each(|(xi, p)| *xi += p);

            // 3. MLP block: rmsnorm → silu(gate) · up → down → residual.
            rmsnorm_rows(xb, x, &layer.post_attention_layernorm, c.rms_norm_eps);
            let (gate, up) = (&mut gate[..n * inter], &mut up[..n * inter]);
            forward_shared(
                [
                    (&layer.mlp.gate_proj, &mut *gate),
                    (&layer.mlp.up_proj, &mut *up),
                ],
                xb,
                n,
            );
            silu_mul_rows(gate, up, inter);
            layer.mlp.down_proj.forward(gate, n, proj);
            x.iter_mut().zip(&*proj).for_each(|(xi, p)| *xi += p);
        }
        cache.advance(t);

        // 4. Final norm, of the rows kept.
        let n = keep.min(t);
        let (x, mut out) = (&x[(t - n) * h..], vec![0.0f32; n * h]);
        rmsnorm_rows(&mut out, x, &self.norm, c.rms_norm_eps);
        Ok(out)
    }
}
