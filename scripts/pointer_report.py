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

usage: python scripts/pointer_report.py FILE [--most N]
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cgsnap import fileformat  # noqa: E402
from cgsnap.model import Snapshot  # noqa: E402

NEAR = 1 << 30


def report(path: str, most: int = 15) -> str:
    with fileformat.open_file(path, check_types=False) as f:
        snap = Snapshot.from_manifest(f.manifest, [b.raw_length for b in f.blobs], path,
                                      unpack=False)
    suspects, literals, pointers = collections.Counter(), collections.Counter(), []
    example = {}
    for g in snap.graphs:
        for n in g.nodes:
            if n.TYPE != "kernel":
                continue
            params, refs = n.packed
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("--most", type=int, default=15)
    args = ap.parse_args()
    print(report(args.file, args.most))
    return 0


if __name__ == "__main__":
    sys.exit(main())
