"""torch's Philox RNG state in kernel parameters (cgsnap.capture.philox), CPU: the struct's
shape in synthetic parameter bytes, the regions its words reach (never "suspect"), and the
bookkeeping of the probing replay that confirms the words and measures the increment."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from cgsnap.capture import philox
from cgsnap.errors import CaptureError
from cgsnap.format.hashing import content_hash
from cgsnap.format.model import (Arg, Graph, Kernel, KernelImage, KernelNode, Policy, Ref, Region,
                                 RegionKind, Snapshot)

SEED_AT, OFFSET_AT = 0x7F00_0000_0200, 0x7F00_0000_0400    # the two 8-byte tensors


def state(seed=SEED_AT, offset=OFFSET_AT, intra=12, captured=1) -> bytes:
    """A PhiloxCudaState as a captured kernel receives it (padding bytes left as garbage)."""
    return struct.pack("<QQQB7s", seed, offset, intra, captured, b"\xab" * 7)


def scan(params: bytes, positions, layout) -> list:
    return philox.states_in_params(params, positions, layout)


# ---- the struct's shape ------------------------------------------------------------------------

LAYOUT = ((0, 8), (8, 32), (40, 4))          # (float* out, PhiloxCudaState, int n)


def buffer(st: bytes) -> bytes:
    return (0x7F00_1000_0000).to_bytes(8, "little") + st + (7).to_bytes(4, "little")


def test_a_captured_state_is_found_with_its_intragraph_offset():
    assert scan(buffer(state(intra=12)), [0, 8, 16], LAYOUT) == [(8, 12)]
    assert scan(buffer(state(intra=0)), [0, 8, 16], LAYOUT) == [(8, 0)]


@pytest.mark.parametrize("label,st,positions,layout", [
    ("not captured", state(captured=0), [0, 8, 16], LAYOUT),
    ("flag byte is no bool", state(captured=2), [0, 8, 16], LAYOUT),
    ("intragraph offset not a multiple of 4", state(intra=6), [0, 8, 16], LAYOUT),
    ("intragraph offset beyond int64", state(intra=1 << 63), [0, 8, 16], LAYOUT),
    ("offset word is no pointer", state(), [0, 8], LAYOUT),
    ("seed word is no pointer", state(), [0, 16], LAYOUT),
    ("straddles two arguments", state(), [0, 8, 16], ((0, 8), (8, 16), (24, 20))),
    ("runs past the buffer", state()[:24], [0, 8, 16], ((0, 8), (8, 24))),
])
def test_other_shapes_are_not_states(label, st, positions, layout):
    params = buffer(st)[:max(o + s for o, s in layout)].ljust(max(o + s for o, s in layout), b"\0")
    assert scan(params, positions, layout) == [], label


def test_a_misaligned_state_is_not_found():
    params = (7).to_bytes(4, "little") + state() + bytes(4)
    assert scan(params, [4, 12], ((0, 4), (4, 32), (36, 4))) == []


def test_a_state_inside_a_larger_struct_is_found():
    """flash-attention style: the state is a member of a parameter struct."""
    arg = (0x7F00_2000_0000).to_bytes(8, "little") + bytes(8) + state(intra=40) + bytes(8)
    params = (5).to_bytes(4, "little") + bytes(4) + arg
    assert scan(params, [8, 24, 32], ((0, 4), (8, len(arg)))) == [(24, 40)]


def rng_snapshot(intra=(0, 16)) -> Snapshot:
    """One graph, two dropout-like kernels reading the seed and offset words of region 1 (a 2 MiB
    caching-allocator segment), output in region 0."""
    image = b"\x7fELF" + bytes(64)
    h = content_hash(image)
    seg = np.zeros(2 << 20, np.uint8)
    out = np.zeros(4096, np.uint8)
    layout = ((0, 8), (8, 32), (40, 4))
    nodes = []
    for i, off in enumerate(intra):
        nodes.append(KernelNode.from_args(i, 0, (4, 1, 1), (256, 1, 1), 0, (
            Arg(bytes(8), ((0, Ref(0, 0)),)),
            Arg(state(0, 0, off), ((0, Ref(1, 0x200)), (8, Ref(1, 0x400)))),
            Arg((1024).to_bytes(4, "little"))), layout))
    regions = [Region(0, RegionKind.NAMED, out.size, Policy.SAVED, name="y", data=out,
                      content_hash=content_hash(out)),
               Region(1, RegionKind.ALLOCATION, seg.size, Policy.SAVED, data=seg,
                      content_hash=content_hash(seg))]
    return Snapshot(graphs=[Graph("step", nodes, [])], regions=regions,
                    images=[KernelImage(h, "cubin", 90, ("dropout",), image, "test")],
                    kernels=[Kernel(0, "dropout", h, layout)], device={"arch": 90})


def test_find_states_names_node_words_and_offsets():
    uses = philox.find_states(rng_snapshot())
    assert [(u.graph, u.node, u.pos, u.intra) for u in uses] == [("step", 0, 8, 0),
                                                                  ("step", 1, 8, 16)]
    assert {(u.seed, u.offset) for u in uses} == {(Ref(1, 0x200), Ref(1, 0x400))}
    assert philox.state_regions(rng_snapshot()) == {1}



# ---- the probe's bookkeeping -----------------------------------------------------------------

def probe_result(read_values, increments, names=(None,), blocks=()):
    snap = rng_snapshot()
    uses = philox.find_states(snap)
    key = (uses[0].seed, uses[0].offset)
    return philox.match_probe("graph 'step'", uses, {key: read_values}, list(increments),
                              list(names), set(blocks), {key: (SEED_AT, OFFSET_AT)}), key


def test_probe_matches_the_words_to_the_generator_that_wrote_them():
    probes = philox.probe_states(2)
    assert len(set(probes)) == 2 and all(o % 4 == 0 for _, o in probes)
    got, key = probe_result(probes[1], [0, 32], names=[None, "sampler"])
    assert got == [(1, key, 32)]


def test_probe_refuses_a_generator_that_advances_without_words():
    with pytest.raises(CaptureError, match="advances the default generator by 16, but no kernel"):
        probe_result((1, 2), [16])


def test_probe_refuses_rng_words_of_a_generator_not_given():
    with pytest.raises(CaptureError, match=r"generator that was not given.*generators="):
        probe_result((1, 2), [0], blocks=(SEED_AT, OFFSET_AT))


def test_probe_ignores_a_lookalike_struct():
    """Words that hold no probe value and are no 8-byte RNG tensors: ordinary memory."""
    assert probe_result((1, 2), [0], blocks=(SEED_AT,))[0] == []


def test_probe_refuses_odd_increments():
    with pytest.raises(CaptureError, match="moved the offset of the default generator by 6"):
        probe_result(philox.probe_states(1)[0], [6])
