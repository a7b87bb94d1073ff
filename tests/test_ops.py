"""Operations (issue 6): warm-up, revoke, ``check``, ``metrics`` and renewal alerts.

The broker is mocked with ``responses`` or played by the in-thread :class:`Sandbox`; webhooks are
small HTTP servers on 127.0.0.1. Every server listens on 127.0.0.1 with a free port, and time
moves only through the injected clock (the Sandbox shares it).
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
import responses
from prometheus_client.parser import text_string_to_metric_families

from common.base_token_manager import ALERT_WEBHOOK_VAR
from common.cli import metrics
from common.cli.market import main
from common.credentials.records import TokenRecord, mask_token
from common.errors import RateLimitedError, StoreError, TokenUnavailableError
from common.renewal import alerts
from common.renewal.policy import EXPIRY_MARGIN, MAX_HORIZON
from common.sandbox import Sandbox
from common.store.protocols import RenewalState
from kr.token_manager import KRTokenManager
from tests.conftest import (
    DAY,
    KR_KEY,
    KR_SECRET,
    TOKEN_URL,
    US_KEY,
    US_SECRET,
    fake_token,
    refusal,
    token_answer,
)
from us.token_manager import USTokenManager

HOUR = 3600.0
MINUTE = 60.0
LOOPBACK = re.compile(r"http://127\.0\.0\.1:\d+/")
PROTECTED = "/uapi/domestic-stock/v1/quotations/inquire-price"
WEBHOOK_PATH = "/services/T0000/B0000/WEBHOOK-PATH-SECRET"
HTTP_TIMEOUT = 5


# -- helpers -------------------------------------------------------------------------------------


def cli(manager: Any, *argv: str) -> int:
    """Run the CLI on ``manager`` (the factory is named like the class, as in production)."""

    def factory() -> Any:
        return manager

    factory.__name__ = type(manager).__name__
    return main(factory, list(argv))


def hold(manager: Any, clock: Any, token: str, left: float) -> TokenRecord:
    """Store ``token`` as if another process had obtained it earlier, with ``left`` seconds to live."""
    expires = clock() + left
    record = TokenRecord(
        access_token=token,
        token_type="Bearer",
        issued_at=expires - DAY,
        expires_at=expires,
        market=manager.market,
        environment=manager.environment,
        key_fingerprint=manager.key_fingerprint(),
    )
    manager.store.record.save(record)
    return record


def token_calls(mock: responses.RequestsMock) -> int:
    """How many token requests reached the mocked broker."""
    return sum(1 for call in mock.calls if call.request.url == TOKEN_URL)


def families(text: str) -> dict[str, Any]:
    """Parse Prometheus text into ``{family name: family}``."""
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(text: str, sample_name: str, **labels: str) -> float | None:
    """The value of the one sample named ``sample_name`` whose labels include ``labels``."""
    found = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == sample_name and labels.items() <= sample.labels.items()
    ]
    assert len(found) <= 1, found
    return found[0] if found else None


def one_line(text: str) -> str:
    """Assert that ``text`` is exactly one non-empty line and return it."""
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


def closed_port() -> int:
    """A port on 127.0.0.1 with nobody listening (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Receiver:
    """A webhook on 127.0.0.1 that records every request and answers ``status``."""

    def __init__(self) -> None:
        self.status = 200
        self.posts: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                receiver.posts.append(
                    {
                        "path": self.path,
                        "content_type": self.headers.get("content-type"),
                        "body": self.rfile.read(length),
                    }
                )
                self.send_response(receiver.status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        """The webhook URL, with a path that stands for Slack's secret one."""
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}{WEBHOOK_PATH}"

    def texts(self) -> list[str]:
        """The ``text`` of every alert received, checking each one's shape."""
        texts = []
        for post in self.posts:
            assert post["path"] == WEBHOOK_PATH
            assert post["content_type"] == "application/json"
            payload = json.loads(post["body"])
            assert set(payload) == {"text"} and isinstance(payload["text"], str)
            texts.append(payload["text"])
        return texts


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    hook = Receiver()
    hook.thread.start()
    yield hook
    hook.server.shutdown()
    hook.server.server_close()
    hook.thread.join(timeout=5)


@pytest.fixture
def broker() -> Iterator[responses.RequestsMock]:
    """The broker mocked with ``responses``; requests to 127.0.0.1 (webhooks) go through."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.add_passthru(LOOPBACK)
        yield mock


@pytest.fixture
def sandbox(clock) -> Iterator[Sandbox]:
    """The local broker stand-in, on the test's clock."""
    with Sandbox(clock=clock) as sb:
        yield sb


@pytest.fixture
def sb_us(make_manager, env, sandbox) -> USTokenManager:
    """A US manager that talks to the Sandbox."""
    return make_manager(USTokenManager, {**env, "KIS_BASE_URL": sandbox.base_url})


@pytest.fixture
def alerting(make_manager, env, receiver) -> Any:
    """Build a manager of the given class whose alerts go to ``receiver``."""

    def build(cls: type = USTokenManager, url: str | None = None) -> Any:
        return make_manager(cls, {**env, ALERT_WEBHOOK_VAR: url or receiver.url})

    return build


def protected_call(sandbox: Sandbox, token: str, app_key: str = US_KEY) -> requests.Response:
    """Call the Sandbox's quote endpoint with ``token``, as mojito2 would."""
    headers = {"authorization": f"Bearer {token}", "appkey": app_key, "appsecret": "x"}
    return requests.get(sandbox.base_url + PROTECTED, headers=headers, timeout=HTTP_TIMEOUT)


# -- warm-up -------------------------------------------------------------------------------------


def test_warm_up_renews_a_token_that_would_expire_inside_the_horizon(us, clock, broker):
    hold(us, clock, fake_token(1), 5 * HOUR)
    broker.add(responses.POST, TOKEN_URL, json=token_answer(fake_token(2), clock() + DAY))
    record, renewed = us.warm_up(8 * HOUR)
    assert renewed and record.access_token == fake_token(2)
    assert record.seconds_left(clock()) == DAY
    assert token_calls(broker) == 1


def test_warm_up_does_nothing_when_the_token_outlives_the_horizon(us, clock, broker):
    held = hold(us, clock, fake_token(1), 8 * HOUR + EXPIRY_MARGIN + 1)
    record, renewed = us.warm_up(8 * HOUR)
    assert not renewed and record == held
    assert token_calls(broker) == 0


def test_warm_up_counts_the_expiry_margin_into_the_horizon(us, clock, broker):
    hold(us, clock, fake_token(1), 8 * HOUR + EXPIRY_MARGIN)
    broker.add(responses.POST, TOKEN_URL, json=token_answer(fake_token(2), clock() + DAY))
    assert us.warm_up(8 * HOUR)[1]
    assert token_calls(broker) == 1


def test_warm_up_with_no_token_obtains_one(us, clock, broker):
    broker.add(responses.POST, TOKEN_URL, json=token_answer(fake_token(1), clock() + DAY))
    record, renewed = us.warm_up(HOUR)
    assert renewed and record.access_token == fake_token(1)


def test_warmup_cli_renews_then_an_immediate_second_run_sends_nothing(us, clock, broker, capsys):
    hold(us, clock, fake_token(1), 2 * HOUR)
    broker.add(responses.POST, TOKEN_URL, json=token_answer(fake_token(2), clock() + DAY))
    assert cli(us, "warmup", "--valid-for", "8h") == 0
    out = one_line(capsys.readouterr().out)
    assert "renewed" in out and mask_token(fake_token(2)) in out and fake_token(2) not in out
    assert cli(us, "warmup", "--valid-for", "8h") == 0
    assert "nothing to do" in one_line(capsys.readouterr().out)
    assert token_calls(broker) == 1


def test_warmup_cli_never_asks_twice_a_minute(us, clock, broker, capsys):
    hold(us, clock, fake_token(1), 2 * HOUR)
    broker.add(responses.POST, TOKEN_URL, json=refusal("EGW00133"), status=403)
    broker.add(responses.POST, TOKEN_URL, json=token_answer(fake_token(2), clock() + DAY))
    assert cli(us, "warmup", "--valid-for", "8h") == 1
    assert "EGW00133" in one_line(capsys.readouterr().err)
    clock.advance(30)
    assert cli(us, "warmup", "--valid-for", "8h") == 1
    err = one_line(capsys.readouterr().err)
    assert "one a minute" in err
    assert token_calls(broker) == 1
    clock.advance(31)  # 61 s after the first request
    assert cli(us, "warmup", "--valid-for", "8h") == 0
    assert token_calls(broker) == 2
    assert us.get_valid_token() == fake_token(2)


def test_warmup_cli_default_horizon_is_the_markets_session(make_manager, clock, broker, capsys):
    us, kr = make_manager(USTokenManager), make_manager(KRTokenManager)
    hold(us, clock, fake_token(1), 8.5 * HOUR)  # under the US default (9 h)
    hold(kr, clock, fake_token(2), 8.5 * HOUR)  # over the KR default (8 h)
    broker.add(responses.POST, TOKEN_URL, json=token_answer(fake_token(3), clock() + DAY))
    assert cli(us, "warmup") == 0
    assert cli(kr, "warmup") == 0
    out = capsys.readouterr().out
    assert "US token renewed" in out and "KR token already valid" in out
    assert token_calls(broker) == 1
    assert json.loads(broker.calls[0].request.body)["appkey"] == US_KEY


def test_warmup_horizon_over_18h_is_refused_with_usage_exit(us, clock, broker, capsys):
    hold(us, clock, fake_token(1), 2 * HOUR)
    assert cli(us, "warmup", "--valid-for", "19h") == 2
    assert "18 h" in one_line(capsys.readouterr().err)
    with pytest.raises(ValueError, match="18 h"):
        us.warm_up(MAX_HORIZON + 1)
    assert token_calls(broker) == 0


@pytest.mark.parametrize("duration", ["soon", "8x", "0h", "", "h"])
def test_warmup_bad_duration_is_a_usage_error(us, broker, capsys, duration):
    with pytest.raises(SystemExit) as exit_info:
        cli(us, "warmup", "--valid-for", duration)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "duration" in captured.err
    assert token_calls(broker) == 0


# -- revoke --------------------------------------------------------------------------------------


def test_revoke_cli_kills_the_token_at_the_broker_and_removes_local_files(sb_us, sandbox, capsys):
    token = sb_us.get_valid_token()
    assert protected_call(sandbox, token).json()["rt_cd"] == "0"
    files = sb_us.get_token_info()["files"]
    assert cli(sb_us, "revoke") == 0
    out = one_line(capsys.readouterr().out)
    assert "revoked" in out and token not in out
    assert sandbox.counters()["revocations"] == 1
    answer = protected_call(sandbox, token)
    assert answer.status_code == 500
    assert answer.json()["rt_cd"] == "1" and answer.json()["msg_cd"] == "EGW00121"
    for role in ("record", "issued_at", "mojito"):
        assert not os.path.exists(files[role]), role
    assert sb_us.get_token_info()["status"] == "missing"


def test_revoke_method_returns_the_removed_files_and_a_new_token_can_follow(sb_us, sandbox, clock):
    old = sb_us.get_valid_token()
    removed = sb_us.revoke()
    files = sb_us.get_token_info()["files"]
    roles = ("key_record", "record", "issued_at", "mojito")
    assert sorted(removed) == sorted(files[role] for role in roles)
    assert protected_call(sandbox, old).json()["msg_cd"] == "EGW00121"
    clock.advance(MINUTE + 1)
    new = sb_us.get_valid_token()
    assert new != old and protected_call(sandbox, new).json()["rt_cd"] == "0"
    assert sandbox.counters()["tokens_issued"] == {US_KEY: 2}


def test_revoke_refused_by_the_broker_keeps_local_files(sb_us, sandbox, capsys):
    token = sb_us.get_valid_token()
    files = sb_us.get_token_info()["files"]
    before = {role: Path(files[role]).read_text() for role in ("record", "issued_at", "mojito")}
    sandbox.reset()  # the broker forgets the token: revoking it is refused with EGW00121
    assert cli(sb_us, "revoke") == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    err = one_line(captured.err)
    assert "EGW00121" in err and token not in err
    for role, text in before.items():
        assert Path(files[role]).read_text() == text
    assert sb_us.get_token_info()["status"] == "ok"


def test_revoke_without_a_token_fails_without_asking_the_broker(sb_us, sandbox, capsys):
    assert cli(sb_us, "revoke") == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "no us token to revoke" in one_line(captured.err)
    counters = sandbox.counters()
    assert counters["revocations"] == 0 and counters["token_requests"] == {}
    with pytest.raises(TokenUnavailableError):
        sb_us.revoke()


# -- check ---------------------------------------------------------------------------------------


def check_json(manager: Any, capsys: Any) -> tuple[int, dict[str, Any]]:
    code = cli(manager, "check", "--json")
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    return code, json.loads(out)


def assert_check_schema(info: dict[str, Any]) -> None:
    """The ``check --json`` object: every key, with its type."""
    optional_str = (str, type(None))
    assert set(info) == {
        "schema", "market", "environment", "key_fingerprint", "status", "present", "valid", "issued_at",
        "approval",
        "expires_at", "seconds_left", "token", "renewal_window_seconds", "last_renewal", "files", "store",
        "clock_offset_seconds", "clock", "daily_limit", "issued_24h", "problem", "removed", "last_failure",
        "call_budget",
    }
    budget = info["call_budget"]
    assert set(budget) == {"rate", "paced_rate", "calls_last_minute", "egw00201_last_minute",
                           "egw00201_total", "backend", "store_down", "hosts", "location", "error"}
    assert budget["rate"] == 18.0 and budget["backend"] in ("file", "redis") and budget["error"] is None
    assert info["problem"] is None
    assert type(info["clock_offset_seconds"]) is int and info["clock"] is None
    assert info["daily_limit"] == 10 and type(info["issued_24h"]) is int
    assert info["schema"] == 1
    assert info["market"] in ("us", "kr")
    assert info["environment"] in ("real", "paper")
    assert info["key_fingerprint"].startswith("sha256:") and len(info["key_fingerprint"]) == 23
    assert info["status"] in ("ok", "renewal_due", "expired", "missing")
    assert type(info["present"]) is bool and type(info["valid"]) is bool
    assert isinstance(info["issued_at"], optional_str) and isinstance(info["expires_at"], optional_str)
    assert info["seconds_left"] is None or type(info["seconds_left"]) is int
    assert isinstance(info["token"], optional_str)
    assert type(info["renewal_window_seconds"]) is int
    last = info["last_renewal"]
    if last is not None:
        assert set(last) == {"outcome", "at", "code", "message"}
        assert isinstance(last["outcome"], str) and isinstance(last["at"], str)
        assert isinstance(last["code"], optional_str) and isinstance(last["message"], optional_str)
    failure = info["last_failure"]
    if failure is not None:
        assert set(failure) == {"kind", "at", "code", "message", "summary"}
        assert failure["kind"] in ("refused", "failed", "store") and isinstance(failure["summary"], str)
    removed = info["removed"]
    assert removed is None or (set(removed) == {"how", "at"} and removed["how"] in ("deleted", "revoked"))
    approval = info["approval"]
    if approval is not None:
        assert set(approval) == {"key", "issued_at", "age_seconds", "valid"}
        assert "..." in approval["key"] and type(approval["age_seconds"]) is int
    assert isinstance(info["files"], dict)
    assert {"record", "issued_at", "mojito", "key_record", "state", "lock"} <= set(info["files"])
    assert all(isinstance(path, str) for path in info["files"].values())
    assert set(info["store"]) == {"kind", "url", "reachable", "misconfigured", "error", "prefix"}
    assert info["store"]["kind"] in ("file", "redis") and type(info["store"]["reachable"]) is bool
    present = info["present"]
    for key in ("issued_at", "expires_at", "seconds_left", "token"):
        assert (info[key] is not None) == present, key


@pytest.mark.parametrize(
    ("left", "status", "exit_code", "valid"),
    [
        (20 * HOUR, "ok", 0, True),
        (30 * MINUTE, "renewal_due", 1, True),
        (4 * MINUTE, "expired", 2, False),
        (-10 * MINUTE, "expired", 2, False),
        (None, "missing", 2, False),
    ],
)
def test_check_json_schema_and_exit_codes(us, clock, broker, capsys, left, status, exit_code, valid):
    if left is not None:
        hold(us, clock, fake_token(1), left)
    code, info = check_json(us, capsys)
    assert_check_schema(info)
    assert code == exit_code
    assert (info["status"], info["valid"], info["market"]) == (status, valid, "us")
    if left is not None:
        assert info["seconds_left"] == int(left)
        assert info["token"] == mask_token(fake_token(1))
    assert token_calls(broker) == 0


def test_check_json_reports_the_last_refused_renewal(us, clock, broker, capsys):
    hold(us, clock, fake_token(1), 30 * MINUTE)
    broker.add(responses.POST, TOKEN_URL, json=refusal("EGW00133"), status=403)
    assert us.get_valid_token() == fake_token(1)
    code, info = check_json(us, capsys)
    assert_check_schema(info)
    assert code == 1
    assert info["last_renewal"]["outcome"] == "refused"
    assert info["last_renewal"]["code"] == "EGW00133"


@pytest.mark.parametrize("argv", [("check",), ("check", "--json")])
def test_check_with_a_missing_key_is_a_configuration_error(make_manager, env, clock, capsys, argv):
    hold(make_manager(USTokenManager), clock, fake_token(1), 20 * HOUR)
    environ = {k: v for k, v in env.items() if k != "KIS_US_APP_KEY"}
    assert cli(make_manager(USTokenManager, environ), *argv) == 3
    captured = capsys.readouterr()
    if "--json" in argv:  # one JSON object even then (SPEC §5)
        assert json.loads(captured.out)["status"] == "unknown"
        assert "KIS_US_APP_KEY" in json.loads(captured.out)["error"]
    else:
        assert captured.out == ""
    assert "KIS_US_APP_KEY" in one_line(captured.err)


def test_check_with_a_missing_key_and_no_token_is_a_configuration_error(make_manager, env, capsys):
    environ = {k: v for k, v in env.items() if k != "KIS_US_APP_KEY"}
    assert cli(make_manager(USTokenManager, environ), "check", "--json") == 3
    assert "KIS_US_APP_KEY" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    ("name", "bad"), [("KIS_ENV", "staging"), ("KIS_TOKEN_DIR", "relative/tokens")]
)
def test_check_with_a_malformed_setting_is_a_configuration_error(make_manager, env, capsys, name, bad):
    assert cli(make_manager(USTokenManager, {**env, name: bad}), "check", "--json") == 3
    captured = capsys.readouterr()
    assert name in json.loads(captured.out)["error"] and name in one_line(captured.err)


def test_check_human_output_masks_the_token(us, clock, capsys, caplog):
    hold(us, clock, fake_token(1), 20 * HOUR)
    assert cli(us, "check") == 0
    captured = capsys.readouterr()
    assert mask_token(fake_token(1)) in captured.out
    assert "valid" in captured.out and "20h 00m" in captured.out
    for text in (captured.out, captured.err, caplog.text):
        assert fake_token(1) not in text and "SECRET-TOKEN" not in text
        assert US_SECRET not in text and US_KEY not in text


# -- metrics -------------------------------------------------------------------------------------


def test_metrics_after_a_renewal(us, clock, broker, capsys):
    broker.add(responses.POST, TOKEN_URL, json=token_answer(fake_token(1), clock() + DAY))
    start = clock()
    us.get_valid_token()
    clock.advance(HOUR)
    assert cli(us, "metrics") == 0
    text = capsys.readouterr().out
    names = families(text)
    assert {
        "kis_token_present", "kis_token_valid", "kis_token_renewal_due",
        "kis_token_expiry_timestamp_seconds", "kis_token_issued_timestamp_seconds",
        "kis_token_seconds_left", "kis_token_renewals", "kis_token_refusals", "kis_token_failures",
        "kis_token_last_renewal_success_timestamp_seconds", "kis_token_last_request_timestamp_seconds",
    } <= set(names)
    assert names["kis_token_renewals"].type == "counter" and names["kis_token_valid"].type == "gauge"
    labels = {"market": "us", "environment": "real"}
    assert value(text, "kis_token_seconds_left", **labels) == DAY - HOUR
    assert value(text, "kis_token_expiry_timestamp_seconds", **labels) == start + DAY
    assert value(text, "kis_token_issued_timestamp_seconds", **labels) == start
    assert value(text, "kis_token_valid", **labels) == 1
    assert value(text, "kis_token_present", **labels) == 1
    assert value(text, "kis_token_renewal_due", **labels) == 0
    assert value(text, "kis_token_renewals_total", **labels) == 1
    assert value(text, "kis_token_failures_total", **labels) == 0
    assert value(text, "kis_token_last_renewal_success_timestamp_seconds", **labels) == start
    assert value(text, "kis_token_last_request_timestamp_seconds", **labels) == start
    assert fake_token(1) not in text and US_KEY not in text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            assert sample.labels["market"] == "us" and sample.labels["environment"] == "real"
    assert token_calls(broker) == 1


def test_metrics_count_refusals_by_code_and_failures(us, clock, broker):
    hold(us, clock, fake_token(1), 50 * MINUTE)
    broker.add(responses.POST, TOKEN_URL, json=refusal("EGW00133"), status=403)
    broker.add(responses.POST, TOKEN_URL, json=refusal("EGW00105", "유효하지 않은 AppSecret"), status=403)
    broker.add(responses.POST, TOKEN_URL, status=503, body="<html>503</html>")
    assert us.get_valid_token() == fake_token(1)  # EGW00133
    clock.advance(MINUTE + 1)
    assert us.get_valid_token() == fake_token(1)  # EGW00105
    clock.advance(MINUTE + 1)
    assert us.get_valid_token() == fake_token(1)  # 503 after the retries
    with pytest.raises(RateLimitedError, match="one a minute"):
        us.refresh_token()  # held back by this host
    text = metrics.render(us)
    labels = {"market": "us", "environment": "real"}
    assert value(text, "kis_token_refusals_total", code="EGW00133", **labels) == 1
    assert value(text, "kis_token_refusals_total", code="EGW00105", **labels) == 1
    assert value(text, "kis_token_refusals_total", code="LOCAL", **labels) == 1
    assert value(text, "kis_token_failures_total", **labels) == 1
    assert value(text, "kis_token_renewals_total", **labels) == 0
    assert value(text, "kis_token_renewal_due", **labels) == 1
    assert value(text, "kis_token_valid", **labels) == 1
    assert value(text, "kis_token_seconds_left", **labels) == us.load_token().seconds_left(clock())
    assert value(text, "kis_token_last_renewal_success_timestamp_seconds", **labels) is None


def test_metrics_without_a_token(kr, broker):
    text = metrics.render(kr)
    labels = {"market": "kr", "environment": "real"}
    assert value(text, "kis_token_present", **labels) == 0
    assert value(text, "kis_token_valid", **labels) == 0
    for name in ("kis_token_seconds_left", "kis_token_expiry_timestamp_seconds",
                 "kis_token_last_renewal_success_timestamp_seconds"):
        assert value(text, name) is None, name
    assert "kis_token_seconds_left" in families(text)  # declared, without a sample
    assert token_calls(broker) == 0


def test_metrics_of_an_expired_token(us, clock):
    hold(us, clock, fake_token(1), HOUR)
    clock.advance(2 * HOUR)
    text = metrics.render(us)
    assert value(text, "kis_token_seconds_left") == -HOUR
    assert value(text, "kis_token_valid") == 0 and value(text, "kis_token_present") == 1


def test_metrics_textfile_is_written_atomically(us, clock, tmp_path, capsys):
    hold(us, clock, fake_token(1), 20 * HOUR)
    directory = tmp_path / "textfiles"
    directory.mkdir()
    path = directory / "kis_us.prom"
    path.write_text("# stale\n")
    inode = path.stat().st_ino
    assert cli(us, "metrics", "--textfile", str(path)) == 0
    assert capsys.readouterr().out == ""
    text = path.read_text()
    assert text == metrics.render(us)
    assert value(text, "kis_token_seconds_left") == 20 * HOUR
    assert stat.S_IMODE(path.stat().st_mode) == metrics.TEXTFILE_MODE
    assert path.stat().st_ino != inode  # replaced by a rename, not rewritten in place
    assert [p.name for p in directory.iterdir()] == ["kis_us.prom"]  # no temp file left


def test_metrics_textfile_failure_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "kis.prom"
    path.write_text("old\n")

    def broken_replace(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(StoreError, match="No space left"):
        metrics.write_textfile(path, "new\n")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["kis.prom"]


def test_metrics_textfile_bad_path_is_one_line_error(us, clock, tmp_path, capsys):
    hold(us, clock, fake_token(1), 20 * HOUR)
    assert cli(us, "metrics", "--textfile", str(tmp_path / "missing" / "kis.prom")) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    err = one_line(captured.err)
    assert "cannot write metrics" in err and "Traceback" not in err
    assert cli(us, "metrics", "--textfile", str(tmp_path)) == 1  # a directory
    assert "cannot write metrics" in one_line(capsys.readouterr().err)
    assert list(tmp_path.glob(".*.tmp")) == []


def test_metrics_with_a_missing_secret_is_a_configuration_error(make_manager, env, clock, capsys):
    hold(make_manager(KRTokenManager), clock, fake_token(1), 20 * HOUR)
    environ = {k: v for k, v in env.items() if k != "KIS_KR_APP_SECRET"}
    kr = make_manager(KRTokenManager, environ)
    assert cli(kr, "metrics") == 3
    assert "KIS_KR_APP_SECRET" in one_line(capsys.readouterr().err)


# -- alerts --------------------------------------------------------------------------------------


def assert_clean(text: str) -> None:
    """No token, app key, secret or webhook path in ``text``."""
    for secret in (fake_token(1), "SECRET-TOKEN", US_KEY, US_SECRET, KR_KEY, KR_SECRET, WEBHOOK_PATH,
                   "WEBHOOK-PATH-SECRET"):
        assert secret not in text


def test_refused_renewal_sends_one_alert_per_interval(alerting, clock, broker, receiver, caplog):
    us = alerting()
    hold(us, clock, fake_token(1), 55 * MINUTE)
    broker.add(responses.POST, TOKEN_URL, json=refusal("EGW00133"), status=403)
    assert us.get_valid_token() == fake_token(1)
    [text] = receiver.texts()
    assert "US" in text and "real" in text and "refused" in text
    assert "EGW00133" in text and "1분당 1회" in text
    assert "55m" in text  # time left on the current token
    assert_clean(text)
    assert us.load_renewal_state().alerts_sent == {"EGW00133": clock()}

    clock.advance(MINUTE + 1)
    assert us.get_valid_token() == fake_token(1)
    assert token_calls(broker) == 2 and len(receiver.posts) == 1  # same cause, within the interval

    clock.advance(alerts.ALERT_INTERVAL)  # 23 min left: still served, still refused
    assert us.get_valid_token() == fake_token(1)
    assert token_calls(broker) == 3 and len(receiver.texts()) == 2
    assert_clean(caplog.text)


def test_healthy_renewals_send_no_alert(alerting, clock, broker, receiver):
    us = alerting()
    broker.add(responses.POST, TOKEN_URL, json=token_answer(fake_token(1), clock() + DAY))
    broker.add(responses.POST, TOKEN_URL, json=token_answer(fake_token(2), clock() + DAY + 120))
    us.get_valid_token()
    clock.advance(120)
    assert us.refresh_token().access_token == fake_token(2)
    assert token_calls(broker) == 2 and receiver.posts == []
    assert us.load_renewal_state().alerts_sent == {}


def test_failed_renewal_without_a_token_alerts_no_valid_token(alerting, clock, broker, receiver):
    kr = alerting(KRTokenManager)
    broker.add(responses.POST, TOKEN_URL, status=503, body="<html>maintenance</html>")
    with pytest.raises(TokenUnavailableError):
        kr.get_valid_token()
    [text] = receiver.texts()
    assert "KR" in text and "failed" in text and "no valid token" in text.lower()
    assert_clean(text)
    assert set(kr.load_renewal_state().alerts_sent) == {"failed"}


def test_each_market_alerts_on_its_own(alerting, clock, broker, receiver):
    us, kr = alerting(USTokenManager), alerting(KRTokenManager)
    hold(us, clock, fake_token(1), 40 * MINUTE)
    hold(kr, clock, fake_token(2), 40 * MINUTE)
    broker.add(responses.POST, TOKEN_URL, json=refusal("EGW00133"), status=403)
    us.get_valid_token()
    kr.get_valid_token()
    texts = receiver.texts()
    assert len(texts) == 2
    assert "KIS US" in texts[0] and "KIS KR" in texts[1]


def test_dead_webhook_does_not_break_serving(alerting, clock, broker, caplog):
    port = closed_port()
    us = alerting(url=f"http://127.0.0.1:{port}{WEBHOOK_PATH}")
    hold(us, clock, fake_token(1), 50 * MINUTE)
    broker.add(responses.POST, TOKEN_URL, json=refusal("EGW00133"), status=403)
    assert us.get_valid_token() == fake_token(1)
    [record] = [r for r in caplog.records if r.name == "common.renewal.alerts"]
    assert record.levelname == "WARNING"
    assert f"http://127.0.0.1:{port}" in record.getMessage() and "ConnectionError" in record.getMessage()
    assert_clean(caplog.text)
    assert "EGW00133" in us.load_renewal_state().alerts_sent  # no retry storm on a dead hook


def test_webhook_error_status_is_a_warning(receiver, caplog):
    receiver.status = 500
    state = RenewalState()
    alerts.send_renewal_alert(
        receiver.url, state, alerts.Alert("us", "paper", "refused", "EGW00133", "slow down", 600), 1000.0,
    )
    assert len(receiver.texts()) == 1
    [record] = [r for r in caplog.records if r.name == "common.renewal.alerts"]
    assert record.levelname == "WARNING" and "HTTP 500" in record.getMessage()
    assert_clean(caplog.text)


def test_webhook_that_never_answers_times_out_quickly(caplog):
    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        started = time.monotonic()
        alerts.send_renewal_alert(
            f"http://127.0.0.1:{port}{WEBHOOK_PATH}", RenewalState(),
            alerts.Alert("kr", "real", "failed", None, "broker unreachable", None), 1000.0,
        )
        elapsed = time.monotonic() - started
    assert elapsed < alerts.CONNECT_TIMEOUT + alerts.READ_TIMEOUT + 1
    [record] = [r for r in caplog.records if r.name == "common.renewal.alerts"]
    assert "Timeout" in record.getMessage() and WEBHOOK_PATH not in record.getMessage()


@pytest.mark.parametrize(
    ("left", "expected"),
    [
        (3000.0, "stays valid for 50m 00s more"),
        (180.0, "no valid token (the current one has only 3m 00s left)"),
        (-60.0, "no valid token (the current one expired 1m 00s ago)"),
        (None, "no valid token (none is held)"),
    ],
)
def test_alert_text_tells_how_long_the_current_token_lasts(left, expected):
    text = alerts.alert_text(alerts.Alert(
        market="kr", environment="paper", outcome="refused", code="EGW00133",
        message="  접근토큰 발급 잠시 후\n 다시 시도하세요  ", seconds_left=left,
    ))
    assert expected in text.replace("There is no", "no")
    headline = text.splitlines()[0]
    assert headline == (
        ":warning: KIS KR (paper) token renewal refused: EGW00133 접근토큰 발급 잠시 후 다시 시도하세요"
    )


def test_bad_webhook_url_is_a_warning(caplog):
    alert = alerts.Alert("us", "real", "failed", None, None, None)
    alerts.send_renewal_alert("not a url", RenewalState(), alert, 1000.0)
    [record] = [r for r in caplog.records if r.name == "common.renewal.alerts"]
    assert record.levelname == "WARNING" and "invalid URL" in record.getMessage()


def test_alert_interval_is_per_cause(receiver):
    state = RenewalState()

    def send(code: str | None, outcome: str, now: float) -> None:
        alert = alerts.Alert("us", "real", outcome, code, "m", 3000)
        alerts.send_renewal_alert(receiver.url, state, alert, now)

    send("EGW00133", "refused", 1000.0)
    send("EGW00133", "refused", 1000.0 + alerts.ALERT_INTERVAL - 1)
    send("EGW00105", "refused", 1100.0)  # another code: another cause
    send(None, "failed", 1200.0)  # no code: the outcome is the cause
    send(None, "failed", 1300.0)
    assert len(receiver.posts) == 3
    assert state.alerts_sent == {"EGW00133": 1000.0, "EGW00105": 1100.0, "failed": 1200.0}
    send("EGW00133", "refused", 1000.0 + alerts.ALERT_INTERVAL)
    assert len(receiver.posts) == 4
    assert state.alerts_sent["EGW00133"] == 1000.0 + alerts.ALERT_INTERVAL
