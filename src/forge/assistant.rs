//! The ULD assistant base: a truncated copy of a target model.
//!
//! [`truncate_model`] keeps the target's first K blocks (`blk.N.*` for N < K) and every tensor
//! outside the blocks (token embedding, final norm `output_norm.weight`, the output head
//! `output.weight` when the embeddings are not tied, `rope_freqs.weight` when present), all in
//! the target's order and bytes. All metadata is copied (tokenizer, chat template, ...) with
//! `{arch}.block_count` set to K (in the target's value type) and `general.name` suffixed, so
//! llama.cpp loads the result as an ordinary model of the same architecture.

use crate::gguf::{GgufFile, GgufWriter, Value};
use crate::model::Config;
use crate::{Error, Result};
use std::path::Path;

/// The block index of a tensor named `blk.N.*`, or `None` for tensors outside the blocks.
fn block_index(name: &str) -> Option<usize> {
    let rest = name.strip_prefix("blk.")?;
    let (n, _) = rest.split_once('.')?;
    n.parse().ok()
}

/// `k` in the integer type of `old` (llama.cpp writes `block_count` as a `u32`).
fn same_int_type(old: Option<&Value>, k: usize) -> Result<Value> {
    let too_big = || Error::Invalid(format!("block count {k} does not fit the key's type"));
    Ok(match old {
        Some(Value::U8(_)) => Value::U8(u8::try_from(k).map_err(|_| too_big())?),
        Some(Value::I8(_)) => Value::I8(i8::try_from(k).map_err(|_| too_big())?),
        Some(Value::U16(_)) => Value::U16(u16::try_from(k).map_err(|_| too_big())?),
        Some(Value::I16(_)) => Value::I16(i16::try_from(k).map_err(|_| too_big())?),
        Some(Value::I32(_)) => Value::I32(i32::try_from(k).map_err(|_| too_big())?),
        Some(Value::U64(_)) => Value::U64(k as u64),
        Some(Value::I64(_)) => Value::I64(i64::try_from(k).map_err(|_| too_big())?),
        _ => Value::U32(u32::try_from(k).map_err(|_| too_big())?),
    })
}

/// Writes to `out` a GGUF holding `src`'s first `n_layers` blocks, its non-block tensors
/// (embedding, final norm, output head if untied, rope factors if any) and all its metadata,
/// with `{arch}.block_count` = `n_layers` and `general.name` suffixed
/// `" (assistant, K blocks)"`.
///
/// Fails with [`Error::UnsupportedArch`] for architectures lethe does not run, and with
/// [`Error::Invalid`] unless `1 <= n_layers <= n_layer` of the target.
pub fn truncate_model(src: &GgufFile, n_layers: usize, out: &Path) -> Result<()> {
    let cfg = Config::from_gguf(src)?;
    if n_layers == 0 || n_layers > cfg.n_layer {
        return Err(Error::Invalid(format!(
            "assistant block count {n_layers} is outside 1..={} (the target's blocks)",
            cfg.n_layer
        )));
    }
    for required in ["token_embd.weight", "output_norm.weight"] {
        if src.tensor(required).is_none() {
            return Err(Error::Model(format!("target lacks tensor {required}")));
        }
    }
    let arch = src.architecture()?.to_string();

    let mut w = GgufWriter::new();
    w.copy_metadata(src)?;
    let bc_key = format!("{arch}.block_count");
    let bc = same_int_type(src.get(&bc_key), n_layers)?;
    w.set(bc_key, bc)?;
    let base = match src.get("general.name") {
        Some(Value::String(s)) => s.clone(),
        _ => arch.clone(),
    };
    let name = format!("{base} (assistant, {n_layers} blocks)");
    w.set("general.name", Value::String(name))?;

    let mut kept_blocks = vec![false; n_layers];
    for t in src.tensors() {
        match block_index(&t.name) {
            Some(i) if i < n_layers => {
                kept_blocks[i] = true;
                w.copy_tensor(src, &t.name)?;
            }
            Some(_) => {}
            None => {
                w.copy_tensor(src, &t.name)?;
            }
        }
    }
    if let Some(i) = kept_blocks.iter().position(|&k| !k) {
        return Err(Error::Model(format!("target has no tensors for block {i}")));
    }
    w.write(out)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_names() {
        assert_eq!(block_index("blk.0.attn_q.weight"), Some(0));
        assert_eq!(block_index("blk.29.ffn_down.weight"), Some(29));
        assert_eq!(block_index("output_norm.weight"), None);
        assert_eq!(block_index("token_embd.weight"), None);
        assert_eq!(block_index("blk.x.y"), None);
    }

    #[test]
    fn block_count_keeps_its_type() {
        assert_eq!(
            same_int_type(Some(&Value::U32(30)), 8).unwrap(),
            Value::U32(8)
        );
        assert_eq!(
            same_int_type(Some(&Value::U64(30)), 8).unwrap(),
            Value::U64(8)
        );
        assert_eq!(same_int_type(None, 8).unwrap(), Value::U32(8));
        assert!(same_int_type(Some(&Value::U8(3)), 300).is_err());
    }
}
