"""The sandbox's WebSocket endpoint: the broker's one session per app key and 41 registrations.

Like ``ws://ops.koreainvestment.com:21000`` (any path is accepted: clients use ``/tryitout/H0STCNT0``
or ``/tryitout``), a client sends JSON text messages::

    {"header": {"approval_key": "...", "custtype": "P", "tr_type": "1", "content-type": "utf-8"},
     "body": {"input": {"tr_id": "H0STCNT0", "tr_key": "005930"}}}

``tr_type`` ``"1"`` registers, ``"2"`` releases. Every message gets one answer in the broker's shape
``{"header": {"tr_id", "tr_key", "encrypt": "N"}, "body": {"rt_cd", "msg_cd", "msg1"[, "output"]}}``:

=========  =======  =====================================================================
msg_cd     rt_cd    when
=========  =======  =====================================================================
OPSP0000   0        ``SUBSCRIBE SUCCESS`` (``output`` holds ``iv`` and ``key``, as the broker's)
OPSP0001   0        ``UNSUBSCRIBE SUCCESS``
OPSP0002   1        ``ALREADY IN SUBSCRIBE`` (the pair is registered already; nothing counted)
OPSP0003   1        ``UNSUBSCRIBE ERROR(not found!)``
OPSP0008   1        ``MAX SUBSCRIBE OVER``: the 42nd registration of a session
OPSP8996   9        ``ALREADY IN USE appkey``: another connection holds the app key's session;
                    the connection is then closed
OPSP0011   1        ``invalid approval : NOT FOUND``: an approval key the sandbox did not issue
OPSP8997   9        ``JSON PARSING ERROR : invalid tr_type``
OPSP899x, 999x      other malformed messages (codes from the broker's FAQ list)
=========  =======  =====================================================================

The codes and texts are the broker's (its portal FAQ; the 41 and ``OPSP0008`` as users measured
them); the ``rt_cd`` of ``OPSP0002``, ``OPSP0008`` and ``OPSP0011`` are as third parties logged them.
A connection becomes its app key's session with its first message that carries a valid approval
key; closing it frees the key at once (the broker's own hold after a close is not modelled).

The ``websockets`` library is imported when the endpoint starts, so the sandbox imports without it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: Registrations a session may hold (the broker allows 41 in all, across every product).
MAX_REGISTRATIONS = 41

_NO_TR = ("(null)", "")
_logger = logging.getLogger(__name__)
_logger.addHandler(logging.NullHandler())
_logger.propagate = False


@dataclass
class _Session:
    """One connection's state: the app key it presented and holds, and its registrations."""

    presented: str | None = None
    holds: bool = False
    registrations: set[tuple[str, str]] = field(default_factory=set)


def _reply(tr: tuple[str, str], rt_cd: str, msg_cd: str, msg1: str, **output: str) -> dict[str, Any]:
    body: dict[str, Any] = {"rt_cd": rt_cd, "msg_cd": msg_cd, "msg1": msg1}
    if output:
        body["output"] = output
    return {"header": {"tr_id": tr[0], "tr_key": tr[1], "encrypt": "N"}, "body": body}


class WebSocketEndpoint:
    """A WebSocket server in a thread of its own (with its own asyncio loop) that keeps the broker's
    session rules per app key.

    Args:
        host: loopback address to listen on.
        port: port to listen on; 0 picks a free one.
        app_key_of: maps an approval key to the app key it was issued for, ``None`` if unknown.
        max_registrations: registrations a session may hold (the broker's 41).
        verbose: log handshake errors to stderr.
    """

    def __init__(
        self,
        host: str,
        port: int,
        app_key_of: Callable[[str], str | None],
        max_registrations: int = MAX_REGISTRATIONS,
        verbose: bool = False,
    ) -> None:
        self.host = host
        self.port = port
        self.max_registrations = check_registrations(max_registrations)
        self._app_key_of = app_key_of
        self._verbose = verbose
        self._lock = threading.Lock()
        self._holders: dict[str, _Session] = {}
        self._presenting: Counter[str] = Counter()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._url: str | None = None
        self._reset_counters()

    def _reset_counters(self) -> None:
        self._connections = 0
        self._opened: Counter[str] = Counter()
        self._refused_in_use: Counter[str] = Counter()
        self._max_concurrent: Counter[str] = Counter()
        self._over_max: Counter[str] = Counter()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Bind and serve in a daemon thread; return once listening.

        Raises:
            RuntimeError: already started, or the server did not come up within 10 s.
            OSError: the address cannot be bound.
            ImportError: the ``websockets`` library is not installed.
        """
        if self._thread is not None:
            raise RuntimeError("websocket endpoint already started")
        import websockets.asyncio.server  # noqa: F401  (fail here, in the caller's thread)

        ready = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._main(ready, failure)), name="kis-sandbox-ws", daemon=True
        )
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the sandbox's websocket endpoint did not start within 10 s")
        if failure:
            self._thread.join(timeout=5)
            self._thread = None
            raise failure[0]

    async def _main(self, ready: threading.Event, failure: list[BaseException]) -> None:
        from websockets.asyncio.server import serve

        try:
            server = await serve(
                self._serve, self.host, self.port, logger=None if self._verbose else _logger
            )
        except OSError as exc:
            failure.append(exc)
            ready.set()
            return
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        host, port = next(iter(server.sockets)).getsockname()[:2]
        self._url = f"ws://[{host}]:{port}" if ":" in str(host) else f"ws://{host}:{port}"
        ready.set()
        await self._stop.wait()
        server.close()
        await server.wait_closed()

    def stop(self) -> None:
        """Close every connection (code 1001) and the listening socket; wait for the thread."""
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None:
            return
        if loop is not None and stop is not None:
            loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=10)
        self._thread = self._loop = self._stop = None

    @property
    def url(self) -> str:
        """``ws://HOST:PORT`` of the running (or last run) endpoint."""
        if self._url is None:
            raise RuntimeError("websocket endpoint not started")
        return self._url

    # -- knobs -------------------------------------------------------------------------------

    def counters(self) -> dict[str, Any]:
        """Connections accepted; per app key: sessions opened, ``OPSP8996`` sent, the most connections
        that presented the key at once (a refused one counts until it is closed), ``OPSP0008`` sent,
        and the registrations of the session open now."""
        with self._lock:
            return {
                "ws_connections": self._connections,
                "ws_sessions_opened": dict(self._opened),
                "ws_opsp8996": dict(self._refused_in_use),
                "ws_max_concurrent": dict(self._max_concurrent),
                "ws_registrations_refused": dict(self._over_max),
                "ws_sessions_open": {key: len(s.registrations) for key, s in self._holders.items()},
            }

    def reset_counters(self) -> None:
        """Zero the counters (open sessions stay open and keep their keys)."""
        with self._lock:
            self._reset_counters()

    def configure(self, max_registrations: int) -> None:
        """Change how many registrations a session may hold (open sessions keep theirs)."""
        value = check_registrations(max_registrations)
        with self._lock:
            self.max_registrations = value

    # -- one connection ----------------------------------------------------------------------

    async def _serve(self, connection: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        session = _Session()
        with self._lock:
            self._connections += 1
        try:
            async for message in connection:
                reply, close = self._answer(session, message)
                await connection.send(json.dumps(reply, ensure_ascii=False))
                if close:
                    await connection.close()
                    break
        except ConnectionClosed:
            pass
        finally:
            self._release(session)

    def _answer(self, session: _Session, message: str | bytes) -> tuple[dict[str, Any], bool]:
        """The answer to one message, and whether to close the connection after it."""
        try:
            parsed = json.loads(message)
        except (UnicodeDecodeError, json.JSONDecodeError):
            parsed = None
        if not isinstance(parsed, dict):
            return _reply(_NO_TR, "9", "OPSP9999", "JSON PARSING ERROR : invalid json format"), False
        header = parsed.get("header")
        if not isinstance(header, dict):
            return _reply(_NO_TR, "9", "OPSP9998", "JSON PARSING ERROR : header not found"), False
        approval = header.get("approval_key")
        app_key = self._app_key_of(approval) if isinstance(approval, str) and approval else None
        if app_key is None:
            return _reply(_NO_TR, "1", "OPSP0011", "invalid approval : NOT FOUND"), False
        with self._lock:
            if session.presented is None:
                refusal = self._bind(session, app_key)
                if refusal is not None:
                    return refusal, True
            elif app_key != session.presented:
                return _reply(_NO_TR, "1", "OPSP0011", "invalid approval : another appkey's session"), False
            return self._register(session, header.get("tr_type"), parsed.get("body")), False

    def _bind(self, session: _Session, app_key: str) -> dict[str, Any] | None:
        """Make ``session`` the key's session, or the ``OPSP8996`` refusal if another holds it (lock held)."""
        session.presented = app_key
        self._presenting[app_key] += 1
        self._max_concurrent[app_key] = max(self._max_concurrent[app_key], self._presenting[app_key])
        if app_key in self._holders:
            self._refused_in_use[app_key] += 1
            return _reply(_NO_TR, "9", "OPSP8996", "ALREADY IN USE appkey")
        self._holders[app_key] = session
        session.holds = True
        self._opened[app_key] += 1
        return None

    def _register(self, session: _Session, tr_type: Any, body: Any) -> dict[str, Any]:
        """Register or release one ``(tr_id, tr_key)`` of a held session (lock held)."""
        if not isinstance(body, dict):
            return _reply(_NO_TR, "9", "OPSP9992", "JSON PARSING ERROR : body not found")
        given = body.get("input")
        if not isinstance(given, dict):
            return _reply(_NO_TR, "9", "OPSP9991", "JSON PARSING ERROR : input not found")
        tr_id, tr_key = given.get("tr_id"), given.get("tr_key")
        if not isinstance(tr_id, str) or not tr_id:
            return _reply(_NO_TR, "9", "OPSP8991", "SUBSCRIBE ERROR : invalid tr_id")
        if not isinstance(tr_key, str) or not tr_key:
            return _reply((tr_id, ""), "9", "OPSP8992", "SUBSCRIBE ERROR : invalid tr_key")
        tr = (tr_id, tr_key)
        if tr_type == "1":
            if tr in session.registrations:
                return _reply(tr, "1", "OPSP0002", "ALREADY IN SUBSCRIBE")
            if len(session.registrations) >= self.max_registrations:
                assert session.presented is not None
                self._over_max[session.presented] += 1
                return _reply(tr, "1", "OPSP0008", "MAX SUBSCRIBE OVER")
            session.registrations.add(tr)
            return _reply(tr, "0", "OPSP0000", "SUBSCRIBE SUCCESS",
                          iv=secrets.token_hex(8), key=secrets.token_hex(16))
        if tr_type == "2":
            if tr not in session.registrations:
                return _reply(tr, "1", "OPSP0003", "UNSUBSCRIBE ERROR(not found!)")
            session.registrations.discard(tr)
            return _reply(tr, "0", "OPSP0001", "UNSUBSCRIBE SUCCESS")
        return _reply(tr, "9", "OPSP8997", "JSON PARSING ERROR : invalid tr_type")

    def _release(self, session: _Session) -> None:
        """A connection closed: it no longer presents its key, and frees the key if it held it."""
        with self._lock:
            key = session.presented
            if key is None:
                return
            self._presenting[key] -= 1
            if self._presenting[key] <= 0:
                del self._presenting[key]
            if session.holds and self._holders.get(key) is session:
                del self._holders[key]


def check_registrations(value: Any) -> int:
    """Return ``value`` as a number of registrations (at least 1), or raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("ws_max_registrations must be an integer of at least 1")
    return value
