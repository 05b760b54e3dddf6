//! Unicode helpers, as llama.cpp's `unicode.cpp` defines them: the GPT-2 byte-to-unicode
//! mapping and the codepoint classes the hand-written pre-tokenizers ask about.

use std::sync::OnceLock;

/// GPT-2's byte-level mapping: printable bytes map to themselves, the others to U+0100 upwards.
fn byte_to_char_table() -> &'static [char; 256] {
    static T: OnceLock<[char; 256]> = OnceLock::new();
    T.get_or_init(|| {
        let mut t = ['\0'; 256];
        let mut n = 0u32;
        for b in 0..256u32 {
            let keep = (0x21..=0x7E).contains(&b)
                || (0xA1..=0xAC).contains(&b)
                || (0xAE..=0xFF).contains(&b);
            let c = if keep {
                b
            } else {
                n += 1;
                256 + n - 1
            };
            t[b as usize] = char::from_u32(c).unwrap_or('\u{FFFD}');
        }
        t
    })
}

/// The character a byte stands for in byte-level BPE token texts.
pub(crate) fn byte_to_char(b: u8) -> char {
    byte_to_char_table()[b as usize]
}

/// The byte a byte-level BPE character stands for (None for characters outside the mapping).
pub(crate) fn char_to_byte(c: char) -> Option<u8> {
    let c = c as u32;
    if (0x21..=0x7E).contains(&c) || (0xA1..=0xAC).contains(&c) || (0xAE..=0xFF).contains(&c) {
        return Some(c as u8);
    }
    static REV: OnceLock<Vec<u8>> = OnceLock::new();
    let rev = REV.get_or_init(|| {
        (0..=255u8)
            .filter(|&b| byte_to_char(b) as u32 >= 256)
            .collect::<Vec<u8>>()
    });
    if c >= 256 {
        return rev.get((c - 256) as usize).copied();
    }
    None
}

/// Encode the bytes of `s` with the byte-level mapping.
pub(crate) fn bytes_to_unicode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 2);
    for &b in s.as_bytes() {
        out.push(byte_to_char(b));
    }
    out
}

/// Ranges (inclusive) of the codepoints a `\p{..}+` regex of one class matches, from the
/// regex engine's tables: a string of every scalar value is scanned once; its runs of matches
/// give the ranges.
fn class_ranges(class: &str) -> Vec<(u32, u32)> {
    let all: String = (0u32..=0x10FFFF).filter_map(char::from_u32).collect();
    let Ok(re) = fancy_regex::Regex::new(&format!("{class}+")) else {
        return Vec::new();
    };
    let mut ranges = Vec::new();
    for m in re.find_iter(&all).flatten() {
        let mut chars = m.as_str().chars().map(|c| c as u32);
        let Some(first) = chars.next() else { continue };
        let (mut start, mut prev) = (first, first);
        // A run that steps over the surrogate gap is still one range of scalar values.
        for c in chars {
            if c != prev + 1 && !(prev == 0xD7FF && c == 0xE000) {
                ranges.push((start, prev));
                start = c;
            }
            prev = c;
        }
        ranges.push((start, prev));
    }
    ranges
}

fn in_ranges(ranges: &[(u32, u32)], c: char) -> bool {
    let c = c as u32;
    ranges
        .binary_search_by(|&(lo, hi)| {
            if hi < c {
                std::cmp::Ordering::Less
            } else if lo > c {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        })
        .is_ok()
}

/// `\p{L}`.
pub(crate) fn is_letter(c: char) -> bool {
    if c.is_ascii() {
        return c.is_ascii_alphabetic();
    }
    static R: OnceLock<Vec<(u32, u32)>> = OnceLock::new();
    in_ranges(R.get_or_init(|| class_ranges(r"\p{L}")), c)
}

/// `\p{M}` (general categories Mn, Mc, Me: combining marks), llama.cpp's "accent mark".
pub(crate) fn is_mark(c: char) -> bool {
    if c.is_ascii() {
        return false;
    }
    static R: OnceLock<Vec<(u32, u32)>> = OnceLock::new();
    in_ranges(R.get_or_init(|| class_ranges(r"\p{M}")), c)
}

/// `\p{N}` (general categories Nd, Nl, No).
pub(crate) fn is_number(c: char) -> bool {
    c.is_numeric()
}

/// llama.cpp's whitespace set (the Unicode White_Space property).
pub(crate) fn is_whitespace(c: char) -> bool {
    c.is_whitespace()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_map_round_trips() {
        for b in 0..=255u8 {
            assert_eq!(char_to_byte(byte_to_char(b)), Some(b));
        }
        assert_eq!(byte_to_char(b' '), 'Ġ');
        assert_eq!(byte_to_char(b'\n'), 'Ċ');
        assert_eq!(char_to_byte('x'), Some(b'x'));
        assert_eq!(char_to_byte('€'), None);
    }

    #[test]
    fn categories() {
        assert!(is_letter('a') && is_letter('é') && is_letter('日') && is_letter('Ω'));
        assert!(!is_letter('1') && !is_letter(' ') && !is_letter('!') && !is_letter('\u{093F}'));
        assert!(is_number('7') && is_number('½') && is_number('٣'));
        assert!(is_whitespace('\u{3000}') && is_whitespace('\u{85}') && !is_whitespace('\u{FEFF}'));
        // Combining marks: acute, circumflex, a Devanagari vowel sign (Mc), an enclosing circle (Me).
        assert!(
            is_mark('\u{0301}')
                && is_mark('\u{0302}')
                && is_mark('\u{093F}')
                && is_mark('\u{20DD}')
        );
        assert!(!is_mark('e') && !is_mark('é') && !is_mark('\'') && !is_mark('1'));
    }
}
