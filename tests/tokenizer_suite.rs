//! llama.cpp's own tokenizer suite: every `ggml-vocab-*.gguf` of its `models/` folder with its
//! `.inp`/`.out` pair, tokenized without BOS/EOS and without parsing special tokens, as its
//! `tests/test-tokenizer-0` does.
//!
//! The files come from the source distribution of llama-cpp-python on PyPI (which vendors
//! llama.cpp), fetched once into the cache beside the models (`~/.cache/lethe/sdist`, see
//! `lethe::hub::sdist_dir`), verified by the sha256 pinned here; only the
//! `vendor/llama.cpp/models/ggml-vocab-*` members are extracted (with `tar`), next to it.
//!
//! File format: `.inp` holds the texts, each followed by a line `__ggml_vocab_test__` (the
//! separator is "\n__ggml_vocab_test__\n"; text after the last one is a last case); `.out` holds
//! one line per text, its ids separated by spaces (an empty line: no tokens).
//!
//! Besides the ids, the expected ids of each case must detokenize to its text, where the text has
//! nothing llama.cpp's clean-up of spaces would change.
//!
//! Each vocabulary gets one line on stderr (written past the test harness's capture, so it shows
//! on success too): its name and cases passed/total, or why it has none.

use lethe::gguf::GgufFile;
use lethe::hub::{self, Sdist};
use lethe::tokenizer::Tokenizer;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

const SDIST: Sdist = Sdist {
    package: "llama-cpp-python",
    version: "0.3.36",
    sha256: "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
};

/// The folder of the vocabularies inside the archive, below its top-level directory.
const MODELS: &str = "vendor/llama.cpp/models/";
const PREFIX: &str = "ggml-vocab-";

/// Vocabularies lethe refuses, with the tokenizer model (`tokenizer.ggml.model`) the refusal
/// must name: they are no generative models' tokenizers.
const REFUSED: &[(&str, &str)] = &[("bert-bge", "bert"), ("nomic-bert-moe", "t5")];

/// What llama.cpp's detokenizer changes in vocabularies that clean up spaces: a space before
/// `?!.,` and before an apostrophe goes.
const CLEANED: &[&str] = &[" ?", " !", " .", " ,", " '"];

/// One line on stderr, shown whether the test passes or fails.
fn report(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
}

/// The extracted `ggml-vocab-*` files: `<sdist dir>/<package>-<version>-vocab/`, made once.
fn vocab_dir() -> PathBuf {
    let root = hub::sdist_dir().unwrap_or_else(|e| panic!("{e}"));
    let dir = root.join(format!("{}-{}-vocab", SDIST.package, SDIST.version));
    if dir.is_dir() {
        return dir;
    }
    let archive = hub::resolve_sdist(&SDIST, &root).unwrap_or_else(|e| panic!("{e}"));
    let tar = |args: &[&std::ffi::OsStr]| {
        let out = Command::new("tar")
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run tar: {e}"));
        assert!(
            out.status.success(),
            "tar {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let listing = tar(&["-tzf".as_ref(), archive.as_os_str()]);
    // "<top>/vendor/llama.cpp/models/ggml-vocab-*", files directly in that folder.
    let members: Vec<&str> = listing
        .lines()
        .filter(|m| {
            m.split_once('/')
                .and_then(|(_, rest)| rest.strip_prefix(MODELS))
                .is_some_and(|name| name.starts_with(PREFIX) && !name.contains('/'))
        })
        .collect();
    assert!(
        !members.is_empty(),
        "no {MODELS}{PREFIX}* in {}",
        archive.display()
    );
    let top = members[0].split('/').next().unwrap_or_default();
    // Extract beside the destination, then move the folder into place in one step, so a
    // folder at `dir` is always complete.
    let work = root.join(format!(".vocab-{}", std::process::id()));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).unwrap();
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "-xzf".as_ref(),
        archive.as_os_str(),
        "-C".as_ref(),
        work.as_os_str(),
    ];
    args.extend(members.iter().map(std::ffi::OsStr::new));
    tar(&args);
    let extracted = work.join(top).join(MODELS);
    if let Err(e) = fs::rename(&extracted, &dir) {
        // Another process may have put its copy in place first.
        assert!(
            dir.is_dir(),
            "moving {} to {}: {e}",
            extracted.display(),
            dir.display()
        );
    }
    let _ = fs::remove_dir_all(&work);
    dir
}

/// The cases of `<vocab>.inp` / `.out`, as llama.cpp's test reads them.
fn read_cases(inp: &Path, out: &Path) -> Vec<(String, Vec<u32>)> {
    let raw = fs::read_to_string(inp).unwrap_or_else(|e| panic!("{}: {e}", inp.display()));
    let ids = fs::read_to_string(out).unwrap_or_else(|e| panic!("{}: {e}", out.display()));
    const SEP: &str = "\n__ggml_vocab_test__\n";
    let mut texts = Vec::new();
    let mut rest = raw.as_str();
    while !rest.is_empty() {
        match rest.split_once(SEP) {
            Some((text, tail)) => {
                texts.push(text.to_string());
                rest = tail;
            }
            None => {
                texts.push(rest.to_string());
                break;
            }
        }
    }
    let lines: Vec<Vec<u32>> = ids
        .lines()
        .map(|l| {
            l.split_whitespace()
                .map(|t| {
                    t.parse()
                        .unwrap_or_else(|e| panic!("{}: id {t:?}: {e}", out.display()))
                })
                .collect()
        })
        .collect();
    assert_eq!(
        texts.len(),
        lines.len(),
        "{} and {} hold different numbers of cases",
        inp.display(),
        out.display()
    );
    texts.into_iter().zip(lines).collect()
}

/// The vocabulary files in `dir` (sorted), each with its name (`ggml-vocab-<name>.gguf`).
fn vocabularies(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut v: Vec<(String, PathBuf)> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?;
            let name = name
                .strip_prefix(PREFIX)?
                .strip_suffix(".gguf")?
                .to_string();
            Some((name, p))
        })
        .collect();
    v.sort();
    v
}

fn load(path: &Path) -> lethe::Result<Tokenizer> {
    let f = GgufFile::open(path)?;
    Tokenizer::from_gguf(&f)
}

fn with_ext(path: &Path, ext: &str) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(ext);
    PathBuf::from(s)
}

#[test]
fn llama_cpp_vocab_suite() {
    let dir = vocab_dir();
    let vocabs = vocabularies(&dir);
    assert!(!vocabs.is_empty(), "no vocabularies in {}", dir.display());
    let mut failures = Vec::new();
    let (mut n_cases, mut n_vocabs) = (0, 0);
    for (name, path) in &vocabs {
        let (inp, out) = (with_ext(path, ".inp"), with_ext(path, ".out"));
        let cases = if inp.is_file() && out.is_file() {
            Some(read_cases(&inp, &out))
        } else {
            None
        };
        let refused = REFUSED.iter().find(|(v, _)| v == name).map(|&(_, m)| m);
        let tok = match (load(path), refused) {
            (Ok(tok), None) => tok,
            (Ok(_), Some(model)) => {
                failures.push(format!(
                    "{name}: loads, but lethe has no {model:?} tokenizer"
                ));
                continue;
            }
            (Err(e), Some(model)) => {
                let msg = e.to_string();
                let clear = msg.contains(&format!("unsupported tokenizer model {model:?}"))
                    && msg.contains("tokenizer.ggml.model");
                if !clear {
                    failures.push(format!("{name}: refused, but unclearly: {msg}"));
                }
                report(&format!("{name:16} refused: {msg}"));
                continue;
            }
            (Err(e), None) => {
                failures.push(format!("{name}: does not load: {e}"));
                continue;
            }
        };
        let Some(cases) = cases else {
            report(&format!("{name:16} loads (no cases)"));
            continue;
        };
        let (mut passed, mut decoded, mut n_decoded) = (0, 0, 0);
        for (i, (text, want)) in cases.iter().enumerate() {
            let got = tok.encode(text, false, false);
            if &got == want {
                passed += 1;
            } else {
                failures.push(format!(
                    "{name} case {i} {text:?}:\n  expected {want:?}\n  got      {got:?}"
                ));
            }
            // The expected ids detokenize to the text, where no clean-up of spaces applies.
            if !CLEANED.iter().any(|c| text.contains(c)) {
                n_decoded += 1;
                let back = tok.decode(want, false);
                if &back == text {
                    decoded += 1;
                } else {
                    failures.push(format!(
                        "{name} case {i}: the expected ids detokenize to {back:?}, not {text:?}"
                    ));
                }
            }
        }
        n_cases += cases.len();
        n_vocabs += 1;
        report(&format!(
            "{name:16} {passed}/{} cases, {decoded}/{n_decoded} detokenized",
            cases.len()
        ));
    }
    report(&format!(
        "{n_vocabs} vocabularies, {n_cases} cases, {} failures",
        failures.len()
    ));
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
