"""Reproducing bugs on the GPU: snapshot(trace=True), cgsnap bisect, cgsnap extract and
cgsnap replay --sanitize, each command in a fresh process."""
from __future__ import annotations

import copy
import ctypes
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

import cgsnap
from synthetic import edit_kernel_params
from cgsnap.format import fileformat
from cgsnap.format.trace import digest

pytestmark = pytest.mark.gpu
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

SOURCE = r"""
extern "C" __global__ void scale(const float* x, float* y, float a, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = a * x[i];
}
extern "C" __global__ void square(const float* x, float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i] * x[i];
}
// The planted bug: a write 256 MiB past the end of y, far from every allocation of a restore
// (just past the end could land in the padding a restore adds, or in the next allocation).
extern "C" __global__ void oob_write(float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = 2.0f * y[i];
    if (i == 0) y[n + (1 << 26)] = 1.0f;
}
template <typename T> __global__ void add_into(T* dst, const T* src, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] += src[i];
}
template __global__ void add_into<float>(float*, const float*, int);
"""
N = 1000


@pytest.fixture(scope="module", autouse=True)
def recorder():
    return cgsnap.start_recorder()


class Device1D:
    """A float32 device buffer as __cuda_array_interface__ (so regions record their dtype)."""

    def __init__(self, ptr: int, n: int):
        self.__cuda_array_interface__ = {"shape": (n,), "typestr": "<f4", "data": (ptr, False),
                                         "version": 3, "strides": None}


class Chain:
    """x -scale(2)-> y -scale(3)-> z -square-> w, or with oob=True: x -scale(2)-> y,
    oob_write(y), y -scale(3)-> z."""

    def __init__(self, oob: bool = False):
        from cgsnap.cuda import driver
        from workloads import launch, nvrtc_compile
        self.driver = driver
        dev = driver.init(0)
        cubin, _ = nvrtc_compile(SOURCE, dev.arch, "repro.cu")
        self.lib = driver.library_load(cubin)
        f = {k: driver.library_function(self.lib, k) for k in ("scale", "square", "oob_write")}
        self.ptr = {k: driver.mem_alloc(4 * N) for k in "xyzw"}
        rng = np.random.default_rng(11)
        self.initial = {k: rng.standard_normal(N).astype(np.float32) for k in "xyzw"}
        for k, v in self.initial.items():
            driver.htod(self.ptr[k], v, v.nbytes)
        s = driver.stream_create()
        p = {k: ctypes.c_uint64(v) for k, v in self.ptr.items()}
        grid = (N + 255) // 256
        with cgsnap.capture(stream=s) as cap:
            launch(f["scale"], grid, 256, [p["x"], p["y"], ctypes.c_float(2.0), ctypes.c_int(N)], s)
            if oob:
                launch(f["oob_write"], grid, 256, [p["y"], ctypes.c_int(N)], s)
            launch(f["scale"], grid, 256, [p["y"], p["z"], ctypes.c_float(3.0), ctypes.c_int(N)], s)
            if not oob:
                launch(f["square"], grid, 256, [p["z"], p["w"], ctypes.c_int(N)], s)
        self.capture = cap
        self.buffers = {k: Device1D(v, N) for k, v in self.ptr.items()}

    def read(self) -> dict:
        out = {}
        for k, ptr in self.ptr.items():
            host = np.empty(N, dtype=np.float32)
            self.driver.dtoh(int(host.ctypes.data), ptr, 4 * N)
            out[k] = host
        return out


def cli(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "cgsnap", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


def rewrite(src, dst, edit):
    with fileformat.open_file(src) as f:
        manifest = copy.deepcopy(f.manifest)
        blobs = [bytes(f.blob(i)) for i in range(len(f.blobs))]
    edit(manifest, blobs)
    fileformat.write_file(dst, manifest, blobs)
    return dst


def region_id(snap, name: str) -> int:
    return snap.region_by_name(name).id


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """The chain, snapshot with trace=True (outputs recorded), saved; and its expected values."""
    wl = Chain()
    snap = cgsnap.snapshot(wl.capture, buffers=wl.buffers, name="g", trace=True)
    path = tmp_path_factory.mktemp("repro") / "chain.cgsnap"
    snap.save(path)
    x = wl.initial["x"]
    y = np.float32(2.0) * x
    z = np.float32(3.0) * y
    return {"path": path, "snap": cgsnap.read(path), "x": x, "y": y, "z": z, "w": z * z,
            "initial": wl.initial, "wl": wl}


def test_trace_digests_match_host_arithmetic(traced):
    """The node-by-node replay at snapshot time computed exactly what numpy computes, and
    its end state equals the whole graph's recorded outputs (no trace note)."""
    snap = traced["snap"]
    g = snap.graphs[0]
    assert g.trace is not None and len(g.trace) == len(g.nodes) == 3
    assert "trace_notes" not in snap.meta, snap.meta.get("trace_notes")
    order = [n.id for n in g.topological_order()]
    assert [s.node for s in g.trace] == order
    final = {}
    for s in g.trace:
        for e in s.entries:
            final[e.region] = e.digest
    for name in "yzw":
        assert final[region_id(snap, name)] == digest(traced[name].tobytes()), name


def test_snapshot_with_trace_leaves_the_original_memory_untouched():
    wl = Chain()
    before = wl.read()
    snap = cgsnap.snapshot(wl.capture, buffers=wl.buffers, name="g", record_outputs=False,
                           trace=True)
    after = wl.read()
    for k in "xyzw":
        assert before[k].tobytes() == after[k].tobytes(), f"buffer {k} changed"
        assert before[k].tobytes() == wl.initial[k].tobytes(), f"buffer {k} changed"
    assert len(snap.graphs[0].trace) == 3
    # The trace ran on copies: the original graph still computes from the original state.
    from cgsnap.cuda import driver, graphs
    exe = graphs.instantiate(wl.capture.graph)
    graphs.launch(exe, driver.as_stream(None))
    driver.ctx_sync()
    graphs.exec_destroy(exe)
    got = wl.read()
    x = wl.initial["x"]
    assert got["z"].tobytes() == (np.float32(3.0) * (np.float32(2.0) * x)).tobytes()


def test_bisect_of_the_saved_file_matches(traced):
    proc = cli("bisect", str(traced["path"]))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "every step matches the recorded trace" in proc.stdout


def test_bisect_names_the_altered_middle_node(traced, tmp_path):
    snap = traced["snap"]
    middle = snap.graphs[0].topological_order()[1]
    assert snap.kernels[middle.kernel].name == "scale"

    def change_scalar(m, blobs):
        def edit(params):
            assert struct.unpack_from("<f", params, 16)[0] == 3.0
            params[16:20] = struct.pack("<f", 3.5)
        edit_kernel_params(m, 0, middle.id, edit)
    bad = rewrite(traced["path"], tmp_path / "bad.cgsnap", change_scalar)
    proc = cli("bisect", str(bad), "--json")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    d = json.loads(proc.stdout)
    g, = d["graphs"]
    first = g["first_difference"]
    assert (first["step"], first["node"], first["kernel"]) == (1, middle.id, "scale"), first
    z_id = region_id(snap, "z")
    region = next(r for r in first["regions"] if r["region"] == z_id)
    assert region["expected_known"] and region["same_when_run_again"]
    got = np.float32(3.5) * traced["y"]
    assert region["first_index"] == int(np.flatnonzero(
        traced["z"].view(np.uint32) != got.view(np.uint32))[0])
    k = region["values"]["index"]
    fmt = lambda arr: [f"{float(v):.6g}" for v in arr[k:k + 8]]  # noqa: E731
    assert region["values"]["before"] == fmt(traced["initial"]["z"])
    assert region["values"]["expected"] == fmt(traced["z"])
    assert region["values"]["got"] == fmt(got)
    text = cli("bisect", str(bad)).stdout
    assert f"FIRST DIFFERENCE at step 1: node {middle.id}, kernel scale" in text
    assert 'region' in text and '"z"' in text and "expected" in text


def test_extract_one_node_reproduces_it_in_a_fresh_process(traced, tmp_path):
    snap = traced["snap"]
    middle = snap.graphs[0].topological_order()[1]
    out = tmp_path / "middle.cgsnap"
    proc = cli("extract", str(traced["path"]), "--node", str(middle.id), "-o", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    small = cgsnap.read(out)
    g = small.graphs[0]
    assert [n.id for n in g.nodes] == [middle.id]
    assert [k.name for k in small.kernels] == ["scale"]
    assert sorted(r.name for r in small.regions if r.name) == ["y", "z"]
    assert small.meta["extracted_from"]["expected_from"] == "trace"
    with fileformat.open_file(out) as f:
        y_in = np.frombuffer(f.blob(small.region_by_name("y").data), np.float32)
        z_expected = np.frombuffer(f.blob(g.checks[small.region_by_name("z").id]), np.float32)
    # Its input is y as the first node left it; its recorded output is z as the node left it
    # in the original graph (the last node does not touch z).
    assert y_in.tobytes() == traced["y"].tobytes()
    assert z_expected.tobytes() == traced["z"].tobytes()
    check = cli("replay", str(out), "--check")
    assert check.returncode == 0 and "PASS" in check.stdout, check.stdout + check.stderr
    # A fresh-process restore of the small file computes the node's output bit for bit.
    inputs, result = tmp_path / "in.npz", tmp_path / "out.npz"
    np.savez(inputs)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    worker = subprocess.run([sys.executable, os.path.join(HERE, "restore_worker.py"), str(out),
                             str(inputs), "z", str(result), "g"], capture_output=True, text=True,
                            env=env, timeout=300)
    assert worker.returncode == 0, worker.stdout + worker.stderr
    with np.load(result) as r:
        assert r["z"].view(np.uint8).tobytes() == traced["z"].tobytes()


def test_bisect_and_check_of_a_graph_with_copies_sets_and_a_child_graph(tmp_path):
    """Every runnable node type on its own (2D copy, memset, child graph, template kernel, a
    struct argument): the node-by-node end state equals the whole graph's; bisect matches."""
    from workloads import BindingsGraph
    wl = BindingsGraph()
    snap = cgsnap.snapshot(wl.capture, buffers=wl.buffers, name="bindings", trace=True)
    assert "trace_notes" not in snap.meta, snap.meta.get("trace_notes")
    path = tmp_path / "bindings.cgsnap"
    snap.save(path)
    proc = cli("bisect", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = cli("replay", str(path), "--check")
    assert proc.returncode == 0 and "PASS" in proc.stdout, proc.stdout + proc.stderr


def test_sanitize_names_the_node_of_a_planted_out_of_bounds_write(tmp_path):
    from cgsnap.tools.sanitize import find_sanitizer
    if find_sanitizer() is None:
        pytest.skip("compute-sanitizer is not installed here")
    wl = Chain(oob=True)
    # The faulty kernel never runs in this process: no outputs recorded, no trace.
    snap = cgsnap.snapshot(wl.capture, buffers=wl.buffers, name="g", record_outputs=False)
    path = tmp_path / "oob.cgsnap"
    snap.save(path)
    oob_node = next(n for n in snap.graphs[0].nodes if n.TYPE == "kernel" and
                    snap.kernels[n.kernel].name == "oob_write")
    proc = cli("replay", str(path), "--sanitize", "--json")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    d = json.loads(proc.stdout)
    writes = [f for f in d["findings"] if f["what"].startswith("Invalid __global__ write")]
    assert writes, proc.stdout
    assert writes[0]["nodes"] == [{"graph": "g", "node": oob_node.id, "kernel": "oob_write"}]
    text = cli("replay", str(path), "--sanitize").stdout
    assert f"node {oob_node.id} of graph 'g', kernel oob_write: Invalid __global__ write" in text


def test_sanitize_of_a_clean_file_finds_nothing(traced):
    from cgsnap.tools.sanitize import find_sanitizer
    if find_sanitizer() is None:
        pytest.skip("compute-sanitizer is not installed here")
    proc = cli("replay", str(traced["path"]), "--sanitize")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ": 0 finding(s)" in proc.stdout
