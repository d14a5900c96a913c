"""The process-wide kernel sources: the module recorder and registered images.

``start_recorder()`` and ``register_image()`` are the two calls users make so that every kernel of
their graphs can be found; :func:`default_resolver` assembles the sources for a snapshot.
"""
from __future__ import annotations

import os

from . import cupti
from .identity import IdentityResolver
from .sources import LoadedObjectScan, RecorderSource, RegisteredSource

# Process-wide sources: what they learn (recorded images, per-library indexes) is kept across
# snapshots, so a second snapshot of the same kernels costs nothing.
_registered = RegisteredSource()
_recorder_source = None
_scans: dict = {}


def start_recorder(launches: bool = False):
    """Start recording the cubin of every module loaded from now on, and which handle each load
    returned (see :mod:`cgsnap.kernels.cupti`). ``launches=True`` also ties cubins that a launch
    loads lazily to the launched function, at the cost of a callback per launch."""
    return cupti.start(launches=launches)


def register_image(data, source: str = "registered") -> list:
    """Make the kernels of a cubin, fatbin or PTX image findable (e.g. NVRTC output).
    Returns the names of the kernels it holds."""
    cands = _registered.register(data, source)
    return sorted({name for c in cands for name in c.kernels})


def default_resolver(arch: int) -> IdentityResolver:
    """The resolver of one snapshot: exact identity from the recorder's load records, then the
    sources by name with discriminators, every choice checked against the live kernel's
    attributes (``CGSNAP_VERIFY_KERNELS=0`` skips that check where nothing is ambiguous)."""
    from .live import DriverProbe, read_file_if_unchanged, read_own_memory
    global _recorder_source
    sources = []
    rec = cupti.recorder()
    if rec is not None:
        if _recorder_source is None or _recorder_source.rec is not rec:
            _recorder_source = RecorderSource(rec)
        sources.append(_recorder_source)
    sources.append(_registered)
    if os.environ.get("CGSNAP_NO_SCAN", "") in ("", "0"):
        if arch not in _scans:
            _scans[arch] = LoadedObjectScan(arch)
        sources.append(_scans[arch])
    return IdentityResolver(arch, sources, recorded=_recorder_source if rec is not None else None,
                            probe=DriverProbe(rec),
                            verify=os.environ.get("CGSNAP_VERIFY_KERNELS", "") != "0",
                            memory=read_own_memory, open_file=read_file_if_unchanged)


def start_recorder_from_env() -> None:
    """``CGSNAP_RECORD=1`` starts the recorder at ``import cgsnap``."""
    if os.environ.get("CGSNAP_RECORD", "") not in ("", "0"):
        start_recorder()
