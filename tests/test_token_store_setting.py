"""``KIS_TOKEN_STORE`` (SPEC §3, §10): file or a Redis URL; a bad value is a configuration error
naming the variable (exit 3, no traceback, no request), and a password never shows."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import responses

from common.cli.market import main
from common.errors import ConfigError
from common.settings import Settings, mask_url, token_store_url
from common.store.file_store import FileRecordStore
from tests.conftest import US_KEY, US_SECRET
from us.token_manager import USTokenManager

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "s3cr3t-store-pw"


def store_url(value: str | None) -> str | None:
    return token_store_url(Settings({} if value is None else {"KIS_TOKEN_STORE": value}, dotenv_path=False))


@pytest.mark.parametrize("value", [None, "", "file", "FILE", " file "])
def test_unset_or_file_is_the_token_directory(value, make_manager, env):
    assert store_url(value) is None
    manager = make_manager(USTokenManager, {**env, **({} if value is None else {"KIS_TOKEN_STORE": value})})
    assert isinstance(manager.store.record, FileRecordStore)
    assert manager.get_token_info()["store"] == {
        "kind": "file", "url": None, "reachable": True, "misconfigured": False, "error": None, "prefix": None,
    }


@pytest.mark.parametrize("value", [
    "redis://127.0.0.1:6379/0", "redis://:pw@127.0.0.1", "redis://alice:pw@cache.internal:6380/2",
    "rediss://cache.example:6380/0", "unix:///run/redis/redis.sock", "unix:///run/redis.sock?db=1",
    "redis://[::1]:6379",
])
def test_redis_urls_are_accepted(value):
    assert store_url(value) == value


@pytest.mark.parametrize("value", [
    f"mysql://u:{PASSWORD}@127.0.0.1/0", "127.0.0.1:6379", f"redis://:{PASSWORD}@127.0.0.1:port/0",
    "redis://", "redis:///0", f"redis://:{PASSWORD}@127.0.0.1/db", "unix://", "redis://host:99999",
    "redis://host /0", "files",
])
def test_bad_values_are_a_config_error_naming_the_variable_without_the_password(value):
    with pytest.raises(ConfigError, match="KIS_TOKEN_STORE") as caught:
        store_url(value)
    assert PASSWORD not in str(caught.value)


@pytest.mark.parametrize(("url", "masked"), [
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    (f"redis://:{PASSWORD}@h:6379/0", "redis://:***@h:6379/0"),
    (f"redis://alice:{PASSWORD}@h/1", "redis://alice:***@h/1"),
    (f"redis://{PASSWORD}@h", "redis://***@h"),
    (f"rediss://u:{PASSWORD}@h@h2:1/0", "rediss://u:***@h2:1/0"),
    (f"unix://u:{PASSWORD}@/run/r.sock", "unix://u:***@/run/r.sock"),
    (f"unix:///run/r.sock?db=1&password={PASSWORD}", "unix:///run/r.sock?db=1&password=***"),
])
def test_mask_url_hides_the_password(url, masked):
    assert mask_url(url) == masked


@pytest.mark.parametrize("command", [["check"], ["check", "--json"], ["get"], ["refresh"]])
def test_bad_store_exits_3_with_one_line_and_no_request(make_manager, env, capsys, command):
    manager = make_manager(USTokenManager, {**env, "KIS_TOKEN_STORE": f"memcached://:{PASSWORD}@127.0.0.1"})
    with responses.RequestsMock() as mock:  # any request would fail the test: none is registered
        assert main(lambda: manager, command, market="US") == 3
        assert len(mock.calls) == 0
    out, err = capsys.readouterr()
    assert "KIS_TOKEN_STORE" in err and err.count("\n") == 1 and "Traceback" not in err
    assert PASSWORD not in out + err


def test_bad_store_from_the_command_line_exits_3(tmp_path):
    environ = {
        "PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "KIS_DOTENV_PATH": os.devnull,
        "KIS_TOKEN_DIR": str(tmp_path / "tokens"), "KIS_US_APP_KEY": US_KEY, "KIS_US_APP_SECRET": US_SECRET,
        "KIS_BASE_URL": "http://127.0.0.1:9", "KIS_TOKEN_STORE": f"redis://:{PASSWORD}@127.0.0.1:no/0",
    }
    done = subprocess.run([sys.executable, "-m", "us.token_manager", "check"], cwd=REPO, env=environ,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 3
    assert "KIS_TOKEN_STORE" in done.stderr and "Traceback" not in done.stderr
    assert PASSWORD not in done.stdout + done.stderr
    assert not (tmp_path / "tokens").exists()  # nothing was written either
