"""Section 6, the token in trading code: the event loop during a renewal, and the auth overhead.

*Event-loop stall*: in one asyncio loop, a ticker task sleeps 1 ms at a time and records the longest
gap between two of its wake-ups, while 1,000 tasks ask ``get_valid_token_async()`` from cold (the
sandbox delays its token answer by the single-flight delay, so the renewal really is in flight
while they wait). The same ticker alone gives the loop's own baseline. Goal: under 5 ms.

*Auth overhead*: what ``KISAuth`` (requests) and ``KISHttpxAuth`` (httpx, sync flow) add to one
request on a fresh token, measured without a network round trip (preparing the request, then the
auth step), beside the floor of building the same three headers by hand.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time

import requests
from _util import Context, log, main, manager, seed_us_token, table

TASKS = 1000


async def _ticker(stop: asyncio.Event, gaps: list[float]) -> None:
    last = time.perf_counter()
    while not stop.is_set():
        await asyncio.sleep(0.001)
        now = time.perf_counter()
        gaps.append(now - last - 0.001)
        last = now


async def _longest_stall(make_work: object | None) -> tuple[float, float, int]:
    """The longest ticker gaps (seconds) while the 1,000 tasks start, and then while the renewal is in
    flight until they all have their token (or for 0.5 s with no work); and the distinct tokens."""
    stop, gaps = asyncio.Event(), []
    ticker = asyncio.create_task(_ticker(stop, gaps))
    await asyncio.sleep(0.01)
    gaps.clear()
    tokens: set[str] = set()
    if make_work is None:
        await asyncio.sleep(0.5)
        start_up = 0.0
    else:
        tasks = [asyncio.create_task(work) for work in make_work()]  # type: ignore[operator]
        await asyncio.sleep(0.005)  # every task has taken its first step: the renewal is in flight
        start_up, gaps[:] = max(gaps, default=0.0), []
        tokens = set(await asyncio.gather(*tasks))
    stop.set()
    await ticker
    return start_up, max(gaps), len(tokens)


def _per_call(call: object, rounds: int) -> float:
    """Median seconds per call of ``call`` over batches of 1,000."""
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(1000):
            call()  # type: ignore[operator]
        samples.append((time.perf_counter() - started) / 1000)
    return statistics.median(samples)


def run(ctx: Context) -> list[str]:
    """The loop's longest stall during a cold renewal, and the per-request auth overhead."""
    from common.auth import KISAuth, KISHttpxAuth
    from common.auth.requests_auth import kis_headers

    sandbox = ctx.sandbox()
    sandbox.call("POST", "reset")
    sandbox.call("POST", "faults", {"mode": "slow", "delay": ctx.broker_delay, "count": 1})
    import common.credentials.kis_client  # noqa: F401  # as in a bot that already talks HTTP: no import on the worker

    log(f"event loop: 1 task, then {TASKS} tasks, from cold")
    _, baseline, _ = asyncio.run(_longest_stall(None))
    single = manager(ctx.env(ctx.tmp / "async-1", broker=True))
    _, one_stall, _ = asyncio.run(_longest_stall(lambda: [single.get_valid_token_async()]))
    sandbox.call("POST", "reset")
    sandbox.call("POST", "faults", {"mode": "slow", "delay": ctx.broker_delay, "count": 1})
    cold = manager(ctx.env(ctx.tmp / "async", broker=True))
    start_up, stall, distinct = asyncio.run(
        _longest_stall(lambda: [cold.get_valid_token_async() for _ in range(TASKS)]))
    requests_sent = sum(sandbox.counters()["token_requests"].values())

    # The adapters' own cost, with the key's call budget free (a rate no test reaches): the budget's
    # pacing is section 9's subject; its bookkeeping per call is counted here.
    fresh = seed_us_token({**ctx.env(ctx.tmp / "auth"), "KIS_RATE_LIMIT": "1000000000"})
    prepared = requests.Request("GET", "http://127.0.0.1/uapi/x").prepare()
    auth = KISAuth(fresh)
    import httpx

    httpx_auth = KISHttpxAuth(fresh)
    httpx_request = httpx.Request("GET", "http://127.0.0.1/uapi/x")
    rounds = ctx.profile.hot_batches // 10 or 5
    rows = [
        ("`KISAuth` (requests): headers + response hook", _per_call(lambda: auth(prepared.copy()), rounds)),
        ("`KISHttpxAuth` (httpx): first step of the sync flow",
         _per_call(lambda: next(httpx_auth.sync_auth_flow(httpx_request)), rounds)),
        ("floor: `kis_headers(manager, manager.get_valid_token())`",
         _per_call(lambda: kis_headers(fresh, fresh.get_valid_token()), rounds)),
        ("reference: `PreparedRequest.copy()` alone", _per_call(prepared.copy, rounds)),
    ]
    return [
        "### 6. Trading code: the event loop during a renewal, and the auth overhead",
        "",
        *table(["measure", "result"], [
            (f"longest event-loop stall while one task awaits `get_valid_token_async()` from cold "
             f"(the renewal in a worker thread; broker answer delayed {ctx.broker_delay:g} s)",
             f"**{one_stall * 1e3:.2f} ms** (goal < 5 ms)"),
            (f"the same with {TASKS:,} tasks awaiting it (includes their wake-up, all in one loop turn, "
             "when the token arrives)", f"{stall * 1e3:.2f} ms"),
            ("the same ticker with nothing else on the loop", f"{baseline * 1e3:.2f} ms"),
            (f"the loop's time to start the {TASKS:,} tasks themselves (their first steps, before the "
             "renewal is in flight)", f"{start_up * 1e3:.2f} ms"),
            ("token requests at the broker / distinct tokens the tasks got",
             f"{requests_sent} / {distinct}"),
        ], "lr"),
        *table(["per request on a fresh token", "µs"], [(name, f"{s * 1e6:.2f}") for name, s in rows], "lr"),
    ]


if __name__ == "__main__":
    sys.exit(main([run]))
