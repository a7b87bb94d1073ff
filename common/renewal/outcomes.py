"""Renewal outcomes and their observers: the shared bookkeeping (counters, last outcome), the alert hook.

The engine calls each observer with the :class:`Outcome` and the key's shared
:class:`~common.store.protocols.RenewalState`, then saves the state; ``check`` and ``metrics`` read
it back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from common.store.protocols import RenewalState


class Outcome(NamedTuple):
    """What one credential request came to.

    Attributes:
        kind: ``renewed``, ``same_token`` (the broker re-sent the one held), ``refused`` (a broker
            code), ``failed`` (network, 5xx, garbage) or ``held_back`` (not sent: one a minute).
        at: epoch seconds.
        code: the broker's code for a refusal, ``LOCAL`` when held back, else None.
        message: the broker's or the transport's message, if any.
        seconds_left: time left on the credential held when it happened (None: none held).
    """

    kind: str
    at: float
    code: str | None = None
    message: str | None = None
    seconds_left: float | None = None


#: Observers see every outcome with the key's shared state, which they may update (it is saved after).
#: Whatever is slow (a webhook) an observer returns as a callable, run once the key's lock is released.
Observer = Callable[[Outcome, RenewalState], "Callable[[], object] | None"]


def bookkeeping(outcome: Outcome, state: RenewalState) -> None:
    """Record ``outcome`` in ``state``: the last outcome, and counters by kind and broker code."""
    if outcome.kind == "held_back":
        state.refusals["LOCAL"] = state.refusals.get("LOCAL", 0) + 1
        return
    state.last_outcome, state.last_outcome_at = outcome.kind, outcome.at
    state.last_code, state.last_message = outcome.code, outcome.message
    if outcome.kind in ("renewed", "same_token"):
        state.last_success_at = outcome.at
        state.renewals += 1
    elif outcome.code is not None:
        state.refusals[outcome.code] = state.refusals.get(outcome.code, 0) + 1
    else:
        state.failures += 1


class AlertObserver:
    """Posts refused and failed renewals to a Slack-compatible webhook (see ``common.renewal.alerts``)."""

    def __init__(self, url: str, market: str, environment: str, expiry_margin: float) -> None:
        self.url = url
        self.market = market
        self.environment = environment
        self.expiry_margin = expiry_margin

    def __call__(self, outcome: Outcome, state: RenewalState) -> Callable[[], None] | None:
        """Alert on ``refused`` and ``failed``: the stamps that hold repeats back go into ``state``, and
        the post itself is returned, for the engine to run once the key's lock is released."""
        if outcome.kind not in ("refused", "failed"):
            return None
        from common.renewal import alerts

        alert = alerts.Alert(self.market, self.environment, outcome.kind, outcome.code, outcome.message,
                             outcome.seconds_left, self.expiry_margin)
        return alerts.prepare_renewal_alert(self.url, state, alert, outcome.at)


def observers(webhook: str | None, market: str, environment: str, expiry_margin: float) -> list[Observer]:
    """The observers of one market's renewals: the bookkeeping, and alerts if a webhook is set."""
    chosen: list[Observer] = [bookkeeping]
    if webhook is not None:
        chosen.append(AlertObserver(webhook, market, environment, expiry_margin))
    return chosen
