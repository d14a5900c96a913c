"""cgsnap: save a captured CUDA graph to a file and rebuild it, bit-exact, in a fresh process.

Public API::

    with cgsnap.capture() as cap:          # stream capture on cap.stream
        ...
    snap = cgsnap.snapshot(cap, buffers={"x": x, "y": y}, name="step")
    snap.save("step.cgsnap")               # or cgsnap.save(path, [snap_a, snap_b])
    with cgsnap.load("step.cgsnap") as r:  # in any process; never imports torch or CuPy
        r.buffer("x").copy_from(host)
        r.graph("step").launch()
        r.synchronize()
        out = r.buffer("y").to_numpy()

Importing cgsnap does not initialise CUDA.
"""
from __future__ import annotations

from ._version import __version__
from .capture.buffers import Bound, Saved, Scratch
from .capture.classify import DEFAULT_POINTER_BUDGET
from .errors import (AmbiguousKernelError, BinaryFormatError, BindError, CaptureError, CgsnapError,
                     CgsnapWarning, CompatibilityError, DriverError, FormatError, KernelNotFoundError,
                     LimitError, RecorderError, RestoreError, SignatureError,
                     UnsupportedNodeError)
from .format.model import Snapshot
from .limits import Limits
from .kernels.registry import register_image, start_recorder, start_recorder_from_env

__all__ = [
    "capture", "snapshot", "save", "load", "read", "register_image", "start_recorder",
    "Bound", "Saved", "Scratch", "Snapshot", "CgsnapError", "FormatError", "BinaryFormatError",
    "KernelNotFoundError", "AmbiguousKernelError", "UnsupportedNodeError", "CompatibilityError",
    "BindError", "DriverError", "CaptureError", "RestoreError", "RecorderError", "SignatureError",
    "LimitError", "CgsnapWarning", "Limits", "sign", "__version__",
]


def capture(stream=None, mode: str = "thread_local"):
    """Stream capture: ``with cgsnap.capture() as cap:`` launches on ``cap.stream`` become
    ``cap.graph``. ``stream`` may be an int handle, a CUstream, a torch or a CuPy stream."""
    from .capture.stream_capture import capture as _capture
    return _capture(stream, mode)


def snapshot(graph, buffers=None, name: str = "graph", *, record_outputs=None,
             host_callbacks=None, meta=None, memory_pointers: str = "follow",
             pointer_budget: int = DEFAULT_POINTER_BUDGET, hold: str = "copy",
             trace=False) -> Snapshot:
    """Record a live graph: a :func:`capture`, a CUgraph or int handle, or a
    ``torch.cuda.CUDAGraph(keep_graph=True)``.

    ``buffers`` names device memory (torch tensors of any strides, CuPy arrays, objects with
    ``__cuda_array_interface__``, or ``(ptr, nbytes)``; wrap in :class:`Bound` /
    :class:`Scratch` to keep contents out of the file). ``record_outputs`` (default: when
    buffers are named) launches the graph once to record the named buffers' outputs for
    ``cgsnap replay --check``, then puts every region back as it was. ``host_callbacks``:
    ``{name: function}`` (the ctypes function or address a host node calls) lets
    host-callback nodes travel by name. ``memory_pointers="follow"`` (the default) finds the
    pointers stored in saved memory (pointer arrays, structs of pointers, ``__device__ T*``
    globals), brings in the device allocations they reach, up to ``pointer_budget`` bytes
    (:class:`CaptureError` beyond, naming the region and offset), and has the restore rewrite
    them; ``"off"`` leaves saved contents as they are.

    ``hold``: where the saved contents wait for :meth:`Snapshot.save`. ``"copy"`` (default) is
    a device-side copy made now (the snapshot keeps the state it saw; the copy is freed with
    the snapshot), or host memory for small totals and when the copy would take more than a
    quarter of the free device memory; ``"live"`` reads the memory itself when saving (for a
    save that follows at once; memory that changed in between fails the save); ``"host"``
    copies into host memory now.

    ``trace=True`` (or a byte budget: an int) also records a per-node trace for
    ``cgsnap bisect``: the snapshot is restored in this process on fresh memory (copies of the
    saved state; the original graph and its memory are untouched), run node by node, and after
    each node a digest of every region it may write is kept, with the bytes it changed while
    the budget (default 64 MiB) lasts. It needs every region's contents (no bound buffers) and
    nodes that run one at a time (no graph-memory, host-callback, conditional or stream
    memory-operation nodes)."""
    from .capture.record import snapshot_graph
    from .capture.stream_capture import graph_handle
    if not (isinstance(trace, bool) or (isinstance(trace, int) and trace >= 0)):
        raise CaptureError(f"trace={trace!r}: expected True, False or a byte budget >= 0")
    snap = snapshot_graph(graph_handle(graph), name=name, buffers=buffers,
                          record_outputs=record_outputs, host_callbacks=host_callbacks, meta=meta,
                          memory_pointers=memory_pointers, pointer_budget=pointer_budget,
                          hold=hold)
    if trace is not False:
        from .restore.stepper import trace_snapshot
        from .restore.trace import DEFAULT_BUDGET
        snap = trace_snapshot(snap, DEFAULT_BUDGET if trace is True else trace)
    return snap


def save(path, snaps, *, compress="auto", prune: bool = True) -> None:
    """Write one snapshot or a list of them (stored once where they share memory) atomically.
    Identical region contents are stored once. ``compress``: ``"auto"`` (default) compresses a
    region's contents when a sample of them shrinks well (zeros, small integers; not fp16 /
    bf16 / fp32 values), ``True`` always, ``False`` never; kernel images are always compressed.
    ``prune``: cut library cubins down to the kernels the graphs launch (checked on the GPU
    first; faster restores, smaller files); ``False`` keeps them whole."""
    from .format.snapfile import save as _save
    _save(path, snaps, compress=compress, prune=prune)


def load(path, device: int = 0, *, bind=None, instantiate: str = "lazy", verify_bound=False,
         allow_jit=False, require_signature=None, verify: bool = True, host_callbacks=None,
         limits=None):
    """Restore a snapshot file in this process; see :class:`cgsnap.restore.restored.Restored`.
    The whole file is validated before any GPU work. ``require_signature``: a key (HMAC secret
    bytes, or an Ed25519 public key: PEM, DER, OpenSSH) whose signature ``path.sig`` must match
    the file; it is checked over the one open descriptor the restore then reads (a file others
    can write is read from a sealed private copy; docs/RELIABILITY.md, "Integrity and trust").
    ``verify=False`` skips the checksums of region contents (kernel images and the manifest
    are always checked) for trusted local files, where hashing would bound the copy speed.
    ``host_callbacks``: ``{name: callable}`` for the host-callback nodes recorded by name.
    ``limits``: reading budgets (:class:`cgsnap.Limits`; the defaults fit real files)."""
    from .restore.restored import Restored
    return Restored(path, device=device, bind=bind, instantiate=instantiate,
                    verify_bound=verify_bound, allow_jit=allow_jit, verify_blobs=verify,
                    host_callbacks=host_callbacks, limits=limits,
                    require_signature=require_signature)


def sign(path, key) -> str:
    """Write the detached signature ``path.sig`` (HMAC-SHA256 with a secret of >= 16 bytes, or
    Ed25519 with a private key); returns its path."""
    from .format.signing import sign as _sign
    return _sign(path, key)


def read(path, *, limits=None, require_signature=None):
    """The validated :class:`Snapshot` model of a file, without a GPU (kernel images loaded,
    within ``limits``; ``require_signature`` as for :func:`load`)."""
    from .format.snapfile import read as _read
    snap, f = _read(path, limits=limits, signature_key=require_signature)
    f.close()
    return snap

start_recorder_from_env()
