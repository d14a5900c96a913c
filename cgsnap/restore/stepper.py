"""The GPU machine of :mod:`cgsnap.restore.trace`: the nodes of a restored graph run one at a time.

A step is a graph of one node, built by the same code and from the same kind of plan as the
whole graph (:class:`~cgsnap.restore.plan.GraphPlan` of a graph holding just that node,
:func:`~cgsnap.restore.build.add_nodes`): the same parameter buffer, pointers patched to the
same addresses, the same launch attributes. It is instantiated, launched on the null stream and
synchronised, then destroyed. A child-graph node runs its whole child graph (built once by the
restore). Nodes that order work only (empty, event record / wait) have nothing to run.

What ``reset`` restores is what the restore made: saved contents back, scratch zeroed. A
``__device__`` variable the file does not carry (it held its image's initial value at save time)
is not reset: a kernel that updates one sees the updated value in a second run.
"""
from __future__ import annotations

import numpy as np

from ..cuda import driver, graphs
from ..format.model import Graph, Policy, RegionKind
from .build import add_nodes, build_graph
from .plan import GraphPlan, param_offsets
from .trace import DEFAULT_BUDGET, NO_OP, check_steppable, plan_steps, record_steps


class Stepper:
    """Runs single nodes of the graphs of an open :class:`~cgsnap.restore.restored.Restored`."""

    def __init__(self, restored):
        restored._check_open()
        self.restored = restored
        self.snapshot = restored.snapshot
        self._offsets = param_offsets(self.snapshot.kernels)
        self._stream = driver.as_stream(None)

    def describe(self) -> dict:
        return self.restored.device.describe()

    def reset(self) -> None:
        r = self.restored
        r.reset()
        for reg in self.snapshot.regions:
            if reg.policy is not Policy.SCRATCH or reg.parent is not None or \
                    reg.id in r._bound or not reg.size:
                continue
            base = int(r._bases[reg.id])
            if reg.kind in (RegionKind.ALLOCATION, RegionKind.NAMED):
                driver.memset_d8(base, 0, reg.size)
            elif reg.kind is RegionKind.HOST:
                driver.host_view(base, reg.size)[:] = bytes(reg.size)
            elif reg.kind is RegionKind.ARRAY:
                self.write(reg.id, np.zeros(reg.size, dtype=np.uint8))
        driver.ctx_sync()

    def run(self, step, graph_name: str) -> None:
        node = step.node
        if node.TYPE in NO_OP:
            return
        r = self.restored
        r._check_open()
        state = r._state
        if node.TYPE == "graph":
            build_graph(state, node.graph, r._plans, r._ledger)
        name = f"{graph_name} node {node.id}"
        plan = GraphPlan(self.snapshot, Graph(name=name, nodes=[node], edges=[]), r._late,
                         self._offsets)
        graph = graphs.graph_create()
        try:
            add_nodes(state, name, plan, graph)
            exe = graphs.instantiate(graph)
            try:
                graphs.launch(exe, self._stream)
                driver.ctx_sync()
            finally:
                graphs.exec_destroy(exe)
        finally:
            graphs.graph_destroy(graph)

    def read(self, rid: int) -> np.ndarray:
        return self.restored.read_region(rid)

    def write(self, rid: int, data) -> None:
        r = self.restored
        reg = self.snapshot.regions[rid]
        arr = np.ascontiguousarray(np.frombuffer(data, dtype=np.uint8)
                                   if not isinstance(data, np.ndarray) else data.view(np.uint8))
        if arr.nbytes != reg.size:
            raise ValueError(f"region {rid} holds {reg.size} bytes, got {arr.nbytes}")
        if not reg.size:
            return
        base = int(r._bases[rid])
        if reg.kind is RegionKind.ARRAY:
            a = reg.array
            driver.array_copy(r._arrays[rid], int(arr.ctypes.data), a.row_bytes, a.rows,
                              a.slices, to_host=False)
        elif reg.kind is RegionKind.HOST:
            driver.host_view(base, reg.size)[:] = arr.tobytes()
        else:
            driver.htod(base, arr, reg.size)


def trace_snapshot(snap, budget: int = DEFAULT_BUDGET):
    """``snap`` with a per-node trace in each top-level graph (``snapshot(..., trace=True)``).

    The just-recorded snapshot is written to a temporary file and restored in this process --
    fresh memory holding copies of the saved state, so the original graph and its memory are
    not touched -- and each graph is run node by node from the saved state
    (:func:`cgsnap.restore.trace.record_steps`). Where a graph recorded outputs for
    ``replay --check``, the node-by-node end state is compared with them; a difference (a
    kernel that is not deterministic, or that depends on running concurrently with another)
    is noted in ``meta["trace_notes"]``."""
    import os
    import tempfile

    from ..format import snapfile
    from .restored import Restored
    top = [g for g in snap.graphs if g.top_level]
    for g in top:
        check_steppable(snap, g, "trace=True")
    device = driver.current_device()
    notes = []
    with tempfile.TemporaryDirectory(prefix="cgsnap-trace-") as tmp:
        path = os.path.join(tmp, "trace.cgsnap")
        snapfile.save(path, snap, prune=False)
        with Restored(path, device=device.ordinal) as r:
            machine = Stepper(r)
            remaining = budget
            for g in top:
                mine = r.snapshot.graph(g.name)
                steps = plan_steps(r.snapshot, mine, what="trace=True")
                trace = record_steps(machine, g.name, steps, remaining)
                remaining -= sum(len(e.data) for s in trace for e in s.entries if e.kept)
                for rid in sorted(g.checks):
                    got = machine.read(rid)
                    want = np.frombuffer(memoryview(g.checks[rid]).cast("B"), dtype=np.uint8)
                    if not np.array_equal(got, want):
                        name = snap.regions[rid].name or f"region {rid}"
                        notes.append(f"graph {g.name!r}: run node by node, {name!r} ends "
                                     "different from one launch of the whole graph")
                g.trace = trace
    if notes:
        snap.meta["trace_notes"] = notes
    return snap
