"""The snapshot file container: one msgpack manifest plus a list of binary blobs.

The byte layout is specified in ``docs/FORMAT.md``; this module is its only implementation.
It knows nothing about graphs: the manifest is a plain dict and blobs are opaque bytes the
manifest refers to by index.

Reading is defensive: whatever bytes a file holds, the reader raises :class:`FormatError`
(naming the file) and nothing else.
"""
from __future__ import annotations

import contextlib
import enum
import mmap
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator, NamedTuple

import msgpack
import xxhash
import zstandard as zstd

from .. import _fs, _progress
from ..errors import FormatError
from ..limits import Limits, env_count, over_budget, resolve
from .hashing import BLOB_PIECE, BlobHasher, blob_checksum, combine, piece_digest

MAGIC = b"\x89CGSNAP\n"
VERSION = (1, 0)
HEADER_SIZE = 64
ALIGN = 64
MAX_MANIFEST = 64 << 20
MAX_DEPTH = 64
# zstd cannot encode more than a 128 KiB block in 4 bytes (an RLE block), so no frame expands
# more than this; a larger raw_length is a lie, refused before allocating for it.
MAX_ZSTD_RATIO = 32768
DEFAULT_CHUNK = 64 << 20

_HEADER = struct.Struct("<8sHHIIIQIIQ16s")
_CHECKED_HEADER = 48  # header bytes covered by the header checksum: all fields but the checksum
_ENTRY = struct.Struct("<QQQB7x16s")
assert _HEADER.size == HEADER_SIZE and _ENTRY.size == 48


class Compression(enum.IntEnum):
    NONE = 0
    ZSTD = 1


class _Header(NamedTuple):
    magic: bytes
    major: int
    minor: int
    flags: int
    manifest_offset: int
    manifest_length: int
    blob_table_offset: int
    blob_count: int
    reserved: int
    blobs_offset: int
    checksum: bytes


class BlobInfo(NamedTuple):
    """One blob table entry; ``offset`` is absolute in the file (the table stores it relative
    to ``blobs_offset``) so callers can read a blob directly, e.g. with O_DIRECT."""

    index: int
    offset: int
    stored_length: int
    raw_length: int
    compression: Compression
    checksum: bytes


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _checksum(*parts) -> bytes:
    h = xxhash.xxh3_128()
    for part in parts:
        h.update(part)
    return h.digest()


def _byte_view(obj) -> memoryview:
    """A flat unsigned-byte view of any C-contiguous buffer (bytes, bytearray, numpy array, ...)."""
    view = memoryview(obj)
    if not view.c_contiguous:
        raise ValueError("blob data must be a C-contiguous buffer")
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


# --------------------------------------------------------------------------- manifest


class _InvalidManifest(Exception):
    """Carries the key path outwards so the message can say where the bad value is."""

    def __init__(self, message: str):
        self.message, self.where = message, []


def _canonical(obj, depth: int):
    """Checks ``obj`` against the manifest's type rules and returns it with every map sorted."""
    if isinstance(obj, (dict, list)) and depth > MAX_DEPTH:
        raise _InvalidManifest(f"nests deeper than {MAX_DEPTH} levels")
    if isinstance(obj, dict):
        for key in obj:
            if not isinstance(key, str):
                raise _InvalidManifest(f"has a map key that is not a str: {key!r}")
        return {key: _canonical_item(obj[key], depth, key) for key in sorted(obj)}
    if isinstance(obj, list):
        return [_canonical_item(item, depth, i) for i, item in enumerate(obj)]
    if obj is None or isinstance(obj, (str, bytes, bool, int, float)):
        return obj
    raise _InvalidManifest(f"holds a {type(obj).__name__}, which a manifest cannot store")


def _canonical_item(obj, depth: int, key):
    try:
        return _canonical(obj, depth + 1)
    except _InvalidManifest as e:
        e.where.append(key)
        raise


def _canonical_manifest(manifest, path: str | None) -> dict:
    if not isinstance(manifest, dict):
        raise FormatError(f"manifest must be a map, not {type(manifest).__name__}", path=path)
    try:
        return _canonical(manifest, 1)
    except _InvalidManifest as e:
        where = "".join(f"[{key!r}]" for key in reversed(e.where))
        raise FormatError(f"manifest{where} {e.message}", path=path) from None


def _pack_manifest(manifest, path: str | None) -> bytes:
    canonical = _canonical_manifest(manifest, path)
    try:
        packed = msgpack.packb(canonical, use_bin_type=True)
    except (ValueError, OverflowError) as e:  # lone surrogates in a str, ints beyond 64 bits
        raise FormatError(f"manifest cannot be encoded: {e}", path=path) from None
    if len(packed) > MAX_MANIFEST:
        raise FormatError(f"manifest is {len(packed)} bytes, over the {MAX_MANIFEST}-byte cap", path=path)
    return packed


def pack_manifest(manifest: dict) -> bytes:
    """The canonical msgpack bytes of ``manifest``: equal values give equal bytes."""
    return _pack_manifest(manifest, None)


class OverBudget(Exception):
    """:func:`unpackb_bounded` stopped: the data holds more than its item budget."""

    def __init__(self, count: int):
        super().__init__(count)
        self.count = count


def unpackb_bounded(data: bytes, max_items: int):
    """``msgpack.unpackb`` of untrusted bytes, building at most about ``2 * max_items`` items
    (maps, lists, keys, values, elements): raises :class:`OverBudget` past ``max_items``, and the
    msgpack / ValueError family for malformed data. Maps are checked for duplicate keys,
    extension types refused, map keys must be str.

    The hooks see each map and list as soon as it is complete, so building stops once the
    budget is spent; with max_array_len / max_map_len below it, no more than about twice the
    budget is ever built. (Without it, 64 MiB of empty maps become 4.9 GB of dicts.)"""
    limit = len(data)  # no string, array or map can hold more items than there are bytes
    count = 0

    def pairs(items):
        nonlocal count
        count += 2 * len(items) + 1
        if count > max_items:
            raise OverBudget(count)
        mapping = dict(items)
        if len(mapping) != len(items):
            raise ValueError("a map has a duplicate key")
        return mapping

    def elements(items):
        nonlocal count
        count += len(items) + 1
        if count > max_items:
            raise OverBudget(count)
        return items
    try:
        # The C unpacker nests on its own bounded stack (StackError past 1024 levels); the
        # pure-Python fallback recurses, hence RecursionError.
        return msgpack.unpackb(
            data, raw=False, strict_map_key=True, use_list=True, object_pairs_hook=pairs,
            list_hook=elements,
            # max_ext_len=0 also stops the timestamp ext, which bypasses ext_hook; an empty ext
            # still decodes to an ExtType, which _canonical_manifest refuses.
            max_ext_len=0, max_str_len=limit, max_bin_len=limit,
            max_array_len=min(limit, max_items), max_map_len=min(limit, max_items) // 2,
            ext_hook=_refuse_ext)
    except ValueError as e:
        if "exceeds max" in str(e) and max_items < limit:
            raise OverBudget(max_items + 1) from None   # one map or list over the budget
        raise


def _unpack_manifest(data: bytes, path: str, check_types: bool = True,
                     limits: Limits | None = None) -> dict:
    budget = resolve(limits).manifest_objects
    try:
        # MAX_DEPTH is enforced below.
        obj = unpackb_bounded(data, budget)
    except OverBudget as e:
        raise over_budget("manifest_objects", e.count, budget, "the manifest", path) from None
    except (msgpack.UnpackException, ValueError, TypeError, OverflowError, MemoryError,
            RecursionError) as e:
        raise FormatError(f"manifest is not valid msgpack: {str(e) or type(e).__name__}", path=path) from None
    if not isinstance(obj, dict):
        raise FormatError(f"manifest must be a map, not {type(obj).__name__}", path=path)
    if check_types:
        _check_manifest_types(obj, path)
    return obj


def _refuse_ext(code, data):
    raise ValueError(f"an ExtType (extension type {code}) is not allowed in a manifest")


def _check_manifest_types(manifest: dict, path: str) -> None:
    """Depth and key types of a decoded manifest, without rebuilding it (a reader's hot path:
    the writer's canonical walk costs a third of a large file's open time)."""
    stack = [(manifest, 1)]
    while stack:
        obj, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise FormatError(f"manifest nests deeper than {MAX_DEPTH} levels", path=path)
        if type(obj) is dict:
            for key, value in obj.items():
                if type(key) is not str:
                    raise FormatError(f"manifest has a map key that is not a str: {key!r}",
                                      path=path)
                if type(value) in (dict, list):
                    stack.append((value, depth + 1))
        else:
            stack.extend((v, depth + 1) for v in obj if type(v) in (dict, list))


# --------------------------------------------------------------------------- writing


class BlobSource:
    """A blob for :func:`write_file`: either ``data`` known up front, or ``chunks`` (an
    iterable of bytes-like objects, e.g. staged from device memory) producing exactly
    ``raw_length`` bytes. The length must be known before streaming starts because the zstd
    frame header records it. A ``chunks`` iterator can be consumed only once, and each chunk
    is used before the next is asked for (a producer may reuse a chunk's memory then).

    ``level``: the zstd level when compressed (None: the writer's). ``digest``: the blob
    checksum (:func:`~cgsnap.format.hashing.blob_checksum`) the raw bytes must have; a source
    that produces other bytes fails the write (device memory that changed since it was
    scanned), so the file never holds bytes its manifest did not describe."""

    def __init__(self, data=None, *, chunks: Iterable | None = None, raw_length: int | None = None,
                 compress: bool = False, level: int | None = None, digest: bytes | None = None):
        if (data is None) == (chunks is None):
            raise TypeError("BlobSource takes exactly one of data or chunks")
        if data is not None:
            self._data = _byte_view(data)
            if raw_length is not None and raw_length != len(self._data):
                raise ValueError(f"raw_length {raw_length} but data holds {len(self._data)} bytes")
            raw_length = len(self._data)
        elif raw_length is None:
            raise TypeError("BlobSource(chunks=...) needs raw_length")
        self._chunks = chunks
        self.raw_length = raw_length
        self.compress = compress
        self.level = level
        self.digest = digest

    def _views(self) -> Iterator[memoryview]:
        if self._chunks is None:
            yield self._data
        else:
            for chunk in self._chunks:
                yield _byte_view(chunk)


class _HashingSink:
    """Writes stored bytes to the file while hashing and counting them, so a blob is
    checksummed as it streams and never has to be held or re-read."""

    def __init__(self, f):
        self._f, self._hash, self.length = f, BlobHasher(), 0

    def write(self, data) -> int:
        self._f.write(data)
        self._hash.update(data)
        self.length += len(data)
        return len(data)

    def digest(self) -> bytes:
        return self._hash.digest()


def _feed(source: BlobSource, write, index: int, path: str) -> None:
    """Streams ``source`` into ``write``, holding it to its declared raw_length."""
    total = 0
    for view in source._views():
        total += len(view)
        if total > source.raw_length:
            raise FormatError(f"blob {index}: source produced more than its raw_length of "
                              f"{source.raw_length} bytes", path=path)
        write(view)
        _progress.advance(len(view))
    if total != source.raw_length:
        raise FormatError(f"blob {index}: source produced {total} bytes, raw_length is "
                          f"{source.raw_length}", path=path)


def _write_blob(f, index: int, source: BlobSource, blobs_offset: int, compressor, path: str) -> tuple:
    """Writes one blob at the next aligned position; returns its table entry."""
    f.write(bytes(_align(f.tell()) - f.tell()))
    offset = f.tell() - blobs_offset
    sink = _HashingSink(f)
    raw_digest = None
    if source.compress:
        # Not a `with` block: on a failed source, closing would end the frame and raise a
        # size-mismatch error that hides the real one. The temporary file is discarded anyway.
        writer = compressor(source.level).stream_writer(sink, size=source.raw_length,
                                                        closefd=False)
        if source.digest is None:
            _feed(source, writer.write, index, path)
        else:
            raw = BlobHasher()

            def both(view):
                raw.update(view)
                writer.write(view)
            _feed(source, both, index, path)
            raw_digest = raw.digest()
        writer.close()
    elif source.raw_length >= PARALLEL_WRITE:
        n, digest = _write_parallel(f, source, index, path)
        _check_digest(source, digest, index, path)
        return offset, n, n, Compression.NONE, digest
    else:
        _feed(source, sink.write, index, path)
        raw_digest = sink.digest()
    if raw_digest is not None:
        _check_digest(source, raw_digest, index, path)
    compression = Compression.ZSTD if source.compress else Compression.NONE
    return offset, sink.length, source.raw_length, compression, sink.digest()


def _check_digest(source: BlobSource, digest: bytes, index: int, path: str) -> None:
    if source.digest is not None and digest != source.digest:
        raise FormatError(f"blob {index}: its source produced other bytes than it was scanned "
                          "with (device memory changed during the save?); nothing was written",
                          path=path)


PARALLEL_WRITE = 64 << 20   # large uncompressed blobs are written by several threads at once
_PIECE = 16 << 20


def io_threads() -> int:
    """Threads for bulk copies and hashing (file writes here, staging in :mod:`cgsnap.cuda.transfer`)."""
    forced = env_count("CGSNAP_IO_THREADS")
    if forced:
        return forced
    return max(2, min(8, os.cpu_count() or 2))


def hash_threads() -> int:
    """Threads that checksum staged chunks (one 64 MiB piece each, ~6.5 GB/s per thread): up
    to 8 (on the H200's 16-core host 16 threads scanned no faster: the DMA and the hashing
    share the memory system), ``CGSNAP_HASH_THREADS`` overrides (at most 64)."""
    forced = env_count("CGSNAP_HASH_THREADS")
    if forced:
        return min(forced, 64)
    return max(2, min(8, os.cpu_count() or 2))


class _PieceHasher:
    """:func:`blob_checksum` of chunks arriving in order; a chunk that is exactly a whole
    piece, at a piece boundary, is hashed by ``pool`` (the pieces of a multi-GB blob then hash
    in parallel), anything else serially. :meth:`update` returns the futures that still read
    the chunk."""

    def __init__(self, pool):
        self._pool, self._digests, self._tail = pool, [], BlobHasher()

    def update(self, view) -> list:
        if self._tail._filled == 0 and len(view) == BLOB_PIECE:
            job = self._pool.submit(piece_digest, view)
            self._digests.append(job)
            return [job]
        self._tail.update(view)
        self._digests.extend(self._tail._digests)     # pieces the serial hasher completed
        self._tail._digests = []
        return []

    def digest(self) -> bytes:
        out = [d if isinstance(d, bytes) else d.result() for d in self._digests]
        if self._tail._filled:
            out.append(self._tail._piece.digest())
        return combine(out)


def _write_parallel(f, source: BlobSource, index: int, path: str) -> tuple:
    """``os.pwrite`` of the pieces of a large uncompressed blob from several threads (one
    thread copying into the page cache is bound by page allocation at a few GB/s), its pieces
    hashed on the same threads alongside (xxhash drops the GIL). A chunked source's chunks are
    written one after another, each released only when its writes and hashes are done."""
    f.flush()
    _fs.step("write")
    fd, start = f.fileno(), f.tell()

    def put(view, at):
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], at + done)
        _progress.advance(len(view))
    pos = 0
    threads = io_threads()
    with ThreadPoolExecutor(threads) as pool:
        hasher = _PieceHasher(pool)
        for view in source._views():
            if pos + len(view) > source.raw_length:
                raise FormatError(f"blob {index}: source produced more than its raw_length of "
                                  f"{source.raw_length} bytes", path=path)
            # A chunk is written by all the threads at once (the next one is asked for only
            # when this one is written); a whole buffer in pieces of _PIECE.
            if source._chunks is None:
                step = _PIECE
            else:
                per_thread = -(-len(view) // threads)
                step = max(1 << 20, -(-per_thread // (1 << 20)) * (1 << 20))
            jobs = [pool.submit(put, view[o:o + step], start + pos + o)
                    for o in range(0, len(view), step)]
            # Whole 64 MiB pieces hash in parallel; the rest of the data (a ragged tail, or one
            # buffer given whole) is split at piece boundaries first.
            if source._chunks is None:
                for o in range(0, len(view), BLOB_PIECE):
                    jobs += hasher.update(view[o:o + BLOB_PIECE])
            else:
                jobs += hasher.update(view)
            for job in jobs:
                job.result()
            pos += len(view)
        if pos != source.raw_length:
            raise FormatError(f"blob {index}: source produced {pos} bytes, raw_length is "
                              f"{source.raw_length}", path=path)
        digest = hasher.digest()
    f.seek(start + pos)
    return pos, digest


def write_file(path, manifest: dict, blobs: list, *, zstd_level: int = 3) -> None:
    """Writes a snapshot file atomically; ``blobs`` are :class:`BlobSource` or bytes-like
    (stored uncompressed). The same inputs always give the same bytes. The file is written
    with large writes and made durable with one fsync at the end."""
    path = os.fspath(path)
    manifest_bytes = _pack_manifest(manifest, path)
    sources = [b if isinstance(b, BlobSource) else BlobSource(b) for b in blobs]
    if len(sources) > 0xFFFFFFFF:
        raise FormatError(f"{len(sources)} blobs, the format holds at most {0xFFFFFFFF}", path=path)
    table_offset = HEADER_SIZE + len(manifest_bytes)
    blobs_offset = _align(table_offset + _ENTRY.size * len(sources))
    # threads=0: zstd's multi-threaded frames differ from single-threaded ones, and
    # threads=-1 would tie the output to the writing machine's CPU count.
    compressors: dict = {}

    def compressor(level):
        level = zstd_level if level is None else level
        if level not in compressors:
            compressors[level] = zstd.ZstdCompressor(level=level, write_content_size=True,
                                                     write_checksum=False, threads=0)
        return compressors[level]
    with _fs.atomic_write(path) as f, \
            _progress.task(f"saving {os.path.basename(path)}", sum(s.raw_length for s in sources)):
        # Header and table are placeholders until the blobs' stored sizes are known.
        f.write(bytes(HEADER_SIZE))
        f.write(manifest_bytes)
        f.write(bytes(blobs_offset - table_offset))
        entries = [_write_blob(f, i, s, blobs_offset, compressor, path)
                   for i, s in enumerate(sources)]
        table = b"".join(_ENTRY.pack(*entry) for entry in entries)
        header = _Header(magic=MAGIC, major=VERSION[0], minor=VERSION[1], flags=0,
                         manifest_offset=HEADER_SIZE, manifest_length=len(manifest_bytes),
                         blob_table_offset=table_offset, blob_count=len(entries), reserved=0,
                         blobs_offset=blobs_offset, checksum=bytes(16))
        fields = _HEADER.pack(*header)[:_CHECKED_HEADER]
        f.seek(0)
        f.write(fields + _checksum(fields, manifest_bytes, table))
        f.seek(table_offset)
        f.write(table)


# --------------------------------------------------------------------------- reading


def _read_header(buf, path: str) -> _Header:
    """Checks what must hold before the header checksum can even be computed."""
    size = len(buf)
    if size < HEADER_SIZE:
        raise FormatError(f"truncated: {size} bytes, the header alone is {HEADER_SIZE}", path=path)
    header = _Header._make(_HEADER.unpack(buf[:HEADER_SIZE]))
    if header.magic != MAGIC:
        hint = (" (damaged, e.g. by a text-mode transfer)" if header.magic[1:7] == MAGIC[1:7]
                else " (not a cgsnap snapshot)")
        raise FormatError(f"bad magic {header.magic!r}{hint}", path=path)
    if header.major != VERSION[0]:
        raise FormatError(f"file is format {header.major}.x, this cgsnap reads {VERSION[0]}.x", path=path)
    if header.manifest_length > MAX_MANIFEST:
        raise FormatError(f"manifest_length {header.manifest_length} is over the "
                          f"{MAX_MANIFEST}-byte cap", path=path)
    table_end = header.blob_table_offset + _ENTRY.size * header.blob_count
    if header.manifest_offset + header.manifest_length > size or table_end > size:
        raise FormatError(f"truncated or corrupt header: manifest and blob table should end at "
                          f"{max(header.manifest_offset + header.manifest_length, table_end)}, "
                          f"the file has {size} bytes", path=path)
    return header


def _check_layout(header: _Header, size: int, path: str) -> None:
    """The header fields hold the only values a 1.x writer produces."""
    table_end = header.blob_table_offset + _ENTRY.size * header.blob_count
    expected = {
        "flags": 0,
        "manifest_offset": HEADER_SIZE,
        "blob_table_offset": HEADER_SIZE + header.manifest_length,
        "blobs_offset": _align(table_end),
    }
    for field, value in expected.items():
        if getattr(header, field) != value:
            raise FormatError(f"header {field} is {getattr(header, field)}, expected {value}", path=path)
    if header.blobs_offset > size:
        raise FormatError(f"truncated: blobs start at {header.blobs_offset}, the file has {size} "
                          f"bytes", path=path)


def _entry_problem(entry: tuple, expected_offset: int, blobs_offset: int, size: int) -> str | None:
    offset, stored, raw, code, _ = entry
    if code not in set(Compression):
        return f"unknown compression {code}"
    if offset != expected_offset:
        return (f"offset {offset}, expected {expected_offset} (blobs are stored in order at "
                f"{ALIGN}-byte alignment with no gaps)")
    if blobs_offset + offset + stored > size:
        return f"its {stored} bytes at {blobs_offset + offset} run past the end of the file ({size} bytes)"
    if code == Compression.NONE and raw != stored:
        return f"uncompressed but raw_length {raw} != stored_length {stored}"
    if code == Compression.ZSTD and raw > MAX_ZSTD_RATIO * stored:
        return f"raw_length {raw} is more than zstd can encode in {stored} bytes"
    return None


def _parse_table(table: bytes, blobs_offset: int, size: int, path: str) -> list[BlobInfo]:
    """Decodes the table and checks it accounts for the blob section exactly."""
    blobs, expected = [], 0
    for index, entry in enumerate(_ENTRY.iter_unpack(table)):
        problem = _entry_problem(entry, expected, blobs_offset, size)
        if problem:
            raise FormatError(f"blob {index}: {problem}", path=path)
        offset, stored, raw, code, checksum = entry
        blobs.append(BlobInfo(index, blobs_offset + offset, stored, raw, Compression(code), checksum))
        expected = _align(offset + stored)
    end = blobs[-1].offset + blobs[-1].stored_length if blobs else blobs_offset
    if end != size:
        raise FormatError(f"the file has {size} bytes but its last blob ends at {end}", path=path)
    return blobs


def _parse(buf, path: str, check_types: bool = True, limits: Limits | None = None):
    """Validates everything but the blob bytes; returns (version, manifest, blobs)."""
    limits = resolve(limits)
    header = _read_header(buf, path)
    limits.check("blobs", header.blob_count, "the blob table", path)
    manifest_end = header.manifest_offset + header.manifest_length
    table_end = header.blob_table_offset + _ENTRY.size * header.blob_count
    # Views, not copies: the manifest may be 64 MiB and the table tens of MB.
    with memoryview(buf) as view, view[header.manifest_offset:manifest_end] as manifest_bytes, \
            view[header.blob_table_offset:table_end] as table, view[:_CHECKED_HEADER] as fields:
        if _checksum(fields, manifest_bytes, table) != header.checksum:
            raise FormatError("header checksum mismatch (header, manifest or blob table is "
                              "corrupt)", path=path)
        _check_layout(header, len(buf), path)
        if buf[table_end:header.blobs_offset].strip(b"\0"):
            raise FormatError("padding after the blob table is not zero", path=path)
        blobs = _parse_table(table, header.blobs_offset, len(buf), path)
        limits.check("decompressed_bytes", sum(b.raw_length for b in blobs
                                               if b.compression == Compression.ZSTD),
                     "the zstd blobs, decompressed", path)
        manifest = _unpack_manifest(manifest_bytes, path, check_types, limits)
    return (header.major, header.minor), manifest, blobs


def _address_of(mm: mmap.mmap) -> int:
    """The address of a read-only mapping (ctypes refuses read-only buffers; numpy does not)."""
    import numpy as np
    return int(np.frombuffer(mm, dtype=np.uint8).ctypes.data)


def _open_fd(path: str) -> int:
    """One descriptor of the file at ``path``: everything read from the file goes through it."""
    try:
        return _fs.open_regular(path)
    except _fs.UnsafePathError as e:
        raise FormatError(f"cannot read: {e.why}", path=path) from None
    except OSError as e:
        raise FormatError(f"cannot read: {e.strerror or e}", path=path) from e


def _map(fd: int, path: str) -> mmap.mmap:
    try:
        size = os.fstat(fd).st_size
        if size < HEADER_SIZE:  # also keeps mmap from refusing an empty file
            raise FormatError(f"truncated: {size} bytes, the header alone is {HEADER_SIZE}",
                              path=path)
        return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise FormatError(f"cannot read: {e.strerror or e}", path=path) from e


# Kernel images are decompressed by several threads only when each gets this many bytes (see
# SnapshotFile.images).
IMAGES_PER_THREAD = 2 << 20

# Decoded zstd data is checked (verify) through a buffer of this size: bounded memory however
# large a blob claims to be.
VERIFY_CHUNK = 16 << 20


class SnapshotFile:
    """An open, validated snapshot file backed by a read-only mmap of one descriptor.

    Blob data is read lazily from the mapping. Views returned by :meth:`blob` and
    :meth:`iter_chunks` stay valid after :meth:`close`; the mapping goes away with the last one.
    The file must not be truncated while it is mapped (the OS would fault on access).

    ``fd``: an open descriptor to read instead of opening ``path`` (the file takes it over).
    ``limits``: the reading budgets (:class:`cgsnap.Limits`). ``signature``: what
    :func:`open_file` verified (a :class:`cgsnap.format.signing.SignatureInfo`), else None;
    ``private_copy``: the file is read from a sealed private copy (see :func:`open_file`).
    """

    signature = None
    private_copy = False

    def __init__(self, path, check_types: bool = True, *, limits: Limits | None = None,
                 fd: int | None = None):
        self.path = os.fspath(path)
        self.limits = resolve(limits)
        self._meter = self.limits.meter(self.path)
        self._mm = None
        self._fd = _open_fd(self.path) if fd is None else fd
        try:
            self._mm = _map(self._fd, self.path)
            self.version, self.manifest, self.blobs = _parse(self._mm, self.path, check_types,
                                                             self.limits)
        except BaseException:
            if self._mm is not None:
                self._mm.close()
            os.close(self._fd)
            raise

    def mapping_address(self) -> tuple:
        """``(address, length)`` of the read-only mapping, for page-locking and DMA."""
        if self._mm is None:
            raise ValueError("I/O operation on a closed snapshot file")
        return _address_of(self._mm), len(self._mm)

    def fileno(self) -> int:
        """The descriptor of the mapped file, for reading blobs with ``pread`` (see
        :class:`BlobInfo`: offsets are absolute)."""
        if self._fd is None:
            raise ValueError("I/O operation on a closed snapshot file")
        return self._fd

    def __enter__(self) -> SnapshotFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._mm is not None:
            with contextlib.suppress(BufferError):  # views still exported: they own it now
                self._mm.close()
            self._mm = None

    # --- blob access

    def blob(self, i: int, *, verify: bool = True) -> memoryview | bytes:
        """The blob's raw bytes: a zero-copy read-only view into the mapping if uncompressed,
        a new ``bytes`` if zstd."""
        info, stored = self._locate(i)
        if verify:
            self._check_stored(info, stored)
        if info.compression == Compression.NONE:
            return stored
        return self._decompress(info, stored)

    def image(self, i: int) -> bytes:
        """A kernel image's bytes (verified), to be held in memory: refused before anything is
        decompressed when it is over the ``image_bytes`` budget, or when the images read from
        this file so far would pass ``image_total``."""
        self._charge_image(i)
        return bytes(self.blob(i, verify=True))

    def _charge_image(self, i: int) -> None:
        info, _ = self._locate(i)
        self.limits.check("image_bytes", info.raw_length, f"blob {i} (a kernel image)", self.path)
        self._meter.charge("image_total", info.raw_length, f"blob {i} (kernel images)")

    def images(self, indices) -> list:
        """:meth:`image` of each blob of ``indices``, in order (a blob named twice is read once,
        the same ``bytes`` returned for both); the first failure, in ``indices`` order, raises.

        Call it after the manifest is validated, not alongside: each image costs its thread a
        few GIL hand-offs (checksum, zstd, the executor's locks) and each hand-off stalls the
        thread running Python -- 50 images decompressed during validation made it ~1.3-1.9x
        slower, more than decompressing them costs (``scripts/probes/tables_probe.py``).
        Several threads only when each gets ``IMAGES_PER_THREAD`` decompressed bytes: zstd
        decodes ~1 GB/s a thread, and an MB or two serially costs what starting and feeding
        threads does."""
        order = list(dict.fromkeys(indices))
        total = sum(self.blobs[i].raw_length for i in order
                    if type(i) is int and 0 <= i < len(self.blobs))
        threads = min(8, os.cpu_count() or 1, len(order), total // IMAGES_PER_THREAD)
        if threads <= 1:
            done = {i: self.image(i) for i in order}
        else:
            # The budgets are charged here, in order, before any thread starts: which image a
            # budget refuses does not depend on thread timing.
            for i in order:
                self._charge_image(i)
            with ThreadPoolExecutor(threads, thread_name_prefix="cgsnap-images") as pool:
                try:
                    jobs = [pool.submit(lambda i: bytes(self.blob(i, verify=True)), i)
                            for i in order]
                    done = {i: job.result() for i, job in zip(order, jobs)}
                finally:
                    pool.shutdown(wait=True, cancel_futures=True)
        return [done[i] for i in indices]

    def read_into(self, i: int, dest, *, verify: bool = True) -> None:
        """Fills ``dest`` (a writable buffer of exactly raw_length bytes, e.g. pinned host
        memory) with the blob: one copy from the mapping, or zstd decoding straight into it."""
        info, stored = self._locate(i)
        dest = _byte_view(dest)
        if len(dest) != info.raw_length:
            raise FormatError(f"blob {i} holds {info.raw_length} bytes, the destination "
                              f"{len(dest)}", path=self.path)
        if info.compression == Compression.NONE:
            pos = 0
            for chunk in self._stored_chunks(info, stored, DEFAULT_CHUNK, verify):
                dest[pos:pos + len(chunk)] = chunk
                pos += len(chunk)
            return
        if verify:
            self._check_stored(info, stored)
        reader = self._zstd_reader(info, stored)
        self._fill(info, reader, dest)
        self._expect_end(info, reader)

    def iter_chunks(self, i: int, chunk_size: int = DEFAULT_CHUNK, verify: bool = True) -> Iterator[memoryview]:
        """The blob's raw bytes as memoryviews of at most ``chunk_size`` bytes.

        Uncompressed blobs are verified as the chunks go by: a mismatch raises after the last
        chunk, so consume the iterator fully. zstd blobs are verified before decoding starts."""
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        info, stored = self._locate(i)
        if info.compression == Compression.NONE:
            yield from self._stored_chunks(info, stored, chunk_size, verify)
            return
        if verify:
            self._check_stored(info, stored)
        reader = self._zstd_reader(info, stored)
        for start in range(0, info.raw_length, chunk_size):
            chunk = memoryview(bytearray(min(chunk_size, info.raw_length - start)))
            self._fill(info, reader, chunk)
            yield chunk
        self._expect_end(info, reader)

    def verify(self, content: dict | None = None) -> None:
        """Checks every blob's checksum and that the padding between blobs is zero, and decodes
        every zstd blob -- through one buffer of ``VERIFY_CHUNK`` bytes, whatever it claims --
        checking that it is valid zstd of exactly raw_length bytes.

        ``content``: ``{blob index: hex}`` -- the blob's decoded bytes must have that content
        hash (:func:`cgsnap.format.hashing.content_hash` or ``region_hash``: files of either
        era)."""
        content = content or {}
        previous_end = self.blobs[0].offset if self.blobs else 0  # the first padding is checked on open
        buffer = None
        for i in range(len(self.blobs)):
            info, stored = self._locate(i)
            if self._mm[previous_end:info.offset].strip(b"\0"):
                raise FormatError(f"padding before blob {i} is not zero", path=self.path)
            self._check_stored(info, stored)
            previous_end = info.offset + info.stored_length
            expected = content.get(i)
            if info.compression == Compression.NONE:
                if expected is not None and expected != info.checksum.hex():   # region_hash
                    self._check_content(info, expected, [stored])
                continue
            if buffer is None:
                buffer = memoryview(bytearray(min(VERIFY_CHUNK, max(
                    (b.raw_length for b in self.blobs if b.compression == Compression.ZSTD),
                    default=0))))
            self._check_content(info, expected, self._decoded(info, stored, buffer))

    # --- helpers

    def _decoded(self, info: BlobInfo, stored: memoryview, buffer: memoryview) -> Iterator:
        """The blob's decoded bytes, one buffer-full at a time (the same buffer each time)."""
        reader = self._zstd_reader(info, stored)
        left = info.raw_length
        while left:
            chunk = buffer[:min(left, len(buffer))]
            self._fill(info, reader, chunk)
            left -= len(chunk)
            yield chunk
        self._expect_end(info, reader)

    def _check_content(self, info: BlobInfo, expected: str | None, chunks) -> None:
        whole, pieces = xxhash.xxh3_128(), BlobHasher()
        for chunk in chunks:
            if expected is not None:
                whole.update(chunk)
                pieces.update(chunk)
        if expected is not None and expected not in (whole.hexdigest(), pieces.digest().hex()):
            raise FormatError(f"blob {info.index}: its contents do not have the content hash "
                              f"{expected} the manifest records", path=self.path)

    def _locate(self, i: int) -> tuple[BlobInfo, memoryview]:
        if self._mm is None:
            raise ValueError(f"{self.path}: snapshot file is closed")
        if not 0 <= i < len(self.blobs):
            raise FormatError(f"blob {i} does not exist (the file has {len(self.blobs)})", path=self.path)
        info = self.blobs[i]
        return info, memoryview(self._mm)[info.offset:info.offset + info.stored_length]

    def _check_stored(self, info: BlobInfo, stored: memoryview) -> None:
        if blob_checksum(stored) != info.checksum:
            raise self._checksum_error(info)

    def _checksum_error(self, info: BlobInfo) -> FormatError:
        return FormatError(f"blob {info.index}: checksum mismatch (its stored bytes are corrupt)",
                           path=self.path)

    def _stored_chunks(self, info: BlobInfo, stored: memoryview, chunk_size: int,
                       verify: bool) -> Iterator[memoryview]:
        # Each chunk is hashed right after the consumer used it, while its pages are resident:
        # a file larger than RAM is then read from disk once, not once to verify and once to use.
        h = BlobHasher()
        for start in range(0, len(stored), chunk_size):
            chunk = stored[start:start + chunk_size]
            yield chunk
            if verify:
                h.update(chunk)
        if verify and h.digest() != info.checksum:
            raise self._checksum_error(info)

    def _zstd_failure(self, info: BlobInfo, message) -> FormatError:
        return FormatError(f"blob {info.index}: bad zstd data: {message}", path=self.path)

    def _check_frame(self, info: BlobInfo, stored: memoryview) -> None:
        """The frame header must agree with raw_length before any output is allocated."""
        content_size = self._zstd_call(info, zstd.frame_content_size, stored)
        if content_size != info.raw_length:
            recorded = "no content size" if content_size < 0 else f"{content_size} bytes"
            raise self._zstd_failure(info, f"frame records {recorded}, raw_length is {info.raw_length}")

    def _zstd_reader(self, info: BlobInfo, stored: memoryview):
        self._check_frame(info, stored)
        # Reading across frames makes a second frame show up as excess output, not go unseen.
        return zstd.ZstdDecompressor().stream_reader(stored, read_across_frames=True)

    def _zstd_call(self, info: BlobInfo, method, arg):
        try:
            return method(arg)
        except zstd.ZstdError as e:
            raise self._zstd_failure(info, e) from None

    def _fill(self, info: BlobInfo, reader, dest: memoryview) -> None:
        filled = 0
        while filled < len(dest):
            n = self._zstd_call(info, reader.readinto, dest[filled:])
            if n == 0:
                raise self._zstd_failure(info, "data ends early")
            filled += n

    def _expect_end(self, info: BlobInfo, reader) -> None:
        if self._zstd_call(info, reader.read, 1):
            raise self._zstd_failure(info, f"decodes to more than raw_length {info.raw_length}")

    def _decompress(self, info: BlobInfo, stored: memoryview) -> bytes:
        self._check_frame(info, stored)
        try:
            return zstd.ZstdDecompressor().decompress(stored, allow_extra_data=False)
        except zstd.ZstdError as e:
            raise self._zstd_failure(info, e) from None
        except MemoryError:
            raise FormatError(f"blob {info.index}: cannot allocate {info.raw_length} bytes to "
                              f"decompress it", path=self.path) from None


def open_file(path, *, verify_blobs: bool = False, check_types: bool = True,
              limits: Limits | None = None, signature_key=None) -> SnapshotFile:
    """Opens and fully validates a snapshot file's header, manifest and blob table; blob
    bytes are read only if ``verify_blobs``. ``check_types=False`` skips the generic walk over
    the manifest's key types and depth, for callers that validate it against a schema anyway
    (:meth:`cgsnap.format.model.Snapshot.from_manifest` does: it is stricter, and the walk costs a
    third of opening a large file). ``limits``: the reading budgets (:class:`cgsnap.Limits`).

    ``signature_key``: the file's signature (``path.sig``) must match this key
    (:mod:`cgsnap.format.signing`) before anything else is read. The file is opened once and the
    signature checked over that descriptor's bytes, which are then the bytes parsed and
    returned: replacing ``path`` after the check changes nothing. A file that anyone but this
    user or root could change in place (owned by another user, or group/world-writable) is
    first copied into sealed private memory, and the copy is what is verified and read
    (``private_copy`` is then True): an in-place edit after the check cannot reach the reader.
    """
    path = os.fspath(path)
    fd = _open_fd(path)
    signature, copied = None, False
    try:
        if signature_key is not None:
            from . import signing
            if not _fs.stable(os.fstat(fd)):
                try:
                    copy = _fs.private_copy(fd)
                except OSError as e:
                    raise FormatError(f"others can change this file, and it cannot be copied "
                                      f"into private memory to be verified: {e.strerror or e}",
                                      path=path) from e
                os.close(fd)
                fd, copied = copy, True
            signature = signing.verify_fd(fd, path, signature_key)
    except BaseException:
        os.close(fd)
        raise
    snapshot = SnapshotFile(path, check_types, limits=limits, fd=fd)
    snapshot.signature, snapshot.private_copy = signature, copied
    if verify_blobs:
        try:
            snapshot.verify()
        except BaseException:
            snapshot.close()
            raise
    return snapshot


def read_manifest(path, *, limits: Limits | None = None) -> dict:
    """The manifest alone; maps the file but reads only header, manifest and blob table."""
    with SnapshotFile(path, limits=limits) as snapshot:
        return snapshot.manifest
