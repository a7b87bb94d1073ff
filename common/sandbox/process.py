"""The sandbox in a process of its own, and waiting for child processes (for tests and the bench).

:class:`SandboxProcess` runs ``python -m common.sandbox`` on 127.0.0.1 and drives it over loopback
HTTP (proxies ignored), so that a test or a benchmark may fork without a server thread in its own
process. :func:`finish` waits for children with a bound, :func:`terminate` stops one. Not a
production module: nothing the package serves imports it.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

#: The folder that holds the ``common`` package (the checkout), where ``-m common.sandbox`` resolves.
PACKAGE_ROOT = Path(__file__).resolve().parents[2]


class SandboxProcess:
    """``python -m common.sandbox --host 127.0.0.1 --port 0 [ARGS...]`` in a child process.

    Args:
        args: more command-line arguments of the sandbox (``--app KEY=SECRET``...).
        env: the child's environment (None: this process's).
        timeout: how long to wait for the server's first line (its URL).

    Raises:
        RuntimeError: the server did not start on 127.0.0.1 within ``timeout``.
    """

    def __init__(self, *args: str, env: Mapping[str, str] | None = None, timeout: float = 20.0) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "common.sandbox", "--host", "127.0.0.1", "--port", "0", *args],
            env=None if env is None else dict(env), cwd=PACKAGE_ROOT, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline().strip() if ready else ""
        if not line.startswith("http://127.0.0.1:"):
            self.stop()
            raise RuntimeError(f"the sandbox did not start on 127.0.0.1 (first line: {line!r})")
        self.base_url = line

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send one control request under ``/sandbox/`` and return the JSON answer."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base_url + "/sandbox/" + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with self._opener.open(request, timeout=10) as answer:
            return json.loads(answer.read())

    def control(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """``POST /sandbox/<path>`` with ``body`` (``faults``, ``config``, ``clock``, ``reset``...)."""
        return self.call("POST", path, {} if body is None else body)

    def counters(self) -> dict[str, Any]:
        """``GET /sandbox/counters``: ``token_requests`` and ``tokens_issued`` per app key, and more."""
        return self.call("GET", "counters")

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after 10 s)."""
        terminate(self.process)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()


def terminate(process: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """Stop ``process``: SIGTERM, then SIGKILL if it is still there after ``grace`` seconds; reap it."""
    process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=grace)


def finish(processes: Sequence[subprocess.Popen[str]], timeout: float = 60) -> list[tuple[int, str, str]]:
    """Wait for each process (at most ``timeout`` s each, then kill it); return (exit code, stdout,
    stderr) of each, '' for a stream that was not piped."""
    results = []
    for process in processes:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
        results.append((process.returncode, out or "", err or ""))
    return results
