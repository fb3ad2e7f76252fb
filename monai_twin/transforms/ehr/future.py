"""Future-EHR targets: the values a twin's EHR head must predict at the target visit, and the
last-value-carried-forward (LOCF) baseline it is judged against.

Values are normalised with the vocabulary's robust statistics (the same scale the interval
features use), so one head regresses codes of any unit; :meth:`EHRFutureValues.denormalise`
brings predictions back to the codes' units.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms.transform import MapTransform, Transform

from .array import _vocabulary
from .functional import encode_events
from .vocabulary import OOV_INDEX, EHRVocabulary

__all__ = ["EHRFutureValues", "EHRFutureValuesD", "EHRFutureValuesDict", "EHRFutureValuesd"]


class EHRFutureValues(Transform):
    """Per code, the last measured (normalised) value among some events, with a mask.

    Used twice per item: on ``target_events`` (what was measured at the target visit: the
    future-EHR target) and on ``events`` (everything recorded before the target: the
    last-value-carried-forward baseline).

    Args:
        vocabulary: a fitted :class:`~monai_twin.transforms.ehr.EHRVocabulary` or its JSON path.
        codes: the ``K`` codes to predict (each must have numeric statistics in the vocabulary).
        check_units: validate and convert units as the other EHR transforms do.
        dtype: torch dtype of the outputs.

    Returns (from ``__call__(events)``):
        ``values`` (K,) normalised (0 where unmeasured) and ``mask`` (K,) 1 where measured.

    Raises:
        ValueError: a code the vocabulary has no numeric statistics for (listing them).
    """

    backend = [torch.Tensor]  # outputs are torch tensors

    def __init__(
        self,
        vocabulary: EHRVocabulary | str | os.PathLike,
        codes: Sequence[str],
        check_units: bool = True,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.vocabulary = _vocabulary(vocabulary)
        self.codes = [str(c) for c in codes]
        if not self.codes:
            raise ValueError("codes must name at least one code to predict.")
        unknown = [c for c in self.codes if c not in self.vocabulary.stats]
        if unknown:
            raise ValueError(
                f"codes {unknown} have no numeric statistics in the vocabulary (numeric codes: "
                f"{sorted(self.vocabulary.stats)[:10]}); the future-EHR head regresses numeric values only."
            )
        self.index = self.vocabulary.index(self.codes)
        self.check_units, self.dtype = check_units, dtype

    def __call__(self, events: Any) -> tuple[torch.Tensor, torch.Tensor]:
        k = len(self.codes)
        values, mask = np.zeros(k), np.zeros(k)
        if events is not None and ("code" not in events or "time" not in events):
            raise KeyError(f"events need 'time' and 'code' columns (got {sorted(map(str, events))}).")
        if events is not None and len(events["code"]):
            enc = encode_events(events, self.vocabulary, check_units=self.check_units)
            time, index, normalised = enc.time, enc.index, enc.value
            for j, code_index in enumerate(self.index):
                if code_index == OOV_INDEX:
                    continue
                rows = np.flatnonzero((index == code_index) & np.isfinite(normalised) & np.isfinite(time))
                if rows.size:
                    last = rows[time[rows] == time[rows].max()]
                    values[j], mask[j] = float(normalised[last].max()), 1.0  # ties: the largest, as `last`
        return torch.as_tensor(values, dtype=self.dtype), torch.as_tensor(mask, dtype=self.dtype)

    def denormalise(self, values: torch.Tensor | np.ndarray) -> np.ndarray:
        """Normalised values ``(..., K)`` back in the codes' units (values clipped by the vocabulary stay clipped)."""
        v = np.asarray(values, dtype=np.float64)
        return v * self.vocabulary.scale[self.index] + self.vocabulary.centre[self.index]


class EHRFutureValuesd(MapTransform):
    """Dictionary-based :class:`EHRFutureValues`: the future-EHR target and its LOCF baseline.

    Reads ``target_events`` (absent at inference: the target is then skipped) and ``events``;
    writes ``future_ehr`` / ``future_ehr_mask`` and ``future_ehr_locf`` / ``future_ehr_locf_mask``
    (each ``(K,)``).

    Args:
        vocabulary: the vocabulary or its JSON path.
        codes: the codes to predict.
        target_key, events_key: input keys (``events_key=None``: no LOCF outputs).
        output_key: prefix of the output keys.
        dtype: torch dtype of the outputs.

    Example::

        sample = EHRFutureValuesd(vocab, ["LAB//CA15-3"])(item)
        sample["future_ehr"], sample["future_ehr_locf"]
    """

    def __init__(
        self,
        vocabulary: EHRVocabulary | str | os.PathLike,
        codes: Sequence[str],
        target_key: str = "target_events",
        events_key: str | None = "events",
        output_key: str = "future_ehr",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(target_key, allow_missing_keys=True)
        self.transform = EHRFutureValues(vocabulary, codes, dtype=dtype)
        self.target_key, self.events_key, self.output_key = target_key, events_key, output_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.events_key is not None and self.events_key not in d:
            raise KeyError(f"EHRFutureValuesd: the item has no {self.events_key!r} (keys: {sorted(map(str, d))}).")
        if self.target_key in d:
            d[self.output_key], d[f"{self.output_key}_mask"] = self.transform(d[self.target_key])
        if self.events_key is not None:
            d[f"{self.output_key}_locf"], d[f"{self.output_key}_locf_mask"] = self.transform(d[self.events_key])
        return d


EHRFutureValuesD = EHRFutureValuesDict = EHRFutureValuesd
