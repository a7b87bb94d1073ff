"""End-to-end demo on the bundled sandbox: ``python -m kis_token.demo``.

No credentials and no network: it starts the local stand-in of the broker on 127.0.0.1, points both
markets at it with one demo app key (the common setup: one key serves both markets) and a temporary
token directory, runs the real CLI commands as a user would, printing what each one shows, and
makes authenticated calls from Python that survive the broker cutting the token short; two processes
then share the key's call budget, and one holds the key's WebSocket session while another is told
who has it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common.sandbox import Sandbox

DEMO_KEY, DEMO_SECRET = "DEMO-APP-KEY", "demo-secret"
DEMO_APPS = {DEMO_KEY: DEMO_SECRET}
QUOTE = "/uapi/overseas-price/v1/quotations/price"
REPO_ROOT = Path(__file__).resolve().parent.parent


def _environment(base_url: str, token_dir: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KIS_")}
    env.update(
        KIS_US_APP_KEY=DEMO_KEY,
        KIS_US_APP_SECRET=DEMO_SECRET,
        KIS_KR_APP_KEY=DEMO_KEY,
        KIS_KR_APP_SECRET=DEMO_SECRET,
        KIS_BASE_URL=base_url,
        KIS_TOKEN_DIR=token_dir,
        KIS_DOTENV_PATH=os.devnull,
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
    )
    return env


def _run(title: str, args: list[str], env: dict[str, str]) -> int:
    print(f"\n# {title}")
    shown = ["kis-token", *args[1:]] if args[0] == "kis_token.console" else ["python", "-m", *args]
    print("$ " + " ".join(shown))
    result = subprocess.run(
        [sys.executable, "-m", *args], env=env, capture_output=True, text=True, timeout=120
    )
    for line in result.stdout.splitlines():
        print(f"  {line}")
    for line in result.stderr.splitlines():
        print(f"  [stderr] {line}")
    print(f"  (exit {result.returncode})")
    return result.returncode


def main() -> int:
    """Play the whole token lifecycle for both markets against the sandbox; 0 if all went as expected."""
    expected: list[tuple[int, int]] = []
    with Sandbox(apps=DEMO_APPS) as sandbox, tempfile.TemporaryDirectory(prefix="kis-demo-") as tmp:
        token_dir = os.path.join(tmp, "tokens")
        env = _environment(sandbox.base_url, token_dir)
        other_host = {**env, "KIS_TOKEN_DIR": os.path.join(tmp, "other-host")}
        print(f"KIS token manager demo: broker sandbox at {sandbox.base_url}, token files in {token_dir}")
        steps = [
            ("No token yet: check says missing (exit 2, CRITICAL)", ["us.token_manager", "check"], env, 2),
            ("get issues a US token and prints it alone", ["us.token_manager", "get"], env, 0),
            ("KR uses the same app key: the same token, no request", ["kr.token_manager", "get"], env, 0),
            ("get again: served from the stored token, no request", ["us.token_manager", "get"], env, 0),
            ("check shows both markets (token masked)", ["us.token_manager", "check"], env, 0),
            ("", ["kr.token_manager", "check"], env, 0),
            ("kis-token status: both markets in one table, the shared token marked",
             ["kis_token.console", "status"], env, 0),
            ("The WebSocket approval key: issued once per app key, then served from its file",
             ["us.token_manager", "approval"], env, 0),
            ("A forced refresh within the minute is held back; the valid token is kept",
             ["us.token_manager", "refresh"], env, 1),
            ("Another host with the same key asks the broker: EGW00133 (one a minute)",
             ["us.token_manager", "refresh"], other_host, 1),
            ("The valid token keeps being served", ["us.token_manager", "get"], env, 0),
            ("Monitoring view", ["kr.token_manager", "check", "--json"], env, 0),
            ("delete removes each market's local files", ["us.token_manager", "delete"], env, 0),
            ("", ["kr.token_manager", "delete"], env, 0),
            ("After delete: missing again", ["us.token_manager", "check"], env, 2),
        ]
        tail = steps[-3:]
        for title, args, step_env, want in steps[:-3]:
            expected.append((_run(title or "(same for KR)", args, step_env), want))
        expected.append((_trading_code(sandbox, env), 0))
        expected.append((_shared_budget(sandbox, env), 0))
        expected.append((_session_lease(env), 0))
        for title, args, step_env, want in tail:
            expected.append((_run(title or "(same for KR)", args, step_env), want))
        counters = sandbox.counters()
        print("\n# What reached the broker (sandbox counters)")
        print(
            f"  {DEMO_KEY}: {counters['token_requests'].get(DEMO_KEY, 0)} token requests, "
            f"{counters['tokens_issued'].get(DEMO_KEY, 0)} tokens issued, "
            f"{counters['rate_limited'].get(DEMO_KEY, 0)} refused with EGW00133, "
            f"{counters['approvals']} approval key(s)"
        )
    surprises = [i for i, (got, want) in enumerate(expected) if got != want]
    print("\nDemo finished: every step behaved as expected." if not surprises else
          f"\nDemo finished with unexpected exit codes at steps {surprises}.")
    return 1 if surprises else 0


def _trading_code(sandbox: Sandbox, env: dict[str, str]) -> int:
    """Authenticated calls with ``requests`` that survive the broker cutting the token short."""
    import logging

    import requests

    from common.auth import KISAuth
    from common.settings import Settings
    from us.token_manager import USTokenManager

    print("\n# In trading code: requests with KISAuth, two minutes later (the demo moves both clocks)")
    print("$ session.auth = KISAuth(USTokenManager()); session.get(base_url + QUOTE, ...)")
    logging.basicConfig(stream=sys.stdout, level=logging.WARNING, format="  [log] %(message)s")
    sandbox.set_offset(120)
    manager = USTokenManager(Settings(env, dotenv_path=False), clock=lambda: time.time() + 120)
    session = requests.Session()
    session.auth, session.trust_env = KISAuth(manager), False
    url, params = sandbox.base_url + QUOTE, {"EXCD": "NAS", "SYMB": "AAPL"}
    first = session.get(url, params=params, timeout=10)
    print(f"  first call: rt_cd={first.json()['rt_cd']} ({first.json()['msg1']})")
    sandbox.expire_tokens()
    print("  the broker cuts the token short: calls with it now answer EGW00123")
    second = session.get(url, params=params, timeout=10)
    rejected = [answer.json()["msg_cd"] for answer in second.history]
    print(f"  next call: rt_cd={second.json()['rt_cd']} after {rejected} -> token renewed once, call resent")
    sandbox.set_offset(0)
    ok = first.json()["rt_cd"] == second.json()["rt_cd"] == "0" and rejected == ["EGW00123"]
    print(f"  ({'as expected' if ok else 'NOT as expected'})")
    return 0 if ok else 1


#: Each process makes this many quote calls through ``KISAuth`` as fast as it can.
BUDGET_CALLS = 27
_CALLER = f"""
import requests
from common.auth import KISAuth
from us.token_manager import USTokenManager
session = requests.Session()
session.auth, session.trust_env = KISAuth(USTokenManager()), False
params = {{"EXCD": "NAS", "SYMB": "AAPL"}}
codes = [session.get(BASE_URL + {QUOTE!r}, params=params, timeout=30).json()["rt_cd"]
         for _ in range({BUDGET_CALLS})]
print(f"{{codes.count('0')}} answered")
"""


def _shared_budget(sandbox: Sandbox, env: dict[str, str]) -> int:
    """Two processes calling as fast as they can share the key's 18 calls a second: no EGW00201."""
    print("\n# Two processes, one app key: they share the key's call budget (18 a second, real)")
    print(f"$ two bots at once, each: {BUDGET_CALLS} x session.get(quote) with KISAuth")
    before = sandbox.counters()
    code = _CALLER.replace("BASE_URL", repr(sandbox.base_url))
    started = time.monotonic()
    bots = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [bot.communicate(timeout=60) for bot in bots]
    took = time.monotonic() - started
    for number, (out, err) in enumerate(outputs, 1):
        print(f"  bot {number}: {out.strip() or err.strip()[-200:]}")
    after = sandbox.counters()
    calls = after["rest_calls"].get(DEMO_KEY, 0) - before["rest_calls"].get(DEMO_KEY, 0)
    refused = after["rest_egw00201"].get(DEMO_KEY, 0) - before["rest_egw00201"].get(DEMO_KEY, 0)
    print(f"  the broker served {calls} calls in {took:.1f} s (with the bots' start-up) and refused "
          f"{refused} with EGW00201 (calls per second exceeded)")
    ok = all(bot.returncode == 0 for bot in bots) and calls == 2 * BUDGET_CALLS and refused == 0
    print(f"  ({'as expected' if ok else 'NOT as expected'})")
    return 0 if ok else 1


_HOLDER = """
import sys, time
from us.token_manager import USTokenManager
with USTokenManager().websocket_session() as approval_key:
    print("holding the key's WebSocket session", flush=True)
    sys.stdin.readline()
"""
_SECOND = """
from common.errors import SessionHeldError
from kr.token_manager import KRTokenManager
try:
    with KRTokenManager().websocket_session():
        print("got it (NOT expected)")
except SessionHeldError as exc:
    print(f"refused at once: {exc}")
"""


def _session_lease(env: dict[str, str]) -> int:
    """One process holds the key's WebSocket session lease; another (the other market) is told who."""
    print("\n# The WebSocket session: one per app key (the broker answers a second with OPSP8996)")
    print("$ bot 1: with USTokenManager().websocket_session() as approval_key: ...   (kept open)")
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER], env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = holder.stdout.readline().strip() if holder.stdout else ""
        print(f"  bot 1: {first}")
        print("$ bot 2: with KRTokenManager().websocket_session(): ...   (same key)")
        second = subprocess.run([sys.executable, "-c", _SECOND], env=env, capture_output=True, text=True,
                                timeout=60)
        answer = (second.stdout.strip() or second.stderr.strip()[-300:])
        print(f"  bot 2: {answer}")
    finally:
        holder.communicate("\n", timeout=30)
    named = f"pid {holder.pid}" in answer
    ok = first.startswith("holding") and answer.startswith("refused at once") and named
    verdict = "as expected" if ok else "NOT as expected"
    print(f"  ({verdict}: bot 1 keeps its session; bot 2 knows whom to ask)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
