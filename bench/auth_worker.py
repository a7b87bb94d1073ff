"""A process that calls the broker through ``KISAuth`` as fast as it can, for ``bench/budgets.py`` and
the budget's sandbox tests (tests/test_budget_sandbox.py): ``python bench/auth_worker.py START
DURATION [MARKET]``. (It lives here, not in ``common.sandbox``, because it builds a market's manager,
which nothing under ``common`` may import.)

Configured by the environment as any trading process is (``KIS_US_APP_KEY`` ..., ``KIS_BASE_URL``
pointing at the sandbox, ``KIS_TOKEN_DIR``, ``KIS_TOKEN_STORE``, ``KIS_ENV``, ``KIS_RATE_LIMIT``).
It gets the token first, waits until the wall-clock time START (so that every worker begins
together), then sends quote requests through a ``requests.Session`` with ``KISAuth`` until START +
DURATION, and prints one JSON object: ``{"sent": answers received, "in_window": those received by
START + DURATION, "codes": {code: count}}``, ``code`` being each answer's ``msg_cd`` (``"0"`` for a
success). (A request begun just before the end waits for its slot, which may come after it: the
rate is ``in_window`` over DURATION.) Exit code 0, or 1 with the error on stderr.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

QUOTE = "/uapi/overseas-price/v1/quotations/price"


def spend(start: float, duration: float, market: str = "us") -> dict[str, object]:
    """Call until ``start + duration`` (wall clock); what the answers were (see the module docstring)."""
    import requests

    from common.auth import KISAuth

    if market == "us":
        from us.token_manager import USTokenManager as factory
    else:
        from kr.token_manager import KRTokenManager as factory
    manager = factory()
    manager.get_valid_token()
    manager.call_budget()
    session = requests.Session()
    session.trust_env = False
    session.auth = KISAuth(manager)
    url = manager.get_api_url() + QUOTE
    codes: Counter[str] = Counter()
    in_window = 0
    time.sleep(max(0.0, start - time.time()))
    end = time.monotonic() + duration
    while time.monotonic() < end:
        answer = session.get(url, params={"EXCD": "NAS", "SYMB": "AAPL"}, timeout=30).json()
        codes["0" if answer.get("rt_cd") == "0" else str(answer.get("msg_cd"))] += 1
        in_window += time.monotonic() <= end
    return {"sent": sum(codes.values()), "in_window": in_window, "codes": dict(codes)}


def main(argv: list[str]) -> int:
    """Run :func:`spend` with the command line's arguments and print its result."""
    start, duration, *market = argv
    print(json.dumps(spend(float(start), float(duration), *market)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
