"""A writer that dies or fails at any step of a save leaves the previous file intact and valid
(CPU). Deterministic fault injection: cgsnap._fs calls a hook at each step of its one atomic
writer (creating the temporary, every write, flush, fsync, chmod, rename, fsync of the
directory); for every step N in turn the writer is SIGKILLed there (in a forked child: nothing
runs after the kill) or the step raises (in this process). After each, the target is exactly
the old file or -- only once the rename happened -- the new one; a failed step leaves no
temporary, a killed writer's temporary is removed by the next save."""
from __future__ import annotations

import os
import signal

import msgpack
import pytest

from cgsnap import _fs
from cgsnap.format import fileformat, signing
from cgsnap.kernels import sources

KEY_OLD, KEY_NEW = b"the old secret of enough length", b"the new secret of enough length"


class Writer:
    """One of the files cgsnap writes: ``setup`` makes the old version, ``write`` the new one,
    ``state`` says which is there ("old" / "new"), failing if neither is intact."""

    def __init__(self, tmp_path):
        self.dir = tmp_path


class Snapshot(Writer):
    name = "target.cgsnap"

    def blobs(self):
        # Small enough to run every step quickly, and one blob over PARALLEL_WRITE (lowered
        # for the test) so that the threaded pwrite path is among the steps.
        return [fileformat.BlobSource(os.urandom(48 << 10), compress=i % 2 == 1)
                for i in range(3)] + [os.urandom(96 << 10)]

    def setup(self):
        fileformat.write_file(self.dir / self.name, {"generation": "old"}, [b"old"])

    def write(self):
        fileformat.write_file(self.dir / self.name, {"generation": "new"}, self.blobs())

    def state(self):
        with fileformat.open_file(self.dir / self.name, verify_blobs=True) as f:
            return f.manifest["generation"]


class Signature(Writer):
    name = "target.cgsnap.sig"

    def setup(self):
        fileformat.write_file(self.dir / "target.cgsnap", {"generation": "signed"}, [b"x"])
        signing.sign(self.dir / "target.cgsnap", KEY_OLD)

    def write(self):
        signing.sign(self.dir / "target.cgsnap", KEY_NEW)

    def state(self):
        for key, state in ((KEY_OLD, "old"), (KEY_NEW, "new")):
            try:
                signing.verify(self.dir / "target.cgsnap", key)
                return state
            except signing.SignatureError:
                continue
        raise AssertionError("the .sig verifies with neither key")


class IndexCache(Writer):
    name = "index.msgpack"

    def setup(self):
        sources._write_cache(str(self.dir), self.name, {"k": [[0, 0, 0, 0]]})
        os.chmod(self.dir, 0o700)

    def write(self):
        sources._write_cache(str(self.dir), self.name, {"k": [[1, 1, 1, 1]] * 5000})

    def state(self):
        index = sources._read_cache(str(self.dir), self.name)
        assert index is not None and msgpack.packb(index)
        return "old" if index["k"][0] == [0, 0, 0, 0] else "new"


WRITERS = [Snapshot, Signature, IndexCache]


class _Fault(Exception):
    pass


def _install(monkeypatch, at: int, action) -> list:
    steps = []

    def hook(step):
        steps.append(step)
        if len(steps) == at:
            action(step)
    monkeypatch.setattr(_fs, "_fault", hook)
    return steps


def _temporaries(writer) -> list:
    return [n for n in os.listdir(writer.dir) if ".tmp-" in n]


def _raise(step):
    raise _Fault(step)


@pytest.mark.parametrize("kind", WRITERS, ids=lambda w: w.__name__)
def test_a_failure_at_every_step_keeps_the_old_file_and_leaves_no_temporary(tmp_path,
                                                                            monkeypatch, kind):
    monkeypatch.setattr(fileformat, "PARALLEL_WRITE", 64 << 10)
    writer = kind(tmp_path)
    writer.setup()
    at, seen = 1, set()
    while True:
        steps = _install(monkeypatch, at, _raise)
        try:
            writer.write()
            completed = True
        except _Fault:
            completed = False
        monkeypatch.setattr(_fs, "_fault", None)
        if completed:
            break
        failed_at = steps[at - 1]
        seen.add(failed_at)
        expected = "new" if failed_at == "fsync-dir" else "old"
        assert writer.state() == expected, (at, failed_at)
        assert _temporaries(writer) == [], (at, failed_at)
        if expected == "new":
            writer.setup()
        at += 1
    assert writer.state() == "new"
    assert {"create", "write", "flush", "fsync", "rename", "fsync-dir"} <= seen, seen


@pytest.mark.parametrize("kind", WRITERS, ids=lambda w: w.__name__)
def test_a_sigkill_at_every_step_keeps_the_old_file_and_the_next_save_cleans_up(tmp_path,
                                                                               monkeypatch, kind):
    monkeypatch.setattr(fileformat, "PARALLEL_WRITE", 64 << 10)
    writer = kind(tmp_path)
    writer.setup()
    at, kills = 1, 0
    while True:
        pid = os.fork()
        if pid == 0:                                  # the writer, killed at step ``at``
            try:
                _install(monkeypatch, at, lambda step: os.kill(os.getpid(), signal.SIGKILL))
                writer.write()
                os._exit(3)                           # finished before reaching step ``at``
            except BaseException:
                os._exit(4)
        _, status = os.waitpid(pid, 0)
        if os.WIFEXITED(status):
            assert os.WEXITSTATUS(status) == 3, f"the writer failed at step {at}"
            break
        assert os.WTERMSIG(status) == signal.SIGKILL
        kills += 1
        state = writer.state()                        # intact and valid
        assert state in ("old", "new"), at
        left = _temporaries(writer)
        assert len(left) <= 1 and all(f".tmp-{pid}-" in n for n in left), left
        if state == "new":                            # killed after the rename
            assert not left
        writer.setup()                                # the next save...
        assert _temporaries(writer) == [], "...removes the dead writer's temporary"
        at += 1
    assert kills >= 6 and writer.state() == "new"
