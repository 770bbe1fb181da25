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
from dataclasses import dataclass
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


@dataclass
class Plan:
    """What every process agrees on before any of them draws: the file stem of each prompt (its number
    carries on after the folder's highest), the seeds (image j of every prompt: base seed + j), and the
    batches of --batch_size images, cut from the whole run and dealt out (this process's: ``mine``)."""

    prompts: list[str]
    stems: list[str]
    seeds: list[int]
    mine: list[tuple[int, list[int]]]

    def drawn_here(self, index: int) -> bool:
        """Whether this process draws every image of prompt ``index`` (all of them, in a run of one)."""
        return sum(len(batch) for number, batch in self.mine if number == index) == len(self.seeds)


def plan_images(cfg: InferConfig, state) -> Plan:
    prompts, output_dir = cfg.prompts(), Path(cfg.output_dir)
    # Decided by the main process for all, before any writes: all name the files alike, and no file
    # of this run can move the number on.
    first_number, base_seed = decided_by_main(state, lambda: (
        next_output_number(output_dir), cfg.seed if cfg.seed is not None else random.randrange(2**31)))
    seeds = [base_seed + j for j in range(cfg.num_images_per_prompt)]
    jobs = [(index, seeds[start:start + cfg.batch_size])
            for index in range(len(prompts)) for start in range(0, len(seeds), cfg.batch_size)]
    stems = [f"{first_number + index:03d}-{slug(prompt)}" for index, prompt in enumerate(prompts)]
    return Plan(prompts, stems, seeds, deal(jobs, state))


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Returns the images this process wrote (all of them in a run of one process)."""
    setup_logging()
    cfg = parse_config(InferConfig, argv, __doc__)
    cfg.validate()
    state = launch_state()
    if not state.is_main_process:
        hide_library_progress_bars()
    pipeline = load_inference_pipeline(cfg, process_device(cfg.device, state))
    plan = plan_images(cfg, state)
    if state.num_processes > 1 and state.is_main_process:
        logger.info("%d image(s) of %d prompt(s), shared by %d processes", len(plan.prompts) * len(plan.seeds),
                    len(plan.prompts), state.num_processes)
    written = draw_share(cfg, pipeline, plan, state.is_main_process)
    state.wait_for_everyone()
    if state.is_main_process:
        output_dir = Path(cfg.output_dir)
        for index, prompt in enumerate(plan.prompts):  # the grids of prompts shared with other processes
            if not plan.drawn_here(index):
                images = [load_image(output_dir / image_name(plan.stems[index], seed)) for seed in plan.seeds]
                write_grid(images, output_dir, plan.stems[index], prompt)
        shared = f" by {state.num_processes} processes" if state.num_processes > 1 else ""
        print(f"wrote {len(plan.prompts) * len(plan.seeds)} image(s) to {output_dir}{shared} "
              f"(seeds from {plan.seeds[0]})")
    return written


def draw_share(cfg: InferConfig, pipeline, plan: Plan, is_main_process: bool) -> list[Path]:
    """Draw and write this process's batches. The main process shows the progress bar and writes the
    grid of each prompt it draws alone as soon as its last image is made."""
    weights = describe_weights(cfg, pipeline)
    height, width = cfg.height or native_size(pipeline), cfg.width or native_size(pipeline)
    output_dir, written = Path(cfg.output_dir), []
    held = {index: [] for index in range(len(plan.prompts)) if is_main_process and plan.drawn_here(index)}
    progress = tqdm(total=sum(len(batch) for _, batch in plan.mine), desc="Images", unit="img",
                    disable=not is_main_process)
    for index, batch in plan.mine:
        prompt = plan.prompts[index]
        images = generate(pipeline, prompt, batch, height, width, cfg.num_inference_steps, cfg.guidance_scale,
                          cfg.negative_prompt)
        for seed, image in zip(batch, images):
            metadata = png_metadata(Sampling(prompt, seed, width, height, cfg.num_inference_steps, cfg.guidance_scale,
                                             cfg.scheduler, cfg.negative_prompt), weights)
            name = image_name(plan.stems[index], seed)
            written.append(save_png_atomically(image, output_dir, lambda _, name=name: name, metadata, flag="--output_dir"))
        progress.update(len(batch))
        if index in held:
            held[index] += images
            if len(held[index]) == len(plan.seeds):
                write_grid(held.pop(index), output_dir, plan.stems[index], prompt)
    progress.close()
    return written


def write_grid(images: list, output_dir: Path, stem: str, prompt: str) -> None:
    grid = save_png_atomically(make_grid(images), output_dir, lambda _: f"{stem}-grid.png", flag="--output_dir")
    tqdm.write(f"{prompt!r}: {len(images)} image(s) and {grid}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
