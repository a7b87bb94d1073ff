"""US (overseas) market: configuration and token manager."""


def check_common_is_ours() -> None:
    """Refuse, in one clear line, a ``common`` package of someone else's that shadows ours (a bot's
    own ``common/`` in its directory comes first on ``sys.path``)."""
    import importlib.util
    import os
    import sys

    ours = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "common")
    spec = importlib.util.find_spec("common")
    found = os.path.dirname(spec.origin) if spec is not None and spec.origin else None
    if found is not None and os.path.realpath(found) != os.path.realpath(ours):
        message = (
            f"kis-token-manager: another package named 'common' ({found}) shadows this package's own "
            f"({ours}): rename yours, or run from a directory where it is not importable (see the "
            "README, Troubleshooting)"
        )
        if sys.argv[:1] == ["-m"]:  # ``python -m us.token_manager``: one line, not a traceback
            print(message, file=sys.stderr)
            raise SystemExit(3)
        raise ImportError(message)


check_common_is_ours()
