"""Pointer classification against synthetic region tables (CPU)."""
from __future__ import annotations

import struct

from cgsnap.capture.classify import (ALLOCATION, NAMED, SPECIAL, RangeTable, classify_words,
                                     make_lookup)
from cgsnap.format.model import Ref

BASE_A = 0x7F00_0000_0000        # an "allocation" of 1 MiB
BASE_B = 0x7F00_0020_0000        # a second allocation right after a gap


def words(*values, pad_front: int = 0) -> bytes:
    return b"\0" * pad_front + b"".join(struct.pack("<Q", v) for v in values)


def table():
    t = RangeTable()
    t.add(BASE_A, 1 << 20, region=0, priority=ALLOCATION)
    t.add(BASE_A + 0x1000, 0x100, region=1, priority=NAMED)         # a named tensor inside A
    t.add(BASE_A + 0x1000, 0x2000, region=2, priority=NAMED)        # a larger name around it
    t.add(BASE_B, 0x40, region=3, priority=SPECIAL)                  # a module global
    return t


def test_names_win_and_smallest_name_wins():
    t = table()
    assert t.find(BASE_A + 0x10) == Ref(0, 0x10)
    assert t.find(BASE_A + 0x1008) == Ref(1, 8)
    assert t.find(BASE_A + 0x1100) == Ref(2, 0x100)     # past the small name: the larger one
    assert t.find(BASE_A + 0x3000) == Ref(0, 0x3000)    # past both names: the allocation


def test_ranges_are_half_open():
    t = table()
    assert t.find(BASE_A) == Ref(0, 0)
    assert t.find(BASE_A + (1 << 20) - 1) == Ref(0, (1 << 20) - 1)
    assert t.find(BASE_A + (1 << 20)) is None           # one past the end
    assert t.find(BASE_B + 0x40) is None
    assert t.find(BASE_A - 1) is None


def test_struct_with_pointers_at_odd_word_positions():
    # struct { int n; float* a; double s; float* b; int m; char c; float* d; } (offsets 0,8,..)
    data = (struct.pack("<i4x", 7) + struct.pack("<Q", BASE_A + 8) + struct.pack("<d", 0.5)
            + struct.pack("<Q", BASE_B + 0x3F) + struct.pack("<ib3x", 3, 1)
            + struct.pack("<Q", BASE_A + 0x1010))
    refs = classify_words(data, 0, make_lookup(table()))
    assert refs == ((8, Ref(0, 8)), (24, Ref(3, 0x3F)), (40, Ref(1, 0x10)))


def test_word_alignment_follows_the_parameter_buffer():
    # An argument that starts at buffer offset 4: its pointers sit at argument offsets 4, 12, ...
    data = b"\0" * 4 + words(BASE_A + 0x20)
    assert classify_words(data, 4, make_lookup(table())) == ((4, Ref(0, 0x20)),)
    # At buffer offset 0 the same bytes hold no aligned pointer.
    assert classify_words(data, 0, make_lookup(table())) == ()


def test_values_that_only_look_like_pointers_stay_literal():
    host_stack = 0x7FFD_74AB_9B2C                  # seen in a captured cuBLAS kernel
    data = words(0, 1, 0x3F800000, host_stack, (1 << 63) | BASE_A, BASE_A + (1 << 20))
    assert classify_words(data, 0, make_lookup(table())) == ()


def test_fallback_is_asked_once_per_value_and_registers_what_it_finds():
    t = table()
    calls = []
    other = 0x7E00_0000_0000

    def fallback(addr):
        calls.append(addr)
        if other <= addr < other + 4096:
            t.add(other, 4096, region=9, priority=ALLOCATION)
            return Ref(9, addr - other)
        return None
    lookup = make_lookup(t, fallback)
    unknown = 0x7FFD_0000_0000
    data = words(other + 16, other + 32, unknown, unknown)
    assert classify_words(data, 0, lookup) == ((0, Ref(9, 16)), (8, Ref(9, 32)))
    assert calls == [other + 16, unknown]          # the second word hit the table; the repeat
    assert classify_words(words(unknown), 0, lookup) == ()   # ... and the miss were not re-asked
    assert calls == [other + 16, unknown]


def test_short_arguments_hold_no_pointer():
    assert classify_words(b"\x01\x02\x03", 0, make_lookup(table())) == ()
    assert classify_words(b"", 0, make_lookup(table())) == ()
