"""Benchmark of the WebSocket session lease (issue 19): ``python bench/session_lease.py [--quick]``.

Not a section of ``bench/run.py`` (run it on its own). It starts the sandbox (with its WebSocket
endpoint) and a real Redis/Valkey server on 127.0.0.1 (``common.sandbox.redis_server``), works in a
temporary directory, and stops every child at the end. Progress goes to stderr; stdout carries a
Markdown report. Nothing here asserts on timings. The lease's bounds are the defaults
(:data:`common.session.DEFAULT_TIMES`: a 15 s server lease beaten every 5 s, 5 s between starts).

1. **Hand-over after a SIGKILL**: a worker (``common.sandbox.session_worker``) holds the key's session
   (connected to the sandbox) for longer than the pacing interval; a second one waits for the lease;
   the holder is SIGKILLed; reported: the time from the kill to the second one's lease, on one host
   (the token directory's ``flock``: the kernel drops it at once) and across two token directories
   sharing the server (the lease's 15 s time to live after its last heartbeat), and the sandbox's
   ``OPSP8996`` count (0: never two sessions).
2. **Cost of a free lease**: ``acquire()`` + ``release()`` in one process with nothing to wait for
   (no pacing), file alone and file + server (one script each way and the heartbeat thread started
   and stopped), median per pair.
"""

from __future__ import annotations

import json
import os
import select
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _util import Context, log, main, reap, spawn, table

from common.sandbox.redis_server import RedisServer
from common.session import DEFAULT_TIMES, SessionTimes, open_session
from common.settings import Settings

START_DELAY = 3.0  # for the waiter's interpreter to start before it asks


def next_event(process: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    """The next JSON event line of a worker (RuntimeError if none comes in time)."""
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    line = process.stdout.readline() if ready else b""
    if not line:
        raise RuntimeError("a session worker said nothing in time")
    return json.loads(line)


def worker(ctx: Context, env: dict[str, str], start: float, hold: float,
           wait: float) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "common.sandbox.session_worker", f"{start:.6f}", str(hold), str(wait),
            str(DEFAULT_TIMES.ttl), str(DEFAULT_TIMES.pace)]
    return spawn(argv, env, stdout=subprocess.PIPE)


def hand_over(ctx: Context, holder_env: dict[str, str], waiter_env: dict[str, str]) -> float:
    """Seconds from the holder's SIGKILL to the waiter's lease (see the module docstring)."""
    holder = worker(ctx, holder_env, time.time(), 600.0, 0.0)
    held = next_event(holder, 60)
    if held.get("code") != "OPSP0000":
        raise RuntimeError(f"the holder did not get the session: {held}")
    ask_at = time.time() + START_DELAY
    waiter = worker(ctx, waiter_env, ask_at, 0.0, 60.0)
    kill_at = max(ask_at + 0.5, held["at"] + DEFAULT_TIMES.pace + 0.5)  # past the pacing interval
    time.sleep(max(0.0, kill_at - time.time()))
    killed = time.time()
    os.kill(holder.pid, signal.SIGKILL)
    reap(holder, time.monotonic() + 10)
    taken = next_event(waiter, 60)
    reap(waiter, time.monotonic() + 30)
    for process in (holder, waiter):
        if process.stdout is not None:
            process.stdout.close()
    if taken.get("event") != "held":
        raise RuntimeError(f"the waiter did not take the session: {taken}")
    return taken["at"] - killed


def free_lease_cost(directory: Path, store_url: str | None, pairs: int, batches: int) -> float:
    """Median microseconds per ``acquire()`` + ``release()`` of a free lease."""
    environ = {"KIS_TOKEN_STORE": store_url} if store_url else {}
    settings = Settings(environ, dotenv_path=False)
    times = SessionTimes(pace=0.0)
    per_pair = []
    for _ in range(batches):
        started = time.perf_counter()
        for _ in range(pairs):
            lease = open_session(settings, directory, "real-0123456789abcdef", "us", times=times)
            lease.acquire()
            lease.release()
        per_pair.append((time.perf_counter() - started) / pairs * 1e6)
    return statistics.median(per_pair)


def run(ctx: Context) -> list[str]:
    """The session lease section's Markdown lines."""
    quick = ctx.profile.startup_rounds < 21
    file_rounds, server_rounds = (2, 1) if quick else (5, 3)
    server = RedisServer(ctx.tmp / "session-redis").start()
    sandbox = ctx.sandbox()
    try:
        rows = []
        one_host = ctx.env(ctx.tmp / "session-one", broker=True)
        host_a = {**ctx.env(ctx.tmp / "session-a", broker=True), "KIS_TOKEN_STORE": server.url}
        host_b = {**ctx.env(ctx.tmp / "session-b", broker=True), "KIS_TOKEN_STORE": server.url}
        for label, rounds, envs in (("one host (file lease)", file_rounds, (one_host, one_host)),
                                    ("two hosts, one Valkey", server_rounds, (host_a, host_b))):
            times = []
            for number in range(rounds):
                log(f"session lease: hand-over after SIGKILL, {label}, round {number + 1}/{rounds}")
                times.append(hand_over(ctx, *envs))
            rows.append((label, rounds, f"{statistics.median(times):.2f}", f"{max(times):.2f}"))
        counters = sandbox.counters()
        log("session lease: cost of a free lease")
        costs = [("file", f"{free_lease_cost(ctx.tmp / 'session-cost', None, 200, 5 if quick else 20):.0f}"),
                 ("file + Redis (Valkey on 127.0.0.1)",
                  f"{free_lease_cost(ctx.tmp / 'session-cost', server.url, 100, 5 if quick else 20):.0f}")]
    finally:
        server.stop()
    key = one_host["KIS_US_APP_KEY"]  # the sandbox counts per app key
    bounds = DEFAULT_TIMES
    return [
        "## WebSocket session lease",
        "",
        f"Default bounds: a server lease of {bounds.ttl:g} s beaten every {bounds.heartbeat:g} s, "
        f"{bounds.pace:g} s between two leases' starts, waiters polling every {bounds.poll:g} s. "
        "The holder had held the session longer than the pacing interval when it was killed.",
        "",
        *table(("hand-over after SIGKILL", "rounds", "median s", "max s"), rows, "lrrr"),
        f"Sandbox: {counters['ws_sessions_opened'].get(key, 0)} sessions opened, "
        f"{counters['ws_opsp8996'].get(key, 0)} `OPSP8996`, at most "
        f"{counters['ws_max_concurrent'].get(key, 0)} connection(s) of the key at once.",
        "",
        "Cost of taking and releasing a free lease (median per pair):",
        "",
        *table(("lease", "µs per acquire + release"), costs, "lr"),
    ]


if __name__ == "__main__":
    sys.exit(main([run], description=__doc__.splitlines()[0]))
