"""Files cgsnap writes and files it trusts: each rule written once (stdlib only).

- :func:`atomic_write` -- the one writer of every file cgsnap makes (snapshots, ``.sig`` files,
  cache entries): an unpredictable temporary name created with ``O_EXCL | O_NOFOLLOW`` in the
  target's directory, fsync of the file, rename over the target, fsync of the directory; the
  destination's permission bits are kept on a re-save; nothing is left behind on failure
  (a writer killed outright leaves a temporary that the next save of that file removes).
- :func:`cache_root` -- the per-user cache directory (``CGSNAP_CACHE_DIR``, else
  ``$XDG_CACHE_HOME/cgsnap``, else ``~/.cache/cgsnap``).
- :func:`private_dir` / :func:`open_private` -- a directory, and files in it, that only this
  user can have written: created 0700, refused unless owned by us, not group- or
  world-writable, not a symlink; everything is checked on the open descriptor (``fstat``), and
  files are opened relative to the directory's descriptor with ``O_NOFOLLOW``, so a path
  swapped after the check changes nothing.
- :func:`open_regular` -- a file named by the user, refused unless it is a regular file (a FIFO
  would block the reader forever, a device has no end).
- :func:`stable` / :func:`private_copy` -- whether anyone but us (or root) can change a file's
  bytes, and a sealed in-memory copy for when they can.

Refusals are :class:`UnsafePathError`, an ``OSError``: callers that treat an unusable cache as
"no cache" keep doing so; readers of user files turn it into their own typed error.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import stat

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)

# Fault injection for tests (tests/test_atomic_save.py): called with the name of each step of
# atomic_write ("create", "write", "flush", "fsync", "chmod", "rename", "fsync-dir").
_fault = None


class UnsafePathError(OSError):
    """A path cgsnap will not use: another user's, writable by others, a symlink where none is
    expected, or not a regular file / directory."""

    def __init__(self, path, why: str):
        super().__init__(errno.EPERM, why, os.fspath(path))
        self.why = why


def step(name: str) -> None:
    """A point where tests may inject a failure (no-op otherwise)."""
    if _fault is not None:
        _fault(name)


# ---- what a file is and who can change it --------------------------------------------------

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISLNK, "a symlink"))


def kind(st: os.stat_result) -> str:
    return next((name for test, name in _KINDS if test(st.st_mode)), "a regular file")


def problem(st: os.stat_result, want_dir: bool = False) -> str | None:
    """Why a directory / file we would trust is not private to this user, or None."""
    if want_dir and not stat.S_ISDIR(st.st_mode):
        return f"not a directory ({kind(st)})"
    if not want_dir and not stat.S_ISREG(st.st_mode):
        return f"not a regular file ({kind(st)})"
    if st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})"
    if st.st_mode & 0o022:
        return f"writable by {'group and others' if st.st_mode & 0o022 == 0o022 else 'group' if st.st_mode & 0o020 else 'others'} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def stable(st: os.stat_result) -> bool:
    """Only this user (or root) can change the file's bytes: owned by us or root, and neither
    group- nor world-writable (with POSIX ACLs the group bits are the mask of every named
    entry, so they cover those too)."""
    return st.st_uid in (os.geteuid(), 0) and not st.st_mode & 0o022


# ---- opening ---------------------------------------------------------------------------------

def open_regular(path, flags: int = os.O_RDONLY) -> int:
    """A descriptor of the regular file at ``path`` (symlinks followed: the user named it).
    Opened non-blocking, so that a FIFO is refused at once instead of waiting for a writer."""
    fd = os.open(path, flags | _CLOEXEC | _NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePathError(path, f"not a regular file ({kind(st)})")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path, max_bytes: int) -> bytes:
    """The whole of a small regular file (a key, a ``.sig``), refused past ``max_bytes``."""
    fd = open_regular(path)
    try:
        return _read_capped(fd, path, max_bytes)
    finally:
        os.close(fd)


def _read_capped(fd: int, path, max_bytes: int) -> bytes:
    size = os.fstat(fd).st_size
    if size > max_bytes:
        raise UnsafePathError(path, f"{size} bytes, more than the {max_bytes} such a file may hold")
    data = b""
    while len(data) <= max_bytes:
        chunk = os.read(fd, max_bytes + 1 - len(data))
        if not chunk:
            return data
        data += chunk
    raise UnsafePathError(path, f"more than the {max_bytes} bytes such a file may hold")


def private_dir(path, *, create: bool = True) -> int:
    """A descriptor of directory ``path`` after checking, on that descriptor, that it is ours,
    not group/world-writable and not a symlink; created 0700 (its parents as usual) if missing
    and ``create``. Raises FileNotFoundError when missing and not ``create``."""
    path = os.fspath(path)
    if create:
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
    try:
        fd = os.open(path, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafePathError(path, "a symlink or not a directory") from None
        raise
    try:
        why = problem(os.fstat(fd), want_dir=True)
        if why:
            raise UnsafePathError(path, why)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_private(name: str, dir_fd: int, flags: int = os.O_RDONLY) -> int:
    """A descriptor of file ``name`` in the directory ``dir_fd``, refused (on the descriptor)
    unless it is a regular file owned by us that nobody else can write; never follows a
    symlink. Raises FileNotFoundError when there is no such file."""
    if os.sep in name:
        raise ValueError(f"{name!r}: a name inside the directory, not a path")
    try:
        fd = os.open(name, flags | _NOFOLLOW | _CLOEXEC | _NONBLOCK, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePathError(name, "a symlink") from None
        raise
    try:
        why = problem(os.fstat(fd))
        if why:
            raise UnsafePathError(name, why)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_private(name: str, dir_fd: int, max_bytes: int) -> bytes:
    """The bytes of a private file (see :func:`open_private`), refused past ``max_bytes``."""
    fd = open_private(name, dir_fd)
    try:
        return _read_capped(fd, name, max_bytes)
    finally:
        os.close(fd)


def fd_path(fd: int) -> str:
    """A path that opens the very file ``fd`` refers to (Linux ``/proc``), e.g. for ``dlopen``."""
    return f"/proc/self/fd/{fd}"


def private_copy(fd: int) -> int:
    """A sealed in-memory copy of the file ``fd`` (``memfd``: no name, no owner but us, and
    after sealing unchangeable even by us). Returns the copy's descriptor, positioned at 0."""
    if not hasattr(os, "memfd_create"):
        raise UnsafePathError(fd_path(fd), "this platform has no memfd for a private copy")
    copy = os.memfd_create("cgsnap-private-copy", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        size, offset = os.fstat(fd).st_size, 0
        in_kernel = hasattr(os, "copy_file_range")
        while offset < size:
            n = 0
            if in_kernel:
                try:
                    n = os.copy_file_range(fd, copy, size - offset, offset, offset)
                except OSError as exc:      # across file systems on older kernels, ...
                    if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS,
                                         errno.EOPNOTSUPP):
                        raise
                    in_kernel = False
            if n == 0:      # no copy_file_range between these files: read and write
                chunk = os.pread(fd, min(64 << 20, size - offset), offset)
                if not chunk:
                    break   # the file shrank meanwhile: the copy is what is verified and read
                n = os.pwrite(copy, chunk, offset)
            offset += n
        fcntl.fcntl(copy, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW |
                    fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(copy)
        raise
    return copy


# ---- the cache directory ---------------------------------------------------------------------

def cache_root() -> str:
    """The per-user cache directory (not created here: see :func:`private_dir`)."""
    base = os.environ.get("CGSNAP_CACHE_DIR")
    if base:
        return base
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                        "cgsnap")


def cache_dir(name: str, *, create: bool = True) -> int:
    """A descriptor of the private cache subdirectory ``name`` (``native``, ``index``)."""
    return private_dir(os.path.join(cache_root(), name), create=create)


# ---- writing ---------------------------------------------------------------------------------

def _temporary_prefix(name: str) -> str:
    return f".{name[:200]}.tmp-"        # room for the suffix within NAME_MAX (255)


MAX_PID = (1 << 22)                  # Linux's pid_max ceiling (PID_MAX_LIMIT)


def remove_stale_temporaries(dir_fd: int, name: str) -> None:
    """Temporaries of earlier writes of ``name`` whose writer died (SIGKILL, power loss):
    ``.{name}.tmp-{pid}-{random}`` of ours with no live process ``pid``."""
    prefix = _temporary_prefix(name)
    try:
        entries = os.listdir(dir_fd)
    except OSError:
        return
    for entry in entries:
        if not entry.startswith(prefix):
            continue
        pid = entry[len(prefix):].split("-", 1)[0]
        if not (pid.isascii() and pid.isdigit() and len(pid) <= 7) or int(pid) > MAX_PID or \
                int(pid) == os.getpid():
            continue                    # not a pid a writer of ours could have had, or ours
        try:
            os.kill(int(pid), 0)
            continue                    # its writer may still be running
        except ProcessLookupError:
            pass
        except OSError:
            continue                    # alive, owned by someone else
        with contextlib.suppress(OSError):
            st = os.stat(entry, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
                os.unlink(entry, dir_fd=dir_fd)


def _create_temporary(dir_fd: int, name: str, mode: int) -> tuple:
    prefix = f"{_temporary_prefix(name)}{os.getpid()}-"
    for _ in range(100):
        tmp = prefix + secrets.token_hex(8)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, mode,
                         dir_fd=dir_fd)
            return fd, tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary name", prefix)


class _Faulty:
    """The temporary file as the writer sees it while a fault hook is installed."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        step("write")
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)


@contextlib.contextmanager
def atomic_write(path, *, dir_fd: int | None = None, mode: int | None = None):
    """A new binary file (yielded) that replaces ``path`` only once it is complete and durable.

    ``dir_fd``: ``path`` is a name in that directory (a validated cache directory); otherwise
    the file's own directory is used. ``mode``: the file's permission bits; by default a
    re-save keeps those of the file it replaces and a new file gets ``0o666 & ~umask``. The
    temporary is created ``0o600`` (or with the umask's default) and only made ``mode`` just
    before the rename, so it is never more open than the result."""
    path = os.fspath(path)
    own = dir_fd is None
    if own:
        directory, name = os.path.split(os.path.abspath(path))
        dir_fd = os.open(directory, os.O_RDONLY | _DIRECTORY | _CLOEXEC)
    else:
        name = path
        if os.sep in name:
            raise ValueError(f"{name!r}: a name inside the directory, not a path")
    try:
        remove_stale_temporaries(dir_fd, name)
        if mode is None:
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                if stat.S_ISREG(st.st_mode):
                    mode = stat.S_IMODE(st.st_mode) & 0o1777   # no set-id bits
            except FileNotFoundError:
                pass
        step("create")
        fd, tmp = _create_temporary(dir_fd, name, 0o600 if mode is not None else 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                yield f if _fault is None else _Faulty(f)
                step("flush")
                f.flush()
                step("fsync")
                os.fsync(f.fileno())
                if mode is not None:
                    step("chmod")
                    os.fchmod(f.fileno(), mode)
            step("rename")
            os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):     # must not mask the original error
                os.unlink(tmp, dir_fd=dir_fd)
            raise
        step("fsync-dir")
        os.fsync(dir_fd)                            # make the rename itself durable
    finally:
        if own:
            os.close(dir_fd)
