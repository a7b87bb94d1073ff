"""Section 3, single flight: token requests per app key when many processes start from cold.

For N = 1, 4, 16, 64 (``--quick``: up to 16), N processes *per market* (2N in all) run ``python -m
us.token_manager -vv get`` / ``python -m kr.token_manager -vv get``, all spawned at once,
interleaved, on a fresh token directory, against the sandbox reset with ``POST /sandbox/reset``;
once with two app keys (one per market) and once with one app key in both ``KIS_US_APP_KEY`` and
``KIS_KR_APP_KEY`` (tokens belong to the key: both markets must share one request; ``--quick``: at
N = 16 only). The broker's first answers are delayed (``slow`` fault, 0.5 s by default) so that the
processes pile up on the renewal lock instead of arriving after the token is stored; the wall time
includes that delay. Reported: token requests that reached the broker per app key (``GET
/sandbox/counters``), processes that found no token and queued on the lock (from their ``-vv`` log:
"renewed the us token meanwhile" or "obtained a new us token"), wall time from the first spawn until
every process has exited with its token, and whether all processes of a key printed the same token
(the key's stored record).
"""

from __future__ import annotations

import sys
import time
from collections import Counter

from _util import KR_KEY, US_KEY, Context, kill_leftovers, log, main, manager, read_text, reap, spawn, table

MARKETS = ("us", "kr")


def flight(ctx: Context, per_market: int, one_key: bool) -> tuple[object, ...]:
    """Run ``per_market`` ``get`` processes per market at once from cold; return the table row."""
    sandbox = ctx.sandbox()
    run_dir = ctx.tmp / f"flight-{per_market}-{'one' if one_key else 'two'}-key"
    run_dir.mkdir()
    env = ctx.env(run_dir / "tokens", broker=True, one_key=one_key)
    sandbox.call("POST", "reset", {})
    if ctx.broker_delay > 0:
        sandbox.call("POST", "faults", {"mode": "slow", "delay": ctx.broker_delay, "count": 2})
    jobs = []
    deadline = time.monotonic() + 120.0
    started = time.perf_counter()
    try:
        for index in range(per_market):
            for market in MARKETS:
                out, err = run_dir / f"{market}-{index}.out", run_dir / f"{market}-{index}.err"
                with open(out, "wb") as stdout, open(err, "wb") as stderr:
                    process = spawn([sys.executable, "-m", f"{market}.token_manager", "-vv", "get"], env,
                                    stdout=stdout, stderr=stderr)
                jobs.append((market, process, out, err))
        codes = [reap(process, deadline) for _, process, _, _ in jobs]
        wall = time.perf_counter() - started
    finally:
        kill_leftovers()
    requests = sandbox.counters()["token_requests"]
    # Each app key in use, with the markets that use it.
    keys = {US_KEY: ["us", "kr"]} if one_key else {US_KEY: ["us"], KR_KEY: ["kr"]}
    queued: Counter[str] = Counter()
    printed: dict[str, set[str]] = {market: set() for market in MARKETS}
    for (market, _, out, err), code in zip(jobs, codes, strict=True):
        if code == 0:
            printed[market].add(read_text(out).strip())
        text = read_text(err)
        if f"renewed the {market} token meanwhile" in text or f"obtained a new {market} token" in text:
            queued[market] += 1
    same = []
    for markets in keys.values():
        tokens = set().union(*(printed[market] for market in markets))
        stored = manager(env, markets[0]).store.record.load()
        same.append("yes" if stored is not None and tokens == {stored.access_token} else "**no**")
    return ("one in both markets" if one_key else "two (US, KR)", per_market, 2 * per_market,
            " / ".join(str(requests.get(key, 0)) for key in keys), f"{queued['us']} / {queued['kr']}",
            f"{wall:.2f}", " / ".join(same), sum(1 for code in codes if code != 0))


def run(ctx: Context) -> list[str]:
    """Two app keys (one per market) and one app key in both markets, for each N."""
    rows = []
    for per_market in ctx.profile.single_flight:
        for one_key in (False, True):
            if one_key and per_market not in ctx.profile.one_key:
                continue
            log(f"single flight: {per_market} process(es) per market ({2 * per_market} in all), "
                f"{'one app key' if one_key else 'two app keys'}")
            rows.append(flight(ctx, per_market, one_key))
    delay = ctx.broker_delay
    widen = (f"the broker's first token answers are delayed {delay:g} s (`slow` fault) so that the "
             "processes meet at the lock, and the wall times include that delay" if delay > 0
             else "the broker answers at once")
    return [
        "### 3. Single flight: N `get` processes per market at once, from cold",
        "",
        "N processes per market (2N in all: `python -m us.token_manager get` and `python -m "
        "kr.token_manager get`, interleaved, spawned back to back), fresh token directory and "
        "sandbox reset per run, with two app keys (one per market) or one app key in both markets; "
        f"{widen}. *Queued* = processes that found no token and waited for the lock (the one that "
        "renewed included); the others started after the token was stored. Per app key = US key / "
        "KR key, or the one shared key.",
        "",
        *table(["app keys", "N per market", "processes", "token requests at the broker per app key",
                "queued on the lock (US / KR)", "wall time to all tokens (s)",
                "same token in every process of a key", "failed"], rows, "lrrllrlr"),
        "Target: 1 token request per app key per run (16 processes from cold): 1 / 1 with two "
        "keys, 1 with one key in both markets.",
        "",
    ]


if __name__ == "__main__":
    sys.exit(main([run]))
