"""Allocator maps: which parts of a caching allocator's segments hold live data.

A caching allocator (torch's) carves each driver allocation (a *segment*) into *blocks*, live
or free. A graph's pointers land in some of the live ones. Saving whole segments made files
several times larger than what the graphs touch (freed activations, other tensors); with an
allocator map a segment stays one region -- so pointers, views and graphs that share it keep
their layout -- but only the blocks the graphs reach are saved (live bytes of live blocks; a
free block the graph's nodes address, whole), each an extent at its offset
(:attr:`cgsnap.format.model.Region.extents`). Everything else is zero at restore.

Pure Python: the reach computation is tested on CPU. An integration builds an
:class:`AllocatorMap` from its allocator's own records (:func:`cgsnap.torch.allocator_map`);
memory outside every segment is a plain allocation and stays whole.

What "reached" means: a pointer (kernel argument word, in-memory pointer) reaches the block
it lands in; a byte span (a memcpy's or memset's box, a named view) reaches every block it
overlaps. A kernel given a pointer into a block is assumed to stay inside that block: torch
allocates each storage as one block, and a kernel has no legal way to reach another
allocation through it.

A *free* block that the graphs reach is saved whole, as it is now: the graph reads memory the
program freed while the graph still uses it (a model dropped after capture -- seen on the
H200), and the original computes from whatever bytes lie there until the allocator hands them
out again. Saving them keeps the restore bit-exact with what the original computes now; the
recorder reports each such block (:func:`reached_free_blocks`), since the program probably has
a bug. Only what the graph's nodes address does this: a pointer found *stored* in saved memory
reaches no free block (a stale stored address mostly points at freed memory).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class Block:
    """``size`` bytes at ``offset`` of its segment; ``live`` bytes from its start hold data
    (the requested size of a live block; 0 for a free one)."""
    offset: int
    size: int
    live: int = 0


@dataclass
class Segment:
    """One driver allocation the allocator manages (for expandable segments: one contiguous
    mapped range). ``policy``/``pool``: what the region becomes (e.g. scratch for a graph's
    private pool) -- None for ordinary saved memory. ``blocks``: sorted, covering the
    segment; an empty tuple means nothing is known and the segment is saved whole."""
    address: int
    size: int
    blocks: tuple = ()
    policy: Optional[object] = None
    pool: Optional[str] = None
    _starts: list = field(default_factory=list, repr=False, compare=False)

    def __post_init__(self):
        self.blocks = tuple(sorted(self.blocks, key=lambda b: b.offset))
        self._starts = [b.offset for b in self.blocks]

    def block_at(self, offset: int) -> Optional[int]:
        """Index of the block holding byte ``offset``, or None."""
        i = bisect.bisect_right(self._starts, offset) - 1
        if i >= 0 and offset < self.blocks[i].offset + self.blocks[i].size:
            return i
        return None


class AllocatorMap:
    """Segments by address (non-overlapping)."""

    def __init__(self, segments=()):
        self.segments = sorted(segments, key=lambda s: s.address)
        self._starts = [s.address for s in self.segments]

    def segment_at(self, addr: int) -> Optional[Segment]:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and addr < self.segments[i].address + self.segments[i].size:
            return self.segments[i]
        return None

    def __len__(self) -> int:
        return len(self.segments)


def _reached_blocks(segment: Segment, pointers, spans) -> set:
    reached = set()
    for p in pointers:
        i = segment.block_at(p)
        if i is not None:
            reached.add(i)
    for off, n in spans:
        if n <= 0:
            i = segment.block_at(off)
            if i is not None:
                reached.add(i)
            continue
        first = segment.block_at(max(off, 0))
        if first is None:
            if off >= segment.size:
                continue
            first = 0
        for i in range(first, len(segment.blocks)):
            if segment.blocks[i].offset >= off + n:
                break
            reached.add(i)
    return reached


def reached_span(segment: Segment, pointers=(), spans=()) -> tuple:
    """``(lo, hi)``: the part of ``segment`` the graphs use -- every block a pointer lands in
    or a span overlaps (live or free: a kernel may use all of a block it is given), and every
    pointer and span itself (a pointer one past the end of a block still has to point inside
    the region). A restore needs only this much memory, at the same relative layout;
    ``(0, 0)`` when nothing is used."""
    lo, hi = segment.size, 0
    for i in _reached_blocks(segment, pointers, spans):
        b = segment.blocks[i]
        lo, hi = min(lo, b.offset), max(hi, b.offset + b.size)
    for p in pointers:
        lo, hi = min(lo, p), max(hi, p)
    for off, n in spans:
        lo, hi = min(lo, off), max(hi, off + max(n, 0))
    if hi <= lo:
        return (0, 0)
    return (max(lo, 0), min(hi, segment.size))


def reached_extents(segment: Segment, pointers=(), spans=(), exclude=(),
                    free_blocks=None) -> list:
    """``[(offset, length)]``: the bytes of the blocks of ``segment`` that ``pointers``
    (segment offsets) land in or ``spans`` (``(offset, length)``) overlap -- a live block's
    live bytes, a free block whole -- minus the ``exclude`` ranges (``(offset, length)``, e.g.
    named views saved on their own), sorted and non-overlapping, one entry per piece of a
    block. ``free_blocks``: the offsets of the free blocks that may be saved, if not every one
    reached (the recorder leaves out those only stored words reach, and those past its
    budget: :func:`cgsnap.capture.record._note_free`). A pointer at or past the end of the
    segment reaches nothing."""
    reached = _reached_blocks(segment, pointers, spans)
    cuts = sorted((o, o + n) for o, n in exclude if n > 0)
    out = []
    for i in sorted(reached):
        b = segment.blocks[i]
        if b.live <= 0 and free_blocks is not None and b.offset not in free_blocks:
            continue
        n = b.size if b.live <= 0 else min(b.live, b.size)
        out.extend(_subtract((b.offset, b.offset + n), cuts))
    return [(lo, hi - lo) for lo, hi in out]


def reached_free_blocks(segment: Segment, pointers=(), spans=(), exclude=()) -> list:
    """``[(offset, size)]`` of the free blocks of ``segment`` that ``pointers`` or ``spans``
    reach (memory the program freed while its graph still uses it) and that ``exclude``
    (views saved on their own) does not cover whole, sorted."""
    cuts = sorted((o, o + n) for o, n in exclude if n > 0)
    out = []
    for i in sorted(_reached_blocks(segment, pointers, spans)):
        b = segment.blocks[i]
        if b.live <= 0 and _subtract((b.offset, b.offset + b.size), cuts):
            out.append((b.offset, b.size))
    return out


def _subtract(interval: tuple, cuts: list) -> list:
    """``interval`` minus the sorted ``cuts``, as sorted half-open pieces."""
    lo, hi = interval
    pieces = []
    for a, b in cuts:
        if a >= hi:
            break
        if b <= lo:
            continue
        if a > lo:
            pieces.append((lo, a))
        lo = max(lo, b)
        if lo >= hi:
            break
    if lo < hi:
        pieces.append((lo, hi))
    return pieces
