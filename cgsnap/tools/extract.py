"""``cgsnap extract FILE --node N[..M] -o OUT``: a minimal reproducer of some nodes of a graph.

On a GPU of the file's arch, the graph is replayed node by node from the saved state up to node
N (in the order of its trace, else topological; when the file carries a trace, each of those
steps is checked against it); then the nodes N..M (that stretch of the order) run once more
while being recorded. OUT holds only those nodes (edges between them kept), the regions they
may write with their contents as they were just before node N ran, only the kernels they launch
and the images holding them, a trace of the steps, and as recorded outputs (``replay --check``)
what the nodes did in the source: from the source's trace where it holds the bytes, else from
this run. ``replay --check OUT`` then reproduces what the nodes did in the original.
"""
from __future__ import annotations

import datetime
import os
import platform
import re
from typing import Callable, Optional

from ..binary.demangle import short
from ..restore.trace import DEFAULT_BUDGET, extract, plan_steps, trace_order
from . import UsageError

_SPEC = re.compile(r"^(\d+)(?:\.\.(\d+))?$")


def parse_nodes(spec: str) -> tuple:
    m = _SPEC.match(spec.strip())
    if not m:
        raise UsageError(f"--node {spec!r}: expected a node id N or a range N..M")
    first = int(m.group(1))
    return first, int(m.group(2)) if m.group(2) is not None else first


def choose_graph(snap, graph: Optional[str], path: str):
    top = [g for g in snap.graphs if g.top_level]
    if graph is None:
        if len(top) != 1:
            raise UsageError(f"{path} holds {len(top)} graphs ({', '.join(g.name for g in top)}): "
                             "pick one with --graph")
        return top[0]
    for g in top:
        if g.name == graph:
            return g
    raise UsageError(f"{path}: no top-level graph named {graph!r} (graphs: "
                     f"{', '.join(g.name for g in top)})")


def extract_to(machine, path: str, graph_name: Optional[str], spec: str, out: str,
               load: Callable, budget: int = DEFAULT_BUDGET, save: bool = True):
    """``(Extraction, report lines)``; writes ``out`` unless ``save`` is false."""
    snap = machine.snapshot
    g = choose_graph(snap, graph_name, path)
    first, last = parse_nodes(spec)
    steps = plan_steps(snap, g, trace_order(g), what="extract")
    pos = {s.node.id: s.position for s in steps}
    for nid in (first, last):
        if nid not in pos:
            raise UsageError(f"graph {g.name!r} has no node {nid} (ids "
                             f"{min(pos, default=0)}..{max(pos, default=0)})")
    lo, hi = pos[first], pos[last]
    if lo > hi:
        raise UsageError(f"node {first} runs after node {last} (steps {lo} and {hi}): give the "
                         "range in the order the nodes run")
    meta = {"name": f"{snap.meta.get('name', g.name)}-nodes-{first}" +
                    (f"-{last}" if last != first else ""),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(),
            "extracted_from": {"file": os.path.basename(path), "graph": g.name,
                               "nodes": [s.node.id for s in steps[lo:hi + 1]], "steps": [lo, hi],
                               "machine": machine.describe()}}
    ex = extract(machine, g, steps, lo, hi, load, meta, budget)
    meta["extracted_from"]["expected_from"] = ex.expected_from
    if ex.prefix_divergence is not None:
        meta["extracted_from"]["prefix_divergence"] = ex.prefix_divergence
    if save:
        ex.snapshot.save(out)
    new = ex.snapshot
    count = hi - lo + 1
    what = f"node {first}" if count == 1 else f"nodes {first}..{last} ({count} steps)"
    saved = sum(r.size for r in new.regions)
    lines = [f"extracted graph {g.name!r} {what} of {path} into {out}: "
             f"{len(new.graphs[0].nodes)} node(s), {len(new.kernels)} kernel(s), "
             f"{len(new.regions)} region(s) ({saved} bytes saved)"]
    for k in new.kernels:
        lines.append(f"  kernel {short(k.name, 100)}")
    if lo == 0:
        lines.append("  inputs: the saved state (the range starts the graph)")
    elif g.trace is None:
        lines.append(f"  inputs: as they were before node {first} ran (steps 0-{lo - 1} "
                     "replayed here; the source carries no trace to check them against)")
    elif ex.prefix_divergence is None:
        lines.append(f"  inputs: as they were before node {first} ran (steps 0-{lo - 1} "
                     "replayed here, each matching the source's trace)")
    else:
        lines.append(f"  WARNING inputs: step {ex.prefix_divergence} already differs from the "
                     "source's trace on this machine: the inputs are this machine's, not the "
                     "source's (cgsnap bisect names that node)")
    checked = ", ".join(_label(new, rid) for rid in sorted(new.graphs[0].checks))
    source = "the source's recorded trace" if ex.expected_from == "trace" else \
        "this machine's run of the nodes" + ("" if g.trace is None else
                                             " (the source's trace does not hold them)")
    lines.append(f"  replay --check compares {checked or 'nothing'}, as left by {source}")
    return ex, lines


def _label(snap, rid: int) -> str:
    r = snap.regions[rid]
    name = r.name or r.symbol
    return f'region {rid} "{name}"' if name else f"region {rid} ({r.kind.value})"


def run_extract(path: str, spec: str, out: str, graph: Optional[str] = None, device: int = 0,
                budget: int = DEFAULT_BUDGET, allow_jit: bool = False, key=None) -> int:
    from .. import load as cg_load
    from ..format import fileformat
    from ..format.snapfile import read
    from ..restore.stepper import Stepper
    snap, f = read(path, load_images=False)          # usage problems before any GPU work
    f.close()
    g = choose_graph(snap, graph, path)
    first, last = parse_nodes(spec)
    ids = {n.id for n in g.nodes}
    for nid in (first, last):
        if nid not in ids:
            raise UsageError(f"graph {g.name!r} has no node {nid}")
    with cg_load(path, device=device, allow_jit=allow_jit, require_signature=key) as r, \
            fileformat.open_file(path) as f:
        _, lines = extract_to(Stepper(r), path, g.name, spec, out,
                              lambda e: bytes(f.blob(e.data)), budget)
    print("\n".join(lines))
    return 0
