//! Decode-time unlearning: the logit combination of DESIGN's first way to forget (ULD and its
//! relatives), lockstep decoding of a target with its assistants, and profiles.

pub mod combine;
pub mod lockstep;
pub mod patch;
pub mod profile;

pub use combine::{combine, plausible_threshold, plausible_threshold_in, Term, TermKind, Use};
pub use lockstep::{Assistant, LockstepDecoder};
