"""A restored strided Buffer (CPU): __cuda_array_interface__, to_numpy and copy_from go through
the view (transposed, sliced, expanded, negative strides) over a host span standing in for the
device memory."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from cgsnap.restore import buffers as rbuf
from cgsnap.restore.buffers import Buffer, host_view

BASE = 0x7F00_0010_0000


@pytest.mark.parametrize("shape,strides,offset", [
    ((4, 6), (6, 1), 0), ((6, 4), (1, 6), 0), ((3, 4), (10, 1), 0), ((4, 8), (1, 0), 0),
    ((4, 6), (-6, 1), 18), ((4, 6), (-6, -1), 23), ((2, 3, 4), (1, 8, 2), 0),
])
def test_buffer_view_math_matches_numpy(shape, strides, offset):
    storage = np.arange(40, dtype=np.float32)
    span = storage.copy().view(np.uint8)
    want = np.lib.stride_tricks.as_strided(storage[offset:], shape,
                                           tuple(4 * s for s in strides))
    assert np.array_equal(host_view(span, shape, strides, offset, np.float32), want)


def test_buffer_interface_and_copies_through_the_view(monkeypatch):
    """A transposed view of 4x6 float32: __cuda_array_interface__ gives byte strides, to_numpy
    the view's values, copy_from writes element i of the host array to element i of the view."""
    memory = {}
    span = np.arange(24, dtype=np.float32).view(np.uint8).copy()
    memory[BASE] = span

    def dtoh(dst, src, size):
        np.ctypeslib.as_array((ctypes.c_uint8 * size).from_address(dst))[:] = \
            memory[BASE][src - BASE:src - BASE + size]

    def htod(dst, src, size):
        memory[BASE][dst - BASE:dst - BASE + size] = np.ctypeslib.as_array(
            (ctypes.c_uint8 * size).from_address(src))
    monkeypatch.setattr(rbuf.driver, "dtoh", dtoh)
    monkeypatch.setattr(rbuf.driver, "htod", htod)
    b = Buffer("xt", BASE, 96, "float32", (6, 4), strides=(1, 6))
    cai = b.__cuda_array_interface__
    assert cai["strides"] == (4, 24) and cai["data"] == (BASE, False) and cai["shape"] == (6, 4)
    storage = np.arange(24, dtype=np.float32).reshape(4, 6)
    assert np.array_equal(b.to_numpy(), storage.T) and b.to_numpy().flags.c_contiguous
    new = np.arange(100, 124, dtype=np.float32).reshape(6, 4)
    b.copy_from(new)
    assert np.array_equal(memory[BASE].view(np.float32).reshape(4, 6), new.T)
    # An expanded view: consistent values are accepted, conflicting ones refused.
    e = Buffer("e", BASE, 16, "float32", (4, 8), strides=(1, 0))
    e.copy_from(np.repeat(np.arange(4, dtype=np.float32)[:, None], 8, axis=1))
    assert memory[BASE].view(np.float32)[:4].tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="share memory"):
        e.copy_from(np.arange(32, dtype=np.float32))
    with pytest.raises(ValueError, match="holds 128 bytes"):
        e.copy_from(np.zeros(3, np.float32))
    # Negative strides: the data pointer is the first element's.
    r = Buffer("r", BASE, 96, "float32", (4, 6), strides=(-6, 1), view_offset=18)
    assert r.__cuda_array_interface__["data"] == (BASE + 72, False)


@pytest.mark.parametrize("dtype,itemsize", [("complex32", 4), ("bfloat16", 2), ("qint32", 4),
                                            ("float8_e8m0fnu", 1)])
def test_dtypes_numpy_lacks_travel_as_raw_items_of_their_size(monkeypatch, dtype, itemsize):
    """A named complex32 (or quantized, ...) buffer: numpy has no such dtype; its copies move
    the region's bytes exactly, as raw items of the dtype's size -- never more bytes than the
    host array holds."""
    memory = np.arange(8 * itemsize, dtype=np.uint8)
    moved = []

    def dtoh(dst, src, size):
        moved.append(size)
        ctypes.memmove(dst, memory[src - BASE:].ctypes.data, size)

    def htod(dst, src, size):
        moved.append(size)
        ctypes.memmove(memory[dst - BASE:].ctypes.data, src, size)
    monkeypatch.setattr(rbuf.driver, "dtoh", dtoh)
    monkeypatch.setattr(rbuf.driver, "htod", htod)
    b = Buffer("c", BASE, 8 * itemsize, dtype, (8,))
    out = b.to_numpy()
    assert moved == [8 * itemsize] and out.nbytes == 8 * itemsize and out.shape == (8,)
    assert out.tobytes() == memory.tobytes()
    assert b.__cuda_array_interface__["typestr"] == out.dtype.str
    b.copy_from(np.zeros(8 * itemsize, np.uint8))
    assert moved[-1] == 8 * itemsize and not memory.any()


def test_a_shape_larger_than_its_region_is_refused():
    from cgsnap.errors import RestoreError
    with pytest.raises(RestoreError, match="buffer 'x': shape \\(64,\\) of float32 is 256 bytes"):
        Buffer("x", BASE, 16, "float32", (64,))
