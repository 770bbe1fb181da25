"""--use_8bit_adam: bitsandbytes' 8-bit AdamW on a CUDA GPU, torch's AdamW elsewhere, where bitsandbytes
is then not needed at all."""

from __future__ import annotations

import copy
import logging
import sys

import pytest
import torch

import train_dreambooth
from conftest import bitsandbytes_adamw_8bit_on_cpu, one_thread, train_args
from dreambooth.config import TrainConfig
from dreambooth.engine import check_cuda_libraries
from dreambooth.errors import DreamBoothError
from dreambooth.gradients import inner_optimizer
from dreambooth.optimizers import build_optimizer

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


def test_8bit_adamw_steps_as_bitsandbytes_does_without_waiting_for_the_gpu(monkeypatch):
    """bitsandbytes' own step waits for the GPU after every weight (``sync_gpu``, torch.cuda.synchronize
    on a GPU); the suite's makes the same update without a wait, where its kernels are ordered anyway."""
    import bitsandbytes
    from bitsandbytes.optim import optimizer as bitsandbytes_optimizer

    from dreambooth.optimizers import adamw_8bit

    theirs_class = bitsandbytes_adamw_8bit_on_cpu()
    waits = []
    monkeypatch.setattr(bitsandbytes_optimizer, "sync_gpu", waits.append)
    ours_class = adamw_8bit(bitsandbytes)
    assert issubclass(ours_class, theirs_class) and adamw_8bit(bitsandbytes) is ours_class
    optimizer = build_optimizer([torch.nn.Parameter(torch.ones(4))], 1e-4, (0.9, 0.999), 0.0, 1e-8, use_8bit_adam=True,
                                device=torch.device("cuda"))  # built, not stepped: no GPU is needed for that
    assert type(optimizer) is ours_class

    torch.manual_seed(0)
    # 8-bit state for the weights (>= 4096 values), 32-bit for the biases; the last bias frozen (no gradient).
    model = torch.nn.Sequential(torch.nn.Linear(96, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))
    model[2].bias.requires_grad_(False)
    twin = copy.deepcopy(model)
    ours = ours_class(model.parameters(), lr=1e-2, weight_decay=1e-2)
    theirs = theirs_class(twin.parameters(), lr=1e-2, weight_decay=1e-2)
    for _ in range(3):
        batch = torch.randn(8, 96)
        for network in (model, twin):
            network.zero_grad(set_to_none=True)
            network(batch).pow(2).mean().backward()
        ours.step()
        assert waits == []
        theirs.step()
        assert len(waits) == 3  # one per weight with a gradient
        waits.clear()
    for mine, reference in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(mine, reference)
    for mine, reference in zip(ours.state.values(), theirs.state.values(), strict=True):
        assert mine.keys() == reference.keys() and mine["step"] == reference["step"] == 3
        assert all(torch.equal(mine[key], reference[key]) for key in mine if torch.is_tensor(mine[key]))

    # Where the order is not certain, bitsandbytes' own step, waits included: paged state, another stream.
    with pytest.warns(UserWarning, match="Paged optimizers are not supported on CPU"):
        paged = ours_class(model.parameters(), lr=1e-2, is_paged=True)
        paged.step()
    assert len(waits) == 3 + 1  # and one more at the end for paged state
    waits.clear()
    side_stream = type("Stream", (), {"cuda_stream": 7})()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: side_stream)
    ours.step()
    assert len(waits) == 3


def test_a_checkpoint_resumes_only_with_the_adamw_that_saved_it(tiny_model, instance_dir, tmp_path, monkeypatch):
    """torch's AdamW and 8-bit AdamW keep different state, and loading one into the other succeeds,
    then fails at the first step with a KeyError: refused in one line naming the flag, nothing lost."""
    import bitsandbytes

    from dreambooth import optimizers

    bitsandbytes_adamw_8bit_on_cpu()

    def eight_bit(parameters, learning_rate, betas, weight_decay, eps, use_8bit_adam, device):
        # 8-bit AdamW on the CPU, as a CUDA run steps it (the script falls back to torch's AdamW here).
        return optimizers.adamw_8bit(bitsandbytes)(parameters, lr=learning_rate, betas=betas,
                                                   weight_decay=weight_decay, eps=eps)

    runs = {"torch": tmp_path / "torch", "8bit": tmp_path / "8bit"}
    common = ["--max_train_steps", "1", "--checkpointing_steps", "1"]
    train_dreambooth.main(train_args(tiny_model, instance_dir, runs["torch"], *common))
    with monkeypatch.context() as patch:
        patch.setattr(train_dreambooth, "build_optimizer", eight_bit)
        train_dreambooth.main(train_args(tiny_model, instance_dir, runs["8bit"], *common))
    resume = [*common, "--max_train_steps", "2", "--resume_from_checkpoint", "checkpoint-1"]
    for saved, stepping, advice in (("torch", "8bit", "drop --use_8bit_adam"), ("8bit", "torch", "pass --use_8bit_adam")):
        before = sorted(path.name for path in runs[saved].iterdir())
        with monkeypatch.context() as patch:
            if stepping == "8bit":
                patch.setattr(train_dreambooth, "build_optimizer", eight_bit)
            with pytest.raises(DreamBoothError, match=rf"checkpoint-1: its optimizer state is .*'s and this run steps "
                                                      rf".*; resume with the optimizer it was saved with: {advice}"):
                train_dreambooth.main(train_args(tiny_model, instance_dir, runs[saved], *resume))
        assert sorted(path.name for path in runs[saved].iterdir()) == before
    # With the optimizer it was saved with, the 8-bit checkpoint resumes and trains on.
    with monkeypatch.context() as patch:
        patch.setattr(train_dreambooth, "build_optimizer", eight_bit)
        resumed = train_dreambooth.main(train_args(tiny_model, instance_dir, runs["8bit"], *resume))
    assert resumed.state.global_step == 2
