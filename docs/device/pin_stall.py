"""How long pinning host memory stalls CUDA calls of another thread (session 11).

A helper thread allocates 128 MiB of page-locked, device-mapped host memory three ways while
the main thread launches a tiny kernel every 100 us and times each launch call:
  alloc      cuMemHostAlloc(DEVICEMAP | PORTABLE)  (what the host KV pool did)
  register   anonymous mmap, MADV_HUGEPAGE, faulted in, then cuMemHostRegister in 16 MiB pieces
  register1  the same, one cuMemHostRegister of the whole chunk
Prints, per way, the helper's own time and the main thread's longest launch call and the sum
of its launch calls over 1 ms (the stall the decode steps would see). Run on the device:
  python3 docs/device/pin_stall.py
"""
import ctypes, threading, time
import torch

MB = 1 << 20
SIZE = 128 * MB
cuda = ctypes.CDLL("libcuda.so.1")
torch.zeros(1, device="cuda")
ctx = ctypes.c_void_p()
cuda.cuCtxGetCurrent(ctypes.byref(ctx))
MADV_HUGEPAGE = 14


def way_alloc():
    p = ctypes.c_void_p()
    r = cuda.cuMemHostAlloc(ctypes.byref(p), ctypes.c_size_t(SIZE), 3)
    assert r == 0, r
    ctypes.memset(p, 0, SIZE)  # the pool's buffer is zeroed too
    return lambda: cuda.cuMemFreeHost(p)


def way_register(piece):
    def run():
        libc = ctypes.CDLL(None)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        base = libc.mmap(None, SIZE + 2 * MB, 3, 0x22, -1, 0)  # RW, PRIVATE | ANONYMOUS
        start = (base + 2 * MB - 1) // (2 * MB) * (2 * MB)
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(SIZE), MADV_HUGEPAGE)
        for off in range(0, SIZE, 4096):
            ctypes.c_char.from_address(start + off).value = b"\0"
        pieces = []
        for off in range(0, SIZE, piece):
            r = cuda.cuMemHostRegister_v2(ctypes.c_void_p(start + off), ctypes.c_size_t(piece), 3)
            assert r == 0, r
            pieces.append(start + off)

        def free():
            for q in pieces:
                cuda.cuMemHostUnregister(ctypes.c_void_p(q))
            libc.munmap(ctypes.c_void_p(base), ctypes.c_size_t(SIZE + 2 * MB))
        return free
    return run


def trial(name, fn):
    x = torch.zeros(1, device="cuda")
    done = threading.Event()
    out = {}

    def helper():
        cuda.cuCtxSetCurrent(ctx)
        t = time.perf_counter()
        out["free"] = fn() if fn else None
        out["helper_ms"] = (time.perf_counter() - t) * 1e3
        done.set()

    lat = []
    th = threading.Thread(target=helper)
    t0 = time.perf_counter()
    th.start()
    while not done.is_set() or time.perf_counter() - t0 < 0.05:
        t = time.perf_counter()
        x.add_(1)
        lat.append((time.perf_counter() - t) * 1e3)
        time.sleep(0.0001)
    th.join()
    torch.cuda.synchronize()
    if out.get("free"):
        out["free"]()
    stall = sum(v for v in lat if v > 1.0)
    print(f"{name:10s} helper {out['helper_ms']:7.1f} ms   main: longest launch {max(lat):7.2f} ms, "
          f"launches over 1 ms sum to {stall:7.1f} ms ({len(lat)} launches)")


trial("none", None)
for rep in range(2):
    trial("alloc", way_alloc)
    trial("register", way_register(16 * MB))
    trial("register1", way_register(SIZE))
