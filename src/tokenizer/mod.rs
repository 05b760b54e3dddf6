//! Tokenizers read from GGUF metadata, matching llama.cpp's `llama-vocab.cpp` token for token:
//! byte-level BPE (`tokenizer.ggml.model = "gpt2"`, with llama.cpp's pre-tokenizer table), BPE
//! over raw UTF-8 with SentencePiece's escaped spaces and byte tokens (`"gemma4"`) and
//! SentencePiece-style merging (`"llama"`), special tokens parsed out of the text first,
//! detokenizing as `llama_detokenize`, and chat templates (see [`template`]).
//!
//! Loading the metadata is in `load`, the special tokens in `special`, encoding and decoding in
//! `encode` and `decode`; the two algorithms are `spm` and `bpe` (with the pre-tokenizer in
//! `pretok`).

mod bpe;
mod decode;
mod encode;
mod hash;
mod load;
mod pretok;
mod special;
mod spm;
pub mod template;
mod unicode;
mod vocab;

pub use decode::StreamDecoder;
pub use template::{apply_chat_template, ChatMessage};

pub(crate) use hash::FxHasher;

use crate::gguf::StrArray;
use std::collections::HashSet;

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
    /// BPE: byte-level (`tokenizer.ggml.model = "gpt2"`) or over UTF-8 (`"gemma4"`).
    Bpe,
}

enum Model {
    Spm,
    Bpe(Box<bpe::Bpe>),
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
    /// The control, user-defined and unknown tokens a text is split on.
    special: special::SpecialTokens,
    chat_template: Option<String>,
    /// What the file got wrong that loading tolerated.
    warnings: Vec<String>,
}

impl Tokenizer {
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

    /// What the model file got wrong that loading tolerated, as llama.cpp does (a missing
    /// pre-tokenizer type, a special token id outside the vocabulary): for the caller to show.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
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
