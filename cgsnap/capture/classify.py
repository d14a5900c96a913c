"""Which argument words are pointers, and into which region.

Pure Python over address ranges, so it is tested on CPU with synthetic tables; the recorder
plugs in the driver (``cuMemGetAddressRange``) as the fallback for addresses no known range holds.

Rules (in this order):
1. a word inside a *named* buffer is a Ref to that buffer -- names win over the allocation that
   contains them, and the smallest named range wins among nested names (a view inside a tensor);
2. a word inside a graph-allocated range or a module global is a Ref to it;
3. a word inside a device allocation the fallback finds is a Ref to that allocation;
4. anything else stays literal (host stack addresses, sizes, values that merely look like
   pointers).
Ranges are half-open ``[start, start + size)``: a word exactly at the end of a buffer is not
taken as pointing into it, since it is as often the start of the next one.

Ambiguous words. A 32-bit field followed by 4 uninitialised bytes (struct padding, the unused
tail of a ``TensorInfo`` sizes array) reads as ``stale_high_half << 32 | small_int``. The stale
half is often the high half of a host pointer, and host and device addresses share the same
0x7fxx range, so when a device allocation covers that 4 GiB boundary the word lands inside it:
rewriting it at restore turns the int into garbage (seen as an illegal address in 3 of 8
captures of a 32-layer model). Such words -- inside a by-value struct, low 32 bits within
:data:`WINDOW` of 0 or of 2**32 (a small negative int) -- are *ambiguous* and are decided
afterwards from evidence over the whole graph (:func:`decide`). A whole 8-byte parameter is
never ambiguous: no padding fits in it (an ``int2`` with an unused second half would defeat
that, and is accepted as a risk).
"""
from __future__ import annotations

import bisect
import re
import struct
from dataclasses import dataclass
from typing import Callable, Optional

from ..format.model import Policy, Ref, RegionKind
from .philox import state_regions

# Device virtual addresses on x86-64 / aarch64 Linux lie in the user half below 2**48 (47 on most
# kernels); words outside can never be pointers and are rejected without a lookup.
_MIN_ADDR = 1 << 16
_MAX_ADDR = 1 << 57

# Priority classes: lower wins.
NAMED, SPECIAL, ALLOCATION = 0, 1, 2

_WORD = struct.Struct("<Q")


class RangeTable:
    """Address ranges tagged with a region id and a priority class."""

    def __init__(self):
        self._ranges: list = []     # (start, end, priority, size, region) sorted by start
        self._starts: list = []
        self._negative: set = set()  # words the fallback already said are not device memory
        self._max_size = 0

    def add(self, start: int, size: int, region: int, priority: int) -> None:
        item = (start, start + size, priority, size, region)
        i = bisect.bisect_left(self._ranges, item)
        self._ranges.insert(i, item)
        self._starts.insert(i, start)
        self._max_size = max(self._max_size, size)

    def find(self, addr: int) -> Optional[Ref]:
        """The best range holding ``addr``: lowest priority class, then smallest size."""
        best = None
        i = bisect.bisect_right(self._starts, addr) - 1
        # Ranges may nest (a named view inside an allocation), so walk back over every range
        # starting at or before addr that could still reach it (none can past the largest size).
        while i >= 0 and self._starts[i] + self._max_size > addr:
            start, end, prio, size, region = self._ranges[i]
            if addr < end and (best is None or (prio, size) < best[0]):
                best = ((prio, size), region, addr - start)
            i -= 1
        return None if best is None else Ref(best[1], best[2])

    def note_not_device(self, addr: int) -> None:
        self._negative.add(addr)

    def known_not_device(self, addr: int) -> bool:
        return addr in self._negative


def plausible_address(word: int) -> bool:
    return _MIN_ADDR <= word < _MAX_ADDR


def classify_words(data: bytes, base_offset: int, lookup: Callable[[int], Optional[Ref]]) -> tuple:
    """Refs among the 8-byte words of one argument.

    ``base_offset`` is the argument's offset in the kernel's parameter buffer: words are those at
    8-byte aligned *buffer* offsets (that is how the compiler lays out pointers, also inside
    by-value structs). Returns ``((offset_in_argument, Ref), ...)``."""
    refs = []
    first = (-base_offset) % 8
    for off in range(first, len(data) - 7, 8):
        word = _WORD.unpack_from(data, off)[0]
        if not plausible_address(word):
            continue
        ref = lookup(word)
        if ref is not None:
            refs.append((off, ref))
    return tuple(refs)


def make_lookup(table: RangeTable, fallback: Optional[Callable[[int], Optional[Ref]]] = None):
    """A lookup trying the table first, then ``fallback`` (which registers what it finds in the
    table itself), remembering misses so a value is asked about once."""
    def lookup(addr: int) -> Optional[Ref]:
        ref = table.find(addr)
        if ref is not None or fallback is None or table.known_not_device(addr):
            return ref
        ref = fallback(addr)
        if ref is None:
            table.note_not_device(addr)
        return ref
    return lookup


# A word inside a struct whose low 32 bits are within this of 0 (a small int) or of 2**32 (a
# small negative int) may be an int beside 4 stale bytes. A real pointer lands there only when it
# lies within 64 KiB of a 4 GiB boundary.
WINDOW = 1 << 16
# Pointers used as *evidence* for other words must look even less like ints: an int up to 16 Mi
# (a vocabulary size, a stride) beside a stale half can still be taken for a sure pointer, and
# must not vouch for its neighbours.
EVIDENCE_WINDOW = 1 << 24


def _near_int(word: int, window: int) -> bool:
    low = word & 0xFFFF_FFFF
    return low < window or low >= (1 << 32) - window


def ambiguous(word: int, whole_parameter: bool) -> bool:
    """Could this device-range word be a small 32-bit field next to 4 uninitialised bytes?
    A whole 8-byte parameter is taken as it is (a pointer, an int64, a double: no padding)."""
    return not whole_parameter and _near_int(word, WINDOW)


def strong(word: int, whole_parameter: bool) -> bool:
    """May this sure pointer serve as evidence for an ambiguous word?"""
    return whole_parameter or not _near_int(word, EVIDENCE_WINDOW)


@dataclass
class SlotEvidence:
    """What the same parameter-buffer position holds in the *other* nodes of the same kernel."""
    pointer: bool = False     # a strong pointer: the position is a pointer field
    literal: bool = False     # a non-zero word in no device range: the position is no pointer


@dataclass(frozen=True)
class Candidate:
    """An ambiguous word: in node ``node`` (any key the caller picks), at byte ``pos`` of kernel
    ``kernel``'s parameter buffer, pointing ``offset`` bytes into a region whose elements are
    ``alignment`` bytes (None: unknown)."""
    node: object
    kernel: int
    pos: int
    word: int
    offset: int
    alignment: Optional[int]


def decide(candidates: list, nodes, layouts) -> list:
    """Whether each candidate is a pointer, from the evidence in ``nodes``: every kernel node of
    the graph as ``(key, kernel, parameter buffer, positions of its sure pointers)``;
    ``layouts[kernel]`` is the kernel's ``((offset, size), ...)``."""
    doubtful = {(c.node, c.pos) for c in candidates}
    slots = {(c.kernel, c.pos): SlotEvidence() for c in candidates}
    by_kernel: dict = {}
    for kid, pos in slots:
        by_kernel.setdefault(kid, []).append(pos)
    whole = {kid: {off for off, size in layout if size == 8} for kid, layout in layouts.items()}
    strong_values = set()
    for key, kid, params, sure in nodes:
        sure = set(sure)
        for pos in sure:
            word = int.from_bytes(params[pos:pos + 8], "little")
            if strong(word, pos in whole[kid]):
                strong_values.add(word)
        for pos in by_kernel.get(kid, ()):
            if (key, pos) in doubtful or pos + 8 > len(params):
                continue
            word = int.from_bytes(params[pos:pos + 8], "little")
            ev = slots[(kid, pos)]
            if pos in sure:
                ev.pointer = ev.pointer or strong(word, pos in whole[kid])
            elif word:
                ev.literal = True
    return [keep_as_pointer(c.offset, c.alignment, slots[(c.kernel, c.pos)],
                            c.word in strong_values) for c in candidates]


def keep_as_pointer(offset: int, alignment: Optional[int], slot: SlotEvidence,
                    value_is_pointer: bool) -> bool:
    """The decision for an ambiguous word pointing ``offset`` bytes into its region.

    In order: the position holds non-pointers elsewhere -> literal; an offset the region's element
    type cannot start at -> literal; the position holds strong pointers elsewhere, or the same
    value is a strong pointer elsewhere in the graph -> pointer; the very start of a region (where
    a tensor starts far more often than an int happens to point) -> pointer; else literal."""
    if slot.literal:
        return False
    if alignment and offset % alignment:
        return False
    if slot.pointer or value_is_pointer:
        return True
    return offset == 0


_BITS = re.compile(r"[a-z]+?(\d+)")


def dtype_alignment(dtype: Optional[str]) -> Optional[int]:
    """Bytes a pointer to an element of ``dtype`` (torch / numpy names) is aligned to, or None
    when unknown: ``bfloat16`` -> 2, ``float8_e4m3fn`` -> 1, ``complex64`` -> 4 (its parts)."""
    if not dtype:
        return None
    if dtype == "bool":
        return 1
    m = _BITS.match(dtype)
    if m is None:
        return None
    nbytes = int(m.group(1)) // 8
    if dtype.startswith("complex"):
        nbytes //= 2
    return nbytes if nbytes in (1, 2, 4, 8, 16) else None


# ---- regions that only struct-interior words reach ----------------------------------------------

WEAK_REGION_MIN = 1 << 20     # smaller regions cost the file little: not worth a warning


def weak_region_words(snap, min_size: int = WEAK_REGION_MIN) -> dict:
    """``{region id: [(graph, node id, argument index, byte offset), ...]}`` for saved
    allocations of at least ``min_size`` bytes that only words *inside* by-value struct
    arguments point at: no whole pointer parameter, no memcpy / memset, no named buffer inside,
    no PyTorch RNG state word. A stale device address left in padding drags memory in that way
    (docs/RELIABILITY.md, "Known problems"); real pointers usually reach an allocation some
    other way too."""
    candidates = {r.id for r in snap.regions if r.kind is RegionKind.ALLOCATION
                  and r.policy is Policy.SAVED and r.saved_bytes() >= min_size}
    candidates -= {r.parent for r in snap.regions if r.parent is not None}
    weak: dict = {}
    strong: set = set()
    for g in snap.graphs:
        strong.update(g.checks)
        for n in g.nodes:
            if n.TYPE != "kernel":
                strong.update(n.regions())
                continue
            layout = snap.kernels[n.kernel].params
            for index, a in enumerate(n.arguments(layout)):
                for offset, ref in a.refs:
                    if len(a.data) == 8:
                        strong.add(ref.region)
                    elif ref.region in candidates:
                        weak.setdefault(ref.region, []).append((g.name, n.id, index, offset))
    weak = {rid: words for rid, words in sorted(weak.items()) if rid not in strong}
    if weak:
        # The seed and offset words of torch's RNG kernels are real pointers inside a struct
        # (cgsnap.capture.philox), in a caching-allocator segment nothing else may point at.
        rng = state_regions(snap)
        weak = {rid: words for rid, words in weak.items() if rid not in rng}
    return weak


def weakly_reached_regions(snap, min_size: int = WEAK_REGION_MIN) -> list:
    """``[(region id, saved bytes, number of words), ...]`` of :func:`weak_region_words`."""
    return [(rid, snap.regions[rid].saved_bytes(), len(words))
            for rid, words in weak_region_words(snap, min_size).items()]
