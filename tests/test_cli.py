"""What every script's entry point shares."""

from __future__ import annotations

import io
import sys

from dreambooth.cli import run_cli


def test_output_in_a_legacy_code_page_escapes_what_it_cannot_encode(monkeypatch):
    """Windows writes a redirected stdout in cp1252: a prompt with an emoji must not stop the run."""
    buffer = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(buffer, encoding="cp1252", write_through=True))

    def main(argv):
        print(repr("a photo of sks dog 🐶, café"))
        print("done")

    assert run_cli(main, []) == 0
    assert buffer.getvalue().decode("cp1252").splitlines() == ["'a photo of sks dog \\U0001f436, café'", "done"]
