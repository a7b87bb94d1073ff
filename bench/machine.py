"""Section 0, the machine: CPU count and model (``/proc/cpuinfo``), memory, Python, platform, and the
file system of the temporary directory (``fsync`` cost depends on it)."""

from __future__ import annotations

import os
import platform
import sys
from datetime import datetime
from pathlib import Path

from _util import Context, main, mib, read_text


def filesystem_of(path: Path) -> str:
    """The file system type of the mount holding ``path`` (from /proc/mounts), or '?'."""
    best, kind = "", "?"
    target = str(path.resolve())
    for line in read_text(Path("/proc/mounts")).splitlines():
        parts = line.split()
        if len(parts) >= 3:
            mount = parts[1]
            inside = target == mount or target.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) >= len(best):
                best, kind = mount, parts[2]
    return kind


def run(ctx: Context) -> list[str]:
    """Report lines describing the machine."""
    cpuinfo = read_text(Path("/proc/cpuinfo"))
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                  if line.startswith("model name")), platform.processor() or "?")
    cores = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    memory = next((line.split()[1] for line in read_text(Path("/proc/meminfo")).splitlines()
                   if line.startswith("MemTotal:")), None)
    return [
        "## Machine",
        "",
        f"- CPU: {model}, {cores} logical cores ({usable} usable by this process)",
        f"- memory: {mib(int(memory)) + ' MiB' if memory else '?'}",
        f"- Python {platform.python_version()} ({platform.python_implementation()}), {sys.executable}",
        f"- platform: {platform.platform()}",
        f"- temporary directory: {ctx.tmp.parent} ({filesystem_of(ctx.tmp)})",
        f"- run: {datetime.now().astimezone().isoformat(timespec='seconds')}",
        "",
    ]


if __name__ == "__main__":
    sys.exit(main([run]))
