//! What a CPU recall reads from (host pages, HND) and writes into (resident slots, NHD), and the
//! ownership scheme that lets a worker thread do it soundly.
//!
//! Buffers are shared as `Arc<RwLock<…>>`, one lock per sequence's host pool and one per
//! (sequence, layer) resident pool. A submission clones the `Arc`s (cheap) so the buffers outlive
//! the work; the workers take a **read** lock on a host pool while copying out of it and a
//! **write** lock on a resident pool while scattering into it, one stage (a few units) at a time,
//! so the model can keep appending to other layers meanwhile. Callers must not hold a lock on a
//! target buffer while submitting, waiting on a ticket or dropping an executor (that would wait
//! on itself); they must wait for a layer's ticket before reading its resident pool (attention),
//! because recalled slots hold stale data until then.

use crate::RecallError;
use freekv_layout::{HostPagePool, LayoutError, PageGeometry, PageId, PagedKvCache, SlotPool};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Read access to host pages in HND layout, for recall sources.
pub trait HostPages<T>: Send + Sync {
    /// The geometry of every page.
    fn geometry(&self) -> PageGeometry;
    /// Page ids are below this (allocated or not).
    fn page_capacity(&self) -> usize;
    /// One (page, KV head) unit: K block then V block, `2·P·d` contiguous elements; an error for
    /// a page that is not allocated or a head out of range.
    fn head_unit(&self, page: PageId, head: usize) -> Result<&[T], LayoutError>;
}

impl<T: Copy + Default + Send + Sync> HostPages<T> for HostPagePool<T> {
    fn geometry(&self) -> PageGeometry {
        HostPagePool::geometry(self)
    }
    fn page_capacity(&self) -> usize {
        self.capacity_pages()
    }
    fn head_unit(&self, page: PageId, head: usize) -> Result<&[T], LayoutError> {
        HostPagePool::head_unit(self, page, head)
    }
}

impl HostPages<f32> for PagedKvCache {
    fn geometry(&self) -> PageGeometry {
        PagedKvCache::geometry(self)
    }
    fn page_capacity(&self) -> usize {
        self.pool().capacity_pages()
    }
    fn head_unit(&self, page: PageId, head: usize) -> Result<&[f32], LayoutError> {
        self.pool().head_unit(page, head)
    }
}

/// A shared host page source (one per sequence).
pub type SharedHost<T> = Arc<RwLock<dyn HostPages<T>>>;

/// A shared resident pool (one per (sequence, layer)).
pub type SharedSlots<T> = Arc<RwLock<SlotPool<T>>>;

/// The buffers of one layer's recall on the CPU: `hosts[s]` and `slots[s]` belong to sequence `s`
/// of the plan (several layers may share the same host `Arc`s when one pool holds every layer).
pub struct CpuTarget<T> {
    /// Host page sources, indexed by sequence.
    pub hosts: Vec<SharedHost<T>>,
    /// Resident pools of this layer, indexed by sequence.
    pub slots: Vec<SharedSlots<T>>,
}

impl<T> Clone for CpuTarget<T> {
    fn clone(&self) -> Self {
        Self {
            hosts: self.hosts.clone(),
            slots: self.slots.clone(),
        }
    }
}

impl<T> std::fmt::Debug for CpuTarget<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuTarget")
            .field("sequences", &self.hosts.len())
            .finish_non_exhaustive()
    }
}

impl<T> CpuTarget<T> {
    /// A target for one sequence.
    pub fn single(host: SharedHost<T>, slots: SharedSlots<T>) -> Self {
        Self {
            hosts: vec![host],
            slots: vec![slots],
        }
    }
}

pub(crate) fn read_host<'a, T>(
    target: &'a CpuTarget<T>,
    seq: usize,
) -> Result<RwLockReadGuard<'a, dyn HostPages<T> + 'static>, RecallError> {
    let lock = target.hosts.get(seq).ok_or_else(|| {
        RecallError::InvalidPlan(format!(
            "sequence {seq} out of range ({} in the target)",
            target.hosts.len()
        ))
    })?;
    lock.read()
        .map_err(|_| RecallError::LockPoisoned(format!("host pages of sequence {seq}")))
}

pub(crate) fn read_slots<'a, T>(
    target: &'a CpuTarget<T>,
    seq: usize,
) -> Result<RwLockReadGuard<'a, SlotPool<T>>, RecallError> {
    slots_lock(target, seq)?
        .read()
        .map_err(|_| RecallError::LockPoisoned(format!("resident slots of sequence {seq}")))
}

pub(crate) fn write_slots<'a, T>(
    target: &'a CpuTarget<T>,
    seq: usize,
) -> Result<RwLockWriteGuard<'a, SlotPool<T>>, RecallError> {
    slots_lock(target, seq)?
        .write()
        .map_err(|_| RecallError::LockPoisoned(format!("resident slots of sequence {seq}")))
}

fn slots_lock<T>(target: &CpuTarget<T>, seq: usize) -> Result<&SharedSlots<T>, RecallError> {
    target.slots.get(seq).ok_or_else(|| {
        RecallError::InvalidPlan(format!(
            "sequence {seq} out of range ({} in the target)",
            target.slots.len()
        ))
    })
}
