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
