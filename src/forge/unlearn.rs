//! Unlearning patches: a LoRA trained on the CPU to make the target forget a forget set while
//! keeping a retain set, by one of the field's standard methods. Every loss is over the
//! answer's tokens only (the question and the chat template masked; the end-of-turn token
//! counts as an answer token, as in fine-tuning):
//!
//! ```text
//! graddiff  L = -CE(forget) + lambda * CE(retain)                 (per-token means)
//! npo       L = mean_forget (2/beta) log(1 + (pi(y|x) / pi_ref(y|x))^beta) + lambda * CE(retain)
//! simnpo    L = mean_forget -(2/beta) log sigmoid(-(beta/|y|) log pi(y|x) - gamma)
//!               + lambda * CE(retain)
//! rmu       L = MSE(h_l(forget), c u) + lambda * MSE(h_l(retain), h_l^frozen(retain))
//! ```
//!
//! NPO (Zhang et al. 2024) and SimNPO (Fan et al. 2024) are per answer (`log pi(y|x)` the sum of
//! its tokens' log-probabilities); `pi_ref` is the target before the patch, computed once
//! before training (the LoRA starts at zero, so the model then *is* the reference). RMU (Li et
//! al. 2024, WMDP) runs the first `l + 1` blocks only and trains a LoRA on blocks `l - k + 1
//! ..= l`: the residual stream after block `l` at the forget answers' positions is pulled to
//! `c u` (`u` a seeded random unit vector, uniform in `[0, 1)` per dimension then normalised,
//! as WMDP draws it) and the retain answers' states are held at the frozen model's. WMDP's `c`
//! is a constant tuned per model; here it is `steer` times the mean norm of the frozen forget
//! states at block `l`, so that one default fits any model's scale.
//!
//! Each step takes `batch` forget rows and `batch` retain rows ([`train_paired`]); the group
//! balance makes the loss the forget side's mean plus `lambda` times the retain side's mean.

use super::train::data::answer_sequence;
use super::train::loss::answer_logprob;
use super::train::{Sequence, Target, TrainModel};
use crate::qa::Example;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

#[cfg(doc)]
use super::train::train_paired;

/// An unlearning method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    GradDiff,
    Npo,
    SimNpo,
    Rmu,
}

impl Method {
    pub const ALL: [Method; 4] = [Method::GradDiff, Method::Npo, Method::SimNpo, Method::Rmu];

    pub fn name(self) -> &'static str {
        match self {
            Method::GradDiff => "graddiff",
            Method::Npo => "npo",
            Method::SimNpo => "simnpo",
            Method::Rmu => "rmu",
        }
    }

    /// A method by its name; an error naming the ones there are.
    pub fn parse(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == name.trim().to_ascii_lowercase())
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "unknown unlearning method {name:?}: one of {}",
                    Self::ALL.map(Method::name).join(", ")
                ))
            })
    }

    /// Whether its loss is on hidden states (the model runs without its head).
    pub fn on_hidden(self) -> bool {
        self == Method::Rmu
    }
}

/// A method's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UnlearnConfig {
    pub method: Method,
    /// NPO's and SimNPO's inverse temperature.
    pub beta: f32,
    /// SimNPO's margin.
    pub gamma: f32,
    /// `lambda`: the retain side's weight against the forget side's.
    pub retain_weight: f32,
    /// RMU: the block whose output is steered (0-based).
    pub layer: usize,
    /// RMU: `c` as a multiple of the frozen forget states' mean norm.
    pub steer: f32,
    /// RMU: the seed of `u`.
    pub seed: u64,
    /// Cut every sequence to its first N tokens.
    pub max_len: Option<usize>,
}

impl UnlearnConfig {
    /// The defaults of `method`: beta 0.1 (NPO's paper), SimNPO's beta 4.5 and gamma 0
    /// (its TOFU setting), lambda 1, RMU at block 7 (WMDP's) with `c` 5 times the states'
    /// norm.
    pub fn new(method: Method) -> Self {
        Self {
            method,
            beta: if method == Method::SimNpo { 4.5 } else { 0.1 },
            gamma: 0.0,
            retain_weight: 1.0,
            layer: 7,
            steer: 5.0,
            seed: 0,
            max_len: None,
        }
    }

    fn check(&self, n_layer: usize) -> Result<()> {
        let bad = |m: String| Err(Error::Invalid(m));
        if !self.retain_weight.is_finite() || self.retain_weight < 0.0 {
            return bad(format!(
                "the retain weight must be >= 0, got {}",
                self.retain_weight
            ));
        }
        match self.method {
            Method::Npo | Method::SimNpo if !(self.beta.is_finite() && self.beta > 0.0) => {
                bad(format!("beta must be > 0, got {}", self.beta))
            }
            Method::SimNpo if !self.gamma.is_finite() => {
                bad(format!("gamma must be finite, got {}", self.gamma))
            }
            Method::Rmu if self.layer >= n_layer => bad(format!(
                "layer {} is past the model's depth: it has blocks 0..={}",
                self.layer,
                n_layer - 1
            )),
            Method::Rmu if !(self.steer.is_finite() && self.steer > 0.0) => bad(format!(
                "the steering scale must be > 0, got {}",
                self.steer
            )),
            _ => Ok(()),
        }
    }
}

/// The training sequences of one run, and what was computed to build them.
#[derive(Debug, Clone)]
pub struct UnlearnData {
    pub forget: Vec<Sequence>,
    pub retain: Vec<Sequence>,
    /// Answer tokens (the end of turn included) on each side.
    pub forget_tokens: usize,
    pub retain_tokens: usize,
    /// NPO: the reference's mean log-probability per answer.
    pub reference_logprob: Option<f64>,
    /// RMU: the frozen forget states' mean norm at the block, and `c`.
    pub state_norm: Option<f64>,
    pub coefficient: Option<f32>,
}

/// The labels of an answer sequence.
fn labels(s: &Sequence) -> &[Option<u32>] {
    match &s.target {
        Target::Labels(l) => l,
        _ => unreachable!("answer_sequence builds labels"),
    }
}

/// The positions of a sequence that predict an answer token.
fn mask(s: &Sequence) -> Vec<bool> {
    labels(s).iter().map(Option::is_some).collect()
}

/// RMU's direction: `[0, 1)` uniform per dimension from a splitmix64 generator seeded by
/// `seed`, normalised to unit length.
pub fn random_unit(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed ^ 0x524D_5500;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    let v: Vec<f64> = (0..n).map(|_| next()).collect();
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-30);
    v.iter().map(|x| (x / norm) as f32).collect()
}

/// Build the training sequences of `cfg.method` from question/answer pairs. `frozen` is the
/// model being trained as it starts (its LoRA at zero): for RMU the first `layer + 1` blocks
/// without the head, for the others the whole model. NPO's reference log-probabilities and
/// RMU's frozen retain states come from it.
pub fn build(
    frozen: &TrainModel,
    tok: &Tokenizer,
    end: u32,
    forget: &[Example],
    retain: &[Example],
    cfg: &UnlearnConfig,
) -> Result<UnlearnData> {
    let c = &frozen.model.cfg;
    cfg.check(c.n_layer)?;
    if forget.is_empty() {
        return Err(Error::Invalid(
            "the forget set is empty: there is nothing to unlearn".into(),
        ));
    }
    if cfg.method.on_hidden() == frozen.has_head()
        || (cfg.method.on_hidden() && frozen.n_layers() != cfg.layer + 1)
    {
        return Err(Error::Invalid(format!(
            "{}: the frozen model must run {}",
            cfg.method.name(),
            if cfg.method.on_hidden() {
                format!("blocks 0..={} without its head", cfg.layer)
            } else {
                "with its head".into()
            }
        )));
    }
    let arch = c.arch.name();
    let seqs = |rows: &[Example]| -> Result<Vec<Sequence>> {
        rows.iter()
            .map(|ex| answer_sequence(tok, arch, ex, end, cfg.max_len, 1.0))
            .collect()
    };
    let (f, r) = (seqs(forget)?, seqs(retain)?);
    let count = |v: &[Sequence]| v.iter().map(Sequence::counted).sum::<usize>();
    let (forget_tokens, retain_tokens) = (count(&f), count(&r));
    if forget_tokens == 0 {
        return Err(Error::Invalid(
            "no forget row has an answer token to train on (cut by --max-len?)".into(),
        ));
    }
    let lambda = cfg.retain_weight;
    let ce = |s: Sequence| Sequence {
        weight: lambda,
        ..s
    };
    let mut out = UnlearnData {
        forget: Vec::with_capacity(f.len()),
        retain: Vec::with_capacity(r.len()),
        forget_tokens,
        retain_tokens,
        reference_logprob: None,
        state_norm: None,
        coefficient: None,
    };
    match cfg.method {
        Method::GradDiff => {
            for s in f {
                let l = labels(&s).to_vec();
                out.forget.push(Sequence {
                    target: Target::Ascent(l),
                    ..s
                });
            }
            out.retain = r.into_iter().map(ce).collect();
        }
        Method::Npo => {
            let nv = c.n_vocab;
            let mut sum = 0.0;
            for s in f {
                let act = frozen.forward(&s.tokens)?;
                let mut d = vec![0f32; act.logits.len()]; // [n, n_vocab]
                let (lp, _) = answer_logprob(&act.logits, nv, labels(&s), &mut d)?;
                sum += lp;
                let l = labels(&s).to_vec();
                out.forget.push(Sequence {
                    target: Target::Npo {
                        labels: l,
                        reference: lp,
                        beta: cfg.beta,
                    },
                    ..s
                });
            }
            out.reference_logprob = Some(sum / out.forget.len() as f64);
            out.retain = r.into_iter().map(ce).collect();
        }
        Method::SimNpo => {
            for s in f {
                let l = labels(&s).to_vec();
                out.forget.push(Sequence {
                    target: Target::SimNpo {
                        labels: l,
                        beta: cfg.beta,
                        gamma: cfg.gamma,
                    },
                    ..s
                });
            }
            out.retain = r.into_iter().map(ce).collect();
        }
        Method::Rmu => {
            let e = c.n_embd;
            // The frozen forget states' mean norm over the steered positions sets c.
            let (mut norm_sum, mut n) = (0.0f64, 0usize);
            for s in &f {
                let act = frozen.forward(&s.tokens)?;
                for (t, m) in mask(s).iter().enumerate() {
                    if *m {
                        let h = &act.hidden()[t * e..(t + 1) * e];
                        norm_sum += h.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
                        n += 1;
                    }
                }
            }
            let norm = norm_sum / n.max(1) as f64;
            let coef = (cfg.steer as f64 * norm) as f32;
            let to: Vec<f32> = random_unit(e, cfg.seed).iter().map(|x| x * coef).collect();
            out.state_norm = Some(norm);
            out.coefficient = Some(coef);
            for s in f {
                let m = mask(&s);
                out.forget.push(Sequence {
                    target: Target::Steer {
                        mask: m,
                        to: to.clone(),
                    },
                    ..s
                });
            }
            for s in r {
                let act = frozen.forward(&s.tokens)?;
                let m = mask(&s);
                out.retain.push(Sequence {
                    target: Target::Keep {
                        mask: m,
                        states: act.hidden().to_vec(),
                    },
                    weight: lambda,
                    ..s
                });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_names() {
        for m in Method::ALL {
            assert_eq!(Method::parse(m.name()).unwrap(), m);
        }
        assert_eq!(Method::parse("NPO").unwrap(), Method::Npo);
        let e = Method::parse("dpo").unwrap_err().to_string();
        assert!(
            e.contains("\"dpo\"") && e.contains("graddiff, npo, simnpo, rmu"),
            "{e}"
        );
    }

    #[test]
    fn unit_directions_are_seeded() {
        let a = random_unit(64, 1);
        assert_eq!(a, random_unit(64, 1));
        assert_ne!(a, random_unit(64, 2));
        let norm: f64 = a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-6);
        assert!(a.iter().all(|&x| x >= 0.0));
    }

    #[test]
    fn settings_are_checked() {
        let mut c = UnlearnConfig::new(Method::Rmu);
        c.layer = 30;
        let e = c.check(30).unwrap_err().to_string();
        assert!(e.contains("layer 30 is past the model's depth"), "{e}");
        assert!(c.check(31).is_ok());
        let mut c = UnlearnConfig::new(Method::Npo);
        c.beta = 0.0;
        assert!(c.check(30).unwrap_err().to_string().contains("beta"));
        let mut c = UnlearnConfig::new(Method::GradDiff);
        c.retain_weight = -1.0;
        assert!(c
            .check(30)
            .unwrap_err()
            .to_string()
            .contains("retain weight"));
    }
}
