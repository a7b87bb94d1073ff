"""Section 2, CLI start-up: wall time from spawn to exit of ``python -m us.token_manager check``.

Keys in the environment, ``KIS_TOKEN_DIR`` holding a seeded valid token, ``KIS_DOTENV_PATH=/dev/null``;
next to ``python -c pass``, ``python -c "import requests"`` and, for reference, ``python -S -c pass``
(no ``site``: what the site-packages ``.pth`` hooks cost every interpreter). One warm-up round
(bytecode compiled, page cache warm), then rounds that run them round-robin, starting each round
with the next command so that noise and position hit all equally; medians reported. Exit is
detected with a pidfd, so the times carry no polling delay. Then the modules that ``check`` has in
``sys.modules`` at exit and ``python -c pass`` has not (from the probe of section 5), split by
``sys.stdlib_module_names`` into standard library, third-party and project (``common``, ``us``,
``kr``), and from one ``-X importtime`` run of ``check`` what they cost and the largest of them.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
from collections.abc import Sequence

from _util import CHILD_TIMEOUT, REPO, Context, log, main, run_child, seed_us_token, table
from memory import CHECK_CODE, probe

PROJECT_PACKAGES = frozenset({"common", "us", "kr"})


def import_times(argv: Sequence[str], env: dict[str, str]) -> list[tuple[int, int, str]]:
    """One ``-X importtime`` run: (depth, cumulative µs, module) per module, in import order."""
    process = subprocess.run([sys.executable, "-X", "importtime", *argv], env=env, cwd=REPO,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, timeout=CHILD_TIMEOUT, check=False)
    entries = []
    for line in process.stderr.splitlines():
        if not line.startswith("import time:"):
            continue
        parts = line[len("import time:"):].split("|")
        if len(parts) != 3 or not parts[1].strip().isdigit():
            continue
        name = parts[2].rstrip()
        depth = (len(name) - len(name.lstrip())) // 2
        entries.append((depth, int(parts[1]), name.strip()))
    return entries


def classify(module: str) -> str:
    """``stdlib``, ``project`` or ``third-party``."""
    top = module.split(".")[0]
    if top in PROJECT_PACKAGES:
        return "project"
    if top in sys.stdlib_module_names or top in sys.builtin_module_names or top == "__main__":
        return "stdlib"
    return "third-party"


def startup_imports(ctx: Context, env: dict[str, str]) -> list[str]:
    """What ``check`` imports beyond ``python -c pass``, and the largest of it."""
    _, extra = probe(CHECK_CODE, env, ctx.tmp / "startup-check")
    extra -= probe("pass\n", env, ctx.tmp / "startup-pass")[1]
    check = import_times(["-m", "us.token_manager", "check"], env)
    groups: dict[str, list[str]] = {"third-party": [], "project": [], "stdlib": []}
    for name in sorted(extra):
        groups[classify(name)].append(name)
    # -X importtime lists a module after everything it imported: its importer is the next entry
    # with a smaller depth. Keep the non-project modules that project code (or runpy) imports.
    direct: list[tuple[int, str]] = []
    for index, (depth, cumulative, name) in enumerate(check):
        if name not in extra or classify(name) == "project":
            continue
        importer = next((n for d, _, n in check[index + 1:] if d < depth), None)
        if importer is None or classify(importer) == "project":
            direct.append((cumulative, name))
    direct.sort(reverse=True)
    total = sum(c for d, c, _ in check if d == 0) / 1000
    extra_total = sum(c for d, c, n in check if d == 0 and n in extra) / 1000

    def listing(names: list[str]) -> str:
        return ", ".join(f"`{n}`" for n in names) if names else "none"

    return [
        "Modules in `sys.modules` at the exit of `check` and not at the exit of `python -c pass` "
        "(split with `sys.stdlib_module_names`), and their cost in one `-X importtime` run:",
        "",
        f"- third-party: {listing(groups['third-party'])}",
        f"- project: {listing(groups['project'])}",
        f"- standard library ({len(groups['stdlib'])}): {listing(groups['stdlib'])}",
        f"- import time under `-X importtime`: {total:.1f} ms in all, {extra_total:.1f} ms of it for "
        "the modules above; the largest that project code imports (cumulative): "
        + ", ".join(f"`{name}` {cumulative / 1000:.1f} ms" for cumulative, name in direct[:6]),
        "",
    ]


def run(ctx: Context) -> list[str]:
    """Start-up wall times, interleaved rounds after a warm-up round, and the imports of ``check``."""
    env = ctx.env(ctx.tmp / "startup")
    seed_us_token(env)
    exe = sys.executable
    commands = [
        ("`python -c pass`", [exe, "-c", "pass"]),
        ('`python -c "import requests"`', [exe, "-c", "import requests"]),
        ("`python -m us.token_manager check`", [exe, "-m", "us.token_manager", "check"]),
        ("reference: `python -S -c pass` (no `site`, so no site-packages `.pth` hooks)",
         [exe, "-S", "-c", "pass"]),
    ]
    rounds = ctx.profile.startup_rounds
    log(f"CLI start-up: {rounds} interleaved rounds of {len(commands)} commands")
    walls: dict[str, list[float]] = {name: [] for name, _ in commands}
    for round_number in range(rounds + 1):  # round 0 warms up (bytecode, page cache); check must say OK
        shift = round_number % len(commands)
        for name, argv in commands[shift:] + commands[:shift]:
            code, wall = run_child(argv, env)
            if code != 0:
                raise RuntimeError(f"{name} exited with {code}")
            if round_number:
                walls[name].append(wall)
    base = statistics.median(walls[commands[0][0]])
    rows = []
    for name, _ in commands:
        mid = statistics.median(walls[name])
        rows.append((name, f"{mid * 1000:.1f}", f"{min(walls[name]) * 1000:.1f}",
                     f"{(mid - base) * 1000:+.1f} ms ({mid / base:.2f}×)"))
    log("CLI start-up: -X importtime")
    return [
        f"### 2. CLI start-up (wall time, spawn to exit; median of {rounds} interleaved runs after a "
        "warm-up run)",
        "",
        *table(["command", "median ms", "min ms", "over `python -c pass`"], rows, "lrrr"),
        *startup_imports(ctx, env),
    ]


if __name__ == "__main__":
    sys.exit(main([run]))
