import functools
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.lru_cache(maxsize=1)
def gpu_reason():
    """None if a CUDA GPU is usable, else why not."""
    try:
        from cuda.bindings import driver as cu
        err, = cu.cuInit(0)
        if err != cu.CUresult.CUDA_SUCCESS:
            return f"cuInit failed: {err}"
        err, n = cu.cuDeviceGetCount()
        if err != cu.CUresult.CUDA_SUCCESS or n == 0:
            return "no CUDA device"
        return None
    except Exception as exc:   # no driver library at all
        return f"no CUDA driver: {type(exc).__name__}"


def pytest_collection_modifyitems(config, items):
    if os.environ.get("CGSNAP_HEAVY") != "1":
        heavy = pytest.mark.skip(reason="moves gigabytes: set CGSNAP_HEAVY=1 to run")
        for item in items:
            if "heavy" in item.keywords:
                item.add_marker(heavy)
    reason = gpu_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"needs a GPU ({reason})")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class _Zygote:
    """tests/zygote.py, started once: ``measured("module:function", *args)`` runs the call in a
    fresh child process and returns how it ended with its peak RSS (MiB) and time (s)."""

    def __init__(self):
        import subprocess
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [ROOT, os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "zygote.py")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     cwd=ROOT, env=env)

    def __call__(self, call: str, *args, timeout: int = 30) -> dict:
        import json
        self.proc.stdin.write(json.dumps({"call": call, "args": list(args),
                                          "timeout": timeout}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the zygote died")
        return json.loads(line)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="session")
def measured():
    zygote = _Zygote()
    yield zygote
    zygote.close()
