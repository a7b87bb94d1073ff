"""The broker's own word that a key's session is held: ``OPSP8996`` ``ALREADY IN USE appkey``.

A program that does not use this package's lease (another bot, the broker's sample, a second
machine without ``KIS_TOKEN_STORE``) may hold the key's one session; the broker then answers the
first message of ours with ``{"body": {"rt_cd": "9", "msg_cd": "OPSP8996", "msg1": "ALREADY IN USE
appkey"}}`` and closes the connection. Trading code passes the server's first answer to
:func:`session_refused` (or :func:`raise_if_refused`).
"""

from __future__ import annotations

import json
from typing import Any

from common.errors import SessionHeldError

#: The broker's code for "another connection holds this app key's session".
IN_USE_CODE = "OPSP8996"


def session_refused(message: str | bytes | dict[str, Any]) -> bool:
    """True if ``message`` (a server message: text, bytes or parsed JSON) is the broker's ``OPSP8996``.

    Real-time data (``0|H0STCNT0|...``), ``PINGPONG`` and other answers are False; a message that
    does not mention ``OPSP8996`` is never parsed.
    """
    if isinstance(message, dict):
        body = message.get("body")
        return isinstance(body, dict) and body.get("msg_cd") == IN_USE_CODE
    text = message.decode("utf-8", "replace") if isinstance(message, bytes) else str(message)
    if IN_USE_CODE not in text:
        return False
    try:
        parsed = json.loads(text)
    except ValueError:
        return "ALREADY IN USE" in text.upper()
    return isinstance(parsed, dict) and session_refused(parsed)


def raise_if_refused(message: str | bytes | dict[str, Any], market: str = "") -> None:
    """Raise :class:`SessionHeldError` if ``message`` is the broker's ``OPSP8996``.

    Raises:
        SessionHeldError: ``the us key's WebSocket session is held elsewhere (outside this package):
            the broker answered OPSP8996 ALREADY IN USE appkey`` (``elsewhere`` is True).
    """
    if session_refused(message):
        whose = f"the {market} key's" if market else "the key's"
        raise SessionHeldError(f"{whose} WebSocket session is held elsewhere (outside this package): the "
                               f"broker answered {IN_USE_CODE} ALREADY IN USE appkey", elsewhere=True)
