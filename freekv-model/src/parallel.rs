//! A persistent thread pool with a very cheap fork-join handoff: the compute substrate of the CPU
//! decoder (mat-vec, mat-mul, attention).
//!
//! One decode step of a small model issues a few hundred parallel calls of a few microseconds
//! each, so the handoff has to cost far less than a microsecond when the workers are busy. The pool
//! keeps `threads() - 1` workers alive; the calling thread is the remaining one and always takes
//! part in the work. A call publishes the job in shared memory and bumps an epoch counter; workers
//! spin on the counter for a short while (about [`SPIN_TIME`]) before parking on a condition
//! variable, so back-to-back calls never go through the kernel. The caller runs its own chunk,
//! then spins until every worker has acknowledged the job.
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

use std::cell::{Cell, UnsafeCell};
use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker spins on the epoch counter before it parks.
pub const SPIN_TIME: Duration = Duration::from_micros(200);

/// The environment variable that sets the size of [`ThreadPool::global`].
pub const THREADS_ENV: &str = "FREEKV_THREADS";

/// A borrowed task with its lifetime erased; only dereferenced while the submitting call waits.
type TaskPtr = *const (dyn Fn(Range<usize>) + Sync + 'static);

/// The job slot: written by the submitter while every worker is idle, read by workers after they
/// observe the epoch that published it.
struct Job {
    task: Option<TaskPtr>,
    n: usize,
    parts: usize,
}

struct Shared {
    /// Bumped once per job (and once at shutdown).
    epoch: AtomicU64,
    job: UnsafeCell<Job>,
    /// Workers that have not yet finished the current job.
    pending: AtomicUsize,
    /// A worker's part of the current job panicked.
    panicked: AtomicBool,
    shutdown: AtomicBool,
    /// Workers parked (or about to park) on `cv`.
    sleepers: AtomicUsize,
    park_lock: Mutex<()>,
    cv: Condvar,
}

// SAFETY: `job` is only written by the thread that holds `ThreadPool::submit` while `pending == 0`
// (no worker reads it then), and read by workers between observing a new epoch (Acquire) and
// decrementing `pending` (Release). The task pointer it holds is `Sync`.
unsafe impl Sync for Shared {}
// SAFETY: as above; nothing in `Shared` is tied to a thread.
unsafe impl Send for Shared {}

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
    submit: Mutex<()>,
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
            epoch: AtomicU64::new(0),
            job: UnsafeCell::new(Job {
                task: None,
                n: 0,
                parts: 0,
            }),
            pending: AtomicUsize::new(0),
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
                .spawn(move || worker_loop(&s, i));
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
            submit: Mutex::new(()),
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

    /// Calls `f` on contiguous ranges that together cover `0..n` exactly once, one range per thread
    /// (fewer when `n < threads()`), the calling thread included, and returns when all are done.
    ///
    /// Ranges are balanced (their lengths differ by at most one) and the caller gets the first.
    /// A panic inside `f` is propagated to the caller after every thread has finished.
    pub fn for_each_chunk(&self, n: usize, f: &(dyn Fn(Range<usize>) + Sync)) {
        let parts = n.min(self.threads());
        if parts <= 1 || IN_POOL.with(Cell::get) {
            if n > 0 {
                f(0..n);
            }
            return;
        }
        let _guard = self.submit.lock().unwrap_or_else(|e| e.into_inner());
        let sh = &*self.shared;
        // SAFETY: we hold `submit` and the previous job has fully completed (`pending == 0`, every
        // worker finished reading the slot before its Release decrement), so no one reads the slot.
        // The task pointer outlives its use: this function does not return (or unwind) before
        // `pending` is back to zero, i.e. before every worker is done with `f`.
        unsafe {
            let task: &'static (dyn Fn(Range<usize>) + Sync) = std::mem::transmute(f);
            *sh.job.get() = Job {
                task: Some(task as TaskPtr),
                n,
                parts,
            };
        }
        sh.panicked.store(false, Ordering::Relaxed);
        sh.pending.store(self.workers.len(), Ordering::Relaxed);
        sh.epoch.fetch_add(1, Ordering::SeqCst);
        if sh.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = sh.park_lock.lock().unwrap_or_else(|e| e.into_inner());
            sh.cv.notify_all();
        }

        IN_POOL.with(|c| c.set(true));
        let mine = catch_unwind(AssertUnwindSafe(|| f(part_range(n, parts, 0))));
        IN_POOL.with(|c| c.set(false));

        let mut spins = 0u32;
        while sh.pending.load(Ordering::Acquire) != 0 {
            if spins < 4096 {
                spins += 1;
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        // SAFETY: all workers are done; drop the dangling-to-be pointer.
        unsafe { (*sh.job.get()).task = None };
        if let Err(payload) = mine {
            resume_unwind(payload);
        }
        if sh.panicked.load(Ordering::Relaxed) {
            panic!("a ThreadPool task panicked on a worker thread");
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

fn worker_loop(sh: &Shared, index: usize) {
    IN_POOL.with(|c| c.set(true));
    let mut seen = 0u64;
    loop {
        // Wait for a new epoch: spin first, then park.
        let mut e = sh.epoch.load(Ordering::Acquire);
        if e == seen {
            let start = Instant::now();
            let mut spins = 0u32;
            while e == seen {
                std::hint::spin_loop();
                spins = spins.wrapping_add(1);
                if spins.is_multiple_of(64) && start.elapsed() > SPIN_TIME {
                    let mut g = sh.park_lock.lock().unwrap_or_else(|e| e.into_inner());
                    sh.sleepers.fetch_add(1, Ordering::SeqCst);
                    while sh.epoch.load(Ordering::SeqCst) == seen {
                        g = sh.cv.wait(g).unwrap_or_else(|e| e.into_inner());
                    }
                    sh.sleepers.fetch_sub(1, Ordering::SeqCst);
                    drop(g);
                }
                e = sh.epoch.load(Ordering::Acquire);
            }
        }
        seen = e;
        if sh.shutdown.load(Ordering::Acquire) {
            return;
        }
        // SAFETY: the submitter wrote the slot before the epoch bump we observed with Acquire and
        // does not touch it again until we decrement `pending`.
        let (task, n, parts) = unsafe {
            let j = &*sh.job.get();
            (j.task, j.n, j.parts)
        };
        if let Some(task) = task
            && index < parts
        {
            // SAFETY: the submitter keeps the task alive until `pending` reaches zero.
            let f = unsafe { &*task };
            if catch_unwind(AssertUnwindSafe(|| f(part_range(n, parts, index)))).is_err() {
                sh.panicked.store(true, Ordering::Relaxed);
            }
        }
        sh.pending.fetch_sub(1, Ordering::Release);
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        let sh = &*self.shared;
        sh.shutdown.store(true, Ordering::Release);
        sh.epoch.fetch_add(1, Ordering::SeqCst);
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
            std::thread::sleep(Duration::from_millis(20));
        });
        assert_eq!(ids.into_inner().unwrap().len(), 2);
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
