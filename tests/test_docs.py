"""The README's flag tables are the config dataclasses' current ones."""

from __future__ import annotations

from conftest import ROOT
from dreambooth.docs import render


def test_readme_flag_tables_match_the_code():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "<!-- flags:TrainConfig -->" in text
    assert render(text) == text, "run: python -m dreambooth.docs README.md"


def test_every_script_config_has_a_flag_table():
    import dataclasses

    from dreambooth import config

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    classes = [name for name, value in vars(config).items()
               if isinstance(value, type) and dataclasses.is_dataclass(value) and name.endswith("Config")]
    assert len(classes) >= 6
    for name in classes:
        assert f"<!-- flags:{name} -->" in text, name
