//! One persistent pool of threads for the forward pass, and the parallel loops over it.
//!
//! `run(f)` calls `f(ith, nth)` on every thread (the caller is thread 0) and returns when all
//! are done. Workers spin briefly between jobs (a decode step issues a few hundred small jobs),
//! then sleep on a condition variable, so an idle server costs nothing.
//!
//! The loops: [`ThreadPool::for_chunks`] (chunks of `0..n` claimed as they come, the one loop
//! of every parallel matmul, attention and training kernel), [`ThreadPool::map`] (one result
//! per item, in order) and [`ThreadPool::for_each_mut`]; [`SharedMut`] is the one pointer the
//! threads share to write disjoint parts of a buffer.
//!
//! On a busy host a worker may be pre-empted in the middle of its share, and the caller then
//! waits a scheduler time slice (milliseconds) for a job of microseconds. The pool watches for
//! that: a job whose caller waited for its workers longer than [`STALL`] and longer than half
//! its own share is a stall, and [`STALLS`] stalls within [`WINDOW`] jobs send the pool solo
//! for [`SOLO`] (the caller runs every share itself, the workers go to sleep), after which it
//! tries its workers again; each spell that ends in stalls again is twice as long (up to
//! [`SOLO_MAX`]). A spell is a time, not a number of jobs: prefill's jobs take milliseconds
//! where decode's take microseconds, and a count long enough for decode kept a prefill on one
//! thread for seconds after a single hiccup of the host. Which thread computes what never
//! changes a result (every kernel computes each row the same on any thread), so this changes
//! only speed.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

type Job = *const (dyn Fn(usize, usize) + Sync);

struct Shared {
    n: usize,
    /// Bumped once per job; workers run the job when they see a new value.
    epoch: AtomicUsize,
    /// Workers that finished the current job.
    done: AtomicUsize,
    /// `epoch << 32 | CLOSED | workers that joined`. A worker runs a job only after joining it,
    /// which needs the epoch it saw and an open job; `run_dynamic` closes its job when the
    /// caller's own share is done, `run` never closes (it waits for every worker).
    entry: AtomicU64,
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
    /// Serialises callers: one job at a time; holds the stall watch.
    gate: Mutex<Watch>,
}

/// The caller's record of recent stalls ([`ThreadPool::start`]).
#[derive(Default)]
struct Watch {
    /// Jobs run with the workers in the current window.
    jobs: u32,
    /// Stalls among them.
    stalls: u32,
    /// The end of the current solo spell.
    solo_until: Option<std::time::Instant>,
    /// The length of the next solo spell: doubled each time the workers stall again right
    /// after one (a host that stays busy), back to [`SOLO`] after a window without stalls.
    solo_len: std::time::Duration,
    /// Whether the current window is the first after a solo spell.
    probing: bool,
    /// Times the pool went solo (for tests and diagnostics).
    solo_spells: u64,
    /// Never go solo ([`ThreadPool::set_steady`]).
    steady: bool,
}

/// A wait for the workers longer than this (and than half the caller's own share) is a stall.
pub const STALL: std::time::Duration = std::time::Duration::from_millis(1);
/// A job whose caller spent this long on its own share is never counted as a stall.
pub const LONG_JOB: std::time::Duration = std::time::Duration::from_millis(20);
/// Stalls within [`WINDOW`] jobs that send the pool solo.
pub const STALLS: u32 = 2;
pub const WINDOW: u32 = 512;
/// How long the pool runs solo before the workers are tried again (a few decoded tokens).
pub const SOLO: std::time::Duration = std::time::Duration::from_millis(100);
/// The longest solo spell, on a host that stays busy.
pub const SOLO_MAX: std::time::Duration = std::time::Duration::from_millis(6400);

const SPIN_ITERS: usize = 1 << 16;
const CLOSED: u64 = 1 << 31;
const COUNT_MASK: u64 = CLOSED - 1;

impl ThreadPool {
    pub fn new(n_threads: usize) -> Self {
        let n = n_threads.max(1);
        let shared = Arc::new(Shared {
            n,
            epoch: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            entry: AtomicU64::new(0),
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
            gate: Mutex::new(Watch::default()),
        }
    }

    /// Keep every job on all threads, never going solo: for work whose jobs are coarse and
    /// spaced out (training), where a worker woken late after a pause between jobs is no sign
    /// of a busy host and running solo halves the speed.
    pub fn set_steady(&self, steady: bool) {
        let mut w = self.gate.lock().unwrap_or_else(|e| e.into_inner());
        w.steady = steady;
        if steady {
            w.solo_until = None;
        }
    }

    /// How many times the pool has gone solo because its workers stalled.
    pub fn solo_spells(&self) -> u64 {
        self.gate
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .solo_spells
    }

    pub fn n_threads(&self) -> usize {
        self.shared.n
    }

    /// Run `f(ith, nth)` on all threads and wait: every `ith` runs exactly once, so `f` may
    /// split its work statically by `ith`.
    pub fn run(&self, f: &(dyn Fn(usize, usize) + Sync)) {
        self.start(f, false);
    }

    /// Run `f(ith, nth)` on the caller and on whichever workers arrive before the caller has
    /// finished its own call; workers that arrive later skip the job. `f` must therefore claim
    /// its work dynamically (an atomic counter) until none is left. On a busy machine a
    /// pre-empted worker then costs nothing, where `run` would wait for it to be scheduled.
    pub fn run_dynamic(&self, f: &(dyn Fn(usize, usize) + Sync)) {
        self.start(f, true);
    }

    fn start(&self, f: &(dyn Fn(usize, usize) + Sync), dynamic: bool) {
        let n = self.shared.n;
        if n == 1 {
            f(0, 1);
            return;
        }
        let mut watch = self.gate.lock().unwrap_or_else(|e| e.into_inner());
        if watch
            .solo_until
            .is_some_and(|t| std::time::Instant::now() < t)
        {
            // Every share on the caller: each `ith` once (a dynamic job claims all its work
            // in the first call).
            if dynamic {
                f(0, n);
            } else {
                (0..n).for_each(|ith| f(ith, n));
            }
            return;
        }
        let s = &self.shared;
        // SAFETY: the pointer's lifetime is erased; it is used only until `done == n - 1`.
        let job: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize, usize) + Sync), Job>(f) };
        *s.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(SendJob(job));
        s.done.store(0, Ordering::Relaxed);
        let epoch = s.epoch.load(Ordering::Relaxed).wrapping_add(1);
        s.entry
            .store((epoch as u64 & 0xFFFF_FFFF) << 32, Ordering::Release);
        s.epoch.store(epoch, Ordering::Release);
        if s.sleepers.load(Ordering::Acquire) > 0 {
            let _l = s.wake_lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        let t0 = std::time::Instant::now();
        f(0, n);
        let own = t0.elapsed();
        // Dynamic jobs wait only for the workers that joined; static ones for all.
        let wait_for = if dynamic {
            let prev = s.entry.fetch_or(CLOSED, Ordering::AcqRel);
            (prev & COUNT_MASK) as usize
        } else {
            n - 1
        };
        let mut spins = 0usize;
        while s.done.load(Ordering::Acquire) < wait_for {
            spins += 1;
            if spins < SPIN_ITERS {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        let waited = t0.elapsed() - own;
        // A long job's wait is a worker finishing its last (long) chunk, the normal end of a
        // coarse job such as a training matmul, not a pre-empted worker: never a stall.
        watch.record(waited > STALL && waited > own / 2 && own < LONG_JOB);
    }

    /// `f(ith, range)` for the consecutive chunks of `0..n` of `chunk` items (the last may be
    /// shorter), claimed by the threads as they come through an atomic counter
    /// ([`ThreadPool::run_dynamic`]), so a thread that starts late or is pre-empted holds no
    /// one up. `ith` is the claiming thread's index, for per-thread scratch. One chunk, or one
    /// thread, runs on the caller alone.
    pub fn for_chunks<F>(&self, n: usize, chunk: usize, f: F)
    where
        F: Fn(usize, Range<usize>) + Sync,
    {
        let chunk = chunk.max(1);
        if n <= chunk || self.n_threads() == 1 {
            for r0 in (0..n).step_by(chunk) {
                f(0, r0..(r0 + chunk).min(n));
            }
            return;
        }
        let next = AtomicUsize::new(0);
        self.run_dynamic(&|ith, _| loop {
            let r0 = next.fetch_add(chunk, Ordering::Relaxed);
            if r0 >= n {
                break;
            }
            f(ith, r0..(r0 + chunk).min(n));
        });
    }

    /// `[f(0), f(1), .., f(n - 1)]`, the items shared out as [`ThreadPool::for_chunks`] does.
    pub fn map<R, F>(&self, n: usize, f: F) -> Vec<R>
    where
        R: Send,
        F: Fn(usize) -> R + Sync,
    {
        let mut out: Vec<Option<R>> = (0..n).map(|_| None).collect();
        let o = SharedMut::new(&mut out);
        self.for_chunks(n, 1, |_, items| {
            for i in items {
                // SAFETY: item `i` is claimed by one thread.
                unsafe { o.write(i, Some(f(i))) };
            }
        });
        out.into_iter()
            .map(|r| r.expect("every item ran"))
            .collect()
    }

    /// `f(item)` for every item, shared out as [`ThreadPool::for_chunks`] does.
    pub fn for_each_mut<T, F>(&self, items: &mut [T], f: F)
    where
        T: Send,
        F: Fn(&mut T) + Sync,
    {
        let p = SharedMut::new(items);
        self.for_chunks(items.len(), 1, |_, r| {
            // SAFETY: the items `r` are claimed by one thread.
            unsafe { p.slice(r.start, r.len()) }.iter_mut().for_each(&f);
        });
    }

    /// Split `0..n` into `nth` near-equal contiguous ranges and return range `ith`.
    pub fn split(n: usize, ith: usize, nth: usize) -> std::ops::Range<usize> {
        let per = n.div_ceil(nth);
        let start = (ith * per).min(n);
        start..((ith + 1) * per).min(n)
    }
}

impl Watch {
    /// Count a job run with the workers, and go solo after too many stalls in the window.
    fn record(&mut self, stalled: bool) {
        if self.steady {
            return;
        }
        self.jobs += 1;
        self.stalls += u32::from(stalled);
        if self.stalls >= STALLS {
            self.solo_len = if self.probing {
                (self.solo_len * 2).min(SOLO_MAX)
            } else {
                SOLO
            };
            self.solo_until = Some(std::time::Instant::now() + self.solo_len);
            self.solo_spells += 1;
            self.probing = true;
            self.jobs = 0;
            self.stalls = 0;
        } else if self.jobs >= WINDOW {
            self.probing = false;
            self.jobs = 0;
            self.stalls = 0;
        }
    }
}

/// A pointer to a buffer whose disjoint parts the pool's threads write at once; each use says
/// why its parts are disjoint.
pub struct SharedMut<T>(*mut T);

impl<T> Clone for SharedMut<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for SharedMut<T> {}

// SAFETY: the threads write disjoint parts (see the uses), so sending the pointer or sharing it
// is sending `&mut` to disjoint items, sound for `T: Send`.
unsafe impl<T: Send> Send for SharedMut<T> {}
unsafe impl<T: Send> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    pub fn new(buf: &mut [T]) -> Self {
        Self(buf.as_mut_ptr())
    }

    /// Over the buffer at `p`.
    pub const fn from_ptr(p: *mut T) -> Self {
        Self(p)
    }

    pub fn ptr(self) -> *mut T {
        self.0
    }

    /// The `len` items at `off`.
    ///
    /// # Safety
    /// They must lie inside the buffer, which outlives `'a`, and no other thread may touch them
    /// meanwhile.
    #[inline]
    pub unsafe fn slice<'a>(self, off: usize, len: usize) -> &'a mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(off), len)
    }

    /// Write item `i`.
    ///
    /// # Safety
    /// As [`SharedMut::slice`], for item `i`.
    #[inline]
    pub unsafe fn write(self, i: usize, v: T) {
        *self.0.add(i) = v;
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
        if !join(&s, seen) {
            // A dynamic job the caller already finished without us, or a job that has moved on.
            continue;
        }
        let job = *s.job.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(SendJob(j)) = job {
            // SAFETY: the caller keeps the closure alive until every worker that runs it has
            // counted itself done.
            let f = unsafe { &*j };
            f(ith, s.n);
        }
        s.done.fetch_add(1, Ordering::AcqRel);
    }
}

/// Join the dynamic job of `epoch` if it is still open.
fn join(s: &Shared, epoch: usize) -> bool {
    let tag = (epoch as u64 & 0xFFFF_FFFF) << 32;
    let mut cur = s.entry.load(Ordering::Acquire);
    loop {
        if cur & !(CLOSED | COUNT_MASK) != tag || cur & CLOSED != 0 {
            return false;
        }
        match s
            .entry
            .compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => return true,
            Err(now) => cur = now,
        }
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
    fn dynamic_jobs_do_all_work_once() {
        let pool = ThreadPool::new(3);
        for round in 0..2000 {
            let next = AtomicUsize::new(0);
            let sum = AtomicUsize::new(0);
            let n = round % 37;
            pool.run_dynamic(&|_, _| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                sum.fetch_add(i + 1, Ordering::Relaxed);
            });
            assert_eq!(sum.load(Ordering::Relaxed), n * (n + 1) / 2);
        }
        // Static jobs still reach every thread after dynamic ones.
        let hits = AtomicUsize::new(0);
        pool.run(&|_, _| {
            hits.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(hits.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn chunks_cover_the_range_once() {
        let pool = ThreadPool::new(3);
        for (n, chunk) in [(0, 4), (1, 4), (4, 4), (1000, 7), (1000, 1)] {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            pool.for_chunks(n, chunk, |ith, r| {
                assert!(ith < 3 && r.len() <= chunk);
                for i in r {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                }
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        }
        let sq = pool.map(500, |i| i * i);
        assert_eq!(sq, (0..500).map(|i| i * i).collect::<Vec<_>>());
        let mut v: Vec<usize> = (0..300).collect();
        pool.for_each_mut(&mut v, |x| *x *= 2);
        assert_eq!(v, (0..300).map(|i| 2 * i).collect::<Vec<_>>());
    }

    /// A worker that stalls (here: sleeps while it holds a share) sends the pool solo: the
    /// caller then runs every share itself, and every job still does all its work once.
    #[test]
    fn stalled_workers_send_the_pool_solo() {
        use std::time::{Duration, Instant};
        let pool = ThreadPool::new(2);
        let busy = |us: u64| {
            let t = Instant::now();
            while t.elapsed() < Duration::from_micros(us) {
                std::hint::spin_loop();
            }
        };
        let mut worker_ran = Vec::new();
        for _ in 0..2 * STALLS as usize + 8 {
            let sum = AtomicUsize::new(0);
            let on_worker = AtomicUsize::new(0);
            pool.for_chunks(20, 1, |ith, r| {
                if ith == 1 {
                    on_worker.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(4));
                } else {
                    busy(50);
                }
                sum.fetch_add(r.start + 1, Ordering::Relaxed);
            });
            assert_eq!(sum.load(Ordering::Relaxed), 20 * 21 / 2);
            worker_ran.push(on_worker.load(Ordering::Relaxed));
        }
        assert!(pool.solo_spells() >= 1, "no solo spell: {worker_ran:?}");
        // Once solo, the worker runs nothing (the last jobs are well inside the spell).
        assert_eq!(
            worker_ran[worker_ran.len() - 4..],
            [0, 0, 0, 0],
            "{worker_ran:?}"
        );
        // Static jobs still run every share once while solo.
        let hits = AtomicUsize::new(0);
        pool.run(&|ith, nth| {
            assert!(ith < nth);
            hits.fetch_add(1 << ith, Ordering::Relaxed);
        });
        assert_eq!(hits.load(Ordering::Relaxed), 0b11);
    }

    /// Long jobs whose last chunk keeps a worker busy after the caller is done (a training
    /// matmul: three 25 ms chunks on two threads) never send the pool solo.
    #[test]
    fn long_chunks_are_not_stalls() {
        use std::time::{Duration, Instant};
        let pool = ThreadPool::new(2);
        for _ in 0..2 * STALLS as usize + 6 {
            let sum = AtomicUsize::new(0);
            pool.for_chunks(3, 1, |_, r| {
                let t = Instant::now();
                while t.elapsed() < Duration::from_millis(25) {
                    std::hint::spin_loop();
                }
                sum.fetch_add(r.start + 1, Ordering::Relaxed);
            });
            assert_eq!(sum.load(Ordering::Relaxed), 6);
        }
        assert_eq!(pool.solo_spells(), 0);
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
