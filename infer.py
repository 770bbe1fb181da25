r"""Generate images with a trained DreamBooth model (an output folder or a Hub id).

Single GPU or CPU:
    python infer.py --pretrained_model_name_or_path sks-dog --prompt "a photo of sks dog on the moon" --seed 0

Several GPUs (each process loads the model on its own GPU and draws its share of the images):
    accelerate launch --num_processes 4 infer.py --pretrained_model_name_or_path sks-dog \
        --prompts_file prompts.txt --num_images_per_prompt 8 --seed 0

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

Under `accelerate launch`, the batches of --batch_size images are dealt out among the processes,
and the main process picks the first number (and the seed, without --seed) for all of them before
any writes: the files are those one process would write, and the same images (on a CPU, at the same
thread count). The main process shows the progress bar, writes the grids and prints the summary.
"""

from __future__ import annotations

import logging
import random
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from dreambooth.cli import run_cli, setup_logging
from dreambooth.config import InferConfig, parse_config
from dreambooth.data import load_image
from dreambooth.generation import (
    deal,
    decided_by_main,
    describe_weights,
    generate,
    hide_library_progress_bars,
    launch_state,
    load_inference_pipeline,
    make_grid,
    native_size,
    next_output_number,
    process_device,
    save_png_atomically,
)
from dreambooth.image_metadata import Sampling, png_metadata

logger = logging.getLogger("dreambooth.infer")


def slug(prompt: str, length: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:length] or "prompt"


def image_name(stem: str, seed: int) -> str:
    return f"{stem}-seed{seed}.png"


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Returns the images this process wrote (all of them in a run of one process)."""
    setup_logging()
    cfg = parse_config(InferConfig, argv, __doc__)
    cfg.validate()
    prompts = cfg.prompts()
    state = launch_state()
    if not state.is_main_process:
        hide_library_progress_bars()
    pipeline = load_inference_pipeline(cfg, process_device(cfg.device, state))
    weights = describe_weights(cfg, pipeline)
    height, width = cfg.height or native_size(pipeline), cfg.width or native_size(pipeline)
    output_dir, written = Path(cfg.output_dir), []
    # One answer for every process, before any of them writes: all name the files alike, and no
    # file of this run can move the number on.
    first_number, base_seed = decided_by_main(state, lambda: (
        next_output_number(output_dir), cfg.seed if cfg.seed is not None else random.randrange(2**31)))
    seeds = [base_seed + j for j in range(cfg.num_images_per_prompt)]  # whichever process draws image j
    stems = [f"{first_number + index:03d}-{slug(prompt)}" for index, prompt in enumerate(prompts)]
    jobs = [(index, seeds[start:start + cfg.batch_size])
            for index in range(len(prompts)) for start in range(0, len(seeds), cfg.batch_size)]
    mine = deal(jobs, state)
    if state.num_processes > 1 and state.is_main_process:
        logger.info("%d image(s) of %d prompt(s), shared by %d processes", len(prompts) * len(seeds), len(prompts),
                    state.num_processes)
    # The main process writes every grid: at once for a prompt whose images are all its own (every
    # prompt in a run of one process), the others from their files once every process is done.
    own = Counter(index for index, batch in mine for _ in batch)
    held = {index: [] for index in range(len(prompts)) if state.is_main_process and own[index] == len(seeds)}
    progress = tqdm(total=sum(own.values()), desc="Images", unit="img", disable=not state.is_main_process)
    for index, batch in mine:
        prompt = prompts[index]
        images = generate(pipeline, prompt, batch, height, width, cfg.num_inference_steps, cfg.guidance_scale,
                          cfg.negative_prompt)
        for seed, image in zip(batch, images):
            metadata = png_metadata(Sampling(prompt, seed, width, height, cfg.num_inference_steps, cfg.guidance_scale,
                                             cfg.scheduler, cfg.negative_prompt), weights)
            name = image_name(stems[index], seed)
            written.append(save_png_atomically(image, output_dir, lambda _, name=name: name, metadata, flag="--output_dir"))
        progress.update(len(batch))
        if index in held:
            held[index] += images
            if len(held[index]) == len(seeds):
                write_grid(held.pop(index), output_dir, stems[index], prompt)
    progress.close()
    state.wait_for_everyone()
    if state.is_main_process:
        for index, prompt in enumerate(prompts):
            if own[index] < len(seeds):
                images = [load_image(output_dir / image_name(stems[index], seed)) for seed in seeds]
                write_grid(images, output_dir, stems[index], prompt)
        shared = f" by {state.num_processes} processes" if state.num_processes > 1 else ""
        print(f"wrote {len(prompts) * len(seeds)} image(s) to {output_dir}{shared} (seeds from {base_seed})")
    return written


def write_grid(images: list, output_dir: Path, stem: str, prompt: str) -> None:
    grid = save_png_atomically(make_grid(images), output_dir, lambda _: f"{stem}-grid.png", flag="--output_dir")
    tqdm.write(f"{prompt!r}: {len(images)} image(s) and {grid}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
