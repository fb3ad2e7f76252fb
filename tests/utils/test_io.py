from __future__ import annotations

import os
import stat

import pytest

from monai_twin.utils.io import atomic_output_path, atomic_write_text


def test_atomic_write_replaces_and_keeps_default_mode(tmp_path):
    target = tmp_path / "sub" / "table.csv"
    atomic_write_text(target, "a\n")
    atomic_write_text(target, "b\n")
    assert target.read_text() == "b\n"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in target.parent.iterdir()] == ["table.csv"]


def test_failure_leaves_destination_untouched(tmp_path):
    target = tmp_path / "x.nii.gz"
    target.write_text("original")
    with pytest.raises(RuntimeError):
        with atomic_output_path(target) as tmp:
            assert tmp.name.endswith(".nii.gz") and tmp.parent == tmp_path
            tmp.write_text("partial")
            raise RuntimeError("writer crashed")
    assert target.read_text() == "original"
    assert [p.name for p in tmp_path.iterdir()] == ["x.nii.gz"]
