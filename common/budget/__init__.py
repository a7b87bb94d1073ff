"""The per-key call budget: the broker's calls-a-second limit, kept for every
process of an app key on a host (through the token directory) and every host (through the store).

The broker answers ``EGW00201`` beyond 18 REST calls a second per app key on a real account, 1 on a
paper one (its notice of 2026-04-20; ``KIS_RATE_LIMIT`` overrides). :func:`open_budget` gives a key's
:class:`CallBudget`: ``acquire()`` / ``await acquire_async()`` before each request spaces the key's
calls so that no second, as the broker counts it, holds more than the rate
(:mod:`~common.budget.pacing` says why that means no burst and a small slack); ``note_refusal()``
counts an ``EGW00201``; ``snapshot()`` gives the rate, the calls of the last minute and the
``EGW00201`` seen. Pieces: ``pacing`` (the arithmetic, pure), ``protocol`` (what a backend offers),
``file_backend`` (one host), ``redis_backend`` (several hosts, with the file as fallback),
``limiter`` (the public class). It imports nothing of the managers, the auth adapters or the CLI.

**Why our own code, not pyrate-limiter or limits.** Both are well kept and both have a Redis backend,
but neither does the part that matters here:

* *No GCRA, and no window guarantee with a margin.* ``limits`` (5.x) has fixed window, moving window
  and sliding-window counter; ``pyrate-limiter`` (4.x) keeps a log of every call's timestamp (a
  "leaky bucket" checked against a sliding window). A fixed window lets 2R through across a
  boundary; the logs are exact but hold R timestamps per key and, like the counter, admit R calls at
  once after a quiet second. Neither lets us say "no broker second holds more than R even if a call
  arrives 30 ms late", which is the one property the broker enforces.
* *No cross-process file backend we could use.* ``limits`` has none (memory, Redis, Memcached,
  MongoDB); ``pyrate-limiter``'s is SQLite plus the ``filelock`` package: a database and a new
  dependency, where the token directory already has ``flock``-ed, no-follow, checked files
  (``common.store.fs``), and a 1.5 KB file read and rewritten under ``flock`` costs microseconds.
* *Waiting.* ``limits`` only answers "allowed or not" (the caller polls); ``pyrate-limiter`` waits by
  retrying. A GCRA reservation tells each caller exactly when its slot is, so waiters queue in order
  and sleep once, and a timeout is known at once (nothing is reserved then).
* *Time.* Our Redis script reads the server's ``TIME`` (hosts with skewed clocks agree) and hands
  back a duration; the file backend uses the host's monotonic clock. Both handle a state "from the
  future" (a reboot) safely.

The whole of it is one short Lua script, one pure function and a fixed-size file: less to review than
either library's adapter would be.
"""

from common.budget.limiter import DEFAULT_TIMEOUT, BudgetSnapshot, CallBudget, open_budget
from common.budget.pacing import DEFAULT_SLACK, Pacing

__all__ = ["DEFAULT_SLACK", "DEFAULT_TIMEOUT", "BudgetSnapshot", "CallBudget", "Pacing", "open_budget"]
