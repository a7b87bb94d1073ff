"""Benchmarks of the package's budgets (a fresh ``get_valid_token()`` in microseconds, ``check``
close to the interpreter's start, one token request per key from 16 cold processes, a renewal
seen by every host within a second): ``python bench/run.py [--quick]``.

Standard library plus the package. It starts the local broker stand-in (``python -m
common.sandbox``) as a subprocess on 127.0.0.1, works in a temporary directory, bounds every wait,
and removes the directory and stops every process it started when it ends (also on Ctrl-C, SIGTERM
or an error). Progress goes to stderr; stdout carries only a Markdown report for the README's
Performance section. Nothing here asserts on timings: a budget that is missed shows in the numbers.

One module per section, in report order (each also runs alone: ``python bench/hot_path.py``; its
docstring says what it measures): ``machine`` (0), ``hot_path`` (1), ``check_startup`` (2),
``single_flight`` (3), ``crash_safety`` (4), ``memory`` (5), ``trading_code`` (6), ``trading_week``
(7), ``faults`` (8), ``budgets`` (9, the per-key call budget through ``KISAuth`` against the sandbox),
``session_lease`` (10, the WebSocket session lease: hand-over after a SIGKILL, cost of a free lease);
shared helpers are in ``_util``.

``--quick`` runs fewer repetitions (5 start-up rounds, N up to 16 with one key in both markets at 16
only, 30 kills, one memory run, 2 processes per fault and not the faults that take seconds by
design) for a shorter check of the script itself; ``--broker-delay SECONDS``
changes the single-flight delay.
"""

from __future__ import annotations

import sys

import budgets
import check_startup
import crash_safety
import faults
import hot_path
import machine
import memory
import session_lease
import single_flight
import trading_code
import trading_week
from _util import main

SECTIONS = (machine.run, hot_path.run, check_startup.run, single_flight.run, crash_safety.run, memory.run,
            trading_code.run, trading_week.run, faults.run, budgets.run, session_lease.run)

if __name__ == "__main__":
    sys.exit(main(SECTIONS, description=__doc__.splitlines()[0]))
