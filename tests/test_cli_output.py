"""stdout that goes away (issue 17 §4): a closed pipe or a full disk ends the output silently, exit 1,
for every command that prints an answer; never ``Exception ignored ... BrokenPipeError``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.sandbox import Sandbox
from tests.conftest import US_KEY, US_SECRET

REPO = Path(__file__).resolve().parent.parent
COMMANDS = [["us", "get"], ["us", "check"], ["us", "check", "--json"], ["status"], ["status", "--json"],
            ["us", "metrics"], ["us", "approval"], ["kr", "get"]]


@pytest.fixture(scope="module")
def environ(tmp_path_factory):
    with Sandbox() as sandbox:
        yield {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO), "KIS_DOTENV_PATH": os.devnull,
               "KIS_BASE_URL": sandbox.base_url, "KIS_TOKEN_DIR": str(tmp_path_factory.mktemp("out") / "t"),
               "KIS_US_APP_KEY": US_KEY, "KIS_US_APP_SECRET": US_SECRET,
               "KIS_KR_APP_KEY": US_KEY, "KIS_KR_APP_SECRET": US_SECRET}


def kis_token(args: list[str], environ: dict[str, str], stdout) -> subprocess.CompletedProcess:
    code = "from kis_token.console import main; raise SystemExit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], env=environ, cwd=REPO, stdout=stdout,
                          stderr=subprocess.PIPE, text=True, timeout=60)


@pytest.mark.parametrize("args", COMMANDS, ids=" ".join)
def test_a_closed_pipe_and_a_full_disk_are_silent(args, environ):
    assert kis_token(args, environ, subprocess.DEVNULL).returncode == 0  # the answer, delivered
    read, write = os.pipe()
    os.close(read)  # the reader went away before the answer came (``| true``)
    try:
        closed = kis_token(args, environ, write)
    finally:
        os.close(write)
    with open("/dev/full", "w") as full:
        lost = kis_token(args, environ, full)
    for result in (closed, lost):
        assert result.returncode == 1
        assert result.stderr == "", result.stderr
