"""A market's story files, kept as mirrors of its key's record, and the files version 0.1 left.

Per market, in the token directory (the story's names, for tools and mojito2):

``<prefix>api_token.json``       the record, with ``market`` and ``mirror_of`` (the key's id)
``<prefix>token_issued_at.dat``  the issue time
``<prefix>krs_token.dat``        the token for mojito2 broker objects (JSON, no secret)

A record file without ``mirror_of`` was written by version 0.1 (before records belonged to keys): it
is adopted once as its key's record, so an upgrade costs no issuance. When the copies are written,
read and adopted is ``common.renewal.copies``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

from common.clock import to_kst_iso
from common.credentials.records import TokenRecord
from common.errors import CorruptRecordError, KISTokenError, StoreError
from common.store.files import MIRROR_NAMES, read_text, remove_files, write_file

_MIRROR_RECORD = re.compile(r"([A-Za-z0-9]+_)" + re.escape(MIRROR_NAMES[0]))
_log = logging.getLogger(__name__)



class MarketMirror:
    """One market's story files, mirroring the record of the key that market uses."""

    def __init__(self, directory: Path, prefix: str) -> None:
        self.directory = directory
        record, issued_at, mojito = (directory / f"{prefix}{name}" for name in MIRROR_NAMES)
        self.record_path, self.issued_at_path, self.mojito_path = record, issued_at, mojito

    def holds(self, record: TokenRecord, key_id: str) -> bool:
        """True if the mirror already shows ``record`` as the mirror of key ``key_id``."""
        try:
            text = read_text(self.record_path)
            mirrored = None if text is None else TokenRecord.from_json(text)
            marked = text is not None and json.loads(text).get("mirror_of") == key_id
        except (CorruptRecordError, StoreError, ValueError, AttributeError):
            return False
        return marked and mirrored is not None and mirrored._replace(market=record.market) == record

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

    def load_copy(self, key_id: str) -> TokenRecord | None:
        """The mirrored record, if this market's file is a mirror of key ``key_id`` (else None).

        Raises:
            CorruptRecordError: the file cannot be used.
            StoreError: it cannot be read.
        """
        text = read_text(self.record_path)
        if text is None or _mirror_of(text) != key_id:
            return None
        return TokenRecord.from_json(text)

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


def _mirror_of(text: str) -> object:
    """The ``mirror_of`` a record's JSON names (None if none, or not JSON)."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return data.get("mirror_of") if isinstance(data, dict) else None


def mirror_prefixes(directory: Path) -> list[str]:
    """The prefixes (``us_``, ``kr_``...) of the markets whose record file (``<prefix>api_token.json``)
    has a name in ``directory``, sorted; nothing is opened."""
    try:
        with os.scandir(directory) as entries:
            return sorted(match[1] for entry in entries if (match := _MIRROR_RECORD.fullmatch(entry.name)))
    except OSError:
        return []


class StoryFiles:
    """One market's story files as the copies of its key's token (see :class:`common.renewal.copies.Copies`).

    Args:
        directory: the token directory.
        prefix: the market's file prefix (``us_``).
        key_id: the id of the key whose record the files mirror.
        accept: says why a record is not the key's (None: it is).
    """

    def __init__(self, directory: Path, prefix: str, key_id: str,
                 accept: Callable[[TokenRecord], str | None]) -> None:
        self.files = MarketMirror(directory, prefix)
        self.market = prefix.rstrip("_")
        self.key_id = key_id
        self._accept = accept

    def holds(self, record: TokenRecord) -> bool:
        """True if this market's story files already show the key's ``record``."""
        return self.files.holds(record._replace(market=self.market), self.key_id)

    def write(self, record: TokenRecord) -> None:
        """Write this market's story files for the key's ``record``."""
        self.files.write(record._replace(market=self.market), self.key_id)

    def copy(self) -> TokenRecord | None:
        """This market's mirror of the key's record (None if it is not one, or cannot be read)."""
        return self.files.load_copy(self.key_id)

    def delete(self) -> list[str]:
        """Remove this market's story files and every other market's that mirror the key's token (so
        that a deleted token never comes back from a copy); return the paths removed."""
        removed = self.files.delete()
        for prefix in mirror_prefixes(self.files.directory):
            other = MarketMirror(self.files.directory, prefix)
            if other.record_path != self.files.record_path:
                with contextlib.suppress(CorruptRecordError, KISTokenError):
                    if other.load_copy(self.key_id) is not None:
                        removed += other.delete()
        return removed

    def legacy(self) -> TokenRecord | None:
        """The best record of this key left by version 0.1 in any market's file (the one that lives
        longest), to adopt as the key's record; None if there is none."""
        found = []
        for prefix in mirror_prefixes(self.files.directory):
            try:  # one market's unusable file (a FIFO, garbage) must not hide another's good one
                record = MarketMirror(self.files.directory, prefix).load_legacy()
            except (CorruptRecordError, StoreError) as exc:
                name = f"{prefix}{MIRROR_NAMES[0]}"
                reason = str(exc) if name in str(exc) else f"{exc} in {name}"
                _log.warning("ignoring the stored %s token: %s", self.market, reason)
                continue
            if record is not None and self._accept(record) is None:
                found.append(record)
        return max(found, key=lambda record: record.expires_at, default=None)
