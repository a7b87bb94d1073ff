"""Section 5, memory: peak RSS of ``python -c pass``, ``python -c "import requests"``, ``python -m
us.token_manager check`` and of a process that builds a manager and calls ``get_valid_token()``
100,000 times on a fresh token.

Each runs under a small probe (``python -c``: an ``atexit`` hook, then the command's code, or
``runpy.run_module`` with the command's arguments) that writes ``VmHWM`` from ``/proc/self/status``
and the names in ``sys.modules`` at exit. Not ``ru_maxrss`` (``getrusage(RUSAGE_CHILDREN)``/``wait4``):
Linux carries the high-water mark of the address space that a child had *before* ``exec`` (the
bench's own, via fork or vfork) into it, so every child would report at least the bench's size. The
module lists of section 2 come from the same probe, because ``-X importtime`` also lists imports
that failed (an attempt at ``_sha2`` here).
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

from _util import SEEDED_TOKEN, Context, log, main, mib, read_text, run_child, seed_us_token, table

HOLD_CALLS = 100_000
HOLD_SCRIPT = f"""
import sys
from us.token_manager import USTokenManager
get = USTokenManager().get_valid_token
for _ in range({HOLD_CALLS}):
    token = get()
sys.stdout.write(token)
"""
PROBE = """import atexit, sys
def _bench_probe():
    names = list(sys.modules)
    hwm = ""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            hwm = next((line.split()[1] for line in status if line.startswith("VmHWM:")), "")
    except OSError:
        pass
    with open({path!r}, "w", encoding="ascii") as out:
        out.write(hwm + "\\n" + "\\n".join(names))
atexit.register(_bench_probe)
"""


def probe(code: str, env: dict[str, str], out: Path,
          stdout: Path | None = None) -> tuple[int | None, set[str]]:
    """Run ``python -c PROBE+code``; fail unless it exits 0 (and printed the seeded token, if asked).

    Returns:
        ``VmHWM`` in KiB (None without /proc) and the names in ``sys.modules``, at the child's exit.
    """
    with open(stdout if stdout is not None else os.devnull, "wb") as handle:
        returncode, _ = run_child([sys.executable, "-c", PROBE.format(path=str(out)) + code], env,
                                  stdout=handle)
    if returncode != 0:
        raise RuntimeError(f"a probed child exited with {returncode}: {code!r}")
    if stdout is not None and read_text(stdout) != SEEDED_TOKEN:
        raise RuntimeError("the manager process did not print the seeded token")
    first, _, rest = read_text(out).partition("\n")
    return int(first) if first.isdigit() else None, set(rest.split("\n"))


def run_module_code(module: str, *args: str) -> str:
    """Code that runs ``python -m module args`` the way ``-m`` does."""
    return (f"import runpy\nsys.argv = [{module!r}, *{list(args)!r}]\n"
            f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n")


CHECK_CODE = run_module_code("us.token_manager", "check")
SUBJECTS = [
    ("`python -c pass`", "pass\n"),
    ('`python -c "import requests"`', "import requests\n"),
    ("`python -m us.token_manager check`", CHECK_CODE),
    (f"a process holding a `USTokenManager` after {HOLD_CALLS:,} `get_valid_token()` calls", HOLD_SCRIPT),
]


def run(ctx: Context) -> list[str]:
    """Peak RSS of each subject: the median of ``memory_runs`` runs after one that is not counted."""
    env = ctx.env(ctx.tmp / "memory")
    seed_us_token(env)
    runs = ctx.profile.memory_runs + 1
    log(f"memory: {len(SUBJECTS)} probed commands, {runs} run(s) each (the first not counted)")
    peaks: dict[str, list[int]] = {name: [] for name, _ in SUBJECTS}
    for index in range(runs):
        for number, (name, code) in enumerate(SUBJECTS):
            out = ctx.tmp / f"memory-{index}-{number}"
            held = out.with_suffix(".out") if code is HOLD_SCRIPT else None
            hwm, _ = probe(code, env, out, held)
            if index and hwm is not None:
                peaks[name].append(hwm)
    base = statistics.median(peaks[SUBJECTS[0][0]]) if peaks[SUBJECTS[0][0]] else None
    rows = []
    for name, values in peaks.items():
        if not values or base is None:
            rows.append((name, 0, "n/a (no /proc)", "n/a"))
        else:
            mid = statistics.median(values)
            rows.append((name, len(values), mib(mid), f"{(mid - base) / 1024:+.1f}"))
    return [
        "### 5. Memory: peak RSS (`VmHWM` read at exit; median of the runs)",
        "",
        *table(["process", "runs", "peak RSS MiB", "over `python -c pass` MiB"], rows, "lrrr"),
    ]


if __name__ == "__main__":
    sys.exit(main([run]))
