"""Benchmark of the per-key call budget: ``python bench/budgets.py [--quick]``.

It starts its own sandbox (``python -m common.sandbox``, keeping the broker's 18 calls a second per
key) and a real Redis/Valkey server on 127.0.0.1 (``common.sandbox.redis_server``) and works in a
temporary directory; every child is bounded and stopped at the end. Progress goes to stderr; stdout
carries a Markdown report. Nothing here asserts on timings.

1. **Through KISAuth, judged by the broker**: 1 process, 8 processes (one token directory), and
   8 x 2 "hosts" (two token directories sharing the server) send quote requests through
   ``requests`` + ``KISAuth`` as fast as they can for a few seconds (``bench/auth_worker.py``).
   Reported from the sandbox's counters: calls served, calls a second, that as a fraction of the
   limit (goal: at least 0.95), and the ``EGW00201`` answers (goal: 0).
2. **The limiter alone** (not with ``--quick``): the same setups calling ``acquire()`` only
   (``common.sandbox.budget_worker``); reported: the rate, and the most calls any one-second window
   held (must not exceed 18).
3. **Cost per call with a free budget**: ``acquire()`` in one process, with a rate so high that no
   call ever waits: the file backend (``flock``, read, write) and the Redis backend (one ``EVALSHA``),
   median per call over batches.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

from _util import REPO, US_KEY, Context, log, main, manager, read_text, reap, spawn, table

from common.budget import CallBudget, Pacing, open_budget
from common.sandbox.budget_worker import most_in_window
from common.sandbox.process import SandboxProcess
from common.sandbox.redis_server import RedisServer
from common.settings import Settings

KEY_ID = "real-0123456789abcdef"
RATE = 18.0
START_DELAY = 3.0  # for the children's interpreters to start before they all begin at once
AUTH_START_DELAY = 5.0  # the same, with requests imported and the token read


def through_kisauth(ctx: Context, broker: SandboxProcess, directories: list[Path], per_directory: int,
                    duration: float, store_url: str | None) -> tuple[int, int, int, int]:
    """Run ``per_directory`` KISAuth workers on each directory together: the answers they got within
    ``duration``, the calls the broker served and the ``EGW00201`` it answered (both including the
    calls begun just before the end), and the answers the workers saw that were not a success
    (after their resends)."""
    envs = []
    for directory in directories:
        env = {**ctx.env(directory), "KIS_BASE_URL": broker.base_url}
        if store_url:
            env["KIS_TOKEN_STORE"] = store_url
        manager(env).get_valid_token()  # the key's token first: the workers read it
        envs.append(env)
    before = broker.counters()
    start = time.time() + AUTH_START_DELAY
    children = []
    for number, env in enumerate(e for e in envs for _ in range(per_directory)):
        with open(ctx.tmp / f"auth-worker-{number}.err", "wb") as err:
            argv = [sys.executable, str(REPO / "bench" / "auth_worker.py"), f"{start:.6f}", str(duration)]
            children.append((spawn(argv, env, stdout=-1, stderr=err), err.name))
    deadline = time.monotonic() + AUTH_START_DELAY + duration + 60
    failed = in_window = 0
    for child, err_path in children:
        code = reap(child, deadline)
        assert child.stdout is not None
        out = child.stdout.read().decode()
        child.stdout.close()
        if code != 0:
            raise RuntimeError(f"an auth worker failed (exit {code}): {read_text(Path(err_path))[-500:]}")
        result = json.loads(out)
        failed += sum(n for answer, n in result["codes"].items() if answer != "0")
        in_window += result["in_window"]
    after = broker.counters()

    def delta(name: str) -> int:
        return int(after[name].get(US_KEY, 0) - before[name].get(US_KEY, 0))

    return in_window, delta("rest_calls"), delta("rest_egw00201"), failed


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
    duration = 2.0 if quick else 6.0
    setups = (("1 process", ["one"], 1, False), ("8 processes, one host", ["eight"], 8, False),
              ("8 x 2 hosts, one Valkey", ["a", "b"], 8, True))
    server = RedisServer(ctx.tmp / "budget-redis").start()
    broker = SandboxProcess("--no-websocket", "--rate-limit", "0", env=ctx.base_env())
    try:
        auth_rows = []
        for label, names, per, shared in setups:
            log(f"budgets: {label} through KISAuth, {duration:g} s")
            directories = [ctx.tmp / f"auth-{n}" for n in names]
            answered, served, refused, failed = through_kisauth(ctx, broker, directories, per, duration,
                                                                server.url if shared else None)
            achieved = answered / duration
            auth_rows.append((label, answered, f"{achieved:.2f}", f"{achieved / RATE:.3f}", served, refused,
                              failed))
        rows = []
        for label, names, per, shared in () if quick else setups:
            log(f"budgets: {label}, acquire() only, {duration:g} s")
            times, fell_back = spend(ctx, [ctx.tmp / f"budget-{n}" for n in names], per, duration,
                                     server.url if shared else None)
            achieved = len(times) / duration
            rows.append((label, len(times), f"{achieved:.2f}", f"{achieved / RATE:.3f}",
                         f"{most_in_window(times)} (limit {RATE:g})", fell_back if shared else "-"))
        costs = []
        backends = (("file", {}), ("Redis (Valkey on 127.0.0.1)", {"KIS_TOKEN_STORE": server.url}))
        for label, environ in backends:
            budget = open_budget(Settings({"KIS_RATE_LIMIT": "1e9", **environ}, dotenv_path=False),
                                 ctx.tmp / "budget-cost", KEY_ID)
            costs.append((label, f"{cost_per_call(budget, 10 if quick else 50):.1f}"))
    finally:
        broker.stop()
        server.stop()
    paced = Pacing(RATE)
    lines = [
        "### 9. Per-key call budget",
        "",
        f"One key at {RATE:g} calls a second (paced at {paced.achieved_rate:.2f}: the "
        f"{paced.slack * 1000:.0f} ms slack). Processes send quote requests through `requests` + "
        f"`KISAuth` to the sandbox (which answers `EGW00201` beyond {RATE:g} in any second) as fast as "
        f"they can for {duration:g} s. The broker's counters include the calls begun just before the "
        "end (each waits for its slot):",
        "",
        *table(("setup", f"answers in {duration:g} s", "calls/s", "of the limit", "served by the broker",
                "EGW00201 (target 0)", "answers not a success"), auth_rows, "lrrrrrr"),
    ]
    if rows:
        lines += [
            f"The limiter alone: workers call `acquire()` as fast as they can for {duration:g} s.",
            "",
            *table(("setup", "calls", "calls/s", "of the limit", "most in any 1 s", "fell back on the file"),
                   rows, "lrrrrr"),
        ]
    return [*lines, "Cost of `acquire()` with a free budget (median per call):", "",
            *table(("backend", "µs per call"), costs, "lr")]


if __name__ == "__main__":
    sys.exit(main([run], description=__doc__.splitlines()[0]))
