//! The synchronous reference executor: the whole plan runs on the caller's thread inside
//! `submit`, no overlap.

use crate::exec::{copy_stage, direct_stage, scatter_stage, validate_against};
use crate::{CpuTarget, RecallError, RecallExecutor, RecallPlan, RecallStats};
use std::marker::PhantomData;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How [`SyncRecallExecutor`] moves each stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// Copy a stage of host units into one staging buffer, then transpose it into the slots —
    /// the single-buffer "copy, then scatter" scheme the double-buffered executor is measured
    /// against.
    Staged,
    /// Transpose each host unit straight into its slot (no staging copy): on the CPU the cheapest
    /// way to move the bytes, the floor for both other schemes.
    Direct,
}

/// Synchronous reference executor: `submit` does all the work and returns a ready ticket.
pub struct SyncRecallExecutor<T> {
    mode: SyncMode,
    stage_units: usize,
    staging: Mutex<Vec<T>>,
    totals: Mutex<RecallStats>,
    _t: PhantomData<fn() -> T>,
}

/// A completed synchronous recall.
#[derive(Debug)]
pub struct SyncTicket(RecallStats);

impl<T: Copy + Default + Send + Sync + 'static> SyncRecallExecutor<T> {
    /// A synchronous executor; `stage_units` (≥ 1) units are staged at a time in
    /// [`SyncMode::Staged`].
    pub fn new(mode: SyncMode, stage_units: usize) -> Result<Self, RecallError> {
        if stage_units == 0 {
            return Err(RecallError::InvalidPlan("stage_units must be ≥ 1".into()));
        }
        Ok(Self {
            mode,
            stage_units,
            staging: Mutex::new(Vec::new()),
            totals: Mutex::new(RecallStats::default()),
            _t: PhantomData,
        })
    }

    /// The mode this executor runs in.
    pub fn mode(&self) -> SyncMode {
        self.mode
    }
}

impl<T: Copy + Default + Send + Sync + 'static> RecallExecutor for SyncRecallExecutor<T> {
    type Target = CpuTarget<T>;
    type Ticket = SyncTicket;

    fn submit(&self, plan: RecallPlan, target: &CpuTarget<T>) -> Result<SyncTicket, RecallError> {
        let _span =
            tracing::debug_span!("recall_sync", layer = plan.layer(), units = plan.len()).entered();
        let submitted = Instant::now();
        let Some(geom) = validate_against(&plan, target)? else {
            return Ok(SyncTicket(RecallStats {
                jobs: 1,
                ..RecallStats::default()
            }));
        };
        let start = Instant::now();
        let mut stats = RecallStats {
            jobs: 1,
            ..RecallStats::default()
        };
        let mut copy_time = Duration::ZERO;
        let mut scatter_time = Duration::ZERO;
        {
            let mut staging = self
                .staging
                .lock()
                .map_err(|_| RecallError::LockPoisoned("sync staging buffer".into()))?;
            for stage in plan.entries().chunks(self.stage_units) {
                match self.mode {
                    SyncMode::Staged => {
                        let t0 = Instant::now();
                        copy_stage(target, geom, stage, &mut staging)?;
                        let t1 = Instant::now();
                        scatter_stage(target, geom, stage, &staging)?;
                        copy_time += t1 - t0;
                        scatter_time += t1.elapsed();
                    }
                    SyncMode::Direct => {
                        let t0 = Instant::now();
                        direct_stage(target, geom, stage)?;
                        scatter_time += t0.elapsed();
                    }
                }
                stats.stages += 1;
                stats.units += stage.len() as u64;
            }
        }
        stats.bytes = plan.bytes::<T>(geom);
        stats.elapsed = start.elapsed();
        stats.latency = submitted.elapsed();
        stats.copy_time = copy_time;
        stats.scatter_time = scatter_time;
        self.totals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .accumulate(&stats);
        Ok(SyncTicket(stats))
    }

    fn wait(&self, ticket: SyncTicket) -> Result<RecallStats, RecallError> {
        Ok(ticket.0)
    }

    fn totals(&self) -> RecallStats {
        *self.totals.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn name(&self) -> &'static str {
        match self.mode {
            SyncMode::Staged => "cpu-sync-staged",
            SyncMode::Direct => "cpu-sync-direct",
        }
    }
}
