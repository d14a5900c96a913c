"""CPU cost of reading a graph's kernel nodes: msgpack decode + validation + restore plan, per
node, schema 3 (columnar kernel tables) against schema 2 (one map per kernel node). No GPU.

usage: PYTHONPATH=. python3 scripts/probes/tables_probe.py [--nodes 20000] [--repeat 3]

A synthetic graph: N kernel nodes of 50 kernels, 4 arguments (two pointers, a u64, a u32), in
one chain of edges. Prints, per schema (each in a fresh process), the first run (what a restore
pays: one file per process) and the best of ``--repeat``, with the cyclic garbage collector off
as ``cgsnap.load()`` has it."""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import msgpack

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from synthetic import schema2_manifest  # noqa: E402

from cgsnap.format.hashing import content_hash  # noqa: E402
from cgsnap.format.model import (Arg, Edge, Graph, Kernel, KernelImage, KernelNode,  # noqa: E402
                                 Policy, Ref, Region, RegionKind, Snapshot)
from cgsnap.restore.plan import GraphPlan, param_offsets  # noqa: E402


def synthetic(n: int) -> Snapshot:
    params = ((0, 8), (8, 8), (16, 8), (24, 4))
    h = content_hash(b"x")
    kernels = [Kernel(i, f"k{i}", h, params) for i in range(50)]
    nodes = []
    for i in range(n):
        args = (Arg(bytes(8), ((0, Ref(0, 64 * (i % 100))),)), Arg(bytes(8), ((0, Ref(0, 0)),)),
                Arg(bytes(8)), Arg(i.to_bytes(4, "little")))
        nodes.append(KernelNode.from_args(i, i % 50, (i % 7 + 1, 1, 1), (128, 1, 1), 0, args,
                                          params))
    edges = [Edge(i, i + 1) for i in range(n - 1)]
    return Snapshot(graphs=[Graph("g", nodes, edges)],
                    regions=[Region(0, RegionKind.ALLOCATION, 1 << 20, Policy.SCRATCH)],
                    images=[KernelImage(h, "cubin", 90, tuple(k.name for k in kernels), b"x", "t")],
                    kernels=kernels, device={"arch": 90})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--schema", type=int, choices=(2, 3), default=None,
                    help="one schema, in this process (default: each in a fresh process)")
    args = ap.parse_args()
    if args.schema is None:
        import subprocess
        for schema in (3, 2):
            subprocess.run([sys.executable, __file__, "--nodes", str(args.nodes), "--repeat",
                            str(args.repeat), "--schema", str(schema)], check=True)
        return
    snap = synthetic(args.nodes)
    gc.disable()
    label = f"schema {args.schema}"
    manifest, _ = snap.to_manifest() if args.schema == 3 else schema2_manifest(snap)
    raw = msgpack.packb(manifest, use_bin_type=True)
    runs = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        m = msgpack.unpackb(raw, raw=False)
        t1 = time.perf_counter()
        s = Snapshot.from_manifest(m, [1], "synthetic")
        t2 = time.perf_counter()
        GraphPlan(s, s.graphs[0], set(), param_offsets(s.kernels))
        t3 = time.perf_counter()
        runs.append((t1 - t0, t2 - t1, t3 - t2))
    for what, (d, v, p) in (("first run", runs[0]), (f"best of {len(runs)}", min(runs, key=sum))):
        print(f"{label}, {what}: manifest {len(raw) / 1e6:.1f} MB; decode {1e3 * d:.1f} ms, "
              f"validate {1e3 * v:.1f} ms, plan {1e3 * p:.1f} ms -> "
              f"{1e6 * (d + v + p) / args.nodes:.2f} us/node")


if __name__ == "__main__":
    main()
