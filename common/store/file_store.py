"""The file backend of the store (one host): a key's record, lock and state; the file primitives.

In the token directory, per key (``<id>`` is :attr:`Credential.key_id`, e.g. ``real-5fda05f056d87ade``):

``key-<id>.json``    the key's token record, shared by every market that uses the key
``key-<id>.lock``    the key's cross-process renewal lock (``flock``; never deleted)
``key-<id>.state``   the key's renewal memory: last request, outcome, counters (JSON)
``key-<id>.approval.json|.lock|.state``   the same three for the key's WebSocket approval key

and per market the story's files (``common.store.mirror``), mirrors of the key's record.

Writes are atomic (temp file in the same directory, fsync, ``os.replace``), files are 0600 and the
directory 0700. When root writes into a directory that another user owns (an admin shell in the
bot's directory), every file is handed to the directory's owner; any other user who is not the
owner is refused before a request is sent. A file that cannot be read for lack of permission is an
error naming the file and its owner, never a missing token. Nothing is ever unpickled.

Nothing here trusts what it finds at a name (another user, or a crash, may have left anything
there): every file is opened without following a symbolic link and without blocking
(``common.store.fs``), and used only if ``fstat`` says it is a regular file of at most
:data:`MAX_FILE_SIZE` bytes; anything else (a link, a FIFO, a directory, a 2 GB file) is a
one-line warning and a miss, never a hang. Ownership is changed only on an open descriptor
(``fchown``), never on a path, so a link swapped in by the directory's owner never hands root's
files to it. The lock file is opened the same way (never truncated) and locked with ``flock``.
The temp-file sweep removes only the package's own temp files.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

from common.credentials.records import RECORD_TYPES
from common.errors import CorruptRecordError, DirectoryError, LockTimeoutError, StoreError
from common.store import fs
from common.store.protocols import KeyStore, RenewalState

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

R = TypeVar("R")
_log = logging.getLogger(__name__)


# -- the pieces of a key's store -------------------------------------------------------------------


class FileRecordStore(Generic[R]):
    """One record in one file, parsed and written by the given functions."""

    def __init__(self, path: Path, parse: Callable[[str], R], dump: Callable[[R], str]) -> None:
        self.path = path
        self.location = str(path)
        self._parse = parse
        self._dump = dump

    def signature(self) -> object:
        """(inode, size, mtime) of the name itself (``lstat``), or None if there is none."""
        try:
            st = os.lstat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def load(self) -> R | None:
        """Read and check the file (None if it does not exist).

        Raises:
            CorruptRecordError: it cannot be used (not a regular file, too large, not a record).
            StoreError: no permission to read it.
        """
        check_directory_mode(self.path.parent)
        text = read_text(self.path)
        return None if text is None else self._parse(text)

    def save(self, record: R) -> None:
        """Write the file atomically, then sweep temp files left by killed writers."""
        write_file(self.path, self._dump(record))
        remove_stale_temp_files(self.path.parent)

    def delete(self) -> list[str]:
        """Remove the file; return its path if it was there."""
        return remove_files(self.path)

    def problem(self) -> str | None:
        """Why the record could not be written now (one line naming the path), or None.

        For ``check`` to show; :meth:`ready` raises it.
        """
        return write_problem(self.path)

    def ready(self) -> None:
        """Raise unless the record can be written (checked before a request is sent).

        Raises:
            StoreError: one line naming the path and what is wrong (``…/key-real-x.json is a
                directory, not a file: remove it``).
        """
        problem = self.problem()
        if problem is not None:
            raise StoreError(problem)


class FileRenewalLock:
    """``flock`` on a lock file: the kernel releases it if the holder dies; the file is never deleted
    (deleting it would break mutual exclusion) and never truncated.

    The file is opened without following a symbolic link and without blocking, must be a regular
    file, and is handed to the directory's owner on its descriptor when root creates it in another
    user's directory. Re-entrant within a thread (a depth counted per thread and per object); other
    threads (each with its own descriptor) and other processes wait.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.location = str(path)
        self._held = threading.local()

    @contextlib.contextmanager
    def hold(self, timeout: float) -> Iterator[None]:
        """Hold the lock, waiting at most ``timeout`` seconds (0: one try; below 0: no limit).

        Raises:
            LockTimeoutError: another process (or thread) held it all that time.
            StoreError: it cannot be taken at all (the lock file is not a regular file, no access).
        """
        held = self._held
        if getattr(held, "fd", None) is not None:
            held.depth += 1
            try:
                yield
            finally:
                held.depth -= 1
            return
        fd = self._acquire(timeout)
        held.fd, held.depth = fd, 1
        _log.debug("holding the lock %s", self.path)
        try:
            yield
        finally:
            held.fd = None
            with contextlib.suppress(OSError):
                fs.unlock(fd)
            os.close(fd)
            _log.debug("released the lock %s", self.path)

    def confirm(self) -> None:
        """Raise unless this thread still holds the lock.

        A ``flock`` cannot lapse; but if the lock file was removed or replaced while held, another
        process would lock the new file: that is said too.

        Raises:
            LockTimeoutError: not held by this thread, or the file it locks is no longer at its path.
        """
        fd = getattr(self._held, "fd", None)
        if fd is None:
            raise LockTimeoutError(f"{self.path.name} is not held by this thread")
        try:
            locked, named = os.fstat(fd), os.lstat(self.path)
            same = (locked.st_dev, locked.st_ino) == (named.st_dev, named.st_ino)
        except OSError:
            same = False
        if not same:
            raise LockTimeoutError(f"{self.path} was removed or replaced while held: another process may "
                                   "be renewing")

    def _acquire(self, timeout: float) -> int:
        prepare_directory(self.path.parent)
        fd = self._open()
        deadline = time.monotonic() + timeout
        tries = 0
        try:
            while True:
                try:
                    if fs.try_lock(fd):
                        return fd
                except OSError as exc:
                    raise StoreError(f"cannot lock {self.path}: {exc.strerror or exc}") from None
                tries += 1
                if tries == 1 and timeout != 0:
                    _log.debug("waiting up to %g s for the lock %s", timeout, self.path)
                left = deadline - time.monotonic()
                if timeout >= 0 and left <= 0:
                    raise LockTimeoutError(
                        f"another process held {self.path.name} for more than {timeout:g} s"
                    )
                time.sleep(LOCK_POLL if timeout < 0 else min(LOCK_POLL, left))
        except BaseException:
            os.close(fd)
            raise

    def _open(self) -> int:
        """Open (or create, 0600) the lock file: never through a link, never truncated."""
        try:
            fd, st = fs.open_regular(self.path, fs.LOCK, FILE_MODE)
        except fs.NotRegularFileError as exc:
            raise StoreError(f"cannot lock {self.path}: it {exc.reason}; remove it") from None
        except OSError as exc:
            raise StoreError(f"cannot lock {self.path}: {exc.strerror or exc}") from None
        with contextlib.suppress(OSError):
            if stat.S_IMODE(st.st_mode) != FILE_MODE and st.st_uid == fs.effective_uid():
                fs.set_mode(fd, FILE_MODE)
            hand_to_directory_owner(fd, self.path.parent, st)
        return fd


class FileStateStore:
    """The key's :class:`RenewalState` in a JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.location = str(path)

    def load(self) -> RenewalState:
        """Read the state; a missing file is a fresh state."""
        text = read_text(self.path)
        return RenewalState() if text is None else RenewalState.from_json(text)

    def save(self, state: RenewalState) -> None:
        """Write the state atomically."""
        write_file(self.path, json.dumps(state.to_dict(), indent=2))


def key_store(directory: Path, key_id: str, kind: str = "token") -> KeyStore[Any]:
    """The file pieces of one key's store of ``kind`` (``token`` or ``approval``) in ``directory``."""
    record_type = RECORD_TYPES[kind]
    stem = directory / f"key-{key_id}{KIND_SUFFIXES[kind]}"
    return KeyStore(
        FileRecordStore(stem.with_name(stem.name + ".json"), record_type.from_json, record_type.to_json),
        FileRenewalLock(stem.with_name(stem.name + ".lock")),
        FileStateStore(stem.with_name(stem.name + ".state")),
    )


# -- file primitives ---------------------------------------------------------------------------------


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
