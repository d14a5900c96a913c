"""Which kernel-argument words a snapshot took for pointers, and which it kept as literals although
they look like addresses -- for chasing a misclassified word (docs/PERFORMANCE.md, "Open
problem"). The file keeps each argument's original bytes, so the captured values are all here.

Two lists:
  suspect pointers  words rewritten at restore whose captured value is not 8-byte aligned
                    (device pointers from allocators are; an int sharing a word with 4
                    uninitialised bytes often is not);
  near literals     words left alone whose value lies within 1 GiB of the captured pointers:
                    a capture with a slightly different address layout would have taken them
                    for pointers.
Compare the report of a failing capture with a good one of the same program.

With --reclassify, today's classifier (cgsnap.capture.classify, including the ambiguous-word rules) runs
again over the captured bytes, with each region placed where the file's own pointers say it was,
and the words it would decide differently are listed: a file written before a classifier fix
shows what the fix changes.

usage: python scripts/pointer_report.py FILE [--most N] [--reclassify]
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cgsnap.capture.classify import ALLOCATION, NAMED, SPECIAL, make_lookup
from cgsnap.format import fileformat
from cgsnap.format.model import Graph, KernelNode, RegionKind, Snapshot

NEAR = 1 << 30


def report(path: str, most: int = 15) -> str:
    with fileformat.open_file(path, check_types=False) as f:
        snap = Snapshot.from_manifest(f.manifest, [b.raw_length for b in f.blobs], path)
    suspects, literals, pointers = collections.Counter(), collections.Counter(), []
    example = {}
    for g in snap.graphs:
        for n in g.nodes:
            if n.TYPE != "kernel":
                continue
            params, refs = n.params, n.refs
            words = np.frombuffer(params[:len(params) // 8 * 8], "<u8").tolist()
            table = np.frombuffer(refs, "<u8").reshape(-1, 3).tolist()
            name = snap.kernels[n.kernel].name
            marked = set()
            for pos, region, offset in table:
                marked.add(pos // 8)
                pointers.append(words[pos // 8])
                if words[pos // 8] % 8:
                    key = (name, pos, region)
                    suspects[key] += 1
                    example.setdefault(key, (g.name, n.id, words[pos // 8], offset))
            for i, w in enumerate(words):
                if i not in marked:
                    literals[(name, 8 * i, w)] += 1
                    example.setdefault((name, 8 * i, w), (g.name, n.id))
    lines = [f"{path}: {len(pointers)} pointer words in kernel arguments"]
    if not pointers:
        return "\n".join(lines)
    lo, hi = min(pointers), max(pointers)
    lines.append(f"captured pointers span {lo:#x} .. {hi:#x}")
    lines.append(f"suspect pointers (not 8-byte aligned): {sum(suspects.values())}")
    for (name, pos, region), count in suspects.most_common(most):
        graph, node, value, offset = example[(name, pos, region)]
        lines.append(f"  x{count:<5} {name[:60]} @{pos}: {value:#x} -> region {region} + {offset}"
                     f" (e.g. graph {graph} node {node})")
    near = {k: c for k, c in literals.items() if lo - NEAR <= k[2] <= hi + NEAR}
    lines.append(f"near literals (within 1 GiB of the pointers, kept literal): {len(near)}")
    for (name, pos, value), count in sorted(near.items(), key=lambda kv: -kv[1])[:most]:
        graph, node = example[(name, pos, value)]
        lines.append(f"  x{count:<5} {name[:60]} @{pos}: {value:#x} (e.g. graph {graph} node {node})")
    return "\n".join(lines)


def reclassify(snap: Snapshot) -> tuple:
    """``(changes, decisions)``: the words today's classifier decides differently from the file,
    as ``(graph, node, kernel name, byte, value, was, now)``, and its ambiguous-word lines."""
    import dataclasses

    from cgsnap.capture.record import Recording
    nodes = []                       # (graph name, node, unpacked args)
    origin: dict = {}
    for g in snap.graphs:
        for n in g.nodes:
            if n.TYPE == "kernel":
                args = n.arguments(snap.kernels[n.kernel].params)
                nodes.append((g.name, n, args))
                for a in args:
                    for o, ref in a.refs:
                        origin.setdefault(ref.region,
                                          int.from_bytes(a.data[o:o + 8], "little") - ref.offset)
    rec = Recording(None, None, None)
    rec.lookup = make_lookup(rec.table)        # no driver: only the file's regions
    rec.kernels = list(snap.kernels)
    prio = {RegionKind.NAMED: NAMED, RegionKind.ALLOCATION: ALLOCATION}
    rec.regions = [dataclasses.replace(r, origin=origin.get(r.id)) for r in snap.regions]
    for r in rec.regions:
        if r.origin is not None:
            rec.table.add(r.origin, r.size, r.id, prio.get(r.kind, SPECIAL))
    redone, by_graph = [], {}
    for gname, n, args in nodes:
        fresh = KernelNode(n.id, n.kernel, n.grid, n.block, n.shared_mem, b"")
        rec.classified_node(fresh, [a.data for a in args], f"graph {gname!r} node {n.id}")
        redone.append((gname, args, fresh))
        by_graph.setdefault(gname, []).append(fresh)
    rec.graphs = [Graph(name, ns, []) for name, ns in by_graph.items()]
    rec.decide_ambiguous()
    changes = []
    for gname, old, fresh in redone:
        layout = snap.kernels[fresh.kernel].params
        for (off, _), a, b in zip(layout, old, fresh.arguments(layout)):
            was, now = dict(a.refs), dict(b.refs)
            for o in sorted(set(was) | set(now)):
                if was.get(o) != now.get(o):
                    changes.append((gname, fresh.id, snap.kernels[fresh.kernel].name, off + o,
                                    int.from_bytes(a.data[o:o + 8], "little"),
                                    was.get(o), now.get(o)))
    return changes, rec.decisions


def reclassify_report(path: str, most: int = 15) -> str:
    with fileformat.open_file(path, check_types=False) as f:
        snap = Snapshot.from_manifest(f.manifest, [b.raw_length for b in f.blobs], path)
    changes, decisions = reclassify(snap)
    lines = [f"{path}: reclassified; {len(decisions)} ambiguous words, "
             f"{len(changes)} decided differently from the file"]
    grouped = collections.Counter((c[2], c[3], c[4], c[5], c[6]) for c in changes)
    for (name, pos, value, was, now), count in grouped.most_common(most):
        lines.append(f"  x{count:<5} {name[:60]} @{pos}: {value:#x} "
                     f"{'literal' if was is None else f'region {was.region} + {was.offset}'} -> "
                     f"{'literal' if now is None else f'region {now.region} + {now.offset}'}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("--most", type=int, default=15)
    ap.add_argument("--reclassify", action="store_true",
                    help="also run today's classifier over the captured bytes and list changes")
    args = ap.parse_args()
    print(report(args.file, args.most))
    if args.reclassify:
        print(reclassify_report(args.file, args.most))
    return 0


if __name__ == "__main__":
    sys.exit(main())
