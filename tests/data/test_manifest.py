from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from parameterized import parameterized

from monai_twin.data import LongitudinalManifest, ManifestError, load_manifest
from tests.conftest import write_nifti


def _tables(root: Path) -> dict[str, pd.DataFrame]:
    return {
        name: pd.read_csv(root / f"{name}.csv", dtype={"subject_id": str}) for name in ("visits", "events", "static")
    }


def _fingerprint(folder: Path) -> dict[str, tuple[str, float]]:
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            out[str(path)] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime)
    return out


class TestLoadValid:
    def test_folder_csv(self, nifti_cohort):
        m = load_manifest(nifti_cohort)
        assert isinstance(m, LongitudinalManifest)
        assert m.time_kind == "datetime"
        assert len(m) == 6
        assert m.subjects == sorted(m.subjects)
        # every subject's first visit is day 0, times increase within a subject
        first = m.visits.groupby("subject_id")["time"].min()
        assert (first == 0.0).all()
        assert m.visits.groupby("subject_id")["time"].apply(lambda t: bool(np.all(np.diff(t) > 0))).all()
        # image paths are absolute and point at the files
        assert all(Path(p).is_absolute() and Path(p).is_file() for p in m.visits["image"])
        assert m.image_columns == ("image", "mask")
        # the static genotype row of each subject is kept as an event with NaN time, first in its subject
        static_rows = m.events[m.events["time"].isna()]
        assert len(static_rows) == 6 and set(static_rows["code"]) == {"GENOTYPE//BRCA1"}
        assert m.report["static_event_rows"] == 6
        # 2 hours after the visit is 1/12 day
        ev = m.subject_events("S000")
        lab = ev[ev["code"] == "LAB//CA15-3"]["time"].to_numpy()
        vis = m.subject_visits("S000")["time"].to_numpy()
        np.testing.assert_allclose(lab, vis + 2 / 24, atol=1e-9)

    def test_parquet_and_dataframes_match_csv(self, nifti_cohort, tmp_path):
        from_csv = load_manifest(nifti_cohort)
        tables = _tables(nifti_cohort)
        for name, frame in tables.items():
            frame.to_parquet(tmp_path / f"{name}.parquet", index=False)
        from_parquet = load_manifest(
            tmp_path / "visits.parquet", tmp_path / "events.parquet", tmp_path / "static.parquet", root=nifti_cohort
        )
        from_frames = load_manifest(tables["visits"], tables["events"], tables["static"], root=nifti_cohort)
        for other in (from_parquet, from_frames):
            pd.testing.assert_frame_equal(from_csv.visits, other.visits, check_dtype=False)
            pd.testing.assert_frame_equal(
                from_csv.events[["subject_id", "time", "code", "numeric_value"]],
                other.events[["subject_id", "time", "code", "numeric_value"]],
                check_dtype=False,
            )
            pd.testing.assert_series_equal(from_csv.origins, other.origins)

    def test_dataframes_are_not_modified(self, nifti_cohort):
        tables = _tables(nifti_cohort)
        copies = {k: v.copy(deep=True) for k, v in tables.items()}
        load_manifest(tables["visits"], tables["events"], tables["static"], root=nifti_cohort)
        for name in tables:
            pd.testing.assert_frame_equal(tables[name], copies[name])

    def test_input_files_never_written(self, nifti_cohort):
        before = _fingerprint(nifti_cohort)
        load_manifest(nifti_cohort)
        with pytest.raises(ManifestError):
            load_manifest(
                nifti_cohort,
                single_visit_subjects="raise",
                events=pd.DataFrame({"subject_id": ["zz"], "time": [1.0], "code": ["x"], "numeric_value": [1.0]}),
            )
        assert _fingerprint(nifti_cohort) == before

    def test_numeric_days_and_integer_ids(self, tmp_path):
        img = write_nifti(tmp_path / "a.nii.gz", np.zeros((4, 4, 4)))
        visits = pd.DataFrame(
            {"subject_id": [7, 7, 3, 3, 3], "time": [100.0, 130.5, -10, 0, 20], "image": [str(img)] * 5}
        )
        events = pd.DataFrame(
            {"subject_id": [7, 3], "time": [120, -20], "code": ["LAB//x", "LAB//x"], "numeric_value": ["1.5", "2"]}
        )
        m = load_manifest(visits, events)
        assert m.time_kind == "days"
        assert m.subjects == ["3", "7"]
        np.testing.assert_allclose(m.subject_visits("7")["time"], [0.0, 30.5])
        np.testing.assert_allclose(m.subject_visits("3")["time"], [0.0, 10.0, 30.0])
        # an event before the first visit gets a negative day; numbers written as text are read as numbers
        np.testing.assert_allclose(m.subject_events("3")["time"], [-10.0])
        np.testing.assert_allclose(m.events["numeric_value"].sort_values(), [1.5, 2.0])
        assert m.to_days("7", 160.5) == pytest.approx(60.5)
        assert m.to_time("3", 5.0) == pytest.approx(-5.0)
        with pytest.raises(TypeError, match="numbers of days"):
            m.to_days("7", "2030-01-01")

    def test_timezone_aware_times_become_utc(self, tmp_path):
        img = write_nifti(tmp_path / "a.nii.gz", np.zeros((4, 4, 4)))
        visits = pd.DataFrame(
            {
                "subject_id": ["a", "a", "a"],
                # 23:00 at -05:00 is 04:00 UTC next day: later than 02:00 UTC of that day
                "time": ["2030-01-01T23:00:00-05:00", "2030-01-02T02:00:00+00:00", "2030-03-01T12:00:00Z"],
                "image": [str(img)] * 3,
            }
        )
        m = load_manifest(visits)
        assert m.report["timezone"] == "aware"
        assert m.origins["a"] == pd.Timestamp("2030-01-02 02:00:00")
        np.testing.assert_allclose(
            m.visits["time"],
            [0.0, 2 / 24, (pd.Timestamp("2030-03-01 12:00") - pd.Timestamp("2030-01-02 02:00")) / pd.Timedelta(days=1)],
        )
        assert m.to_days("a", "2030-01-03T02:00:00+00:00") == pytest.approx(1.0)
        with pytest.raises(ValueError, match="has no timezone"):
            m.to_days("a", "2030-01-03")

    def test_datetime64_columns(self, tmp_path):
        img = write_nifti(tmp_path / "a.nii.gz", np.zeros((4, 4, 4)))
        visits = pd.DataFrame(
            {"subject_id": ["a", "a"], "time": pd.to_datetime(["2031-05-02", "2031-06-01"]), "image": [str(img)] * 2}
        )
        m = load_manifest(visits)
        np.testing.assert_allclose(m.visits["time"], [0.0, 30.0])
        assert m.to_time("a", 30.0) == pd.Timestamp("2031-06-01")

    def test_select(self, nifti_cohort):
        m = load_manifest(nifti_cohort)
        sub = m.select(["S001", "S003"])
        assert sub.subjects == ["S001", "S003"]
        assert set(sub.events["subject_id"]) == {"S001", "S003"}
        assert set(sub.static["subject_id"]) == {"S001", "S003"}
        with pytest.raises(KeyError, match="S999"):
            m.select(["S999"])
        with pytest.raises(KeyError, match="S999"):
            m.subject_visits("S999")


@pytest.mark.parametrize("file_format", ["parquet", "csv"])
def test_save_round_trip(nifti_cohort, tmp_path, file_format):
    m = load_manifest(nifti_cohort)
    out = m.save(tmp_path / "copy", file_format=file_format)
    again = load_manifest(out, check_images="exists")
    pd.testing.assert_frame_equal(
        m.visits.drop(columns=["view"]), again.visits.drop(columns=["view"]), check_dtype=False
    )
    np.testing.assert_allclose(m.events["time"].to_numpy(), again.events["time"].to_numpy(), atol=1e-5)
    pd.testing.assert_series_equal(m.origins, again.origins)
    # no temporary files are left behind
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{t}.{file_format}" for t in ("visits", "events", "static"))


# ------------------------------------------------------------------------------------------
# bad input: each gets a clear error naming table, column, rows/subjects and what was expected


class TestBadInput:
    def test_missing_column(self, nifti_cohort):
        t = _tables(nifti_cohort)
        with pytest.raises(ManifestError) as err:
            load_manifest(t["visits"].drop(columns=["image"]), t["events"].drop(columns=["code"]), root=nifti_cohort)
        msg = str(err.value)
        assert err.value.kinds() == {"missing_column"}
        assert "[visits]" in msg and "'image'" in msg and "[events]" in msg and "'code'" in msg

    def test_wrong_dtype(self, nifti_cohort):
        t = _tables(nifti_cohort)
        t["events"]["numeric_value"] = t["events"]["numeric_value"].astype(object)
        t["events"].loc[3, "numeric_value"] = "high"
        t["visits"]["time"] = True
        with pytest.raises(ManifestError) as err:
            load_manifest(t["visits"], t["events"], root=nifti_cohort)
        probs = {(p.table, p.kind, p.column): p for p in err.value.problems}
        assert ("visits", "dtype", "time") in probs
        bad_value = probs[("events", "dtype", "numeric_value")]
        assert bad_value.rows == (3,) and "'high'" in bad_value.message and "text_value" in bad_value.message

    def test_float_subject_ids_rejected(self, nifti_cohort):
        t = _tables(nifti_cohort)
        t["static"]["subject_id"] = np.arange(len(t["static"]), dtype=float)
        with pytest.raises(ManifestError, match="subject_id must be text or integers, got float64"):
            load_manifest(t["visits"], None, t["static"], root=nifti_cohort)

    def test_unparseable_time_lists_every_row_and_line(self, nifti_cohort):
        t = _tables(nifti_cohort)
        t["visits"].loc[[1, 4], "time"] = ["not a date", "2030-13-45"]
        t["visits"].to_csv(nifti_cohort / "visits.csv", index=False)
        with pytest.raises(ManifestError) as err:
            load_manifest(nifti_cohort)
        (problem,) = [p for p in err.value.problems if p.kind == "unparseable_time"]
        assert problem.rows == (1, 4) and problem.column == "time"
        text = str(err.value)
        assert "visits.csv" in text and "file lines 3, 6" in text and "'not a date'" in text

    def test_ambiguous_date_format_rejected(self, nifti_cohort):
        t = _tables(nifti_cohort)
        t["visits"].loc[0, "time"] = "01/02/2031"
        with pytest.raises(ManifestError, match="ISO 8601"):
            load_manifest(t["visits"], root=nifti_cohort)

    def test_duplicate_visit(self, nifti_cohort):
        t = _tables(nifti_cohort)
        dup = t["visits"].iloc[[2]].copy()
        visits = pd.concat([t["visits"], dup], ignore_index=True)
        with pytest.raises(ManifestError) as err:
            load_manifest(visits, root=nifti_cohort)
        (problem,) = err.value.problems
        assert problem.kind == "duplicate_visit"
        assert problem.rows == (2, len(visits) - 1)
        assert problem.subjects == (t["visits"].loc[2, "subject_id"],)

    def test_every_missing_image_reported_at_once(self, nifti_cohort):
        m = load_manifest(nifti_cohort)
        victims = m.visits["image"].iloc[[0, 5, 9]].tolist()
        for path in victims:
            os.remove(path)
        with pytest.raises(ManifestError) as err:
            load_manifest(nifti_cohort)
        (problem,) = err.value.problems
        assert problem.kind == "missing_image" and len(problem.rows) == 3
        assert "3 image file(s) do not exist" in problem.message

    def test_unreadable_image(self, nifti_cohort):
        m = load_manifest(nifti_cohort)
        Path(m.visits["image"].iloc[1]).write_bytes(b"this is not a nifti file")
        Path(m.visits["mask"].iloc[2]).write_bytes(b"")
        with pytest.raises(ManifestError) as err:
            load_manifest(nifti_cohort)
        kinds = {(p.kind, p.column) for p in err.value.problems}
        assert kinds == {("unreadable_image", "image"), ("unreadable_image", "mask")}
        # "exists" mode does not open files, so it passes
        load_manifest(nifti_cohort, check_images="exists")

    def test_unknown_subject_counted(self, nifti_cohort):
        t = _tables(nifti_cohort)
        extra = pd.DataFrame(
            {
                "subject_id": ["X1", "X1", "X2"],
                "time": ["2030-01-01"] * 3,
                "code": ["LAB//a"] * 3,
                "numeric_value": [1.0, 2.0, 3.0],
            }
        )
        events = pd.concat([t["events"], extra], ignore_index=True)
        with pytest.raises(ManifestError) as err:
            load_manifest(t["visits"], events, root=nifti_cohort)
        (problem,) = err.value.problems
        assert problem.kind == "unknown_subject" and problem.subjects == ("X1", "X2") and len(problem.rows) == 3
        assert "3 row(s) of 2 subject(s)" in problem.message
        m = load_manifest(t["visits"], events, root=nifti_cohort, unknown_subjects="drop")
        assert m.report["events_unknown_subject_rows_dropped"] == 3
        assert m.report["events_unknown_subjects_dropped"] == ["X1", "X2"]
        assert len(m.events) == len(t["events"])

    @parameterized.expand([("visits",), ("events",), ("static",)])
    def test_empty_table(self, table):
        tables = {
            "visits": pd.DataFrame({"subject_id": ["a", "a"], "time": [0.0, 1.0], "image": ["x.nii", "y.nii"]}),
            "events": pd.DataFrame({"subject_id": ["a"], "time": [0.5], "code": ["c"], "numeric_value": [1.0]}),
            "static": pd.DataFrame({"subject_id": ["a"], "sex": ["F"]}),
        }
        tables[table] = tables[table].iloc[0:0]
        with pytest.raises(ManifestError) as err:
            load_manifest(tables["visits"], tables["events"], tables["static"], check_images="none")
        assert [(p.table, p.kind) for p in err.value.problems] == [(table, "empty_table")]

    def test_empty_csv_file(self, tmp_path):
        (tmp_path / "visits.csv").write_text("")
        with pytest.raises(ValueError, match="visits: could not read"):
            load_manifest(tmp_path)

    def test_single_visit_subject(self, nifti_cohort):
        t = _tables(nifti_cohort)
        lonely = pd.DataFrame({"subject_id": ["L1"], "time": ["2030-05-05"], "image": [t["visits"]["image"][0]]})
        visits = pd.concat([t["visits"], lonely], ignore_index=True)
        with pytest.raises(ManifestError) as err:
            load_manifest(visits, root=nifti_cohort)
        (problem,) = err.value.problems
        assert problem.kind == "single_visit" and problem.subjects == ("L1",)
        m = load_manifest(visits, root=nifti_cohort, single_visit_subjects="drop")
        assert "L1" not in m.subjects and m.report["single_visit_subjects_dropped"] == ["L1"]

    def test_nan_value_without_text(self, nifti_cohort):
        t = _tables(nifti_cohort)
        events = t["events"].copy()
        events.loc[[1, 2], "numeric_value"] = np.nan
        with pytest.raises(ManifestError) as err:
            load_manifest(t["visits"], events, root=nifti_cohort)
        (problem,) = err.value.problems
        assert (
            problem.kind == "missing_value" and problem.rows == (1, 2) and "valueless_events='keep'" in problem.message
        )
        m = load_manifest(t["visits"], events, root=nifti_cohort, valueless_events="keep")
        assert int(m.events["numeric_value"].isna().sum()) == 2 + 6  # + the six text-only genotype rows

    def test_infinite_value(self, nifti_cohort):
        t = _tables(nifti_cohort)
        t["events"].loc[0, "numeric_value"] = np.inf
        with pytest.raises(ManifestError, match="numeric_value is infinite"):
            load_manifest(t["visits"], t["events"], root=nifti_cohort)

    def test_mixed_naive_and_aware_within_a_column(self, nifti_cohort):
        t = _tables(nifti_cohort)
        t["visits"].loc[0, "time"] = "2030-01-01T08:00:00+01:00"
        with pytest.raises(ManifestError) as err:
            load_manifest(t["visits"], root=nifti_cohort)
        (problem,) = err.value.problems
        assert problem.kind == "mixed_timezones" and problem.rows == (0,)

    def test_mixed_naive_and_aware_across_tables(self, nifti_cohort):
        t = _tables(nifti_cohort)
        events = t["events"].copy()
        stamped = events["time"].notna()
        events.loc[stamped, "time"] = pd.to_datetime(events.loc[stamped, "time"]).dt.strftime("%Y-%m-%dT%H:%M:%SZ")
        with pytest.raises(ManifestError) as err:
            load_manifest(t["visits"], events, root=nifti_cohort)
        assert err.value.kinds() == {"mixed_timezones"}
        assert "visits.time is naive but events.time is aware" in str(err.value)

    def test_mixed_days_and_dates(self, nifti_cohort):
        t = _tables(nifti_cohort)
        events = t["events"].copy()
        events["time"] = 3.0
        with pytest.raises(ManifestError, match="visits.time holds datetime but events.time holds days"):
            load_manifest(t["visits"], events, root=nifti_cohort)

    def test_duplicate_static_subject(self, nifti_cohort):
        t = _tables(nifti_cohort)
        static = pd.concat([t["static"], t["static"].iloc[[0]]], ignore_index=True)
        with pytest.raises(ManifestError, match="more than one static row"):
            load_manifest(t["visits"], None, static, root=nifti_cohort)

    def test_all_problems_of_all_tables_in_one_error(self, nifti_cohort):
        t = _tables(nifti_cohort)
        t["visits"].loc[0, "time"] = "garbage"
        t["events"].loc[0, "code"] = None
        t["static"] = pd.concat([t["static"], t["static"].iloc[[0]]], ignore_index=True)
        with pytest.raises(ManifestError) as err:
            load_manifest(t["visits"], t["events"], t["static"], root=nifti_cohort)
        assert {p.table for p in err.value.problems} == {"visits", "events", "static"}

    def test_bad_policy_and_source(self, nifti_cohort):
        with pytest.raises(ValueError, match="check_images must be one of"):
            load_manifest(nifti_cohort, check_images="maybe")
        with pytest.raises(FileNotFoundError, match="no visits table"):
            load_manifest(nifti_cohort / "images")
        with pytest.raises(FileNotFoundError, match="events: file not found"):
            load_manifest(nifti_cohort / "visits.csv", nifti_cohort / "nope.csv")
        with pytest.raises(TypeError, match="expected a path"):
            load_manifest(42)
