import functools
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


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
