"""``kis-token``, the console script: both markets behind one command.

::

    kis-token us COMMAND [options]    the same as python -m us.token_manager COMMAND [options]
    kis-token kr COMMAND [options]    the same as python -m kr.token_manager COMMAND [options]
    kis-token status [--json]         both markets in one table (or one JSON object)
    kis-token --version

``status`` exits with the worse of the two markets' ``check`` codes (Nagios: 0 OK, 1 WARNING,
2 CRITICAL, 3 UNKNOWN, the worst). A token that both markets share (one app key for both, the
usual case) is marked ``shared``. Like ``check`` it never prints a full token, and it sends no
request to the broker. Beside each market's token it shows the last failure that stands in the way
of the next renewal: the broker's refusal code, an unreachable broker (its URL), or a store problem.
Under the table, one line per app key: its call budget (calls and ``EGW00201`` answers in the last
minute, the rate, where the budget is kept).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from typing import Any

from common.cli.market import (
    CHECK_EXIT,
    CHECK_UNKNOWN,
    budget_summary,
    check_configuration,
    configure_logging,
    describe_error,
    unknown_info,
)
from common.clock import format_duration
from common.renewal.report import SCHEMA

PROG = "kis-token"
DISTRIBUTION = "kis-token-manager"
MARKETS = ("us", "kr")
_VERBOSITY = re.compile(r"-[vq]+|--verbose|--quiet")
_STATE = {
    "ok": "valid",
    "renewal_due": "renewal due",
    "missing": "missing",
    "expired": "expired",
    "unknown": "unknown",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``kis-token`` with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((i for i, arg in enumerate(argv) if not _VERBOSITY.fullmatch(arg)), len(argv))
    if first < len(argv) and argv[first] in MARKETS:
        # ``kis-token -v us check`` is ``python -m us.token_manager -v check``.
        return run_market(argv[first], argv[:first] + argv[first + 1:])
    args = _parser().parse_args(argv)
    if args.version:
        print(f"{PROG} {version()}")
        return 0
    if args.command is None:
        _parser().print_usage(sys.stderr)
        print(f"{PROG}: error: a command is required: us, kr or status", file=sys.stderr)
        return 2
    args.verbose += args.verbose_after
    args.quiet = args.quiet or args.quiet_after
    from common.cli.market import flushed

    try:
        return flushed(lambda: status(args.json, verbose=args.verbose, quiet=args.quiet))
    except KeyboardInterrupt:
        return 130


def version() -> str:
    """This package's version, from its installed metadata (``unknown`` when run from a bare checkout)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as metadata_version

    try:
        return metadata_version(DISTRIBUTION)
    except PackageNotFoundError:
        return "unknown (not installed)"


def run_market(market: str, argv: Sequence[str]) -> int:
    """``kis-token us|kr ARGV``: the market's own CLI (:func:`common.cli.market.main`)."""
    from common.cli.market import main as market_main

    if market == "us":
        from us.token_manager import USTokenManager as factory
    else:
        from kr.token_manager import KRTokenManager as factory
    return market_main(factory, list(argv), market=market.upper(), prog=f"{PROG} {market}")


def status(as_json: bool = False, verbose: int = 0, quiet: bool = False) -> int:
    """Print both markets' status, as a table or one JSON object; return the worse ``check`` code.

    Args:
        as_json: print one JSON object (see :func:`collect`) instead of the table.
        verbose: ``-v`` count.
        quiet: print nothing when both markets are OK (the JSON object is still printed).
    """
    from common.errors import ConfigError
    from common.settings import Settings

    settings = None
    problem = None
    try:
        settings = Settings()
        configure_logging(verbose, quiet, settings)
    except ConfigError as exc:
        problem = describe_error(exc)[0]
        configure_logging(verbose, quiet)
    report = collect(settings, problem)
    if problem is not None:  # the same for both markets: say it once
        print(f"{PROG} status: error: {problem}", file=sys.stderr)
    else:  # one line per problem: the same one in both markets (KIS_TOKEN_DIR, say) is said once
        problems: dict[str, list[str]] = {}
        for market, info in report["markets"].items():
            if info["status"] == "unknown":
                problems.setdefault(info["error"], []).append(market)
        for message, markets in problems.items():
            print(f"{PROG} status: error: {', '.join(markets)}: {message}", file=sys.stderr)
    if as_json:
        print(json.dumps(report, ensure_ascii=False))
    elif not (quiet and report["exit"] == 0):
        print(render_table(report))
    return report["exit"]


def collect(settings: Any = None, problem: str | None = None) -> dict[str, Any]:
    """Both markets' ``check --json`` objects and what they share.

    Returns:
        ``{"schema": 1, "exit": worse check code, "shared": bool, "markets": {"us": info, "kr":
        info}}``; each ``info`` is the market's ``check --json`` object (``status: "unknown"`` and
        ``error`` when it could not be read) plus ``key_fingerprint``, ``shared`` and ``exit``.
    """
    markets = {market: _market_info(market, settings, problem) for market in MARKETS}
    us, kr = markets["us"], markets["kr"]
    shared = (
        us["present"] and kr["present"]
        and us["key_fingerprint"] is not None
        and us["key_fingerprint"] == kr["key_fingerprint"]
        and us["environment"] == kr["environment"]
        and us["token"] == kr["token"]
        and us["expires_at"] == kr["expires_at"]
    )
    for info in markets.values():
        info["shared"] = bool(shared)
    return {
        "schema": SCHEMA,
        "exit": max(info["exit"] for info in markets.values()),
        "shared": bool(shared),
        "markets": markets,
    }


def _market_info(market: str, settings: Any, problem: str | None) -> dict[str, Any]:
    """One market's ``check --json`` object, with its key fingerprint and ``check`` exit code."""
    manager = None
    if problem is None:
        try:
            if market == "us":
                from us.token_manager import USTokenManager as cls
            else:
                from kr.token_manager import KRTokenManager as cls
            manager = cls(settings)
            check_configuration(manager)  # as check does: every setting, not only those it reads
            info = manager.get_token_info()
            info["key_fingerprint"] = manager.key_fingerprint()
            info["exit"] = CHECK_EXIT[info["status"]]
            return info
        except Exception as exc:  # a configuration error, an unreadable file, a bug: UNKNOWN
            problem = describe_error(exc, manager)[0]
    info = unknown_info(manager, market, problem)
    info.update(issued_at=None, expires_at=None, seconds_left=None, token=None, key_fingerprint=None,
                call_budget=None, last_failure=None)
    info["exit"] = CHECK_UNKNOWN
    return info


def render_table(report: dict[str, Any]) -> str:
    """The ``status`` table: one row per market, then a note on a shared token. A ``LAST FAILURE``
    column is added when a market has one (see :func:`common.renewal.report.last_failure`)."""
    header = ("MARKET", "ENV", "KEY", "STATE", "EXPIRES", "LEFT", "TOKEN", "LAST FAILURE")
    rows = [header]
    for market, info in report["markets"].items():
        left = info["seconds_left"]
        token = info["token"] or "-"
        rows.append((
            market,
            info["environment"] or "-",
            info["key_fingerprint"] or "-",
            _STATE.get(info["status"], info["status"]),
            info["expires_at"] or "-",
            "-" if left is None else format_duration(left),
            f"{token} (shared)" if info["shared"] else token,
            _failure(info),
        ))
    if all(row[-1] == "-" for row in rows[1:]):  # nothing in the way: no column for it
        rows = [row[:-1] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    if report["shared"]:
        lines.append("us and kr share one token (the same app key and environment): one issuance serves both")
    budgets: dict[tuple[str, str], list[str]] = {}  # one line per key: both markets may share it
    for market, info in report["markets"].items():
        if info.get("call_budget") is not None and info["key_fingerprint"] is not None:
            budgets.setdefault((info["environment"], info["key_fingerprint"]), []).append(market)
    for (_, key), markets in budgets.items():
        info = report["markets"][markets[0]]
        lines.append(f"calls ({' and '.join(markets)}, key {key}): {budget_summary(info['call_budget'])}")
    clocks = {info.get("clock") for info in report["markets"].values()} - {None}
    lines.extend(f"clock: {text}" for text in sorted(clocks))
    return "\n".join(lines)


def _failure(info: dict[str, Any]) -> str:
    """The status table's ``LAST FAILURE`` cell: what stands in the way of the market's next renewal."""
    failure = info.get("last_failure")
    if failure is None:
        return "-"
    when = failure["at"]
    return f"{failure['summary']} ({when[:16].replace('T', ' ')})" if when else failure["summary"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="KIS Open API tokens of both markets. "
        "'kis-token us COMMAND' is 'python -m us.token_manager COMMAND' (and kr likewise): "
        "check, get, approval, refresh, delete, warmup, revoke, metrics.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logs (-vv: debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="silent on success: errors only")
    parser.set_defaults(command=None, json=False, verbose_after=0, quiet_after=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for market in MARKETS:
        commands.add_parser(
            market, help=f"python -m {market}.token_manager COMMAND (kis-token {market} --help)",
            add_help=False,
        )
    text = "both markets in one table; exit with the worse of the two check codes"
    status_parser = commands.add_parser("status", help=text, description=text)
    status_parser.add_argument("--json", action="store_true", help="print one JSON object for both")
    status_parser.add_argument("-v", "--verbose", action="count", dest="verbose_after",
                               default=argparse.SUPPRESS, help="more logs (-vv: debug)")
    status_parser.add_argument("-q", "--quiet", action="store_true", dest="quiet_after",
                               default=argparse.SUPPRESS, help="silent when both markets are OK")
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
