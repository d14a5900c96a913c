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

import numpy as np

from ..errors import CaptureError
from ..format.model import Policy, Ref, RegionKind

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
        self._flat = None           # find_many's disjoint intervals, rebuilt after an add

    def add(self, start: int, size: int, region: int, priority: int) -> None:
        item = (start, start + size, priority, size, region)
        i = bisect.bisect_left(self._ranges, item)
        self._ranges.insert(i, item)
        self._starts.insert(i, start)
        self._max_size = max(self._max_size, size)
        self._flat = None

    def ranges(self) -> list:
        """``[(start, end, priority, size, region), ...]`` sorted by start."""
        return list(self._ranges)

    def _flatten(self) -> tuple:
        """The ranges as disjoint elementary intervals, each labelled with the range
        :meth:`find` picks there: ``(bounds, label)``, interval k = [bounds[k], bounds[k+1]),
        ``label[k]`` an index into ``_ranges`` or -1."""
        if self._flat is None:
            ranges = self._ranges
            bounds = np.unique(np.array([x for r in ranges for x in r[:2]], dtype=np.uint64))
            label = np.full(len(bounds), -1, dtype=np.int64)
            # Paint the worst first so the best wins; among equals the later range (the one
            # find() meets first walking back) is painted last.
            order = sorted(range(len(ranges)), key=lambda k: (-ranges[k][2], -ranges[k][3], k))
            lo = np.searchsorted(bounds, np.array([r[0] for r in ranges], dtype=np.uint64))
            hi = np.searchsorted(bounds, np.array([r[1] for r in ranges], dtype=np.uint64))
            for k in order:
                label[lo[k]:hi[k]] = k
            starts = np.array([r[0] for r in ranges] + [0], dtype=np.uint64)
            regions = np.array([r[4] for r in ranges] + [-1], dtype=np.int64)
            self._flat = (bounds, label, starts, regions)
        return self._flat

    def find_many(self, addrs: np.ndarray) -> tuple:
        """:meth:`find` for an array of addresses: ``(regions, offsets)``, region -1 where
        no range holds the address."""
        addrs = np.asarray(addrs, dtype=np.uint64)
        if not self._ranges or not len(addrs):
            return np.full(len(addrs), -1, dtype=np.int64), np.zeros(len(addrs), dtype=np.uint64)
        bounds, label, starts, regions = self._flatten()
        k = np.searchsorted(bounds, addrs, side="right").astype(np.int64) - 1
        which = np.where(k >= 0, label[np.maximum(k, 0)], -1)
        region = regions[which]               # which == -1 picks the trailing -1
        offset = np.where(which >= 0, addrs - starts[which], np.uint64(0))
        return region, offset

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

    def renumber(self, rmap: dict) -> None:
        """Keep only the ranges of regions in ``rmap`` (old id -> new id), renumbered."""
        self._ranges = [(start, end, prio, size, rmap[region])
                        for start, end, prio, size, region in self._ranges if region in rmap]
        self._starts = [r[0] for r in self._ranges]
        self._max_size = max((r[3] for r in self._ranges), default=0)
        self._flat = None

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


# ---- pointers stored in device memory -----------------------------------------------------------
#
# Saved contents can hold pointers too: pointer arrays (batched / grouped GEMM), structs of
# pointers built in a buffer, a __device__ T* that a library sets at plan time, tables of tables.
# MemoryPointers scans the 8-byte words at 8-aligned addresses of what is saved, with the rules
# of argument words: a word inside a region is a Ref to it (names first); a word inside a device
# allocation the driver knows brings that allocation in (its contents are read and scanned in
# turn); anything else is literal. Words whose low 32 bits are near 0 or 2**32 are ambiguous (an
# int beside 4 stale bytes) and are decided at the end by keep_as_pointer, with every strong
# pointer of the graph (arguments and memory) as evidence.

# Unknown words are looked up through the driver only within this distance of a device region
# the graph is known to use, and never below 4 GiB: random data then costs no driver calls
# (device addresses of one process lie together; a float32, bf16 or small int64 never falls
# there).
HULL_SLACK = 1 << 40
MAX_LOOKUPS = 1 << 16          # driver lookups of unknown words per snapshot
MAX_POINTER_REGIONS = 4096     # allocations that pointers in memory may bring in
DEFAULT_POINTER_BUDGET = 4 << 30   # bytes of saved memory they may bring in
_SCAN_CHUNK = 1 << 23          # words per vectorised step (64 MiB of contents)
_LOOKUP_MIN = 1 << 32          # the driver is never asked about a word below 4 GiB
_DATA_PREFIXES = ("float", "bfloat", "complex")


def holds_pointers(dtype: Optional[str]) -> bool:
    """Whether a named buffer of ``dtype`` is scanned: raw memory and integer types are (a
    pointer array is an int64 tensor), float types and bool hold data, not pointers."""
    return dtype is None or not (dtype.startswith(_DATA_PREFIXES) or dtype == "bool")


def _merge(ranges: list) -> list:
    """Half-open ranges, sorted and merged where they overlap or touch."""
    out: list = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        elif lo < hi:
            out.append((lo, hi))
    return out


def word_candidates(data, origin: int, windows: list, skip=()) -> tuple:
    """``(offsets, words)`` of the 8-byte words at 8-aligned addresses of ``data`` (a region's
    contents, its first byte at address ``origin``) whose value lies in one of ``windows``
    (``[(lo, hi), ...]``, half-open); words overlapping a ``skip`` span ``(start, end)`` (in
    region offsets) are left out."""
    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else \
        data.reshape(-1).view(np.uint8)
    first = (-origin) % 8
    count = max(len(buf) - first, 0) // 8
    offsets, words = [], []
    for a in range(0, count, _SCAN_CHUNK):
        b = min(count, a + _SCAN_CHUNK)
        w = buf[first + 8 * a:first + 8 * b].view("<u8")
        mask = np.zeros(len(w), dtype=bool)
        for lo, hi in windows:
            mask |= (w >= np.uint64(lo)) & (w < np.uint64(hi))
        idx = np.flatnonzero(mask)
        if len(idx):
            offsets.append(first + 8 * (a + idx.astype(np.int64)))
            words.append(w[idx].astype(np.uint64))
    if not offsets:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.uint64)
    offsets, words = np.concatenate(offsets), np.concatenate(words)
    if skip:
        keep = np.ones(len(offsets), dtype=bool)
        for start, end in skip:
            keep &= (offsets + 8 <= start) | (offsets >= end)
        offsets, words = offsets[keep], words[keep]
    return offsets, words


def near_int_words(words: np.ndarray, window: int = WINDOW) -> np.ndarray:
    """:func:`_near_int` over an array of words."""
    low = words & np.uint64(0xFFFF_FFFF)
    return (low < np.uint64(window)) | (low >= np.uint64((1 << 32) - window))


@dataclass
class ScanResult:
    refs: dict          # region id -> rows (offset, target region, target offset), (n, 3) uint64,
                        # sorted by offset
    decisions: list     # one line per ambiguous word decided
    added: list         # ids of the regions brought in by stored pointers
    added_bytes: int    # saved bytes among them


class MemoryPointers:
    """Follows the pointers stored in saved memory to closure.

    ``regions``: the recording's region list (grows as allocations are brought in);
    ``table``: its RangeTable; ``locate(addr)``: ``(base, size)`` of the device allocation
    holding ``addr`` or None (the driver); ``add_allocation(base, size)``: the new region for
    it, entered in ``table`` (the recorder decides its policy; its contents are read only once
    it is within the budgets); ``read(region)``: its contents, read on first use;
    ``scannable(region)``: whether its contents are scanned; ``describe(rid)``: how errors and
    decisions name a region; ``strong_values``: words the kernel arguments use as strong
    pointers (evidence for ambiguous words: the only evidence there is, as a stored word
    that is not ambiguous never has an ambiguous word's value). Budgets: ``budget`` saved bytes and
    ``max_regions`` allocations brought in, ``max_lookups`` driver lookups; past any of them a
    CaptureError names the region, the offset and the budget."""

    def __init__(self, regions: list, table: RangeTable, locate, add_allocation, read,
                 scannable, describe, strong_values=(), budget: int = DEFAULT_POINTER_BUDGET,
                 max_regions: int = MAX_POINTER_REGIONS, max_lookups: int = MAX_LOOKUPS,
                 what: str = "snapshot"):
        self.regions, self.table, self.locate = regions, table, locate
        self.add_allocation, self.read, self.scannable = add_allocation, read, scannable
        self.describe = describe
        self.strong = np.array(sorted(strong_values), dtype=np.uint64)
        self.rows: dict = {}               # region id -> [(offsets, targets, target offsets)]
        self.budget, self.max_regions, self.max_lookups = budget, max_regions, max_lookups
        self.what = what
        self.lookups = 0
        self.negative: set = set()
        self.found = RangeTable()          # allocations located, not yet brought in
        self.brought: dict = {}            # (base, size) -> region id
        self.result = ScanResult({}, [], [], 0)

    # -- windows and lookups ------------------------------------------------------------
    def windows(self) -> tuple:
        """``(windows scanned, windows looked up)``: the device regions known, each widened by
        HULL_SLACK (but never below 4 GiB, where ints live) and merged, plus the host regions
        exactly; unknown words are asked of the driver only inside the widened device windows."""
        device, host = [], []
        for r in self.regions:
            if r.origin is None or r.kind is RegionKind.ARRAY:     # (a CUarray: no address)
                continue
            (host if r.kind is RegionKind.HOST else device).append((r.origin, r.origin + r.size))
        lookup = []
        for lo, hi in sorted(device):
            lo, hi = max(lo - HULL_SLACK, _LOOKUP_MIN), min(hi + HULL_SLACK, _MAX_ADDR)
            if lo >= hi:
                continue
            if lookup and lo <= lookup[-1][1]:
                lookup[-1] = (lookup[-1][0], max(lookup[-1][1], hi))
            else:
                lookup.append((lo, hi))
        low = [(lo, hi) for lo, hi in device if lo < _LOOKUP_MIN]   # known regions below 4 GiB
        return _merge(lookup + host + low), lookup

    def _locate(self, word: int, rid: int, offset: int):
        """The (base, size) of the allocation holding ``word``, looked up once."""
        ref = self.found.find(word)
        if ref is not None:
            return self._found_ranges[ref.region]
        if word in self.negative:
            return None
        self.lookups += 1
        if self.lookups > self.max_lookups:
            raise CaptureError(
                f"{self.what}: {self.describe(rid)} byte {offset:#x}: more than "
                f"{self.max_lookups} distinct words in saved memory look like addresses of "
                "device memory the graph does not otherwise use (data that resembles "
                "pointers?). Name that memory with a float dtype or as Scratch, or pass "
                "memory_pointers='off'.")
        rng = self.locate(word)
        if rng is None:
            self.negative.add(word)
            return None
        self._found_ranges.append(rng)
        self.found.add(rng[0], rng[1], len(self._found_ranges) - 1, ALLOCATION)
        return rng

    def _bring_in(self, rng: tuple, rid: int, offset: int, word: int) -> int:
        """The region of allocation ``rng`` (made now if new), within the budgets."""
        got = self.brought.get(rng)
        if got is not None:
            return got
        region = self.add_allocation(*rng)
        self.brought[rng] = region.id
        res = self.result
        res.added.append(region.id)
        where = (f"{self.describe(rid)} byte {offset:#x} holds {word:#x}, a pointer into the "
                 f"{rng[1]}-byte device allocation at {rng[0]:#x}, which no node names")
        if len(res.added) > self.max_regions:
            raise CaptureError(f"{self.what}: {where}: following pointers stored in device "
                               f"memory would bring in more than {self.max_regions} "
                               "allocations. Name or bind that memory, or pass "
                               "memory_pointers='off'.")
        if region.policy is Policy.SAVED:
            res.added_bytes += region.size
            if res.added_bytes > self.budget:
                raise CaptureError(
                    f"{self.what}: {where}: following pointers stored in device memory would "
                    f"save {res.added_bytes} bytes of memory no node names, more than "
                    f"pointer_budget={self.budget}. Raise pointer_budget, name or bind the "
                    "memory (Bound / Scratch), or pass memory_pointers='off'.")
            if self.scannable(region):
                self.queue.append(region)
        return region.id

    def _check_target(self, target: int, rid: int, offset: int, word: int) -> None:
        if self.regions[target].kind is RegionKind.GRAPH_ALLOC:
            raise CaptureError(
                f"{self.what}: {self.describe(rid)} byte {offset:#x} holds {word:#x}, a pointer "
                f"into {self.describe(target)}, which a mem_alloc node of the graph allocates: "
                "its address exists only once the restored graph is built, after the saved "
                "contents are written, so it cannot be rewritten. Pass memory_pointers='off' "
                "if no kernel reads that word.")

    # -- the closure -------------------------------------------------------------------
    def run(self) -> ScanResult:
        self._found_ranges: list = []
        self.queue = [r for r in self.regions if self.scannable(r)]
        pending = []                     # ambiguous words: (rid, offset, word, rng or Ref)
        while self.queue or pending:
            while self.queue:
                pending += self._scan(self.queue.pop(0))
            if pending:
                self._decide(pending)
                pending = []
        res = self.result
        for rid, chunks in self.rows.items():
            table = np.concatenate([np.stack([np.asarray(c, dtype=np.uint64) for c in chunk],
                                             axis=1) for chunk in chunks])
            if len(table):
                res.refs[rid] = table[np.argsort(table[:, 0], kind="stable")]
        return res

    def _children(self, rid: int) -> tuple:
        return tuple((c.parent_offset, c.parent_offset + c.size) for c in self.regions
                     if c.parent == rid)

    def _scan(self, region) -> list:
        windows, lookup = self.windows()
        offsets, words = word_candidates(self.read(region), region.origin, windows,
                                         self._children(region.id))
        if not len(words):
            return []
        targets, toffs = self.table.find_many(words)
        rid = region.id
        # Unknown words inside the lookup windows: the driver, once per value, in increasing
        # order (one lookup then covers an array of pointers into one allocation).
        unknown = np.flatnonzero(targets < 0)
        located: dict = {}
        if len(unknown) and lookup:
            inside = np.zeros(len(unknown), dtype=bool)
            for lo, hi in lookup:
                inside |= (words[unknown] >= np.uint64(lo)) & (words[unknown] < np.uint64(hi))
            inside = unknown[inside]
            order = inside[np.argsort(words[inside], kind="stable")]
            for i in order.tolist():
                w = int(words[i])
                if w not in located:
                    located[w] = self._locate(w, rid, int(offsets[i]))
        amb = near_int_words(words)
        rows = self.rows.setdefault(rid, [])
        sure = ~amb & (targets >= 0)
        late = np.array([r.kind is RegionKind.GRAPH_ALLOC for r in self.regions], dtype=bool)
        bad = np.flatnonzero(sure & late[np.maximum(targets, 0)])
        if len(bad):
            i = int(bad[0])
            self._check_target(int(targets[i]), rid, int(offsets[i]), int(words[i]))
        rows.append((offsets[sure], targets[sure], toffs[sure]))
        extra = []
        for i in np.flatnonzero(~amb & (targets < 0)).tolist():
            w = int(words[i])
            rng = located.get(w)
            if rng is not None:
                extra.append((int(offsets[i]), self._bring_in(rng, rid, int(offsets[i]), w),
                              w - rng[0]))
        if extra:
            rows.append(tuple(zip(*extra)))
        pending = []
        for i in np.flatnonzero(amb).tolist():
            w = int(words[i])
            if targets[i] >= 0:
                pending.append((rid, int(offsets[i]), w, Ref(int(targets[i]), int(toffs[i]))))
            elif located.get(w) is not None:
                pending.append((rid, int(offsets[i]), w, located[w]))
        return pending

    def _decide(self, pending: list) -> None:
        values = np.array([w for _, _, w, _ in pending], dtype=np.uint64)
        vouched = np.isin(values, self.strong)
        for (rid, offset, word, target), value_is_pointer in zip(pending, vouched.tolist()):
            if isinstance(target, Ref):
                toff, alignment = target.offset, dtype_alignment(self.regions[target.region].dtype)
            else:
                toff, alignment = word - target[0], None
            kept = keep_as_pointer(toff, alignment, SlotEvidence(), value_is_pointer)
            self.result.decisions.append(f"{self.describe(rid)} byte {offset:#x}: word "
                                         f"{word:#x}: {'pointer' if kept else 'literal'}")
            if not kept:
                continue
            t = target.region if isinstance(target, Ref) else \
                self._bring_in(target, rid, offset, word)
            self._check_target(t, rid, offset, word)
            self.rows.setdefault(rid, []).append(((offset,), (t,), (toff,)))
