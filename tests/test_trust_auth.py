"""What trading code may trust of ``common.auth`` (SPEC §8, §11, §12).

* The KIS headers (``authorization``, ``appkey``, ``appsecret``) never follow a redirect to another
  origin: real HTTP servers on 127.0.0.1 and 127.0.0.2 (Linux routes all of 127/8 to loopback),
  for ``requests``, ``httpx.Client`` and ``httpx.AsyncClient``.
* No answer body, however odd, makes the rejected-token check raise, in ``rejected_token_code``,
  ``KISAuth``, ``KISHttpxAuth`` or the mojito broker; the answer comes back unchanged.
* ``mask_url`` hides every password, whatever the URL looks like, and never raises.

No test here reaches an address outside 127.0.0.0/8.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import requests
import responses

from common.auth import KISAuth, rejected_token_code
from common.auth.httpx_auth import KISHttpxAuth
from common.credentials.records import TokenRecord
from common.renewal.alerts import redacted_url
from common.settings import mask_url
from tests.conftest import DAY, REAL_HOST, US_KEY, US_SECRET, fake_token
from us.token_manager import USTokenManager

KIS_HEADERS = ("authorization", "appkey", "appsecret")
QUOTE = "/uapi/overseas-price/v1/quotations/price"
REJECTION = {"rt_cd": "1", "msg_cd": "EGW00123", "msg1": "기간이 만료된 token 입니다."}


def seed(manager: USTokenManager, n: int = 1) -> str:
    """Store a valid token for ``manager`` without any request; return it."""
    now = manager.now()
    token = fake_token(n)
    manager.save_token(TokenRecord(
        access_token=token, token_type="Bearer", issued_at=now, expires_at=now + DAY,
        market=manager.market, environment=manager.environment, key_fingerprint=manager.key_fingerprint(),
    ))
    return token


@pytest.fixture
def manager(make_manager, env) -> USTokenManager:
    """A US manager holding a valid token; a renewal would go to a closed port on 127.0.0.1."""
    built = make_manager(USTokenManager, {**env, "KIS_BASE_URL": "http://127.0.0.1:9"})
    seed(built)
    return built


# -- redirects: real servers on two loopback addresses ----------------------------------------------


@dataclass
class Server:
    """A small HTTP server that records every request's headers and answers by path.

    ``/to?url=<Location>`` answers 302 to that Location; ``/rejected`` answers the broker's
    rejected-token body; any other path answers 200 ``{"rt_cd": "0"}``.
    """

    host: str
    seen: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        seen = self.seen

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
                path, _, location = self.path.partition("?url=")
                if path == "/to":
                    self.answer(302, b"", location)
                elif path == "/rejected":
                    self.answer(500, json.dumps(REJECTION).encode())
                else:
                    self.answer(200, b'{"rt_cd": "0"}')

            def answer(self, status: int, body: bytes, location: str | None = None) -> None:
                self.send_response(status)
                if location is not None:
                    self.send_header("Location", location)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                """Quiet."""

        self.httpd = ThreadingHTTPServer((self.host, 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.start()

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def servers() -> Iterator[dict[str, Server]]:
    """``home`` on 127.0.0.1, ``host`` on 127.0.0.2, ``port`` on 127.0.0.1 at another port."""
    started = {"home": Server("127.0.0.1"), "host": Server("127.0.0.2"), "port": Server("127.0.0.1")}
    yield started
    for server in started.values():
        server.close()


def kis_headers_seen(server: Server) -> list[set[str]]:
    """For each request the server got, which of the KIS headers it carried."""
    return [{name for name in KIS_HEADERS if name in headers} for _, headers in server.seen]


def send_with_requests(manager: USTokenManager, url: str) -> tuple[int, bytes]:
    session = requests.Session()
    session.trust_env = False
    session.auth = KISAuth(manager)
    with session:
        answer = session.get(url, timeout=10)
        return answer.status_code, answer.content


def send_with_httpx(manager: USTokenManager, url: str, **extensions: object) -> tuple[int, bytes]:
    auth = KISHttpxAuth(manager)
    with httpx.Client(auth=auth, follow_redirects=True, trust_env=False, timeout=10) as client:
        answer = client.get(url, extensions=extensions)
        return answer.status_code, answer.content


def send_with_httpx_async(manager: USTokenManager, url: str, **extensions: object) -> tuple[int, bytes]:
    async def send() -> tuple[int, bytes]:
        auth = KISHttpxAuth(manager)
        async with httpx.AsyncClient(auth=auth, follow_redirects=True, trust_env=False, timeout=10) as client:
            answer = await client.get(url, extensions=extensions)
            return answer.status_code, answer.content

    return asyncio.run(send())


CLIENTS: dict[str, Callable[..., tuple[int, bytes]]] = {
    "requests": send_with_requests, "httpx": send_with_httpx, "httpx-async": send_with_httpx_async,
}
#: How the first server names a landing page on another origin.
ELSEWHERE = {
    "other host": lambda s: s["host"].base + "/landing",
    "other host, scheme-relative": lambda s: f"//127.0.0.2:{s['host'].port}/landing",
    "other port": lambda s: s["port"].base + "/landing",
}


@pytest.mark.parametrize("where", ELSEWHERE)
@pytest.mark.parametrize("client", CLIENTS)
def test_kis_headers_never_follow_a_redirect_to_another_origin(manager, servers, client, where):
    target = ELSEWHERE[where](servers)
    other = servers["port"] if where == "other port" else servers["host"]
    status, _ = CLIENTS[client](manager, servers["home"].base + "/to?url=" + target)
    assert status == 200
    assert kis_headers_seen(servers["home"]) == [set(KIS_HEADERS)]  # the first host got them all
    assert kis_headers_seen(other) == [set()]  # the second got none of them
    assert [path for path, _ in other.seen] == ["/landing"]


@pytest.mark.parametrize("relative", [True, False])
@pytest.mark.parametrize("client", CLIENTS)
def test_a_redirect_on_the_same_origin_keeps_the_kis_headers(manager, servers, client, relative):
    home = servers["home"]
    target = "/landing" if relative else home.base + "/landing"
    status, _ = CLIENTS[client](manager, home.base + "/to?url=" + target)
    assert status == 200
    assert [path for path, _ in home.seen] == [f"/to?url={target}", "/landing"]
    assert kis_headers_seen(home) == [set(KIS_HEADERS)] * 2
    landing = home.seen[1][1]
    assert landing["authorization"] == f"Bearer {fake_token(1)}"
    assert (landing["appkey"], landing["appsecret"]) == (US_KEY, US_SECRET)


@pytest.mark.parametrize("client", CLIENTS)
def test_every_hop_of_a_chain_is_checked(manager, servers, client):
    """home -> home -> other host -> other port: the headers stop at the first hop that leaves."""
    home, host, port = servers["home"], servers["host"], servers["port"]
    last = host.base + "/to?url=" + port.base + "/landing"
    status, _ = CLIENTS[client](manager, home.base + "/to?url=/to?url=" + last)
    assert status == 200
    assert kis_headers_seen(home) == [set(KIS_HEADERS)] * 2
    assert kis_headers_seen(host) == [set()]
    assert kis_headers_seen(port) == [set()]


def test_a_redirect_followed_by_hand_goes_without_the_kis_headers(manager, servers):
    """``allow_redirects=False`` / ``follow_redirects=False``, then the redirect sent by the caller."""
    away = servers["home"].base + "/to?url=" + servers["host"].base + "/landing"
    session = requests.Session()
    session.trust_env = False
    session.auth = KISAuth(manager)
    with session:
        first = session.get(away, allow_redirects=False, timeout=10)
        assert first.status_code == 302 and session.send(first.next, timeout=10).status_code == 200
    with httpx.Client(auth=KISHttpxAuth(manager), trust_env=False, timeout=10) as client:
        first = client.get(away)
        assert first.status_code == 302 and client.send(first.next_request).status_code == 200
    assert kis_headers_seen(servers["home"]) == [set(KIS_HEADERS)] * 2
    assert kis_headers_seen(servers["host"]) == [set(), set()]


@pytest.mark.parametrize("client", CLIENTS)
def test_a_rejection_from_another_origin_is_not_acted_on(manager, servers, client, monkeypatch):
    """That host never saw the token: its "EGW00123" renews nothing and resends nothing."""
    asked: list[str] = []
    monkeypatch.setattr(manager, "replace_rejected_token", asked.append)
    monkeypatch.setattr(manager, "replace_rejected_token_async", asked.append)
    away = servers["home"].base + "/to?url=" + servers["host"].base + "/rejected"
    status, body = CLIENTS[client](manager, away)
    assert status == 500 and json.loads(body) == REJECTION
    assert asked == []
    assert len(servers["home"].seen) == 1 and len(servers["host"].seen) == 1
    assert kis_headers_seen(servers["host"]) == [set()]


def test_httpx_keeps_the_callers_trace(manager, servers):
    events: list[str] = []

    def trace(name: str, info: dict) -> None:
        events.append(name)

    async def async_trace(name: str, info: dict) -> None:
        events.append(name)

    target = servers["host"].base + "/landing"
    send_with_httpx(manager, servers["home"].base + "/to?url=" + target, trace=trace)
    sync_events = len(events)
    send_with_httpx_async(manager, servers["home"].base + "/to?url=" + target, trace=async_trace)
    assert events.count("http11.send_request_headers.started") == 4  # two hops, twice
    assert 0 < sync_events < len(events)
    assert kis_headers_seen(servers["host"]) == [set(), set()]


@pytest.mark.parametrize(("url", "expected"), [
    ((b"http", b"127.0.0.1", 8080, b"/x?y=1"), ("http", "127.0.0.1", 8080)),
    ((b"https", b"Api.Example", None, b"/x"), ("https", "api.example", 443)),
    # through a forward proxy the origin is in the absolute-form target
    ((b"http", b"proxy", 3128, b"http://127.0.0.1:8080/x?y=1"), ("http", "127.0.0.1", 8080)),
    ((b"http", b"proxy", 3128, b"http://127.0.0.2/x"), ("http", "127.0.0.2", 80)),
    ((b"http", b"proxy", 3128, b"http://::1:8080/x"), ("http", "::1", 8080)),
    # a CONNECT to the proxy is for the proxy (it carries none of the KIS headers anyway)
    ((b"http", b"proxy", 3128, b"127.0.0.2:443"), ("http", "proxy", 3128)),
])
def test_httpx_hop_origin(url, expected):
    import httpcore

    from common.auth.httpx_auth import hop_origin

    scheme, host, port, target = url
    assert hop_origin(httpcore.URL(scheme=scheme, host=host, port=port, target=target)) == expected


# -- odd answers: never an exception, the answer unchanged -------------------------------------------

DEEP = 200_000
ODD_BODIES: dict[str, bytes] = {
    "empty": b"",
    "not JSON": b"EGW00123",
    "HTML": b"<html><body><h1>500</h1>EGW00123</body></html>",
    "truncated JSON": b'{"msg_cd": "EGW00123"',
    "code in a list": b'{"msg_cd": ["EGW00123"]}',
    "code as a key": b'{"msg_cd": {"EGW00123": 1}, "error_code": {"EGW00121": 2}}',
    "code as a number": b'{"msg_cd": 12300123, "msg1": "EGW00123"}',
    "null code, list error code": b'{"msg_cd": null, "error_code": ["EGW00121"]}',
    "code elsewhere": b'{"rt_cd": "1", "msg1": "EGW00123", "output": {"msg_cd": "EGW00123"}}',
    "top-level list": b'[{"msg_cd": "EGW00123"}]',
    "top-level string": b'"EGW00123"',
    "top-level number": b"12300123 ",
    "NaN": b'{"msg_cd": NaN, "x": "EGW00123"}',
    "huge integer": b'{"n": 1' + b"0" * 5000 + b', "msg1": "EGW00123"}',
    "deep list": b"[" * DEEP + b'"EGW00123"' + b"]" * DEEP,
    "deep object": b'{"a":' * DEEP + b'"EGW00123"' + b"}" * DEEP,
    "unclosed depth": b"[" * DEEP + b"EGW00123",
    "bad UTF-8": b'{"msg_cd": "EGW00123\xff\xfe", "x": "\xc3\x28"}',
    "UTF-16 marker": b'\xff\xfe{"msg_cd": "EGW00123"}',
    "NUL bytes": b'\x00{"msg_cd": "EGW00123"}\x00',
    "2 MB of JSON": b'{"msg1": "EGW00123", "pad": "' + b"x" * (2 << 20) + b'"}',
    "2 MB of binary": b"EGW00123" + bytes(range(256)) * (2 << 12),
}


@pytest.mark.parametrize("body", ODD_BODIES.values(), ids=ODD_BODIES)
def test_rejected_token_code_has_no_code_in_an_odd_body(body):
    assert rejected_token_code(body) is None
    assert rejected_token_code(bytearray(body)) is None
    assert rejected_token_code(body.decode("latin-1")) is None


OTHER_ANSWERS: dict[str, object] = {
    "None": None, "int": 12300123, "float": 1.5, "list": ["EGW00123"],
    "code in a list": {"msg_cd": ["EGW00123"]}, "code in a set": {"msg_cd": {"EGW00123"}},
    "tuple key": {("EGW00123",): "EGW00123"}, "memoryview": memoryview(b'{"msg_cd": "EGW00123"}'),
    "object": object(), "lone surrogate": "\ud800EGW00123", "deep str": "[" * DEEP + "EGW00123",
}


@pytest.mark.parametrize("answer", OTHER_ANSWERS.values(), ids=OTHER_ANSWERS)
def test_rejected_token_code_has_no_code_in_any_other_value(answer):
    assert rejected_token_code(answer) is None


@pytest.mark.parametrize("answer", [
    b'{"rt_cd": "1", "msg_cd": "EGW00123", "msg1": "x"}', bytearray(b'{"error_code": "EGW00121"}'),
    '{"msg_cd": "EGW00121"}', {"msg_cd": "EGW00123"}, {"msg_cd": "", "error_code": "EGW00121"},
], ids=["bytes", "bytearray", "str", "decoded", "empty msg_cd"])
def test_rejected_token_code_reads_bodies_and_decoded_answers(answer):
    assert rejected_token_code(answer) in {"EGW00123", "EGW00121"}


@pytest.mark.parametrize("body", ODD_BODIES.values(), ids=ODD_BODIES)
def test_requests_auth_returns_an_odd_answer_unchanged(us, body):
    seed(us)
    with responses.RequestsMock() as mock:  # only this URL answers; a token request would fail
        mock.get(REAL_HOST + QUOTE, status=500, body=body)
        session = requests.Session()
        session.auth = KISAuth(us)
        answer = session.get(REAL_HOST + QUOTE, timeout=5)
        assert answer.status_code == 500 and answer.content == body
        assert len(mock.calls) == 1


@pytest.mark.parametrize("body", ODD_BODIES.values(), ids=ODD_BODIES)
def test_httpx_auth_returns_an_odd_answer_unchanged(us, body):
    seed(us)
    calls: list[httpx.Request] = []

    def broker(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(500, content=body)

    auth = KISHttpxAuth(us)
    with httpx.Client(transport=httpx.MockTransport(broker), auth=auth) as client:
        answer = client.get(REAL_HOST + QUOTE)
    assert answer.status_code == 500 and answer.content == body

    async def send_async() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.MockTransport(broker), auth=auth) as client:
            return await client.get(REAL_HOST + QUOTE)

    answer = asyncio.run(send_async())
    assert answer.status_code == 500 and answer.content == body
    assert len(calls) == 2  # one each: no resend


# -- the mojito broker reads rejections with the same function ---------------------------------------


@pytest.fixture
def broker_env(env) -> dict[str, str]:
    return {**env, "KIS_US_ACCOUNT": "12345678-01"}


@pytest.mark.parametrize("odd", [
    {"rt_cd": "1", "msg_cd": ["EGW00123"], "msg1": "x"}, {"msg_cd": {"EGW00121": 1}}, ["EGW00123"],
])
def test_the_broker_returns_an_odd_answer_unchanged(make_manager, broker_env, tmp_path, monkeypatch, odd):
    monkeypatch.chdir(tmp_path)
    manager = make_manager(USTokenManager, broker_env)
    seed(manager)
    with responses.RequestsMock() as mock:
        mock.get(REAL_HOST + QUOTE, json=odd, status=500)
        assert manager.create_broker().fetch_price("AAPL") == odd
        assert len(mock.calls) == 1


def test_the_broker_also_reads_error_code(make_manager, broker_env, tmp_path, monkeypatch, clock):
    """The one function reads ``error_code`` too: such an answer renews once and retries once."""
    from tests.conftest import TOKEN_URL, token_answer

    monkeypatch.chdir(tmp_path)
    manager = make_manager(USTokenManager, broker_env)
    seed(manager)
    clock.advance(120)
    ok = {"rt_cd": "0", "msg_cd": "MCA00000", "output": {"last": "1"}}
    with responses.RequestsMock() as mock:
        mock.get(REAL_HOST + QUOTE, json={"error_code": "EGW00121", "error_description": "x"}, status=500)
        mock.get(REAL_HOST + QUOTE, json=ok)
        mock.post(TOKEN_URL, json=token_answer(fake_token(2), clock() + DAY))
        assert manager.create_broker().fetch_price("AAPL") == ok
    assert manager.get_valid_token() == fake_token(2)


# -- mask_url: every password hidden, never an exception ---------------------------------------------

PASSWORD = "Zq7-s3cr3t"


@pytest.mark.parametrize(("url", "masked"), [
    ("redis://127.0.0.1:26391/0?password=abc@defsecret", "redis://127.0.0.1:26391/0?password=***"),
    ("unix:///tmp/x.sock?password=hunter@2secret", "unix:///tmp/x.sock?password=***"),
    (f"redis://h/0?PassWord={PASSWORD}&db=1&Token={PASSWORD}", "redis://h/0?PassWord=***&db=1&Token=***"),
    (f"redis://h/0?passwd={PASSWORD}&pass={PASSWORD}&secret={PASSWORD}",
     "redis://h/0?passwd=***&pass=***&secret=***"),
    (f"redis://h/0?pass%77ord={PASSWORD}", "redis://h/0?pass%77ord=***"),
    (f"redis://:{PASSWORD}@h:6379/0?password={PASSWORD}@x", "redis://:***@h:6379/0?password=***"),
    (f"redis://kis:pa/ss{PASSWORD}@127.0.0.1:bad/0", "redis://kis:***@127.0.0.1:bad/0"),
    (f"redis://kis:pa?ss{PASSWORD}@h/0", "redis://***"),
    (f"redis://kis:pa#ss{PASSWORD}@h/0", "redis://***"),
    (f"redis://kis:123?{PASSWORD}@h/0", "redis://***"),
    (f"redis://:{PASSWORD}@h/0?db=1&client_name=a@b", "redis://***"),
    (f"kis:{PASSWORD}@h", "kis:***@h"),
    ("https://openapi.koreainvestment.com:9443/uapi/x?EXCD=NAS&SYMB=AAPL",
     "https://openapi.koreainvestment.com:9443/uapi/x?EXCD=NAS&SYMB=AAPL"),
    ("redis://[::1]:6379/0", "redis://[::1]:6379/0"),
    ("file", "file"),
    ("", ""),
])
def test_mask_url_hides_every_password(url, masked):
    assert mask_url(url) == masked


def random_urls(count: int, seed: int = 20261201) -> Iterator[tuple[str, str]]:
    """``(url, password)`` pairs; passwords use letters found nowhere else in the URL, and hold
    the characters a URL splits on."""
    rng = random.Random(seed)
    letters, specials = "QJXZ", "/?#@:&=%+;[] "
    for _ in range(count):
        password = "".join(rng.choice(letters + specials) for _ in range(rng.randint(0, 10)))
        password = rng.choice(letters) + password
        scheme = rng.choice(["redis", "rediss", "unix", "http"])
        host = rng.choice(["127.0.0.1", "cache.internal:6380", "[::1]:6379", "", "h:bad"])
        path = rng.choice(["", "/0", "/run/r.sock", "/a@b"])
        query = rng.choice(["", "?db=1", "?db=1&socket_timeout=2", "?x=a@b", "#f"])
        if rng.random() < 0.5:
            user = rng.choice(["", "alice", "alice:", ":"])
            if not user.endswith(":"):  # a lone user part: up to a ':' it would be a user name
                password = password.replace(":", "")
            yield f"{scheme}://{user}{password}@{host}{path}{query}", password
        else:
            name = rng.choice(["password", "PASSWORD", "pass", "passwd", "secret", "token", "Password"])
            value = password.replace("&", "").replace("#", "")  # a raw & or # ends the value
            sep = "&" if "?" in query else "?"
            yield f"{scheme}://{host}{path}{query}{sep}{name}={value}", value


def test_mask_url_never_shows_a_password_and_never_raises():
    for url, password in random_urls(5000):
        masked = mask_url(url)
        assert not set("QJXZ") & set(masked), (url, password, masked)


def test_alerts_show_only_the_webhooks_origin():
    assert redacted_url("https://hooks.slack.com/services/T0/B0/secret") == "https://hooks.slack.com"
    assert redacted_url("http://127.0.0.1:8123/hook/secret?x=1") == "http://127.0.0.1:8123"
    assert redacted_url("http://[::1]:80/x") == "http://[::1]:80"
    assert redacted_url("not a url") == "an invalid URL"
    assert redacted_url("http://h:port/secret") == "an invalid URL"
