from __future__ import annotations

import json
import subprocess
import sys

import pytest

from monai_twin.apps.cli import main


def test_config(capsys):
    assert main(["config"]) == 0
    assert "monai_twin version" in capsys.readouterr().out


def test_validate_ok(nifti_cohort, capsys):
    assert main(["validate", str(nifti_cohort), "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["subjects"] == 6 and summary["time_kind"] == "datetime"
    assert summary["static_attributes"] == ["sex", "birth_year"]


def test_validate_reports_problems(nifti_cohort, capsys):
    (nifti_cohort / "images" / "S001_v0.nii.gz").unlink()
    assert main(["validate", str(nifti_cohort), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "INVALID" in err and "S001_v0.nii.gz" in err and "do not exist" in err


def test_items(nifti_cohort, capsys):
    assert main(["items", str(nifti_cohort), "--quiet", "--targets", "last", "--max-history", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["items"]) == 6
    assert all(row["history"] <= 2 and row["target_events"] == 1 for row in out["items"])


def test_console_script_help():
    out = subprocess.run(
        [sys.executable, "-m", "monai_twin", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "validate" in out and "config" in out


def test_unknown_command():
    with pytest.raises(SystemExit):
        main(["frobnicate"])
