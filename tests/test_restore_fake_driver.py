"""The whole restore path (load, build, launch, close) on CPU against a fake driver
(tests/fake_driver.py): every driver call cgsnap makes goes through the real cuda-bindings
argument checks, and the graph the fake driver is handed is compared with the snapshot --
node types, dependencies, kernel functions, launch configurations, every argument's bytes with
its pointers rewritten to the restored memory, launch attributes, saved contents uploaded.
It proves the calls and arguments, not GPU results (tests/gpu does that on the card)."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

import cgsnap
from cgsnap.cuda import native
from cgsnap.format import snapfile
from cgsnap.restore import compat

from fake_driver import FakeDriver
from synthetic import make_snapshot


@pytest.fixture(scope="session")
def native_loop(tmp_path_factory):
    import os
    old, old_loaded = os.environ.get("CGSNAP_CACHE_DIR"), dict(native._loaded)
    os.environ["CGSNAP_CACHE_DIR"] = str(tmp_path_factory.mktemp("native-cache"))
    native._loaded.clear()
    try:
        fn = native.node_loop()
    finally:
        native._loaded.clear()
        native._loaded.update(old_loaded)
        if old is None:
            os.environ.pop("CGSNAP_CACHE_DIR", None)
        else:
            os.environ["CGSNAP_CACHE_DIR"] = old
    assert fn is not None, "no C compiler on this machine: CI images have one"
    return fn


@pytest.fixture(params=["native", "python"])
def fake(request, monkeypatch, native_loop):
    snap = make_snapshot()
    fake = FakeDriver({k.name: k.params for k in snap.kernels}, {"coeff": 16})
    fake.install(monkeypatch)
    # The synthetic image is no cubin: what the image check reads is tested in test_binaries.
    monkeypatch.setattr(compat, "check_images", lambda snap, choice, path: None)
    loop = native_loop if request.param == "native" else None
    monkeypatch.setattr(native, "node_loop", lambda: loop)
    monkeypatch.setattr(native, "prefetch", lambda: None)
    fake.snap = snap
    return fake


def _load(fake, tmp_path, **kw):
    path = tmp_path / "s.cgsnap"
    snapfile.save(path, fake.snap, prune=False)
    kv = fake._alloc(1 << 20)
    calls = []
    r = cgsnap.load(path, bind={"kv_cache": (kv, 1 << 20)},
                    host_callbacks={"log_step": lambda: calls.append(1)}, **kw)
    return r, kv, calls


def _expected_args(node, layout, base):
    """Each argument's bytes with the node's pointer words rewritten to ``base(region) +
    offset`` (what the driver must be handed)."""
    params = bytearray(node.params)
    for pos, region, off in np.frombuffer(node.refs, dtype="<u8").reshape(-1, 3).tolist():
        params[pos:pos + 8] = (base(region) + off).to_bytes(8, "little")
    return [bytes(params[o:o + s]) for o, s in layout]


def test_load_build_launch_close(fake, tmp_path):
    snap = fake.snap
    r, kv, host_calls = _load(fake, tmp_path)
    g = r.graph("step")
    g.launch()
    assert fake.faults == []
    bases = {reg.id: int(r._bases[reg.id]) for reg in snap.regions}
    assert bases[5] == kv                                   # the bound buffer is used as is
    # Saved contents are in the restored memory, scratch is zeroed.
    for reg in snap.regions:
        if reg.kind.value == "graph_alloc" or reg.id == 5:
            continue
        got = fake.read(bases[reg.id], reg.size)
        assert got == (reg.data if reg.data is not None else bytes(reg.size)), reg.id
    assert bases[2] % 512 == 0                              # the recorded alignment is kept
    # The graph the driver was handed.
    main, child = snap.graph("step"), snap.graph("step/child6")
    built = [fg for fg in fake.graphs.values() if len(fg.nodes) == len(main.nodes)]
    assert len(built) == 1
    fg = built[0]
    kids = [c for c in fake.graphs.values() if len(c.nodes) == len(child.nodes) and c is not fg]
    assert len(kids) == 1 and [n.type for n in kids[0].nodes] == ["empty"]
    # Nodes are added in the plan's order (checked topological by the fake: a dependency
    # must be a node added before); pair them with the snapshot's in that order.
    order = r._plans["step"].node_ids.tolist()
    assert sorted(order) == sorted(n.id for n in main.nodes)
    by_id = {n.id: n for n in main.nodes}
    handle = {}
    for snap_id, node in zip(order, fg.nodes):
        assert node.type == by_id[snap_id].TYPE, (snap_id, node.type)
        handle[snap_id] = node.handle
    alloc = next(n for n in fg.nodes if n.type == "mem_alloc")
    bases[4] = alloc.params["dptr"]                          # graph memory: where the node put it
    assert alloc.params["bytesize"] == snap.regions[4].size
    for e in main.edges:
        if (e.from_port, e.to_port, e.type) == (0, 0, 0):
            assert handle[e.src] in fg.node(handle[e.dst]).deps, e
        else:
            assert (handle[e.src], handle[e.dst], (e.from_port, e.to_port, e.type)) in \
                fg.extra_edges, e
    for nid, h in handle.items():
        plain = sorted(handle[e.src] for e in main.edges
                       if e.dst == nid and (e.from_port, e.to_port, e.type) == (0, 0, 0))
        assert sorted(fg.node(h).deps) == plain, nid
    assert len(fg.extra_edges) == sum((e.from_port, e.to_port, e.type) != (0, 0, 0)
                                      for e in main.edges)
    for nid, h in handle.items():
        sn, fnode = by_id[nid], fg.node(h)
        p = fnode.params
        if sn.TYPE == "kernel":
            k = snap.kernels[sn.kernel]
            assert p["kernel"] == k.name
            assert (p["grid"], p["block"], p["shared_mem"]) == (sn.grid, sn.block, sn.shared_mem)
            assert p["args"] == _expected_args(sn, k.params, bases.__getitem__), nid
            want = {}
            if "priority" in sn.attrs:
                want[8] = sn.attrs["priority"].to_bytes(4, "little", signed=True).ljust(64, b"\0")
            if "cluster_dim" in sn.attrs:
                want[4] = b"".join(x.to_bytes(4, "little") for x in sn.attrs["cluster_dim"]
                                   ).ljust(64, b"\0")
            assert p["attrs"] == want, nid
        elif sn.TYPE == "memset":
            assert p == {"dst": bases[sn.dst.region] + sn.dst.offset, "value": sn.value,
                         "element_size": sn.element_size, "width": sn.width,
                         "height": sn.height, "pitch": sn.pitch or sn.width * sn.element_size}
        elif sn.TYPE == "memcpy":
            assert (p["width"], p["height"], p["depth"]) == (sn.width, sn.height, sn.depth)
            for side in ("src", "dst"):
                ref = getattr(sn, side)
                assert p[side]["addr"] == bases[ref.region] + ref.offset, (nid, side)
                assert p[side]["pitch"] == (getattr(sn, f"{side}_pitch") or sn.width)
        elif sn.TYPE == "graph":
            assert p["graph"] == kids[0].handle
        elif sn.TYPE in ("event_record", "event_wait"):
            assert p["event"] in fake.events
        elif sn.TYPE == "mem_free":
            assert p["dptr"] == bases[sn.ptr.region] + sn.ptr.offset
        elif sn.TYPE == "host":
            ctypes.CFUNCTYPE(None, ctypes.c_void_p)(p["fn"])(None)   # what the driver calls
            assert host_calls == [1]
    assert {(name, value) for name, _, value in fake.func_attrs} == \
        {("_Z6affinePKfPfi", 49152)}
    assert len(fake.launches) == 1 and fake.launches[0][0] in fake.execs
    g.launch()
    assert len(fake.launches) == 2 and len(fake.execs) == 1     # instantiated once
    r.close()
    assert fake.execs == {} and all(fg.destroyed for fg in fake.graphs.values())
    assert fake.libraries == {} and fake.events == set() and fake.host == {}
    assert set(fake.memory) == {kv, bases[4]} | set(fake._global_addrs.values())


def test_stored_pointers_rng_words_and_large_uploads(fake, tmp_path, monkeypatch):
    """Pointers stored in region contents are rewritten on the host copy (small regions) or
    after the direct upload (large ones, DMA from the file mapping); set_rng writes its two
    words with 32-bit memsets on the stream given."""
    from cgsnap.format.hashing import content_hash
    from cgsnap.format.model import Policy, Ref, Region, RegionKind, RngState
    snap = fake.snap
    size = 9 << 20                                   # over transfer.THRESHOLD: the DMA path
    big = np.random.default_rng(1).integers(0, 255, size, dtype=np.uint8).tobytes()
    snap.regions.append(Region(6, RegionKind.ALLOCATION, size, Policy.SAVED, data=big,
                               content_hash=content_hash(big)))
    table = {2: [(0, 0, 0), (8, 1, 64), (16, 3, 8)], 6: [(0, 0, 4), (8, 2, 16), (size - 8, 6, 0)]}
    for rid, rows in table.items():
        snap.regions[rid].refs = np.array(rows, dtype="<u8").tobytes()
    snap.graphs[0].rng = [RngState(Ref(2, 1024), Ref(2, 1032), 4, 0, 123, 456)]
    monkeypatch.setenv("CGSNAP_UPLOAD", "mapped")
    r, kv, _ = _load(fake, tmp_path)
    bases = [int(b) for b in r._bases]
    for rid, rows in table.items():
        want = bytearray(snap.regions[rid].data)
        for pos, target, off in rows:
            want[pos:pos + 8] = (bases[target] + off).to_bytes(8, "little")
        assert fake.read(bases[rid], len(want)) == bytes(want), rid
    assert fake.registered == {}                     # every page-locked piece unlocked again
    g = r.graph("step")
    g.set_rng((1 << 64) - 1, 7, stream=0x1234)
    memsets = [a for name, a in fake.calls if name == "cuMemsetD32Async"]
    assert [(int(d) - bases[2], v, n, int(s)) for d, v, n, s in memsets] == [
        (1024, 0xFFFFFFFF, 1, 0x1234), (1028, 0xFFFFFFFF, 1, 0x1234), (1032, 7, 1, 0x1234),
        (1036, 0, 1, 0x1234)]
    assert fake.read(bases[2] + 1024, 16) == ((1 << 64) - 1).to_bytes(8, "little") + \
        (7).to_bytes(8, "little")
    with pytest.raises(ValueError, match="out of range"):
        g.set_rng(1 << 64, 0)
    assert fake.faults == []
    r.close()


def test_node_by_node_steps_build_one_node_graphs(fake, tmp_path):
    """The stepper (trace / bisect / extract) builds a graph of each node from the same plan,
    launches it and destroys it; the node is the same node as in the whole graph."""
    import dataclasses

    from cgsnap.format.model import Graph, Policy
    from cgsnap.restore.stepper import Stepper
    from cgsnap.restore.trace import plan_steps, record_steps
    snap = fake.snap
    g = snap.graphs[0]
    gone = {4, 9, 10, 11}        # graph memory, host callbacks: not steppable; node 1 uses it
    nodes = [n for n in g.nodes if n.id not in gone and n.id != 1]
    edges = [e for e in g.edges if not {e.src, e.dst} & (gone | {1})]
    snap.graphs[0] = Graph("step", nodes, edges)
    snap.regions[5] = dataclasses.replace(snap.regions[5], policy=Policy.SCRATCH)
    path = tmp_path / "s.cgsnap"
    snapfile.save(path, snap, prune=False)
    with cgsnap.load(path) as r:
        machine = Stepper(r)
        steps = plan_steps(r.snapshot, r.snapshot.graph("step"))
        trace = record_steps(machine, "step", steps)
        assert [s.node for s in trace] == [s.node.id for s in steps]
        ran = [n for n in nodes if n.TYPE not in ("empty", "event_record", "event_wait")]
        assert len(fake.launches) == len(ran) and fake.execs == {}
        kernel = [fg for fg in fake.graphs.values()
                  if [n.type for n in fg.nodes] == ["kernel"]]
        assert len(kernel) == 1 and kernel[0].destroyed
        args = kernel[0].nodes[0].params["args"]
        assert args[0] == int(r._bases[0]).to_bytes(8, "little")
    assert fake.faults == []


@pytest.mark.parametrize("case", ["no allocation", "used before", "memset before"])
def test_graph_memory_used_where_it_has_no_address_is_refused(fake, tmp_path, case):
    """Graph memory gets its address when its mem_alloc node is added: a file whose graph uses
    it in a node that does not come after such a node (no edge orders them, or there is no
    allocation at all) would hand that node address 0 + offset -- a fault on the card. The
    load refuses it, naming the graph and node, before any GPU work."""
    from cgsnap.errors import FormatError
    from cgsnap.format.model import Edge, MemsetNode, Ref
    g = fake.snap.graphs[0]
    if case == "no allocation":
        g.nodes = [n for n in g.nodes if n.id not in (9, 10)]
        g.edges = [e for e in g.edges if not {e.src, e.dst} & {9, 10}]
        where = "node 1"
    elif case == "used before":
        g.edges = [e for e in g.edges if e.src != 9] + [Edge(1, 9), Edge(9, 10)]
        where = "node 1"
    else:
        g.nodes = g.nodes + [MemsetNode(12, Ref(4, 0), 0, 4, 16)]
        where = "node 12"
    with pytest.raises(FormatError, match=f"graph 'step' {where}: uses graph memory "
                                          r"\(region 4\)"):
        _load(fake, tmp_path)
    assert fake.memory.keys() <= {min(fake.memory)}     # nothing allocated but the bound buffer


# Driver calls a restore makes, in the order it makes them: (call, which call of that name
# fails, the error). Allocation, the staging upload, kernel loads, a module global, events,
# node adds and instantiation (instantiate="all" builds every graph inside load()).
_FAIL_AT = [
    ("cuMemAlloc", 1, "CUDA_ERROR_OUT_OF_MEMORY"),
    ("cuMemAlloc", 3, "CUDA_ERROR_OUT_OF_MEMORY"),
    ("cuMemcpyHtoD", 1, "CUDA_ERROR_ILLEGAL_ADDRESS"),
    ("cuLibraryLoadData", 1, "CUDA_ERROR_INVALID_IMAGE"),
    ("cuLibraryGetGlobal", 1, "CUDA_ERROR_NOT_FOUND"),     # late: memory and images are in
    ("cuEventCreate", 1, "CUDA_ERROR_OUT_OF_MEMORY"),
    ("cuGraphAddMemsetNode", 1, "CUDA_ERROR_INVALID_VALUE"),
    ("cuGraphAddChildGraphNode", 1, "CUDA_ERROR_INVALID_VALUE"),
    ("cuGraphInstantiate", 1, "CUDA_ERROR_OUT_OF_MEMORY"),
]


@pytest.mark.parametrize("call, nth, error", _FAIL_AT, ids=[f"{c}#{n}" for c, n, _ in _FAIL_AT])
def test_a_failed_gpu_step_frees_everything_made_before_it(fake, tmp_path, monkeypatch, call,
                                                           nth, error):
    """A restore whose driver call fails at any step raises a typed cgsnap error naming the
    call, and leaves nothing behind: every allocation, library, event, stream, pinned or
    page-locked buffer, graph and executable graph it made is freed (tests/gpu/
    test_gpu_rollback.py checks the same on the card through free device memory)."""
    from cuda.bindings import driver as cu
    real, count = getattr(cu, call), []

    def failing(*args):
        count.append(1)
        if len(count) == nth:
            return (getattr(cu.CUresult, error),)
        return real(*args)
    failing.__name__ = call                            # errors name the driver call
    monkeypatch.setattr(cu, call, failing)
    named = "module global coeff of region 3 is not in the reloaded image" \
        if call == "cuLibraryGetGlobal" else f"restore failed, everything it allocated was " \
        f"released: {call} failed: {error}"
    with pytest.raises(cgsnap.RestoreError, match=named):
        _load(fake, tmp_path, instantiate="all")
    assert len(count) >= nth, f"{call} was called {len(count)} times"
    kv = min(fake.memory)                             # _load's bound buffer, allocated first
    graph_memory = {n.params["dptr"] for fg in fake.graphs.values() for n in fg.nodes
                    if n.type == "mem_alloc"}         # the fake keeps a destroyed graph's pool
    left = set(fake.memory) - {kv} - set(fake._global_addrs.values()) - graph_memory
    assert left == set(), [hex(a) for a in left]
    assert fake.libraries == {} and fake.events == set() and fake.streams == set()
    assert fake.host == {} and fake.registered == {} and fake.execs == {}
    assert all(fg.destroyed for fg in fake.graphs.values())
    assert fake.faults == []


def test_a_graph_whose_build_fails_at_launch_is_destroyed_and_built_again(fake, tmp_path,
                                                                         monkeypatch):
    """Lazy instantiation: a node add that fails inside ``launch()`` raises, the half-built
    graph is destroyed (never kept for the retry), and the next launch builds it whole."""
    from cuda.bindings import driver as cu
    real, count = cu.cuGraphAddMemsetNode, []

    def failing(*args):
        count.append(1)
        return (cu.CUresult.CUDA_ERROR_INVALID_VALUE,) if len(count) == 1 else real(*args)
    failing.__name__ = "cuGraphAddMemsetNode"
    monkeypatch.setattr(cu, "cuGraphAddMemsetNode", failing)
    r, _, _ = _load(fake, tmp_path)
    g = r.graph("step")
    with pytest.raises(cgsnap.CgsnapError, match="cuGraphAddMemsetNode"):
        g.launch()
    first = [fg for fg in fake.graphs.values() if fg.destroyed]
    assert first and fake.execs == {} and fake.launches == []
    g.launch()
    assert len(fake.launches) == 1
    live = [fg for fg in fake.graphs.values() if not fg.destroyed]
    whole = len(fake.snap.graph("step").nodes)
    assert [len(fg.nodes) for fg in live if len(fg.nodes) == whole] == [whole]
    r.close()
    assert fake.execs == {} and all(fg.destroyed for fg in fake.graphs.values())
