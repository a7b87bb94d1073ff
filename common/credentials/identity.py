"""Whose credential it is: (environment, broker host, app key), never holding the key itself.

The broker issues, rate-limits (one a minute) and re-sends tokens per app key and environment, and
one app key serves both markets. So everything that coordinates issuance is named after a
:class:`Credential`: with the same key in ``KIS_US_APP_KEY`` and ``KIS_KR_APP_KEY`` both markets
share one record, one lock and one one-a-minute memory; with two keys, two of each.
"""

from __future__ import annotations

from typing import NamedTuple
from urllib.parse import urlsplit

from common.settings import HOSTS

try:  # CPython's built-in SHA-256 loads in microseconds; hashlib loads OpenSSL (2 ms at start-up)
    from _sha2 import sha256 as _sha256  # CPython 3.12+
except ImportError:
    try:
        from _sha256 import sha256 as _sha256  # CPython 3.11
    except ImportError:
        from hashlib import sha256 as _sha256

_OFFICIAL = {urlsplit(url).netloc for url in HOSTS.values()}


def key_fingerprint(app_key: str) -> str:
    """A short, one-way fingerprint of an app key (stored instead of the key)."""
    return "sha256:" + _sha256(app_key.encode()).hexdigest()[:16]


def broker_host(base_url: str) -> str:
    """``host:port`` of a base URL, lower-cased: the part of the URL that names the broker."""
    return urlsplit(base_url).netloc.lower()


class Credential(NamedTuple):
    """The owner of a token: the environment, the broker's host and the app key's fingerprint.

    Attributes:
        environment: ``real`` or ``paper``.
        broker: ``host:port`` of the broker (the official host, a proxy or the local sandbox).
        key_fingerprint: :func:`key_fingerprint` of the app key.
    """

    environment: str
    broker: str
    key_fingerprint: str

    @classmethod
    def of(cls, environment: str, base_url: str, app_key: str) -> Credential:
        """The credential of ``app_key`` on the broker at ``base_url`` in ``environment``."""
        return cls(environment, broker_host(base_url), key_fingerprint(app_key))

    @property
    def key_id(self) -> str:
        """What files and store keys are named after: ``real-5fda05f056d87ade`` (plus a hash of the
        broker's host when it is not the environment's official one, so a proxy or the sandbox
        never shares a token with the real host)."""
        name = f"{self.environment}-{self.key_fingerprint.removeprefix('sha256:')}"
        if self.broker not in _OFFICIAL:
            name += "-" + _sha256(self.broker.encode()).hexdigest()[:8]
        return name
