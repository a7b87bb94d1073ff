"""A process that spends a key's call budget as fast as it can, for the multi-process budget tests and
``bench/budgets.py`` (with :func:`most_in_window`, which both use to judge the result):
``python -m common.sandbox.budget_worker DIR KEY_ID RATE START DURATION [STORE_URL]``.

It waits until the wall-clock time START (so that every worker begins together, however long each
took to start), then calls ``acquire()`` until START + DURATION and prints, one a line, the
``time.monotonic()`` at which each call was let through (one clock for the whole host on Linux and
macOS, so the lines of several workers can be merged). A slot that falls after the end is not
printed. Exit code 0, or 1 with the error on stderr.
"""

from __future__ import annotations

import bisect
import sys
import time
from pathlib import Path

from common.budget import open_budget
from common.settings import Settings


def most_in_window(times: list[float], width: float = 1.0) -> int:
    """The most of ``times`` in any closed window ``[t, t + width]``."""
    ordered = sorted(times)
    return max((bisect.bisect_right(ordered, t + width) - i for i, t in enumerate(ordered)), default=0)


def spend(directory: Path, key_id: str, rate: float, start: float, duration: float,
          store_url: str | None = None) -> list[float]:
    """The monotonic times at which this process's calls were let through (see the module docstring)."""
    environ = {"KIS_RATE_LIMIT": repr(rate)}
    if store_url:
        environ["KIS_TOKEN_STORE"] = store_url
    budget = open_budget(Settings(environ, dotenv_path=False), directory, key_id)
    time.sleep(max(0.0, start - time.time()))
    end = time.monotonic() + duration
    sent = []
    while True:
        budget.acquire(timeout=10)
        now = time.monotonic()
        if now >= end:
            return sent
        sent.append(now)


def main(argv: list[str]) -> int:
    """Run :func:`spend` with the command line's arguments and print its times."""
    directory, key_id, rate, start, duration, *store = argv
    times = spend(Path(directory), key_id, float(rate), float(start), float(duration),
                  store[0] if store else None)
    print("\n".join(f"{t:.6f}" for t in times), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
