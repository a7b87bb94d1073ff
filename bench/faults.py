"""Section 8, faults: N ``get`` processes at once under each broker, file and webhook fault.

One row per fault. Each row has its own in-process sandbox (:class:`common.sandbox.Sandbox` on
127.0.0.1), its own token directory and N processes (16; ``--quick``: 2) running ``python -m
us.token_manager get`` spawned back to back, with one app key in both markets. Every process has a
hard limit of :data:`HANG_LIMIT` seconds: one still running then is killed and counted as a hang.
Children run with a 1 GiB address-space limit, so that a fault that makes them read a huge file
fails in them instead of exhausting the host.

* **Broker rows** start from cold with one fault queued at ``/oauth2/tokenP`` (the broker answers
  normally afterwards, so one retry absorbs most of them).
* **File rows** first run one ``get`` (a valid token on disk), then plant the fault, then run the N
  processes: no request is needed and every ``get`` should keep serving the stored token.
* **Webhook row**: every token request is refused (``EGW00133``) and ``KIS_ALERT_WEBHOOK_URL`` points
  at a local server that reads the alert, then drips its answer one byte every 0.5 s.

Counted per row: token requests the sandbox handled (``token_requests`` in ``/sandbox/counters``;
an answer served by the fault instead is counted apart), ``get`` processes that failed, tokens
printed that the broker does not accept (one protected ``/uapi`` call per distinct token), broken
files in the token directory after the run, hangs, and the worst wall time of a ``get`` (spawn to
exit). The rows that take seconds by design (slow answer, dripping body, dripping webhook) run
alongside the others (so their wall times and those of the others include some start-up of other
processes); ``--quick`` skips them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import stat
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from _util import US_KEY, Context, log, main, read_text, reap, spawn, table

from common.sandbox import Sandbox

#: Seconds after its spawn at which a ``get`` still running is killed and counted as a hang.
HANG_LIMIT = 40.0
#: Seconds between the starts of the rows that run alongside the others.
STAGGER = 2.0
#: Address-space limit of every ``get`` process (a 2 GiB file read whole fails instead of swapping).
CHILD_MEMORY = 1 << 30
#: Runs ``python -m MODULE ARGS...`` (``sys.argv[1:]``) under :data:`CHILD_MEMORY`.
LIMITED_RUN = (
    "import resource, runpy, sys; "
    f"resource.setrlimit(resource.RLIMIT_AS, ({CHILD_MEMORY}, {CHILD_MEMORY})); "
    "sys.argv = sys.argv[1:]; runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)"
)
GET = (sys.executable, "-c", LIMITED_RUN, "us.token_manager", "get")
#: The dripping webhook's interval between two bytes of its answer.
DRIP_INTERVAL = 0.5
SPARSE_SIZE = 2 << 30
#: Files the package writes in a token directory (``<id>``: environment, fingerprint, broker hash).
OURS = re.compile(
    r"key-[a-z]+-[0-9a-f]+(?:-[0-9a-f]+)?(?:\.approval)?\.(?:json|lock|state)"
    r"|(?:us|kr)_(?:api_token\.json|token_issued_at\.dat|krs_token\.dat)"
)
JSON_SUFFIXES = (".json", ".state", "krs_token.dat")
SECONDS = re.compile(r"\b\d+(?:\.\d+)? s\b")
PROTECTED_PATH = "/uapi/overseas-price/v1/quotations/price?EXCD=NAS&SYMB=AAPL"

_ABORT = threading.Event()  # set when the section stops early: rows kill their processes at once


# -- planted files --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Planted:
    """What a file fault put in place: its path, its ``lstat`` signature, and an outside target."""

    path: Path
    signature: tuple[int, ...]
    target: Path | None = None
    target_text: str = ""


def signature(path: Path) -> tuple[int, ...]:
    """(mode, inode, size, mtime) of ``path`` itself (a symlink is not followed)."""
    st = os.lstat(path)
    return (st.st_mode, st.st_ino, st.st_size, st.st_mtime_ns)


def key_file(token_dir: Path, suffix: str) -> Path:
    """The key's ``key-<id><suffix>`` file (the first ``get`` created it)."""
    found = sorted(p for p in token_dir.glob(f"key-*{suffix}") if ".approval" not in p.name)
    if len(found) != 1:
        raise RuntimeError(f"expected one key-*{suffix} in {token_dir}, found {len(found)}")
    return found[0]


def _replace_with_fifo(path: Path) -> Planted:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    os.mkfifo(path, 0o600)
    return Planted(path, signature(path))


def _write(path: Path, text: str) -> Planted:
    path.write_text(text, encoding="utf-8")
    return Planted(path, signature(path))


def plant_fifo_other_mirror(token_dir: Path, row_dir: Path) -> Planted:
    """A FIFO at the other market's mirror ``kr_api_token.json``."""
    return _replace_with_fifo(token_dir / "kr_api_token.json")


def plant_fifo_state(token_dir: Path, row_dir: Path) -> Planted:
    """A FIFO at the key's renewal state ``key-<id>.state``."""
    return _replace_with_fifo(key_file(token_dir, ".state"))


def plant_sparse_mirror(token_dir: Path, row_dir: Path) -> Planted:
    """A 2 GiB sparse file (zeros, no disk blocks) at this market's mirror ``us_api_token.json``."""
    path = token_dir / "us_api_token.json"
    path.unlink()
    with open(path, "wb") as handle:
        handle.truncate(SPARSE_SIZE)
    return Planted(path, signature(path))


def plant_symlink_lock(token_dir: Path, row_dir: Path) -> Planted:
    """A symlink at the key's lock ``key-<id>.lock`` to a file outside the token directory."""
    lock = key_file(token_dir, ".lock")
    target = row_dir / "outside.txt"
    text = "a file outside the token directory: it must stay as it is\n"
    target.write_text(text, encoding="utf-8")
    lock.unlink()
    lock.symlink_to(target)
    return Planted(lock, signature(lock), target, text)


def plant_garbage_state(token_dir: Path, row_dir: Path) -> Planted:
    """``garbage{`` in the key's renewal state."""
    return _write(key_file(token_dir, ".state"), "garbage{")


def plant_nan_state(token_dir: Path, row_dir: Path) -> Planted:
    """``{"last_request_at": NaN}`` in the key's renewal state."""
    return _write(key_file(token_dir, ".state"), '{"last_request_at": NaN}')


# -- the faults ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """One row: a sandbox fault queued before the run, and/or a file planted after a first ``get``.

    Attributes:
        label: the row's name in the table.
        mode: the sandbox fault mode queued at ``/oauth2/tokenP`` ('' for none).
        count: how many token answers the fault replaces.
        delay: the fault's delay (``slow``: before the answer; ``drip``: between two bytes).
        plant: file rows: plants the fault in the token directory (after a first ``get``).
        webhook: point ``KIS_ALERT_WEBHOOK_URL`` at a local webhook that drips its answer.
        timed: takes seconds by design (``--quick`` skips it).
    """

    label: str
    mode: str = ""
    count: int = 1
    delay: float = 0.0
    plant: Callable[[Path, Path], Planted] | None = None
    webhook: bool = False
    timed: bool = False

    @property
    def kind(self) -> str:
        """``broker``, ``file`` or ``webhook``."""
        return "webhook" if self.webhook else "file" if self.plant is not None else "broker"


FAULTS: tuple[Fault, ...] = (
    Fault("slow answer (12 s, over one attempt's 10 s)", "slow", delay=12.0, timed=True),
    Fault("dropped connection", "drop"),
    Fault("truncated JSON body", "truncated"),
    Fault("HTTP 503 with an HTML page", "5xx"),
    Fault("dripping body (1 byte / 0.5 s)", "drip", delay=DRIP_INTERVAL, timed=True),
    Fault("HTML body (HTTP 200)", "html"),
    Fault("`charset=x-bogus` (token issued)", "bad_charset"),
    Fault("200,000 `[`", "deep_json"),
    Fault("non-ASCII `access_token`", "non_ascii_token"),
    Fault("`access_token` a list", "wrong_types"),
    Fault("2 MB body", "huge_body"),
    Fault("FIFO at `kr_api_token.json`", plant=plant_fifo_other_mirror),
    Fault("FIFO at `key-<id>.state`", plant=plant_fifo_state),
    Fault("2 GiB sparse `us_api_token.json`", plant=plant_sparse_mirror),
    Fault("symlink at `key-<id>.lock` to an outside file", plant=plant_symlink_lock),
    Fault("`garbage{` in the state", plant=plant_garbage_state),
    Fault('`{"last_request_at": NaN}` in the state', plant=plant_nan_state),
    Fault("broker refuses (`EGW00133`), webhook drips", "5xx_ratelimit", count=10_000, webhook=True,
          timed=True),
)


# -- the dripping webhook ------------------------------------------------------------------------


class DrippingWebhook:
    """A webhook on 127.0.0.1 that reads each request whole, then drips its answer (status line
    included) one byte every ``interval`` seconds until it is stopped or the client goes away."""

    ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Drip: " + b"." * 4000
              + b"\r\nContent-Length: 2\r\n\r\nok")

    def __init__(self, interval: float = DRIP_INTERVAL) -> None:
        self.interval = interval
        self.requests = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> DrippingWebhook:
        self._start(self._accept)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self._server.close()

    def _start(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name="bench-webhook", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._start(self._drip, conn)

    def _drip(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5.0)
            try:
                data = b""
                while b"\r\n\r\n" not in data and len(data) < 65536:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                missing = (int(length.group(1)) if length else 0) - len(body)
                while missing > 0:
                    chunk = conn.recv(min(missing, 65536))
                    if not chunk:
                        return
                    missing -= len(chunk)
                self.requests += 1
                for i in range(len(self.ANSWER)):
                    if self._stop.wait(self.interval):
                        return
                    conn.sendall(self.ANSWER[i : i + 1])
            except OSError:
                return


# -- one row ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Exit:
    """How one ``get`` ended: exit code (None: killed as a hang), wall time, stdout, last stderr line."""

    code: int | None
    wall: float
    token: str
    error: str


def run_gets(env: dict[str, str], out_dir: Path, processes: int, name: str = "get") -> list[Exit]:
    """Start ``processes`` ``get`` processes back to back and wait for them (each at most
    :data:`HANG_LIMIT` s after its spawn; one still running then is killed); their output goes to
    ``<name>-<i>.out`` and ``.err`` in ``out_dir``."""
    jobs = []
    try:
        for index in range(processes):
            out, err = out_dir / f"{name}-{index}.out", out_dir / f"{name}-{index}.err"
            with open(out, "wb") as stdout, open(err, "wb") as stderr:
                jobs.append((spawn(GET, env, stdout=stdout, stderr=stderr), time.perf_counter(),
                             time.monotonic() + HANG_LIMIT, out, err))
        ended: dict[int, tuple[int | None, float]] = {}
        while len(ended) < len(jobs):
            for index, (process, started, deadline, _, _) in enumerate(jobs):
                if index in ended:
                    continue
                done = os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
                if done:
                    ended[index] = (reap(process, deadline), time.perf_counter() - started)
                elif time.monotonic() >= deadline or _ABORT.is_set():
                    reap(process, 0.0)  # kills it
                    ended[index] = (None, time.perf_counter() - started)
            time.sleep(0.005)
    finally:
        for process, *_ in jobs:
            if process.returncode is None:
                reap(process, 0.0)
    results = []
    for index, (_, _, _, out, err) in enumerate(jobs):
        code, wall = ended[index]
        lines = read_text(err).strip().splitlines()
        error = lines[-1].removeprefix("python -m us.token_manager: error: ") if lines else ""
        results.append(Exit(code, wall, read_text(out).strip(), error))
    return results


def unusable(sandbox: Sandbox, tokens: Sequence[str]) -> int:
    """How many of ``tokens`` the broker does not accept on a protected call (each distinct one
    asked once; a token that cannot even be put in a header counts)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    verdict: dict[str, bool] = {}
    for token in set(tokens):
        request = urllib.request.Request(sandbox.base_url + PROTECTED_PATH,
                                         headers={"authorization": f"Bearer {token}", "appkey": US_KEY})
        try:
            with opener.open(request, timeout=10) as answer:
                verdict[token] = json.loads(answer.read()).get("rt_cd") == "0"
        except (urllib.error.URLError, ValueError, OSError):  # HTTP 500, a header it cannot encode
            verdict[token] = False
    return sum(1 for token in tokens if not verdict[token])


class FaultClock:
    """Notes when the sandbox first serves a queued fault (polls its counters every 10 ms)."""

    def __init__(self, sandbox: Sandbox, served_before: int) -> None:
        self.served_at: float | None = None
        self._sandbox = sandbox
        self._before = served_before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="bench-fault-clock", daemon=True)

    def __enter__(self) -> FaultClock:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _watch(self) -> None:
        while not self._stop.wait(0.01):
            if self._sandbox.counters()["faults_served"] > self._before:
                self.served_at = time.monotonic()
                return


def _strict_json(text: str) -> object:
    def refuse(name: str) -> object:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def broken_files(token_dir: Path, planted: Planted | None) -> list[str]:
    """The names of the files in ``token_dir`` that are broken after a run, with why.

    Broken: anything that is not a regular file, a name the package does not write (a temp file
    left behind included), a JSON file (record, mirror, state, mojito file) over 1 MiB or that is
    not a strict JSON object. The planted object is left out while it is as planted; a symlink's
    outside target counts if its content changed.
    """
    found = []
    for entry in sorted(os.scandir(token_dir), key=lambda e: e.name):
        path = Path(entry.path)
        if planted is not None and path == planted.path and signature(path) == planted.signature:
            continue
        st = entry.stat(follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            found.append(f"{entry.name} (not a regular file)")
        elif not OURS.fullmatch(entry.name):
            found.append(f"{entry.name} (not a file of ours)")
        elif entry.name.endswith(JSON_SUFFIXES):
            try:
                if st.st_size > 1 << 20:
                    raise ValueError("over 1 MiB")
                if not isinstance(_strict_json(path.read_text(encoding="utf-8")), dict):
                    raise ValueError("not a JSON object")
            except (OSError, ValueError) as exc:
                found.append(f"{entry.name} ({type(exc).__name__})")
    target = None if planted is None else planted.target
    if target is not None and read_text(target) != planted.target_text:  # type: ignore[union-attr]
        found.append(f"{target.name} outside the directory (changed)")
    return found


@dataclass(frozen=True)
class Row:
    """One fault's figures."""

    fault: Fault
    processes: int
    requests: int
    faulted: int
    failed: int
    bad_tokens: int
    broken: list[str]
    hangs: int
    worst: float
    errors: Counter[str]

    def cells(self) -> tuple[object, ...]:
        """The table row."""
        worst = f"{self.worst:.2f}" + (" (killed)" if self.hangs else "")
        return (self.fault.label, self.fault.kind, self.processes, self.requests, self.faulted, self.failed,
                self.bad_tokens, len(self.broken), self.hangs, worst)


def run_row(ctx: Context, index: int, fault: Fault, processes: int) -> Row:
    """Run one fault's row in a directory of its own (removed at the end)."""
    row_dir = ctx.tmp / f"faults-{index:02d}"
    token_dir = row_dir / "tokens"
    row_dir.mkdir()
    planted = None
    try:
        with contextlib.ExitStack() as stack:
            sandbox = stack.enter_context(Sandbox())
            env = ctx.env(token_dir, one_key=True)
            env["KIS_BASE_URL"] = sandbox.base_url
            if fault.plant is not None:
                first = run_gets(env, row_dir, 1, "first")[0]
                if first.code != 0:
                    raise RuntimeError(f"faults: the first get of {fault.label!r} failed: {first.error}")
                planted = fault.plant(token_dir, row_dir)
            if fault.webhook:
                hook = stack.enter_context(DrippingWebhook())
                env["KIS_ALERT_WEBHOOK_URL"] = hook.url + "/services/bench/alerts"
            if fault.mode:
                sandbox.inject_fault(fault.mode, fault.count, fault.delay)
            before = sandbox.counters()
            with FaultClock(sandbox, before["faults_served"]) as clock:
                exits = run_gets(env, row_dir, processes)
            if fault.mode == "slow" and clock.served_at is not None:  # the delayed answer is handled
                _ABORT.wait(max(0.0, clock.served_at + fault.delay + 0.5 - time.monotonic()))  # late
            after = sandbox.counters()
            sandbox.clear_faults()
            bad = unusable(sandbox, [e.token for e in exits if e.code == 0])
    finally:
        broken = broken_files(token_dir, planted) if token_dir.is_dir() else []
        shutil.rmtree(row_dir, ignore_errors=True)
    return Row(
        fault, processes,
        requests=after["token_requests"].get(US_KEY, 0) - before["token_requests"].get(US_KEY, 0),
        faulted=after["faults_served"] - before["faults_served"],
        failed=sum(1 for e in exits if e.code not in (0, None)),
        bad_tokens=bad,
        broken=broken,
        hangs=sum(1 for e in exits if e.code is None),
        worst=max(e.wall for e in exits),
        errors=Counter(SECONDS.sub("N s", e.error) for e in exits if e.code not in (0, None) and e.error),
    )


@contextlib.contextmanager
def _aborting() -> Iterator[None]:
    """On any exit by an exception, tell running rows to kill their processes at once."""
    _ABORT.clear()
    try:
        yield
    except BaseException:
        _ABORT.set()
        raise


def run_rows(ctx: Context, faults: Sequence[Fault], processes: int) -> list[Row]:
    """The rows that take seconds by design each in a thread of their own, started first and
    :data:`STAGGER` s apart; the others one after another in one more thread."""
    timed = [i for i, fault in enumerate(faults) if fault.timed]
    others = [i for i, fault in enumerate(faults) if not fault.timed]

    def one_by_one() -> dict[int, Row]:
        return {i: run_row(ctx, i, faults[i], processes) for i in others}

    with _aborting(), ThreadPoolExecutor(len(timed) + 1, thread_name_prefix="bench-faults") as pool:
        try:
            started = {}
            for i in timed:
                started[i] = pool.submit(run_row, ctx, i, faults[i], processes)
                _ABORT.wait(STAGGER)
            lane = pool.submit(one_by_one)
            rows = lane.result() | {i: future.result() for i, future in started.items()}
        finally:
            pool.shutdown(cancel_futures=True)
    return [rows[i] for i in range(len(faults))]


def _failure_notes(rows: Sequence[Row]) -> list[str]:
    """Broken files by name, and the distinct last lines of failed gets' stderr, per row."""
    notes = []
    for row in rows:
        if row.broken:
            notes.append(f"* {row.fault.label}: broken files: {', '.join(row.broken)}.")
        for error, times in row.errors.most_common(3):
            clipped = error if len(error) <= 200 else error[:197] + "..."
            notes.append(f"* {row.fault.label}: {times} × `{clipped}`")
    return notes


def run(ctx: Context) -> list[str]:
    """Every fault's row (``--quick``: those that do not take seconds by design), N processes each."""
    processes = ctx.profile.fault_processes
    faults = [f for f in FAULTS if ctx.profile.timed_faults or not f.timed]
    log(f"faults: {len(faults)} rows, {processes} get processes each")
    rows = run_rows(ctx, faults, processes)
    notes = _failure_notes(rows)
    timed = ", ".join(f.label for f in FAULTS if f.timed)
    how = (f"The rows that take seconds by design ({timed}) run alongside the others, started first "
           f"and {STAGGER:g} s apart; the others run one after another, so their times include some "
           f"start-up of other rows' processes ({os.cpu_count()} CPUs)." if ctx.profile.timed_faults
           else f"`--quick` skips the rows that take seconds by design ({timed}); the others run one "
           "after another.")
    return [
        f"### 8. Faults: {processes} `get` processes at once under each fault",
        "",
        f"Per row: a sandbox of its own on 127.0.0.1, a fresh token directory, {processes} processes "
        "running `python -m us.token_manager get` spawned back to back (one app key in both markets), "
        f"each killed after {HANG_LIMIT:g} s (a *hang*) and limited to 1 GiB of address space. "
        "*broker*: from cold, one faulted token answer, then normal answers. *file*: planted after a "
        "first `get` stored a valid token (not counted), so no request is needed and every `get` must "
        "serve that token. *webhook*: every token request is refused (`EGW00133`, HTTP 500) and "
        "`KIS_ALERT_WEBHOOK_URL` points at a local server that drips its answer 1 byte / "
        f"{DRIP_INTERVAL:g} s. {how}",
        "",
        *table(["fault", "kind", "processes", "token requests at the broker", "faulted answers",
                "gets failed", "unusable tokens printed", "broken files", "hangs", "worst get (s)"],
               [row.cells() for row in rows], "llrrrrrrrr"),
        "Legend: *token requests at the broker* = requests the sandbox handled as token requests "
        "(`token_requests`, counted when handled; each counts toward the one-a-minute limit); "
        "*faulted answers* = answers the fault replaced or altered (`faults_served`; a slow, dripping "
        "or `charset` answer is also a token request); *gets failed* = exit code other than 0; "
        "*unusable tokens printed* = gets that exited 0 with a token the broker refuses on a protected "
        "call; *broken files* = entries of the token directory after the run that are not regular "
        "files of ours or whose JSON does not parse (the planted object left out while unchanged; a "
        "symlink's outside target counts if changed); *worst get* = spawn to exit of the slowest "
        "process. Target: 0 broken files, 0 hangs and 0 unusable tokens on every row; at most 1 token "
        "request per row (0 on file rows, where every get must succeed); worst get within the retry "
        "budget (20 s) plus start-up. The webhook row's gets fail by design (the broker refuses).",
        "",
        *(["What failed gets printed last (the last line of stderr after `error: `; numbers of "
           "seconds shown as N; most common first):", "", *notes, ""] if notes else []),
    ]


if __name__ == "__main__":
    sys.exit(main([run]))
