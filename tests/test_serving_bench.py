"""The serving benchmark's CPU side (scripts/bench.py --only serving): its sizes, its argument
plan, the table it builds from each step's TIMINGS, and how it runs a step (no GPU, no torch)."""
import importlib.util
import json
import os
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(rel: str, name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, rel))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bench = _load("scripts/bench.py", "bench_under_test")
sizes = bench.serving_sizes_module()


def plan_of(*argv):
    return bench.serving_plan(bench.parser().parse_args(list(argv)))


def test_the_default_sizes_are_a_serving_engines_67():
    s = sizes.DEFAULT_SIZES
    assert len(s) == 67
    assert s[:5] == (1, 2, 4, 8, 16) and s[-1] == 512
    assert all(b % 8 == 0 for b in s[3:]) and list(s) == sorted(set(s))
    assert sizes.parse_sizes("default") == list(s) == sizes.parse_sizes("")


@pytest.mark.parametrize("text", ["0", "1,1", "a,b", "-3", ",", "1,,x"])
def test_bad_sizes_are_refused(text):
    with pytest.raises(ValueError, match="sizes"):
        sizes.parse_sizes(text)


def test_checked_sizes_are_smallest_64_middle_largest():
    assert sizes.check_sizes(sizes.DEFAULT_SIZES) == [1, 64, 248, 512]
    assert sizes.check_sizes([16, 8, 4, 2, 1]) == [1, 4, 16]
    assert sizes.check_sizes([5]) == [5]


def test_the_full_plan():
    p = plan_of("--only", "serving")
    assert (p["layers"], p["hidden"], len(p["sizes"]), p["budget"], p["max_batch"]) == \
        (32, 2048, 67, 420.0, 512)
    assert not p["quick"] and not p["coordinate_descent"]


def test_the_quick_plan():
    p = plan_of("--only", "serving", "--quick")
    assert (p["layers"], p["hidden"], p["sizes"], p["budget"], p["max_batch"]) == \
        (4, 1024, [1, 2, 4, 8, 16], 170.0, 16)


def test_explicit_knobs_win_over_quick():
    p = plan_of("--quick", "--layers", "8", "--hidden", "512", "--sizes", "1,2",
                "--serving-budget", "99", "--coordinate-descent")
    assert (p["layers"], p["hidden"], p["sizes"], p["budget"], p["coordinate_descent"]) == \
        (8, 512, [1, 2], 99.0, True)


@pytest.mark.parametrize("argv", [["--hidden", "1000"], ["--hidden", "64"], ["--sizes", "0"]])
def test_a_bad_plan_is_refused(argv):
    with pytest.raises(ValueError):
        plan_of(*argv)


def test_other_sections_keep_their_own_layer_default():
    assert bench.parser().parse_args([]).layers is None        # main() uses 12 for those


def timings():
    """TIMINGS of each step, shaped like the scripts print them (made-up numbers)."""
    sz = [1, 2, 4, 8]
    cfg = {"layers": 2, "hidden": 256, "vocab": 32000, "max_seq": 256, "max_batch": 8,
           "head_dim": 128}
    a = {"import": 3.0, "weights": 1.0, "compile": 30.0, "warmup": 5.0, "capture": 4.0,
         "instantiate": 1.0, "graph_part": 40.0, "dynamo_graphs": 1, "ttft_from_start": 45.0}
    warm = dict(a, compile=10.0, graph_part=20.0, ttft_from_start=25.0, save=12.0,
                file_bytes=5e6, replay_ms={f"bs{b}": 1.0 for b in sz},
                inprocess_replay_ms={"bs1": 1.01, "bs2": 0.99, "bs4": 1.05, "bs8": 1.0},
                inprocess_bitexact={"1": True, "4": True, "8": True},
                clone1_ratio={"bs1": 0.97, "bs8": 0.98})

    def b(load, extra):
        return dict({"import": 3.0, "weights": 1.0, "kv": 0.01, "load": load,
                     "first_request": 0.01, "other_replays": 0.09, "graph_part": load + 0.1,
                     "ttft_from_weights": load + 0.01, "ttft_from_start": 4.2,
                     "restored": {"read": 0.1, "alloc": 0.01, "instantiate": 0.08,
                                  "build": 0.05, "later.step": 0.001},
                     "bitexact": {"1": True, "4": True, "8": False},
                     "compile_evidence": {"dynamo_imported": False, "triton_imported": False,
                                          "dynamo_graphs": 0, "inductor_events": 0}}, **extra)
    return sz, {"weights": {"write": 2.0, "bytes": 4e9, "kv_bytes": 8e9, "config": cfg},
                "cold": a, "warm": warm, "lazy": b(0.2, {}),
                "all": b(0.3, {"replay_ratio": {"bs1": 1.0, "bs2": 1.0, "bs4": 1.1, "bs8": 1.0},
                               "replay_ms": {f"bs{b}": 5.0 for b in sz}}),
                "file": {"graphs": 4, "nodes": 400, "kernels": 20, "images": 9}}


def test_the_table():
    sz, t = timings()
    rows = {what: (value, unit, goal) for what, value, unit, goal in
            bench.serving_rows({"sizes": sz}, t)}
    assert rows["speed-up of the graph part: (a) cold / (b) eager"] == \
        (pytest.approx(40.0 / 0.4), "x", "goal >= 100x: met")
    assert rows["speed-up of the graph part: (a) warm / (b) eager"][2] == "goal >= 100x: MISSED"
    assert rows["(b) eager: graph part: load to 4 graphs replayed once"] == \
        (pytest.approx(400.0), "ms", "the replays' GPU time included")
    ready = "(b) eager: all 4 graphs ready (load with instantiate='all', after the weights)"
    assert rows[ready] == (pytest.approx(300.0), "ms", "goal <= 500 ms: met")
    assert rows["floor: GPU time of one replay of each of the 4 graphs"][0] == pytest.approx(20.0)
    assert rows["ceiling: (a) warm / (node add + instantiate + one replay each)"][0] == \
        pytest.approx(20.0 / (0.02 + 0.08 + 0.05))
    assert rows["(b) lazy:   later.step"][0] == pytest.approx(1.0)     # timings added later too
    clone = ("clone of the original graph, same memory, instantiated with torch's "
             "AUTO_FREE_ON_LAUNCH / the original, bs8")
    assert rows[clone][0] == pytest.approx(0.98)
    assert rows["floor: cuGraphInstantiate of the 4 graphs alone"][0] == pytest.approx(80.0)
    assert rows["ceiling: (a) warm / instantiate alone"][0] == pytest.approx(250.0)
    par = "replay parity, one process, interleaved"
    assert rows[f"{par}: median restored/original"] == (pytest.approx(1.005), "x",
                                                        "goal 1.00 +- 0.02: met")
    assert rows[f"{par}: graphs outside +- 0.02 of 4"][0] == 1
    assert rows["replay parity, new process vs (a): highest"][0] == pytest.approx(1.1)
    assert rows["(b) eager: bit-exact logits vs original, bs 1,4,8"] == (2, "n", "goal 3: MISSED")
    assert rows["(a) restored in-process: bit-exact sizes of 3"] == (3, "n", "goal 3: met")
    assert rows["(b) lazy: compilation (Dynamo graphs, Inductor events, Triton)"] == \
        (0, "n", "goal 0: met")
    assert rows["file: nodes in 4 graphs (20 kernels, 9 images)"][0] == 400
    assert all(isinstance(v, (int, float)) for v, _, _ in rows.values())


def test_the_table_shows_what_ran():
    sz, t = timings()
    assert bench.serving_rows({"sizes": sz}, {}) == []
    t["all"] = None                  # eager restore crashed: no speed-up against it, no floor
    t["lazy"]["compile_evidence"]["inductor_events"] = 3
    rows = {w: (v, g) for w, v, _, g in bench.serving_rows({"sizes": sz}, t)}
    assert not any("(b) eager" in w or w.startswith("floor") for w in rows)
    assert rows["(b) lazy: compilation (Dynamo graphs, Inductor events, Triton)"] == \
        (3, "goal 0: MISSED")
    t["warm"] = {"import": 3.0, "save_error": "AmbiguousKernelError: ..."}   # died early
    rows = {w for w, *_ in bench.serving_rows({"sizes": sz}, t)}
    assert not any(w.startswith("(a) warm") for w in rows)
    assert "(a) cold: compile + autotune (first call, bs8)" in rows


@pytest.fixture
def fake_serving(tmp_path, monkeypatch):
    """Stand-in scripts in a directory of their own, beside the real sizes.py."""
    d = tmp_path / "serving"
    d.mkdir()
    (d / "sizes.py").write_text(open(os.path.join(ROOT, "examples", "serving", "sizes.py")).read())
    monkeypatch.setattr(bench, "SERVING", str(d))
    return d


def test_a_step_that_fails_its_check_still_reports(fake_serving):
    (fake_serving / "step.py").write_text(
        "import json, sys\nprint('(b) lazy: something')\nprint('TIMINGS ' + json.dumps("
        "{'load': 0.5, 'argv': sys.argv[1:]}))\nsys.exit(1)\n")
    r = bench._serving_step("b-x", "step.py", ["--dir", "d"], dict(os.environ), 60,
                            str(fake_serving))
    assert r["rc"] == 1 and r["timings"] == {"load": 0.5, "argv": ["--dir", "d"]}
    log = open(r["log"]).read()
    assert "(b) lazy: something" in log and log.startswith(sys.executable)


def test_a_step_past_its_time_is_ended_with_its_children(fake_serving):
    (fake_serving / "hang.py").write_text(
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print('CHILD', child.pid, flush=True)\ntime.sleep(60)\n")
    r = bench._serving_step("a-hang", "hang.py", [], dict(os.environ), 1.5, str(fake_serving))
    assert r["rc"] == "timeout" and r["timings"] is None
    out = open(r["log"]).read()
    pid = int(out.split("CHILD ")[1].split()[0])
    assert "[timed out after 2 s]" in out
    deadline = time.monotonic() + 10      # SIGKILL is delivered asynchronously
    while not _gone(pid):
        if time.monotonic() > deadline:
            pytest.fail(f"child {pid} of the timed-out step is still running")
        time.sleep(0.01)


def _gone(pid: int) -> bool:
    """Exited (a zombie waiting for init to reap it counts) or no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_the_bench_passes_flags_the_scripts_define():
    """The scripts compile, and define every flag bench_serving() passes them (they import
    torch, so their parsers are read as source here)."""
    for script in ("make_weights.py", "start_compiled.py", "start_restored.py"):
        src = open(os.path.join(ROOT, "examples", "serving", script)).read()
        compile(src, script, "exec")
    src = open(os.path.join(ROOT, "examples", "serving", "start_compiled.py")).read()
    for flag in ("--weights", "--out", "--sizes", "--save", "--parity", "--batch-one-apart",
                 "--coordinate-descent"):
        assert f'"{flag}"' in src, flag
    src = open(os.path.join(ROOT, "examples", "serving", "start_restored.py")).read()
    for flag in ("--weights", "--dir", "--instantiate", "--time-replays"):
        assert f'"{flag}"' in src, flag
    json.dumps(bench.serving_plan(bench.parser().parse_args(["--quick"])))


FAKE_COMPILED = r"""
import json, os, sys
argv = sys.argv[1:]
out = argv[argv.index("--out") + 1]
os.makedirs(out, exist_ok=True)
calls = os.path.join(os.path.dirname(os.path.abspath(__file__)), "calls.txt")
with open(calls, "a") as f:
    f.write(" ".join(argv) + "\n")
if os.environ.get("FAKE_COLD_FAILS") and "--batch-one-apart" not in argv:
    sys.exit("Inductor fell over")
t = {"import": 3.0, "weights": 1.0, "compile": 30.0 if "--save" not in argv else 10.0,
     "warmup": 5.0, "capture": 4.0, "instantiate": 1.0, "dynamo_graphs": 1,
     "ttft_from_start": 45.0}
t["graph_part"] = t["compile"] + 10.0
if "--save" in argv:
    t.update(save=2.0, file_bytes=1e6, replay_ms={"bs1": 1.0, "bs2": 1.0})
    for name in ("original.json", "reference.npz", "serving.cgsnap"):
        with open(os.path.join(out, name), "w") as f:
            json.dump({"sizes": [1, 2], "replay_ms": t["replay_ms"]}, f)
print("(a) done")
print("TIMINGS " + json.dumps(t))
"""

FAKE_RESTORED = r"""
import json, sys
print("TIMINGS " + json.dumps({"import": 3.0, "weights": 1.0, "kv": 0.01, "load": 0.1,
      "first_request": 0.01, "other_replays": 0.01, "graph_part": 0.12,
      "ttft_from_weights": 0.11, "ttft_from_start": 4.0, "restored": {"instantiate": 0.05},
      "bitexact": {"1": True}, "compile_evidence": {"dynamo_imported": False,
      "triton_imported": False, "dynamo_graphs": 0, "inductor_events": 0}}))
"""

FAKE_WEIGHTS = r"""
import json
print("TIMINGS " + json.dumps({"write": 1.0, "bytes": 2e9, "kv_bytes": 1e9, "config": {
      "layers": 4, "hidden": 1024, "vocab": 32000, "max_seq": 256, "max_batch": 16,
      "head_dim": 128}}))
"""


@pytest.mark.parametrize("cold_fails", [False, True])
def test_bench_serving_runs_the_four_steps_in_order(fake_serving, tmp_path, monkeypatch,
                                                    cold_fails):
    """The orchestration, with stand-in scripts: weights, (a) cold, (a) warm --save --parity
    on the same caches, (b) lazy and eager on the warm run's directory; a cold run that dies
    is retried once with batch 1 compiled apart, and the warm run then uses the same flag."""
    for name, src in (("make_weights.py", FAKE_WEIGHTS), ("start_compiled.py", FAKE_COMPILED),
                      ("start_restored.py", FAKE_RESTORED)):
        (fake_serving / name).write_text(src)
    if cold_fails:
        monkeypatch.setenv("FAKE_COLD_FAILS", "1")
    monkeypatch.setattr(bench, "RESULTS", [])
    out = tmp_path / "out"
    out.mkdir()
    args = bench.parser().parse_args(["--only", "serving", "--quick", "--sizes", "1,2",
                                      "--out", str(out / "bench.json")])
    bench.bench_serving(args)
    calls = (fake_serving / "calls.txt").read_text().splitlines()
    assert len(calls) == (3 if cold_fails else 2)
    assert "--save" not in calls[0] and "--save --parity" in calls[-1]
    assert ("--batch-one-apart" in calls[-1]) == cold_fails
    rows = {r["what"]: r for r in bench.RESULTS if "what" in r}
    assert rows["speed-up of the graph part: (a) cold / (b) eager"]["value"] == \
        pytest.approx(40.0 / 0.12)
    ready = "(b) eager: all 2 graphs ready (load with instantiate='all', after the weights)"
    assert rows[ready]["goal"] == "goal <= 500 ms: met"
    notes = [r["note"] for r in bench.RESULTS if "note" in r]
    assert any("retried" in n for n in notes) == cold_fails
    logs = sorted(p.name for p in out.glob("serving-*.log"))
    assert logs == sorted(["serving-weights.log", "serving-a-cold.log", "serving-a-warm.log",
                           "serving-b-lazy.log", "serving-b-all.log"] +
                          (["serving-a-cold-retry.log"] if cold_fails else []))
    raw = json.loads((out / "serving.json").read_text())
    assert raw["plan"]["sizes"] == [1, 2] and set(raw["steps"]) >= {"cold", "warm", "lazy", "all"}


def _phase(fake_serving, monkeypatch, work, out, phase, *extra):
    for name, src in (("make_weights.py", FAKE_WEIGHTS), ("start_compiled.py", FAKE_COMPILED),
                      ("start_restored.py", FAKE_RESTORED)):
        if not (fake_serving / name).exists():
            (fake_serving / name).write_text(src)
    monkeypatch.setattr(bench, "RESULTS", [])
    bench.bench_serving(bench.parser().parse_args(
        ["--only", "serving", "--quick", "--sizes", "1,2", "--out", str(out / "bench.json"),
         "--serving-dir", str(work), "--serving-phase", phase, *extra]))


def test_bench_serving_over_two_calls(fake_serving, tmp_path, monkeypatch):
    """--serving-phase cold stops after (a) cold with its steps in --serving-dir; rest goes on
    from them (warm, then both restores) without writing weights or compiling cold again; a
    phase without a folder is refused."""
    work, out = tmp_path / "work", tmp_path / "out"
    out.mkdir()
    with pytest.raises(SystemExit):
        bench.bench_serving(bench.parser().parse_args(
            ["--only", "serving", "--quick", "--out", str(out / "bench.json"),
             "--serving-phase", "cold"]))
    _phase(fake_serving, monkeypatch, work, out, "cold")
    calls = (fake_serving / "calls.txt").read_text().splitlines()
    assert len(calls) == 1 and "--save" not in calls[0]
    assert (work / "steps.json").exists() and (work / "cold").is_dir()
    _phase(fake_serving, monkeypatch, work, out, "rest")
    calls = (fake_serving / "calls.txt").read_text().splitlines()
    assert len(calls) == 2 and "--save --parity" in calls[1]
    raw = json.loads((out / "serving.json").read_text())
    assert set(raw["steps"]) >= {"weights", "cold", "warm", "lazy", "all"}
    rows = {r["what"]: r for r in bench.RESULTS if "what" in r}
    assert rows["speed-up of the graph part: (a) cold / (b) eager"]["value"] == \
        pytest.approx(40.0 / 0.12)
    assert work.exists()              # kept for a later call


@pytest.mark.parametrize("content", ['{"cold": null}', "not json", '{"steps": {"cold": 3}}'])
def test_rest_from_unusable_steps_is_an_error_row(fake_serving, tmp_path, monkeypatch, content):
    work, out = tmp_path / "w", tmp_path / "o"
    work.mkdir()
    out.mkdir()
    (work / "steps.json").write_text(content)
    _phase(fake_serving, monkeypatch, work, out, "rest")
    assert any("error" in r and "cold call" in r["error"] for r in bench.RESULTS)
    assert not (fake_serving / "calls.txt").exists()        # nothing ran


def test_rest_refuses_the_steps_of_another_plan(fake_serving, tmp_path, monkeypatch):
    work, out = tmp_path / "w", tmp_path / "o"
    out.mkdir()
    _phase(fake_serving, monkeypatch, work, out, "cold")
    _phase(fake_serving, monkeypatch, work, out, "rest", "--hidden", "2048")
    assert any("another plan" in r.get("error", "") for r in bench.RESULTS)
    assert len((fake_serving / "calls.txt").read_text().splitlines()) == 1


def test_a_cold_call_starts_clean(fake_serving, tmp_path, monkeypatch):
    """A reused --serving-dir: the compile caches are emptied, and a cold call that fails
    leaves no earlier steps behind for 'rest'."""
    work, out = tmp_path / "w", tmp_path / "o"
    out.mkdir()
    (work / "compile-cache").mkdir(parents=True)
    (work / "compile-cache" / "stale").write_text("x")
    (work / "steps.json").write_text('{"plan": {}, "steps": {"cold": {"timings": {}}}}')
    (fake_serving / "start_compiled.py").write_text("import sys; sys.exit(3)\n")
    _phase(fake_serving, monkeypatch, work, out, "cold")
    assert not (work / "compile-cache" / "stale").exists()
    assert not (work / "steps.json").exists()


def test_a_warm_step_that_saves_nothing_restores_nothing_stale(fake_serving, tmp_path, monkeypatch):
    """An earlier run's warm/ files in a reused --serving-dir are not taken for this run's."""
    work, out = tmp_path / "w", tmp_path / "o"
    out.mkdir()
    _phase(fake_serving, monkeypatch, work, out, "cold")
    (work / "warm").mkdir()
    for name in ("serving.cgsnap", "reference.npz", "original.json"):
        (work / "warm" / name).write_text("{}")
    (fake_serving / "start_compiled.py").write_text("import sys; sys.exit(3)\n")
    _phase(fake_serving, monkeypatch, work, out, "rest")
    assert any("did not save" in r.get("error", "") for r in bench.RESULTS)
    raw = json.loads((out / "serving.json").read_text())
    assert "lazy" not in raw["steps"] and "all" not in raw["steps"]     # path B never ran
