"""Loading, preparing and saving the Stable Diffusion components."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError

from .errors import DreamBoothError, error_chain, first_reason

logger = logging.getLogger(__name__)

# What a failed write of weights raises: OSError, or from safetensors >= 0.8 a SafetensorError
# ("Error while serializing: I/O error: No space left on device (os error 28)").
WRITE_ERRORS = (OSError, SafetensorError)

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


def check_precision_supported(mixed_precision: str | None, source: str = "--mixed_precision fp16",
                              device: torch.device | None = None) -> None:
    """fp16 needs a GPU: refused on a machine without one, and, given the run's ``device``, on a run
    that uses the CPU of a machine with one (ACCELERATE_USE_CPU, ``accelerate launch --cpu``). There
    Accelerate trains without autocast or loss scaling, and the frozen fp16 weights would meet fp32
    ones in the first step."""
    if mixed_precision == "bf16" and device is not None and device.type == "cuda":
        warn_if_bf16_emulated(device)
    if mixed_precision != "fp16":
        return
    if not (torch.cuda.is_available() or _has_xpu() or torch.backends.mps.is_available()):
        raise DreamBoothError(f"{source} needs a GPU; on CPU use --mixed_precision bf16 or no")
    if device is not None and device.type == "cpu":
        raise DreamBoothError(f"{source} needs a GPU, and this run uses the CPU (ACCELERATE_USE_CPU or "
                              "`accelerate launch --cpu`); use --mixed_precision bf16 or no, or run on the GPU")


def warn_if_bf16_emulated(device: torch.device) -> None:
    """GPUs before Ampere (T4, V100, RTX 20xx) have no bf16 arithmetic: PyTorch emulates it, several
    times slower than fp16, and Accelerate lets it run."""
    if not torch.cuda.is_bf16_supported(including_emulation=False):
        logger.warning("%s has no native bf16: PyTorch emulates it, several times slower; "
                       "use --mixed_precision fp16 on this GPU", torch.cuda.get_device_name(device))


def _has_xpu() -> bool:
    return hasattr(torch, "xpu") and torch.xpu.is_available()


@dataclass
class Components:
    tokenizer: Any
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: Any


def load_pretrained(what: str, loader, source: str, **kwargs):
    """``loader(source, **kwargs)`` (a from_pretrained); a failure is one line naming what and where."""
    try:
        return loader(source, **kwargs)
    except (OSError, ValueError, EnvironmentError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        reason = hub_failure(error, source, kwargs.get("revision")) or first_line
        raise DreamBoothError(f"could not load the {what} of {source}: {reason}") from None


def hub_failure(error: BaseException, source: str, revision: str | None = None, revision_flag: str = "--revision",
                thing: str = "model", local: str = "folder") -> str | None:
    """What to do about a Hub id that could not be fetched, from the huggingface_hub error behind
    ``error`` (diffusers and transformers wrap it in messages of their own); None for other errors.
    ``thing`` is what the repo should hold, ``local`` what a local path would have been."""
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    kind = next((type(cause) for cause in error_chain(error) if isinstance(cause, (
        GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError, LocalEntryNotFoundError, OfflineModeIsEnabled,
    ))), None)
    if kind is None or Path(source).expanduser().exists():
        return None
    if issubclass(kind, GatedRepoError):
        return (f"a gated repo: accept its conditions at https://huggingface.co/{source} with your account, "
                "then log in with `hf auth login`")
    if issubclass(kind, RevisionNotFoundError):
        if revision is None:
            return f"the repo has no main branch; name a branch, tag or commit with {revision_flag}"
        return f"{revision_flag} {revision}: no such branch, tag or commit in {source}"
    # Without a revision, a mistyped local path ('runs/sks-dgo') reads as a Hub id: both are said.
    neither, check = ("", "the id") if revision else (f"no local {local} of that name, and ", "the path or the id")
    if issubclass(kind, RepositoryNotFoundError):
        return f"{neither}no such {thing} on the Hub (check {check}; a private repo needs `hf auth login`)"
    download = f"hf download {source}" + (f" --revision {revision}" if revision else "")
    return (f"{neither}not fully in the Hugging Face cache{' at revision ' + revision if revision else ''} with the "
            f"Hub unreachable (offline): check {check}, or download it first with `{download}`")


def load_components(model: str, revision: str | None = None, variant: str | None = None,
                    tokenizer_name: str | None = None, frozen_dtype: torch.dtype = torch.float32,
                    train_text_encoder: bool = False, use_lora: bool = False) -> Components:
    """Tokenizer, CLIP text encoder, VAE, UNet and the DDPM training scheduler of a pipeline.

    Frozen weights load directly in ``frozen_dtype``; fully trained models in fp32, which keeps
    small updates from vanishing in half precision (Accelerate's autocast sets the compute
    dtype). With LoRA every base weight is frozen; the adapters are fp32.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    text_dtype = torch.float32 if train_text_encoder and not use_lora else frozen_dtype
    unet_dtype = frozen_dtype if use_lora else torch.float32
    if tokenizer_name:
        tokenizer = load_pretrained("tokenizer", AutoTokenizer.from_pretrained, tokenizer_name, revision=revision)
    else:
        tokenizer = load_pretrained("tokenizer", AutoTokenizer.from_pretrained, _tokenizer_folder(model, revision),
                                    subfolder="tokenizer")
    models = [load_weights(what, loader, model, subfolder, variant, dtype=dtype, revision=revision)
              for what, loader, subfolder, dtype in (
                  ("text encoder", CLIPTextModel.from_pretrained, "text_encoder", text_dtype),
                  ("VAE", AutoencoderKL.from_pretrained, "vae", frozen_dtype),
                  ("UNet", UNet2DConditionModel.from_pretrained, "unet", unet_dtype))]
    if variant and all(found is None for _, found in models):
        raise DreamBoothError(f"--variant {variant}: {model} has no {variant} weights (its files are named like "
                              f"'unet/diffusion_pytorch_model.{variant}.safetensors'); leave the flag out")
    text_encoder, vae, unet = (loaded for loaded, _ in models)
    return Components(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet,
        noise_scheduler=load_pretrained("scheduler", DDPMScheduler.from_pretrained, model, subfolder="scheduler", revision=revision),
    )


def _tokenizer_folder(model: str, revision: str | None) -> str:
    """The folder holding a pipeline's tokenizer/: ``model`` itself, or for a Hub id its cached snapshot
    (the tokenizer files fetched if need be). Given a Hub id and subfolder, AutoTokenizer reads a model
    config.json first, which tokenizer/ has none of; offline, transformers 5 then fails unless the cache
    recorded that file as missing (`hf download` and diffusers never do: huggingface/lerobot#4131)."""
    if Path(model).expanduser().is_dir():
        return model
    from huggingface_hub import snapshot_download

    return load_pretrained("tokenizer", snapshot_download, model, revision=revision, allow_patterns=["tokenizer/*"])


def load_weights(what: str, loader, model: str, subfolder: str, variant: str | None, **kwargs):
    """A model of the pipeline ``model`` in its ``variant`` where it has one, else its default weights, as
    diffusers' pipelines load (a repo may give fp16 files for the UNet only). Returns (model, variant loaded)."""
    if variant:
        try:
            return loader(model, subfolder=subfolder, variant=variant, **kwargs), variant
        except (OSError, ValueError):
            pass
    loaded = load_pretrained(what, loader, model, subfolder=subfolder, **kwargs)
    if variant:
        logger.warning("%s: the %s has no %s weights; loading its default weights", model, what, variant)
    return loaded, None


def prepare_for_training(components: Components, train_text_encoder: bool, device: torch.device,
                         gradient_checkpointing: bool = False, xformers: bool = False,
                         channels_last: bool = False) -> list[torch.nn.Module]:
    """Freeze what is not trained and move everything to ``device``; returns the trained modules
    (with LoRA adapters already added, only their weights require gradients)."""
    trained = [components.unet] + ([components.text_encoder] if train_text_encoder else [])
    components.vae.requires_grad_(False)
    if not train_text_encoder:
        components.text_encoder.requires_grad_(False)
    for module in (components.vae, components.text_encoder, components.unet):
        module.to(device)
    for module in trained:
        module.train()
    if gradient_checkpointing:
        components.unet.enable_gradient_checkpointing()
        if train_text_encoder:
            enable_text_encoder_checkpointing(components.text_encoder)
    if xformers:
        enable_xformers(components.unet)
    if channels_last:
        components.unet.to(memory_format=torch.channels_last)
    return trained


def enable_text_encoder_checkpointing(text_encoder: torch.nn.Module) -> None:
    """Gradient checkpointing of a trained text encoder's layers (checkpointed in train mode only).
    transformers 5 renamed it activation checkpointing; the old name warns that it goes in v6."""
    enable = getattr(text_encoder, "activation_checkpointing_enable", None) or text_encoder.gradient_checkpointing_enable
    enable()


def enable_xformers(unet: torch.nn.Module) -> None:
    """xformers attention in the UNet. diffusers runs one xformers attention first and re-raises whatever
    it raises: a build for another torch or CUDA gives an error of many lines ("No operator found for
    `memory_efficient_attention_forward` with inputs: ..."), said here in one."""
    try:
        unet.enable_xformers_memory_efficient_attention()
    except Exception as error:  # noqa: BLE001 - any failure of that first attention
        raise DreamBoothError(f"--enable_xformers_memory_efficient_attention: xformers cannot run here "
                              f"({first_reason(error)}); install the xformers build for this torch and CUDA, "
                              "or drop the flag to use PyTorch's SDPA attention") from None


@contextlib.contextmanager
def on_device(modules: list[torch.nn.Module | None], device: torch.device):
    """Bring modules that were moved off the GPU back for a while (e.g. to draw samples)."""
    homes = [(module, next(module.parameters()).device) for module in modules if module is not None]
    for module, _ in homes:
        module.to(device)
    try:
        yield
    finally:
        for module, home in homes:
            module.to(home)


TRAINED_NAMES = ("unet", "text_encoder")


@contextlib.contextmanager
def writing():
    """Around calls that write with torch.save: it reports a failed write (a full disk: "[enforce fail at
    inline_container.cc:672] . unexpected pos ...") as a plain RuntimeError, raised here as an OSError so
    that it is handled like any other. Only around the writing calls: elsewhere a RuntimeError is a bug.
    Its subclasses (CUDA out of memory, a distributed backend's failure) are not write failures."""
    try:
        yield
    except RuntimeError as error:
        if type(error) is not RuntimeError:
            raise
        raise OSError(first_reason(error)) from error


def write_failure(error: BaseException) -> str:
    """The one-line reason of one of WRITE_ERRORS."""
    return (error.strerror if isinstance(error, OSError) else None) or first_reason(error)


def save_models(models: list[torch.nn.Module], folder: Path) -> None:
    """The trained models (``[unet]`` or ``[unet, text_encoder]``) in diffusers format, one subfolder each."""
    for name, model in zip(TRAINED_NAMES, models):
        model.save_pretrained(Path(folder) / name)


def whole_model(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A model of ``model``'s class and config holding ``state_dict``, the weights of a sharded
    model gathered whole, without allocating weights of its own. Gathering leaves the weights on
    the main process; where ``state_dict`` is empty, ``model`` itself."""
    if not state_dict:
        return model
    with torch.device("meta"):
        whole = type(model).from_config(model.config)
    whole.load_state_dict(state_dict, assign=True)
    return whole


def load_models_into(models: list[torch.nn.Module], folder: Path) -> None:
    """Load weights saved by ``save_models`` into ``models`` in place (dtype and device kept)."""
    for name, model in zip(TRAINED_NAMES, models):
        loaded = type(model).from_pretrained(Path(folder) / name)
        model.load_state_dict(loaded.state_dict())


def cpu_only() -> bool:
    """No GPU or other accelerator here: distributed runs must use the CPU (gloo) backend."""
    from accelerate.utils import parse_flag_from_env

    no_accelerator = not (hasattr(torch, "accelerator") and torch.accelerator.is_available())
    return parse_flag_from_env("ACCELERATE_USE_CPU") or no_accelerator


def save_pipeline(output_dir: str | Path, base_model: str, trained_states: dict[str, dict], tokenizer,
                  revision: str | None = None, variant: str | None = None,
                  dtype: torch.dtype = torch.float16) -> Path:
    """Save a complete, standalone pipeline in ``dtype``: the base model with the trained weights
    (``{"unet": state_dict, ...}``, gathered from every process when they are sharded) loaded in.

    Without the base's safety checker (and its feature extractor): no tool of this suite runs one, and
    loading it at the end of a run would fetch 1.2 GB that training never needed, or, offline with a
    cache that lacks it, fail and lose the run."""
    from diffusers import DiffusionPipeline

    pipeline = load_pretrained("pipeline", DiffusionPipeline.from_pretrained, base_model, revision=revision, variant=variant,
                               dtype=dtype, tokenizer=tokenizer, safety_checker=None, feature_extractor=None,
                               requires_safety_checker=False)
    for name, state in trained_states.items():
        getattr(pipeline, name).load_state_dict(state)
    output_dir = Path(output_dir)
    staging = output_dir / ".pipeline.tmp"
    try:
        shutil.rmtree(staging, ignore_errors=True)
        with writing():
            pipeline.save_pretrained(staging, safe_serialization=True)
        _load_text_encoder_in_fp32_by_default(staging)
        seal(staging)
        _publish(staging, output_dir)
    except WRITE_ERRORS as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise DreamBoothError(f"could not save the pipeline to {output_dir} ({write_failure(error)})") from None
    return output_dir


def _load_text_encoder_in_fp32_by_default(folder: Path) -> None:
    """transformers loads a model in the dtype its config names, diffusers loads in fp32 unless
    told otherwise: with fp16 weights, a plain ``from_pretrained(folder)`` would mix fp16 text
    embeddings with an fp32 UNet and fail. Naming fp32 makes both agree; ``torch_dtype=`` wins."""
    config_file = folder / "text_encoder" / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        config["dtype"] = config["torch_dtype"] = "float32"
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def seal(path: Path) -> None:
    """Make ``path`` (a file, or a folder and everything in it) ready to be renamed into view: the file,
    or the folder's .safetensors files, get the mode the umask gives new files, and every file reaches the disk. safetensors
    >= 0.8 writes files owner-only (safetensors/safetensors#782), which locks out a web UI or inference
    server running as another user; and without the flush, a power cut soon after the rename can leave
    the published name over empty files, where the previous checkpoint was intact."""
    mask = os.umask(0)
    os.umask(mask)
    files = [path] if path.is_file() else sorted(entry for entry in path.rglob("*") if entry.is_file())
    for file in files:
        if file.suffix == ".safetensors" or file == path:
            os.chmod(file, 0o666 & ~mask)
        _flush_file(file)


def _flush_file(file: Path) -> None:
    """fsync ``file``. Windows flushes a file only through a handle that may write to it (FlushFileBuffers):
    there fsync on a read-only descriptor fails with EBADF, and the file is flushed through a writable one,
    or, where it cannot be opened so, left to the system."""
    descriptor = os.open(file, os.O_RDONLY)
    try:
        os.fsync(descriptor)
        return
    except OSError as error:
        if error.errno != errno.EBADF:
            raise
    finally:
        os.close(descriptor)
    try:
        descriptor = os.open(file, os.O_RDWR | getattr(os, "O_BINARY", 0))
    except OSError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def sync_folder(folder: Path) -> None:
    """Flush ``folder``'s entries (a rename into it) to the disk, where the system allows it."""
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def publish_file(write: Callable[[Path], Path], target_dir: Path) -> Path:
    """Run ``write(folder)`` in a hidden staging folder, then rename the file it returns into
    ``target_dir``: readers never see half a file."""
    staging = Path(target_dir) / ".staging.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        with writing():
            written = Path(write(staging))
        seal(written)
        published = written.replace(Path(target_dir) / written.name)
        sync_folder(Path(target_dir))
        return published
    except WRITE_ERRORS as error:
        raise DreamBoothError(f"could not save to {target_dir} ({write_failure(error)})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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
    sync_folder(target)
    (staging / "model_index.json").replace(target / "model_index.json")
    sync_folder(target)
    staging.rmdir()
