"""End-to-end demo on the bundled sandbox: ``python -m kis_token.demo``.

No credentials and no network: it starts the local stand-in of the broker on 127.0.0.1, points both
markets at it with one demo app key (the common setup: one key serves both markets) and a temporary
token directory, runs the real CLI commands as a user would, printing what each one shows, and
makes authenticated calls from Python that survive the broker cutting the token short.
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


if __name__ == "__main__":
    raise SystemExit(main())
