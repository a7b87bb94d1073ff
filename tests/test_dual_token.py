"""AC1 (US/KR separation) and AC5 (one base class, thin market subclasses)."""

from __future__ import annotations

import inspect
import json
import threading

import responses

from common.base_token_manager import BaseTokenManager
from kr import config as kr_config
from kr.token_manager import KRTokenManager
from tests.conftest import DAY, KR_KEY, TOKEN_URL, US_KEY, fake_token, token_answer
from us import config as us_config
from us.token_manager import USTokenManager


def _answer_by_key(clock):
    """A broker that gives each app key its own token."""
    tokens = {US_KEY: fake_token(1), KR_KEY: fake_token(2)}

    def callback(request):
        key = json.loads(request.body)["appkey"]
        return 200, {}, json.dumps(token_answer(tokens[key], clock() + DAY))

    return callback, tokens


# -- AC1 -----------------------------------------------------------------------------------------


def test_us_and_kr_token_file_paths_use_different_prefixes(us, kr):
    us_files, kr_files = us.get_token_info()["files"], kr.get_token_info()["files"]
    assert set(us_files.values()).isdisjoint(kr_files.values())
    assert us_files["record"].endswith("/us_api_token.json")
    assert us_files["issued_at"].endswith("/us_token_issued_at.dat")
    assert kr_files["record"].endswith("/kr_api_token.json")
    assert kr_files["issued_at"].endswith("/kr_token_issued_at.dat")
    assert us_config.TOKEN_FILE_PREFIX == "us_" and kr_config.TOKEN_FILE_PREFIX == "kr_"


@responses.activate
def test_us_token_generation_writes_the_keys_files_and_only_us_story_files(us, clock, tmp_path):
    callback, tokens = _answer_by_key(clock)
    responses.add_callback(responses.POST, TOKEN_URL, callback=callback)
    assert us.get_valid_token() == tokens[US_KEY]
    names = sorted(p.name for p in (tmp_path / "tokens").iterdir())
    key = us.credential.key_id
    assert names == sorted([
        f"key-{key}.json", f"key-{key}.lock", f"key-{key}.state",
        "us_api_token.json", "us_krs_token.dat", "us_token_issued_at.dat",
    ])
    assert US_KEY not in " ".join(names) and US_KEY[4:20] not in " ".join(names)


@responses.activate
def test_kr_token_generation_writes_only_kr_story_files(kr, clock, tmp_path):
    callback, tokens = _answer_by_key(clock)
    responses.add_callback(responses.POST, TOKEN_URL, callback=callback)
    assert kr.get_valid_token() == tokens[KR_KEY]
    key = kr.credential.key_id
    assert all(p.name.startswith(("kr_", f"key-{key}.")) for p in (tmp_path / "tokens").iterdir())
    assert json.loads(responses.calls[0].request.body)["appkey"] == KR_KEY


@responses.activate
def test_tokens_are_independent_renewing_one_market_leaves_the_other(us, kr, clock):
    callback, tokens = _answer_by_key(clock)
    responses.add_callback(responses.POST, TOKEN_URL, callback=callback)
    assert us.get_valid_token() == tokens[US_KEY]
    assert kr.get_valid_token() == tokens[KR_KEY]
    kr_before = kr.store.record.path.read_text()
    clock.advance(120)
    tokens[US_KEY] = fake_token(3)
    us.refresh_token()
    assert us.get_valid_token() == fake_token(3)
    assert kr.store.record.path.read_text() == kr_before
    us.delete_token()
    assert kr.get_valid_token() == tokens[KR_KEY]
    assert not us.store.record.path.exists() and kr.store.record.path.exists()


@responses.activate
def test_managers_operate_simultaneously_from_threads(make_manager, clock):
    callback, tokens = _answer_by_key(clock)
    responses.add_callback(responses.POST, TOKEN_URL, callback=callback)
    us_mgr, kr_mgr = make_manager(USTokenManager), make_manager(KRTokenManager)
    results: list[tuple[str, str]] = []
    lock = threading.Lock()

    def work(manager, market):
        for _ in range(200):
            token = manager.get_valid_token()
            with lock:
                results.append((market, token))

    threads = [threading.Thread(target=work, args=(m, name)) for m, name in
               [(us_mgr, "us"), (kr_mgr, "kr")] * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert len(results) == 1600
    assert {t for m, t in results if m == "us"} == {tokens[US_KEY]}
    assert {t for m, t in results if m == "kr"} == {tokens[KR_KEY]}
    assert len(responses.calls) == 2  # one issuance per market, whatever the thread count


@responses.activate
def test_mojito_token_files_are_separated(us, kr, clock):
    callback, tokens = _answer_by_key(clock)
    responses.add_callback(responses.POST, TOKEN_URL, callback=callback)
    us.get_valid_token()
    kr.get_valid_token()
    us_mojito = json.loads(us.mirror.mojito_path.read_text())
    kr_mojito = json.loads(kr.mirror.mojito_path.read_text())
    assert us.mirror.mojito_path.name == us_config.MOJITO_TOKEN_FILE == "us_krs_token.dat"
    assert kr.mirror.mojito_path.name == kr_config.MOJITO_TOKEN_FILE == "kr_krs_token.dat"
    assert us_mojito["access_token"] == f"Bearer {tokens[US_KEY]}"
    assert kr_mojito["access_token"] == f"Bearer {tokens[KR_KEY]}"
    assert us_mojito["market"] == "us" and kr_mojito["market"] == "kr"


@responses.activate
def test_token_file_contents(us, clock):
    responses.post(TOKEN_URL, json=token_answer(fake_token(), clock() + DAY))
    us.get_valid_token()
    record = json.loads(us.store.record.path.read_text())
    assert record == {
        "version": 1,
        "market": "us",
        "environment": "real",
        "key_fingerprint": us.key_fingerprint(),
        "token_type": "Bearer",
        "access_token": fake_token(),
        "issued_at": record["issued_at"],
        "expires_at": record["expires_at"],
    }
    assert record["issued_at"].endswith("+09:00") and record["expires_at"].endswith("+09:00")
    assert us.mirror.issued_at_path.read_text().strip() == record["issued_at"]
    everything = "".join(p.read_text() for p in us.settings.token_dir.iterdir())
    assert US_KEY not in everything and "secret" not in everything


# -- AC5 -----------------------------------------------------------------------------------------


def test_base_token_manager_implements_core_logic_and_is_abstract():
    assert inspect.isabstract(BaseTokenManager)
    assert BaseTokenManager.__abstractmethods__ == {
        "get_api_url", "get_app_credentials", "get_token_file_prefix"
    }
    for name in ("load_token", "save_token", "delete_token", "get_valid_token",
                 "get_token_info", "is_token_expired"):
        assert name in vars(BaseTokenManager)


def test_market_managers_extend_base_with_only_market_hooks():
    for cls in (USTokenManager, KRTokenManager):
        assert issubclass(cls, BaseTokenManager)
        own = {name for name in vars(cls) if not name.startswith("_")}
        assert own == {"get_api_url", "get_app_credentials", "get_token_file_prefix", "market_config"}
        assert not inspect.isabstract(cls)


def test_market_managers_construct_with_no_arguments(monkeypatch, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    us, kr = USTokenManager(), KRTokenManager()
    assert (us.market, kr.market) == ("us", "kr")
    assert us.get_app_credentials()[0] == US_KEY
    assert kr.get_app_credentials()[0] == KR_KEY
