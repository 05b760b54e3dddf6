//! The TOFU evaluation sets: question/answer items with their paraphrased and perturbed
//! answers, for one forget split. The public splits ship inside the binary (`data/tofu/`,
//! MIT-licensed, from the TOFU benchmark); a directory with files of the same names can stand in.

use crate::{Error, Result};
use serde::Deserialize;
use std::path::Path;

/// TOFU's forget splits: the last 1%, 5% or 10% of its 200 authors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Forget01,
    Forget05,
    Forget10,
}

impl Split {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "forget01" => Ok(Self::Forget01),
            "forget05" => Ok(Self::Forget05),
            "forget10" => Ok(Self::Forget10),
            _ => Err(Error::Invalid(format!(
                "unknown TOFU split {s:?} (forget01, forget05 or forget10)"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Forget01 => "forget01",
            Self::Forget05 => "forget05",
            Self::Forget10 => "forget10",
        }
    }

    /// The suffix of its files (`01`, `05`, `10`).
    fn suffix(self) -> &'static str {
        &self.name()[6..]
    }
}

/// One question with the answers TOFU scores.
#[derive(Debug, Clone)]
pub struct QaItem {
    pub question: String,
    pub answer: String,
    /// The paraphrase of the answer (forget and retain sets); real authors and world facts
    /// have none, and the answer itself stands in for it.
    pub paraphrased: Option<String>,
    /// Plausible but false answers (5 for forget/retain items, 3 for the others; none for
    /// holdout items).
    pub perturbed: Vec<String>,
}

impl QaItem {
    /// The answer whose loss enters the truth ratio's denominator.
    pub fn paraphrase(&self) -> &str {
        self.paraphrased.as_deref().unwrap_or(&self.answer)
    }
}

/// The sets of one evaluation.
#[derive(Debug, Clone)]
pub struct TofuData {
    pub split: Split,
    pub forget: Vec<QaItem>,
    /// Unseen authors, as many items as the forget set: the other side of membership
    /// inference.
    pub holdout: Vec<QaItem>,
    /// The first 300 items of the retain set (TOFU scores those).
    pub retain: Vec<QaItem>,
    pub real_authors: Vec<QaItem>,
    pub world_facts: Vec<QaItem>,
}

/// Items of the retain set that TOFU scores.
pub const RETAIN_SCORED: usize = 300;

#[derive(Deserialize)]
struct Row {
    question: String,
    answer: String,
    #[serde(default)]
    paraphrased_answer: Option<String>,
    #[serde(default)]
    perturbed_answer: Vec<String>,
}

fn embedded(name: &str) -> Option<&'static str> {
    Some(match name {
        "forget01_perturbed" => include_str!("../../data/tofu/forget01_perturbed.json"),
        "forget05_perturbed" => include_str!("../../data/tofu/forget05_perturbed.json"),
        "forget10_perturbed" => include_str!("../../data/tofu/forget10_perturbed.json"),
        "holdout01" => include_str!("../../data/tofu/holdout01.json"),
        "holdout05" => include_str!("../../data/tofu/holdout05.json"),
        "holdout10" => include_str!("../../data/tofu/holdout10.json"),
        "retain_perturbed" => include_str!("../../data/tofu/retain_perturbed.json"),
        "real_authors_perturbed" => include_str!("../../data/tofu/real_authors_perturbed.json"),
        "world_facts_perturbed" => include_str!("../../data/tofu/world_facts_perturbed.json"),
        _ => return None,
    })
}

fn read_set(dir: Option<&Path>, name: &str) -> Result<Vec<QaItem>> {
    let (text, origin) = match dir {
        Some(d) => {
            let p = d.join(format!("{name}.json"));
            let t = std::fs::read_to_string(&p).map_err(|e| Error::Io {
                context: format!("reading {}", p.display()),
                source: e,
            })?;
            (std::borrow::Cow::Owned(t), p.display().to_string())
        }
        None => (
            std::borrow::Cow::Borrowed(embedded(name).expect("a known set")),
            format!("{name}.json"),
        ),
    };
    let rows: Vec<Row> = serde_json::from_str(&text)
        .map_err(|e| Error::Invalid(format!("{origin}: not a TOFU set: {e}")))?;
    Ok(rows
        .into_iter()
        .map(|r| QaItem {
            question: r.question,
            answer: r.answer,
            paraphrased: r.paraphrased_answer,
            perturbed: r.perturbed_answer,
        })
        .collect())
}

/// The sets of `split` (from `dir` when given, else the copies built in), each cut to its
/// first `limit` items when given.
pub fn load(split: Split, dir: Option<&Path>, limit: Option<usize>) -> Result<TofuData> {
    let cut = |mut v: Vec<QaItem>, max: usize| {
        v.truncate(limit.unwrap_or(usize::MAX).min(max));
        v
    };
    let s = split.suffix();
    let forget = read_set(dir, &format!("forget{s}_perturbed"))?;
    let holdout = read_set(dir, &format!("holdout{s}"))?;
    let d = TofuData {
        split,
        forget: cut(forget, usize::MAX),
        holdout: cut(holdout, usize::MAX),
        retain: cut(read_set(dir, "retain_perturbed")?, RETAIN_SCORED),
        real_authors: cut(read_set(dir, "real_authors_perturbed")?, usize::MAX),
        world_facts: cut(read_set(dir, "world_facts_perturbed")?, usize::MAX),
    };
    if let Some(i) = d.forget.iter().position(|q| q.perturbed.is_empty()) {
        return Err(Error::Invalid(format!(
            "forget item {} has no perturbed answers",
            i + 1
        )));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_sets_load() {
        let d = load(Split::Forget01, None, None).unwrap();
        assert_eq!(d.forget.len(), 40);
        assert_eq!(d.holdout.len(), 40);
        assert_eq!(d.retain.len(), RETAIN_SCORED);
        assert_eq!(d.real_authors.len(), 100);
        assert_eq!(d.world_facts.len(), 117);
        assert!(d
            .forget
            .iter()
            .all(|q| q.perturbed.len() == 5 && q.paraphrased.is_some()));
        assert!(d.real_authors.iter().all(|q| q.perturbed.len() == 3));
        let d = load(Split::Forget10, None, Some(7)).unwrap();
        assert_eq!(
            (d.forget.len(), d.retain.len(), d.world_facts.len()),
            (7, 7, 7)
        );
        assert!(Split::parse("forget02").is_err());
    }
}
