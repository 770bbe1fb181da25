"""What every script's entry point shares: logging set-up and error printing."""

from __future__ import annotations

import logging
import sys
from typing import Callable, Sequence

from .errors import DreamBoothError


def setup_logging(verbose: bool = True) -> None:
    """Our warnings as ``warning: ...`` lines; the libraries' chatter kept to real problems."""
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if not getattr(h, "dreambooth", False)]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    handler.dreambooth = True
    root.addHandler(handler)
    logging.getLogger("dreambooth").setLevel(logging.INFO if verbose else logging.WARNING)
    # transformers warns on every import that torchvision is absent; the PIL fallback is what we want.
    logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)
    # bitsandbytes, imported by diffusers when installed, warns on CPU-only machines about optional kernels.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """Run a script's ``main``; a DreamBoothError becomes one ``error: ...`` line and exit status 1.
    A result with an ``exit_status`` (a training run stopped by a signal) exits with it."""
    _escape_unencodable_output()
    try:
        result = main(argv)
    except DreamBoothError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return int(getattr(result, "exit_status", 0))


def _escape_unencodable_output() -> None:
    """Print what the output's encoding cannot hold as escapes (as Python's stderr already does) instead of
    failing: Windows writes a redirected stdout in its ANSI code page (cp1252), where a prompt's emoji or
    CJK text would raise UnicodeEncodeError mid-run, after the first prompt's images."""
    for stream in (sys.stdout, sys.stderr):
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
