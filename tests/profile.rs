//! Unlearning profiles: parsing, validation and the file checks.

mod common;

use std::path::{Path, PathBuf};

use common::model_path;
use lethe::gguf::{Array, GgufFile, GgufWriter, StrArray, Value};
use lethe::unlearn::profile::{
    check_profile, resolve_spec, AssistantKind, ModelRef, PatchKind, ProfileFile,
};
use lethe::unlearn::TermKind;
use lethe::Error;

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let d = std::env::temp_dir().join(format!("lethe-profile-{tag}-{}", std::process::id()));
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

fn parse(text: &str) -> lethe::Result<ProfileFile> {
    ProfileFile::parse(text, Path::new("/profiles/forget.toml"))
}

/// The message of a parse error, which must be an `Error::Invalid` naming the file.
fn parse_err(text: &str) -> String {
    match parse(text) {
        Err(Error::Invalid(m)) => {
            assert!(m.contains("/profiles/forget.toml"), "names the file: {m}");
            m
        }
        other => panic!("expected Error::Invalid, got {other:?}"),
    }
}

const FULL: &str = r#"
[[profile]]
name = "forget-tofu01"
base = "smollm2"
description = "TOFU forget01 removed"

[[profile.assistant]]
model = "assistant.gguf"

[[profile.assistant]]
model = "/abs/whp.gguf"
kind = "whp"
alpha = 0.5
filter = 0

[[profile.assistant]]
model = "sub/pos.gguf"
kind = "pair"
weight = -1.25
reference = "ref.gguf"
filter = 0.1

[[profile.patch]]
file = "lora.gguf"
kind = "lora"

[[profile.patch]]
file = "cv.gguf"
scale = -2.0
kind = "control_vector"

[[profile]]
name = "plain"
base = "models/base.gguf"
"#;

#[test]
fn parses_a_full_example_with_defaults() {
    let f = parse(FULL).unwrap();
    assert_eq!(f.dir, Path::new("/profiles"));
    assert_eq!(f.names().collect::<Vec<_>>(), ["forget-tofu01", "plain"]);

    let p = f.get("forget-tofu01").unwrap();
    assert_eq!(p.base, "smollm2");
    assert_eq!(p.description.as_deref(), Some("TOFU forget01 removed"));
    assert_eq!(p.assistants.len(), 3);

    let uld = &p.assistants[0];
    assert_eq!(uld.model, "assistant.gguf");
    assert_eq!(uld.kind, AssistantKind::Uld);
    assert_eq!(uld.alpha, 0.75);
    assert_eq!(uld.filter, 0.01);
    assert_eq!((uld.weight, uld.reference.as_deref()), (None, None));
    assert_eq!(p.term_weight(uld), -0.75);
    assert_eq!(TermKind::from(uld.kind), TermKind::Uld);

    let whp = &p.assistants[1];
    assert_eq!(whp.kind.term_kind(), TermKind::Whp);
    assert_eq!((whp.alpha, whp.filter), (0.5, 0.0));
    assert_eq!(p.term_weight(whp), -0.5);

    let pair = &p.assistants[2];
    assert_eq!(pair.kind.term_kind(), TermKind::Pair);
    assert_eq!(pair.weight, Some(-1.25));
    assert_eq!(pair.reference.as_deref(), Some("ref.gguf"));
    assert_eq!(pair.filter, 0.1);
    assert_eq!(p.term_weight(pair), -1.25);

    assert_eq!(p.patches.len(), 2);
    assert_eq!(p.patches[0].file, "lora.gguf");
    assert_eq!(p.patches[0].kind, Some(PatchKind::Lora));
    assert_eq!(p.patches[0].scale, 1.0);
    assert_eq!(p.patches[1].kind, Some(PatchKind::ControlVector));
    assert_eq!(p.patches[1].scale, -2.0);

    let plain = f.get("plain").unwrap();
    assert_eq!(plain.description, None);
    assert!(plain.assistants.is_empty() && plain.patches.is_empty());
    assert!(f.get("missing").is_none());

    // Paths resolve against the profile file's folder; known names stay names.
    assert_eq!(
        f.resolve("assistant.gguf"),
        ModelRef::Path("/profiles/assistant.gguf".into())
    );
    assert_eq!(
        f.resolve("sub/pos.gguf"),
        ModelRef::Path("/profiles/sub/pos.gguf".into())
    );
    assert_eq!(
        f.resolve("/abs/whp.gguf"),
        ModelRef::Path("/abs/whp.gguf".into())
    );
    assert_eq!(f.resolve("smollm2"), ModelRef::Named("smollm2".into()));
}

#[test]
fn loads_from_a_file_and_names_it_in_errors() {
    let dir = TempDir::new("load");
    let path = dir.0.join("p.toml");
    std::fs::write(&path, FULL).unwrap();
    let f = ProfileFile::load(&path).unwrap();
    assert_eq!(f.dir, dir.0);
    assert_eq!(f.profiles.len(), 2);

    std::fs::write(&path, "[[profile]]\nname = \"x\"\nbase = \n").unwrap();
    let m = ProfileFile::load(&path).unwrap_err().to_string();
    assert!(m.contains(&path.display().to_string()), "{m}");
    assert!(m.contains("line 3"), "names the TOML error location: {m}");

    let missing = dir.0.join("nope.toml");
    match ProfileFile::load(&missing) {
        Err(Error::Io { context, .. }) => assert!(context.contains("nope.toml"), "{context}"),
        other => panic!("expected Error::Io, got {other:?}"),
    }
}

#[test]
fn unknown_fields_are_errors() {
    let m = parse_err("[[profile]]\nname = \"a\"\nbase = \"b\"\nbsae = \"c\"\n");
    assert!(m.contains("unknown field") && m.contains("bsae"), "{m}");
    assert!(m.contains("line 4"), "{m}");

    let m = parse_err(
        "[[profile]]\nname = \"a\"\nbase = \"b\"\n[[profile.assistant]]\nmodel = \"m\"\nalpah = 1\n",
    );
    assert!(m.contains("unknown field") && m.contains("alpah"), "{m}");

    let m = parse_err(
        "[[profile]]\nname = \"a\"\nbase = \"b\"\n[[profile.patch]]\nfile = \"f\"\nkind = \"lora\"\nx = 1\n",
    );
    assert!(m.contains("unknown field") && m.contains('x'), "{m}");

    let m = parse_err("[[profiles]]\nname = \"a\"\nbase = \"b\"\n");
    assert!(m.contains("unknown field") && m.contains("profiles"), "{m}");

    let m = parse_err(
        "[[profile]]\nname = \"a\"\nbase = \"b\"\n[[profile.assistant]]\nmodel = \"m\"\nkind = \"ulp\"\n",
    );
    assert!(m.contains("unknown variant") && m.contains("ulp"), "{m}");
}

#[test]
fn duplicate_and_empty_names_are_errors() {
    let m = parse_err(
        "[[profile]]\nname = \"same\"\nbase = \"b\"\n[[profile]]\nname = \"other\"\nbase = \"b\"\n\
         [[profile]]\nname = \"same\"\nbase = \"c\"\n",
    );
    assert!(
        m.contains("duplicate profile name") && m.contains("\"same\""),
        "{m}"
    );

    let m = parse_err("[[profile]]\nname = \"\"\nbase = \"b\"\n");
    assert!(m.contains("empty name"), "{m}");

    let m = parse_err("[[profile]]\nname = \"a\"\nbase = \"\"\n");
    assert!(m.contains("empty base"), "{m}");

    let m = parse_err("");
    assert!(m.contains("no profiles"), "{m}");
}

fn with_assistant(fields: &str) -> String {
    format!("[[profile]]\nname = \"p\"\nbase = \"b\"\n[[profile.assistant]]\nmodel = \"m.gguf\"\n{fields}\n")
}

#[test]
fn pair_terms_need_reference_and_weight() {
    let m = parse_err(&with_assistant("kind = \"pair\"\nweight = 1.0"));
    assert!(m.contains("pair term requires reference"), "{m}");
    assert!(
        m.contains("profile \"p\"") && m.contains("assistant 0"),
        "{m}"
    );

    let m = parse_err(&with_assistant("kind = \"pair\"\nreference = \"r.gguf\""));
    assert!(m.contains("pair term requires weight"), "{m}");

    let m = parse_err(&with_assistant("kind = \"uld\"\nreference = \"r.gguf\""));
    assert!(m.contains("uld term takes no reference"), "{m}");

    let m = parse_err(&with_assistant("kind = \"whp\"\nreference = \"r.gguf\""));
    assert!(m.contains("whp term takes no reference"), "{m}");

    let m = parse_err(&with_assistant("weight = 2.0"));
    assert!(m.contains("takes alpha, not weight"), "{m}");

    // An integer weight is a number too.
    let f = parse(&with_assistant(
        "kind = \"pair\"\nweight = 2\nreference = \"r.gguf\"",
    ))
    .unwrap();
    assert_eq!(f.profiles[0].assistants[0].weight, Some(2.0));
}

#[test]
fn bad_numbers_are_errors() {
    for filter in ["1.0", "1.5", "-0.01", "nan", "inf"] {
        let m = parse_err(&with_assistant(&format!("filter = {filter}")));
        assert!(m.contains("filter must be in [0, 1)"), "{filter}: {m}");
    }
    let f = parse(&with_assistant("filter = 0.999")).unwrap();
    assert_eq!(f.profiles[0].assistants[0].filter, 0.999);

    for alpha in ["nan", "inf", "-inf"] {
        let m = parse_err(&with_assistant(&format!("alpha = {alpha}")));
        assert!(m.contains("alpha must be finite"), "{alpha}: {m}");
    }
    let m = parse_err(&with_assistant(
        "kind = \"pair\"\nweight = nan\nreference = \"r.gguf\"",
    ));
    assert!(m.contains("weight must be finite"), "{m}");

    let m = parse_err(
        "[[profile]]\nname = \"a\"\nbase = \"b\"\n[[profile.patch]]\nfile = \"f\"\nkind = \"delta\"\nscale = inf\n",
    );
    assert!(m.contains("scale must be finite"), "{m}");
}

fn smollm2() -> PathBuf {
    model_path("smollm2")
}

#[test]
fn check_passes_for_smollm2_assisting_itself() {
    let smol = smollm2();
    let dir = TempDir::new("self");
    let text = format!(
        "[[profile]]\nname = \"self\"\nbase = \"smollm2\"\n\
         [[profile.assistant]]\nmodel = {smol:?}\n\
         [[profile.assistant]]\nmodel = {smol:?}\nkind = \"pair\"\nweight = 1.0\nreference = \"smollm2\"\n"
    );
    let path = dir.0.join("p.toml");
    std::fs::write(&path, text).unwrap();
    let f = ProfileFile::load(&path).unwrap();
    let r = check_profile(&f.profiles[0], &f.dir).unwrap();
    assert_eq!(r.profile, "self");
    assert_eq!(r.n_vocab, 49152);
    let roles: Vec<&str> = r.files.iter().map(|c| c.role.as_str()).collect();
    assert_eq!(
        roles,
        [
            "base",
            "assistant 0",
            "assistant 1",
            "assistant 1 reference"
        ]
    );
    let size = std::fs::metadata(&smol).unwrap().len();
    let want = {
        use sha2::{Digest, Sha256};
        format!("{:x}", Sha256::digest(std::fs::read(&smol).unwrap()))
    };
    for c in &r.files {
        assert_eq!(c.size, size);
        assert_eq!(c.sha256, want, "{}", c.role);
        assert_eq!(
            std::fs::canonicalize(&c.path).unwrap(),
            std::fs::canonicalize(&smol).unwrap()
        );
    }
}

/// Writes a small GGUF with SmolLM2's metadata, token `index` replaced by `text`, into `path`.
fn smollm2_with_token(path: &Path, index: usize, text: &str) -> String {
    let src = GgufFile::open(smollm2()).unwrap();
    let tokens = src
        .get_array("tokenizer.ggml.tokens")
        .unwrap()
        .as_strs()
        .unwrap();
    let old = tokens.get(index).unwrap().to_string();
    let changed: StrArray = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| if i == index { text } else { t })
        .collect();
    let mut w = GgufWriter::new();
    w.copy_metadata(&src).unwrap();
    w.set(
        "tokenizer.ggml.tokens",
        Value::Array(Array::String(changed)),
    )
    .unwrap();
    for name in ["output_norm.weight", "blk.0.attn_norm.weight"] {
        w.copy_tensor(&src, name).unwrap();
    }
    w.write(path).unwrap();
    old
}

#[test]
fn a_changed_token_is_refused_with_its_index_and_texts() {
    let dir = TempDir::new("vocab");
    let old = smollm2_with_token(&dir.0.join("odd.gguf"), 1234, "<changed>");
    let smol = smollm2();
    std::fs::write(
        dir.0.join("p.toml"),
        format!(
            "[[profile]]\nname = \"odd\"\nbase = {smol:?}\n\
             [[profile.assistant]]\nmodel = \"odd.gguf\"\n"
        ),
    )
    .unwrap();
    let f = ProfileFile::load(dir.0.join("p.toml")).unwrap();
    let e = check_profile(&f.profiles[0], &f.dir).unwrap_err();
    let Error::Invalid(m) = &e else {
        panic!("expected Error::Invalid, got {e:?}")
    };
    assert!(m.contains("odd.gguf") && m.contains("assistant 0"), "{m}");
    assert!(m.contains("token 1234"), "{m}");
    assert!(m.contains("\"<changed>\""), "{m}");
    assert!(m.contains(&format!("{old:?}")), "{m}");

    // The same file as a pair reference is refused the same way.
    std::fs::write(
        dir.0.join("p.toml"),
        format!(
            "[[profile]]\nname = \"odd\"\nbase = {smol:?}\n\
             [[profile.assistant]]\nmodel = \"smollm2\"\nkind = \"pair\"\nweight = 1\nreference = \"odd.gguf\"\n"
        ),
    )
    .unwrap();
    let f = ProfileFile::load(dir.0.join("p.toml")).unwrap();
    let m = check_profile(&f.profiles[0], &f.dir)
        .unwrap_err()
        .to_string();
    assert!(
        m.contains("assistant 0 reference") && m.contains("token 1234"),
        "{m}"
    );
}

#[test]
fn gemma3_cannot_assist_smollm2() {
    let gemma = model_path("gemma3");
    let text = format!(
        "[[profile]]\nname = \"mixed\"\nbase = \"smollm2\"\n[[profile.assistant]]\nmodel = {gemma:?}\n"
    );
    let f = parse(&text).unwrap();
    let m = check_profile(&f.profiles[0], &f.dir)
        .unwrap_err()
        .to_string();
    assert!(m.contains("different vocabulary"), "{m}");
    assert!(m.contains("49152"), "names the base's size: {m}");
    let n_gemma = GgufFile::open(&gemma)
        .unwrap()
        .get_array("tokenizer.ggml.tokens")
        .unwrap()
        .len();
    assert!(m.contains(&n_gemma.to_string()), "names gemma's size: {m}");
}

#[test]
fn missing_files_are_named() {
    let dir = TempDir::new("missing");
    let text = "[[profile]]\nname = \"m\"\nbase = \"smollm2\"\n\
                [[profile.assistant]]\nmodel = \"gone.gguf\"\n";
    let f = ProfileFile::parse(text, &dir.0.join("p.toml")).unwrap();
    let m = check_profile(&f.profiles[0], &f.dir)
        .unwrap_err()
        .to_string();
    assert!(m.contains("assistant 0") && m.contains("gone.gguf"), "{m}");
    assert!(m.contains("does not exist"), "{m}");

    let text = "[[profile]]\nname = \"m\"\nbase = \"smollm2\"\n\
                [[profile.patch]]\nfile = \"lora.gguf\"\nkind = \"lora\"\n";
    let f = ProfileFile::parse(text, &dir.0.join("p.toml")).unwrap();
    let m = check_profile(&f.profiles[0], &f.dir)
        .unwrap_err()
        .to_string();
    assert!(m.contains("patch 0") && m.contains("lora.gguf"), "{m}");

    // A patch that is not a GGUF file is refused, so is a model; a LoRA for the base passes.
    std::fs::write(dir.0.join("lora.gguf"), b"not gguf").unwrap();
    assert!(check_profile(&f.profiles[0], &f.dir).is_err());
    smollm2_with_token(&dir.0.join("lora.gguf"), 0, "x");
    let m = check_profile(&f.profiles[0], &f.dir)
        .unwrap_err()
        .to_string();
    assert!(m.contains("patch 0") && m.contains("not a patch"), "{m}");
    let entry = lethe::patch::LowRankEntry {
        base: "blk.0.attn_q.weight".into(),
        cols: 576,
        rows: 576,
        rank: 1,
        a: vec![0.01; 576],
        b: vec![0.01; 576],
    };
    lethe::patch::write_lora(dir.0.join("lora.gguf"), "llama", "t", None, &[entry]).unwrap();
    let r = check_profile(&f.profiles[0], &f.dir).unwrap();
    assert_eq!(r.files.len(), 2);
    assert_eq!(r.files[1].role, "patch 0");
    assert_eq!(r.files[1].sha256.len(), 64);

    assert_eq!(
        resolve_spec(&dir.0, "lora.gguf"),
        ModelRef::Path(dir.0.join("lora.gguf"))
    );
}
