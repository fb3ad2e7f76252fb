#!/usr/bin/env bash
# One entry point for the README's quick start and for CI.
#
#   bash scripts/quickstart.sh demo   # set up .venv, then run the main job on built-in data
#   bash scripts/quickstart.sh test   # set up .venv, then run the test suite
#
# Setup is idempotent: the venv is (re)built only when it is missing or when setup.cfg /
# requirements/constraints.txt changed since it was built. torch is pinned through
# requirements/constraints.txt: an unpinned torch makes pip fetch a multi-GB CUDA build.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
venv="${MONAI_TWIN_VENV:-$here/.venv}"
python="${PYTHON:-python3}"

setup() {
    "$python" - <<'PY' || { echo "monai_twin needs Python >= 3.10 (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 10) else 1)
PY
    local stamp
    stamp="$(cat setup.cfg requirements/constraints.txt | sha256sum | cut -c1-16)"
    if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.monai_twin_stamp" 2>/dev/null)" = "$stamp" ]; then
        return 0
    fi
    echo "== setting up $venv (first run takes about a minute)"
    local start=$SECONDS
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet -c requirements/constraints.txt -e ".[dev,docs]"
    echo "$stamp" > "$venv/.monai_twin_stamp"
    echo "== environment ready in $((SECONDS - start)) s"
}

cmd="${1:-}"
shift || true
case "$cmd" in
    demo)
        setup
        exec "$venv/bin/monai-twin" demo "$@"
        ;;
    test)
        setup
        exec "$venv/bin/python" -m pytest "$@"
        ;;
    setup)
        setup
        ;;
    *)
        echo "usage: bash scripts/quickstart.sh demo|test|setup [args...]" >&2
        exit 2
        ;;
esac
