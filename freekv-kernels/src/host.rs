//! Pinned host memory that kernels can address directly (zero-copy).
//!
//! [`MappedHostBuffer`] is allocated with `cuMemHostAlloc(DEVICEMAP | PORTABLE)`: page-locked
//! (so copy engines can DMA it at full speed), mapped into the device address space (so a kernel
//! can read and write it through [`MappedHostBuffer::device_ptr`]), usable from every context,
//! and **never write-combined** (the CPU reads offloaded KV back at normal speed).
//!
//! [`MappedHostBuffer::new_registered`] gives the same kind of buffer from the process's own
//! memory (anonymous, transparent huge pages asked for, faulted in before the driver is called)
//! page-locked with `cuMemHostRegister` in pieces: page-locking holds driver-global locks that
//! stall every other CUDA call of the process, and this keeps each hold short (see its docs).
//!
//! Synchronisation is the caller's: values a kernel or copy writes become visible to the host
//! slice after a synchronisation that orders that work (stream, event or context sync), and host
//! writes must not race with device work that reads the same bytes.

use std::marker::PhantomData;
use std::sync::Arc;

use bytemuck::Pod;
use cudarc::driver::{CudaContext, CudaStream, HostSlice, SyncOnDrop, sys};

use crate::KernelError;

/// Largest single mapped allocation accepted (1 TiB): larger requests are reported as errors
/// before the driver is asked (and before any size arithmetic could overflow).
pub const MAX_MAPPED_BYTES: usize = 1 << 40;

/// A pinned, device-mapped host buffer of `len` values of `T`, zero-initialised.
///
/// `T` is plain old data ([`Pod`]): every bit pattern the device writes is a valid value.
pub struct MappedHostBuffer<T: Pod> {
    ctx: Arc<CudaContext>,
    host: *mut T,
    device: u64,
    len: usize,
    /// The registered pieces and the mapping behind them ([`MappedHostBuffer::new_registered`]);
    /// `None`: allocated by `cuMemHostAlloc`.
    registered: Option<Registered>,
    _marker: PhantomData<T>,
}

/// Memory of the process page-locked by `cuMemHostRegister`, one registration per piece.
struct Registered {
    pieces: Vec<*mut std::ffi::c_void>,
    /// Unmapped after the pieces are unregistered (fields drop after `Drop::drop`).
    _map: memmap2::MmapMut,
}

/// Bytes page-locked by one `cuMemHostRegister` call of [`MappedHostBuffer::new_registered`].
pub const REGISTER_PIECE_BYTES: usize = 16 << 20;

/// Alignment of a registered buffer (a transparent huge page).
const HUGE_PAGE: usize = 2 << 20;

/// Bytes registered per piece for blocks of `granule` bytes: [`REGISTER_PIECE_BYTES`] rounded
/// down to whole granules, at least one granule (`None` for a zero granule).
fn piece_bytes(granule: usize) -> Option<usize> {
    (REGISTER_PIECE_BYTES / granule.max(1))
        .max(1)
        .checked_mul(granule)
        .filter(|&p| p > 0)
}

/// Unregister pieces (errors cannot be reported here: a failure leaves them locked).
fn unregister(pieces: &[*mut std::ffi::c_void]) {
    for &p in pieces {
        // SAFETY: each piece was registered once by `new_registered` and is unregistered once.
        let _ = unsafe { sys::cuMemHostUnregister(p) }.result();
    }
}

// SAFETY: the buffer owns its allocation exclusively (like a `Box<[T]>`); the raw pointer is only
// dereferenced through `&self` / `&mut self` borrows, and the driver allocation is usable from any
// thread (PORTABLE, freed with the context made current).
unsafe impl<T: Pod + Send> Send for MappedHostBuffer<T> {}
// SAFETY: shared access only hands out `&[T]`.
unsafe impl<T: Pod + Sync> Sync for MappedHostBuffer<T> {}

impl<T: Pod> std::fmt::Debug for MappedHostBuffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedHostBuffer")
            .field("len", &self.len)
            .field("bytes", &self.bytes())
            .field("device_ptr", &format_args!("{:#x}", self.device))
            .finish()
    }
}

impl<T: Pod> MappedHostBuffer<T> {
    /// Bytes of `len` values, or an error naming the length to lower past
    /// [`MAX_MAPPED_BYTES`] (or an overflow).
    fn checked_bytes(k: &'static str, len: usize) -> Result<usize, KernelError> {
        len.checked_mul(size_of::<T>())
            .filter(|&b| b <= MAX_MAPPED_BYTES)
            .ok_or_else(|| {
                KernelError::arg(
                    k,
                    format!(
                        "{len} values of {} bytes exceed the {} GiB limit of one mapped host \
                         buffer: lower the requested length",
                        size_of::<T>(),
                        MAX_MAPPED_BYTES >> 30
                    ),
                )
            })
    }

    /// Allocates `len` zeroed values (at least one byte is always allocated, so even an empty
    /// buffer has valid addresses). Sizes above [`MAX_MAPPED_BYTES`] or that overflow, and a
    /// failed allocation (not enough pinnable memory), are errors naming the size to lower.
    #[tracing::instrument(level = "debug", skip(ctx))]
    pub fn new(ctx: &Arc<CudaContext>, len: usize) -> Result<Self, KernelError> {
        const K: &str = "MappedHostBuffer";
        let bytes = Self::checked_bytes(K, len)?;
        ctx.bind_to_thread().map_err(KernelError::driver(
            "binding the context for cuMemHostAlloc",
        ))?;
        let flags = sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE;
        // SAFETY: plain allocation call; the result is checked before use.
        let host = unsafe { cudarc::driver::result::malloc_host(bytes.max(1), flags) }.map_err(
            |source| KernelError::Driver {
                what: format!(
                    "cuMemHostAlloc of {bytes} bytes of pinned mapped host memory (lower the \
                     host KV budget or the buffer size)"
                ),
                source,
            },
        )?;
        let mut device: sys::CUdeviceptr = 0;
        // SAFETY: `host` was just returned by cuMemHostAlloc with DEVICEMAP.
        let mapped = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut device, host, 0) }.result();
        if let Err(source) = mapped {
            // SAFETY: allocated above, not yet shared.
            let _ = unsafe { cudarc::driver::result::free_host(host) };
            return Err(KernelError::Driver {
                what: "cuMemHostGetDevicePointer of a mapped host buffer".into(),
                source,
            });
        }
        // SAFETY: `bytes.max(1)` bytes are writable; zero is a valid `T` (Pod).
        unsafe { std::ptr::write_bytes(host.cast::<u8>(), 0, bytes.max(1)) };
        Ok(Self {
            ctx: ctx.clone(),
            host: host.cast::<T>(),
            device,
            len,
            registered: None,
            _marker: PhantomData,
        })
    }

    /// Like [`MappedHostBuffer::new`] (zeroed, pinned, device-mapped, portable, not
    /// write-combined), from memory of the process: an anonymous mapping aligned to 2 MiB with
    /// transparent huge pages asked for (`MADV_HUGEPAGE`, where the kernel allows it), every
    /// page faulted in here, then page-locked and mapped by `cuMemHostRegister` in pieces of
    /// [`REGISTER_PIECE_BYTES`] rounded down to a multiple of `granule` bytes (at least one
    /// granule).
    ///
    /// A copy (`cuMemcpy*`) must not span two registrations, while kernels read and write across
    /// them freely (one contiguous device range): with `granule` the size of the blocks that
    /// are copied (a KV page), no block straddles two pieces.
    ///
    /// Page-locking holds driver-global locks: every CUDA call of the process (a kernel or
    /// graph launch on another thread included) waits while `cuMemHostAlloc` pins a large
    /// buffer. Here the slow part (faulting and zeroing the pages) runs without the driver, and
    /// each lock hold covers one piece of resident memory; meant for a helper thread that
    /// allocates ahead of need. Errors as for `new`, and an error when the pieces' device
    /// addresses are not contiguous (never under unified addressing).
    #[tracing::instrument(level = "debug", skip(ctx))]
    pub fn new_registered(
        ctx: &Arc<CudaContext>,
        len: usize,
        granule: usize,
    ) -> Result<Self, KernelError> {
        const K: &str = "MappedHostBuffer::new_registered";
        let bytes = Self::checked_bytes(K, len)?.max(1);
        let piece = piece_bytes(granule).ok_or_else(|| {
            KernelError::arg(K, "granule must be at least one byte (and not overflow)")
        })?;
        let os = |what: &str, e: std::io::Error| {
            KernelError::arg(K, format!("{what} of {bytes} bytes of host memory: {e}"))
        };
        let mut map = memmap2::MmapMut::map_anon(bytes + HUGE_PAGE)
            .map_err(|e| os("an anonymous mapping", e))?;
        let skip = map.as_ptr().align_offset(HUGE_PAGE).min(HUGE_PAGE);
        // Best effort: without transparent huge pages the buffer is made of 4 KiB pages.
        let _ = map.advise_range(memmap2::Advice::HugePage, skip, bytes);
        let region = map
            .get_mut(skip..skip + bytes)
            .ok_or_else(|| KernelError::arg(K, "huge-page alignment past the mapping"))?;
        // Fault every page in now (writing zeros keeps the buffer zeroed).
        for b in region.iter_mut().step_by(4096) {
            // SAFETY: `b` is a valid byte of the mapping; volatile so the store is kept.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
        let host = region.as_mut_ptr().cast::<std::ffi::c_void>();
        ctx.bind_to_thread().map_err(KernelError::driver(
            "binding the context for cuMemHostRegister",
        ))?;
        let flags = sys::CU_MEMHOSTREGISTER_DEVICEMAP | sys::CU_MEMHOSTREGISTER_PORTABLE;
        let mut pieces: Vec<*mut std::ffi::c_void> = Vec::new();
        let mut device: sys::CUdeviceptr = 0;
        let mut off = 0;
        while off < bytes {
            let n = piece.min(bytes - off);
            // SAFETY: `off < bytes`: inside the region.
            let p = unsafe { host.cast::<u8>().add(off) }.cast::<std::ffi::c_void>();
            // SAFETY: `p..p + n` is mapped memory of this process that outlives the
            // registration (unregistered before the mapping is dropped).
            let r = unsafe { sys::cuMemHostRegister_v2(p, n, flags) }.result();
            let mut d: sys::CUdeviceptr = 0;
            let mapped = r.and_then(|()| {
                pieces.push(p);
                // SAFETY: `p` was just registered with DEVICEMAP.
                unsafe { sys::cuMemHostGetDevicePointer_v2(&mut d, p, 0) }.result()
            });
            let failed = match mapped {
                Err(source) => Some(KernelError::Driver {
                    what: format!(
                        "cuMemHostRegister of {n} bytes of host memory (lower the host KV \
                         budget or the buffer size)"
                    ),
                    source,
                }),
                Ok(()) if off == 0 => {
                    device = d;
                    None
                }
                Ok(()) if d != device + off as u64 => Some(KernelError::arg(
                    K,
                    "the device addresses of the registered pieces are not contiguous",
                )),
                Ok(()) => None,
            };
            if let Some(e) = failed {
                unregister(&pieces);
                return Err(e);
            }
            off += n;
        }
        Ok(Self {
            ctx: ctx.clone(),
            host: host.cast::<T>(),
            device,
            len,
            registered: Some(Registered { pieces, _map: map }),
            _marker: PhantomData,
        })
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the buffer holds no value.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Size in bytes.
    pub fn bytes(&self) -> usize {
        self.len * size_of::<T>()
    }

    /// The device-visible address of value 0 (what a kernel dereferences).
    pub fn device_ptr(&self) -> u64 {
        self.device
    }

    /// The host address of value 0 (what `cuMemcpy*` takes as a host source or destination).
    pub fn host_ptr(&self) -> *const T {
        self.host
    }

    /// How many `cuMemHostRegister` pieces the buffer is made of (0: one `cuMemHostAlloc`).
    pub fn registered_pieces(&self) -> usize {
        self.registered.as_ref().map_or(0, |r| r.pieces.len())
    }

    /// The context the buffer was allocated in.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The values, as the host sees them now (synchronise with the device work that writes them
    /// first).
    pub fn as_slice(&self) -> &[T] {
        // SAFETY: `host` points to `len` initialised (zeroed, then Pod-written) values owned by self.
        unsafe { std::slice::from_raw_parts(self.host, self.len) }
    }

    /// The values, mutably (no device work may be reading or writing them meanwhile).
    pub fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: as in `as_slice`, and `&mut self` makes the host access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.host, self.len) }
    }
}

impl<T: Pod> Drop for MappedHostBuffer<T> {
    fn drop(&mut self) {
        // Errors cannot be reported from drop; a failed free leaks the pinned pages.
        if self.ctx.bind_to_thread().is_ok() {
            match &self.registered {
                // The mapping itself is dropped after this.
                Some(r) => unregister(&r.pieces),
                // SAFETY: allocated by cuMemHostAlloc in `new`, freed exactly once.
                None => {
                    let _ = unsafe { cudarc::driver::result::free_host(self.host.cast()) };
                }
            }
        }
    }
}

/// Lets cudarc's `memcpy_htod` / `memcpy_dtoh` take a mapped buffer as the host side (pinned:
/// the copies are truly asynchronous; synchronise before reading or rewriting it).
impl<T: Pod> HostSlice<T> for MappedHostBuffer<T> {
    fn len(&self) -> usize {
        self.len
    }

    unsafe fn stream_synced_slice<'a>(
        &'a self,
        _stream: &'a CudaStream,
    ) -> (&'a [T], SyncOnDrop<'a>) {
        (self.as_slice(), SyncOnDrop::Sync(None))
    }

    unsafe fn stream_synced_mut_slice<'a>(
        &'a mut self,
        _stream: &'a CudaStream,
    ) -> (&'a mut [T], SyncOnDrop<'a>) {
        (self.as_mut_slice(), SyncOnDrop::Sync(None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send_sync<X: Send + Sync>() {}

    #[test]
    fn registered_pieces_are_whole_granules() {
        let m = 1 << 20;
        assert_eq!(piece_bytes(128 << 10), Some(16 * m)); // a Llama-3.1-8B page
        assert_eq!(piece_bytes(3 * m), Some(15 * m));
        assert_eq!(piece_bytes(1000), Some(16 * m / 1000 * 1000));
        assert_eq!(piece_bytes(32 * m), Some(32 * m)); // one granule at least
        assert_eq!(piece_bytes(1), Some(16 * m));
        assert_eq!(piece_bytes(0), None);
    }

    #[test]
    fn mapped_buffers_are_send_and_sync() {
        send_sync::<MappedHostBuffer<u64>>();
        send_sync::<MappedHostBuffer<half::bf16>>();
    }
}
