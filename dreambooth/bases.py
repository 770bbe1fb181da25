"""What a base model must be, checked once at start by every script that loads one.

The suite trains and samples Stable Diffusion 1.x/2.x text-to-image pipelines in diffusers format:
a folder (or Hub repo) with model_index.json and the unet/, vae/, text_encoder/, tokenizer/ and
scheduler/ it names, the UNet taking the VAE's 4 latent channels and nothing else. Anything else
that users pass there (an SDXL, inpainting, SD3 or Flux model, a single-file checkpoint, a LoRA run,
a training checkpoint, a half-copied folder) would load for minutes and then fail at a tensor shape
or a missing key, or worse, train; it stops here with one line saying what to pass instead.

A single .safetensors/.ckpt file is refused rather than converted on the fly: diffusers'
``from_single_file`` fetches the diffusers configs of the matching Hub model (offline, only if that
repo is cached or given as ``config=``), and every script here, as well as the end of a training
run, loads the base again by component, so it would convert 2-4 GB each time. Converting once
gives a folder every script and every diffusers tool loads.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from .checkpoints import MARKER as CHECKPOINT_MARKER
from .config import TRAIN_CONFIG as RUN_CONFIG
from .errors import DreamBoothError, first_reason
from .lora import LORA_WEIGHTS

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
# The pipeline components the suite loads (a safety checker or feature extractor is never loaded).
LOADED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHTED = ("unet", "vae", "text_encoder")
LATENT_CHANNELS = 4
SUPPORTED = ("the suite handles Stable Diffusion 1.x/2.x text-to-image models only, such as "
             "stable-diffusion-v1-5/stable-diffusion-v1-5 or stabilityai/stable-diffusion-2-1")


def check_base_model(source: str, flag: str = "--pretrained_model_name_or_path", revision: str | None = None,
                     variant: str | None = None, takes_lora: bool = False) -> None:
    """Refuse, with one line naming ``flag`` and what to pass instead, a ``source`` that is not a
    Stable Diffusion 1.x/2.x pipeline. A local folder or file is looked at on disk; a Hub id's
    model_index.json and UNet config are read from the Hub (or the cache, offline), and where they
    cannot be fetched the check is left to the loading, which says why. ``takes_lora``: the script
    has a --lora flag, which a LoRA run's folder belongs to."""
    from .models import check_model_source

    path = Path(source).expanduser()
    named = f"{flag} {source}"
    if path.is_file():
        raise DreamBoothError(f"{named}: {_single_file_advice(path)}")
    if not path.is_dir():
        check_model_source(source, flag)
        index = _hub_json(source, "model_index.json", revision)
        if index is not None:
            unet = _hub_json(source, "unet/config.json", revision) if _names(index, "unet") else None
            check_pipeline(named, index, unet)
        return
    if not (path / "model_index.json").is_file():
        raise DreamBoothError(f"{named}: {_not_a_pipeline(path, flag, takes_lora)}")
    index = _read_json(path / "model_index.json", named)
    for name in LOADED:
        if _names(index, name) and not (path / name).is_dir():
            raise DreamBoothError(f"{named}: model_index.json names {name}, but the folder has no {name}/ "
                                  "(an incomplete download or copy?); download or copy the whole model again")
    unet_config = path / "unet" / "config.json"
    check_pipeline(named, index, _read_json(unet_config, named) if unet_config.is_file() else None)
    for name in WEIGHTED:
        problem = _weights_problem(path / name, variant)
        if problem:
            raise DreamBoothError(f"{named}: {name}/ {problem}")


_PIPELINE_AS_LORA = "a full pipeline, not LoRA weights; pass it as --pretrained_model_name_or_path"


def check_lora_source(source: str, flag: str, revision: str | None = None) -> Path:
    """A LoRA is a .safetensors file, or a folder holding pytorch_lora_weights.safetensors (a LoRA run or
    its checkpoint), or a Hub repo holding that file (a LoRA run uploaded by push_to_hub.py), at
    ``revision`` (a branch, tag or commit; the main branch by default); a pipeline folder or repo given
    there is a base model. Returns the local file or folder: ``source`` itself, or the cached snapshot of
    the repo."""
    path = Path(source)
    if not path.exists():
        if not _reads_as_hub_id(source):
            raise DreamBoothError(f"{flag} {source}: no such file or folder, and not a Hub id like 'owner/name'")
        return hub_lora_folder(source, flag, revision)
    if revision:
        raise DreamBoothError(f"{flag}_revision {revision} for {flag} {source}, a local "
                              f"{'folder' if path.is_dir() else 'file'}: only a Hub repo has revisions (drop it, or "
                              f"give one {flag}_revision per {flag} with '' for a local one)")
    if path.is_dir() and not (path / LORA_WEIGHTS).is_file():
        if (path / "model_index.json").is_file():
            raise DreamBoothError(f"{flag} {source}: {_PIPELINE_AS_LORA}")
        raise DreamBoothError(f"{flag} {source}: the folder has no {LORA_WEIGHTS}; give a LoRA run's output "
                              "folder or a LoRA .safetensors file")
    return path


def _reads_as_hub_id(source: str) -> bool:
    """'owner/name' as check_model_source takes a Hub id; a LoRA repo always has an owner, and a name
    ending in .safetensors is a local file that is missing."""
    from .models import check_model_source

    if "/" not in source or source.lower().endswith(SINGLE_FILE_SUFFIXES):
        return False
    try:
        check_model_source(source, "--lora")
    except DreamBoothError:
        return False
    return True


def hub_lora_folder(repo_id: str, flag: str, revision: str | None = None) -> Path:
    """The cached snapshot of a LoRA repo at ``revision``, holding its pytorch_lora_weights.safetensors
    (and the run's train_config.yaml where it has one), fetched once per process, as diffusers'
    ``load_lora_weights`` reads a repo id. A repo without that file is refused with one line."""
    from huggingface_hub import constants

    return _fetch_hub_lora(repo_id, flag, revision, constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE)


@functools.lru_cache(maxsize=None)
def _fetch_hub_lora(repo_id: str, flag: str, revision: str | None, cache_dir: str, offline: bool) -> Path:
    from huggingface_hub import snapshot_download

    try:
        # model_index.json only tells a pipeline repo given here: its weights are never fetched.
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                        allow_patterns=[LORA_WEIGHTS, RUN_CONFIG, "model_index.json"]))
    except (OSError, ValueError) as error:
        raise DreamBoothError(_hub_lora_failure(error, repo_id, flag, revision)) from None
    if (folder / LORA_WEIGHTS).is_file():
        return folder
    if (folder / "model_index.json").is_file():
        raise DreamBoothError(f"{flag} {repo_id}: {_PIPELINE_AS_LORA}")
    cached = (f" in the Hugging Face cache (offline: if the repo has it, fetch it with `hf download {repo_id}`)"
              if offline else "")
    raise DreamBoothError(f"{flag} {repo_id}: the repo has no {LORA_WEIGHTS}{cached}; give a LoRA run's repo "
                          "(as push_to_hub.py uploads it) or a local LoRA .safetensors file")


def _hub_lora_failure(error: BaseException, repo_id: str, flag: str, revision: str | None) -> str:
    """Why a LoRA repo could not be fetched, in one line (``hub_failure``'s, for a LoRA repo): a
    revision it lacks names the revision flag; a repo the Hub (or, offline, the cache) does not
    have is said beside the missing local file or folder, so a mistyped path shows."""
    from .models import hub_failure

    reason = hub_failure(error, repo_id, revision, revision_flag=f"{flag}_revision", thing="repo",
                         local="file or folder")
    if reason and reason.startswith(f"{flag}_revision "):
        return reason
    return f"{flag} {repo_id}: {reason or first_reason(error)}"


def _weights_problem(folder: Path, variant: str | None) -> str | None:
    """What keeps a component's weights from loading with ``variant``: none at all, or only other variants'
    (a download of the fp16 files alone). Names: 'model.safetensors', 'model-00001-of-00002.safetensors'
    (a shard), 'model.fp16.safetensors', 'model.fp16-00001-of-00002.safetensors'."""
    names = [file.name for file in folder.iterdir() if file.suffix in (".safetensors", ".bin")]
    if not names:
        return ("holds no weights (.safetensors or .bin; an incomplete download or copy?); download or copy "
                "the whole model again")
    found = sorted({name.split(".")[1].split("-")[0] for name in names if name.count(".") == 2})
    if any(name.count(".") == 1 for name in names) or variant in found:
        return None
    return f"holds only {', '.join(found)} weights ({names[0]}); pass --variant {found[0]}"


def check_pipeline(named: str, index: dict, unet: dict | None) -> None:
    """A model_index.json (and the UNet's config, where known) of a Stable Diffusion 1.x/2.x pipeline."""
    class_name = index.get("_class_name") or "an unnamed pipeline"
    if not _names(index, "unet"):
        kind = ("a transformer-based model (SD3, Flux, PixArt...)" if _names(index, "transformer")
                else "not Stable Diffusion")
        raise DreamBoothError(f"{named}: {kind}, its model_index.json names {class_name} with no unet; {SUPPORTED}")
    is_xl = "XL" in class_name or _names(index, "text_encoder_2") or bool((unet or {}).get("addition_embed_type"))
    if is_xl:
        raise DreamBoothError(f"{named}: an SDXL model ({class_name}: two text encoders, a UNet with extra "
                              f"conditioning); {SUPPORTED}")
    missing = [name for name in LOADED if not _names(index, name)]
    if missing:
        raise DreamBoothError(f"{named}: {class_name} has no {', '.join(missing)}, not a Stable Diffusion pipeline; "
                              f"{SUPPORTED}")
    channels = (unet or {}).get("in_channels", LATENT_CHANNELS)
    if channels != LATENT_CHANNELS:
        kind = ("an inpainting model" if channels == 9
                else "an image-conditioned model (depth-to-image, instruct-pix2pix, upscaler...)")
        raise DreamBoothError(f"{named}: {kind}, its UNet takes {channels} input channels, not the "
                              f"{LATENT_CHANNELS} of text-to-image; {SUPPORTED}")
    if (unet or {}).get("class_embed_type"):
        raise DreamBoothError(f"{named}: {class_name}, its UNet wants an image embedding besides the text "
                              f"(class_embed_type {unet['class_embed_type']}, as unCLIP models do); {SUPPORTED}")


def _not_a_pipeline(folder: Path, flag: str, takes_lora: bool) -> str:
    """Why a folder without model_index.json is not a base, and what to pass instead."""
    if (folder / LORA_WEIGHTS).is_file():
        base = _recorded_base(folder)
        what = "a LoRA checkpoint" if (folder / CHECKPOINT_MARKER).is_file() else "a LoRA run's output"
        over = f"its base model ({base})" if base else "the base model it was trained on"
        use = (f"pass {over} as {flag} and this folder as --lora" if takes_lora
               else f"pass {over} as {flag}; infer.py and evaluate.py take this folder as --lora over it")
        return f"{what} (adapters only), not a base model: {use}"
    if (folder / CHECKPOINT_MARKER).is_file() or ((folder / "unet").is_dir() and folder.name.startswith("checkpoint-")):
        return ("a training checkpoint (only the trained weights), not a base model: sample it with "
                "infer.py --checkpoint, continue its run with --resume_from_checkpoint, or pass the run's finished "
                "output folder")
    if (folder / RUN_CONFIG).is_file():
        return ("a training run's output without its final model (the run did not finish): continue it with "
                "--resume_from_checkpoint latest, or sample a checkpoint with infer.py --checkpoint")
    if (folder.parent / "model_index.json").is_file():
        return f"one component of the pipeline in {folder.parent}; pass that folder"
    files = sorted(file for file in folder.iterdir() if file.suffix in SINGLE_FILE_SUFFIXES and file.is_file())
    if files:
        return f"folder has no model_index.json but holds {files[0].name}: {_single_file_advice(files[0])}"
    return "folder has no model_index.json (not a diffusers pipeline folder); pass a diffusers folder or a Hub id"


def _single_file_advice(file: Path) -> str:
    if file.suffix == ".safetensors" and _is_lora_file(file):
        return ("a LoRA file, not a base model: pass the base model it was trained on, and this file as "
                "infer.py's --lora")
    return ("a single-file checkpoint; the base must be a diffusers folder or Hub id: convert it once with "
            "python -c \"from diffusers import StableDiffusionPipeline as P; "
            f"P.from_single_file('{file}').save_pretrained('{file.with_suffix('')}-diffusers')\" and pass that folder")


def _is_lora_file(file: Path) -> bool:
    """A LoRA's keys name their adapters (lora_A/lora_B, lora_down/lora_up); a checkpoint's never do."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as opened:
            return any("lora" in key for key in opened.keys())
    except (SafetensorError, OSError):
        return False


def _recorded_base(folder: Path) -> str | None:
    """The base model a run recorded in its train_config.yaml (beside it, or in the run above a checkpoint)."""
    import yaml

    for config in (folder / RUN_CONFIG, folder.parent / RUN_CONFIG):
        if config.is_file():
            try:
                return (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("pretrained_model_name_or_path")
            except (yaml.YAMLError, UnicodeDecodeError, AttributeError):
                return None
    return None


def _names(index: dict, name: str) -> bool:
    """model_index.json lists ``name`` as a component (``[null, null]`` is an optional one left out)."""
    entry = index.get(name)
    return isinstance(entry, list) and any(entry)


def _read_json(file: Path, named: str) -> dict:
    try:
        loaded = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, OSError) as error:
        raise DreamBoothError(f"{named}: cannot read {file.name} ({error}); download or copy the model again") from None
    if not isinstance(loaded, dict):
        raise DreamBoothError(f"{named}: {file.name} is not a JSON object; download or copy the model again")
    return loaded


def _hub_json(repo_id: str, filename: str, revision: str | None) -> dict | None:
    """A small JSON file of a Hub repo, from the cache or the Hub; None where it cannot be had."""
    from huggingface_hub import hf_hub_download

    try:
        loaded = json.loads(Path(hf_hub_download(repo_id, filename, revision=revision)).read_text(encoding="utf-8"))
    except Exception:  # the loading that follows reports a Hub failure with its reason
        return None
    return loaded if isinstance(loaded, dict) else None
