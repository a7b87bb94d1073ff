"""The file backend of the store (one host): a key's record, lock and state, and each market's mirrors.

In the token directory, per key (``<id>`` is :attr:`Credential.key_id`, e.g. ``real-5fda05f056d87ade``):

``key-<id>.json``    the key's token record, shared by every market that uses the key
``key-<id>.lock``    the key's cross-process renewal lock (``flock``; never deleted)
``key-<id>.state``   the key's renewal memory: last request, outcome, counters (JSON)
``key-<id>.approval.json|.lock|.state``   the same three for the key's WebSocket approval key

and per market (the story's files, mirrors of the key's record for tools and mojito2):

``<prefix>api_token.json``       the record, with ``market`` and ``mirror_of``
``<prefix>token_issued_at.dat``  the issue time
``<prefix>krs_token.dat``        the token for mojito2 broker objects (JSON, no secret)

Writes are atomic (temp file in the same directory, fsync, ``os.replace``), files are 0600 and the
directory 0700. When root writes into a directory that another user owns (an admin shell in the
bot's directory), every file is handed to the directory's owner; any other user who is not the
owner is refused before a request is sent. A file that cannot be read for lack of permission is an
error naming the file and its owner, never a missing token. Nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

from common.clock import to_kst_iso
from common.errors import LockTimeoutError, StoreError
from common.record import CorruptRecordError, TokenRecord
from common.store import KeyStore, RenewalState

FILE_MODE = 0o600
DIR_MODE = 0o700
STALE_TEMP_AGE = 60.0

R = TypeVar("R")


# -- the pieces of a key's store -------------------------------------------------------------------


class FileRecordStore(Generic[R]):
    """One record in one file, parsed and written by the given functions."""

    def __init__(self, path: Path, parse: Callable[[str], R], dump: Callable[[R], str]) -> None:
        self.path = path
        self.location = str(path)
        self._parse = parse
        self._dump = dump

    def signature(self) -> object:
        """(inode, size, mtime) of the file, or None if there is none."""
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def load(self) -> R | None:
        """Read and check the file (None if it does not exist)."""
        text = read_text(self.path)
        return None if text is None else self._parse(text)

    def save(self, record: R) -> None:
        """Write the file atomically, then sweep temp files left by killed writers."""
        write_file(self.path, self._dump(record))
        remove_stale_temp_files(self.path.parent)

    def delete(self) -> list[str]:
        """Remove the file; return its path if it was there."""
        return remove_files(self.path)


class FileRenewalLock:
    """``flock`` on a lock file: the kernel releases it if the holder dies; the file is never deleted
    (deleting it would break mutual exclusion)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.location = str(path)
        self._file_lock: Any = None

    @contextlib.contextmanager
    def hold(self, timeout: float) -> Iterator[None]:
        """Hold the lock, waiting at most ``timeout`` seconds (0: one try).

        Re-entrant within a thread (one ``FileLock`` per object, counted per thread); other threads
        and processes wait.
        """
        from filelock import FileLock, Timeout

        if self._file_lock is None:
            self._file_lock = FileLock(str(self.path), mode=FILE_MODE)
        file_lock = self._file_lock
        try:
            prepare_directory(self.path.parent)
            file_lock.acquire(timeout=timeout, poll_interval=0.02)
        except Timeout:  # a TimeoutError, hence an OSError: keep this clause first
            raise LockTimeoutError(
                f"another process held {self.path.name} for more than {timeout:g} s"
            ) from None
        except OSError as exc:
            raise StoreError(f"cannot lock {self.path}: {exc.strerror or exc}") from None
        try:
            hand_to_directory_owner(self.path)
            yield
        finally:
            file_lock.release()


class FileStateStore:
    """The key's :class:`RenewalState` in a JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.location = str(path)

    def load(self) -> RenewalState:
        """Read the state; a missing file is a fresh state."""
        text = read_text(self.path)
        return RenewalState() if text is None else RenewalState.from_json(text)

    def save(self, state: RenewalState) -> None:
        """Write the state atomically."""
        write_file(self.path, json.dumps(state.to_dict(), indent=2))


def key_store(directory: Path, key_id: str, kind: str = "token") -> KeyStore[Any]:
    """The file pieces of one key's store of ``kind`` (``token`` or ``approval``) in ``directory``."""
    from common.approval_kind import ApprovalRecord

    suffix, parse, dump = {
        "token": ("", TokenRecord.from_json, TokenRecord.to_json),
        "approval": (".approval", ApprovalRecord.from_json, ApprovalRecord.to_json),
    }[kind]
    stem = directory / f"key-{key_id}{suffix}"
    return KeyStore(
        FileRecordStore(stem.with_name(stem.name + ".json"), parse, dump),
        FileRenewalLock(stem.with_name(stem.name + ".lock")),
        FileStateStore(stem.with_name(stem.name + ".state")),
    )


# -- a market's mirror files -------------------------------------------------------------------------


class MarketMirror:
    """One market's story files, mirroring the record of the key that market uses."""

    def __init__(self, directory: Path, prefix: str) -> None:
        self.directory = directory
        self.record_path = directory / f"{prefix}api_token.json"
        self.issued_at_path = directory / f"{prefix}token_issued_at.dat"
        self.mojito_path = directory / f"{prefix}krs_token.dat"

    def holds(self, record: TokenRecord, key_id: str) -> bool:
        """True if the mirror already shows ``record`` as the mirror of key ``key_id``."""
        try:
            text = read_text(self.record_path)
            mirrored = None if text is None else TokenRecord.from_json(text)
            marked = text is not None and json.loads(text).get("mirror_of") == key_id
        except (CorruptRecordError, StoreError, ValueError, AttributeError):
            return False
        return marked and mirrored._replace(market=record.market) == record  # type: ignore[union-attr]

    def write(self, record: TokenRecord, key_id: str) -> None:
        """Write the three files for ``record`` (whose ``market`` is this market's)."""
        write_file(self.record_path, record.to_json(mirror_of=key_id))
        write_file(self.issued_at_path, to_kst_iso(record.issued_at) + "\n")
        mojito = {
            "market": record.market,
            "access_token": f"{record.token_type} {record.access_token}",
            "timestamp": int(record.expires_at),
            "key_fingerprint": record.key_fingerprint,
        }
        write_file(self.mojito_path, json.dumps(mojito, indent=2))

    def load_legacy(self) -> TokenRecord | None:
        """A record written by version 0.1 (before records belonged to keys), or None.

        Mirrors carry ``mirror_of``; a record without it was the market's own and may be adopted
        as its key's record, so an upgrade costs no issuance.
        """
        text = read_text(self.record_path)
        if text is None:
            return None
        record = TokenRecord.from_json(text)
        with contextlib.suppress(ValueError):
            if "mirror_of" in json.loads(text):
                return None
        return record

    def delete(self) -> list[str]:
        """Remove the three files; return the paths removed."""
        return remove_files(self.record_path, self.issued_at_path, self.mojito_path)


# -- file primitives ---------------------------------------------------------------------------------


def read_text(path: Path) -> str | None:
    """The file's text, or None if it does not exist.

    Raises:
        StoreError: no permission to read it (the message names the file and its owner).
        CorruptRecordError: it cannot be read for another reason (not UTF-8, I/O error).
    """
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError:
        return None
    except PermissionError:
        owner = _owner_name(path)
        raise StoreError(
            f"cannot read {path}: permission denied (it belongs to {owner}); run as {owner} or fix "
            "its owner; no token was requested"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise CorruptRecordError(f"cannot read {path.name}: {reason}") from None


def write_file(path: Path, text: str) -> None:
    """Write a token-directory file atomically with mode 0600 (creating the directory 0700)."""
    prepare_directory(path.parent)
    atomic_write(path, text, FILE_MODE)


def remove_files(*paths: Path) -> list[str]:
    """Remove the files that exist; return their paths."""
    removed = []
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(str(path))
    return removed


def prepare_directory(directory: Path) -> None:
    """Create ``directory`` 0700 if missing; refuse a user who would leave files its owner cannot read.

    Raises:
        StoreError: it cannot be created, or it belongs to another user and we are not root.
    """
    try:
        if not directory.is_dir():
            directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            os.chmod(directory, DIR_MODE)
        owner_uid = directory.stat().st_uid
    except OSError as exc:
        raise StoreError(f"cannot create {directory}: {exc.strerror or exc}") from None
    if os.geteuid() not in (0, owner_uid):
        owner = _owner_name(directory)
        raise StoreError(
            f"{directory} belongs to {owner}: run this command as {owner} (or as root), or set "
            "KIS_TOKEN_DIR to a directory of your own; files written now could not be read by its owner"
        )


def hand_to_directory_owner(path: Path) -> None:
    """When root writes into another user's directory, give the file to that user."""
    if os.geteuid() != 0:
        return
    with contextlib.suppress(OSError):
        directory = path.parent.stat()
        if directory.st_uid != 0 and path.stat().st_uid != directory.st_uid:
            os.chown(path, directory.st_uid, directory.st_gid)


def remove_stale_temp_files(directory: Path) -> None:
    """Temp files older than :data:`STALE_TEMP_AGE` were left by writers that were killed."""
    cutoff = time.time() - STALE_TEMP_AGE
    for path in directory.glob(".*.tmp"):
        with contextlib.suppress(OSError):
            if path.stat().st_mtime < cutoff:
                path.unlink()


def atomic_write(path: Path, text: str, mode: int, what: str = "") -> None:
    """Replace ``path`` with ``text`` atomically: a reader sees the old file or the new, never half.

    Temp file in the same directory (created 0600), fsync, chmod ``mode``, handed to the directory's
    owner when root writes into another user's directory, ``os.replace``, fsync of the directory.
    On failure the temp file is removed and the old file is left as it was.

    Raises:
        StoreError: one line naming ``what`` (default: the path) and the reason.
    """
    import tempfile  # only when writing: keeps `check` start-up lean

    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            _chown_to_directory_owner(handle.fileno(), path.parent)
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(exc, OSError):
            raise StoreError(f"cannot write {what or path}: {exc.strerror or exc}") from None
        raise
    _fsync_directory(path.parent)


def _chown_to_directory_owner(fd: int, directory: Path) -> None:
    if os.geteuid() != 0:
        return
    st = directory.stat()
    if st.st_uid != 0:
        os.fchown(fd, st.st_uid, st.st_gid)


def _owner_name(path: Path) -> str:
    try:
        uid = path.stat().st_uid
    except OSError:
        return "another user"
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return f"uid {uid}"


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

