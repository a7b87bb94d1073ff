"""The file backend of the store (one host): a key's record, lock and state (files: ``common.store.files``).

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
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

from common.credentials.records import RECORD_TYPES
from common.errors import LockTimeoutError, StoreError
from common.store import fs
from common.store.files import (
    FILE_MODE,
    KIND_SUFFIXES,
    LOCK_POLL,
    check_directory_mode,
    hand_to_directory_owner,
    prepare_directory,
    read_text,
    remove_files,
    remove_stale_temp_files,
    write_file,
    write_problem,
)
from common.store.protocols import KeyStore, RenewalState

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
