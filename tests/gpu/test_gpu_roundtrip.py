"""Capture -> snapshot -> restore in a fresh process, bit-exact (GPU)."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import cgsnap

pytestmark = pytest.mark.gpu
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


@pytest.fixture(scope="module", autouse=True)
def recorder():
    return cgsnap.start_recorder()


def restore_in_fresh_process(path, inputs: dict, outputs: list, graph: str, tmp_path) -> dict:
    inp = tmp_path / "inputs.npz"
    res = tmp_path / "result.npz"
    np.savez(inp, **inputs)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.join(HERE, "restore_worker.py"), str(path),
                           str(inp), ",".join(outputs), str(res), graph],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with np.load(res) as data:
        return {k: data[k] for k in data.files}


def assert_bit_equal(restored: dict, original: dict):
    for k, want in original.items():
        got = np.ascontiguousarray(restored[k]).view(np.uint8).reshape(-1)
        want = np.ascontiguousarray(want).view(np.uint8).reshape(-1)
        assert got.nbytes == want.nbytes, k
        diff = np.flatnonzero(got != want)
        assert diff.size == 0, f"buffer {k} differs first at byte {diff[0] if diff.size else -1}"


def test_bindings_graph_roundtrip(tmp_path, make_bindings):
    wl = make_bindings()
    snap = cgsnap.snapshot(wl.capture, buffers=wl.buffers, name="bindings")
    counts = snap.graphs[0].counts()
    assert counts["kernel"] >= 4 and counts["memcpy"] >= 2 and counts["memset"] == 1
    assert counts["graph"] == 1
    assert any(r.symbol == "coeff" for r in snap.regions), "the __constant__ must be carried"
    # A global still holding its image's initial value is not carried: loading recreates it.
    assert not any(r.symbol == "offsets" for r in snap.regions)
    path = tmp_path / "bindings.cgsnap"
    snap.save(path)
    x = np.random.default_rng(7).standard_normal(wl.N, dtype=np.float32)
    original = wl.run(x)
    restored = restore_in_fresh_process(path, {"x": x}, wl.outputs, "bindings", tmp_path)
    assert_bit_equal(restored, original)


def test_graph_with_mem_alloc_nodes(tmp_path, make_bindings):
    wl = make_bindings(mem_nodes=True)
    snap = cgsnap.snapshot(wl.capture, buffers=wl.buffers, name="memnodes")
    counts = snap.graphs[0].counts()
    assert counts.get("mem_alloc") == 1 and counts.get("mem_free") == 1
    path = tmp_path / "memnodes.cgsnap"
    snap.save(path)
    x = np.random.default_rng(8).standard_normal(wl.N, dtype=np.float32)
    original = wl.run(x)
    restored = restore_in_fresh_process(path, {"x": x}, wl.outputs, "memnodes", tmp_path)
    assert_bit_equal(restored, original)


def test_original_untouched_by_snapshot(make_bindings):
    from workloads import read, write_state
    wl = make_bindings()
    state = {k: read(v) for k, v in wl.buffers.items()}
    x = np.random.default_rng(9).standard_normal(wl.N, dtype=np.float32)
    before = wl.run(x)
    write_state(wl.buffers, state)
    after_state = {k: read(v) for k, v in wl.buffers.items()}
    cgsnap.snapshot(wl.capture, buffers=wl.buffers, name="untouched")
    for k, v in after_state.items():
        assert np.array_equal(read(wl.buffers[k]), v), f"snapshot changed buffer {k}"
    after = wl.run(x)
    assert_bit_equal(after, before)


def test_torch_mlp_roundtrip_without_torch(tmp_path):
    torch = pytest.importorskip("torch")
    from cgsnap.tools.demo import torch_mlp
    g, _, (_model, x, y) = torch_mlp()     # weights unnamed: carried as plain allocations
    snap = cgsnap.snapshot(g, buffers={"x": x, "y": y}, name="mlp")
    names = " ".join(k.name for k in snap.kernels)
    assert "cutlass" in names or "gemm" in names.lower()
    assert "splitKreduce" in names and "layer_norm" in names and "Gelu" in names
    path = tmp_path / "mlp.cgsnap"
    snap.save(path)
    x_new = torch.randn(8, 256, device="cuda")
    x.copy_(x_new)
    g.replay()
    torch.cuda.synchronize()
    original = {"y": y.cpu().numpy()}
    restored = restore_in_fresh_process(path, {"x": x_new.cpu().numpy()}, ["y"], "mlp", tmp_path)
    assert_bit_equal(restored, original)


def test_cupy_graph_roundtrip(tmp_path):
    cp = pytest.importorskip("cupy")
    a = cp.random.standard_normal((256, 512), dtype=cp.float32)
    out = cp.empty((256,), dtype=cp.float32)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        for _ in range(2):           # compile and load the kernels before capture
            cp.sum(cp.exp(a) * 2.0, axis=1, out=out)
        stream.synchronize()
        stream.begin_capture()
        b = cp.exp(a) * 2.0
        cp.sum(b, axis=1, out=out)
        graph = stream.end_capture()
    handle = _cupy_graph_handle(graph)
    snap = cgsnap.snapshot(handle, buffers={"a": a, "out": out}, name="cupy")
    path = tmp_path / "cupy.cgsnap"
    snap.save(path)
    a_new = cp.random.standard_normal((256, 512), dtype=cp.float32)
    a[...] = a_new
    graph.launch(stream)
    stream.synchronize()
    original = {"out": cp.asnumpy(out)}
    restored = restore_in_fresh_process(path, {"a": cp.asnumpy(a_new)}, ["out"], "cupy", tmp_path)
    assert_bit_equal(restored, original)


def _cupy_graph_handle(graph) -> int:
    """CuPy keeps the cudaGraph_t of a captured Graph in ``graph.graph``."""
    for attr in ("graph", "_graph"):
        value = getattr(graph, attr, None)
        if isinstance(value, int) and value:
            return value
    pytest.skip("this CuPy does not expose the captured cudaGraph_t")


def test_replay_check_cli(tmp_path, make_bindings):
    wl = make_bindings()
    snap = cgsnap.snapshot(wl.capture, buffers=wl.buffers, name="cli")
    assert snap.graphs[0].checks, "outputs are recorded by default for named buffers"
    path = tmp_path / "cli.cgsnap"
    snap.save(path)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "cgsnap", "replay", str(path), "--check"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS" in proc.stdout and "torch imported: no" in proc.stdout


def test_kernel_lookup_by_scan_without_recorder(tmp_path):
    """The loaded-object scan finds torch's own elementwise kernels in libtorch_cuda's fatbin,
    in a fresh process where the recorder was never started (second run hits the index cache)."""
    pytest.importorskip("torch")
    script = r"""
import sys, time, torch, cgsnap
from cgsnap.cuda import driver
from cgsnap.kernels.sources import LoadedObjectScan
x = torch.randn(1024, device="cuda"); y = torch.nn.functional.gelu(x); torch.cuda.synchronize()
dev = driver.current_device()
t0 = time.perf_counter()
scan = LoadedObjectScan(dev.arch, cache_dir=sys.argv[1])
hits = scan.find(sys.argv[2])
print("hits", len(hits), "seconds", round(time.perf_counter() - t0, 3))
assert hits and all(sys.argv[2] in h.kernels for h in hits)
"""
    name = ("_ZN2at6native29vectorized_elementwise_kernelILi4EZZZNS0_18GeluCUDAKernelImplERNS_18Tens"
            "orIteratorBaseENS0_8GeluTypeEENKUlvE0_clEvENKUlvE0_clEvEUlfE_St5arrayIPcLm2EEEEviT0_T1_")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for attempt in ("cold", "warm"):
        proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "cache"), name],
                              capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, attempt + proc.stdout + proc.stderr
        print(attempt, proc.stdout.strip())


def test_large_region_snapshot_is_exact(tmp_path):
    """A saved region larger than the staging ring (several 64 MiB chunks plus a ragged tail)
    goes through transfer.Stager.download: its bytes in the snapshot equal the device's, and
    the graph restored in a fresh process computes the same output from them."""
    cp = pytest.importorskip("cupy")
    n = (300 << 20) // 4 + 12345                       # ~300 MiB of float32, not chunk-aligned
    w = cp.random.standard_normal(n, dtype=cp.float32)
    out = cp.empty(4096, dtype=cp.float32)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        for _ in range(2):
            cp.multiply(w[-4096:], 3.0, out=out)
        stream.synchronize()
        stream.begin_capture()
        cp.multiply(w[-4096:], 3.0, out=out)
        graph = stream.end_capture()
    snap = cgsnap.snapshot(_cupy_graph_handle(graph), buffers={"w": w, "out": out}, name="big")
    region = next(r for r in snap.regions if r.name == "w")
    assert region.size == 4 * n
    assert np.array_equal(np.asarray(region.data).view(np.float32), cp.asnumpy(w))
    path = tmp_path / "big.cgsnap"
    snap.save(path)
    graph.launch(stream)
    stream.synchronize()
    restored = restore_in_fresh_process(path, {}, ["out"], "big", tmp_path)
    assert_bit_equal(restored, {"out": cp.asnumpy(out)})
    # Give the 300 MiB back to the driver: CuPy's pool would keep it, and a stale pointer in a
    # later test's kernel arguments could then drag it into that test's file.
    del w, out, graph, snap, region
    cp.get_default_memory_pool().free_all_blocks()
