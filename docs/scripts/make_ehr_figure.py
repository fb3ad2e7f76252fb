"""Draw docs/_static/ehr_features_mimic.png: one MIMIC-IV demo patient's encoded EHR over time.

The MIMIC-IV demo tables are converted with :func:`monai_twin.data.mimic.load_mimic`, each
hospital admission stands in for a visit, an :class:`~monai_twin.transforms.ehr.EHRVocabulary`
is fitted on the training split and the interval features of the test patient with the most
admissions are drawn: normalised ``last`` values of three labs (hollow markers: not measured in
that interval, the feature holds the fill value), drug exposure in dose x days, and event counts
of the patient's most frequent codes.

Usage::

    python docs/scripts/make_ehr_figure.py [--mimic-dir ../shared/data/mimic-iv-demo-2.2]
                                           [--out docs/_static/ehr_features_mimic.png]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

LABS = {
    "LAB//50912//mg/dL": "creatinine",
    "LAB//51222//g/dL": "haemoglobin",
    "LAB//50971//mEq/L": "potassium",
}


def main() -> None:
    default_dir = os.environ.get(
        "MONAI_TWIN_MIMIC_DIR", str(Path(__file__).resolve().parents[3] / "shared" / "data" / "mimic-iv-demo-2.2")
    )
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mimic-dir", default=default_dir)
    parser.add_argument(
        "--out", default=str(Path(__file__).resolve().parents[1] / "_static" / "ehr_features_mimic.png")
    )
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from monai_twin.data import load_manifest, split_subjects
    from monai_twin.data.mimic import load_mimic, mimic_admission_visits
    from monai_twin.transforms.ehr import EHRVocabulary, interval_feature_table

    mimic = load_mimic(args.mimic_dir)
    visits = mimic_admission_visits(args.mimic_dir)
    manifest = load_manifest(
        visits, mimic.events, mimic.static, check_images="none", single_visit_subjects="drop", unknown_subjects="drop"
    )
    split = split_subjects(manifest.subjects, seed=0)
    vocab = EHRVocabulary.fit(manifest.events, manifest.static, subjects=split["training"], min_count=10)
    table = interval_feature_table(manifest.events, manifest.visits, vocab, reducers=("last", "count"))
    names = table.feature_names

    test = [s for s in split["test"] if s in set(table.subject_id)]
    subject = max(test, key=lambda s: int((table.subject_id == s).sum()))
    rows = table.subject_id == subject
    start, end = table.start[rows], table.end[rows]
    feats, mask = table.features[rows], table.mask[rows]
    centre = (start + end) / 2

    fig, axes = plt.subplots(3, 1, figsize=(8, 7.5), sharex=True, gridspec_kw={"height_ratios": [1.2, 1, 1.4]})
    for code, label in LABS.items():
        col = names.index(f"{code}:last")
        (line,) = axes[0].plot(centre, feats[:, col], "-", lw=1, alpha=0.6, label=label)
        seen = mask[:, col] > 0
        axes[0].plot(centre[seen], feats[seen, col], "o", color=line.get_color())
        axes[0].plot(centre[~seen], feats[~seen, col], "o", mfc="none", color=line.get_color())
    axes[0].set_ylabel("last value\n(robust z-score)")
    axes[0].legend(fontsize=8, loc="best")
    axes[0].set_title(f"MIMIC-IV demo subject {subject}: interval features between admissions", fontsize=10)

    exposure_cols = [i for i, n in enumerate(names) if n.endswith(":exposure")]
    totals = feats[:, exposure_cols].sum(axis=0)
    top = [exposure_cols[i] for i in np.argsort(-totals)[:3] if totals[i] > 0]
    width = np.diff(np.r_[start, end[-1]])
    bottom = np.zeros(len(start))
    for col in top:
        label = names[col].removeprefix("DRUG//").removesuffix(":exposure")
        axes[1].bar(start, feats[:, col], width=width, bottom=bottom, align="edge", alpha=0.7, label=label)
        bottom += feats[:, col]
    axes[1].set_ylabel("exposure in the\ninterval (dose x days)")
    axes[1].legend(fontsize=7, loc="best")

    count_cols = [i for i, n in enumerate(names) if n.endswith(":count")]
    busiest = [count_cols[i] for i in np.argsort(-feats[:, count_cols].sum(axis=0))[:12]]
    grid = np.log1p(feats[:, busiest].T)
    edges = np.r_[start, end[-1]]
    axes[2].pcolormesh(edges, np.arange(len(busiest) + 1), grid, cmap="viridis", shading="flat")
    labels = [mimic.codes.set_index("code")["description"].get(names[c].removesuffix(":count"), None) for c in busiest]
    short = [(lab or names[c].removesuffix(":count")).split(" (")[0][:28] for lab, c in zip(labels, busiest)]
    axes[2].set_yticks(np.arange(len(busiest)) + 0.5, short, fontsize=7)
    axes[2].set_ylabel("log(1 + events)")
    axes[2].set_xlabel("days since the first admission (interval = one admission to the next)")
    for ax in axes:
        for t in edges:
            ax.axvline(t, color="grey", lw=0.5, ls=":")
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp.png")
    fig.savefig(tmp, dpi=90)
    os.replace(tmp, out)  # a crash never leaves a half-written figure under the final name
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KB): subject {subject}, {int(rows.sum())} intervals")


if __name__ == "__main__":
    main()
