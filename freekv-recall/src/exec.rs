//! The executor interface, statistics, and the copy/scatter stages shared by the CPU executors.

use crate::target::{CpuTarget, read_host, read_slots, write_slots};
use crate::{RecallEntry, RecallError, RecallPlan};
use freekv_layout::{PageGeometry, hnd_unit_to_nhd_slice};
use std::time::Duration;

/// What one recall (or a sum of recalls) moved and how long it took.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RecallStats {
    /// Plans executed.
    pub jobs: u64,
    /// (page, KV head) units delivered.
    pub units: u64,
    /// Bytes delivered (`units · 2·P·d · size_of::<T>()`).
    pub bytes: u64,
    /// Pipeline stages (groups of units handed from the copy to the scatter side).
    pub stages: u64,
    /// Wall time from the start of execution to the last scatter.
    pub elapsed: Duration,
    /// From submission to completion (includes waiting behind earlier plans).
    pub latency: Duration,
    /// Time spent copying host units into staging buffers (or reading them, when direct).
    pub copy_time: Duration,
    /// Time spent transposing staged units into resident slots.
    pub scatter_time: Duration,
}

impl RecallStats {
    /// Add `other` into `self` (totals over many recalls).
    pub fn accumulate(&mut self, other: &RecallStats) {
        self.jobs += other.jobs;
        self.units += other.units;
        self.bytes += other.bytes;
        self.stages += other.stages;
        self.elapsed += other.elapsed;
        self.latency += other.latency;
        self.copy_time += other.copy_time;
        self.scatter_time += other.scatter_time;
    }

    /// Delivered bytes per second of execution time, in GB/s (10⁹ B/s); 0 when nothing ran.
    pub fn gb_per_s(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            self.bytes as f64 / s / 1e9
        } else {
            0.0
        }
    }
}

/// The interface every recall executor implements (CPU threads here, CUDA streams in the GPU
/// backend): submit the plan of one layer, get a ticket, wait on it before the layer's attention.
///
/// A ticket covers only its own plan. Submissions execute in submission order on executors that
/// have a queue; a failed plan may leave its destination slots partially written.
pub trait RecallExecutor {
    /// The buffers a plan moves data between (per-sequence host pools and resident pools).
    type Target;
    /// Completion handle of one submission.
    type Ticket;

    /// Validate `plan` against `target` and start moving it. Invalid plans are rejected here with
    /// [`RecallError::InvalidPlan`] and nothing is written.
    fn submit(&self, plan: RecallPlan, target: &Self::Target) -> Result<Self::Ticket, RecallError>;

    /// Block until the submission is complete; its statistics, or the error that stopped it.
    fn wait(&self, ticket: Self::Ticket) -> Result<RecallStats, RecallError>;

    /// Sum of the statistics of every completed submission.
    fn totals(&self) -> RecallStats;

    /// A short name for reports ("cpu-double-buffered", "cpu-sync", ...).
    fn name(&self) -> &'static str;

    /// Submit and wait.
    fn recall(&self, plan: RecallPlan, target: &Self::Target) -> Result<RecallStats, RecallError> {
        let t = self.submit(plan, target)?;
        self.wait(t)
    }
}

/// Check a plan against a target's real buffers; returns the common page geometry (`None` for
/// an empty plan). Takes short read locks.
pub(crate) fn validate_against<T>(
    plan: &RecallPlan,
    target: &CpuTarget<T>,
) -> Result<Option<PageGeometry>, RecallError> {
    if target.hosts.len() != target.slots.len() {
        return Err(RecallError::InvalidPlan(format!(
            "target has {} host sources but {} resident pools",
            target.hosts.len(),
            target.slots.len()
        )));
    }
    let mut geom: Option<PageGeometry> = None;
    // Per sequence: resident slot count once its buffers were checked.
    let mut slot_counts: Vec<Option<usize>> = vec![None; target.slots.len()];
    for (i, e) in plan.entries().iter().enumerate() {
        let seq = e.seq as usize;
        let entry_err = |msg: String| RecallError::InvalidPlan(format!("entry {i}: {msg}"));
        let host = read_host(target, seq).map_err(|err| match err {
            RecallError::InvalidPlan(m) => entry_err(m),
            other => other,
        })?;
        let hg = host.geometry();
        let g = *geom.get_or_insert(hg);
        let slots = match slot_counts.get(seq).copied().flatten() {
            Some(n) => n,
            None => {
                let pool = read_slots(target, seq)?;
                if hg != g || pool.geometry() != g {
                    return Err(entry_err(format!(
                        "sequence {seq}: host geometry {hg:?} / resident geometry {:?} differ from {g:?}",
                        pool.geometry()
                    )));
                }
                let n = pool.slots();
                if let Some(c) = slot_counts.get_mut(seq) {
                    *c = Some(n);
                }
                n
            }
        };
        if e.kv_head as usize >= g.kv_heads {
            return Err(entry_err(format!(
                "kv head {} out of range ({} heads)",
                e.kv_head, g.kv_heads
            )));
        }
        if e.slot as usize >= slots {
            return Err(entry_err(format!(
                "slot {} out of range ({slots} resident slots in sequence {seq})",
                e.slot
            )));
        }
        host.head_unit(e.host_page, e.kv_head as usize)
            .map_err(|err| {
                entry_err(format!(
                    "host page {} of sequence {seq}: {err}",
                    e.host_page
                ))
            })?;
    }
    plan.check_unique_destinations()?;
    Ok(geom)
}

/// Copy the host units of `entries` into `buf` (resized to `entries.len()` units), taking one
/// read lock per run of entries of the same sequence.
pub(crate) fn copy_stage<T: Copy + Default>(
    target: &CpuTarget<T>,
    geom: PageGeometry,
    entries: &[RecallEntry],
    buf: &mut Vec<T>,
) -> Result<(), RecallError> {
    let _span = tracing::trace_span!("recall_copy_stage", units = entries.len()).entered();
    let u = geom.head_unit_elems();
    buf.resize(entries.len() * u, T::default());
    let mut outs = buf.chunks_exact_mut(u);
    for run in entries.chunk_by(|a, b| a.seq == b.seq) {
        let Some(first) = run.first() else { continue };
        let host = read_host(target, first.seq as usize)?;
        for e in run {
            let unit = host.head_unit(e.host_page, e.kv_head as usize)?;
            let out = outs.next().ok_or_else(|| {
                RecallError::InvalidPlan("staging buffer shorter than the stage".into())
            })?;
            if unit.len() != out.len() {
                return Err(RecallError::InvalidPlan(format!(
                    "host unit of {} elements, staging unit of {}",
                    unit.len(),
                    out.len()
                )));
            }
            out.copy_from_slice(unit);
        }
    }
    Ok(())
}

/// Transpose the staged units of `entries` (HND, contiguous in `buf`) into their resident slots
/// (NHD head slices), taking one write lock per run of entries of the same sequence.
pub(crate) fn scatter_stage<T: Copy>(
    target: &CpuTarget<T>,
    geom: PageGeometry,
    entries: &[RecallEntry],
    buf: &[T],
) -> Result<(), RecallError> {
    let _span = tracing::trace_span!("recall_scatter_stage", units = entries.len()).entered();
    let u = geom.head_unit_elems();
    let mut units = buf.chunks_exact(u);
    for run in entries.chunk_by(|a, b| a.seq == b.seq) {
        let Some(first) = run.first() else { continue };
        let mut pool = write_slots(target, first.seq as usize)?;
        for e in run {
            let unit = units.next().ok_or_else(|| {
                RecallError::InvalidPlan("staging buffer shorter than the stage".into())
            })?;
            let page = pool.page_mut(e.slot as usize)?;
            hnd_unit_to_nhd_slice(geom, e.kv_head as usize, unit, page)?;
        }
    }
    Ok(())
}

/// Transpose host units straight into resident slots (no staging): the fastest CPU recall.
pub(crate) fn direct_stage<T: Copy>(
    target: &CpuTarget<T>,
    geom: PageGeometry,
    entries: &[RecallEntry],
) -> Result<(), RecallError> {
    for run in entries.chunk_by(|a, b| a.seq == b.seq) {
        let Some(first) = run.first() else { continue };
        let seq = first.seq as usize;
        let host = read_host(target, seq)?;
        let mut pool = write_slots(target, seq)?;
        for e in run {
            let unit = host.head_unit(e.host_page, e.kv_head as usize)?;
            let page = pool.page_mut(e.slot as usize)?;
            hnd_unit_to_nhd_slice(geom, e.kv_head as usize, unit, page)?;
        }
    }
    Ok(())
}
