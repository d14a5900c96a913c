"""cgsnap._fs: the one atomic writer, the cache directory, private directories and files, and
regular-file checks (CPU). This suite runs as root in CI; "another user" is a real chown there
and a simulated uid elsewhere."""
from __future__ import annotations

import os
import stat

import pytest

from cgsnap import _fs
from cgsnap.errors import FormatError
from cgsnap.format import fileformat


def _give_away(path, monkeypatch) -> None:
    if os.geteuid() == 0:
        os.chown(path, 4242, 4242, follow_symlinks=False)
    else:
        monkeypatch.setattr(os, "geteuid", lambda: os.stat(path).st_uid + 1)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# ---- atomic_write ----------------------------------------------------------------------------

def test_a_resave_keeps_the_files_mode(tmp_path):
    path = tmp_path / "x.cgsnap"
    fileformat.write_file(path, {"v": 1}, [])
    os.chmod(path, 0o600)
    fileformat.write_file(path, {"v": 2}, [])
    assert _mode(path) == 0o600 and fileformat.read_manifest(path) == {"v": 2}
    os.chmod(path, 0o640)
    with _fs.atomic_write(path) as f:
        f.write(b"x")
    assert _mode(path) == 0o640


def test_odd_temporaries_left_beside_a_file_do_not_stop_its_saves(tmp_path):
    """Leftovers named like ours but with a pid no process can have (too large, not ASCII
    digits) are left alone, and the save goes through."""
    for pid in ("99999999999999999999", "4194305", "\u00b2", "12a", ""):
        (tmp_path / f".x.cgsnap.tmp-{pid}-abcd").write_bytes(b"old")
    with _fs.atomic_write(tmp_path / "x.cgsnap") as f:
        f.write(b"new")
    assert (tmp_path / "x.cgsnap").read_bytes() == b"new"
    assert len([n for n in os.listdir(tmp_path) if ".tmp-" in n]) == 5


def test_a_new_file_gets_the_umask_default_and_mode_overrides(tmp_path):
    old = os.umask(0o027)
    try:
        with _fs.atomic_write(tmp_path / "new") as f:
            f.write(b"x")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "new") == 0o640
    with _fs.atomic_write(tmp_path / "new", mode=0o600) as f:
        f.write(b"y")
    assert _mode(tmp_path / "new") == 0o600


def test_the_temporary_is_never_more_open_than_the_result(tmp_path, monkeypatch):
    path = tmp_path / "secret"
    path.write_bytes(b"")
    os.chmod(path, 0o600)
    modes = []

    def hook(step):
        if step == "write":
            (tmp,) = [n for n in os.listdir(tmp_path) if n.startswith(".secret.tmp-")]
            modes.append(_mode(tmp_path / tmp))
    monkeypatch.setattr(_fs, "_fault", hook)
    with _fs.atomic_write(path) as f:
        f.write(b"data")
    assert modes == [0o600]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with _fs.atomic_write(path) as f:
            f.write(b"new")
            raise RuntimeError("boom")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["x"]


def test_a_planted_symlink_at_the_temporary_name_is_not_followed(tmp_path, monkeypatch):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    names = iter(["a" * 16, "b" * 16])
    monkeypatch.setattr(_fs.secrets, "token_hex", lambda n: next(names))
    os.symlink(victim, tmp_path / f".out.tmp-{os.getpid()}-{'a' * 16}")
    with _fs.atomic_write(tmp_path / "out") as f:
        f.write(b"written")
    assert victim.read_bytes() == b"precious" and (tmp_path / "out").read_bytes() == b"written"


def test_only_our_dead_writers_temporaries_are_removed(tmp_path, monkeypatch):
    import subprocess
    proc = subprocess.Popen(["true"])
    proc.wait()
    ours = tmp_path / f".out.tmp-{proc.pid}-00"
    live = tmp_path / f".out.tmp-{os.getppid()}-22"
    theirs = tmp_path / f".out.tmp-{proc.pid}-11"      # a dead pid's, but another user's file
    for p in (ours, live, theirs):
        p.write_bytes(b"")
    if os.geteuid() == 0:
        os.chown(theirs, 4242, 4242)
    else:
        theirs.unlink()
    with _fs.atomic_write(tmp_path / "out") as f:
        f.write(b"x")
    left = set(os.listdir(tmp_path))
    assert ours.name not in left and live.name in left
    assert (theirs.name in left) == (os.geteuid() == 0)


# ---- regular files ---------------------------------------------------------------------------

def test_non_regular_files_are_refused_at_once(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path, kind in ((fifo, "a FIFO"), (tmp_path, "a directory"), ("/dev/null",
                                                                     "a character device")):
        with pytest.raises(_fs.UnsafePathError, match=kind):
            _fs.open_regular(path)
        with pytest.raises(FormatError, match=f"cannot read: not a regular file \\({kind}\\)"):
            fileformat.open_file(path)


def test_cli_on_a_fifo_answers_instead_of_hanging(tmp_path, measured):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for argv in (["info", fifo], ["verify", fifo], ["kernels", fifo]):
        result = measured("zygote:cli", *map(str, argv), timeout=10)
        assert result["outcome"] == "ok" and result["value"] == 1, (argv, result)
        assert result["seconds"] < 5
    fileformat.write_file(tmp_path / "s.cgsnap", {}, [])
    result = measured("zygote:cli", "verify", str(tmp_path / "s.cgsnap"), "--key", str(fifo),
                      timeout=10)
    assert result["value"] == 1 and "not a regular file" in result["stderr"], result


# ---- private directories and files -----------------------------------------------------------

def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("CGSNAP_CACHE_DIR", str(tmp_path / "c"))
    assert _fs.cache_root() == str(tmp_path / "c")
    monkeypatch.delenv("CGSNAP_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert _fs.cache_root() == str(tmp_path / "x" / "cgsnap")


def test_private_dir_is_created_0700_and_checked(tmp_path, monkeypatch):
    d = tmp_path / "a" / "b"
    fd = _fs.private_dir(d)
    os.close(fd)
    assert _mode(d) == 0o700
    with pytest.raises(FileNotFoundError):
        _fs.private_dir(tmp_path / "missing", create=False)
    os.chmod(d, 0o750)
    os.close(_fs.private_dir(d))                   # group may read, not write
    for mode, why in ((0o770, "writable by group"), (0o703, "writable by others"),
                      (0o777, "writable by group and others")):
        os.chmod(d, mode)
        with pytest.raises(_fs.UnsafePathError, match=why):
            _fs.private_dir(d)
    os.chmod(d, 0o700)
    os.symlink(d, tmp_path / "link")
    with pytest.raises(_fs.UnsafePathError, match="symlink"):
        _fs.private_dir(tmp_path / "link")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(_fs.UnsafePathError):
        _fs.private_dir(tmp_path / "file")
    _give_away(d, monkeypatch)
    with pytest.raises(_fs.UnsafePathError, match="owned by uid"):
        _fs.private_dir(d)


def test_open_private_checks_the_descriptor(tmp_path, monkeypatch):
    fd = _fs.private_dir(tmp_path / "d")
    try:
        d = tmp_path / "d"
        (d / "ok").write_bytes(b"fine")
        os.chmod(d / "ok", 0o644)
        assert _fs.read_private("ok", fd, 100) == b"fine"
        with pytest.raises(_fs.UnsafePathError, match="more than"):
            _fs.read_private("ok", fd, 3)
        with pytest.raises(FileNotFoundError):
            _fs.open_private("absent", fd)
        os.symlink(d / "ok", d / "link")
        with pytest.raises(_fs.UnsafePathError, match="symlink"):
            _fs.open_private("link", fd)
        os.mkfifo(d / "fifo")
        with pytest.raises(_fs.UnsafePathError, match="FIFO"):
            _fs.open_private("fifo", fd)
        (d / "gw").write_bytes(b"")
        os.chmod(d / "gw", 0o664)
        with pytest.raises(_fs.UnsafePathError, match="writable by group"):
            _fs.open_private("gw", fd)
        _give_away(d / "ok", monkeypatch)
        with pytest.raises(_fs.UnsafePathError, match="owned by uid"):
            _fs.open_private("ok", fd)
    finally:
        os.close(fd)


def test_stable_and_private_copy(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"0123456789" * 1000)
    os.chmod(path, 0o644)
    assert _fs.stable(os.stat(path))
    os.chmod(path, 0o664)
    assert not _fs.stable(os.stat(path))
    fd = os.open(path, os.O_RDONLY)
    try:
        copy = _fs.private_copy(fd)
    finally:
        os.close(fd)
    try:
        path.write_bytes(b"changed")
        assert os.pread(copy, 20000, 0) == b"0123456789" * 1000
        with pytest.raises(PermissionError):       # sealed: not even we can change it
            os.pwrite(copy, b"x", 0)
    finally:
        os.close(copy)
