//! Decode-time unlearning. This module starts with the logit combination of DESIGN's first way
//! to forget (ULD and its relatives); profiles, lockstep decoding and patches build on it.

pub mod combine;

pub use combine::{combine, plausible_threshold, Term, TermKind, Use};
