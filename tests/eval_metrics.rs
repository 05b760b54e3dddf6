//! `lethe::eval` against its reference implementations, through the values recorded in
//! tests/fixtures/eval/ by `make_fixtures.py`: NLTK's Porter stemmer and `rouge_score`
//! (ROUGE-L recall), the latter also against the recalls in the ULD authors' TOFU logs
//! (tests/fixtures/tofu/reference/), and `scipy.stats.ks_2samp`.

use lethe::eval::ks::ks_2samp;
use lethe::eval::rouge::{rouge_l_recall, tokenize};
use lethe::eval::stem::stem;
use serde_json::Value;
use std::path::PathBuf;

fn fixture(rel: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The values of a log field: a list, or a dict keyed by item index.
fn items(v: &Value) -> Vec<&Value> {
    match v {
        Value::Array(a) => a.iter().collect(),
        Value::Object(o) => {
            let mut kv: Vec<(usize, &Value)> = o
                .iter()
                .map(|(k, v)| (k.parse().expect("index key"), v))
                .collect();
            kv.sort_by_key(|(k, _)| *k);
            kv.into_iter().map(|(_, v)| v).collect()
        }
        other => panic!("not a list or dict: {other}"),
    }
}

// ---- ROUGE-L and the stemmer ----

#[test]
fn stem_matches_nltk_on_tofu_vocabulary() {
    let words = fixture("eval/stem.json");
    let words = words.as_array().unwrap();
    assert!(words.len() > 7000, "{} words", words.len());
    let wrong: Vec<String> = words
        .iter()
        .filter_map(|p| {
            let (w, s) = (p[0].as_str().unwrap(), p[1].as_str().unwrap());
            let got = stem(w);
            (got != s).then(|| format!("{w}: {got} (NLTK {s})"))
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {} differ: {:?}",
        wrong.len(),
        words.len(),
        &wrong[..wrong.len().min(20)]
    );
}

#[test]
fn tokenize_matches_rouge_score() {
    let f = fixture("eval/rouge.json");
    for case in f["tokenize"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<&str> = case["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        assert_eq!(tokenize(text), want, "{text:?}");
    }
}

#[test]
fn rouge_l_recall_matches_rouge_score() {
    let f = fixture("eval/rouge.json");
    let pairs = f["pairs"].as_array().unwrap();
    assert!(pairs.len() >= 200);
    for p in pairs {
        let (t, pred) = (
            p["target"].as_str().unwrap(),
            p["prediction"].as_str().unwrap(),
        );
        let want = p["recall"].as_f64().unwrap();
        let got = rouge_l_recall(t, pred);
        assert!(
            (got - want).abs() <= 1e-12,
            "{t:?} / {pred:?}: {got} vs {want}"
        );
    }
}

/// Each generation of the reference log is `[prompt, generated answer, ground truth]`, and its
/// `rougeL_recall` is rouge_score's `score(ground_truth, generated)`.
#[test]
fn rouge_l_recall_reproduces_reference_log() {
    let log = fixture("tofu/reference/retain90_llama2_eval_log_aggregated.json");
    let mut n = 0;
    for (set, data) in log.as_object().unwrap() {
        let gens = items(&data["generated_text"]);
        let want = items(&data["rougeL_recall"]);
        assert_eq!(gens.len(), want.len(), "{set}");
        for (g, w) in gens.iter().zip(&want) {
            let (generated, truth) = (g[1].as_str().unwrap(), g[2].as_str().unwrap());
            let got = rouge_l_recall(truth, generated);
            assert!(
                (got - w.as_f64().unwrap()).abs() <= 1e-12,
                "{set}: {truth:?} / {generated:?}: {got} vs {w}"
            );
            n += 1;
        }
    }
    assert_eq!(n, 817);
}

// ---- Kolmogorov-Smirnov ----

/// Numbers, or the strings "inf" / "-inf" that stand for infinities.
fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| match x {
            Value::String(s) => s.parse().expect("inf or -inf"),
            _ => x.as_f64().expect("number"),
        })
        .collect()
}

/// `got` equals `want` to within `rel` relative.
fn close(got: f64, want: f64, rel: f64) -> bool {
    got == want || (got - want).abs() <= rel * want.abs()
}

/// The p-values are computed in scipy's order of operations and agree to within 2e-16
/// relative; the 1e-12 tolerance leaves room for another platform's `exp` / `ln` / `powi` in
/// the asymptotic fallback, which the cases named `interleaved_*` and `fallback_*` reach.
#[test]
fn ks_2samp_matches_scipy() {
    let cases = fixture("eval/ks.json");
    let cases = cases.as_array().unwrap();
    assert!(cases.len() >= 30);
    let mut fallbacks = 0;
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let (x, y) = (floats(&c["x"]), floats(&c["y"]));
        let got = ks_2samp(&x, &y).unwrap_or_else(|e| panic!("{name}: {e}"));
        let (d, p) = (
            c["statistic"].as_f64().unwrap(),
            c["pvalue"].as_f64().unwrap(),
        );
        assert!(
            close(got.statistic, d, 1e-12),
            "{name}: D {} vs {d}",
            got.statistic
        );
        assert!(
            close(got.pvalue, p, 1e-12),
            "{name}: p {} vs {p}",
            got.pvalue
        );
        fallbacks += c["asymptotic_fallback"].as_bool().unwrap() as usize;
    }
    // The fixture covers scipy's fallback from the exact series to the asymptotic method.
    assert!(fallbacks >= 7, "{fallbacks} fallback cases");
}

#[test]
fn ks_2samp_is_symmetric_and_rejects_bad_input() {
    let cases = fixture("eval/ks.json");
    for c in cases.as_array().unwrap() {
        let (x, y) = (floats(&c["x"]), floats(&c["y"]));
        assert_eq!(
            ks_2samp(&x, &y).unwrap(),
            ks_2samp(&y, &x).unwrap(),
            "{}",
            c["name"]
        );
    }
    assert!(ks_2samp(&[], &[1.0]).is_err());
    assert!(ks_2samp(&[1.0], &[]).is_err());
    assert!(ks_2samp(&[1.0, f64::NAN], &[1.0]).is_err());
}
