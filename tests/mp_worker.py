"""Worker processes for the multi-process tests (run as ``python -m tests.mp_worker MODE ...``)."""

from __future__ import annotations

import os
import sys
import time

from common.renewal.policy import Windows
from common.settings import Settings
from us.token_manager import USTokenManager


def lock_writer(log_path: str, rounds: int) -> None:
    """Append ``enter``/``leave`` lines under the renewal lock; they must never interleave."""
    manager = USTokenManager()
    for _ in range(rounds):
        with manager.store.lock.hold(30):
            with open(log_path, "a") as log:
                log.write(f"enter {os.getpid()}\n")
                log.flush()
            time.sleep(0.002)
            with open(log_path, "a") as log:
                log.write(f"leave {os.getpid()}\n")


def watch(seconds: float) -> None:
    """Print the token every 50 ms, as a long-running bot would use it."""
    manager = USTokenManager()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        print(manager.get_valid_token(), flush=True)
        time.sleep(0.05)


def renew_forever(environ: dict[str, str], ready) -> None:
    """Force renewals back to back (no one-a-minute pause) until killed."""
    manager = USTokenManager(Settings(environ, dotenv_path=False), windows=Windows(min_request_interval=0.0))
    manager.refresh_token()  # one renewal done (and every import made) before the kill may come
    ready.set()
    while True:
        manager.refresh_token()


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "lock":
        lock_writer(args[0], int(args[1]))
    elif mode == "watch":
        watch(float(args[0]))
