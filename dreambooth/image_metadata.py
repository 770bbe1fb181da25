"""What made an image, written into its PNG text: AUTOMATIC1111's 'parameters' (which the web UIs
and civitai read) and our own fields, one setting each.

Models and LoRAs are named, never located: a Hub id as it is, a local folder or file by its name
alone, so an image shared from a run carries no local path. A LoRA fetched from the Hub is named by
its repo's name, as its downloaded file would be, and our own 'loras' field gives the repo id too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Optional

from PIL import Image
from PIL.PngImagePlugin import PngInfo

_HASH_CHUNK = 1 << 20


def model_label(name: str | Path) -> str:
    """A Hub id as it is; a local folder or file by its name alone."""
    text = str(name)
    path = Path(text).expanduser()
    if path.exists() or path.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1:
        return path.resolve().name
    return text


def lora_name(path: str | Path) -> str:
    """A LoRA's name, as in A1111's <lora:NAME:scale>: a file's stem, or the name of its folder
    for a folder or our default weights file inside one."""
    from .lora import LORA_WEIGHTS

    path = Path(path).resolve()
    if path.is_dir() or path.name == LORA_WEIGHTS:
        return (path if path.is_dir() else path.parent).name
    return path.stem


def lora_hash(file: str | Path) -> str:
    """A LoRA file's short hash as A1111 writes it in 'Lora hashes' (and civitai lists as AutoV3):
    the first 12 hex digits of the sha256 of a .safetensors file's tensor data, after its JSON
    header (kohya's hash, so editing the file's metadata keeps it), or of a whole file in another
    format."""
    file = Path(file)
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        if file.suffix.lower() == ".safetensors":
            handle.seek(8 + int.from_bytes(handle.read(8), "little"))
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


@dataclasses.dataclass(frozen=True)
class LoraUse:
    """One LoRA over the model: its name, strength and A1111 short hash, and the Hub repo it came from,
    with the revision asked for (--lora_revision; none for the main branch)."""

    name: str
    scale: float
    hash: str
    repo: Optional[str] = None
    revision: Optional[str] = None

    @classmethod
    def of(cls, path: str | Path, scale: float, repo_id: str | None = None, revision: str | None = None) -> LoraUse:
        """The LoRA at ``path``: a local file or folder, or the cached snapshot of the Hub repo ``repo_id``
        at ``revision``, hashed alike (the snapshot's file is the repo's file)."""
        from .lora import LORA_WEIGHTS

        path = Path(path)
        name = repo_id.rsplit("/", 1)[-1] if repo_id else lora_name(path)
        return cls(name, float(scale), lora_hash(path / LORA_WEIGHTS if path.is_dir() else path), repo_id, revision)


@dataclasses.dataclass(frozen=True)
class Weights:
    """The weights that made an image, by name."""

    model: str  # A1111's 'Model': the base model, or the checkpoint of a full fine-tune
    base_model: str
    dtype: str  # fp32, fp16 or bf16
    checkpoint: Optional[str] = None
    loras: tuple[LoraUse, ...] = ()


@dataclasses.dataclass(frozen=True)
class Sampling:
    """The settings that made one image."""

    prompt: str
    seed: int
    width: int
    height: int
    steps: int
    guidance_scale: float
    scheduler: str  # our name, e.g. dpm++
    negative_prompt: Optional[str] = None


def _a1111_name(name: str) -> str:
    # A1111 drops these from LoRA names: its infotext parser splits on them.
    return name.replace(":", "").replace(",", "")


def _quote(value) -> str:
    """A value as A1111 writes it: JSON-quoted when it holds a comma, a colon or a newline."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(mark in text for mark in ",:\n") else text


def parameters_text(sampling: Sampling, weights: Weights) -> str:
    """A1111's 'parameters': the prompt, with each LoRA as <lora:name:scale> as A1111 prompts
    carry them, a 'Negative prompt:' line, then 'Steps: ..., Sampler: ..., ..., Lora hashes: ...'."""
    from .generation import SCHEDULERS

    prompt = " ".join([sampling.prompt, *(f"<lora:{_a1111_name(lora.name)}:{lora.scale:g}>" for lora in weights.loras)])
    settings = {"Steps": sampling.steps, "Sampler": SCHEDULERS[sampling.scheduler][2],
                "CFG scale": sampling.guidance_scale, "Seed": sampling.seed,
                "Size": f"{sampling.width}x{sampling.height}", "Model": weights.model}
    if weights.loras:
        settings["Lora hashes"] = ", ".join(f"{_a1111_name(lora.name)}: {lora.hash}" for lora in weights.loras)
    negative = [f"Negative prompt: {sampling.negative_prompt}"] if sampling.negative_prompt else []
    return "\n".join([prompt, *negative, ", ".join(f"{key}: {_quote(value)}" for key, value in settings.items())])


def metadata_fields(sampling: Sampling, weights: Weights) -> dict[str, str]:
    """Every PNG text field of an image: 'parameters', then one field per setting."""
    fields = {"parameters": parameters_text(sampling, weights), "prompt": sampling.prompt}
    if sampling.negative_prompt:
        fields["negative_prompt"] = sampling.negative_prompt
    fields.update(seed=sampling.seed, steps=sampling.steps, guidance_scale=sampling.guidance_scale,
                  scheduler=sampling.scheduler, width=sampling.width, height=sampling.height,
                  model=weights.model, base_model=weights.base_model, dtype=weights.dtype)
    if weights.checkpoint:
        fields["checkpoint"] = weights.checkpoint
    if weights.loras:
        fields["loras"] = json.dumps([{key: value for key, value in dataclasses.asdict(lora).items()
                                       if value is not None} for lora in weights.loras])
    return {key: str(value) for key, value in fields.items()}


def png_metadata(sampling: Sampling, weights: Weights) -> PngInfo:
    info = PngInfo()
    for key, value in metadata_fields(sampling, weights).items():
        info.add_text(key, value)
    return info


def recorded_prompt(path: str | Path) -> Optional[str]:
    """The prompt an image's PNG text records, as ours write it; None for an image without one
    (a photo, say). Only the chunks before the pixel data are read."""
    try:
        with Image.open(path) as image:
            prompt = image.info.get("prompt")
    except (OSError, ValueError, SyntaxError):
        return None
    return prompt if isinstance(prompt, str) else None
