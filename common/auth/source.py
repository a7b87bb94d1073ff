"""What the adapters need of a token manager: the typed contract they are written against.

:class:`~common.base_token_manager.BaseTokenManager` satisfies it; the adapters never import the
facade, so the facade may build them (``create_broker``) without an import circle.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Protocol

from common.budget.limiter import CallBudget
from common.settings import Settings


class TokenSource(Protocol):
    """A market's token, its key and its broker address, as trading code's adapters use them.

    Attributes:
        settings: the manager's configuration (the account variable of ``create_broker``).
    """

    settings: Settings

    @property
    def market_config(self) -> ModuleType:
        """The market's ``config`` module (variable names, broker exchange)."""

    @property
    def market(self) -> str:
        """``us`` or ``kr``."""

    @property
    def environment(self) -> str:
        """``real`` or ``paper``."""

    def get_api_url(self) -> str:
        """The broker's base URL."""

    def get_app_credentials(self) -> tuple[str, str]:
        """``(app_key, app_secret)``."""

    def get_valid_token(self) -> str:
        """A token valid for more than the expiry margin."""

    def refresh_token(self) -> Any:
        """Force a renewal now."""

    def replace_rejected_token(self, rejected: str) -> str:
        """A token other than ``rejected``, which the broker refused."""

    async def get_valid_token_async(self) -> str:
        """:meth:`get_valid_token` for asyncio code."""

    async def replace_rejected_token_async(self, rejected: str) -> str:
        """:meth:`replace_rejected_token` for asyncio code."""

    def call_budget(self) -> CallBudget:
        """The app key's calls-a-second budget (one per key per process)."""
