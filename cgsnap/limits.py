"""Reading budgets: how much memory and work one file may ask of a reader.

Every reader of untrusted bytes -- snapshot files, GPU binaries (``cgsnap kernels``, the loaded-
object scan, registered images), the kernel-index cache, JIT cache directories -- checks what a
file asks for against these numbers *before* doing the work, and refuses with a
:class:`~cgsnap.errors.LimitError` naming the budget. The defaults sit far above real files (see
docs/RELIABILITY.md, "Budgets"); raise one explicitly where a real file needs more::

    cgsnap.load(path, limits=cgsnap.Limits(image_bytes=1 << 30))
    cgsnap verify FILE --limit image_bytes=1G

Region contents are not held in memory by a reader (they stream to the GPU, or through a fixed
buffer for ``verify``), so they are bounded only by ``decompressed_bytes``; kernel images are
held in memory, so they have their own, much smaller budgets.
"""
from __future__ import annotations

import dataclasses
import os
import re
import threading
from dataclasses import dataclass

from .errors import LimitError

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


def env_count(name: str):
    """The whole number (0 or more) the environment variable ``name`` holds, or None when it
    is unset or not plain ASCII digits (at most 18 of them): the form of every numeric
    ``CGSNAP_*`` setting."""
    value = os.environ.get(name, "")
    return int(value) if value.isascii() and value.isdigit() and len(value) <= 18 else None


@dataclass(frozen=True)
class Limits:
    """Absolute budgets; each field is documented with the reader that charges it."""

    # --- snapshot files (cgsnap.format)
    #: items of the manifest (every map, list, key, value and list element), counted while it
    #: is decoded (a kernel node is about 40: the default admits some 100,000 nodes); also the
    #: items of one kernel-index cache entry
    manifest_objects: int = 4_000_000
    #: entries of the blob table
    blobs: int = 1 << 20
    #: sum of the raw lengths of the file's zstd blobs (checked from the table when it opens)
    decompressed_bytes: int = 1 * TiB
    #: one kernel image, decompressed: images are held in memory
    image_bytes: int = 128 * MiB
    #: all kernel images of one file, decompressed (``read`` / ``load`` hold them at once)
    image_total: int = 256 * MiB
    # --- GPU binaries (cgsnap.binary)
    #: section headers of one ELF image (cubin or host library)
    elf_sections: int = 1 << 18
    #: symbols of one ELF image
    elf_symbols: int = 1 << 20
    #: bytes of section and symbol names decoded from one ELF image
    elf_name_bytes: int = 64 * MiB
    #: fatbin entries in one file (each is parsed: about 10 us)
    fatbin_entries: int = 1 << 18
    #: one fatbin entry, decompressed (held while it is parsed)
    fatbin_entry_bytes: int = 256 * MiB
    #: all fatbin entries of one file, decompressed (one listing or scan)
    binary_decompressed_bytes: int = 16 * GiB
    # --- caches and scanned directories (cgsnap.kernels)
    #: directory entries visited when a JIT cache directory is scanned
    scan_entries: int = 100_000
    #: size of one kernel-index cache file
    cache_bytes: int = 64 * MiB

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if type(value) is not int or value < 0:
                raise TypeError(f"Limits.{f.name} must be a non-negative int, not {value!r}")

    def check(self, budget: str, value: int, what: str, path: str | None = None) -> None:
        """Refuse one quantity (``what`` needs ``value``) that is over ``budget``."""
        limit = getattr(self, budget)
        if value > limit:
            raise over_budget(budget, value, limit, what, path)

    def meter(self, path: str | None = None) -> "Meter":
        """Running totals against these limits, for one file."""
        return Meter(self, path)

    def replace(self, **changes) -> "Limits":
        return dataclasses.replace(self, **changes)


DEFAULT_LIMITS = Limits()


def resolve(limits) -> Limits:
    if limits is None:
        return DEFAULT_LIMITS
    if not isinstance(limits, Limits):
        raise TypeError(f"limits must be a cgsnap.Limits, not {type(limits).__name__}")
    return limits


def over_budget(budget: str, value: int, limit: int, what: str,
                path: str | None = None) -> LimitError:
    return LimitError(f"{what} needs {value}, over the {budget} budget of {limit} (raise it with "
                      f"Limits({budget}=...) or --limit {budget}=...)", budget, path)


class Meter:
    """Cumulative charges of one file against a :class:`Limits` (thread-safe: several threads
    decompress one file's images at once)."""

    __slots__ = ("limits", "path", "_used", "_lock")

    def __init__(self, limits: Limits | None = None, path: str | None = None):
        self.limits = resolve(limits)
        self.path = path
        self._used: dict = {}
        self._lock = threading.Lock()

    def charge(self, budget: str, amount: int, what: str) -> None:
        """Add ``amount`` to ``budget``'s running total, or refuse (charging nothing)."""
        limit = getattr(self.limits, budget)
        with self._lock:
            total = self._used.get(budget, 0) + amount
            if total > limit:
                raise over_budget(budget, total, limit, f"{what} (running total)", self.path)
            self._used[budget] = total

    def used(self, budget: str) -> int:
        return self._used.get(budget, 0)


_SIZE = re.compile(r"(\d+)\s*([kmgt]i?b?)?", re.I)
_UNITS = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": TiB}


def parse_assignment(text: str) -> tuple:
    """``("image_bytes", 1073741824)`` from ``"image_bytes=1G"`` (K, M, G, T are powers of 1024)."""
    name, sep, value = text.partition("=")
    name = name.strip()
    fields = {f.name for f in dataclasses.fields(Limits)}
    if not sep or name not in fields:
        raise ValueError(f"expected NAME=VALUE with NAME one of {', '.join(sorted(fields))}")
    m = _SIZE.fullmatch(value.strip())
    if not m:
        raise ValueError(f"{name}: {value!r} is not a number (K, M, G, T suffixes allowed)")
    return name, int(m.group(1)) * _UNITS[(m.group(2) or "")[:1].lower()]
