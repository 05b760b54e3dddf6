//! Building a forgotten model: a base model opened once, then any number of [`Forgotten`]
//! models over its weights, each the base with assistant terms (ULD and its relatives) and
//! layer patches, from a profile or given ad hoc. Every command and the server build their
//! models here, so the checks (the tokenizer against the head, an assistant's vocabulary
//! against the base's) and the defaults (threads, context size) exist once.
//!
//! ```text
//! Base::open(path, opts)          weights (mmap), tokenizer, thread pool, context size
//!   .plain()                      the base itself
//!   .profile(file, p, extra)      a profile's assistants and patches (+ extra patches)
//!   .forgotten(terms, parts)      ad hoc terms and patches
//! Forgotten::decoder(n_ctx)       plain, or in lockstep with the assistants
//! Forgotten::scorer(n_ctx)        teacher-forced scoring under the same combination
//! ```

use super::profile::{self, Profile, ProfileFile};
use super::{Assistant, LockstepDecoder, Scorer};
use crate::generate::{Decoder, ModelDecoder};
use crate::gguf::GgufFile;
use crate::model::{Model, Precision};
use crate::patch::{Patch, PatchSet};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The context size `n_ctx = 0` stands for: the model's training context, capped here.
pub const DEFAULT_MAX_CTX: usize = 4096;

/// Threads for the forward pass when none are asked for: every core.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// How a base model is opened.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    /// Threads of the model's pool (`None`: [`default_threads`]).
    pub threads: Option<usize>,
    /// Context size in tokens (0: the training context, at most [`DEFAULT_MAX_CTX`]).
    pub n_ctx: usize,
    pub precision: Precision,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            threads: None,
            n_ctx: DEFAULT_MAX_CTX,
            precision: Precision::default(),
        }
    }
}

/// A base model in memory with its tokenizer: what every forgotten model of it shares.
#[derive(Clone)]
pub struct Base {
    pub model: Arc<Model>,
    pub tok: Arc<Tokenizer>,
    /// The GGUF file it came from.
    pub path: PathBuf,
    /// Context size in tokens ([`LoadOptions::n_ctx`] resolved).
    pub n_ctx: usize,
    opts: LoadOptions,
}

impl Base {
    /// Open the model at `path` with its tokenizer, checking that the tokenizer and the
    /// output head have the same number of tokens.
    pub fn open(path: impl AsRef<Path>, opts: LoadOptions) -> Result<Self> {
        let path = path.as_ref();
        let threads = opts.threads.unwrap_or_else(default_threads);
        let in_file = |e: Error| Error::Model(format!("loading {}: {e}", path.display()));
        let mut model = Model::open(path, threads).map_err(in_file)?;
        model.precision = opts.precision;
        let tok = Tokenizer::from_gguf(&model.file).map_err(in_file)?;
        if tok.n_vocab() != model.cfg.n_vocab {
            return Err(Error::Model(format!(
                "{}: the tokenizer has {} tokens but the model's head has {}",
                path.display(),
                tok.n_vocab(),
                model.cfg.n_vocab
            )));
        }
        let n_ctx = match opts.n_ctx {
            0 => model.cfg.n_ctx_train.min(DEFAULT_MAX_CTX),
            n => n,
        };
        Ok(Self {
            model: Arc::new(model),
            tok: Arc::new(tok),
            path: path.to_path_buf(),
            n_ctx,
            opts,
        })
    }

    /// The model at `path` opened with this one's options, or this one when `path` is its
    /// file (a profile's base, a reference model).
    pub fn open_other(&self, path: impl AsRef<Path>) -> Result<Self> {
        if self.is_file(path.as_ref()) {
            return Ok(self.clone());
        }
        Self::open(path, self.opts)
    }

    /// Whether `path` is this model's file.
    pub fn is_file(&self, path: &Path) -> bool {
        std::fs::canonicalize(path).ok() == std::fs::canonicalize(&self.path).ok()
    }

    /// The file's stem (`SmolLM2-135M-Instruct-Q8_0`), the name reports and the server give
    /// the base.
    pub fn stem(&self) -> String {
        self.path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    }

    /// An assistant (or a pair term's reference) at `path`, loaded beside this model: it
    /// shares the thread pool and precision, and its vocabulary must be this model's, token
    /// for token.
    pub fn assistant(&self, path: &Path) -> Result<Arc<Model>> {
        let file = GgufFile::open(path)?;
        profile::same_vocab(&self.model.file, &self.path, &file, path)?;
        let mut am = Model::from_file(Arc::new(file), self.model.pool.clone())
            .map_err(|e| Error::Model(format!("loading assistant {}: {e}", path.display())))?;
        am.precision = self.model.precision;
        Ok(Arc::new(am))
    }

    /// The base itself: no terms, no patches.
    pub fn plain(&self) -> Forgotten {
        Forgotten::plain(self.model.clone())
    }

    /// The base with `terms` and the patches `parts` (checked against it).
    pub fn forgotten(
        &self,
        terms: Vec<Assistant>,
        parts: Vec<(Arc<Patch>, f32)>,
    ) -> Result<Forgotten> {
        Forgotten::new(self.model.clone(), terms, parts)
    }

    /// Profile `p` of `file` over this base: its assistants (each beside this model) and its
    /// patches after `extra` (patches given outside the profile). The profile's base must be
    /// this model's file.
    pub fn profile(
        &self,
        file: &ProfileFile,
        p: &Profile,
        extra: &[(Arc<Patch>, f32)],
    ) -> Result<Forgotten> {
        let base = profile::locate(&file.dir, &p.base)?;
        if !self.is_file(&base) {
            return Err(Error::Invalid(format!(
                "profile {:?} has another base model ({}) than the one loaded ({})",
                p.name,
                base.display(),
                self.path.display()
            )));
        }
        let mut terms = Vec::new();
        for spec in &p.assistants {
            let model = self.assistant(&profile::locate(&file.dir, &spec.model)?)?;
            let reference = match &spec.reference {
                Some(r) => Some(self.assistant(&profile::locate(&file.dir, r)?)?),
                None => None,
            };
            let mut parts = Vec::new();
            for ps in &spec.patches {
                let (patch, _) = profile::load_patch(&file.dir, ps, &model)?;
                parts.push((Arc::new(patch), ps.scale));
            }
            let patches = patch_set(&model, &parts)?;
            terms.push(Assistant {
                model,
                kind: spec.kind.term_kind(),
                weight: spec.term_weight(),
                filter: spec.filter,
                reference,
                patches,
                score: spec.score,
            });
        }
        let mut parts = extra.to_vec();
        for ps in &p.patches {
            let (patch, _) = profile::load_patch(&file.dir, ps, &self.model)
                .map_err(|e| prefixed(&format!("profile {:?}", p.name), e))?;
            parts.push((Arc::new(patch), ps.scale));
        }
        let mut f = Forgotten::new(self.model.clone(), terms, parts)?;
        f.profile = Some(p.name.clone());
        Ok(f)
    }
}

/// `e` with `what: ` before its message, its kind kept where it has a message.
fn prefixed(what: &str, e: Error) -> Error {
    match e {
        Error::Invalid(m) => Error::Invalid(format!("{what}: {m}")),
        Error::Model(m) => Error::Model(format!("{what}: {m}")),
        e => e,
    }
}

/// A model to decode and score with: a base's weights with the assistant terms and layer
/// patches that make it forget (none: the base itself).
#[derive(Clone)]
pub struct Forgotten {
    pub model: Arc<Model>,
    /// The profile it was built from, if any.
    pub profile: Option<String>,
    /// Assistant terms, sharing the model's thread pool.
    pub terms: Vec<Assistant>,
    /// The layer patches with their scales, as given.
    pub parts: Vec<(Arc<Patch>, f32)>,
    /// `parts` built against the model (`None`: nothing to apply).
    pub patches: Option<Arc<PatchSet>>,
}

impl Forgotten {
    /// `model` alone.
    pub fn plain(model: Arc<Model>) -> Self {
        Self {
            model,
            profile: None,
            terms: Vec::new(),
            parts: Vec::new(),
            patches: None,
        }
    }

    /// `model` with `terms` and the patches `parts`: the patches are checked against the
    /// model and built into one set, the terms' vocabularies checked against it.
    pub fn new(
        model: Arc<Model>,
        terms: Vec<Assistant>,
        parts: Vec<(Arc<Patch>, f32)>,
    ) -> Result<Self> {
        for t in &terms {
            t.check(model.cfg.n_vocab)?;
        }
        let patches = patch_set(&model, &parts)?;
        Ok(Self {
            model,
            profile: None,
            terms,
            parts,
            patches,
        })
    }

    /// Neither terms nor patches.
    pub fn is_plain(&self) -> bool {
        self.terms.is_empty() && self.patches.is_none()
    }

    /// The same model with its patches at `scales` (in the order of `parts`; `None`: as
    /// they are) and its terms at `(weight, filter)` each, in order: a served request's
    /// setting, a point of a sweep. A scale of 0 drops its patch.
    pub fn at(&self, scales: Option<&[f32]>, terms: &[(f32, f32)]) -> Result<Self> {
        if terms.len() != self.terms.len() || scales.is_some_and(|s| s.len() != self.parts.len()) {
            return Err(Error::Invalid(format!(
                "a setting of {} terms and {} patches for a model of {} and {}",
                terms.len(),
                scales.map_or(self.parts.len(), <[f32]>::len),
                self.terms.len(),
                self.parts.len()
            )));
        }
        let terms = self
            .terms
            .iter()
            .zip(terms)
            .map(|(t, &(weight, filter))| Assistant {
                weight,
                filter,
                ..t.clone()
            })
            .collect();
        let (parts, patches) = match scales {
            None => (self.parts.clone(), self.patches.clone()),
            Some(scales) => {
                let parts: Vec<_> = self
                    .parts
                    .iter()
                    .zip(scales)
                    .map(|((p, _), &s)| (p.clone(), s))
                    .collect();
                let patches = patch_set(&self.model, &parts)?;
                (parts, patches)
            }
        };
        Ok(Self {
            model: self.model.clone(),
            profile: self.profile.clone(),
            terms,
            parts,
            patches,
        })
    }

    /// A decoder of `n_ctx` tokens: the model with its patches, alone when there are no
    /// terms, in lockstep with its assistants otherwise.
    pub fn decoder(&self, n_ctx: usize) -> Result<Box<dyn Decoder>> {
        if self.terms.is_empty() {
            return Ok(Box::new(ModelDecoder::with_patches(
                self.model.clone(),
                n_ctx,
                self.patches.clone(),
            )?));
        }
        let dec = LockstepDecoder::new(self.model.clone(), self.terms.clone(), n_ctx)?
            .with_target_patches(self.patches.clone())?;
        Ok(Box::new(dec))
    }

    /// A teacher-forced scorer of `n_ctx` tokens under the same combination.
    pub fn scorer(&self, n_ctx: usize) -> Result<Scorer> {
        Scorer::new(
            self.model.clone(),
            self.terms.clone(),
            self.patches.clone(),
            n_ctx,
        )
    }
}

/// The patch set of `parts` for `model`, or `None` when there is nothing to apply.
pub fn patch_set(model: &Model, parts: &[(Arc<Patch>, f32)]) -> Result<Option<Arc<PatchSet>>> {
    if parts.is_empty() {
        return Ok(None);
    }
    let set = PatchSet::new(model, parts)?;
    Ok((!set.is_empty()).then(|| Arc::new(set)))
}
