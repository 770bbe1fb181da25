"""The DreamBooth objective and the Accelerate training loop."""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import signal
import sys
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .casting import CastWeightsOnce
from .checkpoints import Checkpointer, TrainState, find_checkpoints
from .errors import DreamBoothError
from .gradients import Bf16Gradients, StepInBackward, inner_optimizer, steps_on_device
from .monitor import Metrics

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- objective


def diffusion_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict: the noise (epsilon) or the velocity (v, SD 2.x 768-v)."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise DreamBoothError(f"scheduler prediction_type '{prediction_type}' is not supported (epsilon or v_prediction)")


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, eq. 9): min(SNR, gamma) / SNR for epsilon
    prediction and min(SNR, gamma) / (SNR + 1) for v prediction."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def dreambooth_loss(model_pred: torch.Tensor, target: torch.Tensor, num_instance: int,
                    prior_loss_weight: float = 1.0, weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The DreamBooth loss (Ruiz et al. 2023, eq. 2): MSE on the instance part of the batch plus
    ``prior_loss_weight`` x MSE on the class part that follows it. ``weights`` (one per sample)
    weights each sample's MSE, as Min-SNR does."""
    per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if weights is not None:
        per_sample = per_sample * weights
    instance_loss = per_sample[:num_instance].mean()
    losses = {"instance_loss": instance_loss, "loss": instance_loss}
    if num_instance < len(per_sample):
        prior_loss = per_sample[num_instance:].mean()
        losses["prior_loss"] = prior_loss
        losses["loss"] = instance_loss + prior_loss_weight * prior_loss
    return losses


class PromptEncoder:
    """Text conditioning for a batch. A frozen text encoder gives the same embedding for the
    same prompt every time, so each prompt is encoded once and cached."""

    def __init__(self, text_encoder: torch.nn.Module, trainable: bool, use_attention_mask: bool = False):
        self.text_encoder, self.trainable, self.use_attention_mask = text_encoder, trainable, use_attention_mask
        self._cache: dict[str, torch.Tensor] = {}

    def _encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask if self.use_attention_mask else None
        return self.text_encoder(input_ids, attention_mask=mask, return_dict=False)[0]

    def __call__(self, batch: dict) -> torch.Tensor:
        if self.trainable:
            return self._encode(batch["input_ids"], batch["attention_mask"])
        prompts = batch["prompts"]
        missing = [prompts.index(prompt) for prompt in dict.fromkeys(prompts) if prompt not in self._cache]
        if missing:
            if self.text_encoder is None:
                raise DreamBoothError(f"prompt {prompts[missing[0]]!r} was not pre-computed")
            with torch.no_grad():
                encoded = self._encode(batch["input_ids"][missing], batch["attention_mask"][missing])
            for i, embedding in zip(missing, encoded):
                self._cache[prompts[i]] = embedding
        return torch.stack([self._cache[prompt] for prompt in prompts])

    def freeze(self, text_encoder: torch.nn.Module) -> None:
        """From now on the text encoder is frozen: encode with ``text_encoder`` and cache."""
        self.text_encoder, self.trainable = text_encoder.eval(), False
        self._cache.clear()

    def precompute(self, prompts: Sequence[str], tokenizer, max_length: int | None = None) -> None:
        """Encode ``prompts`` now and drop the text encoder, whose memory can then be freed."""
        from .data import tokenize_prompts

        tokens = tokenize_prompts(tokenizer, prompts, max_length)
        device = self.text_encoder.device
        self({"prompts": list(prompts), **{name: value.to(device) for name, value in tokens.items()}})
        self.text_encoder = None


@dataclass(frozen=True)
class BatchDraws:
    """The objective's random draws for this process's part of the global batch.

    Every process draws for the whole global batch (the processes' batches in process order, as
    accelerate deals them out) and keeps its own rows. With ``--seed`` every process has the same
    RNG state, so drawing for its own batch alone would give every process the same noise and
    timesteps; this way each sample gets its own, and N processes of batch b draw exactly what
    one process of batch N x b draws."""

    process_index: int = 0
    num_processes: int = 1

    def _own_rows(self, drawn: torch.Tensor) -> torch.Tensor:
        rows = drawn.shape[0] // self.num_processes
        return drawn[self.process_index * rows:(self.process_index + 1) * rows]

    def randn(self, shape: Sequence[int], device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._own_rows(torch.randn((shape[0] * self.num_processes, *shape[1:]), device=device, dtype=dtype))

    def randint(self, high: int, size: int, device: torch.device) -> torch.Tensor:
        return self._own_rows(torch.randint(0, high, (size * self.num_processes,), device=device))


@dataclass(frozen=True)
class LossSettings:
    prior_loss_weight: float = 1.0
    snr_gamma: float | None = None
    offset_noise: bool = False


def training_loss(batch: dict, unet, latents_source, noise_scheduler, encode_prompts: Callable[[dict], torch.Tensor],
                  settings: LossSettings, draws: BatchDraws = BatchDraws()) -> dict[str, torch.Tensor]:
    """One forward pass of the objective on a batch (instance images first, then class images).

    ``latents_source`` gives the batch's VAE posterior (``caching.VaeLatents`` or
    ``caching.CachedLatents``). Random draws, in this order from the default generator, each for
    the global batch (``draws``): posterior sample, noise, (offset noise), timesteps.
    """
    posterior = latents_source.posterior(batch)
    # The posterior's own sample(), with the draw for the global batch (the same numbers on one process).
    sample = posterior.mean + posterior.std * draws.randn(posterior.mean.shape, posterior.mean.device,
                                                          posterior.mean.dtype)
    latents = (sample * latents_source.scaling_factor).float()
    # A fresh randn, not randn_like: randn_like follows the strides of its input, which depend on the
    # VAE's convolution backend, and the same seed would then give other noise to cached latents.
    noise = draws.randn(latents.shape, latents.device, latents.dtype)
    if settings.offset_noise:
        # Offset noise (Guttenberg 2023) lets the model learn very dark and very bright images.
        noise = noise + 0.1 * draws.randn((latents.shape[0], latents.shape[1], 1, 1), latents.device)
    timesteps = draws.randint(noise_scheduler.config.num_train_timesteps, latents.shape[0], latents.device)
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    encoder_hidden_states = encode_prompts(batch)
    model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
    target = diffusion_target(noise_scheduler, latents, noise, timesteps)
    weights = None if settings.snr_gamma is None else min_snr_weights(noise_scheduler, timesteps, settings.snr_gamma)
    return dreambooth_loss(model_pred, target, batch["num_instance"], settings.prior_loss_weight, weights)


# ---------------------------------------------------------------- optimisation


def freeze_module(optimizer, module: torch.nn.Module) -> None:
    """Stop training ``module`` mid-run: no gradients, and its optimizer state released."""
    state = inner_optimizer(optimizer).state
    for parameter in module.parameters():
        if parameter.requires_grad:
            parameter.requires_grad_(False)
            parameter.grad = None
            state.pop(parameter, None)


@dataclass(frozen=True)
class Schedule:
    """How long the run is, derived once from the config and the prepared dataloader."""

    total_batch_size: int
    steps_per_epoch: int
    max_train_steps: int
    num_epochs: int

    @classmethod
    def derive(cls, batches_per_epoch: int, batch_size: int, num_processes: int, accumulation: int,
               max_train_steps: int | None, num_train_epochs: int) -> "Schedule":
        steps_per_epoch = max(1, math.ceil(batches_per_epoch / accumulation))
        max_steps = max_train_steps or num_train_epochs * steps_per_epoch
        return cls(
            total_batch_size=batch_size * num_processes * accumulation,
            steps_per_epoch=steps_per_epoch,
            max_train_steps=max_steps,
            num_epochs=math.ceil(max_steps / steps_per_epoch),
        )


# ---------------------------------------------------------------- loop


# Ctrl-C, a scheduler's or `kill`'s SIGTERM, and on Windows Ctrl-Break (SIGBREAK, which has no other use there).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGBREAK") if hasattr(signal, name))


class GracefulStop:
    """SIGINT/SIGTERM (SIGBREAK on Windows): finish the current step (and up to ``extra_steps`` more,
    for the processes to agree), save a checkpoint, exit. A second Ctrl-C aborts. ``finishing`` says
    what is finished before stopping, where that is not a step."""

    def __init__(self, extra_steps: int = 0, finishing: str | None = None):
        self.requested = False
        self.signum: int | None = None  # the first signal's
        self.extra_steps = extra_steps
        self.finishing = finishing
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested, self.signum = True, self.signum or signum
        finishing = self.finishing or ("this step and saving a checkpoint" if not self.extra_steps else
                                       f"this step and at most {self.extra_steps} more and saving a checkpoint")
        print(f"\n{signal.Signals(signum).name}: finishing {finishing} "
              "(press Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    @property
    def exit_status(self) -> int:
        """What a process stopped by a signal exits with, by the shell's convention: 128 + the signal
        (130 for Ctrl-C, 143 for SIGTERM), so ``train && push`` does not go on and a scheduler sees
        the run as unfinished. A process stopped because another was signalled says SIGTERM."""
        return 128 + int(self.signum or signal.SIGTERM)

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class StopAgreement:
    """Whether to stop after this step. A single process decides alone, at once. Several stop at
    the same step when any one of them was asked to, without making the host wait for the GPU
    each step (accelerate's ``check_trigger`` reads its flag back every step, which keeps the CPU
    from queueing the next step while the GPU works): each step the processes' flags are summed
    on the device and copied to the host in the background, and step s acts on the sum made at
    step s - ``lag``, whose copy the GPU has finished by then unless the CPU is more than ``lag``
    steps ahead. Every process reads the same sums, so all decide alike."""

    LAG = 2

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.lag = self.LAG if accelerator.num_processes > 1 else 0
        self._local = torch.zeros((), device=accelerator.device)
        self._raised = False
        self._sums: deque[tuple[torch.Tensor, Any]] = deque()

    def __call__(self, requested: bool) -> bool:
        if not self.lag:
            return requested
        if requested and not self._raised:
            self._local.fill_(1)
            self._raised = True
        self._sums.append(_copy_to_host(self.accelerator.reduce(self._local, reduction="sum")))
        if len(self._sums) <= self.lag:
            return False
        total, copied = self._sums.popleft()
        if copied is not None:
            copied.synchronize()  # waits for that step's copy only, not for the steps queued since
        return total.item() > 0


def _read_flag(host: torch.Tensor, copied) -> bool:
    """A flag copied by ``_copy_to_host``, once its copy is done."""
    if copied is not None:
        copied.synchronize()
    return bool(host)


def _copy_to_host(tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """``tensor`` copied to pinned host memory without waiting, and the event that marks the copy
    done (None where the tensor is already on the CPU)."""
    if tensor.device.type == "cpu":
        return tensor, None
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    copied = torch.Event(device=tensor.device)
    copied.record()
    return host, copied


@contextlib.contextmanager
def collector_ignoring_setup():
    """The objects made before training (half a million: the libraries, the models' modules) set
    aside from Python's garbage collector while training runs. Its full passes walk every object,
    a pause of 0.25 s on a 2-core CPU, and one can come a few steps into training (when the objects
    left from loading pass its threshold), in the middle of a GPU's queue of work. Training frees
    its own objects by reference counting, and its cycles are still collected. Only the young
    generations are collected first: a full collection there found 0 to 20 unreachable objects,
    and took 0.26 s, on SD 1.5's architecture. A caller that froze objects itself is left to
    manage them."""
    if gc.get_freeze_count():
        yield
        return
    gc.collect(1)
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class Trainer:
    """Runs the optimisation: one ``accelerator.accumulate`` block per batch over every trained
    model, checkpoints every ``checkpointing_steps``, and stops cleanly on a signal."""

    def __init__(self, accelerator, trained: list[torch.nn.Module], optimizer, lr_scheduler, dataloader,
                 schedule: Schedule, loss_fn: Callable[[dict], dict[str, torch.Tensor]],
                 max_grad_norm: float = 1.0, set_grads_to_none: bool = False,
                 checkpointer: Checkpointer | None = None, checkpointing_steps: int | None = None,
                 state: TrainState | None = None, logging_steps: int = 10, max_nonfinite_steps: int = 3,
                 optimizer_in_backward: bool = False, bf16_gradients: bool = False,
                 cast_weights: CastWeightsOnce | None = None):
        from accelerate.utils import DistributedType

        self.accelerator, self.trained = accelerator, trained
        self.optimizer, self.lr_scheduler, self.dataloader = optimizer, lr_scheduler, dataloader
        self.schedule, self.loss_fn = schedule, loss_fn
        self.max_grad_norm, self.set_grads_to_none = max_grad_norm, set_grads_to_none
        self.checkpointer, self.checkpointing_steps = checkpointer, checkpointing_steps
        self.state = state or TrainState()
        self.logging_steps, self.max_nonfinite_steps = logging_steps, max_nonfinite_steps
        self.metrics = Metrics()
        self._window_images = 0
        self._window_losses: list[torch.Tensor] = []  # of this accumulation window's batches
        self.interrupted = False
        self.exit_status = 0  # non-zero once a signal stopped the run
        self._skipped: list[torch.Tensor] = []  # per step, read back at logging steps
        self._nonfinite_streak = 0
        self.step_callbacks: list[Callable[[TrainState], None]] = []  # after each optimizer step
        self.before_step_callbacks: list[Callable[[TrainState], None]] = []  # before each batch
        # Listed once, as walking the UNet's 700 modules costs about 1 ms of host time a step (clipping).
        self._parameters = self._trained_parameters()
        # The script checks support before loading (StepInBackward/Bf16Gradients.check_support).
        self.step_in_backward = StepInBackward(optimizer, self.parameters()) if optimizer_in_backward else None
        self.bf16_gradients = Bf16Gradients(optimizer, trained, max_grad_norm) if bf16_gradients else None
        self.cast_weights = cast_weights
        # DeepSpeed applies the update inside accelerator.backward, where no skip can reach it.
        self.updates_in_backward = accelerator.distributed_type == DistributedType.DEEPSPEED

    def _trained_parameters(self) -> list[torch.nn.Parameter]:
        return [p for module in self.trained for p in module.parameters() if p.requires_grad]

    def parameters(self) -> list[torch.nn.Parameter]:
        return self._parameters

    def freeze(self, module: torch.nn.Module) -> None:
        """Stop training ``module`` mid-run (``freeze_module``)."""
        freeze_module(self.optimizer, module)
        self._parameters = self._trained_parameters()
        if self.cast_weights:
            self.cast_weights.refresh()

    def _epoch_batches(self):
        """This epoch's batches, skipping those a resumed run already trained on."""
        state = self.state
        # Through the loader to its sampler, which gives each index its epoch: Accelerate's skipping
        # copy of a loader sharded across processes does not reach the sampler.
        self.dataloader.set_epoch(state.epoch)
        batches = self.dataloader
        if state.batches_in_epoch:
            batches = self.accelerator.skip_first_batches(self.dataloader, state.batches_in_epoch)
            # Accelerate's copy of the loader forgets its non-blocking copies to the device.
            if hasattr(self.dataloader, "_non_blocking"):
                batches._non_blocking = self.dataloader._non_blocking
        batches.set_epoch(state.epoch)
        return batches

    def _optimizer_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """Forward and backward on one batch; at the end of an accumulation window, the update,
        skipped when any loss of the window on any process was not finite. The skip happens on
        the device (the fused optimizer's ``found_inf``) without waiting for the GPU, or, for an
        optimizer without that, with one read-back."""
        accelerator = self.accelerator
        with accelerator.accumulate(*self.trained):
            with self.cast_weights.during_step() if self.cast_weights else contextlib.nullcontext():
                losses = self.loss_fn(batch)
                self._window_images += len(batch["prompts"])
                # With prior preservation, the step's instance and prior losses are logged beside the total.
                parts = [losses[name] for name in Metrics.PARTS] if "prior_loss" in losses else []
                self._window_losses.append(torch.stack([losses["loss"], *parts]).detach().float())
                if self.step_in_backward:
                    self.step_in_backward.arm((~torch.isfinite(self._window_losses[-1][0])).float())
                skip = self._window_skip() if accelerator.sync_gradients else None
                if self.updates_in_backward:
                    self._stop_before_a_nonfinite_backward()
                accelerator.backward(losses["loss"])
            if self.step_in_backward:
                self.step_in_backward.flush()
            if skip is not None:
                self._update(*skip)
        return losses

    def _stop_before_a_nonfinite_backward(self) -> None:
        """Under DeepSpeed, which updates the weights inside backward: a loss not finite on any
        process stops the run before backward, the weights as they were (one read-back a batch)."""
        nonfinite = (~torch.isfinite(self._window_losses[-1][0])).float()
        if self.accelerator.reduce(nonfinite, reduction="sum").item() > 0:
            raise DreamBoothError(
                f"step {self.state.global_step + 1}: the loss is not finite, and DeepSpeed updates the weights inside "
                "backward, where the update cannot be skipped: stopped before it, so the weights and earlier "
                "checkpoints are intact. Resume with --resume_from_checkpoint latest (with a lower --learning_rate "
                "if it happens again)"
            )

    def _window_skip(self) -> tuple[torch.Tensor, bool | None]:
        """Whether to skip this window's update: a loss of the window, on any process, not finite.
        Made before the window's last backward. For an optimizer that cannot skip on the device, it
        is also copied to the host then, and read at the update: that waits for the forward pass
        alone, so the host queues the update while the GPU still runs the backward. (Read after
        backward, it would wait for the backward, and the GPU would idle while the host queued the
        update: 8-bit AdamW launches a kernel or two per weight.)"""
        nonfinite = (~torch.isfinite(torch.stack(self._window_losses)[:, 0])).float().sum()
        skip = (self.accelerator.reduce(nonfinite, reduction="sum") > 0).float()
        return skip, None if steps_on_device(self.optimizer) else _copy_to_host(skip)

    def _update(self, skip: torch.Tensor, on_host: tuple[torch.Tensor, Any] | None) -> None:
        accelerator = self.accelerator
        self._skipped.append(skip)
        on_device = on_host is None
        if not on_device and _read_flag(*on_host):
            self.optimizer.zero_grad(set_to_none=True)
            if self.bf16_gradients:
                self.bf16_gradients.discard()
            return
        if self.bf16_gradients:
            self.bf16_gradients.update(skip if on_device else False)
        else:
            if self.max_grad_norm > 0:
                accelerator.clip_grad_norm_(self.parameters(), self.max_grad_norm)
            inner = inner_optimizer(self.optimizer)
            if on_device and accelerator.scaler is None:
                inner.found_inf = skip
            self.optimizer.step()
            inner.__dict__.pop("found_inf", None)
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=self.set_grads_to_none)

    def _check_skipped_steps(self) -> None:
        """Read back which recent steps were skipped (one wait for the GPU): warn, and stop after
        ``max_nonfinite_steps`` in a row."""
        if not self._skipped:
            return
        flags = torch.stack(self._skipped).tolist()
        first = self.state.global_step - len(flags) + 1
        self._skipped = []
        for step, skipped in enumerate(flags, start=first):
            self._nonfinite_streak = self._nonfinite_streak + 1 if skipped else 0
            if skipped:
                logger.warning("step %d: loss is not finite; the update was skipped", step)
            if self._nonfinite_streak >= self.max_nonfinite_steps:
                raise DreamBoothError(
                    f"step {step}: the loss was not finite for {self._nonfinite_streak} steps in a row; stopping. "
                    "Likely causes: a learning rate too high (--learning_rate) or fp16 overflow (try "
                    "--mixed_precision bf16 or no); the weights were not updated and earlier checkpoints are intact"
                )

    def _after_step(self, losses: dict[str, torch.Tensor], progress) -> None:
        state = self.state
        state.global_step += 1
        if state.batches_in_epoch >= len(self.dataloader):
            # The epoch is complete: a checkpoint taken now resumes at the next one, on any process count.
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
        self.metrics.add(self._step_loss(), self._window_images * self.accelerator.num_processes)
        self._window_images, self._window_losses = 0, []
        progress.update(1)
        if state.global_step % self.logging_steps == 0 or state.global_step == self.schedule.max_train_steps:
            self._log(progress)
        with self.metrics.paused():
            for callback in self.step_callbacks:
                callback(state)
            if self.checkpointer and self.checkpointing_steps and state.global_step % self.checkpointing_steps == 0:
                self._check_skipped_steps()
                self.checkpointer.save(state, self.trained, self.metrics.losses_so_far(state.global_step))

    def _step_loss(self) -> torch.Tensor:
        """The step's loss (and its parts): the mean over its accumulation window and over the
        processes (on the device: no wait for the GPU)."""
        loss = torch.stack(self._window_losses).mean(dim=0)
        if self.accelerator.num_processes > 1:
            loss = self.accelerator.reduce(loss, reduction="mean")
        return loss

    def _log(self, progress) -> None:
        """The steps since the last logging step, to the progress bar and the trackers (skipped steps first)."""
        self._check_skipped_steps()
        logs = self.metrics.read(self.state.global_step)
        logs["lr"] = self.lr_scheduler.get_last_lr()[0]
        progress.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
        self.accelerator.log(logs, step=self.state.global_step)

    def train(self) -> TrainState:
        accelerator, state, schedule = self.accelerator, self.state, self.schedule
        progress = tqdm(total=schedule.max_train_steps, initial=state.global_step, desc="Steps",
                        disable=not accelerator.is_local_main_process)
        stop_now = StopAgreement(accelerator)
        if state.batches_in_epoch >= len(self.dataloader):
            # A checkpoint from a run with longer epochs (more images, or a smaller batch) is past
            # the end of this run's epoch: carry on from the next one.
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
        # Log lines (a pruned checkpoint, a skipped step) go above the bar instead of onto its line.
        with GracefulStop(extra_steps=stop_now.lag) as stop, logging_redirect_tqdm(tqdm_class=tqdm), \
                collector_ignoring_setup():
            self.metrics.restart_clock()
            while state.global_step < schedule.max_train_steps and not self.interrupted:
                for batch in self._epoch_batches():
                    for callback in self.before_step_callbacks:
                        callback(state)
                    state.batches_in_epoch += 1
                    losses = self._optimizer_step(batch)
                    if not accelerator.sync_gradients:
                        continue
                    self._after_step(losses, progress)
                    if stop_now(stop.requested):
                        self._save_on_stop(progress)
                        self.exit_status = stop.exit_status
                        break
                    if state.global_step >= schedule.max_train_steps:
                        break
        progress.close()
        return state

    def _save_on_stop(self, progress) -> None:
        self.interrupted = True
        if self.metrics.pending:
            # The steps since the last logging step reach the trackers, as a finished run's last steps do;
            # the resumed run logs only the steps after them.
            self._log(progress)
        if self.checkpointer is None:
            return
        saved = [path for step, path in find_checkpoints(self.checkpointer.output_dir) if step == self.state.global_step]
        if not saved:
            self.checkpointer.save(self.state, self.trained, self.metrics.losses_so_far(self.state.global_step))
