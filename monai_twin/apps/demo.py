"""The main job on built-in data: ``monai-twin demo``.

It runs what the package can do end to end, on a synthetic cohort whose truth is known:

1. simulate a small 2D mammography (or 3D brain ROI) cohort as a manifest folder;
2. validate it with :func:`~monai_twin.data.load_manifest` and split it by subject;
3. fit the EHR vocabulary on the training subjects only and encode one held-out sample into the
   tensors a twin reads (interval features, event tokens, static attributes);
4. score the copy-last-scan baseline on the held-out subjects, on the visits that changed and on
   those that did not -- the bar every forecaster must clear;
5. write a PNG of one held-out subject's scans and EHR, and ``summary.json``.

Each later capability (registration, forecasting, what-if) extends this job.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "run_demo"]


def _cohort_folder(out: Path, kind: str, n_subjects: int, seed: int, progress: bool) -> Path:
    from monai_twin.data.synthetic import write_cohort

    cohort = out / "cohort"
    meta_path = cohort / "cohort.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if (meta.get("kind"), meta.get("n_subjects"), meta.get("seed")) == (kind, n_subjects, seed):
            return cohort  # same settings give byte-identical files: reuse them
        raise ValueError(
            f"{cohort} holds a {meta.get('kind')} cohort of {meta.get('n_subjects')} subjects (seed "
            f"{meta.get('seed')}); choose another --out for {kind} with {n_subjects} subjects (seed {seed})."
        )
    workers = max(1, min(2, os.cpu_count() or 1))
    return write_cohort(kind, cohort, n_subjects=n_subjects, seed=seed, workers=workers, progress=progress)


def run_demo(
    out: str | os.PathLike = "outputs/demo",
    kind: str = "mammo2d",
    n_subjects: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the demo and return its summary (also written to ``out/summary.json``).

    Args:
        out: output folder (the cohort goes to ``out/cohort``; re-running with the same settings
            reuses it).
        kind: ``"mammo2d"`` or ``"mri_roi3d"``.
        n_subjects: cohort size (>= 6, so that every split section has a subject).
        seed: cohort seed.
        progress: show progress bars.
    """
    import numpy as np

    from monai_twin.data import LongitudinalDataset, load_manifest, manifest_summary, split_subjects
    from monai_twin.data.synthetic import copy_last_baseline
    from monai_twin.data.synthetic.baseline import summarise_by_change
    from monai_twin.transforms.ehr import EHRStaticToTensord, EHRToEventTokensd, EHRToIntervalFeaturesd, EHRVocabulary
    from monai_twin.utils.io import atomic_write_text
    from monai_twin.visualize import plot_subject_timeline

    if n_subjects < 6:
        raise ValueError(
            f"n_subjects must be >= 6 so that training, validation and test each get a subject, got {n_subjects}."
        )
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"[1/5] simulating a {kind} cohort of {n_subjects} subjects (seed {seed}) in {out_dir / 'cohort'}")
    cohort = _cohort_folder(out_dir, kind, n_subjects, seed, progress)

    print("[2/5] validating the manifest and splitting by subject")
    manifest = load_manifest(cohort, progress=progress)
    summary: dict[str, Any] = {"kind": kind, "seed": seed, "manifest": dict(manifest_summary(manifest))}
    split = split_subjects(manifest.subjects, (0.6, 0.2, 0.2), seed=seed)
    summary["split"] = {name: len(ids) for name, ids in split.items()}
    test = LongitudinalDataset(manifest, section="test", fractions=(0.6, 0.2, 0.2), seed=seed)
    print(
        f"      {len(manifest)} subjects, {len(manifest.visits)} visits, {len(manifest.events)} events; "
        f"split {summary['split']}; {len(test)} held-out forecasting samples"
    )

    print("[3/5] fitting the EHR vocabulary on training subjects and encoding a held-out sample")
    vocabulary = EHRVocabulary.fit(manifest.events, manifest.static, subjects=split["training"])
    vocabulary.save(out_dir / "ehr_vocabulary.json")
    sample = test[len(test) - 1]
    for transform in (
        EHRToIntervalFeaturesd(vocabulary),
        EHRToEventTokensd(vocabulary),
        EHRStaticToTensord(vocabulary),
    ):
        sample = transform(sample)
    encoded = {k: tuple(v.shape) for k, v in sample.items() if k.startswith("ehr_") and hasattr(v, "shape")}
    summary["encoded_sample"] = {
        "subject_id": sample["subject_id"],
        "target_index": sample["target_index"],
        "shapes": encoded,
    }
    print(
        f"      subject {sample['subject_id']} visit {sample['target_index']}: "
        + ", ".join(f"{k} {s}" for k, s in encoded.items())
    )

    print("[4/5] copy-last-scan baseline on held-out subjects (changed vs unchanged visits)")
    pairs = copy_last_baseline(cohort, subjects=split["test"])
    table = summarise_by_change(pairs)
    summary["copy_last_baseline"] = {
        name: {k: (None if not np.isfinite(v) else float(v)) for k, v in row.items()}
        for name, row in table.to_dict("index").items()
    }
    print(table.round(4).to_string())

    print("[5/5] writing figures and summary")
    subject = split["test"][0]
    png = plot_subject_timeline(manifest, subject, out_dir / f"timeline_{subject}.png")
    summary["figures"] = [str(png)]
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    print(f"      {png}\n      {out_dir / 'summary.json'}")
    return summary


def _cmd_demo(args: argparse.Namespace) -> int:
    run_demo(out=args.out, kind=args.kind, n_subjects=args.subjects, seed=args.seed, progress=not args.quiet)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``monai-twin demo``."""
    p = subparsers.add_parser("demo", help="run the main job end to end on a built-in synthetic cohort")
    p.add_argument("--out", default="outputs/demo", help="output folder (default: outputs/demo)")
    p.add_argument("--kind", choices=("mammo2d", "mri_roi3d"), default="mammo2d")
    p.add_argument("--subjects", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)
