//! BPE, as llama.cpp's `llm_tokenizer_bpe_session`: byte-level (`tokenizer.ggml.model =
//! "gpt2"`: words spelled in GPT-2's byte alphabet, single-byte tokens as the fallback), or over
//! raw UTF-8 (`"gemma4"`: spaces escaped to U+2581, `<0xXX>` byte tokens as the fallback), as the
//! pre-tokenizer says (see [`PreTokenizer::byte_encode`]).

use super::pretok::PreTokenizer;
use super::unicode::{byte_to_char, bytes_to_unicode};
use super::vocab::Vocab;
use super::FxHasher;
use crate::gguf::StrArray;
use crate::{Error, Result};
use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::BuildHasherDefault;
use std::sync::Mutex;

/// Most words cached before the cache is cleared.
const CACHE_MAX: usize = 1 << 16;

/// Longest word (in bytes, as spelled for merging) the cache keeps: pre-tokenizers that split
/// only on newlines (gemma4) make whole lines words, which seldom repeat.
const CACHE_WORD_MAX: usize = 256;

/// No token and no part of a merge.
const NONE: u32 = u32::MAX;

type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// Strings in merges get ids: a token's id where the string is a token, else one from
/// `n_vocab` up.
pub(crate) struct Bpe {
    pub pre: PreTokenizer,
    n_vocab: u32,
    /// (left id, right id) -> rank.
    ranks: FxMap<(u32, u32), u32>,
    /// Id of each merge's result (by rank), `NONE` where it is neither a token nor a part.
    merged: Vec<u32>,
    /// Id of each byte's character (`bytes_to_unicode`), `NONE` where it has none.
    byte_ids: [u32; 256],
    /// Merge parts that are no token -> their ids (from `n_vocab` up); usually empty.
    extra: FxMap<String, u32>,
    /// The `<0xXX>` token of each byte, `NONE` where there is none (raw UTF-8 fallback).
    byte_tokens: [u32; 256],
    cache: Mutex<HashMap<String, Vec<u32>>>,
}

#[derive(Clone, Copy)]
struct Sym {
    start: usize,
    len: usize,
    /// Id of the symbol's text (see [`Bpe`]), `NONE` where it has none.
    id: u32,
    prev: Option<usize>,
    next: Option<usize>,
}

/// llama.cpp splits a merge at the first space after the first byte.
fn split_merge(m: &str) -> (&str, &str) {
    let pos = m
        .as_bytes()
        .iter()
        .skip(1)
        .position(|&b| b == b' ')
        .map(|p| p + 1);
    match pos {
        Some(p) => (&m[..p], &m[p + 1..]),
        None => ("", ""),
    }
}

impl Bpe {
    pub fn new(pre: PreTokenizer, merges: &StrArray, vocab: &Vocab) -> Result<Self> {
        if merges.is_empty() {
            return Err(Error::Tokenizer(
                "gpt2 tokenizer without merges (tokenizer.ggml.merges)".into(),
            ));
        }
        let n_vocab = vocab.len() as u32;
        // Merge parts that are no token -> their id (from `n_vocab` up); usually none.
        let mut extra: FxMap<String, u32> = FxMap::default();
        let mut id_of = |s: &str| -> u32 {
            if let Some(id) = vocab.get(s) {
                return id;
            }
            if let Some(&i) = extra.get(s) {
                return i;
            }
            let i = n_vocab + extra.len() as u32;
            extra.insert(s.to_string(), i);
            i
        };
        let mut ranks: FxMap<(u32, u32), u32> =
            FxMap::with_capacity_and_hasher(merges.len(), Default::default());
        for (rank, m) in merges.iter().enumerate() {
            let (a, b) = split_merge(m);
            let key = (id_of(a), id_of(b));
            // First rank wins (std::map::emplace).
            ranks.entry(key).or_insert(rank as u32);
        }
        // Results of merges: only those that are tokens or parts of other merges matter.
        let mut buf = String::new();
        let merged = merges
            .iter()
            .map(|m| {
                let (a, b) = split_merge(m);
                buf.clear();
                buf.push_str(a);
                buf.push_str(b);
                vocab
                    .get(&buf)
                    .or_else(|| extra.get(buf.as_str()).copied())
                    .unwrap_or(NONE)
            })
            .collect();
        let lookup = |s: &str| vocab.get(s).or_else(|| extra.get(s).copied());
        let mut byte_ids = [NONE; 256];
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            let mut buf = [0u8; 4];
            *slot = lookup(byte_to_char(b as u8).encode_utf8(&mut buf)).unwrap_or(NONE);
        }
        if extra.len() as u64 + u64::from(n_vocab) >= u64::from(NONE) {
            return Err(Error::Tokenizer("too many merge parts".into()));
        }
        let mut byte_tokens = [NONE; 256];
        for (b, slot) in byte_tokens.iter_mut().enumerate() {
            *slot = vocab.get(&format!("<0x{b:02X}>")).unwrap_or(NONE);
        }
        Ok(Self {
            pre,
            n_vocab,
            ranks,
            merged,
            byte_ids,
            extra,
            byte_tokens,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Id of a merge part or token text (see [`Bpe`]), `NONE` where it is neither.
    fn part_id(&self, s: &str, vocab: &Vocab) -> u32 {
        vocab
            .get(s)
            .or_else(|| self.extra.get(s).copied())
            .unwrap_or(NONE)
    }

    /// Tokenize one raw-text fragment (no special tokens in it).
    pub fn encode(&self, text: &str, vocab: &Vocab, out: &mut Vec<u32>) {
        let text: Cow<str> = if self.pre.escape_whitespaces {
            Cow::Owned(text.replace(' ', "\u{2581}"))
        } else {
            Cow::Borrowed(text)
        };
        for raw in self.pre.split(&text) {
            let word: Cow<str> = if self.pre.byte_encode {
                Cow::Owned(bytes_to_unicode(raw))
            } else {
                Cow::Borrowed(raw)
            };
            if let Ok(cache) = self.cache.lock() {
                if let Some(ids) = cache.get(word.as_ref()) {
                    out.extend_from_slice(ids);
                    continue;
                }
            }
            let ids = self.encode_word(&word, raw.as_bytes(), vocab);
            out.extend_from_slice(&ids);
            if word.len() > CACHE_WORD_MAX {
                continue;
            }
            if let Ok(mut cache) = self.cache.lock() {
                if cache.len() >= CACHE_MAX {
                    cache.clear();
                }
                cache.insert(word.into_owned(), ids);
            }
        }
    }

    /// Merge the characters of `word`: `raw`'s bytes as `bytes_to_unicode` spells them, or
    /// `raw` itself where the vocabulary is not byte-level.
    fn encode_word(&self, word: &str, raw: &[u8], vocab: &Vocab) -> Vec<u32> {
        if self.pre.ignore_merges || (self.pre.newline_runs && raw.iter().all(|&b| b == b'\n')) {
            if let Some(id) = vocab.get(word) {
                return vec![id];
            }
        }
        let n = word.chars().count();
        let mut syms: Vec<Sym> = Vec::with_capacity(n);
        for (i, (start, c)) in word.char_indices().enumerate() {
            let len = c.len_utf8();
            let id = if self.pre.byte_encode {
                // One character per byte of `raw`.
                raw.get(i).map_or(NONE, |&b| self.byte_ids[b as usize])
            } else {
                self.part_id(&word[start..start + len], vocab)
            };
            syms.push(Sym {
                start,
                len,
                id,
                prev: i.checked_sub(1),
                next: if i + 1 < n { Some(i + 1) } else { None },
            });
        }
        // (rank, left, right, size): min rank first, then leftmost.
        let mut queue: BinaryHeap<Reverse<(u32, usize, usize, usize)>> = BinaryHeap::new();
        let push = |queue: &mut BinaryHeap<_>, syms: &[Sym], l: Option<usize>, r: Option<usize>| {
            let (Some(l), Some(r)) = (l, r) else { return };
            let (a, b) = (syms[l].id, syms[r].id);
            if a == NONE || b == NONE {
                return;
            }
            if let Some(&rank) = self.ranks.get(&(a, b)) {
                queue.push(Reverse((rank, l, r, syms[l].len + syms[r].len)));
            }
        };
        for i in 1..syms.len() {
            push(&mut queue, &syms, Some(i - 1), Some(i));
        }
        while let Some(Reverse((rank, l, r, size))) = queue.pop() {
            let (ls, rs) = (syms[l], syms[r]);
            if ls.len == 0 || rs.len == 0 || ls.len + rs.len != size || ls.next != Some(r) {
                continue; // outdated
            }
            syms[l].len += rs.len;
            syms[l].id = self.merged[rank as usize];
            syms[r].len = 0;
            syms[l].next = rs.next;
            if let Some(nx) = rs.next {
                syms[nx].prev = Some(l);
            }
            push(&mut queue, &syms, syms[l].prev, Some(l));
            push(&mut queue, &syms, Some(l), syms[l].next);
        }
        let mut ids = Vec::new();
        for s in syms.iter().filter(|s| s.len > 0) {
            if s.id < self.n_vocab {
                ids.push(s.id);
                continue;
            }
            // No token: llama.cpp falls back to byte tokens where they exist: `<0xXX>` for raw
            // UTF-8, else the byte as a one-character token.
            for &b in &word.as_bytes()[s.start..s.start + s.len] {
                if !self.pre.byte_encode {
                    if self.byte_tokens[b as usize] != NONE {
                        ids.push(self.byte_tokens[b as usize]);
                    }
                } else if b.is_ascii() {
                    let mut buf = [0u8; 4];
                    if let Some(id) = vocab.get(char::from(b).encode_utf8(&mut buf)) {
                        ids.push(id);
                    }
                }
            }
        }
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bpe(pre: &str, tokens: &[&str], merges: &[&str]) -> (Bpe, Vocab) {
        let vocab = Vocab::new(tokens.iter().collect());
        let merges: StrArray = merges.iter().collect();
        let b = Bpe::new(PreTokenizer::new(pre).unwrap(), &merges, &vocab).unwrap();
        (b, vocab)
    }

    fn encode(b: &Bpe, vocab: &Vocab, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        b.encode(text, vocab, &mut out);
        out
    }

    #[test]
    fn raw_utf8_merges_escaped_spaces_and_falls_back_to_byte_tokens() {
        let tokens = [
            "a",
            "b",
            "\u{2581}",
            "\u{2581}a",
            "ab",
            "\u{2581}ab",
            "<0xC3>",
            "<0xA9>",
            "\n",
            "\n\n\n",
        ];
        let merges = ["\u{2581} a", "a b", "\u{2581}a b"];
        let (b, v) = bpe("gemma4", &tokens, &merges);
        // Spaces are U+2581 before merging; no merge joins "a" and "\u{2581}".
        assert_eq!(encode(&b, &v, "a b"), [0, 2, 1]);
        // Lowest rank first: "\u{2581}a", then "ab", then "\u{2581}a" + "b".
        assert_eq!(encode(&b, &v, "ab ab"), [4, 5]);
        // A character that is no token: its UTF-8 bytes as <0xXX> tokens; bytes without one
        // are dropped, as llama.cpp drops them.
        assert_eq!(encode(&b, &v, "\u{e9}"), [6, 7]);
        assert_eq!(encode(&b, &v, "x"), [] as [u32; 0]);
        // A run of newlines that is a token is taken whole; one that is not goes by the merges.
        assert_eq!(encode(&b, &v, "a\n\n\nb"), [0, 9, 1]);
        assert_eq!(encode(&b, &v, "\n\n"), [8, 8]);
        // The cache gives the same answer the second time.
        assert_eq!(encode(&b, &v, "ab ab"), [4, 5]);
    }

    #[test]
    fn byte_level_spells_bytes_in_the_gpt2_alphabet() {
        // U+0120 is the space byte in GPT-2's alphabet.
        let tokens = ["a", "b", "\u{120}", "\u{120}b", "ab"];
        let (b, v) = bpe("gpt-2", &tokens, &["\u{120} b", "a b"]);
        assert_eq!(encode(&b, &v, "ab b"), [4, 3]);
        // No byte tokens: a byte with no token of its own is dropped.
        assert_eq!(encode(&b, &v, "\u{e9}"), [] as [u32; 0]);
    }
}
