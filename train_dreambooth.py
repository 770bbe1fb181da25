r"""DreamBooth fine-tuning of a Stable Diffusion 1.x/2.x model (Ruiz et al., CVPR 2023).

Single GPU or CPU:
    python train_dreambooth.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --instance_data_dir photos/ --instance_prompt "a photo of sks dog" --output_dir sks-dog \
        --with_prior_preservation --class_data_dir class-dog/ --class_prompt "a photo of a dog" \
        --resolution 512 --train_batch_size 1 --learning_rate 5e-6 --max_train_steps 400

With Accelerate (one or several GPUs, see accelerate_config.yaml and examples/):
    accelerate launch --config_file accelerate_config.yaml train_dreambooth.py --config examples/sd15_full.yaml

Every flag can also come from a YAML file (--config); flags on the command line win.
"""

from __future__ import annotations

import logging
import math
import random
import sys
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import DataLoader

from dreambooth.casting import CastWeightsOnce
from dreambooth.checkpoints import (
    Checkpointer,
    check_checkpoint_fits,
    TrainState,
    adapt_to_process_count,
    all_finite,
    any_process,
    find_checkpoints,
    first_failure,
    read_state,
    resolve_resume,
)
from dreambooth.cli import run_cli, setup_logging
from dreambooth.config import TrainConfig, config_to_dict, parse_config, save_train_config
from dreambooth.caching import CachedLatents, VaeLatents
from dreambooth.concepts import build_dataloader, training_items
from dreambooth.data import DreamBoothDataset
from dreambooth.engine import create_accelerator, with_engine_defaults
from dreambooth.errors import DreamBoothError
from dreambooth.generation import SharedPipeline, class_image_jobs, generate_class_images
from dreambooth.hub import card_info_from_config, push_output, write_model_card
from dreambooth.lora import add_lora_adapters, load_lora_into, save_lora
from dreambooth.models import (
    TRAINED_NAMES,
    Components,
    load_components,
    load_models_into,
    mixed_precision_dtype,
    prepare_for_training,
    publish_file,
    save_models,
    save_pipeline,
)
from dreambooth.monitor import (
    SampleSettings,
    TrainingEvaluation,
    ValidationSampler,
    init_trackers,
    plot_loss_curve,
    tracker_config,
    tracker_init_kwargs,
)
from dreambooth.optimizers import build_optimizer
from dreambooth.training import (
    BatchDraws,
    GracefulStop,
    LossSettings,
    PromptEncoder,
    Schedule,
    Trainer,
    training_loss,
)

logger = logging.getLogger("dreambooth.train")


def top_up_class_images(cfg: TrainConfig, accelerator) -> None:
    """Generate the class images missing from each concept's class folder, split across processes."""
    jobs = class_image_jobs(
        cfg.concepts(), model=cfg.pretrained_model_name_or_path, resolution=cfg.resolution,
        sample_batch_size=cfg.sample_batch_size, precision=cfg.prior_generation_precision, seed=cfg.seed or 0,
        revision=cfg.revision, variant=cfg.variant, cudnn_benchmark=cfg.cudnn_benchmark,
    )
    with SharedPipeline() as pipelines:
        for job in jobs:
            generate_class_images(job, accelerator.state, pipelines)


def build_models(cfg: TrainConfig, accelerator) -> tuple[Components, list[torch.nn.Module]]:
    """Load the base model; return it with the modules to train (LoRA adapters added if asked)."""
    components = load_components(
        cfg.pretrained_model_name_or_path, cfg.revision, cfg.variant, cfg.tokenizer_name,
        mixed_precision_dtype(accelerator.mixed_precision), cfg.train_text_encoder, cfg.use_lora,
    )
    if cfg.use_lora:
        add_lora_adapters(components.unet, components.text_encoder if cfg.train_text_encoder else None, cfg.rank,
                          cfg.lora_alpha or cfg.rank, cfg.lora_dropout, tuple(cfg.lora_target_modules))
    trained = prepare_for_training(components, cfg.train_text_encoder, accelerator.device,
                                   cfg.gradient_checkpointing, cfg.enable_xformers_memory_efficient_attention,
                                   cfg.channels_last)
    return components, trained


def build_optimization(cfg: TrainConfig, accelerator, trained: list[torch.nn.Module], batches: int):
    """Run length, AdamW over the trainable weights and the lr schedule."""
    from diffusers.optimization import get_scheduler

    schedule = Schedule.derive(
        math.ceil(batches / accelerator.num_processes), cfg.train_batch_size, accelerator.num_processes,
        cfg.gradient_accumulation_steps, cfg.max_train_steps, cfg.num_train_epochs,
    )
    scale = schedule.total_batch_size if cfg.scale_lr else 1
    learning_rate = cfg.peak_learning_rate() * scale
    rates = [learning_rate, (cfg.text_encoder_lr or cfg.peak_learning_rate()) * scale]
    groups = [{"params": [p for p in module.parameters() if p.requires_grad], "lr": rate}
              for module, rate in zip(trained, rates)]
    optimizer = build_optimizer(groups, learning_rate, (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_weight_decay,
                                cfg.adam_epsilon, cfg.use_8bit_adam, accelerator.device)
    if cfg.lr_scheduler == "polynomial" and cfg.lr_warmup_steps >= schedule.max_train_steps:
        raise DreamBoothError(f"--lr_warmup_steps {cfg.lr_warmup_steps}: leaves --lr_scheduler polynomial no step of "
                              f"the {schedule.max_train_steps} to decay over; use fewer warm-up steps")
    # Accelerate steps the schedule once per process for each optimizer step.
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=schedule.max_train_steps * accelerator.num_processes,
        num_cycles=cfg.lr_num_cycles, power=cfg.lr_power,
    )
    logger.info(
        "training %s%s: %d steps, %d epoch(s), batch %d (x%d processes x%d accumulation), lr %.3g",
        "LoRA on " if cfg.use_lora else "", "UNet + text encoder" if cfg.train_text_encoder else "UNet",
        schedule.max_train_steps, schedule.num_epochs, cfg.train_batch_size, accelerator.num_processes,
        cfg.gradient_accumulation_steps, learning_rate,
    )
    return schedule, optimizer, lr_scheduler


def build_trainer(cfg: TrainConfig, accelerator, components: Components, trained: list[torch.nn.Module],
                  dataloader: DataLoader, state: TrainState) -> Trainer:
    """Everything trained goes through one ``accelerator.prepare``."""
    dataset = training_items(dataloader)
    schedule, optimizer, lr_scheduler = build_optimization(cfg, accelerator, trained, len(dataloader))
    latents = latents_source(cfg, accelerator, components, dataset)
    *trained, optimizer, dataloader, lr_scheduler = accelerator.prepare(*trained, optimizer, dataloader, lr_scheduler)
    encoder = PromptEncoder(trained[1] if cfg.train_text_encoder else components.text_encoder,
                            cfg.train_text_encoder, cfg.text_encoder_use_attention_mask)
    if cfg.pre_compute_text_embeddings and not cfg.train_text_encoder:
        encoder.precompute(dataset.prompts(), components.tokenizer, cfg.tokenizer_max_length)
        components.text_encoder.to("cpu")
    settings = LossSettings(cfg.prior_loss_weight, cfg.snr_gamma, cfg.offset_noise)
    draws = BatchDraws(accelerator.process_index, accelerator.num_processes)
    unet = torch.compile(trained[0], mode=cfg.compile_mode) if cfg.compile else trained[0]

    def loss_fn(batch: dict) -> dict[str, torch.Tensor]:
        return training_loss(batch, unet, latents, components.noise_scheduler, encoder, settings, draws)

    save, load = (save_lora, load_lora_into) if cfg.use_lora else (save_models, load_models_into)
    checkpointer = Checkpointer(accelerator, cfg.output_dir, save, load, cfg.checkpoints_total_limit)
    trainer = Trainer(accelerator, trained, optimizer, lr_scheduler, dataloader, schedule, loss_fn, cfg.max_grad_norm,
                      cfg.set_grads_to_none, checkpointer, cfg.checkpointing_steps, state, cfg.logging_steps,
                      optimizer_in_backward=cfg.optimizer_in_backward, bf16_gradients=cfg.bf16_gradients,
                      cast_weights=CastWeightsOnce(trained, mixed_precision_dtype(accelerator.mixed_precision))
                      if cfg.cast_weights_once else None)
    if cfg.stop_text_encoder_training is not None:
        trainer.before_step_callbacks.append(lambda state: stop_text_encoder(cfg, accelerator, trainer, encoder))
    return trainer


def latents_source(cfg: TrainConfig, accelerator, components: Components, dataset: DreamBoothDataset):
    """The VAE latents of each batch: cached once when the crops are fixed, else encoded each step."""
    if not (cfg.cache_latents and cfg.center_crop):
        return VaeLatents(components.vae)
    step_images = cfg.train_batch_size * (2 if cfg.with_prior_preservation else 1)
    cached = CachedLatents(components.vae, dataset, accelerator.device, batch_size=step_images)
    dataset.yield_latent_keys = True
    components.vae.to("cpu")
    return cached


def stop_text_encoder(cfg: TrainConfig, accelerator, trainer: Trainer, encoder: PromptEncoder) -> None:
    """At --stop_text_encoder_training, freeze the text encoder and drop its optimizer state
    (kohya-ss's schedule); from then on its embeddings are cached like a frozen encoder's."""
    if not encoder.trainable or trainer.state.global_step < cfg.stop_text_encoder_training:
        return
    text_encoder = accelerator.unwrap_model(trainer.trained[1])
    trainer.freeze(text_encoder)
    encoder.freeze(text_encoder)
    logger.info("step %d: text encoder frozen (--stop_text_encoder_training)", trainer.state.global_step)


def add_validation(cfg: TrainConfig, accelerator, components: Components, trainer: Trainer) -> ValidationSampler | None:
    """Sample grids every --validation_steps (and one at the end) and the paper's metrics every
    --eval_steps, from the weights being trained."""
    if not (cfg.num_validation_images or cfg.eval_steps):
        return None
    settings = SampleSettings(tuple(cfg.validation_prompts()), cfg.num_validation_images, cfg.validation_seed,
                              cfg.validation_inference_steps, cfg.validation_scheduler, cfg.resolution)
    sampler = ValidationSampler(accelerator, components, trainer.trained, settings, cfg.output_dir)
    evaluation = training_evaluation(cfg, accelerator) if cfg.eval_steps else None

    def after_step(state: TrainState) -> None:
        if cfg.num_validation_images and state.global_step % cfg.validation_steps == 0:
            sampler.sample(f"step_{state.global_step}", state.global_step)
        if cfg.eval_steps and state.global_step % cfg.eval_steps == 0:
            sampler.evaluate(state.global_step, evaluation)

    trainer.step_callbacks.append(after_step)
    return sampler


def training_evaluation(cfg: TrainConfig, accelerator) -> TrainingEvaluation:
    """What --eval_steps draws (every process) and scores with (the scoring models and every
    concept's real images, loaded once on the main process)."""
    from dreambooth.evaluation import PROMPT_SETS, PROMPTS_DIR, load_encoders, load_real_images, read_templates
    from dreambooth.monitor import EvalSubject

    main = accelerator.is_main_process
    subjects = [EvalSubject(identifier, class_noun, tuple(load_real_images(concept.instance_data_dir)) if main else ())
                for (identifier, class_noun), concept in zip(cfg.eval_subjects(), cfg.concepts())]
    path = PROMPTS_DIR / PROMPT_SETS[cfg.eval_prompt_set]
    return TrainingEvaluation(
        load_encoders(cfg.eval_dino_model, cfg.eval_clip_model, accelerator.device) if main else None, subjects,
        read_templates(path, f"--eval_prompt_set {cfg.eval_prompt_set}")[: cfg.eval_num_prompts],
        cfg.eval_images_per_prompt, cfg.with_prior_preservation,
    )


def start_state(cfg: TrainConfig, accelerator) -> tuple[TrainState, Path | None]:
    """Where the run starts: a checkpoint's position, or step 0 with a data seed."""
    from accelerate.utils import broadcast_object_list

    resume = resolve_resume(cfg.output_dir, cfg.resume_from_checkpoint)
    if resume is not None:
        check_checkpoint_fits(resume, cfg.use_lora, cfg.train_text_encoder)
        return adapt_to_process_count(read_state(resume), accelerator.num_processes, resume), resume
    # Without --seed, the processes must still agree on one data order.
    data_seed = [cfg.seed if cfg.seed is not None else random.randrange(2**31)]
    return TrainState(data_seed=broadcast_object_list(data_seed)[0], num_processes=accelerator.num_processes), None


def trained_weights(cfg: TrainConfig, accelerator, trainer: Trainer) -> dict:
    """The final weights, gathered on every process (ZeRO shards included): full state dicts by
    model name, or for LoRA the unwrapped models themselves."""
    if cfg.use_lora:
        return {name: accelerator.unwrap_model(model) for name, model in zip(TRAINED_NAMES, trainer.trained)}
    return {name: accelerator.get_state_dict(model) for name, model in zip(TRAINED_NAMES, trainer.trained)}


def save_trained(cfg: TrainConfig, weights: dict, components: Components) -> None:
    """On the main process: a complete pipeline, or the LoRA file."""
    tensors = [t for w in weights.values() for t in (w.parameters() if cfg.use_lora else w.values())]
    if not all_finite(tensors):
        raise DreamBoothError("the trained weights are not finite; not saving them (try a lower --learning_rate)")
    if cfg.use_lora:
        publish_file(lambda folder: save_lora(list(weights.values()), folder, cfg.save_dtype()), Path(cfg.output_dir))
    else:
        save_pipeline(cfg.output_dir, cfg.pretrained_model_name_or_path, weights, components.tokenizer,
                      cfg.revision, cfg.variant, cfg.save_dtype())
    logger.info("saved the trained %s to %s", "LoRA" if cfg.use_lora else "pipeline", cfg.output_dir)


def save_final_weights(cfg: TrainConfig, accelerator, trainer: Trainer, components: Components) -> None:
    """The trained weights, saved; where that fails (a full disk), the error says what can be resumed."""
    weights = trained_weights(cfg, accelerator, trainer)
    failure = None
    if accelerator.is_main_process:
        try:
            save_trained(cfg, weights, components)
        except DreamBoothError as error:
            failure = str(error)
    failure = first_failure(accelerator, failure)
    if failure:
        checkpoints = find_checkpoints(cfg.output_dir)
        last = (f"the last checkpoint is {checkpoints[-1][1].name}: fix that and run the same command with "
                "--resume_from_checkpoint latest") if checkpoints else "no checkpoint was written"
        raise DreamBoothError(f"{failure}; {last}")


def finish(cfg: TrainConfig, accelerator, trainer: Trainer, components: Components,
           sampler: ValidationSampler | None) -> None:
    """The trained weights first (a signal now waits for them), then the final samples, loss curve,
    model card and Hub upload; or, after a signal during training, how to resume."""
    if trainer.interrupted:
        logger.info("stopped at step %d with a checkpoint; to continue, run the same command with "
                    "--resume_from_checkpoint latest", trainer.state.global_step)
        return
    with GracefulStop(finishing="saving the trained model") as stop:
        save_final_weights(cfg, accelerator, trainer, components)
    stopped = any_process(accelerator, stop.requested)
    final = sampler.final(trainer.state.global_step) if cfg.num_validation_images and not stopped else None
    if accelerator.is_main_process:
        plot_loss_curve(trainer.metrics.history, Path(cfg.output_dir) / "loss_curve.png")
        concepts = [(concept.instance_prompt, concept.class_prompt) for concept in cfg.concepts()]
        write_model_card(cfg.output_dir, card_info_from_config(
            cfg, instance_prompt=concepts[0][0], concepts=concepts, learning_rate=cfg.peak_learning_rate(),
            num_processes=accelerator.num_processes,
            mixed_precision=accelerator.mixed_precision, max_train_steps=trainer.state.global_step,
            sample_images=[final.grid] if final else [], prompt_samples=final.by_prompt if final else [],
            rank=cfg.rank if cfg.use_lora else None, hub_model_id=cfg.hub_repo_id() if cfg.push_to_hub else None,
        ))
        if cfg.push_to_hub and not stopped:
            url = push_output(cfg.output_dir, cfg.hub_repo_id(), cfg.hub_token, cfg.hub_private_repo,
                              cfg.push_checkpoints)
            logger.info("uploaded to %s", url)
    if stopped:
        trainer.exit_status = stop.exit_status
        logger.info("stopped after saving the trained model to %s; the final samples%s were skipped",
                    cfg.output_dir, " and the upload" if cfg.push_to_hub else "")
    accelerator.wait_for_everyone()


def main(argv: Sequence[str] | None = None) -> Trainer:
    setup_logging()
    cfg = parse_config(TrainConfig, argv, __doc__)
    cfg.validate()
    accelerator = create_accelerator(cfg)
    cfg = with_engine_defaults(cfg, accelerator)
    state, resume = start_state(cfg, accelerator)
    if cfg.seed is not None:
        from accelerate.utils import set_seed

        set_seed(cfg.seed)
    if cfg.with_prior_preservation:
        top_up_class_images(cfg, accelerator)
    components, trained = build_models(cfg, accelerator)
    dataloader = build_dataloader(cfg, components.tokenizer, state.data_seed,
                                  pin_memory=accelerator.device.type == "cuda")
    trainer = build_trainer(cfg, accelerator, components, trained, dataloader, state)
    if resume is not None:
        trainer.metrics.history = trainer.checkpointer.load(resume, trainer.lr_scheduler, trainer.optimizer)
    sampler = add_validation(cfg, accelerator, components, trainer)
    if accelerator.is_main_process:
        save_train_config(cfg)
        trackers = [str(tracker) for tracker in accelerator.log_with]
        init_trackers(accelerator, tracker_config(config_to_dict(cfg)),
                      tracker_init_kwargs(state.global_step, accelerator.logging_dir, trackers))
    trainer.train()
    finish(cfg, accelerator, trainer, components, sampler)
    accelerator.end_training()
    return trainer


if __name__ == "__main__":
    sys.exit(run_cli(main))
