//! `lethe calibrate`: choose a ULD profile's alpha and filter from a sweep, by a rule that reads
//! no evaluation data (see `lethe::eval::calibrate`): the point at which held-out rows of the
//! forget authors (a paraphrase of each answer against wrong answers training did not use)
//! look, to the forgotten model, as they look to a stand-in that never learned them
//! (`--stand-in`), or as rows about authors the target never saw look to the target
//! (`--unseen`), within a bound on held-out retain rows.

use super::common::{sweep_points, ModelArgs};
use super::eval::named_side;
use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use lethe::eval::calibrate::{calibrate, read_rows, Yardstick};
use lethe::eval::run::{Backend, Local, Side};
use serde_json::json;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct CalibrateArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    /// The sweep (as `lethe eval --sweep`): `alpha=0.25,0.5,1` and/or `filter=0.01,0.1`.
    #[arg(long = "sweep", value_name = "KEY=V1,V2,...", required = true)]
    pub sweep: Vec<String>,
    /// Held-out rows of the forget authors: a JSON array of {question, answer, wrong_answers[]}
    /// (answers and wrong answers training did not use).
    #[arg(long = "forget")]
    pub forget: PathBuf,
    /// The yardstick: rows of the same kind about authors the target never saw, scored by the
    /// target.
    #[arg(
        long = "unseen",
        required_unless_present = "stand_in",
        conflicts_with = "stand_in"
    )]
    pub unseen: Option<PathBuf>,
    /// The yardstick: a model trained like the target but never on the forget set (a path
    /// or a name), scoring the forget rows.
    #[arg(long = "stand-in", value_name = "MODEL")]
    pub stand_in: Option<String>,
    /// Held-out retain rows ({question, answer}): their NLL may rise by at most
    /// --max-retain-rise nats per token over the base's.
    #[arg(long = "retain")]
    pub retain: Option<PathBuf>,
    #[arg(long = "max-retain-rise", default_value_t = 0.05)]
    pub max_retain_rise: f64,
    /// Write the table and the choice as JSON.
    #[arg(long = "json")]
    pub json: Option<PathBuf>,
}

/// Questions and answers are short.
const CTX: usize = 1024;

pub fn main(a: CalibrateArgs) -> Result<()> {
    let l = a.m.load()?;
    let points = sweep_points(&a.sweep, &l.forgotten.terms)?.context("--sweep is required")?;
    let forget = read_rows(&a.forget)?;
    let unseen = match &a.unseen {
        Some(p) => read_rows(p)?,
        None => Vec::new(),
    };
    let retain = match &a.retain {
        Some(p) => read_rows(p)?,
        None => Vec::new(),
    };
    let side = |name: &str, forgotten| Side {
        name: name.to_string(),
        forgotten,
        tok: l.base.tok.clone(),
        audit: json!({}),
    };
    let name = l
        .forgotten
        .profile
        .clone()
        .unwrap_or_else(|| "profile".into());
    if l.forgotten.terms.is_empty() {
        bail!("calibration sweeps a profile's assistant terms; this model has none");
    }
    let mut prof = Local::new(side(&name, l.forgotten.clone()), CTX)?.with_points(points)?;
    let mut base = Local::new(side("base", l.base.plain()), CTX)?;
    let mut stand_in = match &a.stand_in {
        Some(m) => Some(Local::new(named_side(&l.base, m, None)?, CTX)?),
        None => None,
    };
    let yardstick = match stand_in.as_mut() {
        Some(s) => Yardstick::StandIn(s),
        None => Yardstick::Unseen(&unseen),
    };
    let yard_rows = if a.stand_in.is_some() {
        forget.len()
    } else {
        unseen.len()
    };
    let n = forget.len() * 2 + yard_rows + retain.len() * 2;
    let bar = ProgressBar::new(n as u64);
    bar.set_style(
        ProgressStyle::with_template("calibrating [{bar:30}] {pos}/{len} {elapsed}<{eta}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    let c = calibrate(
        &mut prof,
        &mut base,
        &forget,
        yardstick,
        &retain,
        a.max_retain_rise,
        &|k| bar.inc(k),
    )?;
    bar.finish_and_clear();
    let yard = match &a.stand_in {
        Some(m) => format!("the forget rows under the stand-in {m}"),
        None => format!("{} unseen rows under the base", unseen.len()),
    };
    println!(
        "forget rows {}, retain rows {}; mean ln R: yardstick ({yard}) {:.4}, forget under the \
         base {:.4} (match {:.4})",
        forget.len(),
        retain.len(),
        c.yardstick_mean_log_r,
        c.base_forget_mean_log_r,
        c.base_matched
    );
    println!("| point | match (KS p) | mean ln R | retain rise | allowed |");
    println!("|---|---:|---:|---:|---|");
    for (i, p) in c.points.iter().enumerate() {
        println!(
            "| {}{} | {:.4} | {:.4} | {} | {} |",
            p.name,
            if c.chosen == Some(i) { " (chosen)" } else { "" },
            p.matched,
            p.mean_log_r,
            p.retain_rise.map_or("-".into(), |x| format!("{x:+.4}")),
            if p.allowed { "yes" } else { "no" }
        );
    }
    let chosen = c.chosen.map(|i| prof.point(i));
    match &chosen {
        Some((name, _)) => println!("chosen: {name}"),
        None => println!(
            "chosen: none (every point raises the retain rows' NLL by more than {})",
            a.max_retain_rise
        ),
    }
    if let Some(p) = &a.json {
        let terms = c.chosen.map(|i| prof.point(i).1);
        let j = json!({ "calibration": c, "chosen_settings": terms });
        std::fs::write(p, serde_json::to_string_pretty(&j)?)
            .with_context(|| format!("writing {}", p.display()))?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}
