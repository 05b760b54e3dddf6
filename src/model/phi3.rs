//! `phi3`: Phi-3, Phi-3.5-mini, Phi-4-mini. llama's block over fused tensors: `attn_qkv`
//! holds q, k and v (rows `0..q`, then k, then v) and `ffn_up` the gate and the up
//! projection (rows `0..n_ff`, then `n_ff..2 n_ff`); rotary embeddings in the NeoX layout,
//! with LongRoPE's per-frequency factors (`rope_factors_short` up to the trained context
//! `rope.scaling.original_context_length`, `rope_factors_long` above it) and its
//! `rope.scaling.attn_factor` on cos and sin when the file has them.
//!
//! ```text
//! x  = embd[tok]
//! q | k | v = Wqkv·n                                n = rmsnorm(x) * attn_norm
//! x += Wo · attn(rope_neox(q), rope_neox(k), v)
//! g | u = Wup·n;  x += Wdown · (silu(g) * u)        n = rmsnorm(x) * ffn_norm
//! logits = Wout · (rmsnorm(x) * output_norm)
//! ```
//!
//! The fused tensors are read as views of their rows (`Weight::view`), one matrix each, so
//! the block is llama's. The files' `attention.sliding_window` is ignored, as llama.cpp
//! ignores it.

pub(super) use super::llama::blocks;
