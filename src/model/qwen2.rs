//! `qwen2`: Qwen2, Qwen2.5 (and the DeepSeek-R1 distills of them). llama's block with a bias
//! on each of q, k and v, rotary embeddings in the NeoX layout (base from the file, 1e6),
//! and usually a head tied to the embedding.
//!
//! ```text
//! x  = embd[tok]
//! q, k, v = Wq·n + bq, Wk·n + bk, Wv·n + bv         n = rmsnorm(x) * attn_norm
//! x += Wo · attn(rope_neox(q), rope_neox(k), v)
//! x += Wdown · (silu(Wgate·n) * Wup·n)              n = rmsnorm(x) * ffn_norm
//! logits = Wout · (rmsnorm(x) * output_norm)        (Wout = embd when tied)
//! ```
//!
//! The biases are the weights' own (`Weight::bias`, added by the block's matmuls) and the
//! rope layout is the config's, so the block is llama's.

pub(super) use super::llama::blocks;
