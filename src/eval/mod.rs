//! Unlearning evaluation. The metrics, each matching the reference implementation it is named
//! after: ROUGE-L recall (`rouge_score` with NLTK's Porter stemmer), the two-sample
//! Kolmogorov-Smirnov test (`scipy.stats.ks_2samp`), membership-inference scores and ROC AUC,
//! and TOFU's aggregation (model utility, truth ratio, forget quality). Around them: TOFU's
//! sets, the runs that score a model on them (here or through a server), A/B comparison and
//! the reports.

pub mod calibrate;
pub mod compare;
pub mod data;
pub mod html;
pub mod ks;
pub mod mia;
pub mod remote;
pub mod report;
pub mod rouge;
pub mod run;
pub mod stem;
pub mod tofu;
