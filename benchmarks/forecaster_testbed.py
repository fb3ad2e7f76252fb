"""The ConvLSTM twin against the copy-last baseline on a synthetic 2D mammography cohort.

Simulates a cohort, maps every acquired scan back to its subject's frame with the *true*
acquisition transform (oracle registration, so that this measures the forecaster alone), encodes
the EHR with a vocabulary fitted on the training subjects, trains ``TwinForecaster`` with MONAI's
``SupervisedTrainer`` for each requested conditioning, and prints PSNR / SSIM on the held-out
subjects' changed and unchanged visits next to copy-last -- the issue's bar is
PSNR >= copy-last + 2 dB on changed and >= copy-last - 0.3 dB on unchanged.

Usage::

    python benchmarks/forecaster_testbed.py --subjects 120 --size 96 --epochs 15 --conditioning stfilm none
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _aligned_images(cohort: Path) -> dict[tuple[str, int], np.ndarray]:
    import nibabel as nib
    import pandas as pd

    from monai_twin.data.synthetic import AcquisitionTransform, invert_acquisition

    truth = pd.read_parquet(cohort / "truth.parquet")
    out = {}
    for row in truth.itertuples():
        acquired = np.asarray(nib.load(str(cohort / row.image)).get_fdata(dtype=np.float32))
        aligned = invert_acquisition(acquired, AcquisitionTransform.from_dict(row.acquisition))
        out[(row.subject_id, int(row.visit))] = np.clip(aligned, 0.0, 1.0).astype(np.float32)
    return out


def _samples(manifest, items, images, vocabulary, max_history, carry_forward=False):
    from monai_twin.transforms.ehr import EHRStaticToTensord, EHRToIntervalFeaturesd
    from monai_twin.transforms.sequence import PadSequenced

    encode = [
        EHRToIntervalFeaturesd(vocabulary, carry_forward=carry_forward),
        EHRStaticToTensord(vocabulary),
        PadSequenced(max_history),
    ]
    out = []
    for item in items:
        j, n = item["target_index"], len(item["history"])
        sample = dict(item)
        sample["history"] = np.stack([images[(item["subject_id"], k)][None] for k in range(j - n, j)])
        sample["target"] = images[(item["subject_id"], j)][None]
        for t in encode:
            sample = t(sample)
        out.append(
            {
                k: torch.as_tensor(np.asarray(sample[k]), dtype=torch.float32)
                for k in (
                    "history",
                    "target",
                    "times",
                    "history_mask",
                    "ehr_intervals",
                    "ehr_intervals_mask",
                    "ehr_static",
                )
            }
            | {"subject_id": item["subject_id"], "target_index": j}
        )
    return out


def _evaluate(net, samples, changed, batch_size=16):
    from monai.metrics import PSNRMetric, SSIMMetric

    psnr, ssim = PSNRMetric(max_val=1.0, reduction="none"), SSIMMetric(spatial_dims=2, data_range=1.0, reduction="none")
    rows = []
    net.eval()
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            batch = {k: torch.stack([s[k] for s in chunk]) for k in chunk[0] if k not in ("subject_id", "target_index")}
            target = batch["target"]
            last = batch["history"][torch.arange(len(chunk)), batch["history_mask"].sum(1).long() - 1]
            pred = net(
                batch["history"],
                batch["times"],
                batch["history_mask"],
                batch["ehr_intervals"],
                batch["ehr_intervals_mask"],
                batch["ehr_static"],
            ).clamp(0, 1)
            for name, image in (("twin", pred), ("copy_last", last)):
                p = psnr(image, target).reshape(-1).tolist()
                s = ssim(image, target).reshape(-1).tolist()
                for sample, pv, sv in zip(chunk, p, s):
                    key = (sample["subject_id"], sample["target_index"])
                    rows.append({"model": name, "changed": bool(changed.get(key, False)), "psnr": pv, "ssim": sv})
    import pandas as pd

    frame = pd.DataFrame(rows)
    return frame.groupby(["model", "changed"])[["psnr", "ssim"]].mean().unstack("model")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=120)
    parser.add_argument("--size", type=int, default=96, help="image side in pixels")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-history", type=int, default=4)
    parser.add_argument("--conditioning", nargs="+", default=["stfilm", "none"])
    parser.add_argument(
        "--carry-forward",
        action="store_true",
        help="carry the last value of each code into intervals without a new one (the dose in force)",
    )
    parser.add_argument("--workdir", default=None, help="where to write the cohort (default: a temporary folder)")
    args = parser.parse_args()

    import pandas as pd
    from monai.data import DataLoader
    from monai.engines import SupervisedTrainer

    from monai_twin.data import build_longitudinal_items, load_manifest, split_subjects
    from monai_twin.data.synthetic import Mammo2DConfig, write_cohort
    from monai_twin.engines import ForecastPrepareBatch
    from monai_twin.networks import TwinForecaster
    from monai_twin.transforms.ehr import EHRVocabulary

    torch.manual_seed(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="twin_testbed_"))
    cohort = work / f"mammo2d_{args.subjects}_{args.size}_{args.seed}"
    start = time.perf_counter()
    if not (cohort / "cohort.json").is_file():
        write_cohort(
            "mammo2d", cohort, args.subjects, args.seed, Mammo2DConfig(size=args.size), workers=2, progress=True
        )
    manifest = load_manifest(cohort, check_images="exists")
    images = _aligned_images(cohort)
    truth = pd.read_parquet(cohort / "truth.parquet")
    changed = {(r.subject_id, int(r.visit)): bool(r.changed) for r in truth.itertuples() if not pd.isna(r.changed)}
    split = split_subjects(manifest.subjects, (0.7, 0.15, 0.15), seed=args.seed)
    vocabulary = EHRVocabulary.fit(manifest.events, manifest.static, subjects=split["training"])
    data = {
        name: _samples(
            manifest,
            build_longitudinal_items(manifest, max_history=args.max_history, subjects=split[name]),
            images,
            vocabulary,
            args.max_history,
            args.carry_forward,
        )
        for name in ("training", "test")
    }
    print(
        f"cohort ready in {time.perf_counter() - start:.0f} s: {len(data['training'])} training / {len(data['test'])} test samples"
    )
    f_dim = data["training"][0]["ehr_intervals"].shape[-1]
    s_dim = data["training"][0]["ehr_static"].shape[-1]
    for conditioning in args.conditioning:
        torch.manual_seed(args.seed)
        net = TwinForecaster(
            2,
            1,
            channels=(16, 32),
            hidden_channels=32,
            ehr_interval_dim=f_dim,
            ehr_static_dim=s_dim,
            conditioning=conditioning,
            max_history=args.max_history,
        )
        loader = DataLoader(
            [{k: v for k, v in s.items() if k not in ("subject_id", "target_index")} for s in data["training"]],
            batch_size=8,
            shuffle=True,
        )
        trainer = SupervisedTrainer(
            device=torch.device("cpu"),
            max_epochs=args.epochs,
            train_data_loader=loader,
            network=net,
            optimizer=torch.optim.AdamW(net.parameters(), 1e-3),
            loss_function=torch.nn.MSELoss(),
            prepare_batch=ForecastPrepareBatch(),
        )
        t0 = time.perf_counter()
        trainer.run()
        table = _evaluate(net, data["test"], changed)
        print(f"\n== conditioning={conditioning} (trained {args.epochs} epochs in {time.perf_counter() - t0:.0f} s)")
        print(table.round(3).to_string())
        for flag, label in ((True, "changed"), (False, "unchanged")):
            if flag in table.index:
                gain = table.loc[flag, ("psnr", "twin")] - table.loc[flag, ("psnr", "copy_last")]
                print(f"   {label}: twin - copy-last PSNR = {gain:+.2f} dB")


if __name__ == "__main__":
    main()
