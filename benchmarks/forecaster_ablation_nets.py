"""Ablation of the forecasting networks on the 2D mammography testbed: ConvLSTM vs ViViT, with and
without the cVAE-GAN refinement head, each against copy-last.

Same setup as ``benchmarks/forecaster_testbed.py`` (whose cohort and sample helpers it imports):
a simulated cohort, every scan mapped back to its subject's frame with the true acquisition
transform (oracle registration), EHR encoded with a vocabulary fitted on the training subjects,
training through MONAI's ``SupervisedTrainer``. For ``--refine cvae-gan`` the trained twin is
frozen and a :class:`CVAEGANRefiner` is trained on its forecasts through the same trainer (its
``iteration_update`` is a :class:`CVAEGANTrainingStep` with a ``PatchDiscriminator``). Prints PSNR,
SSIM and MSE on the held-out subjects' changed and unchanged visits next to copy-last; for the
refined twin also the mean of ``--samples`` draws and the mean per-pixel std (uncertainty).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/forecaster_ablation_nets.py --subjects 80 --size 64 --epochs 10 \\
        --network convlstm vivit --refine none cvae-gan
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
from forecaster_testbed import _aligned_images, _samples

KEYS = ("history", "times", "history_mask", "ehr_intervals", "ehr_intervals_mask", "ehr_static")


def _batches(samples, batch_size=16):
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        yield chunk, {k: torch.stack([s[k] for s in chunk]) for k in (*KEYS, "target")}


def _evaluate(models, samples, changed, num_samples):
    """models: name -> callable(batch) returning (image, std or None). Returns the per-subset mean table."""
    import pandas as pd
    from monai.metrics import PSNRMetric, SSIMMetric

    psnr, ssim = PSNRMetric(max_val=1.0, reduction="none"), SSIMMetric(spatial_dims=2, data_range=1.0, reduction="none")
    rows = []
    with torch.no_grad():
        for chunk, batch in _batches(samples):
            target = batch["target"]
            images = {
                "copy_last": (batch["history"][torch.arange(len(chunk)), batch["history_mask"].sum(1).long() - 1], None)
            }
            images |= {name: fn(batch) for name, fn in models.items()}
            for name, (image, std) in images.items():
                image = image.clamp(0, 1)
                p, s = psnr(image, target).reshape(-1).tolist(), ssim(image, target).reshape(-1).tolist()
                m = ((image - target) ** 2).flatten(1).mean(1).tolist()
                u = std.flatten(1).mean(1).tolist() if std is not None else [float("nan")] * len(chunk)
                for sample, pv, sv, mv, uv in zip(chunk, p, s, m, u):
                    key = (sample["subject_id"], sample["target_index"])
                    rows.append(
                        {
                            "model": name,
                            "changed": bool(changed.get(key, False)),
                            "psnr": pv,
                            "ssim": sv,
                            "mse": mv,
                            "std": uv,
                        }
                    )
    frame = pd.DataFrame(rows)
    return frame.groupby(["changed", "model"])[["psnr", "ssim", "mse", "std"]].mean()


def _train(net, loader, epochs, lr, iteration_update=None, optimizer=None):
    from monai.engines import SupervisedTrainer

    from monai_twin.engines import ForecastPrepareBatch

    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=epochs,
        train_data_loader=loader,
        network=net,
        optimizer=optimizer or torch.optim.AdamW(net.parameters(), lr),
        loss_function=torch.nn.MSELoss(),
        prepare_batch=ForecastPrepareBatch(),
        iteration_update=iteration_update,
        decollate=False,
    )
    losses = []
    from ignite.engine import Events

    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output["loss"].detach()))
    )
    t0 = time.perf_counter()
    trainer.run()
    return time.perf_counter() - t0, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=80)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--refine-epochs", type=int, default=None, help="cVAE-GAN epochs (default: --epochs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-history", type=int, default=4)
    parser.add_argument("--network", nargs="+", default=["convlstm", "vivit"], choices=["convlstm", "vivit"])
    parser.add_argument("--refine", nargs="+", default=["none", "cvae-gan"], choices=["none", "cvae-gan"])
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of the twins")
    parser.add_argument("--patch", type=int, default=8, help="ViViT patch side (a power of two)")
    parser.add_argument("--samples", type=int, default=8, help="draws of the refined twin for mean / std")
    parser.add_argument("--workdir", default=None, help="where to write the cohort (default: a temporary folder)")
    args = parser.parse_args()

    import pandas as pd
    from monai.data import DataLoader
    from monai.networks.nets import PatchDiscriminator

    from monai_twin.data import build_longitudinal_items, load_manifest, split_subjects
    from monai_twin.data.synthetic import Mammo2DConfig, write_cohort
    from monai_twin.networks import CVAEGANRefiner, CVAEGANTrainingStep, RefinedTwin, TwinForecaster, ViViTTwin
    from monai_twin.transforms.ehr import EHRVocabulary

    torch.manual_seed(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="twin_ablation_"))
    cohort = work / f"mammo2d_{args.subjects}_{args.size}_{args.seed}"
    start = time.perf_counter()
    if not (cohort / "cohort.json").is_file():
        write_cohort("mammo2d", cohort, args.subjects, args.seed, Mammo2DConfig(size=args.size), workers=2)
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
        )
        for name in ("training", "test")
    }
    n_changed = sum(changed.get((s["subject_id"], s["target_index"]), False) for s in data["test"])
    print(
        f"cohort ready in {time.perf_counter() - start:.0f} s: {len(data['training'])} training / "
        f"{len(data['test'])} test samples ({n_changed} changed)"
    )
    f_dim = data["training"][0]["ehr_intervals"].shape[-1]
    s_dim = data["training"][0]["ehr_static"].shape[-1]
    train_items = [{k: v for k, v in s.items() if k not in ("subject_id", "target_index")} for s in data["training"]]
    loader = DataLoader(train_items, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(args.seed))

    models = {}
    timings = []
    for network in args.network:
        torch.manual_seed(args.seed)
        common = {"ehr_interval_dim": f_dim, "ehr_static_dim": s_dim, "max_history": args.max_history}
        if network == "convlstm":
            net = TwinForecaster(2, 1, channels=(16, 32), hidden_channels=32, **common)
        else:
            net = ViViTTwin(2, 1, img_size=args.size, patch_size=args.patch, **common)
        seconds, losses = _train(net, loader, args.epochs, args.lr)
        n_params = sum(p.numel() for p in net.parameters())
        timings.append(
            f"{network}: {n_params / 1e3:.0f} k parameters, {seconds:.0f} s, loss {losses[0]:.5f} -> {np.mean(losses[-10:]):.5f}"
        )
        net.eval()
        if "none" in args.refine:
            models[network] = lambda b, net=net: (net(*[b[k] for k in KEYS]), None)
        if "cvae-gan" in args.refine:
            torch.manual_seed(args.seed)
            refiner = CVAEGANRefiner(2, 1, channels=(16, 32, 64), latent_channels=4)
            discriminator = PatchDiscriminator(2, 16, in_channels=2, num_layers_d=2, norm="INSTANCE")
            g_opt = torch.optim.AdamW(refiner.parameters(), 5e-4)
            step = CVAEGANTrainingStep(
                refiner, discriminator, g_opt, torch.optim.AdamW(discriminator.parameters(), 5e-4), forecaster=net
            )
            epochs = args.refine_epochs or args.epochs
            seconds, losses = _train(refiner, loader, epochs, 5e-4, iteration_update=step, optimizer=g_opt)
            timings.append(
                f"{network}+cvae-gan refiner: {seconds:.0f} s, generator loss {losses[0]:.4f} -> {np.mean(losses[-10:]):.4f}"
            )
            twin = RefinedTwin(net, refiner.eval())
            models[f"{network}+cvae-gan"] = lambda b, twin=twin: (twin(*[b[k] for k in KEYS]), None)
            models[f"{network}+cvae-gan mean{args.samples}"] = lambda b, twin=twin: twin.sample(
                *[b[k] for k in KEYS], num_samples=args.samples
            )
    print("\n".join(timings))
    torch.manual_seed(args.seed)
    table = _evaluate(models, data["test"], changed, args.samples)
    with pd.option_context("display.width", 160):
        print(table.to_string(float_format=lambda v: f"{v:.4g}"))
    for flag, label in ((True, "changed"), (False, "unchanged")):
        if flag in table.index.get_level_values(0):
            base = table.loc[(flag, "copy_last"), "psnr"]
            gains = ", ".join(
                f"{name} {table.loc[(flag, name), 'psnr'] - base:+.2f} dB"
                for name in models
                if (flag, name) in table.index
            )
            print(f"{label}: PSNR - copy-last: {gains}")


if __name__ == "__main__":
    main()
