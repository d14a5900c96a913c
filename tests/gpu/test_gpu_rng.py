"""Graphs that draw random numbers (GPU, torch): dropout, torch.rand and multinomial sampling in one
graph, saved in one process and replayed in fresh ones (tests/gpu/rng_worker.py).

- cgsnap.torch replays from the same generator state draw bit-exactly what the original's replays
  drew, an eager draw between two replays included, and leave the generator where torch left it;
- a plain ``launch()`` (no torch) draws the numbers of the original's first replay after saving,
  the same on every launch; ``set_rng`` to the state of replay 2 draws that replay's numbers."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.gpu
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rng_worker.py")
K = 3
OUTPUTS = ("y", "r", "idx")


def run(mode, out_dir, named):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    args = [sys.executable, WORKER, mode, str(out_dir)] + (["named"] if named else [])
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    print(proc.stdout)
    assert proc.returncode == 0, f"{mode}: {proc.stdout}{proc.stderr}"
    return dict(np.load(os.path.join(out_dir, f"{mode}.npz")))


def assert_same(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
    if not np.array_equal(a.view(np.uint8), b.view(np.uint8)):
        diff = np.flatnonzero(a.reshape(-1) != b.reshape(-1))
        raise AssertionError(f"{what}: {diff.size} of {a.size} elements differ, first at {diff[:5]}")


@pytest.fixture(scope="module", params=["default", "named"])
def saved(request, tmp_path_factory):
    pytest.importorskip("torch")
    out = tmp_path_factory.mktemp(f"rng-{request.param}")
    named = request.param == "named"
    return out, named, run("save", out, named)


def test_original_replays_draw_new_numbers(saved):
    """The test can fail: each replay of the original draws other numbers."""
    _, _, orig = saved
    for name in OUTPUTS:
        for k in range(1, K):
            assert not np.array_equal(orig[f"{name}0"], orig[f"{name}{k}"]), \
                f"{name}: replays 0 and {k} drew the same numbers"
    kept = np.count_nonzero(orig["y0"]) / orig["y0"].size
    assert 0.45 < kept < 0.55, f"dropout(p=0.5) kept {kept:.3f} of the elements"


def test_restored_torch_replays_draw_what_the_original_drew(saved):
    out, named, orig = saved
    got = run("torch", out, named)
    assert_same(got["eager"], orig["eager"], "the eager draw between replays 0 and 1")
    for k in range(K):
        for name in OUTPUTS:
            assert_same(got[f"{name}{k}"], orig[f"{name}{k}"], f"replay {k}: {name}")


def test_plain_launch_repeats_the_saved_draw_and_set_rng_selects_one(saved):
    out, named, orig = saved
    got = run("plain", out, named)
    for name in OUTPUTS:
        # The words hold the generator state at save time: the original's first replay after it.
        assert_same(got[f"launch0_{name}"], orig[f"{name}0"], f"plain launch 0: {name}")
        assert_same(got[f"launch1_{name}"], orig[f"{name}0"], f"plain launch 1: {name}")
        assert_same(got[f"set2_{name}"], orig[f"{name}2"], f"set_rng to replay 2's state: {name}")
