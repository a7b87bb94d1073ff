"""mojito2 broker objects that run on the managed token.

``mojito.KoreaInvestment`` manages its own token: it issues one in ``__init__``, pickles it (with
the app secret) to ``./token.dat`` in the current directory, talks to hard-coded hosts and never
looks at expiry again. :func:`create_broker` returns a subclass that hands all of that to a token
manager instead:

* no pickle is ever read or written: ``check_access_token``, ``load_access_token`` and
  ``issue_access_token`` go through the manager;
* ``base_url`` is the manager's :meth:`~BaseTokenManager.get_api_url` (``KIS_ENV``,
  ``KIS_BASE_URL``, ``KIS_US_BASE_URL``/``KIS_KR_BASE_URL``);
* ``access_token`` is a property that asks the manager at every call, so a renewal (expiry, a
  forced refresh, another process) reaches the next call without rebuilding the broker;
* every API method is wrapped: an answer that says the token was rejected (``EGW00123`` expired,
  ``EGW00121`` invalid, read by :func:`common.auth.requests_auth.rejected_token_code`) makes one
  :meth:`~BaseTokenManager.replace_rejected_token` and one retry of that call, never more;
* every request to the broker waits for the key's next free slot in
  :meth:`~BaseTokenManager.call_budget`: mojito reads ``access_token`` once for each request it
  builds, just before sending it, so the property takes the slot (inside a wrapped API call), and
  ``issue_hashkey`` (which sends without the token) takes one before it runs. An ``EGW00201``
  answer is counted and the call repeated after the next free slot, as ``KISAuth`` does (at most
  three times within 5 s per outermost call, ``common.budget.resend``). No mojito code is patched:
  a mojito method that sent a request without reading ``access_token`` would go unpaced (none in
  mojito2 0.1.x does, but ``fetch_symbols`` downloads master files from another host, which the
  budget rightly does not count).

This module imports mojito (and pandas) only when a broker is built; the manager imports this
module only from :meth:`BaseTokenManager.create_broker`.
"""

from __future__ import annotations

import functools
import inspect
import logging
import re
import threading
from collections.abc import Callable
from typing import Any

from common.auth.requests_auth import answer_code
from common.auth.source import TokenSource
from common.budget.resend import RATE_EXCEEDED_CODE, Resends
from common.errors import BudgetTimeoutError, ConfigError

#: mojito methods that send a request to the broker without reading ``access_token``: each takes a
#: slot of the key's budget before it runs.
UNTOKENED_CALLS = frozenset({"issue_hashkey"})
#: An account number: 8 digits, a dash, the 2-digit product code.
ACCOUNT_PATTERN = re.compile(r"\d{8}-\d{2}")

_log = logging.getLogger(__name__)


def create_broker(manager: TokenSource, acc_no: str | None = None, **kwargs: Any) -> Any:
    """Build a ``mojito.KoreaInvestment`` for ``manager``'s market that runs on its token.

    Args:
        manager: the market's token manager.
        acc_no: the account number ``12345678-01``; default: the market's account variable
            (``KIS_US_ACCOUNT`` or ``KIS_KR_ACCOUNT``).
        **kwargs: passed to mojito; ``exchange`` defaults to the market's (``나스닥`` US, ``서울``
            KR). ``mock`` follows ``KIS_ENV`` (``paper`` is mock trading) and may not contradict it.

    Returns:
        A ``ManagedKoreaInvestment`` (a ``mojito.KoreaInvestment`` subclass). Building it sends no
        token request when the manager holds a valid token.

    Raises:
        ConfigError: the account number is missing or malformed, or the market is not configured.
        ValueError: ``mock`` contradicts ``KIS_ENV``.
        KISTokenError: no valid token could be obtained.
        ImportError: mojito2 (or pandas, which it needs) is not installed.
    """
    config = manager.market_config
    if acc_no is None:
        acc_no = manager.settings.require(config.ACCOUNT_VAR)
        source = config.ACCOUNT_VAR
    else:
        source = "acc_no"
    if not isinstance(acc_no, str) or not ACCOUNT_PATTERN.fullmatch(acc_no):
        raise ConfigError(f"{source} must be an account number like 12345678-01 (8 digits, dash, 2 digits)")
    paper = manager.environment == "paper"
    if kwargs.setdefault("mock", paper) != paper:
        raise ValueError(f"mock={kwargs['mock']!r} contradicts KIS_ENV={manager.environment}; set KIS_ENV")
    kwargs.setdefault("exchange", config.BROKER_EXCHANGE)
    app_key, app_secret = manager.get_app_credentials()
    return broker_class()(manager, app_key, app_secret, acc_no, **kwargs)


@functools.cache
def broker_class() -> type:
    """The ``ManagedKoreaInvestment`` class, built on first use (this is where mojito is imported)."""
    try:
        import mojito
    except ImportError as exc:
        raise ImportError(
            f"mojito brokers need mojito2 and pandas ({exc}); install them with "
            "pip install 'kis-token-manager[broker]'"
        ) from exc
    base = mojito.KoreaInvestment
    namespace: dict[str, Any] = {
        name: _retry_once_on_rejection(attr)
        for name, attr in vars(base).items()
        if inspect.isfunction(attr) and not name.startswith("__") and name not in vars(_ManagedToken)
    }
    class_name = "ManagedKoreaInvestment"
    namespace.update(__module__=__name__, __qualname__=class_name, __doc__=_ManagedToken.__doc__)
    return type(class_name, (_ManagedToken, base), namespace)


class _CallState(threading.local):
    """Per thread: the token the current broker call sends, whether it was retried, and its
    ``EGW00201`` resends, with the seconds the next resend's slot must come within (None: the
    budget's own timeout)."""

    depth = 0
    token: str | None = None
    retried = False
    resends: Resends | None = None
    slot_within: float | None = None


class _ManagedToken:
    """A ``mojito.KoreaInvestment`` whose token, host and renewals belong to a token manager.

    ``access_token`` reads the manager's token at every call, and inside an API call first waits
    for the key's next free slot; assignments to it are ignored. An API call answered with
    ``EGW00123``/``EGW00121`` renews once and is sent once more; one answered ``EGW00201`` is sent
    again after the next free slot (bounded).
    """

    def __init__(self, manager: TokenSource, *args: Any, **kwargs: Any) -> None:
        self._manager = manager
        self._calls = _CallState()
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]  # mojito's class, mixed in at run time

    @property
    def access_token(self) -> str:
        """``Bearer <token>``: the manager's valid token, the same one throughout an API call."""
        calls = self._calls
        token = calls.token or self._manager.get_valid_token()
        if calls.depth:  # mojito is building a request's headers: it sends right after
            calls.token = token
            within, calls.slot_within = calls.slot_within, None
            self._manager.call_budget().acquire(within)
        return "Bearer " + token

    @access_token.setter
    def access_token(self, value: object) -> None:
        """Ignored: mojito assigns its own tokens; the manager's is the only one used."""

    def set_base_url(self, mock: bool = True) -> None:
        """Use the manager's URL (``mock`` is already reflected in it through ``KIS_ENV``)."""
        self.base_url = self._manager.get_api_url()

    def check_access_token(self) -> bool:
        """Make sure the manager holds a valid token (renewing through it if needed); True."""
        self._manager.get_valid_token()
        return True

    def load_access_token(self) -> None:
        """Nothing to load: ``access_token`` asks the manager at each use (no ``token.dat``)."""

    def issue_access_token(self) -> None:
        """Force a renewal through the manager (rate limit and cross-process lock apply)."""
        self._manager.refresh_token()


def _retry_once_on_rejection(method: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a mojito API method: a rejected-token answer renews once and repeats the call once; an
    ``EGW00201`` answer repeats it after the key's next free slot (bounded, ``common.budget.resend``).

    mojito's methods return the broker's JSON answer, and some call others (``fetch_price`` calls
    ``fetch_domestic_price``). One outermost call sends one token (the first it reads) and has one
    retry, spent by the innermost call that sees the rejection; its ``EGW00201`` resends are
    counted together too, and each one's slot must come within the 5 s of the first refusal: when
    it does not, the call returns the broker's last answer (as ``KISAuth`` does).
    """
    untokened = method.__name__ in UNTOKENED_CALLS

    @functools.wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls: _CallState = self._calls
        outermost = calls.depth == 0
        if outermost:
            calls.token, calls.retried, calls.resends, calls.slot_within = None, False, None, None
        calls.depth += 1
        refused: Any = None  # the last EGW00201 answer, while it is being resent
        try:
            while True:
                try:
                    if untokened:
                        within, calls.slot_within = calls.slot_within, None
                        self._manager.call_budget().acquire(within)
                    answer = method(self, *args, **kwargs)
                except BudgetTimeoutError:
                    if refused is None:
                        raise
                    return refused  # no slot for the resend in time: the broker's last answer
                finally:
                    calls.slot_within = None
                code = answer_code(answer)
                refused = None
                if code == RATE_EXCEEDED_CODE:
                    calls.resends = calls.resends or Resends(self._manager.call_budget())
                    within = calls.resends.allowed()
                    if within is not None:  # the next send's slot: in access_token, within that
                        calls.slot_within, refused = within, answer
                        continue
                elif code is not None and calls.token is not None and not calls.retried:
                    calls.retried = True
                    _log.warning(
                        "%s broker: %s was refused with %s (token rejected); renewing and retrying once",
                        self._manager.market, method.__name__, code,
                    )
                    calls.token = self._manager.replace_rejected_token(calls.token)
                    continue
                return answer
        finally:
            calls.depth -= 1
            if outermost:
                calls.token = None

    return call
