//! No allocation per decoded token. Alone in its test binary: the counting allocator sees
//! every thread of the process, so no other test may run beside it.

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

#[test]
fn decode_steps_do_not_allocate() {
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
