"""Where tokens are kept: a small store interface and its file implementation.

The renewal policy (``base_token_manager``) only talks to :class:`TokenStore`, so a shared network
store can be added later without touching it. :class:`FileTokenStore` keeps one market's files in
one directory:

``<prefix>api_token.json``       the token record (:class:`TokenRecord` JSON)
``<prefix>token_issued_at.dat``  the issue time, mirrored for tools that read it
``<prefix>krs_token.dat``        the token for mojito2 broker objects (JSON, no secret)
``<prefix>renewal_state.json``   shared renewal memory: last request, outcome, counters
``<prefix>api_token.lock``       the cross-process renewal lock (never deleted)

Writes are atomic (temp file in the same directory, fsync, ``os.replace``), files are 0600 and the
directory 0700. Nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from common.clock import to_kst_iso
from common.errors import LockTimeoutError, StoreError
from common.record import CorruptRecordError, TokenRecord

FILE_MODE = 0o600
DIR_MODE = 0o700
STALE_TEMP_AGE = 60.0


_STATE_DEFAULTS: dict[str, Any] = {
    "last_request_at": None,
    "last_outcome": None,
    "last_outcome_at": None,
    "last_code": None,
    "last_message": None,
    "last_success_at": None,
    "renewals": 0,
    "refusals": {},
    "failures": 0,
    "alerts_sent": {},
}


class RenewalState:
    """What every process on the host remembers about this market's token requests.

    Attributes:
        last_request_at: when a token request was last sent (epoch), to keep to one a minute.
        last_outcome: ``renewed``, ``same_token``, ``refused`` or ``failed``.
        last_outcome_at: when that outcome happened.
        last_code: the broker's code for a refusal (``EGW00133``), else None.
        last_message: the broker's or the transport's message for a failure, else None.
        last_success_at: when a token was last obtained.
        renewals: tokens obtained (new or same) since the state was created.
        refusals: refusals counted by broker code (``LOCAL`` when this host held back).
        failures: requests that failed without a broker code (network, 5xx, garbage).
        alerts_sent: cause -> epoch of the last alert sent for it.
    """

    last_request_at: float | None
    last_outcome: str | None
    last_outcome_at: float | None
    last_code: str | None
    last_message: str | None
    last_success_at: float | None
    renewals: int
    refusals: dict[str, int]
    failures: int
    alerts_sent: dict[str, float]

    def __init__(self, **values: Any) -> None:
        for name, default in _STATE_DEFAULTS.items():
            value = values.get(name, default)
            setattr(self, name, dict(value) if isinstance(value, dict) else value)

    def to_dict(self) -> dict[str, Any]:
        """The state as a JSON-ready dict."""
        return {name: getattr(self, name) for name in _STATE_DEFAULTS}

    @classmethod
    def from_json(cls, text: str) -> RenewalState:
        """Parse the state file; raise :class:`CorruptRecordError` if it is not usable."""
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):
            raise CorruptRecordError("not valid JSON") from None
        if not isinstance(data, dict):
            raise CorruptRecordError("expected a JSON object")
        for name, default in _STATE_DEFAULTS.items():
            if name in data and not _same_kind(data[name], default, name):
                raise CorruptRecordError(f"field {name!r} has the wrong type")
        return cls(**data)


def _same_kind(value: object, default: object, name: str) -> bool:
    if name.endswith("_at"):
        return value is None or _is_number(value)
    if name in ("last_outcome", "last_code", "last_message"):
        return value is None or isinstance(value, str)
    if isinstance(default, dict):  # counters and times by code: numbers only
        return isinstance(value, dict) and all(_is_number(v) for v in value.values())
    return _is_number(value)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class TokenStore(Protocol):
    """What the renewal policy needs from a place that keeps one market's token."""

    def signature(self) -> object:
        """A cheap value that changes whenever the stored record changes (no full read)."""

    def load(self) -> TokenRecord | None:
        """The stored record, or None if there is none.

        Raises:
            CorruptRecordError: a record is there but cannot be used.
        """

    def save(self, record: TokenRecord) -> None:
        """Store ``record`` atomically, replacing the previous one."""

    def delete(self) -> list[str]:
        """Remove the stored token; return what was removed."""

    def lock(self, timeout: float) -> contextlib.AbstractContextManager[None]:
        """Hold the renewal lock across processes; wait at most ``timeout`` seconds (0: one try).

        Raises:
            LockTimeoutError: not acquired in time.
        """

    def load_state(self) -> RenewalState:
        """The shared renewal memory (raises :class:`CorruptRecordError` if unusable)."""

    def save_state(self, state: RenewalState) -> None:
        """Store the shared renewal memory atomically."""

    def locations(self) -> dict[str, str]:
        """Human-readable locations of what is stored, by role."""


class FileTokenStore:
    """Keeps one market's token files in ``directory`` with names starting with ``prefix``."""

    def __init__(self, directory: str | os.PathLike[str], prefix: str) -> None:
        self.directory = Path(directory)
        self.prefix = prefix
        self.record_path = self.directory / f"{prefix}api_token.json"
        self.issued_at_path = self.directory / f"{prefix}token_issued_at.dat"
        self.mojito_path = self.directory / f"{prefix}krs_token.dat"
        self.state_path = self.directory / f"{prefix}renewal_state.json"
        self.lock_path = self.directory / f"{prefix}api_token.lock"

    def signature(self) -> object:
        """(inode, size, mtime) of the record file, or None if there is none."""
        try:
            st = os.stat(self.record_path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def load(self) -> TokenRecord | None:
        """Read and check the record file."""
        text = self._read(self.record_path)
        return None if text is None else TokenRecord.from_json(text)

    def save(self, record: TokenRecord) -> None:
        """Write the record, then its two mirrors, each atomically."""
        self._write(self.record_path, record.to_json())
        self._write(self.issued_at_path, to_kst_iso(record.issued_at) + "\n")
        mojito = {
            "market": record.market,
            "access_token": f"{record.token_type} {record.access_token}",
            "timestamp": int(record.expires_at),
            "key_fingerprint": record.key_fingerprint,
        }
        self._write(self.mojito_path, json.dumps(mojito, indent=2))
        self._remove_stale_temp_files()

    def delete(self) -> list[str]:
        """Remove the record and its mirrors (not the lock file nor the renewal memory)."""
        removed = []
        for path in (self.record_path, self.issued_at_path, self.mojito_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(str(path))
        return removed

    @contextlib.contextmanager
    def lock(self, timeout: float) -> Iterator[None]:
        """Hold ``<prefix>api_token.lock`` with ``flock`` (released by the kernel if we die)."""
        from filelock import FileLock, Timeout

        file_lock = FileLock(str(self.lock_path), mode=FILE_MODE)
        try:
            self._ensure_directory()
            file_lock.acquire(timeout=timeout, poll_interval=0.02)
        except Timeout:  # a TimeoutError, hence an OSError: keep this clause first
            raise LockTimeoutError(
                f"another process held {self.lock_path.name} for more than {timeout:g} s"
            ) from None
        except OSError as exc:
            raise StoreError(f"cannot lock {self.lock_path}: {exc.strerror or exc}") from None
        try:
            yield
        finally:
            file_lock.release()

    def load_state(self) -> RenewalState:
        """Read the renewal memory; a missing file is a fresh state."""
        text = self._read(self.state_path)
        return RenewalState() if text is None else RenewalState.from_json(text)

    def save_state(self, state: RenewalState) -> None:
        """Write the renewal memory atomically."""
        self._write(self.state_path, json.dumps(state.to_dict(), indent=2))

    def locations(self) -> dict[str, str]:
        """Paths of the files, by role."""
        return {
            "record": str(self.record_path),
            "issued_at": str(self.issued_at_path),
            "mojito": str(self.mojito_path),
            "state": str(self.state_path),
            "lock": str(self.lock_path),
        }

    def _read(self, path: Path) -> str | None:
        try:
            with open(path, encoding="utf-8") as handle:
                return handle.read()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise CorruptRecordError(f"cannot read {path.name}: {reason}") from None

    def _remove_stale_temp_files(self) -> None:
        """Temp files older than :data:`STALE_TEMP_AGE` were left by writers that were killed."""
        cutoff = time.time() - STALE_TEMP_AGE
        for path in self.directory.glob(f".{self.prefix}*.tmp"):
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()

    def _ensure_directory(self) -> None:
        if not self.directory.is_dir():
            self.directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            os.chmod(self.directory, DIR_MODE)

    def _write(self, path: Path, text: str) -> None:
        try:
            self._ensure_directory()
        except OSError as exc:
            raise StoreError(f"cannot create {self.directory}: {exc.strerror or exc}") from None
        atomic_write(path, text, FILE_MODE)


def atomic_write(path: Path, text: str, mode: int, what: str = "") -> None:
    """Replace ``path`` with ``text`` atomically: a reader sees the old file or the new, never half.

    Temp file in the same directory (created 0600), fsync, chmod ``mode``, ``os.replace``, fsync of
    the directory. On failure the temp file is removed and the old file is left as it was.

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


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
