"""The managed token in trading code: ``requests`` and ``httpx`` authentication.

``KISAuth(manager)`` (a ``requests.auth.AuthBase``) and ``KISHttpxAuth(manager)`` (an ``httpx.Auth``
for ``httpx.Client`` and ``httpx.AsyncClient``) add ``authorization: Bearer <token>``, ``appkey``
and ``appsecret`` to every request. When an answer's body says the token was rejected
(``EGW00123`` expired, ``EGW00121`` invalid; the broker sends them with HTTP 500 and sometimes
200), the token is replaced -- once for a whole burst of such answers, from any number of threads or
tasks, since every caller asks :meth:`~common.base_token_manager.BaseTokenManager.replace_rejected_token`
with the token it sent -- and the request is sent once more. A second rejection is returned as it
is: no loop. A renewal that fails (one a minute, broker down) returns the first answer, logged.

``import common.auth`` does not import httpx; ``KISHttpxAuth`` does, on first use (the
``kis-token-manager[httpx]`` extra).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import requests

from common.errors import REJECTED_TOKEN_CODES, KISTokenError

_log = logging.getLogger(__name__)


def rejected_token_code(body: bytes | str) -> str | None:
    """The broker's rejected-token code in an answer's body (``EGW00123``/``EGW00121``), or None."""
    marker = b"EGW0012" if isinstance(body, bytes) else "EGW0012"
    if marker not in body:  # type: ignore[operator]  # fast path: most answers never mention it
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    code = data.get("msg_cd") or data.get("error_code")
    return code if code in REJECTED_TOKEN_CODES else None


def kis_headers(manager: Any, token: str) -> dict[str, str]:
    """The headers every KIS REST call carries: the bearer token and the market's app key and secret.

    The key and secret are read once per manager (a manager's key does not change: a rotated key is
    a new manager).
    """
    credentials = manager.__dict__.get("_kis_auth_credentials")
    if credentials is None:
        credentials = manager._kis_auth_credentials = manager.get_app_credentials()
    return {"authorization": f"Bearer {token}", "appkey": credentials[0], "appsecret": credentials[1]}


def log_rejection(manager: Any, code: str) -> None:
    """Log that the broker rejected the token (the code only, never the token)."""
    _log.warning("%s token rejected by the broker (%s); replacing it and sending once more",
                 manager.market, code)


def log_replacement_failure(manager: Any, exc: KISTokenError) -> None:
    """Log that no replacement token could be had, so the broker's answer is returned as it is."""
    _log.error("%s token could not be replaced (%s); returning the broker's answer", manager.market, exc)


def replacement(manager: Any, sent: str, code: str) -> str | None:
    """A token to resend with after ``sent`` was rejected with ``code``; None if none can be had."""
    log_rejection(manager, code)
    try:
        return manager.replace_rejected_token(sent)
    except KISTokenError as exc:
        log_replacement_failure(manager, exc)
        return None


class KISAuth(requests.auth.AuthBase):
    """``requests`` authentication with the manager's token; renews and resends once on rejection.

    Args:
        manager: a ``USTokenManager`` or ``KRTokenManager``.
    """

    def __init__(self, manager: Any) -> None:
        self.manager = manager

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        """Add the headers and the hook that resends once after a rejected-token answer."""
        request.headers.update(kis_headers(self.manager, self.manager.get_valid_token()))
        request.register_hook("response", self._resend_once)
        return request

    def _resend_once(self, response: requests.Response, **kwargs: Any) -> requests.Response:
        request = response.request
        code = rejected_token_code(response.content)
        if code is None or getattr(request, "_kis_resent", False):
            return response
        sent = str(request.headers.get("authorization", "")).removeprefix("Bearer ")
        token = replacement(self.manager, sent, code)
        if token is None:
            return response
        response.close()
        again = request.copy()
        again.headers.update(kis_headers(self.manager, token))
        again._kis_resent = True  # type: ignore[attr-defined]
        answer = response.connection.send(again, **kwargs)  # type: ignore[attr-defined]
        answer.history.append(response)
        answer.request = again
        return answer


def __getattr__(name: str) -> Any:
    """``KISHttpxAuth`` is built on first use, so that importing this module never imports httpx."""
    if name == "KISHttpxAuth":
        from common.httpx_auth import KISHttpxAuth

        return KISHttpxAuth
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
