"""Another user in the token directory (issue 10 §4, SPEC §4).

Root hands its files to the directory's owner; any other user is refused before a request.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

from common.sandbox import Sandbox
from tests.conftest import US_KEY
from us.token_manager import USTokenManager

REPO = Path(__file__).resolve().parent.parent
NOBODY = 65534

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to play the admin and the bot")


@pytest.fixture
def sandbox():
    with Sandbox() as server:
        yield server


@pytest.fixture
def env(env):
    """The test's configuration with a token directory that another user can reach."""
    base = Path(tempfile.mkdtemp(prefix="kis-owner-"))
    base.chmod(0o755)
    yield {**env, "KIS_TOKEN_DIR": str(base / "tokens")}
    shutil.rmtree(base, ignore_errors=True)


@root_only
def test_root_refresh_in_the_bots_directory_leaves_files_the_bot_can_read(make_manager, env, sandbox):
    token_dir = Path(env["KIS_TOKEN_DIR"])
    token_dir.mkdir(mode=0o700)
    os.chown(token_dir, NOBODY, NOBODY)  # the bot's directory
    admin = make_manager(USTokenManager, {**env, "KIS_BASE_URL": sandbox.base_url}, clock=time.time)
    admin.refresh_token()
    files = sorted(token_dir.iterdir())
    assert len(files) == 6  # the key's record, lock and state, and the three story files
    for path in files:
        st = path.stat()
        assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY), path.name
        assert st.st_mode & 0o777 == 0o600, path.name


def _as_nobody(environ: dict[str, str]) -> tuple[int, str]:
    """Run ``python -m us.token_manager get`` as the user nobody, in a forked child of this process.

    (A forked child needs no access to the interpreter's files, which may sit under a private home.)
    Returns the exit code and what it wrote on stderr.
    """
    import io
    import json

    import common.credentials.kis_client  # noqa: F401  # everything the child needs, imported while we are root
    from common.cli.market import main
    from common.settings import Settings

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code, err = 70, io.StringIO()
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            sys.stderr = err
            code = main(lambda: USTokenManager(Settings(environ, dotenv_path=False)), ["get"], market="US")
        finally:
            os.write(write, json.dumps([code, err.getvalue()]).encode())
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        answer = pipe.read()
    os.waitpid(pid, 0)
    code, err = json.loads(answer)
    return code, err


@root_only
def test_another_user_is_refused_before_any_request(env, sandbox):
    environ = {**env, "KIS_BASE_URL": sandbox.base_url}
    token_dir = Path(env["KIS_TOKEN_DIR"])
    token_dir.mkdir(mode=0o700)
    os.chmod(token_dir, 0o777)  # root's directory, writable by all: an admin's mistake
    code, err = _as_nobody(environ)
    assert code == 3  # a configuration problem: the directory is someone else's
    assert "belongs to root" in err and "Traceback" not in err
    assert sandbox.counters()["token_requests"] == {}
    assert list(token_dir.iterdir()) == []


@root_only
def test_a_file_the_bot_cannot_read_is_an_error_naming_it_and_its_owner(make_manager, env, sandbox):
    environ = {**env, "KIS_BASE_URL": sandbox.base_url}
    token_dir = Path(env["KIS_TOKEN_DIR"])
    admin = make_manager(USTokenManager, environ, clock=time.time)
    admin.refresh_token()  # root's files in root's directory ...
    os.chown(token_dir, NOBODY, NOBODY)  # ... then the directory is given to the bot, not the files
    code, err = _as_nobody(environ)
    assert code == 1
    assert "permission denied" in err and "belongs to root" in err
    assert "key-" in err and "Traceback" not in err
    assert sandbox.counters()["token_requests"] == {US_KEY: 1}  # only the admin's
