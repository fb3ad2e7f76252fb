from __future__ import annotations

from .datalist import check_required_codes, fit_vocabulary, forecast_datalist, manifest_datalist
from .dataset import (
    SECTIONS,
    LongitudinalDataset,
    build_longitudinal_items,
    collate_longitudinal,
    forecast_item,
    split_subjects,
)
from .events import edit_events, running_dose
from .manifest import (
    EVENT_COLUMNS,
    STATIC_COLUMNS,
    VISIT_COLUMNS,
    LongitudinalManifest,
    ManifestError,
    ManifestProblem,
    load_manifest,
    manifest_summary,
    read_table,
)

__all__ = [
    "EVENT_COLUMNS",
    "SECTIONS",
    "STATIC_COLUMNS",
    "VISIT_COLUMNS",
    "LongitudinalDataset",
    "LongitudinalManifest",
    "ManifestError",
    "ManifestProblem",
    "build_longitudinal_items",
    "check_required_codes",
    "collate_longitudinal",
    "edit_events",
    "fit_vocabulary",
    "forecast_datalist",
    "forecast_item",
    "load_manifest",
    "manifest_datalist",
    "manifest_summary",
    "read_table",
    "running_dose",
    "split_subjects",
]
