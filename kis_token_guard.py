"""Refuse, in one clear line, a package of someone else's that shadows this package's ``common``.

A bot's own ``common/`` in the directory of its script comes first on ``sys.path``; without this
check the failure would be ``No module named 'common.base_token_manager'``. ``us`` and ``kr`` call
it before they import anything from ``common`` (the module has a name no bot would choose).
"""

from __future__ import annotations

import importlib.util
import os
import sys


def check_common_is_ours(package_file: str) -> None:
    """Raise (or, under ``python -m``, exit 3 with one line) if ``common`` is not the sibling of the
    package whose ``__init__`` is ``package_file``."""
    ours = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(package_file))), "common")
    spec = importlib.util.find_spec("common")
    found = os.path.dirname(spec.origin) if spec is not None and spec.origin else None
    if found is None or os.path.realpath(found) == os.path.realpath(ours):
        return
    message = (
        f"kis-token-manager: another package named 'common' ({found}) shadows this package's own "
        f"({ours}): rename yours, or run from a directory where it is not importable (see the README, "
        "Troubleshooting)"
    )
    if sys.argv[:1] == ["-m"]:  # ``python -m us.token_manager``: one line, not a traceback
        print(message, file=sys.stderr)
        raise SystemExit(3)
    raise ImportError(message)
