//! The vocabulary's texts in one buffer, with an open-addressing text -> id index that stores
//! only ids (the texts are compared in place): about 4 bytes of text plus 12 of index per token,
//! against ~80 for a `HashMap<String, u32>` beside a `Vec<String>`.

use super::FxHasher;
use crate::gguf::StrArray;
use std::hash::Hasher;

const EMPTY: u32 = u32::MAX;

pub(crate) struct Vocab {
    texts: StrArray,
    /// Ids by hash of their text, linear probing; a power-of-two length at most half full.
    slots: Box<[u32]>,
}

fn hash(s: &[u8]) -> usize {
    let mut h = FxHasher::default();
    h.write(s);
    h.finish() as usize
}

impl Vocab {
    /// Indexes `texts`; where texts repeat, the first id wins. Fewer than `u32::MAX` texts.
    pub fn new(texts: StrArray) -> Self {
        let n_slots = (texts.len() * 2).max(16).next_power_of_two();
        let mut v = Self {
            texts,
            slots: vec![EMPTY; n_slots].into_boxed_slice(),
        };
        let mask = n_slots - 1;
        for id in 0..v.texts.len() {
            let t = v.text(id as u32).as_bytes();
            let mut i = hash(t) & mask;
            loop {
                let s = v.slots[i];
                if s == EMPTY {
                    v.slots[i] = id as u32;
                    break;
                }
                if v.text(s).as_bytes() == t {
                    break;
                }
                i = (i + 1) & mask;
            }
        }
        v
    }

    pub fn get(&self, text: &str) -> Option<u32> {
        let t = text.as_bytes();
        let mask = self.slots.len() - 1;
        let mut i = hash(t) & mask;
        loop {
            let s = self.slots[i];
            if s == EMPTY {
                return None;
            }
            if self.text(s).as_bytes() == t {
                return Some(s);
            }
            i = (i + 1) & mask;
        }
    }

    /// The text of `id` ("" outside the vocabulary).
    pub fn text(&self, id: u32) -> &str {
        self.texts.get(id as usize).unwrap_or("")
    }

    pub fn len(&self) -> usize {
        self.texts.len()
    }

    pub fn texts(&self) -> &StrArray {
        &self.texts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_id_wins_and_misses_are_none() {
        let v = Vocab::new(["a", "bc", "a", "", "日本"].iter().collect());
        assert_eq!(v.get("a"), Some(0));
        assert_eq!(v.get("bc"), Some(1));
        assert_eq!(v.get(""), Some(3));
        assert_eq!(v.get("日本"), Some(4));
        assert_eq!(v.get("b"), None);
        assert_eq!(v.text(2), "a");
        assert_eq!(v.text(99), "");
        let many: StrArray = (0..5000).map(|i| format!("t{i}")).collect();
        let v = Vocab::new(many);
        assert!((0..5000).all(|i| v.get(&format!("t{i}")) == Some(i)));
        assert_eq!(v.get("t5000"), None);
    }
}
