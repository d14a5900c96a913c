"""Strided named buffers (CPU): the span a view covers, its strides and offset, from torch-like
tensors and __cuda_array_interface__ objects; binding checks; views of one storage sharing
memory. (The restored Buffer's side: tests/test_buffer_views.py.)"""
from __future__ import annotations

import pytest

from cgsnap.capture import buffers, record
from cgsnap.capture.buffers import BufferSpec, View, check_bind, describe
from cgsnap.errors import BindError, CaptureError
from cgsnap.format.model import Policy, Region, RegionKind


class FakeTensor:
    """What describe() reads of a torch tensor (duck-typed, as cgsnap reads a real one)."""
    is_cuda = True

    def __init__(self, base: int, dtype: str, itemsize: int, shape, strides, storage_offset=0):
        self._base, self.dtype, self._itemsize = base, f"torch.{dtype}", itemsize
        self.shape, self._strides, self._offset = tuple(shape), tuple(strides), storage_offset

    def data_ptr(self):
        return self._base + self._offset * self._itemsize

    def element_size(self):
        return self._itemsize

    def stride(self):
        return self._strides

    def is_contiguous(self):
        expect, acc = [], 1
        for n in reversed(self.shape):
            expect.append(acc)
            acc *= n
        return all(n == 1 or s == e for n, s, e in zip(self.shape, self._strides,
                                                        reversed(expect)))


class FakeCAI:
    def __init__(self, ptr, shape, typestr, strides=None):
        self.__cuda_array_interface__ = {"data": (ptr, False), "shape": shape,
                                         "typestr": typestr, "strides": strides, "version": 3}


BASE = 0x7F00_0010_0000


def test_contiguous_tensor_has_no_strides():
    v = describe(FakeTensor(BASE, "float32", 4, (2, 3), (3, 1)))
    assert v == View(BASE, 24, "float32", (2, 3), None, 0)


def test_channels_last_tensor():
    n, c, h, w = 2, 3, 4, 5                  # channels_last strides: (h*w*c, 1, w*c, c)
    v = describe(FakeTensor(BASE, "float16", 2, (n, c, h, w), (h * w * c, 1, w * c, c)))
    assert (v.ptr, v.nbytes, v.strides, v.offset) == (BASE, n * c * h * w * 2,
                                                       (h * w * c, 1, w * c, c), 0)


def test_transposed_slice_and_expanded_views():
    t = describe(FakeTensor(BASE, "float32", 4, (6, 4), (1, 6)))         # (4, 6).t()
    assert (t.nbytes, t.strides) == (96, (1, 6))
    # storage (8, 10); view [2:5, 3:7]: offset 23 elements, rows of 10
    s = describe(FakeTensor(BASE, "int64", 8, (3, 4), (10, 1), storage_offset=23))
    assert (s.ptr, s.nbytes, s.strides) == (BASE + 23 * 8, (2 * 10 + 3 + 1) * 8, (10, 1))
    e = describe(FakeTensor(BASE, "float32", 4, (4, 8), (1, 0)))           # (4,1).expand(4, 8)
    assert (e.nbytes, e.strides) == (16, (1, 0))
    empty = describe(FakeTensor(BASE, "float32", 4, (0, 3), (1, 5)))
    assert empty.nbytes == 0


def test_cuda_array_interface_strides_in_bytes_negative_too():
    a = describe(FakeCAI(BASE + 96, (4, 6), "<f4", (-24, 4)))              # x[::-1], rows of 6
    assert (a.ptr, a.nbytes, a.strides, a.offset) == (BASE + 24, 96, (-6, 1), 18)
    c = describe(FakeCAI(BASE, (4, 6), "<f4", (24, 4)))                    # contiguous
    assert c.strides is None and c.nbytes == 96
    with pytest.raises(TypeError, match="multiples of the item size"):
        describe(FakeCAI(BASE, (4,), "<f4", (6,)))
    with pytest.raises(TypeError, match="dtype cgsnap knows"):
        describe(FakeCAI(BASE, (4,), "|V4", (8,)))


def test_check_bind_compares_strides():
    region = Region(0, RegionKind.NAMED, 96, Policy.BOUND, name="xt", dtype="float32",
                    shape=(6, 4), strides=(1, 6))
    assert check_bind(region, FakeTensor(BASE, "float32", 4, (6, 4), (1, 6))) == BASE
    with pytest.raises(BindError, match=r"xt: strides contiguous, expected \(1, 6\)"):
        check_bind(region, FakeTensor(BASE, "float32", 4, (6, 4), (4, 1)))
    plain = Region(1, RegionKind.NAMED, 96, Policy.BOUND, name="x", dtype="float32",
                   shape=(4, 6))
    with pytest.raises(BindError, match=r"x: strides \(1, 4\), expected contiguous"):
        check_bind(plain, FakeTensor(BASE, "float32", 4, (4, 6), (1, 4)))


def _recording(monkeypatch, allocations):
    def address_range(ptr):
        for base, size in allocations:
            if base <= ptr < base + size:
                return base, size
        return None
    monkeypatch.setattr(record.driver, "address_range", address_range)
    return record.Recording(None, None, None)


def _specs(named: dict):
    return buffers.expand_buffers(named)


def test_two_views_of_one_allocation_share_it(monkeypatch):
    """x spans its whole allocation and x.t() the same bytes: both become views of the
    allocation (which then carries no bytes of its own), so they share memory after restore."""
    rec = _recording(monkeypatch, [(BASE, 96)])
    rec.add_named(_specs({"x": FakeTensor(BASE, "float32", 4, (4, 6), (6, 1)),
                          "xt": FakeTensor(BASE, "float32", 4, (6, 4), (1, 6))}))
    alloc, x, xt = rec.regions
    assert alloc.kind is RegionKind.ALLOCATION and alloc.policy is Policy.SCRATCH
    assert (x.parent, x.parent_offset, xt.parent, xt.parent_offset) == (0, 0, 0, 0)
    assert xt.strides == (1, 6) and x.strides is None


def test_two_slices_of_one_storage_share_it(monkeypatch):
    rec = _recording(monkeypatch, [(BASE, 4 << 20)])
    storage = dict(dtype="float32", itemsize=4, shape=(4, 4), strides=(8, 1))
    rec.add_named(_specs({"a": FakeTensor(BASE, **storage),
                          "b": FakeTensor(BASE, **storage, storage_offset=4)}))
    alloc, a, b = rec.regions
    assert alloc.policy is Policy.SAVED and (a.parent, b.parent) == (0, 0)
    assert (a.parent_offset, b.parent_offset) == (0, 16) and a.size == b.size == (3 * 8 + 4) * 4


def test_a_lone_buffer_spanning_its_allocation_has_no_parent(monkeypatch):
    rec = _recording(monkeypatch, [(BASE, 96)])
    rec.add_named(_specs({"x": FakeTensor(BASE, "float32", 4, (4, 6), (6, 1))}))
    assert len(rec.regions) == 1 and rec.regions[0].parent is None


def test_a_view_overlapping_bound_memory_is_refused(monkeypatch):
    from cgsnap.capture.buffers import Bound
    rec = _recording(monkeypatch, [(BASE, 96)])
    with pytest.raises(CaptureError, match="'xt' overlaps bound buffer 'x'"):
        rec.add_named(_specs({"x": Bound(FakeTensor(BASE, "float32", 4, (4, 6), (6, 1))),
                              "xt": FakeTensor(BASE, "float32", 4, (6, 4), (1, 6))}))
    rec = _recording(monkeypatch, [(BASE, 96)])
    rec.add_named(_specs({"x": Bound(FakeTensor(BASE, "float32", 4, (4, 6), (6, 1))),
                          "xt": Bound(FakeTensor(BASE, "float32", 4, (6, 4), (1, 6)))}))
    assert all(r.policy is Policy.BOUND and r.parent is None for r in rec.regions)


def test_overlapping_views_outside_any_allocation_are_refused(monkeypatch):
    rec = _recording(monkeypatch, [])
    with pytest.raises(CaptureError, match="overlap but lie in no device allocation"):
        rec.add_named([BufferSpec("a", BASE, 64), BufferSpec("b", BASE + 32, 64)])
