//! FreeKV data-movement launchers: page offload (NHD device page → HND host page, with the page
//! summary), zero-copy gather recall (HND host units → NHD resident slots), the staging scatter of
//! the streamed recall, and whole-page copies.
//!
//! Layouts are the GPU FreeKV contract's (see [`FreeKvShape`] for the names):
//! * NHD pools and slots: bf16 `[pages][2][P][Hkv][d]`; the slot `s` of sequence `seq` is page
//!   `seq * nb + s` of the slots buffer.
//! * HND host page: bf16 `[Hkv][2][P][d]`; the unit of (page, head `h`) is the `2·P·d` contiguous
//!   elements at `h·2·P·d` (K rows then V rows).
//! * `host_pages`: u64 `[bs][MP]`, the device-visible address of each HND page, 0 = none.
//! * `summaries`: f32 `[bs][Hkv][MP][2][d]` (upper then lower).
//! * `recall_count` i32 `[bs][Hkv]`, `recall_list` i32 `[bs][Hkv][k][2]` = (logical page, slot),
//!   `flags` i32 `[bs][Hkv]`.
//!
//! The kernels never fault on bad table contents: entries naming a missing host page (address 0),
//! an out-of-range page / slot / sequence / head, or a misaligned host address are skipped and
//! counted in the optional [`DeviceCounters`] (`[1]`), so a captured graph cannot crash on them
//! and tests can assert that nothing was skipped.

use std::sync::Arc;

use cudarc::driver::{
    CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig,
    PushKernelArg,
};
use freekv_select::SummaryKind;
use half::bf16;

use crate::KernelError;
use crate::kernels::{Kernels, check_align, check_len, func, grid_dim, mul, u32_arg};
use crate::ops::select::{FreeKvShape, HeadFilter};

const THREADS: u32 = 256;
const MAX_GRID_X: u32 = i32::MAX as u32;
const MAX_GRID_YZ: u32 = 65_535;

/// The functions of the `freekv_recall` module.
#[derive(Debug)]
pub struct RecallKernels {
    offload: CudaFunction,
    gather: CudaFunction,
    scatter: CudaFunction,
    copy_pages: CudaFunction,
}

impl RecallKernels {
    /// Resolve every function of the loaded module.
    pub(crate) fn resolve(m: &Arc<CudaModule>) -> Result<Self, KernelError> {
        Ok(Self {
            offload: func(m, "freekv_offload_bf16")?,
            gather: func(m, "freekv_gather_bf16")?,
            scatter: func(m, "freekv_scatter_bf16")?,
            copy_pages: func(m, "copy_pages_bf16")?,
        })
    }
}

/// Device-side counters the data-movement kernels add to (atomically, from any stream):
/// `[0]` units moved (offload: (entry, head) units written; gather / scatter: units delivered),
/// `[1]` entries skipped because they named something that does not exist. 32-bit, wrapping.
#[derive(Debug)]
pub struct DeviceCounters {
    buf: CudaSlice<u32>,
}

impl DeviceCounters {
    /// Two zeroed counters.
    pub fn new(stream: &Arc<CudaStream>) -> Result<Self, KernelError> {
        let buf = stream
            .alloc_zeros::<u32>(2)
            .map_err(KernelError::driver("allocating device counters"))?;
        Ok(Self { buf })
    }

    /// (units moved, entries skipped) after every kernel queued on `stream` so far (synchronises
    /// `stream`; work on other streams must be ordered before by the caller).
    pub fn read(&self, stream: &Arc<CudaStream>) -> Result<(u64, u64), KernelError> {
        let mut v = [0u32; 2];
        stream
            .memcpy_dtoh(&self.buf, &mut v)
            .map_err(KernelError::driver("reading device counters"))?;
        stream
            .synchronize()
            .map_err(KernelError::driver("reading device counters"))?;
        Ok((u64::from(v[0]), u64::from(v[1])))
    }

    /// Zero both counters (stream-ordered).
    pub fn reset(&mut self, stream: &Arc<CudaStream>) -> Result<(), KernelError> {
        stream
            .memset_zeros(&mut self.buf)
            .map_err(KernelError::driver("resetting device counters"))
    }

    fn ptr(&self, stream: &CudaStream) -> u64 {
        let (p, _g) = self.buf.device_ptr(stream);
        p
    }
}

fn counters_ptr(c: Option<&DeviceCounters>, stream: &CudaStream) -> u64 {
    c.map_or(0, |c| c.ptr(stream))
}

/// The kernel's code for a summary kind.
fn kind_code(kind: SummaryKind) -> u32 {
    match kind {
        SummaryKind::MinMax => 0,
        SummaryKind::ArkVale => 1,
    }
}

/// Elements of one NHD page: `2·P·Hkv·d`.
fn page_elems(k: &'static str, s: &FreeKvShape) -> Result<usize, KernelError> {
    mul(
        k,
        "page",
        mul(k, "page", 2 * s.page_size, s.kv_heads)?,
        s.head_dim,
    )
}

impl Kernels {
    /// Offload pages: for each of the `n` entries (i32 `[n][3]` = (seq, source physical page id,
    /// logical page); seq = -1 skips the entry) and every KV head `h`:
    ///
    /// * the summary of the page's `P` keys of head `h` → `summaries[seq][h][page]`, bit-identical
    ///   with `freekv_select::summarize_block(kind, keys as f32, ..)`;
    /// * the HND unit of head `h` (K rows then V rows) written through the mapped pointer
    ///   `host_pages[seq][page] + h·2·P·d` (followed by `__threadfence_system`).
    ///
    /// `src_pool` is any NHD pool of the shape's page geometry (its length fixes the number of
    /// source pages). An entry whose host page address is 0 (not allocated), or whose seq / page /
    /// source page is out of range, writes **nothing** (neither summary nor unit) and adds one to
    /// `counters[1]` per head; each (entry, head) written adds one to `counters[0]`.
    #[allow(clippy::too_many_arguments)]
    pub fn freekv_offload(
        &self,
        stream: &CudaStream,
        shape: &FreeKvShape,
        src_pool: &impl DevicePtr<bf16>,
        entries: &impl DevicePtr<i32>,
        n: usize,
        host_pages: &impl DevicePtr<u64>,
        summaries: &mut impl DevicePtrMut<f32>,
        kind: SummaryKind,
        counters: Option<&DeviceCounters>,
    ) -> Result<(), KernelError> {
        const K: &str = "freekv_offload";
        let _s = tracing::debug_span!("freekv_offload", n).entered();
        shape.validate(K)?;
        let pe = page_elems(K, shape)?;
        let (bs, hkv, mp, d) = (shape.seqs, shape.kv_heads, shape.max_pages, shape.head_dim);
        check_len(K, "entries", entries.len(), mul(K, "entries", n, 3)?)?;
        check_len(
            K,
            "host_pages",
            host_pages.len(),
            mul(K, "host_pages", bs, mp)?,
        )?;
        let sum_len = mul(K, "summaries", mul(K, "summaries", bs * hkv, mp)?, 2 * d)?;
        check_len(K, "summaries", summaries.len(), sum_len)?;
        let src_pages = src_pool.len() / pe;
        if n == 0 {
            return Ok(());
        }
        if src_pages == 0 {
            return Err(KernelError::arg(
                K,
                format!(
                    "src_pool: {} elements hold no whole page of {pe}",
                    src_pool.len()
                ),
            ));
        }
        let grid_x = grid_dim(K, "entries", n, MAX_GRID_X)?;
        let grid_y = grid_dim(K, "kv_heads", hkv, MAX_GRID_YZ)?;
        let src_pages = u32_arg(K, "source pages", src_pages)?;
        let (bs_u, hkv_u, mp_u) = (bs as u32, hkv as u32, mp as u32);
        let (p_u, d_u) = (shape.page_size as u32, d as u32);
        let kind_u = kind_code(kind);
        let (sp, _g1) = src_pool.device_ptr(stream);
        let (ep, _g2) = entries.device_ptr(stream);
        let (hp, _g3) = host_pages.device_ptr(stream);
        let (smp, _g4) = summaries.device_ptr_mut(stream);
        check_align(K, "src_pool", sp, 16)?;
        let cp = counters_ptr(counters, stream);
        let cfg = LaunchConfig {
            grid_dim: (grid_x, grid_y, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = stream.launch_builder(&self.recall.offload);
        b.arg(&sp)
            .arg(&ep)
            .arg(&grid_x)
            .arg(&hp)
            .arg(&smp)
            .arg(&cp)
            .arg(&src_pages)
            .arg(&bs_u)
            .arg(&hkv_u)
            .arg(&mp_u)
            .arg(&p_u)
            .arg(&d_u)
            .arg(&kind_u);
        // SAFETY: argument types match the kernel; sizes checked above (the shape validated
        // every index into i32).
        unsafe { b.launch(cfg) }.map_err(KernelError::driver(K))?;
        Ok(())
    }

    /// Zero-copy recall: every listed unit `(page, slot)` of row `(seq, h)` (the first
    /// `recall_count[seq][h]` entries of `recall_list[seq][h]`, rows dropped by `filter` on
    /// `flags` excluded) is read from the HND host page `host_pages[seq][page]` (16-byte loads of
    /// mapped memory) and written into `slots[seq·nb + slot][kv][t][h][:]`.
    ///
    /// One launch of at most `max_blocks` blocks of 256 threads (a few SMs saturate PCIe; the
    /// rest keep computing); blocks with nothing to do exit after scanning the counts, so the
    /// launch is cheap when no row has work (capturable, no host round trip). Units naming a
    /// missing host page or an out-of-range page / slot are skipped and counted in
    /// `counters[1]`; delivered units in `counters[0]`.
    #[allow(clippy::too_many_arguments)]
    pub fn freekv_gather(
        &self,
        stream: &CudaStream,
        shape: &FreeKvShape,
        host_pages: &impl DevicePtr<u64>,
        recall_count: &impl DevicePtr<i32>,
        recall_list: &impl DevicePtr<i32>,
        flags: &impl DevicePtr<i32>,
        filter: HeadFilter,
        slots: &mut impl DevicePtrMut<bf16>,
        max_blocks: usize,
        counters: Option<&DeviceCounters>,
    ) -> Result<(), KernelError> {
        const K: &str = "freekv_gather";
        let _s = tracing::debug_span!("freekv_gather").entered();
        shape.validate(K)?;
        let pe = page_elems(K, shape)?;
        let (bs, hkv, mp, k, nb) = (
            shape.seqs,
            shape.kv_heads,
            shape.max_pages,
            shape.cache_pages(),
            shape.slots(),
        );
        let rows = mul(K, "rows", bs, hkv)?;
        let items = mul(K, "recall list", rows, k)?;
        u32_arg(K, "recall list rows * k", items)?;
        check_len(
            K,
            "host_pages",
            host_pages.len(),
            mul(K, "host_pages", bs, mp)?,
        )?;
        check_len(K, "recall_count", recall_count.len(), rows)?;
        check_len(
            K,
            "recall_list",
            recall_list.len(),
            mul(K, "recall_list", items, 2)?,
        )?;
        check_len(K, "flags", flags.len(), rows)?;
        check_len(K, "slots", slots.len(), mul(K, "slots", bs * nb, pe)?)?;
        if max_blocks == 0 {
            return Err(KernelError::arg(K, "max_blocks must be at least 1"));
        }
        let grid = grid_dim(K, "blocks", max_blocks.min(items), MAX_GRID_X)?;
        let filter_u = filter.code() as u32;
        let (bs_u, hkv_u, k_u, nb_u, mp_u) =
            (bs as u32, hkv as u32, k as u32, nb as u32, mp as u32);
        let (p_u, d_u) = (shape.page_size as u32, shape.head_dim as u32);
        let (hp, _g1) = host_pages.device_ptr(stream);
        let (cp_, _g2) = recall_count.device_ptr(stream);
        let (lp, _g3) = recall_list.device_ptr(stream);
        let (fp, _g4) = flags.device_ptr(stream);
        let (sp, _g5) = slots.device_ptr_mut(stream);
        check_align(K, "slots", sp, 16)?;
        let ctr = counters_ptr(counters, stream);
        let cfg = LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = stream.launch_builder(&self.recall.gather);
        b.arg(&hp)
            .arg(&cp_)
            .arg(&lp)
            .arg(&fp)
            .arg(&filter_u)
            .arg(&sp)
            .arg(&ctr)
            .arg(&bs_u)
            .arg(&hkv_u)
            .arg(&k_u)
            .arg(&nb_u)
            .arg(&mp_u)
            .arg(&p_u)
            .arg(&d_u);
        // SAFETY: argument types match the kernel (block size 256 as it requires); sizes checked.
        unsafe { b.launch(cfg) }.map_err(KernelError::driver(K))?;
        Ok(())
    }

    /// Scatter staged HND units into NHD slots (the streamed recall's second half): unit `i` of
    /// `staging` (bf16 `[n][2][P][d]`) goes to head `units[i][2]` of slot `units[i][1]` of
    /// sequence `units[i][0]` (i32 `[n][3]`; seq = -1 skips the unit). Out-of-range units are
    /// skipped and counted in `counters[1]`.
    #[allow(clippy::too_many_arguments)]
    pub fn freekv_scatter(
        &self,
        stream: &CudaStream,
        shape: &FreeKvShape,
        staging: &impl DevicePtr<bf16>,
        units: &impl DevicePtr<i32>,
        n: usize,
        slots: &mut impl DevicePtrMut<bf16>,
        counters: Option<&DeviceCounters>,
    ) -> Result<(), KernelError> {
        const K: &str = "freekv_scatter";
        let _s = tracing::debug_span!("freekv_scatter", n).entered();
        shape.validate(K)?;
        let pe = page_elems(K, shape)?;
        let unit = 2 * shape.page_size * shape.head_dim;
        let (bs, nb) = (shape.seqs, shape.slots());
        check_len(K, "staging", staging.len(), mul(K, "staging", n, unit)?)?;
        check_len(K, "units", units.len(), mul(K, "units", n, 3)?)?;
        check_len(K, "slots", slots.len(), mul(K, "slots", bs * nb, pe)?)?;
        if n == 0 {
            return Ok(());
        }
        let grid = grid_dim(K, "units", n, MAX_GRID_X)?;
        let (bs_u, hkv_u, nb_u) = (bs as u32, shape.kv_heads as u32, nb as u32);
        let (p_u, d_u) = (shape.page_size as u32, shape.head_dim as u32);
        let (stp, _g1) = staging.device_ptr(stream);
        let (up, _g2) = units.device_ptr(stream);
        let (sp, _g3) = slots.device_ptr_mut(stream);
        check_align(K, "staging", stp, 16)?;
        check_align(K, "slots", sp, 16)?;
        let ctr = counters_ptr(counters, stream);
        let cfg = LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = stream.launch_builder(&self.recall.scatter);
        b.arg(&stp)
            .arg(&up)
            .arg(&grid)
            .arg(&sp)
            .arg(&ctr)
            .arg(&bs_u)
            .arg(&hkv_u)
            .arg(&nb_u)
            .arg(&p_u)
            .arg(&d_u);
        // SAFETY: argument types match the kernel; sizes checked above.
        unsafe { b.launch(cfg) }.map_err(KernelError::driver(K))?;
        Ok(())
    }

    /// Copy whole pages of `page_elems` elements (a multiple of 8): `dst_pool[pairs[i][1]] =
    /// src_pool[pairs[i][0]]` for the `n` pairs (i32 `[n][2]`). Pairs naming a page outside
    /// either pool are skipped. Pairs must not write the same destination page twice.
    pub fn copy_pages(
        &self,
        stream: &CudaStream,
        src_pool: &impl DevicePtr<bf16>,
        dst_pool: &mut impl DevicePtrMut<bf16>,
        pairs: &impl DevicePtr<i32>,
        n: usize,
        page_elems: usize,
    ) -> Result<(), KernelError> {
        const K: &str = "copy_pages";
        let _s = tracing::debug_span!("copy_pages", n).entered();
        if page_elems == 0 || !page_elems.is_multiple_of(8) {
            return Err(KernelError::arg(
                K,
                format!("page_elems = {page_elems} must be a positive multiple of 8"),
            ));
        }
        check_len(K, "pairs", pairs.len(), mul(K, "pairs", n, 2)?)?;
        if n == 0 {
            return Ok(());
        }
        let src_pages = u32_arg(K, "source pages", src_pool.len() / page_elems)?;
        let dst_pages = u32_arg(K, "destination pages", dst_pool.len() / page_elems)?;
        let grid_x = grid_dim(K, "pairs", n, MAX_GRID_X)?;
        let nvec = page_elems / 8;
        let chunks = nvec.div_ceil(THREADS as usize * 4).clamp(1, 64) as u32;
        let pe = page_elems as u64;
        let (sp, _g1) = src_pool.device_ptr(stream);
        let (dp, _g2) = dst_pool.device_ptr_mut(stream);
        let (pp, _g3) = pairs.device_ptr(stream);
        check_align(K, "src_pool", sp, 16)?;
        check_align(K, "dst_pool", dp, 16)?;
        let cfg = LaunchConfig {
            grid_dim: (grid_x, chunks, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = stream.launch_builder(&self.recall.copy_pages);
        b.arg(&sp)
            .arg(&dp)
            .arg(&pp)
            .arg(&grid_x)
            .arg(&pe)
            .arg(&src_pages)
            .arg(&dst_pages);
        // SAFETY: argument types match the kernel; sizes checked above.
        unsafe { b.launch(cfg) }.map_err(KernelError::driver(K))?;
        Ok(())
    }
}
