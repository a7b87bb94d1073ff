"""The few POSIX-only file-system calls the token directory relies on, in one place.

Each degrades cleanly where the operating system lacks it (a later Windows port): a missing ``open``
flag is 0, ``fchown``/``fchmod`` are skipped, there is no root, and the lock falls back to
``msvcrt.locking``. Everything else in the package calls these, never the ``os`` functions directly:

* :func:`open_regular`: open a token-directory file without following a symbolic link, without
  blocking on a FIFO, and refuse anything but a regular file (of at most a given size);
* :func:`is_root`, :func:`give_to`, :func:`set_mode`: ownership and mode, on open descriptors only;
* :func:`try_lock`, :func:`unlock`: an exclusive, non-blocking lock on an open descriptor (``flock``);
* :func:`owner_name`, :func:`fsync_directory`, :func:`has_permission_bits`: the owner's name (``pwd``),
  a directory's fsync (``O_DIRECTORY``) and whether modes mean anything here.

Each looks for the call when it is made (not at import), so that a test can take them away as
Windows lacks them (``tests/test_windows_shaped.py``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

NOFOLLOW: int = getattr(os, "O_NOFOLLOW", 0)
NONBLOCK: int = getattr(os, "O_NONBLOCK", 0)
CLOEXEC: int = getattr(os, "O_CLOEXEC", 0)
_BINARY: int = getattr(os, "O_BINARY", 0)

#: Open to read: never follows a link, never waits for a FIFO's writer.
READ: int = os.O_RDONLY | NOFOLLOW | NONBLOCK | CLOEXEC | _BINARY
#: Open (creating it if missing, never truncating) to lock.
LOCK: int = os.O_RDWR | os.O_CREAT | NOFOLLOW | NONBLOCK | CLOEXEC | _BINARY

#: Where the Windows lock sits (``msvcrt.locking`` locks from the file position): past any data.
LOCK_BYTE = 1 << 30
_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


class NotRegularFileError(Exception):
    """The path names something that must not be used as a token-directory file.

    ``str()`` is one line naming the file: ``/x/key-….json is a FIFO, not a regular file``.

    Attributes:
        path: the file.
        reason: what is wrong, without the path (``is a FIFO, not a regular file``).
        kind: what it is (``a FIFO``), or None when it is a regular file that is too large.
    """

    def __init__(self, path: Path | str, reason: str, kind: str | None = None) -> None:
        super().__init__(f"{path} {reason}")
        self.path = Path(path)
        self.reason = reason
        self.kind = kind

    @classmethod
    def of_kind(cls, path: Path | str, kind: str) -> NotRegularFileError:
        """``<path> is <kind>, not a regular file``."""
        return cls(path, f"is {kind}, not a regular file", kind)


def kind_of(mode: int) -> str:
    """What ``mode`` (an ``st_mode``) describes: ``a FIFO``, ``a directory``, ... or ``a regular file``."""
    for test, name in _KINDS:
        if test(mode):
            return name
    return "a regular file" if stat.S_ISREG(mode) else "not a file"


def open_regular(path: Path, flags: int = READ, mode: int = 0o600,
                 max_size: int | None = None) -> tuple[int, os.stat_result]:
    """Open ``path`` without following a symbolic link; return the descriptor and its ``fstat``.

    Args:
        path: the file.
        flags: :data:`READ`, :data:`LOCK`, or other ``os.open`` flags (``O_NOFOLLOW`` is always added).
        mode: the mode of a file that ``O_CREAT`` creates.
        max_size: refuse a file larger than this many bytes.

    Raises:
        NotRegularFileError: it is a symbolic link, a FIFO, a directory, a device..., or too large
            (the descriptor is closed).
        OSError: it cannot be opened (``FileNotFoundError``, ``PermissionError``...).
    """
    if not NOFOLLOW:  # no O_NOFOLLOW here: the best one can do is look first
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISLNK(os.lstat(path).st_mode):
                raise NotRegularFileError.of_kind(path, "a symbolic link")
    try:
        fd = os.open(path, flags | NOFOLLOW, mode)
    except OSError as exc:
        # O_NOFOLLOW on a link: ELOOP (Linux, macOS) or EMLINK (FreeBSD)
        if exc.errno in (errno.ELOOP, errno.EMLINK) and _is_link(path):
            raise NotRegularFileError.of_kind(path, "a symbolic link") from None
        if exc.errno in (errno.ENXIO, errno.EISDIR, errno.EOPNOTSUPP):  # socket, directory to write
            with contextlib.suppress(OSError):
                kind = kind_of(os.lstat(path).st_mode)
                if kind != "a regular file":
                    raise NotRegularFileError.of_kind(path, kind) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = kind_of(st.st_mode)
            raise NotRegularFileError.of_kind(path, kind)
        if max_size is not None and st.st_size > max_size:
            raise NotRegularFileError(path, f"is {st.st_size} bytes (over {_size(max_size)})")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def read_bytes(fd: int, limit: int) -> bytes:
    """Read at most ``limit + 1`` bytes from ``fd`` (one more than allowed: the caller sees growth)."""
    chunks, left = [], limit + 1
    while left > 0:
        chunk = os.read(fd, min(left, 65536))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def effective_uid() -> int | None:
    """This process's effective user id (None where there are none)."""
    geteuid = getattr(os, "geteuid", None)
    return None if geteuid is None else geteuid()


def is_root() -> bool:
    """True when this process runs as root (never where there are no user ids)."""
    return effective_uid() == 0


def has_permission_bits() -> bool:
    """True where a file's mode bits control who may read it (POSIX); False on Windows, where
    ``os.chmod`` only sets the read-only flag and ``st_mode`` says nothing about other users."""
    return getattr(os, "fchmod", None) is not None


def owner_name(uid: int) -> str:
    """The user name of ``uid`` (``uid 1000`` where it is unknown or there is no ``pwd``)."""
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError, AttributeError):
        return f"uid {uid}"


def fsync_directory(directory: Path | str) -> None:
    """Make a rename in ``directory`` durable (fsync of the directory); skipped where a directory
    cannot be opened (Windows, which has no ``O_DIRECTORY``: NTFS journals the rename itself);
    an error is ignored (the rename itself has happened)."""
    directory_flag = getattr(os, "O_DIRECTORY", None)
    if directory_flag is None:
        return
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | directory_flag | CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def give_to(fd: int, uid: int, gid: int) -> None:
    """``fchown`` the open file ``fd`` (skipped where there is no ``fchown``)."""
    fchown = getattr(os, "fchown", None)
    if fchown is not None:
        fchown(fd, uid, gid)


def set_mode(fd: int, mode: int) -> None:
    """``fchmod`` the open file ``fd`` (skipped where there is no ``fchmod``)."""
    fchmod = getattr(os, "fchmod", None)
    if fchmod is not None:
        fchmod(fd, mode)


def try_lock(fd: int) -> bool:
    """Take an exclusive lock on the open file ``fd`` without waiting; True if it was had.

    ``flock``: held by the open file description (so two descriptors of one process exclude each
    other, as two processes do), released by the kernel when the holder dies. Where there is no
    ``fcntl`` (Windows), ``msvcrt.locking`` on the byte at :data:`LOCK_BYTE`, far past any data:
    Windows enforces such a lock against reads and writes of the locked bytes, so locking the data
    itself would keep a reader without the lock (``check``, who holds a session) out.

    Raises:
        OSError: the file cannot be locked at all (e.g. ``ENOLCK``).
    """
    flock = getattr(fcntl, "flock", None)
    if flock is not None:
        try:
            flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                return False
            raise
        return True
    import msvcrt  # type: ignore[import-not-found,unused-ignore]

    os.lseek(fd, LOCK_BYTE, os.SEEK_SET)  # msvcrt locks bytes from the file position
    try:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined,unused-ignore]
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EDEADLK):
            return False
        raise
    return True


def unlock(fd: int) -> None:
    """Release the lock :func:`try_lock` took on ``fd`` (closing ``fd`` releases it too)."""
    flock = getattr(fcntl, "flock", None)
    if flock is not None:
        flock(fd, fcntl.LOCK_UN)
        return
    import msvcrt  # type: ignore[import-not-found,unused-ignore]

    os.lseek(fd, LOCK_BYTE, os.SEEK_SET)
    msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)  # type: ignore[attr-defined,unused-ignore]


def pread(fd: int, size: int, offset: int) -> bytes:
    """Up to ``size`` bytes of ``fd`` from ``offset`` (``os.pread``; where it is missing, as on
    Windows, a seek and a read: ``fd`` must then not be shared between threads)."""
    if hasattr(os, "pread"):
        return os.pread(fd, size, offset)
    os.lseek(fd, offset, os.SEEK_SET)
    return os.read(fd, size)


def pwrite(fd: int, data: bytes, offset: int) -> int:
    """Write ``data`` to ``fd`` at ``offset`` (``os.pwrite``; elsewhere a seek and a write)."""
    if hasattr(os, "pwrite"):
        return os.pwrite(fd, data, offset)
    os.lseek(fd, offset, os.SEEK_SET)
    return os.write(fd, data)


def _is_link(path: Path) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        return False


def _size(size: int) -> str:
    return f"{size // 1024} KiB" if size % 1024 == 0 else f"{size} bytes"
