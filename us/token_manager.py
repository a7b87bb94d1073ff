"""US market token manager; ``python -m us.token_manager COMMAND`` runs the CLI."""

from __future__ import annotations

from common.base_token_manager import BaseTokenManager
from us import config


class USTokenManager(BaseTokenManager):
    """Token manager for the US (overseas) market: ``us_`` files, ``KIS_US_*`` variables."""

    market_config = config

    def get_api_url(self) -> str:
        """``KIS_US_BASE_URL``, else ``KIS_BASE_URL``, else the host of ``KIS_ENV``."""
        return self.settings.base_url(config.BASE_URL_VAR)

    def get_app_credentials(self) -> tuple[str, str]:
        """``(KIS_US_APP_KEY, KIS_US_APP_SECRET)``."""
        return self.settings.require(config.APP_KEY_VAR), self.settings.require(config.APP_SECRET_VAR)

    def get_token_file_prefix(self) -> str:
        """``us_``."""
        return config.TOKEN_FILE_PREFIX


if __name__ == "__main__":
    from common.cli.market import main

    raise SystemExit(main(USTokenManager))
