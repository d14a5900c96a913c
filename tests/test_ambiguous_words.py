"""Ambiguous argument words (cgsnap.capture.classify): an int sharing an 8-byte word with 4 stale bytes
must not be rewritten as a pointer, a real pointer must be. CPU only: a real capture's bytes
(tests/fixtures/ambiguous_words.msgpack.zst) and synthetic graphs."""
from __future__ import annotations

import os
import struct

import msgpack
import numpy as np
import pytest
import zstandard

from cgsnap.capture.classify import (ALLOCATION, NAMED, SlotEvidence, ambiguous, dtype_alignment,
                                     keep_as_pointer, make_lookup)
from cgsnap.capture.record import _drop_unused_allocations, Recording
from cgsnap.format.model import Graph, Kernel, KernelNode, Policy, Ref, RegionKind, Snapshot
from cgsnap.format.snapfile import merge

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "ambiguous_words.msgpack.zst")
B = 0x7FF7_0000_0000            # a 4 GiB boundary that a device allocation covers


def q(v: int) -> bytes:
    return struct.pack("<Q", v)


def recording(regions) -> Recording:
    """A recording with no driver: ``regions`` are (kind, origin, size, dtype)."""
    rec = Recording(None, None, None)
    rec.lookup = make_lookup(rec.table)
    for kind, origin, size, dtype in regions:
        rec.add_region(kind, origin, size, NAMED if kind is RegionKind.NAMED else ALLOCATION,
                       dtype=dtype, policy=Policy.BOUND if kind is RegionKind.NAMED
                       else Policy.SAVED)
    return rec


def add_kernel(rec: Recording, layout) -> int:
    rec.kernels.append(Kernel(len(rec.kernels), f"k{len(rec.kernels)}", "0" * 32, tuple(layout)))
    return rec.kernels[-1].id


def run(rec: Recording, launches) -> list:
    """Classify ``launches`` ((kernel, [arg bytes]), ...) as one graph, decide, return the
    nodes' refs as {buffer position: Ref}."""
    nodes = [rec.classified_node(KernelNode(i, k, (1, 1, 1), (1, 1, 1), 0, b""), raw, f"node {i}")
             for i, (k, raw) in enumerate(launches)]
    rec.graphs = [Graph("g", nodes, [])]
    rec.decide_ambiguous()
    return [dict(n.pointers()) for n in rec.graphs[0].nodes]


# ---- the rules one by one --------------------------------------------------------------------

def test_window_and_whole_parameters():
    assert ambiguous(B + 1, whole_parameter=False)
    assert ambiguous(B + 0xFFFF, whole_parameter=False)
    assert not ambiguous(B + 0x10000, whole_parameter=False)
    assert ambiguous(B - 1, whole_parameter=False)              # int -1 beside a stale half
    assert ambiguous(B - 0x10000, whole_parameter=False)
    assert not ambiguous(B - 0x10001, whole_parameter=False)
    assert not ambiguous(B + 1, whole_parameter=True)      # no padding fits in an 8-byte param


def test_keep_as_pointer_order():
    none, ptr, lit = SlotEvidence(), SlotEvidence(pointer=True), SlotEvidence(literal=True)
    assert keep_as_pointer(0, None, none, False)                 # a region's start
    assert not keep_as_pointer(16, None, none, False)            # no evidence inside a region
    assert keep_as_pointer(16, None, ptr, False)
    assert keep_as_pointer(16, None, none, True)                 # the value is a sure pointer
    assert not keep_as_pointer(0, None, lit, True)               # the slot holds ints elsewhere
    assert not keep_as_pointer(1, 2, ptr, True)                  # odd byte into bfloat16
    assert keep_as_pointer(8, 2, ptr, False)


@pytest.mark.parametrize("dtype, align", [("bfloat16", 2), ("float16", 2), ("float32", 4),
                                          ("int64", 8), ("uint8", 1), ("bool", 1),
                                          ("float8_e4m3fn", 1), ("complex64", 4),
                                          ("complex128", 8), ("quint4x2", None), (None, None),
                                          ("mystery", None)])
def test_dtype_alignment(dtype, align):
    assert dtype_alignment(dtype) == align


def test_int_plus_stale_half_into_a_weight_stays_literal():
    # The pattern of the 32-layer failure: a bf16 weight starts exactly at B; a struct holds
    # {u32 size; u32 stale}. The kernel's real pointer field (word 0) points at other tensors.
    rec = recording([(RegionKind.NAMED, B, 1 << 20, "bfloat16"),
                     (RegionKind.ALLOCATION, 0x7FF6_1000_0000, 1 << 24, None)])
    k = add_kernel(rec, [(0, 24)])
    act = 0x7FF6_1000_0000
    refs = run(rec, [(k, [q(act + 0x200) + q(B + 1) + q(0)]),        # odd: never a bf16 pointer
                     (k, [q(act + 0x400) + q(B + 16) + q(0)])])      # aligned, no evidence
    assert refs == [{0: Ref(1, 0x200)}, {0: Ref(1, 0x400)}]
    assert len(rec.decisions) == 2 and all(d.endswith("literal") for d in rec.decisions)
    assert "word 0x7ff700000001 at parameter byte 8 of k0" in rec.decisions[0]


def test_real_pointers_in_the_window_are_kept():
    rec = recording([(RegionKind.NAMED, B, 1 << 20, "bfloat16"),
                     (RegionKind.ALLOCATION, 0x7FF6_1000_0000, 1 << 24, None)])
    k = add_kernel(rec, [(0, 16)])               # struct {T* a; T* b;}
    k8 = add_kernel(rec, [(0, 8)])               # a plain T* parameter
    other = 0x7FF6_1000_0000
    refs = run(rec, [
        (k, [q(B) + q(other + 0x100000)]),               # region start: a pointer
        (k, [q(other + 0x200000) + q(B + 0x40)]),        # word 8 is a sure pointer elsewhere
        (k8, [q(B + 0x80)]),                             # whole parameter: never ambiguous
        (k, [q(B + 0x80) + q(0)]),                       # ... so the same value is a pointer
    ])
    assert refs[0] == {0: Ref(0, 0), 8: Ref(1, 0x100000)}
    assert refs[1] == {0: Ref(1, 0x200000), 8: Ref(0, 0x40)}
    assert refs[2] == {0: Ref(0, 0x80)}
    # word 0 of k also holds sure pointers elsewhere (node 1): evidence and value agree
    assert refs[3] == {0: Ref(0, 0x80)}


def test_negative_ints_beside_a_stale_half_stay_literal():
    # -1 and -100 beside stale half H read as (H+1) << 32 minus a little: inside a bf16 tensor
    # that covers the boundary (H+1) << 32.
    rec = recording([(RegionKind.NAMED, B - (1 << 20), 2 << 20, "bfloat16"),
                     (RegionKind.ALLOCATION, 0x7FF6_1000_0000, 1 << 24, None)])
    k = add_kernel(rec, [(0, 16)])
    act = 0x7FF6_1000_0000
    refs = run(rec, [(k, [q(act + 0x200) + q(B - 1)]),         # odd byte of a bf16 tensor
                     (k, [q(act + 0x400) + q(B - 100)])])      # aligned, no evidence
    assert refs == [{0: Ref(1, 0x200)}, {0: Ref(1, 0x400)}]


def test_a_large_int_beside_a_stale_half_vouches_for_nobody():
    # {u32 151936; stale} is beyond the window, so it is taken for a pointer (a known limit,
    # docs/RELIABILITY.md) -- but it must not make the same slot's {4096; stale} a pointer too.
    rec = recording([(RegionKind.NAMED, B, 1 << 20, "bfloat16")])
    k = add_kernel(rec, [(0, 16)])
    refs = run(rec, [(k, [q(0) + q(B + 151936)]), (k, [q(0) + q(B + 4096)])])
    assert refs == [{8: Ref(0, 151936)}, {}]


def test_a_slot_that_holds_ints_elsewhere_is_no_pointer():
    rec = recording([(RegionKind.ALLOCATION, B - (1 << 20), 2 << 20, None)])
    k = add_kernel(rec, [(0, 16)])
    refs = run(rec, [(k, [q(0) + q(B)]),                 # region-relative offset 1 MiB
                     (k, [q(0) + q(7 | (0x1234 << 32))])])   # the same slot holds a plain int
    assert refs == [{}, {}]


def test_an_allocation_found_only_through_a_literal_word_is_dropped():
    rec = recording([(RegionKind.ALLOCATION, 0x7FF6_1000_0000, 1 << 20, None),
                     (RegionKind.ALLOCATION, B - 0x1000, 1 << 20, None)])
    k = add_kernel(rec, [(0, 16)])
    run(rec, [(k, [q(0x7FF6_1000_0040) + q(B + 3)])])
    _drop_unused_allocations(rec)
    assert [r.origin for r in rec.regions] == [0x7FF6_1000_0000]
    assert rec.graphs[0].nodes[0].pointers() == [(0, Ref(0, 0x40))]


def test_the_range_table_follows_the_renumbering_after_a_drop(monkeypatch):
    """Dropping an allocation renumbers the regions after it: the address table must follow,
    or the scan of stored pointers that comes next resolves words to the ids regions had
    before (another region, or none: an IndexError)."""
    from cgsnap.capture import record
    monkeypatch.setattr(record.driver, "address_range", lambda ptr: None)
    dropped, y, w = 0x7FF6_0000_0000, 0x7FF6_1000_0000, 0x7FF6_2000_0000
    rec = recording([(RegionKind.ALLOCATION, dropped, 1 << 20, None),     # literal word only
                     (RegionKind.ALLOCATION, y, 64, None),
                     (RegionKind.ALLOCATION, w, 64, None)])
    k = add_kernel(rec, [(0, 24)])
    run(rec, [(k, [q(y) + q(dropped + 3) + q(w)])])
    _drop_unused_allocations(rec)
    assert [r.origin for r in rec.regions] == [y, w]
    assert rec.table.find(w + 8) == Ref(1, 8) and rec.table.find(y) == Ref(0, 0)
    assert rec.table.find(dropped + 3) is None
    for r in rec.regions:
        r.data = np.zeros(r.size, dtype=np.uint8)
    rec.regions[0].data[:8] = np.frombuffer(q(w + 0x10), dtype=np.uint8)
    record._follow_memory_pointers(rec, "g", 1 << 30, "copy", None)
    assert np.frombuffer(rec.regions[0].refs, dtype="<u8").tolist() == [0, 1, 0x10]


def test_merge_keeps_every_graphs_decisions():
    def snap(name, lines):
        return Snapshot(graphs=[Graph(name, [], [])], regions=[], images=[], kernels=[],
                        device={"arch": 90},
                        meta={"name": name, "ambiguous_words": lines,
                              "ambiguous_word_count": len(lines)})
    m = merge([snap("a", ["x: literal"]), snap("b", ["y: pointer", "z: literal"])])
    assert m.meta["ambiguous_words"] == ["x: literal", "y: pointer", "z: literal"]
    assert m.meta["ambiguous_word_count"] == 3


# ---- a real capture ----------------------------------------------------------------------------

def test_the_captured_failure_is_classified_right():
    """Graph bs16 of a 32-layer decoder capture whose restore faulted: 34 words with a stale
    high half 0x7ff7 fell into a bf16 weight starting at 0x7ff7_0000_0000 and were rewritten.
    Now exactly those become literal; every other pointer of the capture stays as it was."""
    data = msgpack.unpackb(zstandard.ZstdDecompressor().decompress(open(FIXTURE, "rb").read()),
                           raw=False, strict_map_key=False)
    rec = Recording(None, None, None)
    rec.lookup = make_lookup(rec.table)
    kernel_ids = {}
    for kid, k in data["kernels"].items():
        kernel_ids[int(kid)] = len(rec.kernels)
        rec.kernels.append(Kernel(len(rec.kernels), k["name"], "0" * 32,
                                  tuple(tuple(p) for p in k["params"])))
    region_ids = {}
    for r in data["regions"]:
        kind = RegionKind(r["kind"])
        region_ids[r["id"]] = rec.add_region(
            kind, r["origin"], r["size"], NAMED if kind is RegionKind.NAMED else ALLOCATION,
            dtype=r["dtype"]).id
    launches, captured = [], []
    for n in data["nodes"]:
        k = kernel_ids[n["kernel"]]
        launches.append((k, [n["params"][off:off + size] for off, size in rec.kernels[k].params]))
        captured.append({pos: Ref(region_ids[reg], off) for pos, reg, off in n["refs"]})
    now = run(rec, launches)
    weight = next(r for r in rec.regions if r.origin == B)
    assert weight.name is None and weight.dtype == "bfloat16"
    dropped = {}
    for i, (was, got) in enumerate(zip(captured, now)):
        assert set(got.items()) <= set(was.items()), f"node {i} gained a pointer"
        for pos in set(was) - set(got):
            dropped[(rec.kernels[launches[i][0]].name, pos)] = was[pos]
    # Exactly the stale-half words: CompareFunctor's OffsetCalculator and a TensorInfo size.
    assert len([1 for was, got in zip(captured, now) for p in set(was) - set(got)]) == 34
    names = {name for name, _ in dropped}
    assert len(names) == 2
    assert any("elementwise_kernel" in n and "CompareFunctor" in n for n in names)
    assert any("indexSelectSmallIndex" in n for n in names)
    assert all(ref.region == weight.id and 0 < ref.offset < 0x100 for ref in dropped.values())
    # The real pointers to the weight's first byte survive.
    assert sum(ref == Ref(weight.id, 0) for got in now for ref in got.values()) > 0


def test_the_gpu_tests_stale_word_is_a_pointer_by_value_and_literal_by_the_rule():
    """tests/gpu/test_gpu_ambiguous.py's pattern on CPU: a struct {int 7; 4 stale bytes; float*
    x} whose first word (the 4 GiB boundary B inside a 5 GiB allocation, plus 7) lies inside
    that allocation. By value alone it is a pointer into it -- rewriting it at restore would
    turn the 7 into the low half of a new address -- and the rule keeps it literal."""
    big = B - (1 << 30)
    x, y = 0x7FF6_1000_0000, 0x7FF6_2000_0000
    rec = recording([(RegionKind.ALLOCATION, big, 5 << 30, None),
                     (RegionKind.NAMED, x, 4096, "float32"), (RegionKind.NAMED, y, 4096, "float32")])
    assert rec.lookup(B + 7) == Ref(0, (1 << 30) + 7)        # what a value test alone takes
    assert ambiguous(B + 7, whole_parameter=False)
    k = add_kernel(rec, [(0, 16), (16, 8), (24, 4)])
    refs = run(rec, [(k, [q(B + 7) + q(x), q(y), (1024).to_bytes(4, "little")])])
    assert refs == [{8: Ref(1, 0), 16: Ref(2, 0)}]           # word 0 stays the int 7
    assert len(rec.decisions) == 1 and rec.decisions[0].endswith(": literal")
