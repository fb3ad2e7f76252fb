"""The user guide's Python examples run as written: every ```python block of a page, in order, in one
namespace, from a scratch working directory."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guide"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
PAGES = sorted(GUIDE.glob("*.md"))


@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_guide_examples_run(page, tmp_path, monkeypatch):
    blocks = BLOCK.findall(page.read_text(encoding="utf-8"))
    if not blocks:
        pytest.skip(f"{page.name} has no Python examples")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs_example_{page.stem}"}
    for number, code in enumerate(blocks, start=1):
        try:
            exec(compile(code, f"{page.name}[block {number}]", "exec"), namespace)
        except Exception as err:  # re-raise with the page and block named
            raise AssertionError(f"{page.name}, Python block {number} failed: {type(err).__name__}: {err}") from err


def test_guide_has_pages():
    assert {"getting_started", "manifest"} <= {p.stem for p in PAGES}
