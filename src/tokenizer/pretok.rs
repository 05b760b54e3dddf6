//! Pre-tokenizers for byte-level BPE: llama.cpp's table of regex lists keyed by
//! `tokenizer.ggml.pre`, applied as `unicode_regex_split` applies them (each regex splits every
//! piece the previous ones left; text between matches stays a piece of its own). The GPT-2,
//! LLaMA-3, Qwen2 and Qwen3.5 patterns and the newline split run through ports of llama.cpp's
//! hand-written matchers, as llama.cpp does.
//!
//! Most vocabularies are byte-level: each word is spelled in GPT-2's byte-to-unicode alphabet
//! before the merges. The SentencePiece-style BPE vocabularies (Gemma 4's `gemma4` model) merge
//! raw UTF-8 instead, with spaces escaped to U+2581 first (`byte_encode`, `escape_whitespaces`).

use super::unicode::{is_letter, is_mark, is_number, is_whitespace};
use crate::{Error, Result};

const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's pattern where letter runs take combining marks (`\p{M}`) too.
const QWEN35: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Runs of newlines and runs of anything else.
const NEWLINES: &str = r"[^\n]+|[\n]+";

/// One step of the split.
pub(crate) enum Splitter {
    /// llama.cpp's `unicode_regex_split_custom_gpt2`.
    Gpt2,
    /// llama.cpp's `unicode_regex_split_custom_llama3`, `_qwen2` and `_qwen35`: one matcher
    /// whose number runs are at most `digits` long and whose letter runs take combining marks
    /// when `marks`.
    Words {
        digits: usize,
        marks: bool,
    },
    /// llama.cpp's `unicode_regex_split_custom_newlines`.
    Newlines,
    Regex(Box<fancy_regex::Regex>),
}

/// The pre-tokenizer of one `tokenizer.ggml.pre` value, with the vocabulary flags llama.cpp
/// ties to it.
pub(crate) struct PreTokenizer {
    pub name: String,
    steps: Vec<Splitter>,
    /// Detokenizing removes spaces before `?!.,` and some apostrophes.
    pub clean_spaces: bool,
    /// A word that is a token as a whole skips the merges.
    pub ignore_merges: bool,
    /// Default for add_bos when the metadata does not say.
    pub add_bos: bool,
    /// add_bos is on whatever the metadata says (llama.cpp's override for Gemma 4).
    pub force_add_bos: bool,
    /// Words are spelled in GPT-2's byte alphabet before merging; otherwise they merge as raw
    /// UTF-8 and characters that are no token fall back to `<0xXX>` byte tokens.
    pub byte_encode: bool,
    /// Spaces become U+2581 before the split, and U+2581 a space again when decoding.
    pub escape_whitespaces: bool,
    /// A word made only of newlines that is a token as a whole skips the merges.
    pub newline_runs: bool,
    /// The tokenizer model's default BOS id does not apply (ChatGLM's vocabularies).
    pub no_default_bos: bool,
}

impl PreTokenizer {
    pub fn new(pre: &str) -> Result<Self> {
        let mut clean_spaces = true;
        let mut ignore_merges = false;
        let mut add_bos = false;
        let mut force_add_bos = false;
        let mut spm_style = false;
        let mut newline_runs = false;
        let mut no_default_bos = false;
        let exprs: Vec<&str> = match pre {
            "default" => vec![r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2"
            | "jina-v5-nano" => {
                ignore_merges = true;
                add_bos = true;
                vec![LLAMA3]
            }
            "dbrx" | "smaug-bpe" => vec![LLAMA3],
            "chatglm-bpe" => {
                no_default_bos = true;
                vec![LLAMA3]
            }
            "glm4" | "glm5" => {
                no_default_bos = true;
                ignore_merges = true;
                vec![LLAMA3]
            }
            "deepseek-llm" => {
                clean_spaces = false;
                vec![
                    r"[\r\n]",
                    // Written with escapes where NFC would change the characters (Greek with
                    // oxia, Ohm and Kelvin signs), which must stay as llama.cpp has them.
                    "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚ\
                     \u{1E00}-\u{1F15}\u{1F18}-\u{1F1D}\u{1F20}-\u{1F45}\u{1F48}-\u{1F4D}\u{1F50}-\u{1F57}\u{1F59}\u{1F5B}\
                     \u{1F5D}\u{1F5F}-\u{1F7D}\u{1F80}-\u{1FB4}\u{1FB6}-\u{1FBC}\u{1FBE}\u{1FC2}-\u{1FC4}\u{1FC6}-\u{1FCC}\
                     \u{1FD0}-\u{1FD3}\u{1FD6}-\u{1FDB}\u{1FE0}-\u{1FEC}\u{1FF2}-\u{1FF4}\u{1FF6}-\u{1FFC}\u{2102}\u{2107}\
                     \u{210A}-\u{2113}\u{2115}\u{2119}-\u{211D}\u{2124}\u{2126}\u{2128}\u{212A}-\u{212D}\u{212F}-\u{2134}\
                     \u{2139}\u{213C}-\u{213F}\u{2145}-\u{2149}\u{214E}\u{2183}\u{2184}\
                     Ⰰ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
                    r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
                    r"\s+$",
                    r"[一-龥ࠀ-一가-퟿]+",
                    r"\p{N}+",
                ]
            }
            "deepseek-coder" => {
                clean_spaces = false;
                vec![r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿]+", r"\p{N}"]
            }
            "deepseek-v3" | "hunyuan-dense" | "hy_v4" | "joyai-llm" => {
                clean_spaces = false;
                vec![
                    r"\p{N}{1,3}",
                    r"[一-龥぀-ゟ゠-ヿ]+",
                    r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
                ]
            }
            "falcon" => vec![r"[\p{P}\$\+<=>\^~\|`]+", GPT2, r"[0-9][0-9][0-9]"],
            "starcoder" | "refact" | "codeshell" | "exaone" | "minerva-7b" | "mellum2" => vec![r"\p{N}", GPT2],
            "command-r" | "smollm" => {
                clean_spaces = false;
                vec![r"\p{N}", GPT2]
            }
            "gpt-2" | "gpt2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v1-en" | "jina-v2-es" | "jina-v2-de"
            | "jina-v2-code" | "roberta-bpe" | "mpt" | "olmo" | "jais" | "exaone4" | "a.x-4.0" | "mellum" | "modern-bert" => {
                vec![GPT2]
            }
            "trillion" | "granite-docling" => {
                clean_spaces = false;
                vec![GPT2]
            }
            "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "hunyuan" | "solar-open" | "grok-2" => {
                clean_spaces = false;
                vec![QWEN2]
            }
            "qwen35" => {
                clean_spaces = false;
                vec![QWEN35]
            }
            "stablelm2" | "megrez" => vec![QWEN2],
            "laguna" => {
                clean_spaces = false;
                vec![NEWLINES, QWEN2]
            }
            "gemma4" | "granite-embed-multi-311m" => {
                spm_style = true;
                newline_runs = true;
                force_add_bos = true;
                vec![NEWLINES]
            }
            "sarvam-moe" => {
                spm_style = true;
                clean_spaces = false;
                vec![NEWLINES]
            }
            "poro-chat" => {
                clean_spaces = false;
                vec![r" ?[^(\s|.,!?…。，、।۔،)]+"]
            }
            "bloom" | "gpt3-finnish" => vec![r" ?[^(\s|.,!?…。，、।۔،)]+"],
            "viking" => {
                clean_spaces = false;
                vec![r" ?[^(\s|.,!?…。，、।۔،)]+", r"\p{N}"]
            }
            "tekken" => {
                clean_spaces = false;
                ignore_merges = true;
                add_bos = true;
                vec![
                    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
                ]
            }
            "chameleon" => {
                clean_spaces = false;
                add_bos = true;
                vec![
                    r"<sentinel:[0-9]+>",
                    r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
                    r"([\t\n]|    |  )",
                    r"\p{N}",
                    r"[\p{P}!-/:-@\[-`{-~]",
                    GPT2,
                ]
            }
            other => {
                return Err(Error::Tokenizer(format!(
                    "unknown pre-tokenizer type {other:?} (tokenizer.ggml.pre); lethe knows: default, gpt-2, llama3/llama-bpe, \
                     qwen2, qwen35, gemma4, smollm, starcoder, deepseek-*, falcon, tekken, chameleon, laguna, \
                     sarvam-moe and their aliases"
                )))
            }
        };
        let mut steps = Vec::with_capacity(exprs.len());
        for e in exprs {
            steps.push(match e {
                GPT2 => Splitter::Gpt2,
                LLAMA3 => Splitter::Words {
                    digits: 3,
                    marks: false,
                },
                QWEN2 => Splitter::Words {
                    digits: 1,
                    marks: false,
                },
                QWEN35 => Splitter::Words {
                    digits: 1,
                    marks: true,
                },
                NEWLINES => Splitter::Newlines,
                _ => Splitter::Regex(Box::new(fancy_regex::Regex::new(e).map_err(|err| {
                    Error::Tokenizer(format!("pre-tokenizer {pre:?}: bad regex {e:?}: {err}"))
                })?)),
            });
        }
        Ok(Self {
            name: pre.to_string(),
            steps,
            clean_spaces,
            ignore_merges,
            add_bos,
            force_add_bos,
            byte_encode: !spm_style,
            escape_whitespaces: spm_style,
            newline_runs,
            no_default_bos,
        })
    }

    /// Split `text` into words (not yet byte-encoded).
    pub fn split<'a>(&self, text: &'a str) -> Vec<&'a str> {
        let mut pieces: Vec<(usize, usize)> = if text.is_empty() {
            vec![]
        } else {
            vec![(0, text.len())]
        };
        for step in &self.steps {
            let mut next = Vec::with_capacity(pieces.len() * 2);
            for &(s, e) in &pieces {
                let part = &text[s..e];
                match step {
                    Splitter::Gpt2 => split_gpt2(part, s, &mut next),
                    Splitter::Words { digits, marks } => {
                        split_words(part, s, *digits, *marks, &mut next)
                    }
                    Splitter::Newlines => split_newlines(part, s, &mut next),
                    Splitter::Regex(re) => split_regex(re, part, s, &mut next),
                }
            }
            pieces = next;
        }
        pieces.into_iter().map(|(s, e)| &text[s..e]).collect()
    }
}

/// Matches and the text between them each become a piece (as `unicode_regex_split_stl`).
fn split_regex(re: &fancy_regex::Regex, part: &str, base: usize, out: &mut Vec<(usize, usize)>) {
    let mut last = 0;
    for m in re.find_iter(part) {
        let Ok(m) = m else { break }; // backtrack limit: leave the rest as one piece
        if m.start() > last {
            out.push((base + last, base + m.start()));
        }
        if m.end() > m.start() {
            out.push((base + m.start(), base + m.end()));
        }
        last = m.end();
    }
    if last < part.len() {
        out.push((base + last, base + part.len()));
    }
}

/// Codepoints of one piece with their byte offsets; positions past the end read as "none".
struct Cpts {
    chars: Vec<char>,
    offs: Vec<usize>,
}

impl Cpts {
    fn new(part: &str) -> Self {
        let mut chars = Vec::with_capacity(part.len());
        let mut offs = Vec::with_capacity(part.len() + 1);
        for (i, c) in part.char_indices() {
            chars.push(c);
            offs.push(i);
        }
        offs.push(part.len());
        Self { chars, offs }
    }
    fn get(&self, i: usize) -> Option<char> {
        self.chars.get(i).copied()
    }
    fn letter(&self, i: usize) -> bool {
        self.get(i).is_some_and(is_letter)
    }
    fn number(&self, i: usize) -> bool {
        self.get(i).is_some_and(is_number)
    }
    fn space(&self, i: usize) -> bool {
        self.get(i).is_some_and(is_whitespace)
    }
    /// `[^\s\p{L}\p{N}]` for an existing codepoint.
    fn other(&self, i: usize) -> bool {
        self.get(i)
            .is_some_and(|c| !(is_whitespace(c) || is_letter(c) || is_number(c)))
    }
}

struct Emitter<'o> {
    prev: usize,
    base: usize,
    out: &'o mut Vec<(usize, usize)>,
}

impl Emitter<'_> {
    /// Close the piece ending at codepoint `end`; returns its length in codepoints.
    fn add(&mut self, cp: &Cpts, end: usize) -> usize {
        let len = end - self.prev;
        if len > 0 {
            self.out
                .push((self.base + cp.offs[self.prev], self.base + cp.offs[end]));
        }
        self.prev = end;
        len
    }
}

/// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
fn split_gpt2(part: &str, base: usize, out: &mut Vec<(usize, usize)>) {
    let cp = Cpts::new(part);
    let n = cp.chars.len();
    let mut em = Emitter { prev: 0, base, out };
    let mut pos = 0;
    while pos < n {
        let c = cp.chars[pos];
        if c == '\'' && pos + 1 < n {
            let c1 = cp.chars[pos + 1];
            if matches!(c1, 's' | 't' | 'm' | 'd') {
                pos += em.add(&cp, pos + 2);
                continue;
            }
            if pos + 2 < n {
                let c2 = cp.chars[pos + 2];
                if matches!((c1, c2), ('r', 'e') | ('v', 'e') | ('l', 'l')) {
                    pos += em.add(&cp, pos + 3);
                    continue;
                }
            }
        }
        let q = if c == ' ' { pos + 1 } else { pos };
        if cp.letter(q) {
            pos = q;
            while cp.letter(pos) {
                pos += 1;
            }
            em.add(&cp, pos);
            continue;
        }
        if cp.number(q) {
            pos = q;
            while cp.number(pos) {
                pos += 1;
            }
            em.add(&cp, pos);
            continue;
        }
        if cp.other(q) {
            pos = q;
            while cp.other(pos) {
                pos += 1;
            }
            em.add(&cp, pos);
            continue;
        }
        let mut nws = 0;
        while cp.space(pos + nws) {
            nws += 1;
        }
        if nws > 1 && pos + nws < n {
            pos += nws - 1;
            em.add(&cp, pos);
            continue;
        }
        if nws > 0 {
            pos += nws;
            em.add(&cp, pos);
            continue;
        }
        pos += 1;
        em.add(&cp, pos);
    }
}

/// LLaMA-3's `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
/// with numbers of at most `digits` digits (Qwen2: `\p{N}`), and with `\p{M}` beside `\p{L}`
/// in the letter runs and the class of other characters when `marks` (Qwen3.5).
fn split_words(part: &str, base: usize, digits: usize, marks: bool, out: &mut Vec<(usize, usize)>) {
    let cp = Cpts::new(part);
    let n = cp.chars.len();
    let mut em = Emitter { prev: 0, base, out };
    // `\p{L}`, or `[\p{L}\p{M}]` with marks.
    let wordish = |i: usize| cp.letter(i) || (marks && cp.get(i).is_some_and(is_mark));
    // `[^\s\p{L}\p{N}]` (and not `\p{M}` with marks) for an existing codepoint.
    let other = |i: usize| cp.other(i) && !(marks && cp.get(i).is_some_and(is_mark));
    let mut pos = 0;
    while pos < n {
        let c = cp.chars[pos];
        if c == '\'' && pos + 1 < n {
            let c1 = cp.chars[pos + 1].to_ascii_lowercase();
            if matches!(c1, 's' | 't' | 'm' | 'd') {
                pos += em.add(&cp, pos + 2);
                continue;
            }
            if pos + 2 < n {
                let c2 = cp.chars[pos + 2].to_ascii_lowercase();
                if matches!((c1, c2), ('r', 'e') | ('v', 'e') | ('l', 'l')) {
                    pos += em.add(&cp, pos + 3);
                    continue;
                }
            }
        }
        // [^\r\n\p{L}\p{N}]?\p{L}+
        if !(c == '\r' || c == '\n' || is_number(c)) && (wordish(pos) || wordish(pos + 1)) {
            pos += 1;
            while wordish(pos) {
                pos += 1;
            }
            em.add(&cp, pos);
            continue;
        }
        // \p{N}{1,digits}
        if is_number(c) {
            let mut ini = pos;
            while cp.number(pos) {
                pos += 1;
                if pos - ini >= digits {
                    em.add(&cp, pos);
                    ini = pos;
                }
            }
            em.add(&cp, pos);
            continue;
        }
        // <space>?[^\s\p{L}\p{N}]+[\r\n]*
        let q = if c == ' ' { pos + 1 } else { pos };
        if other(q) {
            pos = q;
            while other(pos) {
                pos += 1;
            }
            while matches!(cp.get(pos), Some('\r' | '\n')) {
                pos += 1;
            }
            em.add(&cp, pos);
            continue;
        }
        let mut nws = 0;
        let mut last_rn = 0;
        while cp.space(pos + nws) {
            if matches!(cp.chars[pos + nws], '\r' | '\n') {
                last_rn = pos + nws + 1;
            }
            nws += 1;
        }
        // \s*[\r\n]+
        if last_rn > 0 {
            pos = last_rn;
            em.add(&cp, pos);
            continue;
        }
        // \s+(?!\S)
        if nws > 1 && pos + nws < n {
            pos += nws - 1;
            em.add(&cp, pos);
            continue;
        }
        if nws > 0 {
            pos += nws;
            em.add(&cp, pos);
            continue;
        }
        pos += 1;
        em.add(&cp, pos);
    }
}

/// `[^\n]+|[\n]+`: runs of newlines and runs of everything else.
fn split_newlines(part: &str, base: usize, out: &mut Vec<(usize, usize)>) {
    let b = part.as_bytes();
    let mut start = 0;
    while start < b.len() {
        let newline = b[start] == b'\n';
        let len = b[start..]
            .iter()
            .position(|&x| (x == b'\n') != newline)
            .unwrap_or(b.len() - start);
        out.push((base + start, base + start + len));
        start += len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(pre: &str, text: &str) -> Vec<String> {
        PreTokenizer::new(pre)
            .unwrap()
            .split(text)
            .into_iter()
            .map(String::from)
            .collect()
    }

    #[test]
    fn gpt2_words() {
        assert_eq!(split("gpt-2", "Hello world"), ["Hello", " world"]);
        assert_eq!(
            split("gpt-2", "it's  ok!!  \n"),
            ["it", "'s", " ", " ok", "!!", "  \n"]
        );
        assert_eq!(split("gpt-2", "a   b"), ["a", "  ", " b"]);
        assert_eq!(split("gpt-2", "x 123 y"), ["x", " 123", " y"]);
    }

    #[test]
    fn smollm_splits_digits() {
        assert_eq!(
            split("smollm", "year 2026."),
            ["year", " ", "2", "0", "2", "6", "."]
        );
        assert_eq!(split("smollm", "naïve café"), ["naïve", " café"]);
    }

    #[test]
    fn llama3_words() {
        assert_eq!(
            split("llama3", "Hello, WORLD's 12345"),
            ["Hello", ",", " WORLD", "'s", " ", "123", "45"]
        );
        assert_eq!(split("llama3", "a\n\n  b"), ["a", "\n\n", " ", " b"]);
        assert_eq!(split("llama3", "x  "), ["x", "  "]);
    }

    #[test]
    fn qwen2_single_digits() {
        assert_eq!(split("qwen2", "ab 123"), ["ab", " ", "1", "2", "3"]);
    }

    #[test]
    fn qwen35_letter_runs_take_marks() {
        // "Vie\u{0302}\u{0301}t": e with two combining marks stays in the word with qwen35;
        // qwen2 cuts the word at the first mark and keeps the marks as a piece of their own.
        let text = "Vie\u{0302}\u{0301}t Nam";
        assert_eq!(split("qwen35", text), ["Vie\u{0302}\u{0301}t", " Nam"]);
        assert_eq!(
            split("qwen2", text),
            ["Vie", "\u{0302}\u{0301}", "t", " Nam"]
        );
        // A mark after a space joins the space and the letters that follow.
        assert_eq!(split("qwen35", "a \u{0301}b"), ["a", " \u{0301}b"]);
        // Digits one by one, punctuation runs, newlines as in qwen2.
        assert_eq!(
            split("qwen35", "x 12!?\n\ny"),
            ["x", " ", "1", "2", "!?\n\n", "y"]
        );
    }

    #[test]
    fn gemma4_splits_on_newline_runs() {
        let p = PreTokenizer::new("gemma4").unwrap();
        assert!(!p.byte_encode && p.escape_whitespaces && p.newline_runs && p.force_add_bos);
        assert_eq!(split("gemma4", "a b\n\n c\n"), ["a b", "\n\n", " c", "\n"]);
        assert_eq!(split("gemma4", "\n"), ["\n"]);
        assert!(split("gemma4", "").is_empty());
    }

    #[test]
    fn aliases_share_their_patterns_and_flags() {
        let p = PreTokenizer::new("glm5").unwrap();
        assert!(p.ignore_merges && p.no_default_bos && p.clean_spaces);
        let p = PreTokenizer::new("sarvam-moe").unwrap();
        assert!(p.escape_whitespaces && !p.byte_encode && !p.newline_runs && !p.force_add_bos);
        assert!(!p.clean_spaces);
        assert!(!PreTokenizer::new("grok-2").unwrap().clean_spaces);
        let text = "Hello, WORLD's 12345\n\n  x";
        assert_eq!(split("jina-v5-nano", text), split("llama3", text));
        assert_eq!(split("grok-2", text), split("qwen2", text));
        assert_eq!(split("hy_v4", text), split("deepseek-v3", text));
        // laguna splits on newline runs first, then as qwen2.
        assert_eq!(split("laguna", "a b\n\n 1"), ["a", " b", "\n\n", " ", "1"]);
    }

    #[test]
    fn default_pre() {
        assert_eq!(
            split("default", "a+b=1234"),
            ["a", "+", "b", "=", "123", "4"]
        );
    }

    #[test]
    fn unknown_pre_is_an_error() {
        let e = PreTokenizer::new("no-such-pre").err().unwrap();
        assert!(e.to_string().contains("no-such-pre"));
    }

    #[test]
    fn no_panics_on_odd_text() {
        for pre in [
            "default",
            "gpt-2",
            "llama3",
            "qwen2",
            "qwen35",
            "gemma4",
            "sarvam-moe",
            "laguna",
            "smollm",
            "deepseek-llm",
            "deepseek-coder",
            "deepseek-v3",
            "falcon",
            "poro-chat",
            "viking",
            "tekken",
            "chameleon",
        ] {
            let p = PreTokenizer::new(pre).unwrap();
            for t in [
                "",
                " ",
                "\u{0}\u{1}\u{7f}",
                "'",
                "' ",
                "\r\n\r\n",
                "\u{FFFF}\u{10FFFF}",
                "  \u{3000}x",
                "Ὗώ Ωk 1234 ab",
            ] {
                let parts = p.split(t);
                assert_eq!(parts.concat(), t, "{pre} {t:?}");
            }
        }
    }
}
