"""Sharing a finished run: the model card (README.md) and the upload to the Hugging Face Hub.

Both work on a finished output folder, after training: ``write_model_card`` describes the run
from what it knew (``CardInfo``), ``push_output`` uploads the folder. Neither is called from
inside the training loop, and ``push_to_hub.py`` pushes a folder again later.

Nothing here may leak a secret or a local path: the card names the base model only by its Hub
id, the uploaded configs name local folders by their last component only, and every error text
passes through ``redact`` before it reaches the user.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path, PureWindowsPath
from typing import Any, Mapping, Optional, Sequence

import yaml

from .errors import DreamBoothError, redact

logger = logging.getLogger(__name__)

# What makes a folder a finished run: a full pipeline, or LoRA weights over a base model.
FINISHED_MARKERS = ("model_index.json", "pytorch_lora_weights.safetensors")

# Licenses of well-known base models, for a base given by Hub id (the Hub itself is not asked).
KNOWN_LICENSES = (
    ("stable-diffusion-v1-5/*", "creativeml-openrail-m"),
    ("runwayml/stable-diffusion-*", "creativeml-openrail-m"),
    ("CompVis/stable-diffusion-*", "creativeml-openrail-m"),
    ("stabilityai/stable-diffusion-2*", "openrail++"),
)

BASE_TAGS = ("text-to-image", "diffusers", "dreambooth", "stable-diffusion", "stable-diffusion-diffusers")

# Not part of a shared model: resumable checkpoints (unless asked), hidden temporary files and
# folders at any depth, generated class images and tracker logs.
CHECKPOINT_PATTERNS = ("checkpoint-*/**",)
ALWAYS_IGNORED = (".*", "*/.*", "class_images/**", "logs/**")

# Uploaded files that record local paths: the saved training config and concepts list, and the diffusers
# and transformers configs (their _name_or_path is the folder the base model was loaded from).
PATH_BEARING_FILES = ("train_config.yaml", "concepts_list.yaml", "model_index.json", "*config.json")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
# How huggingface_hub names a downloaded repo in its cache: .../models--owner--name/snapshots/<sha>/...
_CACHE_PATH = re.compile(r"models--([\w.-]+?)--([\w.-]+)[/\\]snapshots[/\\]")
_PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "feature_extractor", "safety_checker")


@dataclasses.dataclass(frozen=True)
class CardInfo:
    """What a finished run knows about itself, for its model card."""

    base_model: str
    instance_prompt: str
    class_prompt: Optional[str] = None
    # (instance prompt, class prompt) of each concept of a --concepts_list run; default: the two above
    concepts: Sequence[tuple[str, Optional[str]]] = ()
    use_lora: bool = False
    train_text_encoder: bool = False
    max_train_steps: Optional[int] = None
    learning_rate: Optional[float] = None
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    with_prior_preservation: bool = False
    prior_loss_weight: float = 1.0
    resolution: Optional[int] = None
    mixed_precision: Optional[str] = None
    num_processes: int = 1
    rank: Optional[int] = None
    sample_images: Sequence[str] = ()  # grids, one labelled row per prompt (samples/final.png)
    # (prompt, the first image of its row) for each row of the grids, in order; the widget shows these
    prompt_samples: Sequence[tuple[str, str]] = ()
    num_validation_images: Optional[int] = None
    validation_seed: Optional[int] = None
    validation_inference_steps: Optional[int] = None
    validation_scheduler: Optional[str] = None
    hub_model_id: Optional[str] = None
    license: Optional[str] = None


def card_info_from_config(config: Any, **run_facts: Any) -> CardInfo:
    """A CardInfo from a training config (dataclass or dict, e.g. train_config.yaml) plus facts
    only the run knows (``num_processes``, ``mixed_precision``, ``sample_images``, ...)."""
    values = config if isinstance(config, Mapping) else dataclasses.asdict(config)
    names = {field.name for field in dataclasses.fields(CardInfo)}
    info = {name: values[name] for name in names if values.get(name) is not None}
    info["base_model"] = values.get("pretrained_model_name_or_path") or values.get("base_model")
    if values.get("lora_rank") is not None and "rank" not in info:
        info["rank"] = values["lora_rank"]
    info.update(run_facts)
    return CardInfo(**info)


# ---------------------------------------------------------------------------------------------
# Base model: Hub id and license


def _as_hub_id(value: Any) -> str | None:
    """``value`` as an 'owner/name' Hub id, or None when it is (or may be) a local path."""
    if not isinstance(value, str) or not value:
        return None
    cached = _CACHE_PATH.search(value)
    if cached:
        return f"{cached.group(1)}/{cached.group(2)}"
    if not _HUB_ID.match(value) or ".." in value or Path(value).expanduser().exists():
        return None
    if value.rsplit("/", 1)[1] in _PIPELINE_PARTS:  # 'my-model/vae': a subfolder of a local model
        return None
    return value


def _recorded_hub_id(folder: Path) -> str | None:
    """The Hub id a local diffusers folder was loaded from, as its configs recorded it."""
    for name in ("model_index.json", "unet/config.json", "text_encoder/config.json"):
        try:
            recorded = json.loads((folder / name).read_text(encoding="utf-8")).get("_name_or_path")
        except (OSError, ValueError, AttributeError):
            continue
        hub_id = _as_hub_id(recorded)
        if hub_id:
            return hub_id
    return None


def _front_matter(readme: Path) -> dict[str, Any]:
    from huggingface_hub.repocard import metadata_load

    try:
        return metadata_load(readme) or {}
    except (OSError, ValueError, yaml.YAMLError):
        return {}


def known_license(hub_id: str | None) -> str | None:
    if not hub_id:
        return None
    for pattern, license_id in KNOWN_LICENSES:
        if fnmatch.fnmatch(hub_id.lower(), pattern.lower()):
            return license_id
    return None


def describe_base(base_model: str) -> tuple[str | None, dict[str, Any]]:
    """(Hub id of the base or None, its license metadata) without reaching the Hub.

    A local base folder contributes its README.md front matter and the Hub id its configs
    recorded; a Hub id is looked up in KNOWN_LICENSES.
    """
    folder = Path(base_model).expanduser()
    if folder.is_dir():
        hub_id = _recorded_hub_id(folder)
        meta = _front_matter(folder / "README.md") if (folder / "README.md").is_file() else {}
        license_meta = {key: meta[key] for key in ("license", "license_name", "license_link") if meta.get(key)}
    else:
        hub_id, license_meta = _as_hub_id(base_model), {}
    if "license" not in license_meta and known_license(hub_id):
        license_meta = {"license": known_license(hub_id)}
    return hub_id, license_meta


# ---------------------------------------------------------------------------------------------
# Model card


def _relative_sample(output_dir: Path, sample: str | Path) -> str | None:
    """A sample's path relative to the output folder, POSIX style; None (with a warning) when missing."""
    path = Path(sample)
    if path.is_absolute():
        try:
            path = path.resolve().relative_to(output_dir.resolve())
        except ValueError:
            raise DreamBoothError(f"sample image {sample}: not inside the output folder {output_dir}") from None
    if ".." in path.parts:
        raise DreamBoothError(f"sample image {sample}: must be inside the output folder {output_dir}")
    if not (output_dir / path).is_file():
        logger.warning("sample image %s not found in %s; left out of the model card", path.as_posix(), output_dir)
        return None
    return path.as_posix()


def _subjects(info: CardInfo) -> list[tuple[str, str | None]]:
    """(trigger phrase, class prompt) of each concept, the phrase as a user would type it: without
    the ``[filewords]`` placeholder that captions filled in during training. The class prompt is
    None where prior preservation did not use it."""
    from .concepts import trigger_phrase

    concepts = info.concepts or [(info.instance_prompt, info.class_prompt)]
    return [(trigger_phrase(instance_prompt), class_prompt if info.with_prior_preservation else None)
            for instance_prompt, class_prompt in concepts]


def _how_sampled(info: CardInfo) -> str:
    """The validation sampler's settings, as far as the run recorded them."""
    parts = []
    if info.num_validation_images:
        count, seed = info.num_validation_images, info.validation_seed or 0
        seeds = f"seed {seed}" if count == 1 else f"seeds {seed} to {seed + count - 1}"
        parts.append(f"{count} image{'s' if count > 1 else ''} a row ({seeds} in every row)")
    if info.validation_inference_steps:
        parts.append(f"{info.validation_inference_steps} steps of the `{info.validation_scheduler or 'dpm++'}` sampler")
    if info.resolution:
        parts.append(f"{info.resolution}x{info.resolution} px")
    return f": {', '.join(parts)}" if parts else ""


def _samples_section(info: CardInfo, grids: list[str], shown: list[tuple[str, str]]) -> list[str]:
    lines = ["", "## Samples", ""]
    if info.prompt_samples:
        lines += [f"From the final weights, one row per prompt{_how_sampled(info)}. The rows' prompts, top to "
                  "bottom:", ""]
        lines += [f"{number}. `{prompt}`" for number, (prompt, _) in enumerate(info.prompt_samples, 1)]
        lines.append("")
    lines += [f"![{Path(grid).stem}]({grid})" for grid in grids]
    if shown:
        lines += ["", "The widget shows each row's first image with its prompt: "
                  + ", ".join(f"`{image}`" for _, image in shown) + "."]
    return lines


def _snippet(info: CardInfo, phrase: str, repo: str, base_hub_id: str | None) -> str:
    lines = ["```python", "import torch", "from diffusers import StableDiffusionPipeline", ""]
    if info.use_lora:
        base = base_hub_id or "path/to/the-base-model"  # the local base is not named: its path is private
        lines += [f'pipe = StableDiffusionPipeline.from_pretrained("{base}", torch_dtype=torch.float16).to("cuda")',
                  f'pipe.load_lora_weights("{repo}")']
    else:
        lines += [f'pipe = StableDiffusionPipeline.from_pretrained("{repo}", torch_dtype=torch.float16).to("cuda")']
    lines += [f"image = pipe({json.dumps(phrase)}, num_inference_steps=25).images[0]",
              'image.save("sample.png")', "```"]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _settings_table(info: CardInfo, base_name: str, subjects: list[tuple[str, str | None]]) -> str:
    effective_batch = info.train_batch_size * info.gradient_accumulation_steps * info.num_processes
    plural = "s" if len(subjects) > 1 else ""
    rows = [
        ("Base model", base_name),
        ("Method", "LoRA" if info.use_lora else "full fine-tune"),
        (f"Instance prompt{plural}", "; ".join(f"`{phrase}`" for phrase, _ in subjects)),
    ]
    if info.use_lora and info.rank is not None:
        rows.append(("LoRA rank", info.rank))
    rows += [
        ("Text encoder trained", "yes" if info.train_text_encoder else "no"),
        ("Prior preservation", f"yes (weight {info.prior_loss_weight})" if info.with_prior_preservation else "no"),
    ]
    if any(class_prompt for _, class_prompt in subjects):
        rows.append((f"Class prompt{plural}", "; ".join(f"`{class_prompt or '-'}`" for _, class_prompt in subjects)))
    rows += [
        ("Training steps", info.max_train_steps if info.max_train_steps is not None else "-"),
        ("Learning rate", info.learning_rate if info.learning_rate is not None else "-"),
        ("Batch size", f"{info.train_batch_size} x {info.gradient_accumulation_steps} accumulation x "
                       f"{info.num_processes} process(es) = {effective_batch}"),
        ("Resolution", info.resolution if info.resolution is not None else "-"),
        ("Mixed precision", info.mixed_precision or "no"),
    ]
    return "\n".join(["| Setting | Value |", "|---|---|", *(f"| {_cell(k)} | {_cell(v)} |" for k, v in rows)])


def _trigger_lines(subjects: list[tuple[str, str | None]]) -> list[str]:
    if len(subjects) == 1:
        return [f"Trigger phrase: **`{subjects[0][0]}`**. Use it in a prompt to get the subject."]
    return ["Trigger phrases, one per subject; use one in a prompt to get its subject:", "",
            *(f"- **`{phrase}`**" + (f" (class prompt `{class_prompt}`)" if class_prompt else "")
              for phrase, class_prompt in subjects)]


def model_card_text(output_dir: str | Path, info: CardInfo) -> str:
    """The README.md text (YAML metadata and body) for a finished run in ``output_dir``."""
    from huggingface_hub import ModelCardData

    output_dir = Path(output_dir)
    base_hub_id, license_meta = describe_base(info.base_model)
    if info.license:
        license_meta = {"license": info.license}
    grids = [path for path in (_relative_sample(output_dir, grid) for grid in info.sample_images) if path]
    shown = [(prompt, path) for prompt, path in ((prompt, _relative_sample(output_dir, image))
                                                 for prompt, image in info.prompt_samples) if path]
    subjects = _subjects(info)
    repo = info.hub_model_id or output_dir.resolve().name
    tags = [*BASE_TAGS, *(["lora"] if info.use_lora else []), "diffusers-training"]
    data = ModelCardData(
        **license_meta,
        base_model=base_hub_id,
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=tags,
        instance_prompt=subjects[0][0],
        widget=[{"text": prompt, "output": {"url": image}} for prompt, image in shown] or None,
    )
    base_name = f"[{base_hub_id}](https://huggingface.co/{base_hub_id})" if base_hub_id else "a local model"
    what = "LoRA weights for" if info.use_lora else "a full fine-tune of"
    body = [
        f"# DreamBooth {'LoRA ' if info.use_lora else ''}- {repo.rsplit('/', 1)[-1]}",
        "",
        f"{'These are' if info.use_lora else 'This is'} {what} {base_name}, trained with "
        "[DreamBooth](https://dreambooth.github.io/) to learn a new subject.",
        "",
        *_trigger_lines(subjects),
        "",
        "## Use with diffusers",
        "",
        _snippet(info, subjects[0][0], repo, base_hub_id),
        "",
        "## Training settings",
        "",
        _settings_table(info, base_name, subjects),
    ]
    if grids or shown:
        body += _samples_section(info, grids, shown)
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n"


def card_for_repo(text: str, repo_id: str) -> str:
    """A card written for another name (the output folder's, before the repo was chosen) with its
    title and usage snippet naming ``repo_id``; other text is left as it is."""
    name = repo_id.rsplit("/", 1)[-1]
    text = re.sub(r"^(# DreamBooth (?:LoRA )?- ).*$", lambda m: m.group(1) + name, text, count=1, flags=re.M)
    call = "pipe.load_lora_weights" if "pipe.load_lora_weights(" in text else "StableDiffusionPipeline.from_pretrained"
    return re.sub(rf'({re.escape(call)}\()"[^"]*"', lambda m: f'{m.group(1)}"{repo_id}"', text, count=1)


def write_model_card(output_dir: str | Path, info: CardInfo) -> Path:
    """Write ``output_dir/README.md``: Hub metadata, usage snippet, settings and samples."""
    from huggingface_hub import ModelCard

    path = Path(output_dir) / "README.md"
    card = ModelCard(model_card_text(output_dir, info))
    try:
        card.save(path)
    except OSError as error:
        raise DreamBoothError(f"cannot write the model card {path}: {error.strerror or error}") from None
    return path


# ---------------------------------------------------------------------------------------------
# Upload


def check_finished_output(output_dir: str | Path, name: str = "OUTPUT_DIR") -> Path:
    folder = Path(output_dir)
    if not folder.is_dir():
        raise DreamBoothError(f"{name} {output_dir}: no such folder")
    if not any((folder / marker).is_file() for marker in FINISHED_MARKERS):
        raise DreamBoothError(
            f"{name} {output_dir}: not a finished output (no {' or '.join(FINISHED_MARKERS)}); "
            "push a folder after training has saved the model"
        )
    return folder


def ignore_patterns(include_checkpoints: bool = False) -> list[str]:
    return [*ALWAYS_IGNORED, *(() if include_checkpoints else CHECKPOINT_PATTERNS)]


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean 'the push did not happen', whichever HTTP client the Hub library uses."""
    from huggingface_hub.errors import HFValidationError, HfHubHTTPError

    errors: list[type[BaseException]] = [OSError, HfHubHTTPError, HFValidationError]
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _cause(error: BaseException, repo_id: str) -> str:
    """A short reason for a failed push, with a hint where the cause is a common one."""
    from huggingface_hub.errors import LocalTokenNotFoundError, OfflineModeIsEnabled

    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set; unset it to push"
    if isinstance(error, LocalTokenNotFoundError):
        return "no Hugging Face token; pass --hub_token, set HF_TOKEN or run `hf auth login`"
    if status == 401:
        return "the token was refused (401 Unauthorized); check --hub_token, HF_TOKEN or `hf auth login`"
    if status == 403:
        return (f"no write access to {repo_id} (403 Forbidden); check the owner in the name and the token's "
                "write permission")
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _public_path(value: str) -> str:
    """A local path as its last component, a path into the Hub cache as its Hub id, anything else
    (a Hub id, a name, a number) as it is."""
    cached = _CACHE_PATH.search(value)
    if cached:
        return f"{cached.group(1)}/{cached.group(2)}"
    windows = PureWindowsPath(value)
    if windows.drive and windows.root:  # C:\Users\... or \\server\share\...
        return windows.name or value
    path = Path(value).expanduser()
    local = path.is_absolute() or ".." in path.parts or (len(path.parts) > 1 and path.exists())
    return (path.name or value) if local else value


def _without_local_paths(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {name: _without_local_paths(item, str(name)) for name, item in value.items()}
    if isinstance(value, list):
        return [_without_local_paths(item, key) for item in value]
    if isinstance(value, str) and "prompt" not in key:  # a prompt is never a path, whatever it looks like
        return _public_path(value)
    return value


def upload_list(folder: Path, patterns: Sequence[str]) -> list[str]:
    """The files of ``folder`` an upload takes (huggingface_hub's own filter, less ``patterns``),
    as paths in the repo."""
    from huggingface_hub.utils import filter_repo_objects

    names = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    return list(filter_repo_objects(names, ignore_patterns=list(patterns)))


def public_copies(folder: Path, names: Sequence[str]) -> dict[str, bytes]:
    """Those of ``names`` (files of ``folder``) that record local paths, rewritten without them, by
    path in the repo. The folder itself is only read."""
    copies = {}
    for name in names:
        if not any(fnmatch.fnmatch(name, pattern) for pattern in PATH_BEARING_FILES):
            continue
        is_yaml = name.endswith(".yaml")
        try:
            text = (folder / name).read_text(encoding="utf-8")
            recorded = yaml.safe_load(text) if is_yaml else json.loads(text)
        except (OSError, ValueError, yaml.YAMLError):
            logger.warning("%s: not readable as %s; uploaded as it is", name, "YAML" if is_yaml else "JSON")
            continue
        public = _without_local_paths(recorded)
        if public != recorded:
            text = yaml.safe_dump(public, sort_keys=False) if is_yaml else json.dumps(public, indent=2) + "\n"
            copies[name] = text.encode("utf-8")
    return copies


def shell_command(args: Sequence[str]) -> str:
    """``args`` as a command line to paste into a shell: quoted for a POSIX shell, or on Windows for
    cmd.exe and PowerShell, which take double quotes (cmd.exe keeps single quotes as part of the path)."""
    return subprocess.list2cmdline(args) if sys.platform == "win32" else shlex.join(args)


def push_output(output_dir: str | Path, repo_id: str, token: str | None = None, private: bool = False,
                include_checkpoints: bool = False) -> str:
    """Create ``repo_id`` if needed and upload the finished output folder in one commit; return the
    repo URL.

    ``token`` None means huggingface_hub's own choice (HF_TOKEN, then the cached login).
    The folder is only read: the model card renamed for ``repo_id`` and the configs without local
    paths (``public_copies``) go up from memory in place of their files, in the same commit, so the
    repo never holds the model without them. Any failure is one DreamBoothError line without the token.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = check_finished_output(output_dir)
    names = upload_list(folder, ignore_patterns(include_checkpoints))
    contents: dict[str, str | bytes] = {name: str(folder / name) for name in names}
    contents.update(public_copies(folder, names))
    if "README.md" in contents:
        text = (folder / "README.md").read_text(encoding="utf-8")
        contents["README.md"] = card_for_repo(text, repo_id).encode("utf-8")
    api = HfApi()
    try:
        # private=None, not False: a new repo then gets the account's default visibility.
        url = api.create_repo(repo_id, token=token, private=True if private else None, exist_ok=True)
        api.create_commit(repo_id=repo_id, token=token, commit_message="Upload DreamBooth model", operations=[
            CommitOperationAdd(path_in_repo=name, path_or_fileobj=content) for name, content in contents.items()])
    except _network_errors() as error:
        retry = ["python", "push_to_hub.py", str(output_dir), "--hub_model_id", repo_id,
                 *(["--private"] if private else []), *(["--push_checkpoints"] if include_checkpoints else [])]
        message = (
            f"push to the Hub repo {repo_id} failed: {_cause(error, repo_id)}. The local output in {output_dir} is "
            f"complete; retry with: {shell_command(retry)}"
        )
        for secret in (token, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")):
            message = redact(message, secret)
        raise DreamBoothError(re.sub(r"\s*[\r\n]+\s*", " ", message)) from None
    return str(url)


# ---------------------------------------------------------------------------------------------
# push_to_hub.py
