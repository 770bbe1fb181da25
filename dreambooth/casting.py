"""``--cast_weights_once``: the trained Linear and Conv weights cast to the compute dtype once a
step, a bucket of weights per multi-tensor kernel, instead of by autocast layer by layer.

Under mixed precision, autocast casts each trained weight (and bias) to bf16 or fp16 where a layer
uses it, and casts its gradient back to fp32 in backward: for SD 1.5's UNet about 470 casts each
way, a third of the step's kernels, and with gradient checkpointing the casts again in each
recompute. When the GPU waits for the host to queue kernels (a step well under the card's
arithmetic rate), each of those launches is time. Here the step starts by casting every such
weight in buckets of about ``gradients.BUCKET`` values, and the layers read those copies
(autocast does not cast what is already in its dtype); in backward each bucket's gradients come
back to fp32 in one kernel once the last of them is complete, and the bucket's copies are let go
then, as autocast's copies are as backward uses them. The copies are the values autocast would
make (one rounding of the same fp32 weight) and the gradients the same values, so the training
is unchanged."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

from .errors import DreamBoothError
from .gradients import BF16_LAYERS, in_buckets


class _CastBucket(torch.autograd.Function):
    """A bucket of weights cast to ``dtype`` in one multi-tensor copy; backward casts their
    gradients back the same way and calls ``release`` (the copies are no longer read)."""

    @staticmethod
    def forward(ctx, dtype: torch.dtype, release, *weights: torch.Tensor):
        ctx.set_materialize_grads(False)  # a weight no layer used gets no gradient, as under autocast
        ctx.release = release
        copies = [torch.empty_like(weight, dtype=dtype) for weight in weights]
        torch._foreach_copy_(copies, list(weights))
        return tuple(copies)

    @staticmethod
    def backward(ctx, *gradients):
        ctx.release()
        present = [index for index, gradient in enumerate(gradients) if gradient is not None]
        restored: list[torch.Tensor | None] = [None] * len(gradients)
        if present:
            wide = [torch.empty_like(gradients[index], dtype=torch.float32) for index in present]
            torch._foreach_copy_(wide, [gradients[index] for index in present])
            for index, gradient in zip(present, wide):
                restored[index] = gradient
        return (None, None, *restored)


def _restore(bucket: list) -> None:
    """The layers of ``bucket`` read their fp32 weights again."""
    for layer, name, weight in bucket:
        layer._parameters[name] = weight


class CastWeightsOnce:
    """The trained fp32 weights of ``modules``' Linear and Conv layers, read through copies in the
    compute dtype while a step's forward and backward run (``during_step``)."""

    def __init__(self, modules: Sequence[torch.nn.Module], dtype: torch.dtype):
        self.modules, self.dtype = list(modules), dtype
        self.buckets: list[list[tuple[torch.nn.Module, str, torch.nn.Parameter]]] = []
        self.refresh()

    def refresh(self) -> None:
        """Bucket the weights trained now (after a module stopped training, without its weights)."""
        slots = [(layer, name, weight) for module in self.modules for layer in module.modules()
                 if isinstance(layer, BF16_LAYERS) for name, weight in layer._parameters.items()
                 if weight is not None and weight.requires_grad and weight.dtype == torch.float32]
        self.buckets = list(in_buckets(slots, numel=lambda slot: slot[2].numel()))

    @contextmanager
    def during_step(self) -> Iterator[None]:
        """Forward and backward inside: each layer reads its weights' copy; after it, the weights."""
        try:
            for bucket in self.buckets:
                self._read_copies(bucket)
            yield
        finally:
            for bucket in self.buckets:
                _restore(bucket)

    def _read_copies(self, bucket: list) -> None:
        # Only the layers and the graph hold the copies: a bucket's are freed when its backward ends.
        copies = _CastBucket.apply(self.dtype, lambda: _restore(bucket), *[weight for _, _, weight in bucket])
        for (layer, name, _), copy in zip(bucket, copies):
            layer._parameters[name] = copy

    @staticmethod
    def check_support(accelerator, compile: bool) -> None:
        from accelerate.utils import DistributedType

        reason = None
        if accelerator.mixed_precision not in ("bf16", "fp16"):
            reason = "needs --mixed_precision bf16 or fp16, whose autocast it replaces for the trained weights"
        elif compile:
            reason = "and --compile cannot be combined: the compiled UNet casts inside its own kernels"
        elif accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
            reason = "cannot be combined with DeepSpeed or FSDP, which hold the weights themselves"
        if reason:
            raise DreamBoothError(f"--cast_weights_once {reason}")
