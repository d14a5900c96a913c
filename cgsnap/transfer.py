"""Region contents between host buffers (the file's mmap, numpy arrays) and device memory at bus
speed.

A copy from pageable memory runs at a few GB/s: the driver stages it through a small pinned
buffer with one CPU thread. Here the staging is ours: a ring of pinned chunks filled by several
threads (``memmove`` releases the GIL), while the DMA engine drains the previous chunk
asynchronously. The checksum of an upload is computed over the same chunks on the way, so a
verified restore reads the file once.
"""
from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np
import xxhash

from . import driver
from .driver import call, cu

CHUNK = 64 << 20
RING = 3
THRESHOLD = 8 << 20          # smaller copies go straight through the driver
_PIECE = 8 << 20


def _threads() -> int:
    return max(2, min(8, (os.cpu_count() or 2)))


class Stager:
    """Pinned staging ring + copy threads + one stream. Use as a context manager."""

    def __init__(self, chunk: int = CHUNK, ring: int = RING):
        self.chunk = chunk
        self.buffers = []
        self.events = []
        self.pool = ThreadPoolExecutor(_threads(), thread_name_prefix="cgsnap-copy")
        self.stream = driver.stream_create()
        try:
            for _ in range(ring):
                self.buffers.append(driver.host_alloc(chunk))
                self.events.append(call(cu.cuEventCreate,
                                        cu.CUevent_flags.CU_EVENT_DISABLE_TIMING))
        except BaseException:
            self.close()
            raise

    def _parallel_memmove(self, dst: int, src: int, n: int) -> None:
        pieces = [(off, min(_PIECE, n - off)) for off in range(0, n, _PIECE)]
        list(self.pool.map(lambda p: ctypes.memmove(dst + p[0], src + p[0], p[1]), pieces))

    def upload(self, dst: int, src, size: int, checksum: Optional[bytes] = None) -> bool:
        """Copy ``size`` bytes of the host buffer ``src`` to device address ``dst``. With
        ``checksum`` (XXH3-128 digest) the bytes are hashed on the way; returns whether it
        matched (True when no checksum was given)."""
        src_addr = driver.buffer_address(src)
        hasher = xxhash.xxh3_128() if checksum is not None else None
        view = memoryview(src).cast("B") if hasher is not None else None
        for index, off in enumerate(range(0, size, self.chunk)):
            n = min(self.chunk, size - off)
            slot = index % len(self.buffers)
            call(cu.cuEventSynchronize, self.events[slot])      # the DMA from this slot is done
            if hasher is not None:
                hashing = self.pool.submit(hasher.update, view[off:off + n])
            self._parallel_memmove(self.buffers[slot], src_addr + off, n)
            call(cu.cuMemcpyHtoDAsync, dst + off, self.buffers[slot], n, self.stream)
            call(cu.cuEventRecord, self.events[slot], self.stream)
            if hasher is not None:
                hashing.result()
        driver.stream_sync(self.stream)
        return hasher is None or hasher.digest() == checksum

    def download(self, dst, src: int, size: int) -> None:
        """Copy ``size`` bytes from device address ``src`` into the writable host buffer ``dst``."""
        dst_addr = driver.buffer_address(dst)
        chunks = list(range(0, size, self.chunk))
        ring = len(self.buffers)
        # Keep the ring full: chunk i+ring-1 is in flight while chunk i is copied out.
        for index, off in enumerate(chunks[:ring]):
            self._start_download(index, src + off, min(self.chunk, size - off))
        for index, off in enumerate(chunks):
            slot = index % ring
            n = min(self.chunk, size - off)
            call(cu.cuEventSynchronize, self.events[slot])
            self._parallel_memmove(dst_addr + off, self.buffers[slot], n)
            nxt = index + ring
            if nxt < len(chunks):
                self._start_download(nxt, src + chunks[nxt], min(self.chunk, size - chunks[nxt]))

    def _start_download(self, index: int, src: int, n: int) -> None:
        slot = index % len(self.buffers)
        call(cu.cuMemcpyDtoHAsync, self.buffers[slot], src, n, self.stream)
        call(cu.cuEventRecord, self.events[slot], self.stream)

    def close(self) -> None:
        if self.stream is not None:
            driver.stream_sync(self.stream)
        for ev in self.events:
            call(cu.cuEventDestroy, ev)
        for buf in self.buffers:
            driver.host_free(buf)
        if self.stream is not None:
            driver.stream_destroy(self.stream)
        self.pool.shutdown(wait=True)
        self.buffers, self.events, self.stream = [], [], None

    def __enter__(self) -> "Stager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def host_array(size: int, stager: Optional[Stager] = None) -> np.ndarray:
    """An uninitialised host array; large ones are first touched by several threads at once
    (page faults, not copies, are what make a fresh multi-GB buffer slow to fill)."""
    out = np.empty(size, dtype=np.uint8)
    if stager is not None and size >= THRESHOLD:
        step = 64 << 20
        list(stager.pool.map(lambda off: out[off:off + step].fill(0), range(0, size, step)))
    return out
