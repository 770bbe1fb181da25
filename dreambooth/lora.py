"""LoRA adapters through peft: adding them, and saving/loading them in diffusers' LoRA format.

The trained modules are always ``[unet]`` or ``[unet, text_encoder]``; the file is what
``StableDiffusionPipeline.load_lora_weights(folder)`` reads (keys ``unet.*`` and
``text_encoder.*``, with each adapter's rank and alpha in the safetensors metadata).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import DreamBoothError

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def add_lora_adapters(unet: torch.nn.Module, text_encoder: torch.nn.Module | None, rank: int, alpha: float,
                      dropout: float, unet_targets: tuple[str, ...] = UNET_TARGETS) -> None:
    """Freeze the base weights and add trainable fp32 adapters (to the text encoder when given)."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig, inject_adapter_in_model

    targets = [(unet, list(unet_targets), "--lora_target_modules")]
    if text_encoder is not None:
        targets.append((text_encoder, list(TEXT_ENCODER_TARGETS), "text encoder LoRA"))
    for module, target_modules, flag in targets:
        module.requires_grad_(False)
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
                            target_modules=target_modules)
        try:
            if hasattr(module, "set_adapters"):  # diffusers models
                module.add_adapter(config)
            else:
                # peft directly: transformers' own adapter support may want a newer peft than installed.
                inject_adapter_in_model(config, module, adapter_name="default")
                module.peft_config = {"default": config}
        except ValueError as error:
            raise DreamBoothError(f"{flag} {' '.join(target_modules)}: {str(error).splitlines()[0]}") from None
    # Adapters train in fp32 even when the frozen base weights are half precision.
    cast_training_params([module for module, _, _ in targets], dtype=torch.float32)


def _adapter_layers(models: list[torch.nn.Module], dtype: torch.dtype | None) -> dict:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    kwargs = {}
    for name, model in zip(("unet", "text_encoder"), models):
        state = get_peft_model_state_dict(model)
        if dtype is not None:
            state = {key: value.to(dtype) for key, value in state.items()}
        converted = convert_state_dict_to_diffusers(state)
        # diffusers' load_lora_weights reads a file's key style off its first key, so a file must
        # keep one. Only attention projections have diffusers names: with other targets
        # (--lora_target_modules proj_in ...), all keys keep peft's lora_A/lora_B names.
        mixed = any(".lora_A." in key or ".lora_B." in key for key in converted)
        kwargs[f"{name}_lora_layers"] = state if mixed else converted
        kwargs[f"{name}_lora_adapter_metadata"] = model.peft_config["default"].to_dict()
    return kwargs


def save_lora(models: list[torch.nn.Module], folder: Path, dtype: torch.dtype | None = None) -> Path:
    """Write the adapters of ``models`` to ``folder/pytorch_lora_weights.safetensors``."""
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    StableDiffusionPipeline.save_lora_weights(folder, weight_name=LORA_WEIGHTS, safe_serialization=True,
                                              **_adapter_layers(models, dtype))
    return folder / LORA_WEIGHTS


def load_lora_into(models: list[torch.nn.Module], folder: Path) -> None:
    """Load adapters saved by ``save_lora`` into ``models`` in place (exactly, for resuming)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft
    from diffusers.utils.state_dict_utils import convert_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    state = StableDiffusionPipeline.lora_state_dict(str(folder), weight_name=LORA_WEIGHTS)[0]
    for name, model in zip(("unet", "text_encoder"), models):
        part = {key[len(name) + 1:]: value for key, value in state.items() if key.startswith(f"{name}.")}
        part = convert_unet_state_dict_to_peft(part) if name == "unet" else convert_state_dict_to_peft(part)
        result = set_peft_model_state_dict(model, part, adapter_name="default")
        missing = [key for key in getattr(result, "unexpected_keys", []) if "lora" in key]
        if missing:
            raise DreamBoothError(f"{folder}: LoRA weights do not match the {name} ({missing[0]} ...)")
