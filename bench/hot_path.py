"""Section 1, the hot path: ``USTokenManager.get_valid_token()`` on a fresh token.

The token is seeded with ``save_token(TokenRecord(...))``; calls are timed in batches of 1,000 (one
``time.perf_counter_ns`` sample per batch); the report gives the median and the mean per call over
>= 100,000 calls. In the same run, the same way: the user story's original approach (open the
market's token file ``us_api_token.json``, read it, ``json.loads`` it, parse ``expires_at`` and
compare it with the time, on every call), and an empty method call as the floor of what any call
costs. Ratio = original / manager.
"""

from __future__ import annotations

import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from _util import SEEDED_TOKEN, Context, log, main, seed_us_token, table

BATCH = 1000


def per_call_samples(call: Callable[[], object], batches: int) -> list[float]:
    """Seconds per call, one sample per batch of :data:`BATCH` calls (after one warm-up batch)."""
    samples = []
    for index in range(batches + 1):
        started = time.perf_counter_ns()
        for _ in itertools.repeat(None, BATCH):
            call()
        elapsed = time.perf_counter_ns() - started
        if index:
            samples.append(elapsed / BATCH / 1e9)
    return samples


def original_approach(path: Path) -> Callable[[], str]:
    """The story's ``get_valid_token``: read and parse the token file on every call."""

    def get_valid_token() -> str:
        with open(path, encoding="utf-8") as handle:
            data = json.loads(handle.read())
        if datetime.fromisoformat(data["expires_at"]).timestamp() <= time.time():
            raise RuntimeError("expired: the original would renew here")
        return data["access_token"]

    return get_valid_token


class _Empty:
    def method(self) -> str:
        return SEEDED_TOKEN


def run(ctx: Context) -> list[str]:
    """Per-call cost of a fresh token, manager versus the story's file read."""
    manager = seed_us_token(ctx.env(ctx.tmp / "hot"))
    original = original_approach(manager.mirror.record_path)
    if not original() == manager.get_valid_token() == SEEDED_TOKEN:
        raise RuntimeError("the hot-path subjects do not return the seeded token")
    batches = ctx.profile.hot_batches
    log(f"hot path: {batches * BATCH:,} calls each")
    rows = [
        ("`USTokenManager.get_valid_token()`, fresh token",
         per_call_samples(manager.get_valid_token, batches)),
        ("story's original: open + read + `json.loads` + expiry check, every call",
         per_call_samples(original, batches)),
        ("floor: an empty method call in the same loop", per_call_samples(_Empty().method, batches)),
    ]
    ratio = statistics.median(rows[1][1]) / statistics.median(rows[0][1])
    return [
        f"### 1. Hot path: `get_valid_token()` with a fresh token ({batches * BATCH:,} calls each, "
        f"batches of {BATCH:,})",
        "",
        *table(["approach", "median µs/call", "mean µs/call"],
               [(name, f"{statistics.median(s) * 1e6:.3f}", f"{statistics.fmean(s) * 1e6:.3f}")
                for name, s in rows], "lrr"),
        f"Original / manager (medians): **{ratio:.0f}×** (target ≥ 50×).",
        "",
    ]


if __name__ == "__main__":
    sys.exit(main([run]))
