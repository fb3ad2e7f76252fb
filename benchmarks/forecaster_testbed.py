"""The ConvLSTM twin against copy-last on a synthetic cohort: image accuracy, lesion size, future
EHR and what-if accuracy, one row per conditioning (the ablation).

Simulates a cohort, maps every acquired scan back to its subject's frame with the *true*
acquisition transform (oracle registration, so this measures the forecaster alone), encodes the
EHR with a vocabulary fitted on the training subjects (interval features with the drug exposure,
carried-forward labs, static attributes, the future-EHR target and its LOCF baseline), trains
``TwinForecaster`` with :func:`monai_twin.engines.train_forecaster` for each conditioning, and
reports on the held-out subjects:

* PSNR / SSIM / MSE of the twin and of copy-last on *changed* and *unchanged* target visits (the
  issue's bar: PSNR >= copy-last + 2 dB on changed, >= copy-last - 0.3 dB on unchanged);
* lesion-size error (mammo2d): |predicted - true| change of lesion area since the last scan, the
  area change read from the image as the intensity mass gained *in the lesion's region* (the
  simulator's lesion masks of the last prior and the target visit, mapped to the subject's frame,
  united and dilated by ``LESION_MARGIN`` pixels), calibrated by least squares on the training
  subjects' consecutive visits; copy-last predicts no change. The region matters: over the whole
  image the mass also moves with the breast's density, which falls with age, so a forecast that
  gets the density right is charged for it (read over the whole image, the acquired target itself
  misses the true area change by more than copy-last does on the unchanged visits);
* future-EHR MAE (CA 15-3 / MMSE in their units) of the EHR head vs last-value-carried-forward;
* the ceiling: PSNR of the simulator's noise-free render of each true target scan, against
  copy-last (run with ``--conditioning`` and no names for this and the cohort figures alone);
* what-if (mammo2d): for each held-out subject with a lesion, the last visit (every visit with a
  history with ``--what-if-visits all``) is forecast under the recorded treatment and with the
  daily dose from the last prior scan set to 0 and to 40 mg/day; the predicted lesion-area change
  of each edit (edited minus recorded forecast, read by the lesion-size reader in the region of the
  last prior, the factual and the counterfactual lesion) is compared with the simulator's true
  counterfactual (``resimulate`` with the same edit): Pearson r (target >= 0.9). The same r with
  the difference read over the whole image, and the reader's own r on the simulator's noise-free
  factual and counterfactual renders, are printed beside it; ``--what-if-csv`` keeps every edit.

Usage::

    python benchmarks/forecaster_testbed.py --subjects 160 --size 64 --epochs 30 --conditioning stfilm film channels none

``--load PATH`` evaluates saved network weights (a ``network_key_metric*.pt`` of an earlier run
with the same options and one conditioning) instead of training.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

#: the forecast condition keys
KEYS = ("history", "times", "history_mask", "ehr_intervals", "ehr_intervals_mask", "ehr_static")
FUTURE_CODE = {"mammo2d": "LAB//CA15-3", "mri_roi3d": "SCORE//MMSE"}
WHAT_IF_DOSES = (0.0, 40.0)
#: pixels added around the two visits' lesion masks for the lesion-size reader
LESION_MARGIN = 3


def _aligned(cohort: Path, column: str) -> dict[tuple[str, int], np.ndarray]:
    """Every visit's file of the truth table's ``column`` (``"image"`` or ``"mask"``) mapped back to
    its subject's frame with the true acquisition transform."""
    import nibabel as nib
    import pandas as pd

    from monai_twin.data.synthetic import AcquisitionTransform, invert_acquisition

    truth = pd.read_parquet(cohort / "truth.parquet")
    return {
        (row.subject_id, int(row.visit)): invert_acquisition(
            np.asarray(nib.load(str(cohort / getattr(row, column))).get_fdata(dtype=np.float32)),
            AcquisitionTransform.from_dict(row.acquisition),
        )
        for row in truth.itertuples()
    }


def _aligned_images(cohort: Path) -> dict[tuple[str, int], np.ndarray]:
    """Every acquired scan mapped back to its subject's frame with the true acquisition transform."""
    return {k: np.clip(v, 0.0, 1.0).astype(np.float32) for k, v in _aligned(cohort, "image").items()}


def _lesion_masks(cohort: Path) -> dict[tuple[str, int], np.ndarray]:
    """The simulator's lesion mask of every visit, mapped back to the subject's frame (as
    :func:`_aligned_images` does for the scans)."""
    return {k: v > 0.5 for k, v in _aligned(cohort, "mask").items()}


def _region(*masks: np.ndarray) -> np.ndarray:
    """Where the lesion-size reader counts intensity mass: the masks united, dilated by ``LESION_MARGIN``."""
    from scipy import ndimage

    return ndimage.binary_dilation(np.logical_or.reduce(masks), iterations=LESION_MARGIN)


def _lesion_regions(masks: dict[tuple[str, int], np.ndarray]) -> dict[tuple[str, int], np.ndarray]:
    """For each visit after the first, the reader's region: the lesion masks of the visit and the
    one before it (:func:`_region`)."""
    return {(sid, v): _region(masks[(sid, v)], masks[(sid, v - 1)]) for sid, v in masks if (sid, v - 1) in masks}


def _encoders(vocabulary, max_history, carry_forward=False, future_code=None, cumulative_exposure=False):
    from monai_twin.transforms.ehr import EHRFutureValuesd, EHRStaticToTensord, EHRToIntervalFeaturesd
    from monai_twin.transforms.sequence import PadSequenced

    encode = [
        EHRToIntervalFeaturesd(vocabulary, carry_forward=carry_forward, cumulative_exposure=cumulative_exposure),
        EHRStaticToTensord(vocabulary),
    ]
    if future_code is not None:
        encode.append(EHRFutureValuesd(vocabulary, [future_code]))
    return [*encode, PadSequenced(max_history)]


def _sample(item, images, encode, target=True):
    j, n = item["target_index"], len(item["history"])
    sample = dict(item)
    sample["history"] = np.stack([images[(item["subject_id"], k)][None] for k in range(j - n, j)])
    if target:
        sample["target"] = images[(item["subject_id"], j)][None]
    for t in encode:
        sample = t(sample)
    keys = [*KEYS, *(("target",) if target else ())] + [
        k for k in ("future_ehr", "future_ehr_mask", "future_ehr_locf", "future_ehr_locf_mask") if k in sample
    ]
    out = {k: torch.as_tensor(np.asarray(sample[k]), dtype=torch.float32) for k in keys if k in sample}
    return out | {"subject_id": item["subject_id"], "target_index": j}


def _samples(
    manifest, items, images, vocabulary, max_history, carry_forward=False, future_code=None, cumulative_exposure=False
):
    """Model-ready samples (tensors + ``subject_id``/``target_index``) from dataset items."""
    encode = _encoders(vocabulary, max_history, carry_forward, future_code, cumulative_exposure)
    return [_sample(item, images, encode) for item in items]


def _tensor_only(samples):
    return [{k: v for k, v in s.items() if isinstance(v, torch.Tensor)} for s in samples]


def _last_prior(batch):
    idx = batch["history_mask"].sum(1).long() - 1
    return batch["history"][torch.arange(len(idx)), idx]


def _area_scale(samples, truth, spacing_mm2, regions):
    """mm² of lesion area per unit of intensity mass gained in the lesion region between consecutive
    scans (least squares)."""
    mass, change = [], []
    for s in samples:
        if s["history_mask"].sum() < 1:
            continue
        last = _last_prior({k: s[k][None] for k in ("history", "history_mask")})[0]
        key, j = s["subject_id"], s["target_index"]
        region = torch.as_tensor(regions[(key, j)])
        mass.append(float((s["target"] - last)[:, region].sum()) * spacing_mm2)
        change.append(truth[(key, j)] - truth[(key, j - 1)])
    mass, change = np.asarray(mass), np.asarray(change)
    return float(mass @ change / max(mass @ mass, 1e-12))


def _ceiling(cohort, samples, changed):
    """PSNR of the simulator's noise-free render of the true target scan (what no forecaster can beat by
    much: only the target's own noise and resampling remain) and of copy-last, per changed flag."""
    import pandas as pd
    from monai.metrics import PSNRMetric

    from monai_twin.data.synthetic import load_subject, subject_truth
    from monai_twin.data.synthetic.mammo2d import mammo2d_render
    from monai_twin.data.synthetic.mri_roi3d import mri_roi3d_render

    psnr = PSNRMetric(max_val=1.0, reduction="none")
    rows, truths = [], {}
    for s in samples:
        sid, j = s["subject_id"], s["target_index"]
        if sid not in truths:
            subject = load_subject(cohort, sid)
            truths[sid] = (subject, subject_truth(subject))
        subject, truth = truths[sid]
        render = mammo2d_render if subject.kind == "mammo2d" else mri_roi3d_render
        clean = torch.as_tensor(np.clip(render(subject, truth.iloc[j])[0], 0.0, 1.0), dtype=torch.float32)[None, None]
        last = _last_prior({k: s[k][None] for k in ("history", "history_mask")})
        target = s["target"][None]
        rows.append(
            {
                "changed": bool(changed.get((sid, j), False)),
                "noise_free_truth": float(psnr(clean, target)),
                "copy_last": float(psnr(last, target)),
            }
        )
    return pd.DataFrame(rows).groupby("changed").mean()


def _forecast(net, batch):
    net.eval()
    with torch.no_grad():
        image, future = net.forecast(batch["history"], **{k: batch[k] for k in KEYS[1:]})
    return image.clamp(0, 1), future


def _evaluate(net, samples, changed, area, regions, scale, spacing_mm2, locf_units, batch_size=16):
    import pandas as pd
    from monai.metrics import PSNRMetric, SSIMMetric

    dims = samples[0]["target"].ndim - 1
    psnr = PSNRMetric(max_val=1.0, reduction="none")
    ssim = SSIMMetric(spatial_dims=dims, data_range=1.0, reduction="none")
    rows, ehr_rows = [], []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        batch = {k: torch.stack([s[k] for s in chunk]) for k in chunk[0] if isinstance(chunk[0][k], torch.Tensor)}
        pred, future = _forecast(net, batch)
        last = _last_prior(batch)
        for name, image in (("twin", pred), ("copy_last", last)):
            p = psnr(image, batch["target"]).reshape(-1).tolist()
            s = ssim(image, batch["target"]).reshape(-1).tolist()
            m = ((image - batch["target"]) ** 2).flatten(1).mean(1).tolist()
            for sample, difference, pv, sv, mv in zip(chunk, image - last, p, s, m):
                key = (sample["subject_id"], sample["target_index"])
                true_change, g = np.nan, np.nan
                if area:
                    true_change = area[key] - area[(key[0], key[1] - 1)]
                    g = float(difference[:, torch.as_tensor(regions[key])].sum()) * spacing_mm2 * scale
                rows.append(
                    {
                        "model": name,
                        "changed": bool(changed.get(key, False)),
                        "psnr": pv,
                        "ssim": sv,
                        "mse": mv,
                        "area_err_mm2": abs(g - true_change),
                        "prior_scans": "one" if key[1] == 1 else "two+",
                        "area_change_mm2": g,
                        "true_change_mm2": true_change,
                    }
                )
        if "future_ehr" in batch and future.shape[-1]:
            units = locf_units(future.numpy())[:, 0]
            target = locf_units(batch["future_ehr"].numpy())[:, 0]
            locf = locf_units(batch["future_ehr_locf"].numpy())[:, 0]
            for u, t, lo, ok, lok in zip(
                units,
                target,
                locf,
                batch["future_ehr_mask"][:, 0].tolist(),
                batch["future_ehr_locf_mask"][:, 0].tolist(),
            ):
                if ok and lok:
                    ehr_rows.append({"twin": abs(u - t), "locf": abs(lo - t)})
    frame = pd.DataFrame(rows)
    table = frame.groupby(["changed", "model"])[["psnr", "ssim", "mse", "area_err_mm2"]].mean().unstack("model")
    ehr = pd.DataFrame(ehr_rows).mean() if ehr_rows else None
    by_history = frame.groupby(["prior_scans", "changed", "model"])[["psnr", "area_err_mm2"]].mean().unstack("model")
    by_history["n"] = frame[frame["model"] == "twin"].groupby(["prior_scans", "changed"]).size()
    if area:  # how much of the true lesion-area change the forecasts reproduce
        twin = frame[frame["model"] == "twin"]
        by_history["area_slope"] = twin.groupby(["prior_scans", "changed"])[
            ["area_change_mm2", "true_change_mm2"]
        ].apply(lambda g: np.polyfit(g["true_change_mm2"], g["area_change_mm2"], 1)[0] if len(g) > 2 else np.nan)
    return table, ehr, by_history


def _what_if(net, manifest, cohort, subjects, images, masks, encode, scale, spacing_mm2, max_history, visits="last"):
    """Predicted vs true lesion-area change under dose edits from the last prior scan on, for each
    subject's last visit (``visits="last"``) or every visit with a history (``"all"``) as the target.

    Each edit's predicted change is the forecast under the edit minus the forecast under the
    recorded treatment, read by the lesion-size reader: the intensity mass gained in the lesion's
    region (the last prior scan's, the factual target's and the counterfactual target's lesion
    masks -- the latter rendered by the simulator -- united and dilated) times the calibrated scale.
    ``predicted_whole_mm2`` reads the same difference over the whole image, and ``reader_mm2``
    reads the simulator's noise-free factual and counterfactual renders in the same region (the
    reader's own accuracy)."""

    from monai_twin.data import build_longitudinal_items
    from monai_twin.data.synthetic import load_subject, resimulate

    pairs = []
    for sid in subjects:
        subject = load_subject(cohort, sid)
        items = build_longitudinal_items(manifest, max_history=max_history, subjects=[sid])
        if not items:
            continue
        recorded = resimulate(subject).events
        recorded = recorded.assign(time=subject.to_days(recorded["time"]))
        for item in items if visits == "all" else items[-1:]:
            pairs.extend(_what_if_visit(net, subject, item, recorded, images, masks, encode, scale, spacing_mm2))
    return pairs


def _what_if_visit(net, subject, item, recorded, images, masks, encode, scale, spacing_mm2):
    """The what-if edits of one target visit (see :func:`_what_if`)."""
    import pandas as pd

    from monai_twin.data import edit_events
    from monai_twin.data.synthetic import subject_truth
    from monai_twin.data.synthetic.mammo2d import mammo2d_prior_lesion_area, mammo2d_render
    from monai_twin.data.synthetic.subject import schedule_from_events

    sid, j = subject.subject_id, item["target_index"]
    t_last, t_target = float(item["history_times"][-1]), float(item["target_time"])
    factual_row = subject_truth(subject, days=[t_target]).iloc[0]
    factual = factual_row["lesion_area_mm2"]
    if not factual > 0:
        return []  # no lesion: nothing to change
    factual_render = mammo2d_render(subject, factual_row)[0]
    # the cohort-prior expectation under the recorded schedule, the baseline of every edit's effect
    recorded_area = mammo2d_prior_lesion_area(subject, schedule_from_events(subject, recorded), [t_target])[0]
    doses, edits, true_rows, prior, pairs = [], [], [], [], []
    for d in WHAT_IF_DOSES:
        try:
            edited = edit_events(item["events"], subject.drug_code, value=d, after=t_last, exposure=True)
        except ValueError:  # e.g. stopping a drug that is not taken: nothing to ask
            continue
        doses.append(d)
        edits.append(dict(item, events=edited))
        true_edit = pd.DataFrame(edit_events(recorded, subject.drug_code, value=d, after=t_last, exposure=True))
        true_rows.append(subject_truth(subject, true_edit, days=[t_target]).iloc[0])
        prior.append(
            mammo2d_prior_lesion_area(subject, schedule_from_events(subject, true_edit), [t_target])[0] - recorded_area
        )
    if not edits:
        return []
    batch = [_sample(x, images, encode, target=False) for x in (item, *edits)]
    stacked = {k: torch.stack([b[k] for b in batch]) for k in KEYS}
    pred, _ = _forecast(net, stacked)
    difference = (pred[1:] - pred[:1])[:, 0].numpy()
    for d, diff, row, expected in zip(doses, difference, true_rows, prior):
        image, mask, _ = mammo2d_render(subject, row)
        region = _region(masks[(sid, j - 1)], masks[(sid, j)], mask > 0)
        pairs.append(
            {
                "subject_id": sid,
                "target_index": j,
                "history": len(item["history"]),
                "gap_days": t_target - t_last,
                "dose": d,
                "predicted_mm2": float(diff[region].sum()) * spacing_mm2 * scale,
                "predicted_whole_mm2": float(diff.sum()) * spacing_mm2 * scale,
                "reader_mm2": float((image - factual_render)[region].sum()) * spacing_mm2 * scale,
                "prior_expectation_mm2": float(expected),
                "true_mm2": float(row["lesion_area_mm2"] - factual),
            }
        )
    return pairs


def _train(net, loaders, work: Path, conditioning: str, args) -> str:
    """Train ``net`` in a fresh run folder, load its best validation checkpoint, say what was done."""
    from monai_twin.engines import train_forecaster

    run_dir = Path(tempfile.mkdtemp(dir=work, prefix=f"run_{args.kind}_{conditioning}_"))  # fresh checkpoints
    trainer = train_forecaster(
        net,
        *loaders,
        output_dir=run_dir,
        max_epochs=args.epochs,
        learning_rate=args.lr,
        lr_schedule=None if args.lr_schedule == "none" else args.lr_schedule,
        ssim_weight=args.ssim_weight,
        ehr_weight=args.ehr_weight,
        val_interval=max(1, args.epochs // 5),
        progress=False,
    )
    best = sorted((run_dir / "checkpoints").glob("network_key_metric*.pt"))
    if best:
        net.load_state_dict(torch.load(best[-1], weights_only=True))
    state = trainer.evaluator.state
    return (
        f"{args.epochs} epochs, best val PSNR {state.best_metric:.2f} dB at epoch {state.best_metric_epoch}, "
        f"weights in {run_dir}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", default="mammo2d", choices=("mammo2d", "mri_roi3d"))
    parser.add_argument("--subjects", type=int, default=160)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels / voxels")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-history", type=int, default=4)
    parser.add_argument("--channels", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--change", default="additive", choices=("additive", "deformation"))
    parser.add_argument(
        "--shared-ehr-head", action="store_true", help="let the future-EHR loss reach the image trunk (old default)"
    )
    parser.add_argument(
        "--flip-axis", type=int, default=None, help="augment training samples with a random flip of this spatial axis"
    )
    parser.add_argument("--lr-schedule", default="cosine", help="'cosine' or 'none'")
    parser.add_argument(
        "--plan-film", action="store_true", help="FiLM of the decoder by the forecast interval's EHR embedding"
    )
    parser.add_argument("--flow-scale", type=float, default=4.0, help="voxels per unit of the displacement head")
    parser.add_argument("--norm", default="INSTANCE", help="normalisation of the twin's convolutions ('none' for none)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--ssim-weight", type=float, default=0.0)
    parser.add_argument("--ehr-weight", type=float, default=0.01, help="weight of the future-EHR loss term")
    parser.add_argument("--conditioning", nargs="*", default=["stfilm", "film", "channels", "none"])
    parser.add_argument("--no-carry-forward", action="store_true", help="labs only where measured")
    parser.add_argument(
        "--cumulative-exposure",
        action="store_true",
        help="add each drug's dose x days since the first record to the interval features",
    )
    parser.add_argument(
        "--history-truncation",
        type=float,
        default=0.0,
        help="probability of training on a random shorter history (the most recent 1..T-1 scans) of a sample",
    )
    parser.add_argument("--workdir", default=None, help="where cohorts/runs go (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--load", default=None, help="evaluate these saved network weights instead of training")
    parser.add_argument(
        "--what-if-visits",
        default="last",
        choices=("last", "all"),
        help="what-if targets: each held-out subject's last visit, or every visit with a history",
    )
    parser.add_argument(
        "--what-if-csv", default=None, help="also write every what-if edit (subject, dose, predicted, true) to this CSV"
    )
    args = parser.parse_args()

    import pandas as pd
    from monai.data import DataLoader, Dataset
    from monai.transforms import Compose

    from monai_twin.data import build_longitudinal_items, load_manifest, split_subjects
    from monai_twin.data.synthetic import Mammo2DConfig, MRIROI3DConfig, write_cohort
    from monai_twin.networks import TwinForecaster
    from monai_twin.transforms.ehr import EHRFutureValues, EHRToIntervalFeatures, EHRVocabulary

    work = Path(args.workdir or tempfile.mkdtemp(prefix="twin_testbed_"))
    config = Mammo2DConfig(size=args.size) if args.kind == "mammo2d" else MRIROI3DConfig(size=args.size)
    cohort = work / f"{args.kind}_{args.subjects}_{args.size}_{args.seed}"
    start = time.perf_counter()
    if not (cohort / "cohort.json").is_file():
        write_cohort(args.kind, cohort, args.subjects, args.seed, config, workers=2, progress=True)
    manifest = load_manifest(cohort, check_images="exists")
    images = _aligned_images(cohort)
    truth = pd.read_parquet(cohort / "truth.parquet")
    changed = {(r.subject_id, int(r.visit)): bool(r.changed) for r in truth.itertuples() if not pd.isna(r.changed)}
    area, regions, masks = {}, {}, {}
    if args.kind == "mammo2d":
        area = {(r.subject_id, int(r.visit)): float(r.lesion_area_mm2) for r in truth.itertuples()}
        masks = _lesion_masks(cohort)
        regions = _lesion_regions(masks)
    spacing = config.spacing if args.kind == "mammo2d" else config.spacing_mm
    voxel = float(spacing ** (2 if args.kind == "mammo2d" else 3))  # mm² per pixel / mm³ per voxel
    split = split_subjects(manifest.subjects, (0.7, 0.15, 0.15), seed=args.seed)
    vocabulary = EHRVocabulary.fit(manifest.events, manifest.static, subjects=split["training"])
    future_code = FUTURE_CODE[args.kind]
    data = {
        name: _samples(
            manifest,
            build_longitudinal_items(manifest, max_history=args.max_history, subjects=split[name]),
            images,
            vocabulary,
            args.max_history,
            not args.no_carry_forward,
            future_code,
            args.cumulative_exposure,
        )
        for name in ("training", "validation", "test")
    }
    scale = _area_scale(data["training"], area, voxel, regions) if area else 0.0
    units = EHRFutureValues(vocabulary, [future_code]).denormalise
    print(
        f"cohort ready in {time.perf_counter() - start:.0f} s: {len(data['training'])} training / "
        f"{len(data['validation'])} validation / {len(data['test'])} test samples; area scale {scale:.3f} mm² per mass unit"
    )
    ceiling = _ceiling(cohort, data["test"], changed)
    print("ceiling on the test visits, PSNR dB (noise-free render of the true target vs copy-last):")
    print(ceiling.round(2).to_string())
    dims = 2 if args.kind == "mammo2d" else 3
    f_dim = data["training"][0]["ehr_intervals"].shape[-1]
    s_dim = data["training"][0]["ehr_static"].shape[-1]
    names = EHRToIntervalFeatures(vocabulary).feature_names
    base = [names.index(f"{future_code}:last")] if not args.no_carry_forward else None
    results = {}
    encode = _encoders(vocabulary, args.max_history, not args.no_carry_forward, None, args.cumulative_exposure)
    for conditioning in args.conditioning:
        torch.manual_seed(args.seed)
        net = TwinForecaster(
            dims,
            1,
            channels=tuple(args.channels),
            hidden_channels=args.hidden,
            ehr_interval_dim=f_dim,
            ehr_static_dim=s_dim,
            conditioning=conditioning,
            future_ehr_dim=1,
            future_ehr_base=base,
            max_history=args.max_history,
            norm=None if args.norm.lower() == "none" else args.norm,
            change=args.change,
            isolate_ehr_head=not args.shared_ehr_head,
            flow_scale=args.flow_scale,
            plan_film=args.plan_film and conditioning != "none",
        )
        augment = []
        if args.flip_axis is not None:
            from monai_twin.transforms.sequence import RandFlipSequenced

            flip = RandFlipSequenced(("history", "target"), spatial_dims=dims, spatial_axis=args.flip_axis, prob=0.5)
            flip.set_random_state(args.seed)
            augment.append(flip)
        if args.history_truncation > 0:
            from monai_twin.transforms.sequence import RandHistoryTruncated

            shorten = RandHistoryTruncated(prob=args.history_truncation)
            shorten.set_random_state(args.seed)
            augment.append(shorten)
        train_transform = Compose(augment) if augment else None
        loaders = [
            DataLoader(
                Dataset(_tensor_only(data[name]), transform=train_transform if name == "training" else None),
                batch_size=8,
                shuffle=name == "training",
            )
            for name in ("training", "validation")
        ]
        t0 = time.perf_counter()
        if args.load:
            net.load_state_dict(torch.load(args.load, weights_only=True))
            trained = f"weights loaded from {args.load}"
        else:
            trained = _train(net, loaders, work, conditioning, args)
        table, ehr, by_history = _evaluate(net, data["test"], changed, area, regions, scale, voxel, units)
        seconds = time.perf_counter() - t0
        print(f"\n== conditioning={conditioning} ({trained}; {seconds:.0f} s in all)")
        print(table.round(4).to_string())
        print("   by prior scans (area_slope: least-squares slope of the twin's lesion-area change on the true one):")
        print(by_history.round(3).to_string())
        row = {"seconds": seconds}
        for flag, label in ((True, "changed"), (False, "unchanged")):
            if flag in table.index:
                gain = table.loc[flag, ("psnr", "twin")] - table.loc[flag, ("psnr", "copy_last")]
                row[f"psnr_gain_{label}"] = float(gain)
                row[f"ssim_{label}"] = float(table.loc[flag, ("ssim", "twin")])
                row[f"ssim_copy_last_{label}"] = float(table.loc[flag, ("ssim", "copy_last")])
                if area:
                    row[f"area_err_{label}"] = float(table.loc[flag, ("area_err_mm2", "twin")])
                    row[f"area_err_copy_last_{label}"] = float(table.loc[flag, ("area_err_mm2", "copy_last")])
                print(f"   {label}: twin - copy-last PSNR = {gain:+.2f} dB")
        if ehr is not None:
            row |= {"ehr_mae": float(ehr["twin"]), "ehr_mae_locf": float(ehr["locf"])}
            print(
                f"   future {future_code}: MAE twin {ehr['twin']:.3f} vs LOCF {ehr['locf']:.3f} (n={len(data['test'])})"
            )
        if area:
            pairs = _what_if(
                net,
                manifest,
                cohort,
                split["test"],
                images,
                masks,
                encode,
                scale,
                voxel,
                args.max_history,
                args.what_if_visits,
            )
            if len(pairs) >= 3:
                frame = pd.DataFrame(pairs)
                r, whole, reader = (
                    float(np.corrcoef(frame[c], frame["true_mm2"])[0, 1])
                    for c in ("predicted_mm2", "predicted_whole_mm2", "reader_mm2")
                )
                row |= {"what_if_r": r, "what_if_r_whole_image": whole, "what_if_n": len(frame)}
                if args.what_if_csv:
                    frame.assign(conditioning=conditioning).to_csv(args.what_if_csv, index=False)
                print(
                    f"   what-if (dose -> {WHAT_IF_DOSES} mg/day from the last scan): Pearson r = {r:.3f} over "
                    f"{len(frame)} edits, read in the lesion region ({whole:.3f} over the whole image; the "
                    f"reader on the true renders: {reader:.3f})"
                )
                for label, part in frame.groupby(np.where(frame["target_index"] > 1, "two+", "one")):
                    if len(part) < 3:
                        continue
                    twin, expected = (
                        float(np.corrcoef(part[c], part["true_mm2"])[0, 1])
                        for c in ("predicted_mm2", "prior_expectation_mm2")
                    )
                    row |= {f"what_if_r_{label}_scan": twin, f"what_if_n_{label}_scan": len(part)}
                    print(
                        f"      with {label.replace('+', ' or more')} prior scan(s): r = {twin:.3f} over {len(part)} "
                        f"edits; the cohort-prior expectation given the first scan: r = {expected:.3f}"
                    )
        results[conditioning] = row
    if results:
        print("\nsummary:\n" + pd.DataFrame(results).T.round(3).to_string())
    if args.json:
        ceiling_json = {("changed" if k else "unchanged"): v for k, v in ceiling.T.to_dict().items()}
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "ceiling": ceiling_json, "results": results}, indent=2)
        )


if __name__ == "__main__":
    main()
