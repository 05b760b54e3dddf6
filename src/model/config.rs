//! Hyper-parameters read from GGUF metadata, plus the constants llama.cpp keeps in code.

use crate::gguf::GgufFile;
use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Gemma3,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Gemma3 => "gemma3",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub arch: Arch,
    pub n_vocab: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_ff: usize,
    pub rms_eps: f32,
    /// Rotated dimensions per head.
    pub n_rot: usize,
    pub rope_base: f32,
    /// gemma3's sliding-window layers rotate with their own base (10000, a llama.cpp constant).
    pub rope_base_local: f32,
    /// Linear rope scaling: positions are multiplied by this.
    pub rope_freq_scale: f32,
    pub n_ctx_train: usize,
    /// Sliding window size of local layers (gemma3).
    pub sliding_window: Option<usize>,
    /// Every `swa_period`-th layer is global, the others local (gemma3: 6).
    pub swa_period: usize,
    pub attn_scale: f32,
    pub final_logit_softcap: Option<f32>,
}

impl Config {
    pub fn from_gguf(f: &GgufFile) -> Result<Self> {
        let arch_name = f.architecture()?;
        let arch = match arch_name {
            "llama" => Arch::Llama,
            "gemma3" => Arch::Gemma3,
            other => return Err(Error::UnsupportedArch(other.to_string())),
        };
        let a = arch_name;
        let key = |k: &str| format!("{a}.{k}");
        let req = |k: &str| -> Result<usize> { Ok(f.get_u64(&key(k))? as usize) };
        let opt = |k: &str| -> Option<usize> { f.get_u64(&key(k)).ok().map(|v| v as usize) };
        let optf = |k: &str| -> Option<f32> { f.get_f32(&key(k)).ok() };

        let n_embd = req("embedding_length")?;
        let n_head = req("attention.head_count")?;
        let n_head_kv = opt("attention.head_count_kv").unwrap_or(n_head);
        let n_layer = req("block_count")?;
        let n_ff = req("feed_forward_length")?;
        if n_head == 0 || n_head_kv == 0 || n_head % n_head_kv != 0 || n_layer == 0 || n_embd == 0 {
            return Err(Error::Model(format!(
                "bad attention shape: {n_head} heads, {n_head_kv} kv heads, {n_layer} layers, {n_embd} embd"
            )));
        }
        let head_dim = opt("attention.key_length").unwrap_or(n_embd / n_head);
        if let Some(vl) = opt("attention.value_length") {
            if vl != head_dim {
                return Err(Error::Model(format!(
                    "key length {head_dim} != value length {vl} is not supported"
                )));
            }
        }
        let n_rot = opt("rope.dimension_count").unwrap_or(head_dim);
        if n_rot > head_dim || n_rot % 2 != 0 {
            return Err(Error::Model(format!(
                "rope dimension {n_rot} does not fit head size {head_dim}"
            )));
        }
        let n_vocab = match opt("vocab_size") {
            Some(v) => v,
            None => f.get_array("tokenizer.ggml.tokens")?.len(),
        };
        let default_eps = if arch == Arch::Gemma3 { 1e-6 } else { 1e-5 };
        let rms_eps = optf("attention.layer_norm_rms_epsilon").unwrap_or(default_eps);
        let rope_base = optf("rope.freq_base").unwrap_or(10000.0);
        let mut rope_freq_scale = 1.0;
        if let Ok(kind) = f.get_str(&key("rope.scaling.type")) {
            match kind {
                "none" => {}
                "linear" => {
                    let factor = optf("rope.scaling.factor").unwrap_or(1.0);
                    if factor > 0.0 {
                        rope_freq_scale = 1.0 / factor;
                    }
                }
                other => {
                    return Err(Error::Model(format!(
                        "rope scaling {other:?} is not supported"
                    )))
                }
            }
        }
        let (sliding_window, swa_period, rope_base_local) = match arch {
            Arch::Gemma3 => (opt("attention.sliding_window"), 6, 10000.0),
            Arch::Llama => (None, 1, rope_base),
        };
        let final_logit_softcap = optf("final_logit_softcapping").filter(|&c| c > 0.0);
        Ok(Self {
            arch,
            n_vocab,
            n_embd,
            n_layer,
            n_head,
            n_head_kv,
            head_dim,
            n_ff,
            rms_eps,
            n_rot,
            rope_base,
            rope_base_local,
            rope_freq_scale,
            n_ctx_train: opt("context_length").unwrap_or(2048),
            sliding_window,
            swa_period,
            attn_scale: 1.0 / (head_dim as f32).sqrt(),
            final_logit_softcap,
        })
    }

    /// Whether layer `il` attends through a sliding window (gemma3: all but every 6th).
    pub fn is_local_layer(&self, il: usize) -> bool {
        self.sliding_window.is_some() && !(il + 1).is_multiple_of(self.swa_period)
    }

    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }
}
