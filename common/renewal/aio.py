"""asyncio without stalling the loop: blocking work in a thread, one at a time per (loop, name).

The sync methods do the I/O (a file lock, the broker's round trip); :class:`SingleFlight` runs one
of them in a worker thread and lets every task that asks meanwhile await the same result, so a
thousand tasks from cold cost one thread, one lock and one request, and the loop keeps running.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # asyncio costs ~50 ms to import: only code that awaits pays for it
    import asyncio

    from common.credentials.records import ApprovalRecord, TokenRecord
    from common.renewal.engine import RenewalEngine

T = TypeVar("T")


class SingleFlight:
    """At most one call in flight per (event loop, name); latecomers await its outcome."""

    def __init__(self) -> None:
        self._flights: dict[tuple[int, Hashable], asyncio.Task[Any]] = {}
        self._guard = threading.Lock()

    async def run(self, name: Hashable, func: Callable[..., T], *args: Any) -> T:
        """``func(*args)`` in a worker thread, shared with every task that asks for ``name`` meanwhile.

        Raises:
            Exception: whatever ``func`` raised (each waiting task gets it).
        """
        import asyncio

        loop = asyncio.get_running_loop()
        key = (id(loop), name)
        with self._guard:
            task = self._flights.get(key)
            if task is None or task.done() or task.get_loop() is not loop:
                task = loop.create_task(asyncio.to_thread(func, *args))
                self._flights[key] = task
                task.add_done_callback(lambda done: self._forget(key, done))
        return await asyncio.shield(task)

    def _forget(self, key: tuple[int, Hashable], task: asyncio.Task[Any]) -> None:
        with self._guard:
            if self._flights.get(key) is task:
                del self._flights[key]


class AsyncMethods:
    """The asyncio entry points of a token manager: the sync contract, with the loop never waiting.

    A fresh token is served without leaving the loop; anything else (the lock wait, the broker's
    round trip) runs in a worker thread, one per burst of callers.
    """

    _flights: SingleFlight | None = None
    # Provided by the token manager this is mixed into:
    _token_engine: RenewalEngine[TokenRecord] | None
    _approval: RenewalEngine[ApprovalRecord] | None
    get_valid_token: Callable[[], str]
    get_approval_key: Callable[[], str]
    replace_rejected_token: Callable[[str], str]

    def _single_flight(self) -> SingleFlight:
        if self._flights is None:
            self._flights = SingleFlight()
        return self._flights

    async def get_valid_token_async(self) -> str:
        """:meth:`get_valid_token`, off the loop: a thousand tasks from cold cost one request."""
        engine = self._token_engine
        record = None if engine is None else engine.fresh()
        if record is not None:
            return record.access_token
        return await self._single_flight().run("token", self.get_valid_token)

    async def get_approval_key_async(self) -> str:
        """:meth:`get_approval_key`, off the loop (a fresh one without leaving it)."""
        engine = self._approval
        record = None if engine is None else engine.fresh()
        if record is not None:
            return record.approval_key
        return await self._single_flight().run("approval", self.get_approval_key)

    async def replace_rejected_token_async(self, rejected: str) -> str:
        """:meth:`replace_rejected_token`, off the loop (one call per burst of the same rejection)."""
        replace = self.replace_rejected_token
        return await self._single_flight().run(("replace", rejected), replace, rejected)
