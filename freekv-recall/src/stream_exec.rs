//! The double-buffered streaming executor of the CPU backend (spec §6.1 on threads).
//!
//! Two worker threads and two staging buffers:
//!
//! ```text
//!  submit ──jobs──▶ copy thread ──(stage i, buffer A)──▶ scatter thread ──▶ resident slots (NHD)
//!                       ▲   host HND units → staging        staging → NHD head slices  │
//!                       └──────────────── free buffers (A, B) ◀─────────────────────────┘
//! ```
//!
//! The copy thread fills one staging buffer with the host units of stage i+1 while the scatter
//! thread transposes stage i out of the other one into the resident slots. Buffers circulate
//! through channels (FIFO), so stages are scattered in the order they were copied and a staging
//! buffer is reused only after its previous stage was scattered: the handoff is the ordering
//! edge, no `unsafe` and no shared mutable memory between the threads. A job's completion is sent
//! on its ticket's channel by the scatter thread after its last stage.
//!
//! Dropping the executor stops it: the job in progress is abandoned at the next stage boundary
//! and reported as [`RecallError::Stopped`] (its destination may be partially written), queued
//! jobs are reported the same way, both threads are joined and every buffer `Arc` is released.

use crate::exec::{copy_stage, scatter_stage, validate_against};
use crate::{CpuTarget, RecallEntry, RecallError, RecallExecutor, RecallPlan, RecallStats};
use crossbeam_channel::{Receiver, Sender, bounded, unbounded};
use freekv_layout::PageGeometry;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Settings of [`CpuRecallExecutor`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuRecallConfig {
    /// (page, head) units per pipeline stage (per staging buffer), ≥ 1. Larger stages amortise
    /// the handoff; smaller ones start overlapping sooner. Default 8.
    pub stage_units: usize,
}

impl Default for CpuRecallConfig {
    fn default() -> Self {
        Self { stage_units: 8 }
    }
}

type Done = Sender<Result<RecallStats, RecallError>>;

/// One submitted plan, shared by both threads while it runs.
struct Job<T> {
    plan: RecallPlan,
    target: CpuTarget<T>,
    geom: PageGeometry,
    submitted: Instant,
    done: Done,
}

enum ToScatter<T> {
    /// Entries `range` of the job's plan, staged in `buf`.
    Stage {
        job: Arc<Job<T>>,
        range: std::ops::Range<usize>,
        buf: Vec<T>,
    },
    /// Every stage of the job was sent (or the copy side failed with `copy_result`, and hands
    /// back the buffer it was filling in `spare`).
    End {
        job: Arc<Job<T>>,
        start: Instant,
        copy_time: Duration,
        copy_result: Result<(), RecallError>,
        spare: Option<Vec<T>>,
    },
}

/// Completion handle of a [`CpuRecallExecutor`] submission.
#[derive(Debug)]
pub struct CpuTicket {
    id: u64,
    layer: usize,
    rx: Receiver<Result<RecallStats, RecallError>>,
}

impl CpuTicket {
    /// Submission number (increasing per executor).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The layer of the plan.
    pub fn layer(&self) -> usize {
        self.layer
    }

    /// True when the result is available (waiting will not block).
    pub fn is_done(&self) -> bool {
        !self.rx.is_empty()
    }

    /// Block until the recall is complete (also usable after the executor was dropped: then
    /// the result is [`RecallError::Stopped`] unless the recall had finished).
    pub fn wait(self) -> Result<RecallStats, RecallError> {
        let _span = tracing::debug_span!("recall_wait", layer = self.layer).entered();
        self.rx.recv().map_err(|_| {
            RecallError::Stopped(format!(
                "recall {} (layer {}) was dropped before it finished",
                self.id, self.layer
            ))
        })?
    }
}

/// The double-buffered streaming recall executor (see the module docs).
pub struct CpuRecallExecutor<T> {
    jobs: Option<Sender<Job<T>>>,
    shutdown: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    totals: Arc<Mutex<RecallStats>>,
    next_id: AtomicU64,
}

impl<T: Copy + Default + Send + Sync + 'static> CpuRecallExecutor<T> {
    /// Start the two worker threads.
    pub fn new(config: CpuRecallConfig) -> Result<Self, RecallError> {
        if config.stage_units == 0 {
            return Err(RecallError::InvalidPlan("stage_units must be ≥ 1".into()));
        }
        let (job_tx, job_rx) = unbounded::<Job<T>>();
        let (stage_tx, stage_rx) = unbounded::<ToScatter<T>>();
        let (free_tx, free_rx) = bounded::<Vec<T>>(2);
        for _ in 0..2 {
            free_tx
                .send(Vec::new())
                .map_err(|_| RecallError::Stopped("staging channel closed".into()))?;
        }
        let shutdown = Arc::new(AtomicBool::new(false));
        let totals = Arc::new(Mutex::new(RecallStats::default()));

        // Only the scatter thread holds a sender of free buffers: if it ever died, the copy
        // thread's `recv` would fail instead of blocking forever.
        let copy = {
            let shutdown = Arc::clone(&shutdown);
            let stage_units = config.stage_units;
            std::thread::Builder::new()
                .name("freekv-recall-copy".into())
                .spawn(move || copy_loop(job_rx, stage_tx, free_rx, &shutdown, stage_units))
                .map_err(|e| RecallError::Stopped(format!("cannot start copy thread: {e}")))?
        };
        let scatter = {
            let totals = Arc::clone(&totals);
            std::thread::Builder::new()
                .name("freekv-recall-scatter".into())
                .spawn(move || scatter_loop(stage_rx, free_tx, &totals))
        };
        let scatter = match scatter {
            Ok(h) => h,
            Err(e) => {
                // The copy thread ends once its job channel closes; dropping `job_tx` does that.
                drop(job_tx);
                let _ = copy.join();
                return Err(RecallError::Stopped(format!(
                    "cannot start scatter thread: {e}"
                )));
            }
        };
        Ok(Self {
            jobs: Some(job_tx),
            shutdown,
            threads: vec![copy, scatter],
            totals,
            next_id: AtomicU64::new(0),
        })
    }
}

impl<T: Copy + Default + Send + Sync + 'static> RecallExecutor for CpuRecallExecutor<T> {
    type Target = CpuTarget<T>;
    type Ticket = CpuTicket;

    fn submit(&self, plan: RecallPlan, target: &CpuTarget<T>) -> Result<CpuTicket, RecallError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let layer = plan.layer();
        let (done, rx) = bounded(1);
        let submitted = Instant::now();
        let Some(geom) = validate_against(&plan, target)? else {
            // Nothing to move: complete at once.
            let stats = RecallStats {
                jobs: 1,
                ..RecallStats::default()
            };
            let _ = done.send(Ok(stats));
            return Ok(CpuTicket { id, layer, rx });
        };
        let job = Job {
            plan,
            target: target.clone(),
            geom,
            submitted,
            done,
        };
        self.jobs
            .as_ref()
            .ok_or_else(|| RecallError::Stopped("executor is shutting down".into()))?
            .send(job)
            .map_err(|_| RecallError::Stopped("recall worker threads exited".into()))?;
        Ok(CpuTicket { id, layer, rx })
    }

    fn wait(&self, ticket: CpuTicket) -> Result<RecallStats, RecallError> {
        ticket.wait()
    }

    fn totals(&self) -> RecallStats {
        *self.totals.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn name(&self) -> &'static str {
        "cpu-double-buffered"
    }
}

impl<T> Drop for CpuRecallExecutor<T> {
    fn drop(&mut self) {
        self.shutdown.store(true, Ordering::Release);
        drop(self.jobs.take());
        for t in self.threads.drain(..) {
            // A worker that panicked has nothing left to clean up; never propagate from drop.
            let _ = t.join();
        }
    }
}

fn stopped() -> RecallError {
    RecallError::Stopped("executor dropped while the recall was in progress".into())
}

fn copy_loop<T: Copy + Default>(
    jobs: Receiver<Job<T>>,
    to_scatter: Sender<ToScatter<T>>,
    free: Receiver<Vec<T>>,
    shutdown: &AtomicBool,
    stage_units: usize,
) {
    for job in jobs.iter() {
        if shutdown.load(Ordering::Acquire) {
            let _ = job.done.send(Err(stopped()));
            continue;
        }
        let job = Arc::new(job);
        let _span = tracing::debug_span!(
            "recall_job",
            layer = job.plan.layer(),
            units = job.plan.len()
        )
        .entered();
        let start = Instant::now();
        let mut copy_time = Duration::ZERO;
        let mut copy_result = Ok(());
        let mut spare = None;
        let n = job.plan.len();
        let mut lo = 0;
        while lo < n {
            if shutdown.load(Ordering::Acquire) {
                copy_result = Err(stopped());
                break;
            }
            let hi = (lo + stage_units).min(n);
            // Blocks until the scatter side has emptied one of the two buffers.
            let Ok(mut buf) = free.recv() else { return };
            let t0 = Instant::now();
            let entries: &[RecallEntry] = job.plan.entries().get(lo..hi).unwrap_or(&[]);
            let r = copy_stage(&job.target, job.geom, entries, &mut buf);
            copy_time += t0.elapsed();
            if let Err(e) = r {
                spare = Some(buf);
                copy_result = Err(e);
                break;
            }
            let stage = ToScatter::Stage {
                job: Arc::clone(&job),
                range: lo..hi,
                buf,
            };
            if to_scatter.send(stage).is_err() {
                return;
            }
            lo = hi;
        }
        let end = ToScatter::End {
            job,
            start,
            copy_time,
            copy_result,
            spare,
        };
        if to_scatter.send(end).is_err() {
            return;
        }
    }
}

fn scatter_loop<T: Copy>(
    stages: Receiver<ToScatter<T>>,
    free: Sender<Vec<T>>,
    totals: &Mutex<RecallStats>,
) {
    let mut scatter_time = Duration::ZERO;
    let mut units = 0u64;
    let mut n_stages = 0u64;
    let mut failure: Option<RecallError> = None;
    for msg in stages.iter() {
        match msg {
            ToScatter::Stage { job, range, buf } => {
                if failure.is_none() {
                    let entries = job.plan.entries().get(range).unwrap_or(&[]);
                    let t0 = Instant::now();
                    match scatter_stage(&job.target, job.geom, entries, &buf) {
                        Ok(()) => {
                            units += entries.len() as u64;
                            n_stages += 1;
                        }
                        Err(e) => failure = Some(e),
                    }
                    scatter_time += t0.elapsed();
                }
                // Capacity 2 and exactly two buffers: never blocks. An error means the copy
                // thread is gone, and with it the need for buffers.
                let _ = free.send(buf);
            }
            ToScatter::End {
                job,
                start,
                copy_time,
                copy_result,
                spare,
            } => {
                if let Some(buf) = spare {
                    let _ = free.send(buf);
                }
                let result = match (copy_result, failure.take()) {
                    (Err(e), _) | (Ok(()), Some(e)) => Err(e),
                    (Ok(()), None) => {
                        let stats = RecallStats {
                            jobs: 1,
                            units,
                            bytes: job.plan.bytes::<T>(job.geom),
                            stages: n_stages,
                            elapsed: start.elapsed(),
                            latency: job.submitted.elapsed(),
                            copy_time,
                            scatter_time,
                        };
                        totals
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .accumulate(&stats);
                        Ok(stats)
                    }
                };
                // The ticket may have been dropped: nobody to tell.
                let _ = job.done.send(result);
                scatter_time = Duration::ZERO;
                units = 0;
                n_stages = 0;
            }
        }
    }
}
