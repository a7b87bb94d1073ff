"""The rule for an ``EGW00201`` answer ("초당 거래건수를 초과하였습니다": the key's calls a second
were exceeded, by another program on the key or by a host pacing alone while the store was down).

A refused call executed nothing (the broker counts it and does no more), so it may be sent again,
an order too. The adapters (``KISAuth``, ``KISHttpxAuth``, mojito brokers) count the refusal in the
key's budget (``note_refusal``), wait for the key's next free slot and send again, at most
:data:`MAX_RESENDS` times and only while the slot comes within :data:`RESEND_WITHIN` seconds of the
first answer; then the caller gets the last answer as it is. :class:`Resends` keeps that count for
one request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from common.budget.limiter import CallBudget
from common.errors import BudgetTimeoutError, StoreError

#: The broker's code for a call beyond the key's rate (``msg_cd``, with HTTP 500 as a rule).
RATE_EXCEEDED_CODE = "EGW00201"
#: Resends of one request after ``EGW00201`` answers, at most.
MAX_RESENDS = 3
#: Seconds after the first refusal within which a resend's slot must fall.
RESEND_WITHIN = 5.0

_log = logging.getLogger(__name__)


class Resends:
    """The ``EGW00201`` resends of one request: counts them and waits for each one's slot.

    Args:
        budget: the key's call budget.
        clock: monotonic seconds (tests inject one).
    """

    __slots__ = ("budget", "clock", "deadline", "sent")

    def __init__(self, budget: CallBudget, clock: Callable[[], float] = time.monotonic) -> None:
        self.budget = budget
        self.clock = clock
        self.sent = 0
        self.deadline: float | None = None

    def _timeout(self) -> float | None:
        """Note the refusal; the seconds left for the next slot, or None if no resend is allowed.

        A counter that cannot be used (its file locked too long, not writable) costs the count, not
        the answer: the resend goes on as if it had been counted.
        """
        try:
            self.budget.note_refusal()
        except (BudgetTimeoutError, StoreError) as exc:
            _log.debug("an EGW00201 answer of %s was not counted: %s", self.budget.key_id, exc)
        now = self.clock()
        if self.deadline is None:
            self.deadline = now + RESEND_WITHIN
        if self.sent >= MAX_RESENDS or now >= self.deadline:
            return None
        self.sent += 1
        return self.deadline - now

    def allowed(self) -> float | None:
        """After an ``EGW00201`` answer: count it; the seconds within which the next send's slot must
        come if one more send is allowed, else None. The caller's own next send waits for its slot
        with that timeout, as a mojito broker's does in ``access_token`` (no slot in time: the
        caller returns the last answer)."""
        return self._timeout()

    def again(self) -> bool:
        """After an ``EGW00201`` answer: count it, and wait for the key's next slot if one more send
        is allowed (True: send now) or not (False: return the answer)."""
        timeout = self._timeout()
        if timeout is None:
            return False
        try:
            self.budget.acquire(timeout)
        except BudgetTimeoutError:
            return False
        return True

    async def again_async(self) -> bool:
        """:meth:`again` for asyncio code (the wait is awaited; the file or server is used in a
        worker thread)."""
        import asyncio

        timeout = await asyncio.to_thread(self._timeout)
        if timeout is None:
            return False
        try:
            await self.budget.acquire_async(timeout)
        except BudgetTimeoutError:
            return False
        return True
