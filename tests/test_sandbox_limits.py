"""The sandbox keeps the broker's other per-key limits (issue 19): REST calls per second per app key
(``EGW00201``) and the WebSocket session (one per app key, ``OPSP8996``; 41 registrations, ``OPSP0008``).

Real sockets on 127.0.0.1 only; counts are read from the sandbox's counters, never from timings.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from common.sandbox import Sandbox
from common.sandbox.rate import EGW00201_BODY, RestRateLimit

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 5
QUOTE = "/uapi/domestic-stock/v1/quotations/inquire-price"
KEY, OTHER = "KEY1", "KEY2"


@pytest.fixture
def sb() -> Iterator[Sandbox]:
    with Sandbox(websocket=True) as sandbox:
        yield sandbox


def call(sb: Sandbox, key: str = KEY) -> requests.Response:
    """One REST call of ``key`` (its token is not checked before the rate: EGW00121 is a served call)."""
    return requests.get(sb.base_url + QUOTE, headers={"appkey": key}, timeout=TIMEOUT)


def is_egw00201(response: requests.Response) -> bool:
    return response.status_code == 500 and response.json() == EGW00201_BODY


def burst(sb: Sandbox, count: int, key: str = KEY) -> list[requests.Response]:
    """``count`` calls of ``key`` from as many threads, released together."""
    barrier = threading.Barrier(count)
    answers: list[requests.Response] = []
    lock = threading.Lock()

    def one() -> None:
        barrier.wait()
        answer = call(sb, key)
        with lock:
            answers.append(answer)

    threads = [threading.Thread(target=one) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT * 2)
    assert len(answers) == count
    return answers


def approval_key(sb: Sandbox, key: str = KEY) -> str:
    body = {"grant_type": "client_credentials", "appkey": key, "secretkey": "SECRET"}
    answer = requests.post(sb.base_url + "/oauth2/Approval", json=body, timeout=TIMEOUT)
    return answer.json()["approval_key"]


def message(approval: str, tr_key: str = "005930", tr_type: str = "1", tr_id: str = "H0STCNT0") -> str:
    """A subscribe (``tr_type`` 1) or unsubscribe (2) message in the broker's shape."""
    return json.dumps({
        "header": {"approval_key": approval, "custtype": "P", "tr_type": tr_type, "content-type": "utf-8"},
        "body": {"input": {"tr_id": tr_id, "tr_key": tr_key}},
    })


async def ask(connection: ClientConnection, text: str) -> dict[str, Any]:
    await connection.send(text)
    return json.loads(await asyncio.wait_for(connection.recv(), TIMEOUT))


def code(answer: dict[str, Any]) -> str:
    return answer["body"]["msg_cd"]


def wait_until_free(sb: Sandbox, key: str = KEY) -> None:
    """The server notes a close right after the closing handshake: wait (bounded) until it has."""
    deadline = time.monotonic() + TIMEOUT
    while key in sb.counters()["ws_sessions_open"]:
        assert time.monotonic() < deadline, "the closed session still holds the key"
        time.sleep(0.01)


# -- calls per second ----------------------------------------------------------------------------


def test_the_window_admits_the_rate_per_key_and_frees_a_place_a_second_after_each_call() -> None:
    now = [100.0]
    limit = RestRateLimit(rate=3, rates={"PAPER": 1}, clock=lambda: now[0])
    assert [limit.admit(KEY) for _ in range(4)] == [True, True, True, False]
    assert limit.admit(OTHER)  # another key has its own budget
    assert [limit.admit("PAPER"), limit.admit("PAPER")] == [True, False]
    now[0] = 100.999
    assert not limit.admit(KEY)
    now[0] = 101.0  # the first three calls leave the window; the refused ones never took a place
    assert [limit.admit(KEY) for _ in range(4)] == [True, True, True, False]
    assert limit.snapshot() == {
        "rest_calls": {KEY: 6, OTHER: 1, "PAPER": 1},
        "rest_egw00201": {KEY: 3, "PAPER": 1},
        "rest_egw00201_injected": 0,
    }


def test_rate_zero_is_no_limit_and_bad_rates_are_refused() -> None:
    limit = RestRateLimit(rate=0, clock=lambda: 0.0)
    assert all(limit.admit(KEY) for _ in range(1000))
    for bad in (-1, 1.5, float("nan"), True, "18"):
        with pytest.raises(ValueError):
            RestRateLimit(rate=bad)
    with pytest.raises(ValueError):
        RestRateLimit(rates={KEY: -1})


def test_calls_beyond_the_rate_get_egw00201_like_the_broker_and_are_counted_per_key() -> None:
    with Sandbox(rest_rate=5, websocket=False) as sb:
        answers = burst(sb, 40)
        refused = [a for a in answers if is_egw00201(a)]
        served = [a for a in answers if not is_egw00201(a)]
        assert refused and len(served) >= 5
        assert all(a.json()["msg_cd"] == "EGW00121" for a in served)  # served: then the token is checked
        counters = sb.counters()
        assert counters["rest_calls"] == {KEY: len(served)}
        assert counters["rest_egw00201"] == {KEY: len(refused)}
        assert counters["protected_calls"] == 40
        # Another key's budget is its own, whatever the first one spent.
        assert not is_egw00201(call(sb, OTHER))


def test_a_paper_key_gets_its_own_rate_and_the_oauth_paths_are_not_counted(sb: Sandbox) -> None:
    sb.configure_limits(rest_rates={"PAPER": 1})
    answers = [call(sb, "PAPER") for _ in range(3)]
    assert not is_egw00201(answers[0])  # 3 calls of one thread arrive within a second of each other
    assert sb.counters()["rest_egw00201"].get("PAPER", 0) + sb.counters()["rest_calls"]["PAPER"] == 3
    for _ in range(3):
        approval_key(sb, "PAPER")
    assert sum(sb.counters()["rest_calls"].values()) + sum(sb.counters()["rest_egw00201"].values()) == 3


def test_injected_egw00201_answers_the_next_calls_whatever_the_rate(sb: Sandbox) -> None:
    sb.configure_limits(rest_rate=0)
    sb.inject_egw00201(2)
    answers = [call(sb) for _ in range(3)]
    assert [is_egw00201(a) for a in answers] == [True, True, False]
    counters = sb.counters()
    assert counters["rest_egw00201"] == {KEY: 2} and counters["rest_calls"] == {KEY: 1}
    assert counters["rest_egw00201_injected"] == 2


def test_injected_egw00201_over_http_can_aim_at_one_key_and_be_cleared(sb: Sandbox) -> None:
    faults = sb.base_url + "/sandbox/faults"
    assert requests.post(faults, json={"mode": "egw00201", "count": 1, "appkey": OTHER}, timeout=TIMEOUT).ok
    assert not is_egw00201(call(sb, KEY))
    assert is_egw00201(call(sb, OTHER))
    assert not is_egw00201(call(sb, OTHER))
    assert requests.post(faults, json={"mode": "egw00201", "count": 5}, timeout=TIMEOUT).ok
    assert requests.delete(faults, timeout=TIMEOUT).ok
    assert not is_egw00201(call(sb, KEY))
    bad = requests.post(faults, json={"mode": "egw00201", "count": 0}, timeout=TIMEOUT)
    assert bad.status_code == 400


def test_limits_are_read_and_changed_over_http(sb: Sandbox) -> None:
    limits = sb.base_url + "/sandbox/limits"
    assert requests.get(limits, timeout=TIMEOUT).json() == {
        "rest_rate": 18, "rest_rates": {}, "ws_max_registrations": 41,
    }
    changed = requests.post(limits, json={"rest_rate": 1, "rest_rates": {"P": 2}, "ws_max_registrations": 3},
                            timeout=TIMEOUT).json()
    assert changed == {"rest_rate": 1, "rest_rates": {"P": 2}, "ws_max_registrations": 3}
    assert requests.post(limits, json={"rest_rate": -1}, timeout=TIMEOUT).status_code == 400
    assert requests.post(limits, json={"ws_max_registrations": 0}, timeout=TIMEOUT).status_code == 400
    assert sb.limits() == changed
    info = requests.get(sb.base_url + "/sandbox/info", timeout=TIMEOUT).json()
    assert info == {"base_url": sb.base_url, "ws_url": sb.ws_url}


def test_reset_forgets_the_rest_counters_and_the_approval_keys(sb: Sandbox) -> None:
    approval = approval_key(sb)
    call(sb)
    sb.reset()
    assert sb.counters()["rest_calls"] == {}

    async def scenario() -> dict[str, Any]:
        async with connect(sb.ws_url) as ws:
            return await ask(ws, message(approval))

    assert code(asyncio.run(scenario())) == "OPSP0011"


# -- the WebSocket session -----------------------------------------------------------------------


def test_a_subscribe_gets_the_brokers_success_answer_on_any_path(sb: Sandbox) -> None:
    approval = approval_key(sb)

    async def scenario() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        async with connect(sb.ws_url + "/tryitout/H0STCNT0") as ws:
            first = await ask(ws, message(approval))
            again = await ask(ws, message(approval))
            gone = await ask(ws, message(approval, tr_type="2"))
            return first, again, gone

    first, again, gone = asyncio.run(scenario())
    assert first["header"] == {"tr_id": "H0STCNT0", "tr_key": "005930", "encrypt": "N"}
    assert first["body"]["rt_cd"] == "0" and code(first) == "OPSP0000"
    assert first["body"]["msg1"] == "SUBSCRIBE SUCCESS"
    assert set(first["body"]["output"]) == {"iv", "key"}
    assert code(again) == "OPSP0002"
    assert code(gone) == "OPSP0001" and gone["body"]["rt_cd"] == "0"
    counters = sb.counters()
    assert counters["ws_sessions_opened"] == {KEY: 1} and counters["ws_opsp8996"] == {}


def test_a_second_session_of_the_key_gets_opsp8996_and_is_closed(sb: Sandbox) -> None:
    approval, other_approval = approval_key(sb), approval_key(sb, OTHER)
    second_approval = approval_key(sb)  # another approval key of the same app key changes nothing

    async def scenario() -> tuple[dict[str, Any], dict[str, Any], bool, dict[str, Any]]:
        async with connect(sb.ws_url) as holder, connect(sb.ws_url) as second, connect(sb.ws_url) as other:
            await ask(holder, message(approval))
            refused = await ask(second, message(second_approval))
            try:
                await asyncio.wait_for(second.recv(), TIMEOUT)
                closed = False
            except ConnectionClosed:
                closed = True
            still = await ask(holder, message(approval, "000660"))
            assert code(await ask(other, message(other_approval))) == "OPSP0000"
            return refused, still, closed, sb.counters()

    refused, still, closed, counters = asyncio.run(scenario())
    assert refused["body"] == {"rt_cd": "9", "msg_cd": "OPSP8996", "msg1": "ALREADY IN USE appkey"}
    assert closed
    assert code(still) == "OPSP0000"  # the holder keeps its session
    assert counters["ws_sessions_opened"] == {KEY: 1, OTHER: 1}
    assert counters["ws_opsp8996"] == {KEY: 1}
    assert counters["ws_max_concurrent"] == {KEY: 2, OTHER: 1}
    assert counters["ws_sessions_open"] == {KEY: 2, OTHER: 1}


def test_eight_connections_at_once_one_session_and_seven_opsp8996(sb: Sandbox) -> None:
    approval = approval_key(sb)

    async def scenario() -> list[str]:
        connections = [await connect(sb.ws_url) for _ in range(8)]
        try:
            answers = await asyncio.gather(*(ask(ws, message(approval)) for ws in connections))
        finally:
            await asyncio.gather(*(ws.close() for ws in connections))
        return sorted(code(a) for a in answers)

    assert asyncio.run(scenario()) == ["OPSP0000"] + ["OPSP8996"] * 7
    counters = sb.counters()
    assert counters["ws_sessions_opened"] == {KEY: 1} and counters["ws_opsp8996"] == {KEY: 7}
    assert 2 <= counters["ws_max_concurrent"][KEY] <= 8


def test_a_closed_session_frees_the_key(sb: Sandbox) -> None:
    approval = approval_key(sb)

    async def one_session() -> str:
        async with connect(sb.ws_url) as ws:
            return code(await ask(ws, message(approval)))

    assert asyncio.run(one_session()) == "OPSP0000"
    wait_until_free(sb)
    assert asyncio.run(one_session()) == "OPSP0000"
    wait_until_free(sb)
    counters = sb.counters()
    assert counters["ws_sessions_opened"] == {KEY: 2} and counters["ws_opsp8996"] == {}
    assert counters["ws_max_concurrent"] == {KEY: 1}


def test_the_42nd_registration_is_refused_and_a_release_makes_room(sb: Sandbox) -> None:
    approval = approval_key(sb)

    async def scenario() -> tuple[list[str], str, str, str]:
        async with connect(sb.ws_url) as ws:
            accepted = [code(await ask(ws, message(approval, f"{n:06d}"))) for n in range(41)]
            over = code(await ask(ws, message(approval, "999999")))
            other_product = code(await ask(ws, message(approval, "000000", tr_id="H0STASP0")))
            await ask(ws, message(approval, "000001", tr_type="2"))
            room = code(await ask(ws, message(approval, "999999")))
            return accepted, over, other_product, room

    accepted, over, other_product, room = asyncio.run(scenario())
    assert accepted == ["OPSP0000"] * 41
    assert over == "OPSP0008" and other_product == "OPSP0008"  # 41 across all products
    assert room == "OPSP0000"
    assert sb.counters()["ws_registrations_refused"] == {KEY: 2}


def test_malformed_messages_and_unknown_approval_keys_get_the_brokers_codes(sb: Sandbox) -> None:
    approval = approval_key(sb)

    async def scenario() -> list[str]:
        async with connect(sb.ws_url) as ws:
            answers = [
                await ask(ws, "not json"),
                await ask(ws, json.dumps({"body": {}})),
                await ask(ws, message("00000000-0000-0000-0000-000000000000")),
                await ask(ws, message(approval, tr_type="3")),
                await ask(ws, message(approval, tr_key="")),
                await ask(ws, message(approval, tr_type="2")),
            ]
            return [code(a) for a in answers]

    assert asyncio.run(scenario()) == ["OPSP9999", "OPSP9998", "OPSP0011", "OPSP8997", "OPSP8992", "OPSP0003"]


def test_stop_closes_the_sessions_and_the_endpoint() -> None:
    sandbox = Sandbox(websocket=True).start()
    approval = approval_key(sandbox)
    url = sandbox.ws_url

    async def scenario() -> int | None:
        async with connect(url) as ws:
            assert code(await ask(ws, message(approval))) == "OPSP0000"
            await asyncio.get_running_loop().run_in_executor(None, sandbox.stop)
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), TIMEOUT)
            return ws.close_code

    assert asyncio.run(scenario()) == 1001

    async def reconnect() -> None:
        async with connect(url, open_timeout=TIMEOUT):
            pass

    with pytest.raises(OSError):
        asyncio.run(reconnect())


def test_without_the_endpoint_there_is_no_ws_url_and_no_ws_counters() -> None:
    with Sandbox(websocket=False) as sandbox:
        with pytest.raises(RuntimeError, match="no WebSocket endpoint"):
            _ = sandbox.ws_url
        assert not any(name.startswith("ws_") for name in sandbox.counters())
        info = requests.get(sandbox.base_url + "/sandbox/info", timeout=TIMEOUT).json()
        assert info["ws_url"] is None


# -- python -m common.sandbox --------------------------------------------------------------------


def test_the_command_takes_the_knobs_and_prints_the_ws_url_second() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "common.sandbox", "--port", "0", "--rest-rate", "2", "--key-rate", "PAPER:1",
         "--ws-max-registrations", "5"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert process.stdout is not None
        base_url = process.stdout.readline().strip()
        ws_url = process.stdout.readline().strip()
        assert base_url.startswith("http://127.0.0.1:") and ws_url.startswith("ws://127.0.0.1:")
        limits = requests.get(base_url + "/sandbox/limits", timeout=TIMEOUT).json()
        assert limits == {"rest_rate": 2, "rest_rates": {"PAPER": 1}, "ws_max_registrations": 5}
        assert requests.get(base_url + "/sandbox/info", timeout=TIMEOUT).json()["ws_url"] == ws_url
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0
        if process.stdout is not None:
            process.stdout.close()


def test_help_lists_the_limit_knobs() -> None:
    result = subprocess.run([sys.executable, "-m", "common.sandbox", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    text = " ".join(result.stdout.split())
    for knob in ("--rest-rate", "--key-rate", "--ws-port", "--ws-max-registrations", "--no-websocket",
                 "EGW00201", "OPSP8996", "egw00201", "limits"):
        assert knob in text


def test_a_bad_key_rate_is_refused_without_echoing_it() -> None:
    command = [sys.executable, "-m", "common.sandbox", "--port", "0", "--key-rate", "SECRETISH:x"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "--key-rate #1" in result.stderr and "SECRETISH" not in result.stderr


def test_without_the_websockets_library_the_sandbox_serves_http_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "websockets" else find_spec(name, *args))
    with Sandbox() as sandbox:
        assert not sandbox.serves_websocket
        call(sandbox)
        assert sandbox.counters()["rest_calls"] == {KEY: 1}
