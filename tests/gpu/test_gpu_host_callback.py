"""Host-callback nodes travel by name and call a Python callable in the restoring process."""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import numpy as np
import pytest

import cgsnap
from cgsnap.cuda import driver
from cgsnap.cuda.driver import call, cu

pytestmark = pytest.mark.gpu
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RESTORE = r"""
import sys, numpy as np, cgsnap
calls = []
try:
    cgsnap.load(sys.argv[1])
except cgsnap.RestoreError as exc:
    assert "tick" in str(exc), exc
    print("refused without the callback")
with cgsnap.load(sys.argv[1], host_callbacks={"tick": lambda: calls.append(1)}) as r:
    for _ in range(3):
        r.graph("cb").launch()
    r.synchronize()
    np.save(sys.argv[2], r.buffer("y").to_numpy())
print("calls", len(calls))
"""


def test_host_callback_restored_by_name(tmp_path):
    cgsnap.start_recorder()
    from workloads import KERNELS_CU, launch, nvrtc_compile
    dev = driver.init(0)
    cubin, add_name = nvrtc_compile(KERNELS_CU, dev.arch)
    lib = driver.library_load(cubin)
    add = driver.library_function(lib, add_name)
    n = 1024
    x, y = driver.mem_alloc(4 * n), driver.mem_alloc(4 * n)
    xs = np.random.default_rng(3).standard_normal(n, dtype=np.float32)
    driver.htod(x, xs, 4 * n)
    driver.htod(y, np.zeros(n, dtype=np.float32), 4 * n)
    seen = []
    tick = driver.HOST_FN(lambda _ud: seen.append(1))
    # libcuda's own cuLaunchHostFunc, as C/C++ code calls it: cuda-bindings' wrapper would put
    # its own trampoline into the node instead of this function.
    launch_host_func = ctypes.CDLL("libcuda.so.1").cuLaunchHostFunc
    launch_host_func.argtypes = [ctypes.c_void_p, driver.HOST_FN, ctypes.c_void_p]
    args = [ctypes.c_uint64(y), ctypes.c_uint64(x), ctypes.c_int(n)]
    with cgsnap.capture() as cap:
        launch(add, 4, 256, args, cap.stream)
        assert launch_host_func(int(cap.stream), tick, None) == 0
        launch(add, 4, 256, args, cap.stream)
    with pytest.raises(cgsnap.UnsupportedNodeError, match="host callback"):
        cgsnap.snapshot(cap, buffers={"x": (x, 4 * n), "y": (y, 4 * n)}, name="cb")
    snap = cgsnap.snapshot(cap, buffers={"x": (x, 4 * n), "y": (y, 4 * n)}, name="cb",
                           host_callbacks={"tick": tick}, record_outputs=False)
    assert snap.graphs[0].counts() == {"kernel": 2, "host": 1}
    path = tmp_path / "cb.cgsnap"
    snap.save(path)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", RESTORE, str(path), str(tmp_path / "y.npy")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "refused without the callback" in proc.stdout and "calls 3" in proc.stdout
    # Three launches from y = 0: y = 6 x, exactly as the original computes it.
    exe = call(cu.cuGraphInstantiate, cap.graph, 0)
    for _ in range(3):
        call(cu.cuGraphLaunch, exe, cu.CUstream(0))
    driver.ctx_sync()
    want = np.empty(n, dtype=np.float32)
    driver.dtoh(want, y, 4 * n)
    call(cu.cuGraphExecDestroy, exe)
    cap.close()
    for ptr in (x, y):
        driver.mem_free(ptr)
    driver.library_unload(lib)
    assert len(seen) == 3
    assert np.array_equal(np.load(tmp_path / "y.npy").view(np.float32), want)
