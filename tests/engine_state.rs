//! The run state: clear errors for bad input, and a cache that can be rewound.

mod common;

use common::model_path;
use lethe::model::Model;
use lethe::Error;
#[test]
fn bad_input_gives_errors() {
    let model = Model::open(model_path("smollm2"), 2).unwrap();
    let mut st = model.new_state(16);
    let v = model.cfg.n_vocab as u32;
    assert!(matches!(
        model.forward(&mut st, &[v], None),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        model.forward(&mut st, &[], None),
        Err(Error::Invalid(_))
    ));
    let long: Vec<u32> = (0..17).collect();
    match model.forward(&mut st, &long, None) {
        Err(Error::ContextFull {
            needed: 17,
            n_ctx: 16,
        }) => {}
        other => panic!("expected ContextFull, got {:?}", other.map(|_| ())),
    }
    // Nothing was consumed by the failed calls.
    assert_eq!(st.pos, 0);
    model.forward(&mut st, &long[..16], None).unwrap();
    assert!(matches!(
        model.forward(&mut st, &[1], None),
        Err(Error::ContextFull { .. })
    ));
}

#[test]
fn rewinding_the_cache_reproduces_logits() {
    let model = Model::open(model_path("smollm2"), 2).unwrap();
    let mut st = model.new_state(64);
    let a = model
        .forward(&mut st, &[504, 2365, 6354, 16438], None)
        .unwrap()
        .to_vec();
    model.forward(&mut st, &[27003, 690], None).unwrap();
    st.truncate(3);
    let b = model.forward(&mut st, &[16438], None).unwrap().to_vec();
    // `a` came out of a 4-token batch, `b` out of a single-token step: the same sums in another
    // order.
    let max = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(
        max < 1e-3,
        "the same prefix must give the same logits (max diff {max})"
    );
    // Prefill in one batch equals token-by-token decoding (up to float reordering).
    let mut s1 = model.new_state(64);
    let batch = model
        .forward(&mut s1, &[504, 2365, 6354, 16438, 27003], None)
        .unwrap()
        .to_vec();
    let mut s2 = model.new_state(64);
    let mut last = Vec::new();
    for t in [504, 2365, 6354, 16438, 27003] {
        last = model.forward(&mut s2, &[t], None).unwrap().to_vec();
    }
    let max = batch
        .iter()
        .zip(&last)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(max < 1e-3, "batch vs step logits differ by {max}");
}

#[test]
fn another_architecture_is_named_in_the_error() {
    let f = lethe::gguf::GgufFile::open(model_path("smollm2")).unwrap();
    let mut w = lethe::gguf::GgufWriter::new();
    w.copy_metadata(&f).unwrap();
    w.set("general.architecture", "mamba").unwrap();
    w.copy_tensor(&f, "output_norm.weight").unwrap();
    let bytes = w.to_bytes().unwrap();
    let file = std::sync::Arc::new(lethe::gguf::GgufFile::from_bytes(bytes).unwrap());
    let pool = std::sync::Arc::new(lethe::pool::ThreadPool::new(1));
    match Model::from_file(file, pool) {
        Err(e @ Error::UnsupportedArch(_)) => assert!(e.to_string().contains("mamba"), "{e}"),
        Err(e) => panic!("expected UnsupportedArch, got {e}"),
        Ok(_) => panic!("a mamba file must not load"),
    }
}

#[test]
fn a_missing_tensor_is_an_error_not_a_panic() {
    let f = lethe::gguf::GgufFile::open(model_path("smollm2")).unwrap();
    let mut w = lethe::gguf::GgufWriter::new();
    w.copy_metadata(&f).unwrap();
    for t in f
        .tensors()
        .iter()
        .filter(|t| t.name != "blk.7.ffn_up.weight")
    {
        w.copy_tensor(&f, &t.name).unwrap();
    }
    let file =
        std::sync::Arc::new(lethe::gguf::GgufFile::from_bytes(w.to_bytes().unwrap()).unwrap());
    let pool = std::sync::Arc::new(lethe::pool::ThreadPool::new(1));
    let err = Model::from_file(file, pool).err().expect("must fail");
    assert!(err.to_string().contains("blk.7.ffn_up.weight"), "{err}");
}
