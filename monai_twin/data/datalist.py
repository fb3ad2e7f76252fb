"""Datalists for MONAI bundles: a manifest folder in, plain item dictionaries out.

A bundle config names a manifest directory (``dataset_dir``) and needs, per run, a list of items
for a ``monai.data.Dataset``: the forecasting samples of one split section (training, evaluation),
or one forecast per subject at a chosen date (inference, what-if). These functions build them with
:func:`~monai_twin.data.load_manifest`, :func:`~monai_twin.data.split_subjects`,
:func:`~monai_twin.data.build_longitudinal_items` and :func:`~monai_twin.data.forecast_item`, add a
readable ``target_date`` for output names, and check up front that the manifest carries the EHR
codes the model needs -- a model whose what-if knob is a drug cannot answer for a manifest
without that drug, and should say so instead of forecasting from zeros.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .dataset import build_longitudinal_items, forecast_item, split_subjects
from .manifest import LongitudinalManifest, load_manifest

__all__ = ["check_required_codes", "fit_vocabulary", "forecast_datalist", "manifest_datalist"]


def _manifest(dataset_dir: str | os.PathLike | LongitudinalManifest, check_images: str) -> LongitudinalManifest:
    if isinstance(dataset_dir, LongitudinalManifest):
        return dataset_dir
    folder = Path(dataset_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset_dir {str(folder)!r} is not a folder (expected a manifest directory).")
    return load_manifest(folder, check_images=check_images)  # type: ignore[arg-type]


def check_required_codes(manifest: LongitudinalManifest, codes: Sequence[str], where: str = "") -> None:
    """Raise a ``ValueError`` listing the ``codes`` that no event of ``manifest`` carries.

    A code matches its own events and the ``//START`` / ``//STOP`` events of an exposure drug
    named by its base code (``"DRUG//tamoxifen"``).
    """
    if not codes:
        return
    present = set(manifest.events["code"].astype(str).unique()) if len(manifest.events) else set()
    missing = [c for c in codes if not ({c, f"{c}//START", f"{c}//STOP"} & present)]
    if missing:
        shown = sorted(present)[:20]
        raise ValueError(
            f"{where or 'the manifest'}: the model needs the EHR code(s) {missing}, which no row of the events "
            f"table carries (codes present: {shown}{' ...' if len(present) > 20 else ''}). Map your codes to the "
            "model's vocabulary, or retrain on your data."
        )


def _date(manifest: LongitudinalManifest, subject: str, days: float) -> str:
    when = manifest.to_time(subject, days)
    return when.date().isoformat() if hasattr(when, "date") else f"day{float(when):.0f}"


def manifest_datalist(
    dataset_dir: str | os.PathLike | LongitudinalManifest,
    section: Literal["training", "validation", "test"] | None = None,
    *,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    min_history: int = 1,
    max_history: int | None = None,
    targets: Literal["all", "last"] = "all",
    required_codes: Sequence[str] = (),
    check_images: Literal["header", "exists", "none"] = "exists",
) -> list[dict[str, Any]]:
    """The forecasting samples of one split section of a manifest directory (each with its target scan).

    Args:
        dataset_dir: a manifest directory (``visits.*``, ``events.*``, ``static.*``) or a loaded manifest.
        section: ``"training"``, ``"validation"``, ``"test"`` (subject-level split by
            :func:`~monai_twin.data.split_subjects` with ``fractions`` and ``seed``) or ``None`` (all).
        min_history, max_history, targets: see :func:`~monai_twin.data.build_longitudinal_items`.
        required_codes: EHR codes the model needs (:func:`check_required_codes`).
        check_images: see :func:`~monai_twin.data.load_manifest`.

    Returns:
        the items of :func:`~monai_twin.data.build_longitudinal_items`, each with ``target_date``
        (ISO date of the target visit, or ``day<N>`` for manifests in days).

    Example::

        train = monai.data.CacheDataset(manifest_datalist("cohort/", "training", max_history=4), transform=...)
    """
    manifest = _manifest(dataset_dir, check_images)
    check_required_codes(manifest, required_codes, f"dataset_dir {str(dataset_dir)!r}")
    subjects = None
    if section is not None:
        split = split_subjects(manifest.subjects, fractions, seed)
        if section not in split:
            raise ValueError(f"section must be one of {sorted(split)} or None, got {section!r}.")
        subjects = split[section]
        if not subjects:
            raise ValueError(
                f"dataset_dir {str(dataset_dir)!r}: the {section!r} section is empty ({len(manifest.subjects)} "
                f"subjects split by fractions {tuple(fractions)}); use more subjects or section=None."
            )
    items = build_longitudinal_items(
        manifest, min_history=min_history, max_history=max_history, targets=targets, subjects=subjects
    )
    for item in items:
        item["target_date"] = _date(manifest, item["subject_id"], item["target_time"])
    return items


def forecast_datalist(
    dataset_dir: str | os.PathLike | LongitudinalManifest,
    *,
    days_after_last: float = 365.0,
    when: Mapping[str, Any] | None = None,
    subjects: Sequence[str] | None = None,
    max_history: int | None = None,
    planned_events: Mapping[str, Mapping[str, Sequence]] | None = None,
    required_codes: Sequence[str] = (),
    check_images: Literal["header", "exists", "none"] = "exists",
) -> list[dict[str, Any]]:
    """One item per subject to forecast at a future date (no target scan): every visit is history.

    Args:
        dataset_dir: a manifest directory or a loaded manifest.
        days_after_last: forecast this many days after each subject's last scan (unless ``when``
            names the subject's date).
        when: subject -> forecast date (a datetime / ISO string, or a day number for manifests in days).
        subjects: the subjects to forecast (default: every subject of the manifest).
        max_history: most recent visits kept.
        planned_events: subject -> its treatment plan between the last scan and the date (see
            :func:`~monai_twin.data.forecast_item`).
        required_codes: EHR codes the model needs (:func:`check_required_codes`).
        check_images: see :func:`~monai_twin.data.load_manifest`.

    Returns:
        the items of :func:`~monai_twin.data.forecast_item` (``target_index`` -1), each with
        ``target_date``.
    """
    if days_after_last <= 0:
        raise ValueError(f"days_after_last must be > 0, got {days_after_last}.")
    manifest = _manifest(dataset_dir, check_images)
    check_required_codes(manifest, required_codes, f"dataset_dir {str(dataset_dir)!r}")
    chosen = manifest.subjects if subjects is None else [str(s) for s in subjects]
    unknown = sorted(set(chosen) - set(manifest.subjects))
    if unknown:
        raise KeyError(f"dataset_dir {str(dataset_dir)!r}: subject(s) {unknown[:10]} are not in the visits table.")
    when = dict(when or {})
    items = []
    for sid in chosen:
        if sid in when:
            target = when[sid]
        else:
            last = float(np.max(manifest.subject_visits(sid)["time"].to_numpy(dtype=np.float64)))
            target = manifest.to_time(sid, last + float(days_after_last))
        item = forecast_item(
            manifest, sid, target, max_history=max_history, planned_events=(planned_events or {}).get(sid)
        )
        item["target_date"] = _date(manifest, sid, item["target_time"])
        items.append(item)
    return items


def fit_vocabulary(
    dataset_dir: str | os.PathLike | LongitudinalManifest,
    section: Literal["training", "validation", "test"] | None = "training",
    *,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    save_to: str | os.PathLike | None = None,
    **fit_kwargs: Any,
):
    """Fit an :class:`~monai_twin.transforms.ehr.EHRVocabulary` on one section's subjects (default the
    training subjects: evaluation subjects must not shape the encoding) and optionally save it as
    JSON (written to a temporary name and renamed).

    Example::

        vocabulary = fit_vocabulary("cohort/", save_to="models/ehr_vocabulary.json")
    """
    from ..transforms.ehr import EHRVocabulary

    manifest = _manifest(dataset_dir, "none")
    subjects = None if section is None else split_subjects(manifest.subjects, fractions, seed)[section]
    vocabulary = EHRVocabulary.fit(manifest.events, manifest.static, subjects=subjects, **fit_kwargs)
    if save_to is not None:
        vocabulary.save(save_to)
    return vocabulary
