//! Token ids back to text, as llama.cpp's `token_to_piece` and `llama_detokenize`, whole or as a
//! stream.

use super::{attr, unicode, Model, Tokenizer};

impl Tokenizer {
    /// Appends the piece of a token as llama.cpp's `token_to_piece` (without lstrip) gives
    /// it: control and unknown tokens only when `special`.
    pub(super) fn append_piece(&self, id: u32, special: bool, out: &mut Vec<u8>) {
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
                    unescape_whitespace(text, out);
                } else if a & attr::BYTE != 0 {
                    out.push(byte_piece());
                }
            }
            Model::Bpe(ref b) => {
                if a & attr::NORMAL != 0 && b.pre.escape_whitespaces {
                    // Raw UTF-8 with spaces escaped.
                    unescape_whitespace(text, out);
                } else if a & attr::NORMAL != 0 {
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
}

/// Appends `text` with each U+2581 a space again (llama.cpp's `llama_unescape_whitespace`).
fn unescape_whitespace(text: &str, out: &mut Vec<u8>) {
    for (k, part) in text.split('\u{2581}').enumerate() {
        if k > 0 {
            out.push(b' ');
        }
        out.extend_from_slice(part.as_bytes());
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
}
