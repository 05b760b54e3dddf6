//! Models: configuration from metadata, weights in place, one file per architecture, and the
//! preallocated run state (KV cache and activation buffers).
//!
//! `Model` is immutable and can be shared; each conversation owns a `State`.

mod attention;
pub mod config;
mod gemma2;
mod gemma3;
pub mod kv;
mod llama;
mod load;
pub mod matmul;
pub mod norm;
mod olmo2;
mod phi2;
mod phi3;
mod qwen2;
mod qwen3;
pub mod weights;

pub use config::{Arch, Config, NormKind};
pub use matmul::{Exec, Precision};
pub use norm::Norm;
pub use weights::{Proj, Weight, WeightId};

use crate::gguf::GgufFile;
use crate::patch::PatchSet;
use crate::pool::ThreadPool;
use crate::{Error, Result};
use attention::AttnShape;
use kv::KvCache;
use lethe_kernels::ops::RopeTable;
use load::load_layer;
use matmul::ActBuf;
use std::path::Path;
use std::sync::Arc;
use weights::{load, load_biased, load_vec};

/// Most tokens pushed through the blocks at once (prefill is chunked to this).
pub const MAX_BATCH: usize = 128;

pub struct Layer {
    pub attn_norm: Option<Norm>, // [n_embd] (none: olmo2)
    pub wq: Weight,              // [n_embd, n_head*hd]
    pub wk: Weight,              // [n_embd, n_head_kv*hd]
    pub wv: Weight,              // [n_embd, n_head_kv*hd]
    pub wo: Weight,              // [n_head*hd, n_embd]
    /// `[hd]`, per head (qwen3, gemma3), or `[n_head*hd]`, over the whole q (olmo2).
    pub q_norm: Option<Norm>,
    /// `[hd]` per head, or `[n_head_kv*hd]` over the whole k (olmo2).
    pub k_norm: Option<Norm>,
    pub post_attn_norm: Option<Norm>, // [n_embd] (gemma2, gemma3, olmo2)
    pub ffn_norm: Option<Norm>,       // [n_embd] (none: phi2, olmo2)
    pub w_gate: Option<Weight>,       // [n_embd, n_ff] (none: phi2)
    pub w_up: Weight,                 // [n_embd, n_ff]
    pub w_down: Weight,               // [n_ff, n_embd]
    pub post_ffn_norm: Option<Norm>,  // [n_embd] (gemma2, gemma3, olmo2)
}

pub struct Model {
    pub file: Arc<GgufFile>,
    pub cfg: Config,
    pub tok_embd: Weight, // [n_embd, n_vocab]
    pub output_norm: Norm,
    /// The output head; `token_embd` itself when the embeddings are tied.
    pub output: Weight, // [n_embd, n_vocab]
    pub layers: Vec<Layer>,
    pub rope_global: RopeTable,
    pub rope_local: RopeTable,
    /// LongRoPE's table for contexts longer than the one its factors were trained for (phi3).
    pub rope_long: Option<RopeTable>,
    pub pool: Arc<ThreadPool>,
    pub precision: Precision,
    /// What [`Model::shared_blocks`] found, by the assistant's file and block count (a weak
    /// reference keeps the file's address from being reused).
    shared: std::sync::Mutex<Vec<SharedMemo>>,
}

/// One answer of [`Model::shared_blocks`]: the assistant's file, its block count, the answer.
type SharedMemo = (std::sync::Weak<GgufFile>, usize, Option<SharedBlocks>);

impl Model {
    pub fn open(path: impl AsRef<Path>, n_threads: usize) -> Result<Self> {
        let file = Arc::new(GgufFile::open(path)?);
        Self::from_file(file, Arc::new(ThreadPool::new(n_threads)))
    }

    pub fn from_file(file: Arc<GgufFile>, pool: Arc<ThreadPool>) -> Result<Self> {
        let f = &*file;
        let cfg = Config::from_gguf(f)?;
        let (e, v) = (cfg.n_embd, cfg.n_vocab);
        let tok_embd = load(f, "token_embd.weight", e, v)?;
        let output = if f.tensor("output.weight").is_some() {
            load_biased(f, "output.weight", e, v)?
        } else {
            tok_embd.clone()
        };
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            layers.push(load_layer(f, &cfg, i)?);
        }
        let output_norm = Norm::load(f, "output_norm", e, cfg.norm, cfg.norm_eps)?;
        let kind = cfg.rope_kind;
        let table = |base: f32, scale: f32, factors: Option<&str>| -> Result<RopeTable> {
            let mut t = RopeTable::new(kind, cfg.n_rot, base, scale);
            // Per-frequency factors divide the frequencies (Llama 3.1, phi3's LongRoPE).
            if let Some(name) = factors {
                t.apply_freq_factors(&load_vec(f, name, cfg.n_rot / 2)?);
            }
            if cfg.rope_attn_factor != 1.0 {
                t.set_mscale(cfg.rope_attn_factor);
            }
            Ok(t)
        };
        let has = |name: &'static str| f.tensor(name).map(|_| name);
        let short = has("rope_freqs.weight").or(has("rope_factors_short.weight"));
        let rope_global = table(cfg.rope_base, cfg.rope_freq_scale, short)?;
        let rope_local = table(cfg.rope_base_local, 1.0, None)?;
        let rope_long = match has("rope_factors_long.weight") {
            Some(long) => Some(table(cfg.rope_base, cfg.rope_freq_scale, Some(long))?),
            None => None,
        };
        Ok(Self {
            file,
            cfg,
            tok_embd,
            output_norm,
            output,
            layers,
            rope_global,
            rope_local,
            rope_long,
            pool,
            precision: Precision::default(),
            shared: Default::default(),
        })
    }

    /// The rotary table of a layer (`local`: a sliding-window one) for a sequence whose
    /// context holds `n_ctx` tokens: LongRoPE's long factors above the trained context, as
    /// llama.cpp chooses them.
    pub fn rope(&self, local: bool, n_ctx: usize) -> &RopeTable {
        match &self.rope_long {
            _ if local => &self.rope_local,
            Some(long) if n_ctx > self.cfg.n_ctx_orig => long,
            _ => &self.rope_global,
        }
    }

    /// The context of matmuls over this model's weights, with the scratch `act` and `tmp`.
    pub fn exec<'a>(&'a self, act: &'a mut ActBuf, tmp: &'a mut [f32]) -> Exec<'a> {
        Exec {
            pool: &self.pool,
            file: &self.file,
            precision: self.precision,
            act,
            tmp,
        }
    }

    /// A fresh run state with room for `n_ctx` tokens.
    pub fn new_state(&self, n_ctx: usize) -> State {
        State::new(&self.cfg, n_ctx, self.pool.n_threads())
    }

    /// Run `st` with `patches` from now on (`None`: the plain model). A change of patches
    /// empties the state's cache, since what it holds was computed with the old ones; an empty
    /// set (every scale 0) is the plain model.
    pub fn attach_patches(&self, st: &mut State, patches: Option<Arc<PatchSet>>) -> Result<()> {
        let patches = patches.filter(|p| !p.is_empty());
        if let Some(p) = &patches {
            p.check_model(self)?;
        }
        let same = match (&st.patches, &patches) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        if !same {
            st.pos = 0;
        }
        let need = patches.as_ref().map_or(0, |p| p.scratch_len());
        if st.buf.patch_tmp.len() < need {
            st.buf.patch_tmp = vec![0.0; need];
        }
        st.patches = patches;
        Ok(())
    }

    /// `y = W x` for `n` tokens (`x` `[n, cols]`, returns `[n, rows]`) through the weight `t`
    /// names, with `patches`' deltas on it: the matmul and patch code of a forward pass, one
    /// weight at a time (for tests, and for checking what a patch does). For [`WeightId::Embd`]
    /// (a lookup) `x` holds `n` token ids and the result is their rows, `[n, n_embd]`.
    pub fn apply_weight(
        &self,
        t: WeightId,
        x: &[f32],
        n: usize,
        patches: Option<&PatchSet>,
    ) -> Result<Vec<f32>> {
        let (cols, rows) = self.target_shape(t)?;
        // The embedding is a lookup: one token id in, one row of `n_embd` out.
        let (cols, rows) = if t == WeightId::Embd {
            (1, cols)
        } else {
            (cols, rows)
        };
        if x.len() != n * cols {
            return Err(Error::Invalid(format!(
                "{}: input has {} values, expected {n} x {cols}",
                t.tensor_name(),
                x.len()
            )));
        }
        let w = self.target_weight(t).expect("checked by target_shape");
        if let Some(p) = patches {
            p.check_model(self)?;
        }
        let mut y = vec![0.0f32; n * rows];
        if t == WeightId::Embd {
            // The embedding is a lookup: `x` holds token ids.
            let mut tmp = Vec::new();
            for (i, &tok) in x.iter().enumerate() {
                if tok < 0.0 || tok.fract() != 0.0 || tok as usize >= self.cfg.n_vocab {
                    return Err(Error::Invalid(format!(
                        "token id {tok} is outside the vocabulary of {}",
                        self.cfg.n_vocab
                    )));
                }
                let row = &mut y[i * rows..(i + 1) * rows];
                w.dequantize_row(&self.file, tok as usize, row);
                if let Some(p) = patches {
                    p.embd_row(tok as usize, row, &mut tmp);
                }
            }
            return Ok(y);
        }
        if let WeightId::Block(il, p) = t {
            // A block's matmul runs through the state, as in a forward pass (fused low-rank
            // deltas included).
            if n > MAX_BATCH {
                return Err(Error::Invalid(format!(
                    "at most {MAX_BATCH} tokens at once"
                )));
            }
            let mut st = self.new_state(1);
            let buf = &mut st.buf;
            buf.patch_tmp = vec![0.0; patches.map_or(0, |p| p.scratch_len())];
            buf.io(p).0[..n * cols].copy_from_slice(x);
            buf.mm(self, RowPatches::all(patches), il, &[p], n);
            y.copy_from_slice(&buf.io(p).1[..n * rows]);
            return Ok(y);
        }
        let mut act = ActBuf::new(n.max(1), cols);
        let mut tmp = vec![0.0f32; patches.map_or(0, |p| p.scratch_len().max(n * rows))];
        let mut ex = self.exec(&mut act, &mut tmp);
        ex.matmul(w, x, n, &mut y);
        w.add_bias(&mut y, n);
        if let Some(p) = patches {
            p.apply(&mut ex, t, x, n, &mut y);
        }
        Ok(y)
    }

    /// Run `tokens` from an empty state and return the residual stream at the input of block
    /// `layer` for each token (`[n_tok, n_embd]`; `layer == n_layer`: after the last block,
    /// before the final norm). The state's patches apply.
    pub fn residuals(&self, st: &mut State, tokens: &[u32], layer: usize) -> Result<Vec<f32>> {
        if layer > self.cfg.n_layer {
            return Err(Error::Invalid(format!(
                "layer {layer}: the model has {} blocks",
                self.cfg.n_layer
            )));
        }
        st.pos = 0;
        st.tap = Some(layer);
        st.tapped.clear();
        let r = self.forward(st, tokens, None).map(|_| ());
        st.tap = None;
        r?;
        Ok(std::mem::take(&mut st.tapped))
    }

    /// Bytes of weights read per decoded token (for the bandwidth ceiling).
    pub fn bytes_per_token(&self) -> usize {
        let mut b = self.output.len_bytes() + self.tok_embd.row_bytes();
        for l in &self.layers {
            for p in Proj::ALL {
                b += l.weight(p).map_or(0, |w| w.len_bytes());
            }
        }
        b
    }

    /// Run `tokens` through the model at the state's current position, appending them to the
    /// KV cache. Returns the logits of the last token (`[n_vocab]`); with `all_logits`, the
    /// logits of every token are appended to it (`[n_tok, n_vocab]`).
    pub fn forward<'s>(
        &self,
        st: &'s mut State,
        tokens: &[u32],
        mut all_logits: Option<&mut Vec<f32>>,
    ) -> Result<&'s [f32]> {
        self.check_input(st, tokens)?;
        let n_chunks = tokens.len().div_ceil(MAX_BATCH);
        for (i, chunk) in tokens.chunks(MAX_BATCH).enumerate() {
            self.forward_batch(st, chunk);
            let n = chunk.len();
            let ps = st.patches.as_deref();
            match all_logits.as_deref_mut() {
                Some(out) => {
                    let start = out.len();
                    out.resize(start + n * self.cfg.n_vocab, 0.0);
                    self.head(&mut st.buf, ps, 0..n, &mut out[start..]);
                    let v = self.cfg.n_vocab;
                    st.logits.copy_from_slice(&out[out.len() - v..]);
                }
                None if i + 1 == n_chunks => {
                    self.head(&mut st.buf, ps, n - 1..n, &mut st.logits);
                }
                None => {}
            }
            st.pos += n;
        }
        Ok(&st.logits)
    }

    /// Like [`Model::forward`], but the output head of the last token is computed only for the
    /// vocabulary rows `rows`: `out[i]` is the logit of token `rows[i]` (ULD's assistants need
    /// their logits only on the target's plausible set).
    pub fn forward_rows(
        &self,
        st: &mut State,
        tokens: &[u32],
        rows: &[u32],
        out: &mut [f32],
    ) -> Result<()> {
        self.check_input(st, tokens)?;
        self.check_rows(rows)?;
        let n_chunks = tokens.len().div_ceil(MAX_BATCH);
        for (i, chunk) in tokens.chunks(MAX_BATCH).enumerate() {
            self.forward_batch(st, chunk);
            let n = chunk.len();
            if i + 1 == n_chunks {
                let e = self.cfg.n_embd;
                let buf = &mut st.buf;
                let (x, xb) = (&buf.x[(n - 1) * e..n * e], &mut buf.xb[..e]);
                self.output_norm.apply(xb, x);
                self.head_rows_of_xb(st, rows, out);
            }
            st.pos += n;
        }
        Ok(())
    }

    /// Like [`Model::forward`] without the output head: appends each token's final hidden
    /// state, after the output norm, to `hidden` (`[n_tok, n_embd]`), for [`Model::head_rows`]
    /// (a scorer that needs an assistant's logits only on a few rows per position).
    pub fn forward_hidden(
        &self,
        st: &mut State,
        tokens: &[u32],
        hidden: &mut Vec<f32>,
    ) -> Result<()> {
        self.check_input(st, tokens)?;
        let e = self.cfg.n_embd;
        for chunk in tokens.chunks(MAX_BATCH) {
            self.forward_batch(st, chunk);
            let start = hidden.len();
            hidden.resize(start + chunk.len() * e, 0.0);
            for (t, h) in hidden[start..].chunks_exact_mut(e).enumerate() {
                let x = &st.buf.x[t * e..(t + 1) * e];
                self.output_norm.apply(h, x);
            }
            st.pos += chunk.len();
        }
        Ok(())
    }

    /// The logits of the vocabulary rows `rows` (`out[i]` for token `rows[i]`) from one
    /// normed hidden state `h` (`[n_embd]`, from [`Model::forward_hidden`]), with the state's
    /// output patches and the final-logit softcap: the same numbers as the full head's rows.
    pub fn head_rows(
        &self,
        st: &mut State,
        h: &[f32],
        rows: &[u32],
        out: &mut [f32],
    ) -> Result<()> {
        let e = self.cfg.n_embd;
        if h.len() != e || out.len() < rows.len() {
            return Err(Error::Invalid(format!(
                "head_rows: a hidden state of {} (want {e}), {} outputs for {} rows",
                h.len(),
                out.len(),
                rows.len()
            )));
        }
        self.check_rows(rows)?;
        st.buf.xb[..e].copy_from_slice(h);
        self.head_rows_of_xb(st, rows, out);
        Ok(())
    }

    /// The output head on the vocabulary rows `rows` of the normed hidden state in
    /// `st.buf.xb[..n_embd]`, with the state's output patches and the final-logit softcap.
    fn head_rows_of_xb(&self, st: &mut State, rows: &[u32], out: &mut [f32]) {
        self.head_rows_in(&mut st.buf, st.patches.as_deref(), rows, out);
    }

    /// The output head on the vocabulary rows `rows` of the normed hidden state in
    /// `buf.xb[..n_embd]`, with the output deltas of `ps` and the final-logit softcap.
    fn head_rows_in(
        &self,
        buf: &mut Scratch,
        ps: Option<&PatchSet>,
        rows: &[u32],
        out: &mut [f32],
    ) {
        let e = self.cfg.n_embd;
        let out = &mut out[..rows.len()];
        let x = &buf.xb[..e];
        let mut ex = self.exec(&mut buf.act, &mut buf.patch_tmp);
        ex.matvec_rows(&self.output, x, rows, out);
        if let Some(b) = &self.output.bias {
            for (o, &r) in out.iter_mut().zip(rows) {
                *o += b[r as usize];
            }
        }
        if let Some(p) = ps.filter(|p| p.has_output()) {
            p.apply_output_rows(&mut ex, x, rows, out);
        }
        if let Some(cap) = self.cfg.final_logit_softcap {
            for v in out.iter_mut() {
                *v = (*v / cap).tanh() * cap;
            }
        }
    }

    fn check_rows(&self, rows: &[u32]) -> Result<()> {
        if let Some(&bad) = rows.iter().find(|&&r| r as usize >= self.cfg.n_vocab) {
            return Err(Error::Invalid(format!(
                "row {bad} is outside the vocabulary of {}",
                self.cfg.n_vocab
            )));
        }
        Ok(())
    }

    fn check_input(&self, st: &State, tokens: &[u32]) -> Result<()> {
        if tokens.is_empty() {
            return Err(Error::Invalid("forward needs at least one token".into()));
        }
        if st.pos + tokens.len() > st.kv.n_ctx {
            return Err(Error::ContextFull {
                needed: st.pos + tokens.len(),
                n_ctx: st.kv.n_ctx,
            });
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.cfg.n_vocab) {
            return Err(Error::Invalid(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.cfg.n_vocab
            )));
        }
        Ok(())
    }

    /// Run `tokens[i]` through the model for sequence `states[i]`, each at its own position
    /// and against its own KV cache, as one batched step: the matmuls run over all the
    /// sequences' rows at once (the weights are read once per step, not once per sequence),
    /// rope and attention per sequence. Each state's `logits` get its sequence's logits, bit
    /// for bit what [`Model::forward`] gives for that sequence alone (the kernels compute
    /// each row the same whatever the batch).
    ///
    /// All states must run with the same patches ([`same_patches`]); group sequences by
    /// patch set and step each group. At most [`MAX_BATCH`] sequences.
    pub fn forward_multi(&self, states: &mut [&mut State], tokens: &[u32]) -> Result<()> {
        if states.len() != tokens.len() {
            return Err(Error::Invalid(format!(
                "{} sequences but {} tokens",
                states.len(),
                tokens.len()
            )));
        }
        self.check_batch(states, tokens, |_| Ok(()))?;
        self.step_multi(states, tokens, |buf, ps, states| {
            let (n, v) = (states.len(), self.cfg.n_vocab);
            let mut logits = std::mem::take(&mut buf.logits);
            if logits.len() < n * v {
                logits.resize(n * v, 0.0);
            }
            self.head(buf, ps, 0..n, &mut logits[..n * v]); // [n_seq, n_vocab]
            for (st, l) in states.iter_mut().zip(logits.chunks_exact(v)) {
                st.logits.copy_from_slice(l);
            }
            buf.logits = logits;
        });
        Ok(())
    }

    /// [`Model::forward_multi`] with the output head of each sequence computed only for its
    /// own vocabulary rows: `outs[i][j]` is the logit of token `rows[i][j]` for sequence `i`,
    /// bit for bit what [`Model::forward_rows`] gives for that sequence alone. The states'
    /// `logits` are left as they were.
    pub fn forward_multi_rows(
        &self,
        states: &mut [&mut State],
        tokens: &[u32],
        rows: &[&[u32]],
        outs: &mut [&mut [f32]],
    ) -> Result<()> {
        let n = tokens.len();
        if states.len() != n || rows.len() != n || outs.len() != n {
            return Err(Error::Invalid(format!(
                "{} sequences, {} tokens, {} row sets and {} outputs",
                states.len(),
                n,
                rows.len(),
                outs.len()
            )));
        }
        self.check_batch(states, tokens, |i| {
            self.check_rows(rows[i])?;
            if outs[i].len() < rows[i].len() {
                return Err(Error::Invalid(format!(
                    "{} rows but room for {} logits",
                    rows[i].len(),
                    outs[i].len()
                )));
            }
            Ok(())
        })?;
        self.step_multi(states, tokens, |buf, ps, _| {
            let e = self.cfg.n_embd;
            for (t, (r, out)) in rows.iter().zip(outs.iter_mut()).enumerate() {
                let x = &buf.x[t * e..(t + 1) * e];
                self.output_norm.apply(&mut buf.xb[..e], x);
                self.head_rows_in(buf, ps, r, out);
            }
        });
        Ok(())
    }

    /// How many leading blocks `asst` shares with this model: blocks whose every weight and
    /// norm holds the same numbers (the same bytes of the same type and shape), in a model of
    /// the same configuration but the block count, reading tokens the same way (the same
    /// embeddings). ULD's assistants are truncated copies of their target (`lethe forge
    /// assistant`), so they share all of theirs; a LoRA on top is a patch, not a change of the
    /// weights. None when the models differ in anything else, or read rope factors from
    /// files. The first call for an assistant compares the blocks' bytes; later ones for the
    /// same assistant file and block count answer from memory.
    pub fn shared_blocks(&self, asst: &Model) -> Option<SharedBlocks> {
        let mut memo = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        let n = asst.layers.len();
        let file = Arc::as_ptr(&asst.file);
        if let Some((_, _, s)) = memo
            .iter()
            .find(|(f, k, _)| std::ptr::eq(f.as_ptr(), file) && *k == n)
        {
            return *s;
        }
        let s = self.find_shared_blocks(asst);
        memo.retain(|(f, _, _)| f.strong_count() > 0);
        memo.push((Arc::downgrade(&asst.file), n, s));
        s
    }

    fn find_shared_blocks(&self, asst: &Model) -> Option<SharedBlocks> {
        let plain = |c: &Config| Config {
            n_layer: 0,
            ..c.clone()
        };
        if plain(&self.cfg) != plain(&asst.cfg)
            || self.precision != asst.precision
            || self.rope_long.is_some()
            || asst.rope_long.is_some()
            || !same_weight(self, asst, &self.tok_embd, &asst.tok_embd)
        {
            return None;
        }
        let same_norm = |a: &Option<Norm>, b: &Option<Norm>| match (a, b) {
            (None, None) => true,
            (Some(a), Some(b)) => a.kind == b.kind && a.eps == b.eps && a.w == b.w && a.b == b.b,
            _ => false,
        };
        let same_layer = |a: &Layer, b: &Layer| {
            [
                (&a.attn_norm, &b.attn_norm),
                (&a.q_norm, &b.q_norm),
                (&a.k_norm, &b.k_norm),
                (&a.post_attn_norm, &b.post_attn_norm),
                (&a.ffn_norm, &b.ffn_norm),
                (&a.post_ffn_norm, &b.post_ffn_norm),
            ]
            .into_iter()
            .all(|(x, y)| same_norm(x, y))
                && Proj::ALL
                    .into_iter()
                    .all(|p| match (a.weight(p), b.weight(p)) {
                        (None, None) => true,
                        (Some(x), Some(y)) => same_weight(self, asst, x, y),
                        _ => false,
                    })
        };
        let k = self
            .layers
            .iter()
            .zip(&asst.layers)
            .take_while(|(a, b)| same_layer(a, b))
            .count();
        (k > 0).then(|| SharedBlocks {
            k,
            files: pair(self, asst),
        })
    }

    /// One decode step of sequences of this model and of an assistant that shares its first
    /// blocks with it (`shared`, from [`Model::shared_blocks`]), on the same tokens: `states` holds the `d`
    /// sequences of this model, then the `d` of the assistant (sequence `i` and `d + i` read
    /// `tokens[i]`). The shared blocks `0..k` run over all `2d` rows at once, so their weights are read
    /// and unpacked once for both models (the assistant's patches on its rows alone); the
    /// rest of this model's blocks over its rows, then its head into each of its states'
    /// `logits`; the rest of the assistant's blocks over its rows. The assistant's final
    /// hidden states, after its output norm, go to `hidden` (`[d, n_embd]`), for
    /// [`Model::head_rows`]. Every number is bit for bit what [`Model::forward_multi`] (or
    /// [`Model::forward`]) of each model alone gives.
    ///
    /// This model's sequences run without patches, the assistant's all with the same ones;
    /// `2d <= MAX_BATCH`.
    pub fn forward_multi_shared(
        &self,
        asst: &Model,
        shared: &SharedBlocks,
        states: &mut [&mut State],
        tokens: &[u32],
        hidden: &mut [f32],
    ) -> Result<()> {
        let (d, e) = (tokens.len(), self.cfg.n_embd);
        if states.len() != 2 * d || d == 0 || hidden.len() < d * e {
            return Err(Error::Invalid(format!(
                "a shared step of {d} tokens needs {} sequences (got {}) and room for {d} \
                 hidden states",
                2 * d,
                states.len()
            )));
        }
        let k = shared.k;
        if shared.files != pair(self, asst) || k > self.layers.len().min(asst.layers.len()) {
            return Err(Error::Invalid(
                "a shared step with blocks found shared by another pair of models".into(),
            ));
        }
        if states[..d].iter().any(|s| s.patches.is_some()) {
            return Err(Error::Invalid(
                "a shared step runs the target without patches".into(),
            ));
        }
        self.check_batch(&states[..d], tokens, |_| Ok(()))?;
        asst.check_batch(&states[d..], tokens, |_| Ok(()))?;
        let Some(big) = (0..2 * d).max_by_key(|&i| states[i].buf.scores.len()) else {
            return Ok(());
        };
        let mut buf = std::mem::take(&mut states[big].buf);
        let need = states[d].buf.patch_tmp.len();
        if buf.patch_tmp.len() < need {
            buf.patch_tmp.resize(need, 0.0);
        }
        // Blocks 0..k over both models' rows.
        let mut b = Batch {
            seqs: states,
            per_seq: 1,
            layers: 0..k,
        };
        self.embed(&mut buf, &b, tokens.iter().chain(tokens).copied());
        self.run_blocks(&mut buf, &mut b);
        // The rest of each model over its own rows: this model's first (the assistant's rows
        // wait in buf.x[d..2d]), then the assistant's moved to the front.
        let (mine, theirs) = states.split_at_mut(d);
        let mut b = Batch {
            seqs: mine,
            per_seq: 1,
            layers: k..self.layers.len(),
        };
        self.run_blocks(&mut buf, &mut b);
        let v = self.cfg.n_vocab;
        let mut logits = std::mem::take(&mut buf.logits);
        if logits.len() < d * v {
            logits.resize(d * v, 0.0);
        }
        self.head(&mut buf, None, 0..d, &mut logits[..d * v]); // [d, n_vocab]
        for (st, l) in mine.iter_mut().zip(logits.chunks_exact(v)) {
            st.logits.copy_from_slice(l);
        }
        buf.logits = logits;
        buf.x.copy_within(d * e..2 * d * e, 0);
        let mut b = Batch {
            seqs: theirs,
            per_seq: 1,
            layers: k..asst.layers.len(),
        };
        asst.run_blocks(&mut buf, &mut b);
        for (t, h) in hidden[..d * e].chunks_exact_mut(e).enumerate() {
            asst.output_norm.apply(h, &buf.x[t * e..(t + 1) * e]);
        }
        for st in states.iter_mut() {
            st.pos += 1;
        }
        states[big].buf = buf;
        Ok(())
    }

    /// The checks of a batched step: at most [`MAX_BATCH`] sequences, each with room for its
    /// token and with the same patches as the first; `more(i)` checks sequence `i` further.
    fn check_batch(
        &self,
        states: &[&mut State],
        tokens: &[u32],
        more: impl Fn(usize) -> Result<()>,
    ) -> Result<()> {
        if states.len() > MAX_BATCH {
            return Err(Error::Invalid(format!(
                "at most {MAX_BATCH} sequences at once"
            )));
        }
        for (i, (st, tok)) in states.iter().zip(tokens.chunks(1)).enumerate() {
            self.check_input(st, tok)?;
            if !same_patches(st, states[0]) {
                return Err(Error::Invalid(
                    "sequences in one batch must run with the same patches".into(),
                ));
            }
            more(i)?;
        }
        Ok(())
    }

    /// One batched step of `states` (one token each, checked): the blocks run in the scratch
    /// of the state with the widest attention scratch (the largest context); `head` gets that
    /// scratch (the final hidden states in `x`) with the batch's patches, then every state
    /// moves one token on.
    fn step_multi(
        &self,
        states: &mut [&mut State],
        tokens: &[u32],
        head: impl FnOnce(&mut Scratch, Option<&PatchSet>, &mut [&mut State]),
    ) {
        let Some(big) = (0..states.len()).max_by_key(|&i| states[i].buf.scores.len()) else {
            return;
        };
        let mut buf = std::mem::take(&mut states[big].buf);
        let ps = states[0].patches.clone();
        self.blocks(
            &mut buf,
            Batch {
                seqs: states,
                per_seq: 1,
                layers: 0..self.layers.len(),
            },
            tokens,
        );
        head(&mut buf, ps.as_deref(), states);
        for st in states.iter_mut() {
            st.pos += 1;
        }
        states[big].buf = buf;
    }

    /// The blocks over one chunk of one sequence; leaves the final hidden states in
    /// `st.buf.x`.
    fn forward_batch(&self, st: &mut State, tokens: &[u32]) {
        let mut buf = std::mem::take(&mut st.buf);
        let per_seq = tokens.len();
        let mut one = [&mut *st];
        self.blocks(
            &mut buf,
            Batch {
                seqs: &mut one,
                per_seq,
                layers: 0..self.layers.len(),
            },
            tokens,
        );
        st.buf = buf;
    }

    /// Embed `tokens` (one row each, in the batch's row order) and run the batch's blocks;
    /// leaves the final hidden states in `buf.x` (`[n, n_embd]`).
    fn blocks(&self, buf: &mut Scratch, mut b: Batch, tokens: &[u32]) {
        self.embed(buf, &b, tokens.iter().copied());
        self.run_blocks(buf, &mut b);
    }

    /// The embeddings of `tokens` (one row each, in the batch's row order) into `buf.x`
    /// (`[n, n_embd]`), with the embedding patches of the rows `b` patches and the
    /// architecture's scale.
    fn embed(&self, buf: &mut Scratch, b: &Batch, tokens: impl Iterator<Item = u32>) {
        let e = self.cfg.n_embd;
        let ps = b.patches();
        let mut n = 0;
        for (t, tok) in tokens.enumerate() {
            let x = &mut buf.x[t * e..(t + 1) * e];
            self.tok_embd.dequantize_row(&self.file, tok as usize, x);
            if let Some((p, from)) = &ps {
                if t >= *from {
                    p.embd_row(tok as usize, x, &mut buf.patch_row);
                }
            }
            n = t + 1;
        }
        if let Some(s) = self.cfg.embd_scale() {
            lethe_kernels::ops::scale_inplace(&mut buf.x[..n * e], s);
        }
    }

    /// Blocks `b.layers` over the batch's rows in `buf.x` (`[n, n_embd]`, left there).
    fn run_blocks(&self, buf: &mut Scratch, b: &mut Batch) {
        let b = &mut *b;
        match self.cfg.arch {
            Arch::Llama => llama::blocks(self, buf, b),
            Arch::Qwen2 => qwen2::blocks(self, buf, b),
            Arch::Qwen3 => qwen3::blocks(self, buf, b),
            Arch::Phi3 => phi3::blocks(self, buf, b),
            Arch::Phi2 => phi2::blocks(self, buf, b),
            Arch::Gemma2 => gemma2::blocks(self, buf, b),
            Arch::Gemma3 => gemma3::blocks(self, buf, b),
            Arch::Olmo2 => olmo2::blocks(self, buf, b),
        }
        if b.layers.end == self.layers.len() {
            b.tap(self.cfg.n_layer, buf);
        }
    }

    /// Final norm and output head for rows `which` of the chunk, into `out` (`[which.len(), n_vocab]`).
    fn head(
        &self,
        buf: &mut Scratch,
        ps: Option<&PatchSet>,
        which: std::ops::Range<usize>,
        out: &mut [f32],
    ) {
        let e = self.cfg.n_embd;
        for t in which.clone() {
            self.output_norm
                .apply(&mut buf.xb[t * e..(t + 1) * e], &buf.x[t * e..(t + 1) * e]);
        }
        let (xs, n) = (&buf.xb[which.start * e..which.end * e], which.len());
        let mut ex = self.exec(&mut buf.act, &mut buf.patch_tmp);
        ex.matmul(&self.output, xs, n, out);
        self.output.add_bias(out, n);
        if let Some(p) = ps.filter(|p| p.has_output()) {
            p.apply(&mut ex, WeightId::Output, xs, n, out);
        }
        if let Some(cap) = self.cfg.final_logit_softcap {
            for v in out[..which.len() * self.cfg.n_vocab].iter_mut() {
                *v = (*v / cap).tanh() * cap;
            }
        }
    }
}

impl Layer {
    /// The matrix `p` of this block (phi2 has no gate).
    pub fn weight(&self, p: Proj) -> Option<&Weight> {
        match p {
            Proj::Q => Some(&self.wq),
            Proj::K => Some(&self.wk),
            Proj::V => Some(&self.wv),
            Proj::O => Some(&self.wo),
            Proj::Gate => self.w_gate.as_ref(),
            Proj::Up => Some(&self.w_up),
            Proj::Down => Some(&self.w_down),
        }
    }
}

impl Model {
    /// The weight `t` names in this model, if it has it.
    pub fn target_weight(&self, t: WeightId) -> Option<&Weight> {
        match t {
            WeightId::Embd => Some(&self.tok_embd),
            WeightId::Output => Some(&self.output),
            WeightId::Block(n, p) => self.layers.get(n)?.weight(p),
        }
    }

    /// The block weights the file's tensor `name` holds, by first row: one for a plain tensor,
    /// several for a fused one (phi3's `attn_qkv`: q, k and v; its `ffn_up`: gate and up).
    /// Empty when `name` is no block tensor of this model's file.
    pub fn weights_in_tensor(&self, name: &str) -> Vec<(WeightId, &Weight)> {
        let Some(il) = name
            .strip_prefix("blk.")
            .and_then(|r| r.split('.').next())
            .and_then(|n| n.parse::<usize>().ok())
        else {
            return Vec::new();
        };
        let Some(l) = self.layers.get(il) else {
            return Vec::new();
        };
        let mut out: Vec<(WeightId, &Weight)> = Proj::ALL
            .into_iter()
            .filter_map(|p| Some((WeightId::Block(il, p), l.weight(p)?)))
            .filter(|(_, w)| w.name == name)
            .collect();
        out.sort_by_key(|(_, w)| w.row0);
        out
    }

    /// `[cols, rows]` of the weight `t` names, or a clear error when the model has no such weight.
    pub fn target_shape(&self, t: WeightId) -> Result<(usize, usize)> {
        match self.target_weight(t) {
            Some(w) => Ok((w.cols, w.rows)),
            None => Err(Error::Model(format!(
                "{}: the model has no such weight (it has {} blocks, 0..{})",
                t.tensor_name(),
                self.cfg.n_layer,
                self.cfg.n_layer.saturating_sub(1)
            ))),
        }
    }
}

impl Weight {
    pub fn len_bytes(&self) -> usize {
        self.row_bytes() * self.rows
    }
}

/// The activations of one forward step, `B <= MAX_BATCH` rows of each, allocated once. A
/// step over one sequence uses its own state's; a step over several ([`Model::forward_multi`])
/// borrows one of theirs for the whole batch.
#[derive(Default)]
pub struct Scratch {
    pub x: Vec<f32>,       // [B, n_embd] residual stream
    pub xb: Vec<f32>,      // [B, n_embd]
    pub xb2: Vec<f32>,     // [B, n_embd]
    pub q: Vec<f32>,       // [B, n_head*hd]
    pub k: Vec<f32>,       // [B, n_head_kv*hd]
    pub v: Vec<f32>,       // [B, n_head_kv*hd]
    pub att: Vec<f32>,     // [B, n_head*hd]
    pub hg: Vec<f32>,      // [B, n_ff]
    pub hu: Vec<f32>,      // [B, n_ff]
    pub scores: Vec<f32>,  // [n_threads, GROUP_MAX, n_ctx]
    pub rope_cs: Vec<f32>, // [n_rot]
    /// The logits of a multi-sequence step, grown on first use and kept.
    logits: Vec<f32>, // [n_seq, n_vocab]
    pub(crate) act: ActBuf,
    pub(crate) patch_tmp: Vec<f32>, // [scratch of the patch set]
    patch_row: Vec<f32>,            // [n_embd]
}

impl Scratch {
    /// Add the control vector of block `il` (if any) to the residual stream of `n` tokens.
    pub(crate) fn add_cvec(&mut self, ps: Option<RowPatches>, il: usize, n: usize) {
        let Some((v, from)) = ps.and_then(|ps| Some((ps.set.cvec(il)?, ps.from))) else {
            return;
        };
        let e = v.len();
        for x in self.x[from * e..n * e].chunks_exact_mut(e) {
            crate::patch::axpy(x, 1.0, v);
        }
    }

    fn new(c: &Config, n_ctx: usize, n_threads: usize) -> Self {
        let b = MAX_BATCH;
        let z = |n: usize| vec![0.0f32; n];
        Self {
            x: z(b * c.n_embd),
            xb: z(b * c.n_embd),
            xb2: z(b * c.n_embd),
            q: z(b * c.q_dim()),
            k: z(b * c.kv_dim()),
            v: z(b * c.kv_dim()),
            att: z(b * c.q_dim()),
            hg: z(b * c.n_ff),
            hu: z(b * c.n_ff),
            scores: z(attention::scratch_len(n_threads, n_ctx)),
            rope_cs: z(c.n_rot),
            logits: Vec::new(),
            act: ActBuf::new(b, c.n_embd.max(c.n_ff).max(c.q_dim())),
            patch_tmp: Vec::new(),
            patch_row: Vec::with_capacity(c.n_embd),
        }
    }
}

/// One conversation: its KV cache, position and last logits, the patches it runs with, and
/// the activation scratch of its forward steps.
pub struct State {
    pub kv: KvCache,
    /// Tokens already in the cache.
    pub pos: usize,
    pub logits: Vec<f32>, // [n_vocab]
    pub buf: Scratch,
    /// Layer patches in use ([`Model::attach_patches`]).
    patches: Option<Arc<PatchSet>>,
    /// [`Model::residuals`]: the block whose input residual stream is copied to `tapped`.
    tap: Option<usize>,
    tapped: Vec<f32>, // [n_tok, n_embd]
}

impl State {
    fn new(c: &Config, n_ctx: usize, n_threads: usize) -> Self {
        Self {
            kv: KvCache::new(c.n_layer, n_ctx, c.kv_dim()),
            pos: 0,
            logits: vec![0.0; c.n_vocab],
            buf: Scratch::new(c, n_ctx, n_threads),
            patches: None,
            tap: None,
            tapped: Vec::new(),
        }
    }

    /// Forget everything after the first `n` tokens (the cache keeps their keys and values).
    pub fn truncate(&mut self, n: usize) {
        self.pos = self.pos.min(n);
    }

    pub fn reset(&mut self) {
        self.pos = 0;
    }

    pub fn n_ctx(&self) -> usize {
        self.kv.n_ctx
    }

    /// The patches this state runs with.
    pub fn patches(&self) -> Option<&Arc<PatchSet>> {
        self.patches.as_ref()
    }
}

/// Whether two states run with the same patches (the same set, or none): only such states
/// can share a batch.
pub fn same_patches(a: &State, b: &State) -> bool {
    match (&a.patches, &b.patches) {
        (None, None) => true,
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        _ => false,
    }
}

/// The sequences of one forward step, as the blocks see them: `seqs[i]` owns `per_seq`
/// consecutive rows of the activations (its new tokens, at positions
/// `seqs[i].pos..seqs[i].pos + per_seq`) and its own KV cache. A prefill is one sequence of
/// `n` rows; a batched decode step is `n_seq` sequences of one row each. All of them run with
/// the same patches.
pub(crate) struct Batch<'a, 'b> {
    pub seqs: &'a mut [&'b mut State],
    pub per_seq: usize,
    /// The blocks this step runs: all of them, but in a step that shares blocks between a
    /// target and its assistant ([`Model::forward_multi_shared`]).
    pub layers: std::ops::Range<usize>,
}

/// The patches of a step's rows: `set` applies to rows `from..` of the batch. `from` is 0 but
/// in a step whose first rows are a target's (unpatched) and the rest its assistant's
/// ([`Model::forward_multi_shared`]).
#[derive(Clone, Copy)]
pub(crate) struct RowPatches<'a> {
    pub set: &'a PatchSet,
    pub from: usize,
}

impl<'a> RowPatches<'a> {
    /// The rows' patches of what [`Batch::patches`] returned.
    pub fn of(p: &'a Option<(Arc<PatchSet>, usize)>) -> Option<Self> {
        p.as_ref().map(|(set, from)| Self { set, from: *from })
    }

    /// `set` on all the rows.
    pub fn all(set: Option<&'a PatchSet>) -> Option<Self> {
        set.map(|set| Self { set, from: 0 })
    }
}

impl Batch<'_, '_> {
    /// Rows of the activations in this step.
    pub fn n(&self) -> usize {
        self.seqs.len() * self.per_seq
    }

    /// The patches the batch runs with and the first row they apply to: the first patched
    /// sequence's set (an `Arc`, so the scratch can be borrowed mutably beside them). The
    /// batch's builder sees that the sequences before it have none and those after it the
    /// same set.
    pub fn patches(&self) -> Option<(Arc<PatchSet>, usize)> {
        let i = self.seqs.iter().position(|s| s.patches.is_some())?;
        Some((self.seqs[i].patches.clone()?, i * self.per_seq))
    }

    /// Row `t`'s sequence and position.
    #[inline]
    fn row(&self, t: usize) -> (usize, usize) {
        let i = t / self.per_seq;
        (i, self.seqs[i].pos + t % self.per_seq)
    }

    /// Copy the residual stream if block `il`'s input is tapped ([`Model::residuals`], one
    /// sequence only).
    #[inline]
    pub fn tap(&mut self, il: usize, buf: &Scratch) {
        if let [st] = &mut *self.seqs {
            if st.tap == Some(il) {
                let e = buf.x.len() / MAX_BATCH;
                st.tapped.extend_from_slice(&buf.x[..self.per_seq * e]);
            }
        }
    }

    /// Block `il`'s attention over the batch's rows, the same in every architecture: q, k
    /// and v from `buf.xb` (biases added), the q/k norms the block has (per head, or over the
    /// whole vector), rope, the KV cache, attention over each row's own sequence, and
    /// `buf.xb2 = Wo att` (`[n, n_embd]`, plus its bias), with the patches `ps`.
    pub fn attention(&mut self, m: &Model, ps: Option<RowPatches>, il: usize, buf: &mut Scratch) {
        let (c, l, n) = (&m.cfg, &m.layers[il], self.n());
        // q [n, n_head*hd], k and v [n, n_head_kv*hd]
        buf.mm(m, ps, il, &[Proj::Q, Proj::K, Proj::V], n);
        if let (Some(qn), Some(kn)) = (&l.q_norm, &l.k_norm) {
            qn.rows_inplace(&mut buf.q[..n * c.q_dim()]);
            kn.rows_inplace(&mut buf.k[..n * c.kv_dim()]);
        }
        self.rope_and_cache(m, il, buf);
        self.attend(&m.pool, il, &AttnShape::of_layer(c, il), buf); // att [n, n_head*hd]
        buf.mm(m, ps, il, &[Proj::O], n); // xb2 [n, e] = Wo att
    }

    /// Rotate each row's query and key at its position and append its key and value to
    /// layer `il` of its sequence's cache.
    fn rope_and_cache(&mut self, m: &Model, il: usize, buf: &mut Scratch) {
        let c = &m.cfg;
        let (qd, kvd, hd) = (c.q_dim(), c.kv_dim(), c.head_dim);
        let local = c.is_local_layer(il);
        for t in 0..self.n() {
            let (i, pos) = self.row(t);
            let rope = m.rope(local, self.seqs[i].kv.n_ctx);
            rope.fill(pos, &mut buf.rope_cs);
            let q = &mut buf.q[t * qd..(t + 1) * qd];
            lethe_kernels::ops::rope_inplace(rope.kind, q, hd, c.n_rot, &buf.rope_cs);
            let k = &mut buf.k[t * kvd..(t + 1) * kvd];
            lethe_kernels::ops::rope_inplace(rope.kind, k, hd, c.n_rot, &buf.rope_cs);
            let v = &buf.v[t * kvd..(t + 1) * kvd];
            self.seqs[i]
                .kv
                .store(il, pos, &buf.k[t * kvd..(t + 1) * kvd], v);
        }
    }

    /// Attention of every row over its own sequence's cache (layer `il`): `buf.att` from
    /// `buf.q`, one job over all rows and heads.
    fn attend(&self, pool: &ThreadPool, il: usize, shape: &AttnShape, buf: &mut Scratch) {
        let row = |t: usize| {
            let (i, pos) = self.row(t);
            (&self.seqs[i].kv, pos)
        };
        let q = &buf.q[..self.n() * shape.n_head * shape.head_dim]; // [n, n_head*hd]
        attention::attend(pool, il, shape, q, &row, &mut buf.att, &mut buf.scores);
    }
}

/// The blocks an assistant shares with its target ([`Model::shared_blocks`]): the first `k`,
/// found for the models of these two files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedBlocks {
    k: usize,
    /// The files' addresses, to tell the pair again.
    files: (usize, usize),
}

impl SharedBlocks {
    /// How many leading blocks are shared.
    pub fn k(&self) -> usize {
        self.k
    }
}

/// The addresses of two models' files, which tell a pair of loaded models apart.
fn pair(a: &Model, b: &Model) -> (usize, usize) {
    (Arc::as_ptr(&a.file) as usize, Arc::as_ptr(&b.file) as usize)
}

/// Whether the weights `x` of `a` and `y` of `b` hold the same numbers: the same type, shape
/// and bytes (the same bytes of one file without reading them).
fn same_weight(a: &Model, b: &Model, x: &Weight, y: &Weight) -> bool {
    if (x.ty, x.rows, x.cols) != (y.ty, y.rows, y.cols) || x.bias != y.bias {
        return false;
    }
    let (p, q) = (x.data(&a.file), y.data(&b.file));
    std::ptr::eq(p, q) || p == q
}

/// The norm of an architecture that has it (checked at load).
pub(crate) fn norm(n: &Option<Norm>) -> &Norm {
    n.as_ref()
        .expect("the architecture's norms are checked at load")
}
