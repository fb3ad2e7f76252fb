"""The ``monai-twin`` command line.

Sub-commands import what they need when they run, so ``monai-twin --help`` is instant.

Examples::

    monai-twin config                     # versions of monai_twin and its dependencies
    monai-twin validate cohort/           # validate a manifest folder, report every problem
    monai-twin items cohort/ --section training --max-history 4
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]


def _cmd_config(args: argparse.Namespace) -> int:
    from monai_twin.config import print_config

    print_config()
    return 0


def _manifest_options(args: argparse.Namespace) -> dict:
    return {
        "check_images": args.check_images,
        "unknown_subjects": args.unknown_subjects,
        "single_visit_subjects": args.single_visit_subjects,
        "valueless_events": args.valueless_events,
        "progress": not args.quiet,
    }


def _cmd_validate(args: argparse.Namespace) -> int:
    from monai_twin.data.manifest import ManifestError, load_manifest, manifest_summary

    try:
        manifest = load_manifest(args.manifest, **_manifest_options(args))
    except (ManifestError, FileNotFoundError) as err:
        print(f"INVALID: {err}", file=sys.stderr)
        return 1
    summary = dict(manifest_summary(manifest))
    summary["report"] = manifest.report
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _cmd_items(args: argparse.Namespace) -> int:
    from monai_twin.data.dataset import build_longitudinal_items, split_subjects
    from monai_twin.data.manifest import ManifestError, load_manifest

    try:
        manifest = load_manifest(args.manifest, **_manifest_options(args))
    except (ManifestError, FileNotFoundError) as err:
        print(f"INVALID: {err}", file=sys.stderr)
        return 1
    split = split_subjects(manifest.subjects, args.fractions, args.seed)
    subjects = split[args.section] if args.section else manifest.subjects
    items = build_longitudinal_items(
        manifest, min_history=args.min_history, max_history=args.max_history, targets=args.targets, subjects=subjects
    )
    rows = [
        {
            "subject_id": it["subject_id"],
            "target_index": it["target_index"],
            "history": len(it["history"]),
            "days_to_target": [round(float(t), 2) for t in it["times"]],
            "events_before_target": len(it["events"]["time"]),
            "target_events": len(it["target_events"]["time"]),
        }
        for it in items
    ]
    print(json.dumps({"section": args.section or "all", "subjects": len(subjects), "items": rows}, indent=2))
    return 0


def _add_manifest_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", help="manifest folder (visits.*, events.*, static.*) or a visits table")
    parser.add_argument("--check-images", choices=("header", "exists", "none"), default="header")
    parser.add_argument("--unknown-subjects", choices=("raise", "drop"), default="raise")
    parser.add_argument("--single-visit-subjects", choices=("raise", "drop"), default="raise")
    parser.add_argument("--valueless-events", choices=("raise", "keep"), default="raise")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    from monai_twin import __version__

    parser = argparse.ArgumentParser(prog="monai-twin", description="Digital twins of disease progression for MONAI.")
    parser.add_argument("--version", action="version", version=f"monai_twin {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("config", help="print versions of monai_twin and its dependencies")
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("validate", help="validate a longitudinal manifest and summarise it")
    _add_manifest_arguments(p)
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("items", help="list the forecasting items (subject, target visit) of a manifest")
    _add_manifest_arguments(p)
    p.add_argument("--section", choices=("training", "validation", "test"), default=None)
    p.add_argument("--fractions", type=float, nargs=3, default=(0.7, 0.15, 0.15), metavar=("TRAIN", "VAL", "TEST"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-history", type=int, default=1)
    p.add_argument("--max-history", type=int, default=None)
    p.add_argument("--targets", choices=("all", "last"), default="all")
    p.set_defaults(func=_cmd_items)

    _register_extra_commands(sub)
    return parser


def _register_extra_commands(sub: argparse._SubParsersAction) -> None:
    """Sub-commands contributed by other parts of the package (each module adds its own parser)."""
    import importlib

    for module_name in _EXTRA_COMMAND_MODULES:
        importlib.import_module(module_name).add_parser(sub)


#: Modules that expose ``add_parser(subparsers)``; they must import nothing heavy at module level.
_EXTRA_COMMAND_MODULES: tuple[str, ...] = ("monai_twin.apps.demo", "monai_twin.apps.synth_command")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``monai-twin`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
