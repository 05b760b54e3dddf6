//! Metrics for evaluating unlearning, each matching the reference implementation it is named
//! after: ROUGE-L recall (`rouge_score` with NLTK's Porter stemmer).

pub mod rouge;
pub mod stem;
