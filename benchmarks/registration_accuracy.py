"""Registration accuracy and speed on pairs whose true displacement is known.

Sections (each prints a Markdown table; medians over pairs, times are wall-clock medians):

* ``mammo``: the synthetic mammography testbed (visit 1 registered to visit 0 of each subject;
  both acquisitions are known, so the true pull-back field is ``(p + u0) + u1^-1(p + u0) - p``).
  End-point error (px) and SSIM over breast tissue, NMI; targets EPE <= 1 px, SSIM >= 0.90.
* ``mri``: the synthetic 3D MRI ROI testbed, rigid: rotation error (deg) and translation error
  at the ROI centre (voxels); targets <= 1 deg and <= 0.5 voxel.
* ``mni``: the real MNI152 T1 (nilearn, offline) as a 256^2 slice and a 128^3 volume under a known
  affine + smooth deformation; grey-matter Dice before/after, time (the issue's anchors).
* ANTs SyN and elastix B-spline rows (``--ants-python`` / ``--elastix-python``): both pin
  packages that clash with the main environment, so each runs from a venv of its own through
  ``registration_ants.py`` / ``registration_elastix.py``, pair by pair between this script's own
  methods (same machine load, same thread count; imports and file I/O are not timed).
* ``memory``: peak resident memory of each method on a 128^3 volume, one child process per method
  (the parent's imports and data are measured separately and subtracted).

Run (the figures in docs/guide/registration.md)::

    python benchmarks/registration_accuracy.py --sections mammo mri --subjects 8 --runs 3 \\
        --voxelmorph bundles/mammo_twin_2d/models/voxelmorph.pt \\
        --ants-python /tmp/venv_ants/bin/python --elastix-python /tmp/venv_elastix/bin/python
    python benchmarks/registration_accuracy.py --sections mni memory --ants-python /tmp/venv_ants/bin/python
    python benchmarks/registration_accuracy.py --sections mammo --figure docs/_static/registration_mammo.png
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor

from monai_twin.metrics import end_point_error, folding_fraction, normalized_mutual_information, ssim
from monai_twin.transforms.registration import Register, registration_displacement, registration_record

LINEAR = ("rigid", "affine")
MAMMO_METHODS: dict[str, dict] = {
    "rigid": {"stages": ("rigid",)},
    "rigid+affine": {"stages": LINEAR},
    "+demons": {"stages": (*LINEAR, "demons")},
    "+diffeomorphic_demons": {"stages": (*LINEAR, "diffeomorphic_demons")},
    "+fast_symmetric_demons": {"stages": (*LINEAR, "fast_symmetric_demons")},
    "+bspline": {"stages": (*LINEAR, "bspline")},
}
CLASSICAL_CHAIN = "+fast_symmetric_demons"
STEP_CLASSICAL, STEP_LEARNED = "step only: fast_symmetric_demons", "step only: voxelmorph"
EXTERNAL_NAMES = {"ants": "ANTs SyN (antspyx, own rigid+affine)", "elastix": "elastix rigid+affine+B-spline (defaults)"}
MRI_METHODS: dict[str, dict] = {
    "rigid (correlation)": {"stages": ("rigid",), "metric": "correlation"},
    "rigid (mattes MI)": {"stages": ("rigid",), "metric": "mattes"},
}
MEMORY_METHODS: dict[str, dict] = {
    "rigid": {"stages": ("rigid",)},
    "rigid+affine": {"stages": LINEAR},
    "+fast_symmetric_demons": {"stages": (*LINEAR, "fast_symmetric_demons"), "levels": (4, 2, 1)},
    "+bspline (auto sampling)": {"stages": (*LINEAR, "bspline")},
    "+bspline (dense sampling)": {"stages": (*LINEAR, "bspline"), "sampling_percentage": 1.0},
}


def _median(values):
    values = [v for v in values if v is not None and np.isfinite(v)]
    return statistics.median(values) if values else float("nan")


def _timed(fn, runs: int, *args):
    times, out = [], None
    for _ in range(max(1, runs)):
        start = time.perf_counter()
        out = fn(*args)
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def _table(title: str, header: list[str], rows: list[list]) -> str:
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = [f"\n### {title}\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# -- mammography 2D ------------------------------------------------------------------------------


def mammo_pairs(n_subjects: int, seed: int):
    from monai_twin.data.synthetic.acquisition import identity_grid, invert_displacement, warp
    from monai_twin.data.synthetic.cohort import resimulate, simulate_subject

    for i in range(n_subjects):
        subject = simulate_subject("mammo2d", i, seed=seed)
        visits = resimulate(subject)
        u0 = subject.acquisitions[0].displacement()
        u1 = subject.acquisitions[1].displacement()
        v1 = invert_displacement(u1, iterations=30)
        grid = identity_grid(u0.shape[1:])
        p0 = grid + u0
        truth = p0 + np.stack([warp(v1[a], p0) for a in range(2)]) - grid
        sp = subject.config.spacing
        affine = torch.diag(torch.tensor([sp, sp, 1.0, 1.0], dtype=torch.float64))
        fixed = MetaTensor(torch.as_tensor(visits.images[0][None]), affine=affine)
        moving = MetaTensor(torch.as_tensor(visits.images[1][None]), affine=affine)
        # breast tissue of the fixed visit (air is ~0, tissue >= 0.18 before the gain)
        tissue = visits.images[0] > 0.1
        yield subject.subject_id, fixed, moving, truth, tissue


def _external(python: str | None, tool: str, pair_path: Path, args) -> dict | None:
    """Run ``registration_<tool>.py`` on one exported pair in its own venv; load what it wrote."""
    if not python:
        return None
    script = Path(__file__).with_name(f"registration_{tool}.py")
    cmd = [python, str(script), str(pair_path), "--threads", str(args.threads), "--runs", str(args.runs)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=3600)
    res = np.load(pair_path.with_name(pair_path.stem + f"_{tool}.npz"))
    return {k: res[k] for k in res.files}


def _export_pair(folder: Path, name: str, fixed, moving, fixed_extra, moving_extra, spacing) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.npz"
    np.savez(
        path,
        fixed=np.asarray(fixed, dtype=np.float32),
        moving=np.asarray(moving, dtype=np.float32),
        fixed_extra=np.asarray(fixed_extra, dtype=np.float32),
        moving_extra=np.asarray(moving_extra, dtype=np.float32),
        spacing=np.asarray(spacing, dtype=np.float64),
    )
    return path


def _scores(r: np.ndarray, f: np.ndarray, field: np.ndarray, truth: np.ndarray, tissue: np.ndarray) -> dict:
    inside = tissue & np.isfinite(field).all(0)
    return {
        "epe": end_point_error(np.nan_to_num(field), truth, mask=inside),
        "ssim": ssim(r, f, data_range=1.0, mask=tissue),
        "nmi": normalized_mutual_information(r, f, mask=tissue),
    }


def run_mammo(args, learned=None) -> tuple[str, dict]:
    per_method: dict[str, list[dict]] = {name: [] for name in ["none", *MAMMO_METHODS]}
    example = None
    threads = args.threads
    for sid, fixed, moving, truth, tissue in mammo_pairs(args.subjects, args.seed):
        f = fixed[0].numpy()
        per_method["none"].append({"time": 0.0, **_scores(moving[0].numpy(), f, np.zeros_like(truth), truth, tissue)})
        for name, kwargs in MAMMO_METHODS.items():
            reg = Register(num_threads=threads, **kwargs)
            out, seconds = _timed(reg, args.runs, moving, fixed)
            field = registration_displacement(out, space="voxel").numpy()
            per_method[name].append({"time": seconds, **_scores(out[0].numpy(), f, field, truth, tissue)})
            if example is None and name == CLASSICAL_CHAIN:
                example = (sid, fixed, moving, out, field, truth, tissue)
        sp = float(fixed.affine[0, 0])
        pair_path = None
        for tool, python in (("ants", args.ants_python), ("elastix", args.elastix_python)):
            if not python:
                continue
            if pair_path is None:
                pair_path = _export_pair(
                    Path(args.export_dir), f"mammo_{sid}", f, moving[0].numpy(), tissue, moving[0].numpy(), (sp, sp)
                )
            res = _external(python, tool, pair_path, args)
            name = EXTERNAL_NAMES[tool]
            per_method.setdefault(name, []).append(
                {"time": float(res["seconds"]), **_scores(res["warped"], f, res["field"], truth, tissue)}
            )
        if learned is not None:
            for name, res in _step_comparison(moving, fixed, truth, tissue, learned, args).items():
                per_method.setdefault(name, []).append(res)
        print(f"  mammo {sid} done", file=sys.stderr)
    rows = []
    ants_times = [r["time"] for r in per_method.get(EXTERNAL_NAMES["ants"], [])]
    for name, results in per_method.items():
        ratio = "-"
        if ants_times and name != "none" and len(results) == len(ants_times):
            ratio = _median([r["time"] / a for r, a in zip(results, ants_times)])
        rows.append(
            [
                name,
                _median([r["time"] for r in results]),
                ratio,
                _median([r["ssim"] for r in results]),
                min(r["ssim"] for r in results),
                _median([r["nmi"] for r in results]),
                _median([r["epe"] for r in results]),
                max(r["epe"] for r in results),
            ]
        )
    header = [
        "method",
        "time s (median)",
        "time / ANTs SyN (median over pairs)",
        "SSIM (median)",
        "SSIM (min)",
        "NMI",
        "EPE px (median)",
        "EPE px (max)",
    ]
    table = _table(
        f"Mammography 2D ({args.subjects} pairs, 256^2, visit 1 -> visit 0, {threads} thread(s), "
        "SSIM/NMI/EPE over breast tissue)",
        header,
        rows,
    )
    if learned is not None:
        table += "\n\n" + _step_summary(per_method)
    if args.figure and example is not None:
        _figure(example, args.figure)
    return table, per_method


def _step_comparison(moving, fixed, truth, mask, learned, args) -> dict[str, dict]:
    """The deformable step alone, classical vs learned, both after the same rigid+affine result,
    timed alternately (one call each, repeated) so both see the same machine load."""
    f = fixed[0].numpy()
    affine_out = Register(stages=LINEAR, num_threads=args.threads)(moving, fixed)
    ssim_affine = ssim(affine_out[0].numpy(), f, data_range=1.0, mask=mask)
    steps = {
        STEP_CLASSICAL: Register(stages=("fast_symmetric_demons",), num_threads=args.threads),
        STEP_LEARNED: learned,
    }
    times: dict[str, list[float]] = {k: [] for k in steps}
    compute_times: dict[str, list[float]] = {k: [] for k in steps}
    outs = {}
    for _ in range(max(3, args.runs)):
        for name, step in steps.items():
            start = time.perf_counter()
            outs[name] = step(affine_out, fixed)
            times[name].append(time.perf_counter() - start)
            start = time.perf_counter()
            step.compute(affine_out, fixed)
            compute_times[name].append(time.perf_counter() - start)
    results = {}
    for name, out in outs.items():
        step_field = registration_displacement(out, space="voxel", index=1)  # index 0: rigid + affine
        field = _chain_fields(registration_displacement(out, space="voxel", index=0), step_field)
        scores = _scores(out[0].numpy(), f, field, truth, mask)
        results[name] = {
            "time": statistics.median(times[name]),
            "compute": statistics.median(compute_times[name]),
            "ssim_gain": scores["ssim"] - ssim_affine,
            # share of the step's own field that folds (Jacobian <= 0) over tissue
            "folding": folding_fraction(step_field.numpy(), mask=mask),
            **scores,
        }
    return results


def _step_summary(per_method: dict[str, list[dict]]) -> str:
    c, v = per_method[STEP_CLASSICAL], per_method[STEP_LEARNED]
    speed = _median([a["time"] / b["time"] for a, b in zip(c, v)])
    speed_compute = _median([a["compute"] / b["compute"] for a, b in zip(c, v)])
    gain_c, gain_v = _median([a["ssim_gain"] for a in c]), _median([b["ssim_gain"] for b in v])
    return (
        f"learned vs classical deformable step (after the same rigid+affine result, {len(c)} pairs): "
        f"{speed:.1f}x faster per transform call (median of per-pair ratios; {speed_compute:.1f}x for the "
        f"registration alone, without resampling and before/after metrics), {100 * gain_v / gain_c:.0f} % of "
        f"its median SSIM gain over affine (classical {gain_c:+.4f}, learned {gain_v:+.4f}); "
        f"EPE classical {_median([a['epe'] for a in c]):.3f}, learned {_median([b['epe'] for b in v]):.3f}; "
        f"folded pixels on tissue (max over pairs) classical {100 * max(a['folding'] for a in c):.3f} %, "
        f"learned {100 * max(b['folding'] for b in v):.3f} % (targets: >= 20x, >= 95 %)"
    )


def _chain_fields(first: torch.Tensor, second: torch.Tensor) -> np.ndarray:
    """Voxel pull-back of two registrations applied one after the other on one grid:
    ``p -> p + second(p) -> (p + second(p)) + first(p + second(p))``."""
    from monai_twin.transforms.registration.functional import sample_at_voxels

    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in first.shape[1:]], indexing="ij"))
    moved = grid + second
    total = second + sample_at_voxels(first, moved, mode="bilinear", padding_mode="border")
    return total.numpy()


def _figure(example, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sid, fixed, moving, out, field, truth, tissue = example
    err = np.sqrt(((field - truth) ** 2).sum(0)) * tissue
    fig, axes = plt.subplots(1, 5, figsize=(18, 4))
    panels = [
        (fixed[0].numpy(), "fixed (visit 0)"),
        (moving[0].numpy(), "moving (visit 1)"),
        (out[0].numpy(), "registered (rigid+affine+fast symmetric demons)"),
        (out[0].numpy() - fixed[0].numpy(), "registered - fixed"),
        (err, "end-point error (px)"),
    ]
    for ax, (img, title) in zip(axes, panels):
        im = ax.imshow(img.T, cmap="gray" if "error" not in title else "magma", origin="lower")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
        if "error" in title:
            fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f"subject {sid}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    print(f"  figure written to {path}", file=sys.stderr)


# -- MRI ROI 3D ----------------------------------------------------------------------------------


def _rigid_voxel_map(t) -> np.ndarray:
    """The acquisition's voxel map ``p -> p + u(p)`` as a 4x4 (it is rigid in 3D)."""
    shape = np.asarray(t.spatial_shape, dtype=np.float64)
    centre = (shape - 1.0) / 2.0
    rot = t._rotation_matrix()
    m = np.eye(4)
    m[:3, :3] = rot
    m[:3, 3] = centre + np.asarray(t.shift) - rot @ centre
    return m


def run_mri(args, learned=None) -> str:
    from monai_twin.data.synthetic.cohort import resimulate, simulate_subject

    results: dict[str, list[dict]] = {name: [] for name in MRI_METHODS}
    steps: dict[str, list[dict]] = {}
    for i in range(args.subjects):
        subject = simulate_subject("mri_roi3d", i, seed=args.seed)
        visits = resimulate(subject)
        sp = subject.config.spacing_mm
        affine = torch.diag(torch.tensor([sp, sp, sp, 1.0], dtype=torch.float64))
        fixed = MetaTensor(torch.as_tensor(visits.images[0][None]), affine=affine)
        moving = MetaTensor(torch.as_tensor(visits.images[1][None]), affine=affine)
        a0 = _rigid_voxel_map(subject.acquisitions[0])
        a1 = _rigid_voxel_map(subject.acquisitions[1])
        truth = np.linalg.inv(a1) @ a0  # fixed voxel -> moving voxel
        centre = np.append((np.asarray(fixed.shape[1:]) - 1) / 2.0, 1.0)
        for name, kwargs in MRI_METHODS.items():
            reg = Register(levels=(2, 1), num_threads=args.threads, **kwargs)
            out, seconds = _timed(reg, args.runs, moving, fixed)
            world = registration_record(out)["matrix"].numpy()
            est = np.linalg.inv(affine.numpy()) @ world @ affine.numpy()
            rel = est[:3, :3] @ truth[:3, :3].T
            angle = float(np.degrees(np.arccos(np.clip((np.trace(rel) - 1) / 2, -1, 1))))
            shift = float(np.linalg.norm((est @ centre - truth @ centre)[:3]))
            results[name].append({"time": seconds, "rotation": angle, "translation": shift})
        if learned is not None:
            grid = np.indices(fixed.shape[1:], dtype=np.float64)
            field = np.tensordot(truth[:3, :3], grid, axes=1) + truth[:3, 3].reshape(3, 1, 1, 1) - grid
            brain = fixed[0].numpy() > 0.05
            for name, res in _step_comparison(moving, fixed, field.astype(np.float32), brain, learned, args).items():
                steps.setdefault(name, []).append(res)
        print(f"  mri {subject.subject_id} done", file=sys.stderr)
    rows = [
        [
            name,
            _median([r["time"] for r in res]),
            _median([r["rotation"] for r in res]),
            max(r["rotation"] for r in res),
            _median([r["translation"] for r in res]),
            max(r["translation"] for r in res),
        ]
        for name, res in results.items()
    ]
    header = ["method", "time s", "rotation err deg (median)", "(max)", "translation err vox (median)", "(max)"]
    table = _table(f"MRI ROI 3D rigid ({args.subjects} pairs, 64^3 at 1.5 mm, {args.threads} thread(s))", header, rows)
    if learned is not None:
        table += "\n\n3D " + _step_summary(steps)
    return table


# -- MNI152 anchors ------------------------------------------------------------------------------


def mni_pair(ndim: int, size: int, seed: int = 0):
    """MNI T1 + grey matter, resampled to ``size``^ndim, and a known affine + smooth warp of it.

    ``fixed = T1(p + w(p))`` and ``moving = T1``, so the true pull-back field is ``w``.
    """
    import nibabel as nib
    from nilearn import datasets
    from scipy.ndimage import map_coordinates, zoom

    from monai_twin.data.synthetic.acquisition import smooth_random_field

    folder = Path(datasets.__file__).parent / "data"
    t1 = np.asarray(nib.load(folder / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz").dataobj, dtype=np.float32)
    gm = np.asarray(nib.load(folder / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz").dataobj, dtype=np.float32)
    if ndim == 2:
        t1, gm = t1[:, :, t1.shape[2] // 2 + 10], gm[:, :, gm.shape[2] // 2 + 10]
    factors = [size / s for s in t1.shape]
    t1 = zoom(t1, factors, order=1)
    gm = zoom(gm, factors, order=1)
    t1 = (t1 - t1.min()) / np.ptp(t1)
    rng = np.random.default_rng(seed)
    shape = t1.shape
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    centre = ((np.asarray(shape) - 1) / 2.0).reshape(-1, *([1] * ndim))
    angle = np.deg2rad(8.0)
    rot = np.eye(ndim)
    rot[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    linear = rot * 1.06
    shift = np.full(ndim, 0.03 * size).reshape(-1, *([1] * ndim))
    positions = np.tensordot(linear, grid - centre, axes=1) + centre + shift
    amplitude = 0.02 * size
    for axis in range(ndim):
        positions[axis] += amplitude * smooth_random_field(rng, shape, 5)
    w = (positions - grid).astype(np.float32)
    fixed = map_coordinates(t1, positions, order=1).astype(np.float32)
    fixed_gm = map_coordinates(gm, positions, order=1) > 0.5
    affine = torch.eye(4, dtype=torch.float64)
    return (
        MetaTensor(torch.as_tensor(fixed[None]), affine=affine),
        MetaTensor(torch.as_tensor(t1[None]), affine=affine),
        MetaTensor(torch.as_tensor((gm > 0.5)[None].astype(np.float32)), affine=affine),
        fixed_gm,
        w,
    )


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


MNI_METHODS: dict[str, dict] = {
    "rigid+affine": {"stages": LINEAR},
    "+fast_symmetric_demons": {"stages": (*LINEAR, "fast_symmetric_demons")},
    "+diffeomorphic_demons": {"stages": (*LINEAR, "diffeomorphic_demons")},
    "+bspline": {"stages": (*LINEAR, "bspline")},
}


def run_mni(args) -> str:
    rows = []
    for ndim, size in ((2, 256), (3, 128)):
        if size not in args.mni_sizes:
            continue
        fixed, moving, moving_gm, fixed_gm, w = mni_pair(ndim, size)
        f = fixed[0].numpy()
        mask = f > 0.1
        rows.append(
            [
                f"{size}^{ndim} none",
                0.0,
                _dice(moving_gm[0].numpy() > 0.5, fixed_gm),
                ssim(moving[0].numpy(), f, data_range=1.0),
                end_point_error(np.zeros_like(w), w, mask=mask),
            ]
        )
        for name, kwargs in MNI_METHODS.items():
            reg = Register(num_threads=args.threads, **kwargs)
            out, seconds = _timed(reg, args.runs, moving, fixed)
            gm_out = reg.apply_recorded(moving_gm, registration_record(out), mode="bilinear")
            field = registration_displacement(out, space="voxel").numpy()
            rows.append(
                [
                    f"{size}^{ndim} {name}",
                    seconds,
                    _dice(gm_out[0].numpy() > 0.5, fixed_gm),
                    ssim(out[0].numpy(), f, data_range=1.0),
                    end_point_error(field, w, mask=mask),
                ]
            )
            print(f"  mni {size}^{ndim} {name}: {seconds:.1f}s", file=sys.stderr)
        pair_path = None
        for tool, python in (("ants", args.ants_python), ("elastix", args.elastix_python)):
            if not python:
                continue
            if pair_path is None:
                pair_path = _export_pair(
                    Path(args.export_dir),
                    f"mni_{size}_{ndim}d",
                    f,
                    moving[0].numpy(),
                    fixed_gm,
                    moving_gm[0].numpy(),
                    np.ones(ndim),
                )
            res = _external(python, tool, pair_path, args)
            inside = mask & np.isfinite(res["field"]).all(0)
            rows.append(
                [
                    f"{size}^{ndim} {EXTERNAL_NAMES[tool]}",
                    float(res["seconds"]),
                    _dice(res["extra"] > 0.5, fixed_gm),
                    ssim(res["warped"], f, data_range=1.0),
                    end_point_error(np.nan_to_num(res["field"]), w, mask=inside),
                ]
            )
            print(f"  mni {size}^{ndim} {tool}: {float(res['seconds']):.1f}s", file=sys.stderr)
    header = ["pair / method", "time s", "GM Dice", "SSIM", "EPE vox (brain)"]
    return _table(f"MNI152 T1 with a known affine + smooth warp ({args.threads} thread(s))", header, rows)


# -- memory --------------------------------------------------------------------------------------


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def memory_child(method: str) -> None:
    fixed, moving, _, _, _ = mni_pair(3, 128)
    base = _peak_rss_mb()
    if method != "baseline":
        Register(**MEMORY_METHODS[method])(moving, fixed)
    print(json.dumps({"method": method, "base_mb": base, "peak_mb": _peak_rss_mb()}))


def run_memory(args) -> str:
    rows = []
    for method in MEMORY_METHODS:
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, __file__, "--memory-child", method],
                capture_output=True,
                text=True,
                check=True,
                timeout=args.memory_timeout,
            )
        except subprocess.TimeoutExpired:
            # the killed child is reaped by subprocess: its peak counts in RUSAGE_CHILDREN (a lower bound)
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
            rows.append([method, f">= {peak / 1024.0:.2f} (stopped after {args.memory_timeout:.0f} s)", "-", "-"])
            print(f"  memory {method}: timed out, peak so far {peak:.0f} MB", file=sys.stderr)
            continue
        seconds = time.perf_counter() - start
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append([method, res["peak_mb"] / 1024.0, (res["peak_mb"] - res["base_mb"]) / 1024.0, seconds])
        print(f"  memory {method}: {res['peak_mb']:.0f} MB", file=sys.stderr)
    header = ["method (128^3)", "peak RSS GB (process)", "added by registration GB", "wall s (incl. setup)"]
    return _table("Memory on a 128^3 volume (limit 4 GB)", header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", nargs="+", default=["mammo", "mri"], choices=["mammo", "mri", "mni", "memory"])
    parser.add_argument("--export-dir", default="/tmp/regpairs", help="where pairs are written for ANTs/elastix")
    parser.add_argument(
        "--mni-sizes", type=int, nargs="+", default=[256, 128], help="MNI pairs to run (256: 2D, 128: 3D)"
    )
    parser.add_argument("--subjects", type=int, default=4)
    parser.add_argument("--memory-timeout", type=float, default=900.0, help="seconds per memory child")
    parser.add_argument("--runs", type=int, default=1, help="timed repetitions per pair (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--figure", default=None, help="PNG path for a mammography example figure")
    parser.add_argument("--voxelmorph", default=None, help="trained 2D VoxelMorph weights to include in the table")
    parser.add_argument("--voxelmorph-3d", default=None, help="trained 3D VoxelMorph weights for the MRI section")
    parser.add_argument("--ants-python", default=None, help="python of a venv with antspyx: adds ANTs SyN rows")
    parser.add_argument("--elastix-python", default=None, help="python of a venv with itk-elastix: adds elastix rows")
    parser.add_argument("--threads", type=int, default=1, help="threads for every method (torch, SimpleITK, ITK)")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child)
        return
    torch.set_num_threads(args.threads)
    learned = learned_3d = None
    if args.voxelmorph or args.voxelmorph_3d:
        from monai_twin.transforms.registration.learned import RegisterVoxelMorph

        learned = RegisterVoxelMorph(args.voxelmorph) if args.voxelmorph else None
        learned_3d = RegisterVoxelMorph(args.voxelmorph_3d) if args.voxelmorph_3d else None
    print(f"# registration accuracy (seed {args.seed}, {args.runs} timed run(s) per pair)")
    for section in args.sections:
        if section == "mammo":
            print(run_mammo(args, learned)[0])
        elif section == "mri":
            print(run_mri(args, learned_3d))
        elif section == "mni":
            print(run_mni(args))
        elif section == "memory":
            print(run_memory(args))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
