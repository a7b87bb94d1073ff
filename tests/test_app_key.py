"""Tokens belong to the app key (issue 10, SPEC §1, §4, §6): one key in both markets, two keys, rotation."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import responses

from common.credentials.records import TokenRecord
from common.settings import Settings
from kr.token_manager import KRTokenManager
from tests.conftest import (
    DAY,
    KR_KEY,
    KR_SECRET,
    TOKEN_URL,
    US_KEY,
    US_SECRET,
    fake_token,
    run_together,
    token_answer,
)
from us.token_manager import USTokenManager

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def one_key(env) -> dict[str, str]:
    """Both markets configured with the same app key, as most users do."""
    return {**env, "KIS_KR_APP_KEY": US_KEY, "KIS_KR_APP_SECRET": US_SECRET}


def broker(mock, clock, tokens):
    """Answer each request with the next token of ``tokens`` (a list consumed from the front)."""

    def callback(request):
        return 200, {}, json.dumps(token_answer(tokens.pop(0), clock() + DAY))

    mock.add_callback(responses.POST, TOKEN_URL, callback=callback)


def test_one_key_us_get_then_kr_get_costs_one_request_and_serves_the_same_token(make_manager, one_key, clock):
    us, kr = make_manager(USTokenManager, one_key), make_manager(KRTokenManager, one_key)
    with responses.RequestsMock() as mock:
        broker(mock, clock, [fake_token(1)])
        assert us.get_valid_token() == fake_token(1)
        clock.advance(5)
        assert kr.get_valid_token() == fake_token(1)
        assert len(mock.calls) == 1
    assert us.credential == kr.credential
    # each market keeps its own story files, mirroring the key's record
    for manager in (us, kr):
        mirror = TokenRecord.from_json(manager.mirror.record_path.read_text())
        assert (mirror.access_token, mirror.market) == (fake_token(1), manager.market)
        assert manager.mirror.issued_at_path.exists()
        mojito = json.loads(manager.mirror.mojito_path.read_text())
        assert mojito["access_token"] == f"Bearer {fake_token(1)}" and mojito["market"] == manager.market


def test_one_key_kr_refresh_is_what_a_running_us_process_serves_next(make_manager, one_key, clock):
    us, kr = make_manager(USTokenManager, one_key), make_manager(KRTokenManager, one_key)
    with responses.RequestsMock() as mock:
        broker(mock, clock, [fake_token(1), fake_token(2)])
        assert us.get_valid_token() == fake_token(1)
        clock.advance(120)
        assert kr.refresh_token().access_token == fake_token(2)
        clock.advance(2)  # past the memory cache's sync interval
        assert us.get_valid_token() == fake_token(2)
        assert make_manager(USTokenManager, one_key).get_valid_token() == fake_token(2)  # a new process
        assert len(mock.calls) == 2
    # the US mirror was brought up to date by the US process that saw the change
    assert TokenRecord.from_json(us.mirror.record_path.read_text()).access_token == fake_token(2)


def test_one_key_shares_the_one_a_minute_memory_across_markets(make_manager, one_key, clock):
    us, kr = make_manager(USTokenManager, one_key), make_manager(KRTokenManager, one_key)
    with responses.RequestsMock() as mock:
        broker(mock, clock, [fake_token(1)])
        us.refresh_token()
        with pytest.raises(Exception, match="not asking the broker"):
            kr.refresh_token()  # the same key asked 0 s ago: the broker would say EGW00133
        assert len(mock.calls) == 1
    assert kr.get_valid_token() == fake_token(1)  # and KR still has a token


def test_two_keys_get_two_independent_tokens(us, kr, clock):
    with responses.RequestsMock() as mock:
        def callback(request):
            key = json.loads(request.body)["appkey"]
            return 200, {}, json.dumps(token_answer({US_KEY: fake_token(1), KR_KEY: fake_token(2)}[key],
                                                    clock() + DAY))

        mock.add_callback(responses.POST, TOKEN_URL, callback=callback)
        assert us.get_valid_token() == fake_token(1)
        assert kr.get_valid_token() == fake_token(2)  # at once: not held back by the US key's minute
        assert len(mock.calls) == 2
    assert us.credential != kr.credential
    assert us.store.record.path != kr.store.record.path


def test_a_rotated_key_gets_its_token_at_once(make_manager, env, clock, caplog):
    old = make_manager(USTokenManager, env)
    rotated_env = {**env, "KIS_US_APP_KEY": "PSnew" + "c" * 31}
    with responses.RequestsMock() as mock:
        broker(mock, clock, [fake_token(1), fake_token(2)])
        assert old.get_valid_token() == fake_token(1)
        clock.advance(1)
        with caplog.at_level(logging.WARNING):
            assert make_manager(USTokenManager, rotated_env).get_valid_token() == fake_token(2)
        assert len(mock.calls) == 2
        assert json.loads(mock.calls[1].request.body)["appkey"] == rotated_env["KIS_US_APP_KEY"]
    assert "not asking" not in caplog.text
    # the market's mirror now shows the rotated key's token
    assert TokenRecord.from_json(old.mirror.record_path.read_text()).access_token == fake_token(2)


def test_warm_up_takes_the_keys_token_while_it_covers_the_horizon(make_manager, one_key, clock):
    kr, us = make_manager(KRTokenManager, one_key), make_manager(USTokenManager, one_key)
    with responses.RequestsMock() as mock:
        broker(mock, clock, [fake_token(1), fake_token(2)])
        record, renewed = kr.warm_up(8 * 3600)  # 07:50-ish KR warm-up
        assert renewed and record.access_token == fake_token(1)
        clock.advance(14 * 3600 + 10 * 60)  # 22:00 US warm-up: the token has 9h50m left
        record, renewed = us.warm_up(9 * 3600)
        assert not renewed and record.access_token == fake_token(1)
        assert len(mock.calls) == 1


def test_a_version_0_1_market_file_is_adopted_without_a_request(make_manager, env, clock, tmp_path):
    us = make_manager(USTokenManager, env)
    legacy = TokenRecord(fake_token(3), "Bearer", clock() - 3600, clock() + 20 * 3600, "us", "real",
                         us.key_fingerprint())
    directory = tmp_path / "tokens"
    directory.mkdir(mode=0o700)
    (directory / "us_api_token.json").write_text(legacy.to_json())  # written by the old version
    with responses.RequestsMock() as mock:
        assert us.get_valid_token() == fake_token(3)
        assert make_manager(USTokenManager, env).get_valid_token() == fake_token(3)
        assert len(mock.calls) == 0
    assert TokenRecord.from_json(us.store.record.path.read_text()).access_token == fake_token(3)


def test_a_deleted_token_is_not_brought_back_from_another_markets_mirror(make_manager, one_key, clock):
    us, kr = make_manager(USTokenManager, one_key), make_manager(KRTokenManager, one_key)
    with responses.RequestsMock() as mock:
        broker(mock, clock, [fake_token(1), fake_token(2)])
        assert us.get_valid_token() == fake_token(1)
        assert kr.get_valid_token() == fake_token(1)
        us.delete_token()
        clock.advance(120)
        assert make_manager(KRTokenManager, one_key).get_valid_token() == fake_token(2)
        assert len(mock.calls) == 2


# -- real processes against the sandbox ------------------------------------------------------------


def run(args, environ, timeout=60):
    return subprocess.run([sys.executable, "-m", *args], env=environ, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def one_key_procs(one_key, sandbox_process):
    return {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO), "KIS_DOTENV_PATH": os.devnull,
            "KIS_BASE_URL": sandbox_process.base_url, **one_key}


def test_one_key_cli_us_get_then_kr_get_then_kr_refresh_then_us_get(one_key_procs, sandbox_process):
    first = run(["us.token_manager", "get"], one_key_procs)
    second = run(["kr.token_manager", "get"], one_key_procs)
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert first.stdout == second.stdout
    assert sandbox_process.counters()["token_requests"] == {US_KEY: 1}
    sandbox_process.control("clock", {"offset": 7 * 3600})  # past the broker's same-token window
    state = Path(one_key_procs["KIS_TOKEN_DIR"]).glob("key-*.state")
    for path in state:  # the last request was "an hour ago" for our one-a-minute memory too
        data = json.loads(path.read_text())
        data["last_request_at"] -= 7 * 3600
        path.write_text(json.dumps(data))
    refreshed = run(["kr.token_manager", "refresh"], one_key_procs)
    assert refreshed.returncode == 0, refreshed.stderr
    after = run(["us.token_manager", "get"], one_key_procs)
    assert after.returncode == 0 and after.stdout != first.stdout
    assert sandbox_process.counters()["token_requests"] == {US_KEY: 2}


def test_one_key_eight_plus_eight_processes_from_cold_cost_one_request(one_key_procs, sandbox_process):
    sandbox_process.control("faults", {"mode": "slow", "delay": 0.5, "count": 1})  # widen the race
    results = run_together([[f"{market}.token_manager", "get"] for _ in range(8) for market in ("us", "kr")],
                           one_key_procs)
    assert all(code == 0 for code, _, _ in results), [err for _, _, err in results]
    assert len({out for _, out, _ in results}) == 1
    assert sandbox_process.counters()["token_requests"] == {US_KEY: 1}
    us = USTokenManager(Settings(one_key_procs, dotenv_path=False))
    kr = KRTokenManager(Settings(one_key_procs, dotenv_path=False))
    assert us.load_token().access_token == kr.load_token().access_token == results[0][1].strip()
    assert KR_SECRET not in "".join(p.read_text() for p in Path(one_key_procs["KIS_TOKEN_DIR"]).iterdir()
                                    if p.is_file())


def _legacy_file(directory, market, token, expires_at, fingerprint, now):
    directory.mkdir(mode=0o700, exist_ok=True)
    record = TokenRecord(token, "Bearer", now - 3600, expires_at, market, "real", fingerprint)
    (directory / f"{market}_api_token.json").write_text(record.to_json())  # as version 0.1 wrote it


def test_a_token_deleted_through_one_market_never_comes_back_from_a_left_over_file(
    make_manager, one_key, clock, tmp_path
):
    us, kr = make_manager(USTokenManager, one_key), make_manager(KRTokenManager, one_key)
    for market in ("us", "kr"):  # both markets' files from version 0.1, the same token
        _legacy_file(tmp_path / "tokens", market, fake_token(3), clock() + 20 * 3600, us.key_fingerprint(),
                     clock())
    with responses.RequestsMock() as mock:
        broker(mock, clock, [fake_token(4)])
        assert us.get_valid_token() == fake_token(3)  # adopted: no request
        assert json.loads(us.mirror.record_path.read_text())["mirror_of"] == us.credential.key_id
        kr.delete_token()
        clock.advance(120)
        assert make_manager(USTokenManager, one_key).get_valid_token() == fake_token(4)
        assert len(mock.calls) == 1


def test_an_upgrade_takes_the_longest_lived_left_over_token_of_the_key(
    make_manager, one_key, clock, tmp_path
):
    us = make_manager(USTokenManager, one_key)
    directory = tmp_path / "tokens"
    _legacy_file(directory, "us", fake_token(5), clock() - 60, us.key_fingerprint(), clock())  # expired
    _legacy_file(directory, "kr", fake_token(6), clock() + 23 * 3600, us.key_fingerprint(), clock())
    with responses.RequestsMock() as mock:
        assert us.get_valid_token() == fake_token(6)
        assert len(mock.calls) == 0
