"""A kernel node whose module was unloaded after capture (a cuFFT plan freed while the graph
still names its kernel: seen on the H200 with CuPy) is refused with a CaptureError naming the
node, not a bare driver error (CPU: the driver answers are stubbed)."""
import pytest

from cgsnap.capture import record
from cgsnap.errors import CaptureError, DriverError


class _Params:
    func, kern = 0x1D902BF0, 0


def _recording(monkeypatch, func_name):
    rec = object.__new__(record.Recording)
    rec.kernel_by_func = {}
    monkeypatch.setattr(record.graphs, "read_kernel", lambda n: _Params())
    monkeypatch.setattr(record.driver, "func_name", func_name)

    def unreachable(*a, **k):
        raise AssertionError("kernel_for must not run for an invalid handle")
    monkeypatch.setattr(rec, "kernel_for", unreachable, raising=False)
    return rec


def test_an_unloaded_kernel_is_named_with_the_reason(monkeypatch):
    def invalid(func):
        raise DriverError("cuFuncGetName", 400, "CUDA_ERROR_INVALID_HANDLE", "invalid resource handle")
    rec = _recording(monkeypatch, invalid)
    with pytest.raises(CaptureError, match=r"graphs\[0\]\.nodes\[0\]: the kernel's function "
                                           r"handle 0x1d902bf0 is no longer valid.*unloaded"):
        rec.kernel_node(0, object(), "graphs[0].nodes[0]")


def test_other_driver_errors_pass_through(monkeypatch):
    def other(func):
        raise DriverError("cuFuncGetName", 999, "CUDA_ERROR_UNKNOWN")
    rec = _recording(monkeypatch, other)
    with pytest.raises(DriverError):
        rec.kernel_node(0, object(), "graphs[0].nodes[0]")


def test_a_node_the_driver_cannot_read_is_named(monkeypatch):
    rec = object.__new__(record.Recording)

    def failing(n):
        raise DriverError("cuGraphKernelNodeGetParams", 400, "CUDA_ERROR_INVALID_HANDLE")
    monkeypatch.setattr(record.graphs, "read_kernel", failing)
    with pytest.raises(CaptureError, match=r"graphs\[0\]\.nodes\[2\]: the driver could not read"):
        rec.kernel_node(2, object(), "graphs[0].nodes[2]")
