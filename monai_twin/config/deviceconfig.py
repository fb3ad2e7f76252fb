"""Version report in the manner of :func:`monai.config.print_config`.

Versions are read from installed package metadata (:mod:`importlib.metadata`), so reporting them
imports none of the heavy libraries; a missing optional package is reported as ``"NOT INSTALLED"``.
"""

from __future__ import annotations

import os
import platform
import sys
from collections import OrderedDict
from importlib import metadata
from typing import TextIO

__all__ = ["get_config_values", "get_optional_config_values", "print_config"]

NOT_INSTALLED = "NOT INSTALLED"

#: Distribution names of the core dependencies (``install_requires``), in report order.
CORE_PACKAGES = (
    "monai",
    "torch",
    "numpy",
    "nibabel",
    "SimpleITK",
    "voxelmorph",
    "neurite",
    "pytorch-ignite",
    "pandas",
    "pyarrow",
    "torchio",
    "fire",
    "tqdm",
    "scipy",
    "matplotlib",
    "nilearn",
)

#: Optional extras (``[itk]``, ``[ants]``, ``[dev]``, ``[docs]``) and useful neighbours.
OPTIONAL_PACKAGES = (
    "itk",
    "itk-elastix",
    "antspyx",
    "polars",
    "monailabel",
    "tensorboard",
    "mlflow",
    "pytest",
    "hypothesis",
    "ruff",
    "sphinx",
)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return NOT_INSTALLED


def get_config_values() -> OrderedDict[str, str]:
    """Versions of monai_twin, Python and every core dependency, keyed by distribution name."""
    from .. import __version__

    values: OrderedDict[str, str] = OrderedDict()
    values["monai_twin"] = __version__
    values["Python"] = sys.version.replace("\n", " ")
    for dist in CORE_PACKAGES:
        values[dist] = _version(dist)
    return values


def get_optional_config_values() -> OrderedDict[str, str]:
    """Versions of the optional packages (``"NOT INSTALLED"`` when absent)."""
    return OrderedDict((dist, _version(dist)) for dist in OPTIONAL_PACKAGES)


def get_system_info() -> OrderedDict[str, str]:
    """Platform facts that matter for reproducing a run (CPU count, torch threads if loaded)."""
    info: OrderedDict[str, str] = OrderedDict()
    info["Platform"] = platform.platform()
    info["Processor count"] = str(os.cpu_count())
    torch = sys.modules.get("torch")  # only report threads if torch is already imported: stay cheap
    if torch is not None:
        info["Torch threads"] = str(torch.get_num_threads())
        info["CUDA available"] = str(torch.cuda.is_available())
    return info


def print_config(file: TextIO | None = None) -> None:
    """Print monai_twin's version, its dependencies' versions and basic system information.

    Args:
        file: stream to write to (default: ``sys.stdout``).

    Example::

        >>> import monai_twin
        >>> monai_twin.print_config()  # doctest: +SKIP
        monai_twin version: 0.1.0
        ...
    """
    out = file if file is not None else sys.stdout
    values = get_config_values()
    print(f"monai_twin version: {values.pop('monai_twin')}", file=out)
    print(f"Python version: {values.pop('Python')}", file=out)
    from .. import __file__ as package_file

    print(f"monai_twin file: {os.path.dirname(package_file)}", file=out)
    print("\nDependency versions:", file=out)
    for name, version in values.items():
        print(f"{name} version: {version}", file=out)
    print("\nOptional dependencies:", file=out)
    for name, version in get_optional_config_values().items():
        print(f"{name} version: {version}", file=out)
    print("\nFor details about installing the optional dependencies, see the README's Installation section.", file=out)
    print("\nSystem:", file=out)
    for name, value in get_system_info().items():
        print(f"{name}: {value}", file=out)
