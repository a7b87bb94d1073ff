"""Adapters that put the managed token on trading code's requests: ``requests``, ``httpx``, mojito2.

``from common.auth import KISAuth, KISHttpxAuth``. Importing this package never imports httpx;
``KISHttpxAuth`` does, on first use (the ``[httpx]`` extra).
"""

from __future__ import annotations

from typing import Any

from common.auth.requests_auth import KISAuth, rejected_token_code

__all__ = ["KISAuth", "KISHttpxAuth", "rejected_token_code"]


def __getattr__(name: str) -> Any:
    """``KISHttpxAuth`` is built on first use, so that importing this package never imports httpx."""
    if name == "KISHttpxAuth":
        from common.auth.httpx_auth import KISHttpxAuth

        return KISHttpxAuth
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
