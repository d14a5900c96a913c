"""Every error cgsnap raises on purpose derives from :class:`CgsnapError`.

Callers (and the CLI) catch ``CgsnapError`` and nothing else: any other exception escaping
cgsnap is a bug. Each error carries enough context to act on (the file, node, kernel or
region it is about) in its message.
"""
from __future__ import annotations


class CgsnapError(Exception):
    """Base class of all cgsnap errors."""


class CgsnapWarning(UserWarning):
    """Something recorded that is probably a bug in the program (the snapshot is still made):
    for example a graph that reads memory its allocator has freed."""


class FormatError(CgsnapError):
    """A snapshot file (or its manifest) is malformed, truncated, corrupt or of an unknown version."""

    def __init__(self, message: str, path: str | None = None):
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class BinaryFormatError(CgsnapError):
    """A GPU binary (ELF cubin, fatbin container, host ELF) could not be parsed."""


class KernelNotFoundError(CgsnapError):
    """No carried or discoverable image holds the kernel."""


class AmbiguousKernelError(CgsnapError):
    """Several different images hold a kernel of that name and nothing tells them apart."""


class UnsupportedNodeError(CgsnapError):
    """A graph node cannot be carried (host callback not registered, external semaphore, ...)."""


class CompatibilityError(CgsnapError):
    """The machine cannot run the snapshot (arch, driver version, missing feature)."""


class BindError(CgsnapError):
    """Buffers given to ``load(bind=...)`` are missing, extra or do not match the snapshot."""


class DriverError(CgsnapError):
    """A CUDA driver call failed."""

    def __init__(self, call: str, code: int, name: str = "", message: str = ""):
        self.call, self.code, self.name = call, code, name
        super().__init__(f"{call} failed: {name or code}" + (f" ({message})" if message else ""))


class CaptureError(CgsnapError):
    """Capturing or recording a graph failed."""


class RestoreError(CgsnapError):
    """Rebuilding a graph failed; everything allocated for it was released."""


class RecorderError(CgsnapError):
    """The CUPTI module recorder could not start (no libcupti, another subscriber, ...)."""


class SignatureError(CgsnapError):
    """A signature is missing, malformed, made with another key, or does not match the file."""


class LimitError(FormatError, BinaryFormatError):
    """A file asks for more work or memory than a reading budget allows (:class:`cgsnap.Limits`).

    ``budget`` is the name of the :class:`~cgsnap.limits.Limits` field that refused it; raise that
    field explicitly (``limits=cgsnap.Limits(field=...)``, ``--limit field=...``) to read such a
    file. It is both a :class:`FormatError` and a :class:`BinaryFormatError`, so that code which
    handles a malformed snapshot file or GPU binary handles an over-budget one the same way."""

    def __init__(self, message: str, budget: str, path: str | None = None):
        self.budget = budget
        FormatError.__init__(self, message, path)
