"""``KISHttpxAuth``: the managed token for ``httpx.Client`` and ``httpx.AsyncClient``.

See ``common.auth`` for the contract; this module imports httpx.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator
from typing import Any

import httpx

from common.auth import kis_headers, log_rejection, log_replacement_failure, rejected_token_code, replacement
from common.errors import KISTokenError


class KISHttpxAuth(httpx.Auth):
    """``httpx`` authentication with the manager's token; renews and resends once on rejection.

    The async flow gets and replaces the token off the event loop
    (:meth:`~common.base_token_manager.BaseTokenManager.get_valid_token_async`).

    Args:
        manager: a ``USTokenManager`` or ``KRTokenManager``.
    """

    def __init__(self, manager: Any) -> None:
        self.manager = manager

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        """Send with the token; after a rejected-token answer, once more with its replacement."""
        token = self.manager.get_valid_token()
        request.headers.update(kis_headers(self.manager, token))
        response = yield request
        code = rejected_token_code(response.read())
        if code is not None and (new := replacement(self.manager, token, code)) is not None:
            request.headers.update(kis_headers(self.manager, new))
            yield request

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        """The same, with the token asked for and replaced in a worker thread."""
        token = await self.manager.get_valid_token_async()
        request.headers.update(kis_headers(self.manager, token))
        response = yield request
        code = rejected_token_code(await response.aread())
        if code is None:
            return
        log_rejection(self.manager, code)
        try:
            new = await self.manager.replace_rejected_token_async(token)
        except KISTokenError as exc:
            log_replacement_failure(self.manager, exc)
            return
        request.headers.update(kis_headers(self.manager, new))
        yield request
