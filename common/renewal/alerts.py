"""Alerts for failed token renewals, posted to a Slack-compatible webhook.

:class:`~common.renewal.outcomes.AlertObserver` calls :func:`prepare_renewal_alert` when a
renewal is refused by the broker (``outcome="refused"``, with the broker's code) or fails without
a code (``outcome="failed"``: network, 5xx, garbled answer) and ``KIS_ALERT_WEBHOOK_URL`` is set.
The request is one ``POST`` of ``{"text": "..."}``, which Slack incoming webhooks, Mattermost,
Rocket.Chat, Discord's ``/slack`` endpoints and most chat bridges accept.

Rules:

* At most one alert per key per *cause* within :data:`ALERT_INTERVAL` (30 min). The cause is
  the broker's code (``EGW00133``), or the outcome when there is no code. The time of each attempt
  is kept in ``state.alerts_sent`` (the caller saves the key's renewal state, which every process
  of the key shares through its store). An attempt counts even if the webhook did not answer,
  so a dead webhook costs at most one timeout per cause and interval.
* The text names the market, environment, outcome, broker code and message, and how long the
  current token stays valid, or that there is no valid token (none, or under the manager's expiry
  margin, when it is no longer handed out). It never holds the token, the app key or the secret.
* The post is made after the key's renewal lock is released (the engine runs it then), in a
  thread that the caller waits on for at most :data:`DEADLINE` (3 s) of wall time, DNS included:
  a webhook that drips its answer or a name that never resolves costs the caller 3 s at most and
  never holds another process back. One try, no retries. Any failure (refused connection, timeout,
  non-2xx answer, bad URL) is logged as a warning that names only the webhook's scheme and host
  (its path is a secret), and is never raised: an alert must never stop the token from being served.

This module imports ``requests`` and is itself imported only when an alert is due.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from typing import NamedTuple

from common.clock import format_duration
from common.renewal.policy import EXPIRY_MARGIN
from common.settings import url_origin
from common.store.protocols import RenewalState

#: Seconds during which a second alert for the same market and cause is not sent.
ALERT_INTERVAL = 30 * 60.0
#: Seconds to wait for the webhook's TCP (and TLS) connection.
CONNECT_TIMEOUT = 2.0
#: Seconds to wait for the webhook's answer once connected.
READ_TIMEOUT = 1.0
#: Longest broker or transport message quoted in an alert.
MAX_MESSAGE = 300
#: The longest the caller waits for the webhook, all included (DNS, connect, answer).
DEADLINE = 3.0
#: Causes alerted at most once a day (the daily budget frees up only as its issuances age).
DAILY_CAUSES = {"DAILY_LIMIT": 86400.0}

_log = logging.getLogger(__name__)


class Alert(NamedTuple):
    """What one alert is about.

    Attributes:
        market: ``us`` or ``kr``.
        environment: ``real`` or ``paper``.
        outcome: ``refused`` or ``failed``.
        code: the broker's error code, if it gave one.
        message: the broker's or the transport's message, if any.
        seconds_left: time left on the token currently held, or None if none is held.
        expiry_margin: a token with no more than this left is not handed out (the manager's windows).
    """

    market: str
    environment: str
    outcome: str
    code: str | None
    message: str | None
    seconds_left: float | None
    expiry_margin: float = EXPIRY_MARGIN


def prepare_renewal_alert(
    url: str, state: RenewalState, alert: Alert, now: float
) -> Callable[[], None] | None:
    """The post of one alert about a failed renewal, unless the same cause was alerted recently.

    Args:
        url: the webhook URL (``KIS_ALERT_WEBHOOK_URL``); treated as a secret.
        state: the market's shared renewal memory; ``state.alerts_sent[cause]`` is set to ``now``
            when an alert is attempted (the caller saves the state afterwards).
        alert: what it is about.
        now: the current time, epoch seconds.

    Returns:
        A callable that posts the alert (run it once the key's lock is released; it never raises, a
        failure is logged as a warning), or None when the cause was alerted recently.
    """
    cause = alert.code or alert.outcome
    last = state.alerts_sent.get(cause)
    if last is not None and 0 <= now - last < DAILY_CAUSES.get(cause, ALERT_INTERVAL):
        _log.debug("%s renewal alert for %s already sent %.0f s ago; not repeated", alert.market, cause,
                   now - last)
        return None
    state.alerts_sent = {
        key: at for key, at in state.alerts_sent.items()
        if 0 <= now - at < DAILY_CAUSES.get(key, ALERT_INTERVAL)
    }
    state.alerts_sent[cause] = now
    text = alert_text(alert)
    return lambda: post_with_deadline(url, text, alert.market)


def send_renewal_alert(url: str, state: RenewalState, alert: Alert, now: float) -> None:
    """:func:`prepare_renewal_alert` and post it at once (for callers that hold no lock)."""
    post = prepare_renewal_alert(url, state, alert, now)
    if post is not None:
        post()


def alert_text(alert: Alert) -> str:
    """The alert's text: one headline, then the token's state (no token, key or secret)."""
    market, seconds_left = alert.market, alert.seconds_left
    reason = " ".join(part for part in (alert.code, _clip(alert.message)) if part) or "no details"
    if seconds_left is not None and seconds_left > alert.expiry_margin:
        held = f"The current token stays valid for {format_duration(seconds_left)} more."
    else:
        if seconds_left is None:
            why = "none is held"
        elif seconds_left > 0:
            why = f"the current one has only {format_duration(seconds_left)} left"
        else:
            why = f"the current one {format_duration(seconds_left)}"
        held = f"There is no valid token ({why}): calls to this market fail until a renewal succeeds."
    return (
        f":warning: KIS {market.upper()} ({alert.environment}) token renewal {alert.outcome}: {reason}\n"
        f"{held}\n"
        f"Host {socket.gethostname()}. Further alerts for this cause are held back for "
        f"{ALERT_INTERVAL / 60:g} min."
    )


def redacted_url(url: str) -> str:
    """Only the scheme and host (and port) of ``url``: what a log may show of a webhook."""
    return url_origin(url) or "an invalid URL"


def _clip(message: str | None) -> str | None:
    if message is None:
        return None
    message = " ".join(message.split())
    return message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 3] + "..."


def post_with_deadline(url: str, text: str, market: str, deadline: float | None = None) -> None:
    """:func:`_post` in a daemon thread, waited on for at most ``deadline`` (:data:`DEADLINE`) seconds."""
    deadline = DEADLINE if deadline is None else deadline
    worker = threading.Thread(target=_post, args=(url, text, market), name="kis-token-alert", daemon=True)
    worker.start()
    worker.join(deadline)
    if worker.is_alive():
        _log.warning("%s renewal alert to %s: no answer within %g s; not waiting longer",
                     market, redacted_url(url), deadline)


def _post(url: str, text: str, market: str) -> None:
    """One POST of ``{"text": text}``; every failure becomes a warning naming only the host."""
    where = redacted_url(url)
    try:
        import requests

        response = requests.post(
            url,
            json={"text": text},
            timeout=(CONNECT_TIMEOUT, READ_TIMEOUT),
            allow_redirects=False,
        )
        status = response.status_code
        response.close()
    except Exception as exc:  # never let an alert break token serving; the text may hold the URL
        _log.warning("%s renewal alert to %s failed: %s", market, where, type(exc).__name__)
        return
    if not 200 <= status < 300:
        _log.warning("%s renewal alert to %s failed: HTTP %d", market, where, status)
        return
    _log.info("%s renewal alert sent to %s", market, where)
