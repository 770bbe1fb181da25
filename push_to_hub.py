"""Push a finished DreamBooth output folder (model, model card, samples) to the Hugging Face Hub.

    python push_to_hub.py sks-dog --hub_model_id your-name/sks-dog

A private repo, with the resumable checkpoints too:
    python push_to_hub.py sks-dog --hub_model_id your-name/sks-dog --private --push_checkpoints

The token comes from --hub_token, else HF_TOKEN, else `hf auth login`; it is never printed.
Skipped: checkpoint-* folders (unless --push_checkpoints), hidden files, class_images/ and logs/.
Nothing needs a GPU, so no `accelerate launch`; a failed push leaves the folder as it was, ready to retry.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Sequence

from dreambooth.cli import run_cli, setup_logging
from dreambooth.config import PushToHubConfig, parse_config
from dreambooth.hub import ignore_patterns, push_output

logger = logging.getLogger("dreambooth.push_to_hub")


def main(argv: Sequence[str] | None = None) -> str:
    setup_logging()
    cfg = parse_config(PushToHubConfig, argv, __doc__, positional="output_dir")
    cfg.validate()
    if not (Path(cfg.output_dir) / "README.md").is_file():
        logger.warning("%s has no README.md; the repo will have no model card", cfg.output_dir)
    skipped = ", ".join(ignore_patterns(cfg.push_checkpoints))
    print(f"pushing {cfg.output_dir} to {cfg.hub_model_id}{' (private)' if cfg.private else ''}, skipping {skipped}")
    url = push_output(cfg.output_dir, cfg.hub_model_id, token=cfg.hub_token, private=cfg.private,
                      include_checkpoints=cfg.push_checkpoints)
    print(f"pushed to {url}")
    return url


if __name__ == "__main__":
    sys.exit(run_cli(main))
