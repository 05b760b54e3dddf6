//! Metrics for evaluating unlearning, each matching the reference implementation it is named
//! after: ROUGE-L recall (`rouge_score` with NLTK's Porter stemmer), the two-sample
//! Kolmogorov-Smirnov test (`scipy.stats.ks_2samp`), membership-inference scores and ROC AUC,
//! and TOFU's aggregation (model utility, truth ratio, forget quality).

pub mod ks;
pub mod mia;
pub mod rouge;
pub mod stem;
pub mod tofu;
