"""Runs a script under Accelerate's FSDP engine on the CPU, for the tests:
    accelerate launch --config_file examples/accelerate/fsdp.yaml tests/fsdp_on_cpu.py train_dreambooth.py ...

With no GPU, Accelerate picks its MULTI_CPU engine (DDP over gloo) even under an FSDP config.
Here that choice becomes FSDP, so Accelerate shards the models with torch's FSDP2 over gloo
and saves and loads them its FSDP way, as it would on GPUs.
"""

import os
import runpy
import sys

import accelerate.state
from accelerate.utils import DistributedType

partial_init, accelerator_init = accelerate.state.PartialState.__init__, accelerate.state.AcceleratorState.__init__


def partial_state_init(self, *args, **kwargs):
    partial_init(self, *args, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP


def accelerator_state_init(self, *args, fsdp_plugin=None, **kwargs):
    accelerator_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None:  # kept by Accelerate only for GPU engines
        self.fsdp_plugin = fsdp_plugin


accelerate.state.PartialState.__init__ = partial_state_init
accelerate.state.AcceleratorState.__init__ = accelerator_state_init
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
runpy.run_path(script, run_name="__main__")
