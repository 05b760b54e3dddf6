//! Trainable LoRA parameters: per target matrix `W` (`[cols, rows]`), `A` (`r` rows of `cols`)
//! and `B` (`rows` rows of `r`), with `y = W x + (alpha / r) B (A x)` and gradients of the same
//! shapes. `B` starts at zero and `A` Kaiming-uniform, as PEFT initialises them, so a fresh
//! adapter is the base model exactly.
//!
//! [`Lora::write`] writes llama.cpp's adapter layout (`.lora_a` `[cols, r]`, `.lora_b`
//! `[r, rows]`, `adapter.lora.alpha`), which `lethe --lora FILE` loads at scale 1.

use crate::model::{Model, Proj, WeightId};
use crate::patch::{write_lora, LowRankEntry};
use crate::{Error, Result};
use std::path::Path;

/// The LoRA factors of one matrix and their gradients.
#[derive(Debug, Clone)]
pub struct LoraParam {
    pub layer: usize,
    pub slot: Proj,
    /// The base matrix's row length (input width).
    pub cols: usize,
    /// The base matrix's row count (output width).
    pub rows: usize,
    pub a: Vec<f32>,      // [r, cols]
    pub b: Vec<f32>,      // [rows, r]
    pub grad_a: Vec<f32>, // [r, cols]
    pub grad_b: Vec<f32>, // [rows, r]
}

impl LoraParam {
    pub fn target(&self) -> WeightId {
        WeightId::Block(self.layer, self.slot)
    }

    /// The rank `r`.
    pub fn rank(&self) -> usize {
        self.a.len() / self.cols
    }
}

/// LoRA adapters of one rank and alpha on a set of a model's block matrices.
#[derive(Debug, Clone)]
pub struct Lora {
    pub rank: usize,
    pub alpha: f32,
    pub params: Vec<LoraParam>,
    /// `index[layer][slot]`: the position of that matrix's parameters in `params`.
    index: Vec<[Option<usize>; 7]>,
}

impl Lora {
    /// Adapters of rank `rank` on `slots` of each block in `layers`, `B = 0` and `A` drawn
    /// from `U(-1/sqrt(cols), 1/sqrt(cols))` (PEFT's `kaiming_uniform_(a = sqrt(5))`) with a
    /// generator seeded by `seed`.
    pub fn new(
        model: &Model,
        layers: impl IntoIterator<Item = usize>,
        slots: &[Proj],
        rank: usize,
        alpha: f32,
        seed: u64,
    ) -> Result<Self> {
        if rank == 0 {
            return Err(Error::Invalid("LoRA rank must be at least 1".into()));
        }
        if !alpha.is_finite() || alpha == 0.0 {
            return Err(Error::Invalid(format!(
                "LoRA alpha must be finite and non-zero, got {alpha}"
            )));
        }
        let mut rng = SplitMix(seed);
        let mut params = Vec::new();
        let mut index = vec![[None; 7]; model.cfg.n_layer];
        for layer in layers {
            for &slot in slots {
                let (cols, rows) = model.target_shape(WeightId::Block(layer, slot))?;
                if index[layer][slot as usize].is_some() {
                    continue;
                }
                let bound = 1.0 / (cols as f64).sqrt();
                let a = (0..rank * cols)
                    .map(|_| ((2.0 * rng.uniform() - 1.0) * bound) as f32)
                    .collect();
                index[layer][slot as usize] = Some(params.len());
                params.push(LoraParam {
                    layer,
                    slot,
                    cols,
                    rows,
                    a,
                    b: vec![0.0; rows * rank],
                    grad_a: vec![0.0; rank * cols],
                    grad_b: vec![0.0; rows * rank],
                });
            }
        }
        Ok(Self {
            rank,
            alpha,
            params,
            index,
        })
    }

    /// The factor of `B A`: `alpha / rank`.
    pub fn scale(&self) -> f32 {
        self.alpha / self.rank as f32
    }

    /// The parameters on block `layer`'s matrix `slot`, if it has an adapter.
    pub fn get(&self, layer: usize, slot: Proj) -> Option<&LoraParam> {
        let i = self.index.get(layer)?[slot as usize]?;
        Some(&self.params[i])
    }

    pub(crate) fn index_of(&self, layer: usize, slot: Proj) -> Option<usize> {
        self.index.get(layer)?[slot as usize]
    }

    /// The lowest block with an adapter.
    pub fn lowest_layer(&self) -> Option<usize> {
        self.params.iter().map(|p| p.layer).min()
    }

    /// Trainable values (`A` and `B` of every matrix).
    pub fn n_params(&self) -> usize {
        self.params.iter().map(|p| p.a.len() + p.b.len()).sum()
    }

    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            p.grad_a.fill(0.0);
            p.grad_b.fill(0.0);
        }
    }

    /// The adapters as the patch writer's entries (`A`, `B` as they are; the file's alpha
    /// supplies the scale).
    pub fn entries(&self) -> Vec<LowRankEntry> {
        self.params
            .iter()
            .map(|p| LowRankEntry {
                base: p.target().tensor_name(),
                cols: p.cols,
                rows: p.rows,
                rank: self.rank,
                a: p.a.clone(),
                b: p.b.clone(),
            })
            .collect()
    }

    /// Write the adapters as a llama.cpp LoRA file for `model`'s architecture: loaded at
    /// scale 1 it computes `W x + (alpha / rank) B (A x)`, this adapter's forward pass.
    pub fn write(&self, path: impl AsRef<Path>, model: &Model, name: &str) -> Result<()> {
        write_lora(
            path,
            model.cfg.arch.name(),
            name,
            Some(self.alpha),
            &self.entries(),
        )
    }
}

/// splitmix64: a small seeded generator for the initial `A`.
struct SplitMix(u64);

impl SplitMix {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}
