"""The README's flag tables are the config dataclasses' current ones."""

from __future__ import annotations

from conftest import ROOT
from dreambooth.docs import render


def test_readme_flag_tables_match_the_code():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "<!-- flags:TrainConfig -->" in text
    assert render(text) == text, "run: python -m dreambooth.docs README.md"
