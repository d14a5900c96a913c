"""Random graphs planned (restore/plan.py) and built (restore/build.py) against the fake driver
(tests/fake_driver.py), in both ways kernel nodes are added (the native loop, one foreign call
per node): the graph the driver is handed must be the snapshot's -- every node once, in an
order where each dependency comes first, each node's plain dependencies exactly its plain
in-edges, the special edges added as edges with their ports and type, every kernel node's
function, launch configuration and argument bytes with its pointer words rewritten (graph
memory at the address its mem_alloc node got), memsets at their addresses. The plan's
dependency lists are also checked against a direct computation from the edge list (the
object-based plan this one replaced)."""
from __future__ import annotations

import numpy as np
import pytest
from fake_driver import FakeDriver
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cgsnap.cuda import driver, graphs, native
from cgsnap.format.hashing import content_hash
from cgsnap.format.model import (Arg, Edge, EmptyNode, Graph, Kernel, KernelImage, KernelNode,
                                 MemAllocNode, MemsetNode, Policy, Ref, Region, RegionKind,
                                 Snapshot)
from cgsnap.restore.build import BuildState, add_nodes
from cgsnap.restore.plan import GraphPlan, param_offsets

LAYOUTS = [(), ((0, 8), (8, 4)), ((0, 8), (8, 8), (16, 16), (32, 4)), ((0, 4), (8, 8))]
POINTER_WORDS = [[], [0], [0, 8, 16, 24], [8]]         # 8-byte words inside arguments
REGION_SIZE = 256
NREGIONS = 3                                           # + region 3: graph memory


@st.composite
def graphs_(draw):
    n = draw(st.integers(0, 24))
    kinds = draw(st.lists(st.sampled_from(["kernel"] * 4 + ["memset", "empty"]), min_size=n,
                          max_size=n))
    alloc = n > 0 and draw(st.booleans())
    ids = draw(st.permutations(list(range(n + int(alloc)))))   # ids need not follow the order
    nodes, rank = [], {}
    if alloc:
        nodes.append(MemAllocNode(ids[n], NREGIONS))
    for i, kind in enumerate(kinds):
        nid = ids[i]
        rank[nid] = i
        if kind == "memset":
            nodes.append(MemsetNode(nid, Ref(draw(st.integers(0, NREGIONS - 1)), 16), 7, 4, 8))
        elif kind == "empty":
            nodes.append(EmptyNode(nid))
        else:
            k = draw(st.integers(0, len(LAYOUTS) - 1))
            args = []
            for j, (off, size) in enumerate(LAYOUTS[k]):
                refs = []
                for w in POINTER_WORDS[k]:
                    if off <= w < off + size and draw(st.integers(0, 2)) == 0:
                        region = draw(st.integers(0, NREGIONS - 1 + int(alloc)))
                        refs.append((w - off, Ref(region, draw(st.integers(0, REGION_SIZE)))))
                args.append(Arg(draw(st.binary(min_size=size, max_size=size)), tuple(refs)))
            attrs = draw(st.sampled_from([None, None, {"priority": 2},
                                          {"cluster_dim": (2, 1, 1), "priority": -1}]))
            grid = (draw(st.integers(1, 4)), 1, 1)
            nodes.append(KernelNode.from_args(nid, k, grid, (32, 1, 1), draw(st.integers(0, 64)),
                                              tuple(args), LAYOUTS[k], attrs))
    # Edges point forward in the order drawn (the graph is a DAG); a few are special.
    pairs = draw(st.sets(st.tuples(st.integers(0, max(n - 1, 0)), st.integers(0, max(n - 1, 0))),
                         max_size=3 * n))
    edges = []
    for a, b in sorted(pairs):
        if a < b:
            special = draw(st.integers(0, 9)) == 0 and kinds[a] == kinds[b] == "kernel"
            edges.append(Edge(ids[a], ids[b], 0, 0, 1) if special else Edge(ids[a], ids[b]))
    if alloc:   # graph memory is used only after its allocation
        edges += [Edge(ids[n], ids[i]) for i in range(n)]
    return nodes, edges


def _snapshot(nodes, edges) -> Snapshot:
    regions = [Region(i, RegionKind.ALLOCATION, REGION_SIZE, Policy.SCRATCH)
               for i in range(NREGIONS)]
    regions.append(Region(NREGIONS, RegionKind.GRAPH_ALLOC, REGION_SIZE, Policy.SCRATCH))
    data = b"\x7fELF" + bytes(64)
    h = content_hash(data)
    kernels = [Kernel(i, f"k{i}", h, layout) for i, layout in enumerate(LAYOUTS)]
    images = [KernelImage(h, "cubin", 90, tuple(k.name for k in kernels), data, "recorder")]
    snap = Snapshot(graphs=[Graph("g", nodes, edges)], regions=regions, images=images,
                    kernels=kernels, device={"arch": 90})
    manifest, blobs = snap.to_manifest()      # planned from the columns, as a restore does
    return Snapshot.from_manifest(manifest, [len(b) for b in blobs], "random.cgsnap")


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    import os
    old, saved = os.environ.get("CGSNAP_CACHE_DIR"), dict(native._loaded)
    os.environ["CGSNAP_CACHE_DIR"] = str(tmp_path_factory.mktemp("native"))
    native._loaded.clear()
    try:
        fn = native.node_loop()
    finally:
        native._loaded.clear()
        native._loaded.update(saved)
        if old is None:
            os.environ.pop("CGSNAP_CACHE_DIR")
        else:
            os.environ["CGSNAP_CACHE_DIR"] = old
    assert fn is not None, "no C compiler on this machine: CI images have one"
    return fn


def _build(snap, fake, node_loop):
    lib = int(fake.cuLibraryLoadData(b"image")[1])
    funcs = np.array([int(fake.cuLibraryGetKernel(lib, k.name.encode())[1])
                      for k in snap.kernels], dtype=np.uint64)
    bases = np.zeros(len(snap.regions), dtype=np.uint64)
    for r in snap.regions[:NREGIONS]:
        bases[r.id] = fake._alloc(r.size)
    late = {r.id for r in snap.regions if r.kind is RegionKind.GRAPH_ALLOC}
    plan = GraphPlan(snap, snap.graphs[0], late, param_offsets(snap.kernels))
    state = BuildState(snap, bases, funcs, driver.GraphBuilder(), node_loop, [], {}, {},
                       graphs.AddEnv(driver.cu.CUcontext(0xC0), 0, []))
    graph = graphs.graph_create()
    add_nodes(state, "g", plan, graph)
    return plan, bases, fake.graphs[int(graph)]


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(g=graphs_(), use_loop=st.booleans())
def test_random_graphs_are_built_as_recorded(g, use_loop, loop, monkeypatch):
    nodes, edges = g
    snap = _snapshot(nodes, edges)
    with monkeypatch.context() as m:
        fake = FakeDriver({k.name: k.params for k in snap.kernels}).install(m)
        plan, bases, fg = _build(snap, fake, loop if use_loop else None)
        assert fake.faults == []
    graph = snap.graphs[0]
    by_id = {n.id: n for n in graph.nodes}
    # The plan's dependencies, from the edge list directly.
    pos = {nid: i for i, nid in enumerate(plan.node_ids.tolist())}
    assert sorted(pos) == sorted(by_id)
    for i, nid in enumerate(plan.node_ids.tolist()):
        want = sorted(pos[e.src] for e in graph.edges
                      if e.dst == nid and (e.from_port, e.to_port, e.type) == (0, 0, 0))
        assert plan.deps_of(i) == want and plan.ndeps[i] == len(want)
    # The graph the driver got: one node per snapshot node, in the plan's order.
    assert len(fg.nodes) == len(graph.nodes)
    handle = {nid: fn.handle for nid, fn in zip(plan.node_ids.tolist(), fg.nodes)}
    alloc = [fn for fn in fg.nodes if fn.type == "mem_alloc"]
    if alloc:
        bases[NREGIONS] = alloc[0].params["dptr"]
    for nid, h in handle.items():
        sn, fn = by_id[nid], fg.node(h)
        assert fn.type == sn.TYPE
        plain = sorted(handle[e.src] for e in graph.edges
                       if e.dst == nid and (e.from_port, e.to_port, e.type) == (0, 0, 0))
        assert sorted(fn.deps) == plain
        if sn.TYPE == "kernel":
            layout = snap.kernels[sn.kernel].params
            params = bytearray(sn.params)
            for p, region, off in np.frombuffer(sn.refs, dtype="<u8").reshape(-1, 3).tolist():
                params[p:p + 8] = (int(bases[region]) + off).to_bytes(8, "little")
            assert fn.params["args"] == [bytes(params[o:o + s]) for o, s in layout]
            assert fn.params["kernel"] == snap.kernels[sn.kernel].name
            assert (fn.params["grid"], fn.params["block"], fn.params["shared_mem"]) == \
                (sn.grid, sn.block, sn.shared_mem)
            assert sorted(fn.params["attrs"]) == sorted(
                {"priority": 8, "cluster_dim": 4}[k] for k in sn.attrs)
        elif sn.TYPE == "memset":
            assert fn.params["dst"] == int(bases[sn.dst.region]) + sn.dst.offset
    special = sorted((handle[e.src], handle[e.dst], (e.from_port, e.to_port, e.type))
                     for e in graph.edges if (e.from_port, e.to_port, e.type) != (0, 0, 0))
    assert sorted(fg.extra_edges) == special
