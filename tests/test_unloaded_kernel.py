"""A kernel node whose module was unloaded after capture (a cuFFT plan freed while the graph
still names its kernel: seen on the H200 with CuPy) is refused with a CaptureError naming the
node, not a bare driver error (CPU: the driver answers are stubbed)."""
import pytest

from cgsnap.capture import record
from cgsnap.errors import CaptureError, DriverError


class _Params:
    func, kern = 0x1D902BF0, 0


def test_an_unloaded_kernel_is_named_with_the_reason(monkeypatch):
    rec = object.__new__(record.Recording)
    monkeypatch.setattr(record.graphs, "read_kernel", lambda n: _Params())

    def invalid(func, kern=None):
        raise DriverError("cuFuncGetName", 400, "CUDA_ERROR_INVALID_HANDLE", "invalid resource handle")
    monkeypatch.setattr(rec, "kernel_for", invalid, raising=False)
    with pytest.raises(CaptureError, match=r"graphs\[0\]\.nodes\[0\]: the kernel's function "
                                           r"handle 0x1d902bf0 is no longer valid.*unloaded"):
        rec.kernel_node(0, object(), "graphs[0].nodes[0]")


def test_other_driver_errors_pass_through(monkeypatch):
    rec = object.__new__(record.Recording)
    monkeypatch.setattr(record.graphs, "read_kernel", lambda n: _Params())

    def other(func, kern=None):
        raise DriverError("cuFuncGetName", 999, "CUDA_ERROR_UNKNOWN")
    monkeypatch.setattr(rec, "kernel_for", other, raising=False)
    with pytest.raises(DriverError):
        rec.kernel_node(0, object(), "graphs[0].nodes[0]")
