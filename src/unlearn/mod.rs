//! Decode-time unlearning: the logit combination of DESIGN's first way to forget (ULD and its
//! relatives), lockstep decoding of a target with its assistants, and profiles.

pub mod combine;
pub mod forgotten;
pub mod lockstep;
pub mod patch;
pub mod profile;
pub mod score;

pub use combine::{
    combine, combine_in, plausible_threshold, plausible_threshold_in, CombineScratch, ScoreRule,
    Term, TermKind, Use,
};
pub use forgotten::{default_threads, Base, Forgotten, LoadOptions};
pub use lockstep::{Assistant, LockstepDecoder};
pub use score::Scorer;
