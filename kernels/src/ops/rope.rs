//! Rotary position embeddings, ggml's two layouts.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeKind {
    /// Adjacent pairs `(x[2i], x[2i+1])` (ggml's default, used by `llama`).
    Norm,
    /// Halves `(x[i], x[i + d/2])` (GPT-NeoX style, used by `gemma3`).
    Neox,
}

/// Inverse frequencies of one rotary configuration: `theta_i = base^(-2i/d) * freq_scale`.
#[derive(Debug, Clone)]
pub struct RopeTable {
    pub kind: RopeKind,
    /// Rotated dimensions (`rope.dimension_count`), at most the head size.
    pub n_rot: usize,
    inv_freq: Vec<f32>,
    /// Multiplies cos and sin (ggml's `attn_factor`: LongRoPE's `rope.scaling.attn_factor`).
    mscale: f32,
}

impl RopeTable {
    pub fn new(kind: RopeKind, n_rot: usize, base: f32, freq_scale: f32) -> Self {
        let inv_freq = (0..n_rot / 2)
            .map(|i| {
                (freq_scale as f64 * (base as f64).powf(-2.0 * i as f64 / n_rot as f64)) as f32
            })
            .collect();
        Self {
            kind,
            n_rot,
            inv_freq,
            mscale: 1.0,
        }
    }

    /// cos/sin for one position, into `cs` (len n_rot: cos at 2i, sin at 2i+1).
    pub fn fill(&self, pos: usize, cs: &mut [f32]) {
        for (i, f) in self.inv_freq.iter().enumerate() {
            let theta = pos as f64 * *f as f64;
            cs[2 * i] = theta.cos() as f32 * self.mscale;
            cs[2 * i + 1] = theta.sin() as f32 * self.mscale;
        }
    }
}

/// Rotate every head of `x` (`n_head` heads of `head_dim`) with precomputed cos/sin `cs`.
pub fn rope_inplace(kind: RopeKind, x: &mut [f32], head_dim: usize, n_rot: usize, cs: &[f32]) {
    for head in x.chunks_exact_mut(head_dim) {
        match kind {
            RopeKind::Norm => {
                for i in 0..n_rot / 2 {
                    let (c, s) = (cs[2 * i], cs[2 * i + 1]);
                    let (a, b) = (head[2 * i], head[2 * i + 1]);
                    head[2 * i] = a * c - b * s;
                    head[2 * i + 1] = a * s + b * c;
                }
            }
            RopeKind::Neox => {
                let half = n_rot / 2;
                for i in 0..half {
                    let (c, s) = (cs[2 * i], cs[2 * i + 1]);
                    let (a, b) = (head[i], head[i + half]);
                    head[i] = a * c - b * s;
                    head[i + half] = a * s + b * c;
                }
            }
        }
    }
}

impl RopeTable {
    /// Divide each frequency by its factor (Llama 3.1's `rope_freqs`).
    pub fn apply_freq_factors(&mut self, factors: &[f32]) {
        for (f, &k) in self.inv_freq.iter_mut().zip(factors) {
            *f /= k;
        }
    }

    /// Scale the rotated pairs by `m` (cos and sin both): ggml's `attn_factor`.
    pub fn set_mscale(&mut self, m: f32) {
        self.mscale = m;
    }
}
