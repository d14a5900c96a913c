"""Region contents on their way into a file: where the bytes are kept until they are written,
what they hash to, whether they are all zero, and whether they are worth compressing.

A saved region's (or extent's) ``data`` is either bytes-like (host memory) or a
:class:`Contents`. A Contents belongs to a *reader*; the capture layer's device reader
(:mod:`cgsnap.capture.contents`) keeps bytes in device memory until the file is written, so a
save streams them device -> pinned staging -> file and never holds them in pageable memory.
All the contents of one reader are scanned together (:meth:`scan`: checksum, zero test,
compression sample) and streamed together, in file order (:meth:`stream`).

The reader protocol (duck-typed; this layer never imports the one that implements it)::

    reader.scan(items)        # set digest, zero and ratio of every item that lacks them
    reader.stream(items)      # context manager -> iterator of (item, iterator of views), in order;
                              # a view stays valid until the next view is asked for
    reader.equal(a, b)        # byte equality of two items of equal length
    reader.read(item)         # the bytes, as a host numpy array
"""
from __future__ import annotations

import contextlib
from typing import Any, Optional

import numpy as np
import zstandard as zstd

from .hashing import blob_checksum

# Compression sample: this many pieces of this size, spread evenly over the blob.
SAMPLE_PIECE = 64 << 10
SAMPLE_PIECES = 4
# compress="auto" compresses a region blob when its sample shrinks below this ratio. fp16 /
# bf16 / fp32 values shrink to ~0.92 (the exponent bits) and stay as they are; zeros,
# repeated values and small integers go far below it.
AUTO_RATIO = 0.8
# zstd level of region contents (kernel images use the writer's default, 3): level 1 runs ~1.5x
# faster on numeric data and compresses it within a percent of level 3 (measured on int32,
# int64 and fp32 buffers).
REGION_LEVEL = 1
COMPRESS_CHOICES = (True, False, "auto")

_sampler = zstd.ZstdCompressor(level=REGION_LEVEL, write_content_size=False,
                               write_checksum=False, threads=0)


def sample_spans(n: int) -> list:
    """``[(offset, length)]`` of the compression sample of an ``n``-byte blob: the whole blob
    when it is small, else :data:`SAMPLE_PIECES` pieces spread evenly from start to end."""
    if n <= SAMPLE_PIECE * SAMPLE_PIECES:
        return [(0, n)] if n else []
    step = (n - SAMPLE_PIECE) // (SAMPLE_PIECES - 1)
    return [((i * step) // 64 * 64, SAMPLE_PIECE) for i in range(SAMPLE_PIECES)]


def pieces_ratio(pieces) -> float:
    """Compressed / raw size of the sample pieces (each compressed on its own)."""
    raw = packed = 0
    for p in pieces:
        raw += len(p)
        packed += len(_sampler.compress(p))
    return packed / raw if raw else 1.0


def sample_ratio(view) -> float:
    view = memoryview(view).cast("B")
    return pieces_ratio([view[o:o + n] for o, n in sample_spans(len(view))])


def is_zero(view) -> bool:
    """Whether every byte is zero (the first page decides most non-zero data at once)."""
    a = np.frombuffer(view, dtype=np.uint8)
    if a[:4096].any():
        return False
    if len(a) % 8 == 0:
        a = a.view(np.uint64)
    return not a.any()


def worth_compressing(compress, ratio: Optional[float]) -> bool:
    """The ``compress`` setting of a save (True, False or "auto") applied to one region blob."""
    if compress == "auto":
        return ratio is not None and ratio < AUTO_RATIO
    return bool(compress)


def check_compress(compress) -> None:
    if not any(compress is c or (isinstance(c, str) and compress == c)
               for c in COMPRESS_CHOICES):
        raise ValueError(f"compress={compress!r}: expected True, False or 'auto'")


class Contents:
    """Bytes kept somewhere until they are written. ``digest`` is their blob checksum
    (:func:`cgsnap.format.hashing.blob_checksum`), ``zero`` whether they are all zero, ``ratio``
    their sampled zstd ratio; each is None until the reader scanned them."""

    __slots__ = ("nbytes", "reader", "digest", "zero", "ratio")

    def __init__(self, nbytes: int, reader: Any):
        self.nbytes = nbytes
        self.reader = reader
        self.digest: Optional[bytes] = None
        self.zero: Optional[bool] = None
        self.ratio: Optional[float] = None

    def slice(self, offset: int, n: int) -> "Contents":
        raise NotImplementedError

    def __len__(self) -> int:
        return self.nbytes

    def __array__(self, dtype=None, copy=None):
        out = self.reader.read(self)
        return out if dtype is None else out.astype(dtype)


class HostContents(Contents):
    """Bytes in host memory (any C-contiguous buffer)."""

    __slots__ = ("view",)

    def __init__(self, data):
        view = memoryview(data)
        if not view.c_contiguous:
            raise ValueError("region contents must be a C-contiguous buffer")
        self.view = view if view.format == "B" and view.ndim == 1 else view.cast("B")
        super().__init__(len(self.view), HOST)

    def slice(self, offset: int, n: int) -> "HostContents":
        return HostContents(self.view[offset:offset + n])


class _HostReader:
    """The reader of host-held contents."""

    def scan(self, items) -> None:
        for c in items:
            if c.digest is None:
                c.digest = checksum(c.view)
            if c.zero is None:
                c.zero = is_zero(c.view)
            if c.ratio is None:
                c.ratio = sample_ratio(c.view)

    @contextlib.contextmanager
    def stream(self, items):
        yield ((c, iter((c.view,))) for c in items)

    def equal(self, a, b) -> bool:
        return a.nbytes == b.nbytes and np.array_equal(np.frombuffer(a.view, np.uint8),
                                                       np.frombuffer(b.view, np.uint8))

    def read(self, c) -> np.ndarray:
        return np.frombuffer(c.view, dtype=np.uint8)


HOST = _HostReader()
_PARALLEL_HASH = 256 << 20


def checksum(view) -> bytes:
    """blob_checksum, its 64 MiB pieces on threads for large buffers (xxhash drops the GIL)."""
    if len(view) < _PARALLEL_HASH:
        return blob_checksum(view)
    from concurrent.futures import ThreadPoolExecutor

    from .fileformat import io_threads
    with ThreadPoolExecutor(io_threads()) as pool:
        return blob_checksum(view, pool)


def as_contents(data) -> Contents:
    """``data`` as a Contents (bytes-like data is wrapped, not copied)."""
    return data if isinstance(data, Contents) else HostContents(data)


def scan_all(items) -> None:
    """Scan every item that lacks a digest, one batch per reader (a device reader reads all of
    its items through one pipeline)."""
    groups: dict = {}
    for c in items:
        if c.digest is None or c.zero is None or c.ratio is None:
            groups.setdefault(id(c.reader), (c.reader, []))[1].append(c)
    for reader, group in groups.values():
        reader.scan(group)


def same_bytes(a: Contents, b: Contents) -> bool:
    """Byte equality (a hash match is only a candidate: XXH3 is no defence against crafted
    collisions, and deduplication must never merge different contents)."""
    if a.nbytes != b.nbytes:
        return False
    if a.reader is b.reader:
        return a.reader.equal(a, b)
    return np.array_equal(np.asarray(a), np.asarray(b))
