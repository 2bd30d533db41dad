//! A persistent thread pool with a very cheap fork-join handoff: the compute substrate of the CPU
//! decoder (mat-vec, mat-mul, attention).
//!
//! One decode step of a small model issues a few hundred parallel calls of a few microseconds
//! each, so the handoff has to cost far less than a microsecond. The pool keeps `threads() - 1`
//! workers alive; the calling thread always takes part. A call splits `0..n` into up to
//! [`CHUNKS_PER_THREAD`]` × threads()` contiguous chunks and publishes them in one atomic word
//! (epoch, next chunk, chunk count); every participant claims chunks with a compare-and-swap until
//! none are left. Idle workers poll that word for about [`SPIN_TIME`] (busy for a few
//! microseconds, then yielding their core between polls, so that a core shared with the caller or
//! with other processes is not burnt) before parking on a condition variable, so back-to-back
//! calls never wait for a wake-up; and because the caller claims
//! chunks too, a worker that is asleep or descheduled (2 cores shared with other processes) delays
//! nothing: the caller simply runs its chunks. Only a worker descheduled *while holding* a chunk
//! makes the caller wait; when such a stall is seen, calls run on the caller alone for a
//! doubling period (1 ms · 2^k, relaxing after quiet seconds), so an oversubscribed machine runs
//! at single-thread speed instead of far below it.
//!
//! ```
//! use freekv_model::qmatmul::parallel::ThreadPool;
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! let pool = ThreadPool::new(3);
//! let sum = AtomicUsize::new(0);
//! pool.for_each_chunk(1000, &|r| {
//!     sum.fetch_add(r.sum::<usize>(), Ordering::Relaxed);
//! });
//! assert_eq!(sum.into_inner(), 999 * 1000 / 2);
//! ```

use std::any::Any;
use std::cell::Cell;
use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Checks of the job word an idle worker makes back to back before it starts yielding its core
/// between checks (a few microseconds).
const FAST_SPINS: u32 = 256;

/// How long an idle worker spins on the job word before it parks.
pub const SPIN_TIME: Duration = Duration::from_micros(100);

/// A call is split into at most this many chunks per thread (fewer when `n` is smaller), so that
/// the work of a late or descheduled worker is picked up by the others.
pub const CHUNKS_PER_THREAD: usize = 4;

/// The environment variable that sets the size of [`ThreadPool::global`].
pub const THREADS_ENV: &str = "FREEKV_THREADS";

/// One published call; lives on the submitting thread's stack for the duration of the call.
struct Job {
    task: &'static (dyn Fn(Range<usize>) + Sync),
    n: usize,
    chunks: usize,
}

/// The job word: `epoch << 32 | next << 16 | total` (chunks claimed so far, chunks in the job).
fn pack(epoch: u32, next: u16, total: u16) -> u64 {
    (u64::from(epoch) << 32) | (u64::from(next) << 16) | u64::from(total)
}
fn epoch_of(s: u64) -> u32 {
    (s >> 32) as u32
}
fn next_of(s: u64) -> u16 {
    (s >> 16) as u16
}
fn total_of(s: u64) -> u16 {
    s as u16
}

struct Shared {
    /// See [`pack`]. Only the thread holding `ThreadPool::submit` changes the epoch.
    state: AtomicU64,
    /// The current job. Dereferenced only by a thread that has claimed one of its chunks, which
    /// keeps the submitter waiting (and the job alive) until that chunk is counted in `done`.
    job: AtomicPtr<Job>,
    /// Chunks of the current job that have finished.
    done: AtomicUsize,
    /// A chunk run by a worker panicked.
    panicked: AtomicBool,
    shutdown: AtomicBool,
    /// Workers parked (or about to park) on `cv`.
    sleepers: AtomicUsize,
    park_lock: Mutex<()>,
    cv: Condvar,
}

thread_local! {
    /// Set while this thread executes a chunk of some pool's job (always on worker threads):
    /// nested calls then run inline instead of deadlocking on the pool.
    static IN_POOL: Cell<bool> = const { Cell::new(false) };
}

/// A fixed-size pool of persistent worker threads for fork-join loops over index ranges.
///
/// Calls from several threads at once are serialised; a call made from inside a running chunk
/// (nested parallelism) runs inline on the calling thread.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Serialises submitters; holds the stall back-off state.
    submit: Mutex<Backoff>,
}

/// A caller that waited for a worker longer than this, and longer than twice its own share of the
/// work, saw a stall (the worker was descheduled while holding a chunk).
const STALL_MIN: Duration = Duration::from_micros(200);
/// After the `k`-th stall in a row, calls run on the caller alone for `BACKOFF_BASE · 2^k`.
const BACKOFF_BASE: Duration = Duration::from_millis(1);
/// Largest back-off exponent (about one second of caller-only calls).
const BACKOFF_MAX_LEVEL: u32 = 10;

/// On a machine whose cores are shared with other busy processes, a worker can be descheduled
/// in the middle of a chunk, and the caller then waits for a whole scheduler time slice (several
/// milliseconds). After such a stall the pool runs calls on the caller alone for a while, doubling
/// the period on every further stall and relaxing one step per quiet second, so an oversubscribed
/// machine runs at single-thread speed instead of far below it. An idle machine never stalls.
#[derive(Debug, Default)]
struct Backoff {
    level: u32,
    until: Option<Instant>,
    last_change: Option<Instant>,
}

impl std::fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadPool")
            .field("threads", &self.threads())
            .finish()
    }
}

/// The `i`-th of `parts` balanced contiguous ranges of `0..n` (sizes differ by at most one).
fn part_range(n: usize, parts: usize, i: usize) -> Range<usize> {
    let base = n / parts;
    let rem = n % parts;
    let start = i * base + i.min(rem);
    let len = base + usize::from(i < rem);
    start..start + len
}

impl ThreadPool {
    /// A pool that runs work on `n` threads in total: the caller plus `n - 1` workers (`n = 0` is
    /// treated as 1). If the OS refuses to spawn a worker, the pool is smaller; see
    /// [`ThreadPool::threads`].
    pub fn new(n: usize) -> Self {
        let shared = Arc::new(Shared {
            state: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            park_lock: Mutex::new(()),
            cv: Condvar::new(),
        });
        let mut workers = Vec::with_capacity(n.saturating_sub(1));
        for i in 1..n.max(1) {
            let s = Arc::clone(&shared);
            let spawned = std::thread::Builder::new()
                .name(format!("freekv-worker-{i}"))
                .spawn(move || worker_loop(&s));
            match spawned {
                Ok(h) => workers.push(h),
                Err(e) => {
                    tracing::warn!("could not spawn pool worker {i}: {e}; using {i} threads");
                    break;
                }
            }
        }
        Self {
            shared,
            workers,
            submit: Mutex::new(Backoff::default()),
        }
    }

    /// The process-wide pool: `FREEKV_THREADS` threads if that variable holds a positive integer,
    /// else [`std::thread::available_parallelism`].
    pub fn global() -> &'static ThreadPool {
        static POOL: OnceLock<ThreadPool> = OnceLock::new();
        POOL.get_or_init(|| {
            ThreadPool::new(threads_from_env(std::env::var(THREADS_ENV).ok().as_deref()))
        })
    }

    /// Threads that run each job, the caller included.
    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Calls `f` on contiguous ranges that together cover `0..n` exactly once, spread over all
    /// threads of the pool (the calling thread included), and returns when all are done.
    ///
    /// `0..n` is cut into `min(n, CHUNKS_PER_THREAD · threads())` balanced ranges (lengths differ
    /// by at most one, in increasing order); each thread calls `f` on one or more of them, on
    /// whichever it claims first. With one thread, `n ≤ 1`, from inside a chunk, or for a while
    /// after a worker stalled (see the module docs), `f(0..n)` runs on the caller alone, so `f`
    /// must never wait for another chunk. A panic inside `f` is propagated to the caller after
    /// every chunk has finished.
    pub fn for_each_chunk(&self, n: usize, f: &(dyn Fn(Range<usize>) + Sync)) {
        if n <= 1 || self.workers.is_empty() || IN_POOL.with(Cell::get) {
            if n > 0 {
                f(0..n);
            }
            return;
        }
        let chunks = n
            .min(CHUNKS_PER_THREAD * self.threads())
            .min(usize::from(u16::MAX));
        let mut guard = self.submit.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(until) = guard.until {
            if Instant::now() < until {
                drop(guard);
                f(0..n);
                return;
            }
            guard.until = None;
        }
        let sh = &*self.shared;
        // SAFETY (lifetime erasure): the job is dereferenced only by threads that claimed a chunk,
        // and this function does not return (or unwind) before all `chunks` chunks are counted in
        // `done`, so `f` and `job` outlive every use.
        let task: &'static (dyn Fn(Range<usize>) + Sync) = unsafe { std::mem::transmute(f) };
        let job = Job { task, n, chunks };
        sh.job
            .store(std::ptr::from_ref(&job).cast_mut(), Ordering::Relaxed);
        sh.done.store(0, Ordering::Relaxed);
        sh.panicked.store(false, Ordering::Relaxed);
        let epoch = epoch_of(sh.state.load(Ordering::Relaxed)).wrapping_add(1);
        // `chunks` ≤ u16::MAX by construction.
        sh.state
            .store(pack(epoch, 0, chunks as u16), Ordering::SeqCst);
        if sh.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = sh.park_lock.lock().unwrap_or_else(|e| e.into_inner());
            sh.cv.notify_all();
        }

        let t0 = Instant::now();
        IN_POOL.with(|c| c.set(true));
        let mine = run_chunks(sh, epoch);
        IN_POOL.with(|c| c.set(false));
        let t1 = Instant::now();

        let mut spins = 0u32;
        while sh.done.load(Ordering::Acquire) != chunks {
            if spins < 2048 {
                spins += 1;
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        sh.job.store(std::ptr::null_mut(), Ordering::Relaxed);
        guard.record(t1 - t0, t1.elapsed());
        drop(guard);
        if let Some(payload) = mine {
            resume_unwind(payload);
        }
        if sh.panicked.load(Ordering::Relaxed) {
            panic!("a ThreadPool task panicked on a worker thread");
        }
    }
}

impl Backoff {
    /// Updates the state after a parallel call in which the caller worked for `work` and then
    /// waited `wait` for the workers.
    fn record(&mut self, work: Duration, wait: Duration) {
        let now = Instant::now();
        if wait > STALL_MIN && wait > 2 * work {
            self.level = (self.level + 1).min(BACKOFF_MAX_LEVEL);
            self.until = Some(now + BACKOFF_BASE * (1u32 << self.level));
            self.last_change = Some(now);
            tracing::debug!(
                ?wait,
                ?work,
                level = self.level,
                "thread pool stall; running on the caller for a while"
            );
        } else if self.level > 0
            && self
                .last_change
                .is_none_or(|t| now.duration_since(t) > Duration::from_secs(1))
        {
            self.level -= 1;
            self.last_change = Some(now);
        }
    }
}

/// Claims and runs chunks of job `epoch` until none are left. Returns the first panic payload of
/// a chunk run here (workers only flag it).
fn run_chunks(sh: &Shared, epoch: u32) -> Option<Box<dyn Any + Send>> {
    let mut first_panic = None;
    let mut s = sh.state.load(Ordering::Acquire);
    loop {
        if epoch_of(s) != epoch || next_of(s) >= total_of(s) {
            return first_panic;
        }
        match sh
            .state
            .compare_exchange_weak(s, s + (1 << 16), Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => {
                // SAFETY: we hold an unfinished chunk of `epoch`, so its submitter is still waiting
                // and the job pointer (published before the epoch) is valid.
                let job = unsafe { &*sh.job.load(Ordering::Acquire) };
                let range = part_range(job.n, job.chunks, usize::from(next_of(s)));
                if let Err(p) = catch_unwind(AssertUnwindSafe(|| (job.task)(range))) {
                    sh.panicked.store(true, Ordering::Relaxed);
                    first_panic.get_or_insert(p);
                }
                sh.done.fetch_add(1, Ordering::Release);
                s = sh.state.load(Ordering::Acquire);
            }
            Err(cur) => s = cur,
        }
    }
}

/// The pool size for a value of `FREEKV_THREADS` (`None`, empty, zero or garbage: all cores).
pub fn threads_from_env(value: Option<&str>) -> usize {
    match value.map(str::trim).and_then(|v| v.parse::<usize>().ok()) {
        Some(n) if n > 0 => n,
        _ => std::thread::available_parallelism().map_or(1, |n| n.get()),
    }
}

fn worker_loop(sh: &Shared) {
    IN_POOL.with(|c| c.set(true));
    let mut seen = 0u32;
    loop {
        // Wait for a new epoch: spin first, then park.
        let mut e = epoch_of(sh.state.load(Ordering::Acquire));
        if e == seen {
            let start = Instant::now();
            let mut spins = 0u32;
            while e == seen {
                // Busy-spin briefly, then yield the core between checks: if it is shared with
                // the submitting thread or other processes, they run instead of this loop.
                if spins < FAST_SPINS {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
                spins = spins.saturating_add(1);
                if spins.is_multiple_of(64) && start.elapsed() > SPIN_TIME {
                    let mut g = sh.park_lock.lock().unwrap_or_else(|e| e.into_inner());
                    sh.sleepers.fetch_add(1, Ordering::SeqCst);
                    while epoch_of(sh.state.load(Ordering::SeqCst)) == seen {
                        g = sh.cv.wait(g).unwrap_or_else(|e| e.into_inner());
                    }
                    sh.sleepers.fetch_sub(1, Ordering::SeqCst);
                    drop(g);
                }
                e = epoch_of(sh.state.load(Ordering::Acquire));
            }
        }
        seen = e;
        if sh.shutdown.load(Ordering::Acquire) {
            return;
        }
        // Worker panics are flagged in `sh.panicked` and re-raised by the submitter.
        drop(run_chunks(sh, e));
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        let sh = &*self.shared;
        sh.shutdown.store(true, Ordering::SeqCst);
        let epoch = epoch_of(sh.state.load(Ordering::Relaxed)).wrapping_add(1);
        sh.state.store(pack(epoch, 0, 0), Ordering::SeqCst);
        {
            let _g = sh.park_lock.lock().unwrap_or_else(|e| e.into_inner());
            sh.cv.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    fn coverage(pool: &ThreadPool, n: usize) -> Vec<u32> {
        let hits: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
        pool.for_each_chunk(n, &|r| {
            for i in r {
                hits[i].fetch_add(1, Ordering::Relaxed);
            }
        });
        hits.into_iter().map(AtomicU32::into_inner).collect()
    }

    #[test]
    fn part_ranges_are_balanced_and_cover() {
        for n in [0usize, 1, 2, 7, 100, 101] {
            for parts in 1..6 {
                let mut next = 0;
                for i in 0..parts {
                    let r = part_range(n, parts, i);
                    assert_eq!(r.start, next);
                    assert!(r.len() == n / parts || r.len() == n / parts + 1);
                    next = r.end;
                }
                assert_eq!(next, n);
            }
        }
    }

    #[test]
    fn every_index_once_for_many_sizes_and_pools() {
        for threads in [1usize, 2, 3, 5] {
            let pool = ThreadPool::new(threads);
            assert_eq!(pool.threads(), threads);
            for n in [0usize, 1, 2, 3, 4, 5, 17, 1000] {
                assert!(
                    coverage(&pool, n).iter().all(|&h| h == 1),
                    "threads {threads} n {n}"
                );
            }
        }
    }

    #[test]
    fn many_back_to_back_calls_and_parking() {
        let pool = ThreadPool::new(3);
        let total = AtomicUsize::new(0);
        for round in 0..2000 {
            pool.for_each_chunk(10, &|r| {
                total.fetch_add(r.len(), Ordering::Relaxed);
            });
            if round % 500 == 0 {
                // let the workers park, then wake them again
                std::thread::sleep(SPIN_TIME * 3);
            }
        }
        assert_eq!(total.into_inner(), 20_000);
    }

    #[test]
    fn uses_several_threads() {
        let pool = ThreadPool::new(2);
        let ids = Mutex::new(std::collections::HashSet::new());
        pool.for_each_chunk(2, &|_| {
            ids.lock().unwrap().insert(std::thread::current().id());
            // wait (bounded) for the other thread to show up with the other chunk
            let start = Instant::now();
            while ids.lock().unwrap().len() < 2 && start.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        assert_eq!(ids.into_inner().unwrap().len(), 2);
    }

    #[test]
    fn a_stalled_worker_makes_the_next_calls_run_on_the_caller() {
        let pool = ThreadPool::new(2);
        let caller = std::thread::current().id();
        let worker_started = AtomicBool::new(false);
        pool.for_each_chunk(2, &|_| {
            if std::thread::current().id() == caller {
                // wait (bounded) until the worker holds the other chunk
                let start = Instant::now();
                while !worker_started.load(Ordering::Acquire)
                    && start.elapsed() < Duration::from_secs(10)
                {
                    std::hint::spin_loop();
                }
            } else {
                worker_started.store(true, Ordering::Release);
                std::thread::sleep(Duration::from_millis(50)); // a descheduled worker
            }
        });
        assert!(worker_started.into_inner());
        let ids = Mutex::new(Vec::new());
        pool.for_each_chunk(100, &|r| {
            ids.lock().unwrap().push((std::thread::current().id(), r))
        });
        let ids = ids.into_inner().unwrap();
        assert_eq!(
            ids,
            vec![(caller, 0..100)],
            "the call after a stall runs inline"
        );
    }

    #[test]
    fn backoff_grows_and_relaxes() {
        let mut b = Backoff::default();
        b.record(Duration::from_micros(50), Duration::from_micros(20));
        assert_eq!((b.level, b.until), (0, None), "no stall");
        b.record(Duration::from_micros(50), Duration::from_millis(5));
        assert_eq!(b.level, 1);
        let first = b.until.unwrap();
        b.record(Duration::from_micros(50), Duration::from_millis(5));
        assert_eq!(b.level, 2);
        assert!(b.until.unwrap() > first);
        b.record(Duration::from_millis(5), Duration::from_millis(1));
        assert_eq!(
            b.level, 2,
            "a long wait after long own work is no stall; relaxing needs a quiet second"
        );
        b.last_change = Some(Instant::now() - Duration::from_secs(2));
        b.record(Duration::from_micros(50), Duration::from_micros(20));
        assert_eq!(b.level, 1);
    }

    #[test]
    fn chunks_are_balanced_and_bounded() {
        let pool = ThreadPool::new(2);
        let lens = Mutex::new(Vec::new());
        pool.for_each_chunk(1001, &|r| lens.lock().unwrap().push(r.len()));
        let lens = lens.into_inner().unwrap();
        assert_eq!(lens.len(), CHUNKS_PER_THREAD * 2);
        assert_eq!(lens.iter().sum::<usize>(), 1001);
        assert!(lens.iter().all(|&l| l == 1001 / 8 || l == 1001 / 8 + 1));
    }

    #[test]
    fn nested_calls_run_inline() {
        let pool = ThreadPool::new(2);
        let total = AtomicUsize::new(0);
        pool.for_each_chunk(4, &|outer| {
            for _ in outer {
                pool.for_each_chunk(5, &|inner| {
                    total.fetch_add(inner.len(), Ordering::Relaxed);
                });
            }
        });
        assert_eq!(total.into_inner(), 20);
    }

    #[test]
    fn concurrent_submitters_are_serialised() {
        let pool = ThreadPool::new(2);
        let total = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    for _ in 0..200 {
                        pool.for_each_chunk(7, &|r| {
                            total.fetch_add(r.len(), Ordering::Relaxed);
                        });
                    }
                });
            }
        });
        assert_eq!(total.into_inner(), 3 * 200 * 7);
    }

    #[test]
    fn worker_panic_propagates_and_pool_survives() {
        let pool = ThreadPool::new(2);
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.for_each_chunk(2, &|r| {
                if r.start == 1 {
                    panic!("boom");
                }
            })
        }));
        assert!(r.is_err());
        assert!(coverage(&pool, 9).iter().all(|&h| h == 1));
    }

    #[test]
    fn env_parsing() {
        assert_eq!(threads_from_env(Some("3")), 3);
        assert_eq!(threads_from_env(Some(" 1 ")), 1);
        let all = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(threads_from_env(Some("0")), all);
        assert_eq!(threads_from_env(Some("x")), all);
        assert_eq!(threads_from_env(None), all);
    }
}
