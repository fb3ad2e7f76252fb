from __future__ import annotations

import io
import subprocess
import sys

import monai_twin


def test_import_is_light():
    # `import monai_twin` must not pull heavy libraries; they load inside the functions needing them.
    code = (
        "import sys, monai_twin; heavy = ['torch', 'monai', 'SimpleITK', 'voxelmorph', 'torchio', 'itk', 'ants', "
        "'pandas', 'nibabel']; print(','.join(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_lazy_submodules():
    assert monai_twin.data.load_manifest.__module__ == "monai_twin.data.manifest"
    assert "data" in dir(monai_twin)
    try:
        monai_twin.does_not_exist  # noqa: B018
    except AttributeError as err:
        assert "does_not_exist" in str(err)
    else:
        raise AssertionError("unknown attributes must raise AttributeError")


def test_print_config_lists_every_dependency():
    from importlib import metadata

    from monai_twin.config.deviceconfig import CORE_PACKAGES, OPTIONAL_PACKAGES

    buf = io.StringIO()
    monai_twin.print_config(file=buf)
    text = buf.getvalue()
    assert f"monai_twin version: {monai_twin.__version__}" in text
    for dist in CORE_PACKAGES:
        assert f"{dist} version: {metadata.version(dist)}" in text
    for dist in OPTIONAL_PACKAGES:
        assert f"{dist} version: " in text
    values = monai_twin.get_config_values()
    assert values["monai"] == metadata.version("monai") and values["monai_twin"] == monai_twin.__version__
