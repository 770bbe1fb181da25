"""--use_8bit_adam: bitsandbytes' 8-bit AdamW on a CUDA GPU, torch's AdamW elsewhere, where bitsandbytes
is then not needed at all."""

from __future__ import annotations

import logging
import sys

import pytest
import torch

import train_dreambooth
from conftest import one_thread, train_args
from dreambooth.config import TrainConfig
from dreambooth.engine import check_cuda_libraries
from dreambooth.errors import DreamBoothError
from dreambooth.training import build_optimizer, inner_optimizer

NOT_INSTALLED = (r"^--use_8bit_adam: bitsandbytes is not installed, and this CUDA run needs it; "
                 r"pip install bitsandbytes, or drop the flag$")


@pytest.fixture
def without_bitsandbytes(monkeypatch):
    """bitsandbytes not installed: its import fails, and importlib finds no module of that name."""
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)


def test_cpu_run_without_bitsandbytes_trains_with_torch_adamw(tiny_model, instance_dir, tmp_path,
                                                             without_bitsandbytes, caplog):
    with one_thread():
        with caplog.at_level(logging.WARNING, logger="dreambooth"):
            eight_bit = train_dreambooth.main(train_args(tiny_model, instance_dir, tmp_path / "8bit", "--use_8bit_adam"))
        plain = train_dreambooth.main(train_args(tiny_model, instance_dir, tmp_path / "plain"))
    assert type(inner_optimizer(eight_bit.optimizer)) is torch.optim.AdamW
    assert "--use_8bit_adam needs a CUDA GPU; using torch.optim.AdamW on cpu instead" in caplog.text
    # The same steps as without the flag: the run trained, with torch's AdamW and nothing else.
    assert eight_bit.state.global_step == plain.state.global_step == 2
    for ours, theirs in zip(eight_bit.parameters(), plain.parameters(), strict=True):
        assert torch.equal(ours, theirs)
    assert (tmp_path / "8bit" / "unet").is_dir()


def test_cuda_run_without_bitsandbytes_is_refused_in_one_line_at_start(tiny_model, instance_dir, tmp_path,
                                                                      without_bitsandbytes, monkeypatch):
    """On a CUDA GPU (the Accelerator's device, simulated) the flag needs bitsandbytes: refused before
    any weights load, and where the optimizer is built."""
    from accelerate import Accelerator

    def refuse(*args, **kwargs):
        raise AssertionError("the base model was loaded before the refusal")

    monkeypatch.setattr(Accelerator, "device", property(lambda self: torch.device("cuda")))
    monkeypatch.setattr(train_dreambooth, "load_components", refuse)
    with pytest.raises(DreamBoothError, match=NOT_INSTALLED) as refused:
        train_dreambooth.main(train_args(tiny_model, instance_dir, tmp_path / "out", "--use_8bit_adam"))
    assert "\n" not in str(refused.value)
    with pytest.raises(DreamBoothError, match=NOT_INSTALLED):
        build_optimizer([torch.nn.Parameter(torch.ones(4))], 1e-4, (0.9, 0.999), 0.0, 1e-8, use_8bit_adam=True,
                        device=torch.device("cuda"))
    check_cuda_libraries(TrainConfig(use_8bit_adam=True), torch.device("cpu"))  # the CPU needs none
