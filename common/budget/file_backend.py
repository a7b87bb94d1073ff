"""The call budget of one host: a small state file per key in the token directory.

``key-<id>.budget`` (``<id>`` is :attr:`Credential.key_id`, e.g. ``real-5fda05f056d87ade``) holds the
key's GCRA ``tat``, the time it was written, and the per-second counters of calls and ``EGW00201``
answers, in a fixed binary layout of :data:`SIZE` bytes closed by a CRC-32. Every process of the key
on the host reads and rewrites it in place under ``flock`` (held for a few microseconds: read,
compute, write), so they share one budget; the wait that follows is slept outside the lock.

The file is opened as every token-directory file is (``common.store.fs``): never through a symbolic
link, never blocking on a FIFO, only if it is a regular file; created 0600 and handed to the
directory's owner when root creates it. A file of the wrong size, magic or checksum (a crash mid
write, someone's edit) is a warning and a state that errs on the safe side: the budget counts as
spent just now, never as free.

Times are on the clock given (``time.monotonic`` by default: on Linux, macOS and Windows one clock
for the whole host that never steps, so every process agrees and NTP cannot move a slot). A state
written "after now" (the host rebooted, its monotonic clock started again) is kept as far ahead as
it was (:func:`common.budget.pacing.sane_tat`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from common.budget.pacing import BUCKETS, Pacing, bump, empty_buckets, recent, reserve, sane_tat
from common.budget.protocol import Counts, NoSlotWithin
from common.errors import BudgetTimeoutError, StoreError
from common.store import files, fs

MAGIC = b"KISB"
VERSION = 1
_BODY = struct.Struct(f"<4sHHddQ{BUCKETS}q{BUCKETS}I{BUCKETS}q{BUCKETS}I")
_CRC = struct.Struct("<I")
#: Bytes in a budget file.
SIZE = _BODY.size + _CRC.size
#: A process waiting for the file's lock tries again after this long at first, doubling up to
#: :data:`LOCK_POLL_MAX` (the lock is held for microseconds; a longer hold is a stopped process).
LOCK_POLL_MIN, LOCK_POLL_MAX = 0.0001, 0.002
#: The shortest wait for the file's lock, whatever the caller's timeout.
LOCK_WAIT_MIN = 0.5

T = TypeVar("T")
_log = logging.getLogger(__name__)


class BudgetState:
    """The decoded contents of a budget file (mutable: read, changed, written back under the lock)."""

    __slots__ = ("call_counts", "call_seconds", "refusal_counts", "refusal_seconds", "refusals_total", "tat",
                 "written_at")

    def __init__(self, tat: float = -math.inf, written_at: float = -math.inf) -> None:
        #: the key's theoretical arrival time (-inf: never used; NaN: unknown, taken as just spent)
        self.tat = tat
        self.written_at = written_at
        self.refusals_total = 0
        self.call_seconds, self.call_counts = empty_buckets()
        self.refusal_seconds, self.refusal_counts = empty_buckets()

    @classmethod
    def decode(cls, data: bytes) -> BudgetState | None:
        """The state in ``data``; None if it is not a whole, intact budget file."""
        if len(data) != SIZE or _CRC.unpack_from(data, _BODY.size)[0] != zlib.crc32(data[:_BODY.size]):
            return None
        fields = _BODY.unpack_from(data)
        if fields[0] != MAGIC or fields[1] != VERSION:
            return None
        state = cls(fields[3], fields[4])
        state.refusals_total = fields[5]
        at = 6
        for name in ("call_seconds", "call_counts", "refusal_seconds", "refusal_counts"):
            setattr(state, name, list(fields[at:at + BUCKETS]))
            at += BUCKETS
        return state

    def encode(self) -> bytes:
        """The bytes of a budget file holding this state."""
        body = _BODY.pack(MAGIC, VERSION, 0, self.tat, self.written_at, self.refusals_total,
                          *self.call_seconds, *self.call_counts, *self.refusal_seconds, *self.refusal_counts)
        return body + _CRC.pack(zlib.crc32(body))

    def counts(self, now: float) -> Counts:
        """The counters as of ``now``."""
        second = math.floor(now)
        return Counts(recent(self.call_seconds, self.call_counts, second),
                      recent(self.refusal_seconds, self.refusal_counts, second), self.refusals_total)


class FileBudget:
    """One key's budget in ``key-<id>.budget`` of the token directory (see the module docstring).

    Args:
        directory: the token directory (``KIS_TOKEN_DIR``); made 0700 on first use if missing.
        key_id: :attr:`Credential.key_id` of the key.
        clock: seconds on a clock every process of the host shares (tests inject a fake one).
    """

    kind = "file"

    def __init__(self, directory: Path, key_id: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(directory) / f"key-{key_id}.budget"
        self.location = str(self.path)
        self.clock = clock
        self._prepared = False
        self._warned_corrupt = False

    def reserve(self, pacing: Pacing, max_wait: float, not_before: float = -math.inf) -> float:
        """See :meth:`BudgetBackend.reserve`; the lock is waited for at most ``max(max_wait,``
        :data:`LOCK_WAIT_MIN` ``)`` seconds.

        Args:
            not_before: no slot before this time (on :attr:`clock`): the caller knows of calls up
                to then that the file did not count (a server's slots, when it stopped answering).
        """

        def take(state: BudgetState, now: float) -> float:
            tat = max(sane_tat(state.tat, now, now, pacing), not_before)
            granted = reserve(tat, now, pacing, max_wait)
            if granted is None:
                raise NoSlotWithin(max(now, tat - pacing.tolerance) - now)
            slot, state.tat = granted
            bump(state.call_seconds, state.call_counts, math.floor(now))
            return slot - now

        return self._update(take, max(max_wait, LOCK_WAIT_MIN))

    def note_refusal(self) -> None:
        """Count one ``EGW00201`` answer in the file."""

        def count(state: BudgetState, now: float) -> None:
            bump(state.refusal_seconds, state.refusal_counts, math.floor(now))
            state.refusals_total += 1

        self._update(count, LOCK_WAIT_MIN)

    def counts(self) -> Counts:
        """The file's counters now (all zero when there is no file yet, or it cannot be decoded).

        Read without the lock and without creating anything, so a user who may only read the token
        directory (monitoring) can call it; a read torn by a writer fails its checksum and is read
        again.

        Raises:
            StoreError: the file is not a regular file, or cannot be read.
        """
        fd = files.open_to_read(self.path, "call budget file")
        if fd is None:
            return Counts()
        try:
            for _ in range(3):
                state = BudgetState.decode(fs.pread(fd, SIZE + 1, 0))
                if state is not None:
                    return state.counts(self.clock())
        except OSError as exc:
            raise StoreError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        finally:
            os.close(fd)
        return Counts()

    def schedule_end(self, pacing: Pacing) -> float:
        """The file's next free slot (its ``tat``, on :attr:`clock`): every slot the file granted
        is before it; ``-inf`` when there is no file or it cannot be decoded. Read without the lock.

        Raises:
            StoreError: the file is not a regular file, or cannot be read.
        """
        fd = files.open_to_read(self.path, "call budget file")
        if fd is None:
            return -math.inf
        try:
            for _ in range(3):
                state = BudgetState.decode(os.pread(fd, SIZE + 1, 0))
                if state is not None:
                    now = self.clock()
                    return sane_tat(state.tat, state.written_at, now, pacing)
        except OSError as exc:
            raise StoreError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        finally:
            os.close(fd)
        return -math.inf

    # -- the file -----------------------------------------------------------------------------

    def _update(self, change: Callable[[BudgetState, float], T], lock_wait: float) -> T:
        """Read the state, ``change`` it, and write it back, all under the file's lock. A change that
        raises writes nothing."""
        with self._locked(lock_wait) as fd:
            state = self._read(fd)
            now = self.clock()
            if state.written_at > now and math.isfinite(state.tat):  # the clock went back (a reboot)
                state.tat = now + (state.tat - state.written_at)
            state.written_at = now
            result = change(state, now)
            try:
                fs.pwrite(fd, state.encode(), 0)
            except OSError as exc:
                raise StoreError(f"cannot write {self.path}: {exc.strerror or exc}") from None
            return result

    def _read(self, fd: int) -> BudgetState:
        try:
            data = fs.pread(fd, SIZE + 1, 0)
        except OSError as exc:
            raise StoreError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        if not data:
            return BudgetState()  # a new file: the budget is free
        state = BudgetState.decode(data)
        if state is None:
            if not self._warned_corrupt:
                self._warned_corrupt = True
                _log.warning("%s is not a budget file this package wrote (%d bytes); counting the key's "
                             "budget as spent just now and rewriting it", self.path, len(data))
            with contextlib.suppress(OSError):
                os.ftruncate(fd, SIZE)
            return BudgetState(math.nan, math.nan)  # sane_tat: spent just now
        return state

    @contextlib.contextmanager
    def _locked(self, lock_wait: float) -> Iterator[int]:
        """The open, ``flock``-ed budget file (created if missing), for at most ``lock_wait`` s of waiting.

        Raises:
            BudgetTimeoutError: another process held the lock all that time.
            StoreError: the file cannot be opened or locked (not a regular file, no permission).
        """
        fd = self._open()
        try:
            deadline = time.monotonic() + lock_wait
            poll = LOCK_POLL_MIN
            while not self._try_lock(fd):
                if time.monotonic() >= deadline:
                    raise BudgetTimeoutError(
                        f"another process held the call budget's lock {self.path} for over {lock_wait:g} s "
                        "(a stopped process?)"
                    )
                time.sleep(poll)
                poll = min(poll * 2, LOCK_POLL_MAX)
            yield fd
        finally:
            os.close(fd)  # releases the lock

    def _try_lock(self, fd: int) -> bool:
        try:
            return fs.try_lock(fd)
        except OSError as exc:
            raise StoreError(f"cannot lock {self.path}: {exc.strerror or exc}") from None

    def _open(self) -> int:
        if not self._prepared:
            files.prepare_directory(self.path.parent)
            self._prepared = True
        try:
            return files.open_shared(self.path, "call budget file")
        except StoreError:
            self._prepared = False  # the directory may have gone away meanwhile: prepare it again
            raise
