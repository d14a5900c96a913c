"""Content hashes: XXH3-128, hex encoded.

One hash for everything (region contents, kernel images, blob checksums) so that a reader needs
one implementation. XXH3 rather than a cryptographic hash because it runs at memory speed
(tens of GB/s) and a restore of many GB must not wait on hashing; integrity against tampering is
the job of signatures, not of these checksums.
"""
from __future__ import annotations

import xxhash

HASH_HEX_LEN = 32


def content_hash(data) -> str:
    """Hash of a bytes-like object (bytes, memoryview, contiguous numpy array)."""
    return xxhash.xxh3_128_hexdigest(data)


class Hasher:
    """Incremental form of :func:`content_hash` for data produced in chunks."""

    __slots__ = ("_h",)

    def __init__(self):
        self._h = xxhash.xxh3_128()

    def update(self, chunk) -> None:
        self._h.update(chunk)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def is_hash(value) -> bool:
    return (isinstance(value, str) and len(value) == HASH_HEX_LEN
            and all(c in "0123456789abcdef" for c in value))
