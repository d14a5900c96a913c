"""Graphs from real producers (tests/gpu/corpus.py), each captured here, restored in a fresh
process that never imports torch or CuPy, and compared bit for bit with the original over
several replays on fresh inputs; the snapshot must leave the original's memory untouched.
Each result is appended to $CGSNAP_TEST_ARTIFACTS/corpus.jsonl (scripts/corpus_table.py turns
it into the table in docs/CORPUS.md)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback

import numpy as np
import pytest

import cgsnap

pytestmark = pytest.mark.gpu
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

from corpus import CASES, NEEDS  # noqa: E402


def _record(name: str, **fields) -> None:
    out = os.environ.get("CGSNAP_TEST_ARTIFACTS")
    if out:
        with open(os.path.join(out, "corpus.jsonl"), "a") as f:
            f.write(json.dumps({"case": name, **fields}) + "\n")


def _bytes(a) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint8).reshape(-1)


def _first_difference(got, want) -> str:
    g, w = _bytes(got), _bytes(want)
    if g.nbytes != w.nbytes:
        return f"{g.nbytes} bytes, expected {w.nbytes}"
    diff = np.flatnonzero(g != w)
    return "" if not diff.size else f"{diff.size} bytes differ, first at byte {diff[0]}"


@pytest.fixture(scope="module", autouse=True)
def recorder():
    return cgsnap.start_recorder()


@pytest.mark.parametrize("name", sorted(CASES))
def test_corpus_case(name, tmp_path):
    pytest.importorskip(NEEDS.get(name, "torch"))
    t0 = time.perf_counter()
    stage = "build"
    try:
        case = CASES[name]()
        watched = list(dict.fromkeys(case.outputs + list(case.inputs)))
        before = {k: case.read(k) for k in watched}
        stage = "snapshot"
        snap = cgsnap.snapshot(case.graph, buffers=case.buffers, name=name)
        untouched = [k for k in watched if _first_difference(case.read(k), before[k])]
        assert not untouched, f"snapshot() changed the original's buffers {untouched}"
        path = tmp_path / f"{name}.cgsnap"
        stage = "save"
        cgsnap.save(path, snap)
        rng = np.random.default_rng(1234)
        inputs = {k: gen(rng) for k, gen in case.inputs.items()}
        for k, arr in inputs.items():
            case.write(k, arr)
        expected = []
        for _ in range(case.replays):
            case.replay()
            expected.append({k: case.read(k) for k in case.outputs})
        stage = "restore"
        np.savez(tmp_path / "inputs.npz", **inputs)
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.run([sys.executable, os.path.join(HERE, "corpus_worker.py"), str(path),
                               str(tmp_path / "inputs.npz"), ",".join(case.outputs),
                               str(tmp_path / "result.npz"), str(case.replays)],
                              capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        stage = "compare"
        with np.load(tmp_path / "result.npz") as got:
            problems = [f"replay {k} {name_}: {d}" for k, outs in enumerate(expected)
                        for name_, want in outs.items()
                        if (d := _first_difference(got[f"{k}:{name_}"], want))]
        assert not problems, "; ".join(problems[:5])
        changing = [k for k in case.outputs
                    if case.replays > 1 and _first_difference(expected[0][k], expected[-1][k])]
        counts = snap.graphs[0].counts()
        _record(name, result="bit-exact", replays=case.replays, nodes=counts,
                kernels=len(snap.kernels), file_bytes=os.path.getsize(path),
                changing_outputs=changing, seconds=round(time.perf_counter() - t0, 1))
    except BaseException as exc:
        _record(name, result="FAIL", stage=stage, error=f"{type(exc).__name__}: {exc}"[:800],
                trace=traceback.format_exc()[-2000:])
        raise
