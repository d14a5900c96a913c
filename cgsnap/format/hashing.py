"""Content hashes: XXH3-128, hex encoded.

One hash for everything (region contents, kernel images, blob checksums) so that a reader needs
one implementation. XXH3 rather than a cryptographic hash because it runs at memory speed
(tens of GB/s) and a restore of many GB must not wait on hashing; integrity against tampering is
the job of signatures, not of these checksums.
"""
from __future__ import annotations

import re

import xxhash


def content_hash(data) -> str:
    """Hash of a bytes-like object (bytes, memoryview, contiguous numpy array)."""
    return xxhash.xxh3_128_hexdigest(data)


_HEX = re.compile(r"[0-9a-f]{32}")


def is_hash(value) -> bool:
    return isinstance(value, str) and _HEX.fullmatch(value) is not None


# ---- blob checksums ---------------------------------------------------------------------------
# A blob's checksum is the XXH3-128 of the concatenated XXH3-128 digests of its consecutive
# 64 MiB pieces (the last one shorter; an empty blob has no piece). One XXH3 stream runs at
# ~25 GB/s, under a PCIe 5 link's ~55; pieces let several threads verify one multi-GB blob at
# once while it is copied to the GPU. Digests are XXH3-128's canonical 16 bytes.

BLOB_PIECE = 64 << 20


def piece_digest(view) -> bytes:
    return xxhash.xxh3_128(view).digest()


def combine(digests) -> bytes:
    return xxhash.xxh3_128(b"".join(digests)).digest()


def blob_checksum(view, pool=None) -> bytes:
    """The checksum of a whole blob held in memory; pieces hashed by ``pool`` when given."""
    view = memoryview(view).cast("B")
    offsets = range(0, len(view), BLOB_PIECE)
    pieces = [view[o:o + BLOB_PIECE] for o in offsets]
    digests = list(pool.map(piece_digest, pieces)) if pool is not None else \
        [piece_digest(p) for p in pieces]
    return combine(digests)


class BlobHasher:
    """:func:`blob_checksum` of data that arrives in chunks of any size, in order."""

    __slots__ = ("_digests", "_piece", "_filled")

    def __init__(self):
        self._digests: list = []
        self._piece = xxhash.xxh3_128()
        self._filled = 0

    def update(self, data) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            take = min(BLOB_PIECE - self._filled, len(view))
            self._piece.update(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == BLOB_PIECE:
                self._digests.append(self._piece.digest())
                self._piece, self._filled = xxhash.xxh3_128(), 0

    def digest(self) -> bytes:
        tail = [self._piece.digest()] if self._filled else []
        return combine(self._digests + tail)


def extents_hash(extents) -> str:
    """``content_hash`` of a region saved as extents: XXH3-128 (hex) of, for each extent in
    order, its offset and length (u64 little-endian each) followed by the 16-byte blob checksum
    of its bytes. ``extents`` yields ``(offset, length, checksum)``. It names the contents
    without hashing the zeros between extents (an expandable segment can be many GB)."""
    h = xxhash.xxh3_128()
    for offset, length, checksum in extents:
        h.update(offset.to_bytes(8, "little") + length.to_bytes(8, "little") + checksum)
    return h.hexdigest()


def region_hash(data, pool=None) -> str:
    """A region's ``content_hash``: the blob checksum of its contents, hex (parallel pieces:
    regions can be many GB)."""
    return blob_checksum(data, pool).hex()
