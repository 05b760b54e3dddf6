//! Flags shared by the commands that load a model, spelled as llama.cpp spells them.

use anyhow::{Context, Result};
use clap::Args;
use lethe::generate::{Decoder, ModelDecoder, SamplerParams};
use lethe::model::{Model, Precision};
use lethe::tokenizer::Tokenizer;
use lethe::unlearn::{Assistant, LockstepDecoder, TermKind};
use std::sync::Arc;

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model: a GGUF path or a name from models/ (smollm2, gemma3), fetched on first use.
    #[arg(short = 'm', long = "model", default_value = "smollm2")]
    pub model: String,
    /// Threads for the forward pass (default: all cores).
    #[arg(short = 't', long = "threads")]
    pub threads: Option<usize>,
    /// Context size in tokens (0: the model's training context, capped at 4096).
    #[arg(short = 'c', long = "ctx-size", default_value_t = 4096)]
    pub ctx_size: usize,
    /// Exact matmuls (f32 activations, f64 accumulation) instead of llama.cpp's 8-bit
    /// activations: slower, closer to the exact reference.
    #[arg(long)]
    pub precise: bool,
    /// An assistant model for ULD logit subtraction (same vocabulary as the model).
    #[arg(long = "assistant")]
    pub assistant: Option<String>,
    /// ULD strength: the assistant's log-probabilities are subtracted with weight alpha.
    #[arg(long = "alpha", default_value_t = 0.75)]
    pub alpha: f32,
    /// Plausibility filter rate r of the assistant term (0: off).
    #[arg(long = "filter", default_value_t = 0.01)]
    pub filter: f32,
}

impl ModelArgs {
    pub fn threads(&self) -> usize {
        self.threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
    }

    pub fn load(&self) -> Result<Loaded> {
        let path = lethe::hub::resolve_model(&self.model)?;
        let mut model = Model::open(&path, self.threads())
            .with_context(|| format!("loading {}", path.display()))?;
        if self.precise {
            model.precision = Precision::Exact;
        }
        let tok = Tokenizer::from_gguf(&model.file)?;
        if tok.n_vocab() != model.cfg.n_vocab {
            anyhow::bail!(
                "tokenizer has {} tokens but the model's head has {}",
                tok.n_vocab(),
                model.cfg.n_vocab
            );
        }
        let n_ctx = match self.ctx_size {
            0 => model.cfg.n_ctx_train.min(4096),
            n => n,
        };
        let model = Arc::new(model);
        let assistant = match &self.assistant {
            None => None,
            Some(a) => {
                let apath = lethe::hub::resolve_model(a)?;
                let file = Arc::new(lethe::gguf::GgufFile::open(&apath)?);
                let mut am = Model::from_file(file, model.pool.clone())
                    .with_context(|| format!("loading assistant {}", apath.display()))?;
                am.precision = model.precision;
                let key = "tokenizer.ggml.tokens";
                if am.file.get_array(key)? != model.file.get_array(key)? {
                    anyhow::bail!(
                        "the assistant's vocabulary differs from the model's ({} and {} tokens): \
                         ULD needs the same tokens (`lethe profile check` names the first difference)",
                        am.cfg.n_vocab,
                        model.cfg.n_vocab
                    );
                }
                if !(0.0..1.0).contains(&self.filter) {
                    anyhow::bail!("--filter must be in [0, 1)");
                }
                Some(Arc::new(am))
            }
        };
        Ok(Loaded {
            model,
            tok,
            n_ctx,
            path,
            assistant,
            alpha: self.alpha,
            filter: self.filter,
        })
    }
}

pub struct Loaded {
    pub model: Arc<Model>,
    pub tok: Tokenizer,
    pub n_ctx: usize,
    pub path: std::path::PathBuf,
    /// The ULD assistant, sharing the model's thread pool.
    pub assistant: Option<Arc<Model>>,
    pub alpha: f32,
    pub filter: f32,
}

impl Loaded {
    /// The decoder for this model: plain, or in lockstep with its assistant.
    pub fn decoder(&self, n_ctx: usize) -> Result<Box<dyn Decoder>> {
        Ok(match &self.assistant {
            None => Box::new(ModelDecoder::new(self.model.clone(), n_ctx)),
            Some(a) => {
                let term = Assistant {
                    model: a.clone(),
                    kind: TermKind::Uld,
                    weight: -self.alpha,
                    filter: self.filter,
                    reference: None,
                };
                Box::new(LockstepDecoder::new(self.model.clone(), vec![term], n_ctx)?)
            }
        })
    }
}

#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Temperature; 0 is greedy.
    #[arg(long = "temp", default_value_t = 0.8)]
    pub temp: f32,
    /// Seed of the sampler (-1: random).
    #[arg(short = 's', long = "seed", default_value_t = -1, allow_hyphen_values = true)]
    pub seed: i64,
    #[arg(long = "top-k", default_value_t = 40)]
    pub top_k: i32,
    #[arg(long = "top-p", default_value_t = 0.95)]
    pub top_p: f32,
    #[arg(long = "min-p", default_value_t = 0.05)]
    pub min_p: f32,
    #[arg(long = "repeat-penalty", default_value_t = 1.0)]
    pub repeat_penalty: f32,
    #[arg(
        long = "repeat-last-n",
        default_value_t = 64,
        allow_hyphen_values = true
    )]
    pub repeat_last_n: i32,
    #[arg(long = "presence-penalty", default_value_t = 0.0)]
    pub presence_penalty: f32,
    #[arg(long = "frequency-penalty", default_value_t = 0.0)]
    pub frequency_penalty: f32,
}

impl SamplingArgs {
    pub fn params(&self) -> SamplerParams {
        let seed = if self.seed < 0 {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        } else {
            self.seed as u64
        };
        SamplerParams {
            temperature: self.temp,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed,
            logit_bias: Vec::new(),
        }
    }
}
