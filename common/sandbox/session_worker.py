"""A process that asks for a key's WebSocket session lease and, holding it, connects to the sandbox's
WebSocket endpoint, for the multi-process session tests and ``bench/session_lease.py``:
``python -m common.sandbox.session_worker START HOLD WAIT TTL PACE``.

Its configuration is the environment a user would set (``KIS_BASE_URL`` pointing at the sandbox,
``KIS_US_APP_KEY``/``SECRET``, ``KIS_TOKEN_DIR``, ``KIS_TOKEN_STORE``). It takes the approval key and
the sandbox's ``ws_url`` first, waits until the wall-clock time START (so that every worker asks at
once, however long each took to start), then enters ``manager.websocket_session(WAIT, times=...)``
(a lease of TTL seconds, beating every TTL/3, PACE seconds between starts). Holding it, it connects,
sends one subscribe message with the approval key, and keeps the session HOLD seconds (or until it is
killed). It prints one JSON line per event, each with ``pid`` and ``at`` (wall-clock seconds):

``{"event": "held", "code": <the server's msg_cd>, "asked": <seconds from START to the lease>}``
``{"event": "released"}``
``{"event": "refused", "asked": ..., "message": <the SessionHeldError>}``

Exit code 0 (a refusal too), or 1 with the error on stderr.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request
from types import SimpleNamespace
from typing import Any

from common.base_token_manager import BaseTokenManager
from common.errors import SessionHeldError
from common.session import SessionTimes, raise_if_refused


class USMarket(BaseTokenManager):
    """The US market's three hooks on its variables (``KIS_US_APP_KEY`` ...), written out here because
    ``common`` never imports a market; the facade it runs is the package's own."""

    market_config = SimpleNamespace(APP_KEY_VAR="KIS_US_APP_KEY", APP_SECRET_VAR="KIS_US_APP_SECRET")

    def get_api_url(self) -> str:
        """``KIS_US_BASE_URL``, else ``KIS_BASE_URL``."""
        return self.settings.base_url("KIS_US_BASE_URL")

    def get_app_credentials(self) -> tuple[str, str]:
        """``(KIS_US_APP_KEY, KIS_US_APP_SECRET)``."""
        return self.settings.require("KIS_US_APP_KEY"), self.settings.require("KIS_US_APP_SECRET")

    def get_token_file_prefix(self) -> str:
        """``us_``."""
        return "us_"


def say(event: str, **fields: Any) -> None:
    """Print one event line."""
    print(json.dumps({"event": event, "pid": os.getpid(), "at": time.time(), **fields}), flush=True)


def subscribe(approval_key: str) -> str:
    """A subscribe message in the broker's shape."""
    return json.dumps({"header": {"approval_key": approval_key, "custtype": "P", "tr_type": "1",
                                  "content-type": "utf-8"},
                       "body": {"input": {"tr_id": "H0STCNT0", "tr_key": "005930"}}})


def ws_url(base_url: str) -> str:
    """The sandbox's WebSocket URL (``GET /sandbox/info``, proxies ignored)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(base_url + "/sandbox/info", timeout=10) as answer:
        return str(json.loads(answer.read())["ws_url"])


def run(start: float, hold: float, wait: float, times: SessionTimes) -> None:
    """Ask for the lease at ``start`` and hold the session ``hold`` seconds (see the module docstring)."""
    from websockets.sync.client import connect

    manager = USMarket()
    manager.get_approval_key()  # every process of the key: one request (single flight)
    url = ws_url(manager.get_api_url())
    time.sleep(max(0.0, start - time.time()))
    try:
        with manager.websocket_session(wait, times=times) as approval_key:
            asked = time.time() - start
            with connect(url, open_timeout=10) as socket:
                socket.send(subscribe(approval_key))
                answer = json.loads(socket.recv(timeout=10))
                say("held", code=answer["body"]["msg_cd"], asked=asked)
                raise_if_refused(answer, manager.market)
                time.sleep(hold)
        say("released")
    except SessionHeldError as exc:
        say("refused", asked=time.time() - start, message=str(exc))


def main(argv: list[str]) -> int:
    """Run :func:`run` with the command line's arguments."""
    start, hold, wait, ttl, pace = (float(value) for value in argv)
    run(start, hold, wait, SessionTimes(ttl=ttl, heartbeat=ttl / 3, pace=pace))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
