"""Reading the broker's answers: a refusal with its code, a transient fault, or a credential to keep;
and, for an exchange that failed, why, and whether the request may have reached the broker.

Any answer, however garbled (an unknown charset, deep nesting, wrong types, a non-ASCII or huge
token, an oversized body), is a :class:`KISTokenError` with a one-line reason; nothing else escapes.
"""

from __future__ import annotations

import codecs
import json
import logging
import ssl
from dataclasses import dataclass
from typing import Any, TypeGuard

import requests
import urllib3

from common.clock import parse_kst
from common.errors import (
    CREDENTIAL_CODES,
    BadResponseError,
    BrokerError,
    CredentialsError,
    RateLimitedError,
    TransientError,
)

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


@dataclass(frozen=True)
class IssuedToken:
    """A token as the broker issued it."""

    access_token: str
    token_type: str
    expires_at: float


def is_credential(value: object, limit: int = MAX_CREDENTIAL) -> TypeGuard[str]:
    """A token or key we can send back in a header: printable ASCII without blanks, not too long."""
    return (isinstance(value, str) and 0 < len(value) <= limit and value.isascii()
            and value.isprintable() and not any(c.isspace() for c in value))


def transport_reason(exc: BaseException) -> tuple[str, bool]:
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


def decode(raw: bytes, encoding: str | None) -> str:
    """The body as text: its declared charset if Python knows it, else UTF-8; bad bytes replaced."""
    try:
        codec = codecs.lookup(encoding or "utf-8").name
    except (LookupError, TypeError, ValueError):
        codec = "utf-8"
    try:
        return raw.decode(codec, errors="replace")
    except Exception:  # a codec that is no text codec (e.g. a bytes-to-bytes one)
        return raw.decode("utf-8", errors="replace")


def read_answer(status: int, text: str, where: str = "the broker") -> dict[str, Any]:
    """Classify an answer: a refusal with a code, a transient fault, or a JSON object."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        data = None
    if isinstance(data, dict):
        refusal = refusal_of(data, status)
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


def refusal_of(data: dict[str, Any], status: int) -> BrokerError | None:
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


def read_token(data: dict[str, Any], now: float, min_lifetime: float) -> IssuedToken:
    token = data.get("access_token")
    if not is_credential(token):
        raise BadResponseError("token answer has no usable access_token (missing, not a string, not "
                               "printable ASCII, or too long)")
    token_type = data.get("token_type", "Bearer")
    if not isinstance(token_type, str) or not is_credential(token_type.strip(), 32):
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
