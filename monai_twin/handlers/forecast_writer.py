"""Write what a twin forecast -- scans, future EHR values, pictures -- per subject, from MONAI's engines.

:class:`ForecastWriter` is the output stage of a bundle's inference, evaluate and what-if runs: an
ignite handler attached to a :class:`~monai_twin.engines.ForecastEvaluator` or
:class:`~monai_twin.engines.WhatIfEvaluator` that, after every iteration, writes each sample's
forecast in the reference visit's space (NIfTI), a JSON record a person or a script can read, and
a PNG panel. Every file is written to a temporary name and renamed
(:func:`~monai_twin.utils.io.atomic_output_path`), and existing outputs are kept unless asked.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..utils.io import atomic_output_path, atomic_write_text

if TYPE_CHECKING:  # pragma: no cover
    from ignite.engine import Engine

__all__ = ["ForecastWriter"]


class ForecastWriter:
    """Write each sample's forecast (or what-if pair) under ``output_dir/<subject_id>/``.

    For every sample of ``engine.state.batch`` / ``engine.state.output`` (batched, as with
    ``decollate=False``, or decollated lists) with tag ``<target_date>`` -- or ``day<target_time>``,
    days since the subject's first visit rounded, when the sample has no date:

    - forecast run (the output has ``pred``):
      ``<subject>_<tag>_forecast.nii.gz`` (the forecast, float32, in the reference visit's space:
      the affine of ``pred`` -- or of the history -- as MetaTensor metadata),
      ``<subject>_<tag>_forecast.json`` and, with ``png``, ``<subject>_<tag>_panel.png``
      (:func:`~monai_twin.inferers.save_forecast_panel_png`: the real, unpadded visits | the
      forecast | the change from the last visit);
    - what-if run (the output also has ``pred_whatif``):
      ``<subject>_<tag>_baseline.nii.gz``, ``_counterfactual.nii.gz``, ``_difference.nii.gz``
      (counterfactual - baseline), ``_whatif.json`` (both future-EHR predictions and the sample's
      ``whatif_edits``) and, with ``png``, ``_whatif.png`` (:func:`~monai_twin.inferers.save_what_if_png`);
    - either run: ``<subject>_<tag>_uncertainty.nii.gz`` when the output has ``pred_std``.

    The JSON holds ``subject_id``, ``target_date``, ``target_time`` (days since the first visit),
    ``history_times`` (days since the first visit of each real prior visit), ``days_before_target``
    (the history's ``times``), the future EHR values and ``files`` (the written names, relative to
    the subject's folder). Each future value is a record ``{"name", "value", "unit", "normalised"}``:
    ``name`` with ``ehr_names``, ``value`` (in the code's units) with ``ehr_denormalise``, ``unit``
    with ``ehr_units``; ``normalised`` is always the network's output.

    NIfTI images are channel-first ``(C, *spatial)`` arrays stored as MONAI's NIfTI writer does:
    a single channel is dropped, several go on the 4th axis after the spatial ones (padded to 3).

    Batch keys read: ``subject_id`` (required), ``target_date``, ``target_time`` (one of the two),
    ``history`` (or the output's ``image``), ``times``, ``history_mask``, ``history_times`` and,
    in what-if runs, ``whatif_edits``. Output keys: ``pred``, ``pred_ehr``, ``pred_std``,
    ``pred_whatif``, ``difference``, ``pred_ehr_whatif``.

    Args:
        output_dir: the root folder (created).
        ehr_names: the ``K`` names of the future EHR values (e.g. ``["LAB//CA15-3"]``).
        ehr_denormalise: maps normalised values ``(N, K)`` to the codes' units, e.g.
            ``EHRFutureValues(vocabulary, codes).denormalise``.
        ehr_units: the ``K`` units (e.g. ``[vocabulary.units[c] for c in codes]``).
        png: also write the PNG pictures.
        overwrite: replace existing outputs; otherwise a sample whose outputs exist raises
            ``FileExistsError`` before any of its files is written.
        batch_transform, output_transform: applied to ``engine.state.batch`` / ``engine.state.output``
            before reading them (MONAI handler convention).
        name: the logger's name.

    Attributes:
        written: the paths written so far, in order.

    Raises:
        FileExistsError: (at run time) an output exists and ``overwrite`` is ``False``.
        KeyError: (at run time) a sample without ``subject_id``, without ``target_date`` and
            ``target_time``, or without ``pred``.
        ValueError: (at run time) ``ehr_names`` / ``ehr_units`` not matching the ``K`` predicted values.

    Example::

        writer = ForecastWriter(
            "outputs", ehr_names=["LAB//CA15-3"], ehr_denormalise=EHRFutureValues(vocab, ["LAB//CA15-3"]).denormalise
        )
        ForecastEvaluator(device="cpu", val_data_loader=loader, network=twin, val_handlers=[writer]).run()
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        ehr_names: Sequence[str] | None = None,
        ehr_denormalise: Callable[[np.ndarray], Any] | None = None,
        ehr_units: Sequence[str | None] | None = None,
        png: bool = True,
        overwrite: bool = False,
        batch_transform: Callable = lambda x: x,
        output_transform: Callable = lambda x: x,
        name: str = "monai_twin.ForecastWriter",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.ehr_names = None if ehr_names is None else [str(n) for n in ehr_names]
        self.ehr_units = None if ehr_units is None else [None if u is None else str(u) for u in ehr_units]
        if self.ehr_names is not None and self.ehr_units is not None and len(self.ehr_names) != len(self.ehr_units):
            raise ValueError(f"ehr_names has {len(self.ehr_names)} entries but ehr_units has {len(self.ehr_units)}.")
        self.ehr_denormalise = ehr_denormalise
        self.png = bool(png)
        self.overwrite = bool(overwrite)
        self.batch_transform = batch_transform
        self.output_transform = output_transform
        self.logger = logging.getLogger(name)
        self.written: list[Path] = []

    def attach(self, engine: Engine) -> None:
        """Write after every iteration of ``engine``."""
        from ignite.engine import Events

        if not engine.has_event_handler(self, Events.ITERATION_COMPLETED):
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        output = self.output_transform(engine.state.output)
        batch = self.batch_transform(engine.state.batch)
        outputs = _samples(output, None, "engine.state.output")
        batches = _samples(batch, len(outputs), "engine.state.batch")
        if len(batches) != len(outputs):
            raise ValueError(
                f"ForecastWriter: the batch has {len(batches)} samples, the output {len(outputs)}. MONAI's decollation "
                "splits ragged per-sample lists (event tables, label paths) wrongly: run the engine with "
                "decollate=False (the default of ForecastEvaluator and WhatIfEvaluator)."
            )
        for sample, out in zip(batches, outputs):
            self.write_sample(sample, out)

    def write_sample(self, sample: Mapping[str, Any], output: Mapping[str, Any]) -> list[Path]:
        """Write one sample's files (see the class docstring); returns their paths."""
        if "subject_id" not in sample:
            raise KeyError(f"ForecastWriter: the batch has no 'subject_id' (keys: {sorted(map(str, sample))}).")
        subject = str(sample["subject_id"])
        if output.get("pred") is None:
            raise KeyError(
                f"ForecastWriter: subject {subject}: the engine output has no 'pred' (keys: {sorted(map(str, output))})."
            )
        tag = _tag(sample, subject)
        folder = self.output_dir / _safe(subject)
        stem = f"{_safe(subject)}_{tag}"
        whatif = output.get("pred_whatif") is not None
        roles = ["baseline", "counterfactual", "difference"] if whatif else ["forecast"]
        images = [f"{r}.nii.gz" for r in roles] + (["uncertainty.nii.gz"] if output.get("pred_std") is not None else [])
        record_name = "whatif.json" if whatif else "forecast.json"
        picture = ("whatif.png" if whatif else "panel.png") if self.png else None
        names = [*images, record_name, *([picture] if picture else [])]
        paths = {n: folder / f"{stem}_{n}" for n in names}
        if not self.overwrite:
            for path in paths.values():
                if path.exists():
                    raise FileExistsError(
                        f"ForecastWriter: {path} exists (subject {subject}, {tag}); pass overwrite=True to replace it."
                    )

        # everything is gathered and checked first, so a bad sample leaves no partial outputs
        affine = _affine(output.get("pred"), sample.get("history", output.get("image")))
        pred = _numpy(output["pred"])
        arrays = {"forecast.nii.gz": pred, "uncertainty.nii.gz": output.get("pred_std")}
        if whatif:
            pred_whatif = _numpy(output["pred_whatif"])
            difference = output.get("difference")
            arrays.update(
                {
                    "baseline.nii.gz": pred,
                    "counterfactual.nii.gz": pred_whatif,
                    "difference.nii.gz": pred_whatif - pred if difference is None else _numpy(difference),
                }
            )
        history, times, history_times = self._history(sample, output)
        record: dict[str, Any] = {
            "subject_id": subject,
            "target_date": _date_text(sample.get("target_date")),
            "target_time": _float_or_none(sample.get("target_time")),
            "history_times": history_times,
            "days_before_target": None if times is None else [float(t) for t in times],
        }
        if whatif:
            record["baseline_ehr"] = self._ehr_records(output.get("pred_ehr"), subject)
            record["counterfactual_ehr"] = self._ehr_records(output.get("pred_ehr_whatif"), subject)
            record["whatif_edits"] = sample.get("whatif_edits")
        else:
            record["future_ehr"] = self._ehr_records(output.get("pred_ehr"), subject)
        record["files"] = {n.split(".")[0]: paths[n].name for n in names if n != record_name}
        text = json.dumps(record, indent=2, default=_json_default) + "\n"
        if picture == "panel.png" and (history is None or times is None or not len(history)):
            raise KeyError(
                f"ForecastWriter: subject {subject}: the panel needs the batch's 'history' and 'times' with at least "
                "one real visit (or pass png=False)."
            )

        for n in images:
            _write_nifti(paths[n], _numpy(arrays[n]), affine)
        atomic_write_text(paths[record_name], text)
        if picture == "whatif.png":
            from ..inferers.whatif import save_what_if_png

            result = {k: _numpy(arrays[f"{k}.nii.gz"]) for k in ("baseline", "counterfactual", "difference")}
            save_what_if_png(result, paths[picture], title=f"{subject} at {tag}: what if")
        elif picture == "panel.png":
            from ..inferers.forecast import save_forecast_panel_png

            panel = {"history": history, "times": times, "forecast": pred, "change": pred - history[-1]}
            save_forecast_panel_png(panel, paths[picture], title=f"{subject} at {tag}")

        written = list(paths.values())
        self.written.extend(written)
        self.logger.info(f"ForecastWriter: {subject} {tag}: wrote {', '.join(p.name for p in written)} to {folder}.")
        return written

    def _history(
        self, sample: Mapping[str, Any], output: Mapping[str, Any]
    ) -> tuple[np.ndarray | None, np.ndarray | None, list[float] | None]:
        """The real (unpadded) visits ``(T', C, *spatial)``, their days before the target and since the first visit."""
        history = sample.get("history", output.get("image"))
        history = None if history is None or isinstance(history, (str, list)) else _numpy(history)
        times = sample.get("times")
        times = None if times is None else _numpy(times).reshape(-1)
        slots = history.shape[0] if history is not None else (None if times is None else times.shape[0])
        mask = sample.get("history_mask")
        real = None if mask is None or slots is None else _numpy(mask).reshape(-1) > 0
        if real is not None and real.shape[0] != slots:
            real = None
        if history is not None and real is not None:
            history = history[real]
        if times is not None and real is not None and times.shape[0] == real.shape[0]:
            times = times[real]
        history_times = sample.get("history_times")
        if history_times is not None:
            values = _numpy(history_times).reshape(-1)
            if real is not None and values.shape[0] == real.shape[0]:
                values = values[real]
            history_times = [float(v) for v in values]
        return history, times, history_times

    def _ehr_records(self, values: Any, subject: str) -> list[dict[str, Any]]:
        """One record per future EHR value: name, value in units, unit, normalised value."""
        if values is None:
            return []
        normalised = _numpy(values).reshape(-1).astype(np.float64)
        k = normalised.shape[0]
        for what, given in (("ehr_names", self.ehr_names), ("ehr_units", self.ehr_units)):
            if given is not None and len(given) != k:
                raise ValueError(
                    f"ForecastWriter: subject {subject}: the network predicts {k} future EHR values but {what} has "
                    f"{len(given)} entries ({given})."
                )
        in_units = None
        if self.ehr_denormalise is not None and k:
            in_units = np.asarray(self.ehr_denormalise(normalised[None]), dtype=np.float64).reshape(-1)
        records = []
        for j in range(k):
            entry: dict[str, Any] = {}
            if self.ehr_names is not None:
                entry["name"] = self.ehr_names[j]
            if in_units is not None:
                entry["value"] = float(in_units[j])
            if self.ehr_units is not None:
                entry["unit"] = self.ehr_units[j]
            entry["normalised"] = float(normalised[j])
            records.append(entry)
        return records


def _samples(data: Any, n: int | None, what: str) -> list[dict[str, Any]]:
    """Per-sample dictionaries from a batched dictionary or a decollated list of them."""
    if isinstance(data, (list, tuple)):
        if not all(isinstance(d, Mapping) for d in data):
            raise TypeError(f"ForecastWriter: {what} must be a dictionary or a list of dictionaries.")
        return [dict(d) for d in data]
    if not isinstance(data, Mapping):
        raise TypeError(f"ForecastWriter: {what} must be a dictionary, got {type(data).__name__}.")
    if n is None:
        pred = data.get("pred")
        if not isinstance(pred, (torch.Tensor, np.ndarray)) or pred.ndim < 2:
            raise KeyError(f"ForecastWriter: {what} has no batched 'pred' (keys: {sorted(map(str, data))}).")
        n = int(pred.shape[0])
    return [{k: _item(v, i, n) for k, v in data.items()} for i in range(n)]


def _item(value: Any, i: int, n: int) -> Any:
    """Sample ``i`` of a batched value (tensors/arrays with ``n`` rows, lists of ``n``); other values are shared."""
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim >= 1 and value.shape[0] == n:
        return value[i]
    if isinstance(value, (list, tuple)) and len(value) == n:
        return value[i]
    return value


def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        value = value.as_tensor() if hasattr(value, "as_tensor") else value
        return value.numpy()
    return np.asarray(value)


def _affine(pred: Any, history: Any) -> np.ndarray:
    """The 4x4 affine of a sample's forecast: the pred's MetaTensor affine, else the history's, else identity."""
    for source in (pred, history):
        affine = getattr(source, "affine", None)
        if affine is not None:
            affine = _numpy(affine)
            if affine.ndim == 2:
                return affine
    logging.getLogger("monai_twin.ForecastWriter").warning(
        "ForecastWriter: neither 'pred' nor 'history' is a MetaTensor with an affine; writing an identity affine."
    )
    return np.eye(4)


def _write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    """Write a channel-first ``(C, *spatial)`` array as float32 NIfTI, laid out as MONAI's NibabelWriter does."""
    import nibabel as nib
    from monai.data.utils import to_affine_nd

    data = np.asarray(array, dtype=np.float32)
    if data.shape[0] == 1:
        data = data[0]
    else:  # NIfTI keeps dims 1-3 spatial: channels go after the spatial axes, padded to three
        spatial = data.shape[1:]
        data = np.moveaxis(data, 0, -1).reshape(*spatial, *([1] * (3 - len(spatial))), data.shape[0])
    affine = to_affine_nd(3, np.asarray(affine, dtype=np.float64))
    image = nib.Nifti1Image(data, affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    with atomic_output_path(path) as tmp:
        nib.save(image, str(tmp))


def _safe(text: str) -> str:
    """``text`` usable as a file name (path separators and odd characters become '-')."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "unnamed"


def _date_text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, (_dt.date, np.datetime64)) or hasattr(value, "isoformat"):
        text = (value.astype("datetime64[s]").item() if isinstance(value, np.datetime64) else value).isoformat()
        return text.removesuffix("T00:00:00").removesuffix(" 00:00:00")
    return str(value)


def _float_or_none(value: Any) -> float | None:
    if value is None:
        return None
    number = float(_numpy(value).reshape(-1)[0])
    return None if np.isnan(number) else number


def _tag(sample: Mapping[str, Any], subject: str) -> str:
    """``<target_date>`` when the sample has one, else ``day<target_time rounded>``."""
    date = _date_text(sample.get("target_date"))
    if date is not None:
        return _safe(date)
    time = _float_or_none(sample.get("target_time"))
    if time is None:
        raise KeyError(
            f"ForecastWriter: subject {subject}: the sample has neither 'target_date' nor 'target_time' to name its "
            "outputs by."
        )
    return f"day{round(time)}"


def _json_default(value: Any) -> Any:
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return _numpy(value).tolist()
    if isinstance(value, np.generic):
        return value.item()
    return _date_text(value)  # dates as ISO text, anything else as its str()
