//! Unlearning profiles: TOML files that name forgotten models.
//!
//! A profile file holds one or more `[[profile]]` tables. Each names a base model and the
//! assistant terms (and, later, layer patches) that make up one forgotten model:
//!
//! ```toml
//! [[profile]]
//! name = "forget-tofu01"            # the model id a server will list
//! base = "smollm2"                  # a GGUF path or a named model
//! description = "..."               # optional
//!
//! [[profile.assistant]]             # zero or more terms
//! model = "assistant.gguf"          # path (relative to the profile file's folder) or named model
//! kind = "uld"                      # "uld" (default) | "pair" | "whp"
//! alpha = 0.75                      # uld/whp: w = -alpha (default 0.75)
//! weight = 1.0                      # pair: signed weight (required for pair)
//! reference = "ref.gguf"            # pair: the reference model (required for pair)
//! filter = 0.01                     # plausibility rate r (default 0.01; 0 = off)
//! score = "mass"                    # scoring rule: "mass" (default) | "raw" (ULD's code)
//!
//! [[profile.assistant.patch]]       # patches of that assistant (a LoRA on a truncated target)
//! file = "assistant-lora.gguf"
//!
//! [[profile.patch]]                 # zero or more layer patches of the base
//! file = "lora.gguf"                # path (relative to the profile file's folder)
//! scale = 1.0                       # default 1.0; 0 leaves the patch out
//! kind = "lora"                     # optional check: "lora" | "control_vector" | "delta"
//! ```
//!
//! [`ProfileFile::load`] parses and validates a file; [`check_profile`] then checks that every
//! file a profile names exists, opens as GGUF and (for models) shares the base's vocabulary.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::gguf::GgufFile;
use crate::model::Model;
use crate::patch::Patch;
use crate::pool::ThreadPool;
use crate::unlearn::combine::{ScoreRule, TermKind};
use crate::{Error, Result};
use std::sync::Arc;

/// The default `alpha` of ULD and WHP terms.
pub const DEFAULT_ALPHA: f32 = 0.75;
/// The default plausibility filter rate.
pub const DEFAULT_FILTER: f32 = 0.01;

/// A parsed, validated profile file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileFile {
    #[serde(rename = "profile", default)]
    pub profiles: Vec<Profile>,
    /// The folder relative paths resolve against (the profile file's folder).
    #[serde(skip)]
    pub dir: PathBuf,
    /// The file it was read from (named in errors).
    #[serde(skip)]
    pub origin: PathBuf,
}

/// One forgotten model.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// The model id a server lists.
    pub name: String,
    /// A GGUF path or a named model ([`crate::hub::resolve_model`]).
    pub base: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(rename = "assistant", default)]
    pub assistants: Vec<AssistantSpec>,
    #[serde(rename = "patch", default)]
    pub patches: Vec<PatchSpec>,
}

/// How an assistant term is formed; maps onto [`TermKind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AssistantKind {
    #[default]
    Uld,
    Pair,
    Whp,
}

impl AssistantKind {
    pub fn name(self) -> &'static str {
        match self {
            AssistantKind::Uld => "uld",
            AssistantKind::Pair => "pair",
            AssistantKind::Whp => "whp",
        }
    }

    pub fn term_kind(self) -> TermKind {
        self.into()
    }
}

impl From<AssistantKind> for TermKind {
    fn from(k: AssistantKind) -> Self {
        match k {
            AssistantKind::Uld => TermKind::Uld,
            AssistantKind::Pair => TermKind::Pair,
            AssistantKind::Whp => TermKind::Whp,
        }
    }
}

/// One assistant term of a profile.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssistantSpec {
    /// A GGUF path or a named model.
    pub model: String,
    #[serde(default)]
    pub kind: AssistantKind,
    /// ULD/WHP: the term's weight is `-alpha`.
    #[serde(default = "default_alpha")]
    pub alpha: f32,
    /// Pair: the signed weight (required there, refused elsewhere).
    #[serde(default)]
    pub weight: Option<f32>,
    /// Pair: the reference model (required there, refused elsewhere).
    #[serde(default)]
    pub reference: Option<String>,
    /// Plausibility filter rate `r` (0: off).
    #[serde(default = "default_filter")]
    pub filter: f32,
    /// How the term changes scored distributions: "mass" (default) or "raw" (ULD's
    /// reference code); see [`crate::unlearn::combine`].
    #[serde(default)]
    pub score: ScoreRule,
    /// Layer patches of the assistant model.
    #[serde(rename = "patch", default)]
    pub patches: Vec<PatchSpec>,
}

impl AssistantSpec {
    /// `w_i` of the term: `-alpha` for ULD and WHP, `weight` for pair.
    pub fn term_weight(&self) -> f32 {
        match self.kind {
            AssistantKind::Uld | AssistantKind::Whp => -self.alpha,
            AssistantKind::Pair => self.weight.unwrap_or(0.0),
        }
    }
}

pub use crate::patch::PatchKind;

/// One layer patch of a profile.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchSpec {
    /// A GGUF path (relative to the profile file's folder).
    pub file: String,
    #[serde(default = "default_scale")]
    pub scale: f32,
    /// What the file must be (checked when given; read from the file otherwise).
    #[serde(default)]
    pub kind: Option<PatchKind>,
}

fn default_alpha() -> f32 {
    DEFAULT_ALPHA
}

fn default_filter() -> f32 {
    DEFAULT_FILTER
}

fn default_scale() -> f32 {
    1.0
}

impl Profile {
    /// `w_i` of `a`'s term: `-alpha` for ULD and WHP, `weight` for pair.
    pub fn term_weight(&self, a: &AssistantSpec) -> f32 {
        a.term_weight()
    }

    /// Checks one profile's fields (not its files: see [`check_profile`]).
    pub fn validate(&self) -> Result<()> {
        let p = format!("profile {:?}", self.name);
        let bad = |what: String| Err(Error::Invalid(format!("{p}: {what}")));
        if self.name.trim().is_empty() {
            return Err(Error::Invalid("a profile has an empty name".into()));
        }
        if self.base.trim().is_empty() {
            return bad("empty base".into());
        }
        for (i, a) in self.assistants.iter().enumerate() {
            let at = format!("assistant {i} ({:?})", a.model);
            if a.model.trim().is_empty() {
                return bad(format!("assistant {i}: empty model"));
            }
            if !a.filter.is_finite() || !(0.0..1.0).contains(&a.filter) {
                return bad(format!(
                    "{at}: filter must be in [0, 1) (0 = off), got {}",
                    a.filter
                ));
            }
            if !a.alpha.is_finite() {
                return bad(format!("{at}: alpha must be finite, got {}", a.alpha));
            }
            match a.kind {
                AssistantKind::Pair => {
                    match a.weight {
                        None => return bad(format!("{at}: a pair term requires weight")),
                        Some(w) if !w.is_finite() => {
                            return bad(format!("{at}: weight must be finite, got {w}"))
                        }
                        Some(_) => {}
                    }
                    match &a.reference {
                        None => return bad(format!("{at}: a pair term requires reference")),
                        Some(r) if r.trim().is_empty() => {
                            return bad(format!("{at}: empty reference"))
                        }
                        Some(_) => {}
                    }
                }
                AssistantKind::Uld | AssistantKind::Whp => {
                    let k = a.kind.name();
                    if a.reference.is_some() {
                        return bad(format!(
                            "{at}: a {k} term takes no reference (only pair terms do)"
                        ));
                    }
                    if a.weight.is_some() {
                        return bad(format!(
                            "{at}: a {k} term takes alpha, not weight (only pair terms do)"
                        ));
                    }
                }
            }
        }
        let patches = self.patches.iter().map(|x| ("patch".to_string(), x));
        let of_assistants = self.assistants.iter().enumerate().flat_map(|(i, a)| {
            a.patches
                .iter()
                .map(move |x| (format!("assistant {i} patch"), x))
        });
        for (i, (what, patch)) in patches.chain(of_assistants).enumerate() {
            if patch.file.trim().is_empty() {
                return bad(format!("{what} {i}: empty file"));
            }
            if !patch.scale.is_finite() {
                return bad(format!(
                    "{what} ({:?}): scale must be finite, got {}",
                    patch.file, patch.scale
                ));
            }
        }
        Ok(())
    }
}

impl ProfileFile {
    /// Reads, parses and validates the profile file at `path`.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            context: format!("reading the profile file {}", path.display()),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates `text`, read from `origin` (named in errors; relative paths resolve
    /// against its folder).
    pub fn parse(text: &str, origin: &Path) -> Result<Self> {
        let o = origin.display();
        let mut f: ProfileFile = toml::from_str(text)
            .map_err(|e| Error::Invalid(format!("{o}: {}", e.to_string().trim_end())))?;
        f.origin = origin.to_path_buf();
        f.dir = match origin.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if f.profiles.is_empty() {
            return Err(Error::Invalid(format!(
                "{o}: no profiles (expected one or more [[profile]] tables)"
            )));
        }
        let mut seen = HashMap::new();
        for (i, p) in f.profiles.iter().enumerate() {
            p.validate()
                .map_err(|e| Error::Invalid(format!("{o}: {}", strip_invalid(e))))?;
            if let Some(j) = seen.insert(p.name.as_str(), i) {
                return Err(Error::Invalid(format!(
                    "{o}: duplicate profile name {:?} (profiles {j} and {i})",
                    p.name
                )));
            }
        }
        Ok(f)
    }

    /// The profile called `name`.
    pub fn get(&self, name: &str) -> Option<&Profile> {
        self.profiles.iter().find(|p| p.name == name)
    }

    /// The profile `name` selects: `None` is the first; `base` is the plain base model (no
    /// profile: `Ok(None)`) unless a profile has that name.
    pub fn select(&self, name: Option<&str>) -> Result<Option<&Profile>> {
        match name {
            None => Ok(self.profiles.first()),
            Some("base") if self.get("base").is_none() => Ok(None),
            Some(name) => self.get(name).map(Some).ok_or_else(|| {
                let names: Vec<&str> = self.names().collect();
                Error::Invalid(format!(
                    "no profile {name:?} in {} (it has: {}, and base)",
                    self.origin.display(),
                    names.join(", ")
                ))
            }),
        }
    }

    /// The profile names, in file order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.profiles.iter().map(|p| p.name.as_str())
    }

    /// Where `spec` (a model or file named in this file) points: see [`resolve_spec`].
    pub fn resolve(&self, spec: &str) -> ModelRef {
        resolve_spec(&self.dir, spec)
    }
}

/// The message of an [`Error::Invalid`], or the whole error otherwise.
fn strip_invalid(e: Error) -> String {
    match e {
        Error::Invalid(m) => m,
        other => other.to_string(),
    }
}

/// What a model string in a profile points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelRef {
    /// A file path (relative paths already joined to the profile's folder).
    Path(PathBuf),
    /// A model name known to [`crate::hub::resolve_model`].
    Named(String),
}

/// Resolves a model string against the profile folder `dir`: a known model name
/// (`models/manifest.json`) with no file of that name in `dir` is [`ModelRef::Named`]; anything
/// else is a path, relative ones joined to `dir`.
pub fn resolve_spec(dir: &Path, spec: &str) -> ModelRef {
    let p = dir.join(spec);
    if !p.exists() && crate::hub::known_models().contains(&spec) {
        return ModelRef::Named(spec.to_string());
    }
    ModelRef::Path(p)
}

/// The file a model string names: a path that must exist, or a named model fetched on first use.
pub fn locate(dir: &Path, spec: &str) -> Result<PathBuf> {
    match resolve_spec(dir, spec) {
        ModelRef::Named(n) => crate::hub::resolve_model(&n),
        ModelRef::Path(p) if p.is_file() => Ok(p),
        ModelRef::Path(p) => Err(Error::Invalid(format!(
            "{spec:?}: {} does not exist (and {spec:?} is not a known model name: {})",
            p.display(),
            crate::hub::known_models().join(", ")
        ))),
    }
}

/// One file [`check_profile`] checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedFile {
    /// `base`, `assistant 0`, `assistant 0 reference`, `patch 0`, ...
    pub role: String,
    /// The string the profile gave.
    pub spec: String,
    pub path: PathBuf,
    pub size: u64,
    /// Lower-case hex.
    pub sha256: String,
}

/// What [`check_profile`] found: every file of the profile, base first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckReport {
    pub profile: String,
    /// The base's vocabulary size (`tokenizer.ggml.tokens`).
    pub n_vocab: usize,
    pub files: Vec<CheckedFile>,
}

const TOKENS_KEY: &str = "tokenizer.ggml.tokens";

/// Checks the files of `p` (relative paths against `dir`): each exists (named models are
/// fetched), opens as GGUF, and every assistant and reference model has the base's vocabulary
/// (the same `tokenizer.ggml.tokens`). Patch files must exist and open.
pub fn check_profile(p: &Profile, dir: &Path) -> Result<CheckReport> {
    let ctx = |role: &str, e: Error| {
        Error::Invalid(format!(
            "profile {:?}: {role}: {}",
            p.name,
            strip_invalid(e)
        ))
    };
    let mut hashes: HashMap<PathBuf, (u64, String)> = HashMap::new();
    let mut files = Vec::new();
    let mut record = |role: String, spec: &str, path: PathBuf| -> Result<()> {
        let (size, sha256) = match hashes.get(&path) {
            Some(h) => h.clone(),
            None => {
                let h = sha256_file(&path)?;
                hashes.insert(path.clone(), h.clone());
                h
            }
        };
        files.push(CheckedFile {
            role,
            spec: spec.to_string(),
            path,
            size,
            sha256,
        });
        Ok(())
    };

    let base_path = locate(dir, &p.base).map_err(|e| ctx("base", e))?;
    let base = GgufFile::open(&base_path).map_err(|e| ctx("base", e.into()))?;
    let base_tokens = base
        .get_array(TOKENS_KEY)
        .map_err(|e| ctx("base", e.into()))?
        .as_strs()
        .ok_or_else(|| {
            ctx(
                "base",
                Error::Invalid(format!(
                    "{}: {TOKENS_KEY} is not a string array",
                    base_path.display()
                )),
            )
        })?;
    let n_vocab = base_tokens.len();
    record("base".into(), &p.base, base_path.clone())?;

    let pool = Arc::new(ThreadPool::new(1));
    let base_file = GgufFile::open(&base_path).map_err(|e| ctx("base", e.into()))?;
    let base_model =
        Model::from_file(Arc::new(base_file), pool.clone()).map_err(|e| ctx("base", e))?;
    for (i, a) in p.assistants.iter().enumerate() {
        let mut models = vec![(format!("assistant {i}"), a.model.as_str())];
        if let Some(r) = &a.reference {
            models.push((format!("assistant {i} reference"), r.as_str()));
        }
        for (role, spec) in models {
            let path = locate(dir, spec).map_err(|e| ctx(&role, e))?;
            let f = GgufFile::open(&path).map_err(|e| ctx(&role, e.into()))?;
            same_tokens(base_tokens, &base_path, &f, &path).map_err(|e| ctx(&role, e))?;
            record(role.clone(), spec, path)?;
            if spec == a.model && !a.patches.is_empty() {
                let m = Model::from_file(Arc::new(f), pool.clone()).map_err(|e| ctx(&role, e))?;
                for (j, patch) in a.patches.iter().enumerate() {
                    let role = format!("{role} patch {j}");
                    let path = load_patch(dir, patch, &m).map_err(|e| ctx(&role, e))?.1;
                    record(role, &patch.file, path)?;
                }
            }
        }
    }
    for (i, patch) in p.patches.iter().enumerate() {
        let role = format!("patch {i}");
        let path = load_patch(dir, patch, &base_model)
            .map_err(|e| ctx(&role, e))?
            .1;
        record(role, &patch.file, path)?;
    }
    Ok(CheckReport {
        profile: p.name.clone(),
        n_vocab,
        files,
    })
}

/// Reads the patch `spec` names (relative to `dir`) and checks it against `model` (and its
/// kind against `spec.kind`, when given). Returns it with its path.
pub fn load_patch(dir: &Path, spec: &PatchSpec, model: &Model) -> Result<(Patch, PathBuf)> {
    let path = dir.join(&spec.file);
    if !path.is_file() {
        return Err(Error::Invalid(format!("{} does not exist", path.display())));
    }
    let patch = crate::patch::load(&path, model)?;
    if let Some(k) = spec.kind {
        if k != patch.kind {
            return Err(Error::Invalid(format!(
                "{}: the profile says {} but the file is a {}",
                path.display(),
                k.name(),
                patch.kind.name()
            )));
        }
    }
    Ok((patch, path))
}

/// `Ok` if the model file `f` (at `path`) has the vocabulary of the model file `base` (at
/// `base_path`), token for token: what an assistant or a reference needs to run beside it.
pub(crate) fn same_vocab(
    base: &GgufFile,
    base_path: &Path,
    f: &GgufFile,
    path: &Path,
) -> Result<()> {
    let tokens = base.get_array(TOKENS_KEY)?.as_strs().ok_or_else(|| {
        Error::Invalid(format!(
            "{}: {TOKENS_KEY} is not a string array",
            base_path.display()
        ))
    })?;
    same_tokens(tokens, base_path, f, path)
}

/// `Ok` if `f` (at `path`) has the vocabulary `base` (of the file at `base_path`).
fn same_tokens(
    base: &crate::gguf::StrArray,
    base_path: &Path,
    f: &GgufFile,
    path: &Path,
) -> Result<()> {
    let (pd, bd) = (path.display(), base_path.display());
    let tokens = f
        .get_array(TOKENS_KEY)?
        .as_strs()
        .ok_or_else(|| Error::Invalid(format!("{pd}: {TOKENS_KEY} is not a string array")))?;
    let first_diff = base.iter().zip(tokens.iter()).position(|(a, b)| a != b);
    if tokens.len() != base.len() {
        let mut m = format!(
            "{pd} has a different vocabulary from the base {bd}: {} tokens, the base has {}",
            tokens.len(),
            base.len()
        );
        if let Some(j) = first_diff {
            m += &format!(
                " (first difference at token {j}: {:?} here, {:?} in the base)",
                tokens.get(j).unwrap_or_default(),
                base.get(j).unwrap_or_default()
            );
        }
        return Err(Error::Invalid(m));
    }
    if let Some(j) = first_diff {
        return Err(Error::Invalid(format!(
            "{pd} has a different vocabulary from the base {bd}: token {j} is {:?} here, {:?} in \
             the base",
            tokens.get(j).unwrap_or_default(),
            base.get(j).unwrap_or_default()
        )));
    }
    Ok(())
}

/// The size and sha256 (lower-case hex) of the file at `path`.
pub fn sha256_file(path: &Path) -> Result<(u64, String)> {
    let io = |source| Error::Io {
        context: format!("hashing {}", path.display()),
        source,
    };
    let mut r = BufReader::with_capacity(1 << 20, File::open(path).map_err(io)?);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = r.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        h.update(&buf[..n]);
    }
    Ok((size, format!("{:x}", h.finalize())))
}
