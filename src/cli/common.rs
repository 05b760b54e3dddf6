//! Flags shared by the commands that load a model, spelled as llama.cpp spells them.

use anyhow::{Context, Result};
use clap::Args;
use lethe::generate::{Decoder, SamplerParams};
use lethe::model::{Model, Precision};
use lethe::patch::{self, Patch, PatchKind};
use lethe::unlearn::profile::{self, Profile, ProfileFile};
use lethe::unlearn::{default_threads, Assistant, Base, Forgotten, LoadOptions, TermKind};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Arc;

/// Prints what loading a tokenizer tolerated in the model file, one `lethe: tokenizer:` line
/// each.
pub fn tokenizer_warnings(tok: &lethe::tokenizer::Tokenizer) {
    for w in tok.warnings() {
        eprintln!("lethe: tokenizer: {w}");
    }
}

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model: a GGUF path or a name from models/ (smollm2, gemma3), fetched on first use.
    #[arg(short = 'm', long = "model", default_value = "smollm2")]
    pub model: String,
    /// Threads for the forward pass (default: all cores).
    #[arg(short = 't', long = "threads")]
    pub threads: Option<usize>,
    /// Context size in tokens (0: the model's training context, capped at 4096).
    #[arg(short = 'c', long = "ctx-size", default_value_t = 4096)]
    pub ctx_size: usize,
    /// Exact matmuls (f32 activations, f64 accumulation) instead of llama.cpp's 8-bit
    /// activations: slower, closer to the exact reference.
    #[arg(long)]
    pub precise: bool,
    /// An assistant model for ULD logit subtraction (same vocabulary as the model).
    #[arg(long = "assistant")]
    pub assistant: Option<String>,
    /// ULD strength: the assistant's log-probabilities are subtracted with weight alpha.
    #[arg(long = "alpha", default_value_t = 0.75)]
    pub alpha: f32,
    /// Plausibility filter rate r of the assistant term (0: off).
    #[arg(long = "filter", default_value_t = 0.01)]
    pub filter: f32,
    /// A profile file (TOML) naming forgotten models; its base replaces -m.
    #[arg(long = "profile", conflicts_with = "assistant")]
    pub profile: Option<std::path::PathBuf>,
    /// Which profile of the file (default: the first); `base` runs the plain base model.
    #[arg(long = "use", requires = "profile")]
    pub use_profile: Option<String>,
    #[command(flatten)]
    pub patches: PatchArgs,
}

/// Layer patches, with llama.cpp's flags (and `--delta` for lethe's own deltas).
#[derive(Args, Debug, Clone, Default)]
pub struct PatchArgs {
    /// A LoRA adapter (llama.cpp's GGUF layout), scale 1. Repeatable.
    #[arg(long = "lora", value_name = "FILE")]
    pub lora: Vec<PathBuf>,
    /// LoRA adapters with their scales. Repeatable.
    #[arg(long = "lora-scaled", value_name = "FILE:SCALE[,...]")]
    pub lora_scaled: Vec<String>,
    /// A control vector (llama.cpp's GGUF layout), scale 1. Repeatable.
    #[arg(long = "control-vector", value_name = "FILE")]
    pub control_vector: Vec<PathBuf>,
    /// Control vectors with their scales. Repeatable.
    #[arg(long = "control-vector-scaled", value_name = "FILE:SCALE[,...]")]
    pub control_vector_scaled: Vec<String>,
    /// Apply control vectors only to blocks START..=END.
    #[arg(long = "control-vector-layer-range", num_args = 2, value_names = ["START", "END"])]
    pub control_vector_layer_range: Option<Vec<usize>>,
    /// A lethe delta patch (dense, sparse or low-rank), with an optional scale. Repeatable.
    #[arg(long = "delta", value_name = "FILE[:SCALE]")]
    pub delta: Vec<String>,
}

/// `FILE:SCALE` (or plain `FILE`, scale 1).
pub fn file_scale(s: &str) -> Result<(PathBuf, f32)> {
    if let Some((f, sc)) = s.rsplit_once(':') {
        if let Ok(v) = sc.trim().parse::<f32>() {
            if !v.is_finite() {
                anyhow::bail!("{s:?}: the scale must be finite");
            }
            return Ok((PathBuf::from(f), v));
        }
    }
    Ok((PathBuf::from(s), 1.0))
}

impl PatchArgs {
    pub fn is_empty(&self) -> bool {
        self.lora.is_empty()
            && self.lora_scaled.is_empty()
            && self.control_vector.is_empty()
            && self.control_vector_scaled.is_empty()
            && self.delta.is_empty()
    }

    /// The files with their scales and the kind each flag requires.
    pub fn specs(&self) -> Result<Vec<(PathBuf, f32, PatchKind)>> {
        let mut out = Vec::new();
        let many = |v: &[String], kind| -> Result<Vec<(PathBuf, f32, PatchKind)>> {
            let mut o = Vec::new();
            for s in v
                .iter()
                .flat_map(|s| s.split(','))
                .filter(|s| !s.is_empty())
            {
                let (f, sc) = file_scale(s)?;
                o.push((f, sc, kind));
            }
            Ok(o)
        };
        out.extend(self.lora.iter().map(|f| (f.clone(), 1.0, PatchKind::Lora)));
        out.extend(many(&self.lora_scaled, PatchKind::Lora)?);
        out.extend(
            self.control_vector
                .iter()
                .map(|f| (f.clone(), 1.0, PatchKind::ControlVector)),
        );
        out.extend(many(&self.control_vector_scaled, PatchKind::ControlVector)?);
        for d in &self.delta {
            let (f, sc) = file_scale(d)?;
            out.push((f, sc, PatchKind::Delta));
        }
        Ok(out)
    }

    /// Load the patches against `model`, each checked to be the kind its flag names.
    pub fn load(&self, model: &Model) -> Result<Vec<(Arc<Patch>, f32)>> {
        let mut parts = Vec::new();
        for (path, scale, kind) in self.specs()? {
            let mut p = patch::load(&path, model)?;
            if p.kind != kind {
                anyhow::bail!(
                    "{}: is a {} patch, not a {} (use --{})",
                    path.display(),
                    p.kind.name(),
                    kind.name(),
                    match p.kind {
                        PatchKind::Lora => "lora",
                        PatchKind::ControlVector => "control-vector",
                        PatchKind::Delta => "delta",
                    }
                );
            }
            if let Some(r) = &self.control_vector_layer_range {
                p.cvec.retain(|(n, _)| (r[0]..=r[1]).contains(n));
            }
            parts.push((Arc::new(p), scale));
        }
        Ok(parts)
    }
}

impl ModelArgs {
    pub fn threads(&self) -> usize {
        self.threads.unwrap_or_else(default_threads)
    }

    /// How the flags open a model.
    pub fn options(&self) -> LoadOptions {
        LoadOptions {
            threads: self.threads,
            n_ctx: self.ctx_size,
            precision: if self.precise {
                Precision::Exact
            } else {
                Precision::default()
            },
        }
    }

    /// The base model (`-m`, or the profile's base) and the forgotten model the flags name:
    /// `--use`'s profile (default: the first; `base`: the plain base), or `--assistant`, each
    /// with the patches of the flags.
    pub fn load(&self) -> Result<Session> {
        let file = self.profile.as_ref().map(ProfileFile::load).transpose()?;
        let chosen = match &file {
            Some(f) => f.select(self.use_profile.as_deref())?,
            None => None,
        };
        let path = match &file {
            // `base` runs the base of the file's first profile.
            Some(f) => profile::locate(&f.dir, &chosen.unwrap_or(&f.profiles[0]).base)?,
            None => lethe::hub::resolve_model(&self.model)?,
        };
        let base = Base::open(&path, self.options())?;
        tokenizer_warnings(&base.tok);
        let cli_parts = self.patches.load(&base.model)?;
        let forgotten = match (&file, chosen) {
            (Some(f), Some(p)) => base.profile(f, p, &cli_parts)?,
            _ => {
                let mut terms = Vec::new();
                if let Some(a) = &self.assistant {
                    if !(0.0..1.0).contains(&self.filter) {
                        anyhow::bail!("--filter must be in [0, 1)");
                    }
                    let am = base.assistant(&lethe::hub::resolve_model(a)?)?;
                    terms.push(Assistant::uld(am, self.alpha, self.filter));
                }
                base.forgotten(terms, cli_parts.clone())?
            }
        };
        Ok(Session {
            base,
            forgotten,
            cli_parts,
            file,
        })
    }
}

/// A loaded base model and the forgotten model in use over it.
pub struct Session {
    pub base: Base,
    /// The model that runs: the base with the profile's (or `--assistant`'s) terms and the
    /// patches of the profile and the flags.
    pub forgotten: Forgotten,
    /// The patches given by flags (kept across `/use`).
    pub cli_parts: Vec<(Arc<Patch>, f32)>,
    /// The profile file (`/use` in chat switches within it).
    pub file: Option<ProfileFile>,
}

impl Session {
    /// Switch to profile `name` of the loaded profile file (`base`: no terms). The profile
    /// must share the loaded base model.
    pub fn switch(&mut self, name: &str) -> Result<()> {
        let file = self.file.as_ref().context("no --profile was given")?;
        self.forgotten = match file.select(Some(name))? {
            None => self.base.forgotten(Vec::new(), self.cli_parts.clone())?,
            Some(p) => {
                let base = profile::locate(&file.dir, &p.base)?;
                if !self.base.is_file(&base) {
                    anyhow::bail!(
                        "profile {name:?} has another base model ({}); restart with --use {name}",
                        base.display()
                    );
                }
                self.base.profile(file, p, &self.cli_parts)?
            }
        };
        Ok(())
    }

    /// The decoder of the model in use: plain, or in lockstep with its assistants.
    pub fn decoder(&self, n_ctx: usize) -> Result<Box<dyn Decoder>> {
        Ok(self.forgotten.decoder(n_ctx)?)
    }
}

#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Temperature; 0 is greedy.
    #[arg(long = "temp", default_value_t = 0.8)]
    pub temp: f32,
    /// Seed of the sampler (-1: random).
    #[arg(short = 's', long = "seed", default_value_t = -1, allow_hyphen_values = true)]
    pub seed: i64,
    #[arg(long = "top-k", default_value_t = 40)]
    pub top_k: i32,
    #[arg(long = "top-p", default_value_t = 0.95)]
    pub top_p: f32,
    #[arg(long = "min-p", default_value_t = 0.05)]
    pub min_p: f32,
    #[arg(long = "repeat-penalty", default_value_t = 1.0)]
    pub repeat_penalty: f32,
    #[arg(
        long = "repeat-last-n",
        default_value_t = 64,
        allow_hyphen_values = true
    )]
    pub repeat_last_n: i32,
    #[arg(long = "presence-penalty", default_value_t = 0.0)]
    pub presence_penalty: f32,
    #[arg(long = "frequency-penalty", default_value_t = 0.0)]
    pub frequency_penalty: f32,
}

impl SamplingArgs {
    pub fn params(&self) -> SamplerParams {
        let seed = if self.seed < 0 {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        } else {
            self.seed as u64
        };
        SamplerParams {
            temperature: self.temp,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed,
            logit_bias: Vec::new(),
        }
    }
}

/// The patches of a profile with their scales, and its assistants with alpha and filter,
/// and the sha256 of every file it uses (checked once, at startup).
pub fn profile_audit(f: &ProfileFile, p: &Profile, cli: &[Value]) -> Result<Value> {
    let report = profile::check_profile(p, &f.dir)?;
    let mut patches = cli.to_vec();
    patches.extend(
        p.patches
            .iter()
            .map(|s| json!({ "file": s.file, "scale": s.scale })),
    );
    let assistants: Vec<Value> = p
        .assistants
        .iter()
        .map(|s| json!({ "kind": s.kind.name(), "alpha": s.alpha, "filter": s.filter }))
        .collect();
    let files: Vec<Value> = report
        .files
        .iter()
        .map(
            |c| json!({ "role": c.role, "path": c.path.display().to_string(), "sha256": c.sha256 }),
        )
        .collect();
    Ok(json!({
        "profile": p.name,
        "patches": patches,
        "assistants": assistants,
        "files": files,
    }))
}

/// The points of `--sweep` flags (`None` without any) for terms `terms`: every combination of
/// the values given, each a weight and filter per term.
pub fn sweep_points(
    flags: &[String],
    terms: &[lethe::unlearn::Assistant],
) -> Result<Option<Vec<lethe::eval::run::SweepPoint>>> {
    if flags.is_empty() {
        return Ok(None);
    }
    if terms.is_empty() {
        anyhow::bail!("--sweep needs a profile (or --assistant) with assistant terms");
    }
    let mut axes: Vec<(String, Vec<f32>)> = Vec::new();
    for f in flags {
        let (k, vs) = f
            .split_once('=')
            .with_context(|| format!("--sweep {f:?}: KEY=V1,V2,..."))?;
        let k = k.trim();
        if k != "alpha" && k != "filter" {
            anyhow::bail!("--sweep {f:?}: the key is alpha or filter");
        }
        if axes.iter().any(|(a, _)| a == k) {
            anyhow::bail!("--sweep {k} is given twice");
        }
        let vals = vs
            .split(',')
            .map(|v| {
                v.trim()
                    .parse::<f32>()
                    .ok()
                    .filter(|x| x.is_finite())
                    .with_context(|| format!("--sweep {f:?}: {v:?} is not a number"))
            })
            .collect::<Result<Vec<f32>>>()?;
        if k == "filter" && vals.iter().any(|x| !(0.0..1.0).contains(x)) {
            anyhow::bail!("--sweep {f:?}: a filter is in [0, 1)");
        }
        axes.push((k.to_string(), vals));
    }
    let mut points: Vec<Vec<(String, f32)>> = vec![Vec::new()];
    for (k, vals) in &axes {
        points = points
            .into_iter()
            .flat_map(|p| {
                vals.iter().map(move |&v| {
                    let mut q = p.clone();
                    q.push((k.clone(), v));
                    q
                })
            })
            .collect();
    }
    Ok(Some(
        points
            .into_iter()
            .map(|p| {
                let get = |key: &str| p.iter().find(|(k, _)| k == key).map(|&(_, v)| v);
                let terms = terms
                    .iter()
                    .map(|t| {
                        let w = match (t.kind, get("alpha")) {
                            (TermKind::Uld | TermKind::Whp, Some(a)) => -a,
                            _ => t.weight,
                        };
                        (w, get("filter").unwrap_or(t.filter))
                    })
                    .collect();
                let name = p
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" ");
                lethe::eval::run::SweepPoint { name, terms }
            })
            .collect(),
    ))
}
