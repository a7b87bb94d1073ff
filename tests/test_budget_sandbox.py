"""The call budget applied by ``KISAuth``, judged by the broker (issue 19): processes call the sandbox
(in a process of its own, keeping 18 calls a second per key, 1 for a paper key) as fast as they can
through ``KISAuth`` for a few seconds; the sandbox's counters must show no ``EGW00201`` and at least
0.9 of the rate served. Real processes and short real waits, bounded: every worker is killed if it
has not finished in time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.sandbox.process import SandboxProcess, finish
from common.sandbox.redis_server import RedisServer
from common.settings import Settings
from tests.conftest import US_KEY, US_SECRET
from us.token_manager import USTokenManager

#: Several processes on real clocks for seconds each: run by `-m slow` (and .ci/run), not a plain run.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
WORKER = str(REPO / "bench" / "auth_worker.py")
#: Time for the workers' interpreters to start (and get the token) before they all begin at once.
START_DELAY = 4.0


def environ(tmp_path: Path, sandbox: SandboxProcess, tokens: Path, **extra: str) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO), "HOME": str(tmp_path),
            "KIS_DOTENV_PATH": os.devnull, "KIS_US_APP_KEY": US_KEY, "KIS_US_APP_SECRET": US_SECRET,
            "KIS_BASE_URL": sandbox.base_url, "KIS_TOKEN_DIR": str(tokens), **extra}


def call_together(environs: list[dict[str, str]], duration: float) -> dict[str, int]:
    """One worker per environment, all calling for ``duration`` s from the same moment; their answers
    by code, summed, and (``in_window``) how many came within ``duration``. The key's token is got
    first (one request: the others read it)."""
    USTokenManager(Settings(environs[0], dotenv_path=False)).get_valid_token()
    start = time.time() + START_DELAY
    workers = [subprocess.Popen([sys.executable, WORKER, f"{start:.6f}", str(duration)], env=env, cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for env in environs]
    codes: dict[str, int] = {"in_window": 0}
    for code, out, err in finish(workers, timeout=START_DELAY + duration + 30):
        assert code == 0, err[-2000:]
        result = json.loads(out)
        codes["in_window"] += result["in_window"]
        for answer, count in result["codes"].items():
            codes[answer] = codes.get(answer, 0) + count
    return codes


def assert_paced(sandbox: SandboxProcess, codes: dict[str, int], rate: float, duration: float) -> None:
    counters = sandbox.counters()
    served = counters["rest_calls"].get(US_KEY, 0)
    assert counters["rest_egw00201"].get(US_KEY, 0) == 0, "the broker refused calls beyond the rate"
    in_window = codes.pop("in_window")
    assert codes == {"0": served}  # every answer the workers got was a success, and the broker's count
    assert in_window >= 0.9 * rate * duration, f"only {in_window} calls in {duration} s at {rate}/s"


@pytest.fixture
def sandbox():
    with SandboxProcess("--no-websocket", "--key-rate", "PSpaper" + "p" * 29 + ":1") as server:
        yield server


def test_eight_processes_through_kisauth_get_no_egw00201(tmp_path, sandbox):
    env = environ(tmp_path, sandbox, tmp_path / "tokens")
    codes = call_together([env] * 8, 3.0)
    assert_paced(sandbox, codes, 18, 3.0)


def test_two_hosts_sharing_valkey_get_no_egw00201(tmp_path, sandbox):
    server = RedisServer(tmp_path / "redis").start()
    try:
        hosts = [environ(tmp_path, sandbox, tmp_path / host, KIS_TOKEN_STORE=server.url)
                 for host in ("host-a", "host-b")]
        codes = call_together(hosts * 4, 3.0)
    finally:
        server.stop()
    assert_paced(sandbox, codes, 18, 3.0)
    for host in ("host-a", "host-b"):  # paced on the server: the hosts' budget files were never needed
        assert not list((tmp_path / host).glob("*.budget"))


def test_a_paper_key_through_kisauth_is_paced_at_one_a_second(tmp_path, sandbox):
    paper_key = "PSpaper" + "p" * 29
    env = environ(tmp_path, sandbox, tmp_path / "tokens", KIS_ENV="paper", KIS_US_APP_KEY=paper_key)
    codes = call_together([env] * 4, 3.5)
    counters = sandbox.counters()
    served = counters["rest_calls"].get(paper_key, 0)
    assert counters["rest_egw00201"].get(paper_key, 0) == 0
    assert codes.pop("in_window") >= 3  # one a second (paced at 1/1.03 s): 0, 1.03, 2.06, 3.09
    assert codes == {"0": served}
