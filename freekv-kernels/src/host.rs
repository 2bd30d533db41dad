//! Pinned host memory that kernels can address directly (zero-copy).
//!
//! [`MappedHostBuffer`] is allocated with `cuMemHostAlloc(DEVICEMAP | PORTABLE)`: page-locked
//! (so copy engines can DMA it at full speed), mapped into the device address space (so a kernel
//! can read and write it through [`MappedHostBuffer::device_ptr`]), usable from every context,
//! and **never write-combined** (the CPU reads offloaded KV back at normal speed).
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
    _marker: PhantomData<T>,
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
    /// Allocates `len` zeroed values (at least one byte is always allocated, so even an empty
    /// buffer has valid addresses). Sizes above [`MAX_MAPPED_BYTES`] or that overflow, and a
    /// failed allocation (not enough pinnable memory), are errors naming the size to lower.
    #[tracing::instrument(level = "debug", skip(ctx))]
    pub fn new(ctx: &Arc<CudaContext>, len: usize) -> Result<Self, KernelError> {
        const K: &str = "MappedHostBuffer";
        let bytes = len
            .checked_mul(size_of::<T>())
            .filter(|&b| b <= MAX_MAPPED_BYTES)
            .ok_or_else(|| {
                KernelError::arg(
                    K,
                    format!(
                        "{len} values of {} bytes exceed the {} GiB limit of one mapped host \
                         buffer: lower the requested length",
                        size_of::<T>(),
                        MAX_MAPPED_BYTES >> 30
                    ),
                )
            })?;
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
            // SAFETY: allocated by cuMemHostAlloc in `new`, freed exactly once.
            let _ = unsafe { cudarc::driver::result::free_host(self.host.cast()) };
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
    fn mapped_buffers_are_send_and_sync() {
        send_sync::<MappedHostBuffer<u64>>();
        send_sync::<MappedHostBuffer<half::bf16>>();
    }
}
