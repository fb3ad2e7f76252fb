"""Dictionary EHR transforms: read a dataset item's raw EHR keys, write stackable tensors.

They read the keys of :func:`monai_twin.data.build_longitudinal_items` -- ``events`` (dict of
arrays, times in days, static rows with NaN time), ``static`` (dict), ``history_times`` (T,) and
``target_time`` -- and write flat keys of fixed shape so a ``DataLoader`` can stack them:

===========================  ===========  ==========================================
key                          shape        meaning
===========================  ===========  ==========================================
``ehr_static``               (S,)         encoded static attributes
``ehr_intervals``            (T, F)       per-interval features (last row: up to the target)
``ehr_intervals_mask``       (T, F)       1 where measured
``ehr_tokens_code``          (N,)         token code index (0 = padding, 1 = unknown)
``ehr_tokens_value``         (N,)         normalised value
``ehr_tokens_time``          (N,)         days relative to the target visit (negative)
``ehr_tokens_mask``          (N,)         1 for real tokens
``ehr_tokens_dropped``       ()           events dropped by keep-last-N truncation
===========================  ===========  ==========================================

``T`` varies with the item's history; pad or fix ``max_history`` before stacking, or collate
with :func:`monai_twin.data.collate_longitudinal`, which keeps ragged keys as lists.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.transforms.transform import MapTransform

from .array import EHRStaticToTensor, EHRToEventTokens, EHRToIntervalFeatures
from .functional import REDUCERS
from .vocabulary import EHRVocabulary

__all__ = [
    "EHRStaticToTensorD",
    "EHRStaticToTensorDict",
    "EHRStaticToTensord",
    "EHRToEventTokensD",
    "EHRToEventTokensDict",
    "EHRToEventTokensd",
    "EHRToIntervalFeaturesD",
    "EHRToIntervalFeaturesDict",
    "EHRToIntervalFeaturesd",
]


def _subject(d: Mapping[Hashable, Any], key: str | None) -> str:
    return str(d.get(key, "<unknown>")) if key else "<unknown>"


def _named(err: Exception, subject: str) -> Exception:
    # the array transforms do not know the subject; the dictionary does, so put it in the message
    if isinstance(err, (ValueError, TypeError)) and f"subject {subject}" not in str(err):
        return type(err)(f"subject {subject!r}: {err}")
    return err


class EHRToIntervalFeaturesd(MapTransform):
    """Dictionary-based wrapper of :class:`~monai_twin.transforms.ehr.EHRToIntervalFeatures`.

    Reads ``events``, ``history_times`` and ``target_time``; writes ``ehr_intervals`` (T, F) and
    ``ehr_intervals_mask`` (T, F). The input keys are left as they are.

    Args:
        vocabulary: a fitted :class:`~monai_twin.transforms.ehr.EHRVocabulary` or its JSON path.
        events_key, history_times_key, target_time_key, subject_key: input keys.
        output_key, mask_key: output keys.
        reducers, exposure, time_since, carry_forward, decay, fill_value, check_units, dtype: see
            :class:`~monai_twin.transforms.ehr.EHRToIntervalFeatures`.
        cumulative_exposure: see :class:`~monai_twin.transforms.ehr.EHRToIntervalFeatures`.
        allow_missing_keys: skip items without ``events_key`` instead of raising.

    Example::

        from monai.transforms import Compose

        pipeline = Compose([EHRToIntervalFeaturesd(vocab), EHRToEventTokensd(vocab), EHRStaticToTensord(vocab)])
        sample = pipeline(item)
        sample["ehr_intervals"].shape  # (T, F)
    """

    backend = EHRToIntervalFeatures.backend

    def __init__(
        self,
        vocabulary: EHRVocabulary | str | os.PathLike,
        events_key: str = "events",
        history_times_key: str = "history_times",
        target_time_key: str = "target_time",
        subject_key: str | None = "subject_id",
        output_key: str = "ehr_intervals",
        mask_key: str = "ehr_intervals_mask",
        reducers: Sequence[str] = REDUCERS,
        exposure: bool = True,
        time_since: bool = True,
        carry_forward: bool = False,
        decay: float | None = None,
        fill_value: float = 0.0,
        check_units: bool = True,
        dtype: torch.dtype = torch.float32,
        allow_missing_keys: bool = False,
        cumulative_exposure: bool = False,
    ) -> None:
        super().__init__(events_key, allow_missing_keys)
        self.transform = EHRToIntervalFeatures(
            vocabulary,
            reducers,
            exposure,
            time_since,
            carry_forward,
            decay,
            fill_value,
            check_units,
            dtype,
            cumulative_exposure=cumulative_exposure,
        )
        self.events_key, self.history_times_key, self.target_time_key = events_key, history_times_key, target_time_key
        self.subject_key, self.output_key, self.mask_key = subject_key, output_key, mask_key

    @property
    def feature_names(self) -> list[str]:
        return self.transform.feature_names

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            subject = _subject(d, self.subject_key)
            try:
                d[self.output_key], d[self.mask_key] = self.transform(
                    d[key], d[self.history_times_key], d[self.target_time_key], subject_id=subject
                )
            except (ValueError, TypeError) as err:
                raise _named(err, subject) from err
        return d


class EHRToEventTokensd(MapTransform):
    """Dictionary-based wrapper of :class:`~monai_twin.transforms.ehr.EHRToEventTokens`.

    Reads ``events``, ``history_times``, ``target_time``; writes ``<prefix>_code``,
    ``<prefix>_value``, ``<prefix>_time``, ``<prefix>_mask`` (each (N,)) and ``<prefix>_dropped``
    (int), with ``prefix="ehr_tokens"`` by default.

    Args:
        vocabulary: a fitted :class:`~monai_twin.transforms.ehr.EHRVocabulary` or its JSON path.
        max_tokens, lookback, check_units: see :class:`~monai_twin.transforms.ehr.EHRToEventTokens`.
        events_key, history_times_key, target_time_key, subject_key: input keys.
        prefix: prefix of the output keys.
        allow_missing_keys: skip items without ``events_key`` instead of raising.

    Example::

        sample = EHRToEventTokensd(vocab, max_tokens=64)(item)
        sample["ehr_tokens_time"][sample["ehr_tokens_mask"] > 0]  # days before the target
    """

    backend = EHRToEventTokens.backend

    def __init__(
        self,
        vocabulary: EHRVocabulary | str | os.PathLike,
        max_tokens: int = 256,
        lookback: float | None = 0.0,
        check_units: bool = True,
        events_key: str = "events",
        history_times_key: str = "history_times",
        target_time_key: str = "target_time",
        subject_key: str | None = "subject_id",
        prefix: str = "ehr_tokens",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(events_key, allow_missing_keys)
        self.transform = EHRToEventTokens(vocabulary, max_tokens, lookback, check_units)
        self.history_times_key, self.target_time_key = history_times_key, target_time_key
        self.subject_key, self.prefix = subject_key, prefix

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            subject = _subject(d, self.subject_key)
            try:
                code, value, time, mask, dropped = self.transform(
                    d[key], d[self.history_times_key], d[self.target_time_key]
                )
            except (ValueError, TypeError) as err:
                raise _named(err, subject) from err
            p = self.prefix
            d[f"{p}_code"], d[f"{p}_value"], d[f"{p}_time"], d[f"{p}_mask"] = code, value, time, mask
            d[f"{p}_dropped"] = dropped
        return d


class EHRStaticToTensord(MapTransform):
    """Dictionary-based wrapper of :class:`~monai_twin.transforms.ehr.EHRStaticToTensor`.

    Reads ``static`` (dict) and the static rows of ``events``; writes ``ehr_static`` (S,).

    Args:
        vocabulary: a fitted :class:`~monai_twin.transforms.ehr.EHRVocabulary` or its JSON path.
        static_key: input key of the static attributes dict.
        events_key: input key of the events (their NaN-time rows are static); ``None`` to ignore.
        subject_key: key naming the subject in error messages.
        output_key: output key.
        dtype: torch dtype of the output.
        allow_missing_keys: skip items without ``static_key`` instead of raising.

    Example::

        sample = EHRStaticToTensord(vocab)(item)
        sample["ehr_static"].shape  # (S,)
    """

    backend = EHRStaticToTensor.backend

    def __init__(
        self,
        vocabulary: EHRVocabulary | str | os.PathLike,
        static_key: str = "static",
        events_key: str | None = "events",
        subject_key: str | None = "subject_id",
        output_key: str = "ehr_static",
        dtype: torch.dtype = torch.float32,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(static_key, allow_missing_keys)
        self.transform = EHRStaticToTensor(vocabulary, dtype)
        self.events_key, self.subject_key, self.output_key = events_key, subject_key, output_key

    @property
    def feature_names(self) -> list[str]:
        return self.transform.feature_names

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            subject = _subject(d, self.subject_key)
            events = d.get(self.events_key) if self.events_key else None
            try:
                d[self.output_key] = self.transform(d[key], events)
            except (ValueError, TypeError) as err:
                raise _named(err, subject) from err
        return d


EHRToIntervalFeaturesD = EHRToIntervalFeaturesDict = EHRToIntervalFeaturesd
EHRToEventTokensD = EHRToEventTokensDict = EHRToEventTokensd
EHRStaticToTensorD = EHRStaticToTensorDict = EHRStaticToTensord
