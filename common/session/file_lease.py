"""The session lease of one host: ``key-<id>.session`` in the token directory, ``flock``-ed for the
whole session.

The holder keeps the file open and locked (``flock`` on its own descriptor) for as long as it keeps
the session; the kernel drops the lock the moment the holder dies, SIGKILL included, so the next
process of the host takes the lease at once (after the pacing interval, below). The file also says
who holds it: one JSON record (the holder's host, pid, market and ``since``, and the last lease's
start, which paces the next), padded to :data:`RECORD_SIZE` bytes and rewritten in place (never
replaced: a new inode would be a second lock). A process refused the lock reads it to name the holder.

The file is opened as every token-directory file is (``common.store.fs``): never through a symbolic
link, never blocking on a FIFO, only if it is a regular file of at most
:data:`common.store.files.MAX_FILE_SIZE` bytes; created 0600 and handed to the directory's owner
when root creates it. It is never deleted (deleting a lock file breaks mutual exclusion).

The descriptor is close-on-exec, and a child of ``os.fork()`` closes the ones it inherits at once
(``os.register_at_fork``): the ``flock`` belongs to the open file, which a child would share, so a
child's unlock would free its parent's lease and a child that lives on would keep a killed parent's.
Only the process that took the lease unlocks it or writes its record.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import time
import weakref
from pathlib import Path

from common.errors import StoreError
from common.session.holder import Holder, LeaseHeld, decode_record, encode_record
from common.store import files, fs

#: Bytes of a lease record (JSON padded with spaces): every write is the same size, in place.
RECORD_SIZE = 512
#: How long a process refused the lock reads the record again while it names no live holder.
READ_AGAIN = 0.1

_log = logging.getLogger(__name__)


class FileLease:
    """One key's session lease in ``key-<id>.session`` of the token directory.

    Args:
        directory: the token directory (``KIS_TOKEN_DIR``); made 0700 on first use if missing.
        key_id: :attr:`Credential.key_id` of the key.
    """

    def __init__(self, directory: Path, key_id: str) -> None:
        self.path = Path(directory) / f"key-{key_id}.session"
        self.location = str(self.path)
        self._fd: int | None = None
        self._pid = 0  # the process that took it

    @property
    def held(self) -> bool:
        """True while this object holds the lease."""
        return self._fd is not None

    def take(self) -> float | None:
        """Take the lease without waiting; return the last lease's start (None: never; ``nan``: the
        record could not be read, so pace as if a lease started just now).

        Raises:
            LeaseHeld: another process (or another lease object of this one) holds it.
            StoreError: the file cannot be used (not a regular file, no permission).
        """
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this lease")
        fd = self._open()
        try:
            if not fs.try_lock(fd):
                raise LeaseHeld(self._holder_of_locked(fd))
        except OSError as exc:
            os.close(fd)
            raise StoreError(f"cannot lock {self.path}: {exc.strerror or exc}") from None
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._pid = fd, os.getpid()
        _held.add(self)
        found = self._read(fd)
        if found is not None:
            return found[1]
        if self._has_data(fd):
            _log.warning("%s is not a session lease record this package wrote; pacing the key as if a "
                         "session started just now, and rewriting it", self.path)
            return math.nan
        return None

    def record(self, holder: Holder | None, start: float) -> None:
        """Write the held lease's record: ``holder`` (None once done) and its start.

        Raises:
            StoreError: it cannot be written.
        """
        if self._fd is None:
            raise RuntimeError(f"{self.path} is not held by this lease")
        data = encode_record(holder, start).encode().ljust(RECORD_SIZE)
        try:
            fs.pwrite(self._fd, data[:RECORD_SIZE], 0)
        except OSError as exc:
            raise StoreError(f"cannot write {self.path}: {exc.strerror or exc}") from None

    def release(self, start: float | None = None) -> None:
        """Let the lease go (recording that no one holds it, and ``start`` for the pacing); in another
        process than the one that took it (a fork's child), only close the descriptor."""
        fd, self._fd = self._fd, None
        _held.discard(self)
        if fd is None:
            return
        if self._pid != os.getpid():  # a fork's child: the lock and the record are its parent's
            with contextlib.suppress(OSError):
                os.close(fd)
            return
        try:
            if start is not None:
                with contextlib.suppress(OSError):
                    fs.pwrite(fd, encode_record(None, start).encode().ljust(RECORD_SIZE), 0)
            with contextlib.suppress(OSError):
                fs.unlock(fd)
        finally:
            os.close(fd)

    def holder(self) -> Holder | None:
        """Who holds the lease now (None: no one), without taking it; nothing is created.

        Raises:
            StoreError: the file is not a regular file, or cannot be read.
        """
        fd = files.open_to_read(self.path, "session lease file")
        if fd is None:
            return None
        try:
            if fs.try_lock(fd):  # free: let it go at once
                fs.unlock(fd)
                return None
            found = self._read(fd)
            return found[0] if found else None
        except OSError as exc:
            raise StoreError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        finally:
            os.close(fd)

    # -- the file -----------------------------------------------------------------------------

    def _holder_of_locked(self, fd: int) -> Holder | None:
        """The holder a lock another process holds names. It writes its record right after taking
        the lock, so a record that names no one, or a process of this host that is gone, is read
        again for up to :data:`READ_AGAIN` seconds (the message should name the real holder)."""
        deadline = time.monotonic() + READ_AGAIN
        while True:
            found = self._read(fd)
            holder = found[0] if found else None
            if (holder is not None and _alive(holder)) or time.monotonic() >= deadline:
                return holder
            time.sleep(0.002)

    def _read(self, fd: int) -> tuple[Holder | None, float] | None:
        """The record (read up to three times: a read torn by the holder's write fails to parse)."""
        for _ in range(3):
            try:
                data = fs.pread(fd, RECORD_SIZE + 1, 0)
            except OSError:
                return None
            try:
                found = decode_record(data.decode("utf-8"))
            except UnicodeDecodeError:
                found = None
            if found is not None or not data:
                return found
        return None

    @staticmethod
    def _has_data(fd: int) -> bool:
        try:
            return os.fstat(fd).st_size > 0
        except OSError:
            return True

    def _open(self) -> int:
        files.prepare_directory(self.path.parent)
        return files.open_shared(self.path, "session lease file")


#: The leases this process holds (a fork's child closes their descriptors).
_held: weakref.WeakSet[FileLease] = weakref.WeakSet()


def _close_inherited() -> None:
    """In a fork's child: close the descriptors of its parent's leases (never unlock them)."""
    for lease in list(_held):
        fd, lease._fd = lease._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited)


def _alive(holder: Holder) -> bool:
    """False only when ``holder`` is a process of this host that no longer runs (POSIX; elsewhere,
    and for other hosts, True: signal 0 is no probe on Windows)."""
    if os.name != "posix" or holder.host != socket.gethostname()[:64]:
        return True
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True
