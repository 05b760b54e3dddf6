//! No allocation per decoded token. In a test binary of its own, and its tests take a lock:
//! the counting allocator sees every thread of the process, so nothing may run beside a count.

mod common;

use common::model_path;
use lethe::model::Model;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

struct Counting;
static ALLOCS: AtomicUsize = AtomicUsize::new(0);
static COUNTING: AtomicBool = AtomicBool::new(false);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
            if std::env::var_os("LETHE_ALLOC_TRACE").is_some() {
                COUNTING.store(false, Ordering::Relaxed);
                eprintln!(
                    "alloc of {} bytes:\n{}",
                    l.size(),
                    std::backtrace::Backtrace::force_capture()
                );
            }
        }
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        System.realloc(p, l, n)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn decode_steps_do_not_allocate() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for name in ["smollm2", "gemma3"] {
        let model = Model::open(model_path(name), 2).unwrap();
        let mut st = model.new_state(256);
        model
            .forward(&mut st, &[1, 2, 3, 4, 5, 6, 7, 8], None)
            .unwrap();
        model.forward(&mut st, &[9], None).unwrap();
        ALLOCS.store(0, Ordering::SeqCst);
        COUNTING.store(true, Ordering::SeqCst);
        for t in 0..32u32 {
            model.forward(&mut st, &[100 + t], None).unwrap();
        }
        COUNTING.store(false, Ordering::SeqCst);
        assert_eq!(
            ALLOCS.load(Ordering::SeqCst),
            0,
            "{name}: decode steps allocated"
        );
    }
}

#[test]
fn uld_decode_steps_do_not_allocate() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    use lethe::generate::Decoder;
    use lethe::unlearn::{Assistant, LockstepDecoder};
    use std::sync::Arc;
    let model = Arc::new(Model::open(model_path("smollm2"), 2).unwrap());
    let mut small = Model::from_file(model.file.clone(), model.pool.clone()).unwrap();
    small.layers.truncate(8);
    let a = Assistant::uld(Arc::new(small), 0.75, 0.01);
    let mut dec = LockstepDecoder::new(model.clone(), vec![a], 256).unwrap();
    dec.feed(&[1, 2, 3, 4]).unwrap();
    dec.feed(&[5]).unwrap();
    ALLOCS.store(0, Ordering::SeqCst);
    COUNTING.store(true, Ordering::SeqCst);
    for t in 0..16u32 {
        dec.feed(&[200 + t]).unwrap();
    }
    COUNTING.store(false, Ordering::SeqCst);
    assert_eq!(
        ALLOCS.load(Ordering::SeqCst),
        0,
        "ULD decode steps allocated"
    );
}

#[test]
fn patched_decode_steps_do_not_allocate() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    use lethe::model::{Proj, WeightId};
    use lethe::patch::{write_delta, Change, DeltaEntry, Patch, PatchKind, PatchSet, TensorDelta};
    use std::sync::Arc;
    let model = Model::open(model_path("smollm2"), 2).unwrap();
    let low_rank = |target: WeightId, rank: usize| {
        let (cols, rows) = model.target_shape(target).unwrap();
        TensorDelta {
            target,
            cols,
            rows,
            scale: 1.0,
            change: Change::LowRank {
                rank,
                a: (0..rank * cols).map(|i| (i % 7) as f32 * 1e-3).collect(),
                bt: (0..rank * rows).map(|i| (i % 5) as f32 * 1e-3).collect(),
            },
        }
    };
    let mut tensors: Vec<TensorDelta> = Proj::ALL
        .iter()
        .map(|&s| low_rank(WeightId::Block(1, s), 8))
        .collect();
    tensors.push(low_rank(WeightId::Embd, 1));
    tensors.push(low_rank(WeightId::Output, 2));
    let mut entries: Vec<(u64, f32)> = (0..64).map(|i| (i * 977, 0.01)).collect();
    tensors.push(
        TensorDelta::sparse(WeightId::Block(2, Proj::Up), 576, 1536, 1.0, &mut entries).unwrap(),
    );
    let lora = Patch {
        source: "in memory".into(),
        kind: PatchKind::Delta,
        tensors,
        cvec: vec![(3, vec![0.01; 576])],
    };
    // A dense delta lives in its file, like a weight.
    let path = std::env::temp_dir().join(format!("lethe-noalloc-{}.gguf", std::process::id()));
    let dense = DeltaEntry::Dense {
        base: "blk.4.attn_q.weight".into(),
        cols: 576,
        rows: 576,
        ty: lethe_kernels::quant::GgmlType::Q8_0,
        data: vec![1e-3; 576 * 576],
    };
    write_delta(&path, "llama", "t", &[dense]).unwrap();
    let dense = lethe::patch::load(&path, &model).unwrap();
    std::fs::remove_file(&path).ok();
    let set = PatchSet::new(&model, &[(Arc::new(lora), 1.0), (Arc::new(dense), 0.5)]).unwrap();
    let mut st = model.new_state(256);
    model.attach_patches(&mut st, Some(Arc::new(set))).unwrap();
    model
        .forward(&mut st, &[1, 2, 3, 4, 5, 6, 7, 8], None)
        .unwrap();
    model.forward(&mut st, &[9], None).unwrap();
    ALLOCS.store(0, Ordering::SeqCst);
    COUNTING.store(true, Ordering::SeqCst);
    for t in 0..16u32 {
        model.forward(&mut st, &[100 + t], None).unwrap();
    }
    COUNTING.store(false, Ordering::SeqCst);
    assert_eq!(
        ALLOCS.load(Ordering::SeqCst),
        0,
        "patched decode steps allocated"
    );
}

#[test]
fn batched_decode_steps_do_not_allocate() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for name in ["smollm2", "gemma3"] {
        let model = Model::open(model_path(name), 2).unwrap();
        // Different contexts: the batch runs in the largest one's scratch.
        let mut states: Vec<_> = [256, 128, 256, 64]
            .iter()
            .map(|&n| model.new_state(n))
            .collect();
        for (i, st) in states.iter_mut().enumerate() {
            let prompt: Vec<u32> = (1..=3 + i as u32).collect();
            model.forward(st, &prompt, None).unwrap();
        }
        let mut refs: Vec<_> = states.iter_mut().collect();
        let mut toks = [9u32, 10, 11, 12];
        // The first batched step sizes the batch's logits.
        model.forward_multi(&mut refs, &toks).unwrap();
        ALLOCS.store(0, Ordering::SeqCst);
        COUNTING.store(true, Ordering::SeqCst);
        for t in 0..16u32 {
            for (i, tok) in toks.iter_mut().enumerate() {
                *tok = 100 + t + i as u32;
            }
            model.forward_multi(&mut refs, &toks).unwrap();
        }
        COUNTING.store(false, Ordering::SeqCst);
        assert_eq!(
            ALLOCS.load(Ordering::SeqCst),
            0,
            "{name}: batched decode steps allocated"
        );
    }
}
