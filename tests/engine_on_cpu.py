"""Runs a script under Accelerate's FSDP or DeepSpeed engine on the CPU, for the tests:
    accelerate launch --config_file examples/accelerate/fsdp.yaml tests/engine_on_cpu.py train_dreambooth.py ...
    accelerate launch --config_file examples/accelerate/deepspeed_zero2.yaml tests/engine_on_cpu.py train_dreambooth.py ...

With no GPU, Accelerate picks its MULTI_CPU engine (DDP over gloo) even under an FSDP or
DeepSpeed config. Here that choice becomes the config's engine, so Accelerate shards the models
with torch's FSDP2, or hands them to DeepSpeed (ZeRO over gloo, DeepSpeed's CPU accelerator),
and saves and loads them that engine's way, as it would on GPUs.
"""

import os
import runpy
import sys

import accelerate.state
from accelerate.utils import DistributedType


def configured_engine() -> DistributedType | None:
    """The engine `accelerate launch` was asked for (it says so in the environment)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return DistributedType.DEEPSPEED
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return DistributedType.FSDP
    return None


ENGINE = configured_engine()
partial_init, accelerator_init = accelerate.state.PartialState.__init__, accelerate.state.AcceleratorState.__init__


def partial_state_init(self, *args, **kwargs):
    partial_init(self, *args, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = ENGINE


def accelerator_state_init(self, *args, fsdp_plugin=None, deepspeed_plugin=None, **kwargs):
    accelerator_init(self, *args, fsdp_plugin=fsdp_plugin, deepspeed_plugin=deepspeed_plugin, **kwargs)
    # Accelerate keeps these plugins only for GPU engines.
    if fsdp_plugin is not None:
        self.fsdp_plugin = fsdp_plugin
    if deepspeed_plugin is not None and getattr(self, "deepspeed_plugins", None) is None:
        mixed_precision = kwargs.get("mixed_precision") or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        deepspeed_plugin.set_mixed_precision(mixed_precision)
        deepspeed_plugin.select(_from_accelerator_state=True)
        self.deepspeed_plugins = deepspeed_plugin


if ENGINE is None:
    sys.exit("engine_on_cpu.py: launch it with an FSDP or DeepSpeed config (accelerate launch --config_file ...)")
accelerate.state.PartialState.__init__ = partial_state_init
accelerate.state.AcceleratorState.__init__ = accelerator_state_init
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
runpy.run_path(script, run_name="__main__")
