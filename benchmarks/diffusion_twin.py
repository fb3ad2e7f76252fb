"""The latent diffusion twin against copy-last on a synthetic 2D mammography cohort (issue 7 figures).

Simulates a cohort, maps every scan back to its subject's frame with the true acquisition transform
(oracle registration, as ``forecaster_testbed.py`` does, whose helpers are reused), trains the
``AutoencoderKL`` and the ``LatentDiffusionTwin`` on the training subjects with MONAI's
``SupervisedTrainer``, and prints, on the held-out subjects:

* forecast quality (mean of N samples) vs copy-last on the changed / unchanged visits: SSIM, PSNR,
  lesion-size error (mm^2; the lesion area is read from an image as the prior's true area plus the
  pixels gained minus lost -- brighter / darker than the prior by more than 0.12 -- inside the box the
  lesion can reach, times a factor fitted on training pairs);
* the null-EHR check: no events, gap 0 -> SSIM of the forecast vs the prior (target >= 0.9);
* what-if: predicted vs true (``resimulate``) change of lesion area at the target visit when the
  drug is stopped / started after the last prior scan, Pearson r (target >= 0.8); the same
  continuous reader is also applied to the simulator's own recorded / counterfactual images (its
  ceiling) and, on consecutive test scans, to the true images and their autoencoder
  reconstructions (does the latent keep the change at all?);
* uncertainty: Spearman between each test item's mean per-pixel std and its mean absolute error,
  over the items and over the subjects (their means) (target >= 0.5);
* speed: seconds per sample for DDIM 10 / 25 / 50 steps, and a pixel-space twin of equal width at
  25 steps -- the ratio in the same run;
* optionally the ConvLSTM twin (``TwinForecaster``) on the same test visits.

Choices left open are made on the validation subjects, never on the test subjects that report
them: ``--eta 0 1`` picks the DDIM eta by the per-subject uncertainty Spearman, and
``--select-guidance`` picks the what-if guidance among ``--whatif-guidance`` and the what-if floor
among ``--whatif-floors`` by the what-if r on ``--val-whatif-visits`` validation visits.

Usage (the configuration of the diffusion guide)::

    OMP_NUM_THREADS=1 python benchmarks/diffusion_twin.py --subjects 160 --seed 0 --ae-epochs 15 --epochs 120 \
        --lr-schedule cosine --ema 0.995 --eta 0 1 --whatif-guidance 1 2 3 --whatif-floors 0.005 0.01 0.02 \
        --select-guidance --convlstm-epochs 15 --autoencoder ae.pt --twin 'twin_{kind}.pt'

Defaults: the interval EHR path, clean-sample prediction and a 0.02 floor on the decoded change;
``--ehr-path crossattn --prediction epsilon --change-threshold 0`` is the earlier twin. The 3D
section (``--mri-subjects``) uses the same switches.

``--base-forecast convlstm`` makes the diffusion residual on a deterministic forecast: the ConvLSTM
twin (trained first, ``--convlstm-epochs``; ``--convlstm PATH`` caches it) forecasts every pair
(training, validation, test; null-EHR pairs take the prior as their base), the twin
(``LatentDiffusionTwin(base_forecast=True)``) diffuses the latent change from that forecast with the
prior latent and the EHR tokens still in its condition, and a forecast decodes as
``base + D(z) - D(z_base)``. The what-if then forecasts the edited events with the ConvLSTM twin too,
the floors apply to the change from each base, and the base forecasts' own what-if r is printed
beside the twin's; the forecast table gains a ``base_convlstm`` row, and the null-EHR check uses the
prior as the base.

A base trained by ``forecaster_testbed.py`` (its ``network_key_metric*.pt``): ``--cohort`` names the
testbed's cohort folder (read only), ``--convlstm-testbed`` builds and encodes the ConvLSTM twin as
the testbed does (carried-forward labs, its future CA 15-3 head; the checkpoint loads strictly),
``--convlstm-change`` / ``--cumulative-exposure`` repeat the testbed's ``--change`` /
``--cumulative-exposure``, and ``--seed`` must be the cohort's seed: the subjects are split exactly as
the testbed splits them (``_testbed_split``), so no test subject was in the base's training split::

    OMP_NUM_THREADS=1 python benchmarks/diffusion_twin.py --cohort /tmp/fc/big/mammo2d_600_64_0 --seed 0 \
        --base-forecast convlstm --convlstm network_key_metric=40.3233.pt --convlstm-testbed \
        --convlstm-change deformation --cumulative-exposure --convlstm-epochs 25 --base-history-std ...

The uncertainty figure sums each visit's std map into one number (``--uncertainty``, see
``UNCERTAINTY_SUMMARIES``): over the image, its top 5 %, where the base forecast moves, or together
with the base's own spread over its 1..4 most recent prior scans (``--base-history-std``); several
summaries are candidates chosen with ``--eta`` on the validation subjects. ``--whatif-max-visits N``
limits the test what-if to the first N test visits with a lesion (to fit a time budget).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _lesion_boxes(cohort: Path, subjects) -> dict[str, tuple[slice, ...] | None]:
    from monai_twin.data.synthetic import load_subject
    from monai_twin.data.synthetic.mammo2d import mammo2d_anatomy

    out = {}
    for sid in subjects:
        subject = load_subject(cohort, sid)
        out[sid] = mammo2d_anatomy(subject).get("lesion_box") if subject.latent["lesion_type"] != "none" else None
    return out


def _samples(items, images, vocabulary, max_tokens, truth):
    from monai_twin.engines import twin_conditions

    out = []
    for item in items:
        sid, j = item["subject_id"], item["target_index"]
        sample = twin_conditions(item, vocabulary, max_tokens)
        sample["prior_image"] = torch.from_numpy(images[(sid, j - 1)][None])
        sample["target_image"] = torch.from_numpy(images[(sid, j)][None])
        meta = {
            "subject_id": sid,
            "target_index": j,
            "changed": bool(truth[(sid, j)]["changed"]),
            "prior_area": float(truth[(sid, j - 1)].get("lesion_area_mm2", np.nan)),
            "target_area": float(truth[(sid, j)].get("lesion_area_mm2", np.nan)),
            "item": item,
        }
        out.append((sample, meta))
    return out


def _start_drug(events, code: str, dose: float, after: float, before: float) -> dict[str, np.ndarray]:
    """``events`` plus ``dose`` mg/day of ``code`` taken in ``[after, before)`` (for never-treated subjects,
    where ``edit_events`` has no recorded prescription to edit)."""
    try:
        from monai_twin.data import edit_events

        return edit_events(events, code, value=dose, after=after, before=before)
    except ValueError:
        pass
    add = {
        "time": np.array([after, before], dtype=np.float64),
        "code": np.array([code + "//START", code + "//STOP"], dtype=object),
        "numeric_value": np.array([dose, dose]),
        "text_value": np.array([None, None], dtype=object),
        "unit": np.array(["mg/day", "mg/day"], dtype=object),
    }
    out = {k: np.concatenate([np.asarray(v), add[k]]) if k in add else v for k, v in events.items()}
    order = np.argsort(np.asarray(out["time"], dtype=np.float64), kind="stable")
    return {k: np.asarray(v)[order] for k, v in out.items()}


#: intensity step (image units) that counts a pixel as gained / lost lesion; the lesion adds ~0.32
LESION_STEP = 0.12


def _box_count(image: np.ndarray, prior: np.ndarray, box) -> float:
    """Pixels gained minus pixels lost (by more than ``LESION_STEP``) inside the lesion's box."""
    if box is None:
        return 0.0
    d = (image - prior)[box]
    return float((d > LESION_STEP).sum() - (d < -LESION_STEP).sum())


def _testbed_split(manifest, cohort: Path, seed: int, strict: bool = False) -> dict[str, list[str]]:
    """The subjects' training / validation / test split exactly as ``forecaster_testbed.py`` makes it
    (``split_subjects(manifest.subjects, (0.7, 0.15, 0.15), seed=--seed)`` on the same cohort), so a
    ConvLSTM base trained by the testbed never saw a subject this benchmark tests on.

    ``strict``: the testbed uses one ``--seed`` for the cohort and the split; a cohort simulated with
    another seed than ``seed`` would give another split than the base's, so it is refused.
    """
    import json

    from monai_twin.data import split_subjects

    cohort_seed = json.loads((Path(cohort) / "cohort.json").read_text()).get("seed")
    if strict and cohort_seed is not None and int(cohort_seed) != int(seed):
        raise SystemExit(
            f"{cohort} was simulated with seed {cohort_seed}: the testbed split its subjects with that seed, "
            f"--seed {seed} would test on subjects its ConvLSTM base trained on"
        )
    split = split_subjects(manifest.subjects, (0.7, 0.15, 0.15), seed=seed)
    overlap = set(split["test"]) & (set(split["training"]) | set(split["validation"]))
    if overlap:
        raise RuntimeError(f"test subjects also in training / validation: {sorted(overlap)[:5]}")
    return split


def _load_or_train(module, path, train) -> tuple[list[float], float]:
    """Load ``module``'s weights (an autoencoder or a twin) from ``path`` if that file exists, else
    run ``train()`` (which returns the epoch losses) and save the weights there when ``path`` is given.

    Returns:
        the training losses (``[nan]`` when loaded) and the seconds it took.
    """
    t0 = time.perf_counter()
    if path and Path(path).is_file():
        module.load_state_dict(torch.load(path, weights_only=True))
        module.eval()
        print(f"{type(module).__name__} loaded from {path}")
        return [float("nan")], time.perf_counter() - t0
    losses = train()
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save(module.state_dict(), path)
    return losses, time.perf_counter() - t0


#: how the per-pixel std map of N samples becomes one uncertainty number per visit (``--uncertainty``;
#: ``monai_twin.inferers.diffusion.summarise_uncertainty``; the Spearman against the visit's mean
#: absolute error is the issue's figure): ``image``: the mean over the image; ``top5``: the mean of
#: its largest 5 %; ``change``: the mean of std x (the base forecast moves from the prior by more than
#: the floor); ``image+history``: sqrt(std^2 + s^2) averaged over the image, ``s`` the spread of the
#: ConvLSTM base over its 1..4 most recent prior scans (the base forecaster's own uncertainty,
#: ``--base-history-std``).
UNCERTAINTY_SUMMARIES = ("image", "top5", "change", "image+history")


def _uncertainty_summaries(std, priors, bases=None, history_std=None, floor=0.02) -> dict[str, np.ndarray]:
    """Per-visit summaries (:data:`UNCERTAINTY_SUMMARIES`) of the std maps ``std`` ``(N, 1, H, W)``:
    ``change`` only with the base forecasts ``bases``, ``image+history`` only with the base's spread
    over its prior scans ``history_std`` too."""
    from monai_twin.inferers.diffusion import summarise_uncertainty

    out = {u: summarise_uncertainty(std, u).numpy() for u in ("image", "top5")}
    if bases is not None:
        out["change"] = summarise_uncertainty(std, "change", prior=priors, base=bases, floor=floor).numpy()
        if history_std is not None:
            out["image+history"] = summarise_uncertainty(std, "image+history", base_std=history_std).numpy()
    return out


def _pearson(x, y) -> float:
    from scipy.stats import pearsonr

    return float(pearsonr(x, y).statistic) if len(x) > 2 and np.std(x) > 0 and np.std(y) > 0 else float("nan")


def _stack(samples, keys):
    return {k: torch.stack([s[k] for s in samples]) for k in keys}


#: the ConvLSTM twin's inputs (its prior scans, up to 4, and its EHR features)
def _convlstm_keys():
    from monai_twin.engines import FORECAST_CONDITION_KEYS

    return ("history", "target", *FORECAST_CONDITION_KEYS)


def _convlstm_encoding(args) -> dict:
    """The ConvLSTM twin's EHR encoding options (``forecaster_testbed._encoders`` / ``_samples``):
    ``--convlstm-testbed`` carries labs forward as the testbed does by default, and
    ``--cumulative-exposure`` adds each drug's dose x days to the interval features."""
    return {"carry_forward": bool(args.convlstm_testbed), "cumulative_exposure": bool(args.cumulative_exposure)}


def _build_convlstm(args, vocabulary, interval_dim: int, static_dim: int):
    """The ConvLSTM twin (``TwinForecaster``, ST-FiLM, 16/32 channels, 32 hidden, up to 4 prior scans).

    With ``--convlstm-testbed`` it is the network ``forecaster_testbed.py --conditioning stfilm`` builds
    with its defaults (the isolated future CA 15-3 head on the carried-forward lab, instance norm,
    flow scale 4) and ``--change`` = ``--convlstm-change``, so that a testbed checkpoint loads
    (strictly: a mismatch raises)."""
    from monai_twin.networks import TwinForecaster
    from monai_twin.transforms.ehr import EHRToIntervalFeatures

    extra = {"change": args.convlstm_change}
    if args.convlstm_testbed:
        from forecaster_testbed import FUTURE_CODE

        names = EHRToIntervalFeatures(vocabulary).feature_names  # as the testbed computes the index
        extra |= {
            "future_ehr_dim": 1,
            "future_ehr_base": [names.index(f"{FUTURE_CODE['mammo2d']}:last")],
            "isolate_ehr_head": True,
            "flow_scale": 4.0,
        }
    return TwinForecaster(
        2,
        1,
        channels=(16, 32),
        hidden_channels=32,
        ehr_interval_dim=interval_dim,
        ehr_static_dim=static_dim,
        conditioning="stfilm",
        max_history=4,
        **extra,
    )


def _train_convlstm(args, manifest, images, vocabulary, split):
    """The ConvLSTM twin (``TwinForecaster``, ST-FiLM, up to 4 prior scans) trained on the training subjects
    (loaded from ``--convlstm`` if that file exists, else saved there).

    Returns:
        the network (eval mode) and the training seconds.
    """
    from forecaster_testbed import _samples as forecaster_samples
    from monai.engines import SupervisedTrainer
    from torch.utils.data import DataLoader

    from monai_twin.data import build_longitudinal_items
    from monai_twin.engines import ForecastPrepareBatch

    keys = _convlstm_keys()
    training = forecaster_samples(
        manifest,
        build_longitudinal_items(manifest, max_history=4, subjects=split["training"]),
        images,
        vocabulary,
        4,
        **_convlstm_encoding(args),
    )
    tensors = [{k: s[k] for k in keys if k in s} for s in training]
    torch.manual_seed(args.seed)
    net = _build_convlstm(args, vocabulary, tensors[0]["ehr_intervals"].shape[-1], tensors[0]["ehr_static"].shape[-1])
    t0 = time.perf_counter()
    if args.convlstm and Path(args.convlstm).is_file():
        net.load_state_dict(torch.load(args.convlstm, weights_only=True))
        print(f"TwinForecaster loaded from {args.convlstm}")
        return net.eval(), time.perf_counter() - t0
    SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=args.convlstm_epochs,
        train_data_loader=DataLoader(tensors, batch_size=8, shuffle=True),
        network=net,
        optimizer=torch.optim.AdamW(net.parameters(), 1e-3),
        loss_function=torch.nn.MSELoss(),
        prepare_batch=ForecastPrepareBatch(),
        decollate=False,
    ).run()
    if args.convlstm:
        Path(args.convlstm).parent.mkdir(parents=True, exist_ok=True)
        torch.save(net.state_dict(), args.convlstm)
    net.eval()
    return net, time.perf_counter() - t0


def _convlstm_predict(net, items, images, vocabulary, encoding=None, batch_size=32) -> torch.Tensor:
    """The ConvLSTM twin's forecasts ``(N, 1, H, W)`` (clamped to [0, 1]) of longitudinal ``items``
    (``max_history=4``; their ``events`` may be edited; ``encoding``: :func:`_convlstm_encoding`)."""
    from forecaster_testbed import _encoders
    from forecaster_testbed import _sample as forecaster_sample

    from monai_twin.engines import FORECAST_CONDITION_KEYS

    encode = _encoders(vocabulary, 4, **(encoding or {}))
    samples = [forecaster_sample(item, images, encode, target=False) for item in items]
    out = []
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            part = samples[start : start + batch_size]
            b = {k: torch.stack([s[k] for s in part]) for k in ("history", *FORECAST_CONDITION_KEYS) if k in part[0]}
            out.append(net(b["history"], **{k: b[k] for k in FORECAST_CONDITION_KEYS if k in b}).clamp(0, 1))
    return torch.cat(out)


def _convlstm_section(args, manifest, images, vocabulary, split, data, trained=None) -> None:
    """The ConvLSTM twin (``TwinForecaster``, ST-FiLM, up to 4 prior scans) on the same test visits
    (``trained``: an already trained ``(net, seconds)``, e.g. the diffusion twin's base forecaster)."""
    import pandas as pd
    from forecaster_testbed import _samples as forecaster_samples
    from monai.metrics import PSNRMetric, SSIMMetric

    from monai_twin.data import build_longitudinal_items
    from monai_twin.engines import FORECAST_CONDITION_KEYS

    changed = {(m["subject_id"], m["target_index"]): m["changed"] for _, m in data["test"]}
    net, train_time = trained or _train_convlstm(args, manifest, images, vocabulary, split)
    keys = _convlstm_keys()
    fdata = {
        "test": forecaster_samples(
            manifest,
            build_longitudinal_items(manifest, max_history=4, subjects=split["test"]),
            images,
            vocabulary,
            4,
            **_convlstm_encoding(args),
        )
    }
    ssim = SSIMMetric(spatial_dims=2, data_range=1.0, reduction="none")
    psnr = PSNRMetric(max_val=1.0, reduction="none")
    rows = []
    net.eval()
    with torch.no_grad():
        for s in fdata["test"]:
            b = {k: s[k][None] for k in keys if k in s}
            pred = net(b["history"], **{k: b[k] for k in FORECAST_CONDITION_KEYS if k in b}).clamp(0, 1)
            rows.append(
                {
                    "changed": changed.get((s["subject_id"], s["target_index"]), False),
                    "ssim": float(ssim(pred, b["target"]).mean()),
                    "psnr": float(psnr(pred, b["target"]).mean()),
                }
            )
    print(f"\n== ConvLSTM twin (ST-FiLM, {args.convlstm_epochs} epochs in {train_time:.0f} s), same test visits")
    print(pd.DataFrame(rows).groupby("changed")[["ssim", "psnr"]].mean().round(3).to_string())


def mri_section(args) -> None:
    """The 3D configuration: a 32^3 brain-ROI cohort, SSIM / PSNR vs copy-last and the null-EHR check."""
    import pandas as pd
    from forecaster_testbed import _aligned_images
    from monai.metrics import PSNRMetric, SSIMMetric

    from monai_twin.data import build_longitudinal_items, load_manifest, split_subjects
    from monai_twin.data.synthetic import MRIROI3DConfig, write_cohort
    from monai_twin.engines import encode_latents, null_ehr_sample, train_autoencoder, train_diffusion_twin
    from monai_twin.inferers import DIFFUSION_CONDITION_KEYS, DIFFUSION_OPTIONAL_KEYS, LatentTwinInferer, make_scheduler
    from monai_twin.networks.diffusion import LatentDiffusionTwin, autoencoder_config
    from monai_twin.transforms.ehr import EHRVocabulary

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="diffusion_twin_"))
    cohort = work / f"mri_roi3d_{args.mri_subjects}_32_{args.seed}"
    if not (cohort / "cohort.json").is_file():
        write_cohort("mri_roi3d", cohort, args.mri_subjects, args.seed, MRIROI3DConfig(size=32), workers=1)
    manifest = load_manifest(cohort, check_images="exists")
    images = _aligned_images(cohort)
    truth = {(r.subject_id, int(r.visit)): r._asdict() for r in pd.read_parquet(cohort / "truth.parquet").itertuples()}
    split = split_subjects(manifest.subjects, (0.7, 0.15, 0.15), seed=args.seed)
    vocabulary = EHRVocabulary.fit(manifest.events, manifest.static, subjects=split["training"])
    data = {
        name: _samples(
            build_longitudinal_items(manifest, max_history=1, subjects=split[name]),
            images,
            vocabulary,
            args.max_tokens,
            truth,
        )
        for name in ("training", "test")
    }
    config = autoencoder_config(
        "mri_roi3d",
        change_weight=args.ae_change_weight,
        change_pool=args.ae_change_pool,
        **({"channels": tuple(args.mri_ae_channels)} if args.mri_ae_channels else {}),
    )
    autoencoder = config.build()
    train_images = torch.stack([torch.from_numpy(images[k][None]) for k in images if k[0] in set(split["training"])])
    _, ae_time = _load_or_train(
        autoencoder,
        args.mri_autoencoder,
        lambda: train_autoencoder(autoencoder, train_images, config, epochs=args.mri_ae_epochs, batch_size=8, lr=2e-3),
    )
    train = [s for s, _ in data["training"]]
    pairs = train + [null_ehr_sample(train[i], rng) for i in rng.choice(len(train), len(train) // 3, replace=False)]
    priors = encode_latents(autoencoder, torch.stack([s["prior_image"] for s in pairs]))
    scale_factor = float(1.0 / priors.std())
    priors = priors * scale_factor
    targets = encode_latents(autoencoder, torch.stack([s["target_image"] for s in pairs]), scale_factor)
    latents = [
        {"prior": p, "target": t, **{k: s[k] for k in DIFFUSION_CONDITION_KEYS + DIFFUSION_OPTIONAL_KEYS}}
        for p, t, s in zip(priors, targets, pairs)
    ]
    scheduler = make_scheduler("ddim", prediction_type=args.prediction)
    torch.manual_seed(args.seed)
    net = LatentDiffusionTwin(
        3,
        config.latent_channels,
        vocabulary.size,
        train[0]["ehr_static"].shape[0],
        interval_dim=train[0]["ehr_interval"].shape[0] if args.ehr_path == "interval" else 0,
    )
    t0 = time.perf_counter()
    losses = train_diffusion_twin(net, scheduler, latents, epochs=args.mri_epochs, batch_size=32, lr=1e-3)
    twin_time = time.perf_counter() - t0
    test = [s for s, _ in data["test"]]
    prior_images = torch.stack([s["prior_image"] for s in test])
    target_images = torch.stack([s["target_image"] for s in test])
    conditions = _stack(test, DIFFUSION_CONDITION_KEYS + DIFFUSION_OPTIONAL_KEYS)
    inferer = LatentTwinInferer(
        scheduler, autoencoder, scale_factor, num_inference_steps=args.steps, change_threshold=args.change_threshold
    )
    null = {k: (torch.zeros_like(v) if k != "ehr_static" else v) for k, v in conditions.items()}
    means, null_means = [], []
    for start in range(0, len(test), 8):
        sl = slice(start, start + 8)
        c = {k: v[sl] for k, v in conditions.items()}
        means.append(inferer.forecast(prior_images[sl], net, c, args.n_samples, seed=args.seed)["mean"].clamp(0, 1))
        c = {k: v[sl] for k, v in null.items()}
        null_means.append(inferer.forecast(prior_images[sl], net, c, 4, seed=1)["mean"].clamp(0, 1))
    mean, null_mean = torch.cat(means), torch.cat(null_means)
    ssim = SSIMMetric(spatial_dims=3, data_range=1.0, reduction="none")
    psnr = PSNRMetric(max_val=1.0, reduction="none")
    rows = []
    for name, image in (("diffusion", mean), ("copy_last", prior_images)):
        for i, (sv, pv) in enumerate(
            zip(ssim(image, target_images).reshape(-1), psnr(image, target_images).reshape(-1))
        ):
            rows.append({"model": name, "changed": data["test"][i][1]["changed"], "ssim": float(sv), "psnr": float(pv)})
    print(
        f"\n== 3D brain ROI 32^3: autoencoder {args.mri_ae_epochs} epochs in {ae_time:.0f} s, twin {args.mri_epochs} "
        f"epochs on {len(latents)} pairs in {twin_time:.0f} s (loss {np.mean(losses[:3]):.4f} -> {np.mean(losses[-3:]):.4f})"
    )
    print(pd.DataFrame(rows).groupby(["changed", "model"])[["ssim", "psnr"]].mean().round(3).to_string())
    null_ssim = ssim(null_mean, prior_images).reshape(-1)
    print(f"null-EHR check (3D): SSIM(forecast, prior) mean {null_ssim.mean():.3f}, min {null_ssim.min():.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=100)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ae-epochs", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=150, help="denoiser epochs")
    parser.add_argument("--schedulers", nargs="+", default=["ddim"], choices=["ddim", "rflow"])
    parser.add_argument("--n-samples", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument(
        "--prediction",
        default="sample",
        choices=["epsilon", "sample", "v_prediction"],
        help="DDIM prediction type (what the denoiser is trained to output)",
    )
    parser.add_argument(
        "--ehr-path",
        default="interval",
        choices=["interval", "crossattn"],
        help="interval: the prior-scan -> target interval features also drive the timestep embedding; "
        "crossattn: EHR tokens through cross-attention only",
    )
    parser.add_argument(
        "--change-threshold",
        type=float,
        default=0.02,
        help="decoded changes at most this (image units) keep the prior (LatentTwinInferer.change_threshold)",
    )
    parser.add_argument("--twin-channels", type=int, nargs="+", default=[32, 64], help="denoiser UNet channels")
    parser.add_argument(
        "--ae-change-weight", type=float, default=0.0, help="weight of the autoencoders' change term on pairs"
    )
    parser.add_argument("--ae-change-pool", type=int, default=4, help="the change term's average pooling (voxels)")
    parser.add_argument(
        "--ae-change-epochs", type=int, default=0, help="2D: epochs on (prior, target) pairs after --ae-epochs"
    )
    parser.add_argument("--ae-latent-channels", type=int, default=None, help="2D autoencoder latent channels")
    parser.add_argument(
        "--ae-channels", type=int, nargs="+", default=None, help="2D autoencoder channels (default: the preset's)"
    )
    parser.add_argument(
        "--autoencoder", default=None, help="2D autoencoder weights: loaded if the file exists, else saved there"
    )
    parser.add_argument(
        "--twin",
        default=None,
        help="2D twin weights ('{kind}' is replaced by the scheduler): loaded if the file exists, else saved there",
    )
    parser.add_argument("--null-fraction", type=float, default=0.3, help="null-EHR pairs per training pair")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--convlstm-epochs", type=int, default=0, help="> 0 also trains the ConvLSTM twin")
    parser.add_argument(
        "--convlstm", default=None, help="ConvLSTM twin weights: loaded if the file exists, else saved there"
    )
    parser.add_argument(
        "--cohort",
        default=None,
        help="an existing 2D cohort folder (read only), e.g. the forecaster testbed's <workdir>/mammo2d_600_64_<seed>; "
        "default: <workdir>/mammo2d_<subjects>_<size>_<seed>, simulated if missing",
    )
    parser.add_argument(
        "--convlstm-testbed",
        action="store_true",
        help="build and encode the ConvLSTM twin as forecaster_testbed.py --conditioning stfilm does (carried-forward "
        "labs, its future CA 15-3 head), so that --convlstm can be one of its network_key_metric*.pt; checks that the "
        "cohort's seed is --seed (the testbed's split)",
    )
    parser.add_argument(
        "--convlstm-change",
        default="additive",
        choices=["additive", "deformation"],
        help="the ConvLSTM twin's change head (forecaster_testbed.py --change)",
    )
    parser.add_argument(
        "--cumulative-exposure",
        action="store_true",
        help="the ConvLSTM twin's interval features also hold each drug's dose x days (forecaster_testbed.py "
        "--cumulative-exposure)",
    )
    parser.add_argument(
        "--base-forecast",
        default="none",
        choices=["none", "convlstm"],
        help="convlstm: residual diffusion on the ConvLSTM twin's forecast (LatentDiffusionTwin(base_forecast=True); "
        "trains the ConvLSTM twin with --convlstm-epochs first)",
    )
    parser.add_argument("--figures", default=None, help="folder for diffusion_*.png")
    parser.add_argument("--workdir", default=None)
    parser.add_argument(
        "--whatif-guidance",
        type=float,
        nargs="+",
        default=[1.0, 3.0],
        help="what-if guidance scales: all reported, or the candidates of --select-guidance",
    )
    parser.add_argument(
        "--select-guidance",
        action="store_true",
        help="choose the what-if guidance among --whatif-guidance by Pearson r on validation visits; report it on test",
    )
    parser.add_argument(
        "--whatif-floors",
        type=float,
        nargs="+",
        default=None,
        help="floors on the decoded change for the what-if (default: --change-threshold); "
        "several: candidates of --select-guidance",
    )
    parser.add_argument(
        "--autoencoder-only",
        action="store_true",
        help="train (or load) the 2D autoencoder of --autoencoder and stop: lets it train while the ConvLSTM base does",
    )
    parser.add_argument(
        "--val-whatif-visits", type=int, default=40, help="validation visits with a lesion used by --select-guidance"
    )
    parser.add_argument(
        "--whatif-max-visits",
        type=int,
        default=0,
        help="the test what-if on the first N test visits with a lesion (in split order; 0: all of them)",
    )
    parser.add_argument(
        "--report-all-guidance", action="store_true", help="with --select-guidance also report the other candidates"
    )
    parser.add_argument(
        "--eta",
        type=float,
        nargs="+",
        default=[0.0],
        help="DDIM eta (step noise); several: chosen by the per-subject uncertainty Spearman on validation",
    )
    parser.add_argument(
        "--uncertainty",
        nargs="+",
        default=["image"],
        choices=list(UNCERTAINTY_SUMMARIES),
        help="per-visit summary of the std map for the uncertainty Spearman; several: chosen with --eta on validation "
        "(change and image+history need --base-forecast convlstm; image+history also --base-history-std)",
    )
    parser.add_argument(
        "--base-history-std",
        action="store_true",
        help="with a ConvLSTM base: also forecast each validation / test visit from its 1, 2, 3 and 4 most recent "
        "prior scans; the per-pixel spread is the base's own uncertainty (--uncertainty image+history)",
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="denoiser learning rate")
    parser.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"])
    parser.add_argument("--ema", type=float, default=0.0, help="EMA decay of the denoiser weights (0 = off)")
    parser.add_argument("--save", default=None, help="folder for the trained weights")
    parser.add_argument("--mri-subjects", type=int, default=0, help="> 0 also runs the 3D brain-ROI configuration")
    parser.add_argument("--mri-ae-epochs", type=int, default=10)
    parser.add_argument("--mri-epochs", type=int, default=60)
    parser.add_argument("--mri-ae-channels", type=int, nargs="+", default=None, help="3D autoencoder channels")
    parser.add_argument("--mri-autoencoder", default=None, help="3D autoencoder weights: loaded if the file exists")
    parser.add_argument("--convlstm-only", action="store_true", help="only the ConvLSTM twin on the same split")
    parser.add_argument("--skip-mammo", action="store_true", help="only the 3D configuration")
    args = parser.parse_args()
    if args.mri_subjects > 0 and args.skip_mammo:
        mri_section(args)
        return

    import pandas as pd
    from forecaster_testbed import _aligned_images
    from monai.metrics import PSNRMetric, SSIMMetric
    from scipy.stats import pearsonr, spearmanr

    from monai_twin.data import build_longitudinal_items, edit_events, load_manifest
    from monai_twin.data.synthetic import Mammo2DConfig, load_subject, resimulate, write_cohort
    from monai_twin.engines import encode_latents, null_ehr_sample, train_autoencoder, train_diffusion_twin
    from monai_twin.inferers import (
        DIFFUSION_CONDITION_KEYS,
        DIFFUSION_OPTIONAL_KEYS,
        LatentTwinInferer,
        make_scheduler,
        save_forecast_png,
    )
    from monai_twin.inferers.whatif import save_what_if_png
    from monai_twin.networks.diffusion import LatentDiffusionTwin, autoencoder_config
    from monai_twin.transforms.ehr import EHRVocabulary

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="diffusion_twin_"))
    t0 = time.perf_counter()
    if args.cohort:  # an existing cohort (e.g. the forecaster testbed's), read only
        cohort = Path(args.cohort)
        if not (cohort / "cohort.json").is_file():
            raise SystemExit(f"--cohort {cohort}: no cohort.json there")
    else:
        cohort = work / f"mammo2d_{args.subjects}_{args.size}_{args.seed}"
        if not (cohort / "cohort.json").is_file():
            write_cohort("mammo2d", cohort, args.subjects, args.seed, Mammo2DConfig(size=args.size), workers=1)
    manifest = load_manifest(cohort, check_images="exists")
    images = _aligned_images(cohort)
    truth_frame = pd.read_parquet(cohort / "truth.parquet")
    truth = {(r.subject_id, int(r.visit)): r._asdict() for r in truth_frame.itertuples()}
    split = _testbed_split(manifest, cohort, args.seed, strict=args.convlstm_testbed)
    print(
        f"split (forecaster testbed's: split_subjects 0.7 / 0.15 / 0.15, seed {args.seed}): "
        f"{len(split['training'])} training / {len(split['validation'])} validation / {len(split['test'])} test subjects"
    )
    vocabulary = EHRVocabulary.fit(manifest.events, manifest.static, subjects=split["training"])
    data = {
        name: _samples(
            build_longitudinal_items(manifest, max_history=1, subjects=split[name]),
            images,
            vocabulary,
            args.max_tokens,
            truth,
        )
        for name in ("training", "validation", "test")
    }
    boxes = _lesion_boxes(cohort, split["training"] + split["validation"] + split["test"])
    spacing = Mammo2DConfig(size=args.size).spacing
    print(
        f"cohort ready in {time.perf_counter() - t0:.0f} s: {len(data['training'])} training / {len(data['test'])} test pairs"
    )

    if args.autoencoder_only and not args.autoencoder:
        raise SystemExit("--autoencoder-only needs --autoencoder PATH (where the weights go)")
    convlstm = None  # the autoencoder alone (--autoencoder-only) needs no base
    if (
        args.convlstm_epochs > 0
        and not args.autoencoder_only
        and (args.convlstm_only or args.base_forecast == "convlstm")
    ):
        convlstm = _train_convlstm(args, manifest, images, vocabulary, split)
    if args.convlstm_only:
        _convlstm_section(args, manifest, images, vocabulary, split, data, trained=convlstm)
        return
    use_base = args.base_forecast == "convlstm" and not args.autoencoder_only
    items4 = {}
    if use_base:
        # the base forecast of every pair: the ConvLSTM twin's prediction of the same target
        if convlstm is None:
            raise SystemExit("--base-forecast convlstm needs --convlstm-epochs > 0")
        t0 = time.perf_counter()
        for name in ("training", "validation", "test"):
            for item in build_longitudinal_items(manifest, max_history=4, subjects=split[name]):
                items4[(item["subject_id"], item["target_index"])] = item
            part = data[name]
            bases = _convlstm_predict(
                convlstm[0],
                [items4[(m["subject_id"], m["target_index"])] for _, m in part],
                images,
                vocabulary,
                _convlstm_encoding(args),
            )
            for (sample, _), base in zip(part, bases):
                sample["base_image"] = base
        print(f"base forecasts (ConvLSTM twin) of every pair in {time.perf_counter() - t0:.0f} s")
        if args.base_history_std:
            # the base forecaster's own uncertainty: its spread over the 1, 2, 3 and 4 most recent prior scans
            t0 = time.perf_counter()
            for name in ("validation", "test"):
                part = data[name]
                keys = [(m["subject_id"], m["target_index"]) for _, m in part]
                runs = [torch.stack([s["base_image"] for s, _ in part])]
                for k in (1, 2, 3):
                    items_k = {
                        (i["subject_id"], i["target_index"]): i
                        for i in build_longitudinal_items(manifest, max_history=k, subjects=split[name])
                    }
                    runs.append(
                        _convlstm_predict(
                            convlstm[0], [items_k[key] for key in keys], images, vocabulary, _convlstm_encoding(args)
                        )
                    )
                spread = torch.stack(runs).std(0)
                for (sample, _), sd in zip(part, spread):
                    sample["base_history_std"] = sd
            print(f"base spread over 1..4 prior scans (validation, test) in {time.perf_counter() - t0:.0f} s")

    # ---- autoencoder
    ae_config = autoencoder_config(
        "mammo2d",
        change_weight=args.ae_change_weight,
        change_pool=args.ae_change_pool,
        **({"channels": tuple(args.ae_channels)} if args.ae_channels else {}),
        **({"latent_channels": args.ae_latent_channels} if args.ae_latent_channels else {}),
    )
    autoencoder = ae_config.build()
    train_images = torch.stack([torch.from_numpy(images[k][None]) for k in images if k[0] in set(split["training"])])

    def train_2d_autoencoder() -> list[float]:
        # stage 1: every training scan; stage 2 (--ae-change-epochs): (prior, target) pairs of the
        # training subjects with the change term, so that the latent keeps a lesion-boundary move
        losses = train_autoencoder(autoencoder, train_images, ae_config, epochs=args.ae_epochs, batch_size=16, lr=2e-3)
        if args.ae_change_epochs > 0:
            pairs_images = torch.stack(
                [torch.stack([s["prior_image"], s["target_image"]]) for s, _ in data["training"]]
            )
            losses += train_autoencoder(
                autoencoder, pairs_images, ae_config, epochs=args.ae_change_epochs, batch_size=16, lr=2e-3
            )
        return losses

    ae_losses, ae_time = _load_or_train(autoencoder, args.autoencoder, train_2d_autoencoder)
    ssim = SSIMMetric(spatial_dims=2, data_range=1.0, reduction="none")
    psnr = PSNRMetric(max_val=1.0, reduction="none")
    test_images = torch.stack([s["target_image"] for s, _ in data["test"]])
    with torch.no_grad():
        recon = autoencoder.decode(autoencoder.encode(test_images)[0]).clamp(0, 1)
    print(
        f"autoencoder: {args.ae_epochs} + {args.ae_change_epochs} (pairs) epochs in {ae_time:.0f} s, loss {ae_losses[0]:.4f} -> {ae_losses[-1]:.4f}; "
        f"test reconstruction SSIM {ssim(recon, test_images).mean():.3f}, PSNR {psnr(recon, test_images).mean():.2f} dB"
    )
    if args.autoencoder_only:
        return

    # ---- latents (null-EHR pairs included) and the gain of the lesion-area reader
    train = [s for s, _ in data["training"]]
    n_null = int(round(args.null_fraction * len(train)))
    null = [null_ehr_sample(train[i], rng) for i in rng.choice(len(train), n_null, replace=False)]
    pairs = train + null
    priors = encode_latents(autoencoder, torch.stack([s["prior_image"] for s in pairs]))
    scale_factor = float(1.0 / priors.std())
    priors = priors * scale_factor
    targets = encode_latents(autoencoder, torch.stack([s["target_image"] for s in pairs]), scale_factor)
    latent_samples = [
        {"prior": p, "target": t, **{k: s[k] for k in DIFFUSION_CONDITION_KEYS + DIFFUSION_OPTIONAL_KEYS}}
        for p, t, s in zip(priors, targets, pairs)
    ]
    if use_base:  # null-EHR pairs: the base forecast is the prior (null_ehr_sample)
        base_latents = encode_latents(autoencoder, torch.stack([s["base_image"] for s in pairs]), scale_factor)
        for sample, z in zip(latent_samples, base_latents):
            sample["base"] = z
    sums, deltas = [], []
    for s, meta in data["training"]:
        box = boxes[meta["subject_id"]]
        if box is not None:
            sums.append(_box_count(s["target_image"][0].numpy(), s["prior_image"][0].numpy(), box) * spacing**2)
            deltas.append(meta["target_area"] - meta["prior_area"])
    gain = float(np.dot(sums, deltas) / np.dot(sums, sums))
    # a second, continuous reader for what-if changes (a blurred mean change may stay under the step)
    intensity = [
        float((s["target_image"] - s["prior_image"])[0].numpy()[boxes[m["subject_id"]]].sum()) * spacing**2
        for s, m in data["training"]
        if boxes[m["subject_id"]] is not None
    ]
    intensity_gain = float(np.dot(intensity, deltas) / np.dot(intensity, intensity))

    def area(image: np.ndarray, meta: dict) -> float:
        box = boxes[meta["subject_id"]]
        prior = data_lookup[(meta["subject_id"], meta["target_index"])]["prior_image"][0].numpy()
        return meta["prior_area"] + gain * _box_count(image, prior, box) * spacing**2

    data_lookup = {(m["subject_id"], m["target_index"]): s for s, m in data["test"] + data["validation"]}
    lesion_test = [(s, m) for s, m in data["test"] if boxes[m["subject_id"]] is not None]
    lesion_test_what_if = lesion_test[: args.whatif_max_visits] if args.whatif_max_visits else lesion_test
    lesion_validation = [(s, m) for s, m in data["validation"] if boxes[m["subject_id"]] is not None]

    def what_if_eval(inferer, net, pairs, guidances, floors, keep_output=False, chunk=16) -> dict:
        """Stop the drug after the last prior scan (or start 40 mg/day) on each visit of ``pairs``:
        the true change of lesion area (``resimulate``), the continuous reader on the simulator's
        recorded / counterfactual images, and the forecast change (both readers) at each guidance
        and each floor on the decoded change (``LatentTwinInferer.change_threshold``, applied here
        to the same samples), shared noise, ``chunk`` visits per batch. With a base forecast the
        ConvLSTM twin forecasts the edited events too (``edited_base``), the floors apply to the
        change from each base, and ``base_sum`` is the base forecasts' own what-if (no diffusion)."""
        from monai_twin.engines import twin_conditions

        def edit(events, code, last, target_time):
            try:
                return edit_events(events, code, value=0.0, after=last, before=target_time)
            except ValueError:  # not taking the drug there: start it
                return _start_drug(events, code, 40.0, last, target_time)

        keys = DIFFUSION_CONDITION_KEYS + DIFFUSION_OPTIONAL_KEYS
        true, read_true, edited_conditions, edited_items4 = [], [], [], []
        for _, meta in pairs:
            item = meta["item"]
            last, target_time = float(item["history_times"][-1]), float(item["target_time"])
            subject = load_subject(cohort, meta["subject_id"])
            code = subject.drug_code
            edited = edit(item["events"], code, last, target_time)
            if use_base:
                item4 = items4[(meta["subject_id"], meta["target_index"])]
                edited_items4.append(dict(item4, events=edit(item4["events"], code, last, target_time)))
            edited_conditions.append(twin_conditions(dict(item, events=edited), vocabulary, args.max_tokens))
            cf_events = pd.DataFrame({k: v for k, v in edited.items() if k in ("time", "code", "numeric_value")})
            cf_visit = resimulate(subject, cf_events, days=[target_time])
            true.append(float(cf_visit.truth["lesion_area_mm2"].iloc[0]) - meta["target_area"])
            # the same reader on the simulator's own recorded / counterfactual images (its ceiling)
            recorded_image = np.asarray(resimulate(subject, days=[target_time]).aligned[0], dtype=np.float32)
            cf_image = np.asarray(cf_visit.aligned[0], dtype=np.float32)
            box = boxes[meta["subject_id"]]
            read_true.append(intensity_gain * float((cf_image - recorded_image)[box].sum()) * spacing**2)
        out = {"true": true, "read_true": read_true, "predicted_sum": {}, "predicted_area": {}, "base_sum": []}
        edited_base = (
            _convlstm_predict(convlstm[0], edited_items4, images, vocabulary, _convlstm_encoding(args))
            if use_base
            else None
        )
        if use_base:
            for i, (s, meta) in enumerate(pairs):
                diff = (edited_base[i] - s["base_image"])[0].numpy()
                out["base_sum"].append(intensity_gain * float(diff[boxes[meta["subject_id"]]].sum()) * spacing**2)
        configs = [(w, f) for w in guidances for f in floors]
        for c in configs:
            out["predicted_sum"][c], out["predicted_area"][c] = [], []
        saved_floor, inferer.change_threshold = inferer.change_threshold, 0.0
        try:
            for w in guidances:
                for start in range(0, len(pairs), chunk):
                    part = pairs[start : start + chunk]
                    prior = torch.stack([s["prior_image"] for s, _ in part])
                    cond = _stack([s for s, _ in part], keys)
                    edited_cond = _stack(edited_conditions[start : start + chunk], keys)
                    ref = torch.stack([s["base_image"] for s, _ in part]) if use_base else prior
                    edited_ref = edited_base[start : start + chunk] if use_base else prior
                    bases = {"base_image": ref, "edited_base_image": edited_ref} if use_base else {}
                    o = inferer.what_if(
                        prior, net, cond, edited_cond, args.n_samples, seed=args.seed, guidance_scale=w, **bases
                    )
                    for f in floors:

                        def floored(mean, reference, f=f):
                            change = mean - reference
                            return reference + torch.where(change.abs() > f, change, torch.zeros_like(change))

                        base, cf = floored(o["baseline"], ref), floored(o["counterfactual"], edited_ref)
                        for i, (_, meta) in enumerate(part):
                            box = boxes[meta["subject_id"]]
                            diff = (cf - base)[i, 0].numpy()
                            out["predicted_sum"][(w, f)].append(intensity_gain * float(diff[box].sum()) * spacing**2)
                            out["predicted_area"][(w, f)].append(
                                area(cf[i, 0].numpy(), meta) - area(base[i, 0].numpy(), meta)
                            )
                        if keep_output:
                            out["output"] = dict(o, baseline=base, counterfactual=cf, difference=cf - base)
        finally:
            inferer.change_threshold = saved_floor
        return out

    reader_err = np.mean([abs(area(s["target_image"][0].numpy(), m) - m["target_area"]) for s, m in lesion_test])
    print(f"lesion-area reader: gain {gain:.2f}; its error on the true target images {reader_err:.1f} mm^2 (the floor)")

    # the continuous reader on true images and on autoencoder reconstructions of them (test pairs with a lesion)
    def mass(image: torch.Tensor, prior: torch.Tensor, meta: dict) -> float:
        box = boxes[meta["subject_id"]]
        return intensity_gain * float((image - prior)[0].numpy()[box].sum()) * spacing**2

    true_change = [m["target_area"] - m["prior_area"] for _, m in lesion_test]
    with torch.no_grad():
        pair_prior = torch.stack([s["prior_image"] for s, _ in lesion_test])
        pair_target = torch.stack([s["target_image"] for s, _ in lesion_test])
        rec_prior = autoencoder.decode(autoencoder.encode(pair_prior)[0])
        rec_target = autoencoder.decode(autoencoder.encode(pair_target)[0])
    on_true = [mass(s["target_image"], s["prior_image"], m) for s, m in lesion_test]
    on_recon = [mass(rec_target[i], rec_prior[i], m) for i, (_, m) in enumerate(lesion_test)]
    floor = args.change_threshold
    kept = [
        torch.where((rec_target[i] - rec_prior[i]).abs() > floor, rec_target[i], rec_prior[i])
        for i in range(len(lesion_test))
    ]
    on_recon_kept = [mass(kept[i], rec_prior[i], m) for i, (_, m) in enumerate(lesion_test)]
    print(
        f"continuous reader (x {intensity_gain:.2f}) on the {len(lesion_test)} test pairs with a lesion: "
        f"r(read change, true change) = {pearsonr(on_true, true_change).statistic:.3f} on the true images, "
        f"{pearsonr(on_recon, true_change).statistic:.3f} on autoencoder reconstructions, "
        f"{pearsonr(on_recon_kept, true_change).statistic:.3f} on their changes above {floor} "
        f"(mean |change| true {np.mean(np.abs(true_change)):.1f}, read {np.mean(np.abs(on_true)):.1f} / "
        f"{np.mean(np.abs(on_recon)):.1f} mm^2)"
    )

    test_samples = [s for s, _ in data["test"]]
    test_meta = [m for _, m in data["test"]]
    prior_images = torch.stack([s["prior_image"] for s in test_samples])
    target_images = torch.stack([s["target_image"] for s in test_samples])
    conditions = _stack(test_samples, DIFFUSION_CONDITION_KEYS + DIFFUSION_OPTIONAL_KEYS)
    base_images = torch.stack([s["base_image"] for s in test_samples]) if use_base else None
    twins = {}
    interval_dim = conditions["ehr_interval"].shape[1] if args.ehr_path == "interval" else 0
    for kind in args.schedulers:
        scheduler = make_scheduler(kind, **({} if kind == "rflow" else {"prediction_type": args.prediction}))
        torch.manual_seed(args.seed)
        net = LatentDiffusionTwin(
            2,
            ae_config.latent_channels,
            vocabulary.size,
            conditions["ehr_static"].shape[1],
            channels=tuple(args.twin_channels),
            attention_levels=(False,) * (len(args.twin_channels) - 1) + (True,),
            interval_dim=interval_dim,
            base_forecast=use_base,
        )
        losses, twin_time = _load_or_train(
            net,
            args.twin.replace("{kind}", kind) if args.twin else None,
            lambda net=net, scheduler=scheduler: train_diffusion_twin(
                net,
                scheduler,
                latent_samples,
                epochs=args.epochs,
                batch_size=32,
                lr=args.lr,
                seed=args.seed,
                ema_decay=args.ema,
                lr_schedule=None if args.lr_schedule == "constant" else args.lr_schedule,
            ),
        )
        print(
            f"\n== twin ({kind}): {args.epochs} epochs on {len(latent_samples)} pairs ({n_null} null-EHR) in "
            f"{twin_time:.0f} s, loss {np.mean(losses[:3]):.4f} -> {np.mean(losses[-3:]):.4f}"
        )
        if args.save:
            Path(args.save).mkdir(parents=True, exist_ok=True)
            torch.save(autoencoder.state_dict(), Path(args.save) / "autoencoder.pt")
            torch.save(net.state_dict(), Path(args.save) / f"twin_{kind}.pt")
        inferer = LatentTwinInferer(
            scheduler,
            autoencoder,
            scale_factor,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            change_threshold=args.change_threshold,
        )
        twins[kind] = (net, inferer)

        def forecast_eval(pairs, eta, net=net, inferer=inferer):
            """Forecasts (mean of N samples, in chunks) of ``pairs`` and the uncertainty Spearmans of
            each way of summing the std map into one number per visit (:data:`UNCERTAINTY_SUMMARIES`)
            against the visit's mean absolute error, over visits and over subjects (their means).

            Returns:
                the mean forecasts, the std maps, ``{summary: (rho_visits, rho_subjects)}`` and the
                number of subjects.
            """
            priors = torch.stack([s["prior_image"] for s, _ in pairs])
            targets = torch.stack([s["target_image"] for s, _ in pairs])
            cond = _stack([s for s, _ in pairs], DIFFUSION_CONDITION_KEYS + DIFFUSION_OPTIONAL_KEYS)
            bases = torch.stack([s["base_image"] for s, _ in pairs]) if use_base else None
            means, stds = [], []
            for start in range(0, len(pairs), 16):
                sl = slice(start, start + 16)
                out = inferer.forecast(
                    priors[sl],
                    net,
                    {k: v[sl] for k, v in cond.items()},
                    args.n_samples,
                    seed=args.seed,
                    eta=eta,
                    base_image=None if bases is None else bases[sl],
                )
                means.append(out["mean"].clamp(0, 1))
                stds.append(out["std"])
            mean, std = torch.cat(means), torch.cat(stds)
            abs_err = (mean - targets).abs().flatten(1).mean(1).numpy()
            history_std = (
                torch.stack([s["base_history_std"] for s, _ in pairs]) if use_base and args.base_history_std else None
            )
            scores = _uncertainty_summaries(std, priors, bases, history_std, args.change_threshold)
            sids = [m["subject_id"] for _, m in pairs]
            rho = {}
            for name, score in scores.items():
                frame = pd.DataFrame({"sid": sids, "u": score, "err": abs_err}).groupby("sid").mean()
                rho[name] = (spearmanr(score, abs_err).statistic, spearmanr(frame["u"], frame["err"]).statistic)
            return mean, std, rho, len(set(sids))

        # the DDIM eta (step noise) and the summary of the std map chosen on the validation visits by
        # the per-subject uncertainty Spearman
        etas = list(dict.fromkeys(args.eta))
        summaries = list(dict.fromkeys(args.uncertainty))
        if len(etas) > 1 or len(summaries) > 1:
            val_rho = {e: forecast_eval(data["validation"], e)[2] for e in etas}
            candidates = [(e, u) for e in etas for u in summaries if u in val_rho[e]]
            eta, summary = max(candidates, key=lambda c: (np.nan_to_num(val_rho[c[0]][c[1]][1], nan=-2.0), -c[0]))
            print(
                f"DDIM eta and std summary chosen on {len(data['validation'])} validation visits "
                "(Spearman over visits / subjects):\n"
                + "\n".join(f"   eta {e}, {u}: {val_rho[e][u][0]:.3f} / {val_rho[e][u][1]:.3f}" for e, u in candidates)
                + f"\n   -> eta {eta}, {summary}"
            )
        else:
            eta, summary = etas[0], summaries[0]
        inferer.eta = eta

        # forecasts
        mean, std, test_rho, n_subjects = forecast_eval(data["test"], eta)
        rho_items, rho_subjects = test_rho[summary]
        rows = []
        models = [("diffusion", mean), ("copy_last", prior_images)]
        if use_base:
            models.append(("base_convlstm", base_images))
        for name, image in models:
            s_ = ssim(image, target_images).reshape(-1).tolist()
            p_ = psnr(image, target_images).reshape(-1).tolist()
            for i, meta in enumerate(test_meta):
                has = boxes[meta["subject_id"]] is not None
                err = abs(area(image[i, 0].numpy(), meta) - meta["target_area"]) if has else np.nan
                rows.append(
                    {"model": name, "changed": meta["changed"], "ssim": s_[i], "psnr": p_[i], "lesion_err_mm2": err}
                )
        table = pd.DataFrame(rows).groupby(["changed", "model"])[["ssim", "psnr", "lesion_err_mm2"]].mean()
        counts = pd.DataFrame(rows)[lambda f: f.model == "copy_last"].groupby("changed").size()
        print(
            f"forecast vs target (mean of {args.n_samples} samples, {args.steps} steps, guidance {args.guidance}); n = {counts.to_dict()}"
        )
        print(table.round(3).to_string())

        print(
            f"uncertainty (eta {eta}, {summary}): Spearman(per-visit std summary, mean abs error) = {rho_items:.3f} "
            f"over {len(test_meta)} test items, {rho_subjects:.3f} over {n_subjects} subjects (target >= 0.5)"
        )
        others = [u for u in test_rho if u != summary]
        if others:
            print(
                "   the other summaries on test (not chosen; visits / subjects): "
                + ", ".join(f"{u} {test_rho[u][0]:.3f} / {test_rho[u][1]:.3f}" for u in others)
            )

        # null-EHR check
        null_cond = {k: v.clone() for k, v in conditions.items()}
        for k in (
            "ehr_tokens_code",
            "ehr_tokens_value",
            "ehr_tokens_time",
            "ehr_tokens_mask",
            "gap",
            *DIFFUSION_OPTIONAL_KEYS,
        ):
            null_cond[k] = torch.zeros_like(null_cond[k])
        null_means = []
        for start in range(0, len(test_samples), 16):
            sl = slice(start, start + 16)
            # a residual twin on a base forecast: with no events and no time the base is the prior
            null_base = {"base_image": prior_images[sl]} if use_base else {}
            null_means.append(
                inferer.forecast(
                    prior_images[sl], net, {k: v[sl] for k, v in null_cond.items()}, 4, seed=1, **null_base
                )["mean"].clamp(0, 1)
            )
        null_ssim = ssim(torch.cat(null_means), prior_images).reshape(-1)
        print(
            f"null-EHR check: SSIM(forecast, prior) mean {null_ssim.mean():.3f}, min {null_ssim.min():.3f} (target >= 0.9)"
        )

        # what-if against the true counterfactual; the guidance and the floor on the decoded change
        # are chosen on validation visits (--select-guidance), never on the test visits that report them
        guidances = list(dict.fromkeys(args.whatif_guidance))
        floors = list(dict.fromkeys(args.whatif_floors or [args.change_threshold]))
        configs = [(w, f) for w in guidances for f in floors]
        if args.select_guidance and len(configs) > 1:
            val = lesion_validation[: args.val_whatif_visits]
            v = what_if_eval(inferer, net, val, guidances, floors)
            val_r = {c: _pearson(v["predicted_sum"][c], v["true"]) for c in configs}
            chosen = max(configs, key=lambda c: (np.nan_to_num(val_r[c], nan=-2.0), -c[0], c[1]))
            print(
                f"what-if (guidance, floor) chosen on {len(val)} validation visits with a lesion: "
                + ", ".join(f"{c}: r = {val_r[c]:.3f}" for c in configs)
                + f" -> {chosen}"
            )
            report_guidances = [chosen[0]] + (
                [w for w in guidances if w != chosen[0]] if args.report_all_guidance else []
            )
            report_floors = [chosen[1]] + ([f for f in floors if f != chosen[1]] if args.report_all_guidance else [])
        else:
            chosen, report_guidances, report_floors = configs[0], guidances, floors
        wi = what_if_eval(inferer, net, lesion_test_what_if, report_guidances, report_floors)
        true, read_true = wi["true"], wi["read_true"]
        print(
            f"what-if (stop the drug after the last prior scan, or start 40 mg/day): n = {len(true)} test visits, "
            f"true change {np.mean(np.abs(true)):.1f} mm^2 on average"
        )
        print(
            f"   the continuous reader on the true recorded / counterfactual images: r = "
            f"{_pearson(read_true, true):.3f}, read {np.mean(np.abs(read_true)):.1f} mm^2 on average"
        )
        if use_base:
            print(
                f"   the base forecasts alone (ConvLSTM twin, recorded / edited events): r = "
                f"{_pearson(wi['base_sum'], true):.3f}, predicted {np.mean(np.abs(wi['base_sum'])):.2f} mm^2 on average"
            )
        for c in wi["predicted_sum"]:
            tag = " (chosen on validation)" if args.select_guidance and c == chosen else ""
            print(
                f"   guidance {c[0]}, floor {c[1]}{tag}: continuous reader (intensity gained in the lesion box x "
                f"{intensity_gain:.2f}) predicted {np.mean(np.abs(wi['predicted_sum'][c])):.2f} mm^2 on average, "
                f"Pearson r = {_pearson(wi['predicted_sum'][c], true):.3f} (target >= 0.8); thresholded reader r = "
                f"{_pearson(wi['predicted_area'][c], true):.3f}"
            )
        if args.figures and kind == args.schedulers[0]:
            fig = Path(args.figures)
            fig.mkdir(parents=True, exist_ok=True)
            i = max(range(len(test_meta)), key=lambda k: test_meta[k]["target_area"] - test_meta[k]["prior_area"])
            one = inferer.forecast(
                prior_images[i : i + 1],
                net,
                {k: v[i : i + 1] for k, v in conditions.items()},
                args.n_samples,
                base_image=None if base_images is None else base_images[i : i + 1],
            )
            save_forecast_png(
                one,
                fig / "diffusion_forecast.png",
                prior=prior_images[i],
                target=target_images[i],
                title=f"{test_meta[i]['subject_id']} visit {test_meta[i]['target_index']}",
            )
            j = int(np.argmax(np.abs(true)))
            one_what_if = what_if_eval(
                inferer, net, lesion_test_what_if[j : j + 1], [chosen[0]], [chosen[1]], keep_output=True
            )["output"]
            one_item = {k: v[0] for k, v in one_what_if.items()}  # (1, H, W): save_what_if_png draws one item
            save_what_if_png(one_item, fig / "diffusion_what_if.png", title="stop / start the drug after the last scan")

    # ---- speed
    net, inferer = twins[args.schedulers[0]]
    one = {k: v[:1] for k, v in conditions.items()}
    n = 4
    speed = {}
    for steps in (10, 25, 50):
        t0 = time.perf_counter()
        inferer.forecast(
            prior_images[:1],
            net,
            one,
            n,
            num_inference_steps=steps,
            base_image=None if base_images is None else base_images[:1],
        )
        speed[steps] = (time.perf_counter() - t0) / n
    pixel = LatentDiffusionTwin(2, 1, vocabulary.size, conditions["ehr_static"].shape[1]).eval()
    pixel_inferer = LatentTwinInferer(make_scheduler("ddim"), None, num_inference_steps=25)
    t0 = time.perf_counter()
    pixel_inferer.forecast(prior_images[:1], pixel, one, n, num_inference_steps=25)
    pixel_time = (time.perf_counter() - t0) / n
    print("\nspeed (s per sample, batch of 4 samples, 1 thread if OMP_NUM_THREADS=1):")
    print("  latent DDIM " + ", ".join(f"{k} steps {v:.3f}" for k, v in speed.items()))
    print(
        f"  pixel-space UNet of equal width, 25 steps {pixel_time:.3f} -> pixel / latent = {pixel_time / speed[25]:.1f}x"
    )

    if args.convlstm_epochs > 0:
        _convlstm_section(args, manifest, images, vocabulary, split, data, trained=convlstm)
    if args.mri_subjects > 0:
        mri_section(args)


if __name__ == "__main__":
    main()
