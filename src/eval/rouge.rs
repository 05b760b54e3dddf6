//! ROUGE-L recall as Google's `rouge_score` package computes it with
//! `RougeScorer(['rougeL'], use_stemmer=True).score(target, prediction)['rougeL'].recall`,
//! which is how TOFU scores a generated answer against the ground truth.

use super::stem::stem;

/// `rouge_score`'s tokens of `text` with stemming on: the text is lowercased, every character
/// that is not `a-z` or `0-9` becomes a separator, and tokens longer than 3 characters are
/// stemmed with NLTK's Porter stemmer ([`stem`]); shorter ones are kept as they are.
///
/// Lowercasing is Unicode's, as Python's `str.lower`, so a character that lowercases to ASCII
/// (the Kelvin sign to `k`, `İ` to `i` and a combining dot) counts as that ASCII letter.
pub fn tokenize(text: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut cur = String::new();
    for c in text.chars().flat_map(char::to_lowercase) {
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            cur.push(c);
        } else if !cur.is_empty() {
            tokens.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        tokens.push(cur);
    }
    for t in &mut tokens {
        if t.len() > 3 {
            *t = stem(t);
        }
    }
    // rouge_score drops anything not matching ^[a-z0-9]+$; stems of such tokens always match.
    tokens.retain(|t| {
        !t.is_empty()
            && t.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    });
    tokens
}

/// Length of the longest common subsequence of two token sequences.
pub fn lcs_len<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    // One row of the DP table over `b`, updated in place; `diag` holds the previous row's
    // value to the left.
    let mut row = vec![0usize; b.len() + 1];
    for x in a {
        let mut diag = 0;
        for (j, y) in b.iter().enumerate() {
            let up = row[j + 1];
            row[j + 1] = if x == y { diag + 1 } else { up.max(row[j]) };
            diag = up;
        }
    }
    row[b.len()]
}

/// ROUGE-L recall of `prediction` against `target`: LCS(target, prediction) / |target| over the
/// [`tokenize`] tokens, and 0 when either has no token (as `rouge_score`).
pub fn rouge_l_recall(target: &str, prediction: &str) -> f64 {
    let t = tokenize(target);
    let p = tokenize(prediction);
    if t.is_empty() || p.is_empty() {
        return 0.0;
    }
    lcs_len(&t, &p) as f64 / t.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lcs_small() {
        assert_eq!(lcs_len(&[1, 2, 3, 4], &[2, 4, 3]), 2);
        assert_eq!(lcs_len::<u8>(&[], &[1]), 0);
        assert_eq!(lcs_len(&["a", "b", "c"], &["a", "b", "c"]), 3);
    }

    #[test]
    fn recall_counts_target_tokens() {
        assert_eq!(rouge_l_recall("The cat sat.", "the CAT"), 2.0 / 3.0);
        assert_eq!(rouge_l_recall("", "anything"), 0.0);
        assert_eq!(rouge_l_recall("!!!", "!!!"), 0.0);
    }
}
