"""One :class:`~common.budget.limiter.CallBudget` per app key per process.

Both markets of one key (and every manager a process builds for it) pace through the same object,
so a :class:`~common.budget.redis_backend.SharedBudget`'s fallback state (and its one warning per
outage) is the process's, not each manager's. The state itself is shared by every process anyway
(the file, the server): this only saves objects and warnings.
"""

from __future__ import annotations

import threading
from pathlib import Path

from common.budget.limiter import CallBudget, open_budget
from common.settings import Settings, token_store_url

_budgets: dict[tuple[str, str, float, str | None], CallBudget] = {}
_lock = threading.Lock()


def budget_for(settings: Settings, directory: Path, key_id: str) -> CallBudget:
    """The process's call budget of ``key_id`` (built by :func:`open_budget` on first use).

    Two configurations that differ in the token directory, the rate or the store get two budgets.

    Raises:
        ConfigError: ``KIS_RATE_LIMIT`` or ``KIS_TOKEN_STORE`` cannot be used.
    """
    key = (str(directory), key_id, settings.rate_limit, token_store_url(settings))
    budget = _budgets.get(key)
    if budget is None:
        with _lock:
            budget = _budgets.get(key)
            if budget is None:
                budget = _budgets[key] = open_budget(settings, Path(directory), key_id)
    return budget
