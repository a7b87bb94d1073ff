"""Several hosts on one app key through a real Redis/Valkey server on 127.0.0.1 (issue 11, SPEC §10).

A "host" is a token directory of its own (its files, its file lock) with ``KIS_TOKEN_STORE``
pointing at the test's server. The server is a real one (``common.sandbox.redis_server``), started and
stopped by each test; time is the injected clock, never slept through.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import secrets
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.lock
import responses

from common.cli.market import main
from common.credentials.identity import Credential
from common.credentials.kis_client import DEFAULT_TIMEOUTS
from common.credentials.records import TokenRecord
from common.errors import ConfigError, LockTimeoutError, StoreError
from common.renewal.policy import LOCK_WAIT
from common.sandbox.process import finish
from common.sandbox.redis_server import RedisServer
from common.settings import Settings
from common.store import redis_link, redis_store, selection
from kr.token_manager import KRTokenManager
from tests.conftest import (
    DAY,
    KR_KEY,
    REAL_HOST,
    TOKEN_URL,
    US_KEY,
    US_SECRET,
    assert_a_refresh_reaches_a_running_process,
    fake_token,
    refusal,
    spawn,
    token_answer,
)
from us.token_manager import USTokenManager

REPO = Path(__file__).resolve().parent.parent
LEASE = selection.lease(LOCK_WAIT, DEFAULT_TIMEOUTS.longest_request)
PASSWORD = "store-pw-" + "q7Zr" * 4


@pytest.fixture
def server(tmp_path) -> Iterator[RedisServer]:
    """A real server on a free 127.0.0.1 port, with a password."""
    started = RedisServer(tmp_path / "redis", password=PASSWORD).start()
    yield started
    started.stop()
    for link in redis_link._links.values():
        link.client.close()
    redis_link._links.clear()


@pytest.fixture
def host(make_manager, env, server, tmp_path) -> Callable[..., Any]:
    """``host("a")``: a manager on host ``a`` (its own token directory), sharing the test's server.

    ``retry_interval`` builds the store by hand, so that a test may restart the server and be
    answered at once; otherwise the store is the one ``KIS_TOKEN_STORE`` selects.
    """

    def build(name: str, cls: type = USTokenManager, environ: dict[str, str] | None = None,
              retry_interval: float | None = None, **kwargs: Any) -> Any:
        environ = {**(environ or env), "KIS_TOKEN_DIR": str(tmp_path / name), "KIS_TOKEN_STORE": server.url}
        if retry_interval is not None:
            key = environ["KIS_US_APP_KEY" if cls is USTokenManager else "KIS_KR_APP_KEY"]
            key_id = Credential.of("real", REAL_HOST, key).key_id
            kwargs["store"] = redis_store.shared_key_store(server.url, tmp_path / name, key_id, lease=LEASE,
                                                           retry_interval=retry_interval)
        return make_manager(cls, environ, **kwargs)

    return build


def broker(mock: responses.RequestsMock, clock: Callable[[], float], tokens: list[str]) -> None:
    """Answer each token request with the next of ``tokens``, then with EGW00133."""

    def callback(request: Any) -> tuple[int, dict[str, str], str]:
        if not tokens:
            return 403, {}, json.dumps(refusal())
        return 200, {}, json.dumps(token_answer(tokens.pop(0), clock() + DAY))

    mock.add_callback(responses.POST, TOKEN_URL, callback=callback)


def key_file(tmp_path: Path, name: str, key: str = US_KEY) -> Path:
    return tmp_path / name / f"key-{Credential.of('real', REAL_HOST, key).key_id}.json"


def stored_token(tmp_path: Path, name: str) -> str:
    return TokenRecord.from_json(key_file(tmp_path, name).read_text()).access_token


def record_key(server: RedisServer, key: str = US_KEY, base_url: str = REAL_HOST) -> bytes:
    return redis_store.key_names(Credential.of("real", base_url, key).key_id)["record"].encode()


# -- in one process, on the injected clock -----------------------------------------------------------


def test_refresh_on_host_a_is_served_by_host_bs_running_and_new_processes(host, clock, tmp_path):
    a, b = host("a"), host("b")
    with responses.RequestsMock() as mock:
        broker(mock, clock, [fake_token(1), fake_token(2)])
        assert a.get_valid_token() == fake_token(1)
        assert b.get_valid_token() == fake_token(1)  # from the store: no request
        assert len(mock.calls) == 1
        clock.advance(120)
        assert b.get_valid_token() == fake_token(1)
        assert a.refresh_token().access_token == fake_token(2)
        assert b.get_valid_token() == fake_token(1)  # served from memory until the next sync...
        clock.advance(b.windows.sync_interval)
        assert b.get_valid_token() == fake_token(2)  # ...one sync interval (1 s) later: the new one
        assert host("b").get_valid_token() == fake_token(2)  # a new process on host B
        assert len(mock.calls) == 2
    # host B's own files follow the store: the key's record and the market's story files
    assert stored_token(tmp_path, "b") == fake_token(2)
    assert TokenRecord.from_json(b.mirror.record_path.read_text()).access_token == fake_token(2)


def test_one_key_in_both_markets_on_two_hosts_costs_one_request(host, env, clock):
    one_key = {**env, "KIS_KR_APP_KEY": US_KEY, "KIS_KR_APP_SECRET": US_SECRET}
    with responses.RequestsMock() as mock:
        broker(mock, clock, [fake_token(1)])
        markets = (USTokenManager, KRTokenManager)
        managers = [host(name, cls, one_key) for name in ("a", "b") for cls in markets]
        assert {manager.get_valid_token() for manager in managers} == {fake_token(1)}
        assert len(mock.calls) == 1
    for manager in managers:
        assert TokenRecord.from_json(manager.mirror.record_path.read_text()).market == manager.market


def test_store_stopped_mid_run_keeps_serving_and_renews_locally_with_a_warning(
    host, server, clock, tmp_path, caplog
):
    a, b = host("a", retry_interval=0.0), host("b", retry_interval=0.0)
    with responses.RequestsMock() as mock:
        broker(mock, clock, [fake_token(1), fake_token(2)])
        assert a.get_valid_token() == b.get_valid_token() == fake_token(1)
        server.stop()
        caplog.set_level(logging.WARNING)
        started = time.monotonic()
        clock.advance(3600)
        # valid tokens keep being served: from memory, and by a new process from the host's files
        assert a.get_valid_token() == b.get_valid_token() == host("b").get_valid_token() == fake_token(1)
        assert len(mock.calls) == 1
        clock.advance(DAY - 3600 - 4 * 60)  # under the 5-min margin: a renewal is needed
        assert b.get_valid_token() == fake_token(2)
        assert time.monotonic() - started < 5
        assert len(mock.calls) == 2
    assert stored_token(tmp_path, "b") == fake_token(2)  # renewed on host B's files...
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("common.store.redis_")]
    masked = f"redis://:***@127.0.0.1:{server.port}/0"
    assert any("unreachable" in m and masked in m and "serves and renews" in m for m in messages)
    assert any("holding only this host's lock" in m for m in messages)  # ...under its file lock
    # once per outage and connection: hosts A and B share one here, host B's new process has its own
    assert sum("serves and renews" in m for m in messages) == 2
    assert all(PASSWORD not in r.getMessage() for r in caplog.records)


def test_store_that_never_answers_costs_one_short_wait(make_manager, env, tmp_path, clock):
    with socket.socket() as silent:  # accepts connections (the kernel does), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"redis://:{PASSWORD}@127.0.0.1:{silent.getsockname()[1]}/0"
        manager = make_manager(USTokenManager, {**env, "KIS_TOKEN_STORE": url})
        started = time.monotonic()
        with responses.RequestsMock() as mock:
            broker(mock, clock, [fake_token(1)])
            assert manager.get_valid_token() == fake_token(1)
            for _ in range(5):
                clock.advance(1.0)
                assert manager.get_valid_token() == fake_token(1)
            assert len(mock.calls) == 1
        assert time.monotonic() - started < 3  # one 0.5 s timeout, then the server rests
        info = manager.get_token_info()["store"]
        assert info["reachable"] is False and "Timeout" in info["error"]
    redis_link._links.pop((url, redis_store.RETRY_INTERVAL)).client.close()


def test_store_restarted_empty_gets_the_record_back_without_a_request(host, server, clock, tmp_path):
    a = host("a")  # the store KIS_TOKEN_STORE selects: the restart must not make it rest
    with responses.RequestsMock() as mock:
        broker(mock, clock, [fake_token(1)])
        assert a.get_valid_token() == fake_token(1)
        server.stop()
        server.start()
        assert server.dump() == {}
        clock.advance(a.windows.sync_interval)
        assert a.get_valid_token() == fake_token(1)  # the running process put it back...
        assert record_key(server) in server.dump()
        assert host("c").get_valid_token() == fake_token(1)  # ...so a host with no token takes it
        assert len(mock.calls) == 1
    assert stored_token(tmp_path, "c") == fake_token(1)


def test_store_restarted_empty_is_refilled_by_a_new_process_of_a_host_that_holds_the_token(
    host, server, clock
):
    with responses.RequestsMock() as mock:
        broker(mock, clock, [fake_token(1)])
        assert host("a").get_valid_token() == fake_token(1)
        server.stop()
        server.start()
        assert host("a", KRTokenManager).load_token() is None  # another key: nothing to put back
        assert host("a").get_valid_token() == fake_token(1)  # a cron job on host A
        assert host("b").get_valid_token() == fake_token(1)
        assert len(mock.calls) == 1


def test_the_newest_token_wins_when_the_store_comes_back(host, server, clock, tmp_path):
    a, b = host("a", retry_interval=0.0), host("b", retry_interval=0.0)
    with responses.RequestsMock() as mock:
        broker(mock, clock, [fake_token(1), fake_token(2)])
        assert a.get_valid_token() == b.get_valid_token() == fake_token(1)
        server.stop()
        clock.advance(120)
        assert b.refresh_token().access_token == fake_token(2)  # on host B's own, while the store is down
        server.start()
        clock.advance(1.0)
        assert a.get_valid_token() == fake_token(1)  # A puts its copy back first...
        clock.advance(1.0)
        assert b.get_valid_token() == fake_token(2)  # ...B's later-expiring token replaces it...
        clock.advance(1.0)
        assert a.get_valid_token() == fake_token(2)  # ...and every host converges on the newest
        assert len(mock.calls) == 2
    assert stored_token(tmp_path, "a") == fake_token(2)


def test_delete_on_one_host_is_not_undone_by_another(host, server, clock, tmp_path):
    a, b = host("a"), host("b")
    with responses.RequestsMock() as mock:
        broker(mock, clock, [fake_token(1), fake_token(2)])
        assert a.get_valid_token() == b.get_valid_token() == fake_token(1)
        removed = a.delete_token()
        assert any(str(record_key(server).decode()) in path for path in removed)
        clock.advance(b.windows.sync_interval)
        assert b.load_token() is None  # B does not put its copy back
        assert not key_file(tmp_path, "b").exists()
        clock.advance(60)
        assert b.get_valid_token() == fake_token(2)
        assert len(mock.calls) == 2


def test_the_approval_key_is_shared_by_the_hosts_too(host, env, server, clock, tmp_path):
    approval = "a1b2c3d4-0000-4000-8000-approvalkey01"
    one_key = {**env, "KIS_KR_APP_KEY": US_KEY, "KIS_KR_APP_SECRET": US_SECRET}
    with responses.RequestsMock() as mock:
        mock.post(REAL_HOST + "/oauth2/Approval", json={"approval_key": approval})
        assert host("a").get_approval_key() == approval
        assert host("b", KRTokenManager, one_key).get_approval_key() == approval
        assert len(mock.calls) == 1
    key_id = Credential.of("real", REAL_HOST, US_KEY).key_id
    names = redis_store.key_names(key_id, "approval")
    assert names["record"] == f"kis-token:v1:{key_id}:approval:record"
    stored = server.dump()[names["record"].encode()].decode()
    assert approval in stored and US_KEY not in stored and US_SECRET not in stored
    assert approval in (tmp_path / "b" / f"key-{key_id}.approval.json").read_text()  # host B's copy


def test_store_holds_no_app_key_or_secret(host, env, server, clock):
    keys = {
        "KIS_US_APP_KEY": "PS" + secrets.token_urlsafe(26)[:34],
        "KIS_US_APP_SECRET": secrets.token_urlsafe(135),
        "KIS_KR_APP_KEY": "PS" + secrets.token_urlsafe(26)[:34],
        "KIS_KR_APP_SECRET": secrets.token_urlsafe(135),
    }
    environ = {**env, **keys}
    with responses.RequestsMock() as mock:
        broker(mock, clock, [fake_token(1), fake_token(2)])
        us, kr = host("a", USTokenManager, environ), host("b", KRTokenManager, environ)
        us.get_valid_token()
        kr.get_valid_token()
        clock.advance(120)
        with pytest.raises(Exception, match="EGW00133"):
            us.refresh_token()  # the state now holds the broker's message
        with us.store.lock.hold(1):
            dump = server.dump()  # the lock's owner value too
    assert len(dump) == 5  # two records, two states, one lock
    text = b"\n".join(name + b"=" + value for name, value in dump.items()).decode()
    assert "EGW00133" in text and fake_token(1) in text
    for value in keys.values():
        fragments = {value[i:i + 8] for i in range(len(value) - 7)}
        assert not [fragment for fragment in fragments if fragment in text]


def test_check_says_which_store_is_used_and_whether_it_answers(host, server, clock, capsys):
    a = host("a")
    with responses.RequestsMock() as mock:
        broker(mock, clock, [fake_token(1)])
        a.get_valid_token()
    masked = f"redis://:***@127.0.0.1:{server.port}/0"
    assert main(lambda: a, ["check", "--json"], market="US") == 0
    info = json.loads(capsys.readouterr().out)
    key_id = Credential.of("real", REAL_HOST, US_KEY).key_id
    assert info["schema"] == 1
    assert info["store"] == {"kind": "redis", "url": masked, "reachable": True, "misconfigured": False,
                             "error": None, "prefix": f"kis-token:v1:{key_id}:"}
    assert main(lambda: a, ["check"], market="US") == 0
    out, err = capsys.readouterr()
    assert f"  store:    {masked} (answers)\n" in out
    server.stop()
    clock.advance(1.0)
    check = host("a")  # a new `check` process with the store down: the token is valid from the files
    assert main(lambda: check, ["check", "--json"], market="US") == 0
    out, err = capsys.readouterr()
    info = json.loads(out)
    assert info["store"]["reachable"] is False and "ConnectionError" in info["store"]["error"]
    assert info["status"] == "ok" and info["token"] == "eyJ0...dXJl"
    assert PASSWORD not in out + err


#: The README's ACL: only the package's keys, only the commands it sends.
README_ACL = ["~kis-token:*", "resetchannels", "-@all", "+get", "+set", "+del", "+eval", "+evalsha",
              "+script|load", "+watch", "+multi", "+exec", "+ping", "+pexpire"]


def add_user(server: RedisServer, name: str, password: str) -> None:
    server.client().execute_command("ACL", "SETUSER", name, "on", ">" + password, *README_ACL)


def test_user_name_and_password_in_the_url_with_the_readmes_acl(server, make_manager, env, clock,
                                                                  tmp_path, caplog):
    user_password = "trader-pw-" + secrets.token_hex(8)
    add_user(server, "trader", user_password)
    url = f"redis://trader:{user_password}@127.0.0.1:{server.port}/0"
    caplog.set_level(logging.WARNING)
    with responses.RequestsMock() as mock:
        broker(mock, clock, [fake_token(1), fake_token(2)])
        manager = make_manager(USTokenManager, {**env, "KIS_TOKEN_STORE": url})
        assert manager.get_valid_token() == fake_token(1)
        assert record_key(server) in server.dump()
        server.stop()
        server.start()  # empty, and without the user: put the ACL back, then the record
        add_user(server, "trader", user_password)
        clock.advance(manager.windows.sync_interval)
        assert manager.get_valid_token() == fake_token(1)  # put back (WATCH, MULTI, EXEC)
        manager.delete_token()  # SET ... GET
        clock.advance(60)
        assert manager.get_valid_token() == fake_token(2)  # the lock (SET NX PX, then Lua to release)
        assert len(mock.calls) == 2
    assert record_key(server) in server.dump()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], "every command was allowed"
    wrong = f"redis://trader:wrong-{user_password}@127.0.0.1:{server.port}/0"
    other = make_manager(USTokenManager, {**env, "KIS_TOKEN_STORE": wrong,
                                          "KIS_TOKEN_DIR": str(tmp_path / "other")})
    assert other.get_token_info()["store"]["reachable"] is False
    assert any("unreachable" in r.getMessage() for r in caplog.records)
    assert all(user_password not in r.getMessage() for r in caplog.records)


def test_unix_socket_url(server, make_manager, env, clock):
    with responses.RequestsMock() as mock:
        broker(mock, clock, [fake_token(1)])
        manager = make_manager(USTokenManager, {**env, "KIS_TOKEN_STORE": server.unix_url})
        assert manager.get_valid_token() == fake_token(1)
        assert manager.get_token_info()["store"]["reachable"] is True
    assert record_key(server) in server.dump()


def test_lock_is_a_lease_longer_than_the_retry_budget_owned_by_a_random_value(host, server):
    assert LOCK_WAIT + DEFAULT_TIMEOUTS.budget + DEFAULT_TIMEOUTS.attempt < LEASE
    a = host("a")
    name = redis_store.key_names(a.credential.key_id)["lock"]
    owners = []
    for _ in range(2):
        with a.store.lock.hold(1):
            with a.store.lock.hold(0):  # re-entrant within a thread
                pass
            client = server.client()
            owners.append(client.get(name))
            assert 0 < client.pttl(name) <= LEASE * 1000
        assert client.get(name) is None  # released by its owner
    assert owners[0] != owners[1] and all(len(owner) == 32 for owner in owners)


# -- real processes, against the sandbox ---------------------------------------------------------------


@pytest.fixture
def proc_env(env, sandbox_process, server) -> dict[str, str]:
    """Environment for child processes: the test's keys, the sandbox, the store."""
    return {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO), "KIS_DOTENV_PATH": os.devnull,
            "KIS_BASE_URL": sandbox_process.base_url, "KIS_TOKEN_STORE": server.url, **env}


def on_host(environ: dict[str, str], tmp_path: Path, name: str) -> dict[str, str]:
    """``environ`` for a process on host ``name`` (its own token directory)."""
    return {**environ, "KIS_TOKEN_DIR": str(tmp_path / name)}


@pytest.mark.parametrize("keys", ["one key", "two keys"])
def test_two_hosts_times_both_markets_from_cold_cost_one_request_per_key(
    proc_env, sandbox_process, tmp_path, keys
):
    if keys == "one key":
        proc_env = {**proc_env, "KIS_KR_APP_KEY": US_KEY, "KIS_KR_APP_SECRET": US_SECRET}
    sandbox_process.control("faults", {"mode": "slow", "delay": 0.5, "count": 2})  # widen the race
    runs = [(name, market) for _ in range(3) for name in ("a", "b") for market in ("us", "kr")]
    processes = [spawn([f"{market}.token_manager", "get"], on_host(proc_env, tmp_path, name))
                 for name, market in runs]
    results = finish(processes)
    assert all(code == 0 for code, _, _ in results), [err for code, _, err in results if code]
    paired = list(zip(runs, results, strict=True))
    tokens = {market: {out.strip() for (_, m), (_, out, _) in paired if m == market}
              for market in ("us", "kr")}
    assert len(tokens["us"]) == len(tokens["kr"]) == 1
    assert sandbox_process.counters()["token_requests"] == (
        {US_KEY: 1} if keys == "one key" else {US_KEY: 1, KR_KEY: 1})
    assert (tokens["us"] == tokens["kr"]) is (keys == "one key")
    for name in ("a", "b"):  # every host mirrors both markets in its own files
        for market in ("us", "kr"):
            mirrored = TokenRecord.from_json((tmp_path / name / f"{market}_api_token.json").read_text())
            assert {mirrored.access_token} == tokens[market]


def test_a_running_process_on_host_b_picks_up_a_refresh_on_host_a(proc_env, tmp_path):
    host_a, host_b = on_host(proc_env, tmp_path, "a"), on_host(proc_env, tmp_path, "b")
    seeder = USTokenManager(Settings(host_a, dotenv_path=False))
    assert_a_refresh_reaches_a_running_process(seeder, host_b, host_a)


def test_lock_log_written_by_processes_on_two_hosts_never_interleaves(proc_env, tmp_path):
    log = tmp_path / "lock.log"
    processes = [spawn(["tests.mp_worker", "lock", str(log), "10"], on_host(proc_env, tmp_path, name))
                 for name in ("a", "b") for _ in range(3)]
    assert all(code == 0 for code, _, _ in finish(processes))
    lines = log.read_text().splitlines()
    assert len(lines) == 6 * 10 * 2
    for enter, leave in zip(lines[::2], lines[1::2], strict=True):
        assert enter.startswith("enter ") and leave == "leave " + enter.split()[1]


def _hold_lock_forever(url: str, directory: str, key_id: str, lease: float, ready: Any) -> None:
    store = redis_store.shared_key_store(url, Path(directory), key_id, lease=lease)
    with store.lock.hold(5):
        ready.set()
        time.sleep(120)


def _get_token(environ: dict[str, str], url: str, key_id: str, lease: float, results: Any) -> None:
    store = redis_store.shared_key_store(url, Path(environ["KIS_TOKEN_DIR"]), key_id, lease=lease)
    manager = USTokenManager(Settings(environ, dotenv_path=False), store=store)
    results.put(manager.get_valid_token())


def test_a_holder_killed_with_the_lock_held_delays_the_others_only_until_its_lease_runs_out(
    proc_env, sandbox_process, server, tmp_path
):
    lease = 1.5
    key_id = Credential.of("real", sandbox_process.base_url, US_KEY).key_id
    lock_name = redis_store.key_names(key_id)["lock"]
    context = multiprocessing.get_context("fork")
    ready, results = context.Event(), context.Queue()
    holder = context.Process(target=_hold_lock_forever, daemon=True,
                             args=(server.url, str(tmp_path / "a"), key_id, lease, ready))
    holder.start()
    assert ready.wait(10)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(10)
    assert server.client().pttl(lock_name) > 0  # the dead holder's lease is still there
    waiters = [context.Process(target=_get_token, daemon=True,
                               args=(on_host(proc_env, tmp_path, name), server.url,
                                     key_id, lease, results))
               for name in ("b", "b", "c")]
    for waiter in waiters:
        waiter.start()
    try:
        tokens = {results.get(timeout=30) for _ in waiters}
    finally:
        for waiter in waiters:
            waiter.join(10)
            if waiter.is_alive():
                waiter.kill()
    assert [waiter.exitcode for waiter in waiters] == [0, 0, 0]
    assert len(tokens) == 1
    assert sandbox_process.counters()["token_requests"] == {US_KEY: 1}


# -- the second review's findings ------------------------------------------------------------------


def test_a_delete_the_store_did_not_take_is_an_error_and_says_to_run_it_again(host, server, clock, tmp_path):
    a = host("a", retry_interval=0.0)
    with responses.RequestsMock() as mock:
        broker(mock, clock, [fake_token(1)])
        assert a.get_valid_token() == fake_token(1)
    server.stop()
    with pytest.raises(StoreError, match="did not answer.*run the command again"):
        a.delete_token()
    assert not key_file(tmp_path, "a").exists() and not a.mirror.record_path.exists()  # gone here
    assert a.load_token() is None
    server.start()  # an empty server here; with the old record on it, `delete` is simply run again
    assert a.delete_token() == []


def test_a_deletion_mark_never_drops_a_token_renewed_since(host, server, clock, tmp_path):
    a, b = host("a", retry_interval=0.0), host("b", retry_interval=0.0)
    with responses.RequestsMock() as mock:
        broker(mock, clock, [fake_token(1), fake_token(2)])
        assert a.get_valid_token() == b.get_valid_token() == fake_token(1)
        server.stop()
        clock.advance(120)
        assert b.refresh_token().access_token == fake_token(2)  # host B renews while the store is down
        server.start()
        for _ in range(3):  # make sure the store holds T1 again (host A's copy is put back)...
            clock.advance(1.0)
            a.load_token()
        client = redis.Redis(host="127.0.0.1", port=server.port, password=PASSWORD)
        first = TokenRecord(fake_token(1), "Bearer", clock() - 120, clock() + DAY - 120, "us", "real",
                            a.key_fingerprint())
        client.set(record_key(server), first.to_json())
        a.delete_token()  # ...then host A deletes T1
        clock.advance(1.0)
        assert b.get_valid_token() == fake_token(2)  # B's later token is not the deleted one: it stays
        assert len(mock.calls) == 2
        client.close()


def test_a_store_that_stalls_while_another_host_holds_the_lease_is_busy_not_unreachable(host, server):
    a, b = host("a"), host("b")
    lock_b = b.store.lock.shared
    with a.store.lock.hold(0):  # host A holds the lease (it is renewing)
        real_acquire = redis.lock.Lock.acquire
        calls = []

        def stalling_acquire(self, *args, **kwargs):
            calls.append(1)
            if len(calls) > 2:  # the store stops answering while B waits
                raise redis.TimeoutError("Timeout reading from socket")
            return real_acquire(self, *args, **kwargs)

        redis.lock.Lock.acquire = stalling_acquire
        try:
            with pytest.raises(LockTimeoutError, match="stopped answering"), lock_b.hold(5):
                pass
        finally:
            redis.lock.Lock.acquire = real_acquire
    assert len(calls) == 3


def test_a_lease_whose_answer_was_lost_is_released_by_its_owner(host, server):
    a = host("a")
    lock = a.store.lock.shared
    real_acquire = redis.lock.Lock.acquire

    def lost_answer(self, *args, **kwargs):
        real_acquire(self, *args, **kwargs)  # the SET reaches the server...
        raise redis.TimeoutError("Timeout reading from socket")  # ...its answer does not come back

    redis.lock.Lock.acquire = lost_answer
    try:
        with pytest.raises(redis.TimeoutError), lock.hold(0):
            pass
    finally:
        redis.lock.Lock.acquire = real_acquire
    client = redis.Redis(host="127.0.0.1", port=server.port, password=PASSWORD)
    assert client.pttl(lock.name) > 0  # an orphaned lease...
    with lock.hold(0):  # ...released (owner-checked) at the next acquisition, which then succeeds
        pass
    assert client.exists(lock.name) == 0
    client.close()


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0?db=abc", "redis://127.0.0.1/0?socket_timeout=abc"])
def test_a_url_redis_cannot_use_is_a_configuration_error(make_manager, env, url):
    manager = make_manager(USTokenManager, {**env, "KIS_TOKEN_STORE": url})
    with pytest.raises(ConfigError, match="KIS_TOKEN_STORE"):
        manager.get_token_info()


def test_a_password_with_a_slash_is_never_shown(make_manager, env, capsys):
    secret = "pa/ss+w0rd"
    manager = make_manager(USTokenManager, {**env, "KIS_TOKEN_STORE": f"redis://kis:{secret}@127.0.0.1:bad/0"})
    assert main(lambda: manager, ["check", "--json"], market="US") == 3
    captured = capsys.readouterr()
    assert "KIS_TOKEN_STORE" in captured.err and secret not in captured.out + captured.err
    assert "ss+w0rd" not in captured.out + captured.err
