"""The command line shared by ``python -m us.token_manager`` and ``python -m kr.token_manager``.

stdout carries only the answer (the token for ``get``, a status line or JSON otherwise); logs and
errors go to stderr. Expected failures print one line, never a traceback. ``-q`` makes every
command silent on success (``get``, ``metrics`` and ``check --json`` still print their answer);
``-v``, ``-vv`` and ``-q`` go before or after the command.

Exit codes: 0 success; 1 the operation failed (refused, unreachable, no valid token); 2 usage;
3 configuration error (a variable, the token directory, or an app key or secret the broker
refused). ``check`` follows the Nagios plugin convention: 0 OK, 1 WARNING (valid but inside the
renewal window), 2 CRITICAL (missing or expired), 3 UNKNOWN (configuration or any other error);
``check --json`` prints one JSON object even then (``"status": "unknown"`` and ``"error"``).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence

from common.cli import progress
from common.cli.messages import (
    CHECK_UNKNOWN,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    check_configuration,
    describe_error,
    unknown_info,
)
from common.cli.options import add_verbosity, configure_logging, duration
from common.clock import format_duration
from common.errors import KISTokenError
from common.settings import LOG_LEVEL_VAR

CHECK_EXIT = {"ok": 0, "renewal_due": 1, "missing": 2, "expired": 2}
#: A new token lives 24 h from its issuance; one the broker re-sends keeps its first expiry, so it has
#: at least a minute less (one request a minute), less this allowance for the round trip.
TOKEN_LIFETIME, RESENT_SLACK = 86400.0, 30.0
#: The commands that may send a request (and wait for it): a slow one says so (``common.cli.progress``).
_MAY_REQUEST = frozenset({"get", "approval", "refresh", "warmup", "revoke"})
#: Errors writing stdout that mean the output is lost, not that the command failed to work.
_OUTPUT_LOST = frozenset({errno.EPIPE, errno.ENOSPC, errno.EDQUOT, errno.EIO})
__all__ = [
    "CHECK_EXIT", "CHECK_UNKNOWN", "LOG_LEVEL_VAR", "check_configuration", "configure_logging",
    "describe_error", "main", "unknown_info",
]

_log = logging.getLogger("common.cli.market")


def main(
    manager_factory: Callable[[], object],
    argv: Sequence[str] | None = None,
    market: str | None = None,
    prog: str | None = None,
) -> int:
    """Run one CLI command for the market whose manager ``manager_factory`` builds.

    Args:
        manager_factory: builds the market's manager (``USTokenManager``, ``KRTokenManager``).
        argv: the arguments (default: ``sys.argv[1:]``).
        market: ``US`` or ``KR`` (default: from the factory's name).
        prog: the program name in usage and error lines (default: ``python -m us.token_manager``).

    Returns:
        The process exit code.
    """
    return flushed(lambda: _main(manager_factory, argv, market, prog))


def flushed(command: Callable[[], int]) -> int:
    """Run ``command`` and flush stdout; a reader that went away (``| head``, ``| true``) or a full
    disk (``> /dev/full``) ends the output silently, never with a traceback at exit.

    Returns:
        The command's exit code; 1 if its answer could not be delivered.
    """
    try:
        code = command()
        sys.stdout.flush()
        return code
    except OSError as exc:
        if exc.errno not in _OUTPUT_LOST:
            raise
        _silence_stdout()
        return EXIT_FAILED


def _stdout_works() -> bool:
    """False if stdout cannot take what was written to it (so an error came from writing it)."""
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        return False
    return True


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush has nothing left to fail on."""
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _main(
    manager_factory: Callable[[], object],
    argv: Sequence[str] | None,
    market: str | None,
    prog: str | None,
) -> int:
    market = market or manager_factory.__name__[:2].upper()
    args = _parser(market, prog).parse_args(argv)
    args.verbose += args.verbose_after
    args.quiet = args.quiet or args.quiet_after
    manager = None
    try:
        manager = manager_factory()
        configure_logging(args.verbose, args.quiet, getattr(manager, "settings", None))
        check_configuration(manager)
        if args.command in _MAY_REQUEST and progress.wanted(args.verbose, args.quiet):
            credential = "approval key" if args.command == "approval" else "token"
            with progress.watching(manager, market, credential):
                return args.run(manager, args)
        return args.run(manager, args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # expected failures and bugs alike: one line, details at -vv
        if isinstance(exc, OSError) and exc.errno in _OUTPUT_LOST and not _stdout_works():
            raise  # stdout is gone (closed pipe, full disk): :func:`flushed` ends it silently
        if not isinstance(exc, KISTokenError):
            _log.debug("internal error", exc_info=True)
        message, code = describe_error(exc, manager)
        return _fail(manager, args, message, code)


def _fail(manager: object | None, args: argparse.Namespace, message: str, code: int) -> int:
    """Print the error line (and for ``check --json`` the JSON object); return the exit code."""
    is_check = args.run is _check
    if is_check and getattr(args, "json", False):
        print(json.dumps(unknown_info(manager, args.market, message), ensure_ascii=False))
    _error(args, message)
    return CHECK_UNKNOWN if is_check else code


def _parser(market: str, prog: str | None = None) -> argparse.ArgumentParser:
    prog = prog or f"python -m {market.lower()}.token_manager"
    parser = argparse.ArgumentParser(
        prog=prog, description=f"Manage the KIS Open API token of the {market} market."
    )
    add_verbosity(parser)
    parser.set_defaults(market=market, prog=prog, verbose_after=0, quiet_after=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run: Callable[..., int], text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text, description=text)
        add_verbosity(sub, after=True)
        sub.set_defaults(run=run)
        return sub

    check = command("check", _check, "show the token's status (exit 0 OK, 1 renewal due, 2 missing/expired, "
                    "3 unknown)")
    check.add_argument("--json", action="store_true", help="print one JSON object")
    command("get", _get, "print a valid token, renewing first if needed")
    command("approval", _approval, "print the WebSocket approval key, issuing it first if needed")
    command("refresh", _refresh, "force a renewal now")
    command("delete", _delete, "remove the app key's token (for every market that uses the key, and on every "
            "host with a shared store) and this market's token files")
    warmup = command("warmup", _warmup, "renew only if the token would expire within a horizon")
    warmup.add_argument("--valid-for", type=duration, default=None, metavar="DURATION",
                        help="horizon such as 8h, 90m or 3600s; a bare number is seconds (default: the "
                             "market's session)")
    command("revoke", _revoke, "revoke the token at the broker and remove local files")
    metrics = command("metrics", _metrics, "print Prometheus metrics")
    metrics.add_argument("--textfile", metavar="PATH", help="write them atomically to PATH instead")
    return parser


def _error(args: argparse.Namespace, message: str) -> None:
    print(f"{args.prog}: error: {message}", file=sys.stderr)


def _check(manager, args: argparse.Namespace) -> int:
    info = manager.get_token_info()
    code = CHECK_EXIT[info["status"]]
    store = info["store"]
    if store["misconfigured"]:  # it answers, but refuses us: every host falls back on its own files
        code = CHECK_UNKNOWN
        _error(args, f"the token store {store['url']} refuses this configuration ({store['error']}): "
                     "fix the password, user or database in KIS_TOKEN_STORE")
    if args.json:
        print(json.dumps(info, ensure_ascii=False))
        return code
    if args.quiet and code == EXIT_OK:
        return code
    label = {"ok": "valid", "renewal_due": "valid, renewal due", "missing": "missing", "expired": "expired"}
    print(f"{args.market} token ({info['environment']}): {label[info['status']]}")
    if info["present"]:
        print(f"  issued:   {info['issued_at']}")
        print(f"  expires:  {info['expires_at']} ({_left(info['seconds_left'])})")
        print(f"  token:    {info['token']}")
    for line in _renewal_lines(info):
        print(f"  {line}")
    approval = info["approval"]
    if approval is not None:
        age = format_duration(approval["age_seconds"])
        print(f"  approval: {approval['key']} (WebSocket approval key, {age} old)")
    if info["problem"]:
        print(f"  problem:  {info['problem']}")
    if info["clock"]:
        print(f"  clock:    {info['clock']}")
    limit = info["daily_limit"] or "no limit"
    print(f"  issuances: {info['issued_24h']} in the last 24 h (daily limit {limit}: KIS_TOKEN_DAILY_LIMIT)")
    print(f"  calls:    {budget_summary(info['call_budget'])}")
    print(f"  key:      {info['key_fingerprint']} (record {info['files']['key_record']})")
    store = info["store"]
    reach = "answers" if store["reachable"] else f"unreachable: {store['error']}"
    print(f"  store:    {store['url']} ({reach})" if store["url"] else "  store:    this host's files")
    print(f"  record:   {info['files']['record']}")
    print(f"  issued:   {info['files']['issued_at']}")
    print(f"  mojito:   {info['files']['mojito']}")
    return code


def budget_summary(budget: dict) -> str:
    """One line on the key's call budget (``check`` and ``status``): its calls and ``EGW00201``
    answers in the last minute, the rate, and where it is kept."""
    if budget["error"] is not None:
        return f"limit {budget['rate']:g}/s (KIS_RATE_LIMIT); counters unreadable: {budget['error']}"
    if budget["backend"] == "redis":
        where = f"the store, {budget['hosts']} host{'' if budget['hosts'] == 1 else 's'}"
    elif budget["store_down"]:
        where = "this host's file: the store does not answer"
    else:
        where = "this host's file"
    return (f"{budget['calls_last_minute']} in the last minute, {budget['egw00201_last_minute']} EGW00201 "
            f"({budget['egw00201_total']} in all); limit {budget['rate']:g}/s, paced at "
            f"{budget['paced_rate']:g} (KIS_RATE_LIMIT); kept in {where}")


def _renewal_lines(info: dict) -> list[str]:
    """``check``'s lines on what stands in the way of the next renewal and on the last one; a
    renewal the token's deletion or revocation undid is not shown as the last."""
    lines = []
    failure, last, removed = info["last_failure"], info["last_renewal"], info["removed"]
    if failure is not None:
        when = f" at {failure['at']}" if failure["at"] else ""
        detail = failure["message"] or ""
        detail = f": {detail}" if detail and detail not in failure["summary"] else ""
        lines.append(f"last failure: {failure['summary']}{when}{detail}")
    if removed is not None:
        before = ""
        if last is not None and last["outcome"] in ("renewed", "same_token"):
            before = f" (before it: {last['outcome']} at {last['at']})"
        lines.append(f"last renewal: none since the token was {removed['how']} at {removed['at']}{before}")
    elif last is not None and (failure is None or failure["kind"] == "store"):
        last_code = f" {last['code']}" if last["code"] else ""
        detail = f": {last['message']}" if last["message"] else ""
        lines.append(f"last renewal: {last['outcome']}{last_code} at {last['at']}{detail}")
    return lines


def _say(args: argparse.Namespace, text: str) -> None:
    """Print a success line on stdout, unless ``-q``."""
    if not args.quiet:
        print(text)


def _left(seconds: float) -> str:
    text = format_duration(seconds)
    return text if text.startswith("expired") else f"in {text}"


def _get(manager, args: argparse.Namespace) -> int:
    print(manager.get_valid_token())
    return EXIT_OK


def _approval(manager, args: argparse.Namespace) -> int:
    print(manager.get_approval_key())
    return EXIT_OK


def _refresh(manager, args: argparse.Namespace) -> int:
    before = manager.load_token()
    try:
        record = manager.refresh_token()
    except KISTokenError as exc:
        message, code = describe_error(exc, manager)
        _error(args, f"{args.market} token renewal failed: {message}{_kept_note(manager, before)}")
        return code
    now = manager.now()
    same = before is not None and before.access_token == record.access_token
    if same or record.expires_at - record.issued_at < TOKEN_LIFETIME - RESENT_SLACK:
        from common.clock import to_kst_iso
        from common.credentials.records import mask_token

        what = "the same token" if same else "a token it had issued earlier (this one was deleted meanwhile)"
        _say(args, f"{args.market} token not renewed: the broker re-sent {what} "
                   f"{mask_token(record.access_token)} (it does so within 6 h of issuing one); still valid "
                   f"until {to_kst_iso(record.expires_at)} ({_left(record.seconds_left(now))})")
    else:
        _say(args, f"{args.market} token renewed: {_summary(record, now)}")
    return EXIT_OK


def _kept_note(manager, before) -> str:
    if before is None or manager.is_token_expired(before):
        return "; no valid token is held"
    left = format_duration(before.seconds_left(manager.now()))
    return f"; the current token is kept (valid for {left} more)"


def _summary(record, now: float) -> str:
    from common.clock import to_kst_iso
    from common.credentials.records import mask_token

    left = format_duration(record.seconds_left(now))
    return f"{mask_token(record.access_token)}, expires {to_kst_iso(record.expires_at)} (in {left})"


def _delete(manager, args: argparse.Namespace) -> int:
    removed = manager.delete_token()
    if removed:
        _say(args, f"{args.market} token files removed: {', '.join(removed)}")
    else:
        _say(args, f"no {args.market} token files to remove")
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
        _say(args, f"{args.market} token renewed for warm-up: {_summary(record, now)}")
    else:
        _say(
            args,
            f"{args.market} token already valid for {format_duration(record.seconds_left(now))} "
            f"(needed {format_duration(horizon)}); nothing to do"
        )
    return EXIT_OK


def _revoke(manager, args: argparse.Namespace) -> int:
    removed = manager.revoke()
    _say(args, f"{args.market} token revoked at the broker; local files removed ({len(removed)})")
    return EXIT_OK


def _metrics(manager, args: argparse.Namespace) -> int:
    from common.cli import metrics

    text = metrics.render(manager)
    if args.textfile:
        metrics.write_textfile(args.textfile, text)
    else:
        sys.stdout.write(text)
    return EXIT_OK
