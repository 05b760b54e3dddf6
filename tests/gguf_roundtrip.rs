//! GGUF writer round trips: lethe writes, then lethe and llama.cpp's Python reader (PyPI `gguf`)
//! read back; and SmolLM2's own file is copied through the writer.

mod common;

use common::python_dump;
use half::f16;
use lethe::gguf::{Array, GgufError, GgufFile, GgufWriter, TensorInfo, Value, ValueType};
use lethe_kernels::GgmlType;
use serde_json::{json, Value as Json};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// splitmix64: deterministic test data without a rand dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let d = std::env::temp_dir().join(format!("lethe-gguf-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Valid blocks of `ty` for `n` elements: random payload, finite f16 scales where the format has them.
fn tensor_data(ty: GgmlType, n: usize, rng: &mut Rng) -> Vec<u8> {
    let f16_bytes = |x: f32| f16::from_f32(x).to_le_bytes();
    match ty {
        GgmlType::F32 => (0..n).flat_map(|_| rng.f32().to_le_bytes()).collect(),
        GgmlType::F16 => (0..n).flat_map(|_| f16_bytes(rng.f32())).collect(),
        GgmlType::Q8_0 => (0..n / 32)
            .flat_map(|_| {
                let mut b = f16_bytes(rng.f32().abs() / 127.0).to_vec();
                b.extend(rng.bytes(32));
                b
            })
            .collect(),
        GgmlType::Q4_K => (0..n / 256)
            .flat_map(|_| {
                // d, dmin, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles.
                let mut b = f16_bytes(rng.f32().abs() / 64.0).to_vec();
                b.extend(f16_bytes(rng.f32().abs() / 64.0));
                b.extend(rng.bytes(12 + 128));
                b
            })
            .collect(),
        other => panic!("no generator for {}", other.name()),
    }
}

fn metadata() -> Vec<(String, Value)> {
    let s = |x: &str| Value::String(x.into());
    vec![
        ("general.architecture".into(), s("llama")),
        (
            "general.name".into(),
            s("lethe round trip \u{1f9e0} «ünïcode»"),
        ),
        ("test.empty_string".into(), s("")),
        ("test.u8".into(), Value::U8(255)),
        ("test.i8".into(), Value::I8(-128)),
        ("test.u16".into(), Value::U16(65535)),
        ("test.i16".into(), Value::I16(-32768)),
        ("test.u32".into(), Value::U32(u32::MAX)),
        ("test.i32".into(), Value::I32(i32::MIN)),
        ("test.f32".into(), Value::F32(-1.5e-7)),
        ("test.bool_true".into(), Value::Bool(true)),
        ("test.bool_false".into(), Value::Bool(false)),
        ("test.u64".into(), Value::U64(u64::MAX)),
        ("test.i64".into(), Value::I64(i64::MIN)),
        ("test.f64".into(), Value::F64(std::f64::consts::PI)),
        ("test.arr_u8".into(), Value::from(vec![0u8, 1, 255])),
        ("test.arr_i8".into(), Value::from(vec![-128i8, 0, 127])),
        ("test.arr_u16".into(), Value::from(vec![0u16, 65535])),
        ("test.arr_i16".into(), Value::from(vec![-32768i16, 32767])),
        ("test.arr_u32".into(), Value::from(vec![0u32, 7, u32::MAX])),
        (
            "test.arr_i32".into(),
            Value::from(vec![i32::MIN, -1, i32::MAX]),
        ),
        (
            "test.arr_f32".into(),
            Value::from(vec![0.0f32, -0.0, 1.0e30, f32::MIN_POSITIVE]),
        ),
        ("test.arr_bool".into(), Value::from(vec![true, false, true])),
        (
            "test.arr_str".into(),
            Value::from(vec!["", "a", "<|im_start|>", "\u{0120}hello", "日本語"]),
        ),
        ("test.arr_u64".into(), Value::from(vec![0u64, u64::MAX])),
        ("test.arr_i64".into(), Value::from(vec![i64::MIN, i64::MAX])),
        (
            "test.arr_f64".into(),
            Value::from(vec![f64::MIN_POSITIVE, -2.5, 1e300]),
        ),
        (
            "test.arr_empty_u32".into(),
            Value::Array(Array::empty(ValueType::U32).unwrap()),
        ),
        (
            "test.arr_empty_str".into(),
            Value::Array(Array::empty(ValueType::String).unwrap()),
        ),
    ]
}

/// (name, shape, type): sizes chosen so most tensors need padding.
fn tensor_specs() -> Vec<(&'static str, Vec<u64>, GgmlType)> {
    vec![
        ("f32.vec", vec![7], GgmlType::F32),
        ("f32.mat", vec![7, 3], GgmlType::F32),
        ("f16.mat", vec![33, 2], GgmlType::F16),
        ("q8_0.mat", vec![64, 3], GgmlType::Q8_0),
        ("q4_k.mat", vec![256, 2], GgmlType::Q4_K),
        ("q8_0.3d", vec![32, 2, 3], GgmlType::Q8_0),
        ("f16.4d", vec![3, 1, 2, 5], GgmlType::F16),
        (
            "blk.0.attn_q.weight.with_a_name_of_exactly_sixty_three_bytes_xx",
            vec![512, 1],
            GgmlType::Q4_K,
        ),
    ]
}

fn build(alignment: Option<u32>, rng: &mut Rng) -> (GgufWriter<'static>, Vec<Vec<u8>>) {
    let mut w = GgufWriter::new();
    for (k, v) in metadata() {
        w.set(k, v).unwrap();
    }
    if let Some(a) = alignment {
        w.set("general.alignment", a).unwrap();
    }
    let mut datas = Vec::new();
    for (name, shape, ty) in tensor_specs() {
        assert!(name.len() < 64, "{name}");
        let n = shape.iter().product::<u64>() as usize;
        let d = tensor_data(ty, n, rng);
        w.add_tensor(name, &shape, ty, d.clone()).unwrap();
        datas.push(d);
    }
    (w, datas)
}

/// Everything lethe reads back matches what was written, and the layout is llama.cpp's.
fn check_lethe(f: &GgufFile, align: usize, datas: &[Vec<u8>], alignment_key: Option<u32>) {
    let mut want = metadata();
    if let Some(a) = alignment_key {
        want.push(("general.alignment".into(), Value::U32(a)));
    }
    assert_eq!(f.version, 3);
    assert_eq!(f.metadata(), want.as_slice());
    assert_eq!(f.alignment, align);
    assert_eq!(f.data_offset % align, 0);
    let specs = tensor_specs();
    assert_eq!(f.tensors().len(), specs.len());
    let mut expect_offset = 0u64;
    for ((t, (name, shape, ty)), d) in f.tensors().iter().zip(&specs).zip(datas) {
        assert_eq!(&t.name, name);
        assert_eq!(&t.shape, shape);
        assert_eq!(t.ty, *ty);
        assert_eq!(t.offset, expect_offset, "{name}: packed offsets");
        assert_eq!(f.tensor_data(t), d.as_slice(), "{name}");
        assert!(std::ptr::eq(f.tensor(name).unwrap(), t));
        let padded = t.size.div_ceil(align as u64) * align as u64;
        let pad = &f.bytes()[f.data_offset + (t.offset + t.size) as usize
            ..f.data_offset + (t.offset + padded) as usize];
        assert!(pad.iter().all(|&b| b == 0), "{name}: padding is zeros");
        expect_offset += padded;
    }
    // Every tensor is padded, the last one included (as gguf_write_to_buf does).
    assert_eq!(f.bytes().len() as u64, f.data_offset as u64 + expect_offset);
    // The header padding is zeros too.
    let header_end = f.data_offset - (f.data_offset % align);
    assert!(f.bytes()[header_end..f.data_offset].iter().all(|&b| b == 0));
}

fn expected_json(v: &Value) -> Json {
    match v {
        Value::U8(x) => json!(x),
        Value::I8(x) => json!(x),
        Value::U16(x) => json!(x),
        Value::I16(x) => json!(x),
        Value::U32(x) => json!(x),
        Value::I32(x) => json!(x),
        Value::U64(x) => json!(x),
        Value::I64(x) => json!(x),
        Value::F32(x) => json!({ "f32": x.to_bits() }),
        Value::F64(x) => json!({ "f64": x.to_bits() }),
        Value::Bool(x) => json!(x),
        Value::String(s) => json!(s),
        Value::Array(a) => Json::Array(a.iter().map(|x| expected_json(&x)).collect()),
    }
}

/// What the Python reader saw matches what lethe wrote, field by field and byte by byte.
fn check_python(path: &Path, f: &GgufFile) {
    let py = python_dump(path);
    assert_eq!(py["alignment"], json!(f.alignment));
    assert_eq!(py["data_offset"], json!(f.data_offset));
    let fields = py["fields"].as_array().unwrap();
    assert_eq!(fields.len(), f.metadata().len());
    for (pf, (k, v)) in fields.iter().zip(f.metadata()) {
        assert_eq!(pf["key"], json!(k));
        assert_eq!(pf["type"], json!(v.ty() as u32), "{k}");
        if let Value::Array(a) = v {
            assert_eq!(pf["elem"], json!(a.elem_type() as u32), "{k}");
        }
        assert_eq!(pf["value"], expected_json(v), "{k}");
    }
    let tensors = py["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), f.tensors().len());
    for (pt, t) in tensors.iter().zip(f.tensors()) {
        assert_eq!(pt["name"], json!(t.name));
        assert_eq!(pt["type"], json!(t.ty as u32), "{}", t.name);
        assert_eq!(pt["shape"], json!(t.shape), "{}", t.name);
        assert_eq!(pt["n_bytes"], json!(t.size), "{}", t.name);
        assert_eq!(
            pt["data_offset"],
            json!(f.data_offset as u64 + t.offset),
            "{}",
            t.name
        );
        let sha = format!("{:x}", Sha256::digest(f.tensor_data(t)));
        assert_eq!(pt["sha256"], json!(sha), "{}", t.name);
    }
}

#[test]
fn roundtrip_every_type_lethe_and_python() {
    let dir = TempDir::new("roundtrip");
    for (i, alignment) in [None, Some(64u32), Some(1), Some(4096)]
        .into_iter()
        .enumerate()
    {
        let mut rng = Rng(42 + i as u64);
        let (w, datas) = build(alignment, &mut rng);
        let align = alignment.map_or(32, |a| a as usize);
        assert_eq!(w.alignment(), align);
        let path = dir.0.join(format!("rt{i}.gguf"));
        w.write(&path).unwrap();
        let bytes = w.to_bytes().unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            bytes,
            "write() and to_bytes() agree"
        );
        assert_eq!(w.file_size(), bytes.len() as u64);

        let f = GgufFile::open(&path).unwrap();
        check_lethe(&f, align, &datas, alignment);
        let infos = w.tensor_infos();
        for (a, b) in infos.iter().zip(f.tensors()) {
            assert_eq!((a.offset, a.size), (b.offset, b.size), "{}", a.name);
        }
        check_lethe(
            &GgufFile::from_bytes(bytes).unwrap(),
            align,
            &datas,
            alignment,
        );
        check_python(&path, &f);
    }
    // No temporary files left beside the outputs.
    let names: Vec<String> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names
            .iter()
            .all(|n| n.ends_with(".gguf") && !n.starts_with('.')),
        "{names:?}"
    );
}

#[test]
fn streaming_write_matches_and_checks_lengths() {
    let dir = TempDir::new("stream");
    let mut rng = Rng(7);
    let (held, datas) = build(None, &mut rng);
    let mut streamed = GgufWriter::new();
    for (k, v) in metadata() {
        streamed.set(k, v).unwrap();
    }
    for (i, (name, shape, ty)) in tensor_specs().into_iter().enumerate() {
        if i % 2 == 0 {
            streamed.add_tensor_info(name, &shape, ty).unwrap();
        } else {
            streamed
                .add_tensor(name, &shape, ty, datas[i].as_slice())
                .unwrap();
        }
    }
    // Only tensors without data are asked for, once each, in file order.
    let mut asked = Vec::new();
    let path = dir.0.join("streamed.gguf");
    streamed
        .write_with(&path, |t: &TensorInfo| -> lethe::Result<Vec<u8>> {
            asked.push(t.name.clone());
            let i = tensor_specs().iter().position(|s| s.0 == t.name).unwrap();
            Ok(datas[i].clone())
        })
        .unwrap();
    let want: Vec<String> = tensor_specs()
        .iter()
        .step_by(2)
        .map(|s| s.0.to_string())
        .collect();
    assert_eq!(asked, want);
    assert_eq!(std::fs::read(&path).unwrap(), held.to_bytes().unwrap());

    // A tensor without data makes write() fail, leaving nothing behind.
    let missing = dir.0.join("missing.gguf");
    assert!(matches!(streamed.write(&missing), Err(GgufError::Write(_))));
    assert!(streamed.to_bytes().is_err());
    // A wrong length from the closure fails and leaves neither the target nor a temp file.
    let err = streamed.write_with(&missing, |t: &TensorInfo| -> Result<Vec<u8>, GgufError> {
        Ok(vec![0; t.size as usize + 1])
    });
    assert!(matches!(err, Err(GgufError::Write(_))), "{err:?}");
    // Errors from the closure are passed through.
    let err = streamed.write_with(&missing, |_: &TensorInfo| -> lethe::Result<Vec<u8>> {
        Err(lethe::Error::Invalid("boom".into()))
    });
    assert!(matches!(err, Err(lethe::Error::Invalid(_))));
    let left: Vec<_> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("streamed.gguf")]);
    // Overwriting an existing file works (rename over it).
    held.write(&path).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), held.to_bytes().unwrap());
}

#[test]
fn writer_rejects_what_llama_cpp_rejects() {
    let mut w = GgufWriter::new();
    let name63 = "x".repeat(63);
    w.add_tensor(name63.as_str(), &[1], GgmlType::F32, vec![0; 4])
        .unwrap();
    let e = w.add_tensor("y".repeat(64), &[1], GgmlType::F32, vec![0; 4]);
    assert!(
        matches!(e, Err(GgufError::NameTooLong { len: 64, .. })),
        "{:?}",
        e.err()
    );
    let e = w.add_tensor(name63.as_str(), &[1], GgmlType::F32, vec![0; 4]);
    assert!(matches!(e, Err(GgufError::DuplicateTensor(_))));
    let e = w.add_tensor_info("five", &[1, 1, 1, 1, 1], GgmlType::F32);
    assert!(matches!(e, Err(GgufError::TooManyDims { n_dims: 5, .. })));
    let e = w.add_tensor_info("zero", &[], GgmlType::F32);
    assert!(matches!(e, Err(GgufError::TooManyDims { n_dims: 0, .. })));
    let e = w.add_tensor_info("q8", &[33, 2], GgmlType::Q8_0);
    assert!(matches!(
        e,
        Err(GgufError::BadBlockMultiple {
            ne0: 33,
            block: 32,
            ..
        })
    ));
    let e = w.add_tensor_info("q4k", &[128], GgmlType::Q4_K);
    assert!(matches!(
        e,
        Err(GgufError::BadBlockMultiple {
            ne0: 128,
            block: 256,
            ..
        })
    ));
    let e = w.add_tensor("short", &[32, 2], GgmlType::Q8_0, vec![0; 67]);
    assert!(matches!(e, Err(GgufError::Write(_))));
    let e = w.add_tensor_info("huge", &[u64::MAX, 2], GgmlType::F32);
    assert!(matches!(e, Err(GgufError::BadShape { .. })));
    let e = w.add_tensor_info("overflow", &[1 << 32, 1 << 32], GgmlType::F32);
    assert!(matches!(e, Err(GgufError::BadShape { .. })));
    let e = w.set_tensor_data("nope", vec![]);
    assert!(matches!(e, Err(GgufError::MissingTensor(_))));
    assert!(w.set_tensor_data(&name63, vec![0; 3]).is_err());
    w.set_tensor_data(&name63, vec![1; 4]).unwrap();

    for bad in [
        Value::U32(0),
        Value::U32(3),
        Value::U32(48),
        Value::U64(32),
        Value::I32(32),
    ] {
        let e = w.set("general.alignment", bad.clone());
        assert!(matches!(e, Err(GgufError::BadAlignment(_))), "{bad:?}");
    }
    assert!(w.get("general.alignment").is_none());
    assert!(w.set("", 1u32).is_err());
    assert!(matches!(
        w.set_array("k", ValueType::Array, vec![]),
        Err(GgufError::NestedArray { .. })
    ));
    let mixed = vec![Value::U32(1), Value::I32(2)];
    assert!(matches!(
        w.set_array("k", ValueType::U32, mixed),
        Err(GgufError::WrongType { .. })
    ));

    // Setting a key again replaces its value in place; remove keeps the others' order.
    w.set("a", 1u32)
        .unwrap()
        .set("b", "two")
        .unwrap()
        .set("c", 3.0f32)
        .unwrap();
    w.set("a", 10u64).unwrap();
    let keys: Vec<&str> = w.metadata().iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["a", "b", "c"]);
    assert_eq!(w.get("a"), Some(&Value::U64(10)));
    assert_eq!(w.remove("b"), Some(Value::String("two".into())));
    assert_eq!(w.remove("b"), None);
    w.set("d", true).unwrap();
    let f = GgufFile::from_bytes(w.to_bytes().unwrap()).unwrap();
    let keys: Vec<&str> = f.metadata().iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["a", "c", "d"]);
    assert_eq!(f.get("c"), Some(&Value::F32(3.0)));
    assert_eq!(f.tensor_data(&f.tensors()[0]), &[1, 1, 1, 1]);
}

#[test]
fn empty_file_roundtrip() {
    let w = GgufWriter::new();
    let bytes = w.to_bytes().unwrap();
    assert_eq!(bytes.len(), 32, "24-byte header padded to 32");
    let f = GgufFile::from_bytes(bytes).unwrap();
    assert!(f.metadata().is_empty() && f.tensors().is_empty());
}

fn smollm2() -> GgufFile {
    let path = lethe::hub::resolve_model("smollm2").expect("SmolLM2 (lethe::hub::resolve_model)");
    GgufFile::open(path).unwrap()
}

#[test]
fn smollm2_metadata_and_some_tensors_copy_identically() {
    let src = smollm2();
    let dir = TempDir::new("smol-copy");
    let picked: Vec<&str> = [
        "token_embd.weight",
        "blk.0.attn_q.weight",
        "blk.0.attn_norm.weight",
        "output_norm.weight",
    ]
    .into_iter()
    .filter(|n| src.tensor(n).is_some())
    .collect();
    assert!(
        picked.len() >= 3,
        "SmolLM2 has the usual llama tensor names"
    );
    let mut w = GgufWriter::new();
    w.copy_metadata(&src).unwrap();
    for n in &picked {
        w.copy_tensor(&src, n).unwrap();
    }
    w.copy_tensor_as(&src, "blk.1.ffn_down.weight", "renamed.ffn_down")
        .unwrap();
    let path = dir.0.join("copy.gguf");
    w.write(&path).unwrap();

    let out = GgufFile::open(&path).unwrap();
    assert_eq!(out.metadata(), src.metadata());
    assert_eq!(out.tensors().len(), picked.len() + 1);
    for n in &picked {
        let (a, b) = (src.tensor(n).unwrap(), out.tensor(n).unwrap());
        assert_eq!((&a.shape, a.ty, a.size), (&b.shape, b.ty, b.size), "{n}");
        assert_eq!(src.tensor_data(a), out.tensor_data(b), "{n}");
    }
    let a = src.tensor("blk.1.ffn_down.weight").unwrap();
    let b = out.tensor("renamed.ffn_down").unwrap();
    assert_eq!((&a.shape, a.ty), (&b.shape, b.ty));
    assert_eq!(src.tensor_data(a), out.tensor_data(b));
    check_python(&path, &out);
}

/// The whole model through `GgufWriter::from_gguf` reproduces llama.cpp's file byte for byte.
#[test]
fn smollm2_full_copy_is_byte_identical() {
    let src = smollm2();
    let w = GgufWriter::from_gguf(&src).unwrap();
    assert_eq!(w.file_size(), src.bytes().len() as u64);
    let mut out = Vec::with_capacity(src.bytes().len());
    w.write_to(&mut out).unwrap();
    assert_eq!(src.version, 3);
    let first_diff = out.iter().zip(src.bytes()).position(|(a, b)| a != b);
    assert_eq!(first_diff, None, "first differing byte");
    assert_eq!(out.len(), src.bytes().len());
}
