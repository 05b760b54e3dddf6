//! Writing patch files: LoRA adapters and control vectors in llama.cpp's layout (so llama.cpp
//! loads them), and lethe's deltas.

use crate::gguf::GgufWriter;
use crate::{Error, Result};
use lethe_kernels::quant::{self, GgmlType};
use std::path::Path;

/// A low-rank change `dW = B A` of one base tensor (`[cols, rows]`).
#[derive(Debug, Clone)]
pub struct LowRankEntry {
    /// The base tensor's name, e.g. `blk.3.attn_output.weight`.
    pub base: String,
    pub cols: usize,
    pub rows: usize,
    pub rank: usize,
    /// `A`: `rank` rows of `cols` (`[cols, rank]` in ggml order).
    pub a: Vec<f32>,
    /// `B`: `rows` rows of `rank` (`[rank, rows]`).
    pub b: Vec<f32>,
}

/// One tensor of a delta file.
#[derive(Debug, Clone)]
pub enum DeltaEntry {
    /// `data` is `rows` rows of `cols`, stored as `ty` (F32, F16 or Q8_0).
    Dense {
        base: String,
        cols: usize,
        rows: usize,
        ty: GgmlType,
        data: Vec<f32>,
    },
    /// Entries at flat indices `row * cols + col`.
    Sparse {
        base: String,
        idx: Vec<i32>,
        val: Vec<f32>,
    },
    LowRank(LowRankEntry),
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn add_low_rank(w: &mut GgufWriter, e: &LowRankEntry) -> Result<()> {
    if e.a.len() != e.rank * e.cols || e.b.len() != e.rows * e.rank {
        return Err(Error::Invalid(format!(
            "{}: A has {} values and B {}, expected {} and {}",
            e.base,
            e.a.len(),
            e.b.len(),
            e.rank * e.cols,
            e.rows * e.rank
        )));
    }
    let (c, r, k) = (e.cols as u64, e.rows as u64, e.rank as u64);
    w.add_tensor(
        format!("{}.lora_a", e.base),
        &[c, k],
        GgmlType::F32,
        f32_bytes(&e.a),
    )?;
    w.add_tensor(
        format!("{}.lora_b", e.base),
        &[k, r],
        GgmlType::F32,
        f32_bytes(&e.b),
    )?;
    Ok(())
}

fn adapter_header(w: &mut GgufWriter, arch: &str, kind: &str, name: &str) -> Result<()> {
    w.set("general.architecture", arch)?;
    w.set("general.type", "adapter")?;
    w.set("general.name", name)?;
    w.set("adapter.type", kind)?;
    Ok(())
}

/// A LoRA adapter as llama.cpp reads it: `adapter.lora.alpha` (when given) and F32
/// `<base>.lora_a` / `<base>.lora_b` tensors.
pub fn write_lora(
    path: impl AsRef<Path>,
    arch: &str,
    name: &str,
    alpha: Option<f32>,
    entries: &[LowRankEntry],
) -> Result<()> {
    let mut w = GgufWriter::new();
    adapter_header(&mut w, arch, "lora", name)?;
    if let Some(a) = alpha {
        w.set("adapter.lora.alpha", a)?;
    }
    for e in entries {
        add_low_rank(&mut w, e)?;
    }
    w.write(path)?;
    Ok(())
}

/// A lethe delta adapter (`adapter.type = delta`).
pub fn write_delta(
    path: impl AsRef<Path>,
    arch: &str,
    name: &str,
    entries: &[DeltaEntry],
) -> Result<()> {
    let mut w = GgufWriter::new();
    adapter_header(&mut w, arch, "delta", name)?;
    for e in entries {
        match e {
            DeltaEntry::Dense {
                base,
                cols,
                rows,
                ty,
                data,
            } => {
                if !matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::Q8_0) {
                    return Err(Error::Invalid(format!(
                        "{base}: a dense delta is F32, F16 or Q8_0, not {ty}"
                    )));
                }
                if data.len() != cols * rows {
                    return Err(Error::Invalid(format!(
                        "{base}: {} values for a [{cols}, {rows}] delta",
                        data.len()
                    )));
                }
                let rb = ty.row_bytes(*cols);
                let mut bytes = vec![0u8; rb * rows];
                for (src, dst) in data.chunks_exact(*cols).zip(bytes.chunks_exact_mut(rb)) {
                    quant::quantize_row(*ty, src, dst)?;
                }
                w.add_tensor(
                    format!("{base}.delta"),
                    &[*cols as u64, *rows as u64],
                    *ty,
                    bytes,
                )?;
            }
            DeltaEntry::Sparse { base, idx, val } => {
                if idx.len() != val.len() {
                    return Err(Error::Invalid(format!(
                        "{base}: {} indices and {} values",
                        idx.len(),
                        val.len()
                    )));
                }
                let n = idx.len() as u64;
                let ib: Vec<u8> = idx.iter().flat_map(|x| x.to_le_bytes()).collect();
                w.add_tensor(format!("{base}.delta_idx"), &[n], GgmlType::I32, ib)?;
                w.add_tensor(
                    format!("{base}.delta_val"),
                    &[n],
                    GgmlType::F32,
                    f32_bytes(val),
                )?;
            }
            DeltaEntry::LowRank(e) => add_low_rank(&mut w, e)?,
        }
    }
    w.write(path)?;
    Ok(())
}

/// A control vector as llama.cpp reads it: F32 `direction.N` tensors (N >= 1).
pub fn write_cvec(
    path: impl AsRef<Path>,
    model_hint: &str,
    dirs: &[(usize, Vec<f32>)],
) -> Result<()> {
    let mut w = GgufWriter::new();
    w.set("general.architecture", "controlvector")?;
    w.set("controlvector.model_hint", model_hint)?;
    w.set("controlvector.layer_count", dirs.len() as i32)?;
    for (n, v) in dirs {
        if *n == 0 {
            return Err(Error::Invalid("control vectors start at block 1".into()));
        }
        w.add_tensor(
            format!("direction.{n}"),
            &[v.len() as u64],
            GgmlType::F32,
            f32_bytes(v),
        )?;
    }
    w.write(path)?;
    Ok(())
}
