"""Loading a file of scripts/ as a module, for tests of its functions."""
from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


@contextlib.contextmanager
def script_module(name: str):
    """scripts/NAME.py as a module, registered in sys.modules while in use
    (dataclasses look their module up there) and taken out after."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(name, None)
