"""A local stand-in for the KIS Open API's OAuth endpoints, for tests and demos.

It answers on the broker's paths with the broker's JSON shapes:
``POST /oauth2/tokenP``, ``POST /oauth2/revokeP``, ``POST /oauth2/Approval`` and any
``/uapi/...`` path, which checks the bearer token like a protected endpoint does. The ``/uapi`` paths
keep the broker's calls-per-second limit per app key (``EGW00201``, see :mod:`common.sandbox.rate`),
and a WebSocket endpoint on a port of its own keeps its one session per app key and 41
registrations (``OPSP8996``, ``OPSP0008``, see :mod:`common.sandbox.websocket`).

Knobs live under ``/sandbox/`` (JSON in and out)::

    GET    /sandbox/counters          what was asked and answered
    POST   /sandbox/faults            {"mode", "count", "delay", "path"} queue faults
    DELETE /sandbox/faults            drop queued faults
    GET    /sandbox/clock             {"offset", "now"}
    POST   /sandbox/clock             {"offset": seconds} set the clock offset
    POST   /sandbox/expire            let every token issued so far expire now (EGW00123)
    POST   /sandbox/reset             forget tokens, counters, faults, rate limits, offset
    GET    /sandbox/config            {"rate_limit", "token_lifetime", "same_token_window"}
    POST   /sandbox/config            change any of those
    GET    /sandbox/limits            {"rest_rate", "rest_rates", "ws_max_registrations"}
    POST   /sandbox/limits            change any of those (``rest_rates`` replaces the map)
    GET    /sandbox/info              {"base_url", "ws_url"} (``ws_url`` null without the endpoint)

``POST /sandbox/faults {"mode": "egw00201", "count": N[, "appkey": KEY]}`` answers the next N REST
calls (of that key, or of any) ``EGW00201`` whatever the rate.

Error codes where the broker's own are unknown: a body that is not a JSON object gets
HTTP 400 ``EGW00101`` (invalid request); a wrong ``grant_type`` 403 ``EGW00101``; a missing
app key 403 ``EGW00102``; a missing secret 403 ``EGW00104``; revoking a token that is unknown,
already revoked or another app key's 403 ``EGW00121``; an unknown path 404 and a wrong method
405, both ``EGW00101``. A ``/uapi`` call without a matching ``appkey`` header is ``EGW00121``.

Run it with ``python -m common.sandbox --help``. It never logs app secrets or tokens.
"""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import json
import math
import secrets
import signal
import socket
import socketserver
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, TracebackType
from typing import Any, Self
from urllib.parse import parse_qsl, urlsplit

from common.sandbox.rate import EGW00201_BODY, EGW00201_STATUS, REAL_RATE, RestRateLimit
from common.sandbox.websocket import MAX_REGISTRATIONS, WebSocketEndpoint

#: The broker writes expiries in Korea time without a zone designator.
KST = timezone(timedelta(hours=9), "KST")
TOKEN_PATH = "/oauth2/tokenP"
#: The port ``python -m common.sandbox`` listens on unless told (``.env.example`` points there).
DEFAULT_PORT = 8080
FAULT_MODES = ("5xx", "5xx_code", "5xx_ratelimit", "html", "truncated", "drop", "slow", "drip", "drip_5xx")
#: Garbled token answers (``bench/faults.py``), served by :meth:`_Handler._serve_garbled`.
GARBLED_MODES = ("bad_charset", "deep_json", "non_ascii_token", "wrong_types", "huge_body")
FAULT_MODES += GARBLED_MODES
#: The fault mode that answers REST calls (``/uapi`` paths) ``EGW00201``: :meth:`Sandbox.inject_egw00201`.
EGW00201_MODE = "egw00201"
#: Size of the ``huge_body`` answer: twice the largest answer a client should read.
HUGE_BODY = 2_000_000
MAX_BODY = 1 << 20

Reply = tuple[int, dict[str, Any]]

_RATE_LIMITED = "접근토큰 발급 잠시 후 다시 시도하세요(1분당 1회)"
_INVALID_TOKEN = "유효하지 않은 token 입니다."
_EXPIRED_TOKEN = "기간이 만료된 token 입니다."
_HTML_PAGE = (
    "<!DOCTYPE html><html><head><title>서비스 점검</title></head>"
    "<body><h1>서비스 점검 중입니다</h1></body></html>"
)
_UNAVAILABLE_PAGE = "<html><body><h1>503 Service Unavailable</h1></body></html>"


def _oauth_error(status: int, code: str, text: str) -> Reply:
    """Build an error in the OAuth endpoints' shape (not the usual envelope)."""
    return status, {"error_description": text, "error_code": code}


def _api_error(code: str, text: str) -> Reply:
    """Build an error in the ordinary API envelope, as HTTP 500 like the broker."""
    return 500, {"rt_cd": "1", "msg_cd": code, "msg1": text}


def _number(value: Any, name: str, minimum: float = 0.0) -> float:
    """Return ``value`` as a finite float of at least ``minimum``, or raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum:g}")
    return float(value)


def is_loopback(host: str) -> bool:
    """Tell whether ``host`` is ``localhost`` or a loopback IP address (no DNS lookup)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class _Token:
    value: str
    appkey: str
    issued: float
    expires: float


@dataclass
class _Fault:
    mode: str
    delay: float
    remaining: int


@dataclass
class _Counters:
    token_requests: Counter[str] = field(default_factory=Counter)
    tokens_issued: Counter[str] = field(default_factory=Counter)
    rate_limited: Counter[str] = field(default_factory=Counter)
    revocations: int = 0
    approvals: int = 0
    protected_calls: int = 0
    faults_served: int = 0

    def snapshot(self) -> dict[str, Any]:
        return {
            "token_requests": dict(self.token_requests),
            "tokens_issued": dict(self.tokens_issued),
            "rate_limited": dict(self.rate_limited),
            "revocations": self.revocations,
            "approvals": self.approvals,
            "protected_calls": self.protected_calls,
            "faults_served": self.faults_served,
        }


class Sandbox:
    """A fake KIS OAuth server on a loopback address, with knobs for tests.

    Args:
        host: loopback address to listen on.
        port: port to listen on; 0 picks a free one.
        rate_limit: seconds between two successful token answers for one app key.
        token_lifetime: seconds a new token lives.
        same_token_window: seconds after an issuance in which tokenP returns the same token.
        apps: accepted ``{app key: secret}``; ``None`` or empty accepts any non-empty pair.
        clock: returns epoch seconds (default ``time.time``); the offset is added on top.
        verbose: log one line per request to stderr (never bodies or headers).
        rest_rate: REST calls an app key may make in any one second (``/uapi`` paths; 0: no limit);
            the broker's is 18 for real accounts, 1 for paper ones.
        rest_rates: a rate per app key that overrides ``rest_rate`` (e.g. a paper key at 1).
        websocket: serve the WebSocket endpoint; ``None`` (default) serves it when the
            ``websockets`` library is installed.
        ws_port: the WebSocket endpoint's port; 0 picks a free one.
        ws_max_registrations: registrations a WebSocket session may hold (the broker's 41).

    Raises:
        ValueError: ``host`` is not a loopback address, or a knob is out of range.
        ImportError: ``websocket=True`` without the ``websockets`` library.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        rate_limit: float = 60.0,
        token_lifetime: float = 86400.0,
        same_token_window: float = 6 * 3600.0,
        apps: Mapping[str, str] | None = None,
        clock: Callable[[], float] | None = None,
        verbose: bool = False,
        *,
        rest_rate: int = REAL_RATE,
        rest_rates: Mapping[str, int] | None = None,
        websocket: bool | None = None,
        ws_port: int = 0,
        ws_max_registrations: int = MAX_REGISTRATIONS,
    ) -> None:
        if not is_loopback(host):
            raise ValueError(f"host must be a loopback address, not {host!r}")
        self.host = host
        self.port = port
        self.verbose = verbose
        self.rate_limit = _number(rate_limit, "rate_limit")
        self.token_lifetime = _number(token_lifetime, "token_lifetime", 1.0)
        self.same_token_window = _number(same_token_window, "same_token_window")
        self._apps = dict(apps or {})
        self._clock = clock or time.time
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._base_url: str | None = None
        self._rest = RestRateLimit(rest_rate, rest_rates)
        if websocket is None:
            websocket = importlib.util.find_spec("websockets") is not None
        elif websocket:
            import websockets  # noqa: F401  (say so now, not at start)
        self._ws = (
            WebSocketEndpoint(host, ws_port, self._app_key_of, ws_max_registrations, verbose)
            if websocket else None
        )
        self._forget()

    def _forget(self) -> None:
        """Drop all state except the configuration (call with the lock held or before start)."""
        self._offset = 0.0
        self._tokens: dict[str, _Token] = {}
        self._current: dict[str, _Token] = {}
        self._last_answer: dict[str, float] = {}
        self._faults: dict[str, list[_Fault]] = {}
        self._approvals: dict[str, str] = {}
        self._counters = _Counters()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Self:
        """Bind and serve in a daemon thread; return ``self``.

        Raises:
            RuntimeError: already started.
            OSError: the address cannot be bound.
        """
        if self._server is not None:
            raise RuntimeError("sandbox already started")
        server_class = _Server6 if ":" in self.host else _Server
        self._server = server_class((self.host, self.port), self)
        host, port = self._server.server_address[:2]
        self._base_url = f"http://[{host}]:{port}" if ":" in str(host) else f"http://{host}:{port}"
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="kis-sandbox",
            daemon=True,
        )
        self._thread.start()
        if self._ws is not None:
            try:
                self._ws.start()
            except BaseException:
                self.stop()
                raise
        return self

    def stop(self) -> None:
        """Stop serving and close the sockets (WebSocket sessions get code 1001); slow faults in
        progress end early."""
        if self._ws is not None:
            self._ws.stop()
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT`` of the running (or last run) server."""
        if self._base_url is None:
            raise RuntimeError("sandbox not started")
        return self._base_url

    @property
    def serves_websocket(self) -> bool:
        """Whether this sandbox serves the WebSocket endpoint."""
        return self._ws is not None

    @property
    def ws_url(self) -> str:
        """``ws://HOST:PORT`` of the running (or last run) WebSocket endpoint (any path is accepted).

        Raises:
            RuntimeError: the sandbox was not started, or serves no WebSocket endpoint.
        """
        if self._ws is None:
            raise RuntimeError("this sandbox serves no WebSocket endpoint (websocket=False or no websockets)")
        return self._ws.url

    # -- knobs -------------------------------------------------------------------------------

    def now(self) -> float:
        """The sandbox's time: the clock plus the offset, in epoch seconds."""
        return self._clock() + self._offset

    def counters(self) -> dict[str, Any]:
        """A copy of the counters, as served by ``GET /sandbox/counters``: the token endpoints',
        ``rest_calls`` and ``rest_egw00201`` per app key (see :meth:`RestRateLimit.snapshot`), and
        with the WebSocket endpoint its ``ws_*`` counters (see :meth:`WebSocketEndpoint.counters`)."""
        with self._lock:
            counters = self._counters.snapshot()
        counters.update(self._rest.snapshot())
        if self._ws is not None:
            counters.update(self._ws.counters())
        return counters

    def inject_fault(self, mode: str, count: int = 1, delay: float = 2.0, path: str = TOKEN_PATH) -> None:
        """Serve ``mode`` instead of the normal answer to the next ``count`` requests to ``path``.

        Modes: ``5xx`` (503, HTML body), ``5xx_code`` (500 with an unknown broker code,
        ``EGW00001``), ``5xx_ratelimit`` (500 with ``EGW00133``), ``html`` (200, HTML page),
        ``truncated`` (200, cut JSON), ``drop`` (close without answering), ``slow`` (answer
        normally after ``delay``), ``drip`` (the normal answer's headers at once, then its body one
        byte every ``delay`` seconds), ``drip_5xx`` (the same with a 503 answer).

        Garbled token answers, all HTTP 200: ``bad_charset`` (the normal answer, so a token is issued
        and counted, with ``Content-Type: application/json; charset=x-bogus``), ``deep_json``
        (200,000 ``[``), ``non_ascii_token`` (a token answer whose ``access_token`` holds Hangul, a
        token the sandbox never issued), ``wrong_types`` (a token answer whose ``access_token`` is a
        list), ``huge_body`` (a 2,000,000-byte JSON token answer: a token the sandbox never issued,
        padded). Except ``bad_charset``, they are not counted as token requests (like ``html``).

        Raises:
            ValueError: unknown mode, count below 1, negative delay or a bad path.
        """
        if mode not in FAULT_MODES:
            raise ValueError(f"mode must be one of {', '.join(FAULT_MODES)}")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError("count must be an integer of at least 1")
        delay = _number(delay, "delay")
        if not isinstance(path, str) or not path.startswith("/") or path.startswith("/sandbox/"):
            raise ValueError("path must start with / and not be under /sandbox/")
        with self._lock:
            self._faults.setdefault(path, []).append(_Fault(mode, delay, count))

    def inject_egw00201(self, count: int = 1, app_key: str | None = None) -> None:
        """Answer the next ``count`` REST calls (``/uapi`` paths) of ``app_key``, or of any key,
        ``EGW00201`` whatever the rate; they count in ``rest_egw00201``.

        Raises:
            ValueError: ``count`` below 1 or an empty ``app_key``.
        """
        self._rest.inject(count, app_key)

    def clear_faults(self) -> None:
        """Drop every queued fault, and the ``EGW00201`` answers not served yet."""
        with self._lock:
            self._faults.clear()
        self._rest.clear_injected()

    def advance(self, seconds: float) -> None:
        """Move the sandbox's time forward (or back, if negative) by ``seconds``."""
        seconds = _number(seconds, "seconds", -math.inf)
        with self._lock:
            self._offset += seconds

    def set_offset(self, seconds: float) -> None:
        """Set the clock offset to ``seconds``."""
        seconds = _number(seconds, "offset", -math.inf)
        with self._lock:
            self._offset = seconds

    def configure(
        self,
        rate_limit: float | None = None,
        token_lifetime: float | None = None,
        same_token_window: float | None = None,
    ) -> dict[str, float]:
        """Change the knobs given (the others stay) and return all three.

        Raises:
            ValueError: a value is not a number or is out of range.
        """
        with self._lock:
            if rate_limit is not None:
                self.rate_limit = _number(rate_limit, "rate_limit")
            if token_lifetime is not None:
                self.token_lifetime = _number(token_lifetime, "token_lifetime", 1.0)
            if same_token_window is not None:
                self.same_token_window = _number(same_token_window, "same_token_window")
            return self._config()

    def limits(self) -> dict[str, Any]:
        """The per-key limits: ``{"rest_rate", "rest_rates", "ws_max_registrations"}``."""
        limits = self._rest.limits()
        limits["ws_max_registrations"] = self._ws.max_registrations if self._ws else MAX_REGISTRATIONS
        return limits

    def configure_limits(
        self,
        rest_rate: int | None = None,
        rest_rates: Mapping[str, int] | None = None,
        ws_max_registrations: int | None = None,
    ) -> dict[str, Any]:
        """Change the per-key limits given (``rest_rates`` replaces the map) and return :meth:`limits`.

        Raises:
            ValueError: a value is out of range (nothing is changed then).
        """
        if ws_max_registrations is not None:
            from common.sandbox.websocket import check_registrations

            check_registrations(ws_max_registrations)
        self._rest.configure(rest_rate, rest_rates)
        if ws_max_registrations is not None and self._ws is not None:
            self._ws.configure(ws_max_registrations)
        return self.limits()

    def expire_tokens(self) -> int:
        """Let every token issued so far expire now, as if the broker had cut it short (protected
        calls then answer ``EGW00123``, and the next token request issues a new one); return how many."""
        with self._lock:
            now = self.now()
            for token in self._tokens.values():
                token.expires = min(token.expires, now)
            return len(self._tokens)

    def reset(self) -> None:
        """Forget tokens, approval keys, counters, faults, rate-limit memory and the clock offset
        (open WebSocket sessions stay open and keep their keys)."""
        with self._lock:
            self._forget()
        self._rest.reset()
        if self._ws is not None:
            self._ws.reset_counters()

    def _app_key_of(self, approval_key: str) -> str | None:
        """The app key an approval key was issued for, ``None`` if this sandbox did not issue it."""
        with self._lock:
            return self._approvals.get(approval_key)

    def _config(self) -> dict[str, float]:
        return {
            "rate_limit": self.rate_limit,
            "token_lifetime": self.token_lifetime,
            "same_token_window": self.same_token_window,
        }

    def _take_fault(self, path: str) -> _Fault | None:
        """Pop one queued fault for ``path``, if any."""
        with self._lock:
            queue = self._faults.get(path)
            if not queue:
                return None
            fault = queue[0]
            fault.remaining -= 1
            if fault.remaining == 0:
                queue.pop(0)
            self._counters.faults_served += 1
            return fault

    # -- broker endpoints --------------------------------------------------------------------

    def _check_app(self, key: Any, secret: Any) -> Reply | None:
        """Refuse a missing or wrong app key or secret; ``None`` means accepted."""
        if not isinstance(key, str) or not key:
            return _oauth_error(403, "EGW00102", "AppKey는 필수입니다.")
        if self._apps and key not in self._apps:
            return _oauth_error(403, "EGW00103", "유효하지 않은 AppKey입니다.")
        if not isinstance(secret, str) or not secret:
            return _oauth_error(403, "EGW00104", "AppSecret은 필수입니다.")
        if self._apps and not secrets.compare_digest(self._apps[key], secret):
            return _oauth_error(403, "EGW00105", "유효하지 않은 AppSecret입니다.")
        return None

    @staticmethod
    def _check_grant(body: dict[str, Any]) -> Reply | None:
        if body.get("grant_type") != "client_credentials":
            return _oauth_error(403, "EGW00101", "유효하지 않은 grant_type 입니다.")
        return None

    def _issue(self, body: dict[str, Any]) -> Reply:
        """``POST /oauth2/tokenP``."""
        key = body.get("appkey")
        if isinstance(key, str) and key:
            self._counters.token_requests[key] += 1
        refusal = self._check_grant(body) or self._check_app(key, body.get("appsecret"))
        if refusal:
            return refusal
        now = self.now()
        last = self._last_answer.get(key)
        if last is not None and now - last < self.rate_limit:
            self._counters.rate_limited[key] += 1
            return _oauth_error(403, "EGW00133", _RATE_LIMITED)
        token = self._current.get(key)
        if token is None or now - token.issued >= self.same_token_window or now >= token.expires:
            value = "sbx-" + secrets.token_urlsafe(48)
            token = _Token(value, key, now, now + self.token_lifetime)
            self._tokens[value] = self._current[key] = token
            self._counters.tokens_issued[key] += 1
        self._last_answer[key] = now
        expiry = datetime.fromtimestamp(token.expires, KST).strftime("%Y-%m-%d %H:%M:%S")
        return 200, {
            "access_token": token.value,
            "access_token_token_expired": expiry,
            "token_type": "Bearer",
            "expires_in": max(0, round(token.expires - now)),
        }

    def _revoke(self, body: dict[str, Any]) -> Reply:
        """``POST /oauth2/revokeP``."""
        key = body.get("appkey")
        refusal = self._check_app(key, body.get("appsecret"))
        if refusal:
            return refusal
        value = body.get("token")
        token = self._tokens.get(value) if isinstance(value, str) else None
        if token is None or token.appkey != key:
            return _oauth_error(403, "EGW00121", _INVALID_TOKEN)
        del self._tokens[token.value]
        if self._current.get(key) is token:
            del self._current[key]
        self._counters.revocations += 1
        return 200, {"code": 200, "message": "접근토큰 폐기에 성공하였습니다"}

    def _approve(self, body: dict[str, Any]) -> Reply:
        """``POST /oauth2/Approval`` (the secret is called ``secretkey`` here)."""
        refusal = self._check_grant(body) or self._check_app(body.get("appkey"), body.get("secretkey"))
        if refusal:
            return refusal
        self._counters.approvals += 1
        approval_key = str(uuid.uuid4())
        self._approvals[approval_key] = body["appkey"]
        return 200, {"approval_key": approval_key}

    def _protected(self, path: str, query: str, headers: Message) -> Reply:
        """Any ``/uapi/...`` path: keep the per-key rate, check the bearer token, answer a sample quote."""
        self._counters.protected_calls += 1
        app_key = headers.get("appkey")
        if app_key and not self._rest.admit(app_key):
            return EGW00201_STATUS, dict(EGW00201_BODY)
        scheme, _, value = (headers.get("authorization") or "").partition(" ")
        token = self._tokens.get(value.strip()) if scheme.lower() == "bearer" else None
        if token is None or token.appkey != headers.get("appkey"):
            return _api_error("EGW00121", _INVALID_TOKEN)
        if self.now() >= token.expires:
            return _api_error("EGW00123", _EXPIRED_TOKEN)
        output = _sample_output(path, dict(parse_qsl(query)))
        return 200, {
            "rt_cd": "0",
            "msg_cd": "MCA00000",
            "msg1": "정상처리 되었습니다.",
            "output": output,
        }

    # -- control endpoints -------------------------------------------------------------------

    def _control(self, method: str, path: str, body: dict[str, Any]) -> Reply:
        """The ``/sandbox/`` knobs; a bad value is HTTP 400 ``{"error": ...}``."""
        try:
            if (method, path) == ("GET", "/sandbox/counters"):
                return 200, self.counters()
            if (method, path) == ("POST", "/sandbox/faults") and body.get("mode") == EGW00201_MODE:
                self.inject_egw00201(body.get("count", 1), body.get("appkey"))
                return 200, {"ok": True}
            if (method, path) == ("POST", "/sandbox/faults"):
                self.inject_fault(
                    body.get("mode", ""),
                    body.get("count", 1),
                    body.get("delay", 2.0),
                    body.get("path", TOKEN_PATH),
                )
                return 200, {"ok": True}
            if (method, path) == ("DELETE", "/sandbox/faults"):
                self.clear_faults()
                return 200, {"ok": True}
            if (method, path) == ("POST", "/sandbox/clock"):
                self.set_offset(body.get("offset"))
            if path == "/sandbox/clock" and method in ("GET", "POST"):
                return 200, {"offset": self._offset, "now": self.now()}
            if (method, path) == ("POST", "/sandbox/expire"):
                return 200, {"expired": self.expire_tokens()}
            if (method, path) == ("POST", "/sandbox/reset"):
                self.reset()
                return 200, {"ok": True}
            if (method, path) == ("POST", "/sandbox/config"):
                known = ("rate_limit", "token_lifetime", "same_token_window")
                return 200, self.configure(**{k: body[k] for k in known if k in body})
            if (method, path) == ("GET", "/sandbox/config"):
                with self._lock:
                    return 200, self._config()
            if (method, path) == ("POST", "/sandbox/limits"):
                known = ("rest_rate", "rest_rates", "ws_max_registrations")
                return 200, self.configure_limits(**{k: body[k] for k in known if k in body})
            if (method, path) == ("GET", "/sandbox/limits"):
                return 200, self.limits()
            if (method, path) == ("GET", "/sandbox/info"):
                ws_url = self._ws.url if self._ws is not None else None
                return 200, {"base_url": self.base_url, "ws_url": ws_url}
        except ValueError as exc:
            return 400, {"error": str(exc)}
        return 404, {"error": f"no control endpoint {method} {path}"}

    def _route(self, method: str, url: str, headers: Message, raw: bytes) -> Reply:
        """Answer one request (faults are handled by the caller)."""
        parts = urlsplit(url)
        path = parts.path
        if path.startswith("/uapi/"):
            if method not in ("GET", "POST"):
                return _oauth_error(405, "EGW00101", "허용되지 않은 메서드입니다.")
            with self._lock:
                return self._protected(path, parts.query, headers)
        body = _json_object(raw)
        if path.startswith("/sandbox/"):
            if body is None:
                return 400, {"error": "body must be a JSON object"}
            return self._control(method, path, body)
        endpoint = {
            "/oauth2/tokenP": self._issue,
            "/oauth2/revokeP": self._revoke,
            "/oauth2/Approval": self._approve,
        }.get(path)
        if endpoint is None:
            return _oauth_error(404, "EGW00101", "유효하지 않은 요청입니다.")
        if method != "POST":
            return _oauth_error(405, "EGW00101", "허용되지 않은 메서드입니다.")
        if body is None or not raw.strip():
            return _oauth_error(400, "EGW00101", "유효하지 않은 요청입니다. (JSON 본문 필요)")
        with self._lock:
            return endpoint(body)


def _json_object(raw: bytes) -> dict[str, Any] | None:
    """Parse a request body as a JSON object; an empty body is ``{}``; else ``None``."""
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _sample_output(path: str, params: dict[str, str]) -> dict[str, str]:
    """Plausible quote fields for the two price endpoints mojito2 calls; ``{}`` otherwise."""
    if path == "/uapi/domestic-stock/v1/quotations/inquire-price":
        return {
            "stck_shrn_iscd": params.get("FID_INPUT_ISCD", "005930"),
            "stck_prpr": "70000",
            "prdy_vrss": "500",
            "prdy_vrss_sign": "2",
            "prdy_ctrt": "0.72",
            "stck_oprc": "69500",
            "stck_hgpr": "70300",
            "stck_lwpr": "69200",
            "acml_vol": "12345678",
        }
    if path == "/uapi/overseas-price/v1/quotations/price":
        exchange, symbol = params.get("EXCD", "NAS"), params.get("SYMB", "AAPL")
        return {
            "rsym": f"D{exchange}{symbol}",
            "zdiv": "4",
            "base": "189.00",
            "pvol": "51234567",
            "last": "190.12",
            "sign": "2",
            "diff": "1.12",
            "rate": "+0.59",
            "tvol": "48765432",
            "tamt": "9271234567",
            "ordy": "매수가능",
        }
    return {}


class _Handler(BaseHTTPRequestHandler):
    """Reads the body, serves a queued fault or hands the request to the sandbox."""

    server: _Server
    server_version = "KIS-Sandbox"
    timeout = 10

    def do_GET(self) -> None:
        self._answer("GET")

    def do_POST(self) -> None:
        self._answer("POST")

    def do_DELETE(self) -> None:
        self._answer("DELETE")

    def _answer(self, method: str) -> None:
        sandbox = self.server.sandbox
        length = int(self.headers.get("content-length") or 0)
        if not 0 <= length <= MAX_BODY:
            self.close_connection = True
            self._send(413, "application/json", b'{"error": "body too large"}')
            return
        raw = self.rfile.read(length)
        path = urlsplit(self.path).path
        fault = None if path.startswith("/sandbox/") else sandbox._take_fault(path)
        if fault is not None and fault.mode in GARBLED_MODES:
            self._serve_garbled(fault.mode, method, raw)
            return
        if fault is not None and fault.mode not in ("slow", "drip", "drip_5xx"):
            self._serve_fault(fault.mode)
            return
        if fault is not None and fault.mode == "slow":
            sandbox._stopping.wait(fault.delay)
        if fault is not None and fault.mode == "drip_5xx":
            status, payload = _oauth_error(503, "EGW00001", "일시적인 오류입니다")
        else:
            status, payload = sandbox._route(method, self.path, self.headers, raw)
        body = json.dumps(payload, ensure_ascii=False).encode()
        drip = fault.delay if fault is not None and fault.mode.startswith("drip") else None
        self._send(status, "application/json;charset=UTF-8", body, drip)

    def _serve_fault(self, mode: str) -> None:
        if mode == "drop":
            self.close_connection = True
        elif mode == "5xx":
            self._send(503, "text/html", _UNAVAILABLE_PAGE.encode())
        elif mode in ("5xx_code", "5xx_ratelimit"):
            unknown = ("EGW00001", "일시적인 오류입니다")
            code, text = unknown if mode == "5xx_code" else ("EGW00133", _RATE_LIMITED)
            status, payload = _oauth_error(500, code, text)
            body = json.dumps(payload, ensure_ascii=False).encode()
            self._send(status, "application/json;charset=UTF-8", body)
        elif mode == "html":
            self._send(200, "text/html;charset=UTF-8", _HTML_PAGE.encode())
        else:
            self._send(200, "application/json;charset=UTF-8", b'{"access_token": "abc')

    def _serve_garbled(self, mode: str, method: str, raw: bytes) -> None:
        """Serve one of :data:`GARBLED_MODES` (see :meth:`Sandbox.inject_fault`)."""
        sandbox = self.server.sandbox
        content_type = "application/json;charset=UTF-8"
        if mode == "bad_charset":
            status, payload = sandbox._route(method, self.path, self.headers, raw)
            body = json.dumps(payload, ensure_ascii=False).encode()
            self._send(status, "application/json; charset=x-bogus", body)
            return
        if mode == "deep_json":
            self._send(200, content_type, b"[" * 200_000)
            return
        now = sandbox.now()
        answer: dict[str, Any] = {
            "access_token": "sbx-" + secrets.token_urlsafe(48),
            "access_token_token_expired": datetime.fromtimestamp(now + sandbox.token_lifetime, KST)
            .strftime("%Y-%m-%d %H:%M:%S"),
            "token_type": "Bearer",
            "expires_in": round(sandbox.token_lifetime),
        }
        if mode == "non_ascii_token":
            answer["access_token"] = "sbx-토큰-" + secrets.token_urlsafe(32)
        elif mode == "wrong_types":
            answer["access_token"] = [answer["access_token"]]
        else:  # huge_body
            size = len(json.dumps({**answer, "padding": ""}).encode())
            answer["padding"] = "x" * (HUGE_BODY - size)
        self._send(200, content_type, json.dumps(answer, ensure_ascii=False).encode())

    def _send(self, status: int, content_type: str, body: bytes, drip: float | None = None) -> None:
        """Send the answer; with ``drip``, the body one byte every ``drip`` seconds after the headers."""
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if drip is None:
                self.wfile.write(body)
                return
            self.wfile.flush()
            for i in range(len(body)):
                if self.server.sandbox._stopping.wait(drip):
                    break
                self.wfile.write(body[i : i + 1])
                self.wfile.flush()
            self.close_connection = True
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def date_time_string(self, timestamp: float | None = None) -> str:
        """The ``Date`` header in the sandbox's own time (its clock and offset), as the broker's."""
        from email.utils import formatdate

        return formatdate(self.server.sandbox.now() if timestamp is None else timestamp, usegmt=True)

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.sandbox.verbose:
            sys.stderr.write(f"sandbox: {self.address_string()} {format % args}\n")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        """Bind without HTTPServer's reverse DNS lookup of the host."""
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if self.sandbox.verbose:
            super().handle_error(request, client_address)


class _Server6(_Server):
    address_family = socket.AF_INET6


def _parse_apps(values: list[str]) -> dict[str, str]:
    """Parse ``KEY:SECRET`` values; the error never repeats the value (it holds a secret)."""
    apps = {}
    for number, value in enumerate(values, 1):
        key, colon, secret = value.partition(":")
        if not (colon and key and secret):
            raise ValueError(f"--app #{number} must be KEY:SECRET with both parts non-empty")
        apps[key] = secret
    return apps


def _ws_port(port: int, ws_port: int | None) -> int:
    """The WebSocket port: ``ws_port`` if given, else the next after ``port`` (0 stays 0)."""
    if ws_port is not None:
        return ws_port
    return port + 1 if 0 < port < 65535 else 0


def _parse_key_rates(values: list[str]) -> dict[str, int]:
    """Parse ``KEY:RATE`` values (the error names the position, not the key)."""
    rates = {}
    for number, value in enumerate(values, 1):
        key, colon, rate = value.rpartition(":")
        if not (colon and key and rate.isdigit()):
            raise ValueError(f"--key-rate #{number} must be KEY:RATE with a whole number of calls a second")
        rates[key] = int(rate)
    return rates


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Serve until Ctrl-C or SIGTERM; print the base URL as the first line of stdout and, with the
    WebSocket endpoint, its URL as the second."""
    parser = argparse.ArgumentParser(
        prog="python -m common.sandbox",
        description="Local stand-in for the KIS Open API: OAuth endpoints, protected /uapi sample "
                    "endpoints with the per-key rate, and a WebSocket endpoint with its session rules.",
        epilog=(
            "Knobs (JSON over HTTP, under /sandbox/): GET counters; POST faults {\"mode\", \"count\", "
            "\"delay\", \"path\"} with mode one of " + ", ".join(FAULT_MODES) + "; DELETE faults; "
            "GET|POST clock {\"offset\"}; POST expire (protected calls answer EGW00123); POST reset; "
            "GET|POST config {\"rate_limit\", \"token_lifetime\", \"same_token_window\"}; "
            "GET|POST limits {\"rest_rate\", \"rest_rates\", \"ws_max_registrations\"}; GET info "
            "{\"base_url\", \"ws_url\"}. POST faults {\"mode\": \"" + EGW00201_MODE + "\", \"count\", "
            "\"appkey\"} answers the next REST calls (of that key, or of any) EGW00201. Example: "
            "curl -X POST -d '{\"mode\": \"5xx\", \"count\": 2}' http://127.0.0.1:8080/sandbox/faults"
        ),
    )
    parser.add_argument("--host", default="127.0.0.1", help="loopback address (default %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help="port (default %(default)s, as in .env.example; 0 picks a free one)")
    parser.add_argument("--rate-limit", type=float, default=60.0, metavar="SECONDS",
                        help="seconds between two token answers for one app key (default %(default)s)")
    parser.add_argument("--token-lifetime", type=float, default=86400.0, metavar="SECONDS")
    parser.add_argument("--same-token-window", type=float, default=6 * 3600.0, metavar="SECONDS")
    parser.add_argument(
        "--app",
        action="append",
        default=[],
        metavar="KEY:SECRET",
        help="accepted app (repeatable)",
    )
    limits = parser.add_argument_group("per-key limits (the broker's notice of 2026-04-20)")
    limits.add_argument("--rest-rate", type=int, default=REAL_RATE, metavar="N",
                        help="REST calls (/uapi paths) an app key may make in any one second; beyond it "
                             "EGW00201 (default %(default)s, the broker's for real accounts; paper "
                             "accounts get 1; 0: no limit)")
    limits.add_argument("--key-rate", action="append", default=[], metavar="KEY:N",
                        help="the rate of one app key, e.g. a paper key at 1 (repeatable)")
    limits.add_argument("--ws-port", type=int, default=None, metavar="PORT",
                        help="the WebSocket endpoint's port (default: --port + 1, 0 when --port is 0); "
                             "one session per app key (a second gets OPSP8996)")
    limits.add_argument("--ws-max-registrations", type=int, default=MAX_REGISTRATIONS, metavar="N",
                        help="registrations a WebSocket session may hold; beyond it OPSP0008 "
                             "(default %(default)s)")
    limits.add_argument("--no-websocket", action="store_true",
                        help="serve no WebSocket endpoint (it needs the websockets library)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log requests to stderr")
    args = parser.parse_args(argv)

    def fail(message: str, code: int = 2) -> int:
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return code

    if not is_loopback(args.host):
        return fail(f"--host must be a loopback address, not {args.host!r}")
    try:
        sandbox = Sandbox(
            args.host,
            args.port,
            args.rate_limit,
            args.token_lifetime,
            args.same_token_window,
            _parse_apps(args.app),
            verbose=args.verbose,
            rest_rate=args.rest_rate,
            rest_rates=_parse_key_rates(args.key_rate),
            websocket=False if args.no_websocket else None,
            ws_port=_ws_port(args.port, args.ws_port),
            ws_max_registrations=args.ws_max_registrations,
        )
    except ValueError as exc:
        return fail(str(exc))
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        try:
            sandbox.start()
        except OSError as exc:
            return fail(f"cannot listen on {args.host} (port {args.port}, websocket port "
                        f"{_ws_port(args.port, args.ws_port)}): {exc.strerror}", 1)
        print(sandbox.base_url, flush=True)
        if sandbox.serves_websocket:
            print(sandbox.ws_url, flush=True)
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        sandbox.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
