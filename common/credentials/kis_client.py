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

import codecs
import json
import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
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

from common.clock import parse_kst
from common.credentials.timeouts import DEFAULT_TIMEOUTS, Timeouts
from common.errors import (
    CREDENTIAL_CODES,
    AnswerLostError,
    BadResponseError,
    BrokerError,
    CredentialsError,
    KISTokenError,
    NotSentError,
    RateLimitedError,
    TransientError,
)
from common.settings import mask_url

TOKEN_PATH = "/oauth2/tokenP"
REVOKE_PATH = "/oauth2/revokeP"
APPROVAL_PATH = "/oauth2/Approval"

MAX_ANSWER = 1 << 20
#: The longest token or approval key believed (the broker's JWTs are a few hundred characters).
MAX_CREDENTIAL = 4096
#: The longest broker code or message kept from a refusal.
MAX_CODE, MAX_MESSAGE = 32, 300

#: Tokens live 24 h; an expiry further away than this is a garbled answer, not a token to keep.
MAX_LIFETIME = 7 * 86400.0

RATE_LIMIT_CODE = "EGW00133"
#: Refusals that another try will not change, whatever the HTTP status.
KNOWN_REFUSALS = CREDENTIAL_CODES | {RATE_LIMIT_CODE}

_log = logging.getLogger(__name__)




#: Called with each answer's ``Date`` header (or None), as soon as the answer's headers arrive.
DateObserver = Callable[[object], object]


@dataclass(frozen=True)
class IssuedToken:
    """A token as the broker issued it."""

    access_token: str
    token_type: str
    expires_at: float


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
    return _read_token(data, now(), min_lifetime)


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
    if not _is_credential(key, 512):
        raise BadResponseError("approval answer has no usable approval_key (missing, not a string, "
                               "not printable ASCII, or too long)")
    return key  # type: ignore[return-value]


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


def _is_credential(value: object, limit: int = MAX_CREDENTIAL) -> bool:
    """A token or key we can send back in a header: printable ASCII without blanks, not too long."""
    return (isinstance(value, str) and 0 < len(value) <= limit and value.isascii()
            and value.isprintable() and not any(c.isspace() for c in value))


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
    return _read_answer(*box["answer"], where=mask_url(url))


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
            return status, _decode(b"".join(parts), response.encoding)
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
        reason, sent = _transport_reason(exc)
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


def _transport_reason(exc: BaseException) -> tuple[str, bool]:
    """Why the exchange failed, in words, and whether the request may have reached the broker
    (a refused connection, a failed name lookup or TLS handshake, a connect timeout: it did not)."""
    causes: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and len(causes) < 8:
        causes.append(seen)
        reason = getattr(seen, "reason", None)
        nested = seen.args[0] if seen.args and isinstance(seen.args[0], BaseException) else None
        seen = reason if isinstance(reason, BaseException) else nested or seen.__cause__ or seen.__context__
    kinds = tuple(causes)
    if any(isinstance(c, urllib3.exceptions.NameResolutionError) for c in kinds):
        return "the host name does not resolve (DNS)", False
    if any(isinstance(c, ConnectionRefusedError) for c in kinds) or any(
        "Connection refused" in str(c) for c in kinds
    ):
        return "connection refused (nothing listens there)", False
    if any(isinstance(c, (requests.exceptions.ConnectTimeout, urllib3.exceptions.ConnectTimeoutError))
           for c in kinds):
        return "no answer to the connection (connect timed out)", False
    if any(isinstance(c, ssl.SSLCertVerificationError) for c in kinds):
        return f"the broker's TLS certificate is not trusted ({_last_words(causes)})", False
    if any(isinstance(c, (requests.exceptions.SSLError, urllib3.exceptions.SSLError)) for c in kinds):
        return f"TLS error ({_last_words(causes)})", True  # the handshake, or a record after sending
    if any(isinstance(c, urllib3.exceptions.NewConnectionError) for c in kinds):
        return f"cannot connect ({_last_words(causes)})", False
    if any(isinstance(c, (requests.exceptions.ReadTimeout, urllib3.exceptions.ReadTimeoutError))
           for c in kinds):
        return "no answer in time (read timed out)", True
    if any(isinstance(c, ConnectionResetError) for c in kinds):
        return "the connection was reset", True
    return f"{type(exc).__name__} ({_last_words(causes)})", True


def _last_words(causes: list[BaseException]) -> str:
    text = " ".join(str(causes[-1]).split())
    return (text[:120] + "...") if len(text) > 120 else text or type(causes[-1]).__name__


def _tell_date(on_date: DateObserver | None, value: object) -> None:
    if on_date is not None:
        try:
            on_date(value)
        except Exception as exc:  # the clock is advice: it must never lose an answer
            _log.warning("cannot read the broker's Date header: %s", type(exc).__name__)


def _decode(raw: bytes, encoding: str | None) -> str:
    """The body as text: its declared charset if Python knows it, else UTF-8; bad bytes replaced."""
    try:
        codec = codecs.lookup(encoding or "utf-8").name
    except (LookupError, TypeError, ValueError):
        codec = "utf-8"
    try:
        return raw.decode(codec, errors="replace")
    except Exception:  # a codec that is no text codec (e.g. a bytes-to-bytes one)
        return raw.decode("utf-8", errors="replace")


def _read_answer(status: int, text: str, where: str = "the broker") -> dict[str, Any]:
    """Classify an answer: a refusal with a code, a transient fault, or a JSON object."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        data = None
    if isinstance(data, dict):
        refusal = _refusal(data, status)
        if refusal is not None and status >= 500 and refusal.code not in KNOWN_REFUSALS:
            raise TransientError(f"{where} answered HTTP {status}: {refusal}")
        if refusal is not None:
            raise refusal
    if status >= 500:
        raise TransientError(f"{where} answered HTTP {status}")
    if not isinstance(data, dict):
        kind = "HTML" if text.lstrip().startswith("<") else "not JSON (truncated?)"
        if status == 200:
            raise TransientError(f"{where} answered HTTP 200 with a body that is {kind}")
        raise BadResponseError(f"{where} answered HTTP {status} with a body that is {kind}")
    if status != 200:
        raise BadResponseError(f"{where} answered HTTP {status} without an error code")
    return data


def _refusal(data: dict[str, Any], status: int) -> BrokerError | None:
    code = data.get("error_code")
    message = data.get("error_description")
    if code is None and data.get("rt_cd", "0") not in ("0", 0):
        code, message = data.get("msg_cd"), data.get("msg1")
    if code is None:
        return None
    if isinstance(code, bool) or not isinstance(code, (str, int)) or not str(code).isprintable():
        code = "garbled"
    code = str(code)[:MAX_CODE]
    message = " ".join(message.split())[:MAX_MESSAGE] if isinstance(message, str) else ""
    if code == RATE_LIMIT_CODE:
        return RateLimitedError(code, message, status)
    if code in CREDENTIAL_CODES:
        return CredentialsError(code, message, status)
    return BrokerError(code, message, status)


def _read_token(data: dict[str, Any], now: float, min_lifetime: float) -> IssuedToken:
    token = data.get("access_token")
    if not _is_credential(token):
        raise BadResponseError("token answer has no usable access_token (missing, not a string, not "
                               "printable ASCII, or too long)")
    token_type = data.get("token_type", "Bearer")
    if not isinstance(token_type, str) or not _is_credential(token_type.strip(), 32):
        raise BadResponseError("token answer has a token_type that is not a short ASCII word")
    expires_at = _read_expiry(data, now)
    if expires_at <= now:
        raise BadResponseError("the broker issued a token that is already expired")
    if expires_at - now <= min_lifetime:
        raise BadResponseError(f"the broker issued a token that expires in {expires_at - now:.0f} s")
    if expires_at - now > MAX_LIFETIME:
        raise BadResponseError("the broker issued a token whose expiry is not believable (over 7 days)")
    return IssuedToken(token, token_type.strip(), expires_at)


def _read_expiry(data: dict[str, Any], now: float) -> float:
    stamp = data.get("access_token_token_expired")
    if isinstance(stamp, str):
        try:
            return parse_kst(stamp)
        except ValueError:
            raise BadResponseError(
                f"access_token_token_expired is not 'YYYY-MM-DD HH:MM:SS': {stamp!r}"
            ) from None
    if stamp is not None:
        raise BadResponseError("access_token_token_expired is not a string")
    seconds = data.get("expires_in")
    if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and 0 < seconds <= MAX_LIFETIME:
        _log.info("token answer has no access_token_token_expired; using expires_in")
        return now + float(seconds)
    raise BadResponseError("token answer has neither access_token_token_expired nor expires_in")
