"""Draw docs/_static/synthetic_timeline.png: one synthetic mammography subject over time.

Top row: the scans as acquired (misaligned, gain and noise). Middle row: the same visits in the
subject's aligned frame with the true lesion outline. Bottom: the EHR -- tamoxifen dose (steps),
measured CA 15-3 (dots) -- with the true lesion area under the recorded schedule and under the
counterfactual "never treated" (from :func:`resimulate`).

Usage::

    python docs/scripts/make_synthetic_figure.py [--out docs/_static/synthetic_timeline.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd


def _pick_subject(seed: int):
    from monai_twin.data.synthetic import simulate_subject

    # a treated subject with a mass and at least five visits shows every part of the simulator
    for index in range(200):
        subject = simulate_subject("mammo2d", index, seed=seed)
        treated = subject.schedule.doses.max(initial=0.0) > 0
        if subject.latent["lesion_type"] != "none" and treated and subject.n_visits >= 5:
            return subject
    raise RuntimeError("no suitable subject in the first 200")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default=str(Path(__file__).resolve().parents[1] / "_static" / "synthetic_timeline.png")
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from monai_twin.data.synthetic import resimulate, subject_truth
    from monai_twin.data.synthetic.mammo2d import mammo2d_render
    from monai_twin.utils.io import atomic_output_path

    subject = _pick_subject(args.seed)
    visits = resimulate(subject)
    never = pd.DataFrame({"time": [0.0], "code": [subject.drug_code], "numeric_value": [0.0]})
    n_show = min(subject.n_visits, 6)

    fig = plt.figure(figsize=(2.0 * n_show, 6.6))
    grid = fig.add_gridspec(3, n_show, height_ratios=[1.0, 1.0, 1.1])
    for k in range(n_show):
        for r, (image, title) in enumerate(((visits.images[k], "acquired"), (visits.aligned[k], "aligned"))):
            ax = fig.add_subplot(grid[r, k])
            ax.imshow(np.rot90(image), cmap="gray", vmin=0.0, vmax=1.0)
            if r == 1:
                # the true lesion outline in the aligned frame
                _, mask, _ = mammo2d_render(subject, visits.truth.iloc[k])
                ax.contour(np.rot90(mask), levels=[0.5], colors="tab:red", linewidths=0.8)
            ax.set_title(f"{title}, day {visits.days[k]:.0f}", fontsize=7)
            ax.axis("off")

    ax = fig.add_subplot(grid[2, :])
    days = np.linspace(0.0, subject.visit_days[-1], 400)
    factual = subject_truth(subject, days=days)
    counterfactual = subject_truth(subject, never, days=days)
    ax.plot(days, factual["lesion_area_mm2"], color="tab:red", label="true lesion area (mm²)")
    ax.plot(days, counterfactual["lesion_area_mm2"], color="tab:red", ls="--", label="… if never treated")
    for t in subject.visit_days:
        ax.axvline(t, color="0.75", lw=0.8, ls=":")
    ax.set_xlabel("days since first visit")
    ax.set_ylabel("lesion area (mm²)")
    ehr = ax.twinx()
    dose = subject.schedule.dose_at(days)
    ehr.step(days, dose, where="post", color="tab:blue", label="tamoxifen (mg/day)")
    lab = visits.events[visits.events["code"] == "LAB//CA15-3"]
    lab_days = subject.to_days(lab["time"])
    ehr.plot(lab_days, lab["numeric_value"], "o", ms=3, color="tab:green", label="CA 15-3 (U/mL)")
    ehr.set_ylabel("dose / lab value")
    lines = ax.get_legend_handles_labels()
    more = ehr.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="upper left", ncol=2)
    fig.suptitle(f"synthetic subject {subject.subject_id} (mammo2d, seed {args.seed}): scans and EHR", fontsize=9)
    fig.tight_layout()
    out = Path(args.out)
    with atomic_output_path(out) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    print(f"{out} ({out.stat().st_size / 1e3:.0f} KB), subject {subject.subject_id}")


if __name__ == "__main__":
    main()
