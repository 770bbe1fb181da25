"""Less memory for the gradients, with the same update: step the weights inside backward as their
gradients complete (``--optimizer_in_backward``), or hold the gradients in bf16 until the update
(``--bf16_gradients``)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence, TypeVar

import torch

from .errors import DreamBoothError

T = TypeVar("T")


def inner_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def steps_on_device(optimizer) -> bool:
    """Whether the optimizer can skip a step on the device (``found_inf``), as torch's fused ones do."""
    return getattr(inner_optimizer(optimizer), "_step_supports_amp_scaling", False)


@contextmanager
def _restricted(optimizer: torch.optim.Optimizer, parameters: Sequence[torch.nn.Parameter],
                group_of: dict[int, int]) -> Iterator[None]:
    """``optimizer`` sees only ``parameters``, each in the param group it belongs to (its lr and decay)."""
    groups = optimizer.param_groups
    all_params = [group["params"] for group in groups]
    for group in groups:
        group["params"] = []
    for parameter in parameters:
        groups[group_of[id(parameter)]]["params"].append(parameter)
    try:
        yield
    finally:
        for group, params in zip(groups, all_params):
            group["params"] = params


def step_some(optimizer: torch.optim.Optimizer, parameters: Sequence[torch.nn.Parameter], group_of: dict[int, int],
              skip: torch.Tensor | bool) -> None:
    """One optimizer step of ``parameters`` alone. It is the same step as for all weights at once
    (AdamW's state and step count are per weight). ``skip`` (tensor): skip on the device with a
    fused optimizer; (bool): skip here."""
    with _restricted(optimizer, parameters, group_of):
        if torch.is_tensor(skip):
            optimizer.found_inf = skip
            try:
                optimizer.step()
            finally:
                optimizer.__dict__.pop("found_inf", None)
        elif not skip:
            optimizer.step()


# Values whose fp32 gradients one optimizer call takes (64 MB): few calls for a UNet's ~700
# weights, little memory for the gradients that wait.
BUCKET = 2**24


def _group_index(optimizer: torch.optim.Optimizer) -> dict[int, int]:
    return {id(p): index for index, group in enumerate(optimizer.param_groups) for p in group["params"]}


def in_buckets(items: Sequence[T], numel: Callable[[T], int] = torch.Tensor.numel) -> Iterator[list[T]]:
    """``items`` (weights, or what holds them) in order, in runs of at least ``BUCKET`` values
    (the last one shorter)."""
    bucket, size = [], 0
    for item in items:
        bucket.append(item)
        size += numel(item)
        if size >= BUCKET:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


def _check_one_process_window(accelerator, flag: str, needs: str) -> None:
    """What both techniques need: all of a step's gradients on one process, in one backward."""
    from accelerate.utils import DistributedType

    reason = None
    if accelerator.num_processes > 1 or accelerator.distributed_type != DistributedType.NO:
        reason = f"runs on one process only ({needs})"
    elif accelerator.gradient_accumulation_steps > 1:
        reason = "cannot accumulate gradients: pass --gradient_accumulation_steps 1"
    if reason:
        raise DreamBoothError(f"{flag} {reason}")


class StepInBackward:
    """``--optimizer_in_backward``: the optimizer steps the weights inside backward, as soon as
    their gradients are complete (a post-accumulate-grad hook), and frees those gradients at once,
    so the gradients of the whole model never exist together: that saves their memory (4 bytes
    per trained weight in fp32). Weights are stepped in buckets of about ``BUCKET`` values, in the
    order their gradients arrive, not one optimizer call each. It is the same optimizer, state and lr schedule, each step restricted to some
    weights, so the maths is unchanged; what needs every gradient first (clipping, accumulation,
    a DDP all-reduce, fp16 loss scaling) cannot be combined with it."""

    def __init__(self, optimizer, parameters: Sequence[torch.nn.Parameter]):
        self.optimizer = inner_optimizer(optimizer)
        self._fused = steps_on_device(optimizer)
        self._group_of = _group_index(self.optimizer)
        self._skip: torch.Tensor | bool = False
        self._bucket: list[torch.nn.Parameter] = []
        self._bucket_size = 0
        self._handles = [p.register_post_accumulate_grad_hook(self._collect) for p in parameters]

    def arm(self, nonfinite: torch.Tensor) -> None:
        """Before backward: skip this step's updates if the loss is not finite (on the device with
        a fused optimizer, else with one read-back)."""
        self._skip = nonfinite if self._fused else bool(nonfinite)

    def _collect(self, parameter: torch.nn.Parameter) -> None:
        self._bucket.append(parameter)
        self._bucket_size += parameter.numel()
        if self._bucket_size >= BUCKET:
            self.flush()

    def flush(self) -> None:
        """Step the weights whose gradients wait in the bucket and free those gradients (after
        backward: the last ones)."""
        bucket, self._bucket, self._bucket_size = self._bucket, [], 0
        if not bucket:
            return
        try:
            step_some(self.optimizer, bucket, self._group_of, self._skip)
        finally:
            for parameter in bucket:
                parameter.grad = None

    @staticmethod
    def check_support(accelerator, max_grad_norm: float) -> None:
        _check_one_process_window(accelerator, "--optimizer_in_backward",
                                  "a multi-process all-reduce needs every gradient first")
        if max_grad_norm > 0:
            raise DreamBoothError("--optimizer_in_backward cannot clip gradients, which needs all of them first: "
                                  "pass --max_grad_norm 0")
        if accelerator.mixed_precision == "fp16":
            raise DreamBoothError("--optimizer_in_backward cannot use fp16's loss scaling: use --mixed_precision bf16 "
                                  "or no")


# Under bf16 autocast these layers compute in bf16: their weights and biases are cast to bf16, so
# their gradients come back through that cast as bf16 values, merely stored in fp32.
BF16_LAYERS = (torch.nn.Linear, torch.nn.Conv2d)


class Bf16Gradients:
    """``--bf16_gradients``: under bf16 mixed precision, the gradient of a Linear or Conv weight
    (nearly all of a UNet's weights) is a bf16 value that autograd stores in fp32. Converting it
    to bf16 as soon as it is complete (a post-accumulate-grad hook) loses nothing and halves the
    memory the gradients hold until the update. The update then clips with the norm of all
    gradients (as ``torch.nn.utils.clip_grad_norm_``) and steps the optimizer a bucket of weights
    at a time, each bucket's gradients back in fp32 only for its step: the same values, the same
    clipping and the same AdamW step as with fp32 gradients. Other weights (norms, embeddings) keep
    fp32 gradients.

    The work goes by buckets of about ``BUCKET`` values, not weight by weight: a bucket's completed
    fp32 gradients are converted together (so at most a bucket of them waits in fp32), and at the
    update a bucket is converted back and clipped together. A UNet's ~700 weights then take a few
    dozen multi-tensor kernels for what took three kernels a weight (conversion, norm, scaling)."""

    def __init__(self, optimizer, modules: Sequence[torch.nn.Module], max_grad_norm: float):
        self.optimizer = inner_optimizer(optimizer)
        self._group_of = _group_index(self.optimizer)
        self.parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.max_grad_norm = max_grad_norm  # 0: no clipping
        held = {id(p) for module in modules for layer in module.modules() if isinstance(layer, BF16_LAYERS)
                for p in layer.parameters(recurse=False)}
        self._held: dict[torch.nn.Parameter, torch.Tensor] = {}
        self._norms: dict[torch.nn.Parameter, torch.Tensor] = {}
        self._waiting: dict[torch.nn.Parameter, None] = {}  # completed fp32 gradients, in arrival order
        self._waiting_size = 0
        self._handles = [p.register_post_accumulate_grad_hook(self._hold) for p in self.parameters if id(p) in held]

    def _hold(self, parameter: torch.nn.Parameter) -> None:
        if parameter in self._held or parameter in self._waiting:
            raise DreamBoothError("--bf16_gradients: a weight received two gradients in one step, which bf16 "
                                  "cannot hold exactly; drop the flag")
        self._waiting[parameter] = None
        self._waiting_size += parameter.numel()
        if self._waiting_size >= BUCKET:
            self._convert_waiting()

    def _convert_waiting(self) -> None:
        """Hold the waiting gradients in bf16 (their norms first, in fp32, when clipping)."""
        waiting, self._waiting, self._waiting_size = list(self._waiting), {}, 0
        if not waiting:
            return
        gradients = [p.grad for p in waiting]
        if self.max_grad_norm > 0:
            self._norms.update(zip(waiting, torch._foreach_norm(gradients)))
        held = [torch.empty_like(g, dtype=torch.bfloat16) for g in gradients]
        torch._foreach_copy_(held, gradients)
        for parameter, gradient in zip(waiting, held):
            parameter.grad = None
            self._held[parameter] = gradient

    def _with_gradients(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters if p in self._held or p.grad is not None]

    def update(self, skip: torch.Tensor | bool) -> torch.Tensor | None:
        """Clip and step every weight with a gradient, a bucket at a time (``skip`` as for
        ``step_some``); the gradients' total norm when clipping, as ``clip_grad_norm_`` returns it."""
        self._convert_waiting()
        parameters = self._with_gradients()
        total_norm = clip_coefficient = None
        if self.max_grad_norm > 0 and parameters:
            unheld = [p for p in parameters if p not in self._norms]
            if unheld:
                self._norms.update(zip(unheld, torch._foreach_norm([p.grad for p in unheld])))
            total_norm = torch.linalg.vector_norm(torch.stack([self._norms.pop(p) for p in parameters]))
            # As clip_grad_norm_: scale by min(1, max_norm / (norm + 1e-6)) without a read-back.
            clip_coefficient = torch.clamp(self.max_grad_norm / (total_norm + 1e-6), max=1.0)
        for bucket in in_buckets(parameters):
            held = [p for p in bucket if p in self._held]
            if held:
                gradients = [torch.empty_like(p) for p in held]
                torch._foreach_copy_(gradients, [self._held.pop(p) for p in held])
                for parameter, gradient in zip(held, gradients):
                    parameter.grad = gradient
            if clip_coefficient is not None:
                torch._foreach_mul_([p.grad for p in bucket], clip_coefficient)
            step_some(self.optimizer, bucket, self._group_of, skip)
            for parameter in bucket:
                parameter.grad = None
        return total_norm

    def discard(self) -> None:
        """Drop this step's gradients (a skipped update)."""
        self._held.clear()
        self._norms.clear()
        self._waiting.clear()
        self._waiting_size = 0

    @staticmethod
    def check_support(accelerator, optimizer_in_backward: bool) -> None:
        if accelerator.mixed_precision != "bf16":
            raise DreamBoothError("--bf16_gradients needs --mixed_precision bf16, under which the gradients are "
                                  "bf16 values")
        if optimizer_in_backward:
            raise DreamBoothError("--bf16_gradients and --optimizer_in_backward both save the gradients' memory; "
                                  "pass one of them")
        _check_one_process_window(accelerator, "--bf16_gradients", "DDP reduces the fp32 gradients")
