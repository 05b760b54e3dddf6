//! LoRA training on the CPU: hand-written forward passes that keep what the backward pass
//! needs, and hand-written backward passes, over a quantized model of llama's block (llama,
//! qwen2, qwen3; other architectures are refused by [`trainable`]) whose weights stay frozen
//! in place.
//!
//! - [`lora`]: the trainable adapters and their gradients; written as a llama.cpp LoRA file.
//! - [`ops`], [`linear`], [`attn`], [`loss`]: each op's forward and backward pass.
//! - [`model`]: [`TrainModel`], the whole model (or its first K blocks) as a function of the
//!   adapters, with [`TrainModel::loss_and_grad`].
//! - [`optim`]: AdamW, gradient clipping and the learning-rate schedule.
//! - [`trainer`]: the training loop (shuffled epochs, mini-batches, accumulated gradients).
//! - [`data`]: training sequences from question/answer pairs through the chat template.
//!
//! Activations are f32 and the frozen weights are used as their exact dequantized values, row
//! by row (never a dequantized copy of a matrix); the inference pass differs only in rounding
//! its activations to 8 bits per matmul and keeping keys and values in f16.

pub mod attn;
pub mod data;
mod kern;
pub mod linear;
pub mod lora;
pub mod loss;
pub mod model;
pub mod ops;
pub mod optim;
pub mod trainer;

pub use attn::Heads;
pub use lora::{Lora, LoraParam};
pub use loss::Objective;
pub use model::{trainable, Activations, TrainModel};
pub use optim::{AdamW, AdamWConfig, Decay, Schedule};
pub use trainer::{
    eval_loss, train, train_paired, train_with_epochs, Balance, Checkpoint, EvalLoss, Sequence,
    Target, TrainConfig, TrainReport,
};
