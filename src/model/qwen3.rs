//! `qwen3`: Qwen3 (dense). llama's block with each head's q and k RMS-normed before rope
//! (one weight vector shared by the heads), rotary embeddings in the NeoX layout, no biases,
//! and a head size of its own (`attention.key_length`, so `n_head * hd` may differ from
//! `n_embd`).
//!
//! ```text
//! x  = embd[tok]
//! q_h = rmsnorm(Wq·n)_h * q_norm,  k_h = rmsnorm(Wk·n)_h * k_norm     n = rmsnorm(x) * attn_norm
//! x += Wo · attn(rope_neox(q), rope_neox(k), Wv·n)
//! x += Wdown · (silu(Wgate·n) * Wup·n)              n = rmsnorm(x) * ffn_norm
//! logits = Wout · (rmsnorm(x) * output_norm)
//! ```
//!
//! The q/k norms are an optional step of the attention every block shares
//! (`Batch::attention`), so the block is llama's.

pub(super) use super::llama::blocks;
