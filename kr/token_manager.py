"""KR market token manager; ``python -m kr.token_manager COMMAND`` runs the CLI."""

from __future__ import annotations

from common.base_token_manager import BaseTokenManager
from kr import config


class KRTokenManager(BaseTokenManager):
    """Token manager for the KR (domestic) market: ``kr_`` files, ``KIS_KR_*`` variables."""

    market_config = config

    def get_api_url(self) -> str:
        """``KIS_KR_BASE_URL``, else ``KIS_BASE_URL``, else the host of ``KIS_ENV``."""
        return self.settings.base_url(config.BASE_URL_VAR)

    def get_app_credentials(self) -> tuple[str, str]:
        """``(KIS_KR_APP_KEY, KIS_KR_APP_SECRET)``."""
        return self.settings.require(config.APP_KEY_VAR), self.settings.require(config.APP_SECRET_VAR)

    def get_token_file_prefix(self) -> str:
        """``kr_``."""
        return config.TOKEN_FILE_PREFIX


if __name__ == "__main__":
    from common.cli.market import main

    raise SystemExit(main(KRTokenManager))
