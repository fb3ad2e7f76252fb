from __future__ import annotations

import json

import pytest

from monai_twin.apps.cli import main


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--subjects", "6", "--seed", "3", "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["manifest"]["subjects"] == 6 and summary["split"] == {"training": 4, "validation": 1, "test": 1}
    shapes = summary["encoded_sample"]["shapes"]
    assert shapes["ehr_intervals"] == shapes["ehr_intervals_mask"] and len(shapes["ehr_intervals"]) == 2
    base = summary["copy_last_baseline"]
    assert base["all"]["n"] == base["changed"]["n"] + base["unchanged"]["n"] > 0
    assert 0.5 < base["all"]["ssim_mean"] <= 1.0 and base["all"]["psnr_mean"] > 15
    (png,) = summary["figures"]
    assert png.endswith(".png") and (out / png.split("/")[-1]).stat().st_size > 10_000
    assert (out / "ehr_vocabulary.json").is_file()
    # a second run reuses the identical cohort; other settings in the same folder are refused
    assert main(["demo", "--out", str(out), "--subjects", "6", "--seed", "3", "--quiet"]) == 0
    with pytest.raises(ValueError, match="choose another --out"):
        main(["demo", "--out", str(out), "--subjects", "7", "--seed", "3", "--quiet"])
    assert "copy-last-scan baseline" in capsys.readouterr().out


def test_demo_needs_enough_subjects(tmp_path):
    with pytest.raises(ValueError, match="n_subjects must be >= 6"):
        main(["demo", "--out", str(tmp_path), "--subjects", "3", "--quiet"])
