"""SPEC §4 and §7: file layout, modes, atomic writes, and every kind of bad token file."""

from __future__ import annotations

import json
import logging
import os
import pwd
import stat
import time

import pytest
import responses

from common.credentials.records import TokenRecord
from common.errors import StoreError
from common.settings import Settings
from tests.conftest import DAY, TOKEN_URL, fake_token, token_answer
from us.token_manager import USTokenManager


def good_record(manager, clock, **changes) -> TokenRecord:
    fields = dict(
        access_token=fake_token(1), token_type="Bearer", issued_at=clock(), expires_at=clock() + DAY,
        market="us", environment="real", key_fingerprint=manager.key_fingerprint(),
    )
    fields.update(changes)
    return TokenRecord(**fields)


CORRUPT = {
    "empty": "",
    "blank": "   \n",
    "truncated": '{"version": 1, "market": "us", "access_tok',
    "not-json": "access_token=abc",
    "binary": "\x00\x01\x02garbage",
    "array": "[1, 2, 3]",
    "wrong-shape": json.dumps({"token": "abc"}),
    "wrong-types": json.dumps({
        "version": 1, "market": "us", "environment": "real", "key_fingerprint": "x",
        "token_type": "Bearer", "access_token": 42, "issued_at": "2026-01-01T00:00:00+09:00",
        "expires_at": "2026-01-02T00:00:00+09:00",
    }),
    "naive-time": json.dumps({
        "version": 1, "market": "us", "environment": "real", "key_fingerprint": "x",
        "token_type": "Bearer", "access_token": "abc", "issued_at": "2026-01-01T00:00:00",
        "expires_at": "2026-01-02T00:00:00",
    }),
    "future-version": json.dumps({"version": 99}),
}


@pytest.mark.parametrize("content", CORRUPT.values(), ids=CORRUPT.keys())
@responses.activate
def test_corrupt_token_file_is_treated_as_absent_and_replaced(us, clock, caplog, content):
    us.settings.token_dir.mkdir(mode=0o700, parents=True)
    us.store.record.path.write_text(content)
    responses.post(TOKEN_URL, json=token_answer(fake_token(5), clock() + DAY))
    with caplog.at_level(logging.WARNING):
        assert us.get_valid_token() == fake_token(5)
    assert "ignoring the stored us token" in caplog.text
    assert TokenRecord.from_json(us.store.record.path.read_text()).access_token == fake_token(5)


@responses.activate
def test_token_file_that_is_a_directory_is_treated_as_absent(us, clock, caplog):
    us.store.record.path.mkdir(parents=True)
    responses.post(TOKEN_URL, json=token_answer(fake_token(5), clock() + DAY))
    with caplog.at_level(logging.WARNING):
        assert us.load_token() is None
    assert f"key-{us.credential.key_id}.json is a directory, not a regular file" in caplog.text


@responses.activate
def test_unreadable_token_file_is_an_error_naming_file_and_owner_and_spends_no_request(
    us, make_manager, clock, caplog, monkeypatch
):
    us.save_token(good_record(us, clock))
    real_open = os.open

    def deny(path, *args, **kwargs):
        if str(path) == str(us.store.record.path):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", deny)
    owner = pwd.getpwuid(os.getuid()).pw_name
    fresh = make_manager()  # a new process: nothing in memory
    with pytest.raises(StoreError, match=f"cannot read .*key-.*json: permission denied .*belongs to {owner}"):
        fresh.get_valid_token()
    with pytest.raises(StoreError, match="permission denied"):
        fresh.load_token()
    assert len(responses.calls) == 0
    clock.advance(3600)  # a running process that holds the token keeps serving it
    assert us.get_valid_token() == fake_token(1)
    assert len(responses.calls) == 0


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"environment": "paper"}, "issued for environment 'paper'"),
        ({"key_fingerprint": "sha256:0000000000000000"}, "another app key"),
    ],
)
@responses.activate
def test_record_of_another_market_environment_or_key_is_not_used(us, clock, caplog, change, reason):
    us.store.record.save(good_record(us, clock, **change))
    responses.post(TOKEN_URL, json=token_answer(fake_token(6), clock() + DAY))
    with caplog.at_level(logging.WARNING):
        assert us.get_valid_token() == fake_token(6)
    assert reason in caplog.text
    assert len(responses.calls) == 1


@responses.activate
def test_switching_to_paper_does_not_reuse_the_real_token(make_manager, env, clock):
    real = make_manager()
    real.save_token(good_record(real, clock))
    paper_host = "https://openapivts.koreainvestment.com:29443/oauth2/tokenP"
    responses.post(paper_host, json=token_answer(fake_token(8), clock() + DAY))
    paper = make_manager(environ={**env, "KIS_ENV": "paper"})
    assert paper.get_valid_token() == fake_token(8)
    assert responses.calls[0].request.url == paper_host


@responses.activate
def test_files_are_0600_and_directory_0700(us, clock):
    responses.post(TOKEN_URL, json=token_answer(fake_token(), clock() + DAY))
    us.get_valid_token()
    assert stat.S_IMODE(os.stat(us.settings.token_dir).st_mode) == 0o700
    for path in us.settings.token_dir.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name


def test_files_are_0600_even_under_a_permissive_umask(us, clock):
    old = os.umask(0)
    try:
        us.save_token(good_record(us, clock))
        with us.store.lock.hold(1):
            pass
    finally:
        os.umask(old)
    assert {stat.S_IMODE(p.stat().st_mode) for p in us.settings.token_dir.iterdir()} == {0o600}
    assert stat.S_IMODE(os.stat(us.settings.token_dir).st_mode) == 0o700


def test_writes_are_atomic_and_leave_no_temp_files(us, clock, monkeypatch):
    us.save_token(good_record(us, clock))
    before = us.store.record.path.read_text()

    def crash(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(StoreError, match="No space left on device"):
        us.save_token(good_record(us, clock, access_token=fake_token(2)))
    assert us.store.record.path.read_text() == before
    assert [p.name for p in us.settings.token_dir.iterdir() if p.name.endswith(".tmp")] == []


def test_nothing_is_written_to_the_working_directory(make_manager, env, clock, tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    manager = make_manager()
    with responses.RequestsMock() as mock:
        mock.post(TOKEN_URL, json=token_answer(fake_token(), clock() + DAY))
        manager.get_valid_token()
    manager.get_token_info()
    assert list(cwd.iterdir()) == []


def test_default_token_dir_is_absolute_and_independent_of_the_working_directory(tmp_path, monkeypatch):
    environ = {"HOME": str(tmp_path / "home"), "KIS_US_APP_KEY": "k", "KIS_US_APP_SECRET": "s"}
    monkeypatch.chdir(tmp_path)
    first = USTokenManager(Settings(environ, dotenv_path=False)).settings.token_dir
    monkeypatch.chdir("/")
    second = USTokenManager(Settings(environ, dotenv_path=False)).settings.token_dir
    assert first == second == tmp_path / "home" / ".local" / "state" / "kis-tokens" / "real"


def test_delete_removes_the_keys_token_and_only_this_markets_story_files(us, kr, clock):
    us.save_token(good_record(us, clock))
    kr.save_token(good_record(kr, clock, market="kr"))
    removed = us.delete_token()
    assert sorted(os.path.basename(p) for p in removed) == [
        f"key-{us.credential.key_id}.json", "us_api_token.json", "us_krs_token.dat", "us_token_issued_at.dat"
    ]
    assert kr.load_token() is not None
    assert us.delete_token() == []


def test_corrupt_renewal_state_counts_as_a_request_just_made_with_a_warning(us, clock, caplog):
    us.settings.token_dir.mkdir(mode=0o700, parents=True)
    us.store.state.path.write_text('{"last_request_at": "yesterday"}')
    with caplog.at_level(logging.WARNING):
        state = us.load_renewal_state()
    assert state.last_request_at == clock() and state.unreadable
    assert "renewal state" in caplog.text and "counting it as a request made just now" in caplog.text


def test_temp_files_left_by_a_killed_writer_are_cleaned_up_later(us, clock):
    us.save_token(good_record(us, clock))
    stale = us.settings.token_dir / ".us_api_token.json.abc123.tmp"
    fresh = us.settings.token_dir / ".us_api_token.json.def456.tmp"
    stale.write_text("{")
    fresh.write_text("{")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    us.save_token(good_record(us, clock, access_token=fake_token(2)))
    assert not stale.exists() and fresh.exists()  # a fresh one may belong to a live writer
