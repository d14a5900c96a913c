"""Running a graph one node at a time, and what each node did: the logic behind
``snapshot(..., trace=True)``, ``cgsnap bisect`` and ``cgsnap extract``.

It works over a *machine*: an object with ``snapshot``, ``reset()`` (every region as the file
saved it, scratch zeroed), ``run(step, graph_name)`` (one node, synchronously), ``read(rid)``
(a uint8 host copy of a region) and ``write(rid, data)``. The GPU machine is
:class:`cgsnap.restore.stepper.Stepper`; the CPU tests use one that runs nodes in numpy. Nothing
here calls the driver.

Which nodes can run one at a time: kernel, memcpy and memset nodes each as a graph of that one
node (built from the same plan as the whole graph, so with the same arguments and launch
attributes: a node alone computes what it computes inside the graph, given the same memory);
a child-graph node as its whole child graph; empty and event nodes order work and have nothing
to run when nodes run one after another. Graph-memory nodes (their memory lives from the
allocation node to the free node) and host-callback nodes are refused, naming the node.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from ..errors import FormatError, UnsupportedNodeError
from ..format.model import Graph, Policy, RegionKind, Snapshot
from ..format.trace import TraceEntry, TraceStep, WriteSets, digest

NO_OP = frozenset({"empty", "event_record", "event_wait"})
RUNNABLE = frozenset({"kernel", "memcpy", "memset", "graph"}) | NO_OP
_WHY = {
    "mem_alloc": "graph memory lives from its allocation node to its free node, so such a graph "
                 "only runs whole",
    "mem_free": "graph memory lives from its allocation node to its free node, so such a graph "
                "only runs whole",
    "host": "host callbacks are not run one node at a time",
    "conditional": "a conditional node runs its bodies on a value that kernels set while the "
                   "graph runs, so such a graph only runs whole",
    "batch_mem_op": "its waits are on values that other work writes while the graph runs, so "
                    "such a graph only runs whole",
}
DEFAULT_BUDGET = 64 << 20        # bytes of changed contents a trace keeps


@dataclass(frozen=True)
class Step:
    position: int
    node: object
    writes: tuple        # region ids the node may write (cgsnap.format.trace.WriteSets)


def check_steppable(snap: Snapshot, graph: Graph, what: str = "stepping") -> None:
    """UnsupportedNodeError naming the first node (also inside child graphs) that cannot run
    on its own."""
    graphs = {g.name: g for g in snap.graphs}

    def visit(g, path):
        for n in g.nodes:
            if n.TYPE not in RUNNABLE:
                why = _WHY.get(n.TYPE, f"{n.TYPE} nodes are not supported")
                raise UnsupportedNodeError(
                    f"graph {path!r} node {n.id} ({n.TYPE}): {what} runs nodes one at a time, "
                    f"and {why}")
            if n.TYPE == "graph":
                visit(graphs[n.graph], n.graph)
    visit(graph, graph.name)
    bound = [r.name for r in snap.regions if r.policy is Policy.BOUND]
    if bound:
        raise UnsupportedNodeError(f"graph {graph.name!r}: {what} needs the contents of every "
                                   f"region, and buffer(s) {', '.join(map(str, bound))} are "
                                   "bound (their contents are not in the file)")


def plan_steps(snap: Snapshot, graph: Graph, order=None, what: str = "stepping") -> list:
    """The steps of ``graph``: in ``order`` (node ids, e.g. a trace's), else topological."""
    check_steppable(snap, graph, what)
    ws = WriteSets(snap)
    if order is None:
        nodes = graph.topological_order()
    else:
        by_id = {n.id: n for n in graph.nodes}
        nodes = [by_id[i] for i in order]
    return [Step(i, n, ws.of(n)) for i, n in enumerate(nodes)]


def trace_order(graph: Graph) -> Optional[list]:
    return None if graph.trace is None else [s.node for s in graph.trace]


def changed_span(before: np.ndarray, after: np.ndarray) -> tuple:
    """``(lo, hi)``: the bytes ``[lo, hi)`` hold every difference (``lo == hi``: none)."""
    diff = np.flatnonzero(before != after)
    if not diff.size:
        return 0, 0
    return int(diff[0]), int(diff[-1]) + 1


class Recorder:
    """Trace entries of steps as they run: digests, and the changed bytes within a budget
    (an entry keeps at most a sixteenth of the budget, so that one large write does not take it
    all). While the budget lasts, a region is read before and after its step; afterwards only
    after."""

    def __init__(self, machine, budget: int):
        self.machine = machine
        self.remaining = max(0, budget)
        self.cap = max(4096, budget // 16)

    def before(self, step: Step) -> dict:
        if self.remaining <= 0:
            return {}
        return {rid: self.machine.read(rid) for rid in step.writes}

    def entries(self, step: Step, before: dict) -> tuple:
        out = []
        for rid in step.writes:
            after = self.machine.read(rid)
            d = digest(after)
            old = before.get(rid)
            if old is not None:
                lo, hi = changed_span(old, after)
                if hi > lo and hi - lo <= min(self.cap, self.remaining):
                    self.remaining -= hi - lo
                    out.append(TraceEntry(rid, d, lo, after[lo:hi].copy()))
                    continue
            out.append(TraceEntry(rid, d))
        return tuple(out)


def record_steps(machine, graph_name: str, steps: list, budget: int = DEFAULT_BUDGET) -> tuple:
    """Run every step from the saved state; the trace (TraceStep per step)."""
    machine.reset()
    rec = Recorder(machine, budget)
    out = []
    for step in steps:
        before = rec.before(step)
        machine.run(step, graph_name)
        out.append(TraceStep(step.node.id, rec.entries(step, before)))
    return tuple(out)


def first_divergence(machine, graph_name: str, steps: list, trace,
                     progress: Optional[Callable] = None) -> Optional[tuple]:
    """Run the steps from the saved state, checking each against the recorded ``trace``:
    ``(position, {region: got})`` of the first step where a region's digest differs (all the
    differing regions of that step), or None when every step matches."""
    machine.reset()
    for step, recorded in zip(steps, trace):
        machine.run(step, graph_name)
        bad = {}
        for e in recorded.entries:
            got = machine.read(e.region)
            if digest(got) != e.digest:
                bad[e.region] = got
        if progress is not None:
            progress(step, not bad)
        if bad:
            return step.position, bad
    return None


def state_before(machine, graph_name: str, steps: list, position: int, regions) -> dict:
    """The contents of ``regions`` just before step ``position`` (replayed from the saved
    state)."""
    machine.reset()
    for step in steps[:position]:
        machine.run(step, graph_name)
    return {rid: machine.read(rid) for rid in regions}


def expected_after(before: np.ndarray, entry: TraceEntry, load: Callable) -> Optional[np.ndarray]:
    """What the recorded step left in ``entry.region``, given its contents before the step:
    the kept bytes applied, or the same contents where the digest says the step left them
    unchanged; None when the trace does not tell (or its kept bytes do not reproduce its
    digest)."""
    if digest(before) == entry.digest:
        return before
    if not entry.kept:
        return None
    data = np.frombuffer(load(entry), dtype=np.uint8)
    if entry.offset + len(data) > len(before):
        return None
    out = before.copy()
    out[entry.offset:entry.offset + len(data)] = data
    return out if digest(out) == entry.digest else None


# ---- extraction ------------------------------------------------------------------------------

@dataclass
class Extraction:
    snapshot: Snapshot
    prefix_divergence: Optional[int]   # first step before the range whose result differed from
    #                                    the source's trace (then the inputs are this machine's)
    expected_from: str                 # "trace" (the source's recorded results) or "run" (here)
    changed: list                      # new region ids the nodes changed


def _child_graphs(snap: Snapshot, nodes) -> list:
    graphs = {g.name: g for g in snap.graphs}
    out, todo = [], [n.graph for n in nodes if n.TYPE == "graph"]
    while todo:
        name = todo.pop()
        if name in out:
            continue
        out.append(name)
        todo.extend(n.graph for n in graphs[name].nodes if n.TYPE == "graph")
    return [g.name for g in snap.graphs if g.name in out]


def extract(machine, graph: Graph, steps: list, lo: int, hi: int, load: Callable,
            meta: dict, budget: int = DEFAULT_BUDGET) -> Extraction:
    """A snapshot of steps ``lo..hi`` (positions, inclusive) of ``graph``: the regions they
    refer to or may write, with their contents just before step ``lo`` ran; only the kernels (and images) they
    launch; as recorded outputs (``replay --check``), what the steps did in the source -- from
    its trace where it tells, else from this run -- and a trace of the steps."""
    from ..format.hashing import region_hash
    from ..format.nodes import Renumbering
    snap = machine.snapshot
    source = graph.trace
    if source is not None and any(source[s.position].node != s.node.id for s in steps):
        raise FormatError(f"graph {graph.name!r}: the steps are not in the order of its trace")
    machine.reset()
    prefix_divergence = None
    for step in steps[:lo]:
        machine.run(step, graph.name)
        if source is not None and prefix_divergence is None:
            for e in source[step.position].entries:
                if digest(machine.read(e.region)) != e.digest:
                    prefix_divergence = step.position
                    break
    chosen = steps[lo:hi + 1]
    graphs_by_name = {g.name: g for g in snap.graphs}
    nodes = [s.node for s in chosen]
    child_names = _child_graphs(snap, nodes)
    all_nodes = nodes + [n for c in child_names for n in graphs_by_name[c].nodes]
    # Inputs and outputs: every region the nodes refer to (a copy's source too), and what they
    # may write (their images' module globals).
    kept = sorted({rid for s in chosen for rid in s.writes} |
                  {rid for n in all_nodes for rid in n.regions()})
    before = {rid: machine.read(rid) for rid in kept}
    rec = Recorder(machine, budget)
    run_trace = []
    for step in chosen:
        b = rec.before(step)
        machine.run(step, graph.name)
        run_trace.append(TraceStep(step.node.id, rec.entries(step, b)))
    after = {rid: machine.read(rid) for rid in kept}
    # The source's results, where its trace tells them (and the inputs are the source's).
    expected = None
    if source is not None and prefix_divergence is None:
        state = dict(before)
        for step in chosen:
            for e in source[step.position].entries:
                got = expected_after(state[e.region], e, load) if e.region in state else None
                if got is None:
                    state = None
                    break
                state[e.region] = got
            if state is None:
                break
        expected = state
    expected_from = "trace" if expected is not None else "run"
    if expected is None:
        expected = after
    rmap = {old: new for new, old in enumerate(kept)}
    regions = []
    for old in kept:
        r = snap.regions[old]
        data = before[old]
        parent = rmap.get(r.parent) if r.parent is not None else None
        regions.append(_region(r, rmap[old], data, region_hash(data), parent,
                               r.parent_offset if parent is not None else 0))
    kernel_ids = sorted({n.kernel for n in all_nodes if n.TYPE == "kernel"})
    kmap = {old: new for new, old in enumerate(kernel_ids)}
    kernels = [_renumbered_kernel(snap.kernels[k], kmap[k]) for k in kernel_ids]
    images_needed = {k.image for k in kernels} | {k.ptx_image for k in kernels if k.ptx_image} \
        | {r.image for r in regions if r.kind is RegionKind.MODULE_GLOBAL}
    images = [im for im in snap.images if im.hash in images_needed]
    renumber = Renumbering(rmap, kmap)
    ids = {n.id for n in nodes}
    changed = [rmap[rid] for rid in kept if not np.array_equal(expected[rid], before[rid])]
    check_ids = changed or [rmap[rid] for rid in kept
                            if snap.regions[rid].kind is not RegionKind.MODULE_GLOBAL]
    inverse = {new: old for old, new in rmap.items()}
    if expected_from == "trace":
        trace = tuple(TraceStep(s.node, tuple(TraceEntry(rmap[e.region], e.digest, e.offset,
                                                         load(e) if e.kept else None)
                                              for e in s.entries))
                      for s in (source[step.position] for step in chosen))
    else:
        trace = tuple(TraceStep(s.node, tuple(TraceEntry(rmap[e.region], e.digest, e.offset,
                                                         e.data) for e in s.entries))
                      for s in run_trace)
    main = Graph(name=graph.name, nodes=[n.remap(renumber) for n in nodes],
                 edges=[e for e in graph.edges if e.src in ids and e.dst in ids],
                 checks={new: expected[inverse[new]] for new in check_ids}, trace=trace)
    children = [Graph(name=c, nodes=[n.remap(renumber) for n in graphs_by_name[c].nodes],
                      edges=list(graphs_by_name[c].edges), top_level=False)
                for c in child_names]
    events = snap.events if any(n.TYPE in ("event_record", "event_wait") for n in all_nodes) \
        else 0
    out = Snapshot(graphs=[main] + children, regions=regions, images=images, kernels=kernels,
                   events=events, device=dict(snap.device), versions=dict(snap.versions),
                   meta=meta)
    return Extraction(out, prefix_divergence, expected_from, changed)


def _region(r, rid, data, content_hash, parent, parent_offset):
    # The whole region as read back (a source region saved as extents becomes a whole one).
    return dataclasses.replace(r, id=rid, policy=Policy.SAVED, data=data,
                               content_hash=content_hash, parent=parent,
                               parent_offset=parent_offset, origin=None, extents=None,
                               span=None)


def _renumbered_kernel(k, kid):
    return dataclasses.replace(k, id=kid)

