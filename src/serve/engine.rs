//! The inference thread: `--parallel` slots, each with its own decoder and cache, fed by a
//! channel of jobs and streaming text back through one channel per job.
//!
//! Scheduling: a job waits in a FIFO queue until a slot is free. Each step of the thread then
//! samples one token in every active slot and runs those tokens together: slots whose
//! decoders are the same model with the same patches go through one batched forward
//! ([`feed_each`], [`crate::model::Model::forward_multi`]: the weights are read once for all
//! of them, and each slot's logits are bit for bit what it would get alone, so a request's
//! greedy text does not depend on what else runs). Slots of different profiles form separate
//! groups; slots of one ULD profile step together too (the targets in one batched forward, each
//! assistant in another, whatever each slot's alpha and filter). A job carries its full unlearning
//! [`Setting`] (model, patch scales, terms' weight and filter): the decoder is built for it,
//! and a slot's cache is reused only by a job of the same setting.
//!
//! No request holds the thread for long: prompts run in chunks ([`Prefill`]) and `/score`
//! requests one continuation (or one chunk of their prompt) at a time, between the decode steps.
//! This background work runs in slices of time sized in tokens from the prefill rate measured so
//! far: short slices ([`SLICE_BUSY`]) while some slot is decoding, and then only while it has
//! had at most [`BACKGROUND_SHARE`] of the time (decoding answers come first: a short chat
//! behind a long prompt or a large `/score` slows by a small factor, the long work by at most
//! the inverse of the share); longer slices ([`SLICE_IDLE`]) when no slot decodes, so a new
//! request waits at most one of them to start. Prompts share a slice shortest-remaining
//! first, and a prompt that finishes ends the slice (its answer starts at once); prefill and
//! scoring take turns. Work whose client has gone (its receiver dropped) is dropped at the
//! next chunk; a cancelled prompt's tokens already run stay in the slot's cache for the next
//! request to reuse.

use super::error::ApiError;
use super::stats::Stats;
use crate::generate::{
    feed_each, Decoder, GenerateParams, Generation, Generator, Prefill, TokenProbs,
};
use crate::tokenizer::Tokenizer;
use crate::unlearn::Forgotten;
use std::collections::VecDeque;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

/// A model the server answers for: the shared base with a profile's assistants and patches
/// (none for the base itself).
pub struct ServedModel {
    /// The id clients name in `model`.
    pub id: String,
    /// The base with its terms and its patches at their default scales (in the order of
    /// `audit`'s `patches`); `forgotten.profile` is `None` for the base.
    pub forgotten: Forgotten,
    /// What the model is made of, for audits: profile, patches and their scales,
    /// assistants with alpha and filter, and every file with its sha256. Reported by
    /// `/v1/models` and in `generation_settings`.
    pub audit: serde_json::Value,
}

/// The full unlearning setting a request runs with: the served model, the scale of each of
/// its patches and the weight and filter of each of its assistant terms. It decides the
/// decoder, and a slot's cache is reused only for the same setting.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Setting {
    /// Index into the served models.
    pub model: usize,
    scales: Vec<u32>,
    terms: Vec<(u32, u32)>,
}

impl Setting {
    /// Model `model` with `scales` for its patches and `(weight, filter)` for its terms.
    pub fn new(model: usize, scales: &[f32], terms: &[(f32, f32)]) -> Self {
        Self {
            model,
            scales: scales.iter().map(|s| s.to_bits()).collect(),
            terms: terms
                .iter()
                .map(|(w, f)| (w.to_bits(), f.to_bits()))
                .collect(),
        }
    }
}

/// How many settings keep their built patches and terms.
const SETTINGS_CACHED: usize = 8;

/// A generation request for the inference thread.
pub struct Job {
    pub setting: Setting,
    pub prompt: Vec<u32>,
    pub params: GenerateParams,
    /// Alternatives to report per token with its log-probability; `None`: no probabilities.
    pub n_probs: Option<usize>,
    /// Where the text goes; when the receiver is dropped (the client left) the job ends.
    pub events: mpsc::UnboundedSender<Event>,
}

/// A teacher-forced scoring request (`POST /score`): continuations after one prompt.
pub struct ScoreJob {
    pub setting: Setting,
    pub prompt: Vec<u32>,
    pub conts: Vec<Vec<u32>>,
    /// Also each token's Min-K%++ statistics (the mean and deviation of the log-probability
    /// under the model's distribution at that position).
    pub stats: bool,
    pub reply: tokio::sync::oneshot::Sender<Result<Vec<ScoredCont>, ApiError>>,
}

/// One continuation's scores: per token its log-probability (scoring use of the setting's
/// combination), and with `stats` the mean and deviation of the position's log-probabilities.
#[derive(Debug, Clone)]
pub struct ScoredCont {
    pub logprobs: Vec<f64>,
    pub stats: Vec<crate::unlearn::score::TokenStats>,
}

/// What the inference thread is asked to do.
enum Work {
    Generate(Job),
    Score(ScoreJob),
}

/// What the inference thread reports on a job.
#[derive(Debug)]
pub enum Event {
    /// Decided text (stop strings and incomplete UTF-8 held back until decided), with the
    /// probabilities of the tokens sampled since the last event (when asked for).
    Text(String, Vec<TokenProbs>),
    /// The generation ended, in slot `slot`.
    Done { slot: usize, gen: Generation },
    /// The job failed.
    Error(ApiError),
}

/// The handle the HTTP side submits jobs through.
#[derive(Clone)]
pub struct Engine {
    tx: std_mpsc::Sender<Work>,
    /// Slots and counters, as the inference thread reports them.
    pub stats: Arc<Stats>,
}

impl Engine {
    /// Start the inference thread with `n_slots` slots of `n_ctx` tokens each, running
    /// prompts in chunks of at most `n_ubatch` tokens.
    pub fn start(
        tok: Arc<Tokenizer>,
        models: Vec<ServedModel>,
        n_slots: usize,
        n_ctx: usize,
        n_ubatch: usize,
    ) -> std::io::Result<Self> {
        let (tx, rx) = std_mpsc::channel();
        let n_slots = n_slots.max(1);
        let stats = Arc::new(Stats::new(n_slots, n_ctx));
        let shared = stats.clone();
        std::thread::Builder::new()
            .name("lethe-inference".into())
            .spawn(move || {
                // Decoders are made and kept on this thread.
                let sched = Scheduler {
                    tok,
                    models,
                    n_ctx,
                    slots: (0..n_slots).map(Slot::new).collect(),
                    built: VecDeque::new(),
                    scorer: None,
                    queue: VecDeque::new(),
                    scores: VecDeque::new(),
                    scoring: None,
                    n_ubatch: n_ubatch.max(1),
                    rate: None,
                    score_turn: false,
                    owed: 0.0,
                    begun: 0,
                    stats: shared,
                };
                sched.run(rx)
            })?;
        Ok(Self { tx, stats })
    }

    /// Queue a job; its events arrive on the returned receiver.
    pub fn submit(
        &self,
        setting: Setting,
        prompt: Vec<u32>,
        params: GenerateParams,
        n_probs: Option<usize>,
    ) -> Result<mpsc::UnboundedReceiver<Event>, ApiError> {
        let (events, rx) = mpsc::unbounded_channel();
        self.tx
            .send(Work::Generate(Job {
                setting,
                prompt,
                params,
                n_probs,
                events,
            }))
            .map_err(|_| ApiError::Server("the inference thread has stopped".into()))?;
        Ok(rx)
    }

    /// Score `conts` after `prompt` with `setting`. Runs on the inference thread between
    /// decode steps, a continuation at a time; dropping the future cancels what is left.
    pub async fn score(
        &self,
        setting: Setting,
        prompt: Vec<u32>,
        conts: Vec<Vec<u32>>,
        stats: bool,
    ) -> Result<Vec<ScoredCont>, ApiError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(Work::Score(ScoreJob {
                setting,
                prompt,
                conts,
                stats,
                reply,
            }))
            .map_err(|_| ApiError::Server("the inference thread has stopped".into()))?;
        rx.await
            .map_err(|_| ApiError::Server("the scoring ended without a result".into()))?
    }
}

/// One slot: a decoder for the setting it last served, the tokens in its cache, and the job
/// it is running.
struct Slot {
    id: usize,
    setting: Option<Setting>,
    dec: Option<Box<dyn Decoder>>,
    history: Vec<u32>,
    /// When it last took a job (the scheduler's count of jobs begun).
    used: u64,
    /// A job whose prompt is running.
    pending: Option<Pending>,
    /// A job that is generating.
    active: Option<Active>,
}

struct Pending {
    prefill: Prefill,
    events: mpsc::UnboundedSender<Event>,
    n_probs: Option<usize>,
}

/// A `/score` request under way: its continuations scored so far.
struct ScoreTask {
    job: ScoreJob,
    out: Vec<ScoredCont>,
}

struct Active {
    gen: Generator,
    events: mpsc::UnboundedSender<Event>,
    /// Probabilities already sent.
    probs_sent: usize,
}

impl Slot {
    fn new(id: usize) -> Self {
        Self {
            id,
            setting: None,
            dec: None,
            history: Vec::new(),
            used: 0,
            pending: None,
            active: None,
        }
    }

    fn busy(&self) -> bool {
        self.pending.is_some() || self.active.is_some()
    }

    /// Forget the cache (after a failure, its contents are unknown).
    fn reset(&mut self) {
        self.dec = None;
        self.setting = None;
        self.history.clear();
    }
}

/// Set when the server's drain deadline has passed: every running generation ends at its next
/// step (finish reason `Cancelled`, its final event sent, so streams close cleanly) and queued
/// or new ones are refused with 503.
pub static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

struct Scheduler {
    tok: Arc<Tokenizer>,
    models: Vec<ServedModel>,
    n_ctx: usize,
    slots: Vec<Slot>,
    /// Recently used settings, built (the most recent last).
    built: VecDeque<(Setting, Forgotten)>,
    /// The scorer of the last scoring request's setting.
    scorer: Option<(Setting, crate::unlearn::Scorer)>,
    queue: VecDeque<Job>,
    /// Scoring requests waiting for the one under way.
    scores: VecDeque<ScoreJob>,
    scoring: Option<ScoreTask>,
    /// The largest prompt chunk.
    n_ubatch: usize,
    /// Prompt tokens per second, a moving average over the chunks run so far.
    rate: Option<f64>,
    /// Whose turn it is when prompts and scoring both wait: scoring's when true.
    score_turn: bool,
    /// Seconds of decoding owed before the next background slice (while slots decode).
    owed: f64,
    /// Jobs begun so far.
    begun: u64,
    stats: Arc<Stats>,
}

/// A slice of background work (prompt chunks, scoring) while some slot is decoding, in
/// seconds: a decoding answer waits at most about this long for its next token.
const SLICE_BUSY: f64 = 0.03;
/// The most of the time background work takes while some slot is decoding.
const BACKGROUND_SHARE: f64 = 1.0 / 3.0;
/// A slice when no slot is decoding: a new request waits at most about this long to start.
const SLICE_IDLE: f64 = 0.1;
/// The smallest prompt chunk (one activation tile of the prefill kernels).
const MIN_CHUNK: usize = 8;

impl Scheduler {
    fn run(mut self, rx: std_mpsc::Receiver<Work>) {
        loop {
            let busy = self.slots.iter().any(Slot::busy)
                || self.scoring.is_some()
                || !self.scores.is_empty();
            if !busy && self.queue.is_empty() {
                match rx.recv() {
                    Ok(w) => self.take(w),
                    Err(_) => return,
                }
            }
            while let Ok(w) = rx.try_recv() {
                self.take(w);
            }
            if STOP.load(std::sync::atomic::Ordering::Relaxed) {
                self.stop_all();
            }
            // Jobs whose client left never start.
            self.queue.retain(|j| !j.events.is_closed());
            let deferred = self.queue.len() as u64;
            self.stats.count(|c| c.requests_deferred = deferred);
            while let Some(i) = self.free_slot() {
                let Some(job) = self.queue.pop_front() else {
                    break;
                };
                self.begin(i, job);
            }
            self.background();
            self.step();
        }
    }

    /// One slice of prompt chunks or scoring (see the module's notes).
    fn background(&mut self) {
        let decoding = self.slots.iter().any(|s| s.active.is_some());
        if !decoding {
            self.owed = 0.0;
        } else if self.owed > 0.0 {
            return;
        }
        let secs = if decoding { SLICE_BUSY } else { SLICE_IDLE };
        let t0 = Instant::now();
        let prompts = self.slots.iter().any(|s| s.pending.is_some());
        let scores = self.scoring.is_some() || !self.scores.is_empty();
        if prompts && scores {
            self.score_turn = !self.score_turn;
        } else {
            self.score_turn = scores;
        }
        if self.score_turn {
            self.score_some(secs);
        } else if prompts {
            self.prefill_some(self.tokens_in(secs));
        }
        if self.slots.iter().any(|s| s.active.is_some()) {
            let d = t0.elapsed().as_secs_f64();
            self.owed += d * (1.0 - BACKGROUND_SHARE) / BACKGROUND_SHARE;
        }
    }

    /// Prompt tokens that run in about `secs`, at the rate measured so far.
    fn tokens_in(&self, secs: f64) -> usize {
        let n = self.rate.map_or(64.0, |r| r * secs) as usize;
        n.clamp(MIN_CHUNK, self.n_ubatch.max(MIN_CHUNK))
    }

    /// Note that `n` prompt tokens ran in `secs`.
    fn measured(&mut self, n: usize, secs: f64) {
        if n < MIN_CHUNK || secs <= 0.0 {
            return;
        }
        let r = n as f64 / secs;
        self.rate = Some(self.rate.map_or(r, |old| 0.7 * old + 0.3 * r));
    }

    /// Run up to `budget` prompt tokens, shortest remaining prompt first (each at least a
    /// small chunk); prompts that are done start generating.
    fn prefill_some(&mut self, budget: usize) {
        let mut order: Vec<(usize, usize)> = self
            .slots
            .iter()
            .filter_map(|s| s.pending.as_ref().map(|p| (p.prefill.remaining(), s.id)))
            .collect();
        order.sort_unstable();
        let mut left = budget;
        let n = order.len();
        for (k, &(remaining, i)) in order.iter().enumerate() {
            if left == 0 {
                break;
            }
            let slot = &mut self.slots[i];
            let pending = slot.pending.as_mut().expect("listed above");
            if pending.events.is_closed() {
                // The client left: what ran stays cached.
                slot.pending = None;
                self.stats.slot_free(i, slot.history.len());
                continue;
            }
            let chunk = (left / (n - k)).max(MIN_CHUNK).min(remaining);
            let dec = slot.dec.as_deref_mut().expect("a busy slot has a decoder");
            let t0 = Instant::now();
            let r = pending.prefill.advance(dec, &mut slot.history, chunk);
            let secs = t0.elapsed().as_secs_f64();
            left = left.saturating_sub(chunk);
            match r {
                Ok(()) => {
                    let n_cached = slot.history.len();
                    let done = pending.prefill.remaining() == 0;
                    self.measured(chunk, secs);
                    self.stats.slot(i, |v| v.n_cached = n_cached);
                    self.stats
                        .count(|c| c.prompt_tokens_run_total += chunk as u64);
                    if done {
                        // Its answer starts now; the longer prompts wait for the next slice.
                        self.started(i);
                        return;
                    }
                }
                Err(e) => {
                    let p = slot.pending.take().expect("pending");
                    let _ = p.events.send(Event::Error(e.into()));
                    slot.reset();
                    self.stats.slot(i, |v| *v = idle(v.id, v.n_ctx));
                }
            }
        }
    }

    /// Slot `i`'s prompt has run: it starts generating.
    fn started(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        let Some(Pending {
            prefill,
            events,
            n_probs,
        }) = slot.pending.take()
        else {
            return;
        };
        slot.active = Some(Active {
            gen: prefill.into_generator().with_probs(n_probs),
            events,
            probs_sent: 0,
        });
    }

    /// Score for about `secs`: the next chunk of the current request's prompt or its next
    /// continuation, then more while time is left. A request whose client left is dropped.
    fn score_some(&mut self, secs: f64) {
        let t0 = Instant::now();
        loop {
            if self.scoring.is_none() {
                let Some(job) = self.scores.pop_front() else {
                    return;
                };
                if job.reply.is_closed() {
                    continue;
                }
                match self.score_begin(&job) {
                    Ok(()) => {
                        self.scoring = Some(ScoreTask {
                            job,
                            out: Vec::new(),
                        })
                    }
                    Err(e) => {
                        let _ = job.reply.send(Err(e));
                        continue;
                    }
                }
            }
            let task = self.scoring.as_ref().expect("set above");
            if task.job.reply.is_closed() {
                self.scoring = None;
                continue;
            }
            let chunk = self.tokens_in(secs);
            let t1 = Instant::now();
            match self.score_one(chunk) {
                Ok(Some(n)) => self.measured(n, t1.elapsed().as_secs_f64()),
                Ok(None) => {}
                Err(e) => {
                    // Its caches are in an unknown state.
                    self.scorer = None;
                    let task = self.scoring.take().expect("under way");
                    let _ = task.job.reply.send(Err(e.into()));
                }
            }
            let done = self
                .scoring
                .as_ref()
                .is_some_and(|t| t.out.len() == t.job.conts.len());
            if done {
                let task = self.scoring.take().expect("under way");
                let _ = task.job.reply.send(Ok(task.out));
            }
            if t0.elapsed().as_secs_f64() >= secs {
                return;
            }
        }
    }

    /// Check a scoring request and make the scorer of its setting ready.
    fn score_begin(&mut self, job: &ScoreJob) -> Result<(), ApiError> {
        let longest = job.conts.iter().map(Vec::len).max().unwrap_or(0);
        let needed = job.prompt.len() + longest.saturating_sub(1);
        if needed > self.n_ctx {
            return Err(ApiError::ExceedContext {
                n_prompt_tokens: needed,
                n_ctx: self.n_ctx,
            });
        }
        if self.scorer.as_ref().is_none_or(|(s, _)| *s != job.setting) {
            self.scorer = None;
            let sc = self.build(&job.setting)?.scorer(self.n_ctx)?;
            self.scorer = Some((job.setting.clone(), sc));
        }
        Ok(())
    }

    /// One unit of the scoring under way: up to `chunk` tokens of its prompt while the
    /// prompt is not all in (their number returned), else its next continuation.
    fn score_one(&mut self, chunk: usize) -> crate::Result<Option<usize>> {
        let task = self.scoring.as_mut().expect("under way");
        let (_, sc) = self.scorer.as_mut().expect("made by score_begin");
        let job = &task.job;
        let before = if sc.primed_on(&job.prompt) {
            None
        } else {
            Some(sc.primed_len(&job.prompt))
        };
        if let Some(before) = before {
            sc.prime(&job.prompt, chunk)?;
            return Ok(Some(sc.primed_len(&job.prompt) - before));
        }
        let c = &job.conts[task.out.len()];
        let mut stats = Vec::new();
        let logprobs = if job.stats {
            sc.score_with(c, |i, lp| {
                stats.push(crate::unlearn::score::mink_stats(lp, c[i]))
            })?
        } else {
            sc.score(c)?
        };
        let stats = stats.into_iter().collect::<crate::Result<_>>()?;
        task.out.push(ScoredCont { logprobs, stats });
        self.stats.count(|c| c.score_continuations_total += 1);
        Ok(None)
    }

    /// End every running generation (its final event sent) and refuse the queued ones.
    fn stop_all(&mut self) {
        for job in self.queue.drain(..) {
            let _ = job.events.send(Event::Error(ApiError::Unavailable(
                "the server is stopping".into(),
            )));
        }
        for job in self.scores.drain(..) {
            let _ = job
                .reply
                .send(Err(ApiError::Unavailable("the server is stopping".into())));
        }
        if let Some(task) = self.scoring.take() {
            let _ = task
                .job
                .reply
                .send(Err(ApiError::Unavailable("the server is stopping".into())));
        }
        for i in 0..self.slots.len() {
            if let Some(p) = self.slots[i].pending.take() {
                let _ = p.events.send(Event::Error(ApiError::Unavailable(
                    "the server is stopping".into(),
                )));
                self.stats.slot_free(i, self.slots[i].history.len());
            }
            if let Some(active) = self.slots[i].active.as_mut() {
                active.gen.cancel();
                self.finish(i);
            }
        }
    }

    /// Queue a generation or a scoring request.
    fn take(&mut self, w: Work) {
        match w {
            Work::Generate(job) => self.queue.push_back(job),
            Work::Score(job) => {
                if STOP.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = job
                        .reply
                        .send(Err(ApiError::Unavailable("the server is stopping".into())));
                    return;
                }
                self.scores.push_back(job);
            }
        }
    }

    /// A free slot for the next job: of those whose cache holds its setting, the one sharing
    /// the longest prefix with its prompt; else an empty slot, else the least recently used
    /// (so a long prompt does not evict a cache another slot could have taken it without).
    fn free_slot(&self) -> Option<usize> {
        let job = self.queue.front()?;
        let free = || self.slots.iter().filter(|s| !s.busy());
        let common = |s: &Slot| {
            s.history
                .iter()
                .zip(&job.prompt)
                .take_while(|(a, b)| a == b)
                .count()
        };
        let same = free()
            .filter(|s| s.setting.as_ref() == Some(&job.setting))
            .max_by_key(|s| (common(s), std::cmp::Reverse(s.used)));
        match same {
            Some(s) if common(s) > 0 => Some(s.id),
            _ => free()
                .find(|s| s.history.is_empty())
                .or_else(|| free().min_by_key(|s| s.used))
                .map(|s| s.id),
        }
    }

    /// The patches and terms of `setting`, built once while it is among the recent ones
    /// (the same `PatchSet` keeps slots of one setting in one batched forward).
    fn build(&mut self, setting: &Setting) -> crate::Result<Forgotten> {
        if let Some(i) = self.built.iter().position(|(s, _)| s == setting) {
            let entry = self.built.remove(i).expect("found");
            let b = entry.1.clone();
            self.built.push_back(entry);
            return Ok(b);
        }
        let scales: Vec<f32> = setting.scales.iter().map(|&s| f32::from_bits(s)).collect();
        let terms: Vec<(f32, f32)> = setting
            .terms
            .iter()
            .map(|&(w, f)| (f32::from_bits(w), f32::from_bits(f)))
            .collect();
        let b = self.models[setting.model]
            .forgotten
            .at(Some(&scales), &terms)?;
        if self.built.len() >= SETTINGS_CACHED {
            self.built.pop_front();
        }
        self.built.push_back((setting.clone(), b.clone()));
        Ok(b)
    }

    fn begin(&mut self, i: usize, job: Job) {
        self.begun += 1;
        self.slots[i].used = self.begun;
        if self.slots[i].setting.as_ref() != Some(&job.setting) || self.slots[i].dec.is_none() {
            self.slots[i].reset();
            let made = self.build(&job.setting).and_then(|b| b.decoder(self.n_ctx));
            let slot = &mut self.slots[i];
            match made {
                Ok(d) => {
                    slot.dec = Some(d);
                    slot.setting = Some(job.setting.clone());
                }
                Err(e) => {
                    let _ = job.events.send(Event::Error(e.into()));
                    return;
                }
            }
        }
        let slot = &mut self.slots[i];
        let dec = slot.dec.as_mut().expect("set above");
        match Prefill::new(dec.as_mut(), &mut slot.history, job.prompt, &job.params) {
            Ok(prefill) => {
                slot.pending = Some(Pending {
                    prefill,
                    events: job.events,
                    n_probs: job.n_probs,
                });
                let mut task = 0;
                self.stats.count(|c| {
                    c.tasks_started += 1;
                    c.n_decode_total += 1;
                    c.n_busy_slots_total += 1;
                    task = c.tasks_started;
                });
                let model = self.models[job.setting.model].id.clone();
                let n_cached = slot.history.len();
                self.stats.slot(i, |v| {
                    v.id_task = task as i64;
                    v.is_processing = true;
                    v.model = Some(model);
                    v.n_cached = n_cached;
                    v.n_decoded = 0;
                });
            }
            Err(e) => {
                slot.reset();
                let _ = job.events.send(Event::Error(e.into()));
            }
        }
    }

    /// One token for every active slot: sample in each, then run the sampled tokens
    /// together.
    fn step(&mut self) {
        let tok = &*self.tok;
        // The slots that go on to run a token, with that token; and those that ended.
        let mut running = Vec::new();
        let mut ended = Vec::new();
        for slot in &mut self.slots {
            let i = slot.id;
            let Some(active) = slot.active.as_mut() else {
                continue;
            };
            if active.events.is_closed() {
                // The client left: free the slot.
                active.gen.cancel();
                slot.active = None;
                self.stats.slot_free(i, slot.history.len());
                continue;
            }
            let dec = slot.dec.as_deref().expect("an active slot has a decoder");
            if let Some((text, next)) = active.gen.pick(dec, tok, &slot.history) {
                if !text.is_empty() {
                    let probs = active.gen.probs()[active.probs_sent..].to_vec();
                    active.probs_sent += probs.len();
                    let _ = active.events.send(Event::Text(text, probs));
                }
                if let Some(next) = next {
                    running.push((i, next));
                    continue;
                }
            }
            ended.push(i);
        }
        for i in ended {
            self.finish(i);
        }
        if running.is_empty() {
            return;
        }
        let t0 = Instant::now();
        let busy = running.len() as u64;
        self.stats.count(|c| {
            c.n_decode_total += 1;
            c.n_busy_slots_total += busy;
        });
        let mut failed = Vec::new();
        {
            let tokens: Vec<u32> = running.iter().map(|&(_, t)| t).collect();
            let mut decs: Vec<&mut dyn Decoder> = Vec::with_capacity(running.len());
            let mut rest: Vec<(&mut Generator, &mut Vec<u32>)> = Vec::new();
            let mut it = running.iter().peekable();
            for slot in &mut self.slots {
                if it.peek().is_none_or(|&&(id, _)| id != slot.id) {
                    continue;
                }
                it.next();
                let Slot {
                    dec,
                    active,
                    history,
                    ..
                } = slot;
                decs.push(dec.as_deref_mut().expect("an active slot has a decoder"));
                rest.push((&mut active.as_mut().expect("active").gen, history));
            }
            feed_each(&mut decs, &tokens, |i, r| match r {
                Ok(logits) => {
                    let (gen, history) = &mut rest[i];
                    gen.fed(tokens[i], logits, history);
                }
                Err(e) => failed.push((running[i].0, e)),
            });
        }
        self.owed -= t0.elapsed().as_secs_f64();
        for (id, e) in failed {
            let slot = &mut self.slots[id];
            if let Some(active) = slot.active.take() {
                let _ = active.events.send(Event::Error(e.into()));
            }
            slot.reset();
            self.stats.slot(id, |v| *v = idle(v.id, v.n_ctx));
        }
        for &(i, _) in &running {
            let slot = &self.slots[i];
            let Some(active) = slot.active.as_ref() else {
                continue;
            };
            let (n_cached, n_decoded) = (slot.history.len(), active.gen.n_generated());
            self.stats
                .count(|c| c.n_tokens_max = c.n_tokens_max.max(n_cached as u64));
            self.stats.slot(i, |v| {
                v.n_cached = n_cached;
                v.n_decoded = n_decoded;
            });
        }
    }

    /// Report slot `i`'s finished generation and free the slot.
    fn finish(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        let Some(Active {
            gen,
            events,
            probs_sent,
        }) = slot.active.take()
        else {
            return;
        };
        // Probabilities of tokens whose text was held back (a stop string) go out before
        // the end.
        if gen.probs().len() > probs_sent {
            let rest = gen.probs()[probs_sent..].to_vec();
            let _ = events.send(Event::Text(String::new(), rest));
        }
        let gen = gen.finish();
        self.stats.count(|c| {
            c.prompt_tokens_total += (gen.n_prompt - gen.n_cached) as u64;
            c.prompt_tokens_cached_total += gen.n_cached as u64;
            c.prompt_seconds_total += gen.prompt_ms / 1e3;
            c.tokens_predicted_total += gen.tokens.len() as u64;
            c.tokens_predicted_seconds_total += gen.gen_ms / 1e3;
        });
        self.stats.slot(i, |v| {
            v.is_processing = false;
            v.id_task = -1;
            v.n_decoded = 0;
        });
        let _ = events.send(Event::Done { slot: slot.id, gen });
    }
}

/// A slot that holds nothing.
fn idle(id: usize, n_ctx: usize) -> super::stats::SlotView {
    super::stats::SlotView {
        id,
        id_task: -1,
        n_ctx,
        ..Default::default()
    }
}
