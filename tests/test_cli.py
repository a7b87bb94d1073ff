"""SPEC §5 and AC4: every command's stdout, stderr and exit code, in-process and as `python -m`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import responses

from common.cli.market import main
from common.credentials.records import TokenRecord
from common.renewal import policy
from kr.token_manager import KRTokenManager
from tests.conftest import DAY, TOKEN_URL, US_KEY, US_SECRET, FakeClock, fake_token, refusal, token_answer
from us.token_manager import USTokenManager

REPO = Path(__file__).resolve().parent.parent


def run(manager, *argv, market="US"):
    return main(lambda: manager, list(argv), market=market)


def seed(manager, clock, token=None, left=DAY):
    record = TokenRecord(token or fake_token(1), "Bearer", clock() - (DAY - left), clock() + left,
                         manager.market, manager.environment, manager.key_fingerprint())
    manager.save_token(record)
    return record


# -- in process ----------------------------------------------------------------------------------


def test_check_shows_status_with_masked_token_and_paths(us, clock, capsys):
    seed(us, clock)
    assert run(us, "check") == 0
    out, err = capsys.readouterr()
    assert out.startswith("US token (real): valid\n")
    assert "eyJ0...dXJl" in out and fake_token(1) not in out
    assert str(us.store.record.path) in out and "us_krs_token.dat" in out
    assert "in 24h 00m" in out
    assert err == ""


@pytest.mark.parametrize(
    "left, status, code",
    [
        (DAY, "ok", 0),
        (policy.ADVISORY_WINDOW - 1, "renewal_due", 1),
        (60, "expired", 2),
        (None, "missing", 2),
    ],
)
def test_check_exit_codes(us, clock, capsys, left, status, code):
    if left is not None:
        seed(us, clock, left=left)
    assert run(us, "check", "--json") == code
    info = json.loads(capsys.readouterr().out)
    assert info["status"] == status
    assert info["valid"] is (code < 2)


def test_check_json_is_one_object_on_one_line(us, clock, capsys):
    seed(us, clock)
    run(us, "check", "--json")
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    info = json.loads(out)
    assert info["market"] == "us" and info["present"] is True
    assert info["token"] == "eyJ0...dXJl"
    assert fake_token(1) not in out


@responses.activate
def test_get_prints_only_the_token(us, clock, capsys):
    responses.post(TOKEN_URL, json=token_answer(fake_token(2), clock() + DAY))
    assert run(us, "get") == 0
    out, err = capsys.readouterr()
    assert out == fake_token(2) + "\n"
    assert err == ""


@responses.activate
def test_get_failure_is_one_line_on_stderr(us, capsys):
    responses.post(TOKEN_URL, status=403, json=refusal("EGW00105", "유효하지 않은 AppSecret입니다."))
    assert run(us, "get") == 3  # a refused secret is a configuration error
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and "EGW00105" in err and err.startswith("python -m us.token_manager: error:")


@responses.activate
def test_refresh_forces_renewal_and_masks_the_token(us, clock, capsys):
    seed(us, clock, left=20 * 3600)
    responses.post(TOKEN_URL, json=token_answer(fake_token(3), clock() + DAY))
    assert run(us, "refresh") == 0
    out = capsys.readouterr().out
    assert out.startswith("US token renewed: eyJ0...dXJl, expires")
    assert fake_token(3) not in out
    assert us.load_token().access_token == fake_token(3)


@responses.activate
def test_refresh_answered_with_the_same_token_is_success(us, clock, capsys):
    record = seed(us, clock, left=22 * 3600)
    responses.post(TOKEN_URL, json=token_answer(fake_token(1), record.expires_at))
    assert run(us, "refresh") == 0
    out = capsys.readouterr().out
    assert "not renewed: the broker re-sent the same token" in out and "still valid until" in out


@responses.activate
def test_refused_refresh_exits_non_zero_and_keeps_the_token(us, clock, capsys):
    seed(us, clock, left=20 * 3600)
    before = us.store.record.path.read_bytes()
    responses.post(TOKEN_URL, status=403, json=refusal("EGW00133"))
    assert run(us, "refresh") == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "EGW00133" in err and "the current token is kept (valid for 20h 00m more)" in err
    assert us.store.record.path.read_bytes() == before


def test_kr_refresh_renews_the_kr_token(kr, us, clock, capsys):
    seed(us, clock, token=fake_token(1))
    seed(kr, clock, token=fake_token(2), left=20 * 3600)
    with responses.RequestsMock() as mock:
        mock.post(TOKEN_URL, json=token_answer(fake_token(4), clock() + DAY))
        assert run(kr, "refresh", market="KR") == 0
        assert b"PSkr" in mock.calls[0].request.body
    assert kr.load_token().access_token == fake_token(4)
    assert us.load_token().access_token == fake_token(1)
    assert capsys.readouterr().out.startswith("KR token renewed")


def test_delete_removes_the_files(us, clock, capsys):
    seed(us, clock)
    assert run(us, "delete") == 0
    assert capsys.readouterr().out.startswith("US token files removed: ")
    assert not us.store.record.path.exists()
    assert run(us, "delete") == 0
    assert capsys.readouterr().out == "no US token files to remove\n"


def test_missing_configuration_is_exit_3_with_one_line(make_manager, tmp_path, capsys):
    manager = make_manager(environ={"KIS_TOKEN_DIR": str(tmp_path)})
    assert run(manager, "get") == 3
    err = capsys.readouterr().err
    assert err == "python -m us.token_manager: error: configuration: KIS_US_APP_KEY is not set " \
                  "(put it in the environment or in .env)\n"


def test_unexpected_errors_are_one_line(us, capsys, monkeypatch):
    monkeypatch.setattr(us, "get_token_info", lambda: 1 / 0)
    assert run(us, "check") == 3  # Nagios UNKNOWN
    assert capsys.readouterr().err == "python -m us.token_manager: error: internal error: " \
                                      "ZeroDivisionError: division by zero\n"


def test_usage_errors_exit_2(us, capsys):
    with pytest.raises(SystemExit) as caught:
        run(us, "frobnicate")
    assert caught.value.code == 2


# -- as python -m, in a real process -------------------------------------------------------------


def cli(module: str, *args: str, env: dict[str, str], cwd: Path | None = None):
    full_env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO), **env}
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, env=full_env,
        cwd=cwd or REPO, timeout=60,
    )


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def cli_env(env, tmp_path):
    unreachable = f"http://127.0.0.1:{closed_port()}"
    return {**env, "KIS_BASE_URL": unreachable, "KIS_DOTENV_PATH": os.devnull}


def test_python_m_check_and_delete_for_both_markets(cli_env, make_manager, clock):
    us = make_manager(USTokenManager, environ=cli_env, clock=None)
    kr = make_manager(KRTokenManager, environ=cli_env, clock=None)
    seed(us, FakeClock(time.time()), token=fake_token(1))
    result = cli("us.token_manager", "check", env=cli_env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("US token (real): valid")
    result = cli("kr.token_manager", "check", env=cli_env)
    assert result.returncode == 2 and result.stdout.startswith("KR token (real): missing")
    result = cli("us.token_manager", "get", env=cli_env)
    assert (result.returncode, result.stdout) == (0, fake_token(1) + "\n")
    result = cli("us.token_manager", "delete", env=cli_env)
    assert result.returncode == 0 and "us_api_token.json" in result.stdout
    assert not us.store.record.path.exists() and not kr.store.record.path.exists()


@pytest.mark.slow  # the full retry schedule against a closed port (about 4 s)
def test_python_m_unreachable_broker_is_one_line_no_traceback(cli_env):
    result = cli("kr.token_manager", "-q", "get", env=cli_env)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "unreachable" in result.stderr
    assert "Traceback" not in result.stderr


def test_python_m_missing_credentials_and_bad_setting(tmp_path):
    base = {"KIS_TOKEN_DIR": str(tmp_path), "HOME": str(tmp_path)}
    result = cli("us.token_manager", "get", env=base, cwd=tmp_path)
    assert result.returncode == 3 and "KIS_US_APP_KEY is not set" in result.stderr
    assert result.stderr.count("\n") == 1
    result = cli("us.token_manager", "check", env={**base, "KIS_US_APP_KEY": US_KEY,
                                                    "KIS_US_APP_SECRET": US_SECRET, "KIS_ENV": "prod"})
    assert result.returncode == 2 and "US token (real): missing" in result.stdout  # prod = real
    result = cli("us.token_manager", "check", env={**base, "KIS_US_APP_KEY": US_KEY,
                                                    "KIS_US_APP_SECRET": US_SECRET, "KIS_ENV": "live"})
    assert result.returncode == 3 and "KIS_ENV must be 'real' or 'paper'" in result.stderr


def test_python_m_corrupt_file_is_a_warning_then_missing(cli_env, tmp_path):
    token_dir = Path(cli_env["KIS_TOKEN_DIR"])
    token_dir.mkdir(mode=0o700, parents=True)
    (token_dir / "us_api_token.json").write_text('{"truncated": ')
    result = cli("us.token_manager", "check", env=cli_env)
    assert result.returncode == 2 and "missing" in result.stdout
    assert "WARNING ignoring the stored us token: not valid JSON" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow  # two runs of the full retry schedule against a closed port (about 9 s)
def test_python_m_logs_go_to_stderr_and_verbose_shows_retries(cli_env):
    verbose = cli("kr.token_manager", "-v", "get", env=cli_env)
    assert verbose.stdout == ""
    assert "WARNING token endpoint attempt 1 failed (broker unreachable at http://127.0.0.1:" in (
        verbose.stderr
    )
    again = cli("kr.token_manager", "get", env=cli_env)  # nothing reached the broker: no minute spent
    assert "connection refused" in again.stderr and "not asking the broker" not in again.stderr


def test_demo_plays_the_whole_lifecycle_against_the_sandbox():
    result = subprocess.run([sys.executable, "-m", "kis_token.demo"], capture_output=True, text=True,
                            cwd=REPO, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "broker refused: EGW00133" in result.stdout
    assert "Demo finished: every step behaved as expected." in result.stdout
