"""What a failed command says to the operator, in one line, and the exit code it ends with.

Exit codes: 0 success; 1 the operation failed (refused, unreachable, no valid token); 2 usage;
3 configuration error (a variable, the token directory, or an app key or secret the broker
refused). ``check`` answers 3 (Nagios UNKNOWN) for any error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from common.errors import ConfigError, CredentialsError, DirectoryError, KISTokenError, StoreError
from common.renewal.report import SCHEMA
from common.settings import ENV_VAR, TOKEN_DIR_VAR

if TYPE_CHECKING:
    from common.base_token_manager import BaseTokenManager

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CONFIG = 0, 1, 2, 3
#: ``check`` exit code for a configuration or any other error (Nagios UNKNOWN).
CHECK_UNKNOWN = 3


def check_configuration(manager: BaseTokenManager) -> None:
    """Read every setting a command may need, so that a mistake is found before anything is done.

    Credentials, environment, broker URL and token directory: each raises :class:`ConfigError`
    naming its variable. (Found later, a missing key would cost the one-a-minute request slot.)
    """
    manager.environment  # noqa: B018  (KIS_ENV)
    manager.get_app_credentials()
    manager.get_api_url()
    manager.store  # noqa: B018  (KIS_TOKEN_DIR)
    manager.settings.rate_limit  # noqa: B018  (KIS_RATE_LIMIT)


def describe_error(exc: BaseException, manager: BaseTokenManager | None = None) -> tuple[str, int]:
    """The one-line message for ``exc`` and the exit code of a command other than ``check``.

    A credential refusal names the variables to fix (from ``manager.market_config``); an
    unusable token directory names ``KIS_TOKEN_DIR``.
    """
    if isinstance(exc, ConfigError):
        return f"configuration: {exc}", EXIT_CONFIG
    unusable_directory = _cause(exc, DirectoryError)
    if unusable_directory is not None:  # a token directory this user cannot use: configuration
        return f"configuration: {unusable_directory}", EXIT_CONFIG
    if isinstance(exc, ModuleNotFoundError):
        return (f"this Python lacks the package's dependencies (no module named {exc.name!r}): run it with "
                "the virtual environment's python (.venv/bin/python -m ...), or install the package into "
                "this one (pip install -e .)"), EXIT_CONFIG
    if not isinstance(exc, KISTokenError):
        return f"internal error: {type(exc).__name__}: {exc}", EXIT_FAILED
    refusal = _cause(exc, CredentialsError)
    if refusal is not None:
        return f"{exc}; {_credentials_hint(refusal, manager)}", EXIT_CONFIG
    about_the_directory = TOKEN_DIR_VAR not in str(exc) and _names_token_dir(exc, manager)
    if _cause(exc, StoreError) is not None and about_the_directory:
        hint = f"check that this user can write there, or set {TOKEN_DIR_VAR} to another directory"
        return f"{exc} ({hint})", EXIT_FAILED
    return str(exc), EXIT_FAILED


def _names_token_dir(exc: BaseException, manager: BaseTokenManager | None) -> bool:
    """True if ``exc`` is about a file in the token directory (not a metrics file, not the store)."""
    if manager is None:
        return False
    try:
        directory = str(manager.settings.token_dir)
    except Exception:  # the directory is itself misconfigured
        return False
    return directory in str(exc)


def unknown_info(manager: BaseTokenManager | None, market: str, message: str) -> dict[str, object]:
    """The ``check --json`` object for a market whose status could not be read."""
    environment = None
    if manager is not None:
        try:
            environment = manager.environment
        except Exception:
            environment = None
    return {
        "schema": SCHEMA,
        "market": market.lower(),
        "environment": environment,
        "status": "unknown",
        "present": False,
        "valid": False,
        "error": message,
    }


def _cause(exc: BaseException | None, kind: type[BaseException]) -> BaseException | None:
    """``exc`` or the first exception of type ``kind`` in its chain of causes."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, kind):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _credentials_hint(refusal: BaseException, manager: BaseTokenManager | None) -> str:
    """What to fix after the broker refused the app key or secret: the variables, by name."""
    config = getattr(manager, "market_config", None)
    key_var = getattr(config, "APP_KEY_VAR", "the app key")
    secret_var = getattr(config, "APP_SECRET_VAR", "the app secret")
    try:
        where = "" if manager is None else f" for {ENV_VAR}={manager.environment}"
    except Exception:  # KIS_ENV is itself misconfigured
        where = ""
    code = getattr(refusal, "code", "")
    if code in ("EGW00102", "EGW00103"):
        return f"fix {key_var}: the broker does not accept this app key{where}"
    if code in ("EGW00104", "EGW00105"):
        return f"fix {secret_var}: it is not the secret of {key_var}{where}"
    return f"check {key_var} and {secret_var}: they must be an app key and its secret{where}"
