//! Byte-level BPE (`tokenizer.ggml.model = "gpt2"`), as llama.cpp's `llm_tokenizer_bpe_session`.

use super::pretok::PreTokenizer;
use super::unicode::bytes_to_unicode;
use super::{FxHasher, TokenMap};
use crate::{Error, Result};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::BuildHasherDefault;
use std::sync::Mutex;

/// Most words cached before the cache is cleared.
const CACHE_MAX: usize = 1 << 16;

pub(crate) struct Bpe {
    pub pre: PreTokenizer,
    /// Strings that appear in merges, interned.
    parts: TokenMap,
    /// (left, right) interned ids -> rank.
    ranks: HashMap<(u32, u32), u32, BuildHasherDefault<FxHasher>>,
    cache: Mutex<HashMap<String, Vec<u32>>>,
}

#[derive(Clone, Copy)]
struct Sym {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

impl Bpe {
    pub fn new(pre: PreTokenizer, merges: &[&str]) -> Result<Self> {
        let mut parts = TokenMap::default();
        let mut ranks: HashMap<(u32, u32), u32, BuildHasherDefault<FxHasher>> =
            HashMap::with_capacity_and_hasher(merges.len(), Default::default());
        let mut intern = |s: &str| -> u32 {
            if let Some(&i) = parts.get(s) {
                return i;
            }
            let i = parts.len() as u32;
            parts.insert(s.to_string(), i);
            i
        };
        for (rank, m) in merges.iter().enumerate() {
            // llama.cpp splits at the first space after the first byte.
            let pos = m
                .as_bytes()
                .iter()
                .skip(1)
                .position(|&b| b == b' ')
                .map(|p| p + 1);
            let (a, b) = match pos {
                Some(p) => (&m[..p], &m[p + 1..]),
                None => ("", ""),
            };
            let key = (intern(a), intern(b));
            // First rank wins (std::map::emplace).
            ranks.entry(key).or_insert(rank as u32);
        }
        if merges.is_empty() {
            return Err(Error::Tokenizer(
                "gpt2 tokenizer without merges (tokenizer.ggml.merges)".into(),
            ));
        }
        Ok(Self {
            pre,
            parts,
            ranks,
            cache: Mutex::new(HashMap::new()),
        })
    }

    fn rank(&self, a: &str, b: &str) -> Option<u32> {
        let a = *self.parts.get(a)?;
        let b = *self.parts.get(b)?;
        self.ranks.get(&(a, b)).copied()
    }

    /// Tokenize one raw-text fragment (no special tokens in it).
    pub fn encode(&self, text: &str, vocab: &TokenMap, out: &mut Vec<u32>) {
        for word in self.pre.split(text) {
            let word = bytes_to_unicode(word);
            if let Ok(cache) = self.cache.lock() {
                if let Some(ids) = cache.get(&word) {
                    out.extend_from_slice(ids);
                    continue;
                }
            }
            let ids = self.encode_word(&word, vocab);
            out.extend_from_slice(&ids);
            if let Ok(mut cache) = self.cache.lock() {
                if cache.len() >= CACHE_MAX {
                    cache.clear();
                }
                cache.insert(word, ids);
            }
        }
    }

    fn encode_word(&self, word: &str, vocab: &TokenMap) -> Vec<u32> {
        if self.pre.ignore_merges {
            if let Some(&id) = vocab.get(word) {
                return vec![id];
            }
        }
        let mut syms: Vec<Sym> = Vec::with_capacity(word.len());
        let n_chars = word.chars().count();
        for (i, (start, c)) in word.char_indices().enumerate() {
            syms.push(Sym {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: if i + 1 < n_chars { Some(i + 1) } else { None },
            });
        }
        // (rank, left, right, size): min rank first, then leftmost.
        let mut queue: BinaryHeap<Reverse<(u32, usize, usize, usize)>> = BinaryHeap::new();
        let text = |s: &Sym| &word[s.start..s.start + s.len];
        let push = |queue: &mut BinaryHeap<_>, syms: &[Sym], l: Option<usize>, r: Option<usize>| {
            let (Some(l), Some(r)) = (l, r) else { return };
            if let Some(rank) = self.rank(text(&syms[l]), text(&syms[r])) {
                queue.push(Reverse((rank, l, r, syms[l].len + syms[r].len)));
            }
        };
        for i in 1..syms.len() {
            push(&mut queue, &syms, Some(i - 1), Some(i));
        }
        while let Some(Reverse((_, l, r, size))) = queue.pop() {
            let (ls, rs) = (syms[l], syms[r]);
            if ls.len == 0 || rs.len == 0 || ls.len + rs.len != size || ls.next != Some(r) {
                continue; // outdated
            }
            syms[l].len += rs.len;
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
            let t = text(s);
            match vocab.get(t) {
                Some(&id) => ids.push(id),
                None => {
                    // llama.cpp falls back to single-byte tokens where they exist.
                    for &b in t.as_bytes() {
                        if b.is_ascii() {
                            let mut buf = [0u8; 4];
                            if let Some(&id) =
                                vocab.get(char::from(b).encode_utf8(&mut buf) as &str)
                            {
                                ids.push(id);
                            }
                        }
                    }
                }
            }
        }
        ids
    }
}
