"""A key's WebSocket session lease as a caller holds it: :class:`SessionLease` and :func:`open_session`.

The lease is taken on the host's file first (:mod:`common.session.file_lease`: processes of a host
queue there) and then, with ``KIS_TOKEN_STORE``, on the server (:mod:`common.session.redis_lease`:
hosts queue there), kept by a heartbeat thread while held, and given back in the reverse order. A
server that does not answer leaves the host's file lease in force, with a warning: never no lease,
never a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from common.errors import StoreUnreachableError
from common.session.file_lease import FileLease
from common.session.holder import DEFAULT_TIMES, Holder, LeaseHeld, SessionTimes, held_error, pace_delay
from common.settings import Settings, token_store_url

if TYPE_CHECKING:  # redis is imported only when KIS_TOKEN_STORE names a server
    from common.session.redis_lease import RedisLease

#: The longest wait a caller may ask for, seconds.
MAX_WAIT = 3600.0

T = TypeVar("T")


class WaitCancelled(Exception):
    """:meth:`SessionLease.acquire` gave up: its ``cancel`` was set (no lease is held)."""


_log = logging.getLogger(__name__)


class SessionLease:
    """One key's session lease, for one holding at a time (a new object per session).

    Args:
        local: the host's lease file.
        shared: the server's lease (None without ``KIS_TOKEN_STORE``).
        market: ``us`` or ``kr``: named in the records and the errors.
        times: the bounds (:class:`SessionTimes`).
        clock: wall-clock seconds (the records' ``since``, the file's pacing; tests inject a fake one).
        sleep: the blocking sleep (tests inject one that moves the fake clock).
        monotonic: the clock that bounds a wait (tests inject the fake clock here too).
    """

    def __init__(self, local: FileLease, shared: RedisLease | None, market: str, *,
                 times: SessionTimes = DEFAULT_TIMES, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.local, self.shared, self.market = local, shared, market
        self.times, self.clock, self.sleep, self.monotonic = times, clock, sleep, monotonic
        #: this process as the holder, while held
        self.holding: Holder | None = None
        #: True while the lease is kept on the server (False: the host's file only, server down)
        self.on_server = False
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._warned_lost = False
        self._warned_down = False
        #: makes giving back, and handing a lease taken in a worker thread over, one step each
        self._handover = threading.Lock()
        self._handed = False

    # -- taking and giving back ---------------------------------------------------------------

    def acquire(self, wait: float = 0.0, cancel: threading.Event | None = None) -> Holder:
        """Take the key's session lease, waiting at most ``wait`` seconds for its holder to let go,
        then the rest of the pacing interval (at most :attr:`SessionTimes.pace`) if the key's last
        session started less than that ago. Anything raised once the lease is taken (a
        ``KeyboardInterrupt`` in the pacing wait included) gives it back before it propagates.

        Args:
            wait: seconds to wait for the holder (0: refuse at once).
            cancel: set by another thread to give up (looked at on each poll, and once the lease is
                taken: a lease taken after it was set is given back at once).

        Returns:
            This process as the holder (``since`` is when the session may connect: now).

        Raises:
            SessionHeldError: another process or host held it all that time (the message names it).
            StoreError: the token directory's lease file cannot be used.
            ValueError: ``wait`` is not 0 .. :data:`MAX_WAIT`.
            WaitCancelled: ``cancel`` was set (no lease is held).
        """
        if not 0 <= wait <= MAX_WAIT:
            raise ValueError(f"wait must be 0 .. {MAX_WAIT:g} seconds, not {wait!r}")
        if self.holding is not None:
            raise RuntimeError("this session lease is held already: take a new one per session")
        deadline = self.monotonic() + wait
        self._warned_down = self._handed = False
        while True:
            if cancel is not None and cancel.is_set():
                raise WaitCancelled()
            try:
                start = self._try_take()
                break
            except LeaseHeld as held:
                left = deadline - self.monotonic()
                if left <= 0:
                    raise held_error(self.market, held.holder, self.clock(), wait) from None
                self._pause(min(self.times.poll, left), cancel)
        try:
            delay = start - self.clock()
            if delay > 0:
                self._pause(delay, cancel)
            with self._handover:
                cancelled = cancel is not None and cancel.is_set()
                self._handed = not cancelled
        except BaseException:
            self.release()
            raise
        if cancelled:
            self.release()
            raise WaitCancelled()
        assert self.holding is not None
        return self.holding

    def _pause(self, seconds: float, cancel: threading.Event | None) -> None:
        """Sleep ``seconds`` (in steps of at most a poll, looking at ``cancel``, when one is given)."""
        if cancel is None:
            self.sleep(seconds)
            return
        until = self.monotonic() + seconds
        while not cancel.is_set() and (left := until - self.monotonic()) > 0:
            self.sleep(min(self.times.poll, left))

    def _try_take(self) -> float:
        """One try at both leases, the server's first (so that a process refused anywhere is told the
        key's real holder), then the host's file; the session's start (wall clock) when both (or the
        file alone, the server not answering) are had."""
        now = self.clock()
        holder = Holder.this_process(self.market, now)
        server_delay = 0.0
        self.on_server = False
        if self.shared is not None:
            try:
                server_delay = self.shared.take(holder, self.times.ttl, self.times.pace)
                self.on_server = True
            except StoreUnreachableError as exc:
                if not self._warned_down:  # once per wait, not once per poll
                    self._warned_down = True
                    _log.warning("WebSocket session: the token store %s does not answer (%s); the %s key's "
                                 "session is held for this host only (%s) until it does: another "
                                 "host could connect meanwhile", self.shared.link.url, exc, self.market,
                                 self.local.location)
        try:
            last = self.local.take()
        except BaseException:
            self._let_server_go()
            raise
        try:
            start = now + max(server_delay, pace_delay(last, now, self.times.pace))
            self.holding = Holder(holder.host, holder.pid, holder.market, start)
            self.local.record(self.holding, start)  # at once: a process refused the lock reads it
        except BaseException:
            self.holding = None
            self._let_server_go()
            self.local.release(last if last is not None and math.isfinite(last) else 0.0)  # as it was
            raise
        if self.shared is not None:
            self._start_heartbeat()
        return start

    def _let_server_go(self) -> None:
        if self.on_server and self.shared is not None:
            with contextlib.suppress(StoreUnreachableError):
                self.shared.release()
        self.on_server = False

    def release(self) -> None:
        """Give the lease back (the server's first, then the host's file); safe to call twice. In a
        fork's child (another pid than the holder's) nothing is given back: its parent holds it."""
        with self._handover:
            holding, self.holding = self.holding, None
        if holding is None:
            return
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
            self._beat = None
        if holding.pid != os.getpid():  # a fork's child: the lease is its parent's, left as it is
            self.on_server = False
            self.local.release()
            return
        try:
            if self.on_server and self.shared is not None:
                try:
                    self.shared.release()
                except StoreUnreachableError:
                    _log.warning("WebSocket session: cannot release %s (the store does not answer); it "
                                 "lapses within %g s", self.shared.location, self.times.ttl)
        finally:
            self.on_server = False
            self.local.release(holding.since)

    # -- the heartbeat ------------------------------------------------------------------------

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name=f"kis-session-{self.market}", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.times.heartbeat):
            self.beat()

    def beat(self) -> None:
        """Extend the server's lease once (what the heartbeat thread does every
        :attr:`SessionTimes.heartbeat` seconds); take it there if this host holds the session on its
        file alone (the server did not answer when the session started) and it is free."""
        shared, holding = self.shared, self.holding
        if shared is None or holding is None:
            return
        try:
            # insist: the link's rest after a failure (5 s) must not skip beats until the lease lapses
            if self.on_server and shared.extend(self.times.ttl, insist=True):
                return
            shared.take(holding, self.times.ttl, 0.0, insist=True)  # connected already: not paced again
        except StoreUnreachableError:
            return  # StoreLink logged it; the file lease holds for the host meanwhile
        except LeaseHeld as held:
            if self.on_server or not self._warned_lost:
                who = held.holder.describe() if held.holder else "another owner"
                _log.error("WebSocket session: the %s key's lease on %s is held by %s while this process "
                           "(pid %d) still holds its session: the broker will refuse one of them (OPSP8996)",
                           self.market, shared.location, who, holding.pid)
            self._warned_lost = True
            self.on_server = False
            return
        if not self.on_server:
            _log.warning("WebSocket session: the %s key's lease is held on %s again", self.market,
                         shared.location)
        self.on_server = True

    # -- as a caller uses it ------------------------------------------------------------------

    @contextlib.contextmanager
    def hold(self, wait: float, then: Callable[[], T]) -> Iterator[T]:
        """Hold the lease for the ``with`` block, which gets ``then()`` (the approval key); given back
        on every way out (an exception, ``KeyboardInterrupt`` included, while taking it as well)."""
        if self.holding is not None:
            raise RuntimeError("this session lease is held already: take a new one per session")
        try:
            self.acquire(wait)
            yield then()
        finally:
            self.release()

    @contextlib.asynccontextmanager
    async def hold_async(self, wait: float, then: Callable[[], Awaitable[T]]) -> AsyncIterator[T]:
        """:meth:`hold` for asyncio: the waits run in a worker thread (the loop keeps running). A task
        cancelled meanwhile (or a loop that ends) tells the thread to give up; a lease it took
        already is given back, in a worker thread, never on the loop."""
        cancel = threading.Event()
        taking = asyncio.ensure_future(asyncio.to_thread(self.acquire, wait, cancel))
        taking.add_done_callback(lambda done: done.cancelled() and cancel.set())
        try:
            await asyncio.shield(taking)
        except BaseException:
            with self._handover:
                cancel.set()
                taken = self._handed  # the thread returned the lease: no one else gives it back
            if taken:
                await asyncio.to_thread(self.release)
            raise
        try:
            yield await then()
        finally:
            await asyncio.to_thread(self.release)

    def holder(self) -> Holder | None:
        """Who holds the key's session now (the server's lease first; None: no one)."""
        if self.shared is not None:
            with contextlib.suppress(StoreUnreachableError):
                found = self.shared.holder()
                if found is not None:
                    return found
        return self.local.holder()


def open_session(settings: Settings, directory: Path, key_id: str, market: str, *,
                 times: SessionTimes | None = None, **options: Any) -> SessionLease:
    """A session lease of key ``key_id`` as ``settings`` configure it: the token directory's file,
    and the server's lease when ``KIS_TOKEN_STORE`` names one.

    Args:
        settings: the configuration.
        directory: the token directory (``KIS_TOKEN_DIR``).
        key_id: :attr:`Credential.key_id` of the key.
        market: ``us`` or ``kr``.
        times: the bounds (default :data:`DEFAULT_TIMES`).
        options: ``clock`` and ``sleep`` for :class:`SessionLease`.

    Raises:
        ConfigError: ``KIS_TOKEN_STORE`` cannot be used (the message names it).
    """
    url = token_store_url(settings)
    shared = None
    if url is not None:
        from common.session.redis_lease import RedisLease
        from common.store.redis_link import link

        shared = RedisLease(link(url), key_id)
    return SessionLease(FileLease(directory, key_id), shared, market, times=times or DEFAULT_TIMES,
                        **options)
