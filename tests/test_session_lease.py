"""The WebSocket session lease per app key (issue 19, ``common.session``): the host's lease file, the
server's lease (a real Valkey), pacing, the ``OPSP8996`` helper and the facade. Clocks and sleeps are
injected; the server's own time to live is the one real wait (bounded)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.sync.client import connect

from common.errors import KISTokenError, SessionHeldError, StoreError, TokenUnavailableError
from common.sandbox import Sandbox
from common.sandbox.redis_server import RedisServer, free_port
from common.sandbox.session_worker import subscribe
from common.session import (
    Holder,
    SessionLease,
    SessionTimes,
    open_session,
    pace_delay,
    raise_if_refused,
    session_refused,
)
from common.session.file_lease import RECORD_SIZE, FileLease
from common.session.redis_lease import RedisLease
from common.settings import Settings
from common.store.redis_link import StoreLink, key_name
from kr.token_manager import KRTokenManager
from tests.conftest import US_KEY, US_SECRET, FakeClock, SleepRecorder
from us.token_manager import USTokenManager

KEY_ID = "real-0123456789abcdef"
TIMES = SessionTimes(ttl=15.0, heartbeat=5.0, pace=5.0, poll=0.1)


def lease(directory: Path, clock: FakeClock, market: str = "us", shared: RedisLease | None = None,
          times: SessionTimes = TIMES) -> SessionLease:
    return SessionLease(FileLease(directory, KEY_ID), shared, market, times=times, clock=clock,
                        sleep=SleepRecorder(clock), monotonic=clock)


def sleeps_of(taken: SessionLease) -> list[float]:
    return taken.sleep.calls  # type: ignore[attr-defined, no-any-return]


# -- pacing, pure ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("last", "now", "expected"), [
    (None, 100.0, 0.0),         # never: at once
    (100.0, 100.0, 5.0),        # just started: the whole interval
    (100.0, 103.0, 2.0),        # the rest of it
    (100.0, 105.0, 0.0),        # over
    (100.0, 500.0, 0.0),
    (200.0, 100.0, 5.0),        # a start "in the future" (the clock stepped back): never over the interval
    (math.nan, 100.0, 5.0),     # an unreadable record: as if a session started just now
])
def test_pace_delay(last, now, expected):
    assert pace_delay(last, now, 5.0) == expected
    assert pace_delay(last, now, 0.0) == 0.0  # no pacing


# -- the host's lease file ------------------------------------------------------------------------


def test_a_second_holder_gets_at_once_an_error_naming_the_holder(tmp_path, clock):
    first, second = lease(tmp_path, clock), lease(tmp_path, clock, "kr")
    held = first.acquire()
    assert (held.pid, held.market, held.since) == (os.getpid(), "us", clock())
    with pytest.raises(SessionHeldError) as caught:
        second.acquire()
    error = caught.value
    assert isinstance(error, KISTokenError) and error.holder == held and not error.elsewhere
    assert str(error).startswith(f"the kr key's WebSocket session is held by host {held.host}, "
                                 f"pid {os.getpid()} (us), since 2026-11-24T08:00:00+09:00")
    assert sleeps_of(second) == []  # at once: no wait
    assert second.holder() == held
    first.release()
    assert second.holder() is None
    record = json.loads((tmp_path / f"key-{KEY_ID}.session").read_text())
    assert record == {"v": 1, "holder": None, "start": clock()}  # kept for the pacing
    assert (tmp_path / f"key-{KEY_ID}.session").stat().st_size == RECORD_SIZE
    assert (tmp_path / f"key-{KEY_ID}.session").stat().st_mode & 0o777 == 0o600


def test_leases_of_a_key_start_at_least_the_pacing_interval_apart(tmp_path, clock):
    first = lease(tmp_path, clock)
    first.holder_start = first.acquire().since  # type: ignore[attr-defined]
    clock.advance(1.5)
    first.release()
    second = lease(tmp_path, clock)
    held = second.acquire()
    assert sleeps_of(second) == [3.5]  # the rest of the 5 s since the first one's start
    assert held.since == clock() == first.holder_start + 5.0
    clock.advance(60)
    second.release()
    third = lease(tmp_path, clock)
    third.acquire()
    assert sleeps_of(third) == []  # held longer than the interval: no wait
    third.release()


def test_a_caller_that_waits_polls_until_the_holder_lets_go(tmp_path, clock):
    first, second = lease(tmp_path, clock), lease(tmp_path, clock)
    first.acquire()
    polls: list[float] = []

    def sleep(seconds: float) -> None:
        polls.append(seconds)
        clock.advance(seconds)
        if len(polls) == 30:  # 3 s later the holder leaves
            first.release()

    second.sleep = sleep
    held = second.acquire(wait=10.0)
    assert polls[:30] == [0.1] * 30 and held.pid == os.getpid()
    assert polls[30:] == [pytest.approx(2.0, abs=1e-3)]  # then the rest of the pacing interval
    second.release()


def test_a_caller_that_waits_in_vain_gets_the_error_after_its_timeout(tmp_path, clock):
    first, second = lease(tmp_path, clock), lease(tmp_path, clock)
    first.acquire()
    with pytest.raises(SessionHeldError, match=r"waited 1 s"):
        second.acquire(wait=1.0)
    polls = sleeps_of(second)  # polls until the monotonic deadline (a last one may be a sliver)
    assert polls[:10] == [0.1] * 10 and max(polls) <= 0.1 and sum(polls) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        second.acquire(wait=-1)
    first.release()


def test_a_dead_holders_record_is_overwritten_and_its_start_paces_the_next(tmp_path, clock):
    first = lease(tmp_path, clock)
    first.acquire()
    fd = first.local._fd
    assert fd is not None
    os.close(fd)  # the kernel drops the flock as it does for a SIGKILLed process; the record stays
    first.local._fd = None
    clock.advance(2.0)
    second = lease(tmp_path, clock, "kr")
    held = second.acquire()
    assert sleeps_of(second) == [3.0] and held.market == "kr"
    record = json.loads((tmp_path / f"key-{KEY_ID}.session").read_text())
    assert record["holder"]["market"] == "kr" and record["holder"]["pid"] == os.getpid()
    second.release()


def test_a_damaged_record_is_a_warning_and_a_full_pacing_interval(tmp_path, clock, caplog):
    (tmp_path / f"key-{KEY_ID}.session").write_bytes(b"\x00garbage")
    os.chmod(tmp_path, 0o700)
    taken = lease(tmp_path, clock)
    with caplog.at_level(logging.WARNING):
        taken.acquire()
    assert sleeps_of(taken) == [5.0]
    assert "not a session lease record" in caplog.text
    taken.release()
    assert json.loads((tmp_path / f"key-{KEY_ID}.session").read_text())["holder"] is None


@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory"])
def test_a_lease_path_that_is_not_a_regular_file_is_a_clear_error_never_a_hang(tmp_path, clock, kind):
    path = tmp_path / f"key-{KEY_ID}.session"
    os.chmod(tmp_path, 0o700)
    if kind == "symlink":
        path.symlink_to(tmp_path / "elsewhere")
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    with pytest.raises(StoreError, match="session lease file"):
        lease(tmp_path, clock).acquire()
    assert not (tmp_path / "elsewhere").exists()


def test_the_block_releases_on_an_exception_and_when_the_approval_key_fails(tmp_path, clock):
    with pytest.raises(RuntimeError), lease(tmp_path, clock).hold(0, lambda: "APPROVAL"):
        raise RuntimeError("the trading code failed")

    def no_key() -> str:
        raise TokenUnavailableError("broker down")

    with pytest.raises(TokenUnavailableError), lease(tmp_path, clock).hold(0, no_key):
        pass
    clock.advance(10)
    with lease(tmp_path, clock).hold(0, lambda: "APPROVAL") as key:
        assert key == "APPROVAL"


def test_the_async_form_holds_without_blocking_the_loop_and_releases(tmp_path, clock):
    async def scenario() -> tuple[str, bool]:
        async def approval() -> str:
            return "APPROVAL"

        async with lease(tmp_path, clock).hold_async(0, approval) as key:
            with pytest.raises(SessionHeldError):
                async with lease(tmp_path, clock).hold_async(0, approval):
                    pass
        return key, lease(tmp_path, clock).holder() is None

    assert asyncio.run(scenario()) == ("APPROVAL", True)


def test_an_async_caller_cancelled_while_waiting_leaves_no_lease_behind(tmp_path):
    first = open_session(Settings({}, dotenv_path=False), tmp_path, KEY_ID, "us",
                         times=SessionTimes(pace=0.0, poll=0.01))
    first.acquire()

    async def scenario() -> None:
        async def approval() -> str:
            return "APPROVAL"

        waiting = open_session(Settings({}, dotenv_path=False), tmp_path, KEY_ID, "kr",
                               times=SessionTimes(pace=0.0, poll=0.01))

        async def hold() -> None:
            async with waiting.hold_async(30, approval):
                await asyncio.sleep(3600)

        task = asyncio.create_task(hold())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        first.release()  # the worker thread now takes the lease: it must give it back
        await asyncio.sleep(0.3)

    asyncio.run(scenario())
    deadline = time.monotonic() + 5
    while first.holder() is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert first.holder() is None


# -- OPSP8996 -------------------------------------------------------------------------------------

REFUSAL = {"header": {"tr_id": "(null)", "tr_key": "", "encrypt": "N"},
           "body": {"rt_cd": "9", "msg_cd": "OPSP8996", "msg1": "ALREADY IN USE appkey"}}


@pytest.mark.parametrize(("message", "refused"), [
    (REFUSAL, True),
    (json.dumps(REFUSAL), True),
    (json.dumps(REFUSAL).encode(), True),
    ("OPSP8996 ALREADY IN USE appkey", True),          # not JSON, but the broker's words
    ({"body": {"rt_cd": "0", "msg_cd": "OPSP0000", "msg1": "SUBSCRIBE SUCCESS"}}, False),
    ('{"header": {"tr_id": "PINGPONG", "datetime": "20261124090000"}}', False),
    ("0|H0STCNT0|001|005930^090000^71000", False),    # real-time data
    ('{"body": {"msg_cd": "OPSP0000", "msg1": "OPSP8996 mentioned"}}', False),
    ({"body": "OPSP8996"}, False),
])
def test_session_refused_recognises_the_brokers_opsp8996(message, refused):
    assert session_refused(message) is refused


def test_raise_if_refused_says_held_elsewhere_outside_this_package():
    raise_if_refused({"body": {"msg_cd": "OPSP0000"}}, "us")
    with pytest.raises(SessionHeldError) as caught:
        raise_if_refused(json.dumps(REFUSAL), "us")
    assert caught.value.elsewhere and caught.value.holder is None
    assert str(caught.value) == ("the us key's WebSocket session is held elsewhere (outside this package): "
                                 "the broker answered OPSP8996 ALREADY IN USE appkey")


# -- the server's lease (a real Valkey) -----------------------------------------------------------


@pytest.fixture(scope="module")
def valkey(tmp_path_factory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("valkey")) as server:
        yield server


@pytest.fixture
def store(valkey) -> Iterator[RedisServer]:
    valkey.client().flushall()
    yield valkey


def server_lease(server: RedisServer) -> RedisLease:
    return RedisLease(StoreLink(server.url, retry_interval=0.0), KEY_ID)


def test_the_server_lease_has_a_bounded_ttl_names_its_holder_and_is_owner_checked(store, tmp_path, clock):
    first = lease(tmp_path / "host-a", clock, shared=server_lease(store))
    held = first.acquire()
    assert first.on_server
    client = store.client()
    fields = {k.decode(): v.decode() for k, v in client.hgetall(key_name(KEY_ID, "session")).items()}
    assert set(fields) == {"owner", "host", "pid", "market", "since"}
    assert (fields["pid"], fields["market"]) == (str(os.getpid()), "us")
    assert 0 < client.pttl(key_name(KEY_ID, "session")) <= 15000
    # Another host (another token directory): the server names the holder.
    second = lease(tmp_path / "host-b", clock, "kr", shared=server_lease(store))
    named = rf"held by host {held.host}, pid {os.getpid()} \(us\)"
    with pytest.raises(SessionHeldError, match=named) as caught:
        second.acquire()
    assert isinstance(caught.value.holder, Holder)
    assert not (tmp_path / "host-b" / f"key-{KEY_ID}.session").exists()  # refused by the server first
    # The heartbeat gives the lease its whole ttl again.
    client.pexpire(key_name(KEY_ID, "session"), 2000)
    first.beat()
    assert client.pttl(key_name(KEY_ID, "session")) > 2000
    # Another owner's release never deletes it.
    assert not second.shared.release()  # type: ignore[union-attr]
    assert client.exists(key_name(KEY_ID, "session"))
    first.release()
    assert not client.exists(key_name(KEY_ID, "session"))
    assert client.exists(key_name(KEY_ID, "session") + ":start")  # the pacing outlives the lease


def test_a_lost_host_frees_the_key_within_the_ttl(store, tmp_path, clock):
    times = SessionTimes(ttl=0.3, heartbeat=10.0, pace=0.0)
    lost = lease(tmp_path / "host-a", clock, shared=server_lease(store), times=times)
    lost.acquire()
    lost._stop.set()  # the host stops beating (power, network): nothing extends its lease
    other = lease(tmp_path / "host-b", clock, shared=server_lease(store), times=times)
    with pytest.raises(SessionHeldError):
        other.acquire()
    deadline = time.monotonic() + 5
    while store.client().exists(key_name(KEY_ID, "session")):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert other.acquire().market == "us" and other.on_server
    # The lost host comes back: its heartbeat finds the lease another's and says so, never takes it.
    lost.beat()
    assert not lost.on_server
    lost.release()
    assert store.client().exists(key_name(KEY_ID, "session"))
    other.release()


def test_the_server_paces_leases_of_the_key_across_hosts(store, tmp_path, clock):
    first = lease(tmp_path / "host-a", clock, shared=server_lease(store))
    first.acquire()
    first.release()
    second = lease(tmp_path / "host-b", clock, shared=server_lease(store))  # another host: its file is new
    second.acquire()
    [waited] = sleeps_of(second)
    assert 0 < waited <= 5.0  # the rest of the interval, on the server's clock
    second.release()


def test_store_down_the_file_lease_still_holds_with_a_warning_and_the_server_is_taken_back(
    store, tmp_path, clock, caplog
):
    down = RedisLease(StoreLink(f"redis://127.0.0.1:{free_port()}/0", retry_interval=0.0), KEY_ID)
    taken = lease(tmp_path, clock, shared=down)
    with caplog.at_level(logging.WARNING):
        held = taken.acquire()
    assert held.pid == os.getpid() and not taken.on_server
    assert "does not answer" in caplog.text and "for this host only" in caplog.text
    with pytest.raises(SessionHeldError):  # the host's other processes are still kept out
        lease(tmp_path, clock).acquire()
    taken.release()
    # The server answers again while a session is held: the heartbeat takes the lease there too.
    store_back = lease(tmp_path, clock, shared=server_lease(store))
    store_back.shared.link._retry_at = time.monotonic() + 3600  # type: ignore[union-attr]
    store_back.shared.link.error = "down"  # type: ignore[union-attr]
    clock.advance(10)
    store_back.acquire()
    assert not store_back.on_server
    store_back.shared.link._retry_at = float("-inf")  # type: ignore[union-attr]
    store_back.beat()
    assert store_back.on_server and store.client().exists(key_name(KEY_ID, "session"))
    store_back.release()
    assert not store.client().exists(key_name(KEY_ID, "session"))


# -- the facade -----------------------------------------------------------------------------------


def test_the_facade_holds_the_keys_session_for_both_markets_and_connects(tmp_path):
    with Sandbox(websocket=True) as sandbox:
        environ = {"KIS_BASE_URL": sandbox.base_url, "KIS_TOKEN_DIR": str(tmp_path / "tokens"),
                   "KIS_US_APP_KEY": US_KEY, "KIS_US_APP_SECRET": US_SECRET,
                   "KIS_KR_APP_KEY": US_KEY, "KIS_KR_APP_SECRET": US_SECRET, "HOME": str(tmp_path)}
        us = USTokenManager(Settings(environ, dotenv_path=False))
        kr = KRTokenManager(Settings(environ, dotenv_path=False))
        quick = SessionTimes(pace=0.2)
        with us.websocket_session(times=quick) as approval_key:
            assert approval_key == us.get_approval_key()
            named = r"^the kr key's WebSocket session is held by .* \(us\)"
            with pytest.raises(SessionHeldError, match=named), kr.websocket_session():
                pass
            with connect(sandbox.ws_url) as socket:
                socket.send(subscribe(approval_key))
                answer = socket.recv(timeout=5)
            assert not session_refused(answer)

        async def again() -> str:
            async with kr.websocket_session_async(wait=10, times=quick) as key:
                return key

        assert asyncio.run(again()) == approval_key
        counters = sandbox.counters()
    assert counters["ws_sessions_opened"] == {US_KEY: 1} and counters["ws_opsp8996"] == {}
