"""Loading, preparing and saving the Stable Diffusion components."""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import DreamBoothError

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def check_model_source(source: str, flag: str) -> None:
    """A model is a folder holding model_index.json, or something shaped like a Hub id."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise DreamBoothError(f"{flag} {source}: folder has no model_index.json (not a diffusers pipeline folder)")
        return
    if path.exists():
        raise DreamBoothError(f"{flag} {source}: not a folder; give a diffusers pipeline folder or a Hub id")
    looks_like_path = source.startswith((".", "/", "~")) or "\\" in source or source.count("/") > 1
    if looks_like_path or not _HUB_ID.match(source) or ".." in source:
        raise DreamBoothError(f"{flag} {source}: no such folder, and not a Hub id like 'owner/name'")


def mixed_precision_dtype(mixed_precision: str | None) -> torch.dtype:
    """The dtype for frozen weights under Accelerate's mixed-precision setting."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision or "no", torch.float32)


def check_precision_supported(mixed_precision: str | None) -> None:
    if mixed_precision == "fp16" and not (torch.cuda.is_available() or _has_xpu() or torch.backends.mps.is_available()):
        raise DreamBoothError("--mixed_precision fp16 needs a GPU; on CPU use --mixed_precision bf16 or no")


def _has_xpu() -> bool:
    return hasattr(torch, "xpu") and torch.xpu.is_available()


@dataclass
class Components:
    tokenizer: Any
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: Any


def _load(what: str, loader, source: str, **kwargs):
    try:
        return loader(source, **kwargs)
    except (OSError, ValueError, EnvironmentError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DreamBoothError(f"could not load the {what} of {source}: {first_line}") from None


def load_components(model: str, revision: str | None = None, variant: str | None = None,
                    tokenizer_name: str | None = None, frozen_dtype: torch.dtype = torch.float32,
                    train_text_encoder: bool = False) -> Components:
    """Tokenizer, CLIP text encoder, VAE, UNet and the DDPM training scheduler of a pipeline.

    Frozen models load directly in ``frozen_dtype``; trained ones in fp32, which keeps small
    updates from vanishing in half precision (Accelerate's autocast sets the compute dtype).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    weights = dict(revision=revision, variant=variant)
    text_dtype = torch.float32 if train_text_encoder else frozen_dtype
    if tokenizer_name:
        tokenizer = _load("tokenizer", AutoTokenizer.from_pretrained, tokenizer_name, revision=revision)
    else:
        tokenizer = _load("tokenizer", AutoTokenizer.from_pretrained, model, subfolder="tokenizer", revision=revision)
    return Components(
        tokenizer=tokenizer,
        text_encoder=_load("text encoder", CLIPTextModel.from_pretrained, model, subfolder="text_encoder",
                           dtype=text_dtype, **weights),
        vae=_load("VAE", AutoencoderKL.from_pretrained, model, subfolder="vae", dtype=frozen_dtype, **weights),
        unet=_load("UNet", UNet2DConditionModel.from_pretrained, model, subfolder="unet",
                   dtype=torch.float32, **weights),
        noise_scheduler=_load("scheduler", DDPMScheduler.from_pretrained, model, subfolder="scheduler", revision=revision),
    )


def prepare_for_training(components: Components, train_text_encoder: bool, device: torch.device,
                         gradient_checkpointing: bool = False, xformers: bool = False) -> list[torch.nn.Module]:
    """Freeze what is not trained and move everything to ``device``; returns the trained modules."""
    trained = [components.unet] + ([components.text_encoder] if train_text_encoder else [])
    components.vae.requires_grad_(False)
    components.text_encoder.requires_grad_(train_text_encoder)
    for module in (components.vae, components.text_encoder, components.unet):
        module.to(device)
    for module in trained:
        module.train()
    if gradient_checkpointing:
        components.unet.enable_gradient_checkpointing()
        if train_text_encoder:
            components.text_encoder.gradient_checkpointing_enable()
    if xformers:
        enable_xformers(components.unet)
    return trained


def enable_xformers(unet: torch.nn.Module) -> None:
    try:
        unet.enable_xformers_memory_efficient_attention()
    except (ValueError, RuntimeError, ModuleNotFoundError) as error:
        raise DreamBoothError(f"--enable_xformers_memory_efficient_attention: {error}") from None


def save_model(model: torch.nn.Module, folder: Path) -> None:
    """One trained model in diffusers/transformers format (safetensors)."""
    model.save_pretrained(folder)


def load_model_into(model: torch.nn.Module, folder: Path) -> None:
    """Load weights saved by ``save_model`` into ``model`` in place (its dtype and device kept)."""
    loaded = type(model).from_pretrained(folder)
    model.load_state_dict(loaded.state_dict())


def cpu_only() -> bool:
    """No GPU or other accelerator here: distributed runs must use the CPU (gloo) backend."""
    from accelerate.utils import parse_flag_from_env

    no_accelerator = not (hasattr(torch, "accelerator") and torch.accelerator.is_available())
    return parse_flag_from_env("ACCELERATE_USE_CPU") or no_accelerator


def save_pipeline(output_dir: str | Path, base_model: str, unet: torch.nn.Module,
                  text_encoder: torch.nn.Module | None, tokenizer, revision: str | None = None,
                  variant: str | None = None) -> Path:
    """Save a complete, standalone pipeline: the trained modules over the base's other parts."""
    from diffusers import DiffusionPipeline

    trained = {"unet": unet, "tokenizer": tokenizer}
    if text_encoder is not None:
        trained["text_encoder"] = text_encoder
    pipeline = _load("pipeline", DiffusionPipeline.from_pretrained, base_model,
                     revision=revision, variant=variant, **trained)
    output_dir = Path(output_dir)
    staging = output_dir / ".pipeline.tmp"
    try:
        shutil.rmtree(staging, ignore_errors=True)
        pipeline.save_pretrained(staging, safe_serialization=True)
        _publish(staging, output_dir)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise DreamBoothError(f"could not save the pipeline to {output_dir} ({error.strerror or error})") from None
    return output_dir


def _publish(staging: Path, target: Path) -> None:
    """Move a saved pipeline into ``target``, model_index.json last: with it, the folder is complete."""
    (target / "model_index.json").unlink(missing_ok=True)
    for entry in staging.iterdir():
        if entry.name == "model_index.json":
            continue
        destination = target / entry.name
        if destination.is_dir():
            shutil.rmtree(destination)
        entry.replace(destination)
    (staging / "model_index.json").replace(target / "model_index.json")
    staging.rmdir()
