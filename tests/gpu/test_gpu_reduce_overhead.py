"""torch.compile(mode="reduce-overhead") keeps its graphs in torch's CUDA graph trees: cgsnap.torch
refuses them with GraphTreesError (why, and what to do instead), and the way out it names --
compile without cudagraphs, capture the sizes with capture_sizes() -- restores bit-exact in a
fresh process (GPU)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import cgsnap

pytestmark = pytest.mark.gpu
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def step(x, w):
    return (x @ w).relu() * 2 + 1


@pytest.fixture(scope="module")
def reduce_overhead():
    torch = pytest.importorskip("torch")
    import cgsnap.torch  # noqa: F401
    fn = torch.compile(step, mode="reduce-overhead")
    x = torch.randn(8, 64, device="cuda")
    w = torch.randn(64, 64, device="cuda")
    for _ in range(4):            # warm-up, record, replays
        fn(x, w)
    torch.cuda.synchronize()
    return fn


def tree_nodes():
    import torch
    from torch._inductor import cudagraph_trees as trees
    manager = trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
    assert manager is not None, "torch.compile(mode='reduce-overhead') made no graph tree"
    return [n for nodes in manager.roots.values() for n in nodes]


def test_saving_the_compiled_function_says_why_and_what_instead(reduce_overhead, tmp_path):
    import cgsnap.torch as ct
    path = tmp_path / "ro.cgsnap"
    with pytest.raises(ct.GraphTreesError) as info:
        ct.save(path, {"bs8": reduce_overhead})
    msg = str(info.value)
    assert "function compiled by torch.compile" in msg and "reduce-overhead" in msg
    assert "keep_graph=True" in msg and "capture_sizes" in msg
    assert not path.exists()


def test_the_trees_graphs_and_nodes_are_refused(reduce_overhead):
    import cgsnap.torch as ct
    nodes = tree_nodes()
    assert nodes and nodes[0].graph is not None
    assert ct._tree_graphs(), "cgsnap.torch no longer finds the trees' graphs in this torch"
    with pytest.raises(ct.GraphTreesError, match="owned by torch.compile's CUDA graph trees"):
        ct.snapshot({"g": nodes[0].graph})
    with pytest.raises(ct.GraphTreesError, match="is a CUDAGraphNode of torch.compile's CUDA"):
        ct.snapshot({"node": nodes[0]})


def test_a_graph_without_keep_graph_is_a_capture_error():
    torch = pytest.importorskip("torch")
    import cgsnap.torch as ct
    x = torch.zeros(16, device="cuda")
    g = torch.cuda.CUDAGraph()              # keep_graph=False
    with torch.cuda.graph(g):
        x.add_(1)
    with pytest.raises(cgsnap.CaptureError, match=r"keep_graph=True") as info:
        ct.snapshot({"g": g})
    assert not isinstance(info.value, ct.GraphTreesError)


CAPTURE = r"""
import sys, numpy as np
import cgsnap
cgsnap.start_recorder()                    # before torch loads any kernel
import torch
import cgsnap.torch as ct

def step(x, w):
    return (x @ w).relu() * 2 + 1

fn = torch.compile(step, dynamic=True)     # default mode: no graph trees
x = torch.randn(8, 64, device="cuda")
w = torch.randn(64, 64, device="cuda")
timings = {}
graphs, outs = ct.capture_sizes(fn, [8, 4, 1], (x,), (w,), timings=timings)
assert list(graphs) == ["bs8", "bs4", "bs1"], list(graphs)
assert set(timings) == {"warmup", "capture", "instantiate"}, timings
ref = {}
for b in (8, 4, 1):
    graphs[f"bs{b}"].replay()
    torch.cuda.synchronize()
    ref[f"bs{b}"] = outs[b].cpu().numpy()
    want = step(x[:b], w).cpu().numpy()
    assert np.allclose(ref[f"bs{b}"], want, rtol=1e-3, atol=1e-3), b
ct.save(sys.argv[1], graphs, tensors={"x": x, "w": w, **{f"out_bs{b}": outs[b] for b in outs}})
np.savez(sys.argv[2], **ref)
print("saved", len(graphs))
"""

RESTORE = r"""
import sys, numpy as np
import torch
import cgsnap.torch
graphs = cgsnap.torch.load(sys.argv[1])
ref = np.load(sys.argv[2])
bad = 0
for name in ref.files:
    graphs[name].replay()
    torch.cuda.synchronize()
    got = graphs.tensor("out_" + name).cpu().numpy()
    same = np.array_equal(got.view(np.uint32), ref[name].view(np.uint32))
    print(name, "bit-identical" if same else "DIFFERENT")
    bad += not same
print("dynamo" if "torch._dynamo" in sys.modules else "no dynamo")
sys.exit(1 if bad else 0)
"""


def _python(code: str, *argv) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True,
                       text=True, env=env, timeout=600)
    print(p.stdout, p.stderr)
    assert p.returncode == 0, p.stdout + p.stderr[-4000:]
    return p.stdout


def test_the_way_out_restores_bit_exact_in_a_new_process(tmp_path):
    """Compiled (no cudagraphs), captured with capture_sizes() and saved in one fresh process;
    restored in another, which compiles nothing."""
    pytest.importorskip("torch")
    path, ref = tmp_path / "way-out.cgsnap", tmp_path / "ref.npz"
    assert "saved 3" in _python(CAPTURE, path, ref)
    out = _python(RESTORE, path, ref)
    assert out.count("bit-identical") == 3 and "no dynamo" in out


def test_capture_sizes_refuses_bad_sizes():
    torch = pytest.importorskip("torch")
    import cgsnap.torch as ct
    x = torch.zeros(4, 8, device="cuda")
    for sizes, match in (([], "positive, distinct"), ([2, 2], "positive, distinct"),
                         ([0], "positive, distinct"), ([8], "exceeds the 4 rows")):
        with pytest.raises(cgsnap.CaptureError, match=match):
            ct.capture_sizes(lambda t: t * 2, sizes, (x,))
    with pytest.raises(cgsnap.CaptureError, match="gives several sizes one name"):
        ct.capture_sizes(lambda t: t * 2, [1, 2], (x,), name="step")
