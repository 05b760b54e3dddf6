//! Decode-time unlearning: the logit combination of the first way to forget (ULD and its
//! relatives), lockstep decoding of a target with its assistants, teacher-forced scoring,
//! profiles, and [`forgotten`], the one way to build a forgotten model from a base. See
//! docs/ARCHITECTURE.md ("Where forgetting enters").

pub mod combine;
pub mod forgotten;
pub mod lockstep;
pub mod profile;
pub mod score;

pub use combine::{
    combine, combine_in, plausible_threshold, plausible_threshold_in, CombineScratch, ScoreRule,
    Term, TermKind, Use,
};
pub use forgotten::{default_threads, Base, Forgotten, LoadOptions};
pub use lockstep::{Assistant, LockstepDecoder};
pub use score::Scorer;
