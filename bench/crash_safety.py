"""Section 4, crash safety: renewals SIGKILLed at random instants.

Forked workers (as in ``tests/test_multiprocess.py``) renew the US token back to back
(``Windows(min_request_interval=0)``; sandbox ``rate_limit`` 0 and ``same_token_window`` 0, so every
renewal is a full one: request, new token, the key's record and the market's three mirror files,
the renewal state) and are SIGKILLed at a random instant within about three renewals after their
first one. After each kill: are the key's record ``key-<id>.json`` and the market's mirror
``us_api_token.json`` still parseable (``load()`` raising ``CorruptRecordError`` counts as broken),
is the renewal state ``key-<id>.state`` parseable, and is the lock ``key-<id>.lock`` free at once
(one try, no wait). The worker publishes what it is doing in shared memory (it wraps
``store.lock.hold``, ``store.record.save``, ``store.state.save`` and ``kis_client.issue_token``), so
the report also says where the kills landed, and counts temp files left by writers killed
mid-write (removed by later saves after 60 s).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import requests
from _util import US_KEY, Context, log, main, manager, table

from common.credentials import kis_client
from common.credentials.records import CorruptRecordError, TokenRecord
from common.errors import LockTimeoutError
from common.renewal.policy import Windows
from common.store.file_store import FileRecordStore

PHASES = (
    "outside the lock",
    "lock held (re-read, state)",
    "token request in flight",
    "writing the key's record and the mirrors",
    "writing the renewal state",
)
#: Renew back to back: no one-a-minute pause, and a renewal never takes more than 5 s.
RENEWING: dict[str, Any] = {
    "windows": Windows(min_request_interval=0.0),
    "timeouts": kis_client.Timeouts(attempt=5.0, budget=5.0),
}


def loopback_session() -> requests.Session:
    """A session that ignores ``*_proxy`` variables (the sandbox is on 127.0.0.1)."""
    session = requests.Session()
    session.trust_env = False
    return session


def _renew_until_killed(environ: dict[str, str], ready: Any, phase: Any) -> None:
    """Worker: force renewals back to back until SIGKILLed, publishing its phase in ``phase``."""
    us = manager(environ, session=loopback_session(), **RENEWING)
    record, lock, state = us.store.record, us.store.lock, us.store.state
    hold, save_record, save_state, issue = lock.hold, record.save, state.save, kis_client.issue_token

    @contextlib.contextmanager
    def watched_hold(timeout: float) -> Iterator[None]:
        with hold(timeout):
            phase.value = 1
            try:
                yield
            finally:
                phase.value = 0

    def watched_save_record(new: TokenRecord) -> None:
        phase.value = 3  # until the state is saved: the mirrors are written right after the record
        save_record(new)

    def watched_save_state(new: Any) -> None:
        phase.value = 4
        save_state(new)
        phase.value = 1

    def watched_issue(*args: Any, **kwargs: Any) -> Any:
        phase.value = 2
        try:
            return issue(*args, **kwargs)
        finally:
            phase.value = 1

    lock.hold, record.save, state.save = watched_hold, watched_save_record, watched_save_state
    kis_client.issue_token = watched_issue
    us.refresh_token()
    ready.set()
    while True:
        us.refresh_token()


def kill_one(context: Any, environ: dict[str, str], delay: float) -> tuple[int, int | None] | None:
    """Start a worker and SIGKILL it ``delay`` s after its first renewal.

    Returns:
        The phase it was in and its exit code, or None if it was not ready within 10 s.
    """
    ready, phase = context.Event(), context.RawValue("i", 0)
    worker = context.Process(target=_renew_until_killed, args=(environ, ready, phase), daemon=True)
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while not ready.wait(0.01) and worker.is_alive() and time.monotonic() < deadline:
            pass
        if not ready.is_set():
            if not worker.is_alive():
                raise RuntimeError(f"a crash-safety worker exited with {worker.exitcode} before renewing")
            return None
        time.sleep(delay)
        landed = phase.value
        os.kill(worker.pid, signal.SIGKILL)  # type: ignore[arg-type]
        worker.join(10)
        return landed, worker.exitcode
    finally:
        if worker.is_alive():
            worker.kill()
        worker.join(10)


def run(ctx: Context) -> list[str]:
    """Kill renewing workers at random instants and look at what they left."""
    sandbox = ctx.sandbox()
    token_dir = ctx.tmp / "crash"
    environ = {**ctx.env(token_dir, broker=True), "KIS_TOKEN_DAILY_LIMIT": "0"}  # back-to-back renewals
    sandbox.call("POST", "reset", {})
    sandbox.call("POST", "config", {"rate_limit": 0, "same_token_window": 0})
    with loopback_session() as session:  # calibrate here: kis_client is then imported before forking
        us = manager(environ, session=session, **RENEWING)
        us.refresh_token()
        started = time.perf_counter()
        for _ in range(20):
            us.refresh_token()
        renewal = (time.perf_counter() - started) / 20
    store, mirror = us.store, us.mirror
    records = (store.record, FileRecordStore(mirror.record_path, TokenRecord.from_json, TokenRecord.to_json))
    issued_before = sandbox.counters()["tokens_issued"].get(US_KEY, 0)
    log(f"crash safety: {ctx.profile.kills} SIGKILLs (one renewal ≈ {renewal * 1000:.1f} ms)")
    context = multiprocessing.get_context("fork")
    rng = random.Random(20261124)
    tally: Counter[str] = Counter()  # what the kills left behind
    phases: Counter[int] = Counter()
    for _ in range(ctx.profile.kills):
        killed = kill_one(context, environ, rng.uniform(0.0, 3 * renewal))
        if killed is None:
            tally["not_ready"] += 1
            continue
        landed, exitcode = killed
        tally["kills"] += 1
        phases[landed] += 1
        if exitcode != -signal.SIGKILL:
            tally["died_alone"] += 1
        for record in records:
            try:
                if record.load() is None:
                    tally["missing_records"] += 1
            except CorruptRecordError:
                tally["broken_records"] += 1
        try:
            store.state.load()
        except CorruptRecordError:
            tally["broken_states"] += 1
        try:
            with store.lock.hold(0):
                pass
        except LockTimeoutError:
            tally["lock_busy"] += 1
    issued = sandbox.counters()["tokens_issued"].get(US_KEY, 0) - issued_before
    temp_left = len(list(token_dir.glob(".*.tmp")))
    final = store.record.load()
    final_ok = final is not None and final.access_token.startswith("sbx-")
    where = ", ".join(f"{PHASES[p]} {phases[p]}" for p in range(len(PHASES)) if phases[p])
    kills = tally["kills"]
    return [
        f"### 4. Crash safety: {kills} renewals SIGKILLed at random instants",
        "",
        "Forked workers force renewals back to back (no one-a-minute pause, sandbox rate limit 0, "
        f"a new token each time; one renewal ≈ {renewal * 1000:.1f} ms) and are killed 0–3 renewals "
        "after their first one. Records = the key's `key-<id>.json` and the market's mirror "
        f"`us_api_token.json`, both read after each kill ({2 * kills} reads).",
        "",
        *table(["measure", "result"], [
            ("processes killed", kills),
            ("renewals completed by the killed workers (new tokens at the broker)", issued),
            ("records left unparseable (`CorruptRecordError`; target 0)", tally["broken_records"]),
            ("records missing after a kill", tally["missing_records"]),
            ("renewal-state files left unparseable", tally["broken_states"]),
            ("lock still held right after the kill (one try, no wait)", f"{tally['lock_busy']} of {kills}"),
            ("temp files left by writers killed mid-write (swept after 60 s)", temp_left),
            ("workers not ready in 10 s / exited before the kill",
             f"{tally['not_ready']} / {tally['died_alone']}"),
            ("final record a valid sandbox token", "yes" if final_ok else "**no**"),
        ], "lr"),
        f"Where the kills landed: {where}.",
        "",
    ]


if __name__ == "__main__":
    sys.exit(main([run]))
