//! Decode-time unlearning: the logit combination of DESIGN's first way to forget (ULD and its
//! relatives), lockstep decoding of a target with its assistants, and profiles.

pub mod combine;
pub mod lockstep;
pub mod profile;
pub mod score;

pub use combine::{
    combine, combine_in, plausible_threshold, plausible_threshold_in, CombineScratch, ScoreRule,
    Term, TermKind, Use,
};
pub use lockstep::{Assistant, LockstepDecoder};
pub use score::Scorer;

use crate::generate::{Decoder, ModelDecoder};
use crate::model::Model;
use crate::patch::PatchSet;
use std::sync::Arc;

/// The decoder of a (possibly forgotten) model: `model` with its layer `patches`, alone when
/// there are no assistant `terms`, in lockstep with them otherwise.
pub fn decoder(
    model: Arc<Model>,
    terms: Vec<Assistant>,
    patches: Option<Arc<PatchSet>>,
    n_ctx: usize,
) -> crate::Result<Box<dyn Decoder>> {
    if terms.is_empty() {
        return Ok(Box::new(ModelDecoder::with_patches(model, n_ctx, patches)?));
    }
    let dec = LockstepDecoder::new(model, terms, n_ctx)?.with_target_patches(patches)?;
    Ok(Box::new(dec))
}
