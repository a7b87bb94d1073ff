"""The operator at 3 a.m. (issue 17), the rest: true renewal lines, the last failure beside the token,
a progress line for a slow renewal, and docstrings and tables that say what they mean."""

from __future__ import annotations

import json
import socket

import pytest
import responses

from common.cli.market import main
from tests.conftest import DAY, REAL_HOST, TOKEN_URL, fake_token, refusal, token_answer

REVOKE_URL = REAL_HOST + "/oauth2/revokeP"


def cli(manager, *args: str) -> int:
    return main(lambda: manager, list(args), market=manager.market.upper())


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound, then closed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# -- 1. renewal lines that are true --------------------------------------------------------------------


def test_refresh_answered_with_the_same_token_says_so_and_until_when(us, clock, capsys):
    with responses.RequestsMock() as mock:
        mock.post(TOKEN_URL, json=token_answer(fake_token(1), clock() + DAY))
        assert cli(us, "get") == 0
        clock.advance(120)
        mock.post(TOKEN_URL, json=token_answer(fake_token(1), clock() + DAY - 120))
        capsys.readouterr()
        assert cli(us, "refresh") == 0
    out = capsys.readouterr().out
    assert "US token not renewed: the broker re-sent the same token eyJ0...dXJl" in out
    assert "still valid until 2026-11-25T08:00:00+09:00 (in 23h 58m)" in out
    assert "token renewed" not in out and fake_token(1) not in out


def test_refresh_after_delete_answered_with_the_earlier_token_says_it_was_re_sent(us, clock, capsys):
    with responses.RequestsMock() as mock:
        mock.post(TOKEN_URL, json=token_answer(fake_token(1), clock() + DAY))
        assert cli(us, "get") == 0
        assert cli(us, "delete") == 0
        clock.advance(120)
        mock.post(TOKEN_URL, json=token_answer(fake_token(1), clock() + DAY - 120))  # within 6 h: re-sent
        capsys.readouterr()
        assert cli(us, "refresh") == 0
        out = capsys.readouterr().out
        assert "US token not renewed: the broker re-sent a token it had issued earlier" in out
        assert "token renewed" not in out
        clock.advance(7 * 3600)
        mock.post(TOKEN_URL, json=token_answer(fake_token(2), clock() + DAY))  # after 6 h: a new one
        assert cli(us, "refresh") == 0
    assert "US token renewed:" in capsys.readouterr().out


@pytest.mark.parametrize("how", ["revoke", "delete"])
def test_check_after_a_revoke_or_delete_claims_no_renewal(us, clock, capsys, how):
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.post(TOKEN_URL, json=token_answer(fake_token(1), clock() + DAY))
        mock.post(REVOKE_URL, json={"code": 200, "message": "접근토큰 폐기에 성공하였습니다"})
        assert cli(us, "get") == 0
        assert cli(us, "check") == 0
        assert "last renewal: renewed at 2026-11-24T08:00:00+09:00" in capsys.readouterr().out
        clock.advance(30)
        assert cli(us, how) == 0
    capsys.readouterr()
    assert cli(us, "check") == 2
    out = capsys.readouterr().out
    done = "revoked" if how == "revoke" else "deleted"
    assert (f"last renewal: none since the token was {done} at 2026-11-24T08:00:30+09:00 "
            "(before it: renewed at 2026-11-24T08:00:00+09:00)") in out
    assert "last renewal: renewed" not in out
    assert cli(us, "check", "--json") == 2
    info = json.loads(capsys.readouterr().out)
    assert info["removed"] == {"how": done, "at": "2026-11-24T08:00:30+09:00"}
    assert info["last_renewal"]["outcome"] == "renewed"  # the key's last request, as documented

    clock.advance(60)  # a renewal after the removal stands again
    with responses.RequestsMock() as mock:
        mock.post(TOKEN_URL, json=token_answer(fake_token(2), clock() + DAY))
        assert cli(us, "get") == 0
    capsys.readouterr()
    assert cli(us, "check", "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["removed"] is None and info["last_renewal"]["outcome"] == "renewed"


# -- 2. the last failure beside the token ------------------------------------------------------------


def test_a_refused_secret_is_the_last_failure_in_check_and_its_json(us, clock, capsys):
    with responses.RequestsMock() as mock:
        mock.post(TOKEN_URL, status=403, json=refusal("EGW00105", "유효하지 않은 AppSecret입니다."))
        assert cli(us, "get") == 3
    capsys.readouterr()
    assert cli(us, "check") == 2
    out = capsys.readouterr().out
    assert "  last failure: refused EGW00105 at 2026-11-24T08:00:00+09:00" in out
    assert "유효하지 않은 AppSecret" in out
    assert cli(us, "check", "--json") == 2
    failure = json.loads(capsys.readouterr().out)["last_failure"]
    assert failure["kind"] == "refused" and failure["code"] == "EGW00105"
    assert failure["summary"] == "refused EGW00105"

    clock.advance(61)  # fixed: a success clears it
    with responses.RequestsMock() as mock:
        mock.post(TOKEN_URL, json=token_answer(fake_token(1), clock() + DAY))
        assert cli(us, "get") == 0
    capsys.readouterr()
    assert cli(us, "check", "--json") == 0
    assert json.loads(capsys.readouterr().out)["last_failure"] is None


def test_an_unreachable_broker_is_the_last_failure_naming_its_url(make_manager, env, capsys):
    from us.token_manager import USTokenManager

    url = f"http://127.0.0.1:{closed_port()}"
    us = make_manager(USTokenManager, {**env, "KIS_BASE_URL": url})
    assert cli(us, "get") == 1
    capsys.readouterr()
    assert cli(us, "check", "--json") == 2
    failure = json.loads(capsys.readouterr().out)["last_failure"]
    assert failure["kind"] == "failed" and failure["code"] is None
    assert failure["summary"] == f"broker unreachable ({url}/oauth2/tokenP)"
    assert "connection refused" in failure["message"]


def test_a_record_that_cannot_be_written_is_a_store_failure(us, capsys):
    us.store.record.path.parent.mkdir(parents=True, exist_ok=True)
    us.store.record.path.mkdir()
    assert cli(us, "check", "--json") == 2
    failure = json.loads(capsys.readouterr().out)["last_failure"]
    assert failure["kind"] == "store" and failure["summary"] == "the token record cannot be written"
    assert "is a directory, not a file: remove it" in failure["message"]


def test_an_unreachable_shared_store_is_the_last_failure(make_manager, env, capsys):
    from us.token_manager import USTokenManager

    store_url = f"redis://127.0.0.1:{closed_port()}/0"
    us = make_manager(USTokenManager, {**env, "KIS_TOKEN_STORE": store_url})
    cli(us, "check", "--json")
    failure = json.loads(capsys.readouterr().out)["last_failure"]
    assert failure["kind"] == "store" and failure["summary"] == f"store unreachable ({store_url})"
    assert failure["message"]


def test_status_shows_each_markets_last_failure_beside_its_token(make_manager, env, clock, monkeypatch,
                                                                  tmp_path, capsys):
    from kis_token import console
    from us.token_manager import USTokenManager

    us = make_manager(USTokenManager)
    with responses.RequestsMock() as mock:
        mock.post(TOKEN_URL, status=403, json=refusal("EGW00105", "유효하지 않은 AppSecret입니다."))
        assert cli(us, "get") == 3
    monkeypatch.chdir(tmp_path)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    capsys.readouterr()
    assert console.main(["status"]) == 2
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[-2:] == ["LAST", "FAILURE"]
    us_row = next(line for line in lines if line.startswith("us "))
    kr_row = next(line for line in lines if line.startswith("kr "))
    assert us_row.endswith("refused EGW00105 (2026-11-24 08:00)")
    assert kr_row.endswith("-")
    assert console.main(["status", "--json"]) == 2
    markets = json.loads(capsys.readouterr().out)["markets"]
    assert markets["us"]["last_failure"]["summary"] == "refused EGW00105"
    assert markets["kr"]["last_failure"] is None


def test_status_without_failures_keeps_its_table(make_manager, env, monkeypatch, tmp_path, capsys):
    from kis_token import console

    monkeypatch.chdir(tmp_path)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert console.main(["status"]) == 2
    header = capsys.readouterr().out.splitlines()[0]
    assert header.split() == ["MARKET", "ENV", "KEY", "STATE", "EXPIRES", "LEFT", "TOKEN"]


# -- 3. a line while a renewal waits ------------------------------------------------------------------


class TickingClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_progress_line_names_the_request_after_two_seconds_then_every_five():
    from common.cli.progress import PROGRESS_AFTER, Progress, RequestWatch

    clock, lines = TickingClock(), []
    watch = RequestWatch()
    progress = Progress("US", "token", watch, lines.append, clock=clock)
    clock.now += PROGRESS_AFTER - 0.1
    progress.tick()
    assert lines == []
    clock.now += 0.2
    progress.tick()
    assert lines == ["waiting for the us token's lock or store (another process may be renewing it) (2 s)"]
    watch.current = ("POST", "https://openapi.koreainvestment.com:9443/oauth2/tokenP")
    clock.now += 3
    progress.tick()
    assert len(lines) == 1  # the next one is due 5 s after the first
    clock.now += 2
    progress.tick()
    assert lines[1] == ("waiting for the broker: us token request to "
                        "https://openapi.koreainvestment.com:9443/oauth2/tokenP (7 s)")
    watch.current = ("GET", "https://user:pw@broker.example/")
    assert Progress("KR", "approval key", watch, lines.append, clock=clock).line(3.2) == (
        "waiting for the broker: kr clock reading to https://user:***@broker.example/ (3 s)")


@pytest.mark.parametrize(("verbose", "quiet", "tty", "shown"), [
    (0, False, False, False), (1, False, False, True), (0, False, True, True), (2, True, True, False),
])
def test_the_progress_line_is_shown_on_a_terminal_or_with_v_never_with_q(verbose, quiet, tty, shown):
    from common.cli.progress import wanted

    class Stream:
        def isatty(self) -> bool:
            return tty

    assert wanted(verbose, quiet, Stream()) is shown


def test_a_slow_renewal_says_what_it_waits_for_on_stderr_with_v(us, clock, monkeypatch, capsys):
    import threading

    from common.cli import progress

    written = threading.Event()
    write = progress.write_stderr

    def spy(line: str) -> None:
        write(line)
        if "waiting for the broker" in line:
            written.set()

    monkeypatch.setattr(progress, "PROGRESS_AFTER", 0.0)  # no waiting for the threshold in a test
    monkeypatch.setattr(progress, "PROGRESS_EVERY", 0.01)
    monkeypatch.setattr(progress, "POLL", 0.01)
    monkeypatch.setattr(progress, "write_stderr", spy)

    def slow_broker(request):
        assert written.wait(10), "no progress line while the request was under way"
        return 200, {}, json.dumps(token_answer(fake_token(1), clock() + DAY))

    with responses.RequestsMock() as mock:
        mock.add_callback(responses.POST, TOKEN_URL, callback=slow_broker)
        assert cli(us, "-v", "get") == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == fake_token(1)
    assert f"waiting for the broker: us token request to {TOKEN_URL} (" in captured.err
    assert us.session is None  # the manager's own session is given back


def test_no_progress_line_without_v_off_a_terminal(us, clock, monkeypatch, capsys):
    from common.cli import progress

    def never(*args, **kwargs):
        raise AssertionError("the progress watcher was started")

    monkeypatch.setattr(progress, "watching", never)
    with responses.RequestsMock() as mock:
        mock.post(TOKEN_URL, json=token_answer(fake_token(1), clock() + DAY))
        assert cli(us, "get") == 0  # capsys: stderr is not a terminal
    assert "waiting for" not in capsys.readouterr().err


# -- 4. docstrings say the fact, not where a file outside the repository says it --------------------


def test_no_source_file_cites_a_document_that_is_not_in_the_repository():
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    for package in ("common", "us", "kr", "kis_token", "bench"):
        for path in (repo / package).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            for cited in ("SPEC §", "SPEC.md", "KIS_FACTS"):
                assert cited not in text, f"{path.relative_to(repo)} cites {cited}"
    assert not (repo / "SPEC.md").exists() and not (repo / "KIS_FACTS.md").exists()


# -- 8. the test command stays short; the slow tests still run in CI ----------------------------------


def test_slow_tests_are_left_out_of_the_plain_run_and_ci_runs_them():
    import tomllib
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    options = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "-m 'not slow'" in options["addopts"] and any(m.startswith("slow:") for m in options["markers"])
    ci = [line.split("#")[0].strip() for line in (repo / ".ci" / "run").read_text().splitlines()]
    assert "python -m pytest" in ci and "python -m pytest -m slow" in ci
    slow_files = ("test_bench.py", "test_bench_faults.py", "test_bench_redis_store.py",
                  "test_cli_newcomer.py")
    for name in slow_files:
        assert "@pytest.mark.slow" in (repo / "tests" / name).read_text(), name
    assert "python -m pytest -m slow" in (repo / "README.md").read_text()
