"""Every Python block of the README runs as written (issue 17 §3), against the sandbox, with the
variables of the README's Configure table set as a user would set them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from common.sandbox import Sandbox
from tests.conftest import US_KEY, US_SECRET

REPO = Path(__file__).resolve().parent.parent
BLOCKS = re.findall(r"^```python\n(.*?)^```", (REPO / "README.md").read_text(), re.M | re.S)


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 4


@pytest.fixture(scope="module")
def environ(tmp_path_factory):
    home = tmp_path_factory.mktemp("readme")
    with Sandbox() as sandbox:
        yield {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO), "HOME": str(home),
               "KIS_DOTENV_PATH": os.devnull, "KIS_BASE_URL": sandbox.base_url,
               "KIS_TOKEN_DIR": str(home / "tokens"),
               "KIS_US_APP_KEY": US_KEY, "KIS_US_APP_SECRET": US_SECRET,
               "KIS_KR_APP_KEY": US_KEY, "KIS_KR_APP_SECRET": US_SECRET}


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i + 1}" for i in range(len(BLOCKS))])
def test_a_readme_python_block_runs_as_written(block, environ, tmp_path):
    result = subprocess.run([sys.executable, "-c", block], env=environ, cwd=tmp_path, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
