"""The per-key call budget (issue 19, ``common.budget``): the window property under an injected clock,
the file backend, the Redis backend and its fallback, the async form, the timeout, ``KIS_RATE_LIMIT``."""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import random
import signal
import threading
import time

import pytest

from common.budget import CallBudget, Pacing, open_budget
from common.budget import file_backend as file_backend_module
from common.budget.file_backend import SIZE, FileBudget
from common.budget.pacing import MAX_WAIT, WINDOW, reserve
from common.budget.redis_backend import RedisBudget, SharedBudget
from common.errors import BudgetTimeoutError, ConfigError, StoreError
from common.sandbox.budget_worker import most_in_window
from common.sandbox.redis_server import RedisServer
from common.settings import Settings
from common.store import redis_link, redis_store
from common.store.redis_link import key_name
from tests.conftest import FakeClock, SleepRecorder

KEY_ID = "real-0123456789abcdef"


def arrivals(rng: random.Random, rate: float, seconds: float) -> list[float]:
    """Random arrival times: quiet spells, bursts of simultaneous callers, and steady streams faster
    and slower than ``rate``."""
    times, now = [], 0.0
    while now < seconds:
        kind = rng.choice(("quiet", "burst", "stream"))
        if kind == "quiet":
            now += rng.uniform(0.0, 3.0 / rate)
        elif kind == "burst":
            times += [now] * rng.randint(2, int(3 * rate) + 2)
        else:
            pace = rate * rng.uniform(0.2, 3.0)
            for _ in range(rng.randint(1, int(2 * rate) + 2)):
                now += rng.expovariate(pace)
                times.append(now)
    return times


@pytest.fixture
def clock() -> FakeClock:
    """The host's monotonic clock (seconds since boot: small numbers, fine-grained floats)."""
    return FakeClock(10_000.0)


def file_budget(tmp_path, clock, rate: float = 18.0, **kwargs) -> CallBudget:
    return CallBudget(FileBudget(tmp_path, KEY_ID, clock), Pacing(rate), KEY_ID,
                      sleep=SleepRecorder(clock), **kwargs)


# -- pacing ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [18.0, 1.0, 2.5, 100.0])
def test_a_busy_key_is_paced_at_no_less_than_095_of_its_rate(rate):
    pacing = Pacing(rate)
    assert 0.95 * rate <= pacing.achieved_rate < rate


@pytest.mark.parametrize(("rate", "slack", "burst"), [
    (18.0, 0.03, 1), (1.0, 0.03, 1), (2.5, 0.03, 1), (18.0, 0.03, 4), (18.0, 0.0, 1), (5.0, 0.1, 5),
])
@pytest.mark.parametrize("seed", range(12))
def test_no_window_holds_more_than_the_rate_for_random_arrivals(rate, slack, burst, seed):
    """Slots granted in arrival order: none before its arrival, FIFO, and no window of one second plus
    the slack holds more than the rate; with each call late by up to the slack, no second does."""
    rng = random.Random(seed)
    pacing = Pacing(rate, slack=slack, burst=burst)
    tat, slots = -math.inf, []
    for arrived in arrivals(rng, pacing.achieved_rate, 60.0):
        slot, tat = reserve(tat, arrived, pacing, MAX_WAIT)
        assert slot >= arrived
        slots.append(slot)
    assert slots == sorted(slots)
    allowed = math.ceil(rate)
    assert most_in_window(slots, WINDOW + slack - 1e-9) <= allowed
    late = [slot + rng.uniform(0.0, slack) for slot in slots]
    assert most_in_window(late, WINDOW - 1e-9) <= allowed  # any second [t, t + 1)


@pytest.mark.parametrize("rate", [18.0, 1.0, 7.0])
def test_the_bound_is_tight_a_busy_key_fills_every_window(rate):
    pacing = Pacing(rate)
    tat, slots = -math.inf, []
    for _ in range(200):
        slot, tat = reserve(tat, 0.0, pacing, MAX_WAIT)
        slots.append(slot)
    assert most_in_window(slots, WINDOW + pacing.slack - 1e-9) == rate
    assert slots[-1] == pytest.approx(199 * pacing.interval)


def test_a_burst_of_r_would_put_about_2r_into_one_second():
    """Why the budget has no burst of R: a bucket of R full after a quiet spell lets R go at once
    and refills R more within the same second."""
    rate = 18
    bucket_of_r = [0.0] * rate + [k / rate for k in range(1, rate)]  # R at once, then one every 1/R
    assert most_in_window(bucket_of_r) == 2 * rate - 1
    tat, slots = -math.inf, []
    for arrived in bucket_of_r:
        slot, tat = reserve(tat, arrived, Pacing(rate), MAX_WAIT)
        slots.append(slot)
    assert most_in_window(slots) <= rate


@pytest.mark.parametrize(("rate", "slack", "burst"), [(0.0, 0.03, 1), (-1.0, 0.03, 1), (math.nan, 0.03, 1),
                                                     (math.inf, 0.03, 1), (18.0, -0.1, 1), (18.0, 0.03, 0),
                                                     (18.0, 0.03, 19), (1.0, 0.03, 2)])
def test_a_pacing_that_cannot_hold_is_refused(rate, slack, burst):
    with pytest.raises(ValueError):
        Pacing(rate, slack=slack, burst=burst)


# -- CallBudget on the file backend, with an injected clock ----------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_the_file_budget_keeps_the_window_for_random_arrivals(tmp_path, seed):
    clock, rng = FakeClock(10_000.0), random.Random(seed)
    budget = file_budget(tmp_path, clock)
    start, slots = clock.now, []
    for arrived in arrivals(rng, 18.0, 10.0):
        clock.now = start + arrived
        slots.append(clock.now + budget.reserve())
    assert most_in_window(slots, WINDOW + budget.pacing.slack - 1e-9) <= 18


def test_acquire_sleeps_until_the_slot_and_processes_share_the_file(tmp_path, clock):
    sleeps = SleepRecorder()  # the clock stands still: every caller arrives at once
    one = CallBudget(FileBudget(tmp_path, KEY_ID, clock), Pacing(18.0), KEY_ID, sleep=sleeps)
    other = CallBudget(FileBudget(tmp_path, KEY_ID, clock), Pacing(18.0), KEY_ID, sleep=sleeps)
    waits = [budget.acquire() for budget in (one, other, one, other)]
    interval = Pacing(18.0).interval
    assert waits == pytest.approx([0.0, interval, 2 * interval, 3 * interval])
    assert sleeps.calls == pytest.approx(waits[1:])  # no sleep for a free slot
    assert [p.name for p in tmp_path.iterdir()] == [f"key-{KEY_ID}.budget"]
    assert (tmp_path / f"key-{KEY_ID}.budget").stat().st_size == SIZE


def test_a_timeout_raises_at_once_and_reserves_nothing(tmp_path, clock):
    budget = file_budget(tmp_path, clock, rate=1.0)
    budget.acquire(timeout=0)
    with pytest.raises(BudgetTimeoutError, match=r"no free slot within 0\.5 s") as info:
        budget.acquire(timeout=0.5)
    assert info.value.retry_in == pytest.approx(budget.pacing.interval)
    assert info.value.retryable
    assert budget.sleep.calls == []  # raised without waiting
    assert budget.reserve(timeout=5) == pytest.approx(budget.pacing.interval)  # the refused one took nothing


def test_a_timeout_outside_the_bounds_is_a_value_error(tmp_path, clock):
    budget = file_budget(tmp_path, clock)
    for timeout in (-1.0, MAX_WAIT + 1, math.nan):
        with pytest.raises(ValueError, match="timeout"):
            budget.acquire(timeout=timeout)


def test_the_counters_cover_the_last_minute(tmp_path, clock):
    budget = file_budget(tmp_path, clock)
    for _ in range(5):
        budget.acquire()
        clock.advance(1.0)
    budget.note_refusal()
    budget.note_refusal()
    snap = budget.snapshot()
    assert (snap.rate, snap.calls_last_minute, snap.egw00201_seen, snap.egw00201_total) == (18.0, 5, 2, 2)
    assert (snap.backend, snap.store_down) == ("file", False)
    assert snap.paced_rate == pytest.approx(budget.pacing.achieved_rate)
    clock.advance(57.0)  # 62 s after the first call
    assert budget.snapshot().calls_last_minute == 2  # the calls of the first three seconds fell out
    clock.advance(60.0)
    snap = budget.snapshot()
    assert (snap.calls_last_minute, snap.egw00201_seen, snap.egw00201_total) == (0, 0, 2)


def test_the_counters_are_read_without_creating_anything(tmp_path, clock):
    directory = tmp_path / "not-yet"
    budget = CallBudget(FileBudget(directory, KEY_ID, clock), Pacing(18.0), KEY_ID)
    assert (budget.snapshot().calls_last_minute, budget.snapshot().egw00201_total) == (0, 0)
    assert not directory.exists()
    budget.acquire()
    (directory / f"key-{KEY_ID}.budget").chmod(0o400)  # a monitoring user may only read it
    assert budget.snapshot().calls_last_minute == 1


def test_a_corrupt_file_counts_the_budget_as_spent_and_is_rewritten(tmp_path, clock, caplog):
    path = tmp_path / f"key-{KEY_ID}.budget"
    path.write_bytes(b"garbage" * 10)
    budget = file_budget(tmp_path, clock)
    with caplog.at_level(logging.WARNING, "common.budget"):
        wait = budget.reserve()
    assert wait == pytest.approx(WINDOW + budget.pacing.slack)
    assert "is not a budget file" in caplog.text
    assert path.stat().st_size == SIZE
    assert budget.reserve() == pytest.approx(wait + budget.pacing.interval)  # intact again


def test_a_clock_that_went_back_keeps_the_slots_already_given(tmp_path, clock):
    budget = file_budget(tmp_path, clock, rate=1.0)
    budget.reserve()
    ahead = budget.reserve()
    clock.advance(-3600.0)  # a reboot: the host's monotonic clock starts again
    assert budget.reserve() == pytest.approx(ahead + budget.pacing.interval)


def test_a_state_far_in_the_future_is_garbage_and_costs_one_window(tmp_path, clock):
    budget = file_budget(tmp_path, clock)
    budget.reserve()
    state_path = tmp_path / f"key-{KEY_ID}.budget"
    state = file_backend_module.BudgetState.decode(state_path.read_bytes())
    state.tat = clock.now + 10 * MAX_WAIT
    state_path.write_bytes(state.encode())
    assert budget.reserve() == pytest.approx(WINDOW + budget.pacing.slack)


@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory"])
def test_a_budget_file_that_is_not_a_regular_file_is_refused_without_hanging(tmp_path, clock, kind):
    path = tmp_path / f"key-{KEY_ID}.budget"
    target = tmp_path / "elsewhere"
    target.write_bytes(b"keep")
    if kind == "symlink":
        path.symlink_to(target)
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    with pytest.raises(StoreError, match=str(path)):
        file_budget(tmp_path, clock).acquire()
    assert target.read_bytes() == b"keep"


def test_a_lock_held_by_a_stopped_process_is_a_timeout_not_a_hang(tmp_path, clock, monkeypatch):
    monkeypatch.setattr(file_backend_module, "LOCK_WAIT_MIN", 0.0)
    budget = file_budget(tmp_path, clock)
    budget.acquire()
    holder = os.open(tmp_path / f"key-{KEY_ID}.budget", os.O_RDWR)
    try:
        assert file_backend_module.fs.try_lock(holder)
        with pytest.raises(BudgetTimeoutError, match="held the call budget's lock"):
            budget.acquire(timeout=0)
    finally:
        os.close(holder)
    assert budget.acquire(timeout=1) == pytest.approx(budget.pacing.interval)  # released: served again


# -- the async form --------------------------------------------------------------------------------------


def test_acquire_async_awaits_the_wait_and_reserves_off_the_loop(tmp_path, clock):
    """While one task waits for its slot, another runs: the wait is awaited (never ``time.sleep``)
    and the reservation (a file lock) runs in a worker thread."""
    loop_threads, reserve_threads = [], []

    def no_blocking_sleep(seconds):
        raise AssertionError("acquire_async slept on the loop")

    async def main():
        loop_threads.append(threading.get_ident())
        other_ran = asyncio.Event()
        awaited = []

        async def async_sleep(seconds):
            awaited.append(seconds)
            await other_ran.wait()  # returns only if the loop kept running other tasks

        backend = FileBudget(tmp_path, KEY_ID, clock)
        original = backend.reserve

        def recording_reserve(pacing, max_wait):
            reserve_threads.append(threading.get_ident())
            return original(pacing, max_wait)

        backend.reserve = recording_reserve
        budget = CallBudget(backend, Pacing(1.0), KEY_ID, sleep=no_blocking_sleep, async_sleep=async_sleep)

        async def other_task():
            while not awaited:  # the other task is inside its wait ...
                await asyncio.sleep(0)
            other_ran.set()  # ... and this one runs meanwhile

        first = await budget.acquire_async()
        waiting = asyncio.create_task(budget.acquire_async())
        other = asyncio.create_task(other_task())
        second = await asyncio.wait_for(waiting, timeout=10)
        await other
        return first, second, awaited

    first, second, awaited = asyncio.run(main())
    assert first == 0.0
    assert second == pytest.approx(Pacing(1.0).interval)
    assert awaited == [second]
    assert reserve_threads and loop_threads[0] not in reserve_threads


def test_acquire_async_times_out_like_acquire(tmp_path, clock):
    budget = file_budget(tmp_path, clock, rate=1.0)

    async def main():
        await budget.acquire_async()
        await budget.acquire_async(timeout=0.1)

    with pytest.raises(BudgetTimeoutError):
        asyncio.run(main())


# -- KIS_RATE_LIMIT and open_budget -----------------------------------------------------------------------


@pytest.mark.parametrize(("environ", "rate"), [
    ({}, 18.0), ({"KIS_ENV": "paper"}, 1.0), ({"KIS_ENV": "vps"}, 1.0),
    ({"KIS_RATE_LIMIT": "15"}, 15.0), ({"KIS_RATE_LIMIT": " 0.5 ", "KIS_ENV": "paper"}, 0.5),
])
def test_the_rate_is_the_environments_unless_kis_rate_limit_says(environ, rate, tmp_path):
    settings = Settings(environ, dotenv_path=False)
    assert settings.rate_limit == rate
    assert open_budget(settings, tmp_path, KEY_ID).rate == rate


@pytest.mark.parametrize("value", ["0", "-3", "abc", "nan", "inf", "1e400", "18/s"])
def test_a_bad_kis_rate_limit_is_a_config_error_naming_it(value):
    with pytest.raises(ConfigError, match="KIS_RATE_LIMIT") as info:
        Settings({"KIS_RATE_LIMIT": value}, dotenv_path=False).rate_limit  # noqa: B018
    assert repr(value) in str(info.value)


def test_open_budget_uses_the_file_without_a_store_and_the_server_with_one(tmp_path):
    file_only = open_budget(Settings({}, dotenv_path=False), tmp_path, KEY_ID)
    assert isinstance(file_only.backend, FileBudget)
    shared = open_budget(Settings({"KIS_TOKEN_STORE": "redis://127.0.0.1:1/0"}, dotenv_path=False), tmp_path,
                         KEY_ID)
    assert isinstance(shared.backend, SharedBudget)
    assert shared.backend.shared.name == f"kis-token:v1:{KEY_ID}:budget"


# -- the Redis backend --------------------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path):
    started = RedisServer(tmp_path / "redis").start()
    yield started
    started.stop()


@pytest.fixture
def shared_budget(server, tmp_path, clock):
    """``shared_budget("a")``: host ``a``'s budget (its own token directory) on the test's server; the
    link retries at once after a failure, so a test may stop and start the server."""
    server_link = redis_store.StoreLink(server.url, retry_interval=0.0)

    def build(host: str = "a", rate: float = 18.0, host_clock=clock) -> CallBudget:
        local = FileBudget(tmp_path / host, KEY_ID, host_clock)
        backend = SharedBudget(RedisBudget(server_link, KEY_ID), local)
        return CallBudget(backend, Pacing(rate), KEY_ID, sleep=SleepRecorder())

    yield build
    server_link.client.close()


def test_the_server_spaces_calls_of_hosts_whose_clocks_disagree(shared_budget, server):
    interval = Pacing(18.0).interval
    a = shared_budget("a", host_clock=FakeClock(1_000.0))
    b = shared_budget("b", host_clock=FakeClock(9_000_000.0))
    waits = [budget.reserve() for budget in (a, b) * 5]
    assert waits[0] <= interval
    assert all(later > earlier for earlier, later in itertools.pairwise(waits))
    assert 8 * interval < waits[-1] <= 9 * interval  # ten calls at once: the last one 9 slots later
    assert list(server.dump()) == [key_name(KEY_ID, "budget").encode()]
    assert 0 < server.client().pttl(key_name(KEY_ID, "budget")) <= 62_000 + 1000 * waits[-1]


def test_the_server_refuses_a_slot_beyond_the_timeout_and_counts(shared_budget):
    budget = shared_budget(rate=1.0)
    budget.acquire(timeout=0)
    with pytest.raises(BudgetTimeoutError, match=r"kis-token:v1:real-0123456789abcdef:budget") as info:
        budget.acquire(timeout=0.2)
    assert 0.2 < info.value.retry_in <= budget.pacing.interval
    budget.note_refusal()
    snap = budget.snapshot()
    assert (snap.calls_last_minute, snap.egw00201_seen, snap.egw00201_total) == (1, 1, 1)
    assert (snap.backend, snap.store_down) == ("redis", False)


def test_a_server_that_goes_away_degrades_to_the_file_budget_with_one_warning(shared_budget, server, caplog):
    budget = shared_budget(rate=1000.0)
    for _ in range(3):
        budget.acquire()
    server.stop()
    with caplog.at_level(logging.WARNING, "common.budget"):
        waits = [budget.acquire() for _ in range(5)]
        budget.note_refusal()
        snap = budget.snapshot()
    warnings = [r for r in caplog.records if r.name.startswith("common.budget")]
    assert len(warnings) == 1 and "pacing the key on this host's budget" in warnings[0].getMessage()
    assert str(budget.backend.local.path) in warnings[0].getMessage()
    # paced by the file, the first a whole window after the server's last slot (still being spent)
    assert waits[0] >= WINDOW + budget.pacing.slack
    interval = budget.pacing.interval
    assert [w - waits[0] for w in waits[1:]] == pytest.approx([k * interval for k in range(1, 5)])
    assert (snap.backend, snap.store_down, snap.calls_last_minute, snap.egw00201_seen) == ("file", True, 5, 1)
    server.start()
    caplog.clear()
    with caplog.at_level(logging.WARNING, "common.budget"):
        budget.acquire()
    assert "answers again" in caplog.text
    assert budget.snapshot().backend == "redis"


def test_a_server_that_stops_answering_costs_one_bounded_timeout(shared_budget, server):
    budget = shared_budget(rate=1000.0)
    budget.acquire()
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        budget.acquire()
        took = time.monotonic() - started
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
    assert budget.backend.falling_back
    assert took < redis_link.SOCKET_TIMEOUT * 4  # the socket timeout, not a hang


def test_with_the_server_down_each_host_paces_at_its_share_of_the_rate(shared_budget, server):
    a, b = shared_budget("a", rate=100.0), shared_budget("b", rate=100.0)
    a.acquire()
    b.acquire()
    assert a.snapshot().hosts == 2
    server.stop()
    waits = [a.acquire() for _ in range(4)]
    half = Pacing(50.0).interval  # two hosts used the key in the last minute: each keeps half
    assert [later - earlier for earlier, later in itertools.pairwise(waits)] == pytest.approx([half] * 3)


#: What the README's section adds to the token store's ACL for the budget's script.
BUDGET_ACL = ["+hget", "+hset", "+hgetall", "+hdel", "+hincrby", "+time"]


@pytest.mark.parametrize("extra", [BUDGET_ACL, []])
def test_an_acl_user_needs_the_commands_the_readme_names(server, tmp_path, clock, extra):
    from tests.test_redis_store import README_ACL

    server.client().execute_command("ACL", "SETUSER", "trader", "on", ">trader-pw", *README_ACL, *extra)
    url = f"redis://trader:trader-pw@127.0.0.1:{server.port}/0"
    server_link = redis_store.StoreLink(url, retry_interval=0.0)
    try:
        backend = SharedBudget(RedisBudget(server_link, KEY_ID), FileBudget(tmp_path / "a", KEY_ID, clock))
        budget = CallBudget(backend, Pacing(18.0), KEY_ID, sleep=SleepRecorder())
        budget.acquire()
        budget.note_refusal()
        snap = budget.snapshot()
    finally:
        server_link.client.close()
    if extra:
        assert (snap.backend, snap.calls_last_minute, snap.egw00201_seen, snap.hosts) == ("redis", 1, 1, 1)
    else:  # without them the script is refused: the host paces alone, as with a server that is down
        assert snap.store_down
