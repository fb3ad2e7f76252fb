"""What-if edits as a transform: the counterfactual events of an item, beside its recorded ones.

:func:`~monai_twin.data.edit_events` edits one event table; a bundle's what-if run needs the same
edit applied to every item of a datalist, in each item's *forecast interval* (from its last prior
scan to its target date), written under a second key so that the EHR transforms can encode both
the recorded and the edited events and a :class:`~monai_twin.engines.WhatIfEvaluator` can forecast
both in one batch.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
from monai.transforms.transform import MapTransform

from ...data.events import edit_events

__all__ = ["EditEventsD", "EditEventsDict", "EditEventsd"]

_ALLOWED = {"code", "scale", "value", "exposure"}


class EditEventsd(MapTransform):
    """Apply what-if edits to ``data["events"]`` inside the forecast interval; write the result to ``output_key``.

    The interval runs from the last prior scan (``history_times[-1]``, days) to the target
    (``target_time``, days): the treatment between the last scan and the forecast date, which is
    what a what-if question changes. The recorded events are left as they are.

    Args:
        edits: one dict per edit: ``{"code": "DRUG//tamoxifen", "scale": 0.5}`` halves the running
            daily dose, ``{"code": ..., "value": 0.0}`` stops it (``value`` > 0 with
            ``"exposure": True`` starts a drug the patient was not taking). See
            :func:`~monai_twin.data.edit_events`.
        events_key, history_times_key, target_time_key, subject_key: input keys.
        output_key: where the edited events go.
        edits_key: where a JSON-ready record of what was applied goes (``None``: not written).
        on_noop: an edit that changes nothing for an item (the drug is not taken in its
            interval): ``"raise"`` (naming the subject) or ``"keep"`` the events and record it.

    Example::

        edit = EditEventsd([{"code": "DRUG//tamoxifen", "scale": 0.5}])
        pipeline = Compose([edit, EHRToIntervalFeaturesd(vocab),
                            EHRToIntervalFeaturesd(vocab, events_key="events_whatif",
                                                   output_key="ehr_intervals_whatif",
                                                   mask_key="ehr_intervals_mask_whatif")])
    """

    def __init__(
        self,
        edits: Sequence[Mapping[str, Any]],
        events_key: str = "events",
        history_times_key: str = "history_times",
        target_time_key: str = "target_time",
        subject_key: str | None = "subject_id",
        output_key: str = "events_whatif",
        edits_key: str | None = "whatif_edits",
        on_noop: str = "raise",
    ) -> None:
        super().__init__(events_key)
        if isinstance(edits, Mapping):
            edits = [edits]
        if not edits:
            raise ValueError("EditEventsd needs at least one edit, e.g. [{'code': 'DRUG//tamoxifen', 'scale': 0.5}].")
        checked = []
        for k, edit in enumerate(edits):
            edit = dict(edit)
            unknown = set(edit) - _ALLOWED
            if "code" not in edit or unknown:
                raise ValueError(
                    f"edit {k} must have a 'code' and one of 'scale' / 'value' (optional 'exposure'); got {edit}."
                )
            if ("scale" in edit) == ("value" in edit):
                raise ValueError(f"edit {k} ({edit['code']!r}) needs exactly one of 'scale' and 'value', got {edit}.")
            checked.append(edit)
        if on_noop not in ("raise", "keep"):
            raise ValueError(f"on_noop must be 'raise' or 'keep', got {on_noop!r}.")
        self.edits = checked
        self.events_key, self.history_times_key, self.target_time_key = events_key, history_times_key, target_time_key
        self.subject_key, self.output_key, self.edits_key, self.on_noop = subject_key, output_key, edits_key, on_noop

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        subject = str(d.get(self.subject_key, "?")) if self.subject_key else "?"
        for key in (self.events_key, self.history_times_key, self.target_time_key):
            if key not in d:
                raise KeyError(
                    f"EditEventsd, subject {subject!r}: the item has no {key!r} (keys: {sorted(map(str, d))})."
                )
        after = float(np.asarray(d[self.history_times_key], dtype=np.float64)[-1])
        before = float(d[self.target_time_key])
        events = d[self.events_key]
        record = []
        for edit in self.edits:
            kwargs = {k: edit[k] for k in ("scale", "value", "exposure") if k in edit}
            try:
                events = edit_events(events, edit["code"], after=after, before=before, **kwargs)
                applied = True
            except ValueError as err:
                noop = "changes nothing" in str(err) or str(err).startswith("no event with code")
                if self.on_noop == "keep" and noop:
                    applied = False
                else:
                    raise ValueError(f"EditEventsd, subject {subject!r}, edit {edit}: {err}") from err
            record.append({**edit, "from_day": after, "to_day": before, "applied": applied})
        d[self.output_key] = events
        if self.edits_key is not None:
            d[self.edits_key] = record
        return d


EditEventsD = EditEventsDict = EditEventsd
