"""Shared fixtures: an injected clock, a temporary token directory, managers built on them.

The sandbox in a process and the Redis server the tests start live in ``common.sandbox`` (the bench
uses them too): :class:`SandboxProcess`, :func:`finish` and ``common.sandbox.redis_server``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest

from common.clock import KST
from common.credentials.records import TokenRecord
from common.sandbox.process import SandboxProcess, finish
from common.settings import Settings
from kr.token_manager import KRTokenManager
from us.token_manager import USTokenManager

REPO = Path(__file__).resolve().parent.parent
REAL_HOST = "https://openapi.koreainvestment.com:9443"
PAPER_HOST = "https://openapivts.koreainvestment.com:29443"
TOKEN_URL = REAL_HOST + "/oauth2/tokenP"
US_KEY, US_SECRET = "PSus" + "a" * 32, "us-secret-" + "x" * 170
KR_KEY, KR_SECRET = "PSkr" + "b" * 32, "kr-secret-" + "y" * 170
START = datetime(2026, 11, 24, 8, 0, 0, tzinfo=KST).timestamp()
DAY = 86400.0


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, start: float = START) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class SleepRecorder:
    """Stands in for ``time.sleep``: records the waits, and advances a clock if given one."""

    def __init__(self, clock: FakeClock | None = None) -> None:
        self.calls: list[float] = []
        self.clock = clock

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        if self.clock is not None:
            self.clock.advance(seconds)


def token_calls(mock) -> list:
    """The calls a ``responses`` mock saw to the token endpoint (not a look at the broker's clock)."""
    return [call for call in mock.calls if call.request.url.endswith("/oauth2/tokenP")]


def kst(epoch: float) -> str:
    """The broker's expiry format for an epoch time."""
    return datetime.fromtimestamp(epoch, KST).strftime("%Y-%m-%d %H:%M:%S")


def token_answer(token: str, expires_at: float, expires_in: int = 86400) -> dict:
    """A successful ``/oauth2/tokenP`` answer."""
    return {
        "access_token": token,
        "access_token_token_expired": kst(expires_at),
        "token_type": "Bearer",
        "expires_in": expires_in,
    }


def refusal(code: str = "EGW00133", text: str = "접근토큰 발급 잠시 후 다시 시도하세요(1분당 1회)") -> dict:
    """A refused ``/oauth2/tokenP`` answer, in the token endpoint's own shape."""
    return {"error_description": text, "error_code": code}


def fake_token(n: int = 1) -> str:
    """A token-looking string that is easy to search for in logs."""
    return f"eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9.SECRET-TOKEN-{n:04d}.c2lnbmF0dXJl"


@pytest.fixture(autouse=True)
def broker_clock_probe(request, monkeypatch):
    """In-process tests talk to a mocked broker: its clock is not read (one look per process, a
    ``GET`` of the base URL, is none of what they count) unless a test is marked ``broker_clock``.
    Child processes and the sandbox are unaffected."""
    if request.node.get_closest_marker("broker_clock") is None:
        from common.credentials import kis_client

        monkeypatch.setattr(kis_client, "probe_date", lambda *args, **kwargs: False)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sleeps(clock: FakeClock) -> SleepRecorder:
    return SleepRecorder(clock)


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    """A complete configuration for both markets, with tokens under ``tmp_path``."""
    return {
        "KIS_US_APP_KEY": US_KEY,
        "KIS_US_APP_SECRET": US_SECRET,
        "KIS_KR_APP_KEY": KR_KEY,
        "KIS_KR_APP_SECRET": KR_SECRET,
        "KIS_TOKEN_DIR": str(tmp_path / "tokens"),
        "HOME": str(tmp_path / "home"),
    }


@pytest.fixture
def make_manager(env, clock, sleeps) -> Callable[..., object]:
    """Build a manager of the given class on the test's configuration and clock."""

    def build(cls=USTokenManager, environ: dict[str, str] | None = None, **kwargs):
        kwargs.setdefault("clock", clock)
        kwargs.setdefault("sleep", sleeps)
        kwargs.setdefault("jitter", 0.0)
        return cls(Settings(env if environ is None else environ, dotenv_path=False), **kwargs)

    return build


@pytest.fixture
def us(make_manager) -> USTokenManager:
    return make_manager(USTokenManager)


@pytest.fixture
def kr(make_manager) -> KRTokenManager:
    return make_manager(KRTokenManager)


def spawn(args: list[str], environ: dict[str, str]) -> subprocess.Popen:
    """``python -m ARGS...`` in the checkout, with pipes for stdout and stderr."""
    return subprocess.Popen([sys.executable, "-m", *args], env=environ, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_together(commands: list[list[str]], environ: dict[str, str]) -> list[tuple[int, str, str]]:
    """Start ``python -m COMMAND...`` for every command at once and :func:`finish` them."""
    return finish([spawn(command, environ) for command in commands])


def assert_a_refresh_reaches_a_running_process(seeder, watch_env: dict[str, str], refresh_env: dict[str, str],
                                               within: float = 10.0) -> None:
    """Seed a fresh token through ``seeder``, start a process serving it on ``watch_env``
    (``tests.mp_worker watch``), run ``python -m us.token_manager refresh`` on ``refresh_env``, and
    assert the running process serves the new token within ``within`` seconds."""
    now = time.time()
    seeder.save_token(TokenRecord(fake_token(1), "Bearer", now, now + 20 * 3600, "us", "real",
                                  seeder.key_fingerprint()))
    watcher = spawn(["tests.mp_worker", "watch", str(within + 20)], watch_env)
    try:
        assert watcher.stdout.readline().strip() == fake_token(1)
        refresh = subprocess.run([sys.executable, "-m", "us.token_manager", "refresh"], env=refresh_env,
                                 cwd=REPO, capture_output=True, text=True, timeout=60)
        assert refresh.returncode == 0, refresh.stderr
        new = seeder.load_token().access_token
        assert new != fake_token(1)
        deadline = time.monotonic() + within
        while watcher.stdout.readline().strip() != new:
            assert time.monotonic() < deadline, f"the running process did not serve it within {within} s"
    finally:
        watcher.kill()
        watcher.communicate()


@pytest.fixture
def sandbox_process() -> Iterator[SandboxProcess]:
    """A sandbox in a separate process (so that tests may fork without a server thread)."""
    with SandboxProcess() as server:
        yield server


#: What Windows lacks of the calls the token directory relies on (``os`` names; plus ``fcntl.flock``,
#: ``pwd`` and ``grp``): tests marked ``windows_shaped`` run with them taken away.
WINDOWS_MISSING_OS = ("geteuid", "getuid", "getegid", "getgid", "fchown", "fchmod", "chown", "mkfifo",
                      "O_NOFOLLOW", "O_NONBLOCK", "O_DIRECTORY", "pread", "pwrite")


class FakeMsvcrt:
    """Stands in for Windows' ``msvcrt`` (absent here): ``locking`` with Windows' answers (``EACCES``
    when another handle holds the bytes), on ``flock`` of the open file (per handle, as on Windows).

    Attributes:
        calls: ``(mode, position)`` of every ``locking`` call.
    """

    LK_UNLCK, LK_LOCK, LK_NBLCK = 0, 1, 2

    def __init__(self, flock) -> None:
        self._flock = flock
        self.calls: list[tuple[int, int]] = []

    def locking(self, fd: int, mode: int, nbytes: int) -> None:
        import errno
        import fcntl
        import os

        self.calls.append((mode, os.lseek(fd, 0, os.SEEK_CUR)))
        if mode == self.LK_UNLCK:
            self._flock(fd, fcntl.LOCK_UN)
            return
        try:
            self._flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OSError(errno.EACCES, "Permission denied") from None


@pytest.fixture(autouse=True)
def _windows_shaped_marker(request):
    """Tests marked ``windows_shaped`` get the :func:`windows_shaped` fixture."""
    if request.node.get_closest_marker("windows_shaped") is not None:
        request.getfixturevalue("windows_shaped")


@pytest.fixture
def windows_shaped(monkeypatch, tmp_path) -> FakeMsvcrt:
    """Run as on Windows: no user ids, ownership or modes on descriptors, no ``pwd``/``grp``, no
    no-follow or non-blocking opens, no FIFOs, no directory fsync, no ``flock`` (locks go through
    ``msvcrt.locking``, faked here). ``tmp_path`` is made first (pytest itself asks for the uid)."""
    import fcntl
    import os
    import types

    from common.store import fs

    msvcrt = FakeMsvcrt(fcntl.flock)
    module = types.ModuleType("msvcrt")
    module.LK_UNLCK, module.LK_LOCK, module.LK_NBLCK = msvcrt.LK_UNLCK, msvcrt.LK_LOCK, msvcrt.LK_NBLCK
    module.locking = msvcrt.locking
    monkeypatch.setitem(sys.modules, "msvcrt", module)
    for name in WINDOWS_MISSING_OS:
        monkeypatch.delattr(os, name, raising=False)
    monkeypatch.delattr(fcntl, "flock")
    monkeypatch.setitem(sys.modules, "pwd", None)  # `import pwd` raises ImportError
    monkeypatch.setitem(sys.modules, "grp", None)
    monkeypatch.setattr(fs, "NOFOLLOW", 0)
    monkeypatch.setattr(fs, "NONBLOCK", 0)
    monkeypatch.setattr(fs, "READ", os.O_RDONLY | fs.CLOEXEC)
    monkeypatch.setattr(fs, "LOCK", os.O_RDWR | os.O_CREAT | fs.CLOEXEC)
    return msvcrt
