"""Benchmarks that prove SPEC §9's budgets: ``python bench/run.py [--quick]``.

Standard library plus the package. It starts the local broker stand-in (``python -m
common.sandbox``) as a subprocess on 127.0.0.1, works in a temporary directory, bounds every wait,
and removes the directory and stops every process it started when it ends (also on Ctrl-C or an
error). Progress goes to stderr; stdout carries only a Markdown report for the README's
Performance section. Nothing here asserts on timings: a budget that is missed shows in the numbers.

What is measured (reported in this order):

0. **Machine**: CPU count and model (``/proc/cpuinfo``), memory, Python, platform, and the file
   system of the temporary directory (``fsync`` cost depends on it).
1. **Hot path**: ``USTokenManager.get_valid_token()`` on a fresh token seeded with
   ``save_token(TokenRecord(...))``, timed in batches of 1,000 calls (one timing sample per batch,
   ``time.perf_counter_ns``); the report gives the median and the mean per call over >= 100,000
   calls. In the same run, the same way: the user story's original approach (open the token file,
   read it, ``json.loads`` it, parse ``expires_at`` and compare it with the time, on every call),
   and an empty method call as the floor of what any call costs. Ratio = original / manager.
2. **CLI start-up**: wall time from spawn to exit of ``python -m us.token_manager check`` (keys in
   the environment, ``KIS_TOKEN_DIR`` holding a seeded valid token, ``KIS_DOTENV_PATH=/dev/null``)
   next to ``python -c pass``, ``python -c "import requests"`` and, for reference, ``python -S -c
   pass`` (no ``site``: what the site-packages ``.pth`` hooks cost every interpreter). One warm-up
   round (bytecode compiled, page cache warm), then rounds that run them round-robin, starting each
   round with the next command so that noise and position hit all equally; medians reported. Exit
   is detected with a pidfd, so the times carry no polling delay. Then the modules that ``check``
   has in ``sys.modules`` at exit and ``python -c pass`` has not (see 5), split by
   ``sys.stdlib_module_names`` into standard library, third-party and project (``common``, ``us``,
   ``kr``), and from one ``-X importtime`` run of ``check`` what they cost and the largest of them.
3. **Single flight**: for N = 1, 4, 16, 64, N processes *per market* (2N in all) run
   ``python -m us.token_manager -vv get`` / ``python -m kr.token_manager -vv get``, all spawned at
   once, interleaved, on a fresh token directory, against the sandbox reset with
   ``POST /sandbox/reset``. The broker's first answers are delayed (``slow`` fault, 0.5 s by
   default) so that the processes pile up on the renewal lock instead of arriving after the
   token is on disk; the wall time includes that delay. Reported: token requests that reached the
   broker per market (sandbox counters), processes that found no token and queued on the lock
   (from their ``-vv`` log: "renewed the us token meanwhile" or "obtained a new us token"), wall
   time from the first spawn until every process has exited with its token, and whether all
   processes of a market printed the same token (the one on disk).
4. **Crash safety**: forked workers (as in ``tests/test_multiprocess.py``) renew the US token back
   to back (``MIN_REQUEST_INTERVAL`` = 0 in the worker; sandbox ``rate_limit`` 0 and
   ``same_token_window`` 0, so every renewal is a full one: request, new token, three atomic
   writes) and are SIGKILLed at a random instant within about three renewals after their first one.
   After each kill: is the record still parseable (``FileTokenStore.load()`` raising
   ``CorruptRecordError`` counts as broken), is the renewal state parseable, and is the lock free at
   once (one try, no wait). The worker publishes what it is doing in shared memory, so the report
   also says where the kills landed (lock held, request in flight, writing the record...), and
   counts temp files left by writers killed mid-write (removed by later saves after 60 s).
5. **Memory**: peak RSS of ``python -c pass``, ``python -c "import requests"``, ``python -m
   us.token_manager check`` and of a process that builds a manager and calls ``get_valid_token()``
   100,000 times on a fresh token. Each runs under a small probe (``python -c``: an ``atexit`` hook,
   then the command's code, or ``runpy.run_module`` with the command's arguments) that writes
   ``VmHWM`` from ``/proc/self/status`` and the names in ``sys.modules`` at exit. Not ``ru_maxrss``
   (``getrusage(RUSAGE_CHILDREN)``/``wait4``): Linux carries the high-water mark of the address
   space that a child had *before* ``exec`` (the bench's own, via fork or vfork) into it, so every
   child would report at least the bench's size. The module lists of section 2 come from the same
   probe, because ``-X importtime`` also lists imports that failed (an attempt at ``_sha2`` here).

``--quick`` runs fewer repetitions (5 start-up rounds, N up to 16, 30 kills, one memory run) for a
shorter check of the script itself; ``--broker-delay SECONDS`` changes the single-flight delay.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import multiprocessing
import os
import platform
import random
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from common import base_token_manager  # noqa: E402
from common.errors import LockTimeoutError  # noqa: E402
from common.record import CorruptRecordError, TokenRecord  # noqa: E402
from common.settings import Settings  # noqa: E402
from common.store import FileTokenStore  # noqa: E402
from us.token_manager import USTokenManager  # noqa: E402

PROJECT_PACKAGES = frozenset({"common", "us", "kr"})
US_KEY, US_SECRET = "PSbenchUS" + "a" * 27, "bench-us-secret-" + "x" * 164
KR_KEY, KR_SECRET = "PSbenchKR" + "b" * 27, "bench-kr-secret-" + "y" * 164
SEEDED_TOKEN = "bench-" + "t" * 300
CHILD_TIMEOUT = 60.0
BATCH = 1000
HOLD_CALLS = 100_000
HOLD_SCRIPT = f"""
import sys
from us.token_manager import USTokenManager
get = USTokenManager().get_valid_token
for _ in range({HOLD_CALLS}):
    token = get()
sys.stdout.write(token)
"""
PHASES = (
    "outside the lock",
    "lock held (re-read, state)",
    "token request in flight",
    "writing the record files",
    "writing the renewal state",
)


def log(message: str) -> None:
    """Progress on stderr (stdout carries only the report)."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Profile:
    """How much of each measurement to run."""

    hot_batches: int
    startup_rounds: int
    single_flight: tuple[int, ...]
    kills: int
    memory_runs: int


FULL = Profile(hot_batches=100, startup_rounds=21, single_flight=(1, 4, 16, 64), kills=150, memory_runs=3)
QUICK = Profile(hot_batches=100, startup_rounds=5, single_flight=(1, 4, 16), kills=30, memory_runs=1)


# -- child processes ---------------------------------------------------------------------------


@dataclass
class ChildResult:
    """How a child process ended."""

    returncode: int
    wall: float


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


def run_child(argv: Sequence[str], env: dict[str, str], stdout: Any = subprocess.DEVNULL) -> ChildResult:
    """Run one child to the end; wall time from just before the spawn to its exit."""
    started = time.perf_counter()
    process = spawn(argv, env, stdout=stdout)
    code = reap(process, time.monotonic() + CHILD_TIMEOUT)
    return ChildResult(code, time.perf_counter() - started)


def kill_leftovers() -> None:
    """Kill and reap every child still running (the bench is stopping)."""
    for process in list(_LIVE):
        with contextlib.suppress(OSError):
            process.kill()
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            process.wait(timeout=5)
    _LIVE.clear()


# -- the sandbox --------------------------------------------------------------------------------


class SandboxProcess:
    """``python -m common.sandbox`` on 127.0.0.1, driven over loopback HTTP (proxies ignored)."""

    def __init__(self, env: dict[str, str], timeout: float = 20.0) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "common.sandbox", "--host", "127.0.0.1", "--port", "0"],
            env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True,
        )
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline().strip() if ready else ""
        if not line.startswith("http://127.0.0.1:"):
            self.stop()
            raise RuntimeError(f"the sandbox did not start on 127.0.0.1 (first line: {line!r})")
        self.base_url = line

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send one control request under ``/sandbox/`` and return the JSON answer."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base_url + "/sandbox/" + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with self._opener.open(request, timeout=10) as answer:
            return json.loads(answer.read())

    def counters(self) -> dict[str, Any]:
        """``GET /sandbox/counters``."""
        return self.call("GET", "counters")

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after 10 s)."""
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        if self.process.stdout is not None:
            self.process.stdout.close()


# -- helpers -------------------------------------------------------------------------------------


def base_env(home: Path) -> dict[str, str]:
    """A minimal child environment: no inherited KIS variables, proxies or ``.env``."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(REPO),
        "HOME": str(home),
        "KIS_DOTENV_PATH": os.devnull,
    }


def market_env(home: Path, token_dir: Path, base_url: str | None = None) -> dict[str, str]:
    """``base_env`` plus both markets' keys, a token directory and (optionally) the broker URL."""
    env = base_env(home)
    env.update({
        "KIS_US_APP_KEY": US_KEY, "KIS_US_APP_SECRET": US_SECRET,
        "KIS_KR_APP_KEY": KR_KEY, "KIS_KR_APP_SECRET": KR_SECRET,
        "KIS_TOKEN_DIR": str(token_dir),
    })
    if base_url is not None:
        env["KIS_BASE_URL"] = base_url
    return env


def seed_us_token(env: dict[str, str]) -> USTokenManager:
    """Store a fresh (24 h) US token for ``env``'s key and return a manager that serves it."""
    manager = USTokenManager(Settings(env, dotenv_path=False))
    now = time.time()
    manager.save_token(TokenRecord(SEEDED_TOKEN, "Bearer", now, now + 86400.0, "us",
                                   manager.environment, manager.key_fingerprint()))
    return manager


def median(values: Sequence[float]) -> float:
    """The median (statistics.median, named for the report)."""
    return statistics.median(values)


def mib(kib: float) -> str:
    """KiB as MiB with one decimal."""
    return f"{kib / 1024:.1f}"


def read_text(path: Path) -> str:
    """A file's text, or '' if it is missing."""
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""


# -- 0. machine ----------------------------------------------------------------------------------


def filesystem_of(path: Path) -> str:
    """The file system type of the mount holding ``path`` (from /proc/mounts), or '?'."""
    best, kind = "", "?"
    target = str(path.resolve())
    for line in read_text(Path("/proc/mounts")).splitlines():
        parts = line.split()
        if len(parts) >= 3:
            mount = parts[1]
            inside = target == mount or target.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) >= len(best):
                best, kind = mount, parts[2]
    return kind


def machine(tmp: Path) -> list[str]:
    """Report lines describing the machine."""
    cpuinfo = read_text(Path("/proc/cpuinfo"))
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                  if line.startswith("model name")), platform.processor() or "?")
    cores = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    memory = next((line.split()[1] for line in read_text(Path("/proc/meminfo")).splitlines()
                   if line.startswith("MemTotal:")), None)
    return [
        "## Machine",
        "",
        f"- CPU: {model}, {cores} logical cores ({usable} usable by this process)",
        f"- memory: {mib(int(memory)) + ' MiB' if memory else '?'}",
        f"- Python {platform.python_version()} ({platform.python_implementation()}), {sys.executable}",
        f"- platform: {platform.platform()}",
        f"- temporary directory: {tmp.parent} ({filesystem_of(tmp)})",
        f"- run: {datetime.now().astimezone().isoformat(timespec='seconds')}",
        "",
    ]


# -- 1. hot path ---------------------------------------------------------------------------------


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


def hot_path(tmp: Path, profile: Profile) -> list[str]:
    """Section 1: per-call cost of a fresh token, manager versus the story's file read."""
    env = market_env(tmp / "home", tmp / "hot")
    manager = seed_us_token(env)
    original = original_approach(manager.store.record_path)
    if not original() == manager.get_valid_token() == SEEDED_TOKEN:
        raise RuntimeError("the hot-path subjects do not return the seeded token")
    calls = profile.hot_batches * BATCH
    log(f"hot path: {calls:,} calls each")
    rows = [
        ("`USTokenManager.get_valid_token()`, fresh token",
         per_call_samples(manager.get_valid_token, profile.hot_batches)),
        ("story's original: open + read + `json.loads` + expiry check, every call",
         per_call_samples(original, profile.hot_batches)),
        ("floor: an empty method call in the same loop",
         per_call_samples(_Empty().method, profile.hot_batches)),
    ]
    lines = [
        f"### 1. Hot path: `get_valid_token()` with a fresh token ({calls:,} calls each, "
        f"batches of {BATCH:,})",
        "",
        "| approach | median µs/call | mean µs/call |",
        "|---|---:|---:|",
    ]
    for name, samples in rows:
        lines.append(f"| {name} | {median(samples) * 1e6:.3f} | {statistics.fmean(samples) * 1e6:.3f} |")
    ratio = median(rows[1][1]) / median(rows[0][1])
    lines += ["", f"Original / manager (medians): **{ratio:.0f}×** (target ≥ 50×).", ""]
    return lines


# -- 2. CLI start-up -----------------------------------------------------------------------------


def import_times(argv: Sequence[str], env: dict[str, str]) -> list[tuple[int, int, str]]:
    """One ``-X importtime`` run: (depth, cumulative µs, module) per module, in import order."""
    process = subprocess.run([sys.executable, "-X", "importtime", *argv], env=env, cwd=REPO,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, timeout=CHILD_TIMEOUT, check=False)
    entries = []
    for line in process.stderr.splitlines():
        if not line.startswith("import time:"):
            continue
        parts = line[len("import time:"):].split("|")
        if len(parts) != 3 or not parts[1].strip().isdigit():
            continue
        name = parts[2].rstrip()
        depth = (len(name) - len(name.lstrip())) // 2
        entries.append((depth, int(parts[1]), name.strip()))
    return entries


def classify(module: str) -> str:
    """``stdlib``, ``project`` or ``third-party``."""
    top = module.split(".")[0]
    if top in PROJECT_PACKAGES:
        return "project"
    if top in sys.stdlib_module_names or top in sys.builtin_module_names or top == "__main__":
        return "stdlib"
    return "third-party"


def startup_imports(env: dict[str, str], extra: set[str]) -> list[str]:
    """What ``check`` imports beyond ``python -c pass`` (``extra``, from the probes), and the largest."""
    check = import_times(["-m", "us.token_manager", "check"], env)
    groups: dict[str, list[str]] = {"third-party": [], "project": [], "stdlib": []}
    for name in sorted(extra):
        groups[classify(name)].append(name)
    # -X importtime lists a module after everything it imported: its importer is the next entry
    # with a smaller depth. Keep the non-project modules that project code (or runpy) imports.
    direct: list[tuple[int, str]] = []
    for index, (depth, cumulative, name) in enumerate(check):
        if name not in extra or classify(name) == "project":
            continue
        importer = next((n for d, _, n in check[index + 1:] if d < depth), None)
        if importer is None or classify(importer) == "project":
            direct.append((cumulative, name))
    direct.sort(reverse=True)
    total = sum(c for d, c, _ in check if d == 0) / 1000
    extra_total = sum(c for d, c, n in check if d == 0 and n in extra) / 1000

    def listing(names: list[str]) -> str:
        return ", ".join(f"`{n}`" for n in names) if names else "none"

    return [
        "Modules in `sys.modules` at the exit of `check` and not at the exit of `python -c pass` "
        "(split with `sys.stdlib_module_names`), and their cost in one `-X importtime` run:",
        "",
        f"- third-party: {listing(groups['third-party'])}",
        f"- project: {listing(groups['project'])}",
        f"- standard library ({len(groups['stdlib'])}): {listing(groups['stdlib'])}",
        f"- import time under `-X importtime`: {total:.1f} ms in all, {extra_total:.1f} ms of it for "
        "the modules above; the largest that project code imports (cumulative): "
        + ", ".join(f"`{name}` {cumulative / 1000:.1f} ms" for cumulative, name in direct[:6]),
        "",
    ]


def cli_startup(tmp: Path, profile: Profile, extra: set[str]) -> list[str]:
    """Section 2; ``extra`` is what ``check`` imports beyond ``python -c pass`` (from the probes)."""
    env = market_env(tmp / "home", tmp / "startup")
    seed_us_token(env)
    exe = sys.executable
    commands = [
        ("`python -c pass`", [exe, "-c", "pass"]),
        ('`python -c "import requests"`', [exe, "-c", "import requests"]),
        ("`python -m us.token_manager check`", [exe, "-m", "us.token_manager", "check"]),
        ("reference: `python -S -c pass` (no `site`, so no site-packages `.pth` hooks)",
         [exe, "-S", "-c", "pass"]),
    ]
    for name, argv in commands:  # warm-up: bytecode compiled, files cached; check must say OK
        result = run_child(argv, env)
        if result.returncode != 0:
            raise RuntimeError(f"{name} exited with {result.returncode} in the warm-up run")
    walls: dict[str, list[float]] = {name: [] for name, _ in commands}
    log(f"CLI start-up: {profile.startup_rounds} interleaved rounds of {len(commands)} commands")
    for round_number in range(profile.startup_rounds):
        shift = round_number % len(commands)
        for name, argv in commands[shift:] + commands[:shift]:
            result = run_child(argv, env)
            if result.returncode != 0:
                raise RuntimeError(f"{name} exited with {result.returncode}")
            walls[name].append(result.wall)
    base = median(walls[commands[0][0]])
    lines = [
        f"### 2. CLI start-up (wall time, spawn to exit; median of {profile.startup_rounds} interleaved "
        "runs after a warm-up run)",
        "",
        "| command | median ms | min ms | over `python -c pass` |",
        "|---|---:|---:|---:|",
    ]
    for name, _ in commands:
        mid = median(walls[name])
        lines.append(f"| {name} | {mid * 1000:.1f} | {min(walls[name]) * 1000:.1f} | "
                     f"{(mid - base) * 1000:+.1f} ms ({mid / base:.2f}×) |")
    lines.append("")
    log("CLI start-up: -X importtime")
    lines += startup_imports(env, extra)
    return lines


# -- 3. single flight ----------------------------------------------------------------------------


@dataclass
class FlightRun:
    """One single-flight run's outcome."""

    per_market: int
    wall: float
    requests: dict[str, int]
    raced: dict[str, int]
    failures: int
    same_token: dict[str, bool]


def flight(tmp: Path, sandbox: SandboxProcess, per_market: int, delay: float) -> FlightRun:
    """Run ``per_market`` ``get`` processes per market at once from cold and collect the outcome."""
    run_dir = tmp / f"flight-{per_market}"
    token_dir = run_dir / "tokens"
    run_dir.mkdir()
    env = market_env(tmp / "home", token_dir, sandbox.base_url)
    sandbox.call("POST", "reset", {})
    if delay > 0:
        sandbox.call("POST", "faults", {"mode": "slow", "delay": delay, "count": 2})
    jobs: list[tuple[str, subprocess.Popen[bytes], Path, Path]] = []
    deadline = time.monotonic() + 120.0
    started = time.perf_counter()
    try:
        for index in range(per_market):
            for market in ("us", "kr"):
                out, err = run_dir / f"{market}-{index}.out", run_dir / f"{market}-{index}.err"
                with open(out, "wb") as stdout, open(err, "wb") as stderr:
                    process = spawn([sys.executable, "-m", f"{market}.token_manager", "-vv", "get"], env,
                                    stdout=stdout, stderr=stderr)
                jobs.append((market, process, out, err))
        codes = [reap(process, deadline) for _, process, _, _ in jobs]
        wall = time.perf_counter() - started
    finally:
        kill_leftovers()
    counters = sandbox.counters()
    keys = {"us": US_KEY, "kr": KR_KEY}
    tokens: dict[str, set[str]] = {"us": set(), "kr": set()}
    raced: Counter[str] = Counter()
    for (market, _, out, err), code in zip(jobs, codes, strict=True):
        if code == 0:
            tokens[market].add(read_text(out).strip())
        text = read_text(err)
        if f"renewed the {market} token meanwhile" in text or f"obtained a new {market} token" in text:
            raced[market] += 1
    same = {}
    for market in ("us", "kr"):
        stored = FileTokenStore(token_dir, f"{market}_").load()
        same[market] = (len(tokens[market]) == 1 and stored is not None
                        and tokens[market] == {stored.access_token})
    return FlightRun(
        per_market=per_market,
        wall=wall,
        requests={m: counters["token_requests"].get(k, 0) for m, k in keys.items()},
        raced=dict(raced),
        failures=sum(1 for code in codes if code != 0),
        same_token=same,
    )


def single_flight(tmp: Path, sandbox: SandboxProcess, profile: Profile, delay: float) -> list[str]:
    """Section 3."""
    runs = []
    for per_market in profile.single_flight:
        log(f"single flight: {per_market} process(es) per market ({2 * per_market} in all)")
        runs.append(flight(tmp, sandbox, per_market, delay))
    widen = (f"the broker's first token answers are delayed {delay:g} s (`slow` fault) so that the "
             "processes meet at the lock, and the wall times include that delay" if delay > 0
             else "the broker answers at once")
    lines = [
        "### 3. Single flight: N `get` processes per market at once, from cold",
        "",
        "N processes per market (2N in all: `python -m us.token_manager get` and `python -m "
        "kr.token_manager get`, interleaved, spawned back to back), fresh token directory and "
        f"sandbox reset per run; {widen}. *Queued* = processes that found no token and waited for "
        "the lock (the one that renewed included); the others started after the token was on disk.",
        "",
        "| N per market | processes | token requests at the broker (US / KR) | queued on the lock "
        "(US / KR) | wall time to all tokens (s) | same token in every process (US / KR) | "
        "failed |",
        "|---:|---:|---|---|---:|---|---:|",
    ]
    for run in runs:
        same = " / ".join("yes" if run.same_token[m] else "**no**" for m in ("us", "kr"))
        lines.append(
            f"| {run.per_market} | {2 * run.per_market} | {run.requests['us']} / {run.requests['kr']} | "
            f"{run.raced.get('us', 0)} / {run.raced.get('kr', 0)} | {run.wall:.2f} | {same} | "
            f"{run.failures} |"
        )
    lines += ["", "Target: 1 / 1 token request per run (SPEC §9: 16 processes from cold).", ""]
    return lines


# -- 4. crash safety ------------------------------------------------------------------------------


def _quiet_child(environ: dict[str, str]) -> USTokenManager:
    """Common worker set-up: no proxies, no one-a-minute pause, a manager on ``environ``."""
    for name in list(os.environ):
        if name.lower().endswith("_proxy"):
            del os.environ[name]
    base_token_manager.MIN_REQUEST_INTERVAL = 0.0
    return USTokenManager(Settings(environ, dotenv_path=False))


def _calibrate(environ: dict[str, str], conn: Any, renewals: int) -> None:
    """Worker: send back the mean seconds of one forced renewal."""
    manager = _quiet_child(environ)
    manager.refresh_token()
    started = time.perf_counter()
    for _ in range(renewals):
        manager.refresh_token()
    conn.send((time.perf_counter() - started) / renewals)
    conn.close()


def _renew_until_killed(environ: dict[str, str], ready: Any, phase: Any) -> None:
    """Worker: force renewals back to back until SIGKILLed, publishing its phase in ``phase``."""
    from common import kis_client

    manager = _quiet_child(environ)
    store = manager.store
    assert isinstance(store, FileTokenStore)
    lock, save, save_state, issue = store.lock, store.save, store.save_state, kis_client.issue_token

    @contextlib.contextmanager
    def watched_lock(timeout: float) -> Iterator[None]:
        with lock(timeout):
            phase.value = 1
            try:
                yield
            finally:
                phase.value = 0

    def watched_save(record: TokenRecord) -> None:
        phase.value = 3
        save(record)
        phase.value = 1

    def watched_save_state(state: Any) -> None:
        previous, phase.value = phase.value, 4
        save_state(state)
        phase.value = previous

    def watched_issue(*args: Any, **kwargs: Any) -> Any:
        phase.value = 2
        try:
            return issue(*args, **kwargs)
        finally:
            phase.value = 1

    store.lock = watched_lock  # type: ignore[method-assign]
    store.save = watched_save  # type: ignore[method-assign]
    store.save_state = watched_save_state  # type: ignore[method-assign]
    kis_client.issue_token = watched_issue
    manager.refresh_token()
    ready.set()
    while True:
        manager.refresh_token()


@dataclass
class CrashTally:
    """What the kills left behind."""

    kills: int = 0
    not_ready: int = 0
    died_alone: int = 0
    broken_records: int = 0
    missing_records: int = 0
    broken_states: int = 0
    lock_busy: int = 0
    phases: Counter[int] = field(default_factory=Counter)


def crash_safety(tmp: Path, sandbox: SandboxProcess, profile: Profile) -> list[str]:
    """Section 4."""
    from common import kis_client  # noqa: F401  (imported before forking: workers renew at once)

    token_dir = tmp / "crash"
    environ = market_env(tmp / "home", token_dir, sandbox.base_url)
    sandbox.call("POST", "reset", {})
    sandbox.call("POST", "config", {"rate_limit": 0, "same_token_window": 0})
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    calibrator = context.Process(target=_calibrate, args=(environ, sender, 20), daemon=True)
    calibrator.start()
    renewal = receiver.recv() if receiver.poll(60) else 0.05
    calibrator.join(10)
    if calibrator.is_alive():
        calibrator.kill()
        calibrator.join(5)
    issued_before = sandbox.counters()["tokens_issued"].get(US_KEY, 0)
    log(f"crash safety: {profile.kills} SIGKILLs (one renewal ≈ {renewal * 1000:.1f} ms)")
    checker = FileTokenStore(token_dir, "us_")
    rng = random.Random(20261124)
    tally = CrashTally()
    for _ in range(profile.kills):
        ready = context.Event()
        phase = context.RawValue("i", 0)
        worker = context.Process(target=_renew_until_killed, args=(environ, ready, phase), daemon=True)
        worker.start()
        if not ready.wait(10):
            tally.not_ready += 1
            worker.kill()
            worker.join(10)
            continue
        time.sleep(rng.uniform(0.0, 3 * renewal))
        landed = phase.value
        os.kill(worker.pid, signal.SIGKILL)  # type: ignore[arg-type]
        worker.join(10)
        tally.kills += 1
        tally.phases[landed] += 1
        if worker.exitcode != -signal.SIGKILL:
            tally.died_alone += 1
        try:
            if checker.load() is None:
                tally.missing_records += 1
        except CorruptRecordError:
            tally.broken_records += 1
        try:
            checker.load_state()
        except CorruptRecordError:
            tally.broken_states += 1
        try:
            with checker.lock(0):
                pass
        except LockTimeoutError:
            tally.lock_busy += 1
    issued = sandbox.counters()["tokens_issued"].get(US_KEY, 0) - issued_before
    temp_left = len(list(token_dir.glob(".*.tmp")))
    final = checker.load()
    final_ok = final is not None and final.access_token.startswith("sbx-")
    where = ", ".join(f"{PHASES[p]} {tally.phases[p]}" for p in range(len(PHASES)) if tally.phases[p])
    return [
        f"### 4. Crash safety: {tally.kills} renewals SIGKILLed at random instants",
        "",
        "Forked workers force renewals back to back (no one-a-minute pause, sandbox rate limit 0, "
        f"a new token each time; one renewal ≈ {renewal * 1000:.1f} ms) and are killed 0–3 renewals "
        "after their first one.",
        "",
        "| measure | result |",
        "|---|---:|",
        f"| processes killed | {tally.kills} |",
        f"| renewals completed by the killed workers (new tokens at the broker) | {issued} |",
        f"| records left unparseable (`CorruptRecordError`; target 0) | {tally.broken_records} |",
        f"| records missing after a kill | {tally.missing_records} |",
        f"| renewal-state files left unparseable | {tally.broken_states} |",
        f"| lock still held right after the kill (one try, no wait) | {tally.lock_busy} of {tally.kills} |",
        f"| temp files left by writers killed mid-write (swept after 60 s) | {temp_left} |",
        f"| workers not ready in 10 s / exited before the kill | {tally.not_ready} / {tally.died_alone} |",
        f"| final record a valid sandbox token | {'yes' if final_ok else '**no**'} |",
        "",
        f"Where the kills landed: {where}.",
        "",
    ]


# -- 5. memory (and the module lists of section 2) -------------------------------------------------

PROBE = """import atexit, sys
def _bench_probe():
    names = list(sys.modules)
    hwm = ""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            hwm = next((line.split()[1] for line in status if line.startswith("VmHWM:")), "")
    except OSError:
        pass
    with open({path!r}, "w", encoding="ascii") as out:
        out.write(hwm + "\\n" + "\\n".join(names))
atexit.register(_bench_probe)
"""


@dataclass
class Probe:
    """What one probed child reported at exit."""

    hwm_kib: int | None
    modules: set[str]


def probe(code: str, env: dict[str, str], out: Path, stdout: Path | None = None) -> Probe:
    """Run ``python -c PROBE+code``; fail unless it exits 0 (and printed the seeded token, if asked)."""
    script = PROBE.format(path=str(out)) + code
    with open(stdout if stdout is not None else os.devnull, "wb") as handle:
        result = run_child([sys.executable, "-c", script], env, stdout=handle)
    if result.returncode != 0:
        raise RuntimeError(f"a probed child exited with {result.returncode}: {code!r}")
    if stdout is not None and read_text(stdout) != SEEDED_TOKEN:
        raise RuntimeError("the manager process did not print the seeded token")
    first, _, rest = read_text(out).partition("\n")
    return Probe(int(first) if first.isdigit() else None, set(rest.split("\n")))


def run_module_code(module: str, *args: str) -> str:
    """Code that runs ``python -m module args`` the way ``-m`` does."""
    return (f"import runpy\nsys.argv = [{module!r}, *{list(args)!r}]\n"
            f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n")


def memory(tmp: Path, profile: Profile) -> tuple[list[str], set[str]]:
    """Section 5, and the modules that ``check`` imports beyond ``python -c pass``."""
    env = market_env(tmp / "home", tmp / "probe")
    seed_us_token(env)
    subjects = [
        ("`python -c pass`", "pass\n"),
        ('`python -c "import requests"`', "import requests\n"),
        ("`python -m us.token_manager check`", run_module_code("us.token_manager", "check")),
        (f"a process holding a `USTokenManager` after {HOLD_CALLS:,} `get_valid_token()` calls",
         HOLD_SCRIPT),
    ]
    runs = profile.memory_runs + 1
    log(f"memory: {len(subjects)} probed commands, {runs} run(s) each (the first not counted)")
    peaks: dict[str, list[int]] = {name: [] for name, _ in subjects}
    modules: dict[str, set[str]] = {}
    for index in range(runs):
        for number, (name, code) in enumerate(subjects):
            out = tmp / f"probe-{index}-{number}"
            held = tmp / f"probe-{index}-{number}.out" if code is HOLD_SCRIPT else None
            result = probe(code, env, out, held)
            modules[name] = result.modules
            if index and result.hwm_kib is not None:
                peaks[name].append(result.hwm_kib)
    base = median(peaks[subjects[0][0]]) if peaks[subjects[0][0]] else None
    lines = [
        "### 5. Memory: peak RSS (`VmHWM` read at exit; median of the runs)",
        "",
        "| process | runs | peak RSS MiB | over `python -c pass` MiB |",
        "|---|---:|---:|---:|",
    ]
    for name, values in peaks.items():
        if not values or base is None:
            lines.append(f"| {name} | 0 | n/a (no /proc) | n/a |")
            continue
        mid = median(values)
        lines.append(f"| {name} | {len(values)} | {mib(mid)} | {(mid - base) / 1024:+.1f} |")
    lines.append("")
    extra = modules[subjects[2][0]] - modules[subjects[0][0]]
    return lines, extra


# -- main ----------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run every measurement and print the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, N up to 16")
    parser.add_argument("--broker-delay", type=float, default=0.5, metavar="SECONDS",
                        help="delay of the broker's first token answers in the single-flight runs "
                             "(default %(default)s)")
    args = parser.parse_args(argv)
    profile = QUICK if args.quick else FULL
    started = time.monotonic()
    report: list[str] = []
    with tempfile.TemporaryDirectory(prefix="kis-bench-") as directory:
        tmp = Path(directory)
        (tmp / "home").mkdir()
        sandbox: SandboxProcess | None = None
        try:
            report += machine(tmp)
            report += hot_path(tmp, profile)
            memory_lines, check_extra = memory(tmp, profile)
            report += cli_startup(tmp, profile, check_extra)
            sandbox = SandboxProcess(base_env(tmp / "home"))
            log(f"sandbox at {sandbox.base_url}")
            report += single_flight(tmp, sandbox, profile, args.broker_delay)
            report += crash_safety(tmp, sandbox, profile)
            report += memory_lines
        finally:
            kill_leftovers()
            if sandbox is not None:
                sandbox.stop()
    report.append(f"_{'Quick' if args.quick else 'Full'} run of `python bench/run.py"
                  f"{' --quick' if args.quick else ''}`: {time.monotonic() - started:.0f} s in all._")
    print("\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
