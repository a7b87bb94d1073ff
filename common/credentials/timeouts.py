"""How long the broker's endpoints may take, and how often they are tried (no HTTP import here)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Timeouts:
    """How long the token endpoint may take (seconds), and how often it is tried.

    Attributes:
        connect: per-attempt TCP (and TLS) connect timeout.
        attempt: wall-clock deadline of one attempt over connect, headers and body.
        max_attempts: attempts in all.
        budget: all attempts and the waits between them; later attempts get what is left.
        backoff_initial: first wait between attempts (doubles each time).
        backoff_max: longest wait between attempts.
        backoff_jitter: up to this much is added at random to each wait.
    """

    connect: float = 3.05
    attempt: float = 10.0
    max_attempts: int = 4
    budget: float = 20.0
    backoff_initial: float = 0.5
    backoff_max: float = 4.0
    backoff_jitter: float = 0.5

    @property
    def longest_request(self) -> float:
        """The longest a request may run with all its retries: the budget, and a last attempt
        started just before it ran out."""
        return self.budget + self.attempt


DEFAULT_TIMEOUTS = Timeouts()
