"""HTTP to the broker's OAuth endpoints (token, revoke, WebSocket approval): build the request, read
the answer, retry what is transient.

Kept apart from the renewal policy (google-auth's ``_client.py`` shape). Importing this module
imports ``requests`` and ``tenacity``; the policy imports it only when it must talk to the broker.

Retry rule: connection refused or reset, timeouts, HTTP 5xx (with no code, or a code that is not
a known refusal), and bodies that are HTML or truncated JSON are retried up to
``Timeouts.max_attempts`` times in all, with jittered exponential backoff, within
``Timeouts.budget`` seconds in all. A known refusal (``EGW00133``, the credential codes) is never
retried, whatever its HTTP status; nor is a 4xx answer with any broker code.

Each attempt has a wall-clock deadline (``Timeouts.attempt``) over connect, headers and body: the
body is read as it arrives and the attempt is cut off at its deadline, so a broker that drips its
answer a byte at a time costs one attempt's time, not minutes.

Any answer, however garbled (an unknown charset, deep nesting, wrong types, a non-ASCII or huge
token, an oversized body), is a :class:`KISTokenError` with a one-line reason; nothing else escapes.
Every answer's ``Date`` header (refusals included) is handed to ``on_date``, so the caller can judge
time in the broker's clock (``common.clock.BrokerClock``). Redirects are never followed: the app
secret goes to the broker's host only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import requests
import urllib3
from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_exponential_jitter,
)

from common.credentials.answers import (
    IssuedToken,
    decode,
    is_credential,
    read_answer,
    read_token,
    transport_reason,
)
from common.credentials.timeouts import DEFAULT_TIMEOUTS, Timeouts
from common.errors import (
    AnswerLostError,
    BadResponseError,
    KISTokenError,
    NotSentError,
    TransientError,
)
from common.settings import mask_url

TOKEN_PATH = "/oauth2/tokenP"
REVOKE_PATH = "/oauth2/revokeP"
APPROVAL_PATH = "/oauth2/Approval"

MAX_ANSWER = 1 << 20

_log = logging.getLogger(__name__)




#: Called with each answer's ``Date`` header (or None), as soon as the answer's headers arrive.
DateObserver = Callable[[object], object]


def issue_token(
    base_url: str,
    app_key: str,
    app_secret: str,
    *,
    now: Callable[[], float],
    sleep: Callable[[float], None] = time.sleep,
    session: requests.Session | None = None,
    min_lifetime: float = 0.0,
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
    on_date: DateObserver | None = None,
) -> IssuedToken:
    """Ask ``POST /oauth2/tokenP`` for a token.

    Args:
        base_url: the broker's base URL.
        app_key: the market's app key.
        app_secret: the market's app secret.
        now: the clock, used to reject a token that is already expired.
        sleep: how to wait between retries (tests pass a recorder).
        session: a ``requests.Session`` to send with, else a plain request.
        min_lifetime: a token with no more than this many seconds left is refused as unusable.
        timeouts: deadlines, attempts and backoff.
        on_date: given each answer's ``Date`` header before the answer is judged.

    Returns:
        The token and its expiry, taken from ``access_token_token_expired`` (Korea time), or from
        ``expires_in`` if that is missing.

    Raises:
        RateLimitedError: ``EGW00133``.
        CredentialsError: the key or secret was rejected.
        BrokerError: any other refusal with a code.
        TransientError: the broker could not be reached or answered garbage, after the retries.
        BadResponseError: the answer is JSON but not a usable token (missing fields, wrong types,
            an expiry already past, within ``min_lifetime`` or beyond :data:`MAX_LIFETIME`).
    """
    body = {"grant_type": "client_credentials", "appkey": app_key, "appsecret": app_secret}
    data = _post_with_retries(base_url + TOKEN_PATH, body, sleep, session, timeouts, on_date)
    return read_token(data, now(), min_lifetime)


def revoke_token(
    base_url: str,
    app_key: str,
    app_secret: str,
    token: str,
    *,
    sleep: Callable[[float], None] = time.sleep,
    session: requests.Session | None = None,
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
    on_date: DateObserver | None = None,
) -> None:
    """Revoke ``token`` with ``POST /oauth2/revokeP``; raise like :func:`issue_token` on refusal."""
    body = {"appkey": app_key, "appsecret": app_secret, "token": token}
    data = _post_with_retries(base_url + REVOKE_PATH, body, sleep, session, timeouts, on_date)
    if str(data.get("code")) != "200":
        raise BadResponseError(f"revoke answered without success: {data.get('message')!r}")


def issue_approval_key(
    base_url: str,
    app_key: str,
    app_secret: str,
    *,
    sleep: Callable[[float], None] = time.sleep,
    session: requests.Session | None = None,
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
    on_date: DateObserver | None = None,
) -> str:
    """Ask ``POST /oauth2/Approval`` for a WebSocket approval key (the secret goes as ``secretkey``).

    Raises:
        BrokerError: a refusal with a code (``CredentialsError`` for the key or secret).
        TransientError: the broker could not be reached or answered garbage, after the retries.
        BadResponseError: the answer is JSON without a usable ``approval_key``.
    """
    body = {"grant_type": "client_credentials", "appkey": app_key, "secretkey": app_secret}
    data = _post_with_retries(base_url + APPROVAL_PATH, body, sleep, session, timeouts, on_date)
    key = data.get("approval_key")
    if not is_credential(key, 512):
        raise BadResponseError("approval answer has no usable approval_key (missing, not a string, "
                               "not printable ASCII, or too long)")
    return key


def probe_date(
    base_url: str,
    on_date: DateObserver,
    *,
    session: requests.Session | None = None,
    timeout: float = 3.0,
) -> bool:
    """Read the broker's clock: one ``GET`` of the base URL (no credentials, no token request),
    whose answer's ``Date`` header goes to ``on_date``; True if an answer came within ``timeout``
    seconds of wall time (headers that drip, DNS included: the caller may hold the key's lock)."""
    sender = session or requests
    box: dict[str, object] = {}

    def fetch() -> None:
        try:
            with sender.get(base_url + "/", timeout=(timeout, timeout), stream=True,
                            allow_redirects=False) as response:
                box["date"] = response.headers.get("Date")
        except Exception as exc:  # a probe is advice: never an error
            box["error"] = type(exc).__name__

    worker = threading.Thread(target=fetch, name="kis-token-clock", daemon=True)
    worker.start()
    worker.join(timeout)
    if "date" not in box:
        _log.debug("cannot read the broker's clock at %s: %s", mask_url(base_url),
                   box.get("error", f"no answer within {timeout:g} s"))
        return False
    on_date(box["date"])
    return True


def _post_with_retries(
    url: str,
    body: dict[str, str],
    sleep: Callable[[float], None],
    session: requests.Session | None,
    timeouts: Timeouts,
    on_date: DateObserver | None = None,
) -> dict[str, Any]:
    deadline = time.monotonic() + timeouts.budget
    retrying = Retrying(
        stop=stop_after_attempt(timeouts.max_attempts) | stop_before_delay(timeouts.budget),
        wait=wait_exponential_jitter(
            multiplier=timeouts.backoff_initial, max=timeouts.backoff_max, jitter=timeouts.backoff_jitter
        ),
        retry=retry_if_exception(lambda exc: isinstance(exc, KISTokenError) and exc.retryable),
        sleep=sleep,
        before_sleep=_log_retry,
        reraise=True,
    )
    reached: list[bool] = []

    def attempt() -> dict[str, Any]:
        try:
            return _post_once(url, body, session, deadline, timeouts, on_date)
        except NotSentError:
            raise
        except BaseException:
            reached.append(True)
            raise

    try:
        return retrying(attempt)
    except NotSentError as exc:
        if reached:  # an earlier attempt may have reached the broker: its minute is spent
            raise TransientError(str(exc)) from None
        raise


def _log_retry(retry_state: Any) -> None:
    _log.warning(
        "token endpoint attempt %d failed (%s); retrying in %.1f s",
        retry_state.attempt_number,
        retry_state.outcome.exception(),
        retry_state.upcoming_sleep,
    )


def _post_once(
    url: str,
    body: dict[str, str],
    session: requests.Session | None,
    deadline: float,
    timeouts: Timeouts,
    on_date: DateObserver | None = None,
) -> dict[str, Any]:
    """One attempt, cut off at its wall-clock deadline wherever it is (connect, headers or body).

    The exchange runs in a daemon thread so that even a broker dripping its headers cannot hold the
    caller past the deadline. A request that was sent and not yet answered, or an answer whose status
    line said success, may stand for a token the broker has already issued (and texted the user
    about), and a second request within the minute would be refused: such an answer is waited for
    until the whole budget is spent, and if it still does not arrive the attempt is not retried
    (:class:`AnswerLostError`). Only an answer that said it failed is cut off at ``attempt``.
    """
    started = time.monotonic()
    limit = max(0.1, min(timeouts.attempt, deadline - started))
    patience = max(limit, deadline - started)
    box: dict[str, Any] = {}

    def attempt() -> None:
        try:
            box["answer"] = _exchange(url, body, session, limit, patience, timeouts.connect, box, on_date)
        except BaseException as exc:
            box["error"] = exc

    worker = threading.Thread(target=attempt, name="kis-token-request", daemon=True)
    worker.start()
    worker.join(limit + 0.25)
    if worker.is_alive() and _may_hold_a_token(box.get("status")):
        worker.join(max(0.0, started + patience - time.monotonic()) + 0.25)
    if worker.is_alive():
        if _may_hold_a_token(box.get("status")):
            raise AnswerLostError(f"no complete answer from {mask_url(url)} within {patience:.1f} s; the "
                                  "broker may have issued it: not asked again within the minute",
                                  succeeded=box.get("status") is not None)
        raise TransientError(f"no complete answer from {mask_url(url)} within {limit:.1f} s")
    if "error" in box:
        raise box["error"]
    return read_answer(*box["answer"], where=mask_url(url))


def _exchange(
    url: str,
    body: dict[str, str],
    session: requests.Session | None,
    limit: float,
    patience: float,
    connect: float,
    progress: dict[str, Any],
    on_date: DateObserver | None = None,
) -> tuple[int, str]:
    """POST ``body`` and read the answer as it arrives: an error answer until ``limit`` seconds after
    the start, a success until ``patience``; ``progress["status"]`` is set once the status is known."""
    started = time.monotonic()
    sender = session or requests
    try:
        with sender.post(url, json=body, timeout=(min(connect, limit), patience), stream=True,
                         allow_redirects=False) as response:
            _tell_date(on_date, response.headers.get("Date"))
            progress["status"] = status = response.status_code
            success = 200 <= status < 300
            deadline = started + (patience if success else limit)
            parts: list[bytes] = []
            size = 0
            while True:
                if time.monotonic() > deadline:
                    where = mask_url(url)
                    if success:
                        raise AnswerLostError(f"the answer from {where} did not arrive in {patience:.1f} s",
                                              succeeded=True)
                    raise TransientError(f"the answer from {where} took more than {limit:.1f} s; cut off")
                chunk = response.raw.read1(65536, decode_content=True)
                if not chunk:
                    break
                parts.append(chunk)
                size += len(chunk)
                if size > MAX_ANSWER:
                    raise TransientError(f"the answer from {mask_url(url)} is over {MAX_ANSWER} bytes")
            return status, decode(b"".join(parts), response.encoding)
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
        reason, sent = transport_reason(exc)
        status = progress.get("status")
        if _may_hold_a_token(status) and sent and (status is not None or "read timed out" in reason):
            raise AnswerLostError(f"no complete answer from {mask_url(url)} ({reason}); the broker may "
                                  "have issued it: not asked again within the minute",
                                  succeeded=status is not None) from None
        error = TransientError if sent or status is not None else NotSentError
        raise error(f"broker unreachable at {mask_url(url)}: {reason}") from None


def _may_hold_a_token(status: int | None) -> bool:
    """A request still unanswered, or a success still arriving, may stand for an issued token."""
    return status is None or 200 <= status < 300


def _tell_date(on_date: DateObserver | None, value: object) -> None:
    if on_date is not None:
        try:
            on_date(value)
        except Exception as exc:  # the clock is advice: it must never lose an answer
            _log.warning("cannot read the broker's Date header: %s", type(exc).__name__)


