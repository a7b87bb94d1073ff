"""The WebSocket approval key (issue 12 §1, SPEC §11): managed like the token, one per app key."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest
import responses

from common.credentials.records import ApprovalRecord, mask_token
from common.errors import TokenUnavailableError
from kr.token_manager import KRTokenManager
from tests.conftest import DAY, REAL_HOST, US_KEY, US_SECRET, run_together
from us.token_manager import USTokenManager

REPO = Path(__file__).resolve().parent.parent
APPROVAL_URL = REAL_HOST + "/oauth2/Approval"
KEY_1 = "a1b2c3d4-0000-4000-8000-approvalkey01"
KEY_2 = "a1b2c3d4-0000-4000-8000-approvalkey02"


def test_approval_key_is_asked_once_with_secretkey_and_cached(us, clock):
    with responses.RequestsMock() as mock:
        mock.post(APPROVAL_URL, json={"approval_key": KEY_1})
        assert us.get_approval_key() == KEY_1
        clock.advance(3600)
        assert us.get_approval_key() == KEY_1
        assert len(mock.calls) == 1
        body = json.loads(mock.calls[0].request.body)
        assert body == {"grant_type": "client_credentials", "appkey": US_KEY, "secretkey": US_SECRET}
    path = us._approval_engine().store.record.path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert US_SECRET not in path.read_text() and US_KEY not in path.read_text()


def test_one_key_in_both_markets_shares_one_approval_key(make_manager, env, clock):
    one_key = {**env, "KIS_KR_APP_KEY": US_KEY, "KIS_KR_APP_SECRET": US_SECRET}
    with responses.RequestsMock() as mock:
        mock.post(APPROVAL_URL, json={"approval_key": KEY_1})
        assert make_manager(USTokenManager, one_key).get_approval_key() == KEY_1
        assert make_manager(KRTokenManager, one_key).get_approval_key() == KEY_1
        assert len(mock.calls) == 1


def test_approval_key_is_renewed_before_it_is_24_hours_old(us, clock):
    with responses.RequestsMock() as mock:
        mock.post(APPROVAL_URL, json={"approval_key": KEY_1})
        mock.post(APPROVAL_URL, json={"approval_key": KEY_2})
        assert us.get_approval_key() == KEY_1
        clock.advance(DAY - 30 * 60)  # 23.5 h old: inside the renewal window
        assert us.get_approval_key() == KEY_2
        assert len(mock.calls) == 2


@pytest.mark.parametrize("answer", [
    {"status": 200, "body": "<html>점검</html>"},
    {"status": 200, "json": {"message": "no key here"}},
    {"status": 200, "json": {"approval_key": ""}},
    {"status": 200, "json": {"approval_key": 12345}},
])
def test_bad_answer_is_a_clear_error_and_the_stored_key_is_kept(us, clock, answer, caplog):
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.post(APPROVAL_URL, json={"approval_key": KEY_1})
        assert us.get_approval_key() == KEY_1
        path = us._approval_engine().store.record.path
        before = path.read_bytes()
        clock.advance(DAY - 30 * 60)
        for _ in range(4):
            mock.post(APPROVAL_URL, **answer)
        with caplog.at_level(logging.WARNING):
            assert us.get_approval_key() == KEY_1  # still valid for 30 min: kept, with a warning
        assert "approval key renewal failed" in caplog.text
        assert path.read_bytes() == before
        clock.advance(30 * 60)
        with pytest.raises(TokenUnavailableError, match="no valid us approval key: .*(approval_key|HTML)"):
            us.get_approval_key()
    assert KEY_1 not in caplog.text


def test_check_shows_the_approval_key_masked_with_its_age(us, clock, capsys):
    from common.cli.market import main

    with responses.RequestsMock() as mock:
        mock.post(APPROVAL_URL, json={"approval_key": KEY_1})
        us.get_approval_key()
    clock.advance(2 * 3600)
    info = us.get_token_info()["approval"]
    assert info["key"] == mask_token(KEY_1) and info["age_seconds"] == 7200 and info["valid"] is True
    assert main(lambda: us, ["check"], market="US") == 2  # no token yet; the approval key is shown
    out = capsys.readouterr().out
    assert f"approval: {mask_token(KEY_1)} (WebSocket approval key, 2h 00m old)" in out
    assert KEY_1 not in out


def test_a_corrupt_approval_file_is_replaced_with_a_warning(us, clock, caplog):
    path = us._approval_engine().store.record.path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"kind": "approval", "version": 1, "approval_key": ')
    with responses.RequestsMock() as mock, caplog.at_level(logging.WARNING):
        mock.post(APPROVAL_URL, json={"approval_key": KEY_2})
        assert us.get_approval_key() == KEY_2
    assert "ignoring the stored us approval key" in caplog.text
    assert ApprovalRecord.from_json(path.read_text()).approval_key == KEY_2


# -- real processes against the sandbox ------------------------------------------------------------


def _environ(env, sandbox_process, **extra):
    return {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO), "KIS_DOTENV_PATH": os.devnull,
            "KIS_BASE_URL": sandbox_process.base_url, **env, **extra}


def test_twelve_processes_from_cold_cost_one_approval_request(env, sandbox_process):
    sandbox_process.control("faults", {"mode": "slow", "delay": 0.5, "count": 1, "path": "/oauth2/Approval"})
    results = run_together([["us.token_manager", "approval"]] * 12, _environ(env, sandbox_process))
    assert all(code == 0 for code, _, _ in results), [err for _, _, err in results]
    keys = {out for _, out, _ in results}
    assert len(keys) == 1 and keys.pop().strip()
    assert sandbox_process.counters()["approvals"] == 1
    assert all(err == "" for _, _, err in results)  # nothing logged, the key least of all


def test_one_key_in_both_markets_processes_share_one_approval_key(env, sandbox_process):
    environ = _environ(env, sandbox_process, KIS_KR_APP_KEY=US_KEY, KIS_KR_APP_SECRET=US_SECRET)
    results = run_together([[f"{m}.token_manager", "approval"] for m in ("us", "kr")] * 3, environ)
    assert all(code == 0 for code, _, _ in results), [err for _, _, err in results]
    assert len({out for _, out, _ in results}) == 1
    assert sandbox_process.counters()["approvals"] == 1


def test_kis_token_us_approval_prints_the_key_alone_and_check_masks_it(env, sandbox_process):
    environ = _environ(env, sandbox_process)
    ((code, out, err),) = run_together([["kis_token.console", "us", "approval"]], environ)
    assert code == 0 and err == "" and out.count("\n") == 1
    key = out.strip()
    ((code, out, err),) = run_together([["kis_token.console", "us", "check"]], environ)
    assert mask_token(key) in out and key not in out and key not in err
