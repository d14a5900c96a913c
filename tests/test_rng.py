"""The optional ``rng`` field of a graph (CPU): strict validation naming the place, round trip,
merge, ``info``, and RestoredGraph.rng / set_rng (the driver stubbed)."""
from __future__ import annotations

import copy
import types

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from synthetic import make_snapshot
from test_model import _leaf_paths

import cgsnap
from cgsnap.errors import FormatError, RestoreError
from cgsnap.format import snapfile
from cgsnap.format.model import Ref, RngState, Snapshot

def with_rng(snap=None) -> Snapshot:
    snap = snap or make_snapshot()
    snap.graphs[0].rng = [RngState(seed=Ref(2, 8), offset=Ref(2, 16), increment=12, device=0,
                                   saved_seed=(1 << 64) - 5, saved_offset=1 << 40),
                          RngState(seed=Ref(0, 0), offset=Ref(5, 1024), increment=0, device=0,
                                   saved_seed=7, saved_offset=0, generator="sampler")]
    return snap


def manifest(snap):
    m, blobs = snap.to_manifest()
    return m, [len(memoryview(b).cast("B")) for b in blobs]


def test_rng_round_trips_through_a_file(tmp_path):
    path = tmp_path / "rng.cgsnap"
    with_rng().save(path, prune=False)
    back = cgsnap.read(path)
    assert back.graphs[0].rng == with_rng().graphs[0].rng
    assert back.graphs[1].rng == []
    m = manifest(with_rng())[0]["graphs"][0]["rng"]
    assert m[0] == {"seed": [2, 8], "offset": [2, 16], "increment": 12,
                    "generator": {"device": 0, "seed": (1 << 64) - 5, "offset": 1 << 40}}
    assert m[1]["generator"]["name"] == "sampler"


def test_graphs_without_rng_write_no_field():
    m, _ = manifest(make_snapshot())
    assert all("rng" not in g for g in m["graphs"])


def test_merge_renumbers_rng_words():
    a, b = make_snapshot(), with_rng()
    for s in (a, b):
        for r in s.regions:
            r.origin = 0x7000_0000 + r.id * 0x10000
    a.regions[2].origin = 0x6000_0000               # a different allocation in each snapshot
    b.graphs[0].name, b.graphs[1].name = "other", "other/child6"
    b.graphs[0].nodes[6].graph = "other/child6"
    merged = snapfile.merge([a, b])
    rid = next(r.id for r in merged.regions if r.origin == b.regions[2].origin)
    assert rid != 2
    assert merged.graph("other").rng[0].seed == Ref(rid, 8)
    assert merged.graph("other").rng[1].offset.region == next(
        r.id for r in merged.regions if r.name == "kv_cache")
    assert merged.graph("step").rng == []


def _rng(m):
    return m["graphs"][0]["rng"]


RNG_CORRUPTIONS = [
    ("not a list", lambda m: m["graphs"][0].__setitem__("rng", {}), r"graphs\[0\].rng: expected a list"),
    ("too many entries", lambda m: m["graphs"][0].__setitem__("rng", _rng(m) * 9),
     r"graphs\[0\].rng: list of 18 entries is too long"),
    ("missing field", lambda m: _rng(m)[0].pop("increment"), r"rng\[0\]: missing field\(s\) increment"),
    ("unknown field", lambda m: _rng(m)[0].__setitem__("extra", 1), r"rng\[0\]: unknown field"),
    ("dangling region", lambda m: _rng(m)[0].__setitem__("seed", [99, 0]), r"rng\[0\].seed\[0\]: 99 is out of range"),
    ("word past the region", lambda m: _rng(m)[0].__setitem__("seed", [1, 1024]),
     r"rng\[0\].seed: 8 bytes at offset 1024 overrun region 1"),
    ("misaligned word", lambda m: _rng(m)[0].__setitem__("offset", [2, 12]), r"rng\[0\].offset: offset 12 is not 8-aligned"),
    ("word in a module global", lambda m: _rng(m)[0].__setitem__("seed", [3, 0]),
     r"rng\[0\].seed: region 3 is a module_global region"),
    ("word in graph memory", lambda m: _rng(m)[0].__setitem__("seed", [4, 0]),
     r"rng\[0\].seed: region 4 is a graph_alloc region"),
    ("seed and offset the same word", lambda m: _rng(m)[0].__setitem__("offset", [2, 8]),
     r"rng\[0\].offset: the word at region 2 \+ 8 is already"),
    ("two entries share a word", lambda m: _rng(m)[1].__setitem__("seed", [2, 16]),
     r"rng\[1\].seed: the word at region 2 \+ 16 is already"),
    ("increment not a multiple of 4", lambda m: _rng(m)[0].__setitem__("increment", 6),
     r"rng\[0\].increment: 6 is not a multiple of 4"),
    ("negative increment", lambda m: _rng(m)[0].__setitem__("increment", -4), r"rng\[0\].increment: -4 is out of range"),
    ("increment not an int", lambda m: _rng(m)[0].__setitem__("increment", 4.0), r"rng\[0\].increment: expected an integer"),
    ("generator not a map", lambda m: _rng(m)[0].__setitem__("generator", 0), r"rng\[0\].generator: expected a map"),
    ("generator without a seed", lambda m: _rng(m)[0]["generator"].pop("seed"), r"rng\[0\].generator: missing field\(s\) seed"),
    ("seed beyond 64 bits", lambda m: _rng(m)[0]["generator"].__setitem__("seed", 1 << 64),
     r"rng\[0\].generator.seed: .* is out of range"),
    ("offset beyond int64", lambda m: _rng(m)[0]["generator"].__setitem__("offset", 1 << 63),
     r"rng\[0\].generator.offset: .* is out of range"),
    ("offset not a multiple of 4", lambda m: _rng(m)[0]["generator"].__setitem__("offset", 2),
     r"rng\[0\].generator.offset: 2 is not a multiple of 4"),
    ("name not a string", lambda m: _rng(m)[1]["generator"].__setitem__("name", 3), r"rng\[1\].generator.name: expected a string"),
    ("same generator twice", lambda m: _rng(m)[1]["generator"].pop("name"), r"rng\[1\].generator: two entries for the same generator"),
    ("on a child graph", lambda m: m["graphs"][1].__setitem__("rng", _rng(m)),
     r"graphs\[1\].rng: only a top-level graph"),
]


@pytest.mark.parametrize("label,mutate,match", RNG_CORRUPTIONS, ids=[c[0] for c in RNG_CORRUPTIONS])
def test_invalid_rng_is_a_format_error(label, mutate, match):
    m, sizes = manifest(with_rng())
    m = copy.deepcopy(m)
    mutate(m)
    with pytest.raises(FormatError, match=match):
        Snapshot.from_manifest(m, sizes, "test.cgsnap")


def test_an_empty_rng_list_is_accepted():
    m, sizes = manifest(make_snapshot())
    m["graphs"][1]["rng"] = []                      # even on a child graph: nothing to write
    assert Snapshot.from_manifest(m, sizes, "t").graphs[1].rng == []


# ---- RestoredGraph.set_rng, the driver stubbed -------------------------------------------------------

@pytest.fixture
def restored_graph(monkeypatch):
    from cgsnap.restore import restored as restored_mod
    writes = []
    monkeypatch.setattr(restored_mod.driver, "write_u64_async",
                        lambda ptr, value, stream: writes.append((ptr, value, int(stream))))
    snap = with_rng()
    bases = np.array([0x7F00_0000_0000 + 0x10_0000 * i for i in range(len(snap.regions))],
                     dtype=np.uint64)
    owner = types.SimpleNamespace(snapshot=snap, _bases=bases, path="f.cgsnap",
                                  _check_open=lambda: None)
    return restored_mod.RestoredGraph(owner, "step"), writes, bases


def test_set_rng_writes_seed_then_offset_on_the_stream(restored_graph):
    g, writes, bases = restored_graph
    assert [e.increment for e in g.rng] == [12, 0]
    g.set_rng(5, 64, stream=7)
    g.set_rng(np.uint64(9), 128, generator="sampler")
    assert writes == [(int(bases[2]) + 8, 5, 7), (int(bases[2]) + 16, 64, 7),
                      (int(bases[0]), 9, 0), (int(bases[5]) + 1024, 128, 0)]


def test_set_rng_refuses_unknown_generators_and_bad_values(restored_graph):
    g, writes, _ = restored_graph
    with pytest.raises(RestoreError, match=r"f.cgsnap: graph 'step' does not draw from generator "
                                           r"'other' \(it draws from: the default generator, 'sampler'\)"):
        g.set_rng(1, 0, generator="other")
    for seed, offset in ((-1, 0), (1 << 64, 0), (0, 1 << 63), (True, 0), (1.5, 0)):
        with pytest.raises((ValueError, TypeError)):
            g.set_rng(seed, offset)
    assert writes == []


def test_a_graph_without_rng_refuses_set_rng(monkeypatch):
    from cgsnap.restore import restored as restored_mod
    snap = make_snapshot()
    owner = types.SimpleNamespace(snapshot=snap, _bases=np.zeros(len(snap.regions), np.uint64),
                                  path="f.cgsnap", _check_open=lambda: None)
    g = restored_mod.RestoredGraph(owner, "step")
    assert g.rng == ()
    with pytest.raises(RestoreError, match="does not draw from the default generator"):
        g.set_rng(1, 0)


def test_info_shows_what_each_launch_reads():
    from cgsnap.tools.render import info_dict, info_text
    d = info_dict(with_rng())
    assert d["graphs"][0]["rng"][0] == {"generator": None, "device": 0, "increment": 12,
                                        "seed_word": [2, 8], "offset_word": [2, 16],
                                        "saved_state": [(1 << 64) - 5, 1 << 40]}
    assert "rng" not in d["graphs"][1]
    text = info_text(d)
    assert "random numbers: default generator of cuda:0, offset +12 per replay" in text
    assert "random numbers: generator 'sampler' of cuda:0, offset +0 per replay" in text


_BASE = manifest(with_rng())
_PATHS = [p for p in _leaf_paths(_BASE[0]["graphs"][0]["rng"]) if p]
_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.text(max_size=4),
                    st.binary(max_size=8), st.lists(st.integers(0, 5), max_size=3),
                    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(_PATHS), _VALUES), min_size=1, max_size=3))
def test_fuzzed_rng_only_raises_format_error(edits):
    m = copy.deepcopy(_BASE[0])
    for path, value in edits:
        target = m["graphs"][0]["rng"]
        try:
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue
    try:
        Snapshot.from_manifest(m, list(_BASE[1]), "fuzz.cgsnap")
    except FormatError:
        pass
