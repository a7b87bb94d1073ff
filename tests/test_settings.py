"""SPEC §3: configuration from the environment and .env, one-line errors naming the variable."""

from __future__ import annotations

import pytest

from common.errors import ConfigError
from common.settings import HOSTS, Settings
from kr.token_manager import KRTokenManager
from us.token_manager import USTokenManager


def manager(cls=USTokenManager, **environ):
    environ.setdefault("HOME", "/home/trader")
    return cls(Settings(environ, dotenv_path=False))


def test_environment_selects_the_brokers_host():
    assert manager().get_api_url() == HOSTS["real"] == "https://openapi.koreainvestment.com:9443"
    assert manager(KIS_ENV="paper").get_api_url() == "https://openapivts.koreainvestment.com:29443"
    assert manager(KIS_ENV="PAPER").environment == "paper"


def test_base_url_override_and_per_market_override_wins():
    us = manager(KIS_BASE_URL="http://127.0.0.1:8080/", KIS_US_BASE_URL="http://127.0.0.1:9090")
    kr = manager(KRTokenManager, KIS_BASE_URL="http://127.0.0.1:8080/")
    assert us.get_api_url() == "http://127.0.0.1:9090"
    assert kr.get_api_url() == "http://127.0.0.1:8080"


@pytest.mark.parametrize("value", ["openapi.koreainvestment.com", "ftp://x", "http://", "http://a b"])
def test_malformed_base_url_names_the_variable(value):
    with pytest.raises(ConfigError, match="^KIS_BASE_URL must be an http"):
        manager(KIS_BASE_URL=value).get_api_url()


def test_unknown_environment_names_the_variable():
    with pytest.raises(ConfigError, match="^KIS_ENV must be 'real' or 'paper'"):
        manager(KIS_ENV="live").get_api_url()


def test_missing_credentials_name_the_variable():
    with pytest.raises(ConfigError, match="^KIS_US_APP_KEY is not set"):
        manager().get_app_credentials()
    with pytest.raises(ConfigError, match="^KIS_KR_APP_SECRET is not set"):
        manager(KRTokenManager, KIS_KR_APP_KEY="key").get_app_credentials()


def test_blank_values_count_as_missing_and_blanks_inside_are_refused():
    with pytest.raises(ConfigError, match="KIS_US_APP_KEY is not set"):
        manager(KIS_US_APP_KEY="   ", KIS_US_APP_SECRET="s").get_app_credentials()
    with pytest.raises(ConfigError, match="KIS_US_APP_KEY contains blanks"):
        manager(KIS_US_APP_KEY="ab cd", KIS_US_APP_SECRET="s").get_app_credentials()


def test_token_dir_must_be_absolute():
    assert str(manager(KIS_TOKEN_DIR="/var/lib/kis").settings.token_dir) == "/var/lib/kis"
    with pytest.raises(ConfigError, match="^KIS_TOKEN_DIR must be an absolute path"):
        manager(KIS_TOKEN_DIR="tokens").settings.token_dir  # noqa: B018


def test_default_token_dir_follows_xdg_state_home():
    assert str(manager(XDG_STATE_HOME="/state").settings.token_dir) == "/state/kis-tokens/real"
    assert str(manager().settings.token_dir) == "/home/trader/.local/state/kis-tokens/real"
    assert str(manager(KIS_ENV="paper").settings.token_dir) == "/home/trader/.local/state/kis-tokens/paper"


def test_dotenv_is_read_and_the_environment_wins(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("KIS_US_APP_KEY=from-dotenv\nKIS_US_APP_SECRET=secret-from-dotenv\nKIS_ENV=paper\n")
    settings = Settings({"KIS_US_APP_KEY": "from-environment"}, dotenv_path=dotenv)
    us = USTokenManager(settings)
    assert us.get_app_credentials() == ("from-environment", "secret-from-dotenv")
    assert us.environment == "paper"


def test_dotenv_defaults_to_the_working_directory_and_can_be_pointed_elsewhere(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("KIS_KR_APP_KEY=cwd-key\n")
    other = tmp_path / "other.env"
    other.write_text("KIS_KR_APP_KEY=other-key\n")
    monkeypatch.chdir(tmp_path)
    assert Settings({}).get("KIS_KR_APP_KEY") == "cwd-key"
    assert Settings({"KIS_DOTENV_PATH": str(other)}).get("KIS_KR_APP_KEY") == "other-key"
    assert Settings({}, dotenv_path=False).get("KIS_KR_APP_KEY") is None
