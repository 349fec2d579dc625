"""Resolve ``package.module:attribute`` import paths, from the current directory too."""
from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from .errors import InputError


def resolve(path: str) -> Any:
    """Return the object named by ``"pkg.mod:attr"`` (``attr`` may be dotted).

    The current directory is searched first, as uvicorn and flask do, so a ``models.py``
    next to the user's shell resolves without installing anything."""
    if not isinstance(path, str) or path.count(":") != 1:
        raise InputError(f"import path {path!r} must look like 'package.module:function'")
    module_name, attr = path.split(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(f"cannot import module {module_name!r} from {path!r}: {exc}; run from the "
                         "directory that contains it or install it (pip install -e .)") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise InputError(f"module {module_name!r} has no attribute {attr!r} (from {path!r})")
        obj = getattr(obj, part)
    return obj


def module_root(path: str) -> str | None:
    """Directory or file to ship to Ray workers so that ``path`` imports there, or None when
    the module is installed in site-packages (workers already have it)."""
    module = importlib.import_module(path.split(":")[0].split(".")[0])
    location = getattr(module, "__file__", None)
    if location is None or "site-packages" in location:
        return None
    return os.path.dirname(location) if location.endswith("__init__.py") else location
