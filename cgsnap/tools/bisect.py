"""``cgsnap bisect FILE``: replay a traced snapshot node by node and name the first node whose
result differs from the trace recorded at save time (``snapshot(..., trace=True)``).

On a GPU of the file's arch, each top-level graph that carries a trace runs from the saved state
one node at a time, in the recorded order (:mod:`cgsnap.restore.trace`); after each node the
digest of every region it may write is compared with the recorded one. At the first difference
the steps before it are replayed once more to show the region before the node ran, what the
trace says the node left there (when the trace kept those bytes, or the node left the region
unchanged) and what it left here; running the node a second time from the same inputs tells a
difference of machines from a kernel that differs run to run.
"""
from __future__ import annotations

import json
import sys
from typing import Callable, Optional

import numpy as np

from ..binary.demangle import demangle
from ..errors import CgsnapError
from ..restore.trace import (expected_after, first_divergence, plan_steps, state_before,
                             trace_order)
from . import UsageError
from .compare import compare_arrays, elements, format_values

BISECT_SCHEMA = 1
SHOWN = 8                  # elements shown before / expected / got


def _device_text(d: dict) -> str:
    drv = d.get("driver")
    drv = f"{drv // 1000}.{drv % 1000 // 10}" if isinstance(drv, int) and drv else "?"
    return f"{d.get('name', '?')} (sm_{d.get('arch', '?')}, driver {drv})"


def _label(snap, rid: int) -> str:
    r = snap.regions[rid]
    name = r.name or r.symbol
    return f'region {rid} "{name}"' if name else f"region {rid} ({r.kind.value})"


def _values(before, expected, got, dtype, start: int) -> dict:
    return {"index": start, "before": format_values(before, dtype, start, SHOWN),
            "expected": None if expected is None else format_values(expected, dtype, start, SHOWN),
            "got": format_values(got, dtype, start, SHOWN)}


def bisect_graph(machine, graph, load: Callable, progress: Optional[Callable] = None) -> dict:
    """The report for one traced graph, run on ``machine``."""
    snap = machine.snapshot
    steps = plan_steps(snap, graph, trace_order(graph), what="bisect")
    out = {"graph": graph.name, "steps": len(steps), "result": "match", "checked": len(steps),
           "first_difference": None}
    found = first_divergence(machine, graph.name, steps, graph.trace, progress)
    if found is None:
        return out
    pos, bad = found
    step, recorded = steps[pos], graph.trace[pos]
    before = state_before(machine, graph.name, steps, pos, sorted(bad))
    machine.run(step, graph.name)
    again = {rid: machine.read(rid) for rid in bad}
    node = step.node
    diff = {"step": pos, "node": node.id, "type": node.TYPE, "regions": []}
    if node.TYPE == "kernel":
        k = snap.kernels[node.kernel]
        diff.update(kernel=k.name, demangled=demangle(k.name))
    elif node.TYPE == "graph":
        diff["child_graph"] = node.graph
    entries = {e.region: e for e in recorded.entries}
    for rid in sorted(bad):
        region = snap.regions[rid]
        got = bad[rid]
        expected = expected_after(before[rid], entries[rid], load)
        item = {"region": rid, "label": _label(snap, rid), "dtype": elements(region.dtype).name,
                "expected_known": expected is not None,
                "same_when_run_again": bool(np.array_equal(again[rid], got))}
        if expected is not None:
            c = compare_arrays(expected, got, region.dtype)
            item["comparison"] = c.to_json()
            item["summary"] = c.summary("expected", "got")
        else:
            c = compare_arrays(before[rid], got, region.dtype)
            item["changed_here"] = c.to_json()
            item["summary"] = ("differs from the recorded digest; the trace does not hold "
                               "the bytes the node left (they were over its byte budget), so "
                               "expected values are unknown. Here the node changed: "
                               + c.summary("before", "got"))
        first = c.first_index if c.first_index >= 0 else max(c.first_byte, 0) // c.itemsize
        item["first_offset"] = c.first_byte
        item["first_index"] = c.first_index
        item["values"] = _values(before[rid], expected, got, region.dtype, first)
        diff["regions"].append(item)
    out.update(result="differs", checked=pos + 1, first_difference=diff)
    return out


def bisect_report(machine, path: str, graph_name: Optional[str], load: Callable,
                  progress: Optional[Callable] = None) -> dict:
    snap = machine.snapshot
    graphs = [g for g in snap.graphs if g.top_level and g.trace is not None and
              (graph_name is None or g.name == graph_name)]
    return {"schema": BISECT_SCHEMA, "file": path, "recorded_on": dict(snap.device),
            "replayed_on": machine.describe(),
            "graphs": [bisect_graph(machine, g, load, progress) for g in graphs]}


def bisect_text(d: dict) -> str:
    out = [f"bisect {d['file']}: recorded on {_device_text(d['recorded_on'])}, replayed on "
           f"{_device_text(d['replayed_on'])}"]
    for g in d["graphs"]:
        head = f"graph {g['graph']!r}: {g['steps']} steps"
        if g["result"] == "match":
            out.append(f"{head}: every step matches the recorded trace")
            continue
        f = g["first_difference"]
        if f["step"] == 1:
            head += "; step 0 matches the recorded trace"
        elif f["step"]:
            head += f"; steps 0-{f['step'] - 1} match the recorded trace"
        out.append(head)
        what = f"kernel {f['demangled']}" if "kernel" in f else \
            (f"child graph {f['child_graph']!r}" if "child_graph" in f else f["type"])
        out.append(f"FIRST DIFFERENCE at step {f['step']}: node {f['node']}, {what}")
        for r in f["regions"]:
            out.append(f"  {r['label']} ({r['dtype']}): {r['summary']}")
            v = r["values"]
            unit = "byte" if r["dtype"] == "bytes" else "index"
            out.append(f"    {unit:>8}  {'before':>14}  {'expected':>14}  {'got':>14}")
            expected = v["expected"] or ["?"] * len(v["got"])
            for k, (b, e, x) in enumerate(zip(v["before"], expected, v["got"])):
                mark = "  <" if v["expected"] is not None and e != x else ""
                out.append(f"    {v['index'] + k:>8}  {b:>14}  {e:>14}  {x:>14}{mark}")
            out.append("    run again here from the same inputs, the node gives "
                       + ("the same result: the difference is the machine's, not run-to-run "
                          "noise" if r["same_when_run_again"] else
                          "a different result: it is not deterministic here"))
    if not d["graphs"]:
        out.append("no graph carries a trace")
    return "\n".join(out) + "\n"


def traced_graphs(path: str, graph: Optional[str]) -> list:
    """The names of the top-level graphs to bisect; CgsnapError when there is none (read on
    the CPU, before any GPU work)."""
    from ..format.snapfile import read
    snap, f = read(path, load_images=False)
    f.close()
    names = [g.name for g in snap.graphs if g.top_level]
    if graph is not None and graph not in names:
        raise UsageError(f"{path}: no top-level graph named {graph!r} (graphs: "
                          f"{', '.join(names)})")
    traced = [g.name for g in snap.graphs if g.top_level and g.trace is not None
              and graph in (None, g.name)]
    if not traced:
        msg = f"graph {graph!r} carries no per-node trace" if graph is not None else \
            "no graph carries a per-node trace"
        raise CgsnapError(f"{path}: {msg}; record one with snapshot(..., trace=True)")
    return traced


def run_bisect(path: str, graph: Optional[str] = None, device: int = 0, as_json: bool = False,
               allow_jit: bool = False, key=None) -> int:
    from .. import load as cg_load
    from ..format import fileformat
    from ..restore.stepper import Stepper
    traced_graphs(path, graph)
    with cg_load(path, device=device, allow_jit=allow_jit, require_signature=key) as r, \
            fileformat.open_file(path) as f:
        d = bisect_report(Stepper(r), path, graph, lambda e: bytes(f.blob(e.data)))
    sys.stdout.write(json.dumps(d, indent=2, sort_keys=True) + "\n" if as_json else bisect_text(d))
    return 1 if any(g["result"] != "match" for g in d["graphs"]) else 0
