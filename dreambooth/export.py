"""Export a training run as one .safetensors file for Stable Diffusion web UIs.

AUTOMATIC1111, ComfyUI and InvokeAI load single files in the original (CompVis/Stability)
layout, not diffusers folders. A full fine-tune becomes one checkpoint with the UNet under
``model.diffusion_model.``, the VAE under ``first_stage_model.`` and the text encoder under
``cond_stage_model.`` (SD 1.x CLIP or SD 2.x OpenCLIP names). A LoRA run becomes a kohya-style
LoRA (``lora_unet_*`` / ``lora_te_*`` with ``lora_down``, ``lora_up`` and ``alpha``).

diffusers ships only the original -> diffusers direction (``diffusers.loaders.single_file_utils``);
the maps here are its inverse, built from the model configs, so any number of blocks,
layers per block and attention placement converts, not only the 4-block SD UNet.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import yaml

from .config import TRAIN_CONFIG
from .errors import DreamBoothError
from .lora import LORA_WEIGHTS

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
# What single-file loaders assume, since they read no metadata: diffusers' from_single_file and ComfyUI
# go by the architecture alone, SD 1.x as epsilon and SD 2.x as the 768 v-prediction model.
ASSUMED_PREDICTION = {"1.x": "epsilon", "2.x": "v"}


def resolve_format(output_dir: Path, requested: str) -> str:
    """Check that ``output_dir`` holds what ``requested`` exports; ``auto`` picks by content."""
    is_pipeline = (output_dir / "model_index.json").is_file()
    is_lora = (output_dir / LORA_WEIGHTS).is_file()
    if requested == "auto":
        if is_pipeline and is_lora:
            raise DreamBoothError(
                f"OUTPUT_DIR {output_dir}: holds both a pipeline and LoRA weights; pass --format sd or --format kohya"
            )
        requested = "sd" if is_pipeline else "kohya"
    if (requested == "sd" and is_pipeline) or (requested == "kohya" and is_lora):
        return requested
    if requested == "sd" and is_lora:
        raise DreamBoothError("a LoRA run has no full weights to export; use --format kohya")
    if requested == "kohya" and is_pipeline:
        raise DreamBoothError(
            f"OUTPUT_DIR {output_dir}: a full fine-tune has no LoRA weights ({LORA_WEIGHTS}); use --format sd"
        )
    raise DreamBoothError(
        f"OUTPUT_DIR {output_dir}: neither a diffusers pipeline folder (model_index.json) nor a LoRA run "
        f"({LORA_WEIGHTS}); give the --output_dir of a finished training run"
    )


@dataclasses.dataclass(frozen=True)
class Exported:
    path: Path
    format: str
    dtype: str
    num_tensors: int


def export_run(cfg) -> Exported:
    """Convert the run in ``cfg.output_dir`` and write ``cfg.output`` (atomically)."""
    folder, output = Path(cfg.output_dir), Path(cfg.output)
    fmt = cfg.resolved_format()
    check_not_a_source(output, folder, fmt)
    if fmt == "sd":
        state_dict, metadata = pipeline_to_original(folder)
        warn_if_prediction_is_guessed_wrong(metadata, output)
        precision = cfg.precision or "fp16"
    else:
        state_dict, metadata = lora_to_kohya(folder / LORA_WEIGHTS, read_run_config(folder))
        metadata["ss_output_name"] = output.stem
        precision = cfg.precision
    if precision:
        state_dict = cast_state_dict(state_dict, DTYPES[precision])
    save_safetensors_atomically(state_dict, output, metadata, overwrite=cfg.overwrite)
    dtypes = sorted({str(tensor.dtype).removeprefix("torch.") for tensor in state_dict.values()})
    return Exported(output, fmt, "/".join(dtypes), len(state_dict))


def check_not_a_source(output: Path, folder: Path, fmt: str) -> None:
    """Refuse an ``--output`` that would replace one of the files the export reads."""
    names = [LORA_WEIGHTS] if fmt == "kohya" else ["unet", "vae", "text_encoder"]
    target = output.resolve()
    for name in names:
        source = (folder / name).resolve()
        if target == source or source in target.parents:
            raise DreamBoothError(f"--output {output}: would overwrite the run's own {name}, which the export "
                                  "reads; choose another file")


def warn_if_prediction_is_guessed_wrong(metadata: dict[str, str], output: Path) -> None:
    """An SD 1.x v-prediction or SD 2.x epsilon (512 base) model is read wrongly by loaders that guess."""
    prediction = metadata["modelspec.prediction_type"]
    version = "1.x" if metadata["modelspec.architecture"] == "stable-diffusion-v1" else "2.x"
    if prediction == ASSUMED_PREDICTION[version]:
        return
    logger.warning(
        "%s predicts %s, but single-file loaders assume %s for an SD %s model: load it with "
        "StableDiffusionPipeline.from_single_file(path, config=<this run's folder>), choose %s in ComfyUI's "
        "ModelSamplingDiscrete node, or put a matching .yaml beside it for AUTOMATIC1111",
        output.name, prediction, ASSUMED_PREDICTION[version], version, prediction)


# --- Full fine-tune: diffusers pipeline -> original checkpoint -------------------------------------


class _Target(NamedTuple):
    """Where a diffusers module goes in the original layout, and how its children are renamed."""

    name: str
    children: tuple[tuple[str, str], ...] = ()
    linear_to_conv: bool = False  # the original VAE attention uses 1x1 convolutions


_UNET_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
_VAE_RESNET = (("conv_shortcut", "nin_shortcut"),)
_VAE_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))
_DOWN_BLOCKS = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_UP_BLOCKS = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}


def _per_block(value, blocks: int, what: str) -> list[int]:
    values = [value] * blocks if isinstance(value, int) else list(value)
    if len(values) != blocks:
        raise DreamBoothError(f"UNet config: {what} has {len(values)} entries for {blocks} blocks")
    return values


def unet_module_map(config) -> dict[str, _Target]:
    """diffusers UNet2DConditionModel module -> LDM ``openaimodel.UNetModel`` module, from the config.

    The inverse of ``convert_ldm_unet_checkpoint``: input_blocks count resnets (with their
    attention at index 1) and downsamplers in order after conv_in; output_blocks count
    layers_per_block + 1 resnets per up block, the upsampler after the attention if any.
    """
    down_types, up_types = list(config["down_block_types"]), list(config["up_block_types"])
    for block_type in down_types + up_types + [config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"]:
        if block_type not in {**_DOWN_BLOCKS, **_UP_BLOCKS, "UNetMidBlock2DCrossAttn": True}:
            raise DreamBoothError(f"UNet block type {block_type} has no original SD layout; cannot export")
    layers = _per_block(config["layers_per_block"], len(down_types), "layers_per_block")
    modules = {
        "time_embedding.linear_1": _Target("time_embed.0"), "time_embedding.linear_2": _Target("time_embed.2"),
        "conv_in": _Target("input_blocks.0.0"), "conv_norm_out": _Target("out.0"), "conv_out": _Target("out.2"),
        "mid_block.resnets.0": _Target("middle_block.0", _UNET_RESNET),
        "mid_block.attentions.0": _Target("middle_block.1"),
        "mid_block.resnets.1": _Target("middle_block.2", _UNET_RESNET),
    }
    for embedding in ("class_embedding", "add_embedding"):  # label_emb of class-conditioned and SDXL UNets
        modules[f"{embedding}.linear_1"] = _Target("label_emb.0.0")
        modules[f"{embedding}.linear_2"] = _Target("label_emb.0.2")
    index = 1
    for block, block_type in enumerate(down_types):
        for layer in range(layers[block]):
            modules[f"down_blocks.{block}.resnets.{layer}"] = _Target(f"input_blocks.{index}.0", _UNET_RESNET)
            if _DOWN_BLOCKS[block_type]:
                modules[f"down_blocks.{block}.attentions.{layer}"] = _Target(f"input_blocks.{index}.1")
            index += 1
        if block < len(down_types) - 1:
            modules[f"down_blocks.{block}.downsamplers.0.conv"] = _Target(f"input_blocks.{index}.0.op")
            index += 1
    index = 0
    for block, (block_type, block_layers) in enumerate(zip(up_types, reversed(layers))):
        attention = _UP_BLOCKS[block_type]
        for layer in range(block_layers + 1):
            modules[f"up_blocks.{block}.resnets.{layer}"] = _Target(f"output_blocks.{index}.0", _UNET_RESNET)
            if attention:
                modules[f"up_blocks.{block}.attentions.{layer}"] = _Target(f"output_blocks.{index}.1")
            if layer == block_layers and block < len(up_types) - 1:
                upsampler = f"output_blocks.{index}.{2 if attention else 1}.conv"
                modules[f"up_blocks.{block}.upsamplers.0.conv"] = _Target(upsampler)
            index += 1
    return modules


def vae_module_map(config) -> dict[str, _Target]:
    """diffusers AutoencoderKL module -> LDM ``AutoencoderKL`` module (decoder up blocks run in reverse)."""
    blocks = len(config["block_out_channels"])
    modules = {"quant_conv": _Target("quant_conv"), "post_quant_conv": _Target("post_quant_conv")}
    for part in ("encoder", "decoder"):
        modules.update({
            f"{part}.conv_in": _Target(f"{part}.conv_in"), f"{part}.conv_out": _Target(f"{part}.conv_out"),
            f"{part}.conv_norm_out": _Target(f"{part}.norm_out"),
            f"{part}.mid_block.resnets.0": _Target(f"{part}.mid.block_1", _VAE_RESNET),
            f"{part}.mid_block.resnets.1": _Target(f"{part}.mid.block_2", _VAE_RESNET),
            f"{part}.mid_block.attentions.0": _Target(f"{part}.mid.attn_1", _VAE_ATTENTION, linear_to_conv=True),
        })
    for block in range(blocks):
        for layer in range(config["layers_per_block"]):
            modules[f"encoder.down_blocks.{block}.resnets.{layer}"] = _Target(
                f"encoder.down.{block}.block.{layer}", _VAE_RESNET)
        modules[f"encoder.down_blocks.{block}.downsamplers.0.conv"] = _Target(f"encoder.down.{block}.downsample.conv")
        original = blocks - 1 - block
        for layer in range(config["layers_per_block"] + 1):
            modules[f"decoder.up_blocks.{block}.resnets.{layer}"] = _Target(
                f"decoder.up.{original}.block.{layer}", _VAE_RESNET)
        modules[f"decoder.up_blocks.{block}.upsamplers.0.conv"] = _Target(f"decoder.up.{original}.upsample.conv")
    return modules


def rename_state_dict(state_dict: dict[str, torch.Tensor], modules: dict[str, _Target], prefix: str,
                      what: str) -> dict[str, torch.Tensor]:
    """Apply a module map to every key (the longest mapped module prefix wins); unmapped keys are an error."""
    converted, unmapped = {}, []
    for key, tensor in state_dict.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            target = modules.get(".".join(parts[:cut]))
            if target is not None:
                break
        else:
            unmapped.append(key)
            continue
        rest = ".".join(parts[cut:])
        for old, new in target.children:
            if rest.startswith(old + "."):
                rest = new + rest[len(old):]
                break
        if target.linear_to_conv and rest.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        converted[f"{prefix}{target.name}.{rest}"] = tensor
    if unmapped:
        raise DreamBoothError(
            f"the {what} has {len(unmapped)} weight(s) with no original SD name, e.g. {unmapped[0]}; cannot export"
        )
    return converted


def unet_to_original(state_dict: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    return rename_state_dict(state_dict, unet_module_map(config), UNET_PREFIX, "UNet")


def vae_to_original(state_dict: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    return rename_state_dict(state_dict, vae_module_map(config), VAE_PREFIX, "VAE")


def text_encoder_layout(config) -> str:
    """``clip`` (SD 1.x: OpenAI CLIP ViT-L, quick_gelu) or ``open_clip`` (SD 2.x: OpenCLIP ViT-H, gelu)."""
    activation = getattr(config, "hidden_act", None)
    if activation == "quick_gelu":
        return "clip"
    if activation == "gelu":
        return "open_clip"
    raise DreamBoothError(
        f"text encoder with hidden_act {activation}: neither SD 1.x CLIP nor SD 2.x OpenCLIP; cannot export")


def text_encoder_to_original(state_dict: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel -> ``cond_stage_model.`` keys of SD 1.x (CLIP) or SD 2.x (OpenCLIP)."""
    # transformers >= 5.6 flattened CLIPTextModel: its keys lost the ``text_model.`` level.
    state_dict = {key.removeprefix("text_model."): tensor for key, tensor in state_dict.items()}
    if text_encoder_layout(config) == "clip":
        return {f"{CLIP_PREFIX}text_model.{key}": tensor for key, tensor in state_dict.items()}
    return _open_clip_state_dict(state_dict, config.num_hidden_layers)


_OPEN_CLIP_LAYER = (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                    ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"))


def _open_clip_state_dict(state_dict: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """The inverse of diffusers' ``convert_open_clip_checkpoint``: q, k, v are one in_proj in OpenCLIP."""
    source = dict(state_dict)
    converted = {
        f"{OPEN_CLIP_PREFIX}token_embedding.weight": source.pop("embeddings.token_embedding.weight"),
        f"{OPEN_CLIP_PREFIX}positional_embedding": source.pop("embeddings.position_embedding.weight"),
        f"{OPEN_CLIP_PREFIX}ln_final.weight": source.pop("final_layer_norm.weight"),
        f"{OPEN_CLIP_PREFIX}ln_final.bias": source.pop("final_layer_norm.bias"),
    }
    for layer in range(num_layers):
        old, new = f"encoder.layers.{layer}.", f"{OPEN_CLIP_PREFIX}transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            converted[f"{new}attn.in_proj_{kind}"] = torch.cat(
                [source.pop(f"{old}self_attn.{name}_proj.{kind}") for name in "qkv"]
            )
            for old_name, new_name in _OPEN_CLIP_LAYER:
                converted[f"{new}{new_name}.{kind}"] = source.pop(f"{old}{old_name}.{kind}")
    if source:
        raise DreamBoothError(
            f"the text encoder has weights with no OpenCLIP name, e.g. {next(iter(source))}; cannot export")
    return converted


def pipeline_to_original(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All weights of a diffusers StableDiffusionPipeline folder as one original-layout state dict."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from .models import load_pretrained

    components = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    for name in ("unet", "vae", "text_encoder"):
        if not (folder / name).is_dir():
            raise DreamBoothError(f"OUTPUT_DIR {folder}: pipeline has no {name}/ folder; cannot export a checkpoint")
    if components.get("text_encoder_2") or "XL" in components.get("_class_name", ""):
        raise DreamBoothError(f"OUTPUT_DIR {folder}: SDXL pipelines are not supported yet; only SD 1.x/2.x")
    text_class = (components.get("text_encoder") or [None, None])[1]
    if text_class != "CLIPTextModel":
        raise DreamBoothError(
            f"OUTPUT_DIR {folder}: text encoder {text_class} is not supported yet; only CLIPTextModel")
    source = str(folder)
    unet = load_pretrained("UNet", UNet2DConditionModel.from_pretrained, source, subfolder="unet")
    vae = load_pretrained("VAE", AutoencoderKL.from_pretrained, source, subfolder="vae")
    text_encoder = load_pretrained("text encoder", CLIPTextModel.from_pretrained, source, subfolder="text_encoder")
    state_dict = {
        **unet_to_original(unet.state_dict(), unet.config),
        **vae_to_original(vae.state_dict(), vae.config),
        **text_encoder_to_original(text_encoder.state_dict(), text_encoder.config),
    }
    image_size = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    return state_dict, _checkpoint_metadata(folder, text_encoder_layout(text_encoder.config), image_size)


def _checkpoint_metadata(folder: Path, layout: str, image_size: int) -> dict[str, str]:
    """A few ModelSpec fields (what Stability's and kohya's tools write) so UIs can tell what the file is."""
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(scheduler_file.read_text(encoding="utf-8")) if scheduler_file.is_file() else {}
    prediction = "v" if scheduler.get("prediction_type") == "v_prediction" else "epsilon"
    if layout == "clip":
        architecture = "stable-diffusion-v1"
    else:
        architecture = "stable-diffusion-v2-768-v" if prediction == "v" else "stable-diffusion-v2-512"
    return {
        "format": "pt",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture,
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.prediction_type": prediction,
        "modelspec.title": folder.resolve().name,
        "modelspec.resolution": f"{image_size}x{image_size}",
    }


# --- LoRA: diffusers LoRA file -> kohya / AUTOMATIC1111 LoRA --------------------------------------


def read_run_config(folder: Path) -> dict:
    """The run's train_config.yaml as a dict ({} when there is none)."""
    path = folder / TRAIN_CONFIG
    if not path.is_file():
        return {}
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise DreamBoothError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    return values if isinstance(values, dict) else {}


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """What PEFT's scaling of one model's LoRA needs: scale = alpha / r (alpha / sqrt(r) with rsLoRA)."""

    lora_alpha: Optional[float] = None  # None: alpha = r, scale 1, as diffusers assumes for a file without it
    use_rslora: bool = False
    alpha_pattern: dict = dataclasses.field(default_factory=dict)

    def kohya_alpha(self, module: str, rank: int) -> float:
        """kohya applies up @ down * alpha / rank, so its alpha is PEFT's scale times the rank."""
        from peft.utils.other import get_pattern_key

        alpha = self.lora_alpha
        if self.alpha_pattern:
            pattern = get_pattern_key(self.alpha_pattern.keys(), module)
            alpha = self.alpha_pattern.get(pattern, alpha)
        if alpha is None:
            return float(rank)
        scale = alpha / (rank ** 0.5 if self.use_rslora else rank)
        return float(scale * rank)


def lora_settings(adapter_metadata: dict, model: str, run_config: dict) -> LoraSettings:
    """From the file's LoRA adapter metadata (what save_lora_weights writes), else the run's lora_alpha."""
    prefix = f"{model}."
    values = {key.removeprefix(prefix): value for key, value in adapter_metadata.items() if key.startswith(prefix)}
    if values.get("use_dora"):
        raise DreamBoothError(f"the {model} LoRA uses DoRA, which the kohya export does not support yet")
    if "lora_alpha" in values:
        return LoraSettings(float(values["lora_alpha"]), bool(values.get("use_rslora")),
                            dict(values.get("alpha_pattern") or {}))
    alpha = run_config.get("lora_alpha")
    if alpha is None:
        logger.info("%s LoRA: no lora_alpha in the file's metadata or train_config.yaml; alpha = rank (scale 1)", model)
        return LoraSettings()
    return LoraSettings(float(alpha))


def _to_peft(state_dict: dict[str, torch.Tensor], model: str, lora_file: Path) -> dict[str, torch.Tensor]:
    """diffusers' LoRA key styles (``.lora.down``, ``.lora_linear_layer.down``, ``to_q_lora``) -> PEFT ``lora_A``."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    if all(".lora_A." in key or ".lora_B." in key for key in state_dict):
        return state_dict
    if model == "unet":
        return convert_unet_state_dict_to_peft(state_dict)
    try:
        return convert_state_dict_to_peft(state_dict)
    except ValueError:
        first = next(iter(state_dict))
        raise DreamBoothError(f"{lora_file}: text encoder LoRA keys in an unknown format, e.g. {first}") from None


def lora_to_kohya(lora_file: Path, run_config: dict | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A diffusers LoRA file (``unet.`` / ``text_encoder.`` keys) as kohya keys with per-module alphas."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from safetensors import SafetensorError, safe_open

    run_config = run_config or {}
    try:
        with safe_open(str(lora_file), framework="pt") as file:
            file_metadata = file.metadata() or {}
            state_dict = {key: file.get_tensor(key) for key in file.keys()}
    except (SafetensorError, OSError) as error:
        raise DreamBoothError(f"{lora_file}: not a readable safetensors file ({error})") from None
    adapter_metadata = json.loads(file_metadata.get("lora_adapter_metadata") or "{}")
    strays = [key for key in state_dict if not key.startswith(("unet.", "text_encoder."))]
    if strays:
        raise DreamBoothError(f"{lora_file}: key {strays[0]} is neither a unet. nor a text_encoder. LoRA weight")
    if any("lora_magnitude_vector" in key for key in state_dict):
        raise DreamBoothError(f"{lora_file}: DoRA weights; the kohya export does not support DoRA yet")
    converted, ranks, alphas = {}, set(), set()
    for model, kohya_prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te_")):
        part = {key[len(model) + 1:]: tensor for key, tensor in state_dict.items() if key.startswith(f"{model}.")}
        if not part:
            continue
        part = _to_peft(part, model, lora_file)
        if model == "text_encoder":  # kohya names follow the unflattened CLIPTextModel, as A1111 and ComfyUI expect
            part = {key if key.startswith("text_model.") else f"text_model.{key}": value for key, value in part.items()}
        kohya = convert_state_dict_to_kohya({f"{model}.{key}": tensor for key, tensor in part.items()})
        kohya = {key.replace("lora_te1_", kohya_prefix, 1): tensor for key, tensor in kohya.items()}
        # diffusers' converter writes alpha = rank (scale 1); the run's scale may differ.
        settings = lora_settings(adapter_metadata, model, run_config)
        for key, down in part.items():
            if ".lora_A." in key:
                module = key.split(".lora_A.")[0]
                alpha = settings.kohya_alpha(module, rank=down.shape[0])
                kohya[f"{kohya_prefix}{module.replace('.', '_')}.alpha"] = torch.tensor(alpha, dtype=down.dtype)
                ranks.add(down.shape[0])
                alphas.add(alpha)
        converted.update(kohya)
    if not ranks:
        raise DreamBoothError(f"{lora_file}: no LoRA weights (lora_A/lora.down) found")
    return converted, _kohya_metadata(ranks, alphas, run_config, base_model_version(state_dict, run_config))


def _base_config(base: str, relative: str) -> dict:
    """A config file of the base model from a local folder or the Hub cache (never the network); {} if neither."""
    from huggingface_hub import try_to_load_from_cache

    path = Path(base).expanduser() / relative
    if not path.is_file():
        try:
            cached = try_to_load_from_cache(base, relative)
        except ValueError:  # not a Hub id
            cached = None
        if not isinstance(cached, str):
            return {}
        path = Path(cached)
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return values if isinstance(values, dict) else {}


_DOWN_NAMES = (".lora_A.", ".lora.down.", ".lora_linear_layer.down.")


def base_model_version(state_dict: dict[str, torch.Tensor], run_config: dict) -> Optional[str]:
    """kohya's ``sd_v1`` / ``sd_v2`` (+ ``_v`` for v-prediction): from the base model's configs where they can
    be read, else from the LoRA's shapes (the cross-attention and text widths: 768 for SD 1.x, 1024 for 2.x)."""
    base = str(run_config.get("pretrained_model_name_or_path") or "")
    activation = _base_config(base, "text_encoder/config.json").get("hidden_act") if base else None
    if activation in ("quick_gelu", "gelu"):
        v2 = activation == "gelu"
    else:
        downs = [tensor for key, tensor in state_dict.items() if any(down in key for down in _DOWN_NAMES)
                 and ("attn2.to_k" in key or "self_attn.q_proj" in key)]
        widths = {tensor.shape[1] for tensor in downs}
        if widths not in ({768}, {1024}):
            return None
        v2 = widths == {1024}
    prediction = _base_config(base, "scheduler/scheduler_config.json").get("prediction_type") if base else None
    return ("sd_v2" if v2 else "sd_v1") + ("_v" if prediction == "v_prediction" else "")


def _kohya_metadata(ranks: set[int], alphas: set[float], run_config: dict, version: Optional[str]) -> dict[str, str]:
    """The ``ss_*`` fields web UIs show for a LoRA (kohya's sd-scripts names); AUTOMATIC1111 lists a LoRA
    for SD 2.x models only when ``ss_v2`` says so."""
    metadata = {"format": "pt", "ss_network_module": "networks.lora"}
    if version:
        metadata.update(ss_base_model_version=version, ss_v2=str(version.startswith("sd_v2")),
                        ss_v_parameterization=str(version.endswith("_v")))
    if len(ranks) == 1:
        metadata["ss_network_dim"] = str(next(iter(ranks)))
    if len(alphas) == 1:
        alpha = next(iter(alphas))
        metadata["ss_network_alpha"] = str(int(alpha) if alpha.is_integer() else alpha)
    base = str(run_config.get("pretrained_model_name_or_path") or "")
    if base:  # a Hub id as it is; of a local folder only its name, not the user's paths
        metadata["ss_sd_model_name"] = Path(base).name if Path(base).expanduser().exists() else base
    if run_config.get("instance_prompt"):
        metadata["ss_training_comment"] = f"DreamBooth LoRA, instance prompt: {run_config['instance_prompt']}"
    return metadata


# --- Writing --------------------------------------------------------------------------------------


def cast_state_dict(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating-point tensors in ``dtype``; integer tensors as they are."""
    return {key: tensor.to(dtype) if tensor.is_floating_point() else tensor for key, tensor in state_dict.items()}


def save_safetensors_atomically(state_dict: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str],
                                overwrite: bool = False) -> Path:
    """Write to a temporary file beside ``path``, then rename: readers never see half a file. The file gets
    the mode the umask gives new files, not a temporary file's owner-only one."""
    from safetensors.torch import save_file

    from .models import WRITE_ERRORS, seal, sync_folder, write_failure

    path = Path(path)
    if path.exists() and not overwrite:
        raise DreamBoothError(f"--output {path}: file exists; pass --overwrite to replace it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(handle)
    except OSError as error:
        raise DreamBoothError(f"--output {path}: cannot write there ({error.strerror or error})") from None
    try:
        save_file({key: tensor.contiguous() for key, tensor in state_dict.items()}, temporary, metadata=metadata)
        seal(Path(temporary))
        os.replace(temporary, path)
        sync_folder(path.parent)
    except WRITE_ERRORS as error:
        raise DreamBoothError(f"--output {path}: could not write ({write_failure(error)})") from None
    finally:
        Path(temporary).unlink(missing_ok=True)
    return path
