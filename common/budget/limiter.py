"""The per-key call budget a caller uses: :class:`CallBudget` and :func:`open_budget`.

``acquire()`` returns when the caller may send its request (having slept the wait), ``await
acquire_async()`` does the same without blocking the event loop, ``note_refusal()`` counts an
``EGW00201`` answer, and ``snapshot()`` says what the budget saw. The pacing is
:mod:`common.budget.pacing`; the state lives in a backend (:mod:`common.budget.file_backend` on one
host, :mod:`common.budget.redis_backend` across hosts).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Any

from common.budget.file_backend import FileBudget
from common.budget.pacing import MAX_WAIT, Pacing
from common.budget.protocol import BudgetBackend, NoSlotWithin
from common.errors import BudgetTimeoutError
from common.settings import RATE_LIMIT_VAR, Settings, token_store_url

#: How long ``acquire()`` waits for a slot unless told otherwise, seconds.
DEFAULT_TIMEOUT = 30.0


@dataclass(frozen=True)
class BudgetSnapshot:
    """What one key's budget saw (for ``check``, ``status`` and the metrics).

    Attributes:
        rate: the broker's limit, calls a second (``KIS_RATE_LIMIT`` or the environment's default).
        paced_rate: the rate the budget spaces calls at when busy (a little under ``rate``).
        calls_last_minute: slots granted to the key's callers (every process and host sharing the
            budget) in the last 60 s.
        egw00201_seen: ``EGW00201`` answers noted in the last 60 s.
        egw00201_total: ``EGW00201`` answers noted since the budget's state was made.
        backend: where the state is: ``file``, ``redis``, or ``file`` with ``store_down``.
        store_down: a token store is configured but does not answer (the host paces on its own).
        hosts: hosts that used the budget in the last minute (with a store; else 1).
        location: where the state is (the file's path, or the masked server URL and key name).
    """

    rate: float
    paced_rate: float
    calls_last_minute: int
    egw00201_seen: int
    egw00201_total: int
    backend: str
    store_down: bool = False
    hosts: int = 1
    location: str = ""


@dataclass
class CallBudget:
    """One app key's calls-a-second budget, shared through ``backend`` by every process (and host)
    that uses the same state.

    Args:
        backend: where the state lives (:class:`FileBudget`, or :class:`SharedBudget` with a store).
        pacing: the key's rate and spacing.
        key_id: :attr:`Credential.key_id` of the key (for messages).
        sleep: the blocking sleep (``time.sleep``; tests inject a fake one).
        async_sleep: the awaitable sleep (default ``asyncio.sleep``; asyncio is imported only by the
            first ``acquire_async()``, so that ``check`` never pays for it).
        timeout: how long ``acquire()`` waits at most when not told (seconds).
    """

    backend: BudgetBackend
    pacing: Pacing
    key_id: str
    _: KW_ONLY
    sleep: Callable[[float], None] = time.sleep
    async_sleep: Callable[[float], Awaitable[None]] | None = None
    timeout: float = DEFAULT_TIMEOUT

    @property
    def rate(self) -> float:
        """The broker's limit for the key, calls a second."""
        return self.pacing.rate

    def reserve(self, timeout: float | None = None) -> float:
        """Reserve the key's next slot without waiting for it; return the seconds until it.

        The caller must not send before that many seconds have passed (``acquire()`` sleeps them).

        Raises:
            BudgetTimeoutError: no slot within ``timeout`` seconds (default :attr:`timeout`): nothing
                was reserved.
            StoreError: the budget's file cannot be used.
        """
        limit = self._limit(timeout)
        try:
            return self.backend.reserve(self.pacing, limit)
        except NoSlotWithin as exc:
            raise BudgetTimeoutError(
                f"the call budget of {self.key_id} ({self.rate:g} a second, {self.backend.location}) has "
                f"no free slot within {limit:g} s (the next is in {exc.wait:.1f} s): other processes "
                "of this key are spending it; wait longer or call less often",
                retry_in=exc.wait,
            ) from None

    def acquire(self, timeout: float | None = None) -> float:
        """Return when the caller may send one request, having slept until the key's next slot.

        Args:
            timeout: wait at most this long (seconds; default :attr:`timeout`, at most 600).

        Returns:
            The seconds slept.

        Raises:
            BudgetTimeoutError: no slot within ``timeout``: raised at once, nothing reserved.
            StoreError: the budget's file cannot be used.
        """
        wait = self.reserve(timeout)
        if wait > 0:
            self.sleep(wait)
        return wait

    async def acquire_async(self, timeout: float | None = None) -> float:
        """:meth:`acquire` for asyncio code: the reservation runs in a worker thread (a file lock or a
        server round trip never holds up the loop) and the wait is awaited.

        Returns:
            The seconds waited.

        Raises:
            BudgetTimeoutError: as :meth:`acquire`.
        """
        import asyncio

        wait = await asyncio.to_thread(self.reserve, timeout)
        if wait > 0:
            await (self.async_sleep or asyncio.sleep)(wait)
        return wait

    def note_refusal(self) -> None:
        """Count one ``EGW00201`` answer the caller got (the broker saw more than the rate: another
        program on the key, or a host on its own while the store was down)."""
        self.backend.note_refusal()

    def snapshot(self) -> BudgetSnapshot:
        """The key's rate and counters now."""
        counts = self.backend.counts()
        active = "file" if counts.fallback else getattr(self.backend, "active", self.backend.kind)
        return BudgetSnapshot(self.rate, self.pacing.achieved_rate, counts.calls_last_minute,
                              counts.refusals_last_minute, counts.refusals_total, active,
                              store_down=active != self.backend.kind, hosts=counts.hosts,
                              location=self.backend.location)

    def _limit(self, timeout: float | None) -> float:
        limit = self.timeout if timeout is None else timeout
        if not 0 <= limit <= MAX_WAIT:
            raise ValueError(f"timeout must be 0 .. {MAX_WAIT:g} seconds, not {limit!r}")
        return limit


def open_budget(settings: Settings, directory: Path, key_id: str, *,
                clock: Callable[[], float] = time.monotonic, **options: Any) -> CallBudget:
    """The call budget of one key as ``settings`` configure it.

    The rate is ``KIS_RATE_LIMIT`` (default by ``KIS_ENV``: real 18, paper 1); the state is in
    ``directory`` (the token directory) and, when ``KIS_TOKEN_STORE`` names a server, on that server
    with the directory as the fallback.

    Args:
        settings: the configuration.
        directory: the token directory (``KIS_TOKEN_DIR``).
        key_id: :attr:`Credential.key_id` of the key.
        clock: the file budget's clock (one every process of the host shares).
        options: passed to :class:`CallBudget` (``sleep``, ``async_sleep``, ``timeout``).

    Raises:
        ConfigError: ``KIS_RATE_LIMIT`` or ``KIS_TOKEN_STORE`` cannot be used (the message names it).
    """
    pacing = Pacing(settings.rate_limit)
    local = FileBudget(directory, key_id, clock)
    url = token_store_url(settings)
    backend: BudgetBackend = local
    if url is not None:
        from common.budget.redis_backend import RedisBudget, SharedBudget
        from common.store.redis_link import link

        backend = SharedBudget(RedisBudget(link(url), key_id), local)
    return CallBudget(backend, pacing, key_id, **options)


__all__ = ["DEFAULT_TIMEOUT", "RATE_LIMIT_VAR", "BudgetSnapshot", "CallBudget", "open_budget"]
