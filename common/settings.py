"""Configuration: values passed in code first, then the process environment, then a ``.env`` file.

Variables shared by both markets are read here; each market's own variable names live in its
``config.py``. A missing or malformed value raises :class:`ConfigError` naming the variable and
saying what to do.
"""

from __future__ import annotations

import copy
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import unquote_plus, urlsplit

from common.errors import ConfigError

HOSTS = {
    "real": "https://openapi.koreainvestment.com:9443",
    "paper": "https://openapivts.koreainvestment.com:29443",
}
DEFAULT_ENVIRONMENT = "real"
#: The broker's own words for the environments (its samples say ``prod`` and ``vps``).
ENVIRONMENT_ALIASES = {"real": "real", "prod": "real", "paper": "paper", "vps": "paper", "mock": "paper"}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DEFAULT_LOG_LEVEL = "WARNING"

ENV_VAR = "KIS_ENV"
BASE_URL_VAR = "KIS_BASE_URL"
TOKEN_DIR_VAR = "KIS_TOKEN_DIR"
DOTENV_PATH_VAR = "KIS_DOTENV_PATH"
LOG_LEVEL_VAR = "KIS_LOG_LEVEL"
DAILY_LIMIT_VAR = "KIS_TOKEN_DAILY_LIMIT"
#: Issuances per app key in 24 h: a day needs one or two, so ten bounds any runaway (10 texts).
DEFAULT_DAILY_LIMIT = 10
RATE_LIMIT_VAR = "KIS_RATE_LIMIT"
#: REST calls a second per app key, by environment (the broker's limits notice of 2026-04-20).
DEFAULT_RATE_LIMITS = {"real": 18.0, "paper": 1.0}


def default_token_dir(environ: Mapping[str, str], environment: str) -> Path:
    """``$XDG_STATE_HOME/kis-tokens/<environment>``, else ``~/.local/state/kis-tokens/<environment>``.

    Absolute and independent of the working directory; one per environment, so real and paper
    processes on one host never overwrite each other's tokens.
    """
    state_home = environ.get("XDG_STATE_HOME", "")
    base = Path(state_home) if state_home and os.path.isabs(state_home) else None
    if base is None:
        base = Path(environ.get("HOME") or Path.home()) / ".local" / "state"
    return base / "kis-tokens" / environment


class Settings:
    """Reads configuration variables: ``overrides`` win over the environment, which wins over ``.env``.

    The ``.env`` file is ``$KIS_DOTENV_PATH`` if set (it must exist), else ``.env`` in the current
    directory (if there is one); it is read (and python-dotenv imported) only when a variable is
    neither overridden nor in the environment.

    Args:
        environ: the variables to use instead of ``os.environ`` (tests pass a dict).
        dotenv_path: the ``.env`` file to fall back on; ``None`` picks the default described above,
            ``False`` turns the fallback off.
        overrides: values given in code (``USTokenManager(app_key=...)``), by variable name; a
            ``None`` value is ignored.

    Raises:
        ConfigError: ``KIS_DOTENV_PATH`` names a file that does not exist.
    """

    def __init__(
        self,
        environ: Mapping[str, str] | None = None,
        dotenv_path: str | os.PathLike[str] | bool | None = None,
        overrides: Mapping[str, object] | None = None,
    ) -> None:
        self._environ = os.environ if environ is None else environ
        self._overrides = {k: str(v) for k, v in (overrides or {}).items() if v is not None}
        if dotenv_path is None:
            named = self._environ.get(DOTENV_PATH_VAR, "").strip()
            if named and not os.path.exists(named):
                raise ConfigError(
                    f"{DOTENV_PATH_VAR} names {named}, which does not exist "
                    f"(create that file, or unset {DOTENV_PATH_VAR} to read ./.env)"
                )
            dotenv_path = named or ".env"
        self._dotenv_path = None if dotenv_path is False else Path(dotenv_path)
        self._dotenv: Mapping[str, str | None] | None = None

    def with_overrides(self, overrides: Mapping[str, object]) -> Settings:
        """These settings with ``overrides`` on top (``None`` values ignored); ``self`` if there are none."""
        values = {k: v for k, v in overrides.items() if v is not None}
        if not values:
            return self
        layered = copy.copy(self)
        layered._overrides = {**self._overrides, **{k: str(v) for k, v in values.items()}}
        return layered

    def get(self, name: str) -> str | None:
        """The variable's value with surrounding blanks removed, or None if unset or empty."""
        value = self._overrides.get(name)
        if value is None:
            value = self._environ.get(name)
        if value is None:
            value = self._dotenv_values().get(name)
        if value is None:
            return None
        return value.strip() or None

    def require(self, name: str) -> str:
        """Like :meth:`get` but raise :class:`ConfigError` when the variable is unset."""
        value = self.get(name)
        if value is None:
            where = ".env" if self._dotenv_path in (None, Path(".env")) else str(self._dotenv_path)
            raise ConfigError(f"{name} is not set (put it in the environment or in {where})")
        if any(ch.isspace() or not ch.isprintable() for ch in value):
            raise ConfigError(f"{name} contains blanks or control characters")
        return value

    @property
    def environment(self) -> str:
        """``real`` or ``paper`` (``KIS_ENV``, any case; ``prod`` = real, ``vps`` and ``mock`` = paper)."""
        value = self.get(ENV_VAR) or DEFAULT_ENVIRONMENT
        environment = ENVIRONMENT_ALIASES.get(value.lower())
        if environment is None:
            raise ConfigError(
                f"{ENV_VAR} must be 'real' or 'paper' (the broker's 'prod', 'vps' and 'mock' also "
                f"work), not {value!r}"
            )
        return environment

    @property
    def log_level(self) -> str:
        """The CLI's log level name (``KIS_LOG_LEVEL``, any case; default ``WARNING``)."""
        value = self.get(LOG_LEVEL_VAR) or DEFAULT_LOG_LEVEL
        level = "WARNING" if value.upper() == "WARN" else value.upper()
        if level not in LOG_LEVELS:
            raise ConfigError(f"{LOG_LEVEL_VAR} must be one of {', '.join(LOG_LEVELS)}, not {value!r}")
        return level

    @property
    def daily_limit(self) -> int:
        """At most this many token issuances per app key in 24 h (``KIS_TOKEN_DAILY_LIMIT``; 0: none)."""
        value = self.get(DAILY_LIMIT_VAR)
        if value is None:
            return DEFAULT_DAILY_LIMIT
        if not value.isdigit() or int(value) > 10000:
            raise ConfigError(
                f"{DAILY_LIMIT_VAR} must be a whole number of issuances per app key a day (0 for no "
                f"limit; default {DEFAULT_DAILY_LIMIT}), not {value!r}"
            )
        return int(value)

    @property
    def rate_limit(self) -> float:
        """The key's REST calls a second (``KIS_RATE_LIMIT``, a number above 0; default by
        environment: real 18, paper 1).

        Raises:
            ConfigError: the value is not a finite number above 0 (the message names the variable).
        """
        value = self.get(RATE_LIMIT_VAR)
        if value is None:
            return DEFAULT_RATE_LIMITS[self.environment]
        try:
            rate = float(value)
        except ValueError:
            rate = float("nan")
        if not 0 < rate < float("inf"):
            raise ConfigError(
                f"{RATE_LIMIT_VAR} must be a number of calls a second above 0 (default: real "
                f"{DEFAULT_RATE_LIMITS['real']:g}, paper {DEFAULT_RATE_LIMITS['paper']:g}), not {value!r}"
            )
        return rate

    def base_url(self, market_var: str) -> str:
        """The broker's base URL: ``market_var``, else ``KIS_BASE_URL``, else the host of ``KIS_ENV``."""
        for name in (market_var, BASE_URL_VAR):
            value = self.get(name)
            if value is not None:
                return _check_url(name, value)
        return HOSTS[self.environment]

    @property
    def token_dir(self) -> Path:
        """Where token files live (``KIS_TOKEN_DIR``, default :func:`default_token_dir`).

        Raises:
            ConfigError: the path is relative, is not a directory, or this user cannot use it.
        """
        value = self.get(TOKEN_DIR_VAR)
        if value is None:
            return _check_token_dir(default_token_dir(self._environ, self.environment), "the default")
        path = Path(value).expanduser()
        if not path.is_absolute():
            raise ConfigError(f"{TOKEN_DIR_VAR} must be an absolute path, not {value!r}")
        return _check_token_dir(path, "it")

    def _dotenv_values(self) -> Mapping[str, str | None]:
        if self._dotenv is None:
            self._dotenv = {}
            if self._dotenv_path is not None and self._dotenv_path.is_file():
                from dotenv import dotenv_values

                try:
                    self._dotenv = dotenv_values(self._dotenv_path)
                except (OSError, UnicodeDecodeError) as exc:
                    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                    raise ConfigError(
                        f"cannot read the .env file {self._dotenv_path}: {reason} (fix the file, or "
                        f"point {DOTENV_PATH_VAR} at another one)"
                    ) from None
        return self._dotenv


def _check_token_dir(path: Path, what: str) -> Path:
    """``path`` if it is (or can become) a directory this user can use; else a :class:`ConfigError`.

    One ``stat`` when the directory exists. Write access is not required of an existing directory:
    a monitoring user may only read it.
    """
    fix = f"set {TOKEN_DIR_VAR} to a directory this user can use"
    existing = path
    while True:
        try:
            is_dir = stat.S_ISDIR(os.stat(existing).st_mode)
            break
        except (FileNotFoundError, NotADirectoryError):
            if existing == existing.parent:
                raise ConfigError(f"{TOKEN_DIR_VAR}: no part of {path} exists; {fix}") from None
            existing = existing.parent
        except OSError as exc:
            raise ConfigError(
                f"{TOKEN_DIR_VAR}: cannot use {existing}: {exc.strerror or exc} ({what} is {path}); {fix}"
            ) from None
    if not is_dir:
        raise ConfigError(f"{TOKEN_DIR_VAR}: {existing} is not a directory ({what} is {path}); {fix}")
    if existing == path:
        if not os.access(path, os.R_OK | os.X_OK):
            raise ConfigError(f"{TOKEN_DIR_VAR}: this user cannot read {path}; {fix}")
    elif not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{TOKEN_DIR_VAR}: this user cannot create {path} (in {existing}); {fix}")
    return path


def _check_url(name: str, value: str) -> str:
    scheme, sep, rest = value.partition("://")
    host = rest.split("/", 1)[0]
    if not sep or scheme not in ("http", "https") or not host or any(c.isspace() for c in value):
        raise ConfigError(f"{name} must be an http(s) URL such as https://host:port, not {value!r}")
    return value.rstrip("/")


# -- the shared token store (several hosts on one app key) ---------------------------------------------

TOKEN_STORE_VAR = "KIS_TOKEN_STORE"
STORE_SCHEMES = ("redis", "rediss", "unix")


def token_store_url(settings: Settings) -> str | None:
    """The Redis/Valkey URL of ``KIS_TOKEN_STORE``, or None for the file store (unset or ``file``).

    Checked here without importing redis: a ``redis://`` or ``rediss://`` URL needs a host, and a
    port and database number, if given, must be numbers; a ``unix://`` URL needs a socket path.

    Raises:
        ConfigError: any other value (the message names the variable, never the password).
    """
    value = settings.get(TOKEN_STORE_VAR)
    if value is None or value.lower() == "file":
        return None
    problem = _store_url_problem(value)
    if problem is not None:
        raise ConfigError(
            f"{TOKEN_STORE_VAR} must be 'file' or a redis://, rediss:// or unix:// URL ({problem}), "
            f"not {mask_url(value)!r}"
        )
    return value


def _store_url_problem(value: str) -> str | None:
    if any(c.isspace() or not c.isprintable() for c in value):
        return "it contains blanks or control characters"
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number
    except ValueError:
        return ("it cannot be parsed; a password holding / ? # @ or : must be percent-encoded: "
                "%2F %3F %23 %40 %3A")
    if parts.scheme not in STORE_SCHEMES or "://" not in value:
        return "unknown scheme"
    path = parts.path.strip("/")
    if parts.scheme == "unix":
        return None if path else "a unix:// URL needs the socket's path"
    if not parts.hostname:
        return "the URL has no host"
    if path and not path.isdigit():
        return "the database (the path after the host) must be a number"
    return None


#: Query parameters whose value is hidden: any whose name holds one of these (any case).
SECRET_PARAM_WORDS = ("pass", "pwd", "secret", "token")


def mask_url(url: str) -> str:
    """``url`` with every password shown as ``***``; never raises.

    Hidden: the password of the user part (``user:***@``; a lone user part may be a password, so
    ``***@``) and the value of every query parameter named like a secret (``password``, ``pass``,
    ``passwd``, ``secret``, ``token``..., any case). A URL that parses cleanly is masked part by
    part. In one that does not, a password may hold ``/``, ``?``, ``#`` or ``@``: the user part then
    ends at the last ``@``, so such a password is hidden whole, and if a ``?`` or ``#`` before that
    ``@`` leaves any doubt, everything after the scheme is hidden.
    """
    masked = _mask_parsed(url)
    if masked is not None:
        return masked
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}{_mask_loosely(rest)}" if sep else _mask_loosely(url)


def url_origin(url: str) -> str | None:
    """``scheme://host[:port]`` of ``url`` (the port only if it names one); None if it has no scheme
    or host or does not parse. All a log may show of a URL whose path is a secret (a webhook's)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        port = parts.port
    except ValueError:
        return None
    if not parts.scheme or not host:
        return None
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None else "")


def _mask_parsed(url: str) -> str | None:
    """``url`` masked part by part, split as ``urlsplit`` does; None if a password could hide in
    a part that would be shown (an ``@`` in the path, the fragment or a shown parameter, or a port
    that is not a number)."""
    head, hash_mark, fragment = url.partition("#")
    head, question, query = head.partition("?")
    scheme, sep, rest = head.partition("://")
    if not sep:
        scheme, rest = "", head
    netloc, slash, path = rest.partition("/") if sep else ("", "", rest)
    userinfo, at, hostport = netloc.rpartition("@")
    shown_query, shown_fragment = _mask_query(query), _mask_query(fragment)
    if shown_query is None or shown_fragment is None or "@" in path or not _port_is_a_number(hostport):
        return None
    if at:
        netloc = _mask_userinfo(userinfo) + at + hostport
    return f"{scheme}{sep}{netloc}{slash}{path}{question}{shown_query}{hash_mark}{shown_fragment}"


def _port_is_a_number(hostport: str) -> bool:
    try:
        urlsplit("//" + hostport).port  # noqa: B018 -- raises ValueError for a port that is not a number
    except ValueError:
        return False
    return True


def _mask_query(query: str) -> str | None:
    """``query`` with secret-named values hidden; None if an ``@`` stands in a value that is shown."""
    params = []
    for param in query.split("&"):
        name, equals, _ = param.partition("=")
        if equals and any(word in unquote_plus(name).lower() for word in SECRET_PARAM_WORDS):
            param = f"{name}=***"
        elif "@" in param:
            return None
        params.append(param)
    return "&".join(params)


def _mask_loosely(rest: str) -> str:
    """``rest`` (what follows ``scheme://``) with everything up to its last ``@`` hidden but the
    user name, and the secret parameters after it; ``***`` if a ``?`` or ``#`` precedes that ``@``."""
    userinfo, at, tail = rest.rpartition("@")
    if "?" in userinfo or "#" in userinfo:
        return "***"
    head, question, query = tail.partition("?")
    query, hash_mark, fragment = query.partition("#")
    tail = f"{head}{question}{_mask_query(query)}{hash_mark}{_mask_query(fragment)}"  # no @ left: not None
    return _mask_userinfo(userinfo) + at + tail if at else tail


def _mask_userinfo(userinfo: str) -> str:
    """``user:***``, or ``***`` for a lone user part (it may be a password) or a doubtful user name."""
    user, colon, _ = userinfo.partition(":")
    return f"{user}:***" if colon and not any(c in user for c in "@/?#") else "***"
