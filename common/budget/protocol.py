"""What every backend of the call budget offers (the file on one host, the Redis/Valkey server for
several), and the small values they hand back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from common.budget.pacing import Pacing


class NoSlotWithin(Exception):
    """The next free slot is further away than the caller's timeout; nothing was reserved.

    Attributes:
        wait: seconds until that slot.
    """

    def __init__(self, wait: float) -> None:
        super().__init__(f"the next slot is {wait:.3f} s away")
        self.wait = wait


@dataclass(frozen=True)
class Counts:
    """What a backend counted for one key.

    Attributes:
        calls_last_minute: slots granted in the last 60 s.
        refusals_last_minute: ``EGW00201`` answers noted in the last 60 s.
        refusals_total: ``EGW00201`` answers noted since the state was made (a counter).
        hosts: hosts that used the budget in the last minute (1 for a host's own file).
        fallback: the server did not answer; these are this host's file's counters.
    """

    calls_last_minute: int = 0
    refusals_last_minute: int = 0
    refusals_total: int = 0
    hosts: int = 1
    fallback: bool = False


class BudgetBackend(Protocol):
    """Where one key's budget state lives: it reserves slots, and counts calls and refusals."""

    #: ``file`` or ``redis``.
    kind: str
    #: where the state is, for messages (a path, or the masked server URL and key name).
    location: str

    def reserve(self, pacing: Pacing, max_wait: float) -> float:
        """Reserve the key's next slot if it is at most ``max_wait`` s away; return the seconds until
        it (0: send now).

        Raises:
            NoSlotWithin: it is further away (nothing reserved).
            BudgetTimeoutError: the state could not be had within the wait (a stopped holder).
            StoreError: the state cannot be used at all.
        """
        ...

    def note_refusal(self) -> None:
        """Count one ``EGW00201`` answer."""
        ...

    def counts(self) -> Counts:
        """The key's counters now."""
        ...
