from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from monai_twin.apps.cli import main
from monai_twin.data import load_manifest
from monai_twin.data.synthetic import copy_last_baseline, summarise_by_change


def test_cli_synth_writes_a_valid_cohort(tmp_path, capsys):
    out = tmp_path / "cohort"
    code = main(["synth", "mammo2d", "--subjects", "3", "--out", str(out), "--seed", "4", "--size", "32", "--quiet"])
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["folder"] == str(out) and report["megabytes"] > 0
    manifest = load_manifest(out)
    assert len(manifest) == 3
    assert main(["synth", "mammo2d", "--subjects", "1", "--out", str(out), "--quiet"]) == 1  # never overwrites
    assert "not an empty folder" in capsys.readouterr().err


def test_synth_command_module_is_light():
    code = "import sys, monai_twin.apps.synth_command as m; print(sorted(k for k in ('numpy', 'scipy', 'pandas', 'torch', 'nibabel') if k in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"


def test_copy_last_baseline_scores(small_cohorts):
    for folder in small_cohorts.values():
        truth = pd.read_parquet(folder / "truth.parquet")
        aligned = copy_last_baseline(folder)
        acquired = copy_last_baseline(folder, frame="acquired")
        assert len(aligned) == len(truth) - truth["subject_id"].nunique()
        assert aligned["ssim"].between(0, 1).all() and np.isfinite(aligned["psnr"]).all()
        # perfect registration makes consecutive scans far more alike than the raw acquisitions
        assert aligned["ssim"].mean() > acquired["ssim"].mean() + 0.1
        summary = summarise_by_change(aligned)
        assert summary.loc["changed", "n"] + summary.loc["unchanged", "n"] == summary.loc["all", "n"]
        assert summary.loc["all", "ssim_mean"] == pytest.approx(aligned["ssim"].mean())
    with pytest.raises(ValueError, match="frame"):
        copy_last_baseline(small_cohorts["mammo2d"], frame="raw")
