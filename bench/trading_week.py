"""A simulated trading week on an injected clock: how many tokens each app key costs.

``python bench/trading_week.py`` plays Monday 00:00 to Sunday 24:00 KST (no US daylight saving
time: a December week) against an in-process stand-in of the broker that follows its rules (24-h
tokens, the same token re-sent within 6 h of an issuance, one issuance a minute per key, EGW00133
otherwise), with the real managers and the real token directory:

* weekdays 07:50 a cron ``kr warmup`` (its default horizon) and 22:00 a cron ``us warmup``;
* a trading bot per market asking ``get_valid_token()`` every minute of its session
  (KR 09:00-15:30, US 23:30-06:00 KST), one long-lived manager per session;
* hourly ``check`` probes of both markets, all week.

It runs once with one app key in both markets and once with two keys, prints the issuances and
requests per key, and exits 1 if any key costs more than 5 issuances or any token handed out had
5 minutes or less to live. Every new "process" is a new manager; nothing sleeps.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.clock import KST
from common.settings import Settings
from kr.token_manager import KRTokenManager
from us.token_manager import USTokenManager

MONDAY = datetime(2026, 11, 30, 0, 0, tzinfo=KST).timestamp()
MINUTE, HOUR, DAY = 60.0, 3600.0, 86400.0
MAX_ISSUANCES = 5
MARGIN = 5 * MINUTE


class Clock:
    """The week's clock: moves only when told to."""

    def __init__(self) -> None:
        self.now = MONDAY

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class _Answer:
    """Just enough of a streamed ``requests`` response for ``common.credentials.kis_client``."""

    def __init__(self, status: int, payload: dict[str, Any]) -> None:
        self.status_code = status
        self.headers: dict[str, str] = {}
        self.encoding = "utf-8"
        self._body = json.dumps(payload).encode()
        self.raw = self

    def read1(self, size: int = -1, decode_content: bool = True) -> bytes:
        chunk, self._body = self._body[:size], self._body[size:]
        return chunk

    def __enter__(self) -> _Answer:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class Broker:
    """The broker's token rules on the simulated clock; counts requests and issuances per key."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.requests: Counter[str] = Counter()
        self.issuances: Counter[str] = Counter()
        self._tokens: dict[str, tuple[str, float]] = {}  # key -> (token, issued at)
        self._last: dict[str, float] = {}

    def post(self, url: str, json: dict[str, str], **kwargs: Any) -> _Answer:
        key, now = json["appkey"], self.clock()
        self.requests[key] += 1
        if now - self._last.get(key, -DAY) < MINUTE:
            return _Answer(403, {"error_code": "EGW00133", "error_description": "1분당 1회"})
        self._last[key] = now
        token, issued = self._tokens.get(key, ("", -DAY))
        if now - issued >= 6 * HOUR:
            self.issuances[key] += 1
            token, issued = f"tok-{key[-4:]}-{self.issuances[key]:03d}" + "x" * 16, now
            self._tokens[key] = (token, issued)
        expiry = datetime.fromtimestamp(issued + DAY, KST).strftime("%Y-%m-%d %H:%M:%S")
        return _Answer(200, {"access_token": token, "access_token_token_expired": expiry,
                             "token_type": "Bearer", "expires_in": 86400})


def play(keys: dict[str, str]) -> tuple[Counter[str], Counter[str], list[str]]:
    """Play the week with ``keys`` (market -> app key); return issuances, requests and problems."""
    clock, problems = Clock(), []
    broker = Broker(clock)
    with tempfile.TemporaryDirectory(prefix="kis-week-") as tmp:
        environ = {
            "KIS_US_APP_KEY": keys["us"], "KIS_US_APP_SECRET": "secret-" + keys["us"],
            "KIS_KR_APP_KEY": keys["kr"], "KIS_KR_APP_SECRET": "secret-" + keys["kr"],
            "KIS_TOKEN_DIR": tmp, "HOME": tmp,
        }
        classes = {"us": USTokenManager, "kr": KRTokenManager}

        def process(market: str) -> Any:
            return classes[market](Settings(environ, dotenv_path=False), clock=clock, sleep=clock.sleep,
                                   session=broker)

        def served(market: str, token: str, manager: Any) -> None:
            record = manager.load_token()
            if record is None or record.access_token != token or record.seconds_left(clock()) <= MARGIN:
                problems.append(f"{datetime.fromtimestamp(clock(), KST):%a %H:%M} {market}: a dying token")

        bots: dict[str, Any] = {}
        for minute in range(7 * 24 * 60):
            clock.now = MONDAY + minute * MINUTE
            moment = datetime.fromtimestamp(clock.now, KST)
            weekday, hhmm = moment.weekday(), moment.hour * 100 + moment.minute
            if weekday < 5 and hhmm == 750:
                process("kr").warm_up(KRTokenManager.market_config.WARMUP_VALID_FOR)
            if weekday < 5 and hhmm == 2200:
                process("us").warm_up(USTokenManager.market_config.WARMUP_VALID_FOR)
            sessions = {"kr": weekday < 5 and 900 <= hhmm < 1530,
                        "us": (weekday < 5 and hhmm >= 2330) or (0 < weekday < 6 and hhmm < 600)}
            for market, open_now in sessions.items():
                if not open_now:
                    bots.pop(market, None)
                    continue
                bot = bots.setdefault(market, process(market))
                served(market, bot.get_valid_token(), bot)
            if moment.minute == 0:
                for market in classes:
                    process(market).get_token_info()
    return broker.issuances, broker.requests, problems


SETUPS = {
    "one key in both markets": {"us": "PSone" + "a" * 31, "kr": "PSone" + "a" * 31},
    "two keys": {"us": "PSusk" + "b" * 31, "kr": "PSkrk" + "c" * 31},
}


def rows() -> tuple[list[tuple[str, str, int, int, int]], bool]:
    """(setup, key, issuances, requests, dying tokens served) per key, and whether all kept the budget."""
    result, ok = [], True
    for name, keys in SETUPS.items():
        issuances, requests, problems = play(keys)
        for market, key in sorted(keys.items()):
            if keys["us"] == keys["kr"] and market == "us":
                continue
            label = "shared" if keys["us"] == keys["kr"] else market
            result.append((name, label, issuances[key], requests[key], len(problems)))
            ok &= issuances[key] <= MAX_ISSUANCES and not problems
    return result, ok


def run(ctx: Any) -> list[str]:
    """Section 7 of ``bench/run.py``: the week's table in Markdown."""
    table, ok = rows()
    lines = ["### 7. A simulated trading week (`python bench/trading_week.py`)", "",
             "| setup | key | issuances | requests | tokens served with 5 min or less left |",
             "|---|---|---:|---:|---:|"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in table]
    lines += ["", f"Budget: at most {MAX_ISSUANCES} issuances per key per week"
              f"{'' if ok else ' -- MISSED'}; weekday warm-ups at 07:50 (KR) and 22:00 (US), bots every "
              "minute of both sessions, hourly `check` probes.", ""]
    return lines


#: The printed table's columns (numbers are right-aligned under their heading).
HEADER = ("setup", "key", "issuances", "requests", "dying tokens served")


def format_table(header: Sequence[str], table: Sequence[Sequence[object]]) -> list[str]:
    """``header`` and ``table`` as aligned text lines: each column as wide as its widest cell, text
    left-aligned, numbers right-aligned (their heading too), two spaces between columns."""
    cells = [[str(cell) for cell in row] for row in table]
    numeric = [all(isinstance(row[i], int) for row in table) for i in range(len(header))]
    widths = [max(len(text) for text in [name, *(row[i] for row in cells)]) for i, name in enumerate(header)]

    def line(row: Sequence[str]) -> str:
        parts = [text.rjust(width) if right else text.ljust(width)
                 for text, width, right in zip(row, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    return [line(header), *(line(row) for row in cells)]


def main() -> int:
    """Play both setups and print one table; 0 if every key stays within the budget."""
    table, ok = rows()
    for line in format_table(HEADER, table):
        print(line)
    print(f"budget: at most {MAX_ISSUANCES} issuances per key per week; no token served with "
          f"{MARGIN / 60:.0f} min or less left")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
