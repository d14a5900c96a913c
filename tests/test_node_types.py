"""Conditional, batch mem-op and CUDA-array nodes without a GPU: the model and its manifest
(round trips, strict validation, schema gating, merging), the capture's handle evidence, the
restore's plan and handle creation, and show / dot."""
from __future__ import annotations

import copy
import ctypes
import dataclasses
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from synthetic import schema2_manifest

import cgsnap
from cgsnap.capture import record
from cgsnap.cuda import driver, graphs
from cgsnap.errors import CaptureError, FormatError, RestoreError, UnsupportedNodeError
from cgsnap.format import fileformat, model, schema, snapfile
from cgsnap.format.hashing import content_hash
from cgsnap.format.model import (ArrayDesc, BatchMemOpNode, ConditionalNode, Edge, EmptyNode,
                                 Graph, Kernel, KernelImage, KernelNode, MemcpyNode, MemOp,
                                 Policy, Ref, Region, RegionKind, Snapshot)
from cgsnap.format.nodes import FIELDS_SINCE, NODE_TYPES_SINCE, Renumbering
from cgsnap.format.tables import KernelTable
from cgsnap.kernels import graph_hooks
from cgsnap.restore.build import BuildState
from cgsnap.restore.plan import GraphPlan, param_offsets
from cgsnap.tools import render

FIXTURE = Path(__file__).parent / "fixtures" / "conditional.sm_90.cubin"


def test_the_new_types_and_fields_are_schema_3():
    """What this file tests is written as, and read only from, the current schema."""
    assert set(NODE_TYPES_SINCE.values()) == set(FIELDS_SINCE.values()) == {3}
    assert model.SCHEMA_VERSION == 3 and 3 in schema.READ_SCHEMAS


def _kernel_node(nid, kid, words, handles=(), refs=()):
    params = b"".join(int(w).to_bytes(8, "little") for w in words)
    return KernelNode(nid, kid, (1, 1, 1), (32, 1, 1), 0, params,
                      np.array(refs, dtype="<u8").reshape(-1, 3).tobytes(), {},
                      np.array(handles, dtype="<u8").reshape(-1, 2).tobytes())


def make_snapshot(top: str = "main") -> Snapshot:
    data = FIXTURE.read_bytes()
    h = content_hash(data)
    arr = ArrayDesc(0x20, 2, 16, 8)                        # float2, 16 x 8: 128-byte rows
    contents = bytes(range(256)) * 4
    regions = [
        Region(0, RegionKind.NAMED, 16, Policy.SAVED, name=f"{top}.pred", data=bytes(16),
               content_hash=content_hash(bytes(16))),
        Region(1, RegionKind.NAMED, 1024, Policy.SCRATCH, name=f"{top}.out"),
        Region(2, RegionKind.ALLOCATION, 256, Policy.SAVED, data=bytes(256),
               content_hash=content_hash(bytes(256))),
        Region(3, RegionKind.ARRAY, arr.size, Policy.SAVED, alignment=1, array=arr,
               data=contents, content_hash=content_hash(contents)),
    ]
    kernels = [Kernel(0, "setc", h, ((0, 8), (8, 8))), Kernel(1, "dec", h, ((0, 8), (8, 8)))]
    then, else_, loop = f"{top}/cond1.0", f"{top}/cond1.1", f"{top}/cond1.0/cond0.0"
    cases = [f"{else_}/cond1.{i}" for i in range(3)]
    main = Graph(top, [
        _kernel_node(0, 0, [1, 0], handles=[(0, 0)], refs=[(8, 0, 0)]),
        ConditionalNode(1, "if", (then, else_), 0, top, 0, 0, 1),
        BatchMemOpNode(2, (MemOp("write32", Ref(2, 0), 7), MemOp("wait32", Ref(2, 0), 7, 1),
                           MemOp("write64", Ref(2, 8), 0x1122334455), MemOp("barrier", flags=1))),
        MemcpyNode(3, Ref(1, 0), Ref(3, 0), 128, 8, 1, 128, 0, 128, 8),
        MemcpyNode(4, Ref(3, 128 * 2 + 16), Ref(1, 512), 64, 4, 1, 128, 8, 64, 0),
    ], [Edge(0, 1), Edge(1, 2), Edge(2, 3), Edge(3, 4)])
    graphs_ = [
        main,
        Graph(then, [ConditionalNode(0, "while", (loop,), 1, top, 1, 1, 2)], [], top_level=False),
        Graph(loop, [_kernel_node(0, 1, [2, 0], handles=[(0, 1)], refs=[(8, 2, 16)])], [],
              top_level=False),
        Graph(else_, [_kernel_node(0, 0, [1, 0], handles=[(0, 2)], refs=[(8, 0, 4)]),
                      ConditionalNode(1, "switch", tuple(cases), 2, else_, 0, 0, 1, True)],
              [Edge(0, 1)], top_level=False),
    ] + [Graph(c, [EmptyNode(0)] if i != 1 else [], [], top_level=False)
         for i, c in enumerate(cases)]
    images = [KernelImage(h, "cubin", 90, ("dec", "plain", "setc", "via"), data, "recorder")]
    return Snapshot(graphs=graphs_, regions=regions, images=images, kernels=kernels, events=0,
                    device={"name": "NVIDIA H200", "arch": 90, "driver": 13000},
                    versions={"cgsnap": "test"}, meta={"name": top})


def manifest_and_sizes(snap=None):
    manifest, blobs = (snap or make_snapshot()).to_manifest()
    return manifest, [len(memoryview(b).cast("B")) for b in blobs]


def test_roundtrip_through_a_file_is_exact(tmp_path):
    snap = make_snapshot()
    path = tmp_path / "c.cgsnap"
    snap.save(path, prune=False)
    back = cgsnap.read(path)
    with fileformat.open_file(path) as f:
        for r in back.regions:
            if r.data is not None:
                r.data = bytes(f.blob(r.data))
    m1, _ = snap.to_manifest()
    m2, _ = back.to_manifest()
    assert m1 == m2
    cond = back.graph("main").nodes[1]
    assert (cond.kind, cond.bodies, cond.handle_graph) == ("if", ("main/cond1.0", "main/cond1.1"),
                                                          "main")
    assert back.graph("main/cond1.1").nodes[1].exact is True
    assert back.graph("main/cond1.0/cond0.0").nodes[0].handle_refs() == [(0, 1)]
    assert back.regions[3].array == ArrayDesc(0x20, 2, 16, 8)
    assert back.graph("main").nodes[2].ops[1] == MemOp("wait32", Ref(2, 0), 7, 1)


def _graph(m, graph):
    return next(g for g in m["graphs"] if g["name"] == graph)


def _node(m, graph, nid):
    """The node map of node ``nid`` (every node but kernel nodes, in schema 3)."""
    return next(n for n in _graph(m, graph)["nodes"] if n["id"] == nid)


def _set_column(m, graph, column, values, dtype="<u8"):
    _graph(m, graph)["kernels"][column] = np.array(values, dtype).tobytes()


def _set_handles(m, graph, rows, nhandles=None):
    """Replace the conditional-handle columns of a graph's kernel table (schema 3): ``rows``
    (position, handle id) pairs, by default all belonging to the table's first node."""
    t = _graph(m, graph)["kernels"]
    n = len(t["ids"]) // 4
    if nhandles is None:
        nhandles = [len(rows)] + [0] * (n - 1)
    t["nhandles"] = np.array(nhandles, "<u4").tobytes()
    t["handles"] = rows if isinstance(rows, bytes) else np.array(rows, "<u8").reshape(-1, 2).tobytes()


def _region(m, rid):
    return m["regions"][rid]


CORRUPTIONS = [
    ("handle ids not dense", lambda m: _node(m, "main", 1).__setitem__("handle", 7),
     "handle ids must be 0..2"),
    ("handle used twice", lambda m: _node(m, "main/cond1.0", 0).__setitem__("handle", 0),
     "each used by one"),
    ("body run by two nodes", lambda m: _node(m, "main/cond1.0", 0)["bodies"]
     .__setitem__(0, "main/cond1.1"), "more than one conditional node"),
    ("top-level body", lambda m: next(g for g in m["graphs"] if g["name"] == "main/cond1.0")
     .__setitem__("top_level", True), "must be run only by its conditional node"),
    ("body that is a child graph", lambda m: next(g for g in m["graphs"]
                                                  if g["name"] == "main/cond1.1/cond1.1")
     ["nodes"].append({"id": 0, "t": "graph", "graph": "main/cond1.1/cond1.0"}),
     "must be run only by its conditional node"),
    ("graph with conditionals used as a child", lambda m: m["graphs"].append(
        {"name": "outer", "top_level": True, "nodes": [{"id": 0, "t": "graph", "graph": "main"}],
         "kernels": KernelTable.from_nodes([], []).to_manifest(), "edges": b"", "checks": []}),
     "is used as a child graph"),
    ("handle made for an unrelated graph", lambda m: _node(m, "main/cond1.0", 0)
     .__setitem__("handle_graph", "main/cond1.1"), "neither is nor holds"),
    ("handle graph unknown", lambda m: _node(m, "main", 1).__setitem__("handle_graph", "nope"),
     "unknown graph"),
    ("if with three bodies", lambda m: _node(m, "main", 1)["bodies"].append("main/cond1.1/cond1.0"),
     "1 to 2 bodies"),
    ("while with no body", lambda m: _node(m, "main/cond1.0", 0).__setitem__("bodies", []),
     "1 to 1 bodies"),
    ("unknown kind", lambda m: _node(m, "main", 1).__setitem__("kind", "unless"), "is not one of"),
    ("flags beyond ASSIGN_DEFAULT", lambda m: _node(m, "main", 1).__setitem__("flags", 2),
     "out of range"),
    ("body nested in itself", lambda m: _node(m, "main/cond1.0", 0)["bodies"]
     .__setitem__(0, "main/cond1.0"), "more than one conditional node|contains itself"),
    ("kernel handle of an unknown id", lambda m: _set_handles(m, "main", [[0, 9]]),
     r"graphs\[0\].kernels.handles\[0\]: handle 9 does not exist"),
    ("kernel handle outside its graphs", lambda m: _set_handles(m, "main", [[0, 2]]),
     "belongs to graph 'main/cond1.1'"),
    ("kernel handle on a pointer", lambda m: _set_handles(m, "main", [[8, 0]]),
     r"handles\[0\] \(row 0\): position 8 is not an 8-byte argument"),
    ("kernel handle inside an argument", lambda m: _set_handles(m, "main", [[4, 0]]),
     "not an 8-byte argument"),
    ("kernel handle twice", lambda m: _set_handles(m, "main", [[0, 0], [0, 0]]),
     "in increasing order"),
    ("kernel handle id beyond 32 bits", lambda m: _set_handles(m, "main", [[0, 1 << 40]]),
     "out of range"),
    ("ragged kernel handle table", lambda m: _set_handles(m, "main", b"\0" * 8, [1]),
     "16-byte entry"),
    ("more handles than words", lambda m: _set_handles(m, "main", [[0, 0]] * 3, [3]),
     "3 handles in a 16-byte parameter buffer"),
    ("handle counts of the wrong length", lambda m: _set_handles(m, "main", [[0, 0]], [1, 0]),
     r"nhandles: 8 bytes: expected 4"),
    ("handles without their counts", lambda m: _graph(m, "main")["kernels"].pop("nhandles"),
     "nhandles and handles come together"),
    ("memop of unknown kind", lambda m: _node(m, "main", 2)["ops"][0].__setitem__("op", "poke"),
     "is not one of"),
    ("memop with bad flags", lambda m: _node(m, "main", 2)["ops"][1].__setitem__("flags", 4),
     "not a flag set"),
    ("misaligned memop", lambda m: _node(m, "main", 2)["ops"][2].__setitem__("addr", [2, 4]),
     "8-byte aligned"),
    ("memop past its region", lambda m: _node(m, "main", 2)["ops"][0].__setitem__("addr", [2, 254]),
     "overrun"),
    ("memop on an array", lambda m: _node(m, "main", 2)["ops"][0].__setitem__("addr", [3, 0]),
     "device memory"),
    ("32-bit memop value too wide", lambda m: _node(m, "main", 2)["ops"][0]
     .__setitem__("value", 1 << 32), "out of range"),
    ("barrier with an address", lambda m: _node(m, "main", 2)["ops"][3].__setitem__("addr", [2, 0]),
     "takes no address"),
    ("no memops", lambda m: _node(m, "main", 2).__setitem__("ops", []), "at least one"),
    ("array format unknown", lambda m: _region(m, 3)["array"].__setitem__("format", 0xB0),
     "not one cgsnap carries"),
    ("array of 3 channels", lambda m: _region(m, 3)["array"].__setitem__("channels", 3),
     "1, 2 or 4 channels"),
    ("array size disagrees", lambda m: _region(m, 3)["array"].__setitem__("height", 9),
     "the array holds"),
    ("array flags unknown", lambda m: _region(m, 3)["array"].__setitem__("flags", 0x40),
     "not ones cgsnap carries"),
    ("array without descriptor", lambda m: _region(m, 3).pop("array"), "needs its array"),
    ("descriptor on a plain region", lambda m: _region(m, 2).__setitem__(
        "array", dict(_region(m, 3)["array"])), "only it has one"),
    ("depth without height", lambda m: _region(m, 3)["array"].update(height=0, depth=8),
     "not a 1D, 2D or 3D extent"),
    ("bound array", lambda m: _region(m, 3).update(policy="bound") or _region(m, 3).pop("blob"),
     "neither bound"),
    ("kernel pointer into an array", lambda m: _set_column(m, "main", "refs", [8, 3, 0]),
     r"kernels.refs\[0\] \(row 0\): region 3 is a CUDA array"),
    ("stored pointer into an array", lambda m: _region(m, 2).__setitem__(
        "refs", np.array([0, 3, 0], "<u8").tobytes()), r"regions\[2\].refs\[0\]: region 3 is a CUDA array"),
    ("memset into an array", lambda m: _graph(m, "main")["nodes"].append(
        {"id": 9, "t": "memset", "dst": [3, 0], "value": 0, "element_size": 1, "width": 8,
         "height": 1, "pitch": 0}), r"nodes\[4\].dst: a memset writes device memory"),
    ("freeing an array", lambda m: _graph(m, "main")["nodes"].append(
        {"id": 9, "t": "mem_free", "ptr": [3, 0]}), r"nodes\[4\].ptr: a mem_free node frees graph memory"),
    ("strided array", lambda m: _region(m, 3).update(shape=[8, 16], dtype="float32",
                                                      strides=[16, 1]), "neither bound"),
    ("array copy with another height", lambda m: _node(m, "main", 3).__setitem__("dst_height", 4),
     r"must have the array's pitch 128 and height 8 \(found 128, 4\)"),
    ("array copy past the row", lambda m: _node(m, "main", 4).__setitem__("src", [3, 128 * 2 + 72]),
     "not whole elements inside"),
    ("array copy of part of an element", lambda m: _node(m, "main", 4).__setitem__("width", 60),
     "not whole elements inside"),
]


@pytest.mark.parametrize("label,mutate,match", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_invalid_manifest_is_a_format_error(label, mutate, match):
    manifest, sizes = manifest_and_sizes()
    mutate(manifest)
    with pytest.raises(FormatError, match=match):
        Snapshot.from_manifest(manifest, sizes, "test.cgsnap")


def _empty(m, graph, i):
    n = _node(m, graph, i)
    n.clear()
    n.update(id=i, t="empty")


@pytest.mark.parametrize("what,mutate,match", [
    ("conditional node", lambda m: None, "conditional nodes need schema"),
    ("batch mem-op node", lambda m: _empty(m, "main", 1), "batch_mem_op nodes need schema"),
    ("kernel handle table", lambda m: [_empty(m, "main", 1), _empty(m, "main", 2)],
     "handle arguments need schema"),
])
def test_older_schemas_refuse_the_new_types(what, mutate, match):
    """A manifest of a schema before NODE_TYPES_SINCE (schema 2: one map per node, kernel nodes
    too) that carries a new type is refused."""
    manifest, blobs = schema2_manifest(make_snapshot())
    sizes = [len(memoryview(b).cast("B")) for b in blobs]
    r = _region(manifest, 3)                    # no CUDA array (refused first otherwise)
    r.pop("array")
    r["kind"] = "allocation"
    for i in (3, 4):
        _empty(manifest, "main", i)
    kernels = [n for g in manifest["graphs"] for n in g["nodes"] if n["t"] == "kernel"]
    handles = [n.pop("handles") for n in kernels]
    mutate(manifest)
    if "handle" in what:
        kernels[0]["handles"] = handles[0]
    assert manifest["schema"] == 2
    with pytest.raises(FormatError, match=match):
        Snapshot.from_manifest(manifest, sizes, "test.cgsnap")


def test_older_schemas_refuse_arrays():
    manifest, sizes = manifest_and_sizes()
    manifest["schema"] = 2
    manifest["graphs"] = []                # no node gets to be checked first
    with pytest.raises(FormatError, match=r"regions\[3\]: CUDA array regions need schema"):
        Snapshot.from_manifest(manifest, sizes, "test.cgsnap")


def test_merge_renumbers_handles():
    a, b = make_snapshot("a"), make_snapshot("b")
    for s in (a, b):
        for r in s.regions:
            r.origin = id(s) + r.id
    merged = snapfile.merge([a, b])
    handles = sorted(n.handle for g in merged.graphs for n in g.nodes if n.TYPE == "conditional")
    assert handles == list(range(6))
    kernel = merged.graph("b/cond1.1").nodes[0]
    assert kernel.handle_refs() == [(0, 5)]
    assert merged.graph("b/cond1.1").nodes[1].handle == 5
    manifest, blobs = merged.to_manifest()
    Snapshot.from_manifest(manifest, [len(memoryview(x).cast("B")) for x in blobs])


def test_remap_renames_bodies_and_handle_graphs():
    n = ConditionalNode(0, "if", ("x/a", "x/b"), 3, "x", value=1)
    m = n.remap(Renumbering(graphs={"x/a": "y/a", "x": "y"}, handle_offset=2))
    assert (m.bodies, m.handle, m.handle_graph) == (("y/a", "x/b"), 5, "y")


# ---- show / dot ------------------------------------------------------------------------------

def test_show_draws_bodies_under_their_node():
    text = render.show_text(make_snapshot())
    lines = text.splitlines()
    assert lines[0] == "graph 'main': 5 nodes, 4 edges"
    assert not any(line.startswith("graph 'main/") for line in lines)   # bodies: nested only
    then = next(i for i, line in enumerate(lines) if "╰ then: graph 'main/cond1.0'" in line)
    assert lines[then + 1].startswith("    ┌─ node 0 · conditional")
    loop = next(i for i, line in enumerate(lines) if "╰ body: graph 'main/cond1.0/cond0.0'" in line)
    assert lines[loop].startswith("      ╰") and lines[loop + 1].startswith("        ┌─ node 0 · kernel")
    assert any("arg0 → conditional handle 1" in line for line in lines)
    assert any("╰ case 1: graph 'main/cond1.1/cond1.1': 0 nodes, 0 edges (empty)" in line
               for line in lines)
    assert any("wait32 until == 0x7 at region 2 (allocation) + 0x0" in line for line in lines)
    # One body on its own still renders.
    assert render.show_text(make_snapshot(), "main/cond1.0/cond0.0").startswith(
        "graph 'main/cond1.0/cond0.0': 1 nodes")


def test_dot_nests_body_clusters():
    text = render.dot_text(make_snapshot())
    assert text.count("subgraph cluster_") == 7
    main_start = text.index("subgraph cluster_0 {")
    then_start = text.index("subgraph cluster_1 {")
    main_end = text.index("\n  }\n", main_start)
    assert main_start < then_start < main_end          # the body's cluster inside main's
    assert 'g0n1 -> g1n0 [style=dashed, label="then"];' in text
    assert 'g5n0 [label' not in text and "g5empty" in text     # the empty case 1
    assert 'g3n1 -> g5empty [style=dashed, label="case 1"];' in text


# ---- capture: which words pass a handle ------------------------------------------------------

def _recording(kernels, graphs_):
    rec = record.Recording(None, None, None)
    data = FIXTURE.read_bytes()
    h = content_hash(data)
    rec.images[h] = KernelImage(h, "cubin", 90, ("dec", "plain", "setc", "via"), data, "t")
    rec.images["fat"] = KernelImage("fat", "fatbin", 90, ("setc",), b"", "t")
    rec.kernels = [Kernel(i, name, "fat" if name == "fat" else h, layout)
                   for i, (name, layout) in enumerate(kernels)]
    for k in rec.kernels:
        if k.name == "fat":
            rec.kernels[k.id] = dataclasses.replace(k, name="setc", image="fat")
    rec.graphs = graphs_
    return rec


def _cond_graphs(body_nodes, top_nodes=(), value=1, extra=()):
    top = Graph("g", [*top_nodes, ConditionalNode(9, "while", ("g/body",), 0, "g", 1, 1, value)],
                [], top_level=True)
    return [top, Graph("g/body", list(body_nodes), [], top_level=False), *extra]


def test_handle_arguments_of_setter_kernels_become_refs():
    rec = _recording([("setc", ((0, 8), (8, 8))), ("plain", ((0, 8), (8, 8)))],
                     _cond_graphs([_kernel_node(0, 0, [1, 0x7000], refs=[(8, 0, 0)]),
                                   _kernel_node(1, 1, [1, 1])]))
    rec.assign_handle_refs()
    setter, plain = rec.graphs[1].nodes
    assert setter.handle_refs() == [(0, 0)]
    assert plain.handle_refs() == []          # cannot call cudaGraphSetConditional
    assert rec.graphs[0].nodes[-1].exact is False


@pytest.mark.parametrize("case,kernels,nodes", [
    ("the value twice in a setter", [("setc", ((0, 8), (8, 8)))], [_kernel_node(0, 0, [1, 1])]),
    ("the value inside a larger argument", [("setc", ((0, 16),))], [_kernel_node(0, 0, [5, 1])]),
    ("a setter holding no handle", [("dec", ((0, 8), (8, 8)))], [_kernel_node(0, 0, [3, 4])]),
    ("a kernel the image cannot tell about", [("fat", ((0, 8), (8, 8)))],
     [_kernel_node(0, 0, [1, 9])]),
])
def test_doubtful_uses_make_the_handle_exact(case, kernels, nodes):
    rec = _recording(kernels, _cond_graphs(nodes))
    rec.assign_handle_refs()
    assert rec.graphs[0].nodes[-1].exact is True, case


def test_setters_in_child_graphs_make_the_handle_exact():
    from cgsnap.format.model import ChildGraphNode
    graphs_ = _cond_graphs([ChildGraphNode(0, "g/body/child0")],
                           extra=[Graph("g/body/child0", [_kernel_node(0, 0, [1, 2])], [],
                                        top_level=False)])
    rec = _recording([("setc", ((0, 8), (8, 8)))], graphs_)
    rec.assign_handle_refs()
    assert rec.graphs[0].nodes[-1].exact is True
    assert rec.graphs[2].nodes[0].handle_refs() == []


def test_handles_are_seen_only_inside_their_graphs():
    # A kernel in the top graph passes 1, but the handle of value 1 was made for the body.
    top = Graph("g", [_kernel_node(0, 0, [1, 0]),
                      ConditionalNode(9, "while", ("g/body",), 0, "g/body", 0, 0, 1)], [])
    rec = _recording([("setc", ((0, 8), (8, 8)))], [top, Graph("g/body", [], [],
                                                                top_level=False)])
    rec.assign_handle_refs()
    assert top.nodes[0].handle_refs() == []


def test_texture_object_arguments_are_refused(monkeypatch):
    rec = _recording([("plain", ((0, 8), (8, 8)))],
                     [Graph("g", [_kernel_node(0, 0, [2, 0x7000], refs=[(8, 0, 0)])], [])])
    seen = []
    monkeypatch.setattr(driver, "texture_object_resource",
                        lambda v: seen.append(v) or ("texture object over array memory"
                                                     if v == 2 else None))
    with pytest.raises(UnsupportedNodeError, match=r"node 0 \(kernel plain\): argument 0 holds "
                                                   r"0x2, the value of a live texture object"):
        rec.refuse_texture_objects()
    assert seen == [2]                    # pointers are not probed


# ---- capture: conditional nodes through the registry -----------------------------------------

class FakeDriverGraphs:
    """graphs.* over dicts: graph -> nodes, node -> (type, raw)."""

    def __init__(self, monkeypatch, graphs_: dict, nodes: dict):
        monkeypatch.setattr(graphs, "graph_nodes", lambda g: list(graphs_[int(g)]))
        monkeypatch.setattr(graphs, "node_type", lambda n: nodes[n][0])
        monkeypatch.setattr(graphs, "read_node", lambda n, t, where: dict(nodes[n][1]))
        monkeypatch.setattr(graphs, "graph_edges", lambda g: [])
        monkeypatch.setattr(driver, "as_graph", lambda g: int(g))


@pytest.fixture
def reg(monkeypatch):
    r = graph_hooks.ConditionalRegistry()
    monkeypatch.setattr(graph_hooks, "_REGISTRY", r)
    return r


def test_conditional_nodes_are_read_from_the_registry(monkeypatch, reg):
    G, B0, B1, IN = 0x100, 0x200, 0x300, 0x400
    FakeDriverGraphs(monkeypatch, {G: [1], B0: [2], B1: [], IN: []},
                     {1: ("conditional", {"node": 1, "driver": 13000}), 2: ("conditional",
                      {"node": 2, "driver": 13000})})
    reg.add_handle(G, 1, 0, 0, 0)
    reg.add_handle(B0, 1, 0, 3, 1)          # the nested node's handle, made for the body
    reg.add_node(G, 1, 1, 0, 2, (B0, B1), 0)
    reg.add_node(B0, 2, 1, 2, 1, (IN,), 0)
    rec = record.Recording(None, None, None)
    rec.walk(G, "g")
    names = [g.name for g in rec.graphs]
    assert names == ["g", "g/cond0.0", "g/cond0.0/cond0.0", "g/cond0.1"]
    outer, inner = rec.graphs[0].nodes[0], rec.graphs[1].nodes[0]
    assert (outer.kind, outer.bodies, outer.handle, outer.handle_graph) == \
        ("if", ("g/cond0.0", "g/cond0.1"), 0, "g")
    assert (inner.kind, inner.handle, inner.handle_graph, inner.default, inner.flags) == \
        ("switch", 1, "g/cond0.0", 3, 1)
    assert [g.top_level for g in rec.graphs] == [True, False, False, False]


def test_an_unrecorded_conditional_names_the_driver(monkeypatch, reg):
    FakeDriverGraphs(monkeypatch, {0x100: [1]}, {1: ("conditional", {"node": 1, "driver": 13000})})
    with pytest.raises(UnsupportedNodeError, match=r"graph 'g' node 0 \(conditional\): "
                       r"conditional nodes can be read back only when the cgsnap recorder saw "
                       r"them created \(cgsnap.start_recorder\(\) before the graph is "
                       r"built/captured\) or, for type/size/bodies, on a CUDA 13.2\+ driver; "
                       r"this driver is 13.0 and the recorder is not running"):
        record.Recording(None, None, None).walk(0x100, "g")


def test_a_driver_that_reads_the_node_still_needs_the_handle(monkeypatch, reg):
    FakeDriverGraphs(monkeypatch, {0x100: [1], 0x200: []},
                     {1: ("conditional", {"node": 1, "driver": 13020, "handle": 1, "type": 1,
                                          "size": 1, "bodies": [0x200]})})
    with pytest.raises(UnsupportedNodeError, match="default value and flags of conditional "
                                                   "handle 0x1 cannot be read back on any driver"):
        record.Recording(None, None, None).walk(0x100, "g")
    reg.add_handle(0x100, 1, 0, 1, 1)
    rec = record.Recording(None, None, None)
    rec.walk(0x100, "g")
    assert rec.graphs[0].nodes[0].kind == "while" and rec.graphs[0].nodes[0].default == 1


def test_external_semaphores_are_refused_with_the_reason(monkeypatch, reg):
    FakeDriverGraphs(monkeypatch, {0x100: [1]}, {1: ("ext_semas_wait", {})})
    with pytest.raises(UnsupportedNodeError, match=r"node 0 \(ext_semas_wait\): nodes of type "
                                                   r"ext_semas_wait cannot be carried: an external "
                                                   r"semaphore wait node waits on semaphores "
                                                   r"imported from outside the process"):
        record.Recording(None, None, None).walk(0x100, "g")


# ---- capture: raw parameters -----------------------------------------------------------------

def test_batch_mem_ops_are_read_from_the_driver_struct(monkeypatch):
    entries = (ctypes.c_uint8 * (48 * 3))()
    import struct
    struct.pack_into("<IIQQI", entries, 0, 2, 0, 0x7000_0000, 5, 0)            # write32 5
    struct.pack_into("<IIQQI", entries, 48, 1, 0, 0x7000_0000, 5, 1)           # wait32 == 5
    struct.pack_into("<II", entries, 96, 6, 1)                                  # barrier (GPU)
    params = (ctypes.c_uint64 * 4)(0, 3, ctypes.addressof(entries), 0)

    class Fake:
        def getPtr(self):
            return ctypes.addressof(params)
    monkeypatch.setattr(graphs, "call", lambda fn, *a: Fake())
    raw = graphs.read_node(object(), "batch_mem_op", "here")
    assert raw == {"flags": 0, "ops": [
        {"operation": 2, "addr": 0x7000_0000, "value": 5, "flags": 0},
        {"operation": 1, "addr": 0x7000_0000, "value": 5, "flags": 1},
        {"operation": 6, "addr": 0, "value": 0, "flags": 1}]}

    class Rec:
        def device_ref(self, addr, what, span):
            assert span == 4
            return Ref(2, addr - 0x7000_0000)
    node = BatchMemOpNode.from_live(4, raw, Rec(), "n")
    assert node.ops == (MemOp("write32", Ref(2, 0), 5), MemOp("wait32", Ref(2, 0), 5, 1),
                        MemOp("barrier", None, 0, 1))


def test_memcpy_to_an_array_is_a_region_of_its_packed_contents(monkeypatch):
    monkeypatch.setattr(driver, "array_descriptor", lambda a: (0x20, 2, 16, 8, 0, 0))
    rec = record.Recording(None, None, None)
    raw = {"width": 64, "height": 4, "depth": 1,
           "src": {"kind": "array", "array": 0xA, "x": 16, "y": 2, "z": 0, "lod": 0},
           "dst": {"kind": "array", "array": 0xA, "x": 0, "y": 0, "z": 0, "lod": 0}}
    node = MemcpyNode.from_live(0, raw, rec, "n")
    assert len(rec.regions) == 1 and rec.regions[0].kind is RegionKind.ARRAY
    assert rec.regions[0].size == 16 * 8 * 8
    assert node.src == Ref(0, 2 * 128 + 16) and (node.src_pitch, node.src_height) == (128, 8)
    with pytest.raises(UnsupportedNodeError, match="mipmap level 1"):
        MemcpyNode.from_live(0, dict(raw, src=dict(raw["src"], lod=1)), rec, "n")
    with pytest.raises(CaptureError, match="not an element"):
        rec.array_ref(0xA, 2, 0, 0, "n")
    monkeypatch.setattr(driver, "array_descriptor", lambda a: (0xB0, 1, 16, 8, 0, 0))
    with pytest.raises(UnsupportedNodeError, match="format 0xb0"):
        rec.array_ref(0xB, 0, 0, 0, "n")


# ---- restore: plans and handles --------------------------------------------------------------

def _state(snap, made=None):
    plans = {g.name: GraphPlan(snap, g, set(), param_offsets(snap.kernels)) for g in snap.graphs}
    bases = np.array([0x1000 * (r.id + 1) for r in snap.regions], dtype=np.uint64)
    env = graphs.AddEnv("ctx", 0, [])
    return BuildState(snap, bases, None, None, None, [], {}, {}, env, plans=plans,
                      arrays={3: "ARRAY"}), plans


def test_plans_place_handle_words():
    snap = make_snapshot()
    plans = {g.name: GraphPlan(snap, g, set(), param_offsets(snap.kernels)) for g in snap.graphs}
    p = plans["main/cond1.1"]
    assert p.handle_pos.tolist() == [0] and p.handle_id.tolist() == [2]
    assert [n.id for n in plans["main"].conditionals] == [1]
    assert plans["main"].children == []                     # bodies are not child graphs


def test_handle_columns_are_written_read_and_planned_from_the_file():
    """The kernel table's nhandles / handles columns: written only for a table whose nodes
    pass handles, read back into the same nodes, and planned from the columns into the words
    of the graph's one parameter buffer that restore writes the handle values to."""
    snap = make_snapshot()
    g = snap.graph("main/cond1.1")
    g.nodes = g.nodes + [_kernel_node(2, 1, [0x55, 0], handles=[(8, 2)], refs=[(0, 2, 16)])]
    g.edges = g.edges + [Edge(0, 2)]
    manifest, sizes = manifest_and_sizes(snap)
    tables = {gm["name"]: gm["kernels"] for gm in manifest["graphs"]}
    assert np.frombuffer(tables["main/cond1.1"]["nhandles"], "<u4").tolist() == [1, 1]
    assert np.frombuffer(tables["main/cond1.1"]["handles"], "<u8").tolist() == [0, 2, 8, 2]
    assert set(tables["main/cond1.1/cond1.0"]) == set(tables["main/cond1.1/cond1.1"]) == {
        "ids", "kernel", "dims", "params", "nrefs", "refs", "attrs", "attr"}
    back = Snapshot.from_manifest(manifest, sizes, "t.cgsnap")
    bg = back.graph("main/cond1.1")
    offsets = param_offsets(back.kernels)
    plan = GraphPlan(back, bg, set(), offsets)      # from the columns: no node objects
    assert all(x._nodes is None for x in back.graphs), "validation or the plan made node objects"
    assert [n.handle_refs() for n in bg.nodes if n.TYPE == "kernel"] == [[(0, 2)], [(8, 2)]]
    assert plan.handle_pos.tolist() == [0, 3] and plan.handle_id.tolist() == [2, 2]
    mem = GraphPlan(snap, g, set(), offsets)
    assert mem.handle_pos.tolist() == plan.handle_pos.tolist()
    words = np.frombuffer(bytearray(plan.arg_bytes), dtype=np.uint64).copy()
    values = np.array([0, 0, 0xABCD0000], dtype=np.uint64)
    words[plan.handle_pos] = values[plan.handle_id]
    assert words.tolist() == [0xABCD0000, 0, 0x55, 0xABCD0000]


def test_handles_are_made_per_graph_in_recorded_order(monkeypatch):
    snap = make_snapshot()
    made = []

    def create(graph, ctx, default, flags):
        made.append((graph, default, flags))
        return len(made)
    monkeypatch.setattr(graphs, "conditional_handle_create", create)
    snap.graph("main/cond1.1").nodes[1].exact = False
    state, _ = _state(snap, made)
    state.create_handles("main", "G")
    assert made == [("G", 0, 0), ("G", 1, 1)]                # values 1 then 2, as recorded
    assert state.handle(0) == 1 and state.handle(1) == 2
    state.create_handles("main/cond1.1", "B")
    assert state.handle(2) == 3              # not the recorded 1: patched (the handle is not exact)
    snap.graph("main/cond1.1").nodes[1].exact = True
    state, _ = _state(snap, made)
    with pytest.raises(RestoreError, match=r"graph 'main/cond1.1' node 1 \(conditional\): the "
                                           r"driver gave its handle the value 0x4, the snapshot "
                                           r"recorded 0x1"):
        state.create_handles("main/cond1.1", "B")


def test_nodes_convert_to_raw_parameters(monkeypatch):
    snap = make_snapshot()
    state, _ = _state(snap, [])
    state.handle_values[:] = [11, 12, 13]
    assert snap.graph("main").nodes[1].to_live(state) == {"type": 0, "size": 2, "handle": 11}
    ops = snap.graph("main").nodes[2].to_live(state)["ops"]
    assert ops[0] == {"operation": 2, "addr": 0x3000, "value": 7, "flags": 0}
    assert ops[2]["addr"] == 0x3008 and ops[3] == {"operation": 6, "addr": 0, "value": 0,
                                                   "flags": 1}
    raw = snap.graph("main").nodes[4].to_live(state)
    assert raw["src"] == {"kind": "array", "array": "ARRAY", "x": 16, "y": 2, "z": 0}
    assert raw["dst"]["kind"] == "device" and raw["dst"]["addr"] == 0x2000 + 512
    filled = []
    monkeypatch.setattr("cgsnap.restore.build.add_nodes",
                        lambda st, name, plan, graph: filled.append((name, graph)))
    snap.graph("main").nodes[1].on_added(state, {"bodies": ["B0", "B1"]})
    assert filled == [("main/cond1.0", "B0"), ("main/cond1.1", "B1")]


def test_child_graphs_inside_bodies_are_built_before_their_body(monkeypatch):
    """build_graph over stand-in driver calls: a child graph held by a conditional body exists
    before the body is filled in (the body is built inside its node, after the handles)."""
    from cgsnap.format.model import ChildGraphNode
    from cgsnap.restore import build
    snap = make_snapshot()
    body = snap.graph("main/cond1.1/cond1.1")                 # the empty case 1
    body.nodes = [ChildGraphNode(0, "main/cond1.1/cond1.1/child0")]
    snap.graphs.append(Graph("main/cond1.1/cond1.1/child0", [EmptyNode(0)], [],
                             top_level=False))
    manifest, sizes = manifest_and_sizes(snap)
    snap = Snapshot.from_manifest(manifest, sizes, "t.cgsnap")          # validated as such
    events, made = [], iter(range(100, 1000))

    def add_node(graph, type_name, deps, raw, env):
        events.append((type_name, graph, raw.get("graph")))
        if type_name == "conditional":
            return next(made), {"bodies": [next(made) for _ in range(raw["size"])]}
        return next(made), None

    class Builder:
        add_kernel = staticmethod(lambda *a: 0)
    monkeypatch.setattr(graphs, "graph_create", lambda: next(made))
    monkeypatch.setattr(graphs, "add_node", add_node)
    monkeypatch.setattr(graphs, "add_dependencies", lambda graph, edges: None)
    per_graph: dict = {}

    def handle_create(graph, ctx, default, flags):      # the driver numbers them per graph
        per_graph[graph] = per_graph.get(graph, 0) + 1
        return per_graph[graph]
    monkeypatch.setattr(graphs, "conditional_handle_create", handle_create)
    monkeypatch.setattr(graphs, "graph_destroy", lambda g: None)
    state, plans = _state(snap)
    state.builder, state.func_handles = Builder(), np.zeros(len(snap.kernels), dtype=np.uint64)

    class Ledger:
        def add(self, kind, obj):
            return obj
    build.build_graph(state, "main", plans, Ledger())
    child = state.built["main/cond1.1/cond1.1/child0"]
    uses = [e for e in events if e[0] == "graph"]
    assert uses == [("graph", uses[0][1], child)]
    assert events.index(uses[0]) > next(i for i, e in enumerate(events) if e[0] == "empty"), \
        "the child graph's own node is added before the body that uses it"


def test_deepcopy_of_the_model_is_independent():
    a = make_snapshot()
    b = copy.deepcopy(a)
    b.graph("main").nodes[1].exact = True
    assert a.graph("main").nodes[1].exact is False


def _leaves(obj, path=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, path + (i,))
    yield path


def test_every_field_of_the_new_types_takes_hostile_values():
    """Each leaf (and container) of the graphs and regions replaced by values of the wrong
    type or range: the manifest reads or fails with a FormatError, nothing else."""
    base, sizes = manifest_and_sizes()
    hostile = (None, -1, 1 << 70, "x", [0, [1]], {"k": 1}, b"\xff" * 24)
    def new_type(path) -> bool:
        if path[:2] == ("regions", 3):
            return True
        if path[0] == "graphs" and len(path) > 3 and path[2] == "nodes":
            n = base["graphs"][path[1]]["nodes"][path[3]]
            return n["t"] in ("conditional", "batch_mem_op", "memcpy")
        if path[0] == "graphs" and len(path) > 3 and path[2] == "kernels":
            return path[3] in ("nhandles", "handles")
        return False
    paths = [p for p in _leaves(base) if len(p) > 1 and new_type(p)]
    failed = 0
    for path in paths:
        for value in hostile:
            m = copy.deepcopy(base)
            target = m
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = value
            try:
                Snapshot.from_manifest(m, sizes, "fuzz.cgsnap")
            except FormatError:
                failed += 1
    assert failed > len(paths) * 4       # most are refused (a few values are harmless: names)


_HANDLES_BASE = manifest_and_sizes()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graph=st.sampled_from(["main", "main/cond1.0/cond0.0", "main/cond1.1"]),
       column=st.sampled_from(["nhandles", "handles"]), index=st.integers(0, 64),
       value=st.integers(0, 255))
def test_any_byte_of_the_handle_columns_changed_is_a_model_or_a_format_error(graph, column,
                                                                               index, value):
    """One byte of a kernel table's handle columns changed: FormatError, or a model whose every
    handle entry is a whole 8-byte argument, no pointer, of a handle visible in its graph."""
    manifest, sizes = _HANDLES_BASE
    m = copy.deepcopy(manifest)
    t = _graph(m, graph)["kernels"]
    raw = bytearray(t[column])
    raw[index % len(raw)] = value
    t[column] = bytes(raw)
    try:
        snap = Snapshot.from_manifest(m, list(sizes), "f.cgsnap")
    except FormatError:
        return
    visible = {"main": {0}, "main/cond1.0/cond0.0": {0, 1}, "main/cond1.1": {0, 2}}[graph]
    for n in snap.graph(graph).nodes:
        if n.TYPE != "kernel":
            continue
        args = {off for off, size in snap.kernels[n.kernel].params if size == 8}
        pointers = {p for p, _ in n.pointers()}
        for pos, hid in n.handle_refs():
            assert pos in args and pos % 8 == 0 and pos not in pointers and hid in visible


def test_diff_compares_memory_operations_through_the_regions(tmp_path):
    """``cgsnap diff`` of two files with batch mem-op and conditional nodes: the same file is
    the same; a changed written value and a changed condition default are named, in JSON too."""
    import json

    from cgsnap.tools.diff import diff_files, diff_text
    a, b = make_snapshot(), make_snapshot()
    g = b.graph("main")
    ops = list(g.nodes[2].ops)
    ops[0] = MemOp("write32", Ref(2, 0), 8)
    g.nodes = [dataclasses.replace(n, ops=tuple(ops)) if n.id == 2 else n for n in g.nodes]
    b.graph("main/cond1.0").nodes[0].default = 0
    a.save(tmp_path / "a.cgsnap", prune=False)
    b.save(tmp_path / "b.cgsnap", prune=False)
    assert diff_files(str(tmp_path / "a.cgsnap"), str(tmp_path / "a.cgsnap"))["same"]
    d = diff_files(str(tmp_path / "a.cgsnap"), str(tmp_path / "b.cgsnap"))
    text = diff_text(d)
    assert 'ops[0] write32 0x7 flags 0x0 → region 2 (allocation) + 0x0 vs write32 0x8' in text
    assert "default 1 vs 0" in text
    json.dumps(d, allow_nan=False)


def test_node_by_node_replay_refuses_conditional_and_memop_graphs():
    from cgsnap.restore.trace import check_steppable
    snap = make_snapshot()
    with pytest.raises(UnsupportedNodeError, match=r"graph 'main' node 1 \(conditional\): "
                                                   r"stepping runs nodes one at a time, and a "
                                                   r"conditional node runs its bodies"):
        check_steppable(snap, snap.graph("main"))
    g = snap.graph("main")
    g.nodes = [n for n in g.nodes if n.TYPE != "conditional"]
    g.edges = [e for e in g.edges if 1 not in (e.src, e.dst)]
    with pytest.raises(UnsupportedNodeError, match=r"node 2 \(batch_mem_op\): .* its waits"):
        check_steppable(snap, g)


def test_show_and_dot_escape_the_names_of_bodies():
    """A body graph's name is file data: drawn nested, it is escaped like every other name."""
    snap = make_snapshot()
    old, new = "main/cond1.0", "main/\x1b[2Jthen\u202e"
    renames = {}
    for g in snap.graphs:
        if g.name.startswith(old):
            renames[g.name] = new + g.name[len(old):]
    m = Renumbering(graphs=renames)
    for g in snap.graphs:
        g.nodes = [n.remap(m) for n in g.nodes]
        g.name = renames.get(g.name, g.name)
    manifest, sizes = manifest_and_sizes(snap)
    back = Snapshot.from_manifest(manifest, sizes, "t.cgsnap")
    show, dot = render.show_text(back), render.dot_text(back)
    for text in (show, dot):
        assert "\x1b" not in text and "\u202e" not in text
    assert "╰ then: graph 'main/\\x1b[2Jthen\\u202e': 1 nodes" in show
    assert "main/\\x1b[2Jthen\\u202e/cond0.0" in show       # nested two deep, escaped too


def test_array_contents_are_read_through_the_array_never_as_device_addresses(monkeypatch):
    """A CUDA array region's origin is its CUarray handle: snapshot reads it with a 3D copy
    into host memory (like host regions), and never hands it to the device-range reader."""
    monkeypatch.setattr(driver, "array_descriptor", lambda a: (0x01, 1, 16, 2, 0, 0))
    rec = record.Recording(None, None, None)
    ref, desc = rec.array_ref(0xA0, 0, 0, 0, "n")
    pattern = np.arange(32, dtype=np.uint8)

    def array_copy(array, host, row_bytes, rows, slices, to_host):
        assert (array, row_bytes, rows, slices, to_host) == (0xA0, 16, 2, 1, True)
        ctypes.memmove(host, pattern.ctypes.data, 32)
    monkeypatch.setattr(driver, "array_copy", array_copy)

    def device_ranges(spans, hold, stager=None):
        assert not spans, f"device ranges read for an array region: {spans}"
        return [], "none"
    monkeypatch.setattr(record, "hold_contents", device_ranges)
    record._read_contents(rec, "copy", None)
    r = rec.regions[ref.region]
    from cgsnap.format.hashing import region_hash
    assert np.array_equal(np.asarray(r.data), pattern) and r.content_hash == region_hash(pattern)


def test_a_cached_order_that_no_longer_fits_the_columns_is_not_used():
    """Graph.table_order() is the validator's order for the columns it read; a plan given one
    of the wrong length (columns changed in place since) sorts again instead of misplacing."""
    snap = make_snapshot()
    manifest, sizes = manifest_and_sizes(snap)
    back = Snapshot.from_manifest(manifest, sizes, "t.cgsnap")
    offsets = param_offsets(back.kernels)
    g = back.graphs[0]
    want = GraphPlan(back, g, set(), offsets)
    assert g.table_order() is not None
    g._table_order = g.table_order()[:-1]
    got = GraphPlan(back, g, set(), offsets)
    assert got.node_ids.tolist() == want.node_ids.tolist()
