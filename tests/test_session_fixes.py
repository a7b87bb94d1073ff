"""Regressions of the WebSocket session lease (``common.session``) found in review: a lease left held
by a ``KeyboardInterrupt`` or a cancelled async waiter, a fork's child that frees or keeps its
parent's lease, a heartbeat the store's rest period could skip until the lease lapsed, and a wait
that logged once per poll. Clocks and sleeps are injected; real waits are short and bounded."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.errors import SessionHeldError
from common.sandbox.redis_server import RedisServer, free_port
from common.session import SessionLease, SessionTimes, open_session
from common.session.file_lease import FileLease
from common.session.lease import WaitCancelled
from common.session.redis_lease import RedisLease
from common.settings import Settings
from common.store.redis_link import StoreLink, key_name
from tests.conftest import REPO, FakeClock, SleepRecorder

KEY_ID = "real-0123456789abcdef"
TIMES = SessionTimes(ttl=15.0, heartbeat=3.75, pace=5.0, poll=0.1)


def lease(directory: Path, clock: FakeClock, shared: RedisLease | None = None) -> SessionLease:
    return SessionLease(FileLease(directory, KEY_ID), shared, "us", times=TIMES, clock=clock,
                        sleep=SleepRecorder(clock), monotonic=clock)


def interrupted(clock: FakeClock):
    """A sleep that is a Ctrl-C."""
    def sleep(seconds: float) -> None:
        clock.advance(seconds)
        raise KeyboardInterrupt

    return sleep


# -- 1: Ctrl-C while the lease is held but the block not yet entered --------------------------------


def test_a_ctrl_c_in_the_pacing_wait_gives_the_lease_back(tmp_path, clock):
    first = lease(tmp_path, clock)
    first.acquire()
    first.release()  # the next lease is paced: its acquire sleeps while holding the file
    paced = lease(tmp_path, clock)
    paced.sleep = interrupted(clock)
    with pytest.raises(KeyboardInterrupt):
        paced.acquire()
    assert paced.holding is None and not paced.local.held
    assert lease(tmp_path, clock).holder() is None
    clock.advance(10)
    lease(tmp_path, clock).acquire()  # the file is free


def test_a_ctrl_c_in_hold_gives_the_lease_back(tmp_path, clock):
    first = lease(tmp_path, clock)
    first.acquire()
    first.release()
    paced = lease(tmp_path, clock)
    paced.sleep = interrupted(clock)
    with pytest.raises(KeyboardInterrupt), paced.hold(0, lambda: "APPROVAL"):
        pytest.fail("the block is never entered")
    assert paced.holding is None and not paced.local.held
    # A lease held already is not taken (nor given back) by a second hold().
    clock.advance(10)
    held = lease(tmp_path, clock)
    held.acquire()
    with pytest.raises(RuntimeError), held.hold(0, lambda: "APPROVAL"):
        pytest.fail("the block is never entered")
    assert held.holding is not None and held.local.held
    held.release()


# -- 2: an async waiter cancelled, or a loop that ends, while another holds the lease ---------------


@pytest.mark.parametrize("how", ["cancelled", "loop ends"])
def test_an_async_waiter_that_goes_away_never_takes_the_lease_later(tmp_path, how):
    times = SessionTimes(pace=0.0, poll=0.01)
    settings = Settings({}, dotenv_path=False)
    first = open_session(settings, tmp_path, KEY_ID, "us", times=times)
    first.acquire()
    waiting = open_session(settings, tmp_path, KEY_ID, "kr", times=times)

    async def approval() -> str:
        return "APPROVAL"

    async def hold() -> None:
        async with waiting.hold_async(5, approval):
            await asyncio.sleep(3600)

    async def scenario() -> None:
        task = asyncio.create_task(hold())
        await asyncio.sleep(0.05)
        if how == "cancelled":
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        # "loop ends": asyncio.run cancels the task (and the worker's future) on its way out

    freed = threading.Timer(0.2, first.release)  # the holder lets go once the waiter has gone
    freed.start()
    asyncio.run(scenario())
    freed.join()
    time.sleep(0.1)  # a worker thread still polling would take the lease now
    assert waiting.holding is None and not waiting.local.held
    assert first.holder() is None


def test_a_lease_taken_as_the_waiter_is_cancelled_is_given_back(tmp_path, clock):
    taken = lease(tmp_path, clock)
    cancel = threading.Event()

    def sleep(seconds: float) -> None:  # cancelled during the pacing wait
        clock.advance(seconds)
        cancel.set()

    first = lease(tmp_path, clock)
    first.acquire()
    first.release()
    taken.sleep = sleep
    with pytest.raises(WaitCancelled):
        taken.acquire(0, cancel)
    assert taken.holding is None and lease(tmp_path, clock).holder() is None


# -- 5: a store that does not answer is one warning per wait, and the wait ends by its deadline ------


def test_a_wait_with_the_store_down_warns_once_and_ends_by_its_deadline(tmp_path, clock, caplog):
    down = RedisLease(StoreLink(f"redis://127.0.0.1:{free_port()}/0", retry_interval=3600.0), KEY_ID)
    holder = lease(tmp_path, clock)
    holder.acquire()
    waiting = lease(tmp_path, clock, shared=down)
    with caplog.at_level(logging.WARNING, logger="common.session.lease"), pytest.raises(SessionHeldError):
        waiting.acquire(wait=1.0)
    warnings = [r for r in caplog.records if "does not answer" in r.getMessage()]
    assert len(warnings) == 1
    assert sum(waiting.sleep.calls) == pytest.approx(1.0)  # type: ignore[attr-defined]
    holder.release()


# -- 3: a fork's child neither frees its parent's lease nor keeps it -------------------------------

posix_only = pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX only")

#: Another process tries the lease file: prints "held" or "taken".
TRY_TAKE = """
import sys
from common.session.file_lease import FileLease
from common.session.holder import LeaseHeld
try:
    FileLease(sys.argv[1], sys.argv[2]).take()
    print("taken")
except LeaseHeld:
    print("held")
"""

#: Takes the lease, forks a child that lives on, prints the child's pid, and waits to be killed.
FORK_AND_WAIT = """
import os, sys, time
from common.session.file_lease import FileLease
lease = FileLease(sys.argv[1], sys.argv[2])
lease.take()
child = os.fork()
if child == 0:
    time.sleep(30)
    os._exit(0)
print(child, flush=True)
time.sleep(30)
"""


def another_process_tries(directory: Path) -> str:
    done = subprocess.run([sys.executable, "-c", TRY_TAKE, str(directory), KEY_ID], cwd=REPO,
                          capture_output=True, text=True, timeout=30, check=True)
    return done.stdout.strip()


@pytest.fixture(scope="module")
def valkey(tmp_path_factory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("valkey")) as server:
        yield server


@posix_only
@pytest.mark.parametrize("with_server", [False, True])
def test_a_forks_child_that_releases_leaves_its_parents_lease_held(tmp_path, clock, request, with_server):
    shared = None
    if with_server:
        server = request.getfixturevalue("valkey")
        server.client().flushall()
        shared = RedisLease(StoreLink(server.url, retry_interval=0.0), KEY_ID)
    taken = lease(tmp_path, clock, shared=shared)
    taken.acquire()
    child = os.fork()
    if child == 0:  # the child leaves a `with` block it inherited, as a forked worker would
        code = 3
        try:
            closed_at_fork = not taken.local.held
            taken.release()
            code = 0 if closed_at_fork else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0  # its inherited descriptor was closed at the fork
    assert taken.holding is not None and taken.local.held
    found = lease(tmp_path, clock).holder()
    assert found is not None and found.pid == os.getpid()  # the record still names the parent
    assert another_process_tries(tmp_path) == "held"
    if with_server:
        assert server.client().exists(key_name(KEY_ID, "session"))  # the child deleted nothing there
    taken.release()
    assert another_process_tries(tmp_path) == "taken"


@posix_only
def test_a_killed_holders_lease_is_free_though_its_child_lives(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", FORK_AND_WAIT, str(tmp_path), KEY_ID], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    child = 0
    try:
        assert holder.stdout is not None
        child = int(holder.stdout.readline())
        assert another_process_tries(tmp_path) == "held"
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        os.kill(child, 0)  # the child lives on
        assert another_process_tries(tmp_path) == "taken"
    finally:
        holder.kill()
        holder.wait(timeout=10)
        if child:
            os.kill(child, signal.SIGKILL)


# -- 4: the heartbeat's margin -----------------------------------------------------------------------


def test_the_heartbeat_beats_four_times_a_lease_and_the_links_rest_never_skips_it(valkey, tmp_path, clock):
    from common.session import DEFAULT_TIMES
    from common.store.redis_link import RETRY_INTERVAL

    assert DEFAULT_TIMES.heartbeat <= DEFAULT_TIMES.ttl / 4
    # Two beats skipped by the link's rest would leave less than the lease for a third:
    assert DEFAULT_TIMES.heartbeat < RETRY_INTERVAL
    valkey.client().flushall()
    link = StoreLink(valkey.url)  # the real rest period
    taken = lease(tmp_path, clock, shared=RedisLease(link, KEY_ID))
    taken.acquire()
    assert taken.on_server
    taken._stop.set()  # the test beats by hand
    link._retry_at, link.error = time.monotonic() + 3600, "a call of another key failed"
    valkey.client().pexpire(key_name(KEY_ID, "session"), 2000)
    taken.beat()  # resting: an ordinary call would be skipped
    assert valkey.client().pttl(key_name(KEY_ID, "session")) > 2000 and taken.on_server
    assert not link.down and link.error is None  # the answer ended the rest for every caller
    taken.release()
    assert not valkey.client().exists(key_name(KEY_ID, "session"))
