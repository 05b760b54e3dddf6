//! Tokenizers read from GGUF metadata, matching llama.cpp's `llama-vocab.cpp` token for token:
//! byte-level BPE (`tokenizer.ggml.model = "gpt2"`, with llama.cpp's pre-tokenizer table) and
//! SentencePiece-style merging (`"llama"`), special tokens parsed out of the text first,
//! detokenizing as `llama_detokenize`, and chat templates (see [`template`]).

mod bpe;
mod pretok;
mod spm;
pub mod template;
mod unicode;
mod vocab;

pub use template::{apply_chat_template, ChatMessage};

use crate::gguf::{Array, GgufFile, StrArray, Value};
use crate::{Error, Result};
use std::collections::{HashMap, HashSet};
use std::hash::Hasher;

/// FxHash (rustc's): much faster than SipHash for the many short lookups tokenizing does;
/// the keys come from the model file, not from an adversary choosing collisions at run time.
#[derive(Default, Clone, Copy)]
pub(crate) struct FxHasher(u64);

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0xf1357aea2e62a9c5;
        let mut h = self.0;
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
            h = (h.rotate_left(26) ^ w).wrapping_mul(K);
        }
        for &b in chunks.remainder() {
            h = (h.rotate_left(26) ^ u64::from(b)).wrapping_mul(K);
        }
        self.0 = h;
    }
    fn write_u8(&mut self, b: u8) {
        self.write_u64(u64::from(b));
    }
    fn write_u32(&mut self, x: u32) {
        self.write_u64(u64::from(x));
    }
    fn write_u64(&mut self, x: u64) {
        self.0 = (self.0.rotate_left(26) ^ x).wrapping_mul(0xf1357aea2e62a9c5);
    }
    fn finish(&self) -> u64 {
        self.0.rotate_left(26)
    }
}

/// llama.cpp's token attributes (`llama_token_attr`).
pub mod attr {
    pub const UNKNOWN: u16 = 1 << 0;
    pub const UNUSED: u16 = 1 << 1;
    pub const NORMAL: u16 = 1 << 2;
    pub const CONTROL: u16 = 1 << 3;
    pub const USER_DEFINED: u16 = 1 << 4;
    pub const BYTE: u16 = 1 << 5;
}

/// Which algorithm the vocabulary uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VocabType {
    /// SentencePiece-style (`tokenizer.ggml.model = "llama"`).
    Spm,
    /// Byte-level BPE (`tokenizer.ggml.model = "gpt2"`).
    Bpe,
}

enum Model {
    Spm,
    Bpe(Box<bpe::Bpe>),
}

#[derive(Default)]
struct TrieNode {
    /// Sorted (byte, child) edges.
    edges: Vec<(u8, u32)>,
    /// The token ending here.
    token: Option<u32>,
}

/// A byte trie over the special tokens' texts, to find which of them occur in a text.
#[derive(Default)]
struct Trie {
    nodes: Vec<TrieNode>,
}

impl Trie {
    fn insert(&mut self, key: &[u8], id: u32) {
        if self.nodes.is_empty() {
            self.nodes.push(TrieNode::default());
        }
        let mut n = 0usize;
        for &b in key {
            n = match self.nodes[n].edges.binary_search_by_key(&b, |e| e.0) {
                Ok(k) => self.nodes[n].edges[k].1 as usize,
                Err(k) => {
                    let child = self.nodes.len() as u32;
                    self.nodes[n].edges.insert(k, (b, child));
                    self.nodes.push(TrieNode::default());
                    child as usize
                }
            };
        }
        self.nodes[n].token = Some(id);
    }

    /// Every token that occurs somewhere in `text`.
    fn occurring(&self, text: &[u8]) -> HashSet<u32> {
        let mut found = HashSet::new();
        if self.nodes.is_empty() {
            return found;
        }
        for i in 0..text.len() {
            let mut n = 0usize;
            for &b in &text[i..] {
                match self.nodes[n].edges.binary_search_by_key(&b, |e| e.0) {
                    Ok(k) => n = self.nodes[n].edges[k].1 as usize,
                    Err(_) => break,
                }
                if let Some(id) = self.nodes[n].token {
                    found.insert(id);
                }
            }
        }
        found
    }
}

enum Frag<'a> {
    Text(&'a str),
    Token(u32),
}

pub struct Tokenizer {
    model: Model,
    /// Token texts and the text -> id index.
    vocab: vocab::Vocab,
    /// Empty where the file has no scores (all 0).
    scores: Vec<f32>,
    attrs: Vec<u16>,
    byte_tokens: Box<[Option<u32>; 256]>,
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    unk: Option<u32>,
    eog: HashSet<u32>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
    clean_spaces: bool,
    /// Rank of each control, user-defined and unknown token in the order text is split on
    /// them (longest first).
    special_rank: HashMap<u32, usize>,
    special_trie: Trie,
    chat_template: Option<String>,
}

const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];
const FIM_PAD_TEXTS: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
const FIM_REP_TEXTS: &[&str] = &[
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
];
const FIM_SEP_TEXTS: &[&str] = &["<|file_sep|>"];

fn meta_bool(f: &GgufFile, key: &str) -> Option<bool> {
    match f.get(key)? {
        Value::Bool(b) => Some(*b),
        v => v.as_i64().map(|x| x != 0),
    }
}

fn meta_id(f: &GgufFile, key: &str, n_vocab: usize) -> Option<Option<u32>> {
    let v = f.get(key)?.as_i64()?;
    if v >= 0 && (v as u64) < n_vocab as u64 {
        Some(Some(v as u32))
    } else {
        eprintln!("lethe: tokenizer: bad special token {key} = {v} (vocabulary has {n_vocab}), using the default");
        None
    }
}

impl Tokenizer {
    /// Build the tokenizer from a model file's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(f: &GgufFile) -> Result<Self> {
        let terr = |m: String| Error::Tokenizer(m);
        let model_name = f
            .get_str("tokenizer.ggml.model")
            .map_err(|e| terr(format!("tokenizer.ggml.model: {e}")))?
            .to_string();
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
        let mut attrs: Vec<u16> = match f.get("tokenizer.ggml.token_type") {
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
        let vocab = vocab::Vocab::new(tokens);
        let tokens = vocab.texts();

        let pre = f
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        let (model, mut bos, mut eos, mut unk, mut add_bos, mut add_eos, mut add_space_prefix, clean_spaces) =
            match model_name.as_str() {
                "llama" => (Model::Spm, Some(1), Some(2), Some(0), true, false, true, false),
                "gpt2" => {
                    let pre = if pre.is_empty() {
                        eprintln!("lethe: tokenizer: missing pre-tokenizer type (tokenizer.ggml.pre), using 'default'");
                        "default"
                    } else {
                        pre
                    };
                    let pt = pretok::PreTokenizer::new(pre)?;
                    let merges_v =
                        f.get_array("tokenizer.ggml.merges").map_err(|e| terr(format!("tokenizer merges: {e}")))?;
                    let (clean, add_bos) = (pt.clean_spaces, pt.add_bos);
                    let b = match merges_v {
                        Array::String(m) => bpe::Bpe::new(pt, m, &vocab)?,
                        // Merges that are no strings split as empty ones do.
                        other => bpe::Bpe::new(pt, &(0..other.len()).map(|_| "").collect(), &vocab)?,
                    };
                    (Model::Bpe(Box::new(b)), Some(11), Some(11), None, add_bos, false, false, clean)
                }
                other => {
                    return Err(terr(format!(
                        "unsupported tokenizer model {other:?} (tokenizer.ggml.model); lethe reads \"gpt2\" and \"llama\""
                    )))
                }
            };
        // Defaults out of range are disabled.
        for d in [&mut bos, &mut eos, &mut unk] {
            if d.is_some_and(|x| x as usize >= n) {
                *d = None;
            }
        }
        if let Some(v) = meta_bool(f, "tokenizer.ggml.add_space_prefix") {
            add_space_prefix = v;
        }
        let mut eot = None;
        let mut eom = None;
        let mut fim_pad = None;
        let mut fim_rep = None;
        let mut fim_sep = None;
        for (key, slot) in [
            ("tokenizer.ggml.bos_token_id", &mut bos),
            ("tokenizer.ggml.eos_token_id", &mut eos),
            ("tokenizer.ggml.eot_token_id", &mut eot),
            ("tokenizer.ggml.eom_token_id", &mut eom),
            ("tokenizer.ggml.unknown_token_id", &mut unk),
            ("tokenizer.ggml.fim_pad_token_id", &mut fim_pad),
            ("tokenizer.ggml.fim_rep_token_id", &mut fim_rep),
            ("tokenizer.ggml.fim_sep_token_id", &mut fim_sep),
        ] {
            if let Some(id) = meta_id(f, key, n) {
                *slot = id;
            }
        }
        if let Some(v) = meta_bool(f, "tokenizer.ggml.add_bos_token") {
            add_bos = v;
        }
        if let Some(v) = meta_bool(f, "tokenizer.ggml.add_eos_token") {
            add_eos = v;
        }

        // Auto-detect special tokens by their text, as llama.cpp does (in id order here).
        let mark_control = |attrs: &mut Vec<u16>, id: u32| attrs[id as usize] |= attr::CONTROL;
        for (id, t) in tokens.iter().enumerate() {
            let id = id as u32;
            for (slot, texts) in [
                (&mut eot, EOT_TEXTS),
                (&mut eom, &["<|eom_id|>"][..]),
                (&mut fim_pad, FIM_PAD_TEXTS),
                (&mut fim_rep, FIM_REP_TEXTS),
                (&mut fim_sep, FIM_SEP_TEXTS),
            ] {
                if slot.is_none() && texts.contains(&t) {
                    *slot = Some(id);
                    mark_control(&mut attrs, id);
                }
            }
        }
        for (id, t) in tokens.iter().enumerate() {
            if attrs[id] & attr::CONTROL != 0
                && attrs[id] & attr::UNUSED == 0
                && t.contains("unused")
            {
                attrs[id] |= attr::UNUSED;
            }
        }
        let mut eog: HashSet<u32> = [fim_pad, fim_rep, fim_sep].into_iter().flatten().collect();
        for (id, t) in tokens.iter().enumerate() {
            if EOG_TEXTS.contains(&t) {
                eog.insert(id as u32);
                mark_control(&mut attrs, id as u32);
            }
        }
        for (id, t) in tokens.iter().enumerate() {
            if matches!(
                t,
                "<|channel|>" | "<|message|>" | "<|start|>" | "<|constrain|>"
            ) {
                attrs[id] = attr::USER_DEFINED;
            }
        }
        eog.extend([eos, eot, eom].into_iter().flatten());
        // o200k_harmony / solar-open: "<|end|>" is not the end of generation there.
        let find = |eog: &HashSet<u32>, s: &str| eog.iter().copied().find(|&i| vocab.text(i) == s);
        let end = find(&eog, "<|end|>");
        let harmony = find(&eog, "<|return|>").is_some() && find(&eog, "<|call|>").is_some()
            || find(&eog, "<|calls|>").is_some() && find(&eog, "<|flush|>").is_some();
        if let (true, Some(end)) = (harmony, end) {
            eog.remove(&end);
            attrs[end as usize] = attr::USER_DEFINED;
        }
        if let (Some(_), Some(s)) = (find(&eog, "<|tool_response>"), find(&eog, "</s>")) {
            eog.remove(&s);
            attrs[s as usize] = attr::NORMAL;
        }

        let mut special_order: Vec<u32> = (0..n as u32)
            .filter(|&i| {
                attrs[i as usize] & (attr::CONTROL | attr::USER_DEFINED | attr::UNKNOWN) != 0
            })
            .collect();
        special_order.sort_by(|&a, &b| {
            vocab
                .text(b)
                .len()
                .cmp(&vocab.text(a).len())
                .then(a.cmp(&b))
        });
        let special_rank = special_order
            .iter()
            .enumerate()
            .map(|(r, &id)| (id, r))
            .collect();
        let mut special_trie = Trie::default();
        for &id in &special_order {
            special_trie.insert(vocab.text(id).as_bytes(), id);
        }

        let mut byte_tokens = Box::new([None; 256]);
        for (b, slot) in byte_tokens.iter_mut().enumerate() {
            *slot = vocab.get(&format!("<0x{b:02X}>"));
        }

        let chat_template = f
            .get("tokenizer.chat_template")
            .and_then(|v| v.as_str())
            .map(str::to_string);

        Ok(Self {
            model,
            vocab,
            scores,
            attrs,
            byte_tokens,
            bos,
            eos,
            eot,
            unk,
            eog,
            add_bos,
            add_eos,
            add_space_prefix,
            clean_spaces,
            special_rank,
            special_trie,
            chat_template,
        })
    }

    /// Appends the piece of a token as llama.cpp's `token_to_piece` (without lstrip) gives
    /// it: control and unknown tokens only when `special`.
    fn append_piece(&self, id: u32, special: bool, out: &mut Vec<u8>) {
        let a = self.token_attr(id);
        if a & (attr::UNKNOWN | attr::CONTROL) != 0 && !special {
            return;
        }
        let text = self.vocab.text(id);
        if a & (attr::UNKNOWN | attr::CONTROL | attr::USER_DEFINED) != 0 {
            out.extend_from_slice(text.as_bytes());
            return;
        }
        let byte_piece = || -> u8 {
            // "<0xXX>": strtol of the two hex digits.
            let hex = text.get(3..5).unwrap_or("");
            let v = u8::from_str_radix(hex, 16)
                .ok()
                .or_else(|| hex.get(..1).and_then(|h| u8::from_str_radix(h, 16).ok()));
            v.unwrap_or(0)
        };
        match self.model {
            Model::Spm => {
                if a & attr::NORMAL != 0 {
                    for (k, part) in text.split('\u{2581}').enumerate() {
                        if k > 0 {
                            out.push(b' ');
                        }
                        out.extend_from_slice(part.as_bytes());
                    }
                } else if a & attr::BYTE != 0 {
                    out.push(byte_piece());
                }
            }
            Model::Bpe(_) => {
                if a & attr::NORMAL != 0 {
                    for c in text.chars() {
                        match unicode::char_to_byte(c) {
                            Some(b) => out.push(b),
                            None => {
                                out.extend_from_slice(b"[UNK_BYTE_0x");
                                let mut buf = [0u8; 4];
                                for b in c.encode_utf8(&mut buf).bytes() {
                                    out.extend_from_slice(format!("{b:02x}").as_bytes());
                                }
                                out.extend_from_slice(text.as_bytes());
                                out.push(b']');
                            }
                        }
                    }
                } else if a & attr::BYTE != 0 && text.starts_with("<0x") {
                    out.push(byte_piece());
                }
            }
        }
    }

    /// Split the text on special tokens (llama.cpp's `tokenizer_st_partition`): tokens in
    /// priority order (longest first), each splitting every remaining text fragment at its
    /// occurrences, left to right.
    fn partition<'a>(&self, text: &'a str, parse_special: bool) -> Vec<Frag<'a>> {
        let mut frags = if text.is_empty() {
            vec![]
        } else {
            vec![Frag::Text(text)]
        };
        let mut cands: Vec<u32> = self
            .special_trie
            .occurring(text.as_bytes())
            .into_iter()
            .filter(|&id| {
                parse_special || self.attrs[id as usize] & (attr::CONTROL | attr::UNKNOWN) == 0
            })
            .collect();
        cands.sort_by_key(|id| self.special_rank.get(id).copied().unwrap_or(usize::MAX));
        for id in cands {
            let pat = self.vocab.text(id);
            let mut next = Vec::with_capacity(frags.len() + 2);
            for fr in frags {
                match fr {
                    Frag::Text(s) => {
                        let mut last = 0;
                        for (i, m) in s.match_indices(pat) {
                            if i > last {
                                next.push(Frag::Text(&s[last..i]));
                            }
                            next.push(Frag::Token(id));
                            last = i + m.len();
                        }
                        if last < s.len() {
                            next.push(Frag::Text(&s[last..]));
                        }
                    }
                    tok => next.push(tok),
                }
            }
            frags = next;
        }
        frags
    }

    /// Tokenize as llama.cpp's `llama_tokenize(text, add_special, parse_special)`.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::new();
        let frags = self.partition(text, parse_special);
        if add_special && self.add_bos {
            out.extend(self.bos);
        }
        match &self.model {
            Model::Spm => {
                let v = spm::SpmVocab {
                    vocab: &self.vocab,
                    scores: &self.scores,
                    byte_tokens: &self.byte_tokens,
                    unk: self.unk,
                };
                let mut is_prev_special = true;
                for fr in frags {
                    match fr {
                        Frag::Text(s) => {
                            let mut t = String::with_capacity(s.len() + 4);
                            if self.add_space_prefix && is_prev_special {
                                t.push(' ');
                            }
                            t.push_str(s);
                            let t = t.replace(' ', "\u{2581}");
                            spm::encode(&t, &v, &mut out);
                            is_prev_special = false;
                        }
                        Frag::Token(id) => {
                            out.push(id);
                            is_prev_special = true;
                        }
                    }
                }
            }
            Model::Bpe(b) => {
                for fr in frags {
                    match fr {
                        Frag::Text(s) => b.encode(s, &self.vocab, &mut out),
                        Frag::Token(id) => out.push(id),
                    }
                }
            }
        }
        if add_special && self.add_eos {
            out.extend(self.eos);
        }
        out
    }

    pub fn n_vocab(&self) -> usize {
        self.vocab.len()
    }

    pub fn vocab_type(&self) -> VocabType {
        match self.model {
            Model::Spm => VocabType::Spm,
            Model::Bpe(_) => VocabType::Bpe,
        }
    }

    /// The pre-tokenizer name of a BPE vocabulary.
    pub fn pre_type(&self) -> Option<&str> {
        match &self.model {
            Model::Spm => None,
            Model::Bpe(b) => Some(&b.pre.name),
        }
    }

    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// End-of-turn token (`<|im_end|>`, `<end_of_turn>`, ...), if the vocabulary has one.
    pub fn eot(&self) -> Option<u32> {
        self.eot
    }

    pub fn unk(&self) -> Option<u32> {
        self.unk
    }

    /// End of generation, as llama.cpp's `llama_vocab_is_eog`.
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.contains(&id)
    }

    /// All end-of-generation tokens, ascending.
    pub fn eog_tokens(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.eog.iter().copied().collect();
        v.sort_unstable();
        v
    }

    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    pub fn add_eos(&self) -> bool {
        self.add_eos
    }

    pub fn add_space_prefix(&self) -> bool {
        self.add_space_prefix
    }

    /// llama.cpp attribute bits of a token (see [`attr`]); 0 for ids outside the vocabulary.
    pub fn token_attr(&self, id: u32) -> u16 {
        self.attrs.get(id as usize).copied().unwrap_or(0)
    }

    /// Control (or unknown) token: rendered only on request.
    pub fn is_control(&self, id: u32) -> bool {
        self.token_attr(id) & (attr::CONTROL | attr::UNKNOWN) != 0
    }

    pub fn token_score(&self, id: u32) -> f32 {
        self.scores.get(id as usize).copied().unwrap_or(0.0)
    }

    /// The raw vocabulary entry ("" for ids outside the vocabulary).
    pub fn token_str(&self, id: u32) -> &str {
        self.vocab.text(id)
    }

    /// The bytes a token stands for (llama.cpp's `token_to_piece` without lstrip): control and
    /// unknown tokens only when `special`.
    pub fn token_to_piece(&self, id: u32, special: bool) -> Vec<u8> {
        let mut out = Vec::new();
        self.append_piece(id, special, &mut out);
        out
    }

    /// Detokenize as llama.cpp's `common_detokenize(tokens, special)`: the leading space the
    /// SPM space prefix adds is dropped from the first piece, and vocabularies with
    /// `clean_spaces` get llama.cpp's clean-up of spaces before punctuation. Invalid UTF-8
    /// becomes U+FFFD only here, at the end.
    pub fn decode(&self, ids: &[u32], special: bool) -> String {
        String::from_utf8_lossy(&self.decode_bytes(ids, special)).into_owned()
    }

    /// [`Tokenizer::decode`] without the final UTF-8 conversion.
    pub fn decode_bytes(&self, ids: &[u32], special: bool) -> Vec<u8> {
        let mut text = Vec::new();
        let mut remove_space = self.add_space_prefix;
        for &id in ids {
            let start = text.len();
            self.append_piece(id, special, &mut text);
            if remove_space && text.get(start) == Some(&b' ') {
                text.remove(start);
            }
            remove_space = false;
        }
        if self.clean_spaces {
            clean_spaces(&mut text);
        }
        text
    }

    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.vocab.get(text)
    }

    /// `tokenizer.chat_template`, if the file has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The vocabulary's texts, by id.
    pub fn tokens(&self) -> &StrArray {
        self.vocab.texts()
    }
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("type", &self.vocab_type())
            .field("pre", &self.pre_type())
            .field("n_vocab", &self.n_vocab())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("eot", &self.eot)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .field("add_space_prefix", &self.add_space_prefix)
            .finish_non_exhaustive()
    }
}

/// llama.cpp's three clean-up passes of `llama_detokenize` (in place, byte for byte).
fn clean_spaces(text: &mut Vec<u8>) {
    // First pass: " ?", " !", " .", " ," lose the space.
    let total1 = text.len();
    let mut total = usize::from(total1 > 0);
    for i in 1..total1 {
        let x = text[i];
        if text[i - 1] == b' ' && matches!(x, b'?' | b'!' | b'.' | b',') {
            total = total.saturating_sub(1);
        }
        text[total] = x;
        total += 1;
    }
    // Second pass: a single apostrophe between spaces loses both spaces.
    let total2 = total;
    total = usize::from(total2 > 0);
    let mut i = 1;
    while i < total2 {
        let x = text[i];
        if x == b'\'' && i + 1 < total2 && text[i - 1] == b' ' && text[i + 1] == b' ' {
            total = total.saturating_sub(1);
            i += 1;
            text[i] = 0;
        }
        text[total] = x;
        total += 1;
        i += 1;
    }
    // Third pass: contractions " 's", " 'm", " 're", " 've" lose the space.
    let total3 = total;
    total = usize::from(total3 > 0);
    for i in 1..total3 {
        let x = text[i];
        if text[i - 1] == b' ' && x == b'\'' && i + 1 < total3 {
            let x1 = text[i + 1];
            if x1 == b't' || x1 == b'd' {
            } else if x1 == b's' || x1 == b'm' {
                total = total.saturating_sub(1);
            } else if i + 2 < total3 {
                let x2 = text[i + 2];
                if matches!((x1, x2), (b'r', b'e') | (b'v', b'e')) {
                    total = total.saturating_sub(1);
                }
            }
        }
        text[total] = x;
        total += 1;
    }
    text.truncate(total);
}

/// Turns a stream of token ids into text, emitting only complete UTF-8: a character split
/// across tokens (byte tokens, byte-level BPE pieces) is held until its last byte arrives.
/// Bytes that can never become valid UTF-8 come out as U+FFFD.
pub struct StreamDecoder {
    buf: Vec<u8>,
    special: bool,
}

impl Default for StreamDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamDecoder {
    /// A decoder that leaves control tokens out (as `decode(.., false)`).
    pub fn new() -> Self {
        Self {
            buf: Vec::new(),
            special: false,
        }
    }

    /// A decoder that renders control tokens when `special`.
    pub fn with_special(special: bool) -> Self {
        Self {
            buf: Vec::new(),
            special,
        }
    }

    /// Add one token; returns the text that is complete so far.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        tok.append_piece(id, self.special, &mut self.buf);
        self.drain(false)
    }

    /// Everything still held (an incomplete sequence becomes U+FFFD).
    pub fn flush(&mut self) -> String {
        self.drain(true)
    }

    fn drain(&mut self, all: bool) -> String {
        let mut out = String::new();
        let mut start = 0;
        loop {
            match std::str::from_utf8(&self.buf[start..]) {
                Ok(s) => {
                    out.push_str(s);
                    start = self.buf.len();
                    break;
                }
                Err(e) => {
                    let valid = start + e.valid_up_to();
                    // SAFETY-free: the prefix was just validated.
                    out.push_str(std::str::from_utf8(&self.buf[start..valid]).unwrap_or_default());
                    match e.error_len() {
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            start = valid + bad;
                        }
                        None => {
                            // Incomplete sequence at the end: hold it unless flushing.
                            if all {
                                out.push('\u{FFFD}');
                                start = self.buf.len();
                            } else {
                                start = valid;
                            }
                            break;
                        }
                    }
                }
            }
        }
        self.buf.drain(..start);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_spaces_passes() {
        let run = |s: &str| {
            let mut v = s.as_bytes().to_vec();
            clean_spaces(&mut v);
            String::from_utf8(v).unwrap()
        };
        assert_eq!(run("Hello , world !"), "Hello, world!");
        assert_eq!(run("a ' b"), "a'b");
        assert_eq!(run("it 's we 're I 'd"), "it's we're I 'd");
        assert_eq!(run(""), "");
        assert_eq!(run(" "), " ");
    }

    #[test]
    fn stream_decoder_holds_partial_utf8() {
        let mut d = StreamDecoder::new();
        d.buf.extend_from_slice(&"é".as_bytes()[..1]);
        assert_eq!(d.drain(false), "");
        d.buf.extend_from_slice(&"é".as_bytes()[1..]);
        assert_eq!(d.drain(false), "é");
        d.buf.extend_from_slice(&[0xFF, b'a', 0xE6]);
        assert_eq!(d.drain(false), "\u{FFFD}a");
        assert_eq!(d.flush(), "\u{FFFD}");
        assert_eq!(d.flush(), "");
    }

    #[test]
    fn trie_finds_occurrences() {
        let mut t = Trie::default();
        t.insert(b"<a>", 1);
        t.insert(b"<ab>", 2);
        t.insert(b"\n\n", 3);
        let f = t.occurring(b"x<ab>\n\n<a");
        assert!(f.contains(&2) && f.contains(&3) && !f.contains(&1));
        assert!(Trie::default().occurring(b"abc").is_empty());
    }
}
