//! Building a [`Tokenizer`] from a model file's `tokenizer.ggml.*` metadata, as llama.cpp's
//! `llama_vocab::load` does: the vocabulary, the tokenizer model's defaults, the file's own
//! settings over them, then the special tokens.

use super::special::{SpecialIds, SpecialTokens};
use super::vocab::Vocab;
use super::{attr, bpe, pretok, Model, Tokenizer};
use crate::gguf::{Array, GgufFile, StrArray, Value};
use crate::{Error, Result};

fn terr(m: String) -> Error {
    Error::Tokenizer(m)
}

/// The vocabulary as the file stores it: `tokenizer.ggml.tokens`, `.scores`, `.token_type`.
struct FileVocab {
    vocab: Vocab,
    /// Empty where the file has no scores (all 0).
    scores: Vec<f32>,
    /// llama.cpp's attribute bits of each token (see [`attr`]).
    attrs: Vec<u16>,
}

/// What the tokenizer model (`tokenizer.ggml.model`) implies before the file's own settings.
struct ModelDefaults {
    model: Model,
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
    clean_spaces: bool,
}

fn read_vocab(f: &GgufFile) -> Result<FileVocab> {
    let tok_values = f
        .get_array("tokenizer.ggml.tokens")
        .map_err(|e| terr(format!("token list: {e}")))?;
    let n = tok_values.len();
    if n == 0 {
        return Err(terr("empty vocabulary (tokenizer.ggml.tokens)".into()));
    }
    if n >= u32::MAX as usize {
        return Err(terr(format!("vocabulary of {n} tokens is too large")));
    }
    let strs = tok_values
        .as_strs()
        .ok_or_else(|| terr("tokenizer.ggml.tokens[0] is not a string".into()))?;
    let mut tokens = StrArray::with_capacity(n, strs.total_bytes());
    for (i, s) in strs.iter().enumerate() {
        if s.is_empty() {
            tokens.push(&format!("[EMPTY_{i}]"));
        } else {
            tokens.push(s);
        }
    }
    let scores: Vec<f32> = match f.get("tokenizer.ggml.scores") {
        None => Vec::new(),
        Some(v) => {
            let a = v
                .as_array()
                .ok_or_else(|| terr("tokenizer.ggml.scores is not an array".into()))?;
            if a.len() < n {
                return Err(terr(format!("{} scores for {n} tokens", a.len())));
            }
            match a.as_f32s() {
                Some(x) => x[..n].to_vec(),
                None => (0..n).map(|i| a.f64_at(i).unwrap_or(0.0) as f32).collect(),
            }
        }
    };
    let attrs: Vec<u16> = match f.get("tokenizer.ggml.token_type") {
        None => vec![attr::NORMAL; n],
        Some(v) => {
            let a = v
                .as_array()
                .ok_or_else(|| terr("tokenizer.ggml.token_type is not an array".into()))?;
            if a.len() < n {
                return Err(terr(format!("{} token types for {n} tokens", a.len())));
            }
            (0..n)
                .map(|i| match a.i64_at(i) {
                    Some(1) => attr::NORMAL,
                    Some(2) => attr::UNKNOWN,
                    Some(3) => attr::CONTROL,
                    Some(4) => attr::USER_DEFINED,
                    Some(5) => attr::UNUSED,
                    Some(6) => attr::BYTE,
                    _ => 0,
                })
                .collect()
        }
    };
    Ok(FileVocab {
        vocab: Vocab::new(tokens),
        scores,
        attrs,
    })
}

/// The defaults of tokenizer model `name`; for BPE, its pre-tokenizer and merges.
fn model_defaults(
    f: &GgufFile,
    name: &str,
    vocab: &Vocab,
    warnings: &mut Vec<String>,
) -> Result<ModelDefaults> {
    match name {
        "llama" => Ok(ModelDefaults {
            model: Model::Spm,
            bos: Some(1),
            eos: Some(2),
            unk: Some(0),
            add_bos: true,
            add_eos: false,
            add_space_prefix: true,
            clean_spaces: false,
        }),
        "gpt2" => {
            let pre = f
                .get("tokenizer.ggml.pre")
                .and_then(|v| v.as_str())
                .unwrap_or("");
            let pre = if pre.is_empty() {
                warnings.push(
                    "missing pre-tokenizer type (tokenizer.ggml.pre), using 'default'".into(),
                );
                "default"
            } else {
                pre
            };
            bpe_defaults(f, pre, vocab, Some(11))
        }
        // BPE over raw UTF-8 with SentencePiece's escaped spaces and byte tokens; the model
        // implies its pre-tokenizer, whatever tokenizer.ggml.pre says, and no default special
        // tokens.
        "gemma4" => bpe_defaults(f, "gemma4", vocab, None),
        other => {
            let what = match other {
                "bert" => " (WordPiece)",
                "t5" => " (Unigram)",
                "rwkv" => " (RWKV)",
                "plamo2" => " (PLaMo-2)",
                _ => "",
            };
            Err(terr(format!(
                "unsupported tokenizer model {other:?}{what} (tokenizer.ggml.model); lethe reads \
                 \"llama\" (SentencePiece), \"gpt2\" (byte-level BPE) and \"gemma4\" (BPE over \
                 UTF-8)"
            )))
        }
    }
}

/// The defaults of a BPE model with pre-tokenizer `pre`, its merges read from the file;
/// `special` is the default BOS and EOS id (no default BOS where the pre-tokenizer says so).
fn bpe_defaults(
    f: &GgufFile,
    pre: &str,
    vocab: &Vocab,
    special: Option<u32>,
) -> Result<ModelDefaults> {
    let pt = pretok::PreTokenizer::new(pre)?;
    let merges = f
        .get_array("tokenizer.ggml.merges")
        .map_err(|e| terr(format!("tokenizer merges: {e}")))?;
    let (clean_spaces, add_bos) = (pt.clean_spaces, pt.add_bos);
    let bos = special.filter(|_| !pt.no_default_bos);
    let b = match merges {
        Array::String(m) => bpe::Bpe::new(pt, m, vocab)?,
        // Merges that are no strings split as empty ones do.
        other => bpe::Bpe::new(pt, &(0..other.len()).map(|_| "").collect(), vocab)?,
    };
    Ok(ModelDefaults {
        model: Model::Bpe(Box::new(b)),
        bos,
        eos: special,
        unk: None,
        add_bos,
        add_eos: false,
        add_space_prefix: false,
        clean_spaces,
    })
}

fn meta_bool(f: &GgufFile, key: &str) -> Option<bool> {
    match f.get(key)? {
        Value::Bool(b) => Some(*b),
        v => v.as_i64().map(|x| x != 0),
    }
}

/// The special token ids the file names over `ids`; an id outside the vocabulary is left out,
/// with a warning.
fn read_special_ids(
    f: &GgufFile,
    n_vocab: usize,
    ids: &mut SpecialIds,
    warnings: &mut Vec<String>,
) {
    for (key, slot) in [
        ("tokenizer.ggml.bos_token_id", &mut ids.bos),
        ("tokenizer.ggml.eos_token_id", &mut ids.eos),
        ("tokenizer.ggml.eot_token_id", &mut ids.eot),
        ("tokenizer.ggml.eom_token_id", &mut ids.eom),
        ("tokenizer.ggml.unknown_token_id", &mut ids.unk),
        ("tokenizer.ggml.fim_pad_token_id", &mut ids.fim_pad),
        ("tokenizer.ggml.fim_rep_token_id", &mut ids.fim_rep),
        ("tokenizer.ggml.fim_sep_token_id", &mut ids.fim_sep),
    ] {
        let Some(v) = f.get(key).and_then(Value::as_i64) else {
            continue;
        };
        if v >= 0 && (v as u64) < n_vocab as u64 {
            *slot = Some(v as u32);
        } else {
            warnings.push(format!(
                "bad special token {key} = {v} (vocabulary has {n_vocab}), using the default"
            ));
        }
    }
}

impl Tokenizer {
    /// Build the tokenizer from a model file's `tokenizer.ggml.*` metadata. What the file gets
    /// wrong but llama.cpp tolerates (a missing pre-tokenizer type, a special token id outside
    /// the vocabulary) is in [`Tokenizer::warnings`].
    pub fn from_gguf(f: &GgufFile) -> Result<Self> {
        let mut warnings = Vec::new();
        let model_name = f
            .get_str("tokenizer.ggml.model")
            .map_err(|e| terr(format!("tokenizer.ggml.model: {e}")))?;
        let FileVocab {
            vocab,
            scores,
            mut attrs,
        } = read_vocab(f)?;
        let n = vocab.len();
        let d = model_defaults(f, model_name, &vocab, &mut warnings)?;
        // Defaults out of range are disabled.
        let in_range = |id: Option<u32>| id.filter(|&x| (x as usize) < n);
        let mut ids = SpecialIds {
            bos: in_range(d.bos),
            eos: in_range(d.eos),
            unk: in_range(d.unk),
            ..SpecialIds::default()
        };
        let add_space_prefix =
            meta_bool(f, "tokenizer.ggml.add_space_prefix").unwrap_or(d.add_space_prefix);
        read_special_ids(f, n, &mut ids, &mut warnings);
        let mut add_bos = meta_bool(f, "tokenizer.ggml.add_bos_token").unwrap_or(d.add_bos);
        if !add_bos && matches!(&d.model, Model::Bpe(b) if b.pre.force_add_bos) {
            warnings.push(format!(
                "tokenizer.ggml.add_bos_token is false; {model_name} tokenizers add BOS, using true"
            ));
            add_bos = true;
        }
        let add_eos = meta_bool(f, "tokenizer.ggml.add_eos_token").unwrap_or(d.add_eos);

        let eog = ids.detect(&vocab, &mut attrs);
        let special = SpecialTokens::new(&vocab, &attrs);
        let mut byte_tokens = Box::new([None; 256]);
        for (b, slot) in byte_tokens.iter_mut().enumerate() {
            *slot = vocab.get(&format!("<0x{b:02X}>"));
        }
        let chat_template = f
            .get("tokenizer.chat_template")
            .and_then(|v| v.as_str())
            .map(str::to_string);

        Ok(Self {
            model: d.model,
            vocab,
            scores,
            attrs,
            byte_tokens,
            bos: ids.bos,
            eos: ids.eos,
            eot: ids.eot,
            unk: ids.unk,
            eog,
            add_bos,
            add_eos,
            add_space_prefix,
            clean_spaces: d.clean_spaces,
            special,
            chat_template,
            warnings,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::GgufWriter;

    fn file(model: &str, tokens: &[&str], extra: &[(&str, Value)]) -> GgufFile {
        let mut w = GgufWriter::new();
        w.set("tokenizer.ggml.model", model).unwrap();
        let tokens: Vec<String> = tokens.iter().map(|t| t.to_string()).collect();
        w.set("tokenizer.ggml.tokens", tokens).unwrap();
        for (k, v) in extra {
            w.set(*k, v.clone()).unwrap();
        }
        GgufFile::from_bytes(w.to_bytes().unwrap()).unwrap()
    }

    #[test]
    fn a_sound_file_loads_without_warnings() {
        let f = file(
            "llama",
            &["<unk>", "<s>", "</s>", "\u{2581}a"],
            &[("tokenizer.ggml.eos_token_id", Value::U32(2))],
        );
        let t = Tokenizer::from_gguf(&f).unwrap();
        assert!(t.warnings().is_empty(), "{:?}", t.warnings());
        assert_eq!((t.bos(), t.eos(), t.unk()), (Some(1), Some(2), Some(0)));
        assert_eq!(t.encode("a", true, false), [1, 3]);
    }

    #[test]
    fn gemma4_is_bpe_over_utf8_with_escaped_spaces() {
        let tokens = [
            "<pad>",
            "<eos>",
            "<bos>",
            "<unk>",
            "a",
            "b",
            "\u{2581}",
            "\u{2581}a",
            "<0xC3>",
            "<0xA9>",
            "ab",
            ",",
        ];
        // normal 1, unknown 2, control 3, byte 6
        let types: Vec<i32> = vec![3, 3, 3, 2, 1, 1, 1, 1, 6, 6, 1, 1];
        let merges: Vec<String> = ["\u{2581} a", "a b"]
            .iter()
            .map(|m| m.to_string())
            .collect();
        let f = file(
            "gemma4",
            &tokens,
            &[
                ("tokenizer.ggml.token_type", types.into()),
                ("tokenizer.ggml.merges", merges.into()),
                // The model implies its pre-tokenizer, whatever the file says.
                ("tokenizer.ggml.pre", Value::from("llama-bpe")),
                ("tokenizer.ggml.bos_token_id", Value::U32(2)),
                ("tokenizer.ggml.eos_token_id", Value::U32(1)),
                ("tokenizer.ggml.unknown_token_id", Value::U32(3)),
                ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
            ],
        );
        let t = Tokenizer::from_gguf(&f).unwrap();
        assert_eq!(t.vocab_type(), super::super::VocabType::Bpe);
        assert_eq!(t.pre_type(), Some("gemma4"));
        // BOS is added whatever the file says, with a warning.
        assert!(t.add_bos());
        assert_eq!(t.warnings().len(), 1, "{:?}", t.warnings());
        assert!(t.warnings()[0].contains("add_bos_token"));
        // "a\u{2581}ab\u{2581}\u{e9}": "\u{2581}a" merges first, so "ab" never forms; the
        // "\u{e9}" is no token and goes as its two byte tokens.
        let ids = t.encode("a ab \u{e9}", true, false);
        assert_eq!(ids, [2, 4, 7, 5, 6, 8, 9]);
        assert_eq!(t.encode("ab", false, false), [10]);
        // Decoding: U+2581 is a space again, byte tokens their bytes, BOS only with special.
        assert_eq!(t.decode(&ids, false), "a ab \u{e9}");
        assert_eq!(t.decode(&ids, true), "<bos>a ab \u{e9}");
        assert_eq!(t.token_to_piece(7, false), b" a");
        assert_eq!(t.token_to_piece(8, false), [0xC3]);
        // llama.cpp's clean-up of spaces applies to gemma4 as to other BPE vocabularies.
        let comma = t.encode("a ,", false, false);
        assert_eq!(t.decode(&comma, false), "a,");
    }

    #[test]
    fn what_loading_tolerates_is_in_the_warnings() {
        let f = file(
            "gpt2",
            &["a", "b", "ab"],
            &[
                ("tokenizer.ggml.merges", vec!["a b".to_string()].into()),
                ("tokenizer.ggml.bos_token_id", Value::U32(99)),
                ("tokenizer.ggml.eos_token_id", Value::I32(-1)),
            ],
        );
        let t = Tokenizer::from_gguf(&f).unwrap();
        assert_eq!(
            t.warnings(),
            [
                "missing pre-tokenizer type (tokenizer.ggml.pre), using 'default'",
                "bad special token tokenizer.ggml.bos_token_id = 99 (vocabulary has 3), using the \
                 default",
                "bad special token tokenizer.ggml.eos_token_id = -1 (vocabulary has 3), using the \
                 default",
            ]
        );
        assert_eq!(t.pre_type(), Some("default"));
        // The defaults (11) are outside this vocabulary: no BOS, no EOS.
        assert_eq!((t.bos(), t.eos()), (None, None));
        assert_eq!(t.encode("ab", false, false), [2]);
    }
}
