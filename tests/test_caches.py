"""Caches and scanned directories no one else can write into (issue #19): the kernel-index cache
of the loaded-object scan and the JIT cache directories of Triton / CuPy (CPU, with the
committed libkernels.so standing in for a mapped library). The native node loop's cache is
tested in tests/test_native.py, the cache directory rules themselves in tests/test_fs.py."""
from __future__ import annotations

import os
import time

import msgpack
import pytest

from cgsnap.kernels import sources
from cgsnap.kernels.sources import LoadedObjectScan, RegisteredSource, jit_cache_files
from cgsnap.limits import Limits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIB = os.path.join(ROOT, "tests", "fixtures", "libkernels.so")
CUBIN = os.path.join(ROOT, "tests", "fixtures", "kernels.sm_90.cubin")


@pytest.fixture
def scan(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_mapped_files", lambda: [LIB])
    monkeypatch.setattr(sources, "_warned", set())
    return lambda: LoadedObjectScan(90, cache_dir=str(tmp_path / "index"))


def _index_file(tmp_path) -> str:
    (name,) = os.listdir(tmp_path / "index")
    return str(tmp_path / "index" / name)


def _give_away(path, monkeypatch) -> None:
    if os.geteuid() == 0:
        os.chown(path, 4242, 4242)
    else:
        monkeypatch.setattr(os, "geteuid", lambda: os.stat(path).st_uid + 1)


def test_the_index_is_built_cached_privately_and_used(scan, tmp_path):
    assert [c.kernels for c in scan().find("fill")] == [frozenset({"fill"})]
    path = _index_file(tmp_path)
    assert os.stat(tmp_path / "index").st_mode & 0o777 == 0o700
    assert os.stat(path).st_mode & 0o777 == 0o600
    cached = msgpack.unpackb(open(path, "rb").read())
    assert "axpy" in cached and "fill" in cached
    assert [c.kernels for c in scan().find("fill")] == [frozenset({"fill"})]


def _poison(path, index) -> None:
    with open(path, "wb") as f:
        f.write(msgpack.packb(index))


def test_an_index_pointing_a_kernel_at_another_image_is_not_believed(scan, tmp_path):
    """A poisoned index says 'fill' is in the image that holds axpy & co.: that image is not
    returned for 'fill' (each source returns only images that define the kernel)."""
    scan().find("fill")
    path = _index_file(tmp_path)
    index = msgpack.unpackb(open(path, "rb").read())
    index["fill"] = index["axpy"]
    _poison(path, index)
    assert scan().find("fill") == []
    assert [sorted(c.kernels)[0] for c in scan().find("axpy")] == ["_Z5scaleIdLi64EEvPT_S0_"]


@pytest.mark.parametrize("index", [
    {"fill": [[1, 2, 3]]}, {"fill": [["a", 1, 2, 3]]}, {"fill": 5}, [1, 2], {"fill": [[1, 2, 3, -1]]},
    {"fill": [[True, 0, 0, 0]]}, {"fill": [[0, 0, 0, 2 ** 64 - 1]]}, "garbage", None,
    {"fill": [[0, 0, 0, 0, 0]]}, {"fill": [None]},
])
def test_a_malformed_index_is_rebuilt_not_trusted(scan, tmp_path, index):
    scan().find("fill")
    _poison(_index_file(tmp_path), index)
    assert [c.kernels for c in scan().find("fill")] == [frozenset({"fill"})]


def test_undecodable_and_oversized_indexes_are_ignored(scan, tmp_path):
    scan().find("fill")
    path = _index_file(tmp_path)
    for data in (b"\xc1", b"\xdd\xff\xff\xff\xff", msgpack.packb({"a": [[{}] * 10] * 10})):
        with open(path, "wb") as f:
            f.write(data)
        assert len(scan().find("fill")) == 1
    with open(path, "wb") as f:
        f.write(b"\x80" + bytes(64))
    small = LoadedObjectScan(90, cache_dir=str(tmp_path / "index"), limits=Limits(cache_bytes=32))
    assert len(small.find("fill")) == 1


@pytest.mark.parametrize("attack", ["other owner", "group-writable", "world-writable", "symlink"])
def test_an_index_file_someone_else_could_have_written_is_ignored(scan, tmp_path, monkeypatch,
                                                                  attack):
    scan().find("fill")
    path = _index_file(tmp_path)
    index = msgpack.unpackb(open(path, "rb").read())
    index["fill"] = index["axpy"]                       # what the attacker wants believed
    if attack == "symlink":
        planted = tmp_path / "planted.msgpack"
        _poison(planted, index)
        os.unlink(path)
        os.symlink(planted, path)
    else:
        _poison(path, index)
        if attack == "other owner":
            _give_away(path, monkeypatch)
        else:
            os.chmod(path, 0o620 if attack == "group-writable" else 0o602)
    opened = []
    real = sources._decode_index
    monkeypatch.setattr(sources, "_decode_index", lambda raw, limits: opened.append(1) or
                        real(raw, limits))
    assert [c.kernels for c in scan().find("fill")] == [frozenset({"fill"})]
    assert opened == []         # never decoded: refused on the descriptor's fstat


@pytest.mark.parametrize("attack", ["other owner", "group-writable", "symlink"])
def test_an_index_directory_someone_else_could_write_is_not_used(scan, tmp_path, monkeypatch,
                                                                 attack):
    scan().find("fill")
    d = tmp_path / "index"
    if attack == "symlink":
        os.replace(d, tmp_path / "real")
        os.symlink(tmp_path / "real", d)
    elif attack == "other owner":
        _give_away(d, monkeypatch)
    else:
        os.chmod(d, 0o770)
    monkeypatch.setattr(sources, "_decode_index",
                        lambda raw, limits: pytest.fail("read from an unsafe directory"))
    assert len(scan().find("fill")) == 1


def test_the_index_is_written_through_an_unpredictable_temporary(scan, tmp_path):
    """A symlink at the old predictable temporary name (.tmp-PID) redirects nothing."""
    d = tmp_path / "index"
    d.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    lib = LoadedObjectScan(90, cache_dir=str(d))
    key = sources._file_identity(LIB, sources.elf.ElfFile(open(LIB, "rb").read(), LIB))
    os.symlink(victim, d / f"{key}-sm9x.msgpack.tmp-{os.getpid()}")
    assert len(lib.find("fill")) == 1
    assert victim.read_bytes() == b"precious"


# ---- JIT cache directories -------------------------------------------------------------------

def test_symlink_loops_in_a_jit_cache_end_quickly(tmp_path):
    """``..`` links made the recursive glob loop forever; links are not followed now."""
    root = tmp_path / "cache"
    (root / "a" / "b").mkdir(parents=True)
    os.symlink("..", root / "a" / "up")
    os.symlink("../..", root / "a" / "b" / "upup")
    os.symlink(root, root / "a" / "b" / "self")
    (root / "a" / "b" / "k.cubin").write_bytes(open(CUBIN, "rb").read())
    os.symlink(root / "a" / "b" / "k.cubin", root / "linked.cubin")
    t = time.perf_counter()
    found = list(jit_cache_files(str(root), ".cubin"))
    assert time.perf_counter() - t < 1
    assert found == [str(root / "a" / "b" / "k.cubin")]


def test_a_jit_cache_scan_stops_at_its_entry_budget(tmp_path):
    root = tmp_path / "cache"
    root.mkdir()
    for i in range(30):
        (root / f"{i:02}.cubin").write_bytes(b"")
    assert len(list(jit_cache_files(str(root), ".cubin", Limits(scan_entries=10)))) == 10


def test_jit_cache_files_others_could_write_are_not_used(tmp_path, monkeypatch):
    root = tmp_path / "triton"
    root.mkdir()
    monkeypatch.setenv("TRITON_CACHE_DIR", str(root))
    monkeypatch.setenv("CUPY_CACHE_DIR", str(tmp_path / "none"))
    cubin = root / "k.cubin"
    cubin.write_bytes(open(CUBIN, "rb").read())
    os.chmod(cubin, 0o666)
    src = RegisteredSource()
    assert src.find("axpy") == []
    os.chmod(cubin, 0o644)
    src = RegisteredSource()
    assert [c.source for c in src.find("axpy")] == [f"jit-cache:{cubin}"]
