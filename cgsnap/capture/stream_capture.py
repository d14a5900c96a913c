"""Stream capture into a CUDA graph, for work launched by any library on ``cap.stream``."""
from __future__ import annotations

from ..cuda import driver, graphs
from ..errors import CaptureError


class Capture:
    """``with cgsnap.capture() as cap: ...`` -- after the block, ``cap.graph`` is the CUgraph.

    ``cap.stream`` is the CUstream being captured (created, non-blocking, unless one was given);
    ``cap.stream_handle`` its integer handle, for ``torch.cuda.ExternalStream`` or
    ``cupy.cuda.ExternalStream``."""

    def __init__(self, stream=None, mode: str = "thread_local"):
        if mode not in graphs.CAPTURE_MODES:
            raise ValueError(f"capture mode must be one of {', '.join(graphs.CAPTURE_MODES)}")
        driver.current_device()
        self._own_stream = stream is None
        self.stream = driver.stream_create() if stream is None else driver.as_stream(stream)
        self.mode = mode
        self.graph = None

    @property
    def stream_handle(self) -> int:
        return int(self.stream)

    def __enter__(self) -> "Capture":
        graphs.begin_capture(self.stream, self.mode)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        graph, error = graphs.end_capture(self.stream)
        if exc_type is None and error is None:
            self.graph = graph
            return
        if graph is not None:
            graphs.graph_destroy(graph)
        if exc_type is None:
            raise CaptureError(f"stream capture failed: {error} (was work launched on another "
                               "stream, or a synchronizing call made?)")

    def close(self) -> None:
        """Destroy the captured graph and the stream cgsnap created."""
        if self.graph is not None:
            graphs.graph_destroy(self.graph)
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
