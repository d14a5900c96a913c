"""``cgsnap diff`` on synthetic files: golden outputs, JSON, exit codes, streaming (CPU)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from synthetic import make_snapshot

from cgsnap.format.model import Edge, MemsetNode, Ref
from cgsnap.format.trace import TraceEntry, TraceStep, WriteSets, digest
from cgsnap.tools import compare
from cgsnap.tools.diff import diff_files, diff_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden")
UPDATE = os.environ.get("CGSNAP_UPDATE_GOLDEN") == "1"


def changed_word(s):
    """Node 0 (affine) gets n = 255 instead of 256 (argument 2, a 4-byte literal)."""
    n0 = s.graphs[0].nodes[0]
    p = bytearray(n0.params)
    p[16:20] = (255).to_bytes(4, "little")
    n0.params = bytes(p)


def changed_byte(s):
    """One byte of x (float32) differs, and so does the recorded output y."""
    x = np.frombuffer(s.regions[0].data, dtype=np.uint8).copy()
    x[4 * 5 + 3] ^= 0x01                 # the exponent byte of x[5]
    s.regions[0].data, s.regions[0].content_hash = x.tobytes(), None
    y = np.frombuffer(s.graphs[0].checks[1], dtype=np.float32).copy()
    y[7], y[9] = np.float32(0.5), np.float32(np.nan)
    s.graphs[0].checks[1] = y.tobytes()


def extra_node(s):
    """A memset between nodes 4 and 5: node 5 now runs after it."""
    g = s.graphs[0]
    g.nodes.append(MemsetNode(12, Ref(2, 0), 0, 4, 16))
    g.edges = [e for e in g.edges if (e.src, e.dst) != (4, 5)] + [Edge(4, 12), Edge(12, 5)]


CASES = {"identical": None, "word": changed_word, "byte": changed_byte, "node": extra_node}


@pytest.fixture(scope="module")
def file_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("diff")
    make_snapshot().save(d / "a.cgsnap", prune=False)
    for label, edit in CASES.items():
        s = make_snapshot()
        if edit is not None:
            edit(s)
        s.save(d / f"{label}.cgsnap", prune=False)
    return d


@pytest.fixture()
def files(file_dir, monkeypatch):
    """The files, named relative to the current directory (as the golden outputs show them)."""
    monkeypatch.chdir(file_dir)
    return {label: f"{label}.cgsnap" for label in CASES}


@pytest.mark.parametrize("label", list(CASES))
def test_diff_text_matches_golden(files, label):
    text = diff_text(diff_files("a.cgsnap", files[label]))
    path = os.path.join(GOLDEN, f"diff_{label}.txt")
    if UPDATE:
        with open(path, "w") as f:
            f.write(text)
    with open(path) as f:
        assert text == f.read()


def test_diff_json(files):
    d = diff_files("a.cgsnap", files["identical"])
    assert d["schema"] == 1 and d["same"] and d["counts"] == {"graphs": 0, "kernels": 0,
                                                              "regions": 0}
    d = diff_files("a.cgsnap", files["word"])
    item, = d["graphs"][0]["differences"]["items"]
    assert item["kind"] == "literal" and item["node"] == [0, 0] and item["arg"] == 2
    assert (item["a"], item["b"]) == ("00010000", "ff000000")
    d = diff_files("a.cgsnap", files["byte"])
    contents, = d["regions"]["items"]
    c = contents["comparison"]
    assert contents["region"] == [0, 0] and c["dtype"] == "float32"
    assert (c["differing_elements"], c["first_index"], c["first_byte"]) == (1, 5, 23)
    check, = d["graphs"][0]["differences"]["items"]
    assert check["kind"] == "check" and check["comparison"]["nan"] == [0, 1]
    assert check["comparison"]["differing_elements"] == 2
    d = diff_files("a.cgsnap", files["node"])
    kinds = [i["kind"] for i in d["graphs"][0]["differences"]["items"]]
    assert kinds == ["node_only_b", "edges"]
    assert d["graphs"][0]["matched"] == 12


def test_diff_names_the_first_node_whose_trace_differs(tmp_path):
    def traced(bad_node=None):
        s = make_snapshot()
        ws = WriteSets(s)
        steps = []
        for n in s.graphs[0].topological_order():
            steps.append(TraceStep(n.id, tuple(
                TraceEntry(r, digest(bytes([r, 1 if n.id == bad_node else 0])))
                for r in ws.of(n))))
        s.graphs[0].trace = tuple(steps)
        return s
    traced().save(tmp_path / "a.cgsnap", prune=False)
    traced(bad_node=4).save(tmp_path / "b.cgsnap", prune=False)
    d = diff_files(str(tmp_path / "a.cgsnap"), str(tmp_path / "b.cgsnap"))
    item, = d["graphs"][0]["differences"]["items"]
    assert item["kind"] == "trace" and item["node"] == [4, 4] and item["region"] == [1, 1]
    assert "first differ after step" in item["text"] and "node 4 memset" in item["text"]


def test_regions_matched_through_nodes_when_ids_move(tmp_path):
    """B lists its regions in another order: references still compare equal."""
    from cgsnap.format import snapfile
    a = make_snapshot()
    b = make_snapshot()
    a.save(tmp_path / "a.cgsnap", prune=False)
    # Swap regions 1 and 2 in B (neither has a parent), renumbering every reference.
    order = [0, 2, 1, 3, 4, 5]
    rmap = {old: new for new, old in enumerate(order)}
    regions = [b.regions[old] for old in order]
    for new, r in enumerate(regions):
        r.id = new
    b.regions = regions
    for g in b.graphs:
        g.nodes = [snapfile.remap_node(n, rmap) for n in g.nodes]
        g.checks = {rmap[k]: v for k, v in g.checks.items()}
    b.save(tmp_path / "b.cgsnap", prune=False)
    d = diff_files(str(tmp_path / "a.cgsnap"), str(tmp_path / "b.cgsnap"))
    assert d["same"], diff_text(d)


def test_contents_are_compared_in_bounded_windows(monkeypatch):
    """A stream is never read whole: windows of WINDOW bytes, chunk boundaries anywhere."""
    rng = np.random.default_rng(3)
    a = rng.standard_normal(10_000).astype(np.float32)
    b = a.copy()
    b[7777] = np.inf
    seen = []

    def chunks(arr, size):
        raw = arr.view(np.uint8)
        for i in range(0, raw.size, size):
            seen.append(size)
            yield raw[i:i + size]
    monkeypatch.setattr(compare, "WINDOW", 4096)
    c = compare.compare_streams(chunks(a, 999), chunks(b, 5000), a.nbytes, b.nbytes, "float32",
                                window=4096)
    assert (c.differing, c.first_index, c.inf) == (1, 7777, [0, 1])
    whole = compare.compare_arrays(a, b, "float32")
    assert whole.to_json() == c.to_json()


@pytest.mark.parametrize("dtype,make", [
    ("bfloat16", lambda v: (v.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)),
    ("float16", lambda v: v.astype(np.float16)),
    ("float64", lambda v: v.astype(np.float64)),
])
def test_float_dtypes_are_decoded(dtype, make):
    v = np.array([1.0, 2.0, -4.0, 0.5], dtype=np.float32)
    w = v.copy()
    w[2] = -3.0
    c = compare.compare_arrays(make(v), make(w), dtype)
    assert (c.differing, c.first_index, c.max_abs, c.max_rel) == (1, 2, 1.0, 0.25)


def test_float8_tables():
    e4 = compare.elements("float8_e4m3fn")
    codes = np.array([0x38, 0x7E, 0x7F, 0x01, 0xB8], dtype=np.uint8)
    got = e4.decode(codes)
    assert got[0] == 1.0 and got[1] == 448.0 and np.isnan(got[2]) and got[3] == 2.0 ** -9
    assert got[4] == -1.0
    e5 = compare.elements("float8_e5m2")
    got = e5.decode(np.array([0x3C, 0x7C, 0x7B], dtype=np.uint8))
    assert got[0] == 1.0 and np.isinf(got[1]) and got[2] == 57344.0


def cgsnap(*args, cwd):
    return subprocess.run([sys.executable, "-m", "cgsnap", *args], capture_output=True, text=True,
                          cwd=cwd, env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                              p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)), timeout=120)


def test_exit_codes(files, file_dir, capsys):
    from cgsnap.tools.cli import main
    assert main(["diff", "a.cgsnap", files["identical"]]) == 0
    assert "same:" in capsys.readouterr().out
    assert main(["diff", "a.cgsnap", files["node"], "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["schema"] == 1
    with pytest.raises(SystemExit) as usage:
        main(["diff", "a.cgsnap"])
    assert usage.value.code == 2
    assert main(["diff", "a.cgsnap", "a.cgsnap", "--limit", "-1"]) == 2
    assert main(["diff", "a.cgsnap", "nope.cgsnap"]) == 1
    assert "nope.cgsnap: no such file" in capsys.readouterr().err
    (file_dir / "bad.cgsnap").write_bytes(b"not a snapshot at all" * 10)
    assert main(["diff", "a.cgsnap", "bad.cgsnap"]) == 1
    assert "bad magic" in capsys.readouterr().err


def test_the_command_runs_as_a_program(files, file_dir):
    proc = cgsnap("diff", "a.cgsnap", files["word"], cwd=file_dir)
    assert proc.returncode == 1 and "arg2+0x0 literal" in proc.stdout, proc.stderr
