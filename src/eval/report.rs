//! An evaluation's report: every side's results, the metric table printed to the terminal,
//! and the JSON written with `--json`.

use super::run::SideResult;
use super::tofu::SetKind;
use serde::{Deserialize, Serialize};

/// One evaluation: the split, the sides (base first, then the forgotten model), and the
/// reference forget quality is measured against.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub split: String,
    /// Items per set when cut with `--limit`.
    pub limit: Option<usize>,
    pub sides: Vec<SideResult>,
    pub reference: Option<SideResult>,
    /// How it ran: thread count, max tokens, Min-K% fraction, the lethe version.
    pub settings: serde_json::Value,
}

/// A row of the metric table: its label and how to read it off a side.
pub struct Metric {
    pub label: &'static str,
    /// Higher is better for a model that forgot (forget rows: lower is better).
    pub note: &'static str,
    pub get: fn(&SideResult) -> Option<f64>,
}

fn summary(s: &SideResult, kind: SetKind, f: fn(&super::tofu::SetSummary) -> f64) -> Option<f64> {
    s.set(kind).map(|x| f(&x.summary))
}

/// ROUGE-L of a set whose answers were generated (a reference is only scored).
fn rouge(s: &SideResult, kind: SetKind) -> Option<f64> {
    s.set(kind)
        .filter(|x| x.items.iter().all(|i| i.generated.is_some()))
        .map(|x| x.summary.rouge)
}

/// The table's rows, in order.
pub fn metrics() -> Vec<Metric> {
    vec![
        Metric {
            label: "Forget quality",
            note: "KS p-value vs reference, higher = closer to never trained",
            get: |s| s.forget_quality,
        },
        Metric {
            label: "Model utility",
            note: "harmonic mean of the nine retain/real/world numbers",
            get: |s| s.model_utility,
        },
        Metric {
            label: "Scored utility",
            note: "harmonic mean of the six probability and truth-ratio numbers (no ROUGE)",
            get: |s| s.scored_utility,
        },
        Metric {
            label: "Forget ROUGE-L",
            note: "recall of the greedy answer, lower = forgot",
            get: |s| rouge(s, SetKind::Forget),
        },
        Metric {
            label: "Forget probability",
            note: "normalised against perturbed answers",
            get: |s| summary(s, SetKind::Forget, |x| x.probability),
        },
        Metric {
            label: "Forget truth ratio",
            note: "mean min(R, 1/R)",
            get: |s| summary(s, SetKind::Forget, |x| x.truth_ratio),
        },
        Metric {
            label: "Retain ROUGE-L",
            note: "",
            get: |s| rouge(s, SetKind::Retain),
        },
        Metric {
            label: "Retain probability",
            note: "",
            get: |s| summary(s, SetKind::Retain, |x| x.probability),
        },
        Metric {
            label: "Retain truth ratio",
            note: "mean max(0, 1 - 1/R)",
            get: |s| summary(s, SetKind::Retain, |x| x.truth_ratio),
        },
        Metric {
            label: "Real authors ROUGE-L",
            note: "",
            get: |s| rouge(s, SetKind::RealAuthors),
        },
        Metric {
            label: "Real authors probability",
            note: "",
            get: |s| summary(s, SetKind::RealAuthors, |x| x.probability),
        },
        Metric {
            label: "Real authors truth ratio",
            note: "",
            get: |s| summary(s, SetKind::RealAuthors, |x| x.truth_ratio),
        },
        Metric {
            label: "World facts ROUGE-L",
            note: "",
            get: |s| rouge(s, SetKind::WorldFacts),
        },
        Metric {
            label: "World facts probability",
            note: "",
            get: |s| summary(s, SetKind::WorldFacts, |x| x.probability),
        },
        Metric {
            label: "World facts truth ratio",
            note: "",
            get: |s| summary(s, SetKind::WorldFacts, |x| x.truth_ratio),
        },
        Metric {
            label: "MIA AUC: LOSS",
            note: "forget vs holdout, 0.5 = looks unseen",
            get: |s| s.mia.as_ref().map(|m| m.loss),
        },
        Metric {
            label: "MIA AUC: zlib",
            note: "",
            get: |s| s.mia.as_ref().map(|m| m.zlib),
        },
        Metric {
            label: "MIA AUC: Min-K%",
            note: "",
            get: |s| s.mia.as_ref().map(|m| m.min_k),
        },
        Metric {
            label: "MIA AUC: Min-K%++",
            note: "",
            get: |s| s.mia.as_ref().map(|m| m.min_k_pp),
        },
    ]
}

/// A number as the table shows it: 4 significant digits, `e` form below 1e-3.
pub fn fmt_num(x: f64) -> String {
    if x != 0.0 && x.abs() < 1e-3 {
        format!("{x:.3e}")
    } else {
        format!("{x:.4}")
    }
}

impl Report {
    /// The metric table as Markdown (one column per side, the reference last).
    pub fn table(&self) -> String {
        let mut cols: Vec<&SideResult> = self.sides.iter().collect();
        if let Some(r) = &self.reference {
            cols.push(r);
        }
        let mut head = String::from("| metric |");
        let mut rule = String::from("|---|");
        for c in &cols {
            let tag = if self.reference.as_ref().is_some_and(|r| std::ptr::eq(r, *c)) {
                " (reference)"
            } else {
                ""
            };
            head.push_str(&format!(" {}{tag} |", c.name));
            rule.push_str("---:|");
        }
        let mut out = format!("{head}\n{rule}\n");
        for m in metrics() {
            let vals: Vec<Option<f64>> = cols.iter().map(|c| (m.get)(c)).collect();
            if vals.iter().all(Option::is_none) {
                continue;
            }
            out.push_str(&format!("| {} |", m.label));
            for v in vals {
                match v {
                    Some(x) => out.push_str(&format!(" {} |", fmt_num(x))),
                    None => out.push_str(" - |"),
                }
            }
            out.push('\n');
        }
        out
    }

    /// One row per side (a sweep's points, say), the headline metrics as columns.
    pub fn rows_table(&self) -> String {
        const COLS: [&str; 9] = [
            "Forget quality",
            "Model utility",
            "Scored utility",
            "Forget ROUGE-L",
            "Forget probability",
            "Forget truth ratio",
            "Retain probability",
            "Retain ROUGE-L",
            "MIA AUC: LOSS",
        ];
        let all = metrics();
        let ms: Vec<&Metric> = COLS
            .iter()
            .filter_map(|l| all.iter().find(|m| m.label == *l))
            .collect();
        let mut out = String::from("| side |");
        for m in &ms {
            out.push_str(&format!(" {} |", m.label));
        }
        out.push_str("\n|---|");
        out.push_str(&"---:|".repeat(ms.len()));
        out.push('\n');
        let rows = self
            .sides
            .iter()
            .map(|s| (s, ""))
            .chain(self.reference.iter().map(|s| (s, " (reference)")));
        for (s, tag) in rows {
            out.push_str(&format!("| {}{tag} |", s.name));
            for m in &ms {
                match (m.get)(s) {
                    Some(x) => out.push_str(&format!(" {} |", fmt_num(x))),
                    None => out.push_str(" - |"),
                }
            }
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert_eq!(fmt_num(0.5), "0.5000");
        assert_eq!(fmt_num(1.2e-5), "1.200e-5");
        assert_eq!(fmt_num(0.0), "0.0000");
    }
}
