//! `lethe patch bake`: merge patches into a model.

use anyhow::Result;
use clap::Args;

#[derive(Args, Debug)]
pub struct BakeArgs {}

pub fn main(_a: BakeArgs) -> Result<()> {
    anyhow::bail!("lethe patch bake: not built yet")
}
