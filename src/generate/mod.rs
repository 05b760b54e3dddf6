//! Generation: the sampler chain, stop strings, and the decoding loop over any [`Decoder`].

pub mod sampler;
pub mod stop;

pub use sampler::{Sampler, SamplerParams};
pub use stop::{StopMatcher, StopOutcome};

use crate::model::{Model, State};
use crate::patch::PatchSet;
use crate::tokenizer::{StreamDecoder, Tokenizer};
use crate::{Error, Result};
use std::sync::Arc;
use std::time::Instant;

/// Something that turns tokens into next-token logits, keeping its own cache: a plain model,
/// or (later) a target with its assistants in lockstep.
pub trait Decoder {
    fn n_vocab(&self) -> usize;
    fn n_ctx(&self) -> usize;
    /// Tokens in the cache.
    fn pos(&self) -> usize;
    /// Append `tokens` and return the logits after the last one.
    fn feed(&mut self, tokens: &[u32]) -> Result<&[f32]>;
    /// Keep only the first `n` tokens of the cache.
    fn truncate(&mut self, n: usize);
    /// The model and state of a decoder that is one model's forward pass, so that
    /// [`feed_each`] can step it together with others of the same model in one batched
    /// forward. `None` (the default): see [`Decoder::group`].
    fn batch_parts(&mut self) -> Option<(&Arc<Model>, &mut State)> {
        None
    }
    /// For decoders made of several models (ULD's lockstep decoders): a key and a function
    /// that steps a group of decoders with equal keys together (each of its models in one
    /// batched forward for the group). `None` (the default): the decoder steps alone.
    fn group(&self) -> Option<(Vec<usize>, GroupFeed)> {
        None
    }
    /// The decoder itself, for a [`GroupFeed`] to find its concrete type.
    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        None
    }
}

/// Steps a group of decoders with equal [`Decoder::group`] keys: feeds `tokens[i]` to
/// `group[i]` and calls `done(i, logits)`, each decoder getting what it would get alone.
pub type GroupFeed =
    fn(group: &mut [&mut dyn Decoder], tokens: &[u32], done: &mut dyn FnMut(usize, Result<&[f32]>));

/// Feed `tokens[i]` to `decs[i]` for each `i` and call `done(i, logits)` with its outcome.
/// Decoders whose [`Decoder::batch_parts`] share a model and patches run together, one
/// batched [`Model::forward_multi`] per group (the weights are read once for the group, and
/// each gets the logits it would get alone); the others run one by one.
pub fn feed_each(
    decs: &mut [&mut dyn Decoder],
    tokens: &[u32],
    mut done: impl FnMut(usize, Result<&[f32]>),
) {
    debug_assert_eq!(decs.len(), tokens.len());
    // (model, patches, index) of the batchable decoders, grouped by sorting.
    let mut keys: Vec<(usize, usize, usize)> = Vec::new();
    // (key, feeder, index) of the decoders that step in groups.
    let mut grouped: Vec<(Vec<usize>, GroupFeed, usize)> = Vec::new();
    for (i, d) in decs.iter_mut().enumerate() {
        if let Some((key, feed)) = d.group() {
            grouped.push((key, feed, i));
            continue;
        }
        match d.batch_parts() {
            Some((m, st)) => {
                let ps = st.patches().map_or(0, |p| Arc::as_ptr(p) as usize);
                keys.push((Arc::as_ptr(m) as usize, ps, i));
            }
            None => done(i, d.feed(&tokens[i..i + 1])),
        }
    }
    if !grouped.is_empty() {
        grouped.sort_by(|a, b| (&a.0, a.1 as usize, a.2).cmp(&(&b.0, b.1 as usize, b.2)));
        let mut slots: Vec<Option<&mut dyn Decoder>> = Vec::with_capacity(decs.len());
        for d in decs.iter_mut() {
            let d: &mut dyn Decoder = &mut **d;
            slots.push(Some(d));
        }
        for group in grouped.chunk_by(|a, b| a.0 == b.0 && a.1 as usize == b.1 as usize) {
            for chunk in group.chunks(crate::model::MAX_BATCH) {
                let idx: Vec<usize> = chunk.iter().map(|c| c.2).collect();
                let mut members: Vec<&mut dyn Decoder> = idx
                    .iter()
                    .map(|&i| slots[i].take().expect("each decoder once"))
                    .collect();
                let toks: Vec<u32> = idx.iter().map(|&i| tokens[i]).collect();
                (chunk[0].1)(&mut members, &toks, &mut |j, r| done(idx[j], r));
            }
        }
    }
    keys.sort_unstable();
    let mut parts: Vec<Option<(&Arc<Model>, &mut State)>> =
        decs.iter_mut().map(|d| d.batch_parts()).collect();
    for group in keys.chunk_by(|a, b| (a.0, a.1) == (b.0, b.1)) {
        for chunk in group.chunks(crate::model::MAX_BATCH) {
            let mut model = None;
            let mut states = Vec::with_capacity(chunk.len());
            for &(_, _, i) in chunk {
                let (m, st) = parts[i].take().expect("each decoder once");
                model = Some(m);
                states.push(st);
            }
            let toks: Vec<u32> = chunk.iter().map(|&(_, _, i)| tokens[i]).collect();
            let r = model
                .expect("a group is not empty")
                .forward_multi(&mut states, &toks);
            for (st, &(_, _, i)) in states.iter().zip(chunk) {
                match &r {
                    Ok(()) => done(i, Ok(&st.logits)),
                    Err(e) => done(i, Err(e.for_each_caller())),
                }
            }
        }
    }
}

/// A model with its own run state.
pub struct ModelDecoder {
    pub model: Arc<Model>,
    pub state: State,
}

impl ModelDecoder {
    pub fn new(model: Arc<Model>, n_ctx: usize) -> Self {
        let state = model.new_state(n_ctx);
        Self { model, state }
    }

    /// A decoder that runs the model with layer patches.
    pub fn with_patches(
        model: Arc<Model>,
        n_ctx: usize,
        patches: Option<Arc<PatchSet>>,
    ) -> Result<Self> {
        let mut d = Self::new(model, n_ctx);
        d.model.attach_patches(&mut d.state, patches)?;
        Ok(d)
    }
}

impl Decoder for ModelDecoder {
    fn n_vocab(&self) -> usize {
        self.model.cfg.n_vocab
    }
    fn n_ctx(&self) -> usize {
        self.state.n_ctx()
    }
    fn pos(&self) -> usize {
        self.state.pos
    }
    fn feed(&mut self, tokens: &[u32]) -> Result<&[f32]> {
        self.model.forward(&mut self.state, tokens, None)
    }
    fn truncate(&mut self, n: usize) {
        self.state.truncate(n)
    }
    fn batch_parts(&mut self) -> Option<(&Arc<Model>, &mut State)> {
        Some((&self.model, &mut self.state))
    }
}

#[derive(Debug, Clone)]
pub struct GenerateParams {
    /// Most tokens to generate; negative: until the context is full.
    pub n_predict: i64,
    pub sampler: SamplerParams,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            n_predict: -1,
            sampler: SamplerParams::default(),
            stop: Vec::new(),
            ignore_eos: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// End-of-generation token or a stop string.
    Stop,
    /// `n_predict` reached or the context filled.
    Length,
    /// The caller asked to stop (client went away, Ctrl-C).
    Cancelled,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub text: String,
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
    pub stopping_word: Option<String>,
    pub n_prompt: usize,
    /// Prompt tokens reused from the cache.
    pub n_cached: usize,
    pub prompt_ms: f64,
    pub gen_ms: f64,
    /// Per generated token, its log-probability and the most likely alternatives, when
    /// asked for with [`Generator::with_probs`].
    pub probs: Vec<TokenProbs>,
}

/// A sampled token's log-probability and the `n` most likely tokens, all from the
/// distribution the sampler drew from (the decoder's logits: for a forgotten model the
/// combined ones). Tokens at `-inf` are left out.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenProbs {
    pub id: u32,
    pub logprob: f32,
    /// `(token, logprob)`, most likely first.
    pub top: Vec<(u32, f32)>,
}

impl TokenProbs {
    /// Log-softmax of `logits` at `id`, with the `n` most likely tokens.
    pub fn from_logits(logits: &[f32], id: u32, n: usize) -> Self {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = logits
            .iter()
            .filter(|l| **l > f32::NEG_INFINITY)
            .map(|&l| ((l - max) as f64).exp())
            .sum();
        let lse = max + sum.ln() as f32;
        let mut top: Vec<(u32, f32)> = Vec::new();
        if n > 0 {
            let mut idx: Vec<u32> = (0..logits.len() as u32)
                .filter(|&i| logits[i as usize] > f32::NEG_INFINITY)
                .collect();
            let k = n.min(idx.len());
            if k > 0 && k < idx.len() {
                idx.select_nth_unstable_by(k - 1, |&a, &b| {
                    logits[b as usize].total_cmp(&logits[a as usize])
                });
                idx.truncate(k);
            }
            idx.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
            top = idx
                .into_iter()
                .map(|i| (i, logits[i as usize] - lse))
                .collect();
        }
        let logprob = logits
            .get(id as usize)
            .map_or(f32::NEG_INFINITY, |&l| l - lse);
        Self { id, logprob, top }
    }
}

impl Generation {
    pub fn prompt_tps(&self) -> f64 {
        let n = (self.n_prompt - self.n_cached) as f64;
        if self.prompt_ms > 0.0 {
            n * 1000.0 / self.prompt_ms
        } else {
            0.0
        }
    }
    pub fn gen_tps(&self) -> f64 {
        if self.gen_ms > 0.0 {
            self.tokens.len() as f64 * 1000.0 / self.gen_ms
        } else {
            0.0
        }
    }
}

/// What the streaming callback says.
pub enum Flow {
    Continue,
    Stop,
}

/// A generation in progress, advanced one token at a time by [`Generator::step`]: the
/// decoding loop of [`generate`], split so that a scheduler can interleave several.
pub struct Generator {
    sampler: Sampler,
    stops: StopMatcher,
    stream: StreamDecoder,
    out: Generation,
    logits: Vec<f32>,
    budget: usize,
    ignore_eos: bool,
    t1: Instant,
    done: bool,
    /// Alternatives to record per token; `None`: no probabilities.
    n_probs: Option<usize>,
}

/// A prompt on its way into a decoder's cache, run in chunks so that a scheduler can step
/// other generations between them ([`Prefill::advance`]); [`Prefill::into_generator`] once
/// [`Prefill::remaining`] is zero. Chunked or whole, the cache and the final logits are the
/// same (each token's row goes through the same kernels whatever tile it sits in).
pub struct Prefill {
    prompt: Vec<u32>,
    /// Prompt tokens in the cache (reused or run).
    done: usize,
    /// Prompt tokens reused from the cache.
    common: usize,
    params: GenerateParams,
    /// Logits after the last prompt token, once it has run.
    logits: Vec<f32>,
    /// Time spent running the prompt (not waiting between chunks).
    run_ms: f64,
}

impl Prefill {
    /// Check the prompt and reuse the cached prefix of `history` (what is in `dec`'s cache):
    /// the cache is cut back to it, and the rest of the prompt is left to run.
    pub fn new(
        dec: &mut dyn Decoder,
        history: &mut Vec<u32>,
        prompt: Vec<u32>,
        params: &GenerateParams,
    ) -> Result<Self> {
        if prompt.is_empty() {
            return Err(Error::bad_value("prompt", "the prompt is empty"));
        }
        if prompt.len() > dec.n_ctx() {
            return Err(Error::ContextFull {
                needed: prompt.len(),
                n_ctx: dec.n_ctx(),
            });
        }
        // Reuse the cached prefix, but always run at least the last prompt token.
        let mut common = history
            .iter()
            .zip(&prompt)
            .take_while(|(a, b)| a == b)
            .count();
        common = common.min(prompt.len() - 1).min(dec.pos());
        dec.truncate(common);
        history.truncate(common);
        Ok(Self {
            prompt,
            done: common,
            common,
            params: params.clone(),
            logits: Vec::new(),
            run_ms: 0.0,
        })
    }

    /// Prompt tokens still to run.
    pub fn remaining(&self) -> usize {
        self.prompt.len() - self.done
    }

    /// Run up to `n` (at least one) more prompt tokens, appending them to `history`.
    pub fn advance(
        &mut self,
        dec: &mut dyn Decoder,
        history: &mut Vec<u32>,
        n: usize,
    ) -> Result<()> {
        let end = (self.done + n.max(1)).min(self.prompt.len());
        if end == self.done {
            return Ok(());
        }
        let t0 = Instant::now();
        let logits = dec.feed(&self.prompt[self.done..end])?;
        if end == self.prompt.len() {
            self.logits = logits.to_vec();
        }
        history.extend_from_slice(&self.prompt[self.done..end]);
        self.done = end;
        self.run_ms += t0.elapsed().as_secs_f64() * 1000.0;
        Ok(())
    }

    /// The generation that starts after the prompt. Call once [`Prefill::remaining`] is zero.
    pub fn into_generator(self) -> Generator {
        debug_assert_eq!(self.remaining(), 0, "the prompt has not all run");
        let params = self.params;
        Generator {
            sampler: Sampler::new(params.sampler.clone()),
            stops: StopMatcher::new(&params.stop),
            stream: StreamDecoder::new(),
            out: Generation {
                text: String::new(),
                tokens: Vec::new(),
                finish: FinishReason::Length,
                stopping_word: None,
                n_prompt: self.prompt.len(),
                n_cached: self.common,
                prompt_ms: self.run_ms,
                gen_ms: 0.0,
                probs: Vec::new(),
            },
            logits: self.logits,
            budget: if params.n_predict < 0 {
                usize::MAX
            } else {
                params.n_predict as usize
            },
            ignore_eos: params.ignore_eos,
            t1: Instant::now(),
            done: false,
            n_probs: None,
        }
    }
}

impl Generator {
    /// Check the prompt, reuse the cached prefix of `history` (what is in `dec`'s cache) and
    /// run the rest of the prompt in one go.
    pub fn start(
        dec: &mut dyn Decoder,
        history: &mut Vec<u32>,
        prompt: &[u32],
        params: &GenerateParams,
    ) -> Result<Self> {
        let mut p = Prefill::new(dec, history, prompt.to_vec(), params)?;
        let n = p.remaining();
        p.advance(dec, history, n)?;
        Ok(p.into_generator())
    }

    /// Record each token's log-probability and its `n` most likely alternatives.
    pub fn with_probs(mut self, n: Option<usize>) -> Self {
        self.n_probs = n;
        self
    }

    /// The probabilities recorded so far (one entry per generated token).
    pub fn probs(&self) -> &[TokenProbs] {
        &self.out.probs
    }

    /// Whether the generation has ended.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Tokens generated so far.
    pub fn n_generated(&self) -> usize {
        self.out.tokens.len()
    }

    /// Sample one token and feed it: returns the text decided by it (possibly empty, held
    /// back by a partial stop string or an incomplete UTF-8 sequence), or `None` once done.
    pub fn step(
        &mut self,
        dec: &mut dyn Decoder,
        tok: &Tokenizer,
        history: &mut Vec<u32>,
    ) -> Result<Option<String>> {
        let Some((text, next)) = self.pick(dec, tok, history) else {
            return Ok(None);
        };
        if let Some(next) = next {
            let logits = dec.feed(&[next])?;
            self.fed(next, logits, history);
        }
        Ok(Some(text))
    }

    /// The first half of [`Generator::step`]: sample a token and decide its text. `None` once
    /// done; otherwise the text and, unless the generation ended here, the token the decoder
    /// must run next, after which the caller hands its logits to [`Generator::fed`]. A
    /// scheduler runs the second half of several generations together ([`feed_each`]).
    pub fn pick(
        &mut self,
        dec: &dyn Decoder,
        tok: &Tokenizer,
        history: &[u32],
    ) -> Option<(String, Option<u32>)> {
        if self.done {
            return None;
        }
        if self.out.tokens.len() >= self.budget {
            return Some((self.end(), None));
        }
        let next = self.sampler.sample(&self.logits, history);
        if let Some(n) = self.n_probs {
            if !tok.is_eog(next) || self.ignore_eos {
                self.out
                    .probs
                    .push(TokenProbs::from_logits(&self.logits, next, n));
            }
        }
        if tok.is_eog(next) && !self.ignore_eos {
            self.out.finish = FinishReason::Stop;
            return Some((self.end(), None));
        }
        self.out.tokens.push(next);
        let piece = self.stream.push(tok, next);
        let mut text = match self.stops.push(&piece) {
            StopOutcome::Continue(t) => t,
            StopOutcome::Stopped(t, word) => {
                self.out.finish = FinishReason::Stop;
                self.out.stopping_word = Some(word);
                self.out.text.push_str(&t);
                self.close();
                return Some((t, None));
            }
        };
        self.out.text.push_str(&text);
        if self.out.tokens.len() >= self.budget {
            text.push_str(&self.end());
            return Some((text, None));
        }
        if dec.pos() >= dec.n_ctx() {
            // The context is full: the answer ends here.
            self.out.finish = FinishReason::Length;
            text.push_str(&self.end());
            return Some((text, None));
        }
        Some((text, Some(next)))
    }

    /// The second half of [`Generator::step`]: the decoder ran `next` and gave `logits`.
    pub fn fed(&mut self, next: u32, logits: &[f32], history: &mut Vec<u32>) {
        self.logits.copy_from_slice(logits);
        history.push(next);
    }

    /// End the generation at the caller's request (client gone, Ctrl-C).
    pub fn cancel(&mut self) {
        if !self.done {
            self.out.finish = FinishReason::Cancelled;
            self.close();
        }
    }

    /// The finished generation (or what there is of it).
    pub fn finish(mut self) -> Generation {
        if !self.done {
            self.close();
        }
        self.out
    }

    /// Flush the held-back text, end, and return what the flush decided.
    fn end(&mut self) -> String {
        let rest = self.stream.flush();
        let rest = match self.stops.push(&rest) {
            StopOutcome::Continue(t) => t + &self.stops.finish(),
            StopOutcome::Stopped(t, word) => {
                self.out.finish = FinishReason::Stop;
                self.out.stopping_word = Some(word);
                t
            }
        };
        self.out.text.push_str(&rest);
        self.close();
        rest
    }

    fn close(&mut self) {
        self.done = true;
        self.out.gen_ms = self.t1.elapsed().as_secs_f64() * 1000.0;
    }
}

/// Generate from `prompt` with `dec`. `history` holds what is already in the decoder's cache
/// (its common prefix with the prompt is reused); `on_text` receives decided text as it comes
/// and may cancel.
pub fn generate(
    dec: &mut dyn Decoder,
    tok: &Tokenizer,
    history: &mut Vec<u32>,
    prompt: &[u32],
    params: &GenerateParams,
    mut on_text: impl FnMut(&str) -> Flow,
) -> Result<Generation> {
    let mut g = Generator::start(dec, history, prompt, params)?;
    while let Some(text) = g.step(dec, tok, history)? {
        if !text.is_empty() && matches!(on_text(&text), Flow::Stop) && !g.is_done() {
            g.cancel();
            break;
        }
    }
    Ok(g.finish())
}
