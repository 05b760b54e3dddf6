//! The sampler chain, in llama.cpp's order: logit bias, penalties (repetition, frequency,
//! presence), top-k, top-p, min-p, temperature, then a seeded draw. Temperature 0 is greedy.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplerParams {
    pub temperature: f32,
    /// 0 or less: off.
    pub top_k: i32,
    /// 1.0: off.
    pub top_p: f32,
    /// 0.0: off.
    pub min_p: f32,
    /// 1.0: off.
    pub repeat_penalty: f32,
    /// How many recent tokens the penalties look at (0: off, -1: the whole context).
    pub repeat_last_n: i32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub seed: u64,
    /// Added to the logit of a token; `-inf` bans it.
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplerParams {
    /// llama.cpp's defaults.
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0xFFFF_FFFF,
            logit_bias: Vec::new(),
        }
    }
}

impl SamplerParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }
}

/// A small, fast, seedable generator (SplitMix64), stable across versions and platforms.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[derive(Debug, Clone, Copy)]
struct Cand {
    id: u32,
    logit: f32,
    p: f32,
}

/// Sampler state: the parameters, the generator, and a candidate buffer sized once.
pub struct Sampler {
    pub params: SamplerParams,
    rng: Rng,
    cands: Vec<Cand>,
    counts: std::collections::HashMap<u32, u32>,
}

impl Sampler {
    pub fn new(params: SamplerParams) -> Self {
        let rng = Rng::new(params.seed);
        Self {
            params,
            rng,
            cands: Vec::new(),
            counts: Default::default(),
        }
    }

    /// Choose the next token from `logits` given the tokens so far (`history`: prompt and
    /// generated). `logits` may hold `-inf` for banned tokens.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let p = &self.params;
        self.cands.clear();
        self.cands
            .extend(logits.iter().enumerate().map(|(i, &l)| Cand {
                id: i as u32,
                logit: l,
                p: 0.0,
            }));
        for &(id, bias) in &p.logit_bias {
            if let Some(c) = self.cands.get_mut(id as usize) {
                c.logit += bias;
            }
        }
        self.apply_penalties(history);

        let p = &self.params;
        if p.temperature <= 0.0 {
            return argmax(&self.cands);
        }
        self.cands.retain(|c| c.logit > f32::NEG_INFINITY);
        if self.cands.is_empty() {
            return argmax_raw(logits);
        }
        if p.top_k > 0 && (p.top_k as usize) < self.cands.len() {
            let k = p.top_k as usize;
            self.cands
                .select_nth_unstable_by(k - 1, |a, b| b.logit.total_cmp(&a.logit));
            self.cands.truncate(k);
        }
        self.cands
            .sort_unstable_by(|a, b| b.logit.total_cmp(&a.logit));
        if p.top_p < 1.0 {
            softmax(&mut self.cands);
            let mut cum = 0.0f32;
            let mut keep = self.cands.len();
            for (i, c) in self.cands.iter().enumerate() {
                cum += c.p;
                if cum >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            self.cands.truncate(keep.max(1));
        }
        if p.min_p > 0.0 {
            let max = self.cands[0].logit;
            let floor = max + p.min_p.ln();
            let keep = self.cands.iter().take_while(|c| c.logit >= floor).count();
            self.cands.truncate(keep.max(1));
        }
        for c in self.cands.iter_mut() {
            c.logit /= p.temperature;
        }
        softmax(&mut self.cands);
        let r = self.rng.next_f64() as f32;
        let mut cum = 0.0f32;
        for c in &self.cands {
            cum += c.p;
            if r < cum {
                return c.id;
            }
        }
        self.cands.last().map(|c| c.id).unwrap_or(0)
    }

    fn apply_penalties(&mut self, history: &[u32]) {
        let p = &self.params;
        let off =
            p.repeat_penalty == 1.0 && p.presence_penalty == 0.0 && p.frequency_penalty == 0.0;
        if off || p.repeat_last_n == 0 || history.is_empty() {
            return;
        }
        let n = if p.repeat_last_n < 0 {
            history.len()
        } else {
            (p.repeat_last_n as usize).min(history.len())
        };
        self.counts.clear();
        for &t in &history[history.len() - n..] {
            *self.counts.entry(t).or_default() += 1;
        }
        for (&id, &count) in &self.counts {
            let Some(c) = self.cands.get_mut(id as usize) else {
                continue;
            };
            if c.logit <= 0.0 {
                c.logit *= p.repeat_penalty;
            } else {
                c.logit /= p.repeat_penalty;
            }
            c.logit -= count as f32 * p.frequency_penalty + p.presence_penalty;
        }
    }
}

fn softmax(c: &mut [Cand]) {
    let max = c.iter().map(|c| c.logit).fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for x in c.iter_mut() {
        x.p = (x.logit - max).exp();
        sum += x.p;
    }
    for x in c.iter_mut() {
        x.p /= sum;
    }
}

fn argmax(c: &[Cand]) -> u32 {
    let mut best = 0;
    for (i, x) in c.iter().enumerate() {
        if x.logit > c[best].logit {
            best = i;
        }
    }
    c.get(best).map(|x| x.id).unwrap_or(0)
}

/// Index of the largest value (first on ties).
pub fn argmax_raw(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        (0..100).map(|i| ((i * 37) % 100) as f32 / 10.0).collect()
    }

    #[test]
    fn greedy_takes_argmax() {
        let l = logits();
        let mut s = Sampler::new(SamplerParams::greedy());
        assert_eq!(s.sample(&l, &[]), argmax_raw(&l));
    }

    #[test]
    fn same_seed_same_draws() {
        let l = logits();
        let p = SamplerParams {
            temperature: 1.5,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 42,
            ..Default::default()
        };
        let (mut a, mut b) = (Sampler::new(p.clone()), Sampler::new(p));
        let da: Vec<u32> = (0..50).map(|_| a.sample(&l, &[])).collect();
        let db: Vec<u32> = (0..50).map(|_| b.sample(&l, &[])).collect();
        assert_eq!(da, db);
        assert!(da.iter().any(|&x| x != da[0]), "a hot sampler should vary");
    }

    #[test]
    fn top_k_one_is_greedy() {
        let l = logits();
        let mut s = Sampler::new(SamplerParams {
            temperature: 2.0,
            top_k: 1,
            ..Default::default()
        });
        for _ in 0..20 {
            assert_eq!(s.sample(&l, &[]), argmax_raw(&l));
        }
    }

    #[test]
    fn logit_bias_bans() {
        let l = logits();
        let best = argmax_raw(&l);
        let mut s = Sampler::new(SamplerParams {
            logit_bias: vec![(best, f32::NEG_INFINITY)],
            ..SamplerParams::greedy()
        });
        assert_ne!(s.sample(&l, &[]), best);
    }

    #[test]
    fn repetition_penalty_matches_llama_cpp_rule() {
        // Two tokens: logit 2.0 (seen) and 1.5 (unseen); penalty 2 halves the positive logit.
        let l = vec![2.0, 1.5, -1.0];
        let mut s = Sampler::new(SamplerParams {
            repeat_penalty: 2.0,
            ..SamplerParams::greedy()
        });
        assert_eq!(s.sample(&l, &[0]), 1);
        // A negative seen logit is multiplied: -1 * 2 = -2, still below the rest.
        let l = vec![-1.0, -1.5];
        assert_eq!(s.sample(&l, &[0]), 1);
    }

    #[test]
    fn min_p_and_top_p_keep_the_head() {
        let mut l = vec![-10.0f32; 50];
        l[7] = 5.0;
        l[9] = 4.9;
        let mut s = Sampler::new(SamplerParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.99,
            min_p: 0.5,
            seed: 1,
            ..Default::default()
        });
        for _ in 0..50 {
            let t = s.sample(&l, &[]);
            assert!(t == 7 || t == 9);
        }
    }
}
