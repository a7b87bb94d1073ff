"""``KISHttpxAuth``: the managed token for ``httpx.Client`` and ``httpx.AsyncClient``.

See ``common.auth.requests_auth`` for the contract; this module imports httpx.

Redirects: with ``follow_redirects=True`` httpx follows every hop inside one step of the auth flow
and copies all headers but ``Authorization`` to another origin, so the flow cannot strip the KIS
headers itself. It puts a ``trace`` extension on the request instead, which httpx hands to every
hop and httpcore calls (``*.send_request_headers.started``) just before it writes a hop's headers:
there the KIS headers are removed from any hop whose origin is not the first request's. A trace the
caller set is kept and called after it. The guard works in httpx's own transports (httpcore); a
custom transport that ignores the ``trace`` extension does not get it.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator, Callable, Generator
from typing import Any

import httpcore
import httpx

from common.auth.requests_auth import (
    KIS_HEADERS,
    Origin,
    answer_code,
    kis_headers,
    log_replaced,
    log_replacement_failure,
    origin_key,
    replacement,
)
from common.auth.source import TokenSource
from common.budget.resend import RATE_EXCEEDED_CODE, Resends
from common.errors import KISTokenError

_KIS_HEADER_BYTES = frozenset(name.encode("ascii") for name in KIS_HEADERS)
_AUTHORITY_END = re.compile(rb"[/?#]")


class KISHttpxAuth(httpx.Auth):
    """``httpx`` authentication with the manager's token and the key's call budget.

    As :class:`~common.auth.requests_auth.KISAuth`: each send (and resend) waits for the key's next
    free slot; a rejected token renews once and resends once; an ``EGW00201`` answer is counted and
    resent after the next free slot, at most three times within 5 s. The async flow gets and
    replaces the token, and uses the budget's file or server, off the event loop
    (:meth:`~common.base_token_manager.BaseTokenManager.get_valid_token_async`), and awaits the waits.

    A request's body is read before the flow starts (:attr:`requires_request_body`), so a body
    given as a stream (a generator, an async iterator) is sent again whole, never found consumed.

    Args:
        manager: a ``USTokenManager`` or ``KRTokenManager``.
    """

    #: The body is read into the request before the first send, so a resend has all of it (httpx
    #: honours this in ``httpx.Auth``'s own flows; the flows below, which replace them, read it).
    requires_request_body = True

    def __init__(self, manager: TokenSource) -> None:
        self.manager = manager

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        """Send with the token after the key's next slot; resend as the answer asks (see the class)."""
        request.read()
        guard = guard_redirects(request, SyncOriginGuard)
        budget = self.manager.call_budget()
        token = self.manager.get_valid_token()
        request.headers.update(kis_headers(self.manager, token))
        budget.acquire()
        response = yield request
        renewed, resends = False, Resends(budget)
        while guard.answered(response) and (code := answer_code(response.read())) is not None:
            if code == RATE_EXCEEDED_CODE:
                if not resends.again():
                    return
            else:
                if renewed or (new := replacement(self.manager, token, code)) is None:
                    return
                renewed, token = True, new
                request.headers.update(kis_headers(self.manager, token))
                budget.acquire()
            response = yield request

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        """The same, with the token and the budget used in worker threads and the waits awaited."""
        await request.aread()
        guard = guard_redirects(request, AsyncOriginGuard)
        budget = self.manager.call_budget()
        token = await self.manager.get_valid_token_async()
        request.headers.update(kis_headers(self.manager, token))
        await budget.acquire_async()
        response = yield request
        renewed, resends = False, Resends(budget)
        while guard.answered(response) and (code := answer_code(await response.aread())) is not None:
            if code == RATE_EXCEEDED_CODE:
                if not await resends.again_async():
                    return
            else:
                if renewed:
                    return
                try:
                    token = await self.manager.replace_rejected_token_async(token)
                except KISTokenError as exc:
                    log_replacement_failure(self.manager, code, exc)
                    return
                log_replaced(self.manager, code)
                renewed = True
                request.headers.update(kis_headers(self.manager, token))
                await budget.acquire_async()
            response = yield request


def url_origin(url: httpx.URL) -> Origin:
    """An httpx URL's origin, in the bytes httpx hands to httpcore."""
    return origin_key(url.raw_scheme.decode("latin-1"), url.raw_host.decode("latin-1"), url.port)


def hop_origin(url: httpcore.URL) -> Origin:
    """The origin an httpcore request is for: its URL's, or its absolute-form target's (a forward proxy)."""
    scheme, sep, rest = url.target.partition(b"://")
    if url.target.startswith(b"/") or not sep:
        return origin_key(url.scheme.decode("latin-1"), url.host.decode("latin-1"), url.port)
    authority = _AUTHORITY_END.split(rest, 1)[0]
    host, colon, port = authority.rpartition(b":")
    if not (colon and port.isdigit()):
        host, port = authority, b""
    host = host.strip(b"[]")
    return origin_key(scheme.decode("latin-1"), host.decode("latin-1"), int(port) if port else None)


class OriginGuard:
    """A ``trace`` extension that keeps the KIS headers from every hop to another origin.

    Args:
        home: the origin of the request the headers were added to.
        inner: the trace the caller had set, called after this one (or None).
    """

    def __init__(self, home: Origin, inner: Callable[..., Any] | None) -> None:
        self.home = home
        self.inner = inner

    def answered(self, response: httpx.Response) -> bool:
        """Whether ``response`` (the last hop's) is from the home origin, the only one that saw the token."""
        return url_origin(response.request.url) == self.home

    def strip(self, name: str, info: dict[str, Any]) -> None:
        """Before a hop's headers are sent, drop the KIS headers if the hop is for another origin."""
        if not name.endswith(".send_request_headers.started"):
            return
        hop = info.get("request")
        if isinstance(hop, httpcore.Request) and hop_origin(hop.url) != self.home:
            hop.headers = [(key, value) for key, value in hop.headers if key.lower() not in _KIS_HEADER_BYTES]


class SyncOriginGuard(OriginGuard):
    """The guard for ``httpx.Client`` (httpcore calls a sync client's trace as a function)."""

    def __call__(self, name: str, info: dict[str, Any]) -> Any:
        """Strip, then call the caller's trace."""
        self.strip(name, info)
        return None if self.inner is None else self.inner(name, info)


class AsyncOriginGuard(OriginGuard):
    """The guard for ``httpx.AsyncClient`` (httpcore awaits an async client's trace)."""

    async def __call__(self, name: str, info: dict[str, Any]) -> Any:
        """Strip, then await the caller's trace."""
        self.strip(name, info)
        return None if self.inner is None else await self.inner(name, info)


def guard_redirects(request: httpx.Request, kind: type[OriginGuard]) -> OriginGuard:
    """The origin guard in ``request``'s ``trace`` extension, put there if it has none.

    A resend of the request keeps its guard, and so does a redirect the caller follows by hand
    (``response.next_request`` carries the extensions): its home stays the first request's origin.
    """
    trace = request.extensions.get("trace")
    if isinstance(trace, kind):
        return trace
    if isinstance(trace, OriginGuard):  # the same request, now sent by the other kind of client
        guard = kind(trace.home, trace.inner)
    else:
        guard = kind(url_origin(request.url), trace)
    request.extensions["trace"] = guard
    return guard
