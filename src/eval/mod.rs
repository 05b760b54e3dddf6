//! Metrics for evaluating unlearning, each matching the reference implementation it is named
//! after: ROUGE-L recall (`rouge_score` with NLTK's Porter stemmer) and the two-sample
//! Kolmogorov-Smirnov test (`scipy.stats.ks_2samp`).

pub mod ks;
pub mod rouge;
pub mod stem;
