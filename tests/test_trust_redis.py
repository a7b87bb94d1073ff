"""What the shared store trusts (SPEC §10): a lease that lapsed is never used to send, a
check-and-set that keeps losing gives up, and the host's copy must be writable.

Against a real server on 127.0.0.1 (``common.sandbox.redis_server``), with no sleeping: a lapse is made by
deleting the lease on the server, or by shortening it there.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from common.credentials.records import TokenRecord
from common.errors import LockTimeoutError, StoreError
from common.sandbox.redis_server import RedisServer, free_port
from common.store import redis_link, redis_pieces, redis_store
from common.store.protocols import KeyStore
from tests.conftest import DAY, START, fake_token

KEY_ID = "real-0123456789abcdef"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    started = RedisServer(tmp_path / "redis").start()
    yield started
    started.stop()
    for link in redis_link._links.values():
        link.client.close()
    redis_link._links.clear()


def store_on(url: str, directory: Path, lease: float = 0.3) -> KeyStore[Any]:
    return redis_store.shared_key_store(url, directory, KEY_ID, lease=lease)


def record(token: int = 1, expires_at: float = START + DAY) -> TokenRecord:
    fingerprint = "sha256:0123456789abcdef"
    return TokenRecord(fake_token(token), "Bearer", START, expires_at, "us", "real", fingerprint)


# -- confirm(): the lease is still ours right before a request --------------------------------------


def test_confirm_passes_while_the_lease_is_ours_and_gives_it_its_whole_lease_again(server, tmp_path):
    store = store_on(server.url, tmp_path / "host")
    name = redis_store.key_names(KEY_ID)["lock"]
    client = server.client()
    with store.lock.hold(1):
        client.pexpire(name, 20)  # as if the holder had been stopped for most of its lease
        store.lock.confirm()
        assert 200 < client.pttl(name) <= 300  # the whole lease (0.3 s) again
        with store.lock.hold(0):  # re-entrant: the same lease
            store.lock.confirm()


def test_confirm_raises_once_the_lease_lapsed_and_another_owner_took_it(server, tmp_path):
    store = store_on(server.url, tmp_path / "host")
    other = store_on(server.url, tmp_path / "other-host")
    name = redis_store.key_names(KEY_ID)["lock"]
    client = server.client()
    with store.lock.hold(1):
        client.delete(name)  # the lease ran out while its holder was stopped ...
        with other.lock.hold(0):  # ... and another host took it
            with pytest.raises(LockTimeoutError, match="ran out before the request was sent"):
                store.lock.confirm()
            other.lock.confirm()  # the new owner's is fine
            assert client.pttl(name) > 0  # and still there: the lapsed holder did not touch it


def test_confirm_raises_once_the_lease_lapsed_even_if_nobody_took_it(server, tmp_path):
    store = store_on(server.url, tmp_path / "host")
    name = redis_store.key_names(KEY_ID)["lock"]
    with store.lock.hold(1):
        server.client().delete(name)
        with pytest.raises(LockTimeoutError):
            store.lock.confirm()
        assert server.client().get(name) is None  # not silently taken again


def test_confirm_outside_a_hold_raises(server, tmp_path):
    store = store_on(server.url, tmp_path / "host")
    with pytest.raises(LockTimeoutError, match="not held by this thread"):
        store.lock.confirm()


def test_confirm_with_the_store_down_since_the_hold_checks_only_the_file_lock(tmp_path, caplog):
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    try:
        store = store_on(url, tmp_path / "host")
        with caplog.at_level(logging.WARNING), store.lock.hold(1):
            store.lock.confirm()
        assert "holding only this host's lock" in caplog.text
    finally:
        redis_link._links.pop((url, redis_store.RETRY_INTERVAL)).client.close()


def test_confirm_when_the_store_stops_answering_after_the_lease_was_taken_is_an_error(server, tmp_path):
    store = store_on(server.url, tmp_path / "host")
    with store.lock.hold(1):
        server.stop()
        with pytest.raises(StoreError, match="cannot confirm the lease"):
            store.lock.confirm()


# -- check-and-set: bounded ----------------------------------------------------------------------------


def racing_record_store(server: RedisServer) -> tuple[redis_store.RedisRecordStore[TokenRecord], list[int]]:
    """A record store whose every read of the record is followed, before its ``EXEC``, by another
    client's write of it: every check-and-set loses the race."""
    name = redis_store.key_names(KEY_ID)["record"]
    rival = server.client()
    tries: list[int] = []

    def parse(text: str) -> TokenRecord:
        tries.append(1)
        rival.set(name, text)  # the same bytes: WATCH sees a write all the same
        return TokenRecord.from_json(text)

    client = redis.Redis.from_url(server.url, socket_timeout=2)
    store = redis_store.RedisRecordStore(client, name, parse, TokenRecord.to_json, f"{server.url} {name}")
    store.save(record(1))
    return store, tries


def test_delete_that_keeps_losing_the_race_gives_up_with_a_store_error(server):
    store, tries = racing_record_store(server)
    with pytest.raises(StoreError, match=r"kept changing under this host's write \(10 tries\)"):
        store.delete()
    assert len(tries) == redis_pieces.WATCH_TRIES == 10


def test_put_back_that_keeps_losing_the_race_gives_up_with_a_store_error(server):
    store, tries = racing_record_store(server)
    with pytest.raises(StoreError, match="kept changing"):
        store.put_back(record(2, expires_at=START + 2 * DAY))
    assert len(tries) == 10


def test_a_race_lost_once_is_tried_again(server):
    store, tries = racing_record_store(server)
    real_parse = store._parse
    store._parse = lambda text: real_parse(text) if not tries else TokenRecord.from_json(text)  # type: ignore
    assert store.delete() == [store.location]
    assert len(tries) == 1
    assert store.load() is None  # deleted (a deletion mark)


# -- ready(): the host's copy must be writable ------------------------------------------------------------


def test_ready_of_a_shared_store_is_its_host_files(server, tmp_path):
    store = store_on(server.url, tmp_path / "host")
    store.record.ready()
    assert store.record.problem() is None
    assert store.record.shared.problem() is None
    store.record.shared.ready()  # the server takes any record
    path = store.record.local.path
    path.parent.mkdir(mode=0o700, parents=True)
    path.mkdir()
    expected = f"{path} is a directory, not a file: remove it"
    assert store.record.problem() == expected
    with pytest.raises(StoreError) as caught:
        store.record.ready()
    assert str(caught.value) == expected


def test_a_store_that_refuses_our_password_or_database_makes_check_exit_3(server, make_manager, env,
                                                                          tmp_path, capsys):
    from common.cli.market import main
    from us.token_manager import USTokenManager

    url = server.url.removesuffix("/0") + "/99"  # a database the server does not have
    manager = make_manager(USTokenManager, {**env, "KIS_TOKEN_STORE": url,
                                            "KIS_TOKEN_DIR": str(tmp_path / "h")})
    assert main(lambda: manager, ["-q", "check"], market="US") == 3
    err = capsys.readouterr().err
    assert "refuses this configuration" in err and "KIS_TOKEN_STORE" in err
