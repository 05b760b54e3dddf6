//! `gemma2`: Gemma 2. gemma3's sandwich block without its q/k norms, plus softcapping of the
//! attention scores (`attn_logit_softcapping`, 50 in the released models) and of the final
//! logits (`final_logit_softcapping`, 30), and sliding-window attention on every other layer
//! (0, 2, 4, ...; window `attention.sliding_window`, 4096) at the same rope base as the
//! global layers.
//!
//! ```text
//! x  = embd[tok] * sqrt(n_embd)
//! s  = 50 · tanh((q·k / sqrt(hd)) / 50)             (27B: q scaled by 1/sqrt(n_embd/n_head))
//! x += rmsnorm(Wo · attn(rope_neox(Wq·n), rope_neox(Wk·n), Wv·n)) * post_attention_norm
//! x += rmsnorm(Wdown · (gelu(Wgate·n) * Wup·n)) * post_ffw_norm
//! logits = 30 · tanh(Wembd · (rmsnorm(x) * output_norm) / 30)
//! ```
//!
//! The softcaps and windows are the config's and the attention's, so the block is gemma3's.

pub(super) use super::gemma3::blocks;
