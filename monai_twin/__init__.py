"""monai_twin: patient-specific digital twins of disease progression, as a MONAI plugin.

Importing the package is deliberately cheap: sub-packages (``data``, ``apps``, ...) load on first
attribute access, and heavy optional libraries (SimpleITK, voxelmorph, torchio, ITK, ANTsPy) are
imported inside the functions that need them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

__all__ = [
    "__version__",
    "apps",
    "config",
    "data",
    "engines",
    "get_config_values",
    "handlers",
    "inferers",
    "networks",
    "print_config",
    "transforms",
    "utils",
    "visualize",
]

_SUBMODULES = {
    "apps",
    "config",
    "data",
    "engines",
    "handlers",
    "inferers",
    "networks",
    "transforms",
    "utils",
    "visualize",
}
_CONFIG_FUNCTIONS = {"print_config", "get_config_values"}

if TYPE_CHECKING:  # pragma: no cover
    from . import apps, config, data, engines, handlers, inferers, networks, transforms, utils, visualize
    from .config import get_config_values, print_config


def __getattr__(name: str) -> Any:
    # PEP 562 lazy loading keeps `import monai_twin` light (see benchmarks/import_time.py).
    if name in _SUBMODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    if name in _CONFIG_FUNCTIONS:
        value = getattr(importlib.import_module(f"{__name__}.config"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
