//! Text to token ids, as llama.cpp's `llama_tokenize`: special tokens split out first, then
//! SentencePiece-style merging or byte-level BPE on the text between them.

use super::special::Frag;
use super::{spm, Model, Tokenizer};

impl Tokenizer {
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
}
