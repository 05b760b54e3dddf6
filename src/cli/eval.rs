//! `lethe eval`: TOFU's metrics and membership inference for a forgotten profile against its
//! base (and a reference never trained on the forget set), locally or through a server.

use super::common::{profile_audit, sweep_points, tokenizer_warnings, ModelArgs};
use super::report::write_report;
use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use lethe::eval::data::{self, Split, TofuData};
use lethe::eval::remote::Remote;
use lethe::eval::report::Report;
use lethe::eval::run::{self, Backend, Local, Options, Side, SideResult};
use lethe::unlearn::profile::{self, ProfileFile};
use lethe::unlearn::{Base, Forgotten};
use serde_json::json;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    /// The TOFU forget split: forget01, forget05 or forget10.
    #[arg(long = "tofu")]
    pub tofu: String,
    /// A profile of the file (or a model: a GGUF path or a name) never trained on the forget
    /// set; forget quality is measured against it.
    #[arg(long = "reference")]
    pub reference: Option<String>,
    /// Score only the first N items of each set.
    #[arg(long = "limit")]
    pub limit: Option<usize>,
    /// Most tokens of each greedy answer.
    #[arg(long = "max-tokens", default_value_t = 200)]
    pub max_tokens: usize,
    /// The fraction k of Min-K% and Min-K%++.
    #[arg(long = "min-k", default_value_t = 0.2)]
    pub min_k: f64,
    /// A directory with the TOFU files to use instead of the built-in copies.
    #[arg(long = "tofu-dir")]
    pub tofu_dir: Option<PathBuf>,
    /// Evaluate only the profile, not its base.
    #[arg(long = "no-base")]
    pub no_base: bool,
    /// Write everything (per-item scores and answers included) as JSON.
    #[arg(long = "json")]
    pub json: Option<PathBuf>,
    /// Write a self-contained HTML report.
    #[arg(long = "html")]
    pub html: Option<PathBuf>,
    /// Evaluate a model served by `lethe serve` at this URL (its id in -m/--model) through
    /// `/score` and `/v1/chat/completions`.
    #[arg(long = "server")]
    pub server: Option<String>,
    /// With --server: another served model to evaluate beside it (the base's id, say).
    #[arg(long = "baseline")]
    pub baseline: Option<String>,
    /// With --server: the API key.
    #[arg(long = "api-key")]
    pub api_key: Option<String>,
    /// Sweep the profile's assistant terms: `alpha=0.25,0.5,1` (ULD and WHP terms: weight
    /// -alpha) or `filter=0.01,0.1` (every term). Repeatable: every combination is a point.
    /// Every answer is scored once for all points (one forward pass of the target and of each
    /// assistant); greedy answers, unless --score-only, are decoded point by point.
    #[arg(long = "sweep", value_name = "KEY=V1,V2,...")]
    pub sweep: Vec<String>,
    /// Skip the greedy answers: no ROUGE and so no model utility, but forget quality, the
    /// probabilities, truth ratios, membership inference and the scored utility (the six
    /// probability and truth-ratio numbers of model utility).
    #[arg(long = "score-only")]
    pub score_only: bool,
    /// With --sweep: answer greedily only at this point (`alpha=0.4,filter=0.01`, every swept
    /// key given), the others scored only. One pass gives a sweep and one full evaluation.
    #[arg(
        long = "answer-at",
        value_name = "KEY=V,...",
        requires = "sweep",
        conflicts_with = "score_only"
    )]
    pub answer_at: Option<String>,
}

/// The index of the sweep point `at` (`alpha=0.4,filter=0.01`) names: its keys and values
/// equal the point's.
fn answer_point(at: &str, be: &dyn Backend) -> Result<usize> {
    let parse = |s: &str, sep: char| -> Result<Vec<(String, f32)>> {
        let mut v = s
            .split(sep)
            .filter(|p| !p.trim().is_empty())
            .map(|p| {
                let (k, x) = p
                    .split_once('=')
                    .with_context(|| format!("--answer-at {at:?}: KEY=V,..."))?;
                let x: f32 = x
                    .trim()
                    .parse()
                    .with_context(|| format!("--answer-at {at:?}: {x:?} is not a number"))?;
                Ok((k.trim().to_string(), x))
            })
            .collect::<Result<Vec<_>>>()?;
        v.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(v)
    };
    let want = parse(at, ',')?;
    let names: Vec<String> = (0..be.n_points()).map(|k| be.point(k).0).collect();
    for (k, name) in names.iter().enumerate() {
        // A point's name ends with its settings: `... alpha=0.4 filter=0.01`.
        let settings = name
            .split(' ')
            .filter(|p| p.contains('='))
            .collect::<Vec<_>>()
            .join(" ");
        if parse(&settings, ' ')? == want {
            return Ok(k);
        }
    }
    bail!(
        "--answer-at {at:?} is not a point of the sweep ({})",
        names.join(", ")
    )
}

/// The models evaluated, and the reference (scored on the forget set only).
type Sides = (Vec<Box<dyn Backend>>, Option<Box<dyn Backend>>);

/// The context of the evaluation's caches: TOFU's questions and answers are short.
const EVAL_CTX: usize = 1024;

pub fn main(a: EvalArgs) -> Result<()> {
    let split = Split::parse(&a.tofu)?;
    let data = data::load(split, a.tofu_dir.as_deref(), a.limit)?;
    let opts = Options {
        max_new: a.max_tokens,
        n_ctx: EVAL_CTX,
        k: a.min_k,
        forget_only: false,
        score_only: a.score_only,
        answer_points: None,
    };
    if !(a.min_k > 0.0 && a.min_k <= 1.0) {
        bail!("--min-k must be in (0, 1]");
    }
    let (mut sides, reference): Sides = match &a.server {
        Some(_) if !a.sweep.is_empty() => bail!("--sweep runs on local models only"),
        Some(url) => remote_sides(&a, url)?,
        None => local_sides(&a)?,
    };
    let ref_opts = Options {
        forget_only: true,
        ..opts.clone()
    };
    // The sweep is the last side's; --answer-at names one of its points.
    let sweep_opts = Options {
        answer_points: match (&a.answer_at, sides.last()) {
            (Some(at), Some(be)) => Some(vec![answer_point(at, be.as_ref())?]),
            _ => None,
        },
        ..opts.clone()
    };
    let last = sides.len().saturating_sub(1);
    let opts_of = |i: usize| if i == last { &sweep_opts } else { &opts };
    let total: u64 = sides
        .iter()
        .enumerate()
        .map(|(i, s)| run::work(&data, opts_of(i), s.n_points()))
        .sum::<u64>()
        + reference
            .as_ref()
            .map_or(0, |_| run::work(&data, &ref_opts, 1));
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:30}] {pos}/{len} {elapsed}<{eta}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    let tick = |n: u64| bar.inc(n);
    let mut results: Vec<SideResult> = Vec::new();
    for (i, be) in sides.iter_mut().enumerate() {
        bar.set_message(be.name());
        results.extend(run::evaluate_points(be.as_mut(), &data, opts_of(i), &tick)?);
    }
    let reference = match reference {
        Some(mut be) => {
            bar.set_message(be.name());
            Some(run::evaluate(be.as_mut(), &data, &ref_opts, &tick)?)
        }
        None => None,
    };
    bar.finish_and_clear();
    if let Some(r) = &reference {
        let rr = r.forget_truth_ratios();
        for s in &mut results {
            let ks = lethe::eval::ks::ks_2samp(&s.forget_truth_ratios(), &rr)?;
            s.forget_quality = Some(ks.pvalue);
        }
    }
    let report = Report {
        split: split.name().into(),
        limit: a.limit,
        sides: results,
        reference,
        settings: json!({
            "lethe": env!("CARGO_PKG_VERSION"),
            "threads": a.m.threads(),
            "max_tokens": a.max_tokens,
            "min_k": a.min_k,
            "n_ctx": EVAL_CTX,
            "server": a.server,
            "score_only": a.score_only,
            "sweep": a.sweep,
            "answer_at": a.answer_at,
        }),
    };
    print_summary(&report, &data);
    write_report(&report, a.json.as_deref(), a.html.as_deref())
}

fn print_summary(report: &Report, data: &TofuData) {
    println!(
        "TOFU {}: {} forget, {} holdout, {} retain, {} real-author, {} world-fact items",
        report.split,
        data.forget.len(),
        data.holdout.len(),
        data.retain.len(),
        data.real_authors.len(),
        data.world_facts.len()
    );
    println!();
    if report.sides.len() > 3 {
        print!("{}", report.rows_table());
    } else {
        print!("{}", report.table());
    }
    println!();
    for s in report.sides.iter().chain(&report.reference) {
        println!("{}: {:.1} s", s.name, s.seconds);
    }
}

/// The served model (and `--baseline`, `--reference`) behind `url`.
fn remote_sides(a: &EvalArgs, url: &str) -> Result<Sides> {
    let key = a.api_key.clone();
    let mut sides: Vec<Box<dyn Backend>> = Vec::new();
    if let Some(b) = &a.baseline {
        sides.push(Box::new(Remote::new(url, b, key.clone())?));
    }
    sides.push(Box::new(Remote::new(url, &a.m.model, key.clone())?));
    let reference = match &a.reference {
        Some(r) => Some(Box::new(Remote::new(url, r, key)?) as Box<dyn Backend>),
        None => None,
    };
    Ok((sides, reference))
}

/// The base and the profile (or the plain model), and the reference, loaded here.
fn local_sides(a: &EvalArgs) -> Result<Sides> {
    let l = a.m.load()?;
    let side = |name: String, forgotten: Forgotten, audit| Side {
        name,
        forgotten,
        tok: l.base.tok.clone(),
        audit,
    };
    let plain_audit = json!({ "profile": null, "model": l.base.path.display().to_string() });
    let mut sides: Vec<Side> = Vec::new();
    match (&l.forgotten.profile, &l.file) {
        (Some(name), Some(file)) => {
            if !a.no_base {
                sides.push(side("base".into(), l.base.plain(), plain_audit));
            }
            let p = file.get(name).context("the profile in use")?;
            let audit = profile_audit(file, p, &[])?;
            sides.push(side(name.clone(), l.forgotten.clone(), audit));
        }
        _ => sides.push(side(l.base.stem(), l.forgotten.clone(), plain_audit)),
    }
    let reference = match &a.reference {
        None => None,
        Some(r) => Some(named_side(&l.base, r, l.file.as_ref())?),
    };
    let points = sweep_points(&a.sweep, &l.forgotten.terms)?;
    let mut out: Vec<Box<dyn Backend>> = Vec::new();
    let last = sides.len().saturating_sub(1);
    for (i, s) in sides.into_iter().enumerate() {
        let mut be = Local::new(s, EVAL_CTX)?;
        // The sweep applies to the forgotten side (the last one).
        if let (Some(p), true) = (&points, i == last) {
            be = be.with_points(p.clone())?;
        }
        out.push(Box::new(be));
    }
    let reference = match reference {
        Some(s) => Some(Box::new(Local::new(s, EVAL_CTX)?) as Box<dyn Backend>),
        None => None,
    };
    Ok((out, reference))
}

/// A side named on the command line: `base` (the loaded model, plain), a profile of the file
/// (sharing the loaded model when its base is the same file) or a model (a path or a name,
/// opened like the loaded one).
pub fn named_side(base: &Base, name: &str, file: Option<&ProfileFile>) -> Result<Side> {
    let plain = |b: &Base, name: String| Side {
        name,
        forgotten: b.plain(),
        tok: b.tok.clone(),
        audit: json!({ "profile": null, "model": b.path.display().to_string() }),
    };
    if name == "base" && file.is_none_or(|f| f.get("base").is_none()) {
        return Ok(plain(base, "base".into()));
    }
    if let Some((f, p)) = file.and_then(|f| f.get(name).map(|p| (f, p))) {
        let b = open_other(base, profile::locate(&f.dir, &p.base)?)?;
        return Ok(Side {
            name: name.to_string(),
            forgotten: b.profile(f, p, &[])?,
            tok: b.tok.clone(),
            audit: profile_audit(f, p, &[])?,
        });
    }
    let b = open_other(base, lethe::hub::resolve_model(name)?)?;
    Ok(plain(&b, b.stem()))
}

/// [`Base::open_other`], printing the tokenizer's warnings when it loads another file.
fn open_other(base: &Base, path: PathBuf) -> Result<Base> {
    let other = base.open_other(path)?;
    if !std::sync::Arc::ptr_eq(&other.tok, &base.tok) {
        tokenizer_warnings(&other.tok);
    }
    Ok(other)
}
