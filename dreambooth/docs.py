"""Flag tables in README.md, generated from the config dataclasses so the docs match the code.

    python -m dreambooth.docs README.md    # rewrite the tables between the flag markers
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

from . import config

_SECTION = re.compile(r"(<!-- flags:(\w+) -->\n)(.*?)(<!-- /flags -->)", re.DOTALL)


def flag_table(config_class: type) -> str:
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for field in dataclasses.fields(config_class):
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        shown = "" if default is None or default == [] else f"`{default}`"
        rows.append(f"| `--{field.name}` | {shown} | {field.metadata['help']} |")
    return "\n".join(rows) + "\n"


def render(text: str) -> str:
    """``text`` with every flag section replaced by the current table of its dataclass."""
    return _SECTION.sub(lambda m: m.group(1) + flag_table(getattr(config, m.group(2))) + m.group(4), text)


def main(argv: list[str] | None = None) -> None:
    path = Path((argv if argv is not None else sys.argv[1:])[0])
    path.write_text(render(path.read_text(encoding="utf-8")), encoding="utf-8")


if __name__ == "__main__":
    main()
