"""A line on stderr while a renewal waits longer than :data:`PROGRESS_AFTER` seconds, saying what for.

::

    waiting for the broker: us token request to https://openapi.koreainvestment.com:9443/oauth2/tokenP (2 s)

The market CLI shows it when stderr is a terminal or with ``-v`` (never with ``-q``), for the
commands that may send a request (``get``, ``approval``, ``refresh``, ``warmup``, ``revoke``). It
knows which request is under way from :class:`RequestWatch`, which stands in as the manager's
``session`` and only notes each request before handing it on.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

#: Seconds before the first line; then one every :data:`PROGRESS_EVERY` seconds until the end.
PROGRESS_AFTER = 2.0
PROGRESS_EVERY = 5.0
#: How often the watcher looks (seconds).
POLL = 0.25
#: What a request to each broker path is called.
_REQUESTS = {
    "/oauth2/tokenP": "token request",
    "/oauth2/Approval": "approval key request",
    "/oauth2/revokeP": "token revocation",
}


class RequestWatch:
    """Sends like the ``requests`` module (or the session it wraps), noting each request first.

    Attributes:
        current: ``(method, url)`` of the last request sent, or None before the first.
    """

    def __init__(self, sender: Any = None) -> None:
        self._sender = sender
        self.current: tuple[str, str] | None = None

    def post(self, url: str, **kwargs: Any) -> Any:
        """``POST`` ``url`` (noted first)."""
        self.current = ("POST", url)
        return self._target().post(url, **kwargs)

    def get(self, url: str, **kwargs: Any) -> Any:
        """``GET`` ``url`` (noted first)."""
        self.current = ("GET", url)
        return self._target().get(url, **kwargs)

    def _target(self) -> Any:
        if self._sender is not None:
            return self._sender
        import requests

        return requests


class Progress:
    """Writes the waiting line through ``write`` once ``after`` seconds have passed, then every ``every``.

    Args:
        market: ``us`` or ``kr``.
        credential: ``token`` or ``approval key``.
        watch: what tells which request is under way.
        write: takes one line (no newline).
        after, every: seconds (see :data:`PROGRESS_AFTER`).
        clock: a monotonic clock (tests inject one).
    """

    def __init__(self, market: str, credential: str, watch: RequestWatch, write: Callable[[str], None],
                 after: float = PROGRESS_AFTER, every: float = PROGRESS_EVERY,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.market = market.lower()
        self.credential = credential
        self.watch = watch
        self._write = write
        self._every = max(every, 0.001)
        self._clock = clock
        self._started = clock()
        self._next = after

    def line(self, elapsed: float) -> str:
        """What is being waited for, and for how long."""
        seconds = f"({elapsed:.0f} s)"
        if self.watch.current is None:  # no request yet: the key's lock (another process) or the store
            return (f"waiting for the {self.market} {self.credential}'s lock or store (another process "
                    f"may be renewing it) {seconds}")
        from common.settings import mask_url

        method, url = self.watch.current
        path = "/" + url.split("://", 1)[-1].split("/", 1)[-1] if "://" in url else url
        what = _REQUESTS.get(path.split("?", 1)[0], "clock reading" if method == "GET" else "request")
        return f"waiting for the broker: {self.market} {what} to {mask_url(url)} {seconds}"

    def tick(self) -> None:
        """Write the line if it is due."""
        elapsed = self._clock() - self._started
        if elapsed >= self._next:
            self._write(self.line(elapsed))
            while self._next <= elapsed:
                self._next += self._every


def wanted(verbose: int, quiet: bool, stream: TextIO | None = None) -> bool:
    """True when the line is to be shown: ``-v``, or stderr is a terminal; never with ``-q``."""
    if quiet:
        return False
    if verbose:
        return True
    stream = stream or sys.stderr
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def write_stderr(line: str) -> None:
    """Print ``line`` on stderr."""
    with contextlib.suppress(OSError, ValueError):
        print(line, file=sys.stderr, flush=True)


@contextlib.contextmanager
def watching(manager: Any, market: str, credential: str = "token") -> Iterator[Progress]:
    """While the block runs, a thread writes the waiting line (see :class:`Progress`) on stderr; the
    manager's ``session`` is wrapped in a :class:`RequestWatch` meanwhile."""
    before = getattr(manager, "session", None)
    watch = RequestWatch(before)
    manager.session = watch
    progress = Progress(market, credential, watch, lambda line: write_stderr(line), after=PROGRESS_AFTER,
                        every=PROGRESS_EVERY)
    done = threading.Event()

    def run() -> None:
        while not done.wait(POLL):
            progress.tick()

    thread = threading.Thread(target=run, name="kis-token-progress", daemon=True)
    thread.start()
    try:
        yield progress
    finally:
        done.set()
        thread.join(timeout=POLL + 1.0)
        manager.session = before
