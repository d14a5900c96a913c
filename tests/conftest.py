import functools
import os

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
    reason = gpu_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"needs a GPU ({reason})")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
