"""A machine for :mod:`cgsnap.restore.trace` that runs nodes in numpy (CPU tests of trace,
bisect and extract), and a small chain graph whose kernels it knows.

Kernel ``axpb(const float* src, float* dst, float a, float b, int n)``: dst[i] = a*src[i] + b;
memcpy and memset nodes run as the driver would (1D and pitched 2D).
"""
from __future__ import annotations

import struct

import numpy as np

from cgsnap.format.hashing import content_hash, region_hash
from cgsnap.format.model import (Edge, Graph, Kernel, KernelImage, KernelNode, MemcpyNode,
                                 MemsetNode, Policy, Ref, Region, RegionKind, Snapshot)
from cgsnap.format.model import Arg

AXPB = "axpb"
AXPB_LAYOUT = ((0, 8), (8, 8), (16, 4), (20, 4), (24, 4))
N = 64


def axpb(mem, node, snap, fma=False):
    refs = dict(node.pointers())
    src, dst = refs[0], refs[8]
    a, b = struct.unpack_from("<ff", node.params, 16)
    n, = struct.unpack_from("<i", node.params, 24)
    x = mem[src.region][src.offset:src.offset + 4 * n].view(np.float32)
    y = mem[dst.region][dst.offset:dst.offset + 4 * n].view(np.float32)
    y[:] = np.float32(a) * x + np.float32(b)


KERNELS = {AXPB: axpb}


class NumpyMachine:
    """Regions as numpy arrays; ``load(blob index)`` reads saved contents of a file's model."""

    def __init__(self, snap, load=None, kernels=None):
        self.snapshot = snap
        self.load = load
        self.kernels = dict(KERNELS, **(kernels or {}))
        self.mem: dict = {}
        self.runs = 0

    def describe(self) -> dict:
        return {"name": "numpy", "arch": 90, "driver": 13000}

    def reset(self) -> None:
        self.mem = {}
        for r in self.snapshot.regions:
            if r.policy is Policy.SAVED:
                data = self.load(r.data) if isinstance(r.data, int) else r.data
                self.mem[r.id] = np.frombuffer(bytes(memoryview(data).cast("B")),
                                               dtype=np.uint8).copy()
            else:
                self.mem[r.id] = np.zeros(r.size, dtype=np.uint8)

    def run(self, step, graph_name: str) -> None:
        n = step.node
        self.runs += 1
        if n.TYPE == "kernel":
            self.kernels[self.snapshot.kernels[n.kernel].name](self.mem, n, self.snapshot)
        elif n.TYPE == "memcpy":
            src, dst = self.mem[n.src.region], self.mem[n.dst.region]
            for row in range(n.height):
                so = n.src.offset + row * (n.src_pitch or n.width)
                do = n.dst.offset + row * (n.dst_pitch or n.width)
                dst[do:do + n.width] = src[so:so + n.width]
        elif n.TYPE == "memset":
            word = n.value.to_bytes(4, "little")[:n.element_size]
            row = np.frombuffer(word * n.width, dtype=np.uint8)
            dst = self.mem[n.dst.region]
            for r_ in range(n.height):
                o = n.dst.offset + r_ * (n.pitch or n.width * n.element_size)
                dst[o:o + row.size] = row

    def read(self, rid: int) -> np.ndarray:
        return self.mem[rid].copy()

    def write(self, rid: int, data) -> None:
        self.mem[rid][:] = np.frombuffer(bytes(data), dtype=np.uint8)


def _axpb_node(nid, src, dst, a, b):
    args = (Arg(bytes(8), ((0, src),)), Arg(bytes(8), ((0, dst),)), Arg(struct.pack("<f", a)),
            Arg(struct.pack("<f", b)), Arg(struct.pack("<i", N)))
    return KernelNode.from_args(nid, 0, (1, 1, 1), (N, 1, 1), 0, args, AXPB_LAYOUT)


def make_chain(with_checks: bool = True) -> Snapshot:
    """x -axpb(2,1)-> y -axpb(3,0)-> z -memcpy-> w; memset y = 0; w -axpb(1,0.5)-> y."""
    image = b"\x7fELF" + bytes(range(64)) * 2
    h = content_hash(image)
    x = (np.arange(N, dtype=np.float32) - 7) / 4
    w = np.full(N, 9.0, dtype=np.float32)
    f32 = {"dtype": "float32", "shape": (N,)}
    regions = [
        Region(0, RegionKind.NAMED, 4 * N, Policy.SAVED, name="x", data=x.tobytes(),
               content_hash=region_hash(x.tobytes()), **f32),
        Region(1, RegionKind.NAMED, 4 * N, Policy.SCRATCH, name="y", **f32),
        Region(2, RegionKind.NAMED, 4 * N, Policy.SCRATCH, name="z", **f32),
        Region(3, RegionKind.ALLOCATION, 4 * N, Policy.SAVED, data=w.tobytes(),
               content_hash=region_hash(w.tobytes())),
    ]
    nodes = [
        _axpb_node(0, Ref(0, 0), Ref(1, 0), 2.0, 1.0),
        _axpb_node(1, Ref(1, 0), Ref(2, 0), 3.0, 0.0),
        MemcpyNode(2, Ref(2, 0), Ref(3, 0), 4 * N),
        MemsetNode(3, Ref(1, 0), 0, 4, N),
        _axpb_node(4, Ref(3, 0), Ref(1, 0), 1.0, 0.5),
    ]
    g = Graph("chain", nodes, [Edge(i, i + 1) for i in range(4)])
    snap = Snapshot(graphs=[g], regions=regions,
                    images=[KernelImage(h, "cubin", 90, (AXPB,), image, "test")],
                    kernels=[Kernel(0, AXPB, h, AXPB_LAYOUT)],
                    device={"name": "NVIDIA H200", "arch": 90, "cc": [9, 0], "driver": 13000},
                    versions={"cgsnap": "0.1.0"}, meta={"name": "chain"})
    if with_checks:
        from cgsnap.restore.trace import plan_steps
        m = NumpyMachine(snap)
        m.reset()
        for s in plan_steps(snap, g):
            m.run(s, g.name)
        g.checks = {1: m.read(1), 2: m.read(2)}
    return snap
