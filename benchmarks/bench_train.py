"""Training and class-image generation speed of the suite on Stable Diffusion 1.5's architecture.

GPU (one H100/H200; the whole run should take under 8 minutes):
    python benchmarks/bench_train.py
    python benchmarks/bench_train.py --configs C1,L1 --extra_flags="--cache_latents --channels_last"
CPU smoke test on the tiny model (32 px; a few minutes on 2 cores, most of it compiling C1c):
    python benchmarks/bench_train.py --tiny

The model has SD 1.5's exact architecture with random weights, so nothing is downloaded. Each
training config runs the suite's own path, ``train_dreambooth.main(argv)``, in a process of its
own (``bench_train.py --worker NAME``), which prints one JSON line; the final save is skipped, as
it is not training speed. See benchmarks/README.md for the columns.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# From the issue: diffusers' examples/dreambooth/train_dreambooth.py on one H200 (s/step, peak GiB).
REFERENCE = {"C1": (0.181, 17.4), "C2": (0.301, 16.6), "C3": (0.330, 18.7), "C4": (0.303, 10.6)}
# Goals (s/step at most, peak allocated GiB at most); LoRA must also beat C2's s/step.
GOALS = {"C1": (0.100, 14.0), "C1c": (0.060, 14.0), "C2": (0.150, 14.0), "C3": (0.165, 16.0),
         "C4": (0.150, 8.0), "L1": (None, 4.0)}
# These variants are held to the goal of the config they vary, named by their first two characters.
GOALS.update({name: GOALS[name[:2]] for name in ("C1l", "C1b", "C1n", "C4b", "C2c", "C3c", "C4c", "C4bc", "C1w",
                                                 "C2w", "C3w", "C4w", "L1w")})
GENERATION_GOAL = 2.5  # class images/s of the suite over the reference script's
# The suite's class-image path is timed with its defaults and with these generate_class_images.py
# speed flags (ClassImageJob fields): name -> fields.
# The default is channels_last since it measured 1.3x the images/s of the plain layout on an H200.
GEN_VARIANTS = {"default": {}, "no_channels_last": {"channels_last": False}, "cudnn": {"cudnn_benchmark": True},
                "batch8": {"sample_batch_size": 8}, "compile": {"compile": True}}
DEFAULT_GEN_VARIANTS = "default,cudnn,batch8,compile"
# SD 1.5's parameter counts in millions, checked to 0.1M.
SD15_PARAMETERS = {"unet": 859.5, "text_encoder": 123.1, "vae": 83.7}
NUM_INSTANCE_IMAGES, NUM_CLASS_IMAGES = 5, 8
INSTANCE_PROMPT, CLASS_PROMPT = "a photo of sks dog", "a photo of a dog"


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    name: str
    flags: tuple[str, ...]  # train_dreambooth.py flags on top of the common base
    description: str
    lean: bool = False  # run the plain loop (lean_worker) instead of the suite: of its flags, it reads --channels_last


CONFIGS = [
    BenchConfig("C1", (), "AdamW, UNet only"),
    BenchConfig("C2", ("--gradient_checkpointing",), "C1 + gradient checkpointing"),
    BenchConfig("C3", ("--gradient_checkpointing", "--train_text_encoder"), "C2 + text encoder"),
    BenchConfig("C4", ("--gradient_checkpointing", "--use_8bit_adam"), "C2 + 8-bit Adam"),
    BenchConfig("L1", ("--gradient_checkpointing", "--use_lora", "--rank", "4"), "LoRA rank 4, C2 settings"),
    BenchConfig("C1c", ("--compile",), "C1 + torch.compile"),
    # The checkpointed rows compiled: the issue sets no separate goal for them with --compile, so
    # they are held to their rows' goals.
    BenchConfig("C2c", ("--gradient_checkpointing", "--compile"), "C2 + torch.compile"),
    BenchConfig("C3c", ("--gradient_checkpointing", "--train_text_encoder", "--compile"), "C3 + torch.compile of the UNet"),
    BenchConfig("C4c", ("--gradient_checkpointing", "--use_8bit_adam", "--compile"), "C4 + torch.compile"),
    # C4's two goals at once: under 8 GiB needs the gradients in bf16 (C4b), under 0.150 s likely compiling.
    BenchConfig("C4bc", ("--gradient_checkpointing", "--use_8bit_adam", "--bf16_gradients", "--compile"),
                "C4 + gradients held in bf16 + torch.compile"),
    # channels_last stays off by default in training: on an H200 it measured slower (0.174 s/step against
    # C1's 0.129, benchmarks/RESULTS.md).
    BenchConfig("C1l", ("--channels_last",), "C1 + channels_last"),
    # Low-memory variants: the optimizer steps inside backward, so the gradients never all exist;
    # that rules out clipping, so these train without it (the reference clips at 1.0).
    BenchConfig("C2o", ("--gradient_checkpointing", "--optimizer_in_backward", "--max_grad_norm", "0"),
                "C2 + optimizer step in backward, no clipping"),
    BenchConfig("C4o", ("--gradient_checkpointing", "--use_8bit_adam", "--optimizer_in_backward",
                        "--max_grad_norm", "0"), "C4 + optimizer step in backward, no clipping"),
    BenchConfig("C1g", ("--compile", "--compile_mode", "reduce-overhead"), "C1 + torch.compile with CUDA graphs"),
    # The gradients held in bf16 until the update (the same training, clipping included): C4's way
    # under 8 GiB with the reference's clipping.
    BenchConfig("C4b", ("--gradient_checkpointing", "--use_8bit_adam", "--bf16_gradients"),
                "C4 + gradients held in bf16"),
    BenchConfig("C1b", ("--bf16_gradients",), "C1 + gradients held in bf16"),
    BenchConfig("C1n", ("--cudnn_benchmark",), "C1 + cuDNN's timed choice of convolution algorithms"),
    # The trained weights cast to bf16 once a step, a bucket per kernel, instead of autocast's cast at
    # every layer and recompute: a third fewer kernels a step (counted on SD 1.5's architecture).
    BenchConfig("C1w", ("--cast_weights_once",), "C1 + weights cast once a step"),
    BenchConfig("C2w", ("--gradient_checkpointing", "--cast_weights_once"), "C2 + weights cast once a step"),
    BenchConfig("C3w", ("--gradient_checkpointing", "--train_text_encoder", "--cast_weights_once"),
                "C3 + weights cast once a step"),
    BenchConfig("C4w", ("--gradient_checkpointing", "--use_8bit_adam", "--cast_weights_once"),
                "C4 + weights cast once a step"),
    BenchConfig("L1w", ("--gradient_checkpointing", "--use_lora", "--rank", "4", "--cast_weights_once"),
                "L1 + LoRA weights cast once a step"),
    # C1's work in a plain PyTorch loop with no suite code (the issue's "plain lean loop"): beside C1 and C1l
    # on the same card, what the suite's loop costs beyond the arithmetic.
    BenchConfig("lean", ("--channels_last",), "plain loop, C1's work, channels_last", lean=True),
    BenchConfig("lean_nchw", (), "plain loop, C1's work", lean=True),
]


# The default run: the configs, then class-image generation ("gen"): about 7 minutes on an
# H200. The extras run when named, or with --configs all (after the default ones, so a run cut
# short by --deadline loses the least); C2c, C3c and C4c each compile for about as long as C1c
# (108 s to its first step on an H200).
DEFAULT_ORDER = "C1,C2,C3,C4,L1,C1c,gen"
EXTRA_ORDER = "C1w,C2w,C4w,C3w,L1w,C4b,C1l,C1b,C2o,C4o,C1g,C1n,lean,lean_nchw,C2c,C3c,C4c,C4bc"
GEN = "gen"


class BenchError(Exception):
    """A problem with the benchmark's own flags, printed as one line."""


# ---------------------------------------------------------------- flags and paths


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny random model at 32 px (CPU smoke test)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    parser.add_argument("--configs", default=DEFAULT_ORDER,
                        help=f"comma-separated configs to run, in this order; 'gen' is class-image generation; "
                             f"'all' is the default ones, then {EXTRA_ORDER} (default: {DEFAULT_ORDER})")
    parser.add_argument("--steps", type=int, default=40, help="training steps per config (--max_train_steps)")
    parser.add_argument("--extra_flags", default="",
                        help='train_dreambooth.py flags appended to every config: --extra_flags="--cache_latents"')
    parser.add_argument("--profile_steps", type=int, default=0,
                        help="after the timed steps, this many more under torch.profiler: where each step's host "
                             "and device time goes (default 0: none)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per config's process")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds for the whole run: what would start later is skipped, and no process runs "
                             "past it (results so far are written after every config)")
    parser.add_argument("--peak_tflops", type=float, default=989.0,
                        help="the card's dense bf16 peak for MFU (H100/H200 SXM: 989)")
    parser.add_argument("--gen", action=argparse.BooleanOptionalAction, default=None,
                        help="also time class-image generation (default: on with CUDA)")
    parser.add_argument("--gen_images", type=int, default=16, help="images timed per generation path")
    parser.add_argument("--gen_batch_size", type=int, default=4,
                        help="batch of the suite's class-image path (4: generate_class_images.py's default)")
    parser.add_argument("--gen_variants", default=DEFAULT_GEN_VARIANTS,
                        help="the suite's class-image settings to time: default (its defaults, channels_last "
                             "included), no_channels_last, cudnn (--cudnn_benchmark), batch8 (--sample_batch_size 8), "
                             f"compile (default: {DEFAULT_GEN_VARIANTS})")
    parser.add_argument("--output", default=None,
                        help="JSON results (default: benchmarks/results.json; results_tiny.json with --tiny)")
    parser.add_argument("--workdir", default=None, help="keep the model, images and logs here (default: temporary)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def worker_flags(args: argparse.Namespace) -> list[str]:
    """The flags a worker process needs to redo the parent's choices."""
    # "--extra_flags=VALUE": a VALUE such as "--compile" would otherwise be read as a flag.
    flags = ["--steps", str(args.steps), f"--extra_flags={args.extra_flags}", "--peak_tflops", str(args.peak_tflops),
             "--profile_steps", str(args.profile_steps),
             "--gen_images", str(args.gen_images), "--gen_batch_size", str(args.gen_batch_size),
             "--gen_variants", args.gen_variants]
    return flags + ["--tiny"] * args.tiny + ["--cpu"] * args.cpu


def train_fields() -> set[str]:
    """train_dreambooth.py's flags as they are now (others add flags while this file stays)."""
    from dreambooth.config import TrainConfig

    return {field.name for field in dataclasses.fields(TrainConfig)}


def flag_names(flags: Sequence[str]) -> list[str]:
    return [flag[2:].split("=")[0] for flag in flags if flag.startswith("--")]


def check_extra_flags(extra_flags: str, fields: set[str]) -> None:
    for name in flag_names(shlex.split(extra_flags)):
        if name not in fields and not (name.startswith("no_") and name[3:] in fields):
            raise BenchError(f"--extra_flags: train_dreambooth.py has no --{name}")


def select_items(names: str) -> list[BenchConfig | str]:
    """The named training configs and 'gen', in the order given, each once."""
    by_name = {config.name.lower(): config for config in CONFIGS} | {GEN: GEN}
    if names.strip().lower() == "all":
        names = f"{DEFAULT_ORDER},{EXTRA_ORDER}"
    wanted = [name.strip().lower() for name in names.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in by_name]
    if unknown or not wanted:
        raise BenchError(f"--configs {names}: choose from {', '.join(c.name for c in CONFIGS)}, {GEN}, or all")
    return [by_name[name] for name in dict.fromkeys(wanted)]


def select_configs(names: str) -> list[BenchConfig]:
    """The named training configs in the order given ('gen' is left to plan_run)."""
    return [item for item in select_items(names) if item != GEN]


def plan_run(args: argparse.Namespace, cuda: bool) -> list[BenchConfig | str]:
    """The configs and 'gen' in --configs order. 'gen' runs where listed when --gen is on (by
    default, with CUDA); --gen with no 'gen' in the list adds it at the end."""
    generate = args.gen if args.gen is not None else cuda
    plan = [item for item in select_items(args.configs) if item != GEN or generate]
    if generate and GEN not in plan:
        plan.append(GEN)
    return plan


def skip_reason(config: BenchConfig, fields: set[str], device_type: str) -> str | None:
    missing = [name for name in flag_names(config.flags) if name not in fields]
    if missing:
        return f"train_dreambooth.py has no --{missing[0]} yet"
    if "--use_8bit_adam" in config.flags:
        if device_type != "cuda":
            return "8-bit Adam (bitsandbytes) needs CUDA; on the CPU the script would fall back to AdamW"
        if importlib.util.find_spec("bitsandbytes") is None:
            return "bitsandbytes is not installed"
    for flag in ("--bf16_gradients", "--cast_weights_once"):
        if flag in config.flags and device_type != "cuda":
            return f"{flag} needs bf16 mixed precision, which the benchmark uses on CUDA only"
    return None


def use_cuda(args: argparse.Namespace) -> bool:
    import torch

    return torch.cuda.is_available() and not args.cpu


def resolution(args: argparse.Namespace) -> int:
    return 32 if args.tiny else 512


def train_argv(config: BenchConfig, args: argparse.Namespace, workdir: Path) -> list[str]:
    base = [
        "--pretrained_model_name_or_path", str(workdir / "model"),
        "--instance_data_dir", str(workdir / "instance"), "--instance_prompt", INSTANCE_PROMPT,
        "--with_prior_preservation", "--class_data_dir", str(workdir / "class"), "--class_prompt", CLASS_PROMPT,
        "--num_class_images", str(NUM_CLASS_IMAGES),
        "--resolution", str(resolution(args)), "--center_crop", "--train_batch_size", "1",
        "--learning_rate", "5e-6", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
        "--mixed_precision", "bf16" if use_cuda(args) else "no",
        "--max_train_steps", str(args.steps + args.profile_steps), "--logging_steps", "10", "--checkpointing_steps", "100000",
        "--num_validation_images", "0", "--report_to", "none", "--seed", "0",
        "--output_dir", str(workdir / "runs" / config.name),
    ]
    return base + list(config.flags) + shlex.split(args.extra_flags)


# ---------------------------------------------------------------- model and data


SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2, cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)


def build_sd15_pipeline(folder: Path) -> dict[str, float]:
    """SD 1.5's architecture with random fp16 weights, saved as a diffusers folder; returns the
    parameter counts in millions after checking them against the real model's."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dreambooth.tiny_model import build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer(folder.parent / "tokenizer-source")
    unet = UNet2DConditionModel(**SD15_UNET)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        latent_channels=4, sample_size=512, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, steps_offset=1, clip_sample=False)
    models = {"unet": unet, "text_encoder": text_encoder, "vae": vae}
    counts = {name: sum(p.numel() for p in model.parameters()) / 1e6 for name, model in models.items()}
    for name, expected in SD15_PARAMETERS.items():
        if abs(counts[name] - expected) > 0.1:
            raise BenchError(f"{name}: {counts[name]:.2f}M parameters, SD 1.5 has {expected}M")
    pipeline = StableDiffusionPipeline(
        **{name: model.to(torch.float16) for name, model in models.items()}, tokenizer=tokenizer,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder, safe_serialization=True)
    return counts


def random_image(rng, size: int):
    """Smooth colour fields with a little grain: decodes and compresses like a photo, not like noise."""
    import numpy as np
    from PIL import Image

    coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    grain = rng.integers(-10, 11, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(coarse, dtype=np.int64) + grain, 0, 255).astype(np.uint8))


def write_images(workdir: Path, size: int) -> None:
    """A few instance photos (larger than the resolution, so they are resized) and a full class folder,
    so training generates nothing."""
    import numpy as np

    rng = np.random.default_rng(0)
    for folder, count, side, suffix in (("instance", NUM_INSTANCE_IMAGES, size * 5 // 4, "jpg"),
                                        ("class", NUM_CLASS_IMAGES, size, "png")):
        (workdir / folder).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            random_image(rng, side).save(workdir / folder / f"{index:05d}.{suffix}")


# ---------------------------------------------------------------- workers (one process each)


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_worker(args: argparse.Namespace, workdir: Path) -> dict:
    import torch

    from dreambooth.tiny_model import make_tiny_pipeline

    (workdir / "unet_flops.json").unlink(missing_ok=True)  # counted on the model built now
    if args.tiny:
        make_tiny_pipeline(workdir / "model")
        counts = None
    else:
        counts = build_sd15_pipeline(workdir / "model")
    cpu = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else cpu
    return {"parameters_millions": counts, "card": card}


def watch_first_step(marks: dict) -> None:
    """Record the seconds from the start of Trainer.train to the end of step 1 (compilation included)."""
    from dreambooth.training import Trainer

    original = Trainer.train

    def train(self):
        start = time.perf_counter()

        def after_step(state) -> None:
            if "first_step_seconds" not in marks:
                synchronize()
                marks["first_step_seconds"] = time.perf_counter() - start

        self.step_callbacks.append(after_step)
        return original(self)

    Trainer.train = train


def watch_step_ends(marks: dict) -> None:
    """Mark the end of every optimizer step without waiting for the GPU: a CUDA event recorded on
    the stream after the step's work (its timeline then gives each step's length, the GPU's idle
    waits for the host included), or the clock on a CPU, where work runs as it is called. Read by
    ``step_seconds`` after the run."""
    from dreambooth.training import Trainer

    original = Trainer.train

    def train(self):
        ends = marks.setdefault("step_ends", {})
        # First, before any callback that waits or profiles.
        self.step_callbacks.insert(0, lambda state: mark_step_end(ends, state.global_step))
        return original(self)

    Trainer.train = train


def mark_step_end(ends: dict, step: int) -> None:
    """Step ``step`` ends now: a CUDA event on the stream (queued after the step's work), or the CPU clock."""
    import torch

    if torch.cuda.is_available():
        ends[step] = torch.cuda.Event(enable_timing=True)
        ends[step].record()
    else:
        ends[step] = time.perf_counter()


def step_seconds(ends: dict, first: int, last: int) -> dict[int, float]:
    """The length of each step from ``first`` to ``last`` (from the end of the step before it), in seconds."""
    synchronize()
    lengths = {}
    for step in range(max(first, min(ends) + 1), last + 1):
        before, after = ends.get(step - 1), ends.get(step)
        if before is None or after is None:
            continue
        lengths[step] = before.elapsed_time(after) / 1e3 if hasattr(before, "elapsed_time") else after - before
    return lengths


def summarize_steps(lengths: dict[int, float]) -> dict:
    """The median s/step of the measured steps (the issue's measure), and how much they spread:
    a median is not moved by a few slow steps (a logging step's read-back, a collector pass)."""
    values = sorted(lengths.values())
    if not values:
        return {}
    tenth = values[len(values) // 10]
    ninetieth = values[min(len(values) - 1, len(values) * 9 // 10)]
    median = statistics.median(values)
    return {"seconds_per_step": median, "steps_per_second": 1 / median,
            "measured_steps": [min(lengths), max(lengths)], "step_p10_seconds": tenth, "step_p90_seconds": ninetieth,
            "step_mean_seconds": statistics.fmean(values), "step_seconds": {str(k): v for k, v in lengths.items()}}


# The step's phases, as the profile names them (train_worker wraps them in these labels).
PHASES = {"forward": "step: forward and loss", "backward": "step: backward", "update": "step: clip, update, zero"}


def watch_profiled_steps(first: int, count: int, marks: dict) -> None:
    """Profile steps ``first`` to ``first + count - 1`` with torch.profiler, each step's phases
    labelled, and put the summary (``profile_summary``) in ``marks["profile"]``. The steps run
    after the timed ones: the profiler slows every operation down."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from dreambooth.training import Trainer

    def labelled(function, label):
        def call(*args, **kwargs):
            with record_function(label):
                return function(*args, **kwargs)
        return call

    original = Trainer.train

    def train(self):
        self.loss_fn = labelled(self.loss_fn, PHASES["forward"])
        self.accelerator.backward = labelled(self.accelerator.backward, PHASES["backward"])
        self._update = labelled(self._update, PHASES["update"])
        activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * torch.cuda.is_available()
        profiler = profile(activities=activities)

        def around(state) -> None:
            # The timed steps are done: a profiler that fails costs the profile, not the config's figures.
            try:
                if state.global_step == first - 1:
                    synchronize()
                    marks["profile_start"] = time.perf_counter()
                    profiler.start()
                elif state.global_step == first + count - 1 and "profile_start" in marks:
                    synchronize()
                    wall = time.perf_counter() - marks.pop("profile_start")
                    profiler.stop()
                    marks["profile"] = profile_summary(profiler.key_averages(), count, wall)
            except Exception as error:  # noqa: BLE001 - reported in the results instead
                marks.pop("profile_start", None)
                marks["profile"] = {"error": f"{type(error).__name__}: {error}"}

        self.step_callbacks.append(around)
        return original(self)

    Trainer.train = train


# CUDA runtime calls that make the host wait for the GPU (cudaMemcpy: the blocking copy).
HOST_WAITS = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def profile_summary(averages, steps: int, wall_seconds: float, top: int = 12) -> dict:
    """Per step, in ms: the wall time, the host time inside each phase, the time the device was
    busy (its kernels' time: work on one stream does not overlap), kernel launches, the host's
    waits for the GPU, and the operators that took the most device time (host time on the CPU).
    The device idles for the wall time minus its busy time: where that is most of the step, the
    host is the bottleneck. (The profiled window's last step waits once more, for the profiler, and
    logs: a fraction of a wait a step.)"""
    from torch.autograd import DeviceType

    labels = set(PHASES.values())
    ops = [event for event in averages if event.key not in labels and not event.is_user_annotation]
    # The kernels' own events, as torch's profiler table totals them (an operator's device time is its kernels').
    device_ms = sum(event.self_device_time_total for event in ops if event.device_type != DeviceType.CPU) / 1e3 / steps
    phases = {phase: next((event.cpu_time_total / 1e3 / steps for event in averages
                           if event.key == label and event.device_type == DeviceType.CPU), None)
              for phase, label in PHASES.items()}
    launches = sum(event.count for event in ops if "LaunchKernel" in event.key) / steps
    waits = sum(event.count for event in ops if event.key in HOST_WAITS) / steps
    by_device = device_ms > 0
    ranked = sorted(ops, key=lambda event: event.self_device_time_total if by_device else event.self_cpu_time_total,
                    reverse=True)
    wall_ms = wall_seconds * 1e3 / steps
    return {
        "steps": steps, "wall_ms_per_step": wall_ms, "host_ms_per_step": phases,
        "device_busy_ms_per_step": device_ms if by_device else None,
        "device_busy_fraction": device_ms / wall_ms if by_device else None,
        "kernel_launches_per_step": launches if by_device else None,
        "host_waits_per_step": waits if by_device else None,
        "top_ops": [{"name": event.key, "kind": "kernel" if event.device_type != DeviceType.CPU else "operator",
                     "calls_per_step": event.count / steps,
                     "self_host_ms_per_step": event.self_cpu_time_total / 1e3 / steps,
                     "self_device_ms_per_step": event.self_device_time_total / 1e3 / steps}
                    for event in ranked[:top]],
    }


def summarize_intervals(intervals: list[dict], last_step: int | None = None) -> dict:
    """Median s/step over the intervals after the first (warm-up, compilation) up to ``last_step``
    (the profiled steps after it are slower); peak memory over all."""
    timed = [interval for interval in intervals if last_step is None or interval["last_step"] <= last_step]
    if not timed:
        # No logging step among the timed steps (--steps under the logging interval, the profiled
        # steps after them): the steps' own lengths give s/step, from the first step.
        peak = {key: max((interval[key] for interval in intervals if interval.get(key) is not None), default=None)
                for key in ("peak_memory_gib", "peak_reserved_gib")}
        return {"seconds_per_step": None, "steps_per_second": None, "measured_steps": [1, last_step], **peak,
                "steady_peak_memory_gib": None, "interval_note": "no logging interval among the timed steps: "
                                                                 "start-up included"}
    intervals = timed
    measured = [interval for interval in intervals if interval["first_step"] > intervals[0]["last_step"]]
    note = None
    if not measured:
        measured, note = intervals, "no logging interval after the first: start-up included"
    seconds = statistics.median(interval["seconds_per_step"] for interval in measured)
    peaks = {key: max(interval[key] for interval in intervals) if key in intervals[0] else None
             for key in ("peak_memory_gib", "peak_reserved_gib")}
    steady = max(interval["peak_memory_gib"] for interval in measured) if peaks["peak_memory_gib"] else None
    return {"seconds_per_step": seconds, "steps_per_second": 1 / seconds,
            "measured_steps": [measured[0]["first_step"], measured[-1]["last_step"]], **peaks,
            "steady_peak_memory_gib": steady, "interval_note": note}


def count_unet_flops(cfg, device, mixed_precision: str) -> float:
    """FLOPs of one UNet forward and backward at the config's batch (instance + class images),
    on a fresh copy of the UNet (no gradient checkpointing, not compiled: model FLOPs)."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from dreambooth.lora import add_lora_adapters
    from dreambooth.models import mixed_precision_dtype

    compute_dtype = mixed_precision_dtype(mixed_precision)
    unet = UNet2DConditionModel.from_pretrained(cfg.pretrained_model_name_or_path, subfolder="unet",
                                                dtype=compute_dtype if cfg.use_lora else torch.float32).to(device)
    if cfg.use_lora:
        add_lora_adapters(unet, None, cfg.rank, cfg.lora_alpha or cfg.rank, cfg.lora_dropout,
                          tuple(cfg.lora_target_modules))
    vae_config = json.loads((Path(cfg.pretrained_model_name_or_path) / "vae" / "config.json").read_text())
    side = cfg.resolution // 2 ** (len(vae_config["block_out_channels"]) - 1)
    batch = cfg.train_batch_size * (2 if cfg.with_prior_preservation else 1)
    sample = torch.randn(batch, unet.config.in_channels, side, side, device=device)
    timesteps = torch.randint(0, 1000, (batch,), device=device)
    states = torch.randn(batch, cfg.tokenizer_max_length or 77, unet.config.cross_attention_dim, device=device)
    autocast = torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32)
    with FlopCounterMode(display=False) as counter:
        with autocast:
            prediction = unet(sample, timesteps, states, return_dict=False)[0]
        prediction.float().pow(2).mean().backward()
    del unet, prediction
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return float(counter.get_total_flops())


def cached_unet_flops(cfg, device, mixed_precision: str, cache: Path) -> float:
    """count_unet_flops, counted once per shape of the work (configs that differ only in speed
    options share it), which spares each worker loading the UNet again."""
    key = json.dumps([cfg.use_lora, cfg.rank, sorted(cfg.lora_target_modules or []), cfg.resolution,
                      cfg.train_batch_size, cfg.with_prior_preservation, cfg.tokenizer_max_length, mixed_precision,
                      device.type])
    known = json.loads(cache.read_text()) if cache.exists() else {}
    if key not in known:
        known[key] = count_unet_flops(cfg, device, mixed_precision)
        cache.write_text(json.dumps(known, indent=1))
    return known[key]


def train_worker(config: BenchConfig, args: argparse.Namespace, workdir: Path) -> dict:
    import train_dreambooth
    from dreambooth.config import TrainConfig, parse_config

    argv = train_argv(config, args, workdir)
    cfg = parse_config(TrainConfig, argv)
    marks: dict = {}
    watch_first_step(marks)
    watch_step_ends(marks)
    if args.profile_steps:
        watch_profiled_steps(args.steps + 1, args.profile_steps, marks)
    # The final save (a 2 GB pipeline), model card and loss plot are not training speed.
    train_dreambooth.finish = lambda *unused, **unused_too: None
    start = time.perf_counter()
    trainer = train_dreambooth.main(argv)
    run_seconds = time.perf_counter() - start
    intervals = trainer.metrics.intervals
    by_interval = summarize_intervals(intervals, args.steps)
    ends = marks.pop("step_ends")
    # Steps 11-40 of 40: the steps after the first logging interval (warm-up, compilation).
    by_step = summarize_steps(step_seconds(ends, by_interval["measured_steps"][0], args.steps))
    result = {"config": config.name, "argv": argv, "run_seconds": run_seconds, **marks, **by_interval,
              "interval_seconds_per_step": by_interval["seconds_per_step"], **by_step,
              "final_loss": trainer.metrics.history[-1][1], "intervals": intervals}
    device = trainer.accelerator.device
    flops = cached_unet_flops(cfg, device, trainer.accelerator.mixed_precision, workdir / "unet_flops.json")
    tflops = flops / 1e12 / result["seconds_per_step"]
    result.update(unet_tflop_per_step=flops / 1e12, unet_tflops=tflops,
                  mfu=tflops / args.peak_tflops if device.type == "cuda" else None)
    return result


def select_gen_variants(names: str) -> list[str]:
    chosen = [name.strip() for name in names.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in GEN_VARIANTS]
    if unknown or not chosen:
        raise BenchError(f"--gen_variants {names}: choose from {', '.join(GEN_VARIANTS)}")
    return chosen


def gen_flags(variant: str) -> str:
    """The generate_class_images.py flags of a variant, for the report."""
    return " ".join(f"--{field} {value}" if not isinstance(value, bool) else f"--{field}" if value else f"--no_{field}"
                    for field, value in GEN_VARIANTS[variant].items()) or "(defaults)"


def time_suite_generation(args: argparse.Namespace, workdir: Path, variant: str) -> dict:
    """The suite's class-image path (generate_class_images with its defaults, plus the variant's
    flags) with one pipeline kept across two calls: the first loads it and makes one warm-up batch
    (compiling, with --compile), the second is timed."""
    import torch

    from dreambooth import generation

    loaded: dict = {}
    load_pipeline = generation.load_pipeline

    def load_once(*pipeline_args, **kwargs):
        if "pipeline" not in loaded:
            loaded["pipeline"] = load_pipeline(*pipeline_args, **kwargs)
        return loaded["pipeline"]

    speed_up, release = generation.speed_up, generation.release

    def prepare_once(pipeline, *flags):
        # A real run prepares (and compiles) its pipeline once; so does this one across both calls.
        if not loaded.get("prepared"):
            speed_up(pipeline, *flags)
            loaded["prepared"] = True

    generation.load_pipeline, generation.release, generation.speed_up = load_once, lambda pipeline: None, prepare_once
    state = generation.launch_state()
    chosen = {"sample_batch_size": args.gen_batch_size, **GEN_VARIANTS[variant]}
    batch = chosen["sample_batch_size"]
    job = generation.ClassImageJob(model=str(workdir / "model"), class_prompt=CLASS_PROMPT,
                                   class_data_dir=str(workdir / "gen" / f"suite-{variant}"),
                                   num_class_images=batch, resolution=resolution(args), **chosen)
    cudnn_benchmark = torch.backends.cudnn.benchmark  # a process-wide setting: restored for the next variant
    start = time.perf_counter()
    generation.generate_class_images(job, state)
    first_call = time.perf_counter() - start
    synchronize()
    start = time.perf_counter()
    topped_up = dataclasses.replace(job, num_class_images=batch + args.gen_images)
    made = generation.generate_class_images(topped_up, state)
    synchronize()
    seconds = time.perf_counter() - start
    pipeline = loaded.pop("pipeline")
    generation.load_pipeline, generation.release, generation.speed_up = load_pipeline, release, speed_up
    settings = {"scheduler": type(pipeline.scheduler).__name__, "steps": job.num_inference_steps,
                "dtype": str(pipeline.dtype).replace("torch.", ""), "batch_size": job.sample_batch_size,
                "flags": gen_flags(variant)}
    del pipeline
    free_gpu_memory()
    torch.backends.cudnn.benchmark = cudnn_benchmark
    return {"images": made, "seconds": seconds, "images_per_second": made / seconds,
            "load_and_warmup_seconds": first_call, **settings}


def time_reference_generation(args: argparse.Namespace, workdir: Path) -> dict:
    """What diffusers' train_dreambooth.py does: the pipeline's default PNDM scheduler (SD 1.5's
    scheduler_config), 50 steps, batch 4, fp16 on a GPU, images saved as <sha1>.jpg."""
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    cuda = torch.cuda.is_available()
    pipeline = StableDiffusionPipeline.from_pretrained(
        str(workdir / "model"), dtype=torch.float16 if cuda else torch.float32, safety_checker=None,
        requires_safety_checker=False,
    )
    pipeline.scheduler = PNDMScheduler.from_config(pipeline.scheduler.config, skip_prk_steps=True,
                                                   set_alpha_to_one=False)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.to("cuda" if cuda else "cpu")
    folder, batch, size = workdir / "gen" / "reference", 4, resolution(args)
    folder.mkdir(parents=True, exist_ok=True)
    pipeline([CLASS_PROMPT] * batch, height=size, width=size, num_inference_steps=50)
    synchronize()
    start, made = time.perf_counter(), 0
    while made < args.gen_images:
        for image in pipeline([CLASS_PROMPT] * batch, height=size, width=size, num_inference_steps=50).images:
            image.save(folder / f"{made}-{hashlib.sha1(image.tobytes()).hexdigest()}.jpg")
            made += 1
    synchronize()
    seconds = time.perf_counter() - start
    dtype = str(pipeline.dtype).replace("torch.", "")
    del pipeline
    free_gpu_memory()
    return {"images": made, "seconds": seconds, "images_per_second": made / seconds, "scheduler": "PNDMScheduler",
            "steps": 50, "dtype": dtype, "batch_size": batch}


def free_gpu_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def generation_worker(args: argparse.Namespace, workdir: Path) -> dict:
    reference = time_reference_generation(args, workdir)
    suite = {variant: time_suite_generation(args, workdir, variant) for variant in select_gen_variants(args.gen_variants)}
    for result in suite.values():
        result["speedup"] = result["images_per_second"] / reference["images_per_second"]
    best = max(suite, key=lambda variant: suite[variant]["images_per_second"])
    return {"reference": reference, "suite": suite, "resolution": resolution(args), "best": best,
            "speedup": suite["default"]["speedup"] if "default" in suite else None}


def lean_worker(config: BenchConfig, args: argparse.Namespace, workdir: Path) -> dict:
    """C1's work as a plain PyTorch loop, none of the suite's code in it: the same UNet, batch
    (2 images), objective, optimizer and clipping, with latents and text states made once on the
    device, bf16 autocast (on CUDA), fused AdamW and gradients set to None. Timed as the suite's
    configs are; its steps have no logging, so steps 11-40 are those after the first 10."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from dreambooth.config import TrainConfig, parse_config

    cfg = parse_config(TrainConfig, train_argv(CONFIGS[0], args, workdir))  # C1's settings
    device = torch.device("cuda" if use_cuda(args) else "cpu")
    model = workdir / "model"
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", dtype=torch.float32).to(device).train()
    if "--channels_last" in config.flags:
        unet.to(memory_format=torch.channels_last)
    alphas = DDPMScheduler.from_pretrained(model, subfolder="scheduler").alphas_cumprod.to(device)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon, fused=True)
    vae_config = json.loads((model / "vae" / "config.json").read_text())
    side = cfg.resolution // 2 ** (len(vae_config["block_out_channels"]) - 1)
    latents = torch.randn(2, unet.config.in_channels, side, side, device=device)
    states = torch.randn(2, 77, unet.config.cross_attention_dim, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    ends, losses = {}, []
    for step in range(1, args.steps + 1):
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, len(alphas), (latents.shape[0],), device=device)
        alpha = alphas[timesteps].view(-1, 1, 1, 1)
        noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
        with autocast:
            prediction = unet(noisy, timesteps, states, return_dict=False)[0]
        loss = F.mse_loss(prediction.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        mark_step_end(ends, step)
    first = 11 if args.steps > 10 else args.steps // 2 + 1
    result = {"config": config.name, **summarize_steps(step_seconds(ends, first, args.steps)),
              "final_loss": losses[-1].item(), "first_step_seconds": None}
    cuda = device.type == "cuda"
    result.update(peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                  peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30 if cuda else None)
    flops = cached_unet_flops(cfg, device, "bf16" if cuda else "no", workdir / "unet_flops.json")
    tflops = flops / 1e12 / result["seconds_per_step"]
    result.update(unet_tflop_per_step=flops / 1e12, unet_tflops=tflops, mfu=tflops / args.peak_tflops if cuda else None)
    return result


def run_worker(args: argparse.Namespace) -> int:
    """In a worker process: do one job and print its result as the last line of stdout."""
    workdir = Path(args.workdir)
    try:
        if args.worker == "build":
            result = build_worker(args, workdir)
        elif args.worker == "gen":
            result = generation_worker(args, workdir)
        else:
            config = select_configs(args.worker)[0]
            result = (lean_worker if config.lean else train_worker)(config, args, workdir)
    except Exception as error:  # reported to the parent, which goes on with the next config
        import traceback

        traceback.print_exc()
        first_line = (str(error).strip().splitlines() or [""])[0]
        print(json.dumps({"error": f"{type(error).__name__}: {first_line}"}))
        return 1
    print(json.dumps(result, default=str), flush=True)
    return 0


# ---------------------------------------------------------------- the parent process


def spawn(role: str, args: argparse.Namespace, workdir: Path, timeout: float | None = None) -> dict:
    """Run one worker process under ``timeout`` (--timeout); its JSON line, or {'error': ...} with the log's tail."""
    timeout = args.timeout if timeout is None else timeout
    log_path = workdir / "logs" / f"{role}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", role, "--workdir", str(workdir),
               *worker_flags(args)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if args.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT, env=env,
                                   start_new_session=True)
        try:
            stdout, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the worker and any compile workers it started
            process.communicate()
            return {"error": f"timed out after {timeout:.0f} s", "log_tail": log_tail(log_path)}
    result = last_json_line(stdout)
    if process.returncode != 0 or result is None or "error" in result:
        error = (result or {}).get("error") or f"exit status {process.returncode}"
        return {"error": error, "log_tail": log_tail(log_path)}
    return result


def last_json_line(stdout: str) -> dict | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def log_tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def versions() -> dict[str, str | None]:
    found = {}
    for package in ("torch", "diffusers", "transformers", "accelerate", "peft", "bitsandbytes"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def header(args: argparse.Namespace, cuda: bool) -> str:
    model = "tiny random model, 32 px" if args.tiny else "SD 1.5 architecture, random weights, 512 px"
    lines = [f"DreamBooth training benchmark: {model}, batch 1 + 1 class image, {args.steps} steps, "
             f"{'bf16 on CUDA' if cuda else 'fp32 on the CPU'}",
             "Reference (diffusers train_dreambooth.py, one H200): "
             + ", ".join(f"{name} {s:.3f} s/step {gib} GiB" for name, (s, gib) in REFERENCE.items()),
             "Goals: C1 <= 0.060 s/step with --compile (C1c), <= 0.100 without (C1, or C1l, C1b, C1n), "
             "<= 14 GiB; C2 <= 0.150, <= 14 GiB; "
             "C3 <= 0.165, <= 16 GiB; C4 <= 0.150, <= 8 GiB (C4, or C4b with --bf16_gradients); LoRA (L1) faster "
             "than C2 and <= 4 GiB; "
             f"class images >= {GENERATION_GOAL}x the reference's images/s"]
    return "\n".join(lines)


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(results: dict[str, dict]) -> str:
    rows = [("config", "s/step", "steps/s", "peak GiB", "reserved GiB", "UNet TFLOP/s", "MFU", "notes")]
    for name, result in results.items():
        if "seconds_per_step" not in result:
            rows.append((name, "-", "-", "-", "-", "-", "-", result.get("skipped") or f"failed: {result.get('error')}"))
            continue
        notes = [result["description"]]
        if "--compile" in result["flags"] and result.get("first_step_seconds") is not None:
            notes.append(f"first step {result['first_step_seconds']:.1f} s (compile)")
        if result.get("interval_note"):
            notes.append(result["interval_note"])
        if result.get("step_p10_seconds") is not None:
            notes.append(f"steps {result['measured_steps'][0]}-{result['measured_steps'][1]}: p10 "
                         f"{result['step_p10_seconds']:.3f}, p90 {result['step_p90_seconds']:.3f}, mean "
                         f"{result['step_mean_seconds']:.3f} s")
        rows.append((name, fmt(result["seconds_per_step"], ".3f"), fmt(result["steps_per_second"], ".2f"),
                     fmt(result["peak_memory_gib"], ".1f"), fmt(result["peak_reserved_gib"], ".1f"),
                     fmt(result["unet_tflops"], ".3g"), fmt(result["mfu"] and 100 * result["mfu"], ".1f") +
                     ("%" if result["mfu"] else ""), "; ".join(notes)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1]
                     for row in rows)


def profile_lines(results: dict[str, dict]) -> str:
    """The profiled steps of each config: where a step's time goes, and its heaviest operators."""
    profiled = {name: result["profile"] for name, result in results.items() if result.get("profile")}
    failed = [f"  {name}: profile failed: {found['error']}" for name, found in profiled.items() if "error" in found]
    profiled = {name: found for name, found in profiled.items() if "error" not in found}
    if not profiled:
        return "\n".join(failed)
    rows = [("config", "wall", *PHASES, "device busy", "busy %", "launches", "waits")]
    for name, found in profiled.items():
        busy = found["device_busy_fraction"]
        rows.append((name, fmt(found["wall_ms_per_step"], ".1f"),
                     *(fmt(found["host_ms_per_step"][phase], ".1f") for phase in PHASES),
                     fmt(found["device_busy_ms_per_step"], ".1f"), fmt(busy and 100 * busy, ".0f"),
                     fmt(found["kernel_launches_per_step"], ".0f"), fmt(found.get("host_waits_per_step"), ".1f")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    steps = next(iter(profiled.values()))["steps"]
    lines = [f"profile of {steps} steps after the timed ones (ms per step; each phase's host time, "
             "the device's busy time; kernel launches and the host's waits for the GPU a step):"]
    lines += ["  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    for name, found in profiled.items():
        column = "self_device_ms_per_step" if found["device_busy_ms_per_step"] else "self_host_ms_per_step"
        lines.append(f"  {name} heaviest ({column.split('_')[1]} ms/step): " + ", ".join(
            f"{op['name']} {op[column]:.1f}" for op in found["top_ops"][:6]))
    return "\n".join(lines + failed)


def check_goals(results: dict[str, dict], generation: dict | None) -> list[dict]:
    """Each goal met or not met, for the configs that ran."""
    checks = []
    for name, (max_seconds, max_gib) in GOALS.items():
        result = results.get(name, {})
        if "seconds_per_step" not in result:
            continue
        if max_seconds is not None:
            checks.append({"goal": f"{name} s/step <= {max_seconds}", "value": result["seconds_per_step"],
                           "met": result["seconds_per_step"] <= max_seconds})
        checks.append({"goal": f"{name} peak allocated <= {max_gib} GiB", "value": result["peak_memory_gib"],
                       "met": result["peak_memory_gib"] is not None and result["peak_memory_gib"] <= max_gib})
    for lora in ("L1", "L1w"):
        if "seconds_per_step" in results.get(lora, {}) and "seconds_per_step" in results.get("C2", {}):
            checks.append({"goal": f"{lora} s/step < C2 s/step", "value": results[lora]["seconds_per_step"],
                           "met": results[lora]["seconds_per_step"] < results["C2"]["seconds_per_step"]})
    for variant, result in (generation or {}).get("suite", {}).items():
        checks.append({"goal": f"class images/s >= {GENERATION_GOAL}x reference, {gen_flags(variant)}",
                       "value": result["speedup"], "met": result["speedup"] >= GENERATION_GOAL})
    return checks


def generation_lines(generation: dict) -> str:
    if "error" in generation:
        return f"class-image generation: failed: {generation['error']}"
    lines = [f"class-image generation, {generation['resolution']} px (images/s; warm-up = loading + first batch):"]
    parts = [("reference", generation["reference"])] + [(f"suite {name}", part) for name, part in generation["suite"].items()]
    for name, part in parts:
        ratio = f"{part['speedup']:.2f}x" if "speedup" in part else "1x"
        warmup = f", warm-up {part['load_and_warmup_seconds']:.0f} s" if "load_and_warmup_seconds" in part else ""
        lines.append(f"  {name:20s} {part['images_per_second']:7.2f}  {ratio:>6s}  ({part['images']} images in "
                     f"{part['seconds']:.1f} s; {part['scheduler']} {part['steps']} steps, {part['dtype']}, "
                     f"batch {part['batch_size']}{warmup}) {part.get('flags', '')}")
    lines.append(f"  goal >= {GENERATION_GOAL}x the reference's images/s")
    return "\n".join(lines)


def run_config(config: BenchConfig, args: argparse.Namespace, workdir: Path, cuda: bool, timeout: float) -> dict:
    flags = list(config.flags) + ([] if config.lean else shlex.split(args.extra_flags))
    entry = {"description": config.description, "flags": flags}
    reason = skip_reason(config, train_fields(), "cuda" if cuda else "cpu")
    if reason:
        print(f"{config.name}: skipped ({reason})", flush=True)
        return {**entry, "skipped": reason}
    print(f"{config.name}: {config.description} {' '.join(flags)}", flush=True)
    start = time.perf_counter()
    shutil.rmtree(workdir / "runs" / config.name, ignore_errors=True)
    result = {**entry, **spawn(config.name, args, workdir, timeout)}
    shutil.rmtree(workdir / "runs" / config.name, ignore_errors=True)
    print(f"{config.name}: done in {time.perf_counter() - start:.0f} s"
          + (f", FAILED: {result['error']}" if "error" in result else ""), flush=True)
    if "log_tail" in result:
        print(result["log_tail"], flush=True)
    return result


def run_generation(args: argparse.Namespace, workdir: Path, timeout: float) -> dict:
    print(f"class-image generation: reference, then the suite ({args.gen_variants})", flush=True)
    shutil.rmtree(workdir / "gen", ignore_errors=True)
    generation = spawn(GEN, args, workdir, timeout)
    if "log_tail" in generation:
        print(generation["log_tail"], flush=True)
    return generation


def run_benchmark(args: argparse.Namespace, workdir: Path, output: Path) -> dict:
    """Every config and 'gen' of the plan, each in its own process; the summary is written to
    ``output`` after each, so a run stopped from outside keeps what it finished."""
    cuda = use_cuda(args)
    if not args.tiny and not cuda:
        raise BenchError("the full benchmark needs a CUDA GPU; on a CPU run it with --tiny")
    plan = plan_run(args, cuda)
    select_gen_variants(args.gen_variants)
    check_extra_flags(args.extra_flags, train_fields())
    print(header(args, cuda), flush=True)
    start = time.perf_counter()
    build = spawn("build", args, workdir)
    if "error" in build:
        raise BenchError(f"building the model failed: {build['error']}\n{build.get('log_tail', '')}")
    if build["parameters_millions"]:
        print("parameters (M): " + ", ".join(f"{k} {v:.2f}" for k, v in build["parameters_millions"].items()))
    print(f"card: {build['card']}", flush=True)
    write_images(workdir, resolution(args))
    summary = {"card": build["card"], "device": "cuda" if cuda else "cpu", "tiny": args.tiny, "versions": versions(),
               "parameters_millions": build["parameters_millions"], "steps": args.steps,
               "extra_flags": args.extra_flags, "peak_tflops": args.peak_tflops,
               "reference_h200": {name: {"seconds_per_step": s, "peak_gib": gib}
                                  for name, (s, gib) in REFERENCE.items()},
               "goals": {name: {"max_seconds_per_step": s, "max_peak_gib": gib} for name, (s, gib) in GOALS.items()},
               "configs": {}, "generation": None, "goal_checks": [], "finished": False}
    for item in plan:
        elapsed = time.perf_counter() - start
        left = args.timeout if args.deadline is None else min(args.timeout, args.deadline - elapsed)
        if left <= 0:
            name = item if item == GEN else item.name
            print(f"{name}: skipped (past the --deadline of {args.deadline:.0f} s)", flush=True)
            if item != GEN:
                summary["configs"][item.name] = {"description": item.description, "flags": list(item.flags),
                                                 "skipped": "past the --deadline"}
            continue
        if item == GEN:
            summary["generation"] = run_generation(args, workdir, left)
        else:
            summary["configs"][item.name] = run_config(item, args, workdir, cuda, left)
        if cuda and not args.tiny:
            summary["goal_checks"] = check_goals(summary["configs"], summary["generation"])
        summary["total_seconds"] = time.perf_counter() - start
        write_summary(summary, output)
    summary.update(total_seconds=time.perf_counter() - start, finished=True)
    write_summary(summary, output)
    return summary


def write_summary(summary: dict, output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(f".{output.name}.tmp")
    temporary.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    temporary.replace(output)


def report(summary: dict) -> None:
    print()
    print(table(summary["configs"]))
    if profile_lines(summary["configs"]):
        print(profile_lines(summary["configs"]))
    if summary["generation"]:
        print(generation_lines(summary["generation"]))
    if summary["goal_checks"]:
        print("goals:")
        for check in summary["goal_checks"]:
            print(f"  {'met    ' if check['met'] else 'NOT met'}  {check['goal']}  ({fmt(check['value'], '.3f')})")
    else:
        print("goals: checked on a GPU with the full model only")
    print(f"total {summary['total_seconds']:.0f} s on {summary['card']}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return run_worker(args)
    output = Path(args.output or ROOT / "benchmarks" / ("results_tiny.json" if args.tiny else "results.json"))
    try:
        with tempfile.TemporaryDirectory(prefix="bench-train-") as scratch:
            workdir = Path(args.workdir or scratch).resolve()
            summary = run_benchmark(args, workdir, output)
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    report(summary)
    print(f"results written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
