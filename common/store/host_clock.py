"""This host's offset from the broker's clock, kept in the token directory for the next process.

Per host, never in a shared store: every host's clock is off by its own amount. A process starts
from the offset the host's last process learned, and corrects it from the ``Date`` header of each
answer it gets (``common.clock.BrokerClock``).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from common.clock import describe_offset, to_kst_iso
from common.errors import CorruptRecordError, KISTokenError

FILE_NAME = "host-clock.json"
#: An offset beyond this (30 days) is garbage, not a clock.
MAX_OFFSET = 30 * 86400.0

_log = logging.getLogger(__name__)


def load_offset(directory: Path) -> float:
    """The offset the host's processes last learned (0 if none, or if the file is unusable)."""
    from common.store import files

    try:
        text = files.read_text(directory / FILE_NAME)
        offset = 0.0 if text is None else json.loads(text).get("offset", 0.0)
    except (KISTokenError, CorruptRecordError, ValueError, RecursionError, AttributeError):
        return 0.0
    if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
        return 0.0
    return float(offset) if abs(offset) <= MAX_OFFSET else 0.0


def save_offset(directory: Path, offset: float, broker_now: float) -> None:
    """Keep ``offset`` for the host's next processes; say so once when the host's clock is wrong."""
    from common.store import files

    problem = describe_offset(offset)
    if problem is not None:
        _log.warning("%s: times are judged in the broker's time from its Date header", problem)
    elif offset:
        _log.info("this host's clock is %.0f s off the broker's; judging times in the broker's", offset)
    try:
        files.write_file(directory / FILE_NAME, json.dumps(
            {"offset": offset, "measured_at": to_kst_iso(broker_now)}, indent=2))
    except KISTokenError as exc:
        _log.debug("cannot keep the host's clock offset: %s", exc)
