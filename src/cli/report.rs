//! `lethe report`: several evaluations (`lethe eval --json` files) in one report: one metric
//! table, the forget-quality-against-utility charts with every side of every file (the target,
//! the reference, each method and each sweep point), as Markdown, HTML and JSON.

use anyhow::{bail, Context, Result};
use clap::Args;
use lethe::eval::report::Report;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct ReportArgs {
    /// Evaluations written by `lethe eval --json`, in the order the sides are shown.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Rename a side: `OLD=NEW` (repeatable; `base` of the first file to `target`, say).
    #[arg(long = "rename", value_name = "OLD=NEW")]
    pub rename: Vec<String>,
    /// Write the merged report as one self-contained HTML page.
    #[arg(long = "html")]
    pub html: Option<PathBuf>,
    /// Write the merged report as JSON.
    #[arg(long = "json")]
    pub json: Option<PathBuf>,
}

/// The reports merged: every side of every file in order, a side equal to an earlier one
/// (same name and settings) once; the first reference found.
pub fn merge(reports: Vec<Report>) -> Result<Report> {
    let mut it = reports.into_iter();
    let mut out = it.next().context("no report to merge")?;
    for r in it {
        if r.split != out.split {
            bail!(
                "the reports are of different splits ({} and {})",
                out.split,
                r.split
            );
        }
        if out.reference.is_none() {
            out.reference = r.reference;
        }
        for s in r.sides {
            let dup = out
                .sides
                .iter()
                .any(|o| o.name == s.name && o.audit == s.audit);
            if !dup {
                out.sides.push(s);
            }
        }
    }
    Ok(out)
}

pub fn main(a: ReportArgs) -> Result<()> {
    let mut reports = Vec::new();
    for f in &a.files {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        let r: Report = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a `lethe eval --json` report", f.display()))?;
        reports.push(r);
    }
    let mut report = merge(reports)?;
    for r in &a.rename {
        let (old, new) = r
            .split_once('=')
            .with_context(|| format!("--rename {r:?}: OLD=NEW"))?;
        let mut found = false;
        for s in report.sides.iter_mut().chain(report.reference.as_mut()) {
            if s.name == old {
                s.name = new.to_string();
                found = true;
            }
        }
        if !found {
            bail!("--rename {r:?}: no side is named {old:?}");
        }
    }
    print!("{}", report.rows_table());
    write_report(&report, a.json.as_deref(), a.html.as_deref())
}

/// Write `report` as JSON and as an HTML page, where asked.
pub fn write_report(
    report: &Report,
    json: Option<&std::path::Path>,
    html: Option<&std::path::Path>,
) -> Result<()> {
    if let Some(p) = json {
        let f = std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?;
        serde_json::to_writer_pretty(std::io::BufWriter::new(f), report)?;
        eprintln!("wrote {}", p.display());
    }
    if let Some(p) = html {
        std::fs::write(p, lethe::eval::html::render(report))
            .with_context(|| format!("writing {}", p.display()))?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}
