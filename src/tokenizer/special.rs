//! Special tokens: the ids that end a turn or a generation (named by the metadata, else found
//! by their text as llama.cpp does), and the split of a text on the special tokens in it.

use super::vocab::Vocab;
use super::{attr, Tokenizer};
use std::collections::{HashMap, HashSet};

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

/// The special tokens the metadata may name (`tokenizer.ggml.*_token_id`): the tokenizer
/// model's defaults, then the file's ids, then (for those still unknown) ids found by text.
#[derive(Debug, Default)]
pub(super) struct SpecialIds {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub eot: Option<u32>,
    pub eom: Option<u32>,
    pub unk: Option<u32>,
    pub fim_pad: Option<u32>,
    pub fim_rep: Option<u32>,
    pub fim_sep: Option<u32>,
}

impl SpecialIds {
    /// Finds the end-of-turn, end-of-message and fill-in-the-middle tokens the metadata left out
    /// by their text, and the end-of-generation tokens, as llama.cpp does (in id order here);
    /// marks them in `attrs` (control, or user-defined and normal where llama.cpp re-marks
    /// them). Returns the end-of-generation set (llama.cpp's `llama_vocab_is_eog`).
    pub fn detect(&mut self, vocab: &Vocab, attrs: &mut [u16]) -> HashSet<u32> {
        let tokens = vocab.texts();
        let mark_control = |attrs: &mut [u16], id: u32| attrs[id as usize] |= attr::CONTROL;
        for (id, t) in tokens.iter().enumerate() {
            let id = id as u32;
            for (slot, texts) in [
                (&mut self.eot, EOT_TEXTS),
                (&mut self.eom, &["<|eom_id|>"][..]),
                (&mut self.fim_pad, FIM_PAD_TEXTS),
                (&mut self.fim_rep, FIM_REP_TEXTS),
                (&mut self.fim_sep, FIM_SEP_TEXTS),
            ] {
                if slot.is_none() && texts.contains(&t) {
                    *slot = Some(id);
                    mark_control(attrs, id);
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
        let mut eog: HashSet<u32> = [self.fim_pad, self.fim_rep, self.fim_sep]
            .into_iter()
            .flatten()
            .collect();
        for (id, t) in tokens.iter().enumerate() {
            if EOG_TEXTS.contains(&t) {
                eog.insert(id as u32);
                mark_control(attrs, id as u32);
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
        eog.extend([self.eos, self.eot, self.eom].into_iter().flatten());
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
        eog
    }
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

/// The control, user-defined and unknown tokens, in the order a text is split on them.
pub(super) struct SpecialTokens {
    /// Each token's rank: longest text first, then lowest id.
    rank: HashMap<u32, usize>,
    trie: Trie,
}

impl SpecialTokens {
    pub fn new(vocab: &Vocab, attrs: &[u16]) -> Self {
        let mut order: Vec<u32> = (0..vocab.len() as u32)
            .filter(|&i| {
                attrs[i as usize] & (attr::CONTROL | attr::USER_DEFINED | attr::UNKNOWN) != 0
            })
            .collect();
        order.sort_by(|&a, &b| {
            vocab
                .text(b)
                .len()
                .cmp(&vocab.text(a).len())
                .then(a.cmp(&b))
        });
        let rank = order.iter().enumerate().map(|(r, &id)| (id, r)).collect();
        let mut trie = Trie::default();
        for &id in &order {
            trie.insert(vocab.text(id).as_bytes(), id);
        }
        Self { rank, trie }
    }
}

/// A piece of a text partitioned on special tokens.
pub(super) enum Frag<'a> {
    Text(&'a str),
    Token(u32),
}

impl Tokenizer {
    /// Split the text on special tokens (llama.cpp's `tokenizer_st_partition`): tokens in
    /// priority order (longest first), each splitting every remaining text fragment at its
    /// occurrences, left to right.
    pub(super) fn partition<'a>(&self, text: &'a str, parse_special: bool) -> Vec<Frag<'a>> {
        let mut frags = if text.is_empty() {
            vec![]
        } else {
            vec![Frag::Text(text)]
        };
        let mut cands: Vec<u32> = self
            .special
            .trie
            .occurring(text.as_bytes())
            .into_iter()
            .filter(|&id| {
                parse_special || self.attrs[id as usize] & (attr::CONTROL | attr::UNKNOWN) == 0
            })
            .collect();
        cands.sort_by_key(|id| self.special.rank.get(id).copied().unwrap_or(usize::MAX));
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
