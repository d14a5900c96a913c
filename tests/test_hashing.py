"""Blob checksums: piece-wise XXH3-128, the same whether computed whole, streamed or parallel."""
from concurrent.futures import ThreadPoolExecutor

import pytest
import xxhash

from cgsnap.format import hashing


@pytest.fixture
def small_pieces(monkeypatch):
    monkeypatch.setattr(hashing, "BLOB_PIECE", 1000)


@pytest.mark.parametrize("size", [0, 1, 999, 1000, 1001, 5000, 12345])
def test_streamed_and_parallel_equal_the_definition(small_pieces, size):
    data = bytes((i * 7 + 3) % 251 for i in range(size))
    pieces = [data[o:o + 1000] for o in range(0, size, 1000)]
    expected = xxhash.xxh3_128(b"".join(xxhash.xxh3_128(p).digest() for p in pieces)).digest()
    assert hashing.blob_checksum(data) == expected
    with ThreadPoolExecutor(4) as pool:
        assert hashing.blob_checksum(data, pool) == expected
    for step in (1, 7, 1000, 1001, 4096):
        h = hashing.BlobHasher()
        for o in range(0, size, step):
            h.update(data[o:o + step])
        assert h.digest() == expected


def test_a_changed_byte_changes_the_checksum(small_pieces):
    data = bytearray(3000)
    before = hashing.blob_checksum(data)
    data[2500] = 1
    assert hashing.blob_checksum(data) != before
