//! Hyper-parameters read from GGUF metadata, plus the constants llama.cpp keeps in code.

use crate::gguf::GgufFile;
use crate::{Error, Result};
use lethe_kernels::ops::RopeKind;

/// The architectures lethe runs (`general.architecture`), one file each in `src/model/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
    Qwen3,
    Phi3,
    Phi2,
    Gemma2,
    Gemma3,
    Olmo2,
}

impl Arch {
    pub const ALL: [Arch; 8] = [
        Arch::Llama,
        Arch::Qwen2,
        Arch::Qwen3,
        Arch::Phi3,
        Arch::Phi2,
        Arch::Gemma2,
        Arch::Gemma3,
        Arch::Olmo2,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Phi3 => "phi3",
            Arch::Phi2 => "phi2",
            Arch::Gemma2 => "gemma2",
            Arch::Gemma3 => "gemma3",
            Arch::Olmo2 => "olmo2",
        }
    }

    pub fn from_name(s: &str) -> Option<Arch> {
        Arch::ALL.into_iter().find(|a| a.name() == s)
    }

    /// How rotary embeddings pair dimensions (llama.cpp's `rope_type` per architecture).
    pub fn rope_kind(self) -> RopeKind {
        match self {
            Arch::Llama => RopeKind::Norm,
            _ => RopeKind::Neox,
        }
    }

    /// The norm of the blocks and the head.
    pub fn norm_kind(self) -> NormKind {
        match self {
            Arch::Phi2 => NormKind::Layer,
            _ => NormKind::Rms,
        }
    }
}

/// RMSNorm (`x / rms(x) * w`) or LayerNorm (`(x - mean) / std * w + b`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    Rms,
    Layer,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub arch: Arch,
    pub n_vocab: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_ff: usize,
    /// The epsilon of every norm (RMS or LayerNorm, as the architecture has).
    pub norm_eps: f32,
    pub norm: NormKind,
    /// Rotated dimensions per head (phi2: fewer than the head size).
    pub n_rot: usize,
    pub rope_kind: RopeKind,
    pub rope_base: f32,
    /// The base of sliding-window layers (gemma3: 10000, a llama.cpp constant; gemma2: the
    /// global one), unless the file says (`rope.freq_base_swa`).
    pub rope_base_local: f32,
    /// Linear rope scaling: positions are multiplied by this.
    pub rope_freq_scale: f32,
    /// The context the rope factors were trained for (`rope.scaling.original_context_length`):
    /// LongRoPE (phi3) uses its long factors above it, its short ones up to it.
    pub n_ctx_orig: usize,
    /// Multiplies rope's cos and sin (`rope.scaling.attn_factor`, phi3's LongRoPE).
    pub rope_attn_factor: f32,
    pub n_ctx_train: usize,
    /// Sliding window size of local layers (gemma2, gemma3).
    pub sliding_window: Option<usize>,
    /// Every `swa_period`-th layer is global, the others local (gemma3: 6, gemma2: 2).
    pub swa_period: usize,
    pub attn_scale: f32,
    /// `s = c * tanh(s / c)` on attention scores before the mask (gemma2).
    pub attn_softcap: Option<f32>,
    pub final_logit_softcap: Option<f32>,
}

impl Config {
    pub fn from_gguf(f: &GgufFile) -> Result<Self> {
        let arch_name = f.architecture()?;
        let arch =
            Arch::from_name(arch_name).ok_or_else(|| Error::UnsupportedArch(arch_name.into()))?;
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
        let norm = arch.norm_kind();
        let norm_eps = match norm {
            NormKind::Layer => optf("attention.layer_norm_epsilon").unwrap_or(1e-5),
            NormKind::Rms => {
                let default_eps = match arch {
                    Arch::Gemma2 | Arch::Gemma3 => 1e-6,
                    _ => 1e-5,
                };
                optf("attention.layer_norm_rms_epsilon").unwrap_or(default_eps)
            }
        };
        let rope_base = optf("rope.freq_base").unwrap_or(10000.0);
        // `rope.scaling.factor` divides the frequencies whatever the type, as llama.cpp reads
        // it (linear scaling; LongRoPE files do not set it).
        let mut rope_freq_scale = 1.0;
        if let Ok(kind) = f.get_str(&key("rope.scaling.type")) {
            match kind {
                "none" | "linear" => {}
                // LongRoPE: per-frequency factors from tensors, plus an attention factor.
                "longrope" | "su" if arch == Arch::Phi3 => {}
                other => {
                    return Err(Error::Model(format!(
                        "rope scaling {other:?} is not supported"
                    )))
                }
            }
        }
        if let Some(factor) = optf("rope.scaling.factor").filter(|&x| x > 0.0) {
            rope_freq_scale = 1.0 / factor;
        }
        let n_ctx_train = opt("context_length").unwrap_or(2048);
        // Sliding windows: gemma3 on five of six layers, gemma2 on every other one, OLMo 3 on
        // three of four (the file may name the period); phi3's files name a window that
        // llama.cpp ignores, and so does lethe.
        let pattern = opt("attention.sliding_window_pattern");
        let window = opt("attention.sliding_window").filter(|&w| w > 0);
        let (sliding_window, swa_period, local_base) = match arch {
            Arch::Gemma3 => (window, pattern.unwrap_or(6), 10000.0),
            // OLMo 3 (written as olmo2) has windows on three of four layers.
            Arch::Olmo2 => (window, pattern.unwrap_or(4), rope_base),
            Arch::Gemma2 => (
                Some(window.unwrap_or(4096)),
                pattern.unwrap_or(2),
                rope_base,
            ),
            _ => (None, 1, rope_base),
        };
        if sliding_window.is_some() && swa_period == 0 {
            return Err(Error::Model("sliding window pattern 0".into()));
        }
        // gemma2 27B scales queries by 1/sqrt(n_embd / n_head) (llama.cpp keys it on the
        // block count); every other model by 1/sqrt(head size).
        let attn_scale = if arch == Arch::Gemma2 && n_layer == 46 {
            1.0 / ((n_embd / n_head) as f32).sqrt()
        } else {
            1.0 / (head_dim as f32).sqrt()
        };
        let softcap = |k: &str| optf(k).filter(|&c| c > 0.0);
        Ok(Self {
            arch,
            n_vocab,
            n_embd,
            n_layer,
            n_head,
            n_head_kv,
            head_dim,
            n_ff,
            norm_eps,
            norm,
            n_rot,
            rope_kind: arch.rope_kind(),
            rope_base,
            rope_base_local: optf("rope.freq_base_swa").unwrap_or(local_base),
            rope_freq_scale,
            n_ctx_orig: opt("rope.scaling.original_context_length").unwrap_or(n_ctx_train),
            rope_attn_factor: optf("rope.scaling.attn_factor").unwrap_or(1.0),
            n_ctx_train,
            sliding_window,
            swa_period,
            attn_scale,
            attn_softcap: match arch {
                Arch::Gemma2 => softcap("attn_logit_softcapping"),
                _ => None,
            },
            final_logit_softcap: softcap("final_logit_softcapping"),
        })
    }

    /// Whether layer `il` attends through a sliding window (gemma3: all but every 6th;
    /// gemma2: the even ones).
    pub fn is_local_layer(&self, il: usize) -> bool {
        self.sliding_window.is_some() && !(il + 1).is_multiple_of(self.swa_period)
    }

    /// The factor of the token embeddings, where the architecture scales them (gemma2 and
    /// gemma3: `sqrt(n_embd)`).
    pub fn embd_scale(&self) -> Option<f32> {
        matches!(self.arch, Arch::Gemma2 | Arch::Gemma3).then(|| (self.n_embd as f32).sqrt())
    }

    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }
}
