"""End-to-end demo on the bundled sandbox: ``python -m common.demo``.

No credentials and no network: it starts the local stand-in of the broker on 127.0.0.1, points both
markets at it with demo keys and a temporary token directory, and runs the real CLI commands as a
user would, printing what each one shows.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common.sandbox import Sandbox

DEMO_APPS = {"DEMO-US-APP-KEY": "demo-us-secret", "DEMO-KR-APP-KEY": "demo-kr-secret"}
REPO_ROOT = Path(__file__).resolve().parent.parent


def _environment(base_url: str, token_dir: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KIS_")}
    env.update(
        KIS_US_APP_KEY="DEMO-US-APP-KEY",
        KIS_US_APP_SECRET="demo-us-secret",
        KIS_KR_APP_KEY="DEMO-KR-APP-KEY",
        KIS_KR_APP_SECRET="demo-kr-secret",
        KIS_BASE_URL=base_url,
        KIS_TOKEN_DIR=token_dir,
        KIS_DOTENV_PATH=os.devnull,
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
    )
    return env


def _run(title: str, args: list[str], env: dict[str, str]) -> int:
    print(f"\n# {title}")
    shown = ["kis-token", *args[1:]] if args[0] == "common.console" else ["python", "-m", *args]
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
            ("get issues the KR token, with the KR app key", ["kr.token_manager", "get"], env, 0),
            ("get again: served from the stored token, no request", ["us.token_manager", "get"], env, 0),
            ("check shows both markets (token masked)", ["us.token_manager", "check"], env, 0),
            ("", ["kr.token_manager", "check"], env, 0),
            ("kis-token status: both markets in one table (exit: the worse check code)",
             ["common.console", "status"], env, 0),
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
        for title, args, step_env, want in steps:
            expected.append((_run(title or "(same for KR)", args, step_env), want))
        counters = sandbox.counters()
        print("\n# What reached the broker (sandbox counters)")
        for key in DEMO_APPS:
            print(
                f"  {key}: {counters['token_requests'].get(key, 0)} token requests, "
                f"{counters['tokens_issued'].get(key, 0)} tokens issued, "
                f"{counters['rate_limited'].get(key, 0)} refused with EGW00133"
            )
    surprises = [i for i, (got, want) in enumerate(expected) if got != want]
    print("\nDemo finished: every step behaved as expected." if not surprises else
          f"\nDemo finished with unexpected exit codes at steps {surprises}.")
    return 1 if surprises else 0


if __name__ == "__main__":
    raise SystemExit(main())
