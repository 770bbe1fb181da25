"""The optimizer of a training run: torch's fused AdamW, or bitsandbytes' 8-bit AdamW (--use_8bit_adam)
stepping without waiting for the GPU."""

from __future__ import annotations

import functools
import logging
from typing import Sequence

import torch

from .errors import DreamBoothError, first_reason
from .gradients import inner_optimizer

logger = logging.getLogger(__name__)


def build_optimizer(parameters: Sequence[torch.nn.Parameter] | Sequence[dict], learning_rate: float, betas: tuple[float, float],
                    weight_decay: float, eps: float, use_8bit_adam: bool, device: torch.device) -> torch.optim.Optimizer:
    """AdamW: bitsandbytes' 8-bit version when asked on a CUDA GPU, else torch's fused one.

    Elsewhere --use_8bit_adam falls back to torch's AdamW, even where bitsandbytes (0.50 and later) can
    step its 8-bit AdamW on the CPU: there its kernel dequantizes each weight's two moments to fp32 for
    the update and quantizes them back, a step 10 to 20 times as slow as fused AdamW's, for a saving of
    host memory, which a CPU seldom lacks, not of GPU memory, which the flag is for; and a CPU run then
    follows exact AdamW whether or not bitsandbytes is installed."""
    kwargs = dict(lr=learning_rate, betas=betas, weight_decay=weight_decay, eps=eps)
    if use_8bit_adam:
        if device.type != "cuda":
            logger.warning("--use_8bit_adam needs a CUDA GPU; using torch.optim.AdamW on %s instead", device.type)
        else:
            return adamw_8bit(load_bitsandbytes())(parameters, **kwargs)
    # Fused AdamW: one kernel per step, and it can skip a non-finite step on the device.
    return torch.optim.AdamW(parameters, fused=device.type in ("cuda", "cpu"), **kwargs)


def load_bitsandbytes():
    """bitsandbytes for --use_8bit_adam on a CUDA GPU. A build for another CUDA or torch fails on import
    (an ImportError, or a RuntimeError or OSError of its CUDA set-up, in many lines): said in one."""
    try:
        import bitsandbytes
    except ModuleNotFoundError as error:
        if error.name != "bitsandbytes":  # installed, but something it imports is not
            raise DreamBoothError(f"--use_8bit_adam: bitsandbytes cannot be loaded ({first_reason(error)}); "
                                  "install what it names, or drop the flag") from None
        raise DreamBoothError("--use_8bit_adam: bitsandbytes is not installed, and this CUDA run needs it; "
                              "pip install bitsandbytes, or drop the flag") from None
    except Exception as error:  # noqa: BLE001 - whatever its import raises
        raise DreamBoothError(f"--use_8bit_adam: bitsandbytes cannot be loaded ({first_reason(error)}); install the "
                              "build for this torch and CUDA (pip install -U bitsandbytes), or drop the flag") from None
    return bitsandbytes


def adamw_8bit(bitsandbytes) -> type:
    """bitsandbytes' ``AdamW8bit``, with a step that does not wait for the GPU.

    Its own ``step`` calls ``torch.cuda.synchronize()`` after each weight's update (bitsandbytes 0.45
    to 0.50): 686 times a step for SD 1.5's UNet. Each wait empties the GPU's queue, which then idles
    while the host prepares the next weight's kernel, and the host cannot queue the next step's
    forward pass ahead of the GPU. The waits matter only where the kernels could run out of order:
    bitsandbytes launches them on CUDA's legacy default stream, which is PyTorch's default stream too,
    so a caller working on that stream has them ordered after the gradients and before whatever it
    queues next, as any PyTorch kernel would be. This step is bitsandbytes' own (the same kernels,
    in the same order, on the same state) without the waits; paged state, whose pages move
    asynchronously, or a caller on another stream, gets bitsandbytes' step unchanged."""
    return _no_wait(bitsandbytes.optim.AdamW8bit)


@functools.cache
def _no_wait(base: type) -> type:
    class AdamW8bit(base):
        __doc__ = adamw_8bit.__doc__

        def _waits_needed(self) -> bool:
            if self.is_paged:
                return True
            return torch.cuda.is_available() and torch.cuda.current_stream().cuda_stream != 0

        @torch.no_grad()
        def step(self, closure=None):
            if self._waits_needed():
                return super().step(closure)
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            if not self.initialized:
                self.check_overrides()
                self.to_gpu()
                self.initialized = True
            for gindex, group in enumerate(self.param_groups):
                for pindex, p in enumerate(group["params"]):
                    if p.grad is None:
                        continue
                    if not self.state[p]:
                        self.init_state(group, p, gindex, pindex)
                    self.update_step(group, p, gindex, pindex)
            return loss

    return AdamW8bit


TORCH_ADAMW, EIGHT_BIT_ADAMW = "torch's AdamW", "bitsandbytes' 8-bit AdamW"


def steps_kind(optimizer) -> str:
    """Which AdamW ``optimizer`` steps."""
    kind = type(inner_optimizer(optimizer))
    return EIGHT_BIT_ADAMW if any(cls.__module__.startswith("bitsandbytes") for cls in kind.__mro__) else TORCH_ADAMW


def state_kind(optimizer) -> str | None:
    """Which AdamW made ``optimizer``'s state (as loaded from a checkpoint): None with no state yet,
    or state of another form (an engine's own optimizer)."""
    for state in inner_optimizer(optimizer).state.values():
        if not isinstance(state, dict):
            return None
        # bitsandbytes' moments, or the packed form of its state_dict, which another optimizer keeps as it is.
        if "state1" in state or "__bnb_optimizer_quant_state__" in state:
            return EIGHT_BIT_ADAMW
        if "exp_avg" in state:
            return TORCH_ADAMW
    return None


def check_resumed_state(optimizer, checkpoint) -> None:
    """The optimizer state loaded from ``checkpoint`` is of the AdamW this run steps. The two keep
    different state (8-bit moments and their scales, or fp32 moments), and loading one into the
    other succeeds, then fails at the first step with a KeyError."""
    saved, stepping = state_kind(optimizer), steps_kind(optimizer)
    if saved is None or saved == stepping:
        return
    advice = ("pass --use_8bit_adam, on a CUDA GPU" if saved == EIGHT_BIT_ADAMW else
              "drop --use_8bit_adam (a run on a CPU, where the flag falls back to torch's AdamW, saves torch's state)")
    raise DreamBoothError(f"--resume_from_checkpoint {checkpoint}: its optimizer state is {saved}'s and this run "
                          f"steps {stepping}; resume with the optimizer it was saved with: {advice}")
