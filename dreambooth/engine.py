"""The Accelerator of a training run, and the flags its engine (one process or several, DeepSpeed,
FSDP) cannot run, refused before anything loads."""

from __future__ import annotations

import dataclasses
import logging
import os

from .casting import CastWeightsOnce
from .config import TrainConfig
from .errors import DreamBoothError
from .gradients import Bf16Gradients, StepInBackward
from .models import check_precision_supported, cpu_only
from .optimizers import load_bitsandbytes


def create_accelerator(cfg: TrainConfig):
    """The run's Accelerator, after checking that its engine can run the flags given."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    check_precision_supported(cfg.mixed_precision)
    trackers = cfg.trackers() or None
    project = ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=os.path.join(cfg.output_dir, cfg.logging_dir))
    accelerator = Accelerator(
        cpu=cpu_only(),
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        log_with=trackers,
        project_config=project,
        # Batches reach the GPU without waiting for it (from pinned memory, see build_dataloader).
        dataloader_config=DataLoaderConfiguration(non_blocking=True),
    )
    if not accelerator.is_local_main_process:
        logging.getLogger("dreambooth").setLevel(logging.WARNING)
    # Without the flag, the precision comes from the accelerate config (or its environment variable).
    source = "--mixed_precision fp16" if cfg.mixed_precision else "mixed_precision fp16 (from the accelerate config)"
    check_precision_supported(accelerator.mixed_precision, source, accelerator.device)
    check_engine_support(cfg, accelerator)
    check_cuda_libraries(cfg, accelerator.device)
    use_backend_flags(cfg, accelerator.device)
    return accelerator


def use_backend_flags(cfg: TrainConfig, device) -> None:
    """--allow_tf32 and --cudnn_benchmark: settings of PyTorch's CUDA backends, for the whole process."""
    import torch

    if device.type != "cuda":
        return
    if cfg.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    if cfg.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True


def with_engine_defaults(cfg: TrainConfig, accelerator) -> TrainConfig:
    """The config with the defaults that depend on the engine filled in: 4 validation samples per
    prompt, or none under FSDP, whose sharded weights no process can sample from alone."""
    from accelerate.utils import DistributedType

    if cfg.num_validation_images is not None:
        return cfg
    if accelerator.distributed_type == DistributedType.FSDP:
        logging.getLogger("dreambooth").info("FSDP: no validation samples (sample checkpoints with infer.py)")
        return dataclasses.replace(cfg, num_validation_images=0)
    return dataclasses.replace(cfg, num_validation_images=4)


def check_engine_support(cfg: TrainConfig, accelerator) -> None:
    """Flags this run's engine (one process or several, DeepSpeed, FSDP) cannot combine, said before anything loads."""
    from accelerate.utils import DistributedType

    if cfg.optimizer_in_backward:
        StepInBackward.check_support(accelerator, cfg.max_grad_norm)
    if cfg.bf16_gradients:
        Bf16Gradients.check_support(accelerator, cfg.optimizer_in_backward)
    if cfg.cast_weights_once:
        CastWeightsOnce.check_support(accelerator, cfg.compile)
    engine = {DistributedType.DEEPSPEED: "DeepSpeed", DistributedType.FSDP: "FSDP"}.get(accelerator.distributed_type)
    if engine is None:
        return
    if cfg.use_8bit_adam and engine == "DeepSpeed":
        raise DreamBoothError("--use_8bit_adam cannot be combined with DeepSpeed, which manages the optimizer "
                              "(and its CPU offload) itself; drop the flag, or use a DDP config")
    if cfg.train_text_encoder:
        raise DreamBoothError(f"--train_text_encoder trains two models, and Accelerate's {engine} engine takes one; "
                              "use a DDP config, or train the UNet alone")
    if engine == "FSDP" and cfg.use_lora:
        raise DreamBoothError("--use_lora trains adapters of a few MB, which FSDP has no need to shard; "
                              "use a DDP config (examples/accelerate/multi_gpu.yaml)")
    if engine == "FSDP" and (cfg.num_validation_images or cfg.eval_steps):
        raise DreamBoothError("validation samples and --eval_steps draw from a whole copy of the weights in a "
                              "process, which sharded FSDP models do not have; drop --num_validation_images and --eval_steps "
                              "(sample and score checkpoints with infer.py and evaluate.py instead)")


def check_cuda_libraries(cfg: TrainConfig, device) -> None:
    """xformers runs on a CUDA GPU only, and bitsandbytes must load there: said before anything loads.
    (Elsewhere --use_8bit_adam falls back to torch's AdamW, with a warning.)"""
    if cfg.enable_xformers_memory_efficient_attention and device.type != "cuda":
        raise DreamBoothError(f"--enable_xformers_memory_efficient_attention needs a CUDA GPU, and this run uses "
                              f"the {device.type.upper()}; drop the flag (PyTorch's SDPA attention is used instead)")
    if cfg.use_8bit_adam and device.type == "cuda":
        load_bitsandbytes()
