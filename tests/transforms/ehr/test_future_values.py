from __future__ import annotations

import numpy as np
import pytest

from monai_twin.data import build_longitudinal_items, load_manifest
from monai_twin.data.synthetic import Mammo2DConfig, write_cohort
from monai_twin.transforms.ehr import EHRFutureValues, EHRFutureValuesd, EHRVocabulary

CA153 = "LAB//CA15-3"


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    folder = tmp_path_factory.mktemp("future") / "mammo"
    write_cohort("mammo2d", folder, 6, seed=2, config=Mammo2DConfig(size=32), progress=False)
    return load_manifest(folder)


def test_targets_and_locf_follow_the_recorded_values(manifest):
    vocab = EHRVocabulary.fit(manifest.events, manifest.static)
    transform = EHRFutureValuesd(vocab, [CA153])
    items = build_longitudinal_items(manifest)
    i = vocab.index([CA153])[0]

    def clipped(value):  # normalisation clips to the vocabulary's robust range
        return float(np.clip(value, vocab.low[i], vocab.high[i]))

    measured = 0
    for item in items:
        out = transform(item)
        ev, tgt = item["events"], item["target_events"]
        at_target = tgt["numeric_value"][tgt["code"] == CA153]
        if at_target.size:
            measured += 1
            raw = transform.transform.denormalise(out["future_ehr"].numpy())
            assert out["future_ehr_mask"].item() == 1.0
            assert raw[0] == pytest.approx(clipped(at_target[-1]), rel=1e-5)
        else:
            assert out["future_ehr_mask"].item() == 0.0 and out["future_ehr"].item() == 0.0
        before = ev["numeric_value"][ev["code"] == CA153]
        assert out["future_ehr_locf_mask"].item() == float(before.size > 0)
        if before.size:
            raw_locf = transform.transform.denormalise(out["future_ehr_locf"].numpy())[0]
            assert raw_locf == pytest.approx(clipped(before[-1]), rel=1e-5)
    assert measured > len(items) // 2
    # at inference there is no target: only the LOCF outputs appear
    out = transform({k: v for k, v in items[0].items() if k != "target_events"})
    assert "future_ehr" not in out and "future_ehr_locf" in out


def test_codes_without_numeric_statistics_are_rejected(manifest):
    vocab = EHRVocabulary.fit(manifest.events, manifest.static)
    with pytest.raises(ValueError, match=r"LAB//nope.*no numeric statistics"):
        EHRFutureValues(vocab, [CA153, "LAB//nope"])
    with pytest.raises(ValueError, match="at least one"):
        EHRFutureValues(vocab, [])
    with pytest.raises(KeyError, match="'events'"):
        EHRFutureValuesd(vocab, [CA153])({"target_events": {}})
    with pytest.raises(KeyError, match=r"'time' and 'code'"):
        EHRFutureValues(vocab, [CA153])({"code": []})
    values, mask = EHRFutureValues(vocab, [CA153])(None)
    assert values.tolist() == [0.0] and mask.tolist() == [0.0]
    assert np.isfinite(values).all()
