"""The disk's sequential bandwidth, measured the way cgsnap writes and reads a file, so that
save and restore can be judged against it (scripts/bench.py prints these beside each path).

usage: python scripts/probes/disk_probe.py [DIR] [--gb 4]

- write, buffered + one fsync: large ``os.write`` calls into the page cache, one ``fsync`` at
  the end (what a save does); the time includes the fsync.
- write, O_DIRECT: the device without the page cache (where the file system allows it).
- read, O_DIRECT: the file's bytes from the device (a cold restore reads no faster).
- read, warm page cache: the same file read again with ``os.readv`` (no device at all).
The data are random bytes (a disk or file system that compresses would flatter zeros).
No GPU needed.
"""
from __future__ import annotations

import argparse
import mmap
import os
import sys
import tempfile
import time

import numpy as np

BLOCK = 64 << 20


def _random_block() -> memoryview:
    buf = mmap.mmap(-1, BLOCK)          # page-aligned: usable for O_DIRECT too
    buf[:] = np.random.default_rng(0).integers(0, 256, BLOCK, dtype=np.uint8).tobytes()
    return memoryview(buf)


def _drop(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    except (OSError, AttributeError):
        pass


def write_buffered(path: str, nbytes: int, block=None) -> float:
    """GB/s of writing ``nbytes`` with large writes and one fsync, fsync included."""
    block = block if block is not None else _random_block()
    t = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        done = 0
        while done < nbytes:
            done += os.write(fd, block[:min(BLOCK, nbytes - done)])
        os.fsync(fd)
    finally:
        os.close(fd)
    return nbytes / (time.perf_counter() - t) / 1e9


def write_direct(path: str, nbytes: int, block=None):
    """GB/s of O_DIRECT writes, or None where the file system refuses O_DIRECT."""
    if not hasattr(os, "O_DIRECT"):
        return None
    block = block if block is not None else _random_block()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
    except OSError:
        return None
    try:
        t = time.perf_counter()
        done = 0
        while done < nbytes:
            done += os.write(fd, block[:min(BLOCK, nbytes - done)])
        os.fsync(fd)
        return nbytes / (time.perf_counter() - t) / 1e9
    except OSError:
        return None
    finally:
        os.close(fd)


def read_direct(path: str):
    """GB/s of reading the whole file with O_DIRECT (from the device), or None."""
    if not hasattr(os, "O_DIRECT"):
        return None
    size = os.path.getsize(path)
    buf = memoryview(mmap.mmap(-1, BLOCK))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return None
    try:
        return _timed_read(fd, buf, size)
    except OSError:
        return None
    finally:
        os.close(fd)


def _timed_read(fd: int, buf, size: int) -> float:
    """GB/s of reading ``size`` bytes (or to the end) from ``fd`` through ``buf``."""
    t = time.perf_counter()
    done = 0
    while done < size:
        got = os.readv(fd, [buf])
        if got <= 0:
            break
        done += got
    return done / (time.perf_counter() - t) / 1e9


def read_cold(path: str) -> float:
    """GB/s of a buffered read after dropping the file's pages (where fadvise works)."""
    _drop(path)
    return read_warm(path)


def read_warm(path: str) -> float:
    size = os.path.getsize(path)
    buf = memoryview(bytearray(BLOCK))
    fd = os.open(path, os.O_RDONLY)
    try:
        return _timed_read(fd, buf, size)
    finally:
        os.close(fd)


def measure(directory: str, nbytes: int) -> dict:
    """All four figures for a file of ``nbytes`` in ``directory`` (removed afterwards)."""
    block = _random_block()
    path = os.path.join(directory, f".cgsnap-disk-probe-{os.getpid()}")
    try:
        out = {"write_buffered_fsync": write_buffered(path, nbytes, block)}
        out["read_direct"] = read_direct(path)
        out["read_cold_buffered"] = read_cold(path)
        out["read_warm"] = read_warm(path)
        out["write_direct"] = write_direct(path, nbytes, block)
        return out
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", nargs="?", default=os.environ.get("BENCH_DIR") or tempfile.gettempdir())
    ap.add_argument("--gb", type=float, default=4)
    args = ap.parse_args()
    res = measure(args.dir, int(args.gb * (1 << 30)))
    for k, v in res.items():
        print(f"{k:<24} {'n/a' if v is None else f'{v:.2f} GB/s'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
