//! Tokenizer parity with llama.cpp on the two reference models (tests/fixtures/goldens/).

use lethe::gguf::GgufFile;
use lethe::tokenizer::{StreamDecoder, Tokenizer};
use std::path::PathBuf;
use std::sync::OnceLock;

const MODELS: [&str; 2] = ["smollm2", "gemma3"];

fn goldens(model: &str) -> serde_json::Value {
    let file = match model {
        "smollm2" => "smollm2-135m-instruct-q4_1.json",
        _ => "gemma3-270m-q4_k_m.json",
    };
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/goldens")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("golden json")
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("id array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn tokenizer(model: &str) -> &'static Tokenizer {
    static SMOL: OnceLock<Tokenizer> = OnceLock::new();
    static GEMMA: OnceLock<Tokenizer> = OnceLock::new();
    let cell = if model == "smollm2" { &SMOL } else { &GEMMA };
    cell.get_or_init(|| {
        let path = lethe::hub::resolve_model(model).expect("model path");
        let f = GgufFile::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Tokenizer::from_gguf(&f).expect("tokenizer")
    })
}

#[test]
fn tokenize_matches_llama_cpp() {
    for model in MODELS {
        let tok = tokenizer(model);
        let g = goldens(model);
        let entries = g["tokenize"].as_array().expect("tokenize list");
        assert!(!entries.is_empty());
        let mut bad = Vec::new();
        for e in entries {
            let text = e["text"].as_str().unwrap();
            let got = tok.encode(text, false, true);
            let want = ids(&e["ids_no_bos"]);
            if got != want {
                bad.push(format!(
                    "{model} no_bos {text:?}:\n  got  {got:?}\n  want {want:?}"
                ));
            }
            let got = tok.encode(text, true, true);
            let want = ids(&e["ids_default"]);
            if got != want {
                bad.push(format!(
                    "{model} default {text:?}:\n  got  {got:?}\n  want {want:?}"
                ));
            }
        }
        assert!(
            bad.is_empty(),
            "{} mismatches:\n{}",
            bad.len(),
            bad.join("\n")
        );
    }
}

#[test]
fn greedy_prompts_retokenize() {
    for model in MODELS {
        let tok = tokenizer(model);
        let g = goldens(model);
        for e in g["greedy"].as_array().expect("greedy list") {
            let prompt = e["prompt"].as_str().unwrap();
            assert_eq!(
                tok.encode(prompt, true, true),
                ids(&e["prompt_ids"]),
                "{model} {prompt:?}"
            );
        }
    }
}

#[test]
fn greedy_outputs_detokenize() {
    // The generated ids decode to the generated text (an EOS at the end renders as nothing).
    for model in MODELS {
        let tok = tokenizer(model);
        let g = goldens(model);
        for e in g["greedy"].as_array().expect("greedy list") {
            let out = ids(&e["ids"]);
            let content = e["content"].as_str().unwrap();
            assert_eq!(tok.decode(&out, false), content, "{model}");
            let mut sd = StreamDecoder::new();
            let mut streamed = String::new();
            for &id in &out {
                streamed.push_str(&sd.push(tok, id));
            }
            streamed.push_str(&sd.flush());
            assert_eq!(streamed, content, "{model} streamed");
        }
    }
}

#[test]
fn decode_round_trips() {
    for model in MODELS {
        let tok = tokenizer(model);
        let g = goldens(model);
        for e in g["tokenize"].as_array().unwrap() {
            let text = e["text"].as_str().unwrap();
            // Special tokens in the text render only with special = true.
            let special = text.contains("<|im_start|>");
            assert_eq!(
                tok.decode(&tok.encode(text, false, true), special),
                text,
                "{model}"
            );
            let with_bos = tok.encode(text, true, true);
            let body = if tok.add_bos() {
                &with_bos[1..]
            } else {
                &with_bos[..]
            };
            assert_eq!(tok.decode(body, special), text, "{model}");
            if !special {
                // The BOS gemma3 adds is a control token: it renders as nothing.
                assert_eq!(tok.decode(&with_bos, false), text, "{model}");
            }
        }
    }
}

#[test]
fn stream_decoder_matches_decode() {
    let texts = [
        "Emoji: 😀🚀🔥 done",
        "日本語のテキストです。",
        "中文测试：机器遗忘。",
        "Ünïcödé: ß, ø, å, æ, œ",
        "👩‍👩‍👧‍👦 family, 🇫🇷 flag, 𝔘𝔫𝔦 math",
        "mixed\t\ttabs  and 🙂\n\nnewlines",
    ];
    for model in MODELS {
        let tok = tokenizer(model);
        for text in texts {
            let ids = tok.encode(text, false, false);
            let mut sd = StreamDecoder::new();
            let mut out = String::new();
            let mut pieces = 0;
            for &id in &ids {
                let s = sd.push(tok, id);
                pieces += usize::from(!s.is_empty());
                out.push_str(&s);
            }
            out.push_str(&sd.flush());
            assert_eq!(out, tok.decode(&ids, false), "{model} {text:?}");
            assert_eq!(out, text, "{model} {text:?}");
            assert!(pieces > 0);
        }
    }
}

#[test]
fn emoji_split_across_tokens_is_held() {
    // SmolLM2 spells 😀 with several byte-level tokens: nothing comes out before the last one.
    let tok = tokenizer("smollm2");
    let ids = tok.encode("😀", false, false);
    assert!(ids.len() > 1, "{ids:?}");
    let mut sd = StreamDecoder::new();
    for &id in &ids[..ids.len() - 1] {
        assert_eq!(sd.push(tok, id), "");
    }
    assert_eq!(sd.push(tok, ids[ids.len() - 1]), "😀");
    assert_eq!(sd.flush(), "");
}

#[test]
fn special_tokens_and_metadata() {
    let smol = tokenizer("smollm2");
    assert_eq!(smol.n_vocab(), 49152);
    assert_eq!(
        (smol.bos(), smol.eos(), smol.add_bos()),
        (Some(1), Some(2), false)
    );
    assert!(smol.is_eog(2) && smol.is_eog(0) && !smol.is_eog(1) && !smol.is_eog(504));
    assert_eq!(smol.token_id("<|im_end|>"), Some(2));
    assert_eq!(smol.token_str(1), "<|im_start|>");
    assert_eq!(smol.token_to_piece(1, false), b"");
    assert_eq!(smol.token_to_piece(1, true), b"<|im_start|>");
    assert!(smol.chat_template().is_some());
    assert_eq!(smol.tokens().len(), 49152);
    // Without parse_special the markers are plain text.
    let plain = smol.encode("<|im_start|>", false, false);
    assert!(plain.len() > 1 && !plain.contains(&1));

    let gemma = tokenizer("gemma3");
    assert_eq!(gemma.n_vocab(), 262144);
    assert_eq!(
        (gemma.bos(), gemma.eos(), gemma.add_bos()),
        (Some(2), Some(1), true)
    );
    let eot = gemma.token_id("<end_of_turn>").unwrap();
    assert!(gemma.is_eog(eot) && gemma.is_eog(1) && !gemma.is_eog(2));
    assert!(gemma.chat_template().is_none());
    assert_eq!(gemma.encode("", true, true), [2]);
    assert_eq!(gemma.encode("", false, true), Vec::<u32>::new());
    // Byte fallback: a private-use character gemma has no token for.
    let ids = gemma.encode("\u{F8FF}", false, false);
    assert_eq!(gemma.decode(&ids, false), "\u{F8FF}");
    // Out-of-range ids never panic.
    assert_eq!(gemma.token_str(u32::MAX), "");
    assert_eq!(gemma.decode(&[u32::MAX, 9259], false), "Hello");
}

#[test]
fn odd_inputs_do_not_panic() {
    // ~480 KB in release, a tenth of it in (slow) debug builds.
    let reps = if cfg!(debug_assertions) {
        2_000
    } else {
        20_000
    };
    let mut huge = "lorem ipsum dolor 123 ✓ ".repeat(reps);
    huge.push_str(&" ".repeat(10_000));
    huge.push_str(&"\n".repeat(5_000));
    let inputs = [
        String::new(),
        " ".into(),
        "\u{0}\u{1}\u{7f}\u{80}\u{9f}".into(),
        "\u{FFFD}\u{FEFF}\u{200B}\u{10FFFF}".into(),
        "<|im_start|><|im_start|><end_of_turn><start_of_turn>".into(),
        "<|im_start".into(),
        "'''''''' 's 't".into(),
        "\r\r\n\n\t \u{3000}".into(),
        huge,
    ];
    for model in MODELS {
        let tok = tokenizer(model);
        for text in &inputs {
            for (a, p) in [(false, false), (true, true), (true, false)] {
                let ids = tok.encode(text, a, p);
                let _ = tok.decode(&ids, p);
            }
        }
        assert_eq!(
            tok.decode(&tok.encode(&inputs[8], false, false), false),
            inputs[8],
            "{model} huge"
        );
    }
}
