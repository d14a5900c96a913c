"""Trace, bisect and extract over a machine that runs nodes in numpy, the compute-sanitizer
report parser, and `replay --check`'s per-output statistics (CPU)."""
from __future__ import annotations

import copy
import struct

import numpy as np
import pytest
from fake_machine import AXPB, NumpyMachine, make_chain
from synthetic import edit_kernel_params, make_snapshot

from cgsnap.errors import UnsupportedNodeError
from cgsnap.format import fileformat, snapfile
from cgsnap.format.trace import digest
from cgsnap.restore.trace import (expected_after, first_divergence, plan_steps, record_steps,
                                  trace_order)
from cgsnap.tools import UsageError
from cgsnap.tools.bisect import bisect_report, bisect_text
from cgsnap.tools.extract import extract_to, parse_nodes
from cgsnap.tools.sanitize import attribute, base_name, parse_output, report_text


def traced_chain(budget=64 << 20):
    snap = make_chain()
    g = snap.graphs[0]
    g.trace = record_steps(NumpyMachine(snap), g.name, plan_steps(snap, g), budget)
    return snap


def save(snap, path):
    snap.save(path, prune=False)
    return path


def opened(path, kernels=None):
    """The file's model, a machine over it, and a loader of kept trace bytes."""
    snap, f = snapfile.read(path)
    return snap, NumpyMachine(snap, lambda i: bytes(f.blob(i)), kernels), \
        (lambda e: bytes(f.blob(e.data))), f


def set_scale(path, out, node_id, a):
    """Rewrite the file with node ``node_id``'s scalar argument a (params bytes 16..20)."""
    with fileformat.open_file(path) as f:
        m = copy.deepcopy(f.manifest)
        blobs = [bytes(f.blob(i)) for i in range(len(f.blobs))]
    edit_kernel_params(m, 0, node_id, lambda p: p.__setitem__(slice(16, 20), struct.pack("<f", a)))
    fileformat.write_file(out, m, blobs)
    return out


def test_trace_records_every_step_and_the_bytes_each_changed():
    snap = traced_chain()
    t = snap.graphs[0].trace
    assert [s.node for s in t] == [0, 1, 2, 3, 4]
    assert [[e.region for e in s.entries] for s in t] == [[0, 1], [1, 2], [3], [1], [1, 3]]
    # Node 1 (z = 3y) changed all of z; it only read y: no bytes kept for y.
    y_entry, z_entry = t[1].entries
    assert not y_entry.kept and z_entry.kept
    assert z_entry.offset < 4 and z_entry.offset + len(z_entry.data) == 256   # its span only
    final = {1: snap.graphs[0].checks[1], 2: snap.graphs[0].checks[2]}
    assert t[4].entries[0].digest == digest(final[1])
    assert t[1].entries[1].digest == digest(final[2])


def test_budget_bounds_the_kept_bytes():
    snap = traced_chain(budget=0)
    assert not any(e.kept for s in snap.graphs[0].trace for e in s.entries)
    snap = traced_chain(budget=300)           # room for one 256-byte change, not two
    kept = [e for s in snap.graphs[0].trace for e in s.entries if e.kept]
    assert len(kept) == 1 and 250 < len(kept[0].data) <= 256


def test_bisect_of_an_unchanged_file_matches(tmp_path):
    path = save(traced_chain(), tmp_path / "t.cgsnap")
    snap, machine, load, f = opened(path)
    with f:
        d = bisect_report(machine, str(path), None, load)
    assert d["graphs"][0]["result"] == "match" and d["graphs"][0]["checked"] == 5
    assert "every step matches the recorded trace" in bisect_text(d)


def test_bisect_names_the_altered_middle_node(tmp_path):
    good = save(traced_chain(), tmp_path / "good.cgsnap")
    bad = set_scale(good, tmp_path / "bad.cgsnap", 1, 3.5)
    snap, machine, load, f = opened(bad)
    with f:
        d = bisect_report(machine, str(bad), None, load)
    g = d["graphs"][0]
    assert g["result"] == "differs" and g["checked"] == 2
    first = g["first_difference"]
    assert (first["step"], first["node"], first["kernel"]) == (1, 1, AXPB)
    region, = first["regions"]
    assert region["label"] == 'region 2 "z"' and region["expected_known"]
    assert region["same_when_run_again"]
    x = (np.arange(64, dtype=np.float32) - 7) / 4
    y = 2 * x + 1
    assert region["first_index"] == 0 and region["comparison"]["differing_elements"] == 63
    v = region["values"]
    assert v["before"][:2] == ["0", "0"]
    assert v["expected"][:2] == [f"{3 * y[0]:.6g}", f"{3 * y[1]:.6g}"]
    assert v["got"][:2] == [f"{np.float32(3.5) * y[0]:.6g}", f"{np.float32(3.5) * y[1]:.6g}"]
    text = bisect_text(d)
    assert "FIRST DIFFERENCE at step 1: node 1, kernel axpb" in text
    assert "step 0 matches" in text and "the same result" in text


def test_bisect_without_kept_bytes_still_names_the_node(tmp_path):
    good = save(traced_chain(budget=0), tmp_path / "good.cgsnap")
    bad = set_scale(good, tmp_path / "bad.cgsnap", 1, 3.5)
    snap, machine, load, f = opened(bad)
    with f:
        d = bisect_report(machine, str(bad), None, load)
    first = d["graphs"][0]["first_difference"]
    assert first["node"] == 1 and not first["regions"][0]["expected_known"]
    assert "over its byte budget" in bisect_text(d) and "?" in bisect_text(d)


def test_bisect_tells_a_kernel_that_differs_run_to_run(tmp_path):
    path = save(traced_chain(), tmp_path / "t.cgsnap")
    calls = []

    def noisy(mem, node, snap):
        from fake_machine import axpb
        axpb(mem, node, snap)
        if dict(node.pointers())[8].region == 2:         # node 1's output: z
            calls.append(1)
            mem[2].view(np.float32)[5] += len(calls)
    snap, machine, load, f = opened(path, {AXPB: noisy})
    with f:
        d = bisect_report(machine, str(path), None, load)
    region, = d["graphs"][0]["first_difference"]["regions"]
    assert region["first_index"] == 5 and not region["same_when_run_again"]
    assert "not deterministic here" in bisect_text(d)


def test_expected_after_refuses_kept_bytes_that_do_not_match_the_digest():
    snap = traced_chain()
    e = snap.graphs[0].trace[1].entries[1]
    before = np.zeros(256, dtype=np.uint8)
    good = expected_after(before, e, lambda entry: entry.data)
    assert good is not None and digest(good) == e.digest
    assert expected_after(before + 1, e, lambda entry: entry.data) is None


def _replay_check(path):
    """What `replay --check` does, on the numpy machine: the recorded outputs vs a launch."""
    snap, machine, load, f = opened(path)
    with f:
        g = snap.graphs[0]
        machine.reset()
        for s in plan_steps(snap, g, trace_order(g)):
            machine.run(s, g.name)
        return {rid: np.array_equal(machine.read(rid), np.frombuffer(f.blob(i), np.uint8))
                for rid, i in g.checks.items()}, snap


def test_extract_one_node_reproduces_its_effect(tmp_path):
    path = save(traced_chain(), tmp_path / "t.cgsnap")
    snap, machine, load, f = opened(path)
    out = tmp_path / "node1.cgsnap"
    with f:
        ex, lines = extract_to(machine, str(path), None, "1", str(out), load)
    assert ex.expected_from == "trace" and ex.prefix_divergence is None
    new = snapfile.read(out)[0]
    g = new.graphs[0]
    assert [n.id for n in g.nodes] == [1] and g.edges == []
    assert [r.name for r in new.regions] == ["y", "z"] and len(new.kernels) == 1
    assert all(r.policy.value == "saved" for r in new.regions)
    assert sorted(g.checks) == [1]                  # z, the region node 1 changed
    assert "before node 1 ran" in "\n".join(lines) and "source's recorded trace" in lines[-1]
    ok, _ = _replay_check(out)
    assert ok == {1: True}
    # Its inputs are y as node 0 left it, its output z as the whole graph left it.
    new_snap, f2 = snapfile.read(out)
    with f2:
        y_in = np.frombuffer(f2.blob(new_snap.regions[0].data), np.float32)
        z_out = np.frombuffer(f2.blob(g.checks[1]), np.uint8)
    x = (np.arange(64, dtype=np.float32) - 7) / 4
    assert np.array_equal(y_in, 2 * x + 1)
    assert np.array_equal(z_out, make_chain().graphs[0].checks[2])


def test_extract_a_range_keeps_edges_between_its_nodes(tmp_path):
    path = save(traced_chain(), tmp_path / "t.cgsnap")
    snap, machine, load, f = opened(path)
    out = tmp_path / "r.cgsnap"
    with f:
        ex, _ = extract_to(machine, str(path), "chain", "1..3", str(out), load)
    g = snapfile.read(out)[0].graphs[0]
    assert [n.id for n in g.nodes] == [1, 2, 3]
    assert [(e.src, e.dst) for e in g.edges] == [(1, 2), (2, 3)]
    assert len(g.trace) == 3
    ok, _ = _replay_check(out)
    assert ok and all(ok.values())


def test_extract_a_copy_carries_its_source(tmp_path):
    path = save(traced_chain(), tmp_path / "t.cgsnap")
    snap, machine, load, f = opened(path)
    out = tmp_path / "copy.cgsnap"
    with f:
        extract_to(machine, str(path), None, "2", str(out), load)
    new = snapfile.read(out)[0]
    assert [r.name for r in new.regions] == ["z", None]       # the source z and w
    assert sorted(new.graphs[0].checks) == [1]
    ok, _ = _replay_check(out)
    assert ok == {1: True}


def test_extract_from_a_machine_that_differs_keeps_the_sources_results(tmp_path):
    """The repro carries what the source computed: replayed where the node misbehaves, its
    check fails; where it behaves, it passes."""
    path = save(traced_chain(), tmp_path / "t.cgsnap")

    def wrong(mem, node, snap):
        from fake_machine import axpb
        axpb(mem, node, snap)
        if dict(node.pointers())[8].region == 2:
            mem[2].view(np.float32)[3] = np.nan
    def wrong_here(mem, node, snap):         # the same fault, in the repro's numbering
        from fake_machine import axpb
        axpb(mem, node, snap)
        mem[dict(node.pointers())[8].region].view(np.float32)[3] = np.nan
    snap, machine, load, f = opened(path, {AXPB: wrong})
    out = tmp_path / "repro.cgsnap"
    with f:
        ex, _ = extract_to(machine, str(path), None, "1", str(out), load)
    assert ex.expected_from == "trace"
    ok, new = _replay_check(out)            # the good machine: the source's results
    assert ok == {1: True}
    s2, m2, _, f2 = opened(out, {AXPB: wrong_here})
    with f2:
        m2.reset()
        m2.run(plan_steps(s2, s2.graphs[0])[0], "chain")
        got = m2.read(1)
        assert not np.array_equal(got, np.frombuffer(f2.blob(s2.graphs[0].checks[1]), np.uint8))


def test_extract_after_a_step_that_already_differs_warns(tmp_path):
    good = save(traced_chain(), tmp_path / "good.cgsnap")
    bad = set_scale(good, tmp_path / "bad.cgsnap", 0, 2.5)       # node 0 differs here
    snap, machine, load, f = opened(bad)
    with f:
        ex, lines = extract_to(machine, str(bad), None, "1", str(tmp_path / "o.cgsnap"), load)
    assert ex.prefix_divergence == 0 and ex.expected_from == "run"
    assert any(line.startswith("  WARNING inputs: step 0 already differs") for line in lines)
    assert ex.snapshot.meta["extracted_from"]["prefix_divergence"] == 0


def test_extract_usage_errors(tmp_path):
    path = save(traced_chain(), tmp_path / "t.cgsnap")
    snap, machine, load, f = opened(path)
    with f:
        for spec, match in (("9", "no node 9"), ("3..1", "runs after"), ("x", "expected a node")):
            with pytest.raises(UsageError, match=match):
                extract_to(machine, str(path), None, spec, str(tmp_path / "o"), load, save=False)
        with pytest.raises(UsageError, match="no top-level graph"):
            extract_to(machine, str(path), "nope", "1", str(tmp_path / "o"), load, save=False)
    assert parse_nodes("4..12") == (4, 12) and parse_nodes(" 7 ") == (7, 7)


def test_nodes_that_cannot_run_alone_are_refused_by_name():
    snap = make_snapshot()
    with pytest.raises(UnsupportedNodeError, match=r"graph 'step' node 9 \(mem_alloc\).*whole"):
        plan_steps(snap, snap.graphs[0], what="bisect")
    snap = make_chain()
    snap.regions[3].policy, snap.regions[3].name = snap.regions[3].policy.BOUND, "w"
    with pytest.raises(UnsupportedNodeError, match="buffer.* w are bound"):
        plan_steps(snap, snap.graphs[0], what="trace=True")


def test_first_divergence_stops_at_the_first_differing_step():
    snap = traced_chain()
    g = snap.graphs[0]
    steps = plan_steps(snap, g, trace_order(g))
    calls = []
    m = NumpyMachine(snap)
    assert first_divergence(m, g.name, steps, g.trace, lambda s, ok: calls.append(ok)) is None
    assert calls == [True] * 5
    bad = copy.deepcopy(snap)
    bad.graphs[0].nodes[0] = bad.graphs[0].nodes[0].__class__(
        **{**{k: getattr(bad.graphs[0].nodes[0], k) for k in
              ("id", "kernel", "grid", "block", "shared_mem", "refs", "attrs")},
           "params": bad.graphs[0].nodes[0].params[:16] + struct.pack("<f", 2.5)
           + bad.graphs[0].nodes[0].params[20:]})
    m = NumpyMachine(bad)
    pos, regions = first_divergence(m, g.name, plan_steps(bad, bad.graphs[0]), g.trace)
    assert pos == 0 and sorted(regions) == [1] and m.runs == 1


# ---- compute-sanitizer reports -------------------------------------------------------------

SANITIZER_OUT = """\
========= COMPUTE-SANITIZER
@@cgsnap-sanitize step {"graph": "chain", "node": 0, "step": 0}
@@cgsnap-sanitize step {"graph": "chain", "node": 1, "step": 1}
========= Invalid __global__ write of size 4 bytes
=========     at axpb+0x1b0
=========     by thread (0,0,0) in block (0,0,0)
=========     Address 0x7f3a2c000100 is out of bounds
=========     and is 0 bytes after the nearest allocation at 0x7f3a2c000000 of size 256 bytes
=========     Saved host backtrace up to driver entry point at kernel launch time
=========         Host Frame: cuGraphLaunch [0x2f0a1b] in libcuda.so.1
=========         Host Frame: ffi_call_unix64 [0x639051] in python
=========
@@cgsnap-sanitize failed {"error": "cuCtxSynchronize failed: CUDA_ERROR_LAUNCH_FAILED", \
"graph": "chain", "node": 1, "step": 1}
========= ERROR SUMMARY: 1 error
"""


def test_sanitizer_report_is_attributed_to_the_step_that_launched_it():
    snap = make_chain()
    report = parse_output(SANITIZER_OUT)
    assert report.summary_errors == 1 and not report.done
    f, = report.findings
    assert f.what == "Invalid __global__ write of size 4 bytes" and f.kernel == "axpb"
    assert f.step == {"graph": "chain", "node": 1, "step": 1}
    attribute(report, snap)
    assert f.nodes == [{"graph": "chain", "node": 1, "kernel": "axpb"}]   # not node 0 or 4
    text = report_text("t.cgsnap", "memcheck", report)
    assert "node 1 of graph 'chain', kernel axpb: Invalid __global__ write of size 4 bytes" in text
    assert "Address 0x7f3a2c000100 is out of bounds" in text and "Host Frame" not in text
    assert "the replay stopped at step 1 (node 1 of graph 'chain')" in text


def test_sanitizer_report_without_a_step_names_every_node_of_the_kernel():
    snap = make_chain()
    out = ("prefix text from the program ========= Invalid __global__ read of size 4 bytes\n"
           "=========     at 0xb0 in axpb\n=========\n========= ERROR SUMMARY: 1 error\n")
    report = parse_output(out)
    attribute(report, snap)
    f, = report.findings
    assert [x["node"] for x in f.nodes] == [0, 1, 4] and report.other == \
        ["prefix text from the program "]


def test_kernel_names_compare_without_types_and_templates():
    from cgsnap.binary.demangle import demangle
    mangled = "_Z8add_intoIfEvPT_PKS0_i"
    sanitizer = "void add_into<float>(float *, const float *, int)"
    assert base_name(sanitizer) == "add_into"
    assert base_name(demangle(mangled)) in ("add_into", "_Z8add_intoIfEvPT_PKS0_i")
    assert base_name("ns::k<(bool)1, 3>(int)") == "ns::k"
    assert base_name("void at::native::(anonymous namespace)::ln_kernel<float>(int, float)") == \
        "at::native::{anonymous}::ln_kernel"
    from cgsnap.tools.sanitize import kernel_of
    assert kernel_of(["at void add_into<float>(float *, const float *, int)+0x70 in k.cu:31"]) \
        == sanitizer
    assert kernel_of(["at 0x00000060 in /tmp/k.cu:5:axpb(float*)"]) == "axpb(float*)"


def test_clean_sanitizer_run():
    out = ("========= COMPUTE-SANITIZER\n"
           '@@cgsnap-sanitize step {"graph": "chain", "node": 0, "step": 0}\n'
           "@@cgsnap-sanitize done {}\n========= ERROR SUMMARY: 0 errors\n")
    r = parse_output(out)
    assert r.findings == [] and r.done and r.summary_errors == 0


# ---- replay --check: per-output statistics --------------------------------------------------

class _FakeRestored:
    """What check_graph uses of a restore, over the numpy machine."""

    def __init__(self, snap, got):
        self.snapshot, self._got = snap, got

    def reset(self):
        pass

    def graph(self, name):
        return type("G", (), {"launch": lambda self: None})()

    def synchronize(self):
        pass

    def expected(self, name, rid):
        return np.frombuffer(memoryview(self.snapshot.graph(name).checks[rid]).cast("B"),
                             dtype=np.uint8)

    def read_region(self, rid):
        return self._got[rid]


def test_replay_check_reports_per_output_statistics(capsys):
    from cgsnap.tools.replay import check_graph
    snap = make_chain()
    y = np.frombuffer(snap.graphs[0].checks[1], np.float32).copy()
    z = np.frombuffer(snap.graphs[0].checks[2], np.uint8).copy()
    y[10] = np.inf
    y[20] += 0.25
    failures = check_graph(_FakeRestored(snap, {1: y.view(np.uint8), 2: z}), "chain")
    (label, rid, c), = failures
    assert (label, rid) == ("buffer 'y'", 1)
    assert (c.differing, c.first_index, c.inf, c.max_abs) == (2, 10, [0, 1], 0.25)
    assert c.summary("expected", "got").startswith(
        "2 of 64 float32 elements differ (3 bytes), first at index 10 (byte offset 0x28); max abs 0.25")


def _fake_sanitizer(tmp_path, output: str) -> str:
    """An executable that prints ``output`` as compute-sanitizer would, and checks it was asked
    to run the cgsnap child under the expected options."""
    out = tmp_path / "out.txt"
    out.write_text(output)
    script = tmp_path / "compute-sanitizer"
    script.write_text("#!/bin/sh\n"
                      '[ "$1 $2 $5 $6" = "--tool memcheck --report-api-errors no" ] || exit 9\n'
                      f'cat "{out}"\n')
    script.chmod(0o755)
    return str(script)


def test_replay_sanitize_end_to_end_with_a_stand_in_sanitizer(tmp_path, monkeypatch, capsys):
    from cgsnap.tools.cli import main
    path = save(make_chain(), tmp_path / "chain.cgsnap")
    monkeypatch.setenv("CGSNAP_COMPUTE_SANITIZER", _fake_sanitizer(tmp_path, SANITIZER_OUT))
    assert main(["replay", str(path), "--sanitize"]) == 1
    out = capsys.readouterr().out
    assert "1 finding(s)" in out and "node 1 of graph 'chain', kernel axpb" in out
    clean = ("========= COMPUTE-SANITIZER\n@@cgsnap-sanitize done {}\n"
             "========= ERROR SUMMARY: 0 errors\n")
    (tmp_path / "clean").mkdir()
    monkeypatch.setenv("CGSNAP_COMPUTE_SANITIZER", _fake_sanitizer(tmp_path / "clean", clean))
    assert main(["replay", str(path), "--sanitize", "--json"]) == 0
    assert '"findings": []' in capsys.readouterr().out
    monkeypatch.setenv("CGSNAP_COMPUTE_SANITIZER", str(tmp_path / "missing"))
    assert main(["replay", str(path), "--sanitize"]) == 2
    assert "compute-sanitizer not found" in capsys.readouterr().err
    assert main(["replay", str(path), "--sanitize", "--check"]) == 2
