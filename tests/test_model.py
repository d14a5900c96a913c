"""The symbolic model and its manifest: exact round trips and strict validation (CPU)."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from synthetic import make_snapshot, schema2_manifest

import cgsnap
from cgsnap.errors import FormatError
from cgsnap.format import fileformat, snapfile
from cgsnap.format.model import Ref, Snapshot


def manifest_and_sizes(snap=None):
    """A schema-2 manifest (one map per node): these tests hold the per-node reader to the
    spec; tests/test_tables.py does the same for schema 3's columns."""
    snap = snap or make_snapshot()
    manifest, blobs = schema2_manifest(snap)
    return manifest, [len(memoryview(b).cast("B")) for b in blobs], blobs


def test_model_file_model_roundtrip_is_exact(tmp_path):
    snap = make_snapshot()
    path = tmp_path / "s.cgsnap"
    snap.save(path, prune=False)     # (pruning would note in meta that it had no GPU)
    back = cgsnap.read(path)
    # The manifest of the re-read model equals the original one (blob indices included) ...
    m1, b1 = snap.to_manifest()
    with fileformat.open_file(path) as f:
        for r in back.regions:
            if r.data is not None:
                r.data = bytes(f.blob(r.data))
        for g in back.graphs:
            g.checks = {rid: bytes(f.blob(i)) for rid, i in g.checks.items()}
    m2, b2 = back.to_manifest()
    assert m1 == m2
    # ... and so do the blobs, byte for byte.
    assert [bytes(memoryview(b).cast("B")) for b in b1] == [bytes(memoryview(b).cast("B"))
                                                           for b in b2]
    assert back.graphs[0].nodes[1].arguments(back.kernels[1].params)[0].refs == \
        ((0, Ref(2, 0)), (16, Ref(4, 64)))
    assert back.graphs[0].nodes[1].attrs == {"priority": 1, "cluster_dim": (2, 1, 1)}


def test_same_snapshot_same_bytes(tmp_path):
    a, b = tmp_path / "a.cgsnap", tmp_path / "b.cgsnap"
    make_snapshot().save(a)
    make_snapshot().save(b)
    assert a.read_bytes() == b.read_bytes()


def test_merge_stores_shared_regions_once():
    s1, s2 = make_snapshot(), make_snapshot()
    for s in (s1, s2):
        for r in s.regions:
            r.origin = 0x7000_0000 + r.id * 0x10000
    s2.graphs[0].name = "step2"
    s2.graphs[1].name = "step2/child6"
    s2.graphs[0].nodes[6].graph = "step2/child6"
    merged = snapfile.merge([s1, s2])
    assert len(merged.regions) == len(s1.regions)
    assert len(merged.kernels) == len(s1.kernels) and len(merged.images) == 1
    assert merged.events == 2
    assert merged.graphs[2].nodes[7].event == 1
    with pytest.raises(cgsnap.CaptureError, match="two snapshots hold a graph named"):
        snapfile.merge([make_snapshot(), make_snapshot()])


def test_topological_order_respects_edges():
    g = make_snapshot().graphs[0]
    order = [n.id for n in g.topological_order()]
    pos = {nid: i for i, nid in enumerate(order)}
    assert all(pos[e.src] < pos[e.dst] for e in g.edges)


def _set_ref(m, node, j, field, value):
    """Change field ``field`` (0 position, 1 region, 2 offset) of pointer ``j`` of a packed
    kernel node of graph 0."""
    n = m["graphs"][0]["nodes"][node]
    table = np.frombuffer(n["refs"], dtype="<u8").reshape(-1, 3).copy()
    table[j, field] = value
    n["refs"] = table.tobytes()


def _as_schema_1(m):
    """The same manifest as cgsnap 0.1 wrote it: one map per kernel argument."""
    m = copy.deepcopy(m)
    m["schema"] = 1
    layouts = [k["params"] for k in m["kernels"]]
    for g in m["graphs"]:
        for n in g["nodes"]:
            if n["t"] == "kernel":
                params = n.pop("params")
                table = np.frombuffer(n.pop("refs"), dtype="<u8").reshape(-1, 3).tolist()
                n["args"] = [{"d": params[off:off + size],
                              "r": [[p - off, r, o] for p, r, o in table if off <= p < off + size]}
                             for off, size in layouts[n["kernel"]]]
    return m


def test_schema_1_files_still_read():
    manifest, sizes, _ = manifest_and_sizes()
    assert manifest["schema"] == 2
    new = Snapshot.from_manifest(manifest, sizes, "new.cgsnap")
    old = Snapshot.from_manifest(_as_schema_1(manifest), sizes, "old.cgsnap")
    # The same model: both read into the packed form.
    assert [n for g in old.graphs for n in g.nodes] == [n for g in new.graphs for n in g.nodes]
    # Written again, a schema-1 model becomes the same manifest as a schema-2 one.
    assert old.to_manifest()[0] == new.to_manifest()[0]


@pytest.mark.parametrize("change,match", [
    (lambda m: m["graphs"][0]["nodes"][0]["args"][0]["r"][0].__setitem__(1, 99), "out of range"),
    (lambda m: m["graphs"][0]["nodes"][1]["args"][0]["r"][1].__setitem__(0, 12), "8-aligned"),
    (lambda m: m["graphs"][0]["nodes"][0]["args"][2].__setitem__("d", b"\0"), "has 4"),
    (lambda m: m["graphs"][0]["nodes"][0]["args"].pop(), "takes 3"),
    (lambda m: m["graphs"][0]["nodes"][0].__setitem__("params", b""), "unknown field"),
])
def test_schema_1_validation(change, match):
    manifest, sizes, _ = manifest_and_sizes()
    old = _as_schema_1(manifest)
    change(old)
    _expect_invalid(old, sizes, match)


def test_kernel_nodes_are_read_in_their_packed_form():
    manifest, sizes, _ = manifest_and_sizes()
    snap = Snapshot.from_manifest(manifest, sizes, "x.cgsnap")
    n1 = snap.graphs[0].nodes[1]
    params, refs = n1.params, n1.refs
    assert len(params) == 40
    assert np.frombuffer(refs, dtype="<u8").reshape(-1, 3).tolist() == [[0, 2, 0], [16, 4, 64],
                                                                         [32, 2, 512]]
    assert schema2_manifest(snap)[0] == manifest


def _expect_invalid(manifest, sizes, match):
    with pytest.raises(FormatError, match=match):
        Snapshot.from_manifest(manifest, sizes, "test.cgsnap")


CORRUPTIONS = [
    ("list where a map belongs", lambda m: m.__setitem__("regions", [[1, 2]]), "expected a map"),
    ("map where a list belongs", lambda m: m.__setitem__("graphs", {}), "expected a list"),
    ("string where an int belongs", lambda m: m["regions"][0].__setitem__("size", "big"),
     "expected an integer"),
    ("bool is not an int", lambda m: m["regions"][0].__setitem__("size", True),
     "expected an integer"),
    ("negative size", lambda m: m["regions"][0].__setitem__("size", -1), "out of range"),
    ("unknown field", lambda m: m["regions"][0].__setitem__("evil", 1), "unknown field"),
    ("missing field", lambda m: m["regions"][0].pop("kind"), "missing field"),
    ("unknown region kind", lambda m: m["regions"][0].__setitem__("kind", "mystery"),
     "is not one of"),
    ("dangling region ref", lambda m: _set_ref(m, 0, 0, 1, 99), r"refs\[0\]: region 99 does not"),
    ("ref offset beyond region", lambda m: _set_ref(m, 0, 0, 2, 10 ** 6), "beyond the end"),
    ("misaligned pointer offset", lambda m: _set_ref(m, 1, 1, 0, 12), "8-aligned"),
    ("pointers out of order", lambda m: _set_ref(m, 1, 1, 0, 0), "increasing"),
    ("pointer across two arguments", lambda m: _set_ref(m, 0, 1, 0, 16),
     r"nodes\[0\].refs\[1\]: position 16 is not an 8-byte word inside one argument"),
    ("parameter buffer size mismatch", lambda m: m["graphs"][0]["nodes"][0]
     .__setitem__("params", b"\0"), "1 bytes, kernel _Z6affinePKfPfi takes 20"),
    ("parameters not bytes", lambda m: m["graphs"][0]["nodes"][0].__setitem__("params", [1]),
     "expected bytes"),
    ("truncated pointer table", lambda m: m["graphs"][0]["nodes"][1]
     .__setitem__("refs", m["graphs"][0]["nodes"][1]["refs"][:-1]), "24-byte entry"),
    ("pointer table longer than the parameters", lambda m: m["graphs"][0]["nodes"][0]
     .__setitem__("refs", bytes(24 * 3)), "24-byte entry"),
    ("dangling kernel", lambda m: m["graphs"][0]["nodes"][0].__setitem__("kernel", 7),
     "out of range"),
    ("unknown node type", lambda m: m["graphs"][0]["nodes"][5].__setitem__("t", "teleport"),
     "is not one of"),
    ("edge to nowhere", lambda m: m["graphs"][0]["edges"].append([0, 999, 0, 0, 0]),
     "names no pair"),
    ("cycle", lambda m: m["graphs"][0]["edges"].append([11, 0, 0, 0, 0]), "cycle"),
    ("child graph cycle", lambda m: m["graphs"][1]["nodes"].append({"id": 1, "t": "graph",
                                                                   "graph": "step/child6"}),
     "contains itself"),
    ("unknown child graph", lambda m: m["graphs"][0]["nodes"][6].__setitem__("graph", "nope"),
     "unknown graph"),
    ("memcpy overruns region", lambda m: m["graphs"][0]["nodes"][2].__setitem__("width", 10 ** 7),
     "overrun"),
    ("duplicate node id", lambda m: m["graphs"][0]["nodes"][1].__setitem__("id", 0),
     "duplicate node id"),
    ("blob index out of range", lambda m: m["regions"][0].__setitem__("blob", 1000),
     "out of range"),
    ("blob used twice", lambda m: m["regions"][2].__setitem__("blob", m["regions"][0]["blob"]),
     "used twice"),
    ("image blob shared with a region", lambda m: m["images"][0].__setitem__(
        "blob", m["regions"][0]["blob"]), r"images\[0\].blob: blob 0 is used twice"),
    ("bad hash", lambda m: m["images"][0].__setitem__("hash", "zz"), "hex content hash"),
    ("kernel of unknown image", lambda m: m["kernels"][0].__setitem__("image", "0" * 32),
     "unknown image"),
    ("schema from the future", lambda m: m.__setitem__("schema", 4), "schema 4 is not supported"),
    ("non-scalar metadata", lambda m: m["meta"].__setitem__("x", {"y": {"z": {"a": {"b": {"c": {
        "d": {"e": {"f": {"g": 1}}}}}}}}}), "nested too deeply"),
    ("bound region with a blob", lambda m: m["regions"][5].__setitem__("blob", 0), "carries no"),
    ("mem_alloc of a non graph region", lambda m: m["graphs"][0]["nodes"][9]
     .__setitem__("region", 0), "graph_alloc"),
    ("event out of range", lambda m: m["graphs"][0]["nodes"][7].__setitem__("event", 3),
     "out of range"),
    ("parameters overlap", lambda m: m["kernels"][0]["params"][1].__setitem__(0, 4), "overlap"),
    ("cache preference out of range", lambda m: m["kernels"][0]["attrs"].__setitem__(
        "cache_config", 4), r"kernels\[0\].attrs.cache_config"),
]


@pytest.mark.parametrize("label,mutate,match", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_invalid_manifest_is_a_format_error(label, mutate, match):
    manifest, sizes, _ = manifest_and_sizes()
    mutate(manifest)
    _expect_invalid(manifest, sizes, match)


def test_blob_size_must_match_region():
    manifest, sizes, _ = manifest_and_sizes()
    sizes[manifest["regions"][0]["blob"]] += 1
    _expect_invalid(manifest, sizes, "expected 1024")


def test_error_names_file_and_place():
    manifest, sizes, _ = manifest_and_sizes()
    manifest["graphs"][0]["nodes"][4]["element_size"] = 3
    with pytest.raises(FormatError) as info:
        Snapshot.from_manifest(manifest, sizes, "/tmp/x.cgsnap")
    assert "/tmp/x.cgsnap" in str(info.value) and "graphs[0].nodes[4].element_size" in str(info.value)


def _leaf_paths(obj, path=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaf_paths(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaf_paths(v, path + (i,))
    yield path


_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.text(max_size=8),
                    st.binary(max_size=8), st.lists(st.integers(0, 5), max_size=3),
                    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
_BASE = manifest_and_sizes()
_PATHS = [p for p in _leaf_paths(_BASE[0]) if p]


def _edited_base(edits) -> dict:
    """A copy of the base manifest with each ``(path, value)`` set; paths that no longer lead
    anywhere (an earlier edit replaced a container) are skipped."""
    manifest = copy.deepcopy(_BASE[0])
    for path, value in edits:
        target = manifest
        try:
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue
    return manifest


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(_PATHS), _VALUES), min_size=1, max_size=3))
def test_fuzzed_manifest_only_raises_format_error(edits):
    manifest = _edited_base(edits)
    try:
        Snapshot.from_manifest(manifest, list(_BASE[1]), "fuzz.cgsnap")
    except FormatError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(node=st.sampled_from([0, 1]), entries=st.lists(
    st.tuples(st.integers(0, 48), st.integers(0, 7), st.integers(0, 1 << 20)), max_size=5))
def test_packed_pointer_tables_are_validated_exactly(node, entries):
    """Any pointer table is either refused with a FormatError or describes pointers that all
    lie in one argument, in order, inside existing regions -- and then survives unpacking."""
    manifest, sizes, _ = manifest_and_sizes()
    n = manifest["graphs"][0]["nodes"][node]
    n["refs"] = np.array(entries, dtype="<u8").reshape(-1, 3).tobytes()
    try:
        snap = Snapshot.from_manifest(manifest, sizes, "x.cgsnap")
    except FormatError:
        layout = [(0, 8), (8, 8), (16, 4)] if node == 0 else [(0, 32), (32, 8)]
        region_sizes = [r["size"] for r in manifest["regions"]]
        valid = all(p % 8 == 0 and any(o <= p and p + 8 <= o + s for o, s in layout) and
                    r < len(region_sizes) and off <= region_sizes[r]
                    for p, r, off in entries) and \
            all(a[0] < b[0] for a, b in zip(entries, entries[1:]))
        assert not valid or len(entries) * 8 > (20 if node == 0 else 40)
        return
    kernel_node = snap.graphs[0].nodes[node]
    layout = snap.kernels[kernel_node.kernel].params
    from cgsnap.format.model import pack_args
    assert pack_args(kernel_node.arguments(layout), layout)[1] == n["refs"]


_KERNEL_NODE_PATHS = [p for p in _PATHS if len(p) >= 4 and p[:2] == ("graphs", 0) and
                      p[2] == "nodes" and p[3] in (0, 1)]
_EDGES = st.sampled_from([-1, 0, 1, 2, 3, (1 << 24), (1 << 24) + 1, (1 << 31) - 1, 1 << 31,
                          (1 << 32) - 1, 1 << 32, (1 << 32) + 1, True])   # limits of the checks
_NODE_VALUES = st.one_of(_VALUES, _EDGES, st.lists(st.one_of(st.integers(-1, 9), _EDGES),
                                                   min_size=3, max_size=3),
                         st.dictionaries(st.sampled_from(["cluster_dim", "priority", "x"]),
                                         st.one_of(st.integers(-2, 9),
                                                   st.lists(st.integers(0, 4), min_size=3,
                                                            max_size=3)), max_size=2))


def _outcome(manifest, sizes):
    try:
        snap = Snapshot.from_manifest(manifest, sizes, "x.cgsnap")
    except FormatError as exc:
        return "error", str(exc)
    return "ok", [[(n.TYPE, n.id, getattr(n, "kernel", None), getattr(n, "grid", None),
                    getattr(n, "block", None), getattr(n, "shared_mem", None),
                    getattr(n, "attrs", None), getattr(n, "params", None),
                    getattr(n, "refs", None)) for n in g.nodes]
                  for g in snap.graphs]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(_KERNEL_NODE_PATHS + [("graphs", 0, "nodes", 0, "attrs"),
                                                                ("graphs", 0, "nodes", 1, "attrs")]),
                          _NODE_VALUES), min_size=1, max_size=3))
def test_fast_kernel_node_path_accepts_exactly_what_the_strict_path_does(edits):
    """The validator's inline path for kernel nodes gives the same nodes, or the same error
    (the strict path names it), as the strict path alone."""
    from cgsnap.format import nodes
    manifest = _edited_base(edits)
    fast = _outcome(copy.deepcopy(manifest), list(_BASE[1]))
    original = nodes.KernelNode.parse_fast
    nodes.KernelNode.parse_fast = classmethod(lambda cls, *a: None)
    try:
        strict = _outcome(manifest, list(_BASE[1]))
    finally:
        nodes.KernelNode.parse_fast = original
    assert fast == strict
