//! Layer patch files: the refusals of bad files (with messages that name the problem), the
//! round trip with llama.cpp's own Python reader and writer (PyPI `gguf`), and the patch flags
//! of the `lethe` binary.

mod common;

use common::{Rng, TempDir};

use common::{model_path, python_dump};
use lethe::gguf::GgufWriter;
use lethe::model::{Model, Proj, WeightId};
use lethe::patch::{
    self as patchfile, write_cvec, write_delta, write_lora, DeltaEntry, LowRankEntry, Patch,
    PatchKind, PatchSet,
};
use lethe_kernels::quant::{self, GgmlType};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

// ---------------------------------------------------------------------------------------------
// Helpers

fn open(name: &str) -> Model {
    Model::open(model_path(name), 2).unwrap()
}

fn load(path: &Path, m: &Model) -> Arc<Patch> {
    Arc::new(patchfile::load(path, m).unwrap_or_else(|e| panic!("loading {}: {e}", path.display())))
}

fn set(m: &Model, parts: &[(Arc<Patch>, f32)]) -> Arc<PatchSet> {
    Arc::new(PatchSet::new(m, parts).unwrap())
}

fn low_rank(m: &Model, t: WeightId, rank: usize, std: f32, rng: &mut Rng) -> LowRankEntry {
    let (cols, rows) = m.target_shape(t).unwrap();
    LowRankEntry {
        base: t.tensor_name(),
        cols,
        rows,
        rank,
        a: rng.vec(rank * cols, std),
        b: rng.vec(rows * rank, std),
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn sha256_hex(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// An adapter file with raw tensors `(name, ggml shape, type, bytes)`.
fn raw_adapter(
    path: &Path,
    arch: &str,
    kind: &str,
    alpha: Option<f32>,
    tensors: Vec<(&str, Vec<u64>, GgmlType, Vec<u8>)>,
) {
    let mut w = GgufWriter::new();
    w.set("general.architecture", arch.to_string()).unwrap();
    w.set("general.type", "adapter".to_string()).unwrap();
    w.set("adapter.type", kind.to_string()).unwrap();
    if let Some(a) = alpha {
        w.set("adapter.lora.alpha", a).unwrap();
    }
    for (name, shape, ty, data) in tensors {
        w.add_tensor(name, &shape, ty, data).unwrap();
    }
    w.write(path).unwrap();
}

/// A control vector with raw tensors.
fn raw_cvec(path: &Path, hint: &str, tensors: Vec<(&str, Vec<u64>, GgmlType, Vec<u8>)>) {
    let mut w = GgufWriter::new();
    w.set("general.architecture", "controlvector".to_string())
        .unwrap();
    w.set("controlvector.model_hint", hint.to_string()).unwrap();
    w.set("controlvector.layer_count", tensors.len() as i32)
        .unwrap();
    for (name, shape, ty, data) in tensors {
        w.add_tensor(name, &shape, ty, data).unwrap();
    }
    w.write(path).unwrap();
}

/// Runs `tests/fixtures/write_patches.py` (llama.cpp's GGUFWriter) into `dir`; fails (never
/// skips) without the `gguf` package.
fn python_write_patches(dir: &Path) -> serde_json::Value {
    let python = common::python();
    let script = common::fixture("write_patches.py");
    let out = Command::new(&python)
        .arg(&script)
        .arg(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(3) {
        panic!(
            "{stderr}\n{}",
            common::python::missing("llama.cpp's writer", &python)
        );
    }
    assert!(out.status.success(), "write_patches.py failed: {stderr}");
    let text = std::fs::read_to_string(dir.join("manifest.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn read_f32(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// 7. Refusals

/// The message of loading `path` against `m`, which must fail, name the file and contain every
/// one of `want`.
fn refused(path: &Path, m: &Model, want: &[&str]) -> String {
    let msg = match patchfile::load(path, m) {
        Ok(_) => panic!("{} loaded; expected an error with {want:?}", path.display()),
        Err(e) => e.to_string(),
    };
    assert!(
        msg.contains(&path.display().to_string()),
        "the message names the file: {msg}"
    );
    for w in want {
        assert!(msg.contains(w), "expected {w:?} in: {msg}");
    }
    msg
}

#[test]
fn bad_patch_files_are_refused_with_clear_messages() {
    let m = open("smollm2");
    let dir = TempDir::new("refuse");
    let mut rng = Rng(71);
    let q = WeightId::Block(0, Proj::Q);
    let good = low_rank(&m, q, 4, 0.05, &mut rng);
    let p = |n: &str| dir.join(n);

    // LoRA: lora_a's columns are not the weight's.
    let mut e = good.clone();
    e.cols = 500;
    e.a = rng.vec(4 * 500, 0.05);
    write_lora(p("cols.gguf"), "llama", "x", None, &[e]).unwrap();
    refused(
        &p("cols.gguf"),
        &m,
        &["blk.0.attn_q.weight", "must be [576, r] and [r, 576]"],
    );

    // LoRA: ranks of A and B differ.
    raw_adapter(
        &p("rank.gguf"),
        "llama",
        "lora",
        None,
        vec![
            (
                "blk.0.attn_q.weight.lora_a",
                vec![576, 4],
                GgmlType::F32,
                f32_bytes(&rng.vec(576 * 4, 0.1)),
            ),
            (
                "blk.0.attn_q.weight.lora_b",
                vec![3, 576],
                GgmlType::F32,
                f32_bytes(&rng.vec(576 * 3, 0.1)),
            ),
        ],
    );
    refused(
        &p("rank.gguf"),
        &m,
        &["blk.0.attn_q.weight", "ranks differ"],
    );

    // A block the model does not have.
    let mut e = good.clone();
    e.base = "blk.30.attn_q.weight".into();
    write_lora(p("blk30.gguf"), "llama", "x", None, &[e]).unwrap();
    refused(
        &p("blk30.gguf"),
        &m,
        &["blk.30.attn_q.weight", "no such weight", "30 blocks"],
    );
    write_cvec(p("dir30.gguf"), "llama", &[(30, rng.vec(576, 0.1))]).unwrap();
    refused(&p("dir30.gguf"), &m, &["direction.30", "blocks 0..29"]);

    // direction.0 (llama.cpp refuses it too): lethe's writer won't write it, the reader
    // refuses it.
    assert!(write_cvec(p("x.gguf"), "llama", &[(0, rng.vec(576, 0.1))]).is_err());
    raw_cvec(
        &p("dir0.gguf"),
        "llama",
        vec![(
            "direction.0",
            vec![576],
            GgmlType::F32,
            f32_bytes(&rng.vec(576, 0.1)),
        )],
    );
    refused(&p("dir0.gguf"), &m, &["direction.0", "start at block 1"]);

    // A LoRA for gemma3, on SmolLM2.
    write_lora(
        p("gemma.gguf"),
        "gemma3",
        "x",
        None,
        std::slice::from_ref(&good),
    )
    .unwrap();
    refused(
        &p("gemma.gguf"),
        &m,
        &["architecture \"gemma3\"", "the model is \"llama\""],
    );
    // A delta for gemma3, too.
    write_delta(
        p("gemma-delta.gguf"),
        "gemma3",
        "x",
        &[DeltaEntry::LowRank(good.clone())],
    )
    .unwrap();
    refused(&p("gemma-delta.gguf"), &m, &["architecture \"gemma3\""]);
    // A control vector made for gemma3.
    write_cvec(p("gemma-cvec.gguf"), "gemma3", &[(3, rng.vec(576, 0.1))]).unwrap();
    refused(&p("gemma-cvec.gguf"), &m, &["made for \"gemma3\""]);

    // A LoRA missing its lora_b; a tensor with another suffix.
    raw_adapter(
        &p("half.gguf"),
        "llama",
        "lora",
        None,
        vec![(
            "blk.0.attn_q.weight.lora_a",
            vec![576, 4],
            GgmlType::F32,
            f32_bytes(&good.a),
        )],
    );
    refused(
        &p("half.gguf"),
        &m,
        &["blk.0.attn_q.weight", "missing its lora_b"],
    );
    raw_adapter(
        &p("suffix.gguf"),
        "llama",
        "lora",
        None,
        vec![(
            "blk.0.attn_q.weight.lora_c",
            vec![576, 4],
            GgmlType::F32,
            f32_bytes(&good.a),
        )],
    );
    refused(&p("suffix.gguf"), &m, &["lora_c", "unexpected suffix"]);
    raw_adapter(
        &p("dsuffix.gguf"),
        "llama",
        "delta",
        None,
        vec![(
            "blk.0.attn_q.weight.deltas",
            vec![576, 4],
            GgmlType::F32,
            f32_bytes(&good.a),
        )],
    );
    refused(&p("dsuffix.gguf"), &m, &["deltas", "unexpected suffix"]);
    // A weight lethe does not patch (a norm).
    raw_adapter(
        &p("norm.gguf"),
        "llama",
        "lora",
        None,
        vec![
            (
                "blk.0.attn_norm.weight.lora_a",
                vec![576, 1],
                GgmlType::F32,
                f32_bytes(&rng.vec(576, 0.1)),
            ),
            (
                "blk.0.attn_norm.weight.lora_b",
                vec![1, 1],
                GgmlType::F32,
                f32_bytes(&[0.1]),
            ),
        ],
    );
    refused(
        &p("norm.gguf"),
        &m,
        &["blk.0.attn_norm.weight", "not a weight lethe can patch"],
    );
    // A LoRA on the token embedding (llama.cpp's transposed layout): use a delta.
    let emb = low_rank(&m, WeightId::Embd, 2, 0.05, &mut rng);
    write_lora(
        p("embd.gguf"),
        "llama",
        "x",
        None,
        std::slice::from_ref(&emb),
    )
    .unwrap();
    refused(
        &p("embd.gguf"),
        &m,
        &["token_embd.weight", "write it as a delta"],
    );
    // ... which as a low-rank delta loads.
    write_delta(p("embd-d.gguf"), "llama", "x", &[DeltaEntry::LowRank(emb)]).unwrap();
    load(&p("embd-d.gguf"), &m);

    // A model passed as a patch.
    let model_file = model_path("smollm2");
    refused(&model_file, &m, &["not a patch"]);
    // An adapter of another type.
    raw_adapter(&p("ia3.gguf"), "llama", "ia3", None, vec![]);
    refused(&p("ia3.gguf"), &m, &["adapter.type is \"ia3\""]);
    // Nothing in it.
    write_lora(p("empty.gguf"), "llama", "x", None, &[]).unwrap();
    refused(&p("empty.gguf"), &m, &["no tensors"]);

    // Control vectors: the wrong n_embd; not F32.
    write_cvec(p("embd640.gguf"), "llama", &[(3, rng.vec(640, 0.1))]).unwrap();
    refused(
        &p("embd640.gguf"),
        &m,
        &["direction.3", "640 elements", "n_embd is 576"],
    );
    let h: Vec<u8> = rng
        .vec(576, 0.1)
        .iter()
        .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
        .collect();
    raw_cvec(
        &p("f16cvec.gguf"),
        "llama",
        vec![("direction.3", vec![576], GgmlType::F16, h)],
    );
    refused(&p("f16cvec.gguf"), &m, &["direction.3", "1-D F32"]);

    // NaN values.
    let mut e = good.clone();
    e.a[7] = f32::NAN;
    write_lora(p("nan.gguf"), "llama", "x", None, &[e]).unwrap();
    refused(&p("nan.gguf"), &m, &["blk.0.attn_q.weight", "NaN"]);
    let mut v = rng.vec(576, 0.1);
    v[100] = f32::INFINITY;
    write_cvec(p("nancvec.gguf"), "llama", &[(4, v)]).unwrap();
    refused(&p("nancvec.gguf"), &m, &["direction.4", "NaN or inf"]);
    write_delta(
        p("nansparse.gguf"),
        "llama",
        "x",
        &[DeltaEntry::Sparse {
            base: q.tensor_name(),
            idx: vec![1, 2],
            val: vec![0.5, f32::NAN],
        }],
    )
    .unwrap();
    refused(&p("nansparse.gguf"), &m, &["blk.0.attn_q.weight", "NaN"]);
    for ty in [GgmlType::F32, GgmlType::F16] {
        let mut data = rng.vec(576 * 576, 0.01);
        data[576 * 3 + 5] = f32::NAN;
        let name = format!("nandense-{ty}.gguf");
        write_delta(
            p(&name),
            "llama",
            "x",
            &[DeltaEntry::Dense {
                base: q.tensor_name(),
                cols: 576,
                rows: 576,
                ty,
                data,
            }],
        )
        .unwrap();
        refused(&p(&name), &m, &["blk.0.attn_q.weight", "NaN"]);
    }

    // Q8_0 with a NaN block scale (an f16 NaN).
    let rb = GgmlType::Q8_0.row_bytes(576);
    let mut bytes = vec![0u8; rb * 576];
    for (src, dst) in rng
        .vec(576 * 576, 0.01)
        .chunks_exact(576)
        .zip(bytes.chunks_exact_mut(rb))
    {
        quant::quantize_row(GgmlType::Q8_0, src, dst).unwrap();
    }
    bytes[rb * 7 + 34 * 2..rb * 7 + 34 * 2 + 2].copy_from_slice(&0x7E00u16.to_le_bytes());
    raw_adapter(
        &p("nanq8.gguf"),
        "llama",
        "delta",
        None,
        vec![(
            "blk.0.attn_q.weight.delta",
            vec![576, 576],
            GgmlType::Q8_0,
            bytes,
        )],
    );
    refused(
        &p("nanq8.gguf"),
        &m,
        &["blk.0.attn_q.weight.delta", "NaN or inf (row 7)"],
    );

    // A dense delta of type Q4_0: the writer refuses it, and so does the reader.
    let data = rng.vec(576 * 576, 0.01);
    let dense = |ty| DeltaEntry::Dense {
        base: q.tensor_name(),
        cols: 576,
        rows: 576,
        ty,
        data: data.clone(),
    };
    assert!(write_delta(p("x.gguf"), "llama", "x", &[dense(GgmlType::Q4_0)]).is_err());
    let rb = GgmlType::Q4_0.row_bytes(576);
    let mut bytes = vec![0u8; rb * 576];
    for (src, dst) in data.chunks_exact(576).zip(bytes.chunks_exact_mut(rb)) {
        quant::quantize_row(GgmlType::Q4_0, src, dst).unwrap();
    }
    raw_adapter(
        &p("q4.gguf"),
        "llama",
        "delta",
        None,
        vec![(
            "blk.0.attn_q.weight.delta",
            vec![576, 576],
            GgmlType::Q4_0,
            bytes,
        )],
    );
    refused(&p("q4.gguf"), &m, &["F32, F16 or Q8_0, not Q4_0"]);
    // A dense delta of the wrong shape.
    raw_adapter(
        &p("dshape.gguf"),
        "llama",
        "delta",
        None,
        vec![(
            "blk.0.attn_k.weight.delta",
            vec![576, 576],
            GgmlType::F32,
            f32_bytes(&data),
        )],
    );
    refused(
        &p("dshape.gguf"),
        &m,
        &["blk.0.attn_k.weight", "[576, 192]"],
    );
    // Two forms for one weight in one file.
    write_delta(
        p("mix.gguf"),
        "llama",
        "x",
        &[
            DeltaEntry::LowRank(good.clone()),
            DeltaEntry::Sparse {
                base: q.tensor_name(),
                idx: vec![3],
                val: vec![1.0],
            },
        ],
    )
    .unwrap();
    refused(&p("mix.gguf"), &m, &["blk.0.attn_q.weight", "another mix"]);

    // Sparse indices: out of range, repeated, negative.
    for (name, idx, want) in [
        ("range", vec![5, 576 * 576], "outside the 576 x 576 weight"),
        ("dup", vec![7, 9, 7], "appears twice"),
        ("neg", vec![3, -1], "negative index"),
    ] {
        let val = vec![0.5; idx.len()];
        let file = format!("sparse-{name}.gguf");
        write_delta(
            p(&file),
            "llama",
            "x",
            &[DeltaEntry::Sparse {
                base: q.tensor_name(),
                idx,
                val,
            }],
        )
        .unwrap();
        refused(&p(&file), &m, &["blk.0.attn_q.weight", want]);
    }

    // The good files load (the refusals above are about what was changed).
    write_lora(p("good.gguf"), "llama", "x", Some(8.0), &[good]).unwrap();
    let ok = load(&p("good.gguf"), &m);
    assert_eq!(ok.kind, PatchKind::Lora);
    assert_eq!(ok.tensors[0].scale, 2.0, "alpha 8 / rank 4");
    // repeng writes the Hugging Face model type as the hint: accepted.
    write_cvec(p("hf.gguf"), "llama3", &[(3, rng.vec(576, 0.1))]).unwrap();
    load(&p("hf.gguf"), &m);
    let g = open("gemma3");
    write_cvec(p("g.gguf"), "gemma3_text", &[(3, rng.vec(640, 0.1))]).unwrap();
    load(&p("g.gguf"), &g);
}

// ---------------------------------------------------------------------------------------------
// 8. Round trip with llama.cpp's Python reader and writer

fn field<'a>(dump: &'a serde_json::Value, key: &str) -> &'a serde_json::Value {
    dump["fields"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["key"] == key)
        .unwrap_or_else(|| panic!("no field {key}"))
}

fn tensor<'a>(dump: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    dump["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("no tensor {name}"))
}

fn shape(t: &serde_json::Value) -> Vec<u64> {
    t["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

/// Files lethe writes are read by llama.cpp's Python reader with the metadata and tensor
/// layout llama.cpp expects (`lora_a` `[cols, r]`, `lora_b` `[r, rows]`, F32 `direction.N`).
#[test]
fn lethe_written_patches_read_in_llama_cpp_python() {
    let m = open("smollm2");
    let dir = TempDir::new("pydump");
    let mut rng = Rng(81);
    let e1 = low_rank(&m, WeightId::Block(2, Proj::K), 4, 0.05, &mut rng);
    let e2 = low_rank(&m, WeightId::Output, 2, 0.05, &mut rng);
    let lp = dir.join("lora.gguf");
    write_lora(
        &lp,
        "llama",
        "my lora",
        Some(3.5),
        &[e1.clone(), e2.clone()],
    )
    .unwrap();
    let d = python_dump(&lp);
    assert_eq!(field(&d, "general.architecture")["value"], "llama");
    assert_eq!(field(&d, "general.type")["value"], "adapter");
    assert_eq!(field(&d, "adapter.type")["value"], "lora");
    assert_eq!(field(&d, "general.name")["value"], "my lora");
    assert_eq!(
        field(&d, "adapter.lora.alpha")["value"]["f32"],
        3.5f32.to_bits()
    );
    assert_eq!(d["tensors"].as_array().unwrap().len(), 4);
    for e in [&e1, &e2] {
        let a = tensor(&d, &format!("{}.lora_a", e.base));
        let b = tensor(&d, &format!("{}.lora_b", e.base));
        assert_eq!(shape(a), [e.cols as u64, e.rank as u64]);
        assert_eq!(shape(b), [e.rank as u64, e.rows as u64]);
        assert_eq!(a["type"], 0);
        assert_eq!(b["type"], 0);
        assert_eq!(a["sha256"], sha256_hex(&f32_bytes(&e.a)));
        assert_eq!(b["sha256"], sha256_hex(&f32_bytes(&e.b)));
    }
    // No alpha: no key (llama.cpp then uses the scale alone).
    let lp2 = dir.join("lora-noalpha.gguf");
    write_lora(&lp2, "llama", "x", None, std::slice::from_ref(&e1)).unwrap();
    let d2 = python_dump(&lp2);
    assert!(d2["fields"]
        .as_array()
        .unwrap()
        .iter()
        .all(|f| f["key"] != "adapter.lora.alpha"));

    let cp = dir.join("cvec.gguf");
    let (v3, v29) = (rng.vec(576, 0.1), rng.vec(576, 0.1));
    write_cvec(&cp, "llama", &[(3, v3.clone()), (29, v29.clone())]).unwrap();
    let d = python_dump(&cp);
    assert_eq!(field(&d, "general.architecture")["value"], "controlvector");
    assert_eq!(field(&d, "controlvector.model_hint")["value"], "llama");
    assert_eq!(field(&d, "controlvector.layer_count")["value"], 2);
    for (n, v) in [(3, &v3), (29, &v29)] {
        let t = tensor(&d, &format!("direction.{n}"));
        assert_eq!(shape(t), [576]);
        assert_eq!(t["type"], 0);
        assert_eq!(t["sha256"], sha256_hex(&f32_bytes(v)));
    }

    let dp = dir.join("delta.gguf");
    let t_q = WeightId::Block(1, Proj::Q);
    let t_k = WeightId::Block(1, Proj::K);
    let dense_f16 = rng.vec(576 * 192, 0.02);
    let dense_q8 = rng.vec(576 * 576, 0.02);
    write_delta(
        &dp,
        "llama",
        "d",
        &[
            DeltaEntry::Dense {
                base: t_k.tensor_name(),
                cols: 576,
                rows: 192,
                ty: GgmlType::F16,
                data: dense_f16.clone(),
            },
            DeltaEntry::Dense {
                base: t_q.tensor_name(),
                cols: 576,
                rows: 576,
                ty: GgmlType::Q8_0,
                data: dense_q8,
            },
            DeltaEntry::Sparse {
                base: "blk.2.ffn_up.weight".into(),
                idx: vec![4, 99, 1000],
                val: vec![0.5, -0.25, 2.0],
            },
            DeltaEntry::LowRank(low_rank(
                &m,
                WeightId::Block(3, Proj::Down),
                3,
                0.05,
                &mut rng,
            )),
        ],
    )
    .unwrap();
    let d = python_dump(&dp);
    assert_eq!(field(&d, "general.architecture")["value"], "llama");
    assert_eq!(field(&d, "general.type")["value"], "adapter");
    assert_eq!(field(&d, "adapter.type")["value"], "delta");
    let k = tensor(&d, "blk.1.attn_k.weight.delta");
    assert_eq!((shape(k), k["type"].as_u64()), (vec![576, 192], Some(1)));
    let h: Vec<u8> = dense_f16
        .iter()
        .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
        .collect();
    assert_eq!(k["sha256"], sha256_hex(&h));
    let q = tensor(&d, "blk.1.attn_q.weight.delta");
    assert_eq!((shape(q), q["type"].as_u64()), (vec![576, 576], Some(8)));
    assert_eq!(q["n_bytes"], 576 * 576 / 32 * 34);
    let i = tensor(&d, "blk.2.ffn_up.weight.delta_idx");
    assert_eq!((shape(i), i["type"].as_u64()), (vec![3], Some(26)));
    let idx: Vec<u8> = [4i32, 99, 1000]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    assert_eq!(i["sha256"], sha256_hex(&idx));
    let v = tensor(&d, "blk.2.ffn_up.weight.delta_val");
    assert_eq!((shape(v), v["type"].as_u64()), (vec![3], Some(0)));
    let a = tensor(&d, "blk.3.ffn_down.weight.lora_a");
    assert_eq!(shape(a), [1536, 3]);
    let b = tensor(&d, "blk.3.ffn_down.weight.lora_b");
    assert_eq!(shape(b), [3, 576]);
    // And lethe reads its own file back.
    let p = load(&dp, &m);
    let forms: Vec<String> = p.tensors.iter().map(|t| t.form()).collect();
    for f in ["dense F16", "dense Q8_0", "sparse 3 entries", "rank 3"] {
        assert!(forms.iter().any(|x| x == f), "{f} in {forms:?}");
    }
}

/// A LoRA (F16 and F32 pairs, with alpha) and a control vector written by llama.cpp's Python
/// GGUFWriter load in lethe and give the same outputs, bit for bit, as the same values written
/// by lethe's writers; and the LoRA's change is `s alpha/rank B A x`.
#[test]
fn python_written_patches_equal_lethe_written_ones() {
    let m = open("smollm2");
    let dir = TempDir::new("pywrite");
    let man = python_write_patches(&dir.0);
    let alpha = man["alpha"].as_f64().unwrap() as f32;
    let mut entries = Vec::new();
    for e in man["lora"].as_array().unwrap() {
        let g = |k: &str| e[k].as_u64().unwrap() as usize;
        entries.push(LowRankEntry {
            base: e["base"].as_str().unwrap().into(),
            cols: g("cols"),
            rows: g("rows"),
            rank: g("rank"),
            a: read_f32(&dir.join(e["a"].as_str().unwrap())),
            b: read_f32(&dir.join(e["b"].as_str().unwrap())),
        });
    }
    assert!(man["lora"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["dtype"] == "float16"));
    let dirs: Vec<(usize, Vec<f32>)> = man["cvec"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["block"].as_u64().unwrap() as usize,
                read_f32(&dir.join(d["v"].as_str().unwrap())),
            )
        })
        .collect();

    let py_lora = dir.join("py_lora.gguf");
    let py_cvec = dir.join("py_cvec.gguf");
    let info = patchfile::inspect(&py_lora).unwrap();
    assert_eq!(info.kind, PatchKind::Lora);
    assert_eq!(info.alpha, Some(alpha));
    assert_eq!(info.arch.as_deref(), Some("llama"));
    assert!(
        info.targets
            .iter()
            .any(|(t, f, _)| t == "blk.2.attn_q.weight" && f == "rank 4 F16/F16"),
        "{:?}",
        info.targets
    );
    let info = patchfile::inspect(&py_cvec).unwrap();
    assert_eq!(info.kind, PatchKind::ControlVector);
    assert_eq!(info.targets.len(), 29);

    let le_lora = dir.join("lethe_lora.gguf");
    let le_cvec = dir.join("lethe_cvec.gguf");
    write_lora(&le_lora, "llama", "same", Some(alpha), &entries).unwrap();
    write_cvec(&le_cvec, "llama", &dirs).unwrap();
    let (pl, pc, ll, lc) = (
        load(&py_lora, &m),
        load(&py_cvec, &m),
        load(&le_lora, &m),
        load(&le_cvec, &m),
    );
    assert_eq!(pl.tensors.len(), entries.len());
    assert_eq!(pc.cvec.len(), 29);
    let s = 1.3f32;
    let (sp, sl) = (set(&m, &[(pl, s)]), set(&m, &[(ll, s)]));
    let mut rng = Rng(82);
    for e in &entries {
        let t = WeightId::parse(&e.base).unwrap();
        let n = 4;
        let x = rng.vec(n * e.cols, 1.0);
        let yp = m.apply_weight(t, &x, n, Some(&sp)).unwrap();
        assert_eq!(
            yp,
            m.apply_weight(t, &x, n, Some(&sl)).unwrap(),
            "{}",
            e.base
        );
        // The change is s alpha/rank B A x (f64 reference).
        let y0 = m.apply_weight(t, &x, n, None).unwrap();
        let f = s as f64 * alpha as f64 / e.rank as f64;
        let mut worst = 0.0f64;
        let mut dmax = 0.0f64;
        for i in 0..n {
            let xt = &x[i * e.cols..(i + 1) * e.cols];
            let ax: Vec<f64> = (0..e.rank)
                .map(|k| {
                    (0..e.cols)
                        .map(|c| e.a[k * e.cols + c] as f64 * xt[c] as f64)
                        .sum()
                })
                .collect();
            let ax_abs: Vec<f64> = (0..e.rank)
                .map(|k| {
                    (0..e.cols)
                        .map(|c| (e.a[k * e.cols + c] as f64 * xt[c] as f64).abs())
                        .sum()
                })
                .collect();
            for r in 0..e.rows {
                let want: f64 = f
                    * (0..e.rank)
                        .map(|k| e.b[r * e.rank + k] as f64 * ax[k])
                        .sum::<f64>();
                let got = yp[i * e.rows + r] as f64 - y0[i * e.rows + r] as f64;
                // The fused decode path keeps the factors as f16 (exact for the F16 pairs):
                // 2^-11 relative on each, against `|f| sum_k |B_rk| sum_c |A_kc x_c|`.
                let mag: f64 = f.abs()
                    * (0..e.rank)
                        .map(|k| (e.b[r * e.rank + k] as f64).abs() * ax_abs[k])
                        .sum::<f64>();
                let tol = 1.1e-3 * mag + 1e-6 + 2.4e-7 * (yp[i * e.rows + r].abs() as f64);
                worst = worst.max((got - want).abs() / tol);
                dmax = dmax.max(want.abs());
            }
        }
        assert!(worst <= 1.0, "{}: {worst:.2} of the budget", e.base);
        assert!(
            dmax > 1e-2,
            "{}: the LoRA changes the output ({dmax})",
            e.base
        );
    }
    let tokens = [1u32, 504, 2365, 6354, 16438, 27003, 30];
    let run = |ps: Option<Arc<PatchSet>>| {
        let mut st = m.new_state(32);
        m.attach_patches(&mut st, ps).unwrap();
        m.forward(&mut st, &tokens, None).unwrap().to_vec()
    };
    let base = run(None);
    let a = run(Some(set(&m, &[(pc.clone(), 0.8)])));
    assert_eq!(
        a,
        run(Some(set(&m, &[(lc.clone(), 0.8)]))),
        "control vectors"
    );
    assert!(a.iter().zip(&base).any(|(x, y)| (x - y).abs() > 1e-2));
    let both_p = run(Some(set(&m, &[(pc, 0.8), (sp.parts[0].0.clone(), s)])));
    let both_l = run(Some(set(&m, &[(lc, 0.8), (sl.parts[0].0.clone(), s)])));
    assert_eq!(both_p, both_l, "LoRA and control vector");
}

// ---------------------------------------------------------------------------------------------
// The patch flags of the binary

/// `lethe run` greedy on SmolLM2 with `flags`: (success, stdout, stderr).
fn lethe_run(flags: &[&str]) -> (bool, String, String) {
    let model = model_path("smollm2");
    let out = Command::new(env!("CARGO_BIN_EXE_lethe"))
        .args(["run", "-m"])
        .arg(&model)
        .args([
            "-t",
            "2",
            "-c",
            "256",
            "-p",
            "The capital of France is",
            "-n",
            "16",
            "--temp",
            "0",
        ])
        .args(flags)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn text(flags: &[&str]) -> String {
    let (ok, out, err) = lethe_run(flags);
    assert!(ok, "lethe run {flags:?} failed: {err}");
    out
}

/// `--lora` given a control vector (and the other mix-ups) say which flag to use.
#[test]
fn binary_flags_name_the_right_kind() {
    let m = open("smollm2");
    let dir = TempDir::new("flags");
    let mut rng = Rng(91);
    let (lp, cp) = (dir.join("l.gguf"), dir.join("c.gguf"));
    write_lora(
        &lp,
        "llama",
        "l",
        None,
        &[low_rank(&m, WeightId::Block(0, Proj::Q), 2, 0.05, &mut rng)],
    )
    .unwrap();
    write_cvec(&cp, "llama", &[(3, rng.vec(576, 0.1))]).unwrap();
    let (l, c) = (lp.to_str().unwrap(), cp.to_str().unwrap());
    for (flags, want) in [
        (vec!["--lora", c], "use --control-vector"),
        (vec!["--control-vector", l], "use --lora"),
        (vec!["--delta", l], "use --lora"),
    ] {
        let (ok, _, err) = lethe_run(&flags);
        assert!(!ok, "{flags:?} accepted");
        assert!(err.contains(want), "{flags:?}: expected {want:?} in: {err}");
    }
    let (ok, _, err) = lethe_run(&["--lora", model_path("smollm2").to_str().unwrap()]);
    assert!(!ok && err.contains("not a patch"), "{err}");
}

/// The scaled flags and the control vector layer range (inclusive, as llama.cpp's), by the
/// text of greedy generations: a scale of 1 is the plain flag, 0 is the base, and a range keeps
/// exactly the directions inside it.
#[test]
fn binary_scales_and_control_vector_layer_range() {
    let m = open("smollm2");
    let dir = TempDir::new("range");
    let mut rng = Rng(92);
    let e = m.cfg.n_embd;
    let (v5, v7) = (rng.vec(e, 4.0), rng.vec(e, 4.0));
    let paths: Vec<PathBuf> = ["both", "only7", "l", "d"]
        .iter()
        .map(|n| dir.join(&format!("{n}.gguf")))
        .collect();
    write_cvec(&paths[0], "llama", &[(5, v5), (7, v7.clone())]).unwrap();
    write_cvec(&paths[1], "llama", &[(7, v7)]).unwrap();
    // Every matrix of blocks 0..4, entries of B A with a std of 0.02 or so.
    let lora: Vec<LowRankEntry> = (0..4)
        .flat_map(|b| Proj::ALL.map(|s| WeightId::Block(b, s)))
        .map(|t| low_rank(&m, t, 16, 0.07, &mut rng))
        .collect();
    write_lora(&paths[2], "llama", "l", None, &lora).unwrap();
    let d: Vec<DeltaEntry> = lora.iter().cloned().map(DeltaEntry::LowRank).collect();
    write_delta(&paths[3], "llama", "d", &d).unwrap();
    let p: Vec<&str> = paths.iter().map(|p| p.to_str().unwrap()).collect();
    let (both, only7, l, dl) = (p[0], p[1], p[2], p[3]);

    let base = text(&[]);
    let t_both = text(&["--control-vector", both]);
    let t_only7 = text(&["--control-vector", only7]);
    assert_ne!(t_both, base, "the vectors change the text");
    assert_ne!(t_only7, t_both, "direction.5 matters");
    let range = |a: &str, b: &str| {
        text(&[
            "--control-vector",
            both,
            "--control-vector-layer-range",
            a,
            b,
        ])
    };
    assert_eq!(range("5", "7"), t_both, "5..=7 keeps both");
    assert_eq!(range("6", "7"), t_only7, "6..=7 keeps direction.7");
    assert_eq!(range("7", "29"), t_only7, "7..=29 keeps direction.7");
    assert_eq!(range("6", "6"), base, "6..=6 keeps none");
    assert_eq!(
        text(&["--control-vector-scaled", &format!("{both}:1")]),
        t_both
    );
    assert_eq!(
        text(&["--control-vector-scaled", &format!("{both}:0")]),
        base
    );

    let t_lora = text(&["--lora", l]);
    assert_ne!(t_lora, base, "the LoRA changes the text");
    assert_eq!(text(&["--lora-scaled", &format!("{l}:1")]), t_lora);
    assert_eq!(text(&["--lora-scaled", &format!("{l}:0")]), base);
    assert_eq!(text(&["--delta", dl]), t_lora, "a low-rank delta is a LoRA");
    assert_eq!(text(&["--delta", &format!("{dl}:0")]), base);
    assert_ne!(text(&["--lora-scaled", &format!("{l}:-1")]), t_lora);
    println!("base: {base:?}\ncvec: {t_both:?}\nlora: {t_lora:?}");
}
