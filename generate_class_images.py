r"""Generate class images for DreamBooth's prior-preservation loss.

Only the images missing to reach --num_class_images are made: existing valid images count,
corrupt ones are replaced, and a rerun after a kill continues where it stopped. Image i is
drawn from a seed derived from (--seed, i), so the same command gives the same images on
any number of processes (on a CPU, at the same thread count). Each image records its prompt,
seed and settings in its PNG text; images recording another prompt than --class_prompt (the
flag changed since) are warned about, as they still count.

With --concepts_list (the file train_dreambooth.py reads), every concept's class folder is filled
with its class prompt and count, as training would fill it: given the same --seed, --resolution,
--sample_batch_size and --prior_generation_precision as the training run, the same files, which
training then finds complete. Concept k > 0 draws from seeds of its own, (--seed, i, k).

Single GPU or CPU:
    python generate_class_images.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --class_prompt "a photo of a dog" --class_data_dir class-dog --num_class_images 200

Every concept of a multi-concept run:
    python generate_class_images.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --concepts_list concepts.yaml --resolution 512

Several GPUs (each process makes its own share):
    accelerate launch --num_processes 4 generate_class_images.py --class_prompt "a photo of a dog" ...
"""

from __future__ import annotations

import sys
from typing import Sequence

from dreambooth.cli import run_cli, setup_logging
from dreambooth.config import GenerateClassImagesConfig, parse_config
from dreambooth.generation import SharedPipeline, class_image_jobs, generate_class_images


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    cfg = parse_config(GenerateClassImagesConfig, argv, __doc__)
    cfg.validate()
    jobs = class_image_jobs(
        cfg.concepts(), model=cfg.pretrained_model_name_or_path, resolution=cfg.resolution,
        sample_batch_size=cfg.sample_batch_size, num_inference_steps=cfg.num_inference_steps,
        guidance_scale=cfg.guidance_scale, scheduler=cfg.scheduler, precision=cfg.prior_generation_precision,
        seed=cfg.seed, revision=cfg.revision, variant=cfg.variant, channels_last=cfg.channels_last, compile=cfg.compile,
        cudnn_benchmark=cfg.cudnn_benchmark,
    )
    written = 0
    with SharedPipeline() as pipelines:
        for job in jobs:
            made = generate_class_images(job, pipelines=pipelines)
            print(f"{job.class_data_dir}: {made} new class image(s) from this process, {job.num_class_images} wanted")
            written += made
    return written


if __name__ == "__main__":
    sys.exit(run_cli(main))
