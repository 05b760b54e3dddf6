//! Norm weights and how they apply: RMSNorm (`x / rms(x) * w`) or LayerNorm with bias
//! (`(x - mean) / std * w + b`, phi2), as the architecture has.

use super::config::NormKind;
use super::weights::load_vec;
use crate::gguf::GgufFile;
use crate::{Error, Result};
use lethe_kernels::ops;

#[derive(Debug, Clone)]
pub struct Norm {
    pub kind: NormKind,
    pub eps: f32,
    pub w: Vec<f32>, // [n]
    /// LayerNorm's bias `[n]`.
    pub b: Option<Vec<f32>>,
}

impl Norm {
    /// The norm `<name>.weight` (and `<name>.bias` for a LayerNorm) of width `n`.
    pub fn load(f: &GgufFile, name: &str, n: usize, kind: NormKind, eps: f32) -> Result<Norm> {
        let w = load_vec(f, &format!("{name}.weight"), n)?;
        let b = match kind {
            NormKind::Rms => None,
            NormKind::Layer => Some(load_vec(f, &format!("{name}.bias"), n)?),
        };
        Ok(Norm { kind, eps, w, b })
    }

    /// [`Norm::load`] when the file has `<name>.weight`, else `None`.
    pub fn load_opt(
        f: &GgufFile,
        name: &str,
        n: usize,
        kind: NormKind,
        eps: f32,
    ) -> Result<Option<Norm>> {
        match f.tensor(&format!("{name}.weight")) {
            Some(_) => Self::load(f, name, n, kind, eps).map(Some),
            None => Ok(None),
        }
    }

    /// The width the norm runs over.
    pub fn len(&self) -> usize {
        self.w.len()
    }

    pub fn is_empty(&self) -> bool {
        self.w.is_empty()
    }

    /// `out = norm(x)` over one row of [`Norm::len`].
    pub fn apply(&self, out: &mut [f32], x: &[f32]) {
        match &self.b {
            Some(b) => ops::layernorm(out, x, &self.w, b, self.eps),
            None => ops::rmsnorm(out, x, &self.w, self.eps),
        }
    }

    /// `x = norm(x)` over one row.
    pub fn apply_inplace(&self, x: &mut [f32]) {
        match &self.b {
            Some(b) => ops::layernorm_inplace(x, &self.w, b, self.eps),
            None => ops::rmsnorm_inplace(x, &self.w, self.eps),
        }
    }

    /// `out[t] = norm(x[t])` for `n` rows of [`Norm::len`].
    pub fn rows(&self, out: &mut [f32], x: &[f32], n: usize) {
        let e = self.len();
        for (o, x) in out[..n * e].chunks_exact_mut(e).zip(x.chunks_exact(e)) {
            self.apply(o, x);
        }
    }

    /// `x[t] = norm(x[t])` for every row of [`Norm::len`] in `x` (a row per token, or per head
    /// when the norm is one head wide: qwen3's and gemma's q/k norms).
    pub fn rows_inplace(&self, x: &mut [f32]) {
        for row in x.chunks_exact_mut(self.len()) {
            self.apply_inplace(row);
        }
    }

    /// Check that the norm's width divides `width` (a q/k norm per head or over the whole
    /// vector).
    pub fn check_divides(&self, name: &str, width: usize) -> Result<()> {
        if self.is_empty() || !width.is_multiple_of(self.len()) {
            return Err(Error::Model(format!(
                "{name}: a norm of {} does not fit rows of {width}",
                self.len()
            )));
        }
        Ok(())
    }
}
