"""The renewal engine on its own: an in-memory store and a counting issuer, no broker, no files.

The store implements the three pieces of ``common.store.protocols`` in memory (the state kept as
the JSON the real stores write, so a corrupt one can be planted); the issuer counts its calls in the
manner of botocore's ``IntegerRefresher``, and each test says how many issues it allows. Time is a
:class:`FakeClock`; nothing sleeps except the racing issuer, whose short wait only widens the race.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from common.credentials.records import CorruptRecordError, TokenRecord
from common.errors import (
    BrokerError,
    DailyLimitError,
    KISTokenError,
    LockTimeoutError,
    RequestHeldBackError,
    TokenUnavailableError,
)
from common.renewal.engine import Outcome, RenewalEngine
from common.renewal.policy import Windows
from common.store.protocols import KeyStore, RenewalState
from tests.conftest import DAY, START, FakeClock

MINUTE = 60.0
FINGERPRINT = "sha256:0123456789abcdef"
WINDOWS = Windows()  # the documented windows, no jitter: advisory 60 min, mandatory 20, margin 5
#: No one-a-minute rule: the single flight alone (the re-read under the lock) must keep it to one issue.
NO_MINUTE = Windows(min_request_interval=0.0)


# -- the fakes -----------------------------------------------------------------------------------------


class MemoryRecordStore:
    """A :class:`~common.store.protocols.RecordStore` in memory; counts the engine's looks."""

    location = "memory:record"

    def __init__(self) -> None:
        self.record: TokenRecord | None = None
        self.corrupt = False
        self.version = 0
        self.signatures = 0
        self.loads = 0

    def signature(self) -> object:
        self.signatures += 1
        return self.version

    def load(self) -> TokenRecord | None:
        self.loads += 1
        if self.corrupt:
            raise CorruptRecordError("not a record")
        return self.record

    def save(self, record: TokenRecord) -> None:
        self.record, self.corrupt = record, False
        self.version += 1

    def delete(self) -> list[str]:
        removed = [self.location] if self.record is not None else []
        self.record = None
        self.version += 1
        return removed

    def ready(self) -> None:
        return None

    def problem(self) -> str | None:
        return None


class MemoryLock:
    """A :class:`~common.store.protocols.RenewalLock` in memory: re-entrant within a thread; tells
    whether (and by which thread) it is held."""

    location = "memory:lock"

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.owner: int | None = None
        self.depth = 0
        self.taken = 0

    @property
    def held(self) -> bool:
        return self.depth > 0

    @contextlib.contextmanager
    def hold(self, timeout: float) -> Iterator[None]:
        acquired = self._lock.acquire(blocking=False) if timeout == 0 else self._lock.acquire(timeout=timeout)
        if not acquired:
            raise LockTimeoutError(f"{self.location} held for more than {timeout:g} s")
        self.owner, self.depth = threading.get_ident(), self.depth + 1
        self.taken += 1
        try:
            yield
        finally:
            self.depth -= 1
            if not self.depth:
                self.owner = None
            self._lock.release()

    def confirm(self) -> None:
        if self.owner != threading.get_ident():
            raise LockTimeoutError(f"{self.location} is not held by this thread")


class MemoryStateStore:
    """A :class:`~common.store.protocols.StateStore` holding the state's JSON text."""

    location = "memory:state"

    def __init__(self) -> None:
        self.text: str | None = None

    def load(self) -> RenewalState:
        return RenewalState() if self.text is None else RenewalState.from_json(self.text)

    def save(self, state: RenewalState) -> None:
        self.text = json.dumps(state.to_dict())

    def put(self, **values: object) -> None:
        """Plant a state (as another process would have left it)."""
        self.save(RenewalState(**values))


def memory_store() -> KeyStore[TokenRecord]:
    return KeyStore(MemoryRecordStore(), MemoryLock(), MemoryStateStore())


class CountingIssuer:
    """The broker, counted: each call returns ``token-<n>`` for 24 h, or raises the next planned error."""

    def __init__(self, clock: FakeClock, wait: float = 0.0) -> None:
        self.clock = clock
        self.count = 0
        self.errors: list[Exception] = []
        self.wait = wait
        self.held: list[TokenRecord | None] = []
        self._count_lock = threading.Lock()

    def __call__(self, held: TokenRecord | None) -> TokenRecord:
        with self._count_lock:
            self.count += 1
            n = self.count
        self.held.append(held)
        if self.wait:
            time.sleep(self.wait)  # widens a race; nothing is asserted on time
        if self.errors:
            raise self.errors.pop(0)
        return record(f"token-{n}", self.clock.now, self.clock.now + DAY)


def record(token: str, issued_at: float, expires_at: float) -> TokenRecord:
    return TokenRecord(token, "Bearer", issued_at, expires_at, "us", "real", FINGERPRINT)


def engine_on(store: KeyStore[TokenRecord], issuer: CountingIssuer, clock: FakeClock, *,
              observers: tuple[Callable[..., object], ...] = (), daily_limit: int = 0,
              windows: Windows = WINDOWS) -> RenewalEngine[TokenRecord]:
    """An engine wired as the facade wires it, less the market's extras (mirror, legacy, calibration)."""
    return RenewalEngine(name="us token", store=store, issue=issuer, accept=lambda _: None, windows=windows,
                         clock=clock, observers=observers, daily_limit=daily_limit)


@pytest.fixture
def store() -> KeyStore[TokenRecord]:
    return memory_store()


@pytest.fixture
def issuer(clock: FakeClock) -> CountingIssuer:
    return CountingIssuer(clock)


@pytest.fixture
def outcomes() -> list[Outcome]:
    return []


@pytest.fixture
def engine(store, issuer, clock, outcomes) -> RenewalEngine[TokenRecord]:
    return engine_on(store, issuer, clock, observers=(lambda outcome, state: outcomes.append(outcome),))


def stored_state(store: KeyStore[TokenRecord]) -> RenewalState:
    return store.state.load()


# -- serving from memory ----------------------------------------------------------------------------------


def test_a_cold_start_issues_once_and_stores_the_record_and_the_request(engine, store, issuer, outcomes):
    served = engine.serve()
    assert served.access_token == "token-1"
    assert issuer.count == 1 and issuer.held == [None]
    assert store.record.record == served
    state = stored_state(store)
    assert state.last_request_at == START
    assert state.issuances == [START]
    assert [outcome.kind for outcome in outcomes] == ["renewed"]


def test_a_fresh_record_is_served_from_memory_without_looking_at_the_store(engine, store, issuer, clock):
    first = engine.serve()
    looks = store.record.signatures
    for _ in range(100):
        assert engine.serve() is first
    assert store.record.signatures == looks  # within the sync interval: not even the signature
    clock.advance(WINDOWS.sync_interval)
    assert engine.serve() is first
    assert store.record.signatures == looks + 1  # one cheap look, unchanged: no load
    clock.advance(20 * 3600)  # still 4 h left: far outside the advisory window
    assert engine.serve() is first
    assert issuer.count == 1


def test_a_renewal_finds_another_processs_new_record_under_the_lock_and_issues_nothing(store, issuer, clock):
    stale = record("stale", START - DAY, START + 10 * MINUTE)
    store.record.save(stale)
    engine = engine_on(store, issuer, clock, windows=NO_MINUTE)
    assert engine.current() == stale
    newer = record("from-another-process", START, START + DAY)
    store.record.save(newer)  # renewed by another process since this one looked
    assert engine.renew(WINDOWS.lock_wait, engine.due) == newer
    assert issuer.count == 0


def test_another_processs_renewal_is_taken_up_at_the_next_sync(engine, store, issuer, clock):
    engine.serve()
    newer = record("from-another-process", START, START + DAY + 3600)
    store.record.save(newer)
    assert engine.serve().access_token == "token-1"  # within the sync interval
    clock.advance(WINDOWS.sync_interval)
    assert engine.serve() == newer
    assert issuer.count == 1


# -- renewing when due --------------------------------------------------------------------------------------


@pytest.mark.parametrize("left", [50 * MINUTE, 10 * MINUTE, 4 * MINUTE, -MINUTE],
                         ids=["advisory", "mandatory", "under-margin", "expired"])
def test_a_record_inside_a_window_is_renewed_with_exactly_one_issue(engine, store, issuer, clock, left):
    held = record("held", START - DAY + left, START + left)
    store.record.save(held)
    store.state.put(last_request_at=START - DAY + left)
    served = engine.serve()
    assert served.access_token == "token-1"
    assert issuer.count == 1 and issuer.held == [held]
    assert engine.serve() is served
    assert issuer.count == 1


def test_a_refused_renewal_serves_the_held_record_and_backs_off(engine, store, issuer, clock, outcomes):
    held = record("held", START - DAY, START + 30 * MINUTE)
    store.record.save(held)
    issuer.errors.append(BrokerError("EGW00133", "접근토큰 발급 잠시 후 다시 시도하세요(1분당 1회)"))
    assert engine.serve() == held
    assert issuer.count == 1
    assert engine.backoff.until == START + WINDOWS.min_request_interval
    assert [(o.kind, o.code) for o in outcomes] == [("refused", "EGW00133")]
    clock.advance(WINDOWS.min_request_interval - 1)
    assert engine.serve() == held  # backing off: nothing asked
    assert issuer.count == 1
    clock.advance(1)
    assert engine.serve().access_token == "token-2"
    assert issuer.count == 2


def test_a_refused_renewal_with_nothing_usable_held_is_an_error(engine, issuer):
    issuer.errors.append(BrokerError("EGW00133", "once a minute"))
    with pytest.raises(TokenUnavailableError) as caught:
        engine.serve()
    assert isinstance(caught.value.__cause__, BrokerError)
    with pytest.raises(TokenUnavailableError):  # backing off: fails at once, nothing asked
        engine.serve()
    assert issuer.count == 1


def test_an_issuer_that_raises_anything_becomes_a_kis_error_and_the_held_record_stays(engine, store, issuer):
    held = record("held", START - DAY, START + 30 * MINUTE)
    store.record.save(held)
    issuer.errors.append(KeyError("access_token"))
    assert engine.serve() == held
    assert isinstance(engine.backoff.error, KISTokenError)
    assert issuer.count == 1


# -- one request a minute, and the daily budget ---------------------------------------------------------


def test_a_request_within_the_minute_is_held_back_without_an_issue(engine, store, issuer, clock, outcomes):
    store.state.put(last_request_at=START - 10)
    with pytest.raises(RequestHeldBackError) as caught:
        engine.renew(WINDOWS.lock_wait, engine.due)
    assert caught.value.retry_in == WINDOWS.min_request_interval - 10
    assert issuer.count == 0
    assert [(o.kind, o.code) for o in outcomes] == [("held_back", "LOCAL")]


def test_held_back_serves_the_held_record_and_asks_once_the_minute_is_over(engine, store, issuer, clock):
    held = record("held", START - DAY, START + 30 * MINUTE)
    store.record.save(held)
    store.state.put(last_request_at=START - 10)
    assert engine.serve() == held
    assert issuer.count == 0
    assert engine.backoff.until == START + WINDOWS.min_request_interval - 10
    clock.advance(WINDOWS.min_request_interval - 11)
    assert engine.serve() == held
    assert issuer.count == 0
    clock.advance(1)
    assert engine.serve().access_token == "token-1"
    assert issuer.count == 1


def test_held_back_from_cold_is_an_error_that_names_the_wait(engine, store, issuer):
    store.state.put(last_request_at=START - 10)
    with pytest.raises(TokenUnavailableError, match="next request possible in 51 s") as caught:
        engine.serve()
    assert isinstance(caught.value.__cause__, RequestHeldBackError)
    assert issuer.count == 0


def test_the_daily_limit_refuses_once_spent_without_an_issue(store, issuer, clock, outcomes):
    engine = engine_on(store, issuer, clock, daily_limit=2,
                       observers=(lambda outcome, state: outcomes.append(outcome),))
    store.state.put(last_request_at=START - 2 * 3600, issuances=[START - 5 * 3600, START - 2 * 3600])
    with pytest.raises(DailyLimitError) as caught:
        engine.renew(WINDOWS.lock_wait, engine.due)
    assert caught.value.retry_in == DAY - 5 * 3600  # when the older issuance leaves the 24 h
    assert issuer.count == 0
    assert [(o.kind, o.code) for o in outcomes] == [("refused", DailyLimitError.CODE)]


def test_issuances_older_than_a_day_leave_the_budget(store, issuer, clock):
    engine = engine_on(store, issuer, clock, daily_limit=2)
    store.state.put(last_request_at=START - 2 * 3600, issuances=[START - DAY - 1, START - 2 * 3600])
    assert engine.serve().access_token == "token-1"
    assert issuer.count == 1
    assert stored_state(store).issuances == [START - 2 * 3600, START]


def test_a_corrupt_state_counts_as_a_request_made_just_now(engine, store, issuer, clock, caplog):
    store.state.text = '{"last_request_at": "yesterday"'
    with caplog.at_level(logging.WARNING, logger="common.renewal.engine"), \
            pytest.raises(RequestHeldBackError, match="unreadable") as caught:
        engine.renew(WINDOWS.lock_wait, engine.due)
    assert caught.value.retry_in == WINDOWS.min_request_interval
    assert issuer.count == 0
    assert "renewal state is unusable" in caplog.text
    clock.advance(WINDOWS.min_request_interval)
    assert engine.serve().access_token == "token-1"  # the state written since is readable
    assert issuer.count == 1


# -- put and forget ----------------------------------------------------------------------------------------


def test_put_stores_the_record_and_serves_it_without_an_issue(engine, store, issuer):
    given = record("given", START, START + DAY)
    assert engine.put(given) == given
    assert store.record.record == given
    assert engine.serve() == given
    assert issuer.count == 0


def test_forget_removes_the_record_from_the_store_and_memory(engine, store, issuer, clock):
    engine.serve()
    assert engine.forget() == [MemoryRecordStore.location]
    assert store.record.record is None
    assert engine.snapshot[0] is None
    assert stored_state(store).legacy_closed
    assert not store.lock.held
    clock.advance(WINDOWS.min_request_interval)
    assert engine.serve().access_token == "token-2"
    assert issuer.count == 2


# -- observers ---------------------------------------------------------------------------------------------


def test_an_observers_slow_work_runs_after_the_lock_is_released(store, issuer, clock):
    seen: list[tuple[str, bool]] = []

    def observer(outcome: Outcome, state: RenewalState) -> Callable[[], None]:
        seen.append(("observe " + outcome.kind, store.lock.held))
        state.alerts_sent["renewed"] = outcome.at  # saved with the state, under the lock
        return lambda: seen.append(("slow work", store.lock.held))

    engine = engine_on(store, issuer, clock, observers=(observer,))
    engine.serve()
    assert seen == [("observe renewed", True), ("slow work", False)]
    assert stored_state(store).alerts_sent == {"renewed": START}


def test_a_failing_observer_never_stops_the_record_from_being_served(store, issuer, clock, caplog):
    def broken(outcome: Outcome, state: RenewalState) -> None:
        raise RuntimeError("webhook down")

    def broken_later(outcome: Outcome, state: RenewalState) -> Callable[[], None]:
        def post() -> None:
            raise RuntimeError("webhook down")

        return post

    engine = engine_on(store, issuer, clock, observers=(broken, broken_later))
    with caplog.at_level(logging.WARNING, logger="common.renewal.engine"):
        assert engine.serve().access_token == "token-1"
    assert caplog.text.count("outcome observer failed: RuntimeError") == 2
    assert issuer.count == 1


# -- threads racing from cold --------------------------------------------------------------------------------


def race(engines: list[RenewalEngine[TokenRecord]], threads_each: int) -> list[str]:
    """Start ``threads_each`` threads per engine at once, each serving once; return what each got."""
    count = len(engines) * threads_each
    start = threading.Barrier(count)
    got: list[str] = []
    errors: list[BaseException] = []

    def serve(engine: RenewalEngine[TokenRecord]) -> None:
        start.wait(timeout=30)
        try:
            got.append(engine.serve().access_token)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=serve, args=(engine,))
               for engine in engines for _ in range(threads_each)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    assert len(got) == count
    return got


def test_threads_racing_from_cold_cost_one_issue(store, clock):
    issuer = CountingIssuer(clock, wait=0.05)
    engine = engine_on(store, issuer, clock, windows=NO_MINUTE)
    assert race([engine], 8) == ["token-1"] * 8
    assert issuer.count == 1


def test_two_engines_on_one_store_racing_from_cold_cost_one_issue(store, clock):
    issuer = CountingIssuer(clock, wait=0.05)
    engines = [engine_on(store, issuer, clock, windows=NO_MINUTE) for _ in range(2)]  # two processes
    assert race(engines, 4) == ["token-1"] * 8
    assert issuer.count == 1
