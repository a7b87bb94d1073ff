"""Resends after ``EGW00201`` (and a rejected token) where the first send is not simply repeatable:
a request body that is a file or a stream (requests, httpx sync and async), a budget whose counter
fails, a mojito resend whose slot is too far, and a store that comes back after an outage.

The REST calls go to a small local server on 127.0.0.1 that records every body it read and answers
``EGW00201`` to the first N requests; the token comes from the in-process sandbox."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import requests
import responses

from common.auth import KISAuth, KISHttpxAuth
from common.budget.file_backend import FileBudget
from common.budget.limiter import CallBudget
from common.budget.pacing import Pacing
from common.budget.redis_backend import RedisBudget, SharedBudget
from common.budget.resend import MAX_RESENDS, RESEND_WITHIN
from common.errors import BudgetTimeoutError, StoreError
from common.sandbox import Sandbox
from common.sandbox.redis_server import RedisServer
from common.store.redis_link import StoreLink
from tests.conftest import DAY, REAL_HOST, FakeClock, SleepRecorder, fake_token, token_answer
from us.token_manager import USTokenManager

BUSY = {"rt_cd": "1", "msg_cd": "EGW00201", "msg1": "초당 거래건수를 초과하였습니다."}
OK = {"rt_cd": "0", "msg_cd": "MCA00000", "output": {}}
QUOTE = "/uapi/overseas-price/v1/quotations/price"
KEY_ID = "real-0123456789abcdef"
PAYLOAD = b'{"CANO": "12345678", "ORD_QTY": "1"}'


class Recorder(ThreadingHTTPServer):
    """Answers ``EGW00201`` to the first :attr:`busy` POSTs, then OK; keeps the bodies it read."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.busy = 0
        self.bodies: list[bytes] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/uapi/order"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        server: Recorder = self.server  # type: ignore[assignment]
        server.bodies.append(self._body())
        busy = len(server.bodies) <= server.busy
        data = json.dumps(BUSY if busy else OK).encode()
        self.send_response(500 if busy else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
            return body
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))


@pytest.fixture
def recorder():
    server = Recorder()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def sandbox(clock):
    with Sandbox(clock=clock, rest_rate=0) as server:
        yield server


@pytest.fixture
def manager(make_manager, env, sandbox):
    us = make_manager(USTokenManager, {**env, "KIS_BASE_URL": sandbox.base_url, "KIS_RATE_LIMIT": "1000"})
    us.get_valid_token()
    return us


def post_requests(manager, url, body):
    session = requests.Session()
    session.auth, session.trust_env = KISAuth(manager), False
    headers = {"Content-Type": "application/json"}
    answer = session.post(url, data=body, headers=headers, timeout=5)
    return answer.json()


def generator():
    yield PAYLOAD[:10]
    yield PAYLOAD[10:]


# -- 1. requests: a file body is rewound for the resend; a stream is not resent --------------------


def test_requests_resends_a_file_body_rewound(manager, recorder):
    recorder.busy = 2
    assert post_requests(manager, recorder.url, io.BytesIO(PAYLOAD)) == OK
    assert recorder.bodies == [PAYLOAD] * 3
    assert manager.call_budget().snapshot().egw00201_total == 2


def test_requests_resends_a_file_body_from_where_it_started(manager, recorder):
    recorder.busy = 1
    body = io.BytesIO(b"skipped" + PAYLOAD)
    body.seek(7)
    assert post_requests(manager, recorder.url, body) == OK
    assert recorder.bodies == [PAYLOAD] * 2


def test_requests_returns_the_answer_to_a_generator_body_unsent_again(manager, recorder, caplog):
    recorder.busy = 1
    with caplog.at_level(logging.DEBUG, "common.auth.requests_auth"):
        assert post_requests(manager, recorder.url, generator()) == BUSY
    assert recorder.bodies == [PAYLOAD]  # no empty resend
    assert "not resent" in caplog.text


def test_requests_still_resends_bytes_and_text_bodies(manager, recorder):
    recorder.busy = 2
    assert post_requests(manager, recorder.url, PAYLOAD) == OK
    assert post_requests(manager, recorder.url, PAYLOAD.decode()) == OK
    assert recorder.bodies == [PAYLOAD] * 4


# -- 2. httpx: a streamed body is read before the flow, so a resend sends it whole -----------------


def test_httpx_resends_a_generator_body_whole(manager, recorder):
    recorder.busy = 2
    with httpx.Client(auth=KISHttpxAuth(manager), trust_env=False, timeout=5) as client:
        answer = client.post(recorder.url, content=generator())
    assert answer.json() == OK
    assert recorder.bodies == [PAYLOAD] * 3


def test_httpx_async_resends_an_async_generator_body_whole(manager, recorder):
    recorder.busy = 2

    async def chunks():
        for chunk in generator():
            yield chunk

    async def call():
        async with httpx.AsyncClient(auth=KISHttpxAuth(manager), trust_env=False, timeout=5) as client:
            return await client.post(recorder.url, content=chunks())

    assert asyncio.run(call()).json() == OK
    assert recorder.bodies == [PAYLOAD] * 3


# -- 3. a counter that fails costs the count, not the broker's answer ------------------------------


@pytest.mark.parametrize("error", [StoreError("cannot write the budget file"),
                                   BudgetTimeoutError("the budget file stayed locked")])
def test_a_failing_refusal_counter_does_not_escape_the_resend(manager, recorder, monkeypatch, caplog, error):
    def fail() -> None:
        raise error

    monkeypatch.setattr(manager.call_budget(), "note_refusal", fail)
    recorder.busy = 1
    with caplog.at_level(logging.DEBUG, "common.budget.resend"):
        assert post_requests(manager, recorder.url, PAYLOAD) == OK
    assert recorder.bodies == [PAYLOAD] * 2
    assert "not counted" in caplog.text
    recorder.busy = 2 + 1 + MAX_RESENDS  # bounded all the same: the last answer, no exception
    last = post_requests(manager, recorder.url, PAYLOAD)
    assert len(recorder.bodies) == 2 + 1 + MAX_RESENDS
    assert last == BUSY


# -- 4. mojito: each resend's slot must come within the 5 s of the first refusal --------------------


@pytest.fixture
def broker_on(make_manager, env, clock, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    us = make_manager(USTokenManager, {**env, "KIS_US_ACCOUNT": "12345678-01", "KIS_RATE_LIMIT": "1000"})
    with responses.RequestsMock(assert_all_requests_are_fired=False) as http:
        http.post(REAL_HOST + "/oauth2/tokenP", json=token_answer(fake_token(1), clock() + DAY))
        yield us, http, us.create_broker()


def watch_acquire(budget, monkeypatch, *, refuse_bounded: bool):
    """Record each acquire's timeout; with ``refuse_bounded`` a bounded one finds no slot in time."""
    timeouts: list[float | None] = []
    real = budget.acquire

    def acquire(timeout=None):
        timeouts.append(timeout)
        if refuse_bounded and timeout is not None:
            raise BudgetTimeoutError("no slot in time", retry_in=10.0)
        return real(timeout)

    monkeypatch.setattr(budget, "acquire", acquire)
    return timeouts


def test_mojito_resends_wait_for_their_slot_within_the_five_seconds(broker_on, monkeypatch):
    us, http, broker = broker_on
    http.get(REAL_HOST + QUOTE, json=BUSY, status=500)
    http.get(REAL_HOST + QUOTE, json=BUSY, status=500)
    http.get(REAL_HOST + QUOTE, json=OK)
    timeouts = watch_acquire(us.call_budget(), monkeypatch, refuse_bounded=False)
    assert broker.fetch_price("AAPL") == OK
    assert timeouts[0] is None  # the first send: the budget's own timeout
    assert len(timeouts) == 3 and all(t is not None and 0 < t <= RESEND_WITHIN for t in timeouts[1:])


def test_mojito_returns_the_last_answer_when_no_slot_comes_in_time(broker_on, monkeypatch):
    us, http, broker = broker_on
    http.get(REAL_HOST + QUOTE, json=BUSY, status=500)
    http.get(REAL_HOST + QUOTE, json=OK)
    timeouts = watch_acquire(us.call_budget(), monkeypatch, refuse_bounded=True)
    assert broker.fetch_price("AAPL") == BUSY  # fetch_price -> fetch_oversea_price: no exception
    assert len([call for call in http.calls if QUOTE in call.request.url]) == 1
    assert timeouts[0] is None and timeouts[1] is not None


# -- 5. a store that comes back: its first slot is not before the slots the file granted meanwhile --


@pytest.fixture
def valkey(tmp_path):
    started = RedisServer(tmp_path / "redis").start()
    yield started
    started.stop()


def test_the_store_that_comes_back_gives_no_slot_before_the_files_last(valkey, tmp_path):
    clock = FakeClock(10_000.0)  # the host's clock stands still: the waits are on one timeline
    server_link = StoreLink(valkey.url, retry_interval=0.0)
    backend = SharedBudget(RedisBudget(server_link, KEY_ID), FileBudget(tmp_path / "a", KEY_ID, clock))
    budget = CallBudget(backend, Pacing(10.0), KEY_ID, sleep=SleepRecorder())
    try:
        budget.acquire()
        valkey.stop()
        on_file = [budget.reserve() for _ in range(5)]  # granted by the file, up to ~1.5 s ahead
        assert backend.falling_back
        valkey.start()  # a fresh server: its schedule knows nothing of those slots
        back = budget.reserve()
        snap = budget.snapshot()
    finally:
        server_link.client.close()
    assert (snap.backend, snap.calls_last_minute) == ("redis", 1)  # the fresh server's first slot
    assert back > on_file[-1]  # after the file's slots, not a burst on top of them
