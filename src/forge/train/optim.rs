//! AdamW over a [`Lora`]'s parameters, gradient clipping by global norm, and the learning-rate
//! schedule (linear warm-up, then linear or cosine decay to 0), as PyTorch's `AdamW`,
//! `clip_grad_norm_` and the `transformers` schedules compute them:
//!
//! ```text
//! g     <- g * min(1, max_norm / (||g|| + 1e-6))        ||g||: over every A and B together
//! p     <- p - lr_t * wd * p                             decoupled weight decay
//! m     <- b1 m + (1 - b1) g,   v <- b2 v + (1 - b2) g^2
//! p     <- p - lr_t * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
//! lr_t  =  lr * s / w                          for s < w (warm-up; the first step has lr 0 when w > 0)
//!          lr * (T - s) / (T - w)              linear, for s >= w
//!          lr * (1 + cos(pi (s - w) / (T - w))) / 2   cosine
//! ```
//!
//! `s` counts the steps taken before this one (0 for the first), `t = s + 1`, `T` the number of
//! steps, `w` the warm-up steps. Moments and sums run in f32 like PyTorch's, except the
//! gradient's norm (f64).

use super::lora::Lora;
use crate::{Error, Result};

/// The decay after the warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Decay {
    /// Linear to 0 at the last step (`transformers`' default).
    #[default]
    Linear,
    /// Half a cosine to 0.
    Cosine,
    /// Constant after the warm-up.
    Constant,
}

impl Decay {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "linear" => Ok(Decay::Linear),
            "cosine" => Ok(Decay::Cosine),
            "constant" => Ok(Decay::Constant),
            _ => Err(Error::Invalid(format!(
                "schedule {s:?}: expected linear, cosine or constant"
            ))),
        }
    }
}

/// The learning rate as a function of the step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// The peak learning rate.
    pub lr: f32,
    /// Warm-up steps.
    pub warmup: usize,
    /// Steps in all.
    pub total: usize,
    pub decay: Decay,
}

impl Schedule {
    /// The learning rate of the step after `s` steps were taken.
    pub fn lr_at(&self, s: usize) -> f32 {
        let (w, t) = (self.warmup, self.total.max(1));
        if s < w {
            return (self.lr as f64 * s as f64 / w as f64) as f32;
        }
        let span = t.saturating_sub(w).max(1) as f64;
        let progress = (s - w) as f64 / span;
        let f = match self.decay {
            Decay::Linear => (1.0 - progress).max(0.0),
            Decay::Cosine => {
                0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos()).max(0.0)
            }
            Decay::Constant => 1.0,
        };
        (self.lr as f64 * f) as f32
    }

    /// `ceil(ratio * total)` warm-up steps (at most `total`), as `transformers` counts them.
    /// (The product is rounded to 1e-6 first: 0.1 as an `f32` is 0.100000001, and
    /// `ceil(0.100000001 * 20)` would be 3.)
    pub fn warmup_steps(ratio: f32, total: usize) -> usize {
        let x = ratio.max(0.0) as f64 * total as f64;
        (((x * 1e6).round() / 1e6).ceil() as usize).min(total)
    }
}

/// AdamW's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Decoupled weight decay (`p -= lr * wd * p`).
    pub weight_decay: f32,
    /// Clip the gradient to this global norm first (`None`: no clipping).
    pub max_grad_norm: Option<f32>,
}

impl Default for AdamWConfig {
    /// beta1 0.9, beta2 0.999, eps 1e-8, no weight decay (the `transformers` Trainer's
    /// default, used by PEFT's fine-tuning examples; PyTorch's own default is 0.01), gradients
    /// clipped to norm 1.0.
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: Some(1.0),
        }
    }
}

/// What one [`AdamW::step`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepInfo {
    /// The gradient's global norm before clipping.
    pub grad_norm: f64,
    /// The learning rate used.
    pub lr: f32,
}

/// AdamW's state: the two moments of every parameter of a [`Lora`], and the step counter.
#[derive(Debug, Clone)]
pub struct AdamW {
    pub config: AdamWConfig,
    pub schedule: Schedule,
    /// Steps taken.
    pub step: usize,
    /// Per parameter tensor: `(m_a, v_a, m_b, v_b)`.
    moments: Vec<[Vec<f32>; 4]>,
}

impl AdamW {
    pub fn new(lora: &Lora, config: AdamWConfig, schedule: Schedule) -> Result<Self> {
        let c = &config;
        let ok = |b: f32| (0.0..1.0).contains(&b);
        let positive = |x: f32| x.is_finite() && x > 0.0;
        let wd_ok = c.weight_decay.is_finite() && c.weight_decay >= 0.0;
        if !ok(c.beta1) || !ok(c.beta2) || !positive(c.eps) || !wd_ok {
            return Err(Error::Invalid(format!(
                "AdamW: betas must be in [0, 1), eps > 0 and weight decay >= 0 (got {c:?})"
            )));
        }
        if c.max_grad_norm.is_some_and(|n| !positive(n)) {
            return Err(Error::Invalid(
                "the gradient clipping norm must be > 0".into(),
            ));
        }
        if !(schedule.lr.is_finite() && schedule.lr > 0.0) {
            return Err(Error::Invalid(format!(
                "the learning rate must be > 0, got {}",
                schedule.lr
            )));
        }
        let moments = lora
            .params
            .iter()
            .map(|p| {
                [
                    vec![0.0; p.a.len()],
                    vec![0.0; p.a.len()],
                    vec![0.0; p.b.len()],
                    vec![0.0; p.b.len()],
                ]
            })
            .collect();
        Ok(Self {
            config,
            schedule,
            step: 0,
            moments,
        })
    }

    /// The global norm of `lora`'s gradients.
    pub fn grad_norm(lora: &Lora) -> f64 {
        lora.params
            .iter()
            .flat_map(|p| p.grad_a.iter().chain(&p.grad_b))
            .map(|&g| g as f64 * g as f64)
            .sum::<f64>()
            .sqrt()
    }

    /// One update of `lora` from its gradients (clipped in place first), at the schedule's
    /// learning rate for this step; advances the step counter. The gradients are left as
    /// clipped (call [`Lora::zero_grad`] before the next accumulation).
    pub fn step(&mut self, lora: &mut Lora) -> Result<StepInfo> {
        if lora.params.len() != self.moments.len() {
            return Err(Error::Invalid(
                "AdamW: the adapter is not the one the optimizer was made for".into(),
            ));
        }
        let c = self.config;
        let grad_norm = Self::grad_norm(lora);
        if !grad_norm.is_finite() {
            return Err(Error::Invalid(format!(
                "the gradient is not finite at step {} (norm {grad_norm})",
                self.step + 1
            )));
        }
        if let Some(max) = c.max_grad_norm {
            let f = max as f64 / (grad_norm + 1e-6);
            if f < 1.0 {
                for p in &mut lora.params {
                    for g in p.grad_a.iter_mut().chain(p.grad_b.iter_mut()) {
                        *g = (*g as f64 * f) as f32;
                    }
                }
            }
        }
        let lr = self.schedule.lr_at(self.step);
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - (c.beta1 as f64).powi(t);
        let bc2 = 1.0 - (c.beta2 as f64).powi(t);
        let k = StepFactors {
            step_size: (lr as f64 / bc1) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
            decay: 1.0 - lr * c.weight_decay,
        };
        for (p, mo) in lora.params.iter_mut().zip(&mut self.moments) {
            let [ma, va, mb, vb] = mo;
            update(&mut p.a, &p.grad_a, ma, va, c, k);
            update(&mut p.b, &p.grad_b, mb, vb, c, k);
        }
        Ok(StepInfo { grad_norm, lr })
    }
}

/// What one AdamW step multiplies by, the same for every tensor.
#[derive(Clone, Copy)]
struct StepFactors {
    /// `lr / (1 - beta1^t)`.
    step_size: f32,
    /// `sqrt(1 - beta2^t)`.
    bc2_sqrt: f32,
    /// `1 - lr * weight_decay`.
    decay: f32,
}

/// PyTorch's single-tensor AdamW update.
fn update(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: AdamWConfig, k: StepFactors) {
    let StepFactors {
        step_size,
        bc2_sqrt,
        decay,
    } = k;
    for i in 0..p.len() {
        let gi = g[i];
        p[i] *= decay;
        m[i] = c.beta1 * m[i] + (1.0 - c.beta1) * gi;
        v[i] = c.beta2 * v[i] + (1.0 - c.beta2) * gi * gi;
        let denom = v[i].sqrt() / bc2_sqrt + c.eps;
        p[i] -= step_size * m[i] / denom;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules() {
        let s = Schedule {
            lr: 1.0,
            warmup: 2,
            total: 6,
            decay: Decay::Linear,
        };
        let got: Vec<f32> = (0..7).map(|i| s.lr_at(i)).collect();
        assert_eq!(got, [0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0]);
        let c = Schedule {
            decay: Decay::Cosine,
            ..s
        };
        assert!((c.lr_at(4) - 0.5).abs() < 1e-7);
        assert!(
            (c.lr_at(3) - (0.5 * (1.0 + (std::f64::consts::PI / 4.0).cos())) as f32).abs() < 1e-7
        );
        assert_eq!(Schedule::warmup_steps(0.1, 25), 3);
        assert_eq!(Schedule::warmup_steps(0.0, 25), 0);
    }
}
