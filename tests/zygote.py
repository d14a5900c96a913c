"""Runs test cases in fresh child processes and measures each one's peak RSS and wall time.

A process that has imported cgsnap (the zygote) forks one child per case; the child runs the
case, reports how it ended, and exits; the zygote collects the child's own resource usage with
``os.wait4``. A child starts with the zygote's pages resident, so its peak RSS is what a fresh
``python -c 'import cgsnap; ...'`` would show, at the cost of a fork instead of an interpreter
start (a few ms instead of ~0.4 s per case).

Protocol (one JSON line each way): ``{"call": "module:function", "args": [...], "timeout": s}``
-> ``{"outcome": "ok" | "error" | "crash", "type": ..., "budget": ..., "message": ...,
"value": ..., "stdout": ..., "stderr": ..., "maxrss_mib": ..., "seconds": ...}``.
"""
from __future__ import annotations

import importlib
import io
import json
import os
import resource
import signal
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import cgsnap  # noqa: E402,F401  -- what every case needs, resident before the fork
import cgsnap.binary.binaries  # noqa: E402,F401
import cgsnap.format.signing  # noqa: E402,F401
import cgsnap.format.snapfile  # noqa: E402,F401
import cgsnap.kernels.sources  # noqa: E402,F401
import cgsnap.restore.restored  # noqa: E402,F401
import cgsnap.tools.cli  # noqa: E402,F401
import cgsnap.tools.render  # noqa: E402,F401


def cli(*argv):
    """``cgsnap ARGV`` in this process: its exit code (stdout / stderr are captured)."""
    from cgsnap.tools.cli import main
    return main(list(argv))


def _run_case(request: dict, out_fd: int) -> None:
    stdout, stderr = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    os.dup2(stdout.fileno(), 1)
    os.dup2(stderr.fileno(), 2)
    sys.stdout = io.TextIOWrapper(os.fdopen(os.dup(1), "wb"), write_through=True)
    sys.stderr = io.TextIOWrapper(os.fdopen(os.dup(2), "wb"), write_through=True)
    signal.alarm(int(request.get("timeout", 30)))
    module, _, name = request["call"].partition(":")
    result: dict = {}
    try:
        fn = getattr(importlib.import_module(module), name)
        value = fn(*request.get("args", ()))
        result = {"outcome": "ok", "value": value if isinstance(value, (int, str, type(None)))
                  else repr(value)}
    except cgsnap.CgsnapError as exc:
        result = {"outcome": "error", "type": type(exc).__name__, "message": str(exc),
                  "budget": getattr(exc, "budget", None)}
    except BaseException as exc:  # noqa: BLE001 -- reported, the test fails on it
        result = {"outcome": "crash", "type": type(exc).__name__, "message": str(exc),
                  "trace": traceback.format_exc()[-3000:]}
    sys.stdout.flush()
    sys.stderr.flush()
    for key, f in (("stdout", stdout), ("stderr", stderr)):
        f.seek(0)
        result[key] = f.read()[-20000:].decode("utf-8", "replace")
    os.write(out_fd, json.dumps(result).encode())
    os.close(out_fd)


def main() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        read_fd, write_fd = os.pipe()
        t = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            try:
                _run_case(request, write_fd)
            finally:
                os._exit(0)
        os.close(write_fd)
        chunks = []
        while True:
            chunk = os.read(read_fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
        os.close(read_fd)
        _, status, usage = os.wait4(pid, 0)
        seconds = time.perf_counter() - t
        try:
            result = json.loads(b"".join(chunks))
        except ValueError:
            result = {"outcome": "crash", "type": "died",
                      "message": f"child ended with status {status} and no report"}
        result["maxrss_mib"] = usage.ru_maxrss / 1024     # Linux reports KiB
        result["seconds"] = seconds
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    main()
