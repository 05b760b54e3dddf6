//! The Porter stemmer as NLTK runs it by default (`PorterStemmer()`, mode `NLTK_EXTENSIONS`):
//! Porter's 1980 algorithm with the changes Martin Porter later endorsed and NLTK's own, among
//! them a table of irregular forms, `-ies` / `-ied` kept as `-ie` in 4-letter words, `y -> i`
//! only after a consonant, `-alli` and `-logi` handled in step 2, and words of at most two
//! letters left alone. ROUGE-L with stemming (`rouge_score`) stems with it.
//!
//! A word is handled as a sequence of Unicode scalar values, as Python indexes a `str`.

/// NLTK's irregular forms: a word found here stems to the form given, without the rules.
const IRREGULAR: [(&str, &str); 16] = [
    ("sky", "sky"),
    ("skies", "sky"),
    ("dying", "die"),
    ("lying", "lie"),
    ("tying", "tie"),
    ("news", "news"),
    ("innings", "inning"),
    ("inning", "inning"),
    ("outings", "outing"),
    ("outing", "outing"),
    ("cannings", "canning"),
    ("canning", "canning"),
    ("howe", "howe"),
    ("proceed", "proceed"),
    ("exceed", "exceed"),
    ("succeed", "succeed"),
];

type Word = Vec<char>;

/// The stem of `word` (lowercased first), as NLTK's `PorterStemmer().stem(word)` gives it.
pub fn stem(word: &str) -> String {
    let lower = word.to_lowercase();
    if let Some((_, s)) = IRREGULAR.iter().find(|(w, _)| *w == lower) {
        return (*s).to_string();
    }
    // NLTK measures the length of the word as given, before lowercasing.
    if word.chars().count() <= 2 {
        return lower;
    }
    let mut w: Word = lower.chars().collect();
    w = step1a(w);
    w = step1b(w);
    w = step1c(w);
    w = step2(w);
    w = step3(w);
    w = step4(w);
    w = step5a(w);
    w = step5b(w);
    w.into_iter().collect()
}

fn is_vowel(c: char) -> bool {
    matches!(c, 'a' | 'e' | 'i' | 'o' | 'u')
}

/// Consonant flags of every letter: not a vowel, and a `y` only when it starts the word or
/// follows a vowel (a `y` after a consonant is a vowel).
fn consonants(w: &[char]) -> Vec<bool> {
    let mut flags: Vec<bool> = Vec::with_capacity(w.len());
    for (i, &c) in w.iter().enumerate() {
        let cons = if is_vowel(c) {
            false
        } else if c == 'y' {
            i == 0 || !flags[i - 1]
        } else {
            true
        };
        flags.push(cons);
    }
    flags
}

fn is_consonant(w: &[char], i: usize) -> bool {
    consonants(&w[..=i])[i]
}

/// Porter's measure m: the number of vowel-run -> consonant-run transitions.
fn measure(w: &[char]) -> usize {
    consonants(w).windows(2).filter(|p| !p[0] && p[1]).count()
}

fn contains_vowel(w: &[char]) -> bool {
    consonants(w).iter().any(|&c| !c)
}

/// Condition *d: ends with a doubled consonant.
fn ends_double_consonant(w: &[char]) -> bool {
    let n = w.len();
    n >= 2 && w[n - 1] == w[n - 2] && is_consonant(w, n - 1)
}

/// Condition *o: ends consonant-vowel-consonant, the last not w, x or y; NLTK also accepts a
/// two-letter vowel-consonant word.
fn ends_cvc(w: &[char]) -> bool {
    let n = w.len();
    (n >= 3
        && is_consonant(w, n - 3)
        && !is_consonant(w, n - 2)
        && is_consonant(w, n - 1)
        && !matches!(w[n - 1], 'w' | 'x' | 'y'))
        || (n == 2 && !is_consonant(w, 0) && is_consonant(w, 1))
}

fn ends(w: &[char], suffix: &str) -> bool {
    let n = suffix.chars().count();
    w.len() >= n && w[w.len() - n..].iter().copied().eq(suffix.chars())
}

/// `w` without its last `n` letters, followed by `with`.
fn replace(w: &[char], n: usize, with: &str) -> Word {
    let mut out: Word = w[..w.len() - n].to_vec();
    out.extend(with.chars());
    out
}

/// A condition on the stem left once the suffix is removed.
type Cond<'a> = &'a dyn Fn(&[char]) -> bool;

/// Applies the first rule whose suffix `w` ends with: its replacement when the condition holds
/// (or there is none), else `w` unchanged; later rules are not tried either way.
fn apply_rules(w: Word, rules: &[(&str, &str, Option<Cond>)]) -> Word {
    for (suffix, with, cond) in rules {
        if ends(&w, suffix) {
            let n = suffix.chars().count();
            let stem = &w[..w.len() - n];
            return match cond {
                Some(c) if !c(stem) => w,
                _ => replace(&w, n, with),
            };
        }
    }
    w
}

fn m_gt0(s: &[char]) -> bool {
    measure(s) > 0
}

fn m_gt1(s: &[char]) -> bool {
    measure(s) > 1
}

fn step1a(w: Word) -> Word {
    if ends(&w, "ies") && w.len() == 4 {
        return replace(&w, 3, "ie");
    }
    apply_rules(
        w,
        &[
            ("sses", "ss", None),
            ("ies", "i", None),
            ("ss", "ss", None),
            ("s", "", None),
        ],
    )
}

fn step1b(w: Word) -> Word {
    if ends(&w, "ied") {
        return replace(&w, 3, if w.len() == 4 { "ie" } else { "i" });
    }
    if ends(&w, "eed") {
        let stem = &w[..w.len() - 3];
        return if measure(stem) > 0 {
            replace(&w, 3, "ee")
        } else {
            w
        };
    }
    let mut inter = None;
    for suffix in ["ed", "ing"] {
        if ends(&w, suffix) {
            let s = &w[..w.len() - suffix.len()];
            if contains_vowel(s) {
                inter = Some(s.to_vec());
                break;
            }
        }
    }
    let Some(s) = inter else { return w };
    for (suffix, with) in [("at", "ate"), ("bl", "ble"), ("iz", "ize")] {
        if ends(&s, suffix) {
            return replace(&s, 2, with);
        }
    }
    if ends_double_consonant(&s) {
        let last = s[s.len() - 1];
        return if matches!(last, 'l' | 's' | 'z') {
            s
        } else {
            s[..s.len() - 1].to_vec()
        };
    }
    if measure(&s) == 1 && ends_cvc(&s) {
        return replace(&s, 0, "e");
    }
    s
}

fn step1c(w: Word) -> Word {
    let cond = |s: &[char]| s.len() > 1 && is_consonant(s, s.len() - 1);
    apply_rules(w, &[("y", "i", Some(&cond))])
}

fn step2(w: Word) -> Word {
    if ends(&w, "alli") && m_gt0(&w[..w.len() - 4]) {
        return step2(replace(&w, 4, "al"));
    }
    let pos: Cond = &m_gt0;
    // The 'l' of -logi stays with the stem, so that 'geo-', 'theo-' etc. have m > 0.
    let whole = w.clone();
    let logi = move |_: &[char]| m_gt0(&whole[..whole.len() - 3]);
    apply_rules(
        w,
        &[
            ("ational", "ate", Some(pos)),
            ("tional", "tion", Some(pos)),
            ("enci", "ence", Some(pos)),
            ("anci", "ance", Some(pos)),
            ("izer", "ize", Some(pos)),
            ("bli", "ble", Some(pos)),
            ("alli", "al", Some(pos)),
            ("entli", "ent", Some(pos)),
            ("eli", "e", Some(pos)),
            ("ousli", "ous", Some(pos)),
            ("ization", "ize", Some(pos)),
            ("ation", "ate", Some(pos)),
            ("ator", "ate", Some(pos)),
            ("alism", "al", Some(pos)),
            ("iveness", "ive", Some(pos)),
            ("fulness", "ful", Some(pos)),
            ("ousness", "ous", Some(pos)),
            ("aliti", "al", Some(pos)),
            ("iviti", "ive", Some(pos)),
            ("biliti", "ble", Some(pos)),
            ("fulli", "ful", Some(pos)),
            ("logi", "log", Some(&logi)),
        ],
    )
}

fn step3(w: Word) -> Word {
    let pos: Cond = &m_gt0;
    apply_rules(
        w,
        &[
            ("icate", "ic", Some(pos)),
            ("ative", "", Some(pos)),
            ("alize", "al", Some(pos)),
            ("iciti", "ic", Some(pos)),
            ("ical", "ic", Some(pos)),
            ("ful", "", Some(pos)),
            ("ness", "", Some(pos)),
        ],
    )
}

fn step4(w: Word) -> Word {
    let gt1: Cond = &m_gt1;
    let ion = |s: &[char]| m_gt1(s) && matches!(s.last(), Some('s' | 't'));
    apply_rules(
        w,
        &[
            ("al", "", Some(gt1)),
            ("ance", "", Some(gt1)),
            ("ence", "", Some(gt1)),
            ("er", "", Some(gt1)),
            ("ic", "", Some(gt1)),
            ("able", "", Some(gt1)),
            ("ible", "", Some(gt1)),
            ("ant", "", Some(gt1)),
            ("ement", "", Some(gt1)),
            ("ment", "", Some(gt1)),
            ("ent", "", Some(gt1)),
            ("ion", "", Some(&ion)),
            ("ou", "", Some(gt1)),
            ("ism", "", Some(gt1)),
            ("ate", "", Some(gt1)),
            ("iti", "", Some(gt1)),
            ("ous", "", Some(gt1)),
            ("ive", "", Some(gt1)),
            ("ize", "", Some(gt1)),
        ],
    )
}

/// Step 5a tries both of its rules (m > 1, then m = 1 and not *o), unlike the other steps.
fn step5a(w: Word) -> Word {
    if ends(&w, "e") {
        let stem = &w[..w.len() - 1];
        let m = measure(stem);
        if m > 1 || (m == 1 && !ends_cvc(stem)) {
            return stem.to_vec();
        }
    }
    w
}

fn step5b(w: Word) -> Word {
    // The measure is taken of the word less one 'l'.
    if ends(&w, "ll") && m_gt1(&w[..w.len() - 1]) {
        return replace(&w, 2, "l");
    }
    w
}

#[cfg(test)]
mod tests {
    use super::stem;

    #[test]
    fn porter_paper_examples() {
        for (w, s) in [
            ("caresses", "caress"),
            ("ponies", "poni"),
            ("ties", "tie"),
            ("cats", "cat"),
            ("feed", "feed"),
            ("agreed", "agre"),
            ("plastered", "plaster"),
            ("motoring", "motor"),
            ("hopping", "hop"),
            ("falling", "fall"),
            ("filing", "file"),
            ("happy", "happi"),
            ("relational", "relat"),
            ("generalization", "gener"),
            ("controll", "control"),
            ("dying", "die"),
            ("is", "is"),
        ] {
            assert_eq!(stem(w), s, "{w}");
        }
    }
}
