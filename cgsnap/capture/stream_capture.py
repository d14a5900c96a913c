"""Stream capture into a CUDA graph, for work launched by any library on ``cap.stream``."""
from __future__ import annotations

from ..cuda import driver
from ..cuda.driver import call, cu
from ..errors import CaptureError

_MODES = {
    "global": cu.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_GLOBAL,
    "thread_local": cu.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
    "relaxed": cu.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_RELAXED,
}


class Capture:
    """``with cgsnap.capture() as cap: ...`` -- after the block, ``cap.graph`` is the CUgraph.

    ``cap.stream`` is the CUstream being captured (created, non-blocking, unless one was given);
    ``cap.stream_handle`` its integer handle, for ``torch.cuda.ExternalStream`` or
    ``cupy.cuda.ExternalStream``."""

    def __init__(self, stream=None, mode: str = "thread_local"):
        if mode not in _MODES:
            raise ValueError(f"capture mode must be one of {', '.join(_MODES)}")
        driver.current_device()
        self._own_stream = stream is None
        self.stream = driver.stream_create() if stream is None else driver.as_stream(stream)
        self.mode = mode
        self.graph = None

    @property
    def stream_handle(self) -> int:
        return int(self.stream)

    def __enter__(self) -> "Capture":
        call(cu.cuStreamBeginCapture, self.stream, _MODES[self.mode])
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        res = cu.cuStreamEndCapture(self.stream)
        if exc_type is None:
            if res[0] != driver.SUCCESS:
                raise CaptureError(f"stream capture failed: {driver.error_name(res[0])} (was work "
                                   "launched on another stream, or a synchronizing call made?)")
            self.graph = res[1]
        elif res[0] == driver.SUCCESS and res[1] is not None and int(res[1]):
            call(cu.cuGraphDestroy, res[1])

    def close(self) -> None:
        """Destroy the captured graph and the stream cgsnap created."""
        if self.graph is not None:
            call(cu.cuGraphDestroy, self.graph)
            self.graph = None
        if self._own_stream and self.stream is not None:
            driver.stream_destroy(self.stream)
            self.stream = None


def capture(stream=None, mode: str = "thread_local") -> Capture:
    return Capture(stream, mode)


def graph_handle(graph) -> object:
    """A CUgraph from what users hold: a Capture, a torch.cuda.CUDAGraph(keep_graph=True),
    a CUgraph or an int handle."""
    if isinstance(graph, Capture):
        if graph.graph is None:
            raise CaptureError("the capture has not finished (or failed)")
        return graph.graph
    raw = getattr(graph, "raw_cuda_graph", None)
    if raw is not None:   # torch.cuda.CUDAGraph
        try:
            return driver.as_graph(int(raw()))
        except RuntimeError as exc:
            raise CaptureError(f"cannot read the torch graph: {exc} (capture it with "
                               "torch.cuda.CUDAGraph(keep_graph=True))") from None
    try:
        return driver.as_graph(graph)
    except TypeError as exc:
        raise CaptureError(str(exc)) from None
