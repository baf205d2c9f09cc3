"""Load a script that is not part of a package (``bench/*.py``, ``examples/*.py``) as a module.

Tests call a benchmark's or an example's functions directly; those files live outside the
installed packages, so they are loaded from their path. The module is registered in
``sys.modules`` under ``name`` (dataclasses and pickling look it up there), and with
``siblings=True`` the script's own directory goes on ``sys.path`` first, for scripts that import
the files next to them.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_script(path: Path, name: str, *, siblings: bool = False) -> ModuleType:
    """Execute the file at ``path`` as module ``name`` and return it."""
    if siblings and str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
