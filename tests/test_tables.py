"""Schema 3's columns (cgsnap.format.tables): kernel nodes and edges as a few byte strings per
graph. Exact round trips, the same model as schema 2's per-node maps, strict validation with
errors naming the column and row, and restore plans made without an object per node (CPU)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from synthetic import make_snapshot, schema2_manifest

from cgsnap.errors import FormatError
from cgsnap.format.model import Snapshot
from cgsnap.restore.plan import GraphPlan, param_offsets


def base():
    snap = make_snapshot()
    manifest, blobs = snap.to_manifest()
    return snap, manifest, [len(memoryview(b).cast("B")) for b in blobs]


def test_schema_3_round_trip_and_same_model_as_schema_2():
    snap, manifest, sizes = base()
    assert manifest["schema"] == 3
    g = manifest["graphs"][0]
    assert set(g["kernels"]) == {"ids", "kernel", "dims", "params", "nrefs", "refs", "attrs",
                                 "attr"}
    assert all(n["t"] != "kernel" for n in g["nodes"]) and isinstance(g["edges"], bytes)
    new = Snapshot.from_manifest(manifest, sizes, "s.cgsnap")
    m2, _ = schema2_manifest(snap)
    old = Snapshot.from_manifest(m2, sizes, "s.cgsnap")
    assert [g.nodes for g in new.graphs] == [g.nodes for g in old.graphs] == \
        [g.nodes for g in snap.graphs]
    assert [g.edges for g in new.graphs] == [g.edges for g in snap.graphs]
    assert new.to_manifest()[0] == manifest == old.to_manifest()[0]


def test_reading_makes_no_object_per_kernel_node():
    snap, manifest, sizes = base()
    back = Snapshot.from_manifest(manifest, sizes, "s.cgsnap")
    g = back.graphs[0]
    plans = GraphPlan(back, g, set(), param_offsets(back.kernels))
    assert g._nodes is None and g._edges is None, "the validator or the plan made node objects"
    # ... and the plan equals the one made from node objects.
    ref = GraphPlan(snap, snap.graphs[0], set(), param_offsets(snap.kernels))
    for attr in ("node_ids", "dep_first", "ndeps", "kernel_index", "param_rel", "patch_pos",
                 "patch_region", "patch_off", "attr_rel", "node_row"):
        assert np.array_equal(np.asarray(getattr(plans, attr)), np.asarray(getattr(ref, attr))), attr
    assert plans.runs == ref.runs and plans.dep_lists == ref.dep_lists
    assert plans.special_edges == ref.special_edges and plans.children == ref.children
    assert plans.params.tobytes() == ref.params.tobytes()
    assert bytes(plans.arg_bytes) == bytes(ref.arg_bytes)
    assert sorted(plans.others) == sorted(ref.others)


def _col(m, name, dtype="<u4"):
    return np.frombuffer(m["graphs"][0]["kernels"][name], dtype=dtype).copy()


def _set_col(m, name, arr, dtype="<u4"):
    m["graphs"][0]["kernels"][name] = np.asarray(arr).astype(dtype).tobytes()


def _mut(name, fn, dtype="<u4"):
    def mutate(m):
        arr = _col(m, name, dtype)
        _set_col(m, name, fn(arr), dtype)
    return mutate


def _edges(fn):
    def mutate(m):
        arr = np.frombuffer(m["graphs"][0]["edges"], dtype="<u4").reshape(-1, 3).copy()
        m["graphs"][0]["edges"] = np.asarray(fn(arr)).astype("<u4").tobytes()
    return mutate


def _refs(j, field, value):
    def mutate(m):
        t = np.frombuffer(m["graphs"][0]["kernels"]["refs"], dtype="<u8").reshape(-1, 3).copy()
        t[j, field] = value
        m["graphs"][0]["kernels"]["refs"] = t.tobytes()
    return mutate


CORRUPTIONS = [
    ("kernel out of range", _mut("kernel", lambda a: np.where(np.arange(len(a)) == 1, 9, a)),
     r"kernels.kernel\[1\]: kernel 9 does not exist"),
    ("zero grid", _mut("dims", lambda a: np.where(np.arange(len(a)) == 0, 0, a)),
     r"kernels.dims\[0\]: grid and block"),
    ("huge shared memory", _mut("dims", lambda a: np.where(np.arange(len(a)) == 13, 1 << 25, a)),
     r"kernels.dims\[1\]: .* more than 16 MiB"),
    ("short column", lambda m: m["graphs"][0]["kernels"].__setitem__(
        "kernel", m["graphs"][0]["kernels"]["kernel"][:4]), r"kernels.kernel: 4 bytes"),
    ("column not bytes", lambda m: m["graphs"][0]["kernels"].__setitem__("dims", [1, 2]),
     "expected bytes"),
    ("params too short", lambda m: m["graphs"][0]["kernels"].__setitem__(
        "params", m["graphs"][0]["kernels"]["params"][:-8]), "each buffer padded to 8"),
    ("more pointers than words", _mut("nrefs", lambda a: a + 10),
     r"kernels.nrefs\[0\]: 12 pointers in a 20-byte"),
    ("refs length disagrees", _mut("nrefs", lambda a: np.where(np.arange(len(a)) == 0, 1, a)),
     "one 24-byte entry"),
    ("dangling region", _refs(0, 1, 99), r"kernels.refs\[0\] \(row 0\): region 99"),
    ("offset beyond region", _refs(1, 2, 10 ** 7), "beyond the end"),
    ("misaligned", _refs(3, 0, 12), "8-aligned"),
    ("pointer across arguments", _refs(1, 0, 16), "not an 8-byte word inside one argument"),
    ("unknown attribute set", _mut("attr", lambda a: a + 5, "<i4"), r"kernels.attr\[0\]"),
    ("bad attribute map", lambda m: m["graphs"][0]["kernels"]["attrs"].append({"evil": 1}),
     "unknown field"),
    ("missing column", lambda m: m["graphs"][0]["kernels"].pop("nrefs"), "missing field"),
    ("duplicate id with another node", _mut("ids", lambda a: np.where(np.arange(len(a)) == 1, 5, a)),
     "duplicate node id"),
    ("edge to nowhere", _edges(lambda a: np.vstack([a, [[0, 999, 0]]])),
     r"edges\[12\]: edge 0->999"),
    ("self loop", _edges(lambda a: np.vstack([a, [[3, 3, 0]]])), "self-loop"),
    ("repeated edge", _edges(lambda a: np.vstack([a, a[2:3]])),
     r"edges\[12\]: edge \d+->\d+ is given twice"),
    ("cycle", _edges(lambda a: np.vstack([a, [[11, 0, 0]]])), "cycle"),
    ("edge table not triples", lambda m: m["graphs"][0].__setitem__(
        "edges", m["graphs"][0]["edges"][:-4]), "a multiple of 12"),
    ("kernel node among the maps", lambda m: m["graphs"][0]["nodes"].append(
        {"id": 50, "t": "kernel"}), "belong in the kernel table"),
]


@pytest.mark.parametrize("label,mutate,match", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_invalid_tables_are_format_errors(label, mutate, match):
    _, manifest, sizes = base()
    mutate(manifest)
    with pytest.raises(FormatError, match=match):
        Snapshot.from_manifest(manifest, sizes, "t.cgsnap")


_BASE = base()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(column=st.sampled_from(["ids", "kernel", "dims", "params", "nrefs", "refs", "attr"]),
       index=st.integers(0, 200), value=st.integers(0, 255))
def test_any_byte_of_a_column_changed_is_a_model_or_a_format_error(column, index, value):
    """One byte of any column changed: the reader either refuses with FormatError or returns a
    model every node of which is valid (it writes back to the same bytes)."""
    _, manifest, sizes = _BASE
    m = copy.deepcopy(manifest)
    raw = bytearray(m["graphs"][0]["kernels"][column])
    if not raw:
        return
    raw[index % len(raw)] = value
    m["graphs"][0]["kernels"][column] = bytes(raw)
    try:
        snap = Snapshot.from_manifest(m, list(sizes), "f.cgsnap")
    except FormatError:
        return
    assert snap.to_manifest()[0]["graphs"][0]["kernels"][column] == bytes(raw)
    for n in snap.graphs[0].nodes:      # materialising the nodes never fails after validation
        assert n.id >= 0


def test_a_repeated_edge_is_refused_in_schema_2_too():
    """The plan passes a node's dependencies as a run of consecutive handles when they look
    consecutive: a repeated edge (a, a, a + 2) would look so and add a dependency on a + 1."""
    from synthetic import make_snapshot, schema2_manifest
    from cgsnap.format.model import Edge
    snap = make_snapshot()
    snap.graphs[0].edges = snap.graphs[0].edges + [Edge(0, 1)]
    manifest, blobs = schema2_manifest(snap)
    with pytest.raises(FormatError, match=r"graphs\[0\].edges\[12\]: edge 0->1 is given twice"):
        Snapshot.from_manifest(manifest, [len(memoryview(b).cast("B")) for b in blobs], "t")
