"""What every benchmark section shares: child processes, the sandbox, environments, tables, ``main``.

A section is a module with ``run(ctx: Context) -> list[str]`` (its Markdown lines) that ends with
``if __name__ == "__main__": sys.exit(main([run]))``, so it also runs alone. Children run in the
repository with a minimal environment; every wait is bounded; :func:`main` removes the temporary
directory and stops every process it started when it ends (also on Ctrl-C or an error).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from common.credentials.records import TokenRecord  # noqa: E402
from common.sandbox.process import SandboxProcess  # noqa: E402
from common.settings import Settings  # noqa: E402
from kr.token_manager import KRTokenManager  # noqa: E402
from us.token_manager import USTokenManager  # noqa: E402

US_KEY, US_SECRET = "PSbenchUS" + "a" * 27, "bench-us-secret-" + "x" * 164
KR_KEY, KR_SECRET = "PSbenchKR" + "b" * 27, "bench-kr-secret-" + "y" * 164
SEEDED_TOKEN = "bench-" + "t" * 300
CHILD_TIMEOUT = 60.0
MANAGERS = {"us": USTokenManager, "kr": KRTokenManager}


def log(message: str) -> None:
    """Progress on stderr (stdout carries only the report)."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Profile:
    """How much of each measurement to run."""

    hot_batches: int
    startup_rounds: int
    single_flight: tuple[int, ...]
    one_key: tuple[int, ...]  # the N of single_flight also run with one app key in both markets
    kills: int
    memory_runs: int
    fault_processes: int  # `get` processes started at once per fault row
    timed_faults: bool  # also the fault rows that take seconds by design (slow, dripping)


FULL = Profile(hot_batches=100, startup_rounds=21, single_flight=(1, 4, 16, 64), one_key=(1, 4, 16, 64),
               kills=150, memory_runs=3, fault_processes=16, timed_faults=True)
QUICK = Profile(hot_batches=100, startup_rounds=5, single_flight=(1, 4, 16), one_key=(16,), kills=30,
                memory_runs=1, fault_processes=2, timed_faults=False)


# -- child processes ---------------------------------------------------------------------------

_LIVE: list[subprocess.Popen[bytes]] = []


def spawn(argv: Sequence[str], env: dict[str, str], stdout: Any = subprocess.DEVNULL,
          stderr: Any = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    """Start a child in the repository (tracked so that it is killed if the bench stops early)."""
    process = subprocess.Popen(list(argv), env=env, cwd=REPO, stdin=subprocess.DEVNULL,
                               stdout=stdout, stderr=stderr)
    _LIVE.append(process)
    return process


def reap(process: subprocess.Popen[bytes], deadline: float) -> int:
    """Wait (until ``deadline``, monotonic) for ``process`` and return its exit code.

    Uses a pidfd, so the return is immediate once the child exits (``Popen.wait`` polls with
    sleeps of up to 50 ms); kills the child at the deadline.
    """
    try:
        fd = os.pidfd_open(process.pid)
    except (AttributeError, OSError):  # no pidfd (kernel before 5.3): poll every millisecond
        fd = None
    if fd is not None:
        try:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        finally:
            os.close(fd)
        if not ready:
            process.kill()
    else:
        while os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            if time.monotonic() >= deadline:
                process.kill()
                break
            time.sleep(0.001)
    _, status = os.waitpid(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    with contextlib.suppress(ValueError):
        _LIVE.remove(process)
    return process.returncode


def run_child(argv: Sequence[str], env: dict[str, str],
              stdout: Any = subprocess.DEVNULL) -> tuple[int, float]:
    """Run one child to the end: its exit code and the wall time from just before the spawn to its exit."""
    started = time.perf_counter()
    code = reap(spawn(argv, env, stdout=stdout), time.monotonic() + CHILD_TIMEOUT)
    return code, time.perf_counter() - started


def kill_leftovers() -> None:
    """Kill and reap every child still running."""
    for process in list(_LIVE):
        with contextlib.suppress(OSError):
            process.kill()
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            process.wait(timeout=5)
    _LIVE.clear()


# -- the run's context ----------------------------------------------------------------------------


@dataclass
class Context:
    """One bench run: its temporary directory, profile and (started on first use) sandbox."""

    tmp: Path
    profile: Profile
    broker_delay: float
    _sandbox: SandboxProcess | None = None

    @property
    def home(self) -> Path:
        """``HOME`` of every child."""
        return self.tmp / "home"

    def base_env(self) -> dict[str, str]:
        """A minimal child environment: no inherited KIS variables, proxies or ``.env``."""
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": str(REPO),
            "HOME": str(self.home),
            "KIS_DOTENV_PATH": os.devnull,
        }

    def env(self, token_dir: Path, *, broker: bool = False, one_key: bool = False) -> dict[str, str]:
        """:meth:`base_env` plus both markets' keys (``one_key``: the US key in both), a token
        directory and (``broker``) the sandbox's URL."""
        kr_key, kr_secret = (US_KEY, US_SECRET) if one_key else (KR_KEY, KR_SECRET)
        env = self.base_env()
        env.update({
            "KIS_US_APP_KEY": US_KEY, "KIS_US_APP_SECRET": US_SECRET,
            "KIS_KR_APP_KEY": kr_key, "KIS_KR_APP_SECRET": kr_secret,
            "KIS_TOKEN_DIR": str(token_dir),
        })
        if broker:
            env["KIS_BASE_URL"] = self.sandbox().base_url
        return env

    def sandbox(self) -> SandboxProcess:
        """The sandbox, started on first use."""
        if self._sandbox is None:
            self._sandbox = SandboxProcess(env=self.base_env())
            log(f"sandbox at {self._sandbox.base_url}")
        return self._sandbox


def manager(env: dict[str, str], market: str = "us", **kwargs: Any) -> USTokenManager | KRTokenManager:
    """A market's manager configured by ``env`` alone (no ``.env``)."""
    return MANAGERS[market](Settings(env, dotenv_path=False), **kwargs)


def seed_us_token(env: dict[str, str]) -> USTokenManager | KRTokenManager:
    """Store a fresh (24 h) US token for ``env``'s key and return a manager that serves it."""
    us = manager(env)
    now = float(int(time.time()))  # whole seconds, as stored: save_token() mirrors only what reads back equal
    us.save_token(TokenRecord(SEEDED_TOKEN, "Bearer", now, now + 86400.0, "us", us.environment,
                              us.key_fingerprint()))
    return us


# -- report helpers ---------------------------------------------------------------------------------


def table(head: Sequence[str], rows: Iterable[Sequence[object]], align: str) -> list[str]:
    """A Markdown table (``align``: one ``l`` or ``r`` per column) and a blank line."""
    def line(cells: Iterable[object]) -> str:
        return "| " + " | ".join(map(str, cells)) + " |"

    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    return [line(head), rule, *map(line, rows), ""]


def mib(kib: float) -> str:
    """KiB as MiB with one decimal."""
    return f"{kib / 1024:.1f}"


def read_text(path: Path) -> str:
    """A file's text, or '' if it is missing."""
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""


# -- main ----------------------------------------------------------------------------------------


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(sections: Sequence[Callable[[Context], list[str]]], argv: Sequence[str] | None = None,
         description: str | None = None) -> int:
    """Run ``sections`` in order in a fresh temporary directory and print their report.

    The directory is removed, and every child and the sandbox stopped, at the end, also on an error,
    Ctrl-C or SIGTERM.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, N up to 16")
    parser.add_argument("--broker-delay", type=float, default=0.5, metavar="SECONDS",
                        help="delay of the broker's first token answers in the single-flight runs "
                             "(default %(default)s)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)  # clean up on SIGTERM as on Ctrl-C
    started = time.monotonic()
    report: list[str] = []
    with tempfile.TemporaryDirectory(prefix="kis-bench-") as directory:
        ctx = Context(Path(directory), QUICK if args.quick else FULL, args.broker_delay)
        ctx.home.mkdir()
        try:
            for section in sections:
                report += section(ctx)
        finally:
            kill_leftovers()
            if ctx._sandbox is not None:
                ctx._sandbox.stop()
    command = f"python bench/{Path(sys.argv[0]).name}{' --quick' if args.quick else ''}"
    report.append(f"_{'Quick' if args.quick else 'Full'} run of `{command}`: "
                  f"{time.monotonic() - started:.0f} s in all._")
    print("\n".join(report))
    return 0
