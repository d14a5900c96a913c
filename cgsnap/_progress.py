"""Progress of long saves and loads on a terminal: one line on stderr, updated in place.

Shown only when stderr is a terminal (never in scripts, pipes or tests; ``CGSNAP_PROGRESS=0``
turns it off, ``=1`` on) and only once an operation has run for a second. cgsnap's dependency
list is fixed (no tqdm or rich); a carriage-return line is all a byte counter needs.

Code that moves bytes calls :func:`advance` (a no-op unless a :func:`task` is active): per
piece of a large blob, so a multi-GB region moves the bar while it goes. Thread-safe; one task
at a time (an inner task is silent).
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

_lock = threading.Lock()
_active = None
SHOW_AFTER = 1.0
_EVERY = 0.1


def _wanted() -> bool:
    setting = os.environ.get("CGSNAP_PROGRESS", "auto")
    if setting in ("0", "1"):
        return setting == "1"
    try:
        return sys.stderr.isatty() and "PYTEST_CURRENT_TEST" not in os.environ
    except (AttributeError, ValueError):
        return False


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


class _Task:
    def __init__(self, label: str, total: int, stream):
        self.label, self.total, self.stream = label, max(int(total), 0), stream
        self.done = 0
        self.start = time.monotonic()
        self.last = 0.0
        self.shown = False

    def advance(self, n: int) -> None:
        with _lock:
            self.done += n
            now = time.monotonic()
            if now - self.start < SHOW_AFTER or now - self.last < _EVERY:
                return
            self.last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        rate = self.done / max(now - self.start, 1e-9)
        part = f" ({100 * min(self.done, self.total) // self.total}%)" if self.total else ""
        self.stream.write(f"\rcgsnap: {self.label}: {_gb(self.done)} of {_gb(self.total)}"
                          f"{part}, {_gb(rate)}/s ")
        self.stream.flush()
        self.shown = True

    def finish(self) -> None:
        if self.shown:
            with _lock:
                self._draw(time.monotonic())
                self.stream.write("\n")
                self.stream.flush()


@contextlib.contextmanager
def task(label: str, total: int, stream=None):
    """Report the bytes that :func:`advance` counts while the block runs."""
    global _active
    with _lock:
        nested = _active is not None
    if nested or not _wanted():
        yield
        return
    t = _Task(label, total, stream or sys.stderr)
    with _lock:
        _active = t
    try:
        yield
    finally:
        with _lock:
            _active = None
        t.finish()


def advance(n: int) -> None:
    t = _active
    if t is not None:
        t.advance(n)
