from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from monai.data import CacheDataset, DataLoader, Dataset, PersistentDataset
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged
from parameterized import parameterized

from monai_twin.data import (
    LongitudinalDataset,
    ManifestError,
    build_longitudinal_items,
    collate_longitudinal,
    load_manifest,
    split_subjects,
)
from tests.conftest import make_nifti_cohort, write_nifti


def _cohort(tmp_path, n_subjects, seed):
    root = tmp_path / f"cohort_{n_subjects}_{seed}"
    tables = make_nifti_cohort(root, n_subjects=n_subjects, seed=seed)
    return load_manifest(tables["visits"], tables["events"], tables["static"], root=root), root


@pytest.fixture
def manifest(nifti_cohort):
    return load_manifest(nifti_cohort)


class TestItems:
    @pytest.fixture(autouse=True)
    def _tmp(self, tmp_path):
        self.tmp_path = tmp_path

    @parameterized.expand(
        [
            (1, None, "all"),
            (2, None, "all"),
            (1, 2, "all"),
            (2, 3, "all"),
            (1, None, "last"),
            (3, 3, "last"),
        ]
    )
    def test_counts_and_history(self, min_history, max_history, targets):
        m, _ = _cohort(self.tmp_path, 5, 3)
        items = build_longitudinal_items(m, min_history=min_history, max_history=max_history, targets=targets)
        n_visits = m.visits.groupby("subject_id").size()
        if targets == "all":
            expected = int(np.clip(n_visits - min_history, 0, None).sum())
        else:
            expected = int((n_visits > min_history).sum())
        assert len(items) == expected
        for it in items:
            t_hist, t_tgt = it["history_times"], it["target_time"]
            visits = m.subject_visits(it["subject_id"])
            j = it["target_index"]
            assert t_tgt == visits["time"].iloc[j]
            n_hist = len(it["history"])
            assert min_history <= n_hist <= (max_history or j)
            # the most recent prior visits, oldest first, ending right before the target
            np.testing.assert_array_equal(t_hist, visits["time"].iloc[j - n_hist : j].to_numpy())
            assert it["history"] == visits["image"].iloc[j - n_hist : j].tolist()
            assert it["target"] == visits["image"].iloc[j]
            assert it["history_label"] == visits["mask"].iloc[j - n_hist : j].tolist()
            np.testing.assert_allclose(it["times"], t_tgt - t_hist)
            assert (it["times"] > 0).all() and it["history_mask"].shape == (n_hist,)

    def test_events_do_not_leak_the_future(self, manifest):
        for it in build_longitudinal_items(manifest):
            t = it["events"]["time"]
            timed = t[~np.isnan(t)]
            assert (timed < it["target_time"]).all()
            # every event of the subject before the target is there, static rows included
            ev = manifest.subject_events(it["subject_id"])
            expected = ev[(ev["time"] < it["target_time"]) | ev["time"].isna()]
            assert len(t) == len(expected)
            assert list(it["events"]["code"]) == expected["code"].tolist()
            # the lab drawn 2 h after the target visit is a target event, never an input
            tt = it["target_events"]["time"]
            assert ((tt >= it["target_time"]) & (tt <= it["target_time"] + 1.0)).all()
            assert list(it["target_events"]["code"]) == ["LAB//CA15-3"]

    def test_target_event_window(self, manifest):
        items = build_longitudinal_items(manifest, target_event_window=7.0)
        # the drug given 7 days after each visit now falls inside the window (closed interval)
        assert all(sorted(it["target_events"]["code"]) == ["DRUG//tamoxifen", "LAB//CA15-3"] for it in items)

    def test_static_and_subject_filter(self, manifest):
        items = build_longitudinal_items(manifest, subjects=["S002"])
        assert {it["subject_id"] for it in items} == {"S002"}
        assert items[0]["static"] == manifest.subject_static("S002")
        assert set(items[0]["static"]) == {"sex", "birth_year"}

    @parameterized.expand(
        [
            ({"min_history": 0}, "min_history must be >= 1"),
            ({"min_history": 3, "max_history": 2}, "max_history"),
            ({"targets": "first"}, "targets must be"),
            ({"target_event_window": -1.0}, "target_event_window"),
        ]
    )
    def test_bad_arguments(self, kwargs, match):
        img_frame = pd.DataFrame({"subject_id": ["a", "a"], "time": [0.0, 1.0], "image": ["x", "y"]})
        m = load_manifest(img_frame, check_images="none")
        with pytest.raises(ValueError, match=match):
            build_longitudinal_items(m, **kwargs)

    def test_unknown_subject(self, manifest):
        with pytest.raises(KeyError, match="nobody"):
            build_longitudinal_items(manifest, subjects=["nobody"])


class TestSplit:
    def test_deterministic_exact_and_disjoint(self):
        ids = [f"P{i:04d}" for i in range(101)]
        a = split_subjects(ids, (0.7, 0.15, 0.15), seed=5)
        b = split_subjects(list(reversed(ids)), (0.7, 0.15, 0.15), seed=5)
        assert a == b  # independent of input order
        sizes = [len(a[k]) for k in ("training", "validation", "test")]
        assert sum(sizes) == 101 and sizes[0] in (70, 71) and sizes[1] in (15, 16) and sizes[2] in (15, 16)
        sets = [set(v) for v in a.values()]
        assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
        assert set().union(*sets) == set(ids)
        assert split_subjects(ids, seed=6) != a

    def test_known_assignment(self):
        # pins the hash-based rule: a silent change would reshuffle every user's test set
        split = split_subjects([f"s{i}" for i in range(10)], (0.6, 0.2, 0.2), seed=1)
        assert [len(split[k]) for k in ("training", "validation", "test")] == [6, 2, 2]
        assert split == split_subjects([f"s{i}" for i in range(10)], (0.6, 0.2, 0.2), seed=1)

    @parameterized.expand([((0.5, 0.5),), ((0.7, 0.2, 0.2),), ((1.2, -0.1, -0.1),)])
    def test_bad_fractions(self, fractions):
        with pytest.raises(ValueError, match="fractions"):
            split_subjects(["a", "b"], fractions)

    def test_duplicates(self):
        with pytest.raises(ValueError, match="duplicate subject ids"):
            split_subjects(["a", "b", "a"])

    def test_dataset_sections_have_no_subject_leakage(self, manifest):
        sections = {
            s: LongitudinalDataset(manifest, section=s, fractions=(0.5, 0.25, 0.25))
            for s in ("training", "validation", "test")
        }
        subjects = {s: {it["subject_id"] for it in ds.data} for s, ds in sections.items()}
        assert not (subjects["training"] & subjects["validation"]) and not (subjects["training"] & subjects["test"])
        assert not (subjects["validation"] & subjects["test"])
        assert sum(len(ds) for ds in sections.values()) == len(LongitudinalDataset(manifest))
        with pytest.raises(ValueError, match="section must be one of"):
            LongitudinalDataset(manifest, section="train")


def _pipeline():
    return Compose(
        [LoadImaged(keys="target", image_only=True), EnsureChannelFirstd(keys="target", channel_dim="no_channel")]
    )


class TestWithMonai:
    @pytest.fixture(autouse=True)
    def _tmp(self, tmp_path):
        self.tmp_path = tmp_path

    def test_from_folder_and_transform(self, nifti_cohort):
        ds = LongitudinalDataset(nifti_cohort, transform=_pipeline(), max_history=2)
        item = ds[0]
        assert tuple(item["target"].shape) == (1, 16, 16, 8)
        assert item["target"].meta["filename_or_obj"].endswith("S000_v1.nii.gz")

    @parameterized.expand([("dataset",), ("cache",), ("persistent",)])
    def test_monai_datasets_and_workers(self, kind):
        manifest, root = _cohort(self.tmp_path, 4, 1)
        items = LongitudinalDataset(manifest, max_history=2).data
        if kind == "dataset":
            ds = Dataset(items, transform=_pipeline())
        elif kind == "cache":
            ds = CacheDataset(items, transform=_pipeline(), progress=False)
        else:
            ds = PersistentDataset(items, transform=_pipeline(), cache_dir=root / "cache")
        loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_longitudinal)
        seen = []
        for batch in loader:
            assert batch["target"].shape[1:] == (1, 16, 16, 8)
            assert isinstance(batch["target"], torch.Tensor)
            assert isinstance(batch["events"], list) and isinstance(batch["history"], list)
            assert len(batch["subject_id"]) == batch["target"].shape[0]
            seen += [(s, int(j)) for s, j in zip(batch["subject_id"], batch["target_index"])]
        assert sorted(seen) == sorted((it["subject_id"], it["target_index"]) for it in items)

    def test_collate_stacks_fixed_and_lists_variable(self, manifest):
        items = build_longitudinal_items(manifest, min_history=2, max_history=2)
        batch = collate_longitudinal(items[:3])
        assert batch["times"].shape == (3, 2)  # same length: stacked
        mixed = collate_longitudinal(build_longitudinal_items(manifest)[:3])
        assert isinstance(mixed["times"], list) and [len(t) for t in mixed["times"]] == [1, 2, 3]
        assert torch.is_tensor(mixed["target_time"]) and mixed["target_time"].shape == (3,)
        with pytest.raises(ValueError, match="empty batch"):
            collate_longitudinal([])


@pytest.fixture(scope="module")
def mimic_manifest(mimic_dir, tmp_path_factory):
    hosp = mimic_dir / "hosp"
    admissions = pd.read_csv(hosp / "admissions.csv.gz", usecols=["subject_id", "admittime"])
    labs = pd.read_csv(
        hosp / "labevents.csv.gz", usecols=["subject_id", "itemid", "charttime", "value", "valuenum", "valueuom"]
    )
    items = pd.read_csv(hosp / "d_labitems.csv.gz", usecols=["itemid", "label"])
    patients = pd.read_csv(hosp / "patients.csv.gz", usecols=["subject_id", "gender", "anchor_age", "anchor_year"])
    # an admission is a "visit" here; its image is a small stand-in volume (MIMIC has no scans)
    folder = tmp_path_factory.mktemp("mimic")
    image = write_nifti(folder / "scan.nii.gz", np.zeros((8, 8, 4)))
    visits = admissions.drop_duplicates(["subject_id", "admittime"]).rename(columns={"admittime": "time"})
    visits["image"] = str(image)
    labs = labs.merge(items, on="itemid", how="left")
    events = pd.DataFrame(
        {
            "subject_id": labs["subject_id"],
            "time": labs["charttime"],
            "code": "LAB//" + labs["itemid"].astype(str) + "//" + labs["label"].fillna("?"),
            "numeric_value": labs["valuenum"],
            "text_value": labs["value"].where(labs["valuenum"].isna()),
            "unit": labs["valueuom"],
        }
    )
    static = patients.rename(columns={"gender": "sex"})
    return {"visits": visits, "events": events, "static": static, "labs": labs}


@pytest.mark.mimic
class TestMimicDemo:
    """The manifest and dataset on real EHR: MIMIC-IV demo admissions as visits, labs as events."""

    def test_strict_load_reports_real_problems(self, mimic_manifest):
        t = mimic_manifest
        with pytest.raises(ManifestError) as err:
            load_manifest(t["visits"], t["events"], t["static"])
        kinds = err.value.kinds()
        # the demo has patients with one admission and labs with neither number nor text
        assert "single_visit" in kinds and "missing_value" in kinds

    def test_load_and_items(self, mimic_manifest):
        t = mimic_manifest
        m = load_manifest(
            t["visits"],
            t["events"],
            t["static"],
            single_visit_subjects="drop",
            unknown_subjects="drop",
            valueless_events="keep",
        )
        n_adm = t["visits"].groupby("subject_id").size()
        multi = n_adm[n_adm > 1]
        assert len(m) == len(multi) > 10
        assert m.time_kind == "datetime" and m.report["timezone"] == "naive"
        # every lab row of a kept subject survives, and the dropped ones are counted, not lost
        kept_rows = int(t["events"]["subject_id"].isin(multi.index).sum())
        assert len(m.events) == kept_rows
        dropped = m.report.get("events_unknown_subject_rows_dropped", 0) + m.report["single_visit_event_rows_dropped"]
        assert dropped == len(t["events"]) - kept_rows > 0
        # shifted MIMIC dates (years 2100+) survive the day arithmetic: spot-check one subject
        sid = str(multi.index[0])
        adm = pd.to_datetime(t["visits"][t["visits"]["subject_id"] == int(sid)]["time"]).sort_values()
        expected_days = ((adm - adm.iloc[0]) / pd.Timedelta(days=1)).to_numpy()
        np.testing.assert_allclose(m.subject_visits(sid)["time"].to_numpy(), expected_days)
        items = build_longitudinal_items(m)
        assert len(items) == int((multi - 1).sum())
        for it in items:
            timed = it["events"]["time"][~np.isnan(it["events"]["time"])]
            assert (timed < it["target_time"]).all()
        assert sum(len(it["events"]["time"]) for it in items) > 1000
        assert {"sex", "anchor_age", "anchor_year"} <= set(items[0]["static"])
