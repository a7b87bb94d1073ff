"""SPEC §8: tokens and secrets never in logs or output (but `get`), masking, ignored files."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest
import requests
import responses

from common.cli.market import main
from common.credentials.records import mask_token
from tests.conftest import DAY, REAL_HOST, TOKEN_URL, US_KEY, US_SECRET, fake_token, refusal, token_answer

REPO = Path(__file__).resolve().parent.parent


def test_mask_shows_only_a_few_characters():
    token = fake_token(1)
    masked = mask_token(token)
    assert masked == token[:4] + "..." + token[-4:]
    assert len(masked.replace("...", "")) == 8
    assert mask_token("short") == "***"
    assert mask_token(None) == "-"


def test_token_and_secret_never_reach_the_logs_at_any_level(us, clock, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    with responses.RequestsMock() as mock:
        mock.post(TOKEN_URL, json=token_answer(fake_token(1), clock() + DAY))
        mock.post(TOKEN_URL, status=503, body="<html>busy</html>")
        mock.post(TOKEN_URL, body=requests.ConnectionError("reset"))
        mock.post(TOKEN_URL, status=403, json=refusal("EGW00133"))
        mock.post(TOKEN_URL, json=token_answer(fake_token(2), clock() + 2 * DAY))
        mock.post(REAL_HOST + "/oauth2/revokeP", json={"code": 200, "message": "ok"})
        us.get_valid_token()
        clock.advance(DAY - 600)
        us.get_valid_token()  # mandatory window: retries, then a refusal; current token kept
        clock.advance(120)
        for argv in (["-vv", "refresh"], ["-vv", "check"], ["-vv", "check", "--json"], ["-vv", "revoke"]):
            main(lambda: us, argv, market="US")
    out, err = capsys.readouterr()
    logs = caplog.text + err + out
    assert "EGW00133" in logs and "obtained a new us token" in logs  # the logs did run
    for secret in (fake_token(1), fake_token(2), US_SECRET):
        assert secret not in logs
    assert US_KEY not in logs


@pytest.mark.parametrize(
    "name",
    [".env", "us_api_token.json", "kr_token_issued_at.dat", "us_krs_token.dat", "token.dat",
     "kr_renewal_state.json", "us_api_token.lock", "sub/dir/kr_api_token.json"],
)
def test_gitignore_covers_env_and_every_token_file(name):
    result = subprocess.run(["git", "check-ignore", "--no-index", "-q", name], cwd=REPO)
    assert result.returncode == 0, f"{name} is not ignored"


def test_env_example_lists_every_variable_with_a_comment():
    text = (REPO / ".env.example").read_text()
    for name in ("KIS_US_APP_KEY", "KIS_US_APP_SECRET", "KIS_KR_APP_KEY", "KIS_KR_APP_SECRET", "KIS_ENV",
                 "KIS_BASE_URL", "KIS_US_BASE_URL", "KIS_KR_BASE_URL", "KIS_TOKEN_DIR",
                 "KIS_US_ACCOUNT", "KIS_KR_ACCOUNT"):
        assert name in text, name
    assert "=PS" not in text  # no real-looking key in the example
