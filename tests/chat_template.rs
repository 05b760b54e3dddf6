//! Chat templates: the models' own Jinja templates, the built-in fallbacks, and the golden
//! prompts (tests/fixtures/goldens/).

use lethe::gguf::GgufFile;
use lethe::tokenizer::{apply_chat_template, ChatMessage, Tokenizer};
use lethe::Error;
use std::path::PathBuf;
use std::sync::OnceLock;

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

fn goldens(file: &str) -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/goldens")
        .join(file);
    serde_json::from_str(&std::fs::read_to_string(&path).expect("golden file"))
        .expect("golden json")
}

fn msg(role: &str, content: &str) -> ChatMessage {
    ChatMessage {
        role: role.into(),
        content: content.into(),
    }
}

/// The user text of a one-turn golden prompt in either format.
fn user_text(prompt: &str, start: &str, end: &str) -> Option<String> {
    let rest = prompt.strip_prefix(start)?;
    let (text, _) = rest.split_once(end)?;
    Some(text.to_string())
}

#[test]
fn smollm2_own_template() {
    let tok = tokenizer("smollm2");
    let msgs = [
        msg("system", "You are terse."),
        msg("user", "What is unlearning?"),
    ];
    let out = apply_chat_template(tok, "llama", None, &msgs, true).unwrap();
    assert_eq!(
        out,
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is unlearning?<|im_end|>\n<|im_start|>assistant\n"
    );
    // Without a system message the template adds its own.
    let out = apply_chat_template(tok, "llama", None, &msgs[1..], false).unwrap();
    assert_eq!(
        out,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nWhat is unlearning?<|im_end|>\n"
    );
}

#[test]
fn gemma_fallback() {
    let tok = tokenizer("gemma3");
    assert!(tok.chat_template().is_none());
    let msgs = [
        msg("system", "Answer in one word."),
        msg("user", "Capital of France?"),
        msg("assistant", "Paris"),
        msg("user", "And of Italy?"),
    ];
    let out = apply_chat_template(tok, "gemma3", None, &msgs, true).unwrap();
    assert_eq!(
        out,
        "<start_of_turn>user\nAnswer in one word.\n\nCapital of France?<end_of_turn>\n\
         <start_of_turn>model\nParis<end_of_turn>\n\
         <start_of_turn>user\nAnd of Italy?<end_of_turn>\n\
         <start_of_turn>model\n"
    );
    // Other architectures without a template get ChatML.
    let out = apply_chat_template(tok, "llama", None, &msgs[1..2], true).unwrap();
    assert_eq!(
        out,
        "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn golden_prompts_from_templates() {
    // SmolLM2's goldens are plain ChatML user turns (no system turn): the built-in "chatml".
    let smol = tokenizer("smollm2");
    let g = goldens("smollm2-135m-instruct-q4_1.json");
    let mut n = 0;
    for e in g["greedy"].as_array().unwrap() {
        let prompt = e["prompt"].as_str().unwrap();
        if let Some(user) = user_text(prompt, "<|im_start|>user\n", "<|im_end|>") {
            let out =
                apply_chat_template(smol, "llama", Some("chatml"), &[msg("user", &user)], true)
                    .unwrap();
            assert_eq!(out, prompt);
            let ids: Vec<u32> = e["prompt_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(smol.encode(&out, true, true), ids);
            n += 1;
        }
    }
    assert_eq!(n, 2);

    // gemma3's chat golden is the built-in gemma format; BOS comes from tokenizing.
    let gemma = tokenizer("gemma3");
    let g = goldens("gemma3-270m-q4_k_m.json");
    let mut n = 0;
    for e in g["greedy"].as_array().unwrap() {
        let prompt = e["prompt"].as_str().unwrap();
        if let Some(user) = user_text(prompt, "<start_of_turn>user\n", "<end_of_turn>") {
            let out =
                apply_chat_template(gemma, "gemma3", None, &[msg("user", &user)], true).unwrap();
            assert_eq!(out, prompt);
            let ids: Vec<u32> = e["prompt_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(gemma.encode(&out, true, true), ids);
            n += 1;
        }
    }
    assert_eq!(n, 1);
}

#[test]
fn raise_exception_is_a_template_error() {
    let tok = tokenizer("smollm2");
    let tmpl = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with a user turn') }}{% endif %}ok";
    let err =
        apply_chat_template(tok, "llama", Some(tmpl), &[msg("assistant", "hi")], true).unwrap_err();
    match err {
        Error::Template(m) => assert!(
            m.contains("Conversation must start with a user turn"),
            "{m}"
        ),
        other => panic!("expected a template error, got {other:?}"),
    }
    assert_eq!(
        apply_chat_template(tok, "llama", Some(tmpl), &[msg("user", "hi")], true).unwrap(),
        "ok"
    );
    // Syntax errors are template errors too.
    let err = apply_chat_template(tok, "llama", Some("{% for %}"), &[], true).unwrap_err();
    assert!(matches!(err, Error::Template(_)));
}

#[test]
fn hf_jinja_behaviour() {
    let tok = tokenizer("gemma3");
    // Python string methods, bos_token, trim_blocks + lstrip_blocks, add_generation_prompt.
    let tmpl = "{{ bos_token }}\n\
        {% for m in messages %}\n\
            {% if m.content.strip().startswith('/') %}\n\
        [cmd:{{ m.content.strip()[1:].split(' ')[0] | upper }}]\n\
            {% else %}\n\
        <{{ m['role'] }}>{{ m.content.strip() }}</{{ m['role'] }}>\n\
            {% endif %}\n\
        {% endfor %}\n\
        {% if add_generation_prompt %}<model>{% endif %}";
    let msgs = [msg("user", "  hello  "), msg("user", "/reset all")];
    let out = apply_chat_template(tok, "gemma3", Some(tmpl), &msgs, true).unwrap();
    // The leading "<bos>" is dropped (gemma adds BOS when tokenizing), as llama.cpp does.
    assert_eq!(out, "\n<user>hello</user>\n[cmd:RESET]\n<model>");
    assert_eq!(
        tok.encode(&out, true, true)
            .iter()
            .filter(|&&t| t == 2)
            .count(),
        1
    );
    let out = apply_chat_template(tok, "gemma3", Some(tmpl), &msgs[..1], false).unwrap();
    assert_eq!(out, "\n<user>hello</user>\n");
    // SmolLM2 adds no BOS, so its bos_token text stays.
    let smol = tokenizer("smollm2");
    let out = apply_chat_template(
        smol,
        "llama",
        Some("{{ bos_token }}x{{ eos_token }}"),
        &msgs,
        false,
    )
    .unwrap();
    assert_eq!(out, "<|im_start|>x<|im_end|>");
    // eos_token and loop controls.
    let tmpl = "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{{ eos_token }}{% endfor %}";
    let out = apply_chat_template(tok, "gemma3", Some(tmpl), &msgs, false).unwrap();
    assert_eq!(out, "  hello  <eos>");
}

/// The chat templates of the new architectures' models, as their GGUF files carry them
/// (tests/fixtures/templates/, the models' own Jinja), rendered by lethe exactly as the models
/// expect (the tiny qwen2 model's vocabulary: BOS `<s>`, EOS `</s>`; a template's leading
/// `{{ bos_token }}` is dropped because tokenizing adds BOS; this copy of the R1 distill's
/// template closes its think block unless `enable_thinking` is set).
#[test]
fn templates_of_the_new_architectures() {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/goldens/arch/qwen2.gguf");
    let tok = Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    let src = |name: &str| {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/templates")
            .join(format!("{name}.jinja"));
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    };
    let turns = [
        msg("system", "You are terse."),
        msg("user", "Hi"),
        msg("assistant", "Hello."),
        msg("user", "Bye"),
    ];
    let chatml = "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
                  <|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n\
                  <|im_start|>assistant\n";
    let cases: [(&str, &str, &[ChatMessage], &str); 5] = [
        ("Qwen-Qwen2.5-7B-Instruct", "qwen2", &turns, chatml),
        ("Qwen-Qwen3-0.6B", "qwen3", &turns, chatml),
        (
            "microsoft-Phi-3.5-mini-instruct",
            "phi3",
            &turns,
            "<|system|>\nYou are terse.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello.<|end|>\n\
             <|user|>\nBye<|end|>\n<|assistant|>\n",
        ),
        (
            "google-gemma-2-2b-it",
            "gemma2",
            &turns[1..],
            "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n\
             <start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n",
        ),
        (
            "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B",
            "qwen2",
            &turns,
            "You are terse.<｜User｜>Hi<｜Assistant｜>Hello.<｜end▁of▁sentence｜><｜User｜>Bye\
             <｜Assistant｜><think>\n</think>",
        ),
    ];
    for (name, arch, msgs, want) in cases {
        let out = apply_chat_template(&tok, arch, Some(&src(name)), msgs, true)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(out, want, "{name}");
    }
    // Qwen2.5 adds its own system message when there is none.
    let out = apply_chat_template(
        &tok,
        "qwen2",
        Some(&src("Qwen-Qwen2.5-7B-Instruct")),
        &turns[1..2],
        true,
    )
    .unwrap();
    assert_eq!(
        out,
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful \
         assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    // Gemma 2 has no system role: the template's own exception, as a clear error.
    let e = apply_chat_template(
        &tok,
        "gemma2",
        Some(&src("google-gemma-2-2b-it")),
        &turns,
        true,
    )
    .unwrap_err();
    assert!(
        matches!(e, Error::Template(_)) && e.to_string().contains("System role not supported"),
        "{e}"
    );
}
