"""Benchmark of the per-key call budget: ``python bench/budgets.py [--quick]``.

It starts a real Redis/Valkey server on 127.0.0.1 (``common.sandbox.redis_server``) and works in a temporary
directory; every child is bounded and stopped at the end. Progress goes to stderr; stdout carries a
Markdown report. Nothing here asserts on timings.

1. **Achieved rate**: 1 process, 8 processes (one token directory), and 8 x 2 "hosts" (two token
   directories sharing the server) spend one key's budget (18 a second) as fast as they can for a few
   seconds (``common.sandbox.budget_worker``). Reported: calls, calls a second, that as a fraction of the
   limit (goal: at least 0.95), and the most calls any one-second window held (must not exceed 18).
2. **Cost per call with a free budget**: ``acquire()`` in one process, with a rate so high that no
   call ever waits: the file backend (``flock``, read, write) and the Redis backend (one ``EVALSHA``),
   median per call over batches.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

from _util import Context, log, main, read_text, reap, spawn, table

from common.budget import CallBudget, Pacing, open_budget
from common.sandbox.budget_worker import most_in_window
from common.sandbox.redis_server import RedisServer
from common.settings import Settings

KEY_ID = "real-0123456789abcdef"
RATE = 18.0
START_DELAY = 3.0  # for the children's interpreters to start before they all begin at once


def spend(ctx: Context, directories: list[Path], per_directory: int, duration: float,
          store_url: str | None) -> tuple[list[float], int]:
    """Run ``per_directory`` workers on each directory together; their merged send times, and how
    many of them fell back on their host's file (the server did not answer one call in time)."""
    start = time.time() + START_DELAY
    tail = [str(RATE), f"{start:.6f}", str(duration)] + ([store_url] if store_url else [])
    children = []
    for number, directory in enumerate(d for d in directories for _ in range(per_directory)):
        with open(ctx.tmp / f"budget-worker-{number}.err", "wb") as err:
            argv = [sys.executable, "-m", "common.sandbox.budget_worker", str(directory), KEY_ID, *tail]
            children.append((spawn(argv, ctx.base_env(), stdout=-1, stderr=err), err.name))
    deadline = time.monotonic() + START_DELAY + duration + 60
    times: list[float] = []
    fell_back = 0
    for child, err_path in children:
        code = reap(child, deadline)
        assert child.stdout is not None
        out = child.stdout.read().decode()
        child.stdout.close()
        errors = read_text(Path(err_path))
        if code != 0:
            raise RuntimeError(f"a budget worker failed (exit {code}): {errors[-500:]}")
        fell_back += "pacing the key on this host's budget" in errors
        times += [float(line) for line in out.split()]
    return times, fell_back


def cost_per_call(budget: CallBudget, batches: int, calls: int = 1000) -> float:
    """Median microseconds per ``acquire()`` over ``batches`` batches of ``calls``."""
    per_call = []
    for _ in range(batches):
        started = time.perf_counter()
        for _ in range(calls):
            budget.acquire()
        per_call.append((time.perf_counter() - started) / calls * 1e6)
    return statistics.median(per_call)


def run(ctx: Context) -> list[str]:
    """The budgets section's Markdown lines."""
    quick = ctx.profile.startup_rounds < 21
    duration = 3.0 if quick else 6.0
    server = RedisServer(ctx.tmp / "budget-redis").start()
    try:
        rows = []
        for label, directories, per, url in (
            ("1 process", [ctx.tmp / "budget-one"], 1, None),
            ("8 processes, one host", [ctx.tmp / "budget-eight"], 8, None),
            ("8 x 2 hosts, one Valkey", [ctx.tmp / "budget-a", ctx.tmp / "budget-b"], 8, server.url),
        ):
            log(f"budgets: {label}, {duration:g} s")
            times, fell_back = spend(ctx, directories, per, duration, url)
            achieved = len(times) / duration
            rows.append((label, len(times), f"{achieved:.2f}", f"{achieved / RATE:.3f}",
                         f"{most_in_window(times)} (limit {RATE:g})", fell_back if url else "-"))
        costs = []
        backends = (("file", {}), ("Redis (Valkey on 127.0.0.1)", {"KIS_TOKEN_STORE": server.url}))
        for label, environ in backends:
            budget = open_budget(Settings({"KIS_RATE_LIMIT": "1e9", **environ}, dotenv_path=False),
                                 ctx.tmp / "budget-cost", KEY_ID)
            costs.append((label, f"{cost_per_call(budget, 10 if quick else 50):.1f}"))
    finally:
        server.stop()
    paced = Pacing(RATE)
    return [
        "## Per-key call budget",
        "",
        f"One key at {RATE:g} calls a second (paced at {paced.achieved_rate:.2f}: the "
        f"{paced.slack * 1000:.0f} ms slack); workers call `acquire()` as fast as they can for "
        f"{duration:g} s.",
        "",
        *table(("setup", "calls", "calls/s", "of the limit", "most in any 1 s", "fell back on the file"),
               rows, "lrrrrr"),
        "Cost of `acquire()` with a free budget (median per call):",
        "",
        *table(("backend", "µs per call"), costs, "lr"),
    ]


if __name__ == "__main__":
    sys.exit(main([run], description=__doc__.splitlines()[0]))
