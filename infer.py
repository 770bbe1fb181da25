r"""Generate images with a trained DreamBooth model (an output folder or a Hub id).

    python infer.py --pretrained_model_name_or_path sks-dog --prompt "a photo of sks dog on the moon" --seed 0

A training checkpoint, over the base model its run recorded:
    python infer.py --checkpoint sks-dog/checkpoint-400 --prompt "a photo of sks dog" --seed 0

LoRA adapters over a base model (repeat --lora to stack several):
    python infer.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --lora sks-dog-lora --lora_scale 0.8 --prompt "a photo of sks dog" --seed 0

Writes one PNG per image, with the prompt, seed, settings and weights in its text metadata (the
'parameters' field that Stable Diffusion web UIs and civitai read, with each LoRA's scale and hash;
models and LoRAs by name, never by a local path), and one grid per prompt. Each prompt's
files share a number ('003-a-photo-of-sks-dog-seed0.png', '003-...-grid.png') that carries on
after the highest one already in --output_dir, so a rerun overwrites nothing.
It runs as one process on one device (--device): start it with python, not with `accelerate launch` over
several GPUs, where every process would draw every image.
"""

from __future__ import annotations

import random
import re
import sys
from pathlib import Path
from typing import Sequence

from dreambooth.cli import run_cli, setup_logging
from dreambooth.config import InferConfig, parse_config
from dreambooth.generation import (
    describe_weights,
    generate,
    load_inference_pipeline,
    make_grid,
    next_output_number,
    save_png_atomically,
)
from dreambooth.image_metadata import Sampling, png_metadata


def slug(prompt: str, length: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:length] or "prompt"


def main(argv: Sequence[str] | None = None) -> list[Path]:
    setup_logging()
    cfg = parse_config(InferConfig, argv, __doc__)
    cfg.validate()
    prompts = cfg.prompts()
    pipeline = load_inference_pipeline(cfg)
    weights = describe_weights(cfg, pipeline)
    height = cfg.height or pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    width = cfg.width or pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    base_seed = cfg.seed if cfg.seed is not None else random.randrange(2**31)
    output_dir, written = Path(cfg.output_dir), []
    for number, prompt in enumerate(prompts, start=next_output_number(output_dir)):
        seeds = [base_seed + j for j in range(cfg.num_images_per_prompt)]
        images = []
        for start in range(0, len(seeds), cfg.batch_size):
            batch = seeds[start:start + cfg.batch_size]
            images += generate(pipeline, prompt, batch, height, width, cfg.num_inference_steps,
                               cfg.guidance_scale, cfg.negative_prompt)
        stem = f"{number:03d}-{slug(prompt)}"
        for seed, image in zip(seeds, images):
            metadata = png_metadata(Sampling(prompt, seed, width, height, cfg.num_inference_steps, cfg.guidance_scale,
                                             cfg.scheduler, cfg.negative_prompt), weights)
            written.append(save_png_atomically(image, output_dir, lambda _, seed=seed: f"{stem}-seed{seed}.png",
                                               metadata, flag="--output_dir"))
        grid = save_png_atomically(make_grid(images), output_dir, lambda _: f"{stem}-grid.png", flag="--output_dir")
        print(f"{prompt!r}: {len(images)} image(s) and {grid}")
    print(f"wrote {len(written)} image(s) to {output_dir} (seeds from {base_seed})")
    return written


if __name__ == "__main__":
    sys.exit(run_cli(main))
