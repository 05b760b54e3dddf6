//! `lethe serve`: a llama-server compatible HTTP endpoint, with every profile served as a
//! model id. Flags are spelled as llama-server spells them.

use super::common::{profile_audit, PatchArgs};
use super::serve_compat::CompatArgs;
use anyhow::{bail, Context, Result};
use clap::Args;
use lethe::serve::{ServeConfig, ServedModel, ServedModels};
use lethe::unlearn::profile::{self, ProfileFile};
use lethe::unlearn::{Base, LoadOptions};
use serde_json::{json, Value};
use std::path::PathBuf;

/// Largest request body accepted, in bytes.
const BODY_LIMIT: usize = 8 << 20;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Model: a GGUF path or a name from models/ (smollm2, gemma3). With --profile, the
    /// profiles' base.
    #[arg(short = 'm', long = "model")]
    pub model: Option<String>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Context size in tokens, shared by the slots as in llama-server: each of the --parallel
    /// slots gets ctx-size / parallel (0: each slot gets the model's training context, capped
    /// at 4096).
    #[arg(short = 'c', long = "ctx-size", default_value_t = 4096)]
    pub ctx_size: usize,
    /// Slots: requests served at once (`-np` is accepted too).
    #[arg(long = "parallel", default_value_t = 1)]
    pub parallel: usize,
    /// Default tokens to generate per request (-1: until the context is full).
    #[arg(short = 'n', long = "n-predict", default_value_t = -1, allow_hyphen_values = true)]
    pub n_predict: i64,
    /// Threads for the forward pass (default: all cores).
    #[arg(short = 't', long = "threads")]
    pub threads: Option<usize>,
    /// Default temperature of requests that give none.
    #[arg(long = "temp", default_value_t = 0.8)]
    pub temp: f32,
    /// Default seed of requests that give none (-1: random).
    #[arg(short = 's', long = "seed", default_value_t = -1, allow_hyphen_values = true)]
    pub seed: i64,
    /// The base model's id (default: the GGUF file's stem).
    #[arg(short = 'a', long = "alias")]
    pub alias: Option<String>,
    /// API keys (comma-separated, repeatable); requests must send one.
    #[arg(long = "api-key", value_delimiter = ',')]
    pub api_key: Vec<String>,
    /// A file of API keys, one a line.
    #[arg(long = "api-key-file")]
    pub api_key_file: Option<PathBuf>,
    #[command(flatten)]
    pub patches: PatchArgs,
    /// Chat template: a built-in name (chatml, gemma) or Jinja source.
    #[arg(long = "chat-template")]
    pub chat_template: Option<String>,
    /// Accepted for llama-server compatibility: templates are always rendered with Jinja.
    #[arg(long)]
    pub jinja: bool,
    /// Accepted for llama-server compatibility.
    #[arg(long = "no-jinja")]
    pub no_jinja: bool,
    /// Serve `GET /slots` (the default).
    #[arg(long)]
    pub slots: bool,
    /// Do not serve `GET /slots`.
    #[arg(long = "no-slots")]
    pub no_slots: bool,
    /// Serve Prometheus metrics at `GET /metrics`.
    #[arg(long)]
    pub metrics: bool,
    /// Seconds a client may take to send a request's body (llama-server's read timeout).
    #[arg(long = "timeout", default_value_t = 600.0, value_name = "SECONDS")]
    pub timeout: f64,
    /// Seconds a client may take to send a request's headers, and a keep-alive connection may
    /// stay idle; slower connections are closed.
    #[arg(
        long = "header-timeout",
        default_value_t = 10.0,
        value_name = "SECONDS"
    )]
    pub header_timeout: f64,
    /// Most connections open at once (the next waits until one closes).
    #[arg(long = "max-connections", default_value_t = 1024)]
    pub max_connections: usize,
    /// `/score`: most continuations in one request.
    #[arg(long = "score-max-continuations", default_value_t = 512)]
    pub score_max_continuations: usize,
    /// `/score`: most continuation tokens (all continuations together) in one request.
    #[arg(long = "score-max-tokens", default_value_t = 65536)]
    pub score_max_tokens: usize,
    /// On SIGTERM or SIGINT, seconds to let running requests finish before their generations
    /// are ended (streams get their final event); a second signal exits at once.
    #[arg(
        long = "shutdown-timeout",
        default_value_t = 5.0,
        value_name = "SECONDS"
    )]
    pub shutdown_timeout: f64,
    /// A profile file (TOML): each profile is served as a model id.
    #[arg(long = "profile")]
    pub profile: Option<PathBuf>,
    /// The model id of requests that name none (default: the base; with --lock, the first
    /// profile).
    #[arg(long = "default-model")]
    pub default_model: Option<String>,
    /// Serve only the profiles: the base model is neither listed nor served.
    #[arg(long, requires = "profile")]
    pub lock: bool,
    #[command(flatten)]
    pub compat: CompatArgs,
}

pub fn main(a: ServeArgs) -> Result<()> {
    if a.parallel == 0 {
        bail!("--parallel must be at least 1");
    }
    if a.slots && a.no_slots {
        bail!("--slots and --no-slots contradict each other");
    }
    a.compat.check()?;
    if a.ctx_size > 0 && slot_ctx(&a) < 8 {
        bail!(
            "--ctx-size {} shared by {} slots leaves {} tokens a slot; give a larger -c",
            a.ctx_size,
            a.parallel,
            slot_ctx(&a)
        );
    }
    let chat_template = match (&a.chat_template, &a.compat.chat_template_file) {
        (Some(_), Some(_)) => bail!("give --chat-template or --chat-template-file, not both"),
        (_, Some(f)) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("reading the chat template file {}", f.display()))?,
        ),
        (t, None) => t.clone(),
    };
    let mut api_keys: Vec<String> = a
        .api_key
        .iter()
        .filter(|k| !k.is_empty())
        .cloned()
        .collect();
    if let Some(kf) = &a.api_key_file {
        let text = std::fs::read_to_string(kf)
            .with_context(|| format!("reading the API key file {}", kf.display()))?;
        api_keys.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_owned),
        );
    }
    let cfg = ServeConfig {
        host: a.host.clone(),
        port: a.port,
        n_ctx: a.ctx_size,
        n_parallel: a.parallel,
        n_predict: a.n_predict,
        temperature: a.temp,
        seed: a.seed,
        api_keys,
        chat_template,
        default_model: 0,
        lock: a.lock,
        body_limit: BODY_LIMIT,
        n_ubatch: match a.compat.ubatch_size {
            None => 512,
            Some(n) if n > 0 => n as usize,
            Some(n) => bail!("--ubatch-size {n}: give a positive number of tokens"),
        },
        score_max_conts: a.score_max_continuations,
        score_max_tokens: a.score_max_tokens,
        slots: !a.no_slots,
        metrics: a.metrics,
        shutdown_timeout: seconds(a.shutdown_timeout, "--shutdown-timeout")?,
        body_timeout: seconds(a.timeout, "--timeout")?,
        limits: lethe::serve::conn::Limits {
            header_timeout: seconds(a.header_timeout, "--header-timeout")?,
            max_connections: a.max_connections,
        },
        cors_origins: a.compat.cors_origins.clone(),
        verbose: a.compat.verbose,
        webui: !a.compat.no_webui,
    };
    // The socket is bound first (requests get 503 `Loading model`), then the models load.
    let load = move || load(a).map_err(|e| lethe::Error::Invalid(format!("{e:#}")));
    lethe::serve::run(cfg, load, |addr| {
        eprintln!("lethe: serving on http://{addr}");
    })?;
    Ok(())
}

/// Load the base model and every profile.
fn load(a: ServeArgs) -> Result<ServedModels> {
    let file = a.profile.as_ref().map(ProfileFile::load).transpose()?;
    let path = match (&file, &a.model) {
        (Some(f), None) => profile::locate(&f.dir, &f.profiles[0].base)?,
        (_, Some(m)) => {
            if a.compat.offline && !std::path::Path::new(m).is_file() {
                offline_check(m)?;
            }
            lethe::hub::resolve_model(m)?
        }
        (None, None) => {
            if a.compat.offline {
                offline_check("smollm2")?;
            }
            lethe::hub::resolve_model("smollm2")?
        }
    };
    let base = Base::open(
        &path,
        LoadOptions {
            threads: a.threads,
            n_ctx: slot_ctx(&a),
            ..LoadOptions::default()
        },
    )?;
    super::common::tokenizer_warnings(&base.tok);
    let cli_parts = a.patches.load(&base.model)?;
    let base_id = a.alias.clone().unwrap_or_else(|| base.stem());
    let cli_audit: Vec<Value> = a
        .patches
        .specs()?
        .iter()
        .map(|(f, scale, _)| json!({ "file": f.display().to_string(), "scale": scale }))
        .collect();
    let mut models = vec![ServedModel {
        id: base_id,
        forgotten: base.forgotten(Vec::new(), cli_parts.clone())?,
        audit: json!({ "profile": null, "patches": cli_audit, "assistants": [], "files": [] }),
    }];
    if let Some(f) = &file {
        for p in &f.profiles {
            if models.iter().any(|m| m.id == p.name) {
                bail!(
                    "profile {:?} has the base model's id; rename it or use --alias",
                    p.name
                );
            }
            models.push(ServedModel {
                id: p.name.clone(),
                forgotten: base.profile(f, p, &cli_parts)?,
                audit: profile_audit(f, p, &cli_audit)?,
            });
        }
    }
    let default_model = match &a.default_model {
        Some(name) => models
            .iter()
            .position(|m| &m.id == name)
            .with_context(|| format!("--default-model {name:?}: no model has this id"))?,
        None if a.lock => 1,
        None => 0,
    };
    if a.lock && default_model == 0 {
        bail!("--lock serves only profiles: --default-model cannot be the base model");
    }
    Ok(ServedModels {
        base,
        models,
        default_model,
    })
}

/// A duration flag: a number of seconds, at least 0.
fn seconds(v: f64, flag: &str) -> Result<std::time::Duration> {
    std::time::Duration::try_from_secs_f64(v)
        .map_err(|_| anyhow::anyhow!("{flag} must be a number of seconds >= 0 (got {v})"))
}

/// Under `--offline`, a model named by name must already be in the cache.
fn offline_check(name: &str) -> Result<()> {
    if let Some(entry) = lethe::hub::manifest().models.get(name) {
        let path = lethe::hub::cache_dir()?.join(&entry.file);
        if !path.is_file() {
            bail!(
                "--offline: model {name:?} is not in the cache ({}); run `lethe fetch {name}` first",
                path.display()
            );
        }
    }
    Ok(())
}

/// Each slot's context: `-c` shared by the slots, as llama-server does; with `--kv-unified`
/// (llama-server's one cache for all slots) each slot may fill the whole `-c`.
fn slot_ctx(a: &ServeArgs) -> usize {
    if a.compat.kv_unified {
        a.ctx_size
    } else {
        a.ctx_size / a.parallel
    }
}
