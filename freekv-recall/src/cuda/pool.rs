//! [`HostKvPool`]: the full KV history of every sparse layer, in HND pages addressed through a
//! per-layer device table.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use freekv_kernels::cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr};
use freekv_kernels::half::bf16;
use freekv_kernels::{DeviceCounters, FreeKvShape, KernelError, Kernels, MappedHostBuffer};
use freekv_select::SummaryKind;

use crate::RecallError;

/// Where the pages of a [`HostKvPool`] live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Backing {
    /// Pinned host memory mapped into the device address space (`DEVICEMAP | PORTABLE`, never
    /// write-combined): the real thing; recall crosses PCIe.
    #[default]
    MappedHost,
    /// Plain device memory with the same HND layout and the same address table: recall becomes an
    /// on-device gather (the `oracle` policy: selection without PCIe cost).
    Device,
}

/// Settings of a [`HostKvPool`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostPoolConfig {
    /// Sparse layers (one address table each).
    pub layers: usize,
    /// Sequences (rows of every table, `bs`).
    pub seqs: usize,
    /// Logical pages per sequence (`MP`, columns of every table).
    pub max_pages: usize,
    /// KV heads (`Hkv`): a page holds `kv_heads` units of `page_elems / kv_heads` elements.
    pub kv_heads: usize,
    /// bf16 elements of one page (`2·P·Hkv·d`; the unit size `2·P·d` must be a multiple of 8).
    pub page_elems: usize,
    /// Pages allocated at once when the pool grows (≥ 1).
    pub chunk_pages: usize,
    /// Upper bound on the bytes the pool reserves (`None`: unbounded).
    pub max_bytes: Option<usize>,
    /// Host (mapped pinned) or device memory.
    pub backing: Backing,
    /// Keep one chunk allocated ahead ([`Backing::MappedHost`] only): when fewer than
    /// `chunk_pages` pages are free, the next chunk is allocated on a helper thread
    /// ([`MappedHostBuffer::new_registered`]: faulted in without the driver, then page-locked
    /// piece by piece), so the work that needs the pages (a decode step at a page boundary)
    /// neither allocates it nor waits long for the driver's lock while it is pinned. The chunk
    /// counts in [`HostKvPool::bytes_reserved`] (and against `max_bytes`) from the moment it is
    /// asked for.
    pub grow_ahead: bool,
}

/// One page's addresses: as the host names it (for `cuMemcpy*`; equal to `device` for device
/// backing) and as kernels name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PageAddr {
    pub(crate) host: u64,
    pub(crate) device: u64,
}

/// Page memory; held only to keep it allocated (pages are addressed through `PageAddr`).
#[allow(dead_code)]
enum Chunk {
    Host(MappedHostBuffer<u8>),
    Device(CudaSlice<u8>),
}

/// What in-flight recall jobs share with the pool: the host-side address tables and the page
/// memory (chunks are freed only when the pool **and** every job holding this are gone).
pub(crate) struct PoolShared {
    /// Per layer, `[bs][MP]` host-side addresses of the pages (0 = none).
    pub(crate) host_tables: Vec<Box<[AtomicU64]>>,
    pub(crate) max_pages: usize,
    pub(crate) backing: Backing,
    chunks: Mutex<Vec<Chunk>>,
}

impl PoolShared {
    /// Host-side address of (layer, seq, page), or 0.
    pub(crate) fn host_addr(&self, layer: usize, seq: usize, page: usize) -> u64 {
        if page >= self.max_pages {
            return 0;
        }
        self.host_tables
            .get(layer)
            .and_then(|t| t.get(seq * self.max_pages + page))
            .map_or(0, |a| a.load(Ordering::Acquire))
    }
}

/// The KV history of every sparse layer: HND pages `[Hkv][2][P][d]` bf16 (the unit of a KV head
/// is contiguous), pinned and mapped (or on the device, [`Backing::Device`]), allocated in chunks
/// of [`HostPoolConfig::chunk_pages`] pages up to [`HostPoolConfig::max_bytes`]; per layer a
/// device table `host_pages` u64 `[bs][MP]` with the device-visible address of each page (0 =
/// not allocated), which the offload and gather kernels read.
///
/// Pages are interchangeable between layers and sequences: a released sequence's pages go to a
/// free list and are reused before the pool grows. Chunks are never returned to the system
/// before the pool is dropped (and every streamed-recall job that uses it has finished).
pub struct HostKvPool {
    cfg: HostPoolConfig,
    ctx: Arc<CudaContext>,
    shared: Arc<PoolShared>,
    device_tables: Vec<CudaSlice<u64>>,
    /// Per layer, per `seq * MP + page`, the page's addresses.
    pages: Vec<Vec<Option<PageAddr>>>,
    free: Vec<PageAddr>,
    /// Pages allocated per sequence (the same in every layer).
    seq_pages: Vec<usize>,
    page_bytes: usize,
    bytes_reserved: usize,
    pages_allocated: usize,
    counters: DeviceCounters,
    /// The chunk being pinned ahead on a helper thread ([`HostPoolConfig::grow_ahead`]).
    ahead: Option<AheadChunk>,
    /// A chunk pinned ahead failed: no more are asked for (the pool grows in line, where a
    /// failure is an error of the call that needs the pages).
    ahead_failed: bool,
}

/// A chunk of `pages` pages (`bytes` bytes) being allocated on a helper thread.
struct AheadChunk {
    pages: usize,
    bytes: usize,
    thread: JoinHandle<Result<MappedHostBuffer<u8>, KernelError>>,
}

impl std::fmt::Debug for HostKvPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostKvPool")
            .field("cfg", &self.cfg)
            .field("bytes_reserved", &self.bytes_reserved)
            .field("pages_allocated", &self.pages_allocated)
            .field("free_pages", &self.free.len())
            .finish_non_exhaustive()
    }
}

impl Drop for HostKvPool {
    fn drop(&mut self) {
        // Kernels or copies may still read the pages or the tables on some stream: finish them
        // before the memory goes (errors cannot be reported from drop). Streamed-recall jobs keep
        // the page memory alive on their own. A chunk still being pinned ahead is waited for and
        // freed.
        let _ = self.ctx.synchronize();
        if let Some(a) = self.ahead.take() {
            let _ = a.thread.join();
        }
    }
}

fn invalid(msg: impl Into<String>) -> RecallError {
    RecallError::InvalidRequest(msg.into())
}

impl HostKvPool {
    /// An empty pool (no page allocated yet) with zeroed device tables, allocated on `stream`.
    #[tracing::instrument(level = "debug", skip_all, fields(layers = cfg.layers, seqs = cfg.seqs))]
    pub fn new(stream: &Arc<CudaStream>, cfg: HostPoolConfig) -> Result<Self, RecallError> {
        for (name, v) in [
            ("layers", cfg.layers),
            ("seqs", cfg.seqs),
            ("max_pages", cfg.max_pages),
            ("kv_heads", cfg.kv_heads),
            ("page_elems", cfg.page_elems),
            ("chunk_pages", cfg.chunk_pages),
        ] {
            if v == 0 {
                return Err(invalid(format!("HostPoolConfig::{name} must be non-zero")));
            }
        }
        if !cfg.page_elems.is_multiple_of(cfg.kv_heads)
            || !(cfg.page_elems / cfg.kv_heads).is_multiple_of(8)
        {
            return Err(invalid(format!(
                "page_elems {} must be kv_heads ({}) units of a multiple of 8 elements",
                cfg.page_elems, cfg.kv_heads
            )));
        }
        let table_len = cfg
            .seqs
            .checked_mul(cfg.max_pages)
            .filter(|&n| n <= i32::MAX as usize)
            .ok_or_else(|| {
                invalid(format!(
                    "{} seqs x {} max_pages table entries overflow (lower the batch size or the \
                     context length)",
                    cfg.seqs, cfg.max_pages
                ))
            })?;
        let page_bytes = cfg
            .page_elems
            .checked_mul(2)
            .ok_or_else(|| invalid("page size overflows"))?;
        cfg.chunk_pages
            .checked_mul(page_bytes)
            .ok_or_else(|| invalid("chunk size overflows (lower chunk_pages)"))?;
        let mut device_tables = Vec::with_capacity(cfg.layers);
        let mut host_tables = Vec::with_capacity(cfg.layers);
        for l in 0..cfg.layers {
            device_tables.push(stream.alloc_zeros::<u64>(table_len).map_err(
                RecallError::driver(format!("allocating the host page table of layer {l}")),
            )?);
            host_tables.push((0..table_len).map(|_| AtomicU64::new(0)).collect());
        }
        let shared = Arc::new(PoolShared {
            host_tables,
            max_pages: cfg.max_pages,
            backing: cfg.backing,
            chunks: Mutex::new(Vec::new()),
        });
        Ok(Self {
            ctx: stream.context().clone(),
            shared,
            device_tables,
            pages: vec![vec![None; table_len]; cfg.layers],
            free: Vec::new(),
            seq_pages: vec![0; cfg.seqs],
            page_bytes,
            bytes_reserved: 0,
            pages_allocated: 0,
            counters: DeviceCounters::new(stream)?,
            ahead: None,
            ahead_failed: false,
            cfg,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &HostPoolConfig {
        &self.cfg
    }

    /// Bytes of page memory reserved (whole chunks).
    pub fn bytes_reserved(&self) -> usize {
        self.bytes_reserved
    }

    /// Pages in use (over every layer and sequence).
    pub fn pages_allocated(&self) -> usize {
        self.pages_allocated
    }

    /// Pages reserved but free.
    pub fn pages_free(&self) -> usize {
        self.free.len()
    }

    /// Pages allocated for `seq` in each layer (0 for an unknown sequence).
    pub fn seq_pages(&self, seq: usize) -> usize {
        self.seq_pages.get(seq).copied().unwrap_or(0)
    }

    /// Bytes of one page.
    pub fn page_bytes(&self) -> usize {
        self.page_bytes
    }

    /// The device table `host_pages` u64 `[bs][MP]` of `layer` (what the offload and gather
    /// kernels take).
    pub fn device_table(&self, layer: usize) -> Result<&CudaSlice<u64>, RecallError> {
        self.device_tables
            .get(layer)
            .ok_or_else(|| invalid(format!("layer {layer} >= {}", self.cfg.layers)))
    }

    pub(crate) fn shared(&self) -> &Arc<PoolShared> {
        &self.shared
    }

    /// Check that a kernel shape matches the pool.
    pub(crate) fn check_shape(&self, shape: &FreeKvShape) -> Result<(), RecallError> {
        let pe = 2 * shape.page_size * shape.kv_heads * shape.head_dim;
        if shape.seqs != self.cfg.seqs
            || shape.max_pages != self.cfg.max_pages
            || shape.kv_heads != self.cfg.kv_heads
            || pe != self.cfg.page_elems
        {
            return Err(invalid(format!(
                "shape {shape:?} does not match the host pool ({} seqs, {} max pages, {} KV \
                 heads, {} elements per page)",
                self.cfg.seqs, self.cfg.max_pages, self.cfg.kv_heads, self.cfg.page_elems
            )));
        }
        Ok(())
    }

    fn limit_error(&self, what: String, needed_pages: usize) -> RecallError {
        RecallError::HostPoolFull {
            what,
            needed_bytes: (needed_pages as u64).saturating_mul(self.page_bytes as u64),
            reserved_bytes: self.bytes_reserved as u64,
            limit_bytes: self.cfg.max_bytes.map_or(u64::MAX, |b| b as u64),
        }
    }

    /// Reserve one more chunk of up to `chunk_pages` pages (fewer when the byte limit allows
    /// fewer, at least `min_pages`).
    fn grow(&mut self, stream: &Arc<CudaStream>, min_pages: usize) -> Result<(), RecallError> {
        let allowed = match self.cfg.max_bytes {
            None => usize::MAX,
            Some(m) => m.saturating_sub(self.bytes_reserved) / self.page_bytes,
        };
        let pages = self.cfg.chunk_pages.max(min_pages).min(allowed);
        if pages < min_pages || pages == 0 {
            return Err(self.limit_error("growing the host KV pool".into(), min_pages));
        }
        let bytes = pages
            .checked_mul(self.page_bytes)
            .ok_or_else(|| invalid("chunk size overflows (lower chunk_pages)"))?;
        let _s = tracing::debug_span!("host_pool_grow", pages, bytes).entered();
        let chunk = match self.cfg.backing {
            Backing::MappedHost => Chunk::Host(MappedHostBuffer::<u8>::new(&self.ctx, bytes)?),
            Backing::Device => Chunk::Device(stream.alloc_zeros::<u8>(bytes).map_err(
                RecallError::driver(format!(
                    "allocating {bytes} bytes of device memory for the KV history (lower the \
                     batch size or the context length)"
                )),
            )?),
        };
        self.bytes_reserved += bytes;
        self.add_chunk(chunk, stream, pages)
    }

    /// Put a new chunk of `pages` pages (already counted in `bytes_reserved`) in the free list.
    fn add_chunk(
        &mut self,
        chunk: Chunk,
        stream: &Arc<CudaStream>,
        pages: usize,
    ) -> Result<(), RecallError> {
        let (host_base, dev_base) = match &chunk {
            Chunk::Host(buf) => (buf.host_ptr() as u64, buf.device_ptr()),
            Chunk::Device(buf) => {
                let (p, _g) = buf.device_ptr(stream);
                (p, p)
            }
        };
        self.shared
            .chunks
            .lock()
            .map_err(|_| RecallError::LockPoisoned("host pool chunks".into()))?
            .push(chunk);
        // Reverse order: pops hand out ascending addresses.
        for i in (0..pages).rev() {
            let off = (i * self.page_bytes) as u64;
            self.free.push(PageAddr {
                host: host_base + off,
                device: dev_base + off,
            });
        }
        Ok(())
    }

    /// Take the chunk pinned ahead into the free list if it is ready (or, with `wait`, once it
    /// is). A failed one is given up with a warning: its bytes are no longer reserved and no
    /// chunk is pinned ahead any more.
    fn harvest_ahead(&mut self, stream: &Arc<CudaStream>, wait: bool) -> Result<(), RecallError> {
        let ready = self
            .ahead
            .as_ref()
            .is_some_and(|a| wait || a.thread.is_finished());
        if !ready {
            return Ok(());
        }
        let Some(a) = self.ahead.take() else {
            return Ok(());
        };
        let failed = match a.thread.join() {
            Ok(Ok(buf)) => return self.add_chunk(Chunk::Host(buf), stream, a.pages),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "the allocating thread panicked".to_string(),
        };
        self.bytes_reserved -= a.bytes;
        self.ahead_failed = true;
        tracing::warn!(
            "pinning a host KV chunk ahead failed ({failed}); the pool grows when pages are \
             needed from now on"
        );
        Ok(())
    }

    /// Ask for the next chunk ahead when fewer than a chunk of pages is free
    /// ([`HostPoolConfig::grow_ahead`]), within `max_bytes`.
    fn grow_ahead(&mut self) {
        if !self.cfg.grow_ahead
            || self.cfg.backing != Backing::MappedHost
            || self.ahead_failed
            || self.ahead.is_some()
            || self.free.len() >= self.cfg.chunk_pages
        {
            return;
        }
        let allowed = match self.cfg.max_bytes {
            None => usize::MAX,
            Some(m) => m.saturating_sub(self.bytes_reserved) / self.page_bytes,
        };
        let pages = self.cfg.chunk_pages.min(allowed);
        if pages == 0 {
            return;
        }
        // `new` checked that a whole chunk's bytes do not overflow.
        let bytes = pages * self.page_bytes;
        let ctx = self.ctx.clone();
        let page_bytes = self.page_bytes;
        let spawned = std::thread::Builder::new()
            .name("freekv-pool-ahead".into())
            .spawn(move || {
                let _s = tracing::debug_span!("host_pool_grow_ahead", bytes).entered();
                // Faulted in without the driver, then locked piece by piece (whole pages: the
                // streamed and per-page recalls copy units of one page): the decode steps
                // launched meanwhile wait for the driver's lock only briefly.
                MappedHostBuffer::<u8>::new_registered(&ctx, bytes, page_bytes).or_else(|e| {
                    tracing::debug!("registering a chunk failed ({e}); cuMemHostAlloc instead");
                    MappedHostBuffer::<u8>::new(&ctx, bytes)
                })
            });
        match spawned {
            Ok(thread) => {
                self.bytes_reserved += bytes;
                self.ahead = Some(AheadChunk {
                    pages,
                    bytes,
                    thread,
                });
            }
            Err(e) => {
                self.ahead_failed = true;
                tracing::warn!("no thread to pin host KV chunks ahead ({e})");
            }
        }
    }

    /// Make pages `0..n_pages` of `seq` exist in every layer: new pages come from the free list
    /// (growing the pool by chunks when needed) and their addresses are written into each layer's
    /// device table with one copy per layer on `stream`. Nothing changes when the request cannot
    /// be met ([`RecallError::HostPoolFull`] names the limit; bad indices are
    /// [`RecallError::InvalidRequest`]).
    #[tracing::instrument(level = "debug", skip(self, stream))]
    pub fn ensure_pages(
        &mut self,
        stream: &Arc<CudaStream>,
        seq: usize,
        n_pages: usize,
    ) -> Result<(), RecallError> {
        let have = *self
            .seq_pages
            .get(seq)
            .ok_or_else(|| invalid(format!("sequence {seq} >= {}", self.cfg.seqs)))?;
        if n_pages > self.cfg.max_pages {
            return Err(invalid(format!(
                "sequence {seq}: {n_pages} pages exceed max_pages {}",
                self.cfg.max_pages
            )));
        }
        if n_pages <= have {
            return Ok(());
        }
        let new = n_pages - have;
        let need = new * self.cfg.layers;
        self.harvest_ahead(stream, need > self.free.len())?;
        if need > self.free.len() {
            let missing = need - self.free.len();
            if let Some(m) = self.cfg.max_bytes {
                let allowed = m.saturating_sub(self.bytes_reserved) / self.page_bytes;
                if missing > allowed {
                    return Err(self.limit_error(
                        format!(
                            "{new} pages of sequence {seq} in {} layers",
                            self.cfg.layers
                        ),
                        missing,
                    ));
                }
            }
            while self.free.len() < need {
                let short = need - self.free.len();
                self.grow(stream, short.min(self.cfg.chunk_pages))?;
            }
        }
        let base = seq * self.cfg.max_pages;
        let mut addrs = Vec::with_capacity(new);
        for l in 0..self.cfg.layers {
            addrs.clear();
            for p in have..n_pages {
                let a = self
                    .free
                    .pop()
                    .ok_or_else(|| invalid("host pool free list exhausted"))?;
                if let Some(slot) = self.pages.get_mut(l).and_then(|t| t.get_mut(base + p)) {
                    *slot = Some(a);
                }
                if let Some(h) = self.shared.host_tables.get(l).and_then(|t| t.get(base + p)) {
                    h.store(a.host, Ordering::Release);
                }
                addrs.push(a.device);
            }
            self.pages_allocated += new;
            let table = self
                .device_tables
                .get_mut(l)
                .ok_or_else(|| invalid(format!("layer {l}")))?;
            let mut view = table.slice_mut(base + have..base + n_pages);
            stream
                .memcpy_htod(&addrs, &mut view)
                .map_err(RecallError::driver("uploading host page addresses"))?;
        }
        if let Some(s) = self.seq_pages.get_mut(seq) {
            *s = n_pages;
        }
        self.grow_ahead();
        Ok(())
    }

    /// Return every page of `seq` (all layers) to the free list and zero its table rows (device
    /// rows on `stream`). Recall work still reading these pages must have finished.
    #[tracing::instrument(level = "debug", skip(self, stream))]
    pub fn release_seq(&mut self, stream: &Arc<CudaStream>, seq: usize) -> Result<(), RecallError> {
        let have = *self
            .seq_pages
            .get(seq)
            .ok_or_else(|| invalid(format!("sequence {seq} >= {}", self.cfg.seqs)))?;
        if have == 0 {
            return Ok(());
        }
        let base = seq * self.cfg.max_pages;
        for l in 0..self.cfg.layers {
            for p in 0..have {
                if let Some(a) = self
                    .pages
                    .get_mut(l)
                    .and_then(|t| t.get_mut(base + p))
                    .and_then(Option::take)
                {
                    self.free.push(a);
                    self.pages_allocated -= 1;
                }
                if let Some(h) = self.shared.host_tables.get(l).and_then(|t| t.get(base + p)) {
                    h.store(0, Ordering::Release);
                }
            }
            let table = self
                .device_tables
                .get_mut(l)
                .ok_or_else(|| invalid(format!("layer {l}")))?;
            let mut view = table.slice_mut(base..base + have);
            stream
                .memset_zeros(&mut view)
                .map_err(RecallError::driver("clearing host page addresses"))?;
        }
        if let Some(s) = self.seq_pages.get_mut(seq) {
            *s = 0;
        }
        Ok(())
    }

    fn page(&self, layer: usize, seq: usize, page: usize) -> Result<PageAddr, RecallError> {
        if seq >= self.cfg.seqs || page >= self.cfg.max_pages {
            return Err(invalid(format!(
                "(seq {seq}, page {page}) outside {} x {}",
                self.cfg.seqs, self.cfg.max_pages
            )));
        }
        self.pages
            .get(layer)
            .ok_or_else(|| invalid(format!("layer {layer} >= {}", self.cfg.layers)))?
            .get(seq * self.cfg.max_pages + page)
            .copied()
            .flatten()
            .ok_or_else(|| {
                invalid(format!(
                    "page {page} of sequence {seq} in layer {layer} is not allocated"
                ))
            })
    }

    /// The HND unit (`2·P·d` bf16: K rows then V rows) of KV head `head` of a page, as stored
    /// now. Host backing: the context is synchronised, then host memory read; device backing: a
    /// blocking device-to-host copy. For tests and diagnostics.
    pub fn read_unit(
        &self,
        layer: usize,
        seq: usize,
        page: usize,
        head: usize,
    ) -> Result<Vec<bf16>, RecallError> {
        if head >= self.cfg.kv_heads {
            return Err(invalid(format!("head {head} >= {}", self.cfg.kv_heads)));
        }
        let a = self.page(layer, seq, page)?;
        let unit = self.cfg.page_elems / self.cfg.kv_heads;
        let off = (head * unit * 2) as u64;
        let mut out = vec![bf16::ZERO; unit];
        self.ctx
            .synchronize()
            .map_err(RecallError::driver("synchronising before a host page read"))?;
        match self.cfg.backing {
            Backing::MappedHost => {
                // SAFETY: the page lies inside a live chunk (owned by `shared`); `unit` elements
                // at `off` are within the page (head < kv_heads); the device finished writing.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        (a.host + off) as *const bf16,
                        out.as_mut_ptr(),
                        unit,
                    );
                }
            }
            Backing::Device => {
                self.ctx
                    .bind_to_thread()
                    .map_err(RecallError::driver("binding the context"))?;
                // SAFETY: the source range lies inside a live device chunk.
                unsafe {
                    freekv_kernels::cudarc::driver::result::memcpy_dtoh_sync(
                        &mut out,
                        a.device + off,
                    )
                }
                .map_err(RecallError::driver("reading a device-backed page"))?;
            }
        }
        Ok(out)
    }

    /// Overwrite a whole HND page (`page_elems` bf16, `[Hkv][2][P][d]`) from the host (tests,
    /// benchmarks, a host-side prefill). `stream` is synchronised first, so work queued on it that
    /// reads or writes the page is done; device backing copies on `stream` and waits.
    pub fn write_page(
        &mut self,
        stream: &Arc<CudaStream>,
        layer: usize,
        seq: usize,
        page: usize,
        data: &[bf16],
    ) -> Result<(), RecallError> {
        if data.len() != self.cfg.page_elems {
            return Err(invalid(format!(
                "write_page: {} elements, a page has {}",
                data.len(),
                self.cfg.page_elems
            )));
        }
        let a = self.page(layer, seq, page)?;
        stream.synchronize().map_err(RecallError::driver(
            "synchronising before a host page write",
        ))?;
        match self.cfg.backing {
            Backing::MappedHost => {
                // SAFETY: the page (page_elems bf16) lies inside a live chunk; `&mut self` and
                // the synchronisation above keep pool users off it.
                unsafe {
                    std::ptr::copy_nonoverlapping(data.as_ptr(), a.host as *mut bf16, data.len());
                }
            }
            Backing::Device => {
                stream
                    .context()
                    .bind_to_thread()
                    .map_err(RecallError::driver("binding the context"))?;
                // SAFETY: the destination range lies inside a live device chunk.
                unsafe { freekv_kernels::cudarc::driver::result::memcpy_htod_sync(a.device, data) }
                    .map_err(RecallError::driver("writing a device-backed page"))?;
            }
        }
        Ok(())
    }

    /// Offload pages of `layer` (wraps [`Kernels::freekv_offload`] with this layer's table):
    /// `entries` i32 `[n][3]` = (seq, physical page of `src_pool`, logical page). Each
    /// (entry, head) writes the page summary into `summaries` and the HND unit into the pool page
    /// (which must have been allocated with [`HostKvPool::ensure_pages`]; a missing page writes
    /// nothing and is counted, see [`HostKvPool::offload_counters`]).
    #[allow(clippy::too_many_arguments)]
    pub fn offload(
        &self,
        kernels: &Kernels,
        stream: &Arc<CudaStream>,
        layer: usize,
        shape: &FreeKvShape,
        src_pool: &CudaSlice<bf16>,
        entries: &CudaSlice<i32>,
        n: usize,
        summaries: &mut CudaSlice<f32>,
        kind: SummaryKind,
    ) -> Result<(), RecallError> {
        self.check_shape(shape)?;
        let table = self.device_table(layer)?;
        kernels.freekv_offload(
            stream,
            shape,
            src_pool,
            entries,
            n,
            table,
            summaries,
            kind,
            Some(&self.counters),
        )?;
        Ok(())
    }

    /// (units written, (entry, head) pairs skipped for a missing page or a bad index) over every
    /// [`HostKvPool::offload`] so far; synchronises `stream` (offloads on other streams must be
    /// ordered before it).
    pub fn offload_counters(&self, stream: &Arc<CudaStream>) -> Result<(u64, u64), RecallError> {
        Ok(self.counters.read(stream)?)
    }
}
