"""What a credential kind needs from the market whose key it serves: the typed hook contract.

:class:`~common.base_token_manager.BaseTokenManager` satisfies it; the kinds never see the manager's
other methods, so nothing below the facade calls back into it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import requests

    from common.clock import BrokerClock
    from common.credentials.kis_client import Timeouts


class KeyAccess(Protocol):
    """The broker's address and the key's credentials for one market, with the means to talk to it.

    Attributes:
        now: the broker's clock (it learns from every answer's ``Date`` header).
        sleep: waits between retries.
        session: a ``requests.Session`` for the broker, or None.
        timeouts: the endpoints' deadlines and retries, or None for the defaults.
    """

    now: BrokerClock
    sleep: Callable[[float], None]
    session: requests.Session | None
    timeouts: Timeouts | None

    @property
    def market(self) -> str:
        """``us`` or ``kr``."""

    def get_api_url(self) -> str:
        """The broker's base URL."""

    def get_app_credentials(self) -> tuple[str, str]:
        """``(app_key, app_secret)``."""
