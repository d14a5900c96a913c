"""Saved contents kept in device memory until the file is written: the device reader of
:mod:`cgsnap.format.contents`.

``snapshot()`` reads nothing into pageable host memory. Each saved range becomes a
:class:`DeviceContents` over either a device-side copy made at snapshot time (``hold="copy"``:
the snapshot keeps the state it saw, even if the program goes on) or the live memory
(``hold="live"``: for a save that follows at once, as in :func:`cgsnap.torch.save`). The
snapshot scans them through the pinned staging ring (checksum, zero test, compression sample:
every byte crosses the link once, hashed on pool threads while the next chunks are copied);
the save streams them again device -> pinned ring -> file, and the writer checks each blob
against its scan (live memory that changed in between fails the save). ``hold="host"`` reads
into host memory, the way it was before (and the fallback when device memory is short).
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Optional

import numpy as np

from ..cuda import driver, transfer
from ..errors import CgsnapError
from ..format.contents import Contents, is_zero, pieces_ratio, sample_spans
from ..format.hashing import combine, piece_digest
from ..limits import env_count

HOLD_CHOICES = ("copy", "live", "host")
READ_RING = 8              # staging chunks of a scan: hashes of several chunks run at once
WRITE_RING = 4             # ... of a save: the file is the slow end
# A snapshot copies its saved contents on the device only while that takes at most this share
# of the free device memory; beyond it (or if the allocation fails) they go to host memory.
COPY_SHARE = 0.25


class DeviceHold:
    """One device allocation holding the copies of a snapshot's saved contents; freed when
    the last :class:`DeviceContents` in it is collected."""

    def __init__(self, nbytes: int):
        self.ctx = driver.current_context()
        self.nbytes = nbytes
        self.ptr = driver.mem_alloc(nbytes)
        fin = weakref.finalize(self, _free_quietly, self.ptr, self.ctx)
        fin.atexit = False     # the process's end frees device memory anyway


def _free_quietly(ptr: int, ctx) -> None:
    try:
        driver.free_in_context(ptr, ctx)
    except CgsnapError:
        pass


class DeviceContents(Contents):
    """``nbytes`` of device memory at ``addr`` (``keep``: the hold that owns it, if any)."""

    __slots__ = ("addr", "keep")

    def __init__(self, addr: int, nbytes: int, reader: "DeviceReader", keep=None):
        super().__init__(nbytes, reader)
        self.addr, self.keep = addr, keep

    def slice(self, offset: int, n: int) -> "DeviceContents":
        return DeviceContents(self.addr + offset, n, self.reader, self.keep)


class DeviceReader:
    """Scans and streams the :class:`DeviceContents` of one context, all through one pipeline."""

    def __init__(self, ctx):
        self.ctx = ctx

    def _current(self):
        return driver.in_context(self.ctx) if self.ctx is not None else contextlib.nullcontext()

    def read(self, c: DeviceContents) -> np.ndarray:
        out = np.empty(c.nbytes, dtype=np.uint8)
        if c.nbytes:
            with self._current():
                driver.dtoh(int(out.ctypes.data), c.addr, c.nbytes)
        return out

    def equal(self, a: DeviceContents, b: DeviceContents) -> bool:
        if a.nbytes != b.nbytes:
            return False
        if a.addr == b.addr:
            return True
        step = transfer.CHUNK
        for off in range(0, a.nbytes, step):
            n = min(step, a.nbytes - off)
            if not np.array_equal(self.read(a.slice(off, n)), self.read(b.slice(off, n))):
                return False
        return True

    def scan(self, items) -> None:
        items = [c for c in items if c.digest is None or c.zero is None or c.ratio is None]
        if not items:
            return
        with self._current():
            if sum(c.nbytes for c in items) < transfer.THRESHOLD:
                for c in items:           # a few small ranges: plain copies
                    _scan_host(c, self.read(c))
                return
            with transfer.Stager(ring=_slots(items, scan_ring())) as st:
                _scan_staged(st, items)

    @contextlib.contextmanager
    def stream(self, items):
        items = list(items)
        with self._current():
            if sum(c.nbytes for c in items) < transfer.THRESHOLD:
                yield ((c, iter((self.read(c),))) for c in items)
                return
            with transfer.Stager(ring=_slots(items, WRITE_RING)) as st:
                ring = iter(st.read_chunks([(c.addr, c.nbytes) for c in items]))
                try:
                    yield _stream_items(ring, items)
                finally:
                    ring.close()      # the ring waits for its copies before the stager goes


def scan_ring() -> int:
    """Staging slots of a scan (``CGSNAP_SCAN_RING`` overrides :data:`READ_RING`, 1-32)."""
    forced = env_count("CGSNAP_SCAN_RING")
    return min(forced, 32) if forced else READ_RING


def _slots(items, most: int) -> int:
    """Staging slots worth allocating: no more than the chunks the items fill."""
    return max(1, min(most, len(transfer.plan_chunks([c.nbytes for c in items], transfer.CHUNK))))


def _scan_host(c: Contents, data) -> None:
    view = memoryview(data).cast("B")
    c.digest = combine([piece_digest(view[o:o + transfer.CHUNK])
                        for o in range(0, len(view), transfer.CHUNK)])
    c.zero = is_zero(view) if len(view) else True
    c.ratio = 0.0 if c.zero else pieces_ratio([view[o:o + n] for o, n in sample_spans(len(view))])


def _piece_scan(view) -> tuple:
    return piece_digest(view), is_zero(view)


def _scan_staged(st, items: list) -> None:
    """Every item's bytes through the ring once: piece checksums and zero tests on the hash
    threads (a slot is reused only when its jobs are done), compression samples copied out."""
    plans = [sample_spans(c.nbytes) for c in items]
    samples = [[bytearray(n) for _, n in p] for p in plans]
    jobs: list = [[] for _ in items]
    for chunk in st.read_chunks([(c.addr, c.nbytes) for c in items]):
        held = []
        for i, off, view in chunk.pieces:
            job = st.hashers.submit(_piece_scan, view)
            jobs[i].append(job)
            held.append(job)
            end = off + len(view)
            for (s_off, s_len), buf in zip(plans[i], samples[i]):
                lo, hi = max(s_off, off), min(s_off + s_len, end)
                if lo < hi:
                    buf[lo - s_off:hi - s_off] = view[lo - off:hi - off]
        chunk.hold(held)
    for c, item_jobs, item_samples in zip(items, jobs, samples):
        results = [j.result() for j in item_jobs]
        c.digest = combine([d for d, _ in results])
        c.zero = all(z for _, z in results)
        c.ratio = 0.0 if c.zero else pieces_ratio(item_samples)


def _stream_staged(st, items: list):
    """``(item, iterator of its views)`` in order, the views straight from the ring."""
    return _stream_items(iter(st.read_chunks([(c.addr, c.nbytes) for c in items])), items)


def _stream_items(pieces, items: list):
    """``(item, iterator of its views)`` of ``items`` in order, from the chunks ``pieces``."""
    state = {"chunk": None, "at": 0}

    def next_view():
        while True:
            chunk = state["chunk"]
            if chunk is not None and state["at"] < len(chunk.pieces):
                piece = chunk.pieces[state["at"]]
                state["at"] += 1
                return piece
            state["chunk"], state["at"] = next(pieces), 0

    counts = [0] * len(items)
    chunk_size = transfer.CHUNK
    for i, c in enumerate(items):
        counts[i] = -(-c.nbytes // chunk_size) if c.nbytes > chunk_size else (1 if c.nbytes else 0)

    def views(i):
        for _ in range(counts[i]):
            item, _, view = next_view()
            if item != i:
                raise RuntimeError("staged stream out of order")
            yield view
    for i, c in enumerate(items):
        yield c, views(i)


_readers: dict = {}


def reader_for(ctx) -> DeviceReader:
    """The reader of ``ctx``'s contents (one per context, so that the contents of several
    snapshots are scanned and streamed together)."""
    key = int(ctx) if ctx is not None else 0
    reader = _readers.get(key)
    if reader is None:
        reader = _readers[key] = DeviceReader(ctx)
    return reader


def hold_contents(spans: list, hold: str, stager_for_host=None) -> list:
    """Contents of device ranges ``spans`` (``[(address, nbytes)]``) as ``hold`` says, with
    ``hold="copy"`` falling back to host memory for small totals (a device copy would save
    nothing) and where the copy does not fit (:data:`COPY_SHARE` of free memory). Returns
    ``(contents, how)``: a list parallel to ``spans`` (numpy arrays for host-held ranges,
    :class:`DeviceContents` otherwise) and the hold used."""
    if hold not in HOLD_CHOICES:
        raise ValueError(f"hold={hold!r}: expected one of {', '.join(HOLD_CHOICES)}")
    total = sum(_round(n) for _, n in spans)
    ctx = driver.current_context()
    reader = reader_for(ctx)
    if hold == "live":
        return [DeviceContents(a, n, reader) for a, n in spans], "live"
    if hold == "copy" and total >= transfer.THRESHOLD:
        keep = _try_hold(total)
        if keep is not None:
            stream = driver.stream_create()
            try:
                out, at = [], 0
                for addr, n in spans:
                    if n:
                        driver.dtod(keep.ptr + at, addr, n, stream)
                    out.append(DeviceContents(keep.ptr + at, n, reader, keep))
                    at += _round(n)
                driver.stream_sync(stream)
            finally:
                driver.stream_destroy(stream)
            return out, "copy"
    return [_read_host(a, n, stager_for_host) for a, n in spans], "host"


def _round(n: int) -> int:
    return -(-n // 256) * 256


def _try_hold(total: int) -> Optional[DeviceHold]:
    free, _ = driver.mem_get_info()
    if total > COPY_SHARE * free:
        return None
    try:
        return DeviceHold(total)
    except CgsnapError:      # out of memory after all: host memory instead
        return None


def _read_host(addr: int, n: int, stager) -> np.ndarray:
    out = transfer.host_array(n, stager)
    if n:
        if stager is not None and n >= transfer.THRESHOLD:
            stager.download(out, addr, n)
        else:
            driver.dtoh(int(out.ctypes.data), addr, n)
    return out
