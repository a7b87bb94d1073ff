"""The token directory's file primitives: reads that trust nothing found at a name, atomic 0600
writes, removals, the directory (created 0700, checked, handed to its owner when root writes) and
the sweep of the package's own temp files.

Every file is opened without following a symbolic link and without blocking (``common.store.fs``)
and used only if ``fstat`` says it is a regular file of at most :data:`MAX_FILE_SIZE` bytes. Writes
go to a temp file in the same directory, are fsynced and renamed over the target. Ownership is
changed only on an open descriptor, never on a path.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import stat
import time
from pathlib import Path

from common.errors import CorruptRecordError, DirectoryError, StoreError
from common.store import fs

FILE_MODE = 0o600
DIR_MODE = 0o700
STALE_TEMP_AGE = 60.0
#: The largest token-directory file read (a record is well under 1 KiB).
MAX_FILE_SIZE = 64 * 1024
#: How often a process waiting for the lock tries it again.
LOCK_POLL = 0.02

#: The names of the files the package writes (the key's record and state per kind, a market's
#: mirrors): the temp-file sweep removes ``.<one of these>.<random>.tmp`` and nothing else.
KIND_SUFFIXES = {"token": "", "approval": ".approval"}
MIRROR_NAMES = ("api_token.json", "token_issued_at.dat", "krs_token.dat")
_OUR_TEMP = re.compile(
    r"\.(?:key-[a-z]+-[0-9a-f]+(?:-[0-9a-f]+)?(?:{kinds})\.(?:json|state)|[A-Za-z0-9]+_(?:{mirrors}))"
    r"\.[A-Za-z0-9_]+\.tmp".format(
        kinds="|".join(re.escape(suffix) for suffix in KIND_SUFFIXES.values()),
        mirrors="|".join(re.escape(name) for name in MIRROR_NAMES),
    )
)

_log = logging.getLogger(__name__)



def read_text(path: Path) -> str | None:
    """The file's text, or None if it does not exist.

    Opened without following a symbolic link and without blocking; only a regular file of at most
    :data:`MAX_FILE_SIZE` bytes is read.

    Raises:
        StoreError: no permission to read it (the message names the file and its owner).
        CorruptRecordError: it cannot be used (one line naming it: a link, a FIFO, a directory, too
            large, not UTF-8, an I/O error).
    """
    try:
        fd, _ = fs.open_regular(path, fs.READ, max_size=MAX_FILE_SIZE)
    except FileNotFoundError:
        return None
    except fs.NotRegularFileError as exc:
        raise CorruptRecordError(str(exc)) from None
    except PermissionError:
        owner = _owner_name(path)
        raise StoreError(
            f"cannot read {path}: permission denied (it belongs to {owner}); run as {owner} or fix "
            "its owner; no token was requested"
        ) from None
    except OSError as exc:
        raise CorruptRecordError(f"cannot read {path.name}: {exc.strerror or exc}") from None
    try:
        data = fs.read_bytes(fd, MAX_FILE_SIZE)
    except OSError as exc:
        raise CorruptRecordError(f"cannot read {path.name}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_SIZE:  # it grew after fstat
        raise CorruptRecordError(f"{path} is over {MAX_FILE_SIZE // 1024} KiB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise CorruptRecordError(f"cannot read {path.name}: UnicodeDecodeError") from None


def write_file(path: Path, text: str) -> None:
    """Write a token-directory file atomically with mode 0600 (creating the directory 0700)."""
    prepare_directory(path.parent)
    atomic_write(path, text, FILE_MODE)


def write_problem(path: Path) -> str | None:
    """Why a token-directory file could not be written at ``path`` now (one line), or None.

    The name is taken by a directory (``lstat``; a link, a FIFO or a device is replaced whole by the
    atomic rename, never written through), the directory (or the nearest part of it that exists)
    cannot be written by this user, or it belongs to another user and this is not root.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        return f"cannot use {path}: {exc.strerror or exc}"
    if st is not None and stat.S_ISDIR(st.st_mode):
        return f"{path} is {fs.kind_of(st.st_mode)}, not a file: remove it"
    existing = path.parent
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    try:
        dir_st = os.stat(existing)
    except OSError as exc:
        return f"cannot use {existing}: {exc.strerror or exc}"
    if not stat.S_ISDIR(dir_st.st_mode):
        return f"cannot write {path}: {existing} is {fs.kind_of(dir_st.st_mode)}, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot write {path}: this user cannot write to {existing}"
    return _foreign_owner(existing, dir_st) if existing == path.parent else None


def remove_files(*paths: Path) -> list[str]:
    """Remove the files that exist (a link itself, never what it points to); return their paths.

    Raises:
        StoreError: one could not be removed (a directory, no permission); the others were.
    """
    removed, failed = [], []
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            reason = "it is a directory, not a file" if exc.errno == errno.EISDIR else exc.strerror or exc
            failed.append(f"cannot remove {path}: {reason}")
            continue
        removed.append(str(path))
    if failed:
        raise StoreError("; ".join(failed))
    return removed


def prepare_directory(directory: Path) -> None:
    """Create ``directory`` (and any missing parent) 0700; refuse a user who would leave files its
    owner cannot read; warn (once) if group or others may write in it.

    Raises:
        StoreError: it cannot be created, or it belongs to another user and we are not root.
    """
    try:
        st = _make_directory(directory)
    except OSError as exc:
        raise DirectoryError(f"cannot create {directory}: {exc.strerror or exc} (set KIS_TOKEN_DIR to a "
                             "directory this user can create)") from None
    check_directory_mode(directory, st)
    problem = _foreign_owner(directory, st)
    if problem is not None:
        raise DirectoryError(problem)


def check_directory_mode(directory: Path, st: os.stat_result | None = None) -> None:
    """Warn, once per process and directory, if group or others may write in ``directory``: another
    user could plant files (links, FIFOs) in it."""
    key = str(directory)
    if key in _checked_directories:
        return
    if st is None:
        try:
            st = os.stat(directory)
        except OSError:
            return  # not there yet: prepare_directory checks it when it makes it
    _checked_directories.add(key)
    if stat.S_ISDIR(st.st_mode) and st.st_mode & 0o022 and fs.has_permission_bits():
        _log.warning("the token directory %s can be written by %s (mode %04o): another user could plant "
                     "files in it; chmod 700 it", directory,
                     "group and others" if st.st_mode & 0o002 else "its group", stat.S_IMODE(st.st_mode))


_checked_directories: set[str] = set()


def _make_directory(directory: Path) -> os.stat_result:
    """``stat`` of ``directory``, creating it and each missing parent with mode 0700 first."""
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        missing = [directory]
        for parent in directory.parents:
            if os.path.lexists(parent):
                break
            missing.append(parent)
        for path in reversed(missing):
            try:
                os.mkdir(path, DIR_MODE)
            except FileExistsError:
                continue  # another process made it meanwhile
            os.chmod(path, DIR_MODE)  # the umask may have taken the owner's bits
        st = os.stat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
    return st


def _foreign_owner(directory: Path, st: os.stat_result) -> str | None:
    """Why this user must not write into ``directory`` (None: the owner, or root)."""
    if fs.effective_uid() in (None, 0, st.st_uid):
        return None
    owner = _owner_name(directory)
    who = "root" if owner == "root" else f"{owner} (or as root)"
    return (
        f"{directory} belongs to {owner}: run this command as {who}, or set KIS_TOKEN_DIR to a "
        "directory of your own; files written now could not be read by its owner"
    )


def hand_to_directory_owner(fd: int, directory: Path, current: os.stat_result | None = None) -> None:
    """When root writes into another user's directory, give the open file ``fd`` to that user.

    Only ever on a descriptor (``fchown``): a path could have been swapped for a link meanwhile; and
    never a file with another name elsewhere (a hard link someone planted to a file of root's).

    Args:
        fd: the open file.
        directory: the directory it is in.
        current: its ``fstat``, if known (then nothing is done when it already belongs to the owner).
    """
    if not fs.is_root():
        return
    owner = os.stat(directory)
    if owner.st_uid == 0:
        return
    current = current or os.fstat(fd)
    if current.st_nlink != 1:  # a hard link to a file elsewhere (someone else's): never give it away
        return
    if (current.st_uid, current.st_gid) != (owner.st_uid, owner.st_gid):
        fs.give_to(fd, owner.st_uid, owner.st_gid)


def remove_stale_temp_files(directory: Path) -> None:
    """Remove temp files older than :data:`STALE_TEMP_AGE` left by writers that were killed: only
    regular files named like the package's own (``.<a file we write>.<random>.tmp``)."""
    cutoff = time.time() - STALE_TEMP_AGE
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        for entry in entries:
            if not _OUR_TEMP.fullmatch(entry.name):
                continue
            with contextlib.suppress(OSError):
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and st.st_mtime < cutoff:
                    os.unlink(entry.path)


def atomic_write(path: Path, text: str, mode: int, what: str = "") -> None:
    """Replace ``path`` with ``text`` atomically: a reader sees the old file or the new, never half.

    Temp file in the same directory (created 0600, ``O_EXCL``: never through a link), fsync, fchmod
    ``mode``, handed (fchown) to the directory's owner when root writes into another user's
    directory, ``os.replace`` (which replaces the name, even a link or a FIFO, never what it points
    to), fsync of the directory. On failure the temp file is removed and the old file is left as it was.

    Raises:
        StoreError: one line naming ``what`` (default: the path) and the reason.
    """
    import tempfile  # only when writing: keeps `check` start-up lean

    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            fs.set_mode(handle.fileno(), mode)
            hand_to_directory_owner(handle.fileno(), path.parent)
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(exc, OSError):
            reason = ("it is a directory, not a file: remove it" if exc.errno == errno.EISDIR
                      else exc.strerror or exc)
            raise StoreError(f"cannot write {what or path}: {reason}") from None
        raise
    fs.fsync_directory(path.parent)


def _owner_name(path: Path) -> str:
    try:
        uid = os.lstat(path).st_uid
    except OSError:
        return "another user"
    return fs.owner_name(uid)


def open_shared(path: Path, what: str) -> int:
    """Open, creating it 0600, a small file that several processes lock and rewrite in place (a call
    budget, a session lease): never through a link, never truncated, a regular file of at most
    :data:`MAX_FILE_SIZE`; a new one is handed to the directory's owner. The caller closes it.

    Raises:
        StoreError: it is not a regular file, or cannot be opened (``what`` names it).
    """
    try:
        fd, st = fs.open_regular(path, fs.LOCK, FILE_MODE, max_size=MAX_FILE_SIZE)
    except fs.NotRegularFileError as exc:
        raise StoreError(f"cannot use the {what} {path}: it {exc.reason}; remove it") from None
    except FileNotFoundError:
        raise StoreError(f"cannot open {path}: the token directory is gone") from None
    except OSError as exc:
        raise StoreError(f"cannot open {path}: {exc.strerror or exc}") from None
    if st.st_size == 0:
        with contextlib.suppress(OSError):
            hand_to_directory_owner(fd, path.parent, st)
    return fd


def open_to_read(path: Path, what: str) -> int | None:
    """Open such a file for reading, creating nothing (None: there is none). The caller closes it.

    Raises:
        StoreError: it is not a regular file, or cannot be read (``what`` names it).
    """
    try:
        fd, _ = fs.open_regular(path, fs.READ, max_size=MAX_FILE_SIZE)
    except FileNotFoundError:
        return None
    except fs.NotRegularFileError as exc:
        raise StoreError(f"cannot use the {what} {path}: it {exc.reason}; remove it") from None
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc.strerror or exc}") from None
    return fd
