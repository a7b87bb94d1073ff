"""The build backend: setuptools' own, which leaves nothing behind in the source tree.

setuptools builds a wheel through ``build/`` in the source directory and keeps it afterwards, so a
plain ``pip install /path/to/checkout`` left a ``build/`` directory in the checkout. This backend
runs setuptools' and then removes the ``build/`` (and ``*.egg-info``) that the build made; one that
was there before is left alone.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403  (every hook not wrapped below)


@contextmanager
def _no_leftovers() -> Iterator[None]:
    """Remove what the build adds to the working directory (the source tree): ``build/``, ``*.egg-info``."""
    here = Path.cwd()
    before = {path.name for path in here.iterdir()}
    try:
        yield
    finally:
        for path in here.iterdir():
            if path.name not in before and (path.name == "build" or path.name.endswith(".egg-info")):
                shutil.rmtree(path, ignore_errors=True)


def _clean(hook: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        with _no_leftovers():
            return hook(*args, **kwargs)

    run.__name__, run.__doc__ = hook.__name__, hook.__doc__
    return run


build_wheel = _clean(_setuptools.build_wheel)
build_sdist = _clean(_setuptools.build_sdist)
prepare_metadata_for_build_wheel = _clean(_setuptools.prepare_metadata_for_build_wheel)
get_requires_for_build_wheel = _clean(_setuptools.get_requires_for_build_wheel)
get_requires_for_build_sdist = _clean(_setuptools.get_requires_for_build_sdist)
