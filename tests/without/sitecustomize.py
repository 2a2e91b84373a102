"""Makes the top-level modules named in MIMICNORM_WITHOUT (comma-separated) unimportable, as on a
machine that lacks them: with `PYTHONPATH=tests/without` Python imports this file at start-up,
in every subprocess too (tests/test_device_check.py). A lookup (`importlib.util.find_spec`, which
torch uses to probe optional packages) finds a module without origin; importing it raises
ModuleNotFoundError, as for a package that is not installed."""
from __future__ import annotations

import os
import sys
from importlib.abc import Loader
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Sequence


def _missing(name: str) -> ModuleNotFoundError:
    return ModuleNotFoundError(f"No module named {name!r} (MIMICNORM_WITHOUT)", name=name)


class _Refuse(Loader):
    """Fails every import it is asked for (and `python -m`, which asks for the code)."""

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        raise _missing(spec.name)

    def exec_module(self, module: ModuleType) -> None:
        raise _missing(module.__name__)

    def get_code(self, name: str) -> None:
        raise _missing(name)


class _Without:
    """A meta-path finder that answers for `names` (and their submodules) with `_Refuse`."""

    def __init__(self, names: set[str]) -> None:
        self.names = names

    def find_spec(self, name: str, path: Sequence[str] | None = None,
                  target: object = None) -> ModuleSpec | None:
        if name.partition(".")[0] in self.names:
            return ModuleSpec(name, _Refuse())
        return None


_names = {name for name in os.environ.get("MIMICNORM_WITHOUT", "").split(",") if name}
if _names:
    sys.meta_path.insert(0, _Without(_names))
