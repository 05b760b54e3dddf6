//! SentencePiece-style tokenizing (`tokenizer.ggml.model = "llama"`), as llama.cpp's
//! `llm_tokenizer_spm_session`: start from single characters, repeatedly merge the adjacent pair
//! whose concatenation is the highest-scoring token (leftmost on ties), and spell characters
//! that are no token as `<0xXX>` byte tokens.

use super::vocab::Vocab;
use std::cmp::Ordering;
use std::collections::BinaryHeap;

#[derive(Clone, Copy)]
struct Sym {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// 16 bytes: the queue can hold millions for long texts.
struct Bigram {
    left: u32,
    right: u32,
    score: f32,
    size: u32,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Bigram {
    /// Greatest = highest score, then smallest left index (llama.cpp's comparator).
    fn cmp(&self, other: &Self) -> Ordering {
        if self.score < other.score {
            Ordering::Less
        } else if self.score > other.score {
            Ordering::Greater
        } else {
            other.left.cmp(&self.left)
        }
    }
}

pub(crate) struct SpmVocab<'a> {
    pub vocab: &'a Vocab,
    pub scores: &'a [f32],
    /// `<0xXX>` token of each byte, if any.
    pub byte_tokens: &'a [Option<u32>; 256],
    pub unk: Option<u32>,
}

/// Tokenize `text` (spaces already escaped to U+2581).
pub(crate) fn encode(text: &str, v: &SpmVocab, out: &mut Vec<u32>) {
    let n_chars = text.chars().count();
    let mut syms: Vec<Sym> = Vec::with_capacity(n_chars);
    for (i, (start, c)) in text.char_indices().enumerate() {
        syms.push(Sym {
            start,
            len: c.len_utf8(),
            prev: i.checked_sub(1),
            next: if i + 1 < n_chars { Some(i + 1) } else { None },
        });
    }
    let mut queue = BinaryHeap::new();
    let try_add =
        |queue: &mut BinaryHeap<Bigram>, syms: &[Sym], l: Option<usize>, r: Option<usize>| {
            let (Some(l), Some(r)) = (l, r) else { return };
            let (sl, sr) = (&syms[l], &syms[r]);
            let piece = &text[sl.start..sl.start + sl.len + sr.len];
            if let Some(id) = v.vocab.get(piece) {
                let score = v.scores.get(id as usize).copied().unwrap_or(0.0);
                queue.push(Bigram {
                    left: l as u32,
                    right: r as u32,
                    score,
                    size: piece.len() as u32,
                });
            }
        };
    for i in 1..syms.len() {
        try_add(&mut queue, &syms, Some(i - 1), Some(i));
    }
    while let Some(b) = queue.pop() {
        let (bl, br) = (b.left as usize, b.right as usize);
        let (l, r) = (syms[bl], syms[br]);
        if l.len == 0 || r.len == 0 || l.len + r.len != b.size as usize {
            continue;
        }
        syms[bl].len += r.len;
        syms[br].len = 0;
        syms[bl].next = r.next;
        if let Some(nx) = r.next {
            syms[nx].prev = Some(bl);
        }
        try_add(&mut queue, &syms, syms[bl].prev, Some(bl));
        try_add(&mut queue, &syms, Some(bl), syms[bl].next);
    }
    let mut i = if syms.is_empty() { None } else { Some(0) };
    while let Some(k) = i {
        let s = syms[k];
        let piece = &text[s.start..s.start + s.len];
        match v.vocab.get(piece) {
            Some(id) => out.push(id),
            None => {
                for &b in piece.as_bytes() {
                    if let Some(id) = byte_token(v, b) {
                        out.push(id);
                    }
                }
            }
        }
        i = s.next;
    }
}

/// llama.cpp's `byte_to_token`: `<0xXX>`, else the byte as a one-character token; lethe falls
/// back to the unknown token where llama.cpp would throw.
fn byte_token(v: &SpmVocab, b: u8) -> Option<u32> {
    if let Some(id) = v.byte_tokens[b as usize] {
        return Some(id);
    }
    if b.is_ascii() {
        let mut buf = [0u8; 4];
        if let Some(id) = v.vocab.get(char::from(b).encode_utf8(&mut buf)) {
            return Some(id);
        }
    }
    v.unk
}
