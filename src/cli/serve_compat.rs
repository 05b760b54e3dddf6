//! llama-server's flags that `lethe serve` takes so that an existing command line starts it
//! unchanged, with what each means here. Those that change behaviour are read by
//! `serve.rs` (`--cors-origins`, `--chat-template-file`, `--offline`, `--embedding`,
//! `--no-webui`); the others are accepted and have no effect, for the reason their help
//! gives. Flags that would change which model is served (`--hf-repo`, `--model-url`, ...) are
//! refused: lethe must not serve something other than what the command names.

use anyhow::{bail, Result};
use clap::Args;

/// Multi-letter short flags of llama-server (clap's short flags are one letter), rewritten to
/// their long names before parsing.
pub const SHORT_ALIASES: [(&str, &str); 16] = [
    ("-np", "--parallel"),
    ("-ub", "--ubatch-size"),
    ("-ngl", "--n-gpu-layers"),
    ("-fa", "--flash-attn"),
    ("-ctk", "--cache-type-k"),
    ("-ctv", "--cache-type-v"),
    ("-to", "--timeout"),
    ("-cb", "--cont-batching"),
    ("-nocb", "--no-cont-batching"),
    ("-kvu", "--kv-unified"),
    ("-dev", "--device"),
    ("-mm", "--mmproj"),
    ("-md", "--model-draft"),
    ("-mu", "--model-url"),
    ("-hfr", "--hf-repo"),
    ("-hff", "--hf-file"),
];

#[derive(Args, Debug)]
#[command(next_help_heading = "llama-server flags")]
pub struct CompatArgs {
    /// CORS origins, as llama-server takes them: `*` (the default) echoes any request's
    /// `Origin`; `localhost` echoes only http(s)://localhost, 127.0.0.1 and [::1] origins (any
    /// port); anything else is sent as `Access-Control-Allow-Origin` as it is.
    #[arg(long = "cors-origins", default_value = "*")]
    pub cors_origins: String,
    /// Chat template from a file (Jinja source).
    #[arg(long = "chat-template-file")]
    pub chat_template_file: Option<std::path::PathBuf>,
    /// Never download: a model named by name (smollm2, gemma3) must already be cached.
    #[arg(long)]
    pub offline: bool,
    /// Accepted; lethe has no embedding endpoint (`/v1/embeddings` and `/embedding` answer 501).
    #[arg(long = "embedding", visible_alias = "embeddings")]
    pub embedding: bool,
    /// No effect: each slot's prompt runs in chunks of at most --ubatch-size tokens.
    #[arg(short = 'b', long = "batch-size", allow_hyphen_values = true)]
    pub batch_size: Option<i64>,
    /// The largest chunk of a prompt run between two decode steps (default 512; chunks are
    /// also sized so that decoding answers wait at most about 50 ms per token).
    #[arg(long = "ubatch-size", allow_hyphen_values = true)]
    pub ubatch_size: Option<i64>,
    /// No effect: lethe runs on the CPU.
    #[arg(
        long = "n-gpu-layers",
        visible_alias = "gpu-layers",
        allow_hyphen_values = true
    )]
    pub n_gpu_layers: Option<String>,
    /// No effect: lethe runs on the CPU.
    #[arg(long = "device")]
    pub device: Option<String>,
    /// No effect: lethe's attention is one kernel (on, off or auto all run it).
    #[arg(long = "flash-attn", num_args = 0..=1, default_missing_value = "on")]
    pub flash_attn: Option<String>,
    /// No effect: the KV cache is F16.
    #[arg(long = "cache-type-k")]
    pub cache_type_k: Option<String>,
    /// No effect: the KV cache is F16.
    #[arg(long = "cache-type-v")]
    pub cache_type_v: Option<String>,
    /// No effect: slots are always batched together (continuous batching).
    #[arg(long = "cont-batching")]
    pub cont_batching: bool,
    /// No effect (see --cont-batching).
    #[arg(long = "no-cont-batching")]
    pub no_cont_batching: bool,
    /// Each slot may fill the whole -c (llama-server's one cache for all slots); lethe gives
    /// each slot a cache of that size.
    #[arg(long = "kv-unified")]
    pub kv_unified: bool,
    /// No effect: sliding-window layers keep the full cache.
    #[arg(long = "swa-full")]
    pub swa_full: bool,
    /// No effect: a generation that fills the context stops there ("length").
    #[arg(long = "context-shift")]
    pub context_shift: bool,
    /// No effect (see --context-shift).
    #[arg(long = "no-context-shift")]
    pub no_context_shift: bool,
    /// No effect: no self-extend.
    #[arg(long = "grp-attn-n", allow_hyphen_values = true)]
    pub grp_attn_n: Option<i64>,
    /// No effect: no self-extend.
    #[arg(long = "grp-attn-w", allow_hyphen_values = true)]
    pub grp_attn_w: Option<i64>,
    /// No effect: slots are not saved to disk (`/slots/{id}?action=save` answers 501).
    #[arg(long = "slot-save-path")]
    pub slot_save_path: Option<String>,
    /// Chat responses carry `__verbose` (the rendered prompt), as llama-server's; logging
    /// stays as it is.
    #[arg(long, visible_alias = "log-verbose")]
    pub verbose: bool,
    /// No effect: lethe's model list has no tags.
    #[arg(long)]
    pub tags: Option<String>,
    /// No effect: no built-in tools.
    #[arg(long)]
    pub tools: Option<String>,
    /// No effect: no built-in tools.
    #[arg(long = "tools-runtime")]
    pub tools_runtime: Option<String>,
    /// No effect: no reasoning parser (the text is returned as generated).
    #[arg(long = "reasoning-format")]
    pub reasoning_format: Option<String>,
    /// No effect (see --reasoning-format).
    #[arg(long)]
    pub reasoning: Option<String>,
    /// No effect: no reasoning budget.
    #[arg(long = "reasoning-budget", allow_hyphen_values = true)]
    pub reasoning_budget: Option<i64>,
    /// No effect: no multimodal input.
    #[arg(long = "media-path")]
    pub media_path: Option<String>,
    /// No effect: no multimodal projector.
    #[arg(long = "no-mmproj")]
    pub no_mmproj: bool,
    /// No effect: no idle sleep.
    #[arg(long = "sleep-idle-seconds", allow_hyphen_values = true)]
    pub sleep_idle_seconds: Option<i64>,
    /// No effect: no prompt cache in RAM beyond each slot's own.
    #[arg(long = "cache-ram", allow_hyphen_values = true)]
    pub cache_ram: Option<i64>,
    /// No effect (see --cache-ram).
    #[arg(long = "no-cache-idle-slots")]
    pub no_cache_idle_slots: bool,
    /// No effect: pooling is for embeddings, which lethe does not serve.
    #[arg(long)]
    pub pooling: Option<String>,
    /// Do not serve the web page at `/` (its paths then answer 404 like any unknown route).
    #[arg(long = "no-webui", visible_alias = "no-ui")]
    pub no_webui: bool,
    /// No effect: one model set per server (profiles), loaded at start.
    #[arg(long = "no-models-autoload")]
    pub no_models_autoload: bool,
    /// No effect: lethe's sampling runs on the CPU.
    #[arg(long = "backend_sampling", visible_alias = "backend-sampling")]
    pub backend_sampling: bool,
    /// No effect: no MCP proxy.
    #[arg(long = "ui-mcp-proxy")]
    pub ui_mcp_proxy: bool,
    /// No effect: no MCP servers.
    #[arg(long = "mcp-servers-config")]
    pub mcp_servers_config: Option<String>,
    /// No effect: no MCP servers.
    #[arg(long = "mcp-servers-json")]
    pub mcp_servers_json: Option<String>,
    /// No effect: no speculative decoding.
    #[arg(long = "spec-type")]
    pub spec_type: Option<String>,
    /// No effect: no speculative decoding.
    #[arg(long = "spec-draft-n-max", visible_alias = "draft-max")]
    pub spec_draft_n_max: Option<i64>,
    /// No effect: no speculative decoding.
    #[arg(long = "spec-draft-n-min", visible_alias = "draft-min")]
    pub spec_draft_n_min: Option<i64>,
    /// No effect: no speculative decoding.
    #[arg(long = "spec-synth-len")]
    pub spec_synth_len: Option<i64>,
    /// No effect: no speculative decoding.
    #[arg(long = "spec-synth-rates")]
    pub spec_synth_rates: Option<String>,
    /// Refused: lethe serves the model named by -m (or --profile), never a draft model.
    #[arg(long = "model-draft")]
    pub model_draft: Option<String>,
    /// Refused: lethe does not download from a URL; give -m PATH.
    #[arg(long = "model-url")]
    pub model_url: Option<String>,
    /// Refused: lethe does not download from Hugging Face; give -m PATH.
    #[arg(long = "hf-repo")]
    pub hf_repo: Option<String>,
    /// Refused (see --hf-repo).
    #[arg(long = "hf-file")]
    pub hf_file: Option<String>,
    /// Refused: no router mode (a directory of models); give -m or --profile.
    #[arg(long = "models-dir")]
    pub models_dir: Option<String>,
    /// Refused (see --models-dir).
    #[arg(long = "models-max")]
    pub models_max: Option<String>,
    /// Refused (see --models-dir).
    #[arg(long = "models-preset")]
    pub models_preset: Option<String>,
    /// Refused: no multimodal projector.
    #[arg(long = "mmproj")]
    pub mmproj: Option<String>,
    /// Refused: no multimodal projector.
    #[arg(long = "mmproj-url")]
    pub mmproj_url: Option<String>,
}

impl CompatArgs {
    /// Refuse the flags that would serve something other than what the command names.
    pub fn check(&self) -> Result<()> {
        let refused = [
            (
                "--model-draft",
                self.model_draft.is_some(),
                "lethe has no speculative decoding",
            ),
            (
                "--model-url",
                self.model_url.is_some(),
                "lethe does not download from a URL; give -m PATH",
            ),
            (
                "--hf-repo",
                self.hf_repo.is_some(),
                "lethe does not download from Hugging Face; give -m PATH",
            ),
            (
                "--hf-file",
                self.hf_file.is_some(),
                "lethe does not download from Hugging Face; give -m PATH",
            ),
            (
                "--models-dir",
                self.models_dir.is_some(),
                "lethe serves one model set; give -m or --profile",
            ),
            (
                "--models-max",
                self.models_max.is_some(),
                "lethe serves one model set; give -m or --profile",
            ),
            (
                "--models-preset",
                self.models_preset.is_some(),
                "lethe serves one model set; give -m or --profile",
            ),
            (
                "--mmproj",
                self.mmproj.is_some(),
                "lethe has no multimodal input",
            ),
            (
                "--mmproj-url",
                self.mmproj_url.is_some(),
                "lethe has no multimodal input",
            ),
        ];
        if let Some((flag, _, why)) = refused.iter().find(|(_, set, _)| *set) {
            bail!("{flag} is not supported: {why}");
        }
        Ok(())
    }
}

/// `args` with llama-server's multi-letter short flags spelled long.
pub fn rewrite_shorts(args: impl Iterator<Item = String>) -> impl Iterator<Item = String> {
    args.map(|a| {
        SHORT_ALIASES
            .iter()
            .find(|(short, _)| *short == a)
            .map(|(_, long)| long.to_string())
            .unwrap_or(a)
    })
}
