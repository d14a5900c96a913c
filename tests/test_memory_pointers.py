"""Pointers stored in device memory (cgsnap.capture.classify.MemoryPointers) on synthetic
region bytes (CPU): a fake address space of allocations stands in for the driver."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cgsnap.capture.classify import (ALLOCATION, NAMED, SPECIAL, MemoryPointers, RangeTable,
                                     holds_pointers, word_candidates)
from cgsnap.errors import CaptureError
from cgsnap.format.model import Policy, Ref, Region, RegionKind

GiB = 1 << 30
BASE = 0x7F30_0000_0000          # where the fake device allocations live


def u64(*values) -> bytes:
    return np.array(values, dtype="<u8").tobytes()


class Space:
    """A fake process: device allocations with contents, the recorder's regions and table."""

    def __init__(self):
        self.allocations = {}        # base -> bytearray
        self.regions: list = []
        self.table = RangeTable()
        self.lookups = []
        self.reads = []

    def alloc(self, base: int, data) -> int:
        self.allocations[base] = bytearray(data)
        return base

    def region(self, kind, base: int, size: int, priority, data=None, **fields) -> Region:
        r = Region(len(self.regions), kind, size, origin=base, **fields)
        if data is None and r.policy is Policy.SAVED:
            start, rng = next((b, d) for b, d in self.allocations.items()
                              if b <= base < b + len(d))
            data = rng[base - start:base - start + size]
        r.data = np.frombuffer(bytes(data), dtype=np.uint8) if data is not None else None
        self.regions.append(r)
        self.table.add(base, size, r.id, priority)
        return r

    def locate(self, addr: int):
        self.lookups.append(addr)
        for base, data in self.allocations.items():
            if base <= addr < base + len(data):
                return base, len(data)
        return None

    def add_allocation(self, base: int, size: int) -> Region:
        return self.region(RegionKind.ALLOCATION, base, size, ALLOCATION)

    def read(self, r: Region):
        self.reads.append(r.id)
        return r.data

    def scan(self, strong=(), **kw):
        scan = MemoryPointers(self.regions, self.table, self.locate, self.add_allocation,
                              self.read, lambda r: r.policy is Policy.SAVED and
                              (r.kind is not RegionKind.NAMED or holds_pointers(r.dtype)),
                              lambda rid: f"region {rid}", strong, **kw)
        res = scan.run()
        for rid, rows in res.refs.items():        # as lists of tuples, to compare
            assert rows.dtype == np.uint64 and rows.shape[1] == 3
            res.refs[rid] = [tuple(r) for r in rows.tolist()]
        return res

    def find(self, base: int) -> int:
        return next(r.id for r in self.regions if r.origin == base)


def test_pointer_array_brings_in_the_arrays_it_points_to():
    s = Space()
    arrays = [s.alloc(BASE + (i + 1) * (2 << 20), np.full(256, i, np.float32).tobytes())
              for i in range(4)]
    ptrs = s.alloc(BASE, u64(*(a + 4 * i for i, a in enumerate(arrays))))
    s.region(RegionKind.ALLOCATION, ptrs, 32, ALLOCATION)           # a kernel argument names it
    res = s.scan()
    assert [r.origin for r in s.regions[1:]] == arrays              # brought in, in offset order
    assert res.refs[0] == [(8 * i, i + 1, 4 * i) for i in range(4)]
    assert res.added == [1, 2, 3, 4] and res.added_bytes == 4 * 1024
    # The float arrays were scanned too (they are allocations), and hold no pointers.
    assert all(not res.refs.get(i) for i in range(1, 5))


def test_struct_of_pointers_and_fields_beside_them():
    """struct Job {const float* in; float* out; int n; <4 bytes padding>} x 3, the third
    job's `in` pointing into a named buffer: names win, ints stay literal."""
    s = Space()
    x = s.alloc(BASE + (4 << 20), bytes(4096))
    y = s.alloc(BASE + (8 << 20), bytes(4096))
    jobs = b"".join(u64(src, dst) + np.array([100 + j, 0], "<u4").tobytes()
                    for j, (src, dst) in enumerate([(x, y), (x + 1024, y + 1024),
                                                    (x + 2048, y + 2048)]))
    s.alloc(BASE, jobs)
    s.region(RegionKind.ALLOCATION, BASE, len(jobs), ALLOCATION)
    named = s.region(RegionKind.NAMED, x + 2048, 1024, NAMED, name="x2", dtype="float32")
    res = s.scan()
    xr, yr = s.find(x), s.find(y)
    assert res.refs[0] == [(0, xr, 0), (8, yr, 0), (24, xr, 1024), (32, yr, 1024),
                           (48, named.id, 0), (56, yr, 2048)]


def test_module_global_pointing_at_a_table():
    """A __device__ float* set at run time to a table no kernel argument names."""
    s = Space()
    table = s.alloc(BASE + (6 << 20) + 512, np.arange(64, dtype=np.float32).tobytes())
    g = s.region(RegionKind.MODULE_GLOBAL, BASE + 0x100, 8, SPECIAL, data=u64(table + 16),
                 image="0" * 32, symbol="g_table")
    res = s.scan()
    t = s.find(table)
    assert res.refs == {g.id: [(0, t, 16)]}
    assert s.regions[t].kind is RegionKind.ALLOCATION


def test_tables_of_tables_are_followed_transitively():
    s = Space()
    rows = [s.alloc(BASE + (40 + 2 * i) * (1 << 20), np.full(32, i, np.float32).tobytes())
            for i in range(3)]
    row_table = s.alloc(BASE + (20 << 20), u64(*rows))
    top = s.alloc(BASE + (22 << 20), u64(row_table, 0, 12345))
    s.region(RegionKind.MODULE_GLOBAL, BASE + 0x100, 8, SPECIAL, data=u64(top),
             image="0" * 32, symbol="g_rows")
    res = s.scan()
    top_r, rows_r = s.find(top), s.find(row_table)
    assert res.refs[0] == [(0, top_r, 0)]
    assert res.refs[top_r] == [(0, rows_r, 0)]
    assert res.refs[rows_r] == [(8 * i, s.find(r), 0) for i, r in enumerate(rows)]
    assert len(res.added) == 5


def test_words_that_are_data_stay_literal_without_driver_calls():
    s = Space()
    rng = np.random.default_rng(0)
    floats = rng.standard_normal(1 << 16).astype(np.float32)
    relu_bf16 = (np.maximum(rng.standard_normal(1 << 16), 0).astype(np.float32)
                 .view(np.uint32) >> 16).astype(np.uint16)
    ints = rng.integers(0, 150_000, 1 << 14, dtype=np.int64)
    data = floats.tobytes() + relu_bf16.tobytes() + ints.tobytes()
    s.alloc(BASE, data)
    s.region(RegionKind.ALLOCATION, BASE, len(data), ALLOCATION)
    res = s.scan()
    assert not res.refs.get(0) and not res.added and s.lookups == []


def test_float_named_buffers_are_not_looked_into():
    s = Space()
    target = s.alloc(BASE + (4 << 20), bytes(64))
    s.region(RegionKind.NAMED, BASE, 8, NAMED, data=u64(target), name="w", dtype="float32")
    s.region(RegionKind.NAMED, BASE + 64, 8, NAMED, data=u64(target), name="idx", dtype="int64")
    res = s.scan()
    assert 0 not in res.refs and res.refs[1] == [(0, 2, 0)]
    assert not holds_pointers("bfloat16") and not holds_pointers("bool")
    assert holds_pointers(None) and holds_pointers("uint8") and holds_pointers("int64")


def test_named_views_inside_an_allocation_are_scanned_on_their_own():
    """The parent allocation's scan skips the bytes of its named children; a float child's
    bytes are then looked at by no one."""
    s = Space()
    target = s.alloc(BASE + (4 << 20), bytes(64))
    data = u64(target, target + 8, target + 16)
    s.alloc(BASE, data)
    parent = s.region(RegionKind.ALLOCATION, BASE, 24, ALLOCATION)
    w = s.region(RegionKind.NAMED, BASE + 8, 8, NAMED, data=data[8:16], name="w",
                 dtype="float32")
    w.parent, w.parent_offset = parent.id, 8
    res = s.scan()
    t = s.find(target)
    assert res.refs[0] == [(0, t, 0), (16, t, 16)] and w.id not in res.refs


def test_int_beside_a_stale_half_is_decided_by_evidence():
    """{int n; 4 stale bytes} words whose value lands inside an allocation: literal unless the
    region starts there or the value is a strong pointer elsewhere."""
    s = Space()
    big = BASE + (1 << 32) - (2 << 20)             # an allocation across a 4 GiB boundary
    boundary = BASE + (1 << 32)
    s.alloc(big, bytes(4 << 20))
    s.alloc(boundary + (8 << 20), bytes(64))       # one starting exactly at a boundary + 8 MiB
    at_start = boundary + (8 << 20)
    data = u64(boundary + 7, boundary + 40, at_start)
    s.alloc(BASE, data)
    s.region(RegionKind.ALLOCATION, BASE, len(data), ALLOCATION)
    res = s.scan(strong={boundary + 40})
    big_r = s.find(big)
    # boundary + 7: an int 7 beside a stale half -> literal; boundary + 40: the arguments use
    # it as a strong pointer -> kept; at_start is no ambiguous word (its low half is 8 MiB).
    assert res.refs[0] == [(8, big_r, (2 << 20) + 40), (16, s.find(at_start), 0)]
    assert any("byte 0x0: word" in d and d.endswith("literal") for d in res.decisions)
    assert any("byte 0x8: word" in d and d.endswith("pointer") for d in res.decisions)


def test_ambiguous_word_at_a_region_start_is_kept():
    s = Space()
    boundary = BASE + (1 << 32)
    s.alloc(boundary, bytes(64))
    s.alloc(BASE, u64(boundary))
    s.region(RegionKind.ALLOCATION, BASE, 8, ALLOCATION)
    res = s.scan()
    assert res.refs[0] == [(0, s.find(boundary), 0)]


def test_pointer_budget_exceeded_names_region_offset_and_budget():
    s = Space()
    big = s.alloc(BASE + GiB, bytes(3 << 20))
    s.alloc(BASE, u64(0, big + 64))
    s.region(RegionKind.ALLOCATION, BASE, 16, ALLOCATION)
    with pytest.raises(CaptureError) as err:
        s.scan(budget=2 << 20)
    msg = str(err.value)
    assert "region 0 byte 0x8" in msg and f"{big + 64:#x}" in msg
    assert "pointer_budget=2097152" in msg and "3145728 bytes" in msg


def test_region_count_budget():
    s = Space()
    targets = [s.alloc(BASE + (i + 1) * (2 << 20), bytes(8)) for i in range(5)]
    s.alloc(BASE, u64(*targets))
    s.region(RegionKind.ALLOCATION, BASE, 40, ALLOCATION)
    with pytest.raises(CaptureError, match="region 0 byte 0x18.*more than 3 allocations"):
        s.scan(max_regions=3)


def test_lookup_budget_refuses_memory_full_of_address_like_data():
    s = Space()
    words = BASE + np.arange(1, 200, dtype=np.uint64) * np.uint64(4096 + 8)
    s.alloc(BASE - (64 << 20), words.astype("<u8").tobytes())     # nothing is mapped there
    s.region(RegionKind.ALLOCATION, BASE - (64 << 20), words.nbytes, ALLOCATION)
    with pytest.raises(CaptureError, match="more than 100 distinct words"):
        s.scan(max_lookups=100)


def test_unknown_words_are_looked_up_once_each_and_the_found_allocation_covers_the_rest():
    s = Space()
    arr = s.alloc(BASE + (4 << 20), bytes(1 << 20))
    ptrs = [arr + 8 * i for i in range(1000)] + [BASE + (100 << 20)] * 3     # 3 unmapped
    s.alloc(BASE, u64(*ptrs))
    s.region(RegionKind.ALLOCATION, BASE, 8 * len(ptrs), ALLOCATION)
    res = s.scan()
    assert len(res.refs[0]) == 1000
    assert sorted(s.lookups) == [arr, BASE + (100 << 20)]


def test_pointers_into_graph_allocations_are_refused():
    s = Space()
    s.region(RegionKind.GRAPH_ALLOC, BASE + (4 << 20), 4096, SPECIAL, policy=Policy.SCRATCH)
    s.alloc(BASE, u64(BASE + (4 << 20) + 256))
    s.region(RegionKind.ALLOCATION, BASE, 8, ALLOCATION)
    with pytest.raises(CaptureError, match="region 1 byte 0x0 .* mem_alloc node"):
        s.scan()


def test_host_regions_are_scanned_and_scratch_is_not():
    """A host array of device pointers that a memcpy node copies to the device (grouped GEMM)
    is rewritten; scratch has no contents to rewrite."""
    s = Space()
    a = s.alloc(BASE + (4 << 20), bytes(64))
    host = s.region(RegionKind.HOST, 0x5555_0000_1000, 16, SPECIAL, data=u64(a, a + 32))
    s.region(RegionKind.ALLOCATION, BASE + (8 << 20), 8, ALLOCATION, policy=Policy.SCRATCH)
    res = s.scan()
    assert res.refs[host.id] == [(0, 2, 0), (8, 2, 32)] and 1 not in res.refs


def test_words_follow_absolute_alignment():
    data = bytes(4) + u64(BASE + 8) + bytes(4)
    offs, words = word_candidates(np.frombuffer(data, np.uint8), 0x1004,
                                  [(BASE, BASE + (1 << 20))])
    assert offs.tolist() == [4] and words.tolist() == [BASE + 8]
    offs, _ = word_candidates(np.frombuffer(data, np.uint8), 0x1000, [(BASE, BASE + (1 << 20))])
    assert offs.tolist() == []


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 64), st.integers(1, 40), st.sampled_from(
    [NAMED, SPECIAL, ALLOCATION])), min_size=1, max_size=12),
    st.lists(st.integers(0, 120), min_size=1, max_size=40))
def test_find_many_agrees_with_find(ranges, addrs):
    table = RangeTable()
    for i, (start, size, prio) in enumerate(ranges):
        table.add(1000 + start, size, i, prio)
    regions, offsets = table.find_many(np.array([1000 + a for a in addrs], dtype=np.uint64))
    for a, r, o in zip(addrs, regions.tolist(), offsets.tolist()):
        ref = table.find(1000 + a)
        assert (r, o) == ((ref.region, ref.offset) if ref else (-1, 0))


def test_find_many_on_an_empty_table():
    regions, _ = RangeTable().find_many(np.array([5], dtype=np.uint64))
    assert regions.tolist() == [-1]
    assert RangeTable().find(5) is None and Ref(0, 0) == Ref(0, 0)


def test_no_driver_lookup_below_4_gib_even_near_low_device_memory():
    """Device memory at a low address (8 GiB): int64 data below 4 GiB is never asked about,
    words inside the known regions are still found, unknown ones above 4 GiB are looked up."""
    s = Space()
    low = 8 << 30
    target = s.alloc(low + (64 << 20), bytes(64))
    ints = np.arange(70_000, 70_000 + 4096, dtype=np.int64) * 1000        # up to ~74e6 < 4 GiB
    data = ints.tobytes() + u64(target + 8)
    s.alloc(low, data)
    s.region(RegionKind.ALLOCATION, low, len(data), ALLOCATION)
    res = s.scan()
    assert res.refs[0] == [(len(data) - 8, s.find(target), 8)]
    assert s.lookups == [target + 8]
