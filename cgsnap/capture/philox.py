"""PyTorch's Philox RNG state in captured kernels' parameters.

A random-number kernel of ATen (dropout, ``rand``, ``multinomial``, ...) captured into a CUDA
graph takes a ``PhiloxCudaState`` by value (``aten/src/ATen/cuda/detail/PhiloxCudaStateRaw.cuh``,
torch 2.10 and later)::

    struct PhiloxCudaState {        // 32 bytes, 8-aligned
      Payload seed_;                // +0   captured: int64_t* -> the seed word
      Payload offset_;              // +8   captured: int64_t* -> the base-offset word
      uint64_t offset_intragraph_;  // +16  this kernel's offset into the graph's draw
      bool captured_;               // +24  true; bytes 25..31 are padding
    };

The kernel reads ``*seed_`` and ``*offset_ + offset_intragraph_`` when it runs, so a replay draws
new numbers only because torch writes those two words before each launch. This module finds
such structs in a snapshot, by shape alone (pure Python, no GPU): both pointer words are in the
node's pointer table, ``offset_intragraph_`` is a multiple of 4 (torch rounds every increment up
to 4) below 2**63 (the offset is an int64), ``captured_`` is 1, and the 32 bytes lie inside one
argument. A struct of two pointers, a size and a flag can have that shape too: the caller
confirms each candidate (:mod:`cgsnap.torch` by the values one probing replay writes there).
"""
from __future__ import annotations

import bisect
import struct
from typing import NamedTuple

from ..format.model import Ref

STATE_BYTES = 32
_CAPTURED = 24
_INTRA_LIMIT = 1 << 63
_U64 = struct.Struct("<Q")


class StateUse(NamedTuple):
    """One kernel node's PhiloxCudaState: where it is and which words it reads."""
    graph: str
    node: int          # node id
    pos: int           # byte position of the struct in the node's parameter buffer
    intra: int         # offset_intragraph_
    seed: Ref
    offset: Ref


def states_in_params(params: bytes, positions, layout) -> list:
    """``[(pos, intra), ...]``: the PhiloxCudaState-shaped structs of one parameter buffer.

    ``positions`` are the byte positions of the buffer's pointer words (its pointer table),
    ``layout`` the kernel's ``((offset, size), ...)``."""
    pointers = set(positions)
    starts = [off for off, _ in layout]
    out = []
    for pos in sorted(pointers):
        if pos % 8 or pos + 8 not in pointers or pos + STATE_BYTES > len(params):
            continue
        i = bisect.bisect_right(starts, pos) - 1
        if i < 0 or pos + STATE_BYTES > layout[i][0] + layout[i][1]:
            continue                     # not inside one argument
        if params[pos + _CAPTURED] != 1:
            continue
        intra = _U64.unpack_from(params, pos + 16)[0]
        if intra % 4 or intra >= _INTRA_LIMIT:
            continue
        out.append((pos, intra))
    return out


def find_states(snap) -> list:
    """Every :class:`StateUse` in the kernel nodes of ``snap``'s graphs (child graphs too)."""
    out = []
    for g in snap.graphs:
        for n in g.nodes:
            if n.TYPE != "kernel" or len(n.refs) < 48:
                continue
            table = n.pointer_table()
            positions = table["pos"].tolist()
            hits = states_in_params(n.params, positions, snap.kernels[n.kernel].params)
            if not hits:
                continue
            row = {p: i for i, p in enumerate(positions)}
            regions, offsets = table["region"].tolist(), table["offset"].tolist()
            for pos, intra in hits:
                a, b = row[pos], row[pos + 8]
                out.append(StateUse(g.name, n.id, pos, intra, Ref(regions[a], offsets[a]),
                                    Ref(regions[b], offsets[b])))
    return out


def state_regions(snap) -> set:
    """Ids of the regions PhiloxCudaState words point into."""
    return {r for use in find_states(snap) for r in (use.seed.region, use.offset.region)}


# ---- confirming candidates with one probing replay (cgsnap.torch) -------------------------------
#
# Before the replay, generator i is set to PROBE[i]; torch's replay writes each generator's seed
# and offset into that generator's words, then advances its offset by the graph's increment.

PROBE_SEED = 0x9E37_79B9_7F4A_7C15
PROBE_OFFSET = 0x5EED_0000_0000        # torch's offsets are multiples of 4
PROBE_STRIDE = 1 << 16


def probe_states(count: int) -> list:
    """``[(seed, offset), ...]``: the distinct state generator ``i`` is set to for the probe."""
    return [(PROBE_SEED + i, PROBE_OFFSET + PROBE_STRIDE * i) for i in range(count)]


def match_probe(where: str, uses: list, read: dict, increments: list, names: list,
                rng_blocks: set, addresses: dict) -> list:
    """``[(generator index, (seed Ref, offset Ref), increment), ...]`` after a probe.

    ``uses``: :func:`find_states` of the graph; ``read``: ``{(seed Ref, offset Ref): (seed word,
    offset word)}`` as the words read after the replay; ``increments[i]``: how far generator
    ``i``'s offset moved (``names[i]`` its name, None for the default generator);
    ``rng_blocks``: addresses of the allocator's 8-byte blocks (torch's RNG words are such
    tensors); ``addresses``: the words' addresses per pair. Raises CaptureError when the graph
    could not be restored drawing what torch's replays draw."""
    from ..errors import CaptureError
    first = {}
    for u in uses:
        first.setdefault((u.seed, u.offset), u)
    probes = probe_states(len(names))
    by_gen: dict = {}
    for key, values in read.items():
        if values in probes:
            i = probes.index(values)
            if i in by_gen:
                raise CaptureError(f"{where}: two pairs of RNG state words (kernel nodes "
                                   f"{first[by_gen[i]].node} and {first[key].node}) for one "
                                   "generator")
            by_gen[i] = key
        elif all(a in rng_blocks for a in addresses[key]):
            raise CaptureError(f"{where}: kernel node {first[key].node} reads the RNG state of a "
                               "generator that was not given: pass the torch.Generator it draws "
                               "from, save(..., generators={'name': gen})")
        # else: a struct of that shape that is no RNG state; its words are ordinary memory
    out = []
    for i, (name, increment) in enumerate(zip(names, increments)):
        which = "the default generator" if name is None else f"generator {name!r}"
        if increment < 0 or increment % 4:
            raise CaptureError(f"{where}: a replay moved the offset of {which} by {increment}")
        if i in by_gen:
            out.append((i, by_gen[i], increment))
        elif increment:
            raise CaptureError(f"{where}: a replay advances {which} by {increment}, but no kernel "
                               "argument of the graph holds its RNG state words; the restored "
                               "graph would draw the same numbers on every replay")
    return out
