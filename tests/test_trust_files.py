"""What the token directory trusts (SPEC §4, §12): nothing it finds at a name.

Every file is opened without following a link and without blocking, used only if it is a regular
file of sane size, and handed to another user only on its open descriptor; the lock is our own
``flock`` on a file that is never truncated; the temp sweep removes only the package's temp files;
a record that cannot be written is said before any request; parents are made 0700.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from common.credentials.records import CorruptRecordError, TokenRecord
from common.errors import KISTokenError, LockTimeoutError, StoreError
from common.sandbox import Sandbox
from common.settings import Settings
from common.store import file_store, files
from common.store.file_store import FileRenewalLock
from tests.conftest import DAY, REPO, US_KEY, fake_token
from us.token_manager import USTokenManager

NOBODY = 65534
TWO_GB = 2 * 1024**3
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to play the admin and the bot")


def record_for(manager: USTokenManager, token: str, now: float | None = None) -> TokenRecord:
    now = time.time() if now is None else now
    return TokenRecord(token, "Bearer", now, now + DAY, "us", manager.environment, manager.key_fingerprint())


def plant(path: Path, kind: str, elsewhere: Path) -> None:
    """Put ``kind`` at ``path`` (replacing what is there): a FIFO, a link (to a FIFO elsewhere, so
    that following it would hang), a directory or a sparse 2 GB file."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    if kind == "fifo":
        os.mkfifo(path, 0o600)
    elif kind == "symlink":
        target = elsewhere / "fifo-elsewhere"
        if not target.exists():
            os.mkfifo(target, 0o600)
        path.symlink_to(target)
    elif kind == "directory":
        path.mkdir()
    else:
        with open(path, "wb") as handle:
            handle.truncate(TWO_GB)


# -- reading: never a hang, never a link, never a huge file ---------------------------------------------


@pytest.mark.parametrize("kind, reason", [
    ("fifo", "is a FIFO, not a regular file"),
    ("symlink", "is a symbolic link, not a regular file"),
    ("directory", "is a directory, not a regular file"),
    ("sparse", f"is {TWO_GB} bytes (over 64 KiB)"),
])
def test_reading_anything_but_a_small_regular_file_is_a_one_line_miss_at_once(tmp_path, kind, reason):
    path = tmp_path / "key-real-0123456789abcdef.json"
    plant(path, kind, tmp_path)
    started = time.monotonic()
    with pytest.raises(CorruptRecordError) as caught:
        files.read_text(path)
    assert time.monotonic() - started < 1
    assert str(caught.value) == f"{path} {reason}"
    assert "\n" not in str(caught.value)


def test_a_file_that_is_exactly_the_limit_is_read_and_one_byte_more_is_not(tmp_path):
    path = tmp_path / "us_krs_token.dat"
    path.write_bytes(b"x" * files.MAX_FILE_SIZE)
    assert len(files.read_text(path)) == files.MAX_FILE_SIZE
    path.write_bytes(b"x" * (files.MAX_FILE_SIZE + 1))
    with pytest.raises(CorruptRecordError, match="over 64 KiB"):
        files.read_text(path)


@pytest.mark.parametrize("kind", ["fifo", "symlink", "directory"])
def test_a_lock_file_that_is_not_a_regular_file_is_a_clear_error_naming_it(tmp_path, kind):
    path = tmp_path / "tokens" / "key-real-0123456789abcdef.lock"
    path.parent.mkdir(mode=0o700)
    plant(path, kind, tmp_path)
    lock = FileRenewalLock(path)
    started = time.monotonic()
    with pytest.raises(StoreError) as caught, lock.hold(5):
        pass
    assert time.monotonic() - started < 1
    message = str(caught.value)
    assert message.startswith(f"cannot lock {path}: it is a ") and "remove it" in message
    assert "\n" not in message


# -- the lock: our own flock, never truncating, the same semantics as before --------------------------


def test_the_lock_file_is_created_0600_and_never_truncated(tmp_path):
    path = tmp_path / "tokens" / "key.lock"
    lock = FileRenewalLock(path)
    with lock.hold(1):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_text("left by someone")
    with lock.hold(1):
        pass
    assert path.read_text() == "left by someone"
    assert path.exists()  # never deleted


def test_the_lock_is_reentrant_within_a_thread_and_excludes_other_threads(tmp_path):
    lock = FileRenewalLock(tmp_path / "key.lock")
    results: list[str] = []

    def other(timeout: float) -> None:
        try:
            with lock.hold(timeout):
                results.append("had")
        except LockTimeoutError as exc:
            results.append(str(exc))

    with lock.hold(0), lock.hold(0):  # re-entrant
        thread = threading.Thread(target=other, args=(0,))
        thread.start()
        thread.join(5)
        assert results == ["another process held key.lock for more than 0 s"]
        waiter = threading.Thread(target=other, args=(5,))
        waiter.start()
        time.sleep(0.05)  # the waiter polls meanwhile
        assert results[1:] == []
    waiter.join(5)
    assert results[1:] == ["had"]


def test_another_lock_object_on_the_same_file_waits_then_times_out(tmp_path):
    first, second = FileRenewalLock(tmp_path / "key.lock"), FileRenewalLock(tmp_path / "key.lock")
    with first.hold(0):
        started = time.monotonic()
        with pytest.raises(LockTimeoutError), second.hold(0.1):
            pass
        assert 0.09 <= time.monotonic() - started < 1
    with second.hold(0):
        pass


def test_another_process_holding_the_lock_makes_us_wait(tmp_path):
    path = tmp_path / "key.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"fd = os.open({str(path)!r}, os.O_RDWR | os.O_CREAT, 0o600)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\nsys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockTimeoutError), FileRenewalLock(path).hold(0):
            pass
    finally:
        holder.stdin.close()
        holder.wait(10)
    with FileRenewalLock(path).hold(1):
        pass


def test_confirm_says_when_the_lock_file_was_replaced_under_its_holder(tmp_path):
    path = tmp_path / "key.lock"
    lock = FileRenewalLock(path)
    with pytest.raises(LockTimeoutError, match="not held"):
        lock.confirm()
    with lock.hold(0):
        lock.confirm()  # flock cannot lapse
        path.unlink()
        path.write_text("")
        with pytest.raises(LockTimeoutError, match="removed or replaced"):
            lock.confirm()


# -- the temp sweep: only our own temp files ---------------------------------------------------------


def test_the_temp_sweep_removes_only_the_packages_own_temp_files(us, clock, tmp_path):
    directory = us.settings.token_dir
    directory.mkdir(mode=0o700, parents=True)
    key_id = us.credential.key_id
    ours = [f".key-{key_id}.json.abc123.tmp", f".key-{key_id}.approval.state.x_y_z9.tmp",
            ".us_api_token.json.k3j4h5g6.tmp", ".kr_krs_token.dat.aaaaaaaa.tmp",
            ".us_token_issued_at.dat.q1w2e3r4.tmp"]
    theirs = [".draft.tmp", ".notes.txt.abc123.tmp", "draft.tmp", f".key-{key_id}.lock.abc123.tmp",
              ".us_api_token.json.tmp"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("not ours")
    old = time.time() - 3600
    for name in ours + theirs:
        (directory / name).write_text("{")
        os.utime(directory / name, (old, old))
    link = directory / f".key-{key_id}.state.linkto.tmp"  # our name, but a link: left alone
    link.symlink_to(elsewhere)
    subdir = directory / ".us_krs_token.dat.subdir1.tmp"  # our name, but a directory
    subdir.mkdir()
    os.utime(subdir, (old, old))
    os.utime(link, (old, old), follow_symlinks=False)
    us.save_token(record_for(us, fake_token(1), clock()))
    left = {path.name for path in directory.iterdir()}
    assert not left & set(ours)
    assert set(theirs) <= left
    assert link.is_symlink() and subdir.is_dir() and elsewhere.read_text() == "not ours"


# -- a record that cannot be written is said before a request ----------------------------------------


def test_ready_names_a_record_path_that_is_a_directory(us, tmp_path):
    record = us.store.record
    record.path.parent.mkdir(mode=0o700, parents=True)
    assert record.problem() is None
    record.ready()
    plant(record.path, "directory", tmp_path)
    expected = f"{record.path} is a directory, not a file: remove it"
    assert record.problem() == expected
    with pytest.raises(StoreError) as caught:
        record.ready()
    assert str(caught.value) == expected


@pytest.mark.parametrize("kind", ["fifo", "symlink"])
def test_a_fifo_or_link_at_the_record_path_is_replaced_whole_not_a_problem(us, tmp_path, kind):
    record = us.store.record
    record.path.parent.mkdir(mode=0o700, parents=True)
    plant(record.path, kind, tmp_path)
    assert record.problem() is None  # the atomic rename replaces the name, never writes through it


def test_ready_when_the_directory_is_yet_to_be_made_or_is_not_a_directory(tmp_path):
    assert file_store.FileRecordStore(tmp_path / "a" / "b" / "key.json", str, str).problem() is None
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    problem = file_store.FileRecordStore(blocker / "key.json", str, str).problem()
    assert problem is not None and str(blocker) in problem


@root_only
@pytest.mark.parametrize("mode, said", [(0o755, "this user cannot write to"), (0o777, "belongs to root")])
def test_ready_names_a_directory_this_user_must_not_write(mode, said):
    base = Path(tempfile.mkdtemp(prefix="kis-trust-"))
    try:
        base.chmod(0o755)
        directory = base / "tokens"
        directory.mkdir()
        directory.chmod(mode)
        record = file_store.FileRecordStore(directory / "key-real-x.json", str, str)
        answer = _in_child_as_nobody(record.problem)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert isinstance(answer, str) and str(directory) in answer and said in answer


def _in_child_as_nobody(function: Callable[[], object]) -> object:
    """``function()`` in a forked child switched to the user nobody; its JSON answer."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            answer = function()
            os.write(write, json.dumps(answer).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        answer = pipe.read()
    os.waitpid(pid, 0)
    return json.loads(answer)


def test_removing_a_directory_at_a_file_path_is_a_clear_error_and_the_rest_is_removed(us, clock):
    us.save_token(record_for(us, fake_token(1), clock()))
    us.mirror.issued_at_path.unlink()
    us.mirror.issued_at_path.mkdir()
    with pytest.raises(StoreError, match="us_token_issued_at.dat: it is a directory, not a file"):
        us.mirror.delete()
    assert not us.mirror.record_path.exists() and not us.mirror.mojito_path.exists()


# -- the directory: parents 0700, a warning when others may write in it -------------------------------


def test_missing_parents_of_the_token_directory_are_made_0700(make_manager, env, tmp_path, clock):
    deep = tmp_path / "a" / "b" / "tokens"
    old = os.umask(0o022)
    try:
        manager = make_manager(USTokenManager, {**env, "KIS_TOKEN_DIR": str(deep)})
        manager.save_token(record_for(manager, fake_token(1), clock()))
    finally:
        os.umask(old)
    for path in (tmp_path / "a", tmp_path / "a" / "b", deep):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path


def test_a_token_directory_others_may_write_is_a_warning_once_per_process(us, clock, caplog):
    directory = us.settings.token_dir
    directory.mkdir(mode=0o700, parents=True)
    directory.chmod(0o777)
    with caplog.at_level(logging.WARNING):
        us.save_token(record_for(us, fake_token(1), clock()))
        us.save_token(record_for(us, fake_token(2), clock()))
        us.load_token()
    warnings = [r.getMessage() for r in caplog.records if "another user could plant" in r.getMessage()]
    assert len(warnings) == 1
    assert str(directory) in warnings[0] and "group and others" in warnings[0]


# -- FIFOs, links, directories and huge files at every token path: check and get finish ----------------


TARGETS = ["record", "state", "lock", "us_api_token.json", "us_token_issued_at.dat", "us_krs_token.dat",
           "kr_api_token.json"]  # the last: another market's record left by 0.1, found by the legacy glob


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    with Sandbox() as server:
        yield server


def cli_env(env: dict[str, str], sandbox: Sandbox) -> dict[str, str]:
    return {**env, "PATH": os.environ.get("PATH", ""), "KIS_DOTENV_PATH": os.devnull,
            "KIS_BASE_URL": sandbox.base_url}


def run_cli(environ: dict[str, str], *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """``python -m us.token_manager ARGS`` bounded by ``timeout`` (a hang fails the test, and is killed)."""
    try:
        return subprocess.run([sys.executable, "-m", "us.token_manager", *args], cwd=REPO, env=environ,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`{' '.join(args)}` did not finish within {timeout} s")


@pytest.mark.parametrize("kind", ["fifo", "symlink", "directory", "sparse"])
@pytest.mark.parametrize("target", TARGETS)
def test_check_and_get_finish_whatever_sits_at_a_token_path(env, sandbox, tmp_path, target, kind):
    environ = cli_env(env, sandbox)
    manager = USTokenManager(Settings(environ, dotenv_path=False))
    good = record_for(manager, fake_token(1))
    directory = manager.settings.token_dir
    if target.startswith("kr_"):  # this market's token left by 0.1; the key has no record yet
        directory.mkdir(mode=0o700, parents=True)
        (directory / "us_api_token.json").write_text(good.to_json())
        path = directory / "kr_api_token.json"
    else:
        manager.save_token(good)
        path = {"record": manager.store.record.path, "state": manager.store.state.path,
                "lock": manager.store.lock.path}.get(target, directory / target)
    plant(path, kind, tmp_path)

    check, get = run_cli(environ, "check"), run_cli(environ, "get")
    for done in (check, get):
        assert "Traceback" not in done.stderr, done.stderr
    # the good token is still served (for the key's record: from the market's intact mirror of it)
    assert check.returncode == 0, check.stderr
    assert (get.returncode, get.stdout.strip()) == (0, fake_token(1)), get.stderr
    assert sandbox.counters()["token_requests"] == {}


# -- as root in the bot's directory: a planted link never gives root's files away ----------------------


@pytest.fixture
def bots_directory(env: dict[str, str]) -> Iterator[tuple[dict[str, str], Path]]:
    """A token directory owned by the bot (nobody), and a root-only file elsewhere: (environment, target)."""
    base = Path(tempfile.mkdtemp(prefix="kis-trust-"))
    base.chmod(0o755)
    token_dir = base / "tokens"
    token_dir.mkdir(mode=0o700)
    os.chown(token_dir, NOBODY, NOBODY)
    private = base / "root-only"
    private.mkdir(mode=0o700)
    target = private / "secret"
    target.write_text("root's secret\n")
    target.chmod(0o600)
    yield {**env, "KIS_TOKEN_DIR": str(token_dir)}, target
    shutil.rmtree(base, ignore_errors=True)


def untouched(target: Path, content: str = "root's secret\n") -> bool:
    st = target.stat()
    return (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), target.read_text()) == (0, 0, 0o600, content)


@root_only
def test_a_hard_link_at_the_lock_path_is_never_handed_to_the_bot(bots_directory, make_manager):
    """Where hard links to others' files are allowed (``fs.protected_hardlinks=0``, macOS, BSD), a
    planted hard link is a file of root's under another name: it is never given away."""
    environ, target = bots_directory
    admin = make_manager(USTokenManager, environ, clock=time.time)
    os.link(target, admin.store.lock.path)  # as root here; the bot could where links are unprotected
    with admin.store.lock.hold(0):
        pass
    assert untouched(target)


@root_only
def test_a_link_at_the_lock_path_is_never_followed_by_root(bots_directory, sandbox, make_manager):
    environ, target = bots_directory
    environ = {**environ, "KIS_BASE_URL": sandbox.base_url}
    admin = make_manager(USTokenManager, environ, clock=time.time)
    lock_path = admin.store.lock.path
    lock_path.symlink_to(target)
    os.lchown(lock_path, NOBODY, NOBODY)
    for command in (admin.get_valid_token, admin.delete_token, admin.refresh_token):
        with pytest.raises(KISTokenError, match=f"cannot lock {lock_path}: it is a symbolic link"):
            command()
    assert untouched(target)
    assert sandbox.counters()["token_requests"] == {}


@root_only
@pytest.mark.parametrize("piece", ["record", "state"])
def test_a_link_at_the_record_or_state_path_is_neither_read_nor_written_through(
        bots_directory, sandbox, make_manager, piece):
    environ, target = bots_directory
    environ = {**environ, "KIS_BASE_URL": sandbox.base_url}
    admin = make_manager(USTokenManager, environ, clock=time.time)
    # what root would serve (or obey) if it read through the link
    planted = (record_for(admin, fake_token(99)).to_json() if piece == "record"
               else json.dumps({"last_request_at": time.time()}))
    target.write_text(planted)
    path = admin.store.record.path if piece == "record" else admin.store.state.path
    path.symlink_to(target)
    os.lchown(path, NOBODY, NOBODY)
    if piece == "record":
        token = admin.get_valid_token()  # a new token: the planted record was not read
        assert token != fake_token(99)
        assert sandbox.counters()["token_requests"] == {US_KEY: 1}
    else:  # a state that cannot be read counts as a request just made: held back, not obeyed
        with pytest.raises(KISTokenError, match="renewal state was unreadable"):
            admin.get_valid_token()
        assert sandbox.counters()["token_requests"] == {}
    assert not path.is_symlink()  # replaced whole by our own file
    with pytest.raises(KISTokenError):  # within the minute: held back, by the real state file
        admin.refresh_token()
    admin.delete_token()
    assert untouched(target, planted)
    for name in os.listdir(path.parent):
        st = os.lstat(path.parent / name)
        assert stat.S_ISREG(st.st_mode) and (st.st_uid, st.st_gid) == (NOBODY, NOBODY), name


def _swap_forever(paths: list[Path], target: Path, seconds: float, report: int) -> None:
    """In the forked child, as nobody: swap each path between a regular file and a link to
    ``target`` (each swap one atomic rename) for ``seconds``; write the number of swaps to ``report``."""
    swaps = 0
    try:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for path in paths:
                spare = path.with_name(path.name + ".swap")
                try:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(spare)
                    if swaps % 2:
                        os.close(os.open(spare, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600))
                    else:
                        os.symlink(target, spare)
                    os.rename(spare, path)
                except OSError:
                    pass
            swaps += 1
        os.write(report, str(swaps).encode())
    finally:
        os._exit(0)


@root_only
def test_a_racing_swapper_never_gets_a_root_file(bots_directory, sandbox, make_manager):
    environ, target = bots_directory
    environ = {**environ, "KIS_BASE_URL": sandbox.base_url}
    admin = make_manager(USTokenManager, environ, clock=time.time)
    paths = [admin.store.lock.path, admin.store.state.path, admin.store.record.path,
             admin.mirror.record_path]
    seconds = 2.0
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        _swap_forever(paths, target, seconds, write)
    os.close(write)
    unexpected: list[str] = []
    commands = 0
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for command in (admin.get_valid_token, admin.refresh_token, admin.delete_token,
                            admin.load_token):
                commands += 1
                try:
                    command()
                except KISTokenError:
                    pass  # a link where the lock should be, held back, ...: said, never followed
                except Exception as exc:
                    unexpected.append(f"{command.__name__}: {type(exc).__name__}: {exc}")
        ready, _, _ = select.select([read], [], [], 10)
        swaps = int(os.read(read, 64) or 0) if ready else 0
    finally:
        os.close(read)
        if os.waitpid(pid, os.WNOHANG) == (0, 0):
            os.kill(pid, 9)
            os.waitpid(pid, 0)
    assert untouched(target)
    assert unexpected == []
    assert swaps > 100 and commands > 20
