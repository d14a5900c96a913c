"""The resource ledger of a restore: every GPU object it made, freed exactly once.

Whatever a restore creates (device and pinned host memory, CUDA arrays, loaded libraries, events,
graphs, executable graphs, a staging ring) is entered here as it is made. :meth:`Ledger.release` frees
everything in the reverse order of the kinds' dependencies (executables before graphs, graphs
before the memory and functions they name), attempts every step even after one fails, and then
raises a :class:`~cgsnap.errors.RestoreError` naming what failed. A restore that nobody closes
is released by a ``weakref.finalize`` on its owner: the ledger holds no reference back to it.
"""
from __future__ import annotations

import weakref

from ..cuda import driver, graphs
from ..errors import CgsnapError, RestoreError

# Release order: what refers to something is released before what it refers to.
_KINDS = ("exec", "graph", "event", "stager", "library", "array", "device", "host")


class Ledger:
    def __init__(self, what: str):
        self.what = what
        self.items: dict = {kind: [] for kind in _KINDS}
        self.open = True

    def add(self, kind: str, handle):
        self.items[kind].append(handle)
        return handle

    def forget(self, kind: str, handle) -> None:
        """``handle`` was released by its user (e.g. a graph destroyed early)."""
        self.items[kind] = [h for h in self.items[kind] if h is not handle]

    def release(self) -> None:
        """Free everything (idempotent). Raises RestoreError afterwards if any step failed."""
        if not self.open:
            return
        self.open = False
        errors = []

        def attempt(fn, *args):
            try:
                fn(*args)
            except CgsnapError as exc:
                errors.append(exc)
        if any(self.items.values()):
            attempt(driver.ctx_sync)       # nothing of ours may still be running
        for kind in _KINDS:
            for h in reversed(self.items[kind]):
                attempt(_RELEASE[kind], h)
            self.items[kind] = []
        if errors:
            raise RestoreError(f"{self.what}: {len(errors)} step(s) of releasing the restore's "
                               f"GPU resources failed; the first: {errors[0]}") from errors[0]

    def release_quietly(self) -> None:
        """For the finalizer: free what can be freed, report nothing (no one is listening)."""
        try:
            self.release()
        except CgsnapError:
            pass

    def finalize_with(self, owner) -> weakref.finalize:
        """Release when ``owner`` is collected without having been closed (not at interpreter
        exit: the process's end frees device memory anyway, and the driver may be gone)."""
        fin = weakref.finalize(owner, self.release_quietly)
        fin.atexit = False
        return fin


_RELEASE = {
    "exec": graphs.exec_destroy,
    "graph": graphs.graph_destroy,
    "event": graphs.event_destroy,
    "stager": lambda s: s.close(),
    "library": driver.library_unload,
    "array": driver.array_destroy,
    "device": driver.mem_free,
    "host": driver.host_free,
}
