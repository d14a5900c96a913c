"""Does page-locking file pages scale with threads, and does 'lock all, then one DMA' beat the
pipeline? 4 GiB of warm page cache."""
import ctypes
import threading
import time

import numpy as np

from cgsnap.cuda import driver
from cgsnap.cuda.driver import call, cu
from cgsnap.format import fileformat

driver.init(0)
size = 4 << 30
block = np.random.default_rng(0).integers(0, 255, 64 << 20, dtype=np.uint8)
fileformat.write_file("/tmp/pin.cgsnap", {"x": 1}, [np.tile(block, size // block.nbytes)])
f = fileformat.open_file("/tmp/pin.cgsnap"); info = f.blobs[0]
base, mapped = f.mapping_address()
A = base + info.offset - info.offset % 4096
view = memoryview((ctypes.c_char * mapped).from_address(base)).cast("B")
s = 0
for off in range(0, size, 4096 * 16): s += view[info.offset + off]
dev = driver.mem_alloc(size + (1 << 20))
stream = driver.stream_create()
CTX = call(cu.cuCtxGetCurrent)
def reg_range(lo, hi, piece):
    call(cu.cuCtxSetCurrent, CTX)
    for p in range(lo, hi, piece):
        call(cu.cuMemHostRegister, A + p, min(piece, hi - p), cu.CU_MEMHOSTREGISTER_READ_ONLY)
def unreg_range(lo, hi, piece):
    call(cu.cuCtxSetCurrent, CTX)
    for p in range(lo, hi, piece):
        call(cu.cuMemHostUnregister, A + p)
def par(fn, nthreads, piece):
    part = size // nthreads
    ths = [threading.Thread(target=fn, args=(k * part, (k + 1) * part, piece)) for k in range(nthreads)]
    t = time.perf_counter(); [x.start() for x in ths]; [x.join() for x in ths]
    return time.perf_counter() - t
for piece in (256 << 20, 64 << 20):
    for n in (1, 2, 4, 8, 16):
        tr = par(reg_range, n, piece)
        tu = par(unreg_range, n, piece)
        print(f"piece {piece>>20} MiB, {n:2d} threads: register {size/tr/1e9:6.1f} GB/s, unregister {size/tu/1e9:6.1f} GB/s")
# lock all with 8 threads, then DMA everything, then unlock
for n in (4, 8, 16):
    t0 = time.perf_counter()
    tr = par(reg_range, n, 256 << 20)
    t1 = time.perf_counter()
    for p in range(0, size, 256 << 20):
        call(cu.cuMemcpyHtoDAsync, dev + p, A + p, 256 << 20, stream)
    driver.stream_sync(stream)
    t2 = time.perf_counter()
    par(unreg_range, n, 256 << 20)
    t3 = time.perf_counter()
    print(f"lock all ({n} thr) then DMA: lock {size/(t1-t0)/1e9:.1f}, DMA {size/(t2-t1)/1e9:.1f} GB/s; lock+DMA {size/(t2-t0)/1e9:.1f} GB/s, with unlock {size/(t3-t0)/1e9:.1f} GB/s")
# pinned host baseline
h = driver.host_alloc(size)
t = time.perf_counter(); call(cu.cuMemcpyHtoDAsync, dev, h, size, stream); driver.stream_sync(stream)
print(f"pinned H2D {size/(time.perf_counter()-t)/1e9:.1f} GB/s")
