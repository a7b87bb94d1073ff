"""The store pieces against their contract (``common.store.protocols``), one set of tests for both backends.

``file``: the pieces of ``common.store.file_store.key_store`` in one token directory; a second holder
is a second process of the same host (its own objects on the same files). ``redis``: the pieces of
``common.store.redis_store.shared_key_store`` on a real server on 127.0.0.1
(``common.sandbox.redis_server``); a second holder is another host (its own token directory, the
same server). The Redis backend's merge rules between the server and the host's copy come last.
Lock waits are bounded (at most a tenth of a second); nothing asserts on time.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from common.credentials.records import CorruptRecordError, TokenRecord
from common.errors import LockTimeoutError, RequestHeldBackError
from common.renewal.engine import RenewalEngine
from common.renewal.policy import Windows
from common.sandbox.redis_server import RedisServer
from common.store import file_store, redis_link, redis_store
from common.store.protocols import KeyStore, RenewalState
from tests.conftest import DAY, START, FakeClock, fake_token

KEY_ID = "real-0123456789abcdef"
FINGERPRINT = "sha256:0123456789abcdef"


def token(n: int = 1, expires_at: float = START + DAY) -> TokenRecord:
    return TokenRecord(fake_token(n), "Bearer", expires_at - DAY, expires_at, "us", "real", FINGERPRINT)


@dataclass
class Backend:
    """One backend under test: opens a holder's pieces, and plants raw values where they are kept."""

    name: str
    tmp: Path
    server: RedisServer | None = None

    def open(self, holder: str = "a") -> KeyStore[Any]:
        """The key's pieces as ``holder`` sees them (a process of this host, or another host)."""
        if self.server is None:
            return file_store.key_store(self.tmp / "tokens", KEY_ID)
        return redis_store.shared_key_store(self.server.url, self.tmp / f"host-{holder}", KEY_ID, lease=5.0)

    def plant(self, piece: str, raw: bytes) -> None:
        """Write ``raw`` as the stored ``record`` or ``state`` (on the server for Redis: a new host has
        no copy of its own)."""
        if self.server is None:
            path = self.tmp / "tokens" / f"key-{KEY_ID}.{'json' if piece == 'record' else piece}"
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            path.write_bytes(raw)
        else:
            self.server.client().set(redis_store.key_names(KEY_ID)[piece], raw)


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server
    for link in redis_link._links.values():
        link.client.close()
    redis_link._links.clear()


@pytest.fixture(params=["file", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "file":
        return Backend("file", tmp_path)
    server: RedisServer = request.getfixturevalue("redis_server")
    server.client().flushall()
    return Backend("redis", tmp_path, server)


# -- the record store -----------------------------------------------------------------------------------


def test_a_record_saved_by_one_holder_is_loaded_by_another_and_deleted_once(backend):
    a, b = backend.open("a"), backend.open("b")
    assert a.record.load() is None
    a.record.save(token(1))
    assert a.record.load() == token(1)
    assert b.record.load() == token(1)
    removed = b.record.delete()
    assert removed and all(isinstance(place, str) for place in removed)
    assert b.record.load() is None
    assert a.record.load() is None
    assert b.record.delete() == []


def test_a_save_replaces_the_record_and_changes_the_signature(backend):
    store = backend.open()
    empty = store.record.signature()
    store.record.save(token(1))
    first = store.record.signature()
    store.record.save(token(2, START + DAY + 60))
    second = store.record.signature()
    assert len({repr(empty), repr(first), repr(second)}) == 3
    assert store.record.load() == token(2, START + DAY + 60)
    assert store.record.signature() == second  # unchanged while nothing is written


def test_a_fresh_store_is_ready_to_be_written(backend):
    store = backend.open()
    assert store.record.problem() is None
    store.record.ready()


@pytest.mark.parametrize("raw", [b"{not json", b"", b"\xff\xfe", b"[1, 2]", b'{"version": 99}'],
                         ids=["not-json", "empty", "not-utf8", "not-an-object", "unknown-version"])
def test_a_corrupt_record_is_a_corrupt_record_error_until_a_save_replaces_it(backend, raw):
    backend.plant("record", raw)
    store = backend.open()
    with pytest.raises(CorruptRecordError):
        store.record.load()
    store.record.save(token(1))
    assert store.record.load() == token(1)


# -- the renewal lock ---------------------------------------------------------------------------------------


def test_the_lock_excludes_a_second_holder_until_released(backend):
    a, b = backend.open("a"), backend.open("b")
    with a.lock.hold(1):
        a.lock.confirm()
        with pytest.raises(LockTimeoutError), b.lock.hold(0):
            pass
        with pytest.raises(LockTimeoutError), b.lock.hold(0.1):
            pass
        with pytest.raises(LockTimeoutError):
            b.lock.confirm()  # not held by b
    with b.lock.hold(0):
        b.lock.confirm()
    with pytest.raises(LockTimeoutError):
        a.lock.confirm()  # released


def test_the_lock_is_reentrant_within_a_thread_and_excludes_other_threads(backend):
    store = backend.open()
    outcome: list[str] = []

    def other_thread() -> None:
        try:
            with store.lock.hold(0):
                outcome.append("held")
        except LockTimeoutError:
            outcome.append("timed out")

    with store.lock.hold(0):
        with store.lock.hold(0):
            store.lock.confirm()
        store.lock.confirm()  # still held after the inner hold ends
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join(timeout=30)
    assert outcome == ["timed out"]


# -- the state store ---------------------------------------------------------------------------------------


def test_a_missing_state_is_fresh(backend):
    state = backend.open().state.load()
    assert state.to_dict() == RenewalState().to_dict()
    assert not state.unreadable


def test_a_state_saved_by_one_holder_is_loaded_by_another(backend):
    saved = RenewalState(last_request_at=START, last_outcome="refused", last_outcome_at=START + 1,
                         last_code="EGW00133", refusals={"EGW00133": 2}, renewals=3,
                         issuances=[START - 3600, START])
    backend.open("a").state.save(saved)
    loaded = backend.open("b").state.load()
    assert loaded.to_dict() == saved.to_dict()


@pytest.mark.parametrize("raw", [b"{not json", b'{"last_request_at": "now"}', b'{"issuances": [1e300]}',
                                 b'{"renewals": -1}', b"[]"])
def test_a_corrupt_state_is_never_taken_for_a_fresh_one(backend, raw):
    backend.plant("state", raw)
    store = backend.open()
    if backend.name == "file":
        with pytest.raises(CorruptRecordError):
            store.state.load()
    else:  # the host's missing copy reads as fresh, marked unreadable: the engine's answer is the same
        assert store.state.load().unreadable


# -- what the engine makes of a corrupt piece ----------------------------------------------------------


def engine_on(store: KeyStore[Any], clock: FakeClock, issued: list[object]) -> RenewalEngine[TokenRecord]:
    def issue(held: TokenRecord | None) -> TokenRecord:
        issued.append(held)
        return token(9, clock.now + DAY)

    return RenewalEngine(name="us token", store=store, issue=issue, accept=lambda _: None, windows=Windows(),
                         clock=clock)


def test_the_engine_takes_a_corrupt_record_for_a_miss_and_warns_naming_it(backend, clock, caplog):
    backend.plant("record", b"{not json")
    issued: list[object] = []
    engine = engine_on(backend.open(), clock, issued)
    with caplog.at_level(logging.WARNING, logger="common.renewal.engine"):
        assert engine.current() is None
    assert "ignoring the stored us token" in caplog.text
    assert engine.store.record.location in caplog.text
    assert engine.serve() == token(9, clock.now + DAY)  # renewed over it
    assert issued == [None]


def test_the_engine_counts_a_corrupt_state_as_a_request_made_just_now(backend, clock):
    backend.plant("state", b"{not json")
    issued: list[object] = []
    engine = engine_on(backend.open(), clock, issued)
    with pytest.raises(RequestHeldBackError):
        engine.renew(engine.windows.lock_wait, engine.due)
    assert issued == []


# -- the Redis backend's merge rules: the server and each host's copy ----------------------------------------


@pytest.fixture
def shared(redis_server: RedisServer, tmp_path: Path) -> Backend:
    redis_server.client().flushall()
    return Backend("redis", tmp_path, redis_server)


def host_copy(store: KeyStore[Any]) -> file_store.FileRecordStore[TokenRecord]:
    return store.record.local  # type: ignore[attr-defined]  # the shared store's file piece


def test_the_later_request_wins_between_the_servers_state_and_the_hosts(shared):
    store = shared.open()
    store.state.save(RenewalState(last_request_at=START))
    store.state.local.save(RenewalState(last_request_at=START + 120))  # type: ignore[attr-defined]
    assert store.state.load().last_request_at == START + 120
    store.state.shared.save(RenewalState(last_request_at=START + 240))  # type: ignore[attr-defined]
    assert store.state.load().last_request_at == START + 240


def test_an_unusable_copy_of_the_state_marks_the_usable_one_unreadable(shared):
    store = shared.open()
    store.state.save(RenewalState(last_request_at=START, renewals=4))
    shared.plant("state", b"{not json")
    state = store.state.load()
    assert state.unreadable  # the engine counts a request as made just now
    assert (state.last_request_at, state.renewals) == (START, 4)  # never wiped


def test_a_server_that_lost_the_record_gets_the_hosts_copy_back(shared):
    store = shared.open("a")
    store.record.save(token(1))
    shared.server.client().flushall()  # restarted empty
    assert store.record.load() == token(1)
    assert shared.open("b").record.load() == token(1)  # another host reads it from the server


def test_the_record_that_expires_later_wins_between_the_server_and_the_host(shared):
    a, b = shared.open("a"), shared.open("b")
    a.record.save(token(1))
    b.record.load()  # b's copy: token 1
    a.record.save(token(2, START + DAY + 3600))
    assert b.record.load() == token(2, START + DAY + 3600)
    assert host_copy(b).load() == token(2, START + DAY + 3600)  # the host's copy follows the server
    host_copy(b).save(token(3, START + DAY + 7200))  # host b renewed while the server was away
    assert a.record.load() == token(2, START + DAY + 3600)  # the server has not seen it yet
    assert b.record.load() == token(3, START + DAY + 7200)  # b's later copy goes back to the server
    assert a.record.load() == token(3, START + DAY + 7200)
    assert host_copy(a).load() == token(3, START + DAY + 7200)


def test_a_deleted_record_is_never_put_back_by_a_host_that_still_has_it(shared):
    a, b = shared.open("a"), shared.open("b")
    a.record.save(token(1))
    assert b.record.load() == token(1)
    a.record.delete()
    assert b.record.load() is None
    assert host_copy(b).load() is None  # its copy went with it
    b.record.save(token(2, START + DAY + 3600))  # a renewal after the deletion is stored again
    assert a.record.load() == token(2, START + DAY + 3600)
