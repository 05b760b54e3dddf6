//! Byte-level BPE (`tokenizer.ggml.model = "gpt2"`), as llama.cpp's `llm_tokenizer_bpe_session`.

use super::pretok::PreTokenizer;
use super::unicode::{byte_to_char, bytes_to_unicode};
use super::vocab::Vocab;
use super::FxHasher;
use crate::gguf::StrArray;
use crate::{Error, Result};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::BuildHasherDefault;
use std::sync::Mutex;

/// Most words cached before the cache is cleared.
const CACHE_MAX: usize = 1 << 16;

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
        Ok(Self {
            pre,
            n_vocab,
            ranks,
            merged,
            byte_ids,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Tokenize one raw-text fragment (no special tokens in it).
    pub fn encode(&self, text: &str, vocab: &Vocab, out: &mut Vec<u32>) {
        for raw in self.pre.split(text) {
            let word = bytes_to_unicode(raw);
            if let Ok(cache) = self.cache.lock() {
                if let Some(ids) = cache.get(&word) {
                    out.extend_from_slice(ids);
                    continue;
                }
            }
            let ids = self.encode_word(&word, raw.as_bytes(), vocab);
            out.extend_from_slice(&ids);
            if let Ok(mut cache) = self.cache.lock() {
                if cache.len() >= CACHE_MAX {
                    cache.clear();
                }
                cache.insert(word, ids);
            }
        }
    }

    /// Merge the characters of `word` (`raw`'s bytes as `bytes_to_unicode` spells them).
    fn encode_word(&self, word: &str, raw: &[u8], vocab: &Vocab) -> Vec<u32> {
        if self.pre.ignore_merges {
            if let Some(id) = vocab.get(word) {
                return vec![id];
            }
        }
        let n = raw.len();
        let mut syms: Vec<Sym> = Vec::with_capacity(n);
        for (i, ((start, c), &b)) in word.char_indices().zip(raw).enumerate() {
            syms.push(Sym {
                start,
                len: c.len_utf8(),
                id: self.byte_ids[b as usize],
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
            // No token: llama.cpp falls back to single-byte tokens where they exist.
            for &b in &word.as_bytes()[s.start..s.start + s.len] {
                if b.is_ascii() {
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
