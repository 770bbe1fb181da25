"""Export a DreamBooth run as one .safetensors file for AUTOMATIC1111, ComfyUI or InvokeAI.

A full fine-tune (a diffusers pipeline folder) becomes one original-layout Stable Diffusion checkpoint:
    python export.py sks-dog --output sks-dog.safetensors

A LoRA run (pytorch_lora_weights.safetensors) becomes a kohya-style LoRA for the web UIs' LoRA folders:
    python export.py sks-dog-lora --output sks-dog-lora.safetensors

--format auto (the default) picks sd for a pipeline folder and kohya for a LoRA run. The checkpoint is
fp16 unless --precision says otherwise; a LoRA keeps its own precision. The file is written to a temporary
name and renamed, so a reader never sees half of it. Export runs on the CPU; no `accelerate launch` needed.
"""

from __future__ import annotations

import sys
from typing import Sequence

from dreambooth.cli import run_cli, setup_logging
from dreambooth.config import ExportConfig, parse_config
from dreambooth.export import Exported, export_run


def main(argv: Sequence[str] | None = None) -> Exported:
    setup_logging()
    cfg = parse_config(ExportConfig, argv, __doc__, positional="output_dir")
    cfg.validate()
    exported = export_run(cfg)
    size_mb = exported.path.stat().st_size / 2**20
    layout = "Stable Diffusion checkpoint" if exported.format == "sd" else "kohya LoRA"
    print(f"wrote {exported.path}: {layout}, {exported.num_tensors} tensors ({exported.dtype}), {size_mb:.1f} MiB")
    return exported


if __name__ == "__main__":
    sys.exit(run_cli(main))
