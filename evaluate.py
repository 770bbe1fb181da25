r"""Measure a DreamBooth model as the paper does: DINO, CLIP-I, CLIP-T, PRES and DIV.

Generates K images for each of the paper's 25 prompts with the subject ('a sks dog in the snow')
and without it ('a dog in the snow', for prior preservation), then compares them with the real
subject images. Prints a table beside the subject's real images (scored against each other, as
the paper's 'real images' row) and the paper's numbers, and writes metrics.json, a contact sheet
and the images (with prompts.json) to --output_dir.

    python evaluate.py --pretrained_model_name_or_path sks-dog --instance_data_dir dog \
        --identifier sks --class_noun dog --prompt_set live

A quick look: the first 5 prompts, 2 images each, at 512 px:
    python evaluate.py --pretrained_model_name_or_path sks-dog --instance_data_dir dog \
        --identifier sks --class_noun dog --num_prompts 5 --num_images_per_prompt 2 --resolution 512

A LoRA over its base model, or a training checkpoint:
    python evaluate.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --lora sks-dog-lora --instance_data_dir dog --identifier sks --class_noun dog
    python evaluate.py --checkpoint sks-dog/checkpoint-400 --instance_data_dir dog --identifier sks --class_noun dog

Score images that infer.py (or anything writing prompts.json) made, without generating:
    python evaluate.py --generated_dir samples --instance_data_dir dog --identifier sks

The default DINO (facebook/dino-vits16) and CLIP (openai/clip-vit-base-patch32) models are
downloaded once; offline, point --dino_model and --clip_model at local folders.

On several GPUs, the batches are dealt out among the processes and the main process scores them
all (the same images and numbers as one process):
    accelerate launch --num_processes 4 evaluate.py --pretrained_model_name_or_path sks-dog \
        --instance_data_dir dog --identifier sks --class_noun dog
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from dreambooth.cli import run_cli, setup_logging
from dreambooth.config import EvaluateConfig, parse_config, save_config
from dreambooth.evaluation import (
    describe_run,
    format_table,
    generate_evaluation_set,
    load_encoders,
    load_real_images,
    read_generated_dir,
    save_generations,
    score,
    score_real_images,
    write_report,
)
from dreambooth.errors import DreamBoothError
from dreambooth.generation import (
    decided_by_main,
    hide_library_progress_bars,
    launch_state,
    load_inference_pipeline,
    pick_device,
    process_device,
    release,
)


def generate_images(cfg: EvaluateConfig, state):
    pipeline = load_inference_pipeline(cfg.model_source(), process_device(cfg.device, state))
    generations = generate_evaluation_set(
        pipeline, cfg.templates(), cfg.identifier, cfg.class_noun, cfg.num_images_per_prompt, cfg.seed,
        cfg.resolution, cfg.num_inference_steps, cfg.guidance_scale, cfg.batch_size, state=state,
    )
    release(pipeline)
    return generations


def load_scoring_models(cfg: EvaluateConfig, state):
    """The real images and the scoring models, on the main process, which scores. They load
    before generating: a bad image or a missing download fails before minutes of generation,
    in every process (the others would otherwise wait for the main one's images)."""
    loaded, problem = (None, None), None
    if state.is_main_process:
        try:
            loaded = (load_real_images(cfg.instance_data_dir),
                      load_encoders(cfg.dino_model, cfg.clip_model, pick_device(cfg.device)))
        except DreamBoothError as error:
            problem = str(error)
    problem = decided_by_main(state, lambda: problem)
    if problem:
        raise DreamBoothError(problem)
    return loaded


def main(argv: Sequence[str] | None = None) -> dict:
    """Returns the metrics (on the main process; an empty dict on the others)."""
    setup_logging()
    cfg = parse_config(EvaluateConfig, argv, __doc__)
    cfg.validate()
    state = launch_state()
    if state.is_main_process:
        save_config(cfg, Path(cfg.output_dir) / "evaluate_config.yaml")
    else:
        hide_library_progress_bars()
    real_images, encoders = load_scoring_models(cfg, state)
    if cfg.generated_dir:
        if not state.is_main_process:
            return {}  # nothing to draw: the main process scores the folder alone
        generations = read_generated_dir(cfg.generated_dir, cfg.identifier)
    else:
        generations = generate_images(cfg, state)
        if not state.is_main_process:
            return {}
        save_generations(generations, Path(cfg.output_dir) / "images")
    metrics = score(generations, real_images, encoders, cfg.identifier)
    real = score_real_images(real_images, encoders)
    report = write_report(cfg.output_dir, metrics, generations,
                          describe_run(cfg, encoders, generations, len(real_images)), real)
    print(format_table(metrics, real))
    print(f"wrote {report} and {report.with_name('contact_sheet.png')}")
    return metrics


if __name__ == "__main__":
    sys.exit(run_cli(main))
