"""The command line shared by ``python -m us.token_manager`` and ``python -m kr.token_manager``.

stdout carries only the answer (the token for ``get``, a status line or JSON otherwise); logs and
errors go to stderr. Expected failures print one line, never a traceback.

Exit codes: 0 success; 1 the operation failed (refused, unreachable, no valid token); 2 usage;
3 configuration error. ``check`` follows the Nagios plugin convention: 0 OK, 1 WARNING (valid but
inside the renewal window), 2 CRITICAL (missing or expired), 3 UNKNOWN (configuration or internal
error).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence

from common.clock import format_duration
from common.errors import ConfigError, KISTokenError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CONFIG = 0, 1, 2, 3
CHECK_EXIT = {"ok": 0, "renewal_due": 1, "missing": 2, "expired": 2}
LOG_LEVEL_VAR = "KIS_LOG_LEVEL"

_log = logging.getLogger("common.cli")


def main(
    manager_factory: Callable[[], object], argv: Sequence[str] | None = None, market: str | None = None
) -> int:
    """Run one CLI command for the market whose manager ``manager_factory`` builds.

    Args:
        manager_factory: builds the market's manager (``USTokenManager``, ``KRTokenManager``).
        argv: the arguments (default: ``sys.argv[1:]``).
        market: ``US`` or ``KR`` (default: from the factory's name).

    Returns:
        The process exit code.
    """
    market = market or manager_factory.__name__[:2].upper()
    args = _parser(market).parse_args(argv)
    _configure_logging(args.verbose, args.quiet)
    try:
        manager = manager_factory()
        return args.run(manager, args)
    except ConfigError as exc:
        _error(args, f"configuration: {exc}")
        return EXIT_CONFIG
    except KISTokenError as exc:
        _error(args, str(exc))
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug or an unforeseen fault: one line, details at -vv
        _log.debug("internal error", exc_info=True)
        _error(args, f"internal error: {type(exc).__name__}: {exc}")
        return EXIT_CONFIG if args.run is _check else EXIT_FAILED  # check: 3 is UNKNOWN


def _parser(market: str) -> argparse.ArgumentParser:
    prog = f"python -m {market.lower()}.token_manager"
    parser = argparse.ArgumentParser(
        prog=prog, description=f"Manage the KIS Open API token of the {market} market."
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logs (-vv: debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="errors only")
    parser.set_defaults(market=market, prog=prog)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = commands.add_parser(
        "check", help="show the token's status (exit 0 OK, 1 renewal due, 2 missing/expired)"
    )
    check.add_argument("--json", action="store_true", help="print one JSON object")
    check.set_defaults(run=_check)
    commands.add_parser("get", help="print a valid token, renewing first if needed").set_defaults(run=_get)
    commands.add_parser("refresh", help="force a renewal now").set_defaults(run=_refresh)
    commands.add_parser("delete", help="remove this market's local token files").set_defaults(run=_delete)
    warmup = commands.add_parser("warmup", help="renew only if the token would expire within a horizon")
    warmup.add_argument("--valid-for", type=_duration, default=None, metavar="DURATION",
                        help="horizon such as 8h, 90m or 3600s (default: the market's session)")
    warmup.set_defaults(run=_warmup)
    revoke = commands.add_parser("revoke", help="revoke the token at the broker and remove local files")
    revoke.set_defaults(run=_revoke)
    metrics = commands.add_parser("metrics", help="print Prometheus metrics")
    metrics.add_argument("--textfile", metavar="PATH", help="write them atomically to PATH instead")
    metrics.set_defaults(run=_metrics)
    return parser


def _configure_logging(verbose: int, quiet: bool) -> None:
    level = os.environ.get(LOG_LEVEL_VAR, "WARNING").upper()
    if quiet:
        level = "ERROR"
    elif verbose:
        level = "DEBUG" if verbose > 1 else "INFO"
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        level = "WARNING"
    logging.basicConfig(stream=sys.stderr, level=level, format="%(asctime)s %(levelname)s %(message)s")
    # urllib3's debug lines carry request paths, and a webhook's path is its secret.
    logging.getLogger("urllib3").setLevel(max(logging.INFO, logging.getLogger().level))


def _error(args: argparse.Namespace, message: str) -> None:
    print(f"{args.prog}: error: {message}", file=sys.stderr)


def _duration(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1}
    value = text.strip().lower()
    try:
        number = float(value[:-1]) * units[value[-1]] if value[-1:] in units else float(value)
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"not a duration like 8h, 90m or 3600s: {text!r}") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"the duration must be positive: {text!r}")
    return number


def _check(manager, args: argparse.Namespace) -> int:
    info = manager.get_token_info()
    if args.json:
        print(json.dumps(info, ensure_ascii=False))
        return CHECK_EXIT[info["status"]]
    label = {"ok": "valid", "renewal_due": "valid, renewal due", "missing": "missing", "expired": "expired"}
    print(f"{args.market} token ({info['environment']}): {label[info['status']]}")
    if info["present"]:
        print(f"  issued:   {info['issued_at']}")
        print(f"  expires:  {info['expires_at']} ({_left(info['seconds_left'])})")
        print(f"  token:    {info['token']}")
    last = info["last_renewal"]
    if last is not None:
        code = f" {last['code']}" if last["code"] else ""
        detail = f": {last['message']}" if last["message"] else ""
        print(f"  last renewal: {last['outcome']}{code} at {last['at']}{detail}")
    print(f"  key:      {info['key_fingerprint']} (record {info['files']['key_record']})")
    store = info["store"]
    reach = "answers" if store["reachable"] else f"unreachable: {store['error']}"
    print(f"  store:    {store['url']} ({reach})" if store["url"] else "  store:    this host's files")
    print(f"  record:   {info['files']['record']}")
    print(f"  issued:   {info['files']['issued_at']}")
    print(f"  mojito:   {info['files']['mojito']}")
    return CHECK_EXIT[info["status"]]


def _left(seconds: float) -> str:
    text = format_duration(seconds)
    return text if text.startswith("expired") else f"in {text}"


def _get(manager, args: argparse.Namespace) -> int:
    print(manager.get_valid_token())
    return EXIT_OK


def _refresh(manager, args: argparse.Namespace) -> int:
    before = manager.load_token()
    try:
        record = manager.refresh_token()
    except KISTokenError as exc:
        kept = _kept_note(manager, before)
        _error(args, f"{args.market} token renewal failed: {exc}{kept}")
        return EXIT_CONFIG if isinstance(exc, ConfigError) else EXIT_FAILED
    now = manager.now()
    if before is not None and before.access_token == record.access_token:
        what = "unchanged (the broker re-sends the same token within 6 h of issuing one)"
    else:
        what = "renewed"
    print(f"{args.market} token {what}: {_summary(record, now)}")
    return EXIT_OK


def _kept_note(manager, before) -> str:
    if before is None or manager.is_token_expired(before):
        return "; no valid token is held"
    left = format_duration(before.seconds_left(manager.now()))
    return f"; the current token is kept (valid for {left} more)"


def _summary(record, now: float) -> str:
    from common.clock import to_kst_iso
    from common.record import mask_token

    left = format_duration(record.seconds_left(now))
    return f"{mask_token(record.access_token)}, expires {to_kst_iso(record.expires_at)} (in {left})"


def _delete(manager, args: argparse.Namespace) -> int:
    removed = manager.delete_token()
    if removed:
        print(f"{args.market} token files removed: {', '.join(removed)}")
    else:
        print(f"no {args.market} token files to remove")
    return EXIT_OK


def _warmup(manager, args: argparse.Namespace) -> int:
    horizon = args.valid_for or manager.market_config.WARMUP_VALID_FOR
    try:
        record, renewed = manager.warm_up(horizon)
    except ValueError as exc:
        _error(args, str(exc))
        return EXIT_USAGE
    now = manager.now()
    if renewed:
        print(f"{args.market} token renewed for warm-up: {_summary(record, now)}")
    else:
        print(
            f"{args.market} token already valid for {format_duration(record.seconds_left(now))} "
            f"(needed {format_duration(horizon)}); nothing to do"
        )
    return EXIT_OK


def _revoke(manager, args: argparse.Namespace) -> int:
    removed = manager.revoke()
    print(f"{args.market} token revoked at the broker; local files removed ({len(removed)})")
    return EXIT_OK


def _metrics(manager, args: argparse.Namespace) -> int:
    from common import metrics

    text = metrics.render(manager)
    if args.textfile:
        metrics.write_textfile(args.textfile, text)
    else:
        sys.stdout.write(text)
    return EXIT_OK
