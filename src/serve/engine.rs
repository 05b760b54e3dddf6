//! The inference thread: `--parallel` slots, each with its own decoder and cache, fed by a
//! channel of jobs and streaming text back through one channel per job.
//!
//! Scheduling: a job waits in a FIFO queue until a slot is free. Each step of the thread then
//! samples one token in every active slot and runs those tokens together: slots whose
//! decoders are the same model with the same patches go through one batched forward
//! ([`feed_each`], [`crate::model::Model::forward_multi`]: the weights are read once for all
//! of them, and each slot's logits are bit for bit what it would get alone, so a request's
//! greedy text does not depend on what else runs). Slots of different profiles form separate
//! groups; ULD profiles (lockstep decoders) step one by one. A prompt is prefilled in one go
//! when its job starts. TODO: interleave prefill in chunks with decoding.

use super::error::ApiError;
use crate::generate::{feed_each, Decoder, GenerateParams, Generation, Generator};
use crate::model::{Model, PatchSet};
use crate::tokenizer::Tokenizer;
use crate::unlearn::Assistant;
use std::collections::VecDeque;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use tokio::sync::mpsc;

/// A model the server answers for: the shared base with a profile's assistants and patches
/// (none for the base itself).
pub struct ServedModel {
    /// The id clients name in `model`.
    pub id: String,
    /// The profile's name, `None` for the base.
    pub profile: Option<String>,
    pub terms: Vec<Assistant>,
    pub patches: Option<Arc<PatchSet>>,
}

/// A generation request for the inference thread.
pub struct Job {
    /// Index into the served models.
    pub model: usize,
    pub prompt: Vec<u32>,
    pub params: GenerateParams,
    /// Where the text goes; when the receiver is dropped (the client left) the job ends.
    pub events: mpsc::UnboundedSender<Event>,
}

/// What the inference thread reports on a job.
#[derive(Debug)]
pub enum Event {
    /// Decided text (stop strings and incomplete UTF-8 held back until decided).
    Text(String),
    /// The generation ended, in slot `slot`.
    Done { slot: usize, gen: Generation },
    /// The job failed.
    Error(ApiError),
}

/// The handle the HTTP side submits jobs through.
#[derive(Clone)]
pub struct Engine {
    tx: std_mpsc::Sender<Job>,
}

impl Engine {
    /// Start the inference thread with `n_slots` slots of `n_ctx` tokens each.
    pub fn start(
        base: Arc<Model>,
        tok: Arc<Tokenizer>,
        models: Vec<ServedModel>,
        n_slots: usize,
        n_ctx: usize,
    ) -> std::io::Result<Self> {
        let (tx, rx) = std_mpsc::channel();
        std::thread::Builder::new()
            .name("lethe-inference".into())
            .spawn(move || {
                // Decoders are made and kept on this thread.
                let sched = Scheduler {
                    base,
                    tok,
                    models,
                    n_ctx,
                    slots: (0..n_slots.max(1)).map(Slot::new).collect(),
                    queue: VecDeque::new(),
                };
                sched.run(rx)
            })?;
        Ok(Self { tx })
    }

    /// Queue a job; its events arrive on the returned receiver.
    pub fn submit(
        &self,
        model: usize,
        prompt: Vec<u32>,
        params: GenerateParams,
    ) -> Result<mpsc::UnboundedReceiver<Event>, ApiError> {
        let (events, rx) = mpsc::unbounded_channel();
        self.tx
            .send(Job {
                model,
                prompt,
                params,
                events,
            })
            .map_err(|_| ApiError::Server("the inference thread has stopped".into()))?;
        Ok(rx)
    }
}

/// One slot: a decoder for the model it last served, the tokens in its cache, and the job it
/// is running.
struct Slot {
    id: usize,
    model: Option<usize>,
    dec: Option<Box<dyn Decoder>>,
    history: Vec<u32>,
    active: Option<Active>,
}

struct Active {
    gen: Generator,
    events: mpsc::UnboundedSender<Event>,
}

impl Slot {
    fn new(id: usize) -> Self {
        Self {
            id,
            model: None,
            dec: None,
            history: Vec::new(),
            active: None,
        }
    }

    /// Forget the cache (after a failure, its contents are unknown).
    fn reset(&mut self) {
        self.dec = None;
        self.model = None;
        self.history.clear();
    }
}

struct Scheduler {
    base: Arc<Model>,
    tok: Arc<Tokenizer>,
    models: Vec<ServedModel>,
    n_ctx: usize,
    slots: Vec<Slot>,
    queue: VecDeque<Job>,
}

impl Scheduler {
    fn run(mut self, rx: std_mpsc::Receiver<Job>) {
        loop {
            let busy = self.slots.iter().any(|s| s.active.is_some());
            if !busy && self.queue.is_empty() {
                match rx.recv() {
                    Ok(job) => self.queue.push_back(job),
                    Err(_) => return,
                }
            }
            while let Ok(job) = rx.try_recv() {
                self.queue.push_back(job);
            }
            // Jobs whose client left never start.
            self.queue.retain(|j| !j.events.is_closed());
            while let Some(i) = self.free_slot() {
                let Some(job) = self.queue.pop_front() else {
                    break;
                };
                self.begin(i, job);
            }
            self.step();
        }
    }

    /// A free slot, preferring one whose cache holds the next job's model.
    fn free_slot(&self) -> Option<usize> {
        let want = self.queue.front()?.model;
        let free = || self.slots.iter().filter(|s| s.active.is_none());
        free()
            .find(|s| s.model == Some(want))
            .or_else(|| free().next())
            .map(|s| s.id)
    }

    fn begin(&mut self, i: usize, job: Job) {
        let slot = &mut self.slots[i];
        if slot.model != Some(job.model) || slot.dec.is_none() {
            slot.reset();
            let m = &self.models[job.model];
            match crate::unlearn::decoder(
                self.base.clone(),
                m.terms.clone(),
                m.patches.clone(),
                self.n_ctx,
            ) {
                Ok(d) => {
                    slot.dec = Some(d);
                    slot.model = Some(job.model);
                }
                Err(e) => {
                    let _ = job.events.send(Event::Error(e.into()));
                    return;
                }
            }
        }
        let dec = slot.dec.as_mut().expect("set above");
        match Generator::start(dec.as_mut(), &mut slot.history, &job.prompt, &job.params) {
            Ok(gen) => {
                slot.active = Some(Active {
                    gen,
                    events: job.events,
                })
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
        // The slots that go on to run a token, with that token.
        let mut running = Vec::new();
        for slot in &mut self.slots {
            let Some(active) = slot.active.as_mut() else {
                continue;
            };
            if active.events.is_closed() {
                // The client left: free the slot.
                active.gen.cancel();
                slot.active = None;
                continue;
            }
            let dec = slot.dec.as_deref().expect("an active slot has a decoder");
            if let Some((text, next)) = active.gen.pick(dec, tok, &slot.history) {
                if !text.is_empty() {
                    let _ = active.events.send(Event::Text(text));
                }
                if let Some(next) = next {
                    running.push((slot.id, next));
                    continue;
                }
            }
            slot.finish();
        }
        if running.is_empty() {
            return;
        }
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
        for (id, e) in failed {
            let slot = &mut self.slots[id];
            if let Some(active) = slot.active.take() {
                let _ = active.events.send(Event::Error(e.into()));
            }
            slot.reset();
        }
    }
}

impl Slot {
    /// Report the slot's finished generation and free it.
    fn finish(&mut self) {
        let Some(Active { gen, events }) = self.active.take() else {
            return;
        };
        let _ = events.send(Event::Done {
            slot: self.id,
            gen: gen.finish(),
        });
    }
}
