"""Conditional nodes (WHILE, IF/else, SWITCH, nested), stream memory operations between two
streams, and copies through a CUDA array: each graph is snapshotted with the recorder running,
restored in a fresh process (no torch), and replayed over several steps with fresh inputs; every
output of every step must equal, bit for bit, what the original graph gives on the same inputs.

Needs the recorder's conditional-node callbacks (cgsnap.kernels.graph_hooks) enabled by
cgsnap.start_recorder(), and the CUDA headers for NVRTC (cuda_device_runtime_api.h, for
cudaGraphSetConditional).
"""
from __future__ import annotations

import ctypes
import glob
import os
import site
import subprocess
import sys

import numpy as np
import pytest

import cgsnap
from cgsnap.cuda import driver, nvrtc
from cgsnap.cuda.driver import call, cu

pytestmark = pytest.mark.gpu
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N = 1024
NT = cu.CUgraphNodeType
COND = {"if": cu.CUgraphConditionalNodeType.CU_GRAPH_COND_TYPE_IF,
        "while": cu.CUgraphConditionalNodeType.CU_GRAPH_COND_TYPE_WHILE,
        "switch": cu.CUgraphConditionalNodeType.CU_GRAPH_COND_TYPE_SWITCH}
ASSIGN_DEFAULT = cu.CU_GRAPH_COND_ASSIGN_DEFAULT

SOURCE = r"""
#include <cuda_device_runtime_api.h>
extern "C" __global__ void cgt_set(cudaGraphConditionalHandle h, const unsigned* v) {
    cudaGraphSetConditional(h, *v);
}
extern "C" __global__ void cgt_accum(float* acc, const unsigned* ctr, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) acc[i] = acc[i] * 0.5f + (float)(*ctr) + 0.25f * (float)i;
}
extern "C" __global__ void cgt_count(cudaGraphConditionalHandle h, unsigned* ctr,
                                     const unsigned* limit) {
    unsigned c = ++*ctr;
    cudaGraphSetConditional(h, c < *limit);     // the body decides whether it runs again
}
extern "C" __global__ void cgt_affine(const float* x, float* y, float a, float b, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i] * a + b;
}
"""
KERNELS = ("cgt_set", "cgt_accum", "cgt_count", "cgt_affine")
TEX_SOURCE = r"""
extern "C" __global__ void cgt_tex(cudaTextureObject_t t, float* out, int w) {
    int i = threadIdx.x;
    if (i < w) out[i] = tex2D<float>(t, i + 0.5f, 0.5f);
}
"""

WORKER = r"""
import sys, numpy as np, cgsnap
path, graph, steps_path, outputs, result = sys.argv[1:6]
steps = np.load(steps_path)
out = {}
with cgsnap.load(path) as r:
    for i in range(int(steps["count"])):
        for key in steps.files:
            if key.startswith(f"{i}:"):
                r.buffer(key.split(":", 1)[1]).copy_from(steps[key])
        r.graph(graph).launch()
        r.synchronize()
        for name in outputs.split(","):
            out[f"{i}:{name}"] = r.buffer(name).to_numpy()
np.savez(result, **out)
assert "torch" not in sys.modules and "cupy" not in sys.modules, "the restore imported a framework"
print("worker ok")
"""


def _include_dirs() -> list:
    dirs = []
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    dirs.append(os.path.join(home, "include"))
    for root in site.getsitepackages() + [site.getusersitepackages()]:
        dirs += glob.glob(os.path.join(root, "nvidia", "cuda_runtime", "include"))
        dirs += glob.glob(os.path.join(root, "nvidia", "cu*", "include"))
    return [d for d in dirs if os.path.exists(os.path.join(d, "cuda_device_runtime_api.h"))]


class Kit:
    """Device, kernels, allocations and graph-building helpers for one test."""

    def __init__(self, source: str = SOURCE, kernels=KERNELS):
        cgsnap.start_recorder()
        self.dev = driver.init(0)
        includes = _include_dirs()
        if not includes:
            pytest.skip("no cuda_device_runtime_api.h (CUDA headers) for NVRTC")
        cubin, _ = nvrtc.compile_cubin(source, self.dev.arch, "node_types.cu",
                                       options=[f"-I{includes[0]}"])
        self.lib = driver.library_load(cubin)
        self.f = {k: driver.library_function(self.lib, k) for k in kernels}
        self.ctx = self.dev.context
        self.keep, self.ptrs, self.graphs = [], [], []

    def alloc(self, nbytes: int) -> int:
        ptr = driver.mem_alloc(nbytes)
        driver.memset_d8(ptr, 0, nbytes)
        self.ptrs.append(ptr)
        return ptr

    def graph(self):
        g = call(cu.cuGraphCreate, 0)
        self.graphs.append(g)
        return g

    def handle(self, graph, default: int = 0, flags: int = 0):
        return call(cu.cuGraphConditionalHandleCreate, graph, self.ctx, default, flags)

    def kernel(self, graph, deps, name, *args, grid=1, block=1):
        holders = [a if isinstance(a, (ctypes._SimpleCData, ctypes.Structure))
                   else ctypes.c_uint64(int(a)) for a in args]
        array = (ctypes.c_void_p * len(holders))(*[ctypes.addressof(h) for h in holders])
        self.keep += [holders, array]
        p = cu.CUgraphNodeParams()
        p.type = NT.CU_GRAPH_NODE_TYPE_KERNEL
        k = p.kernel
        k.func = self.f[name]
        k.gridDimX, k.gridDimY, k.gridDimZ = grid, 1, 1
        k.blockDimX, k.blockDimY, k.blockDimZ = block, 1, 1
        k.kernelParams = ctypes.addressof(array)
        return call(cu.cuGraphAddNode, graph, list(deps) or None, None, len(deps), p)

    def launch(self, stream, name, *args, grid=1, block=1):
        """cuLaunchKernel (on a capturing stream: becomes a kernel node)."""
        holders = [a if isinstance(a, (ctypes._SimpleCData, ctypes.Structure))
                   else ctypes.c_uint64(int(a)) for a in args]
        array = (ctypes.c_void_p * len(holders))(*[ctypes.addressof(h) for h in holders])
        call(cu.cuLaunchKernel, self.f[name], grid, 1, 1, block, 1, 1, 0, stream,
             ctypes.addressof(array), 0)

    def launch_affine(self, stream, x, y, a, b):
        self.launch(stream, "cgt_affine", x, y, ctypes.c_float(a), ctypes.c_float(b),
                    ctypes.c_int(N), grid=N // 256, block=256)

    def affine(self, graph, deps, x, y, a, b):
        return self.kernel(graph, deps, "cgt_affine", x, y, ctypes.c_float(a), ctypes.c_float(b),
                           ctypes.c_int(N), grid=N // 256, block=256)

    def conditional(self, graph, deps, handle, kind: str, size: int):
        p = cu.CUgraphNodeParams()
        p.type = NT.CU_GRAPH_NODE_TYPE_CONDITIONAL
        c = p.conditional
        c.handle, c.type, c.size, c.ctx = handle, COND[kind], size, self.ctx
        node = call(cu.cuGraphAddNode, graph, list(deps) or None, None, len(deps), p)
        return node, list(p.conditional.phGraph_out)

    def memset32(self, graph, deps, ptr, value, count):
        m = cu.CUDA_MEMSET_NODE_PARAMS()
        m.dst, m.value, m.elementSize, m.width, m.height, m.pitch = ptr, value, 4, count, 1, 0
        return call(cu.cuGraphAddMemsetNode, graph, list(deps), len(deps), m, self.ctx)

    def close(self):
        driver.ctx_sync()
        for g in self.graphs:
            call(cu.cuGraphDestroy, g)
        for p in self.ptrs:
            driver.mem_free(p)
        driver.library_unload(self.lib)


def _run_original(graph, buffers: dict, steps: list, outputs: list) -> dict:
    exe = call(cu.cuGraphInstantiate, graph, 0)
    out = {}
    try:
        for i, inputs in enumerate(steps):
            for name, data in inputs.items():
                driver.htod(buffers[name][0], data, data.nbytes)
            call(cu.cuGraphLaunch, exe, cu.CUstream(0))
            driver.ctx_sync()
            for name in outputs:
                ptr, nbytes = buffers[name]
                host = np.empty(nbytes, dtype=np.uint8)
                driver.dtoh(host, ptr, nbytes)
                out[f"{i}:{name}"] = host
    finally:
        call(cu.cuGraphExecDestroy, exe)
    return out


def _run_restored(tmp_path, snap, steps: list, outputs: list) -> dict:
    path = tmp_path / f"{snap.meta['name']}.cgsnap"
    snap.save(path)
    packed = {"count": np.array(len(steps))}
    for i, inputs in enumerate(steps):
        packed.update({f"{i}:{k}": v for k, v in inputs.items()})
    np.savez(tmp_path / "steps.npz", **packed)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("CGSNAP_RECORD", None)
    proc = subprocess.run([sys.executable, "-c", WORKER, str(path), snap.graphs[0].name,
                           str(tmp_path / "steps.npz"), ",".join(outputs),
                           str(tmp_path / "result.npz")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "worker ok" in proc.stdout, proc.stdout + proc.stderr
    got = np.load(tmp_path / "result.npz")
    return {k: got[k] for k in got.files}


def _check(tmp_path, snap, graph, buffers, steps, outputs) -> dict:
    """Restore in a fresh process and replay; compare every step's outputs bit for bit."""
    got = _run_restored(tmp_path, snap, steps, outputs)
    want = _run_original(graph, buffers, steps, outputs)
    assert sorted(got) == sorted(want)
    for key in want:
        assert np.array_equal(got[key].view(np.uint8), want[key]), \
            f"{key}: the restored graph's output differs from the original's"
    return want


def _f32(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def _u32(*v) -> np.ndarray:
    return np.array(v, dtype=np.uint32)


def _conditionals(snap) -> list:
    return [n for g in snap.graphs for n in g.nodes if n.TYPE == "conditional"]


def _handle_args(snap) -> int:
    return sum(len(n.handle_refs()) for g in snap.graphs for n in g.nodes if n.TYPE == "kernel")


# ---- WHILE: the body counts to N and decides -----------------------------------------------------

def test_while_loop_runs_until_the_body_stops_it(tmp_path):
    kit = Kit()
    try:
        acc, ctr, limit = kit.alloc(4 * N), kit.alloc(4), kit.alloc(4)
        g = kit.graph()
        h = kit.handle(g, 1, ASSIGN_DEFAULT)                 # the body runs at least once
        reset = kit.memset32(g, [], ctr, 0, 1)
        _, (body,) = kit.conditional(g, [reset], h, "while", 1)
        step = kit.kernel(body, [], "cgt_accum", acc, ctr, ctypes.c_int(N), grid=N // 256,
                          block=256)
        kit.kernel(body, [step], "cgt_count", h, ctr, limit)
        buffers = {"acc": (acc, 4 * N), "ctr": (ctr, 4), "limit": (limit, 4)}
        driver.htod(limit, _u32(3), 4)
        snap = cgsnap.snapshot(g, buffers=buffers, name="while")
        cond, = _conditionals(snap)
        assert (cond.kind, cond.default, cond.flags, cond.exact) == ("while", 1, 1, False)
        assert _handle_args(snap) == 1, "the handle argument of cgt_count was not found"
        rng = np.random.default_rng(5)
        steps = [{"acc": _f32(rng.standard_normal(N)), "limit": _u32(n)} for n in (3, 5, 1)]
        want = _check(tmp_path, snap, g, buffers, steps, ["acc", "ctr"])
        for i, n in enumerate((3, 5, 1)):        # the loop ran exactly N times
            assert want[f"{i}:ctr"].view(np.uint32)[0] == n
    finally:
        kit.close()


# ---- IF with an else branch, both taken ------------------------------------------------------------

def test_if_else_takes_both_branches_from_device_data(tmp_path):
    kit = Kit()
    try:
        x, y, pred = kit.alloc(4 * N), kit.alloc(4 * N), kit.alloc(4)
        g = kit.graph()
        h = kit.handle(g)
        setter = kit.kernel(g, [], "cgt_set", h, pred)
        _, (then, else_) = kit.conditional(g, [setter], h, "if", 2)
        kit.affine(then, [], x, y, 2.0, 0.0)
        kit.affine(else_, [], x, y, 1.0, 1.0)
        buffers = {"x": (x, 4 * N), "y": (y, 4 * N), "pred": (pred, 4)}
        snap = cgsnap.snapshot(g, buffers=buffers, name="ifelse")
        cond, = _conditionals(snap)
        assert cond.kind == "if" and len(cond.bodies) == 2 and not cond.exact
        rng = np.random.default_rng(6)
        xs = [_f32(rng.standard_normal(N)) for _ in range(3)]
        steps = [{"x": xs[0], "pred": _u32(1)}, {"x": xs[1], "pred": _u32(0)},
                 {"x": xs[2], "pred": _u32(7)}]
        want = _check(tmp_path, snap, g, buffers, steps, ["y"])
        assert np.array_equal(want["0:y"].view(np.float32), xs[0] * np.float32(2))
        assert np.array_equal(want["1:y"].view(np.float32), xs[1] + np.float32(1))
        assert np.array_equal(want["2:y"].view(np.float32), xs[2] * np.float32(2))
    finally:
        kit.close()


# ---- SWITCH with three cases --------------------------------------------------------------------

def test_switch_runs_the_case_the_device_chose(tmp_path):
    kit = Kit()
    try:
        x, y, sel = kit.alloc(4 * N), kit.alloc(4 * N), kit.alloc(4)
        g = kit.graph()
        h = kit.handle(g)
        setter = kit.kernel(g, [], "cgt_set", h, sel)
        _, cases = kit.conditional(g, [setter], h, "switch", 3)
        for k, body in enumerate(cases):
            kit.affine(body, [], x, y, float(k + 2), float(-k))
        buffers = {"x": (x, 4 * N), "y": (y, 4 * N), "sel": (sel, 4)}
        snap = cgsnap.snapshot(g, buffers=buffers, name="switch")
        cond, = _conditionals(snap)
        assert cond.kind == "switch" and len(cond.bodies) == 3
        rng = np.random.default_rng(7)
        x0 = _f32(rng.standard_normal(N))
        y0 = _f32(np.full(N, -3.5))
        steps = [{"x": x0, "y": y0, "sel": _u32(k)} for k in (2, 0, 1, 3)]
        want = _check(tmp_path, snap, g, buffers, steps, ["y"])
        assert np.array_equal(want["0:y"].view(np.float32), x0 * np.float32(4) - np.float32(2))
        assert np.array_equal(want["3:y"].view(np.float32), y0)      # no case 3: y untouched
    finally:
        kit.close()


# ---- nested conditionals --------------------------------------------------------------------------

def test_nested_conditionals(tmp_path):
    """IF (handle of the top graph) whose then-body holds a WHILE loop whose handle is also the
    top graph's, and whose else-body holds a SWITCH whose handle was made for the else-body."""
    kit = Kit()
    try:
        x, y, acc = kit.alloc(4 * N), kit.alloc(4 * N), kit.alloc(4 * N)
        pred, sel, ctr, limit = kit.alloc(4), kit.alloc(4), kit.alloc(4), kit.alloc(4)
        g = kit.graph()
        h_if = kit.handle(g)
        h_while = kit.handle(g, 1, ASSIGN_DEFAULT)
        setter = kit.kernel(g, [], "cgt_set", h_if, pred)
        _, (then, else_) = kit.conditional(g, [setter], h_if, "if", 2)
        reset = kit.memset32(then, [], ctr, 0, 1)
        _, (loop,) = kit.conditional(then, [reset], h_while, "while", 1)
        step = kit.kernel(loop, [], "cgt_accum", acc, ctr, ctypes.c_int(N), grid=N // 256,
                          block=256)
        kit.kernel(loop, [step], "cgt_count", h_while, ctr, limit)
        h_switch = kit.handle(else_)
        choose = kit.kernel(else_, [], "cgt_set", h_switch, sel)
        _, (case0, case1) = kit.conditional(else_, [choose], h_switch, "switch", 2)
        kit.affine(case0, [], x, y, 3.0, 0.0)
        kit.affine(case1, [], x, y, -1.0, 2.0)
        buffers = {"x": (x, 4 * N), "y": (y, 4 * N), "acc": (acc, 4 * N), "pred": (pred, 4),
                   "sel": (sel, 4), "ctr": (ctr, 4), "limit": (limit, 4)}
        snap = cgsnap.snapshot(g, buffers=buffers, name="nested")
        conds = {n.kind: n for n in _conditionals(snap)}
        assert sorted(conds) == ["if", "switch", "while"]
        assert conds["while"].handle_graph == "nested"           # made for an ancestor graph
        assert conds["switch"].handle_graph == conds["if"].bodies[1]
        # Whether a body's handles are numbered after its parent's or from 1 again is the
        # driver's choice; if the else-body's handle has the value of the IF's, the setter's
        # argument there is ambiguous and both handles must keep their values exactly.
        if conds["switch"].value == conds["if"].value:
            assert _handle_args(snap) == 2 and conds["switch"].exact and conds["if"].exact
        else:
            assert _handle_args(snap) == 3 and not any(n.exact for n in conds.values())
        rng = np.random.default_rng(8)

        def inputs(p, s, n):
            return {"x": _f32(rng.standard_normal(N)), "acc": _f32(rng.standard_normal(N)),
                    "y": _f32(np.zeros(N)), "pred": _u32(p), "sel": _u32(s), "limit": _u32(n)}
        steps = [inputs(1, 0, 4), inputs(0, 0, 4), inputs(0, 1, 4), inputs(1, 1, 2)]
        want = _check(tmp_path, snap, g, buffers, steps, ["y", "acc", "ctr"])
        assert want["0:ctr"].view(np.uint32)[0] == 4 and want["3:ctr"].view(np.uint32)[0] == 2
        assert np.array_equal(want["1:y"].view(np.float32), steps[1]["x"] * np.float32(3))
    finally:
        kit.close()


# ---- the pattern of frameworks: a conditional added during stream capture -----------------------

def test_if_node_added_during_stream_capture_with_a_captured_body(tmp_path):
    """What torch's CUDAGraph.begin_capture_to_if_node does: the handle is made for the graph
    being captured (cuStreamGetCaptureInfo), the setter kernel is captured, the IF node is added
    explicitly, and its body is captured from another stream (cuStreamBeginCaptureToGraph)."""
    kit = Kit()
    try:
        x, y, z, pred = kit.alloc(4 * N), kit.alloc(4 * N), kit.alloc(4 * N), kit.alloc(4)
        s, s2 = driver.stream_create(), driver.stream_create()
        relaxed = cu.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_RELAXED
        with cgsnap.capture(stream=s, mode="relaxed") as cap:
            _, _, graph, deps, edges, ndeps = call(cu.cuStreamGetCaptureInfo, s)
            h = kit.handle(graph)
            kit.launch(s, "cgt_set", h, pred)
            _, _, graph, deps, edges, ndeps = call(cu.cuStreamGetCaptureInfo, s)
            p = cu.CUgraphNodeParams()
            p.type = NT.CU_GRAPH_NODE_TYPE_CONDITIONAL
            c = p.conditional
            c.handle, c.type, c.size, c.ctx = h, COND["if"], 1, kit.ctx
            node = call(cu.cuGraphAddNode, graph, deps, edges, ndeps, p)
            body = p.conditional.phGraph_out[0]
            call(cu.cuStreamUpdateCaptureDependencies, s, [node], None, 1,
                 cu.CUstreamUpdateCaptureDependencies_flags.CU_STREAM_SET_CAPTURE_DEPENDENCIES)
            call(cu.cuStreamBeginCaptureToGraph, s2, body, None, None, 0, relaxed)
            kit.launch_affine(s2, x, y, 2.0, 0.0)
            call(cu.cuStreamEndCapture, s2)
            kit.launch_affine(s, y, z, 1.0, 1.0)                 # after the IF node
        buffers = {"x": (x, 4 * N), "y": (y, 4 * N), "z": (z, 4 * N), "pred": (pred, 4)}
        snap = cgsnap.snapshot(cap, buffers=buffers, name="captured_if")
        cond, = _conditionals(snap)
        assert cond.kind == "if" and not cond.exact and _handle_args(snap) == 1
        rng = np.random.default_rng(11)
        steps = [{"x": _f32(rng.standard_normal(N)), "y": _f32(np.full(N, 0.75)),
                  "pred": _u32(p)} for p in (1, 0, 1)]
        want = _check(tmp_path, snap, cap.graph, buffers, steps, ["y", "z"])
        assert np.array_equal(want["1:y"].view(np.float32), steps[1]["y"])   # body skipped
        cap.close()
    finally:
        kit.close()


# ---- a conditional the recorder did not see ------------------------------------------------------

UNRECORDED = r"""
import cgsnap
from cgsnap.cuda import driver
from cgsnap.cuda.driver import call, cu
dev = driver.init(0)
g = call(cu.cuGraphCreate, 0)
h = call(cu.cuGraphConditionalHandleCreate, g, dev.context, 1, cu.CU_GRAPH_COND_ASSIGN_DEFAULT)
p = cu.CUgraphNodeParams()
p.type = cu.CUgraphNodeType.CU_GRAPH_NODE_TYPE_CONDITIONAL
p.conditional.handle, p.conditional.size, p.conditional.ctx = h, 1, dev.context
p.conditional.type = cu.CUgraphConditionalNodeType.CU_GRAPH_COND_TYPE_IF
call(cu.cuGraphAddNode, g, None, None, 0, p)
try:
    cgsnap.snapshot(g, name="unseen")
except cgsnap.UnsupportedNodeError as exc:
    print("REFUSED", exc)
print("DRIVER", driver.version_text(dev.driver_version))
"""


def test_a_conditional_made_without_the_recorder_is_refused_naming_the_driver():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("CGSNAP_RECORD", None)
    proc = subprocess.run([sys.executable, "-c", UNRECORDED], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    refused = [line for line in proc.stdout.splitlines() if line.startswith("REFUSED")]
    version = proc.stdout.split("DRIVER ", 1)[1].strip()
    assert refused, proc.stdout
    assert "graph 'unseen' node 0 (conditional)" in refused[0]
    assert "cgsnap.start_recorder()" in refused[0]
    if int(version.split(".")[0]) * 1000 + int(version.split(".")[1]) * 10 < 13020:
        assert f"this driver is {version}" in refused[0]
    else:        # a driver that reads type and bodies back still has no default value
        assert "default value and flags" in refused[0]


# ---- stream memory operations between two streams ----------------------------------------------

def test_wait_and_write_value_nodes_between_two_streams(tmp_path):
    kit = Kit()
    try:
        x, data, out, flags = kit.alloc(4 * N), kit.alloc(4 * N), kit.alloc(4 * N), kit.alloc(16)
        s1, s2 = driver.stream_create(), driver.stream_create()
        fork, join = call(cu.cuEventCreate, 0), call(cu.cuEventCreate, 0)
        launch = kit.launch_affine
        with cgsnap.capture(stream=s1) as cap:
            launch(s1, x, data, 3.0, 0.5)                               # produce on s1
            call(cu.cuStreamWriteValue32, s1, flags, 7, 0)               # then publish
            call(cu.cuEventRecord, fork, s1)
            call(cu.cuStreamWaitEvent, s2, fork, 0)
            call(cu.cuStreamWaitValue32, s2, flags, 7, 1)                # s2 waits: EQ
            launch(s2, data, out, 0.5, 1.0)                              # consume on s2
            call(cu.cuStreamWriteValue64, s2, flags + 8, 0x1122334455, 0)
            call(cu.cuEventRecord, join, s2)
            call(cu.cuStreamWaitEvent, s1, join, 0)
        buffers = {"x": (x, 4 * N), "out": (out, 4 * N), "flags": (flags, 16)}
        snap = cgsnap.snapshot(cap, buffers=buffers, name="memops")
        ops = [op for n in snap.graphs[0].nodes if n.TYPE == "batch_mem_op" for op in n.ops]
        assert sorted(op.op for op in ops) == ["wait32", "write32", "write64"], ops
        assert all(snap.regions[op.addr.region].name == "flags" for op in ops)
        rng = np.random.default_rng(9)
        steps = [{"x": _f32(rng.standard_normal(N)), "flags": np.zeros(4, np.uint32)}
                 for _ in range(3)]
        want = _check(tmp_path, snap, cap.graph, buffers, steps, ["out", "flags"])
        assert want["2:flags"].view(np.uint32)[0] == 7
        assert want["2:flags"].view(np.uint64)[1] == 0x1122334455
        cap.close()
        for ev in (fork, join):
            call(cu.cuEventDestroy, ev)
    finally:
        kit.close()


# ---- copies through a CUDA array, and textures -----------------------------------------------------

def _array(width: int, height: int):
    d = cu.CUDA_ARRAY3D_DESCRIPTOR()
    d.Width, d.Height, d.Depth = width, height, 0
    d.Format, d.NumChannels, d.Flags = cu.CUarray_format.CU_AD_FORMAT_FLOAT, 1, 0
    return call(cu.cuArray3DCreate, d)


def _copy3d(stream=None, **fields):
    p = cu.CUDA_MEMCPY3D()
    for k, v in fields.items():
        setattr(p, k, v)
    p.Depth = 1
    if stream is None:
        call(cu.cuMemcpy3D, p)
    else:
        call(cu.cuMemcpy3DAsync, p, stream)


DEV, ARR, HOST = (cu.CUmemorytype.CU_MEMORYTYPE_DEVICE, cu.CUmemorytype.CU_MEMORYTYPE_ARRAY,
                  cu.CUmemorytype.CU_MEMORYTYPE_HOST)


def test_copies_through_a_cuda_array_keep_its_contents(tmp_path):
    """Rows 0-3 of a 32 x 8 float array are written from device memory, then the box of
    columns 4-19, rows 2-5 is copied out: rows 4-5 come from what the array held at save
    time, which the restore must recreate."""
    kit = Kit()
    arr = _array(32, 8)
    try:
        src, dst = kit.alloc(4 * 32 * 4), kit.alloc(4 * 16 * 4)
        pattern = _f32(np.arange(32 * 8) * 0.5 - 17)
        _copy3d(srcMemoryType=HOST, srcHost=pattern.ctypes.data, srcPitch=128,
                dstMemoryType=ARR, dstArray=arr, WidthInBytes=128, Height=8)
        s = driver.stream_create()
        with cgsnap.capture(stream=s) as cap:
            _copy3d(s, srcMemoryType=DEV, srcDevice=src, srcPitch=128, dstMemoryType=ARR,
                    dstArray=arr, WidthInBytes=128, Height=4)
            _copy3d(s, srcMemoryType=ARR, srcArray=arr, srcXInBytes=16, srcY=2,
                    dstMemoryType=DEV, dstDevice=dst, dstPitch=64, WidthInBytes=64, Height=4)
        buffers = {"src": (src, 4 * 32 * 4), "dst": (dst, 4 * 16 * 4)}
        snap = cgsnap.snapshot(cap, buffers=buffers, name="arraycopy")
        arrays = [r for r in snap.regions if r.kind.value == "array"]
        assert len(arrays) == 1 and arrays[0].array.row_bytes == 128 and arrays[0].size == 1024
        rng = np.random.default_rng(10)
        steps = [{"src": _f32(rng.standard_normal(128))} for _ in range(2)]
        want = _check(tmp_path, snap, cap.graph, buffers, steps, ["dst"])
        got = want["1:dst"].view(np.float32).reshape(4, 16)
        assert np.array_equal(got[:2], steps[1]["src"].reshape(4, 32)[2:4, 4:20])
        assert np.array_equal(got[2:], pattern.reshape(8, 32)[4:6, 4:20])
        cap.close()
    finally:
        call(cu.cuArrayDestroy, arr)
        kit.close()


def test_a_texture_read_through_a_cuda_array_is_refused_by_name():
    """Texture objects are process-local indices: a kernel argument holding one is refused
    (typed, naming the node and the object), never carried as a stale integer."""
    kit = Kit(TEX_SOURCE, ("cgt_tex",))
    arr = _array(32, 8)
    tex = None
    try:
        out, src = kit.alloc(4 * 32), kit.alloc(4 * 32 * 8)
        rd = cu.CUDA_RESOURCE_DESC()
        rd.resType = cu.CUresourcetype.CU_RESOURCE_TYPE_ARRAY
        rd.res.array.hArray = arr
        td = cu.CUDA_TEXTURE_DESC()
        td.addressMode = [cu.CUaddress_mode.CU_TR_ADDRESS_MODE_CLAMP] * 3
        td.filterMode = cu.CUfilter_mode.CU_TR_FILTER_MODE_POINT
        tex = call(cu.cuTexObjectCreate, rd, td, None)
        s = driver.stream_create()
        with cgsnap.capture(stream=s) as cap:
            _copy3d(s, srcMemoryType=DEV, srcDevice=src, srcPitch=128, dstMemoryType=ARR,
                    dstArray=arr, WidthInBytes=128, Height=8)
            args = [ctypes.c_uint64(int(tex)), ctypes.c_uint64(out), ctypes.c_int(32)]
            ptrs = (ctypes.c_void_p * 3)(*[ctypes.addressof(a) for a in args])
            call(cu.cuLaunchKernel, kit.f["cgt_tex"], 1, 1, 1, 32, 1, 1, 0, s,
                 ctypes.addressof(ptrs), 0)
        with pytest.raises(cgsnap.UnsupportedNodeError,
                           match=r"node \d+ \(kernel cgt_tex\): argument 0 holds 0x[0-9a-f]+, "
                                 r"the value of a live texture object over array memory"):
            cgsnap.snapshot(cap, buffers={"out": (out, 4 * 32)}, name="texture")
        cap.close()
    finally:
        if tex is not None:
            call(cu.cuTexObjectDestroy, tex)
        call(cu.cuArrayDestroy, arr)
        kit.close()
