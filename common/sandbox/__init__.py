"""A local stand-in for the KIS Open API, for tests, demos and rehearsals (not a production module).

``python -m common.sandbox --help`` runs it; :class:`Sandbox` starts it in-process.
"""

from common.sandbox.server import Sandbox, is_loopback

__all__ = ["Sandbox", "is_loopback"]
