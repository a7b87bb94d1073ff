"""``check`` stays light (SPEC §9): no third-party module on its path, with or without a token."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.credentials.records import TokenRecord
from common.settings import Settings
from tests.conftest import DAY, US_KEY, US_SECRET, fake_token
from us.token_manager import USTokenManager

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("requests", "urllib3", "tenacity", "prometheus_client", "mojito", "pandas", "dotenv",
         "redis")


def imported_by_check(environ: dict[str, str], market: str) -> tuple[int, set[str]]:
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", f"{market}.token_manager", "check"],
                          cwd=REPO, env=environ, capture_output=True, text=True, timeout=30)
    names = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines()
             if line.startswith("import time:") and line.count("|") == 2}
    assert "common.base_token_manager" in names  # the list is real
    return done.returncode, names


@pytest.mark.parametrize("market", ["us", "kr"])
@pytest.mark.parametrize("with_token", [False, True])
def test_check_imports_nothing_heavy(tmp_path, market, with_token):
    environ = {
        "PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path / "home"),
        "KIS_TOKEN_DIR": str(tmp_path / "tokens"), "KIS_DOTENV_PATH": os.devnull,
        # one key in both markets: the KR check reads the record the US market wrote
        "KIS_US_APP_KEY": US_KEY, "KIS_US_APP_SECRET": US_SECRET,
        "KIS_KR_APP_KEY": US_KEY, "KIS_KR_APP_SECRET": US_SECRET,
    }
    if with_token:
        us = USTokenManager(Settings(environ, dotenv_path=False))
        now = us.now()
        record = TokenRecord(fake_token(1), "Bearer", now, now + DAY, "us", "real", us.key_fingerprint())
        us.save_token(record)
    if with_token and market == "kr":
        # The KR story files are behind the key's record (the US market renewed it): the first KR
        # process brings them up to date, under the key's lock (fcntl.flock, no third-party module).
        code, names = imported_by_check(environ, market)
        assert code == 0
        assert {name for name in names if name.split(".")[0] in HEAVY} == set()
        assert Path(environ["KIS_TOKEN_DIR"], "kr_api_token.json").exists()
    code, names = imported_by_check(environ, market)
    assert code == (0 if with_token else 2)
    assert {name for name in names if name.split(".")[0] in HEAVY} == set()
    assert "asyncio" not in names  # ~50 ms: only code that awaits pays for it
