"""Array EHR transforms: one subject's events in, tensors out.

Inputs are the raw event columns of one sample (a dict of arrays as in a dataset item's
``events``, or a DataFrame) with times in float **days** on the subject's axis, plus the prior
visit times and the target time. Outputs are torch tensors (no MetaTensor: EHR tensors have no
spatial metadata). The encoding rules are in :mod:`monai_twin.transforms.ehr.functional`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms.transform import Transform
from monai.utils import TransformBackends
from monai.utils.type_conversion import convert_to_tensor

from .functional import (
    REDUCERS,
    _check_reducers,
    _exposure_message,
    _ExposureError,
    _to_numpy,
    encode_events,
    event_tokens,
    interval_feature_names,
    interval_features,
    static_feature_names,
    static_features,
)
from .vocabulary import EHRVocabulary

__all__ = ["EHRStaticToTensor", "EHRToEventTokens", "EHRToIntervalFeatures"]


def _vocabulary(vocabulary: EHRVocabulary | str | os.PathLike) -> EHRVocabulary:
    if isinstance(vocabulary, EHRVocabulary):
        return vocabulary
    if isinstance(vocabulary, (str, os.PathLike)):
        return EHRVocabulary.load(vocabulary)
    raise TypeError(f"vocabulary must be an EHRVocabulary or a path to its JSON, got {type(vocabulary).__name__}.")


def _visit_times(history_times: Any, target_time: Any) -> tuple[np.ndarray, float]:
    history = np.asarray(_to_numpy(history_times), dtype=np.float64).reshape(-1)
    target = float(np.asarray(_to_numpy(target_time), dtype=np.float64).reshape(()))
    if history.size == 0:
        raise ValueError("history_times is empty; an item needs at least one prior visit.")
    bounds = np.append(history, target)
    if not np.isfinite(bounds).all():
        raise ValueError(f"history_times / target_time must be finite days, got {history.tolist()} / {target}.")
    if not (np.diff(bounds) > 0).all():
        raise ValueError(
            "history_times must be strictly increasing and before target_time (days), got "
            f"history_times={history.tolist()}, target_time={target}."
        )
    return history, target


class EHRToIntervalFeatures(Transform):
    """Aggregate one subject's events per visit interval into a (T, F) matrix and its mask.

    Row ``i`` covers the days ``[history_times[i], history_times[i+1])``; the last row covers
    ``[history_times[-1], target_time)`` -- the events planned before the target visit, i.e. the
    what-if knob. Columns (F): one block per reducer (``last``, ``mean``, ``min``, ``max`` of the
    normalised values, ``count``) over ``vocabulary.feature_codes``, then the drug exposure in
    (dose unit) x days per ``vocabulary.exposure_codes``, then the days since the last event of
    each code (``-1``: not seen since the first prior visit); see :attr:`feature_names`. The mask
    is 1 where the feature was measured in that interval.

    Args:
        vocabulary: a fitted :class:`~monai_twin.transforms.ehr.EHRVocabulary` or the path of its JSON.
        reducers: which of ``"last", "mean", "min", "max", "count"`` to compute, in this order.
        exposure: add the exposure block for start/stop drug codes.
        time_since: add the days-since-last block.
        carry_forward: fill intervals without a value with the last earlier value (mask stays 0).
        decay: e-folding time in days applied to carried values; ``None`` = no decay.
        fill_value: value of undefined cells (0 = the normalised centre).
        check_units: verify the ``unit`` column against the fitted units.
        dtype: torch dtype of the features.
        cumulative_exposure: add a last block, ``<drug>:cumulative_exposure``: dose x days from the
            first recorded event (prescriptions before the first prior visit included) to the end of
            each interval. A window of the last few visits cannot add this up from its own rows, and
            effects that depend on total exposure (a growth rate damped by the drug taken so far)
            need it.

    Example::

        to_intervals = EHRToIntervalFeatures(vocab, reducers=("last", "count"))
        features, mask = to_intervals(item["events"], item["history_times"], item["target_time"])
        features.shape  # (T, F) == (len(item["history_times"]), len(to_intervals.feature_names))
    """

    backend = [TransformBackends.NUMPY, TransformBackends.TORCH]

    def __init__(
        self,
        vocabulary: EHRVocabulary | str | os.PathLike,
        reducers: Sequence[str] = REDUCERS,
        exposure: bool = True,
        time_since: bool = True,
        carry_forward: bool = False,
        decay: float | None = None,
        fill_value: float = 0.0,
        check_units: bool = True,
        dtype: torch.dtype = torch.float32,
        cumulative_exposure: bool = False,
    ) -> None:
        self.vocabulary = _vocabulary(vocabulary)
        self.reducers = _check_reducers(reducers)
        self.feature_names = interval_feature_names(
            self.vocabulary, self.reducers, exposure, time_since, cumulative_exposure
        )
        self.cumulative_exposure = cumulative_exposure
        if decay is not None and not decay > 0:
            raise ValueError(f"decay must be a positive number of days or None, got {decay}.")
        self.exposure, self.time_since = exposure, time_since
        self.carry_forward, self.decay, self.fill_value = carry_forward, decay, fill_value
        self.check_units, self.dtype = check_units, dtype

    def __call__(
        self, events: Any, history_times: Any, target_time: Any, subject_id: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            events: one subject's events (dict of arrays or DataFrame), times in days.
            history_times: (T,) days of the prior visits, increasing.
            target_time: day of the target visit, after the last prior visit.
            subject_id: only used to name the subject in error messages.

        Returns:
            ``features`` (T, F) and ``mask`` (T, F) tensors.
        """
        history, target = _visit_times(history_times, target_time)
        vocab = self.vocabulary
        enc = encode_events(events, vocab, check_units=self.check_units)
        timed = np.isfinite(enc.time)
        index = enc.index[timed]
        try:
            features, mask = interval_features(
                np.zeros(int(timed.sum()), dtype=np.int64),
                enc.time[timed],
                vocab.feature_column[index],
                enc.value[timed],
                vocab.exposure_column[index],
                enc.rate[timed],
                np.append(history, target),
                np.array([0, history.size + 1]),
                len(vocab.feature_codes),
                len(vocab.exposure_codes),
                reducers=self.reducers,
                exposure=self.exposure,
                time_since=self.time_since,
                carry_forward=self.carry_forward,
                decay=self.decay,
                fill_value=self.fill_value,
                cumulative_exposure=self.cumulative_exposure,
            )
        except _ExposureError as err:
            raise ValueError(_exposure_message(err, vocab, str(subject_id))) from None
        return (
            convert_to_tensor(features, dtype=self.dtype, track_meta=False),
            convert_to_tensor(mask, dtype=self.dtype, track_meta=False),
        )


class EHRToEventTokens(Transform):
    """One subject's events as a fixed-length token sequence for cross-attention.

    Each event of ``[history_times[0] - lookback, target_time)`` becomes a token: its code index
    in the vocabulary (0 = padding, 1 = out of vocabulary), its normalised value (0 when it has
    none) and its time relative to the target visit in days (negative). Tokens are ordered by
    time; with more than ``max_tokens`` events the most recent ``max_tokens`` are kept and the
    number dropped is returned. Static rows (NaN time) are not tokens (see
    :class:`EHRStaticToTensor`).

    Args:
        vocabulary: a fitted :class:`~monai_twin.transforms.ehr.EHRVocabulary` or the path of its JSON.
        max_tokens: sequence length N.
        lookback: days before the first prior visit to include; ``0`` uses the same window as
            :class:`EHRToIntervalFeatures`, ``None`` every event before the target.
        check_units: verify the ``unit`` column against the fitted units.

    Example::

        to_tokens = EHRToEventTokens(vocab, max_tokens=128)
        code, value, time, mask, dropped = to_tokens(item["events"], item["history_times"], item["target_time"])
        code.shape  # (128,); time in days before the target, e.g. -35.5
    """

    backend = [TransformBackends.NUMPY, TransformBackends.TORCH]

    def __init__(
        self,
        vocabulary: EHRVocabulary | str | os.PathLike,
        max_tokens: int = 256,
        lookback: float | None = 0.0,
        check_units: bool = True,
    ) -> None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}.")
        if lookback is not None and not lookback >= 0:
            raise ValueError(f"lookback must be >= 0 days or None, got {lookback}.")
        self.vocabulary = _vocabulary(vocabulary)
        self.max_tokens, self.lookback, self.check_units = int(max_tokens), lookback, check_units

    def __call__(
        self, events: Any, history_times: Any, target_time: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """
        Returns:
            ``code`` (N,) int64, ``value`` (N,) float32, ``time`` (N,) float32 days relative to the
            target, ``mask`` (N,) float32, and the number of events dropped by truncation.
        """
        history, target = _visit_times(history_times, target_time)
        enc = encode_events(events, self.vocabulary, check_units=self.check_units)
        start = -np.inf if self.lookback is None else history[0] - self.lookback
        code, value, time, mask, dropped = event_tokens(enc.time, enc.index, enc.value, start, target, self.max_tokens)
        return (
            convert_to_tensor(code, dtype=torch.int64, track_meta=False),
            convert_to_tensor(value, dtype=torch.float32, track_meta=False),
            convert_to_tensor(time, dtype=torch.float32, track_meta=False),
            convert_to_tensor(mask, dtype=torch.float32, track_meta=False),
            int(dropped),
        )


class EHRStaticToTensor(Transform):
    """Encode one subject's static attributes as an (S,) vector.

    Numeric attributes give two features (normalised value, missing flag); categorical ones a
    one-hot over the fitted categories plus an ``<unknown>`` slot (missing or unseen category).
    Values come from the ``static`` dict and from static event rows (NaN time) of ``events``.

    Args:
        vocabulary: a fitted :class:`~monai_twin.transforms.ehr.EHRVocabulary` or the path of its JSON.
        dtype: torch dtype of the output.

    Example::

        to_static = EHRStaticToTensor(vocab)
        vector = to_static(item["static"], item["events"])  # (S,), S == len(to_static.feature_names)
    """

    backend = [TransformBackends.NUMPY, TransformBackends.TORCH]

    def __init__(self, vocabulary: EHRVocabulary | str | os.PathLike, dtype: torch.dtype = torch.float32) -> None:
        self.vocabulary = _vocabulary(vocabulary)
        self.feature_names = static_feature_names(self.vocabulary)
        self.dtype = dtype

    def __call__(self, static: Mapping[str, Any] | None, events: Any = None) -> torch.Tensor:
        return convert_to_tensor(static_features(self.vocabulary, static, events), dtype=self.dtype, track_meta=False)
