//! [`PerPageRecall`]: the ArkVale baseline as published — the recall list read back, then one
//! strided 2-D copy per (page, head) unit straight into the NHD slot, the host waiting.

use std::sync::{Arc, Mutex};

use freekv_kernels::FreeKvShape;
use freekv_kernels::cudarc::driver::{CudaStream, DevicePtr, sys};

use super::pool::{Backing, HostKvPool};
use super::{CudaRecallCounters, HostLists, ListAddrs, RecallLists, SlotsMut, check_slots};
use crate::RecallError;

/// Blocking per-unit recall: on `stream`, the lists are copied back and the stream synchronised;
/// each listed unit is then one `cuMemcpy2DAsync` of `2·P` rows of `d` bf16 from the contiguous
/// HND unit (pitch `d·2` bytes) into head `h` of the slot (pitch `Hkv·d·2` bytes), and the stream
/// is synchronised again.
pub struct PerPageRecall {
    shape: FreeKvShape,
    lists: Mutex<HostLists>,
    totals: Mutex<CudaRecallCounters>,
}

impl std::fmt::Debug for PerPageRecall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PerPageRecall")
            .field("shape", &self.shape)
            .finish_non_exhaustive()
    }
}

impl PerPageRecall {
    /// Pinned read-back buffers for `shape` (allocated in `stream`'s context).
    pub fn new(stream: &Arc<CudaStream>, shape: &FreeKvShape) -> Result<Self, RecallError> {
        shape.validate("PerPageRecall")?;
        Ok(Self {
            shape: *shape,
            lists: Mutex::new(HostLists::new(stream, shape)?),
            totals: Mutex::new(CudaRecallCounters::default()),
        })
    }

    /// Recall one layer on `stream` and wait for it.
    #[tracing::instrument(level = "debug", skip_all, fields(layer))]
    pub fn recall(
        &self,
        stream: &Arc<CudaStream>,
        pool: &HostKvPool,
        layer: usize,
        lists: &RecallLists<'_>,
        slots: SlotsMut<'_>,
    ) -> Result<CudaRecallCounters, RecallError> {
        let shape = self.shape;
        pool.check_shape(&shape)?;
        pool.device_table(layer)?;
        check_slots(slots, &shape)?;
        let addrs = ListAddrs::of(lists, &shape, stream)?;
        let drv = RecallError::driver;
        let mut host_lists = self
            .lists
            .lock()
            .map_err(|_| RecallError::LockPoisoned("per-page recall lists".into()))?;
        host_lists.fetch(stream, &addrs)?;
        stream
            .synchronize()
            .map_err(drv("waiting for the recall lists"))?;
        let rows = host_lists.rows(&shape, lists.filter);
        drop(host_lists);

        let (d, p, hkv) = (shape.head_dim, shape.page_size, shape.kv_heads);
        let (nb, mp) = (shape.slots(), shape.max_pages);
        let row_bytes = d * 2;
        let unit_bytes = 2 * p * row_bytes;
        let page_bytes = (2 * p * hkv * d * 2) as u64;
        let shared = pool.shared();
        let host = shared.backing == Backing::MappedHost;
        let (slots_base, _g) = slots.device_ptr(stream);
        let mut counters = CudaRecallCounters {
            jobs: 1,
            rows: rows.len() as u64,
            ..Default::default()
        };
        for u in rows.iter().flatten() {
            let ok = u.page >= 0 && (u.page as usize) < mp && u.slot >= 0 && (u.slot as usize) < nb;
            let page = if ok {
                shared.host_addr(layer, u.seq, u.page as usize)
            } else {
                0
            };
            if page == 0 {
                counters.skipped += 1;
                continue;
            }
            let src = page + (u.head * unit_bytes) as u64;
            let dst = slots_base
                + (u.seq * nb + u.slot as usize) as u64 * page_bytes
                + (u.head * row_bytes) as u64;
            let copy = sys::CUDA_MEMCPY2D {
                srcXInBytes: 0,
                srcY: 0,
                srcMemoryType: if host {
                    sys::CUmemorytype::CU_MEMORYTYPE_HOST
                } else {
                    sys::CUmemorytype::CU_MEMORYTYPE_DEVICE
                },
                srcHost: if host {
                    src as *const std::ffi::c_void
                } else {
                    std::ptr::null()
                },
                srcDevice: if host { 0 } else { src },
                srcArray: std::ptr::null_mut(),
                srcPitch: row_bytes,
                dstXInBytes: 0,
                dstY: 0,
                dstMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
                dstHost: std::ptr::null_mut(),
                dstDevice: dst,
                dstArray: std::ptr::null_mut(),
                dstPitch: hkv * row_bytes,
                WidthInBytes: row_bytes,
                Height: 2 * p,
            };
            // SAFETY: the source unit lies in a live pool chunk; the destination rows are head
            // `u.head` of slot page `seq·nb + slot` < bs·nb, inside `slots` (checked above).
            unsafe { sys::cuMemcpy2DAsync_v2(&copy, stream.cu_stream()) }
                .result()
                .map_err(drv("copying a recalled unit (2-D)"))?;
            counters.copies += 1;
            counters.units += 1;
        }
        counters.bytes = counters.units * unit_bytes as u64;
        stream
            .synchronize()
            .map_err(drv("waiting for the per-page recall"))?;
        if let Ok(mut t) = self.totals.lock() {
            t.accumulate(&counters);
        }
        Ok(counters)
    }

    /// Sum over every recall.
    pub fn totals(&self) -> CudaRecallCounters {
        self.totals.lock().map(|t| *t).unwrap_or_default()
    }
}
