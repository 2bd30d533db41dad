//! The FreeKV recall engine: recall plans and the executors that move KV pages from the host pool
//! (HND) into the resident slots (NHD) — the only crate that moves KV bytes between the two.
//!
//! * [`RecallPlan`] — the (sequence, KV head, host page, destination slot) units of one layer,
//!   built from the slot diffs of `freekv_layout::SlotTable` ([`RecallPlan::push_diff`]) and
//!   validated before anything moves (bad plans are [`RecallError::InvalidPlan`], never a panic).
//! * [`RecallExecutor`] — submit a plan, get a ticket, wait on it before the layer's attention.
//!   Implemented here by [`CpuRecallExecutor`] (double-buffered streaming on two threads: the
//!   copy of stage i+1 overlaps the transpose of stage i, spec §6.1) and [`SyncRecallExecutor`]
//!   (the synchronous reference: staged copy-then-transpose, or direct transpose); the CUDA
//!   executor of the GPU backend implements the same trait.
//! * [`CpuTarget`] — the buffers of one layer's recall, shared as `Arc<RwLock<…>>` (see the
//!   [`target`] module docs for the locking rules), and [`HostPages`], the read interface of a
//!   host page source (implemented for `HostPagePool<T>` and `PagedKvCache`).
//!
//! ```
//! use std::sync::{Arc, RwLock};
//! use freekv_layout::{Budget, PageGeometry, PagedKvCache, SlotPool, SlotTable};
//! use freekv_recall::{CpuRecallConfig, CpuRecallExecutor, CpuTarget, RecallExecutor, RecallPlan, SharedHost};
//!
//! let geom = PageGeometry::new(4, 2, 8)?;                 // 4 tokens/page, 2 KV heads, d = 8
//! let mut cache = PagedKvCache::new(geom, 1, None)?;      // the host history (HND pages)
//! for t in 0..40 {
//!     let x = vec![t as f32; 16];
//!     cache.append(0, &x, &x)?;
//! }
//! let budget = Budget::new(1, 2, 2, 4)?;                  // 5 resident slots
//! let mut table = SlotTable::new(budget);                 // KV head 1 of layer 0
//! table.append_tokens(40)?;
//! let diff = table.select(&[2, 6])?;                      // page 2 kept, page 6 recalled
//! let mut plan = RecallPlan::new(0);
//! plan.push_diff(0, 1, &diff, cache.page_table(0)?)?;
//!
//! let host: SharedHost<f32> = Arc::new(RwLock::new(cache));
//! let slots = Arc::new(RwLock::new(SlotPool::<f32>::new(geom, budget.total_pages())?));
//! let target = CpuTarget::single(host, Arc::clone(&slots));
//! let exec = CpuRecallExecutor::<f32>::new(CpuRecallConfig::default())?;
//! let ticket = exec.submit(plan, &target)?;
//! let stats = exec.wait(ticket)?;
//! assert_eq!(stats.units, 1);
//! let slot = table.slot_of(6).unwrap();
//! assert_eq!(slots.read().unwrap().key_row(slot, 0, 1)?, &[24.0; 8]); // token 24 = page 6, row 0
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod cuda;
mod error;
mod exec;
mod plan;
mod stream_exec;
mod sync_exec;
pub mod target;

pub use error::RecallError;
pub use exec::{RecallExecutor, RecallStats};
pub use freekv_layout::SlotPool;
pub use plan::{PlanLimits, RecallEntry, RecallPlan};
pub use stream_exec::{CpuRecallConfig, CpuRecallExecutor, CpuTicket};
pub use sync_exec::{SyncMode, SyncRecallExecutor, SyncTicket};
pub use target::{CpuTarget, HostPages, SharedHost, SharedSlots};

#[cfg(test)]
mod tests {
    use super::*;

    fn send_sync<X: Send + Sync>() {}

    #[test]
    fn executors_and_targets_are_send_and_sync() {
        send_sync::<CpuRecallExecutor<f32>>();
        send_sync::<SyncRecallExecutor<f32>>();
        send_sync::<CpuTarget<f32>>();
        send_sync::<CpuTicket>();
        send_sync::<RecallPlan>();
    }
}
