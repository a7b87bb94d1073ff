"""Issue 13: a newcomer's first hour and an operator's day, driven through the CLI in subprocesses.

``kis-token`` (run here as ``python -m kis_token.console``, the function the console script calls),
``-q``/``-v`` before or after the command, every configuration mistake answered in one line, a
refused key or secret naming the variable, credentials in code, the README's own commands, and a
plain (not editable) install into a fresh virtual environment. The broker is the sandbox on
127.0.0.1; nothing here touches any other address.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
import responses

from common.credentials.records import TokenRecord, mask_token
from common.sandbox import Sandbox
from common.settings import Settings
from kr.token_manager import KRTokenManager
from tests.conftest import DAY, KR_KEY, KR_SECRET, PAPER_HOST, US_KEY, US_SECRET, fake_token, token_answer
from us.token_manager import USTokenManager

REPO = Path(__file__).resolve().parent.parent
HOUR = 3600.0


def run(*args: str, env: dict[str, str], cwd: Path, module: str = "kis_token.console"):
    """``python -m MODULE ARGS`` with exactly ``env`` (plus PATH and the checkout on PYTHONPATH)."""
    full_env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO), **env}
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, env=full_env, cwd=cwd,
        timeout=60,
    )


def no_secrets(*texts: str, token: str | None = None) -> None:
    for text in texts:
        for secret in (US_KEY, US_SECRET, KR_KEY, KR_SECRET):
            assert secret not in text
        if token is not None:
            assert token not in text
        assert "Traceback" not in text


def seed(cls, environ: dict[str, str], token: str, left: float) -> TokenRecord:
    """Store a record for ``cls``'s market that has ``left`` seconds to live, in real time."""
    manager = cls(Settings(environ, dotenv_path=False), jitter=0.0)
    now = time.time()
    record = TokenRecord(token, "Bearer", now - (DAY - left), now + left, manager.market,
                         manager.environment, manager.key_fingerprint())
    manager.save_token(record)
    return record


@pytest.fixture
def cli_env(env) -> dict[str, str]:
    """Both markets configured, no .env, and a broker URL that nothing listens on."""
    return {**env, "KIS_DOTENV_PATH": os.devnull, "KIS_BASE_URL": "http://127.0.0.1:9"}


@pytest.fixture
def shared_env(cli_env) -> dict[str, str]:
    """One app key for both markets (the usual case)."""
    return {**cli_env, "KIS_KR_APP_KEY": US_KEY, "KIS_KR_APP_SECRET": US_SECRET}


@pytest.fixture
def sandbox():
    with Sandbox(apps={US_KEY: US_SECRET, KR_KEY: KR_SECRET}, rate_limit=0) as server:
        yield server


@pytest.fixture
def broker_env(cli_env, sandbox) -> dict[str, str]:
    return {**cli_env, "KIS_BASE_URL": sandbox.base_url}


# -- kis-token: the market commands, status, version ---------------------------------------------


def test_kis_token_market_commands_are_the_market_modules(cli_env, tmp_path):
    seed(USTokenManager, cli_env, fake_token(1), 20 * HOUR)

    def same(text: str) -> str:  # what may differ between two runs a moment apart: times left
        text = text.replace('"seconds_left": ', "seconds_left ")
        return re.sub(r"(seconds_left\S*) -?[0-9.e+]+", r"\1 N", text)

    for args in (("check",), ("check", "--json"), ("get",), ("metrics",)):
        console = run("us", *args, env=cli_env, cwd=tmp_path)
        module = run(*args, env=cli_env, cwd=tmp_path, module="us.token_manager")
        assert (console.returncode, same(console.stdout)) == (module.returncode, same(module.stdout)), args
        assert console.returncode == 0 and console.stderr == ""
    kr = run("kr", "check", env=cli_env, cwd=tmp_path)
    assert kr.returncode == 2 and kr.stdout.startswith("KR token (real): missing")


def test_kis_token_usage_errors_name_the_program(cli_env, tmp_path):
    result = run("us", env=cli_env, cwd=tmp_path)
    assert result.returncode == 2 and "usage: kis-token us" in result.stderr
    result = run(env=cli_env, cwd=tmp_path)
    assert result.returncode == 2 and "kis-token" in result.stderr
    result = run("eu", "check", env=cli_env, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_kis_token_version_comes_from_the_package_metadata(cli_env, tmp_path):
    result = run("--version", env=cli_env, cwd=tmp_path)
    assert (result.returncode, result.stdout) == (0, f"kis-token {version('kis-token-manager')}\n")


def test_status_shows_both_markets_and_marks_a_shared_token(shared_env, tmp_path):
    record = seed(USTokenManager, shared_env, fake_token(1), 20 * HOUR)
    seed(KRTokenManager, shared_env, fake_token(1), 20 * HOUR)
    result = run("status", env=shared_env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["MARKET", "ENV", "KEY", "STATE", "EXPIRES", "LEFT", "TOKEN"]
    fingerprint = USTokenManager(Settings(shared_env, dotenv_path=False)).key_fingerprint()
    for line, market in zip(lines[1:3], ("us", "kr"), strict=True):
        assert line.split()[:4] == [market, "real", fingerprint, "valid"]
        assert "19h 59m" in line and mask_token(record.access_token) in line and line.endswith("(shared)")
    assert "share one token" in lines[3]
    no_secrets(result.stdout, result.stderr, token=fake_token(1))

    quiet = run("-q", "status", env=shared_env, cwd=tmp_path)
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", "")
    quiet = run("status", "-q", env=shared_env, cwd=tmp_path)
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", "")


def test_status_json_is_one_object_for_both_markets(shared_env, tmp_path):
    seed(USTokenManager, shared_env, fake_token(1), 20 * HOUR)
    seed(KRTokenManager, shared_env, fake_token(1), 20 * HOUR)
    result = run("status", "--json", env=shared_env, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.count("\n") == 1
    report = json.loads(result.stdout)
    assert report["schema"] == 1 and report["exit"] == 0 and report["shared"] is True
    assert set(report["markets"]) == {"us", "kr"}
    us, kr = report["markets"]["us"], report["markets"]["kr"]
    assert us["status"] == kr["status"] == "ok" and us["shared"] is kr["shared"] is True
    assert us["key_fingerprint"] == kr["key_fingerprint"] and us["key_fingerprint"].startswith("sha256:")
    assert us["token"] == kr["token"] == mask_token(fake_token(1))
    no_secrets(result.stdout, result.stderr, token=fake_token(1))


def test_status_with_two_keys_is_not_shared(cli_env, tmp_path):
    seed(USTokenManager, cli_env, fake_token(1), 20 * HOUR)
    seed(KRTokenManager, cli_env, fake_token(2), 20 * HOUR)
    result = run("status", "--json", env=cli_env, cwd=tmp_path)
    report = json.loads(result.stdout)
    assert result.returncode == 0 and report["shared"] is False
    assert "(shared)" not in run("status", env=cli_env, cwd=tmp_path).stdout


@pytest.mark.parametrize(
    ("kr_left", "expected", "state"),
    [(20 * HOUR, 0, "valid"), (30 * 60, 1, "renewal due"), (60, 2, "expired"), (None, 2, "missing")],
)
def test_status_exits_with_the_worse_check_code(cli_env, tmp_path, kr_left, expected, state):
    seed(USTokenManager, cli_env, fake_token(1), 20 * HOUR)
    if kr_left is not None:
        seed(KRTokenManager, cli_env, fake_token(2), kr_left)
    result = run("status", env=cli_env, cwd=tmp_path)
    assert result.returncode == expected
    kr_row = result.stdout.splitlines()[2]
    assert kr_row.startswith("kr ") and f" {state} " in kr_row
    assert json.loads(run("status", "--json", env=cli_env, cwd=tmp_path).stdout)["exit"] == expected


def test_status_with_one_market_unconfigured_is_unknown_and_names_the_variable(cli_env, tmp_path):
    seed(USTokenManager, cli_env, fake_token(1), 20 * HOUR)
    environ = {k: v for k, v in cli_env.items() if k != "KIS_KR_APP_KEY"}
    result = run("status", env=environ, cwd=tmp_path)
    assert result.returncode == 3  # UNKNOWN is the worst
    assert result.stdout.splitlines()[1].split()[3] == "valid"
    assert result.stdout.splitlines()[2].split()[3] == "unknown"
    assert result.stderr.count("\n") == 1 and "KIS_KR_APP_KEY is not set" in result.stderr
    report = json.loads(run("status", "--json", env=environ, cwd=tmp_path).stdout)
    assert report["exit"] == 3 and report["markets"]["us"]["status"] == "ok"
    kr = report["markets"]["kr"]
    assert kr["status"] == "unknown" and "KIS_KR_APP_KEY" in kr["error"]


# -- -q and -v, before or after the command ------------------------------------------------------


def test_quiet_is_silent_on_success_for_every_command(broker_env, tmp_path):
    def quiet(*args: str, module: str = "kis_token.console"):
        result = run(*args, env=broker_env, cwd=tmp_path, module=module)
        assert result.returncode == 0, (args, result.stderr)
        assert result.stderr == "", (args, result.stderr)
        return result.stdout

    assert quiet("us", "-q", "refresh") == ""
    assert quiet("us", "check", "-q") == ""
    assert quiet("us", "warmup", "-q") == ""  # already valid: nothing to do, nothing said
    assert quiet("-q", "warmup", module="kr.token_manager") == ""  # the cron line of the issue
    assert quiet("-q", "status") == ""
    token = quiet("us", "get", "-q").strip()  # get's answer is the token: still printed
    assert token.startswith("sbx-") and "\n" not in token
    assert json.loads(quiet("us", "check", "--json", "-q"))["status"] == "ok"
    assert "kis_token_valid" in quiet("kr", "-q", "metrics")
    assert quiet("us", "revoke", "-q") == ""
    assert quiet("-q", "kr", "delete") == ""
    failed = run("kr", "check", "-q", env=broker_env, cwd=tmp_path)
    assert failed.returncode == 2 and "missing" in failed.stdout  # not a success: it says why


def test_without_quiet_the_commands_report(broker_env, tmp_path):
    refresh = run("us", "refresh", env=broker_env, cwd=tmp_path)
    assert refresh.returncode == 0 and refresh.stdout.startswith("US token renewed: sbx-")
    delete = run("us", "delete", env=broker_env, cwd=tmp_path)
    assert delete.returncode == 0 and delete.stdout.startswith("US token files removed")
    no_secrets(refresh.stdout, refresh.stderr, delete.stdout)


@pytest.mark.parametrize(
    "args",
    [("-v", "refresh"), ("refresh", "-v"), ("-vv", "refresh"), ("refresh", "-vv"), ("refresh", "--verbose")],
)
def test_verbose_goes_before_or_after_the_command(broker_env, tmp_path, args):
    result = run(*args, env=broker_env, cwd=tmp_path, module="us.token_manager")
    assert result.returncode == 0, result.stderr
    assert "INFO obtained a new us token sbx-" in result.stderr
    assert ("DEBUG" in result.stderr) is ("-vv" in args)
    token = USTokenManager(Settings(broker_env, dotenv_path=False)).load_token().access_token
    no_secrets(result.stdout, result.stderr, token=token)


def test_log_level_is_read_from_dotenv_and_the_environment_wins(broker_env, tmp_path):
    environ = {k: v for k, v in broker_env.items() if k != "KIS_DOTENV_PATH"}
    (tmp_path / ".env").write_text("KIS_LOG_LEVEL=info\n")
    result = run("us", "refresh", env=environ, cwd=tmp_path)
    assert result.returncode == 0 and "INFO obtained a new us token" in result.stderr
    result = run("kr", "refresh", env={**environ, "KIS_LOG_LEVEL": "ERROR"}, cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == ""


# -- every configuration mistake: one line naming it, exit 3, never a traceback ------------------


def _mistakes(tmp_path: Path) -> dict[str, tuple[dict[str, str | None], str]]:
    a_file = tmp_path / "not-a-directory"
    a_file.write_text("")
    bad_dotenv = tmp_path / "bad-level.env"
    bad_dotenv.write_text("KIS_LOG_LEVEL=loud\n")
    return {
        "missing key": ({"KIS_US_APP_KEY": None}, "KIS_US_APP_KEY is not set"),
        "missing secret": ({"KIS_US_APP_SECRET": None}, "KIS_US_APP_SECRET is not set"),
        "missing .env": ({"KIS_DOTENV_PATH": str(tmp_path / "gone.env")}, f"{tmp_path / 'gone.env'}"),
        "bad environment": ({"KIS_ENV": "staging"}, "KIS_ENV must be"),
        "URL without scheme": ({"KIS_BASE_URL": "openapi.koreainvestment.com:9443"}, "KIS_BASE_URL must be"),
        "bad market URL": ({"KIS_US_BASE_URL": "http://"}, "KIS_US_BASE_URL must be"),
        "relative token dir": ({"KIS_TOKEN_DIR": "tokens"}, "KIS_TOKEN_DIR must be an absolute path"),
        "token dir is a file": ({"KIS_TOKEN_DIR": str(a_file)}, "KIS_TOKEN_DIR"),
        "token dir under a file": ({"KIS_TOKEN_DIR": str(a_file / "tokens")}, "is not a directory"),
        "bad log level": ({"KIS_LOG_LEVEL": "verbose"}, "KIS_LOG_LEVEL must be one of"),
        "bad log level in .env": ({"KIS_DOTENV_PATH": str(bad_dotenv)}, "KIS_LOG_LEVEL must be one of"),
    }


@pytest.mark.parametrize(
    "mistake",
    ["missing key", "missing secret", "missing .env", "bad environment", "URL without scheme",
     "bad market URL", "relative token dir", "token dir is a file", "token dir under a file",
     "bad log level", "bad log level in .env"],
)
def test_every_configuration_mistake_is_one_line_naming_it(cli_env, tmp_path, mistake):
    change, needle = _mistakes(tmp_path)[mistake]
    environ = {k: v for k, v in {**cli_env, **change}.items() if v is not None}
    for args, module in [(("check",), "us.token_manager"), (("get",), "us.token_manager"),
                         (("us", "-q", "refresh"), "kis_token.console"), (("status",), "kis_token.console")]:
        result = run(*args, env=environ, cwd=tmp_path, module=module)
        assert result.returncode == 3, (args, result.stderr)
        assert result.stderr.count("\n") == 1 and needle in result.stderr, (args, result.stderr)
        assert ": error: " in result.stderr
        no_secrets(result.stdout, result.stderr)
    check = run("check", "--json", env=environ, cwd=tmp_path, module="us.token_manager")
    assert check.returncode == 3 and check.stdout.count("\n") == 1
    info = json.loads(check.stdout)
    assert (info["schema"], info["market"], info["status"], info["valid"]) == (1, "us", "unknown", False)
    assert needle in info["error"]
    assert needle in check.stderr


@pytest.mark.parametrize(("word", "environment"), [("prod", "real"), ("VPS", "paper"), ("mock", "paper"),
                                                   ("Real", "real"), ("paper", "paper")])
def test_kis_env_accepts_the_brokers_words(cli_env, tmp_path, word, environment):
    result = run("check", env={**cli_env, "KIS_ENV": word}, cwd=tmp_path, module="kr.token_manager")
    assert result.returncode == 2 and result.stdout.startswith(f"KR token ({environment}): missing")


# -- broker refusals say what to fix --------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "code", "variable"),
    [({"KIS_US_APP_SECRET": "wrong-" + "s" * 40}, "EGW00105", "fix KIS_US_APP_SECRET"),
     ({"KIS_US_APP_KEY": "PSwrong" + "k" * 29}, "EGW00103", "fix KIS_US_APP_KEY")],
)
@pytest.mark.parametrize("args", [("us", "get"), ("us", "refresh"), ("us", "-q", "warmup")])
def test_refused_credentials_give_the_brokers_code_and_the_variable(broker_env, tmp_path, change, code,
                                                                    variable, args):
    result = run(*args, env={**broker_env, **change}, cwd=tmp_path)
    assert result.returncode == 3  # a configuration error: fix it, do not retry
    assert result.stdout == "" and result.stderr.count("\n") == 1
    assert code in result.stderr and "유효하지 않은 App" in result.stderr  # the broker's own message
    assert variable in result.stderr and "KIS_ENV=real" in result.stderr
    no_secrets(result.stderr, *change.values())


# -- credentials in code --------------------------------------------------------------------------


@pytest.fixture
def bare_environment(tmp_path, monkeypatch):
    """No KIS_* variable at all and no .env in the working directory."""
    for name in list(os.environ):
        if name.startswith("KIS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.chdir(tmp_path)


@responses.activate
def test_credentials_in_code_need_no_environment_variable(bare_environment, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    answer = token_answer(fake_token(5), time.time() + DAY)
    mock = responses.post(PAPER_HOST + "/oauth2/tokenP", json=answer)
    manager = USTokenManager(app_key=US_KEY, app_secret=US_SECRET, environment="vps",
                             token_dir=tmp_path / "tokens", jitter=0.0)
    assert manager.get_valid_token() == fake_token(5)
    body = json.loads(mock.calls[0].request.body)
    assert (body["appkey"], body["appsecret"]) == (US_KEY, US_SECRET)
    record_file = tmp_path / "tokens" / "us_api_token.json"
    assert json.loads(record_file.read_text())["environment"] == "paper"
    for text in [caplog.text, *(p.read_text() for p in (tmp_path / "tokens").iterdir() if p.is_file())]:
        assert US_KEY not in text and US_SECRET not in text


def test_credentials_in_code_win_over_the_environment_and_dotenv(bare_environment, tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("KIS_KR_APP_KEY=from-dotenv\nKIS_KR_APP_SECRET=dotenv-secret\n")
    monkeypatch.setenv("KIS_KR_APP_SECRET", "environment-secret")
    monkeypatch.setenv("KIS_ENV", "paper")
    assert KRTokenManager().get_app_credentials() == ("from-dotenv", "environment-secret")
    manager = KRTokenManager(app_key=KR_KEY, app_secret=KR_SECRET, environment="real",
                             token_dir=str(tmp_path / "t"))
    assert manager.get_app_credentials() == (KR_KEY, KR_SECRET)
    assert manager.environment == "real" and manager.settings.token_dir == tmp_path / "t"
    only_key = KRTokenManager(app_key=KR_KEY)  # the rest still comes from the environment and .env
    assert only_key.get_app_credentials() == (KR_KEY, "environment-secret")
    assert only_key.environment == "paper"


def test_settings_overrides_win_and_none_is_ignored(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("A=dotenv\nB=dotenv\nC=dotenv\n")
    environ = {"A": "environ", "B": "environ"}
    settings = Settings(environ, dotenv_path=dotenv, overrides={"A": "code", "B": None})
    assert [settings.get(n) for n in "ABC"] == ["code", "environ", "dotenv"]
    assert settings.with_overrides({"C": None}) is settings
    assert settings.with_overrides({"C": "code"}).get("C") == "code" and settings.get("C") == "dotenv"


def test_bad_credentials_in_code_are_errors_naming_the_variable(bare_environment, tmp_path):
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match="KIS_US_APP_SECRET is not set"):
        USTokenManager(app_key=US_KEY, token_dir=tmp_path).get_app_credentials()
    with pytest.raises(ConfigError, match="KIS_ENV must be"):
        USTokenManager(app_key=US_KEY, app_secret=US_SECRET, environment="staging").environment  # noqa: B018


# -- what a newcomer pastes: the README, .ci/run, the package list --------------------------------


def test_readme_starts_with_commands_that_make_their_own_virtual_environment():
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"^```(?:sh|bash|shell|console)\s*\n(.*?)^```", text, re.M | re.S)
    run_it, test_it = (block.strip() for block in blocks[:2])
    for command in (run_it, test_it):
        assert command.startswith("python3 -m venv .venv && .venv/bin/pip install")
        assert not re.search(r"(^|&& )(python|pip) ", command)  # no bare python/pip: Debian has neither
    assert run_it.endswith(".venv/bin/python -m kis_token.demo")
    assert test_it.endswith(".venv/bin/python -m pytest") and '".[dev]"' in test_it


def test_readme_configure_section_covers_every_variable():
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Configure\n"):]
    section = section[:section.index("\n## ", 1)]
    example = (REPO / ".env.example").read_text()
    for name in sorted(set(re.findall(r"\bKIS_[A-Z_]+\b", example))):
        assert f"`{name}`" in section, name
    assert "current working directory" in section and "KIS_DOTENV_PATH" in section
    assert "wins" in section


def test_ci_script_uses_a_throwaway_virtual_environment():
    script = (REPO / ".ci" / "run").read_text()
    code = "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("#"))
    assert ".venv" not in code and "mktemp -d" in code and "trap" in code
    assert "ruff check ." in code and "python -m pytest" in code


def test_pyproject_lists_every_package_and_the_console_script():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = set(project["tool"]["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(REPO).parts)
        for top in ("common", "us", "kr", "kis_token")
        for init in (REPO / top).rglob("__init__.py")
    }
    assert found <= packages and {"common", "common.sandbox", "us", "kr"} <= packages
    assert project["project"]["scripts"]["kis-token"] == "kis_token.console:main"


# -- a plain install into a fresh virtual environment ---------------------------------------------


@pytest.mark.slow
@pytest.mark.install
def test_plain_install_into_a_fresh_venv_runs_kis_token_from_anywhere(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in ("pyproject.toml", "README.md", "kis_token_guard.py"):
        shutil.copy2(REPO / name, source / name)
    for package in ("common", "us", "kr", "kis_token", "tools"):
        shutil.copytree(REPO / package, source / package, ignore=ignore)
    venv = tmp_path / "venv"
    pip_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120, env=pip_env)
    installed = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(source)],
        capture_output=True, text=True, timeout=300, env=pip_env, cwd=tmp_path,
    )
    assert installed.returncode == 0, installed.stderr[-2000:]
    left = sorted(path.name for path in source.iterdir()
                  if path.name == "build" or path.name.endswith(".egg-info"))
    assert left == [], f"pip install left {left} in the checkout"
    shutil.rmtree(source)  # the installed copy must not need its source

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    kis_token = str(venv / "bin" / "kis-token")
    with Sandbox(apps={US_KEY: US_SECRET}) as sandbox:  # the broker's one-a-minute limit on
        environ = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": str(tmp_path / "home"),
            "KIS_US_APP_KEY": US_KEY, "KIS_US_APP_SECRET": US_SECRET,
            "KIS_KR_APP_KEY": US_KEY, "KIS_KR_APP_SECRET": US_SECRET,  # one key for both markets
            "KIS_BASE_URL": sandbox.base_url,
        }

        def kis(*args: str):
            return subprocess.run([kis_token, *args], capture_output=True, text=True, env=environ,
                                  cwd=elsewhere, timeout=60)

        where = subprocess.run([str(venv / "bin" / "python"), "-c", "import common; print(common.__file__)"],
                               capture_output=True, text=True, cwd=elsewhere, env=environ, timeout=60)
        assert where.stdout.startswith(str(venv)), where.stdout  # from site-packages, not a checkout

        assert kis("--version").stdout == "kis-token 0.1.0\n"
        before = kis("status")
        assert before.returncode == 2 and " missing " in before.stdout
        us_get, kr_get = kis("us", "get"), kis("kr", "get")
        assert us_get.returncode == kr_get.returncode == 0, us_get.stderr + kr_get.stderr
        token = us_get.stdout.strip()
        assert kr_get.stdout.strip() == token  # one key, one token: KR takes the key's record
        status = kis("status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert status.stdout.count("(shared)") == 2 and mask_token(token) in status.stdout
        report = json.loads(kis("status", "--json").stdout)
        assert report["exit"] == 0 and report["shared"] is True
        assert sandbox.counters()["token_requests"] == {US_KEY: 1}
        for result in (before, status, kr_get):
            no_secrets(result.stderr, token=token)
        no_secrets(before.stdout, status.stdout, token=token)
    default_dir = tmp_path / "home" / ".local" / "state" / "kis-tokens" / "real"
    assert (default_dir / "us_api_token.json").exists() and (default_dir / "kr_api_token.json").exists()


# -- the messages themselves ------------------------------------------------------------------------


def _chained(outer: Exception, inner: Exception) -> Exception:
    try:
        try:
            raise inner
        except Exception as exc:
            raise outer from exc
    except Exception as caught:
        return caught


@pytest.mark.parametrize(
    ("code", "fix"),
    [("EGW00103", "fix KIS_KR_APP_KEY"), ("EGW00102", "fix KIS_KR_APP_KEY"),
     ("EGW00105", "fix KIS_KR_APP_SECRET: it is not the secret of KIS_KR_APP_KEY"),
     ("EGW02004", "check KIS_KR_APP_KEY and KIS_KR_APP_SECRET")],
)
def test_a_credential_refusal_names_the_markets_variables(kr, code, fix):
    from common.cli.market import describe_error
    from common.errors import CredentialsError, TokenUnavailableError

    refusal = CredentialsError(code, "유효하지 않은 AppSecret입니다.", 403)
    wrapped = _chained(TokenUnavailableError(f"no valid kr token: {refusal}"), refusal)
    for exc in (refusal, wrapped):
        message, exit_code = describe_error(exc, kr)
        assert exit_code == 3 and code in message and "유효하지 않은" in message
        assert fix in message and message.endswith("for KIS_ENV=real")


def test_an_unwritable_token_directory_names_the_variable():
    from common.cli.market import describe_error
    from common.store import file_store

    with pytest.raises(Exception) as raised:
        file_store.prepare_directory(Path("/proc/kis"))
    message, exit_code = describe_error(raised.value)
    assert exit_code == 3 and "/proc/kis" in message and "KIS_TOKEN_DIR" in message
