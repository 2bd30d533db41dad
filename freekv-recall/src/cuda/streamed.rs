//! [`StreamedRecall`]: the paper's double-buffered streamed recall on CUDA streams (spec §6.1),
//! with the races of the original removed (§9 items 10–12).

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, bounded, unbounded};
use freekv_kernels::cudarc::driver::{CudaEvent, CudaSlice, CudaStream, DevicePtr, sys};
use freekv_kernels::half::bf16;
use freekv_kernels::{FreeKvShape, Gpu, MappedHostBuffer};

use super::pool::{Backing, HostKvPool, PoolShared};
use super::{
    CudaRecallCounters, HostLists, ListAddrs, RawDevice, RecallLists, SlotsMut, check_slots,
    unit_bytes,
};
use crate::RecallError;

/// Everything one job touches on the device and the host. Exactly one job runs at a time (the
/// engine sits behind a mutex), staging buffer `b` is only ever used on stream `b`, so a staging
/// buffer is never shared by two in-flight jobs: a later job's copies into it are stream-ordered
/// after the earlier job's scatters out of it.
struct Engine {
    gpu: Arc<Gpu>,
    shape: FreeKvShape,
    streams: [Arc<CudaStream>; 2],
    /// Read-back of the lists and upload of the unit table (never waits for the copies).
    meta: Arc<CudaStream>,
    staging: [CudaSlice<bf16>; 2],
    lists: HostLists,
    /// (seq, slot, head) of every unit of a job, pinned, uploaded once per job.
    h_units: MappedHostBuffer<i32>,
    d_units: CudaSlice<i32>,
    /// Recorded after the last upload of `h_units` (the host waits on it before rewriting).
    units_uploaded: Option<CudaEvent>,
}

/// A job as the worker receives it: device buffers by address (they must stay allocated until
/// the ticket is waited for), the pool's shared tables and memory by `Arc`.
struct Job {
    pool: Arc<PoolShared>,
    layer: usize,
    ready: CudaEvent,
    lists: ListAddrs,
    slots: u64,
    slots_len: usize,
    reply: Sender<Result<Done, RecallError>>,
}

struct Done {
    events: [CudaEvent; 2],
    counters: CudaRecallCounters,
}

/// Completion handle of [`StreamedRecall::submit`].
#[derive(Debug)]
pub struct StreamedTicket {
    rx: Receiver<Result<Done, RecallError>>,
}

impl std::fmt::Debug for Done {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Done")
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

/// The double-buffered streamed recall of one shape: two staging buffers of `k` units, two copy
/// streams, a metadata stream, pinned read-back buffers, and one FIFO worker thread for the
/// asynchronous form.
///
/// Per job (one layer, all sequences and KV heads): the recall lists are copied to pinned host
/// memory after the producer stream's work up to the call (an event), and the host waits for
/// them; rows (seq, head) with work after the filter are numbered `r = 0, 1, …`; row `r` issues
/// one `cuMemcpyHtoDAsync` per unit (source: the host page of (seq, page) + `head·2·P·d`) into
/// `staging[r % 2]` on stream `r % 2`, then launches the scatter of row `r − 1` on that row's
/// stream; after the loop the last scatter, then a done event on each stream.
///
/// Jobs (blocking or queued) execute one at a time and reach the device in submission order: a
/// job's copies start after every scatter of the previous job, so the two staging buffers are
/// never shared by two in-flight jobs (spec §9 item 12) and later jobs win on shared slots.
pub struct StreamedRecall {
    shape: FreeKvShape,
    engine: Arc<Mutex<Engine>>,
    totals: Arc<Mutex<CudaRecallCounters>>,
    tx: Option<Sender<Job>>,
    worker: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for StreamedRecall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamedRecall").finish_non_exhaustive()
    }
}

fn poisoned(what: &str) -> RecallError {
    RecallError::LockPoisoned(format!("streamed recall {what}"))
}

impl StreamedRecall {
    /// Buffers and streams for `shape` on `gpu`'s device, and the worker thread.
    pub fn new(gpu: &Arc<Gpu>, shape: &FreeKvShape) -> Result<Self, RecallError> {
        shape.validate("StreamedRecall")?;
        let ctx = gpu.ctx();
        let s = gpu.stream();
        let unit = 2 * shape.page_size * shape.head_dim;
        let stage = shape
            .cache_pages()
            .checked_mul(unit)
            .ok_or_else(|| RecallError::InvalidRequest("staging size overflows".into()))?;
        let table = shape
            .rows()
            .checked_mul(shape.cache_pages())
            .and_then(|x| x.checked_mul(3))
            .ok_or_else(|| RecallError::InvalidRequest("unit table size overflows".into()))?;
        let stream = || {
            ctx.new_stream()
                .map_err(RecallError::driver("creating a recall stream"))
        };
        let alloc = |n: usize| {
            s.alloc_zeros::<bf16>(n)
                .map_err(RecallError::driver("allocating a staging buffer"))
        };
        let engine = Engine {
            gpu: gpu.clone(),
            shape: *shape,
            streams: [stream()?, stream()?],
            meta: stream()?,
            staging: [alloc(stage)?, alloc(stage)?],
            lists: HostLists::new(s, shape)?,
            h_units: MappedHostBuffer::new(ctx, table)?,
            d_units: s
                .alloc_zeros::<i32>(table)
                .map_err(RecallError::driver("allocating the unit table"))?,
            units_uploaded: None,
        };
        // The allocations above are ordered on the compute stream; the recall streams must not
        // use them earlier.
        s.synchronize()
            .map_err(RecallError::driver("synchronising after allocation"))?;
        let engine = Arc::new(Mutex::new(engine));
        let totals = Arc::new(Mutex::new(CudaRecallCounters::default()));
        let (tx, rx) = unbounded::<Job>();
        let (e2, t2, ctx2) = (engine.clone(), totals.clone(), ctx.clone());
        let worker = std::thread::Builder::new()
            .name("freekv-streamed-recall".into())
            .spawn(move || {
                let bound = ctx2.bind_to_thread();
                for job in rx {
                    let result = match &bound {
                        Ok(()) => run_job(&e2, &t2, &job, false),
                        Err(e) => Err(RecallError::driver("binding the recall worker")(*e)),
                    };
                    // The submitter may have given up on the ticket: ignore a closed reply.
                    let _ = job.reply.send(result);
                }
            })
            .map_err(|e| RecallError::Stopped(format!("spawning the recall worker: {e}")))?;
        Ok(Self {
            shape: *shape,
            engine,
            totals,
            tx: Some(tx),
            worker: Some(worker),
        })
    }

    fn job(
        &self,
        producer: &Arc<CudaStream>,
        pool: &HostKvPool,
        layer: usize,
        lists: &RecallLists<'_>,
        slots: SlotsMut<'_>,
        reply: Sender<Result<Done, RecallError>>,
    ) -> Result<Job, RecallError> {
        let shape = self.shape;
        pool.check_shape(&shape)?;
        pool.device_table(layer)?;
        check_slots(slots, &shape)?;
        let lists = ListAddrs::of(lists, &shape, producer)?;
        let ready = producer
            .record_event(None)
            .map_err(RecallError::driver("recording the recall's start event"))?;
        let (sp, _g) = slots.device_ptr(producer);
        Ok(Job {
            pool: pool.shared().clone(),
            layer,
            ready,
            lists,
            slots: sp,
            slots_len: slots.len(),
            reply,
        })
    }

    /// Recall one layer and wait for it: the lists are read after `producer`'s work so far, the
    /// copies and scatters run on the two recall streams, and both are synchronised before
    /// returning (the slots are ready for any stream).
    pub fn recall_blocking(
        &self,
        producer: &Arc<CudaStream>,
        pool: &HostKvPool,
        layer: usize,
        lists: &RecallLists<'_>,
        slots: SlotsMut<'_>,
    ) -> Result<CudaRecallCounters, RecallError> {
        let _s = tracing::debug_span!("streamed_recall_blocking", layer).entered();
        let (tx, _rx) = bounded(1);
        let job = self.job(producer, pool, layer, lists, slots, tx)?;
        let done = run_job(&self.engine, &self.totals, &job, true)?;
        Ok(done.counters)
    }

    /// Queue one layer's recall on the worker (FIFO) and return at once. The lists are read
    /// after `producer`'s work up to this call. `lists` and `slots` must stay allocated, and the
    /// lists unchanged, until [`StreamedRecall::wait`] returned for the ticket.
    pub fn submit(
        &self,
        producer: &Arc<CudaStream>,
        pool: &HostKvPool,
        layer: usize,
        lists: &RecallLists<'_>,
        slots: SlotsMut<'_>,
    ) -> Result<StreamedTicket, RecallError> {
        let _s = tracing::debug_span!("streamed_recall_submit", layer).entered();
        let (tx, rx) = bounded(1);
        let job = self.job(producer, pool, layer, lists, slots, tx)?;
        self.tx
            .as_ref()
            .ok_or_else(|| RecallError::Stopped("streamed recall worker gone".into()))?
            .send(job)
            .map_err(|_| RecallError::Stopped("streamed recall worker gone".into()))?;
        Ok(StreamedTicket { rx })
    }

    /// Block until the worker has enqueued the ticket's copies and scatters, then make
    /// `compute` wait (on the device) for their completion. Returns what the job moved.
    pub fn wait(
        &self,
        ticket: StreamedTicket,
        compute: &CudaStream,
    ) -> Result<CudaRecallCounters, RecallError> {
        let _s = tracing::debug_span!("streamed_recall_wait").entered();
        let done = ticket
            .rx
            .recv()
            .map_err(|_| RecallError::Stopped("streamed recall worker gone".into()))??;
        for e in &done.events {
            compute
                .wait(e)
                .map_err(RecallError::driver("waiting for a streamed recall"))?;
        }
        Ok(done.counters)
    }

    /// Sum over every executed job.
    pub fn totals(&self) -> CudaRecallCounters {
        self.totals.lock().map(|t| *t).unwrap_or_default()
    }
}

impl Drop for StreamedRecall {
    fn drop(&mut self) {
        // Closing the channel ends the worker after the queued jobs.
        self.tx.take();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
        // The staging buffers and unit table are freed after this; let the copies and scatters
        // that use them finish first (errors cannot be reported from drop).
        if let Ok(e) = self.engine.lock() {
            for s in e.streams.iter().chain([&e.meta]) {
                let _ = s.synchronize();
            }
        }
    }
}

/// Execute one job (worker thread, or the caller for the blocking form).
fn run_job(
    engine: &Mutex<Engine>,
    totals: &Mutex<CudaRecallCounters>,
    job: &Job,
    blocking: bool,
) -> Result<Done, RecallError> {
    let mut guard = engine.lock().map_err(|_| poisoned("engine"))?;
    let e = &mut *guard;
    let shape = e.shape;
    let drv = RecallError::driver;
    e.gpu
        .ctx()
        .bind_to_thread()
        .map_err(drv("binding the context"))?;
    // 1. The lists, after the producer's work.
    e.meta
        .wait(&job.ready)
        .map_err(drv("ordering after the producer"))?;
    e.lists.fetch(&e.meta, &job.lists)?;
    e.meta
        .synchronize()
        .map_err(drv("waiting for the recall lists"))?;
    let rows = e.lists.rows(&shape, job.lists.filter);

    // 2. The unit table (seq, slot, head) and each unit's source address (0 = skip). The upload
    // (and through it every copy and scatter of this job) waits for all earlier jobs' work on
    // both copy streams: the previous scatters have read the device unit table, and jobs reach
    // the device in submission order even when they write the same slots.
    for s in &e.streams {
        let tail = s
            .record_event(None)
            .map_err(drv("recording the previous job's tail"))?;
        e.meta
            .wait(&tail)
            .map_err(drv("ordering after the previous job"))?;
    }
    if let Some(ev) = &e.units_uploaded {
        ev.synchronize()
            .map_err(drv("waiting for the previous unit table upload"))?;
    }
    let ub = unit_bytes(&shape);
    let (nb, mp) = (shape.slots() as i32, shape.max_pages as i32);
    let mut srcs: Vec<u64> = Vec::new();
    let mut offsets = Vec::with_capacity(rows.len());
    let mut counters = CudaRecallCounters {
        jobs: 1,
        rows: rows.len() as u64,
        ..Default::default()
    };
    {
        let table = e.h_units.as_mut_slice();
        for units in &rows {
            offsets.push(srcs.len());
            for u in units {
                let ok = u.page >= 0 && u.page < mp && u.slot >= 0 && u.slot < nb;
                let page_addr = if ok {
                    job.pool.host_addr(job.layer, u.seq, u.page as usize)
                } else {
                    0
                };
                let at = srcs.len() * 3;
                let dst = table
                    .get_mut(at..at + 3)
                    .ok_or_else(|| RecallError::InvalidRequest("unit table overflow".into()))?;
                if page_addr == 0 {
                    dst.copy_from_slice(&[-1, 0, 0]);
                    srcs.push(0);
                    counters.skipped += 1;
                } else {
                    dst.copy_from_slice(&[u.seq as i32, u.slot, u.head as i32]);
                    srcs.push(page_addr + (u.head * ub) as u64);
                }
            }
        }
    }
    let total = srcs.len();
    if total > 0 {
        // SAFETY: `total * 3` i32 fit both the pinned table and the device table (sized
        // rows * k * 3, and no row lists more than k units).
        unsafe {
            sys::cuMemcpyHtoDAsync_v2(
                {
                    let (p, _g) = e.d_units.device_ptr(&e.meta);
                    p
                },
                e.h_units.host_ptr() as *const std::ffi::c_void,
                total * 3 * 4,
                e.meta.cu_stream(),
            )
        }
        .result()
        .map_err(drv("uploading the unit table"))?;
    }
    let uploaded = e
        .meta
        .record_event(None)
        .map_err(drv("recording the unit table upload"))?;
    for s in &e.streams {
        // After the table (and, through `meta`, after the producer).
        s.wait(&uploaded).map_err(drv("ordering the copies"))?;
    }
    e.units_uploaded = Some(uploaded);

    // 3. Rows: copies of row r into staging[r % 2] on stream r % 2, then the scatter of r - 1.
    let kernels = e.gpu.kernels();
    let mut slots = RawDevice::<bf16>::new(job.slots, job.slots_len, &e.streams[0]);
    let host = job.pool.backing == Backing::MappedHost;
    let scatter = |e: &Engine, slots: &mut RawDevice<bf16>, r: usize| -> Result<(), RecallError> {
        let b = r % 2;
        let (Some(units), Some(&off)) = (rows.get(r), offsets.get(r)) else {
            return Ok(());
        };
        let n = units.len();
        let table = e.d_units.slice(off * 3..(off + n) * 3);
        kernels.freekv_scatter(&e.streams[b], &shape, &e.staging[b], &table, n, slots, None)?;
        Ok(())
    };
    for (r, units) in rows.iter().enumerate() {
        let b = r % 2;
        let stream = &e.streams[b];
        let (dst0, _g) = e.staging[b].device_ptr(stream);
        let off = offsets.get(r).copied().unwrap_or(0);
        for i in 0..units.len() {
            let src = srcs.get(off + i).copied().unwrap_or(0);
            if src == 0 {
                continue;
            }
            let dst = dst0 + (i * ub) as u64;
            // SAFETY: the source unit lies in a live pool chunk (kept alive by `job.pool`); the
            // destination is unit i < k of a staging buffer of k units.
            let rc = unsafe {
                if host {
                    sys::cuMemcpyHtoDAsync_v2(
                        dst,
                        src as *const std::ffi::c_void,
                        ub,
                        stream.cu_stream(),
                    )
                } else {
                    sys::cuMemcpyDtoDAsync_v2(dst, src, ub, stream.cu_stream())
                }
            };
            rc.result().map_err(drv("copying a recalled unit"))?;
            counters.copies += 1;
            counters.units += 1;
        }
        if r > 0 {
            scatter(e, &mut slots, r - 1)?;
        }
    }
    if !rows.is_empty() {
        scatter(e, &mut slots, rows.len() - 1)?;
    }
    counters.bytes = counters.units * ub as u64;
    let events = [
        e.streams[0]
            .record_event(None)
            .map_err(drv("recording a recall done event"))?,
        e.streams[1]
            .record_event(None)
            .map_err(drv("recording a recall done event"))?,
    ];
    if blocking {
        for s in &e.streams {
            s.synchronize().map_err(drv("waiting for the recall"))?;
        }
    }
    drop(guard);
    if let Ok(mut t) = totals.lock() {
        t.accumulate(&counters);
    }
    Ok(Done { events, counters })
}
