"""The options every command shares: ``-v``/``-q`` and where logs go, and durations like ``8h``."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.settings import Settings


def add_verbosity(parser: argparse.ArgumentParser, after: bool = False) -> None:
    """``-v``/``-q``; a command's own go to ``*_after`` so that ``-v check -v`` counts both."""
    if after:  # unset unless given, so that the main parser's defaults stand
        verbose = {"dest": "verbose_after", "default": argparse.SUPPRESS}
        quiet = {"dest": "quiet_after", "default": argparse.SUPPRESS}
    else:
        verbose, quiet = {"dest": "verbose", "default": 0}, {"dest": "quiet", "default": False}
    parser.add_argument("-v", "--verbose", action="count", help="more logs (-vv: debug)", **verbose)
    parser.add_argument("-q", "--quiet", action="store_true", **quiet,
                        help="silent on success: errors only (get, metrics and check --json still answer)")


def configure_logging(verbose: int, quiet: bool, settings: Settings | None = None) -> None:
    """Send logs to stderr at the level of ``-q`` (errors), ``-v``/``-vv``, else ``KIS_LOG_LEVEL``.

    Raises:
        ConfigError: ``KIS_LOG_LEVEL`` (environment or ``.env``) is not a log level, even when
            ``-v`` or ``-q`` overrides it.
    """
    level = settings.log_level if settings is not None else "WARNING"
    if quiet:
        level = "ERROR"
    elif verbose:
        level = "DEBUG" if verbose > 1 else "INFO"
    logging.basicConfig(stream=sys.stderr, level=level, format="%(asctime)s %(levelname)s %(message)s")
    # urllib3's debug lines carry request paths, and a webhook's path is its secret.
    logging.getLogger("urllib3").setLevel(max(logging.INFO, logging.getLogger().level))


def duration(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1}
    value = text.strip().lower()
    try:
        number = float(value[:-1]) * units[value[-1]] if value[-1:] in units else float(value)
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"not a duration like 8h, 90m or 3600s: {text!r}") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"the duration must be positive: {text!r}")
    return number
