"""The process-wide kernel sources: the module recorder and registered images.

``start_recorder()`` and ``register_image()`` are the two calls users make so that every kernel of
their graphs can be found; :func:`default_resolver` assembles the sources for a snapshot.
"""
from __future__ import annotations

import os

from . import cupti
from .sources import KernelResolver, RegisteredSource

_registered = RegisteredSource()


def start_recorder():
    """Start recording the cubin of every module loaded from now on (see :mod:`cgsnap.cupti`)."""
    return cupti.start()


def register_image(data, source: str = "registered") -> list:
    """Make the kernels of a cubin, fatbin or PTX image findable (e.g. NVRTC output).
    Returns the names of the kernels it holds."""
    cands = _registered.register(data, source)
    return sorted({name for c in cands for name in c.kernels})


def default_resolver(arch: int) -> KernelResolver:
    rec = cupti.recorder()
    return KernelResolver(arch, recorder=rec if rec is not None and rec.active else None,
                          registered=_registered,
                          scan=os.environ.get("CGSNAP_NO_SCAN", "") in ("", "0"))


def start_recorder_from_env() -> None:
    """``CGSNAP_RECORD=1`` starts the recorder at ``import cgsnap``."""
    if os.environ.get("CGSNAP_RECORD", "") not in ("", "0"):
        start_recorder()
