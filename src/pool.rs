//! One persistent pool of threads for the forward pass.
//!
//! `run(f)` calls `f(ith, nth)` on every thread (the caller is thread 0) and returns when all
//! are done. Workers spin briefly between jobs (a decode step issues a few hundred small jobs),
//! then sleep on a condition variable, so an idle server costs nothing.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

type Job = *const (dyn Fn(usize, usize) + Sync);

struct Shared {
    n: usize,
    /// Bumped once per job; workers run the job when they see a new value.
    epoch: AtomicUsize,
    /// Workers that finished the current job.
    done: AtomicUsize,
    job: Mutex<Option<SendJob>>,
    sleepers: AtomicUsize,
    wake: Condvar,
    wake_lock: Mutex<()>,
    stop: AtomicBool,
}

#[derive(Clone, Copy)]
struct SendJob(Job);
// SAFETY: the job is only dereferenced while `run` keeps the closure alive and blocks.
unsafe impl Send for SendJob {}

pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Serialises callers: one job at a time.
    gate: Mutex<()>,
}

const SPIN_ITERS: usize = 1 << 16;

impl ThreadPool {
    pub fn new(n_threads: usize) -> Self {
        let n = n_threads.max(1);
        let shared = Arc::new(Shared {
            n,
            epoch: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            job: Mutex::new(None),
            sleepers: AtomicUsize::new(0),
            wake: Condvar::new(),
            wake_lock: Mutex::new(()),
            stop: AtomicBool::new(false),
        });
        let workers = (1..n)
            .map(|ith| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name(format!("lethe-worker-{ith}"))
                    .spawn(move || worker(s, ith))
                    .expect("spawn worker thread")
            })
            .collect();
        Self {
            shared,
            workers,
            gate: Mutex::new(()),
        }
    }

    pub fn n_threads(&self) -> usize {
        self.shared.n
    }

    /// Run `f(ith, nth)` on all threads and wait.
    pub fn run(&self, f: &(dyn Fn(usize, usize) + Sync)) {
        let n = self.shared.n;
        if n == 1 {
            f(0, 1);
            return;
        }
        let _g = self.gate.lock().unwrap_or_else(|e| e.into_inner());
        let s = &self.shared;
        // SAFETY: the pointer's lifetime is erased; it is used only until `done == n - 1`.
        let job: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize, usize) + Sync), Job>(f) };
        *s.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(SendJob(job));
        s.done.store(0, Ordering::Relaxed);
        s.epoch.fetch_add(1, Ordering::AcqRel);
        if s.sleepers.load(Ordering::Acquire) > 0 {
            let _l = s.wake_lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        f(0, n);
        let mut spins = 0usize;
        while s.done.load(Ordering::Acquire) < n - 1 {
            spins += 1;
            if spins < SPIN_ITERS {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// Split `0..n` into `nth` near-equal contiguous ranges and return range `ith`.
    pub fn split(n: usize, ith: usize, nth: usize) -> std::ops::Range<usize> {
        let per = n.div_ceil(nth);
        let start = (ith * per).min(n);
        start..((ith + 1) * per).min(n)
    }
}

fn worker(s: Arc<Shared>, ith: usize) {
    let mut seen = 0usize;
    loop {
        let mut spins = 0usize;
        loop {
            if s.stop.load(Ordering::Acquire) {
                return;
            }
            let e = s.epoch.load(Ordering::Acquire);
            if e != seen {
                seen = e;
                break;
            }
            spins += 1;
            if spins < SPIN_ITERS {
                std::hint::spin_loop();
            } else {
                let g = s.wake_lock.lock().unwrap_or_else(|e| e.into_inner());
                s.sleepers.fetch_add(1, Ordering::AcqRel);
                // Re-check under the lock: `run` notifies while holding it.
                if s.epoch.load(Ordering::Acquire) == seen && !s.stop.load(Ordering::Acquire) {
                    let _g = s.wake.wait_timeout(g, std::time::Duration::from_millis(50));
                }
                s.sleepers.fetch_sub(1, Ordering::AcqRel);
                spins = 0;
            }
        }
        let job = *s.job.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(SendJob(j)) = job {
            // SAFETY: `run` keeps the closure alive until every worker has counted itself done.
            let f = unsafe { &*j };
            f(ith, s.n);
        }
        s.done.fetch_add(1, Ordering::AcqRel);
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        {
            let _l = self
                .shared
                .wake_lock
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_thread_runs_each_job_once() {
        let pool = ThreadPool::new(3);
        let hits = AtomicUsize::new(0);
        for _ in 0..1000 {
            pool.run(&|ith, nth| {
                assert!(ith < nth);
                hits.fetch_add(1, Ordering::Relaxed);
            });
        }
        assert_eq!(hits.load(Ordering::Relaxed), 3000);
    }

    #[test]
    fn split_covers_range() {
        for n in [0, 1, 7, 100] {
            for nth in 1..5 {
                let total: usize = (0..nth).map(|i| ThreadPool::split(n, i, nth).len()).sum();
                assert_eq!(total, n);
            }
        }
    }
}
