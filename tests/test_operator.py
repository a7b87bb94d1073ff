"""The operator's path (issue 17): what the files and help texts promise matches what runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from common.sandbox.server import DEFAULT_PORT, FAULT_MODES

REPO = Path(__file__).resolve().parent.parent


def test_env_example_points_at_the_port_the_sandbox_listens_on_unless_told():
    example = (REPO / ".env.example").read_text()
    [url] = re.findall(r"^# KIS_BASE_URL=(\S+)$", example, flags=re.MULTILINE)
    assert url == f"http://127.0.0.1:{DEFAULT_PORT}"


def test_sandbox_help_lists_every_fault_knob():
    result = subprocess.run([sys.executable, "-m", "common.sandbox", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert f"default {DEFAULT_PORT}" in text
    for mode in FAULT_MODES:
        assert mode in text


def test_a_corrupt_key_record_is_warned_once_naming_it_and_its_intact_mirror_is_served(us, clock, caplog):
    import logging

    import responses

    from common.credentials.records import TokenRecord
    from tests.conftest import DAY, fake_token

    record = TokenRecord(fake_token(1), "Bearer", clock(), clock() + DAY, "us", us.environment,
                         us.key_fingerprint())
    us.save_token(record)
    assert us.mirror.record_path.exists()
    us.store.record.path.write_text('{"truncated": "')
    fresh = type(us)(us.settings, clock=clock, jitter=0.0)  # a new process
    with caplog.at_level(logging.WARNING), responses.RequestsMock():  # no request may be sent
        assert fresh.get_valid_token() == fake_token(1)
    warnings = [r.getMessage() for r in caplog.records if "ignoring the stored" in r.getMessage()]
    assert len(warnings) == 1
    assert str(us.store.record.path) in warnings[0] and "at at" not in warnings[0]


def test_an_error_that_is_not_about_the_token_directory_carries_no_hint_about_it(us, capsys):
    from common.cli.market import main

    code = main(lambda: us, ["metrics", "--textfile", "/nonexistent/dir/x.prom"], market="US")
    err = capsys.readouterr().err
    assert code == 1 and "/nonexistent/dir/x.prom" in err
    assert "KIS_TOKEN_DIR" not in err


def test_a_directory_that_belongs_to_root_says_so_once_and_exits_3(tmp_path, monkeypatch, capsys):
    import os

    import pytest

    from common.cli.market import describe_error
    from common.store import file_store

    if os.geteuid() != 0:
        pytest.skip("needs root to make a root-owned directory for another user")
    directory = tmp_path / "root-owned"
    directory.mkdir(mode=0o755)
    monkeypatch.setattr(file_store.fs, "effective_uid", lambda: 65534)
    with pytest.raises(Exception) as raised:
        file_store.prepare_directory(directory)
    message, code = describe_error(raised.value)
    assert code == 3 and "run this command as root," in message and "(or as root)" not in message


def test_a_missing_dependency_says_which_python_to_use(us, monkeypatch):
    from common.cli.market import describe_error

    def issue_without_requests(current):
        raise ModuleNotFoundError("No module named 'requests'", name="requests")

    engine = us._wired()[0]
    monkeypatch.setattr(engine, "_issue", issue_without_requests)
    with pytest.raises(ModuleNotFoundError) as raised:  # not taken for a garbled answer
        us.get_valid_token()
    message, code = describe_error(raised.value)
    assert code == 3 and "no module named 'requests'" in message and ".venv/bin/python" in message
    state = us.load_renewal_state()
    assert state.last_outcome is None and state.last_request_at is None  # nothing was sent: no minute spent


def test_a_bots_own_common_package_is_one_clear_line(tmp_path):
    bot = tmp_path / "bot"
    (bot / "common").mkdir(parents=True)
    (bot / "common" / "__init__.py").write_text("")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{bot}:{REPO}"}
    result = subprocess.run([sys.executable, "-m", "kr.token_manager", "check"], cwd=bot, env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 3
    assert result.stderr.count("\n") == 1 and "another package named 'common'" in result.stderr
    assert str(bot / "common") in result.stderr
    script = subprocess.run([sys.executable, "-c", "import us.token_manager"], cwd=bot, env=env,
                            capture_output=True, text=True, timeout=30)
    assert "ImportError: kis-token-manager: another package named 'common'" in script.stderr


def test_help_texts_say_what_the_commands_do():
    from common.cli.market import _parser
    from kis_token.console import _parser as console_parser

    assert "approval" in console_parser().description
    text = _parser("KR").format_help() + " ".join(
        action.help or "" for group in _parser("KR")._subparsers._group_actions
        for action in group._choices_actions)
    text = " ".join(text.split())
    assert "for every market that uses the key" in text
    warmup = _parser("KR")._subparsers._group_actions[0].choices["warmup"].format_help()
    assert "a bare number is seconds" in " ".join(warmup.split())


def test_a_token_directory_this_user_cannot_use_keeps_the_held_token_in_service(us, clock, monkeypatch):
    from common.credentials.records import TokenRecord
    from common.store import files
    from tests.conftest import DAY, fake_token

    us.save_token(TokenRecord(fake_token(1), "Bearer", clock() - DAY + 50 * 60, clock() + 50 * 60, "us",
                              us.environment, us.key_fingerprint()))
    monkeypatch.setattr(files, "_foreign_owner", lambda directory, st: f"{directory} belongs to root")
    for _ in range(3):  # the advisory renewal cannot take the lock: the token keeps being served
        assert us.get_valid_token() == fake_token(1)


@pytest.mark.parametrize("succeeded", [True, False])
def test_a_lost_success_counts_against_the_daily_budget_a_lost_silence_does_not(us, monkeypatch, succeeded):
    from common.errors import AnswerLostError, KISTokenError

    engine = us._wired()[0]

    def lost(current):
        raise AnswerLostError("lost", succeeded=succeeded)

    monkeypatch.setattr(engine, "_issue", lost)
    with pytest.raises(KISTokenError):
        us.get_valid_token()
    assert len(us.load_renewal_state().issuances) == (1 if succeeded else 0)


def test_a_deleted_token_never_comes_back_from_the_other_markets_mirror(make_manager, env, clock):
    import responses

    from kr.token_manager import KRTokenManager
    from tests.conftest import DAY, TOKEN_URL, US_KEY, US_SECRET, fake_token, token_answer

    one_key = {**env, "KIS_KR_APP_KEY": US_KEY, "KIS_KR_APP_SECRET": US_SECRET}
    us, kr = make_manager(environ=one_key), make_manager(KRTokenManager, environ=one_key)
    with responses.RequestsMock() as mock:
        mock.post(TOKEN_URL, json=token_answer(fake_token(1), clock() + DAY))
        assert us.get_valid_token() == kr.get_valid_token() == fake_token(1)
    assert us.mirror.record_path.exists() and kr.mirror.record_path.exists()
    kr.delete_token()
    assert not us.mirror.record_path.exists()  # the us mirror of the deleted token went too
    us.store.record.path.write_text("garbage")  # and a later bad record brings nothing back
    assert make_manager(environ=one_key).load_token() is None


def test_a_bots_own_us_package_does_not_break_kr(tmp_path):
    bot = tmp_path / "bot"
    (bot / "us").mkdir(parents=True)
    (bot / "us" / "__init__.py").write_text("")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{bot}:{REPO}"}
    result = subprocess.run([sys.executable, "-c", "import kr.token_manager"], cwd=bot, env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
