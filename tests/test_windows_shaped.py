"""The package on Windows, as far as Linux can show it: every test here runs with the POSIX calls
Windows lacks taken away (``windows_shaped`` in ``tests/conftest.py``): user ids, ``fchown``,
``fchmod``, ``pwd``, ``O_NOFOLLOW``, ``O_NONBLOCK``, ``mkfifo``, directory fsync and ``flock`` (the
lock then goes through ``msvcrt.locking``, faked on ``flock`` of the open file)."""

from __future__ import annotations

import json
import logging
import os
import threading

import pytest
import responses

from common.store import fs
from tests.conftest import DAY, TOKEN_URL, fake_token, token_answer, token_calls

pytestmark = pytest.mark.windows_shaped


def test_the_posix_calls_are_really_gone():
    import fcntl

    assert not hasattr(os, "geteuid") and not hasattr(os, "fchmod") and not hasattr(os, "O_NOFOLLOW")
    assert not hasattr(fcntl, "flock")
    with pytest.raises(ImportError):
        import pwd  # noqa: F401
    assert fs.effective_uid() is None and not fs.is_root() and not fs.has_permission_bits()
    assert fs.owner_name(1000) == "uid 1000"


def test_the_file_store_keeps_a_token_and_locks_through_msvcrt(us, clock, windows_shaped):
    with responses.RequestsMock() as mock:
        mock.post(TOKEN_URL, json=token_answer(fake_token(1), clock() + DAY))
        assert us.get_valid_token() == fake_token(1)
        fresh = type(us)(us.settings, clock=clock, jitter=0.0)  # another process
        assert fresh.get_valid_token() == fake_token(1)
        assert len(token_calls(mock)) == 1
    assert json.loads(us.store.record.path.read_text())["access_token"] == fake_token(1)
    assert us.mirror.record_path.exists() and us.mirror.mojito_path.exists()
    modes = [mode for mode, _ in windows_shaped.calls]
    assert windows_shaped.LK_NBLCK in modes and windows_shaped.LK_UNLCK in modes
    assert all(position == fs.LOCK_BYTE for _, position in windows_shaped.calls)  # one byte, past the data
    removed = us.delete_token()
    assert str(us.store.record.path) in removed and not us.mirror.record_path.exists()
    assert us.load_token() is None


def test_a_lock_held_by_one_handle_is_refused_to_another(tmp_path):
    path = tmp_path / "key.lock"
    first, _ = fs.open_regular(path, fs.LOCK)
    second, _ = fs.open_regular(path, fs.LOCK)
    try:
        assert fs.try_lock(first) is True
        assert fs.try_lock(second) is False
        fs.unlock(first)
        assert fs.try_lock(second) is True
    finally:
        os.close(first)
        os.close(second)


def test_a_symbolic_link_is_still_refused_without_o_nofollow(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("{}")
    link = tmp_path / "key.json"
    link.symlink_to(target)
    with pytest.raises(fs.NotRegularFileError, match="a symbolic link"):
        fs.open_regular(link)


def test_a_directory_without_posix_modes_is_not_warned_about(tmp_path, caplog):
    from common.store import file_store

    directory = tmp_path / "open-dir"
    directory.mkdir()
    directory.chmod(0o777)  # what Windows reports for every directory
    with caplog.at_level(logging.WARNING):
        file_store.prepare_directory(directory)
    assert "can be written by" not in caplog.text
    file_store.write_file(directory / "x.json", "{}")
    assert (directory / "x.json").read_text() == "{}"


def test_the_cli_in_process(us, clock, capsys):
    from common.cli.market import main

    with responses.RequestsMock() as mock:
        mock.post(TOKEN_URL, json=token_answer(fake_token(2), clock() + DAY))
        assert main(lambda: us, ["get"], market="US") == 0
        assert capsys.readouterr().out.strip() == fake_token(2)
        assert main(lambda: us, ["check", "--json"], market="US") == 0
        info = json.loads(capsys.readouterr().out)
        assert info["status"] == "ok" and info["problem"] is None
        assert main(lambda: us, ["metrics"], market="US") == 0
        assert "kis_token_seconds_left" in capsys.readouterr().out
        assert main(lambda: us, ["delete"], market="US") == 0
        assert "token files removed" in capsys.readouterr().out
        assert main(lambda: us, ["check"], market="US") == 2
        assert len(token_calls(mock)) == 1


def test_the_kis_token_status_in_process(env, clock, monkeypatch, tmp_path, capsys):
    from kis_token.console import main

    monkeypatch.chdir(tmp_path)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["status", "--json"]) == 2  # no token yet: CRITICAL, read without a uid or pwd
    report = json.loads(capsys.readouterr().out)
    assert {info["status"] for info in report["markets"].values()} == {"missing"}


def test_threads_of_separate_managers_share_one_request(make_manager, clock):
    from us.token_manager import USTokenManager

    managers = [make_manager(USTokenManager) for _ in range(6)]
    start = threading.Barrier(len(managers))
    results: list[str] = []
    errors: list[BaseException] = []

    def work(manager):
        try:
            start.wait(timeout=10)
            results.append(manager.get_valid_token())
        except BaseException as exc:
            errors.append(exc)

    def slow_answer(request):
        threading.Event().wait(0.2)  # the others queue on the lock meanwhile
        return 200, {}, json.dumps(token_answer(fake_token(3), clock() + DAY))

    with responses.RequestsMock() as mock:
        mock.add_callback(responses.POST, TOKEN_URL, callback=slow_answer)
        threads = [threading.Thread(target=work, args=(m,)) for m in managers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert not errors
        assert results == [fake_token(3)] * len(managers)
        assert len(token_calls(mock)) == 1


def test_the_call_budget_paces_and_counts_without_pread_or_flock(tmp_path):
    from common.budget import open_budget
    from common.settings import Settings

    assert not hasattr(os, "pread") and not hasattr(os, "pwrite")
    waits: list[float] = []
    settings = Settings({"KIS_RATE_LIMIT": "2"}, dotenv_path=False)
    budget = open_budget(settings, tmp_path, "real-0123456789abcdef", sleep=waits.append)
    for _ in range(4):
        budget.acquire()
    snapshot = budget.snapshot()
    assert snapshot.calls_last_minute == 4 and snapshot.rate == 2
    assert len([wait for wait in waits if wait > 0]) >= 2  # 4 calls at 2 a second: the later ones waited


def test_the_session_lease_names_its_holder_without_pread_or_flock(tmp_path):
    from common.errors import SessionHeldError
    from common.session import open_session
    from common.settings import Settings

    settings = Settings({}, dotenv_path=False)
    first = open_session(settings, tmp_path, "real-0123456789abcdef", "us")
    with first.hold(0.0, lambda: "approval-key") as key:
        assert key == "approval-key"
        second = open_session(settings, tmp_path, "real-0123456789abcdef", "kr")
        with pytest.raises(SessionHeldError, match=f"pid {os.getpid()}"), second.hold(0.0, lambda: "x"):
            pass
    paced: list[float] = []  # the next start waits out the 5 s pacing (recorded, not slept)
    third = open_session(settings, tmp_path, "real-0123456789abcdef", "kr", sleep=paced.append)
    with third.hold(0.0, lambda: "y") as again:
        assert again == "y"
    assert paced and 0 < sum(paced) <= 5
