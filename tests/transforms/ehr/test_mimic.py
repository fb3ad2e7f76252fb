from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from monai_twin.data.mimic import (
    load_mimic,
    mimic_admission_visits,
    mimic_lab_events,
    mimic_omr_events,
    mimic_prescription_events,
    mimic_static,
)


def _lab():
    return pd.DataFrame(
        {
            "subject_id": pd.Series(["1", "1", "2", "2", "3"], dtype="string"),
            "itemid": [51249, 51249, 51486, 50800, 50800],
            "charttime": [
                "2150-01-01 10:00:00",
                "2150-01-02 10:00:00",
                "2150-01-01 08:00:00",
                "2150-01-01 09:00:00",
                "2150-01-03 09:00:00",
            ],  # fmt: skip
            "value": ["33.1", "34", "NEG", "___", "7.5"],
            "valuenum": [33.1, np.nan, np.nan, np.nan, np.nan],
            "valueuom": ["g/dL", "%", None, None, "units"],
        }
    )


def test_lab_rule_codes_units_numbers_and_text():
    lab = _lab()
    before = lab.copy(deep=True)
    d_lab = pd.DataFrame({"itemid": [51249], "label": ["MCHC"], "fluid": ["Blood"], "category": ["Hematology"]})
    events, codes, report = mimic_lab_events(lab, d_lab)
    pd.testing.assert_frame_equal(lab, before)
    # one item in two units becomes two codes; a missing unit is UNK; "___" (masked) rows are dropped
    assert events["code"].tolist() == ["LAB//51249//g/dL", "LAB//51249//%", "LAB//51486//UNK", "LAB//50800//units"]
    assert events["numeric_value"].tolist()[:2] == [33.1, 34.0]  # "34" was only in `value`: parsed
    assert pd.isna(events["numeric_value"].iloc[2]) and events["text_value"].iloc[2] == "NEG"
    assert events["numeric_value"].iloc[3] == 7.5
    assert report["lab_rows_without_value_dropped"] == 1 and report["lab_numbers_parsed_from_text"] == 2
    assert codes.set_index("code").loc["LAB//51249//g/dL", "description"] == "MCHC (Blood, Hematology)"
    assert str(events["time"].dtype).startswith("datetime64")


def _rx():
    return pd.DataFrame(
        {
            "subject_id": pd.Series(["1", "1", "2", "2", "3"], dtype="string"),
            "starttime": [
                "2150-01-01 00:00:00",
                "2150-01-02 12:00:00",
                "2150-01-01 00:00:00",
                "2150-01-05 00:00:00",
                "2150-01-01 00:00:00",
            ],  # fmt: skip
            "stoptime": [
                "2150-01-03 00:00:00",
                None,
                "2150-01-04 00:00:00",
                "2150-01-04 23:00:00",
                "2150-01-02 00:00:00",
            ],  # fmt: skip
            "drug": ["Heparin", "Acetaminophen", "Insulin", "Insulin", "Vancomycin"],
            "dose_val_rx": ["25,000", "325-650", "10", "5", "oops"],
            "dose_unit_rx": ["UNIT", "mg", "UNIT", "UNIT", "mg"],
            "doses_per_24_hrs": [1.0, 4.0, np.nan, 0.0, 2.0],
        }
    )


def test_prescription_rule_daily_doses_and_intervals():
    rx = _rx()
    before = rx.copy(deep=True)
    events, codes, report = mimic_prescription_events(rx)
    pd.testing.assert_frame_equal(rx, before)
    starts = events[events["code"].str.endswith("//START")].set_index("code")
    stops = events[events["code"].str.endswith("//STOP")].set_index("code")
    assert starts.loc["DRUG//Heparin//UNIT//START", "numeric_value"] == 25000.0
    assert starts.loc["DRUG//Acetaminophen//mg//START", "numeric_value"] == 487.5 * 4  # range midpoint x 4 a day
    assert starts.loc["DRUG//Acetaminophen//mg//START", "unit"] == "mg/day"
    # no stop time: one day of exposure
    delta = stops.loc["DRUG//Acetaminophen//mg//STOP", "time"] - starts.loc["DRUG//Acetaminophen//mg//START", "time"]
    assert delta == pd.Timedelta(days=1)
    # the Insulin order whose stop precedes its start is dropped by default; the other one stays
    assert (events["code"] == "DRUG//Insulin//UNIT//START").sum() == 1
    assert report["prescriptions_stop_before_start_dropped"] == 1
    # a dose that does not parse keeps its text and no number
    vanco = starts.loc["DRUG//Vancomycin//mg//START"]
    assert np.isnan(vanco["numeric_value"]) and vanco["text_value"] == "oops"
    assert set(codes["code"]) == {
        "DRUG//Heparin//UNIT",
        "DRUG//Acetaminophen//mg",
        "DRUG//Insulin//UNIT",
        "DRUG//Vancomycin//mg",
    }


def test_prescription_invalid_interval_policies_and_negative_doses():
    swapped, _, report = mimic_prescription_events(_rx(), invalid_intervals="swap")
    insulin = swapped[swapped["code"].str.startswith("DRUG//Insulin")].sort_values("time")
    assert (insulin["code"] == "DRUG//Insulin//UNIT//START").sum() == 2
    assert report["prescriptions_stop_before_start_swapped"] == 1
    with pytest.raises(ValueError, match=r"stoptime' before 'starttime'.*Insulin.*subject\(s\) \['2'\]"):
        mimic_prescription_events(_rx(), invalid_intervals="raise")
    negative = _rx().assign(dose_val_rx=["-5", "1", "1", "1", "1"])
    with pytest.raises(ValueError, match=r"negative dose.*Heparin.*'1'"):
        mimic_prescription_events(negative)
    with pytest.raises(ValueError, match="invalid_intervals"):
        mimic_prescription_events(_rx(), invalid_intervals="ignore")


def test_times_must_be_naive_and_parseable():
    aware = _rx().assign(starttime="2150-01-01 00:00:00+02:00")
    with pytest.raises(ValueError, match="timezone-aware"):
        mimic_prescription_events(aware)
    broken = _lab().assign(charttime=["01/02/2150"] * 5)
    with pytest.raises(ValueError, match=r"charttime.*unparseable"):
        mimic_lab_events(broken)


def test_omr_rule_blood_pressure_and_units():
    omr = pd.DataFrame(
        {
            "subject_id": pd.Series(["1", "1", "1", "2"], dtype="string"),
            "chartdate": ["2150-01-01", "2150-01-01", "2150-02-01", "2150-01-01"],
            "seq_num": [1, 1, 1, 1],
            "result_name": ["Blood Pressure", "Weight (Lbs)", "Blood Pressure Sitting", "Blood Pressure"],
            "result_value": ["120/80", "150.5", "118/76", "unreadable"],
        }
    )
    events, codes, report = mimic_omr_events(omr)
    got = {(r.code, r.numeric_value if not np.isnan(r.numeric_value) else r.text_value) for r in events.itertuples()}
    assert got == {
        ("OMR//Blood Pressure//systolic", 120.0),
        ("OMR//Blood Pressure//diastolic", 80.0),
        ("OMR//Blood Pressure Sitting//systolic", 118.0),
        ("OMR//Blood Pressure Sitting//diastolic", 76.0),
        ("OMR//Weight (Lbs)", 150.5),
        ("OMR//Blood Pressure", "unreadable"),
    }
    assert set(events.loc[events["code"].str.contains("stolic"), "unit"]) == {"mmHg"}
    assert events.loc[events["code"] == "OMR//Weight (Lbs)", "unit"].item() == "Lbs"
    assert report["omr_blood_pressure_split"] == 2 and report["omr_blood_pressure_unparsed"] == 1
    assert "Blood Pressure systolic" in set(codes["description"])


def test_static_rule():
    patients = pd.DataFrame(
        {"subject_id": ["2", "1"], "gender": ["F", "M"], "anchor_age": [40, 71], "anchor_year": [2150, 2180],
         "anchor_year_group": ["2011 - 2013", "2014 - 2016"], "dod": [None, "2181-01-01"]}
    )  # fmt: skip
    static = mimic_static(patients)
    assert list(static.columns) == ["subject_id", "gender", "anchor_age", "anchor_year_group"]
    assert static["subject_id"].tolist() == ["1", "2"] and static["anchor_age"].tolist() == [71.0, 40.0]


@pytest.mark.mimic
def test_mimic_demo_end_to_end(mimic_dir):
    from monai_twin.data import build_longitudinal_items, load_manifest, split_subjects
    from monai_twin.transforms.ehr import (
        EHRStaticToTensord,
        EHRToEventTokensd,
        EHRToIntervalFeaturesd,
        EHRVocabulary,
        interval_feature_table,
    )

    mimic = load_mimic(mimic_dir)
    # the demo's known quirks, handled by rule and counted
    assert mimic.report["prescriptions_stop_before_start_dropped"] == 753
    assert mimic.report["omr_blood_pressure_split"] > 800
    assert set(mimic.events.columns) == {"subject_id", "time", "code", "numeric_value", "text_value", "unit"}
    assert (mimic.events["numeric_value"].notna() | mimic.events["text_value"].notna()).all()
    # every code has one unit -- the vocabulary fit would raise otherwise
    assert (mimic.events.dropna(subset=["unit"]).groupby("code")["unit"].nunique() == 1).all()

    visits = mimic_admission_visits(mimic_dir)
    manifest = load_manifest(
        visits, mimic.events, mimic.static, check_images="none", single_visit_subjects="drop", unknown_subjects="drop"
    )
    split = split_subjects(manifest.subjects, seed=0)
    vocab = EHRVocabulary.fit(manifest.events, manifest.static, subjects=split["training"], min_count=10)
    assert vocab.static_categorical["gender"] == ["F", "M"]
    assert "LAB//51249//%" in vocab.codes and "LAB//51249//g/dL" in vocab.codes
    assert any(c.startswith("DRUG//") for c in vocab.exposure_codes)

    table = interval_feature_table(manifest.events, manifest.visits, vocab)
    exposure = [i for i, n in enumerate(table.feature_names) if n.endswith(":exposure")]
    assert (table.features[:, exposure] >= 0).all() and table.mask[:, exposure].any()

    items = build_longitudinal_items(manifest, subjects=split["test"])
    pipeline = [EHRToIntervalFeaturesd(vocab), EHRToEventTokensd(vocab, max_tokens=64), EHRStaticToTensord(vocab)]
    for item in items[:10]:
        out = item
        for t in pipeline:
            out = t(out)
        tf, tm = table.item(item["subject_id"], item["target_index"])
        np.testing.assert_allclose(out["ehr_intervals"].numpy(), tf, rtol=1e-5, atol=1e-4)
        np.testing.assert_array_equal(out["ehr_intervals_mask"].numpy(), tm)
        assert out["ehr_static"].shape == (len(EHRStaticToTensord(vocab).feature_names),)
        real = out["ehr_tokens_mask"] > 0
        assert (out["ehr_tokens_time"][real] < 0).all()  # every token lies before the target visit
        assert out["ehr_tokens_dropped"] + int(real.sum()) >= int(real.sum())
