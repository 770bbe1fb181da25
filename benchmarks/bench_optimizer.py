"""The optimizer step alone, on the weights of Stable Diffusion 1.5's UNet: bitsandbytes' 8-bit AdamW
as it comes, the suite's (the same update without a wait for the GPU after each weight), and
torch's fused AdamW for scale.

GPU (a few seconds; gpu_run.sh runs it before bench_train.py):
    python benchmarks/bench_optimizer.py
CPU smoke test on a small UNet (bitsandbytes 0.50 or later steps 8-bit AdamW on the CPU):
    python benchmarks/bench_optimizer.py --tiny

Every variant starts from the same weights and gradients and takes the same steps. The table
gives each step's host time (until step() returns), its time with the GPU's work included (CUDA
events), the waits for the GPU a step makes inside bitsandbytes, and how far its weights end from
bitsandbytes' own (0 where the update is the same to the bit).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_train import SD15_UNET, synchronize, versions  # noqa: E402

from dreambooth.optimizers import adamw_8bit  # noqa: E402

SMALL_UNET = dict(SD15_UNET, sample_size=16, block_out_channels=(32, 64, 64, 64), cross_attention_dim=64,
                  attention_head_dim=4, norm_num_groups=8)
VARIANTS = ("bitsandbytes", "suite", "torch_fused")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a small UNet (and the CPU unless --cuda is possible)")
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even with a GPU")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant (after 2 warm-up steps)")
    parser.add_argument("--output", default=None, help="JSON results (default: print only)")
    return parser.parse_args(argv)


def unet_weights(tiny: bool, device: torch.device) -> list[torch.Tensor]:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**(SMALL_UNET if tiny else SD15_UNET))
    return [p.detach() for p in unet.parameters()]


def make_optimizer(variant: str, parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    settings = dict(lr=5e-6, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    if variant == "torch_fused":
        return torch.optim.AdamW(parameters, fused=True, **settings)
    import bitsandbytes

    kind = bitsandbytes.optim.AdamW8bit if variant == "bitsandbytes" else adamw_8bit(bitsandbytes)
    return kind(parameters, **settings)


@contextlib.contextmanager
def counting_waits() -> Iterator[list[int]]:
    """A counter of bitsandbytes' waits for the GPU (its ``sync_gpu``, which still waits)."""
    from bitsandbytes.optim import optimizer as module

    waits = [0]
    original = module.sync_gpu

    def counted(tensor):
        waits[0] += 1
        original(tensor)

    module.sync_gpu = counted
    try:
        yield waits
    finally:
        module.sync_gpu = original


def time_variant(variant: str, weights: list[torch.Tensor], gradients: list[torch.Tensor], steps: int,
                 device: torch.device, waits: list[int]) -> tuple[dict, list[torch.Tensor]]:
    parameters = [torch.nn.Parameter(w.clone()) for w in weights]
    for parameter, gradient in zip(parameters, gradients):
        parameter.grad = gradient
    optimizer = make_optimizer(variant, parameters)
    for _ in range(2):  # the states are made at the first step
        optimizer.step()
    synchronize()
    waits[0] = 0
    host, wall = [], []
    for _ in range(steps):
        start = time.perf_counter()
        if device.type == "cuda":
            began, ended = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            began.record()
        optimizer.step()
        host.append(time.perf_counter() - start)
        if device.type == "cuda":
            ended.record()
            ended.synchronize()
            wall.append(began.elapsed_time(ended) / 1000)
        else:
            wall.append(host[-1])
    result = {"host_ms_per_step": 1000 * statistics.median(host), "wall_ms_per_step": 1000 * statistics.median(wall),
              "waits_per_step": waits[0] / steps}
    return result, [p.detach() for p in parameters]


def run(args: argparse.Namespace) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    weights = unet_weights(args.tiny, device)
    generator = torch.Generator(device).manual_seed(1)
    gradients = [torch.randn(w.shape, generator=generator, device=device) * 1e-3 for w in weights]
    results, finals = {}, {}
    with counting_waits() as waits:
        for variant in VARIANTS:
            results[variant], finals[variant] = time_variant(variant, weights, gradients, args.steps, device, waits)
    for variant in ("bitsandbytes", "suite"):  # torch's AdamW keeps exact moments: another update
        results[variant]["max_abs_difference_from_bitsandbytes"] = max(
            (mine - theirs).abs().max().item() for mine, theirs in zip(finals[variant], finals["bitsandbytes"]))
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "model": "small UNet" if args.tiny else "SD 1.5 UNet", "weights": len(weights),
            "values": sum(w.numel() for w in weights), "steps": args.steps, "versions": versions(),
            "variants": results}


def table(summary: dict) -> str:
    lines = [f"Optimizer step on the {summary['model']} ({summary['weights']} weights, {summary['values'] / 1e6:.1f}M values), "
             f"{summary['device']}, median of {summary['steps']} steps",
             "| optimizer | host ms/step | with the GPU's work ms/step | waits for the GPU a step | max abs difference from bitsandbytes |",
             "|---|---|---|---|---|"]
    for name, row in summary["variants"].items():
        difference = row.get("max_abs_difference_from_bitsandbytes")
        difference = "-" if difference is None else f"{difference:.3g}"
        lines.append(f"| {name} | {row['host_ms_per_step']:.2f} | {row['wall_ms_per_step']:.2f} | "
                     f"{row['waits_per_step']:.0f} | {difference} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    summary = run(args)
    print(table(summary))
    if args.output:
        Path(args.output).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
