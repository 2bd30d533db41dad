//! [`GatherRecall`]: the zero-copy recall (one gather kernel per layer reading the mapped host
//! pages; spec §10.1).

use std::sync::Arc;

use freekv_kernels::cudarc::driver::CudaStream;
use freekv_kernels::{DeviceCounters, FreeKvShape, Kernels};

use super::pool::HostKvPool;
use super::{CudaRecallCounters, RecallLists, SlotsMut};
use crate::RecallError;

/// Default block budget of the gather kernel: 8 of the H200's 132 SMs saturate PCIe Gen5.
pub const DEFAULT_GATHER_BLOCKS: usize = 8;

/// Zero-copy recall: launches [`Kernels::freekv_gather`] on the caller's stream with this pool's
/// table. Nothing is read back and nothing waits: the launch is asynchronous and capturable into a
/// CUDA graph. Optional device counters ([`GatherRecall::with_counters`]) count delivered and
/// skipped units.
#[derive(Debug)]
pub struct GatherRecall {
    max_blocks: usize,
    counters: Option<DeviceCounters>,
}

impl GatherRecall {
    /// A gather using at most `max_blocks` blocks (clamped to at least 1).
    pub fn new(max_blocks: usize) -> Self {
        Self {
            max_blocks: max_blocks.max(1),
            counters: None,
        }
    }

    /// With device counters (allocated on `stream`) that every launch adds to.
    pub fn with_counters(mut self, stream: &Arc<CudaStream>) -> Result<Self, RecallError> {
        self.counters = Some(DeviceCounters::new(stream)?);
        Ok(self)
    }

    /// The block budget.
    pub fn max_blocks(&self) -> usize {
        self.max_blocks
    }

    /// Recall the listed units of `layer` into `slots` on `stream` (see
    /// [`Kernels::freekv_gather`]).
    #[allow(clippy::too_many_arguments)]
    pub fn recall(
        &self,
        kernels: &Kernels,
        stream: &Arc<CudaStream>,
        shape: &FreeKvShape,
        pool: &HostKvPool,
        layer: usize,
        lists: &RecallLists<'_>,
        slots: SlotsMut<'_>,
    ) -> Result<(), RecallError> {
        pool.check_shape(shape)?;
        let table = pool.device_table(layer)?;
        kernels.freekv_gather(
            stream,
            shape,
            table,
            lists.count,
            lists.list,
            lists.flags,
            lists.filter,
            slots,
            self.max_blocks,
            self.counters.as_ref(),
        )?;
        Ok(())
    }

    /// Units delivered and skipped by every launch so far (`None` without counters); synchronises
    /// `stream` (launches on other streams must be ordered before it by the caller). `bytes` is
    /// `units · unit_bytes`.
    pub fn counters(
        &self,
        stream: &Arc<CudaStream>,
        shape: &FreeKvShape,
    ) -> Result<Option<CudaRecallCounters>, RecallError> {
        let Some(c) = &self.counters else {
            return Ok(None);
        };
        let (units, skipped) = c.read(stream)?;
        Ok(Some(CudaRecallCounters {
            units,
            bytes: units * super::unit_bytes(shape) as u64,
            skipped,
            ..CudaRecallCounters::default()
        }))
    }
}
