//! The CUDA side of recall: the HND host pool of every layer's KV history and the GPU recall
//! executors.
//!
//! * [`HostKvPool`]: pinned, device-mapped HND pages (or device memory, [`Backing::Device`]),
//!   grown in chunks up to a byte limit, with a per-layer device table `host_pages` u64
//!   `[bs][MP]` of page addresses; [`HostKvPool::offload`] writes pages and summaries from the
//!   GPU (the offload kernel).
//! * [`GatherRecall`]: the default zero-copy recall — one kernel per layer reads the listed units
//!   from mapped host memory and writes the NHD slots (no host round trip, graph-capturable).
//! * [`StreamedRecall`]: the paper's double-buffered streamed copy (spec §6.1): the recall list is
//!   read back, each (sequence, KV head) row's units are copied with one `cuMemcpyHtoDAsync` each
//!   into staging buffer `row % 2` on stream `row % 2`, and the scatter of row `r − 1` overlaps
//!   the copies of row `r`; blocking, or asynchronous through one FIFO worker thread.
//! * [`PerPageRecall`]: the published ArkVale baseline — blocking, one `cuMemcpy2DAsync` per unit
//!   straight into the strided NHD slot.
//!
//! Every executor consumes the device-side recall lists of the GPU FreeKV contract
//! ([`RecallLists`]: `recall_count` i32 `[bs][Hkv]`, `recall_list` i32 `[bs][Hkv][k][2]` =
//! (logical page, slot), `flags` i32 `[bs][Hkv]` with a [`HeadFilter`]) and writes the resident
//! slots `[bs·nb][2][P][Hkv][d]` bf16: unit (page, `h`) of sequence `seq` lands in head `h` of
//! page `seq·nb + slot`. All three produce the same bytes.

mod gather;
mod per_page;
mod pool;
mod streamed;

use std::sync::Arc;

use freekv_kernels::cudarc::driver::{
    CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceSlice, SyncOnDrop, sys,
};
use freekv_kernels::half::bf16;
use freekv_kernels::{FreeKvShape, HeadFilter, MappedHostBuffer};

pub use gather::{DEFAULT_GATHER_BLOCKS, GatherRecall};
pub use per_page::PerPageRecall;
pub use pool::{Backing, HostKvPool, HostPoolConfig};
pub use streamed::{StreamedRecall, StreamedTicket};

use crate::RecallError;

/// The resident slots a recall writes: bf16 `[bs·nb][2][P][Hkv][d]`.
pub type SlotsMut<'a> = &'a mut CudaSlice<bf16>;

/// The device-side recall lists of one layer (GPU FreeKV contract) and which rows to serve.
#[derive(Debug, Clone, Copy)]
pub struct RecallLists<'a> {
    /// `recall_count` i32 `[bs][Hkv]`: units listed per (sequence, KV head) row.
    pub count: &'a CudaSlice<i32>,
    /// `recall_list` i32 `[bs][Hkv][k][2]`: (logical page, slot) of each unit.
    pub list: &'a CudaSlice<i32>,
    /// `flags` i32 `[bs][Hkv]`: correction flags the filter reads.
    pub flags: &'a CudaSlice<i32>,
    /// Rows to serve.
    pub filter: HeadFilter,
}

/// What a CUDA recall moved (host-side counts; [`GatherRecall`] reads its device counters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CudaRecallCounters {
    /// Recall calls (jobs) executed.
    pub jobs: u64,
    /// (sequence, KV head) rows with work.
    pub rows: u64,
    /// (page, head) units delivered.
    pub units: u64,
    /// Bytes delivered (`units · 2·P·d · 2`).
    pub bytes: u64,
    /// Listed units skipped because their page is not allocated or an index is out of range.
    pub skipped: u64,
    /// Copy API calls issued (streamed and per-page recalls; 0 for the gather).
    pub copies: u64,
}

impl CudaRecallCounters {
    /// Add `o` into `self`.
    pub fn accumulate(&mut self, o: &CudaRecallCounters) {
        self.jobs += o.jobs;
        self.rows += o.rows;
        self.units += o.units;
        self.bytes += o.bytes;
        self.skipped += o.skipped;
        self.copies += o.copies;
    }
}

/// Bytes of one (page, head) unit: `2·P·d` bf16.
pub(crate) fn unit_bytes(shape: &FreeKvShape) -> usize {
    2 * shape.page_size * shape.head_dim * 2
}

/// A device range named by its address (for work enqueued by the streamed recall's worker,
/// which cannot borrow the caller's buffers). Synchronisation is explicit (event tracking is
/// disabled in this project's contexts), so the guards are no-ops.
pub(crate) struct RawDevice<T> {
    ptr: u64,
    len: usize,
    stream: Arc<CudaStream>,
    _marker: std::marker::PhantomData<T>,
}

impl<T> RawDevice<T> {
    pub(crate) fn new(ptr: u64, len: usize, stream: &Arc<CudaStream>) -> Self {
        Self {
            ptr,
            len,
            stream: stream.clone(),
            _marker: std::marker::PhantomData,
        }
    }
}

impl<T> DeviceSlice<T> for RawDevice<T> {
    fn len(&self) -> usize {
        self.len
    }
    fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

impl<T> DevicePtr<T> for RawDevice<T> {
    fn device_ptr<'a>(&'a self, _stream: &'a CudaStream) -> (sys::CUdeviceptr, SyncOnDrop<'a>) {
        (self.ptr, SyncOnDrop::Sync(None))
    }
}

impl<T> DevicePtrMut<T> for RawDevice<T> {
    fn device_ptr_mut<'a>(
        &'a mut self,
        _stream: &'a CudaStream,
    ) -> (sys::CUdeviceptr, SyncOnDrop<'a>) {
        (self.ptr, SyncOnDrop::Sync(None))
    }
}

/// Device addresses of a [`RecallLists`] (what a worker thread carries).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ListAddrs {
    pub(crate) count: u64,
    pub(crate) list: u64,
    pub(crate) flags: u64,
    pub(crate) filter: HeadFilter,
}

impl ListAddrs {
    /// Check the list sizes against `shape` and take their addresses.
    pub(crate) fn of(
        lists: &RecallLists<'_>,
        shape: &FreeKvShape,
        stream: &CudaStream,
    ) -> Result<Self, RecallError> {
        let rows = shape.rows();
        let need = [
            ("recall_count", lists.count.len(), rows),
            (
                "recall_list",
                lists.list.len(),
                rows * shape.cache_pages() * 2,
            ),
            ("flags", lists.flags.len(), rows),
        ];
        for (what, have, want) in need {
            if have < want {
                return Err(RecallError::InvalidRequest(format!(
                    "{what}: {have} elements, the shape needs {want}"
                )));
            }
        }
        let ptr = |s: &CudaSlice<i32>| {
            let (p, _g) = s.device_ptr(stream);
            p
        };
        Ok(Self {
            count: ptr(lists.count),
            list: ptr(lists.list),
            flags: ptr(lists.flags),
            filter: lists.filter,
        })
    }
}

/// Pinned host copies of one layer's recall lists.
pub(crate) struct HostLists {
    count: MappedHostBuffer<i32>,
    list: MappedHostBuffer<i32>,
    flags: MappedHostBuffer<i32>,
}

/// One unit of a read-back recall list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ListedUnit {
    pub(crate) seq: usize,
    pub(crate) head: usize,
    pub(crate) page: i32,
    pub(crate) slot: i32,
}

impl HostLists {
    pub(crate) fn new(stream: &Arc<CudaStream>, shape: &FreeKvShape) -> Result<Self, RecallError> {
        let rows = shape.rows();
        let ctx = stream.context();
        Ok(Self {
            count: MappedHostBuffer::new(ctx, rows)?,
            list: MappedHostBuffer::new(ctx, rows * shape.cache_pages() * 2)?,
            flags: MappedHostBuffer::new(ctx, rows)?,
        })
    }

    /// Enqueue the device-to-host copies of the lists on `stream` (then synchronise it before
    /// reading).
    pub(crate) fn fetch(&mut self, stream: &CudaStream, a: &ListAddrs) -> Result<(), RecallError> {
        for (buf, src) in [
            (&mut self.count, a.count),
            (&mut self.flags, a.flags),
            (&mut self.list, a.list),
        ] {
            let bytes = buf.bytes();
            // SAFETY: the pinned buffer holds `bytes` bytes and lives as long as self; the source
            // was checked to hold at least as many (ListAddrs::of).
            unsafe {
                sys::cuMemcpyDtoHAsync_v2(
                    buf.host_ptr() as *mut std::ffi::c_void,
                    src,
                    bytes,
                    stream.cu_stream(),
                )
            }
            .result()
            .map_err(RecallError::driver("reading the recall lists back"))?;
        }
        Ok(())
    }

    /// The rows with work (after the filter), each with its units, in row order.
    pub(crate) fn rows(&self, shape: &FreeKvShape, filter: HeadFilter) -> Vec<Vec<ListedUnit>> {
        let (hkv, k) = (shape.kv_heads, shape.cache_pages());
        let count = self.count.as_slice();
        let flags = self.flags.as_slice();
        let list = self.list.as_slice();
        let mut out = Vec::new();
        for (row, (&c, &f)) in count.iter().zip(flags).enumerate() {
            let n = (c.max(0) as usize).min(k);
            let keep = match filter {
                HeadFilter::All => true,
                HeadFilter::Flagged => f != 0,
                HeadFilter::Unflagged => f == 0,
            };
            if n == 0 || !keep {
                continue;
            }
            let units = (0..n)
                .map(|i| {
                    let at = (row * k + i) * 2;
                    ListedUnit {
                        seq: row / hkv,
                        head: row % hkv,
                        page: list.get(at).copied().unwrap_or(-1),
                        slot: list.get(at + 1).copied().unwrap_or(-1),
                    }
                })
                .collect();
            out.push(units);
        }
        out
    }
}

/// Check the slots buffer against the shape.
pub(crate) fn check_slots(slots: &CudaSlice<bf16>, shape: &FreeKvShape) -> Result<(), RecallError> {
    let need = shape.seqs * shape.slots() * 2 * shape.page_size * shape.kv_heads * shape.head_dim;
    if slots.len() < need {
        return Err(RecallError::InvalidRequest(format!(
            "slots: {} elements, the shape needs {need}",
            slots.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send_sync<X: Send + Sync>() {}

    #[test]
    fn cuda_recall_types_are_send_and_sync() {
        send_sync::<HostKvPool>();
        send_sync::<GatherRecall>();
        send_sync::<StreamedRecall>();
        send_sync::<PerPageRecall>();
    }

    #[test]
    fn counters_accumulate() {
        let mut a = CudaRecallCounters {
            jobs: 1,
            rows: 2,
            units: 3,
            bytes: 4,
            skipped: 5,
            copies: 6,
        };
        a.accumulate(&a.clone());
        assert_eq!(
            a,
            CudaRecallCounters {
                jobs: 2,
                rows: 4,
                units: 6,
                bytes: 8,
                skipped: 10,
                copies: 12,
            }
        );
    }

    #[test]
    fn unit_bytes_of_llama_geometry() {
        let s = FreeKvShape {
            seqs: 1,
            kv_heads: 8,
            group: 4,
            head_dim: 128,
            page_size: 32,
            sink_pages: 1,
            top_k: 4,
            window_pages: 2,
            max_pages: 64,
            spare_pages: 0,
        };
        assert_eq!(unit_bytes(&s), 16 << 10);
    }
}
