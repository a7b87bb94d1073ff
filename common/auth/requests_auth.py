"""The managed token on ``requests`` calls, and the helpers the httpx adapter shares.

``KISAuth(manager)`` (a ``requests.auth.AuthBase``) and ``KISHttpxAuth(manager)``
(``common.auth.httpx_auth``, an ``httpx.Auth`` for ``httpx.Client`` and ``httpx.AsyncClient``) add
``authorization: Bearer <token>``, ``appkey`` and ``appsecret`` to every request. When an answer's
body says the token was rejected (``EGW00123`` expired, ``EGW00121`` invalid; the broker sends them
with HTTP 500 and sometimes 200), the token is replaced -- once for a whole burst of such answers,
from any number of threads or tasks, since every caller asks
:meth:`~common.base_token_manager.BaseTokenManager.replace_rejected_token` with the token it sent --
and the request is sent once more. A second rejection is returned as it is: no loop. A renewal that
fails (one a minute, broker down) returns the first answer, logged. Any body, however odd (not JSON,
not UTF-8, deeply nested, huge), is read without an exception.

The three headers never follow a redirect to another origin (scheme, host or port; requests and
httpx strip only ``Authorization`` themselves), and an answer from another origin is never taken for
a rejection of the token.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
from requests.exceptions import UnrewindableBodyError
from requests.utils import requote_uri, rewind_body

from common.auth.source import TokenSource
from common.budget.resend import RATE_EXCEEDED_CODE, Resends
from common.errors import REJECTED_TOKEN_CODES, KISTokenError

_log = logging.getLogger(__name__)

#: The headers that carry the KIS credentials; none of them follows a redirect to another origin.
KIS_HEADERS = ("authorization", "appkey", "appsecret")
#: The port a scheme implies when a URL names none.
DEFAULT_PORTS = {"http": 80, "https": 443}

#: An origin: scheme, host and port, lowercased, the scheme's default port filled in.
Origin = tuple[str, str, int | None]


def rejected_token_code(answer: object) -> str | None:
    """The broker's rejected-token code in an answer (``EGW00123``/``EGW00121``), or None.

    Args:
        answer: the raw body (``bytes`` or ``str``), or the decoded JSON (what mojito returns).

    The code is the answer's ``msg_cd`` (else its ``error_code``), a string. Never raises: a body
    that is not JSON, not UTF-8, nested too deep, huge or of any other shape has no code.
    """
    return answer_code(answer, REJECTED_TOKEN_CODES)


#: The codes the adapters act on: a rejected token (renew, resend once) and ``EGW00201`` (the key's
#: calls a second exceeded: wait for the next slot, resend; ``common.budget.resend``).
ACTED_ON = frozenset(REJECTED_TOKEN_CODES) | {RATE_EXCEEDED_CODE}
#: Bytes every code in :data:`ACTED_ON` contains: a body without them is not parsed.
_MARKER = "EGW00"


def answer_code(answer: object, codes: frozenset[str] = ACTED_ON) -> str | None:
    """The answer's ``msg_cd`` (else ``error_code``) if it is one of ``codes`` (default
    :data:`ACTED_ON`), else None; read as :func:`rejected_token_code` says (never raises)."""
    if isinstance(answer, bytes | bytearray):
        if _MARKER.encode() not in answer:  # fast path: most answers never mention one
            return None
    elif isinstance(answer, str):
        if _MARKER not in answer:
            return None
    else:
        return _code_of(answer, codes)
    try:
        data = json.loads(answer)
    except (ValueError, RecursionError):  # not JSON, not UTF-8 (a ValueError), or nested too deep
        return None
    return _code_of(data, codes)


def _code_of(data: object, codes: frozenset[str]) -> str | None:
    if not isinstance(data, dict):
        return None
    code = data.get("msg_cd") or data.get("error_code")
    return code if isinstance(code, str) and code in codes else None


def origin_key(scheme: str, host: str, port: int | None) -> Origin:
    """The origin of a URL's parts: lowercased, ``port`` defaulted from the scheme."""
    scheme = scheme.lower()
    return scheme, host.lower(), DEFAULT_PORTS.get(scheme) if port is None else port


def origin(url: str) -> Origin | None:
    """``url``'s origin (scheme, host, port), or None if it is not an absolute URL that parses."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if not parts.scheme or not parts.hostname:
        return None
    return origin_key(parts.scheme, parts.hostname, port)


def same_origin(url: str, other: str) -> bool:
    """Whether two absolute URLs share scheme, host and port: the same URL, or both parse to one origin."""
    if url == other:
        return True
    here = origin(url)
    return here is not None and here == origin(other)


def kis_headers(manager: TokenSource, token: str) -> dict[str, str]:
    """The headers every KIS REST call carries: the bearer token and the market's app key and secret.

    The key and secret are read once per manager (a manager's key does not change: a rotated key is
    a new manager).
    """
    credentials = manager.__dict__.get("_kis_auth_credentials")
    if credentials is None:
        credentials = manager.__dict__["_kis_auth_credentials"] = manager.get_app_credentials()
    return dict(zip(KIS_HEADERS, (f"Bearer {token}", credentials[0], credentials[1]), strict=True))


#: A rejection that could not be replaced is logged at most once a minute per manager (a burst of
#: rejected calls while the renewal is held back costs one log line, no lock and no disk).
LOG_INTERVAL = 60.0


def log_replaced(manager: TokenSource, code: str) -> None:
    """Log that the broker rejected the token and it was replaced (the code only, never the token)."""
    _log.warning("%s token rejected by the broker (%s); replaced it, sending once more", manager.market, code)


def log_replacement_failure(manager: TokenSource, code: str, exc: KISTokenError) -> None:
    """Log, once a minute at most, that no replacement token could be had, so the broker's answer is
    returned as it is."""
    now = time.monotonic()
    if now - manager.__dict__.get("_kis_auth_failure_logged", -LOG_INTERVAL) < LOG_INTERVAL:
        _log.debug("%s token rejected (%s), not replaced: %s", manager.market, code, exc)
        return
    manager.__dict__["_kis_auth_failure_logged"] = now
    _log.error("%s token rejected by the broker (%s) and could not be replaced (%s); returning the "
               "broker's answer (said once a minute)", manager.market, code, exc)


def replacement(manager: TokenSource, sent: str, code: str) -> str | None:
    """A token to resend with after ``sent`` was rejected with ``code``; None if none can be had."""
    try:
        token = manager.replace_rejected_token(sent)
    except KISTokenError as exc:
        log_replacement_failure(manager, code, exc)
        return None
    log_replaced(manager, code)
    return token


class KISAuth(requests.auth.AuthBase):
    """``requests`` authentication with the manager's token and the key's call budget.

    Before each request (and each resend) it waits for the key's next free slot in
    :meth:`~common.base_token_manager.BaseTokenManager.call_budget` (requests applies the auth when
    it prepares the request, just before sending it), so every process and host of the key together
    stays within ``KIS_RATE_LIMIT``. An answer that says the token was rejected renews once and is
    sent once more; an ``EGW00201`` answer is counted and sent again after the next free slot, at
    most three times within 5 s (``common.budget.resend``). The caller gets the last answer; the
    earlier ones are in its ``history``.

    The KIS headers never follow a redirect to another origin (scheme, host or port): requests
    itself strips only ``Authorization``, so a response hook removes all three from a request
    before ``Session.resolve_redirects`` copies it for such a hop (with ``allow_redirects=False``
    too: ``response.request`` then shows them gone, and ``response.next`` goes without them). An
    answer from another origin is never taken as a rejection of the token (that host never saw it).

    Args:
        manager: a ``USTokenManager`` or ``KRTokenManager``.

    Raises (from the request):
        BudgetTimeoutError: no slot of the key's budget within 30 s (nothing was sent).
    """

    def __init__(self, manager: TokenSource) -> None:
        self.manager = manager

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        """Add the headers and the hook that resends; wait for the key's next slot."""
        request.headers.update(kis_headers(self.manager, self.manager.get_valid_token()))
        # requests runs the hook on every hop's answer, before it follows that answer's redirect
        request.register_hook("response", functools.partial(self._on_answer, sent_to=request.url))
        self.manager.call_budget().acquire()
        return request

    def _on_answer(self, response: requests.Response, *, sent_to: str, **kwargs: Any) -> requests.Response:
        if same_origin(str(response.request.url), sent_to):
            response = self._resend(response, **kwargs)
        drop_kis_headers_before_foreign_redirect(response)
        return response

    def _resend(self, response: requests.Response, **kwargs: Any) -> requests.Response:
        """Send again while the answer asks for it (a rejected token once, ``EGW00201`` a bounded
        number of times); the last answer."""
        resends: Resends | None = None
        renewed = getattr(response.request, "_kis_resent", False)
        while (code := answer_code(response.content)) is not None:
            request = response.request
            if not can_resend(request, code):
                return response
            again = request.copy()
            if code == RATE_EXCEEDED_CODE:
                resends = resends or Resends(self.manager.call_budget())
                if not resends.again():
                    return response
            else:
                if renewed:
                    return response
                sent = str(request.headers.get("authorization", "")).removeprefix("Bearer ")
                token = replacement(self.manager, sent, code)
                if token is None:
                    return response
                renewed = True
                again.headers.update(kis_headers(self.manager, token))
                self.manager.call_budget().acquire()
            again._kis_resent = renewed  # type: ignore[attr-defined]  # our mark on requests' own object
            response.close()
            answer = response.connection.send(again, **kwargs)  # type: ignore[attr-defined]  # set by requests' adapter, untyped
            answer.history[:0] = [*response.history, response]
            answer.request = again
            response = answer
        return response


def can_resend(request: requests.PreparedRequest, code: str) -> bool:
    """Whether ``request`` can be sent once more as it was: a body of bytes or text (or none), or a
    file-like body rewound to where the first send read it from. A stream that cannot be rewound
    (a generator, a pipe) was spent by the first send: the answer is returned as it is."""
    if request.body is None or isinstance(request.body, bytes | bytearray | str):
        return True
    if getattr(request, "_body_position", None) is not None:
        try:
            rewind_body(request)
        except UnrewindableBodyError as exc:
            _log.debug("answer %s not resent: the request's body cannot be rewound (%s)", code, exc)
            return False
        return True
    _log.debug("answer %s not resent: the request's body is a stream that was read", code)
    return False


def drop_kis_headers_before_foreign_redirect(response: requests.Response) -> None:
    """If ``response`` redirects to another origin, remove the KIS headers from the request it answers.

    ``Session.send`` runs the response hooks before ``resolve_redirects``, which copies that
    request (headers included) for the next hop, so the copy goes out without them. After a resend
    requests follows the redirect from the first request (``history[0].request``), so that one
    loses them too. A Location that cannot be parsed counts as another origin.
    """
    if not response.is_redirect:
        return
    if same_origin(str(response.request.url), redirect_target(response)):
        return
    for request in (response.request, *(earlier.request for earlier in response.history)):
        for name in KIS_HEADERS:
            request.headers.pop(name, None)


def redirect_target(response: requests.Response) -> str:
    """The URL ``response`` redirects to, resolved as ``Session.resolve_redirects`` does; "" if none."""
    try:
        location = response.headers["location"].encode("latin1").decode("utf8")
        if location.startswith("//"):  # scheme-relative (RFC 1808 section 4)
            location = f"{urlsplit(response.url).scheme}:{location}"
        return urljoin(response.url, requote_uri(location))
    except (KeyError, ValueError):  # no Location, or one that is not UTF-8 or does not parse
        return ""

