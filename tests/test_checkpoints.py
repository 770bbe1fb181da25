"""Checkpoints, exact resume and fault tolerance."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import infer
import train_dreambooth
from conftest import ROOT, TOY_SUBJECT, assert_readable_by_all, train_args
from dreambooth.checkpoints import (
    LOSS_HISTORY,
    MARKER,
    Checkpointer,
    TrainState,
    check_checkpoint_fits,
    find_checkpoints,
    read_loss_history,
    read_state,
    resolve_resume,
)
from dreambooth.errors import DreamBoothError
from dreambooth.training import Trainer


def unet_weights(folder) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def stop_after_step(monkeypatch, step: int, signum=signal.SIGTERM, times: int = 1) -> None:
    """Deliver ``signum`` to this process right after optimizer step ``step``."""
    original = Trainer._after_step

    def after_step(self, losses, progress):
        original(self, losses, progress)
        if self.state.global_step == step:
            for _ in range(times):
                signal.raise_signal(signum)

    monkeypatch.setattr(Trainer, "_after_step", after_step)


def checkpoint_steps(output) -> list[int]:
    return [step for step, _ in find_checkpoints(output)]


@pytest.fixture
def class_dir(tmp_path):
    folder = tmp_path / "class"
    shutil.copytree(TOY_SUBJECT, folder)
    return folder


RESUME_CASES = {
    "plain": [],
    "prior_preservation": ["--with_prior_preservation", "--class_prompt", "a photo of a toy", "--num_class_images", "5"],
    "accumulation_flip_text_encoder": ["--gradient_accumulation_steps", "2", "--random_flip", "--train_text_encoder"],
    "buckets_prior_preservation": ["--enable_bucket", "--with_prior_preservation", "--class_prompt", "a photo of a toy",
                                   "--num_class_images", "5", "--random_flip"],
    "bf16_gradients_text_encoder": ["--mixed_precision", "bf16", "--bf16_gradients", "--train_text_encoder",
                                    "--text_encoder_lr", "3e-4"],
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tiny_model, instance_dir, class_dir, tmp_path,
                                                                 monkeypatch, case):
    extra = [*RESUME_CASES[case], "--class_data_dir", str(class_dir), "--max_train_steps", "6",
             "--checkpointing_steps", "3", "--lr_scheduler", "cosine", "--lr_warmup_steps", "2",
             "--save_precision", "fp32"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    uninterrupted = train_dreambooth.main(train_args(tiny_model, instance_dir, whole, *extra))

    with monkeypatch.context() as patch:
        stop_after_step(patch, 3)
        stopped = train_dreambooth.main(train_args(tiny_model, instance_dir, parts, *extra))
    assert stopped.interrupted and stopped.state.global_step == 3
    assert not (parts / "model_index.json").exists()
    resumed = train_dreambooth.main(train_args(tiny_model, instance_dir, parts, *extra,
                                               "--resume_from_checkpoint", "latest"))
    assert resumed.state.global_step == 6
    assert_bitwise_equal(unet_weights(whole), unet_weights(parts))
    # The loss curve of the resumed run starts at step 1: the checkpoint carried steps 1-3.
    assert [step for step, _ in resumed.metrics.history] == list(range(1, 7))
    assert resumed.metrics.history == uninterrupted.metrics.history
    if "--train_text_encoder" in extra:
        assert_bitwise_equal(load_file(whole / "text_encoder" / "model.safetensors"),
                             load_file(parts / "text_encoder" / "model.safetensors"))


def test_sigterm_between_checkpoints_saves_the_current_step(tiny_model, instance_dir, tmp_path, monkeypatch, capfd):
    output = tmp_path / "out"
    stop_after_step(monkeypatch, 3)
    trainer = train_dreambooth.main(train_args(tiny_model, instance_dir, output, "--max_train_steps", "8",
                                               "--checkpointing_steps", "2"))
    assert trainer.interrupted and trainer.exit_status == 128 + signal.SIGTERM
    assert checkpoint_steps(output) == [2, 3]
    assert [step for step, _ in read_loss_history(output / "checkpoint-3")] == [1, 2, 3]
    assert read_loss_history(output / "checkpoint-2") == read_loss_history(output / "checkpoint-3")[:2]
    assert "--resume_from_checkpoint latest" in capfd.readouterr().err


def test_a_signal_while_the_trained_model_is_saved_waits_for_it_then_skips_the_rest(tiny_model, instance_dir,
                                                                                  tmp_path, monkeypatch, capfd):
    from dreambooth.cli import run_cli

    original = train_dreambooth.save_trained

    def signalled_save(*args):
        signal.raise_signal(signal.SIGINT)  # Ctrl-C just as the last step's weights are being saved
        original(*args)

    monkeypatch.setattr(train_dreambooth, "save_trained", signalled_save)
    output = tmp_path / "out"
    status = run_cli(train_dreambooth.main, train_args(tiny_model, instance_dir, output, "--num_validation_images",
                                                       "1", "--validation_inference_steps", "1"))
    assert status == 128 + signal.SIGINT
    assert (output / "model_index.json").is_file() and (output / "README.md").is_file()
    assert not (output / "samples").exists()  # the final sampling was skipped
    assert "stopped after saving the trained model" in capfd.readouterr().err


def test_second_ctrl_c_aborts_at_once(tiny_model, instance_dir, tmp_path, monkeypatch):
    output = tmp_path / "out"
    handler_before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a background job
    stop_after_step(monkeypatch, 1, signum=signal.SIGINT, times=2)
    with pytest.raises(KeyboardInterrupt):
        train_dreambooth.main(train_args(tiny_model, instance_dir, output, "--max_train_steps", "8",
                                         "--checkpointing_steps", "5"))
    assert checkpoint_steps(output) == []
    assert not (output / "model_index.json").exists()
    assert signal.getsignal(signal.SIGINT) == handler_before  # the run's handler is gone


def test_checkpoint_holds_diffusers_weights_and_samples_with_infer(tiny_model, instance_dir, tmp_path, umask_022):
    output = tmp_path / "out"
    train_dreambooth.main(train_args(tiny_model, instance_dir, output, "--checkpointing_steps", "2"))
    checkpoint = output / "checkpoint-2"
    assert_readable_by_all(checkpoint)
    # The checkpoint keeps fp32 training weights; the final model is saved in fp16 by default.
    assert_bitwise_equal({k: v.half() for k, v in unet_weights(checkpoint).items()}, unet_weights(output))
    assert not list(checkpoint.glob("model*.safetensors")), "weights must be stored once, in unet/"
    assert json.loads((checkpoint / MARKER).read_text())["train_state"]["global_step"] == 2
    written = infer.main(["--checkpoint", str(checkpoint), "--prompt", "a photo of sks toy", "--num_images_per_prompt",
                          "1", "--num_inference_steps", "2", "--seed", "0", "--output_dir", str(tmp_path / "samples")])
    assert len(written) == 1 and written[0].is_file()
    # The image names the checkpoint that drew it and its base, by name only.
    info = Image.open(written[0]).info
    assert info["parameters"].endswith("Model: checkpoint-2")
    assert (info["checkpoint"], info["base_model"]) == ("checkpoint-2", Path(tiny_model).name)
    assert not any(str(tmp_path) in value or str(Path(tiny_model).parent) in value for value in info.values())


def test_total_limit_keeps_the_newest(tiny_model, instance_dir, tmp_path):
    output = tmp_path / "out"
    args = train_args(tiny_model, instance_dir, output, "--max_train_steps", "6", "--checkpointing_steps", "2")
    train_dreambooth.main(args + ["--checkpoints_total_limit", "2"])
    assert checkpoint_steps(output) == [4, 6]
    train_dreambooth.main(args + ["--max_train_steps", "10", "--checkpoints_total_limit", "3",
                                  "--resume_from_checkpoint", "checkpoint-6"])
    assert checkpoint_steps(output) == [6, 8, 10]


def test_a_run_branching_from_an_earlier_checkpoint_keeps_its_own(tiny_model, instance_dir, tmp_path):
    """Checkpoints count in the order they were written: the abandoned higher-numbered ones go first."""
    output = tmp_path / "out"
    args = train_args(tiny_model, instance_dir, output, "--max_train_steps", "6", "--checkpointing_steps", "3")
    train_dreambooth.main(args)
    assert checkpoint_steps(output) == [3, 6]
    branch = ["--max_train_steps", "5", "--checkpointing_steps", "1", "--resume_from_checkpoint", "checkpoint-3"]
    train_dreambooth.main(args + branch + ["--checkpoints_total_limit", "1"])
    assert checkpoint_steps(output) == [5]
    # Without a limit, `latest` is the branch's last checkpoint, not the abandoned step 6.
    train_dreambooth.main(args + ["--max_train_steps", "4", "--checkpointing_steps", "2", "--overwrite_output_dir"])
    assert checkpoint_steps(output) == [5, 2, 4] and resolve_resume(output, "latest") == output / "checkpoint-4"


def test_resume_refuses_a_checkpoint_of_another_kind_of_run(tiny_model, instance_dir, tmp_path):
    lora, full = tmp_path / "lora", tmp_path / "full"
    common = ["--max_train_steps", "1", "--checkpointing_steps", "1"]
    train_dreambooth.main(train_args(tiny_model, instance_dir, lora, *common, "--use_lora"))
    train_dreambooth.main(train_args(tiny_model, instance_dir, full, *common))
    cases = [
        (lora, [], r"it trains LoRA on the UNet, these flags UNet;"),
        (full, ["--use_lora"], r"it trains UNet, these flags LoRA on the UNet;"),
        (full, ["--train_text_encoder"], r"it trains UNet, these flags UNet and text encoder;"),
        (lora, ["--use_lora", "--rank", "8"], r"does not fit this run \(.*size mismatch"),
    ]
    for run, flags, message in cases:
        before = sorted(path.name for path in run.iterdir())
        with pytest.raises(DreamBoothError, match=message):
            train_dreambooth.main(train_args(tiny_model, instance_dir, run, *common, "--max_train_steps", "2",
                                             "--resume_from_checkpoint", "checkpoint-1", *flags))
        assert sorted(path.name for path in run.iterdir()) == before


def test_resume_past_the_end_of_a_shorter_epoch_goes_on_with_the_next(tiny_model, instance_dir, tmp_path):
    output = tmp_path / "out"
    # Batches of 1 over 5 images: checkpoint-3 is 3 batches into epoch 0.
    train_dreambooth.main(train_args(tiny_model, instance_dir, output, "--max_train_steps", "3",
                                     "--checkpointing_steps", "3"))
    # Batches of 4: an epoch is 2 batches, so position 3 is past its end (this hung).
    resumed = train_dreambooth.main(train_args(tiny_model, instance_dir, output, "--max_train_steps", "5",
                                               "--train_batch_size", "4", "--resume_from_checkpoint", "latest"))
    assert resumed.state.global_step == 5 and resumed.state.epoch == 2


def test_polynomial_schedule_numbers_are_checked_before_training(tiny_model, instance_dir, tmp_path):
    output = tmp_path / "out"
    with pytest.raises(DreamBoothError, match="--lr_warmup_steps 2: leaves --lr_scheduler polynomial no step"):
        train_dreambooth.main(train_args(tiny_model, instance_dir, output, "--lr_scheduler", "polynomial",
                                         "--lr_warmup_steps", "2"))
    with pytest.raises(DreamBoothError, match="--learning_rate 1e-08: --lr_scheduler polynomial decays to 1e-7"):
        train_dreambooth.main(train_args(tiny_model, instance_dir, output, "--lr_scheduler", "polynomial",
                                         "--learning_rate", "1e-8"))
    trainer = train_dreambooth.main(train_args(tiny_model, instance_dir, output, "--lr_scheduler", "polynomial",
                                               "--lr_warmup_steps", "1"))
    assert trainer.state.global_step == 2


def test_latest_skips_incomplete_and_stray_folders(tiny_model, instance_dir, tmp_path, caplog):
    output = tmp_path / "out"
    train_dreambooth.main(train_args(tiny_model, instance_dir, output, "--max_train_steps", "4",
                                     "--checkpointing_steps", "2"))
    (output / "checkpoint-4" / MARKER).unlink()
    for stray in ("checkpoint-final", "checkpoint-", "checkpoints", ".checkpoint-6.tmp"):
        (output / stray).mkdir()
    (output / "checkpoint-9").write_text("a file, not a folder")
    assert resolve_resume(output, "latest") == output / "checkpoint-2"
    assert "checkpoint-4: no checkpoint_complete.json, so not a checkpoint of this suite" in caplog.text
    with pytest.raises(DreamBoothError, match="checkpoint-4: no checkpoint_complete.json, so not a checkpoint"):
        resolve_resume(output, "checkpoint-4")
    # Only unmarked checkpoints (another script's, e.g. diffusers'): "latest" refuses rather than start afresh.
    (output / "checkpoint-2" / MARKER).unlink()
    with pytest.raises(DreamBoothError, match="latest: .*checkpoint-4 has no checkpoint_complete.json"):
        resolve_resume(output, "latest")


def test_latest_with_no_checkpoint_starts_fresh_and_missing_path_is_an_error(tiny_model, instance_dir, tmp_path):
    trainer = train_dreambooth.main(train_args(tiny_model, instance_dir, tmp_path / "a",
                                               "--resume_from_checkpoint", "latest"))
    assert trainer.state.global_step == 2
    # Finished, with no checkpoint (the default interval is 500 steps): nothing to resume, the model stays.
    with pytest.raises(DreamBoothError, match="holds a trained model and no checkpoint to resume"):
        train_dreambooth.main(train_args(tiny_model, instance_dir, tmp_path / "a",
                                         "--resume_from_checkpoint", "latest"))
    with pytest.raises(DreamBoothError, match="--resume_from_checkpoint .*no such checkpoint"):
        train_dreambooth.main(train_args(tiny_model, instance_dir, tmp_path / "b",
                                         "--resume_from_checkpoint", str(tmp_path / "nope")))


@pytest.mark.parametrize("extra", [[], ["--mixed_precision", "bf16", "--bf16_gradients"]],
                         ids=["fp32_gradients", "bf16_gradients"])
def test_nonfinite_loss_stops_the_run_without_saving_nonfinite_weights(tiny_model, instance_dir, tmp_path,
                                                                      monkeypatch, extra):
    calls = {"n": 0}
    original = train_dreambooth.training_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        losses = original(*args, **kwargs)
        if calls["n"] > 2:
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(train_dreambooth, "training_loss", poisoned)
    output = tmp_path / "out"
    with pytest.raises(DreamBoothError, match=r"step 5: the loss was not finite for 3 steps in a row"):
        train_dreambooth.main(train_args(tiny_model, instance_dir, output, "--max_train_steps", "10",
                                         "--checkpointing_steps", "2", "--logging_steps", "1", *extra))
    assert checkpoint_steps(output) == [2, 4]
    # Steps 3 and 4 were skipped on the device: checkpoint 4 holds checkpoint 2's weights.
    assert_bitwise_equal(unet_weights(output / "checkpoint-2"), unet_weights(output / "checkpoint-4"))
    assert all(torch.isfinite(t).all() for t in unet_weights(output / "checkpoint-4").values())
    assert not (output / "model_index.json").exists()


def test_write_failure_keeps_the_previous_checkpoint(tiny_model, instance_dir, tmp_path, monkeypatch):
    output = tmp_path / "out"
    saves = {"n": 0}
    original = train_dreambooth.save_models

    def disk_fills_up(models, folder):
        saves["n"] += 1
        if saves["n"] > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        original(models, folder)

    args = train_args(tiny_model, instance_dir, output, "--max_train_steps", "6", "--checkpointing_steps", "2")
    with monkeypatch.context() as patch:
        patch.setattr(train_dreambooth, "save_models", disk_fills_up)
        with pytest.raises(DreamBoothError, match=r"checkpoint-4 \(No space left on device\).*checkpoint-2 is intact"):
            train_dreambooth.main(args)
    assert checkpoint_steps(output) == [2]
    assert [p.name for p in output.iterdir() if p.name.startswith(".")] == []
    resumed = train_dreambooth.main(args + ["--resume_from_checkpoint", "latest"])
    assert resumed.state.global_step == 6 and (output / "model_index.json").is_file()


def test_finished_output_dir_is_not_overwritten(tiny_model, instance_dir, tmp_path):
    output = tmp_path / "out"
    train_dreambooth.main(train_args(tiny_model, instance_dir, output))
    before = unet_weights(output)
    with pytest.raises(DreamBoothError, match="already holds a trained model.*--overwrite_output_dir"):
        train_dreambooth.main(train_args(tiny_model, instance_dir, output, "--seed", "1"))
    assert_bitwise_equal(before, unet_weights(output))
    train_dreambooth.main(train_args(tiny_model, instance_dir, output, "--seed", "1", "--overwrite_output_dir"))
    assert any(not torch.equal(before[k], v) for k, v in unet_weights(output).items())


def start_training(args, log):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "train_dreambooth.py"), *args], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)


def wait_for_checkpoint(output, step: int, process, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not (output / f"checkpoint-{step}" / MARKER).is_file():
        assert process.poll() is None, "training ended before the checkpoint appeared"
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.05)


@pytest.mark.slow
def test_kill_9_then_resume_latest_finishes(tiny_model, instance_dir, tmp_path):
    output = tmp_path / "out"
    args = train_args(tiny_model, instance_dir, output, "--max_train_steps", "400", "--checkpointing_steps", "2")
    with open(tmp_path / "log.txt", "w") as log:
        process = start_training(args, log)
        wait_for_checkpoint(output, 4, process)
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    killed_at = checkpoint_steps(output)[-1]
    assert not (output / "model_index.json").exists()
    resumed = train_dreambooth.main(args + ["--max_train_steps", str(killed_at + 2), "--resume_from_checkpoint",
                                            "latest"])
    assert resumed.state.global_step == killed_at + 2
    assert (output / "model_index.json").is_file()


@pytest.mark.slow
def test_sigterm_to_a_live_run_leaves_a_resumable_checkpoint(tiny_model, instance_dir, tmp_path):
    output = tmp_path / "out"
    args = train_args(tiny_model, instance_dir, output, "--max_train_steps", "400", "--checkpointing_steps", "50")
    with open(tmp_path / "log.txt", "w") as log:
        process = start_training(args, log)
        deadline = time.time() + 240
        while "Steps:" not in (tmp_path / "log.txt").read_text() or "it/s" not in (tmp_path / "log.txt").read_text():
            assert process.poll() is None and time.time() < deadline
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 128 + signal.SIGTERM
    text = (tmp_path / "log.txt").read_text()
    assert "SIGTERM: finishing this step" in text and "--resume_from_checkpoint latest" in text
    steps = checkpoint_steps(output)
    assert len(steps) >= 1 and not (output / "model_index.json").exists()
    resumed = train_dreambooth.main(args + ["--max_train_steps", str(steps[-1] + 1),
                                            "--resume_from_checkpoint", "latest"])
    assert resumed.state.global_step == steps[-1] + 1


def test_failed_final_save_leaves_no_half_pipeline(tiny_model, instance_dir, tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline

    def fails_midway(self, folder, **kwargs):
        (folder / "unet").mkdir(parents=True)
        (folder / "unet" / "config.json").write_text("{}")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(DiffusionPipeline, "save_pretrained", fails_midway)
    output = tmp_path / "out"
    with pytest.raises(DreamBoothError, match="could not save the pipeline.*No space left.*; the last checkpoint is "
                                              "checkpoint-2: .* --resume_from_checkpoint latest"):
        train_dreambooth.main(train_args(tiny_model, instance_dir, output, "--checkpointing_steps", "2"))
    assert not (output / "model_index.json").exists() and not (output / "unet").exists()
    assert not (output / ".pipeline.tmp").exists()
    assert checkpoint_steps(output) == [2]


DISK_FULL = {  # what a full disk raises, as the writers raise it
    "safetensors": (lambda: SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
                    r"Error while serializing: I/O error: No space left on device \(os error 28\)"),
    "torch.save": (lambda: RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1216 vs 1114"),
                   r"\[enforce fail at inline_container.cc:672\] . unexpected pos 1216 vs 1114"),
}


def write_half_then_fail(path, error):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * 512)
    raise DISK_FULL[error][0]()


def small_checkpointer(output, save_models):
    """A Checkpointer over a real Accelerator training one linear layer: saving it writes optimizer.bin,
    scheduler.bin and random_states_0.pkl with torch.save, and the weights with ``save_models``."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 4)
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters()))
    return Checkpointer(accelerator, output, save_models, lambda models, folder: None), model


@pytest.mark.parametrize("error", list(DISK_FULL))
def test_a_full_disk_while_checkpointing_is_a_one_line_error(tmp_path, monkeypatch, error):
    output = tmp_path / "out"

    def save_weights(models, folder):
        save_file(models[0].state_dict(), folder / "model.safetensors")

    checkpointer, model = small_checkpointer(output, save_weights)
    checkpointer.save(TrainState(global_step=2), [model])
    with monkeypatch.context() as patch:
        if error == "safetensors":
            checkpointer._save_models = lambda models, folder: write_half_then_fail(folder / "model.safetensors", error)
        else:
            patch.setattr(torch, "save", lambda obj, path, *args, **kwargs: write_half_then_fail(Path(path), error))
        with pytest.raises(DreamBoothError, match=rf"^could not write checkpoint {re.escape(str(output))}/checkpoint-4 "
                                                  rf"\({DISK_FULL[error][1]}\); .*checkpoint-2 is intact$"):
            checkpointer.save(TrainState(global_step=4), [model])
    assert checkpoint_steps(output) == [2]
    assert sorted(path.name for path in output.iterdir()) == ["checkpoint-2"]


def test_a_checkpoint_reaches_the_disk_before_its_name_appears(tmp_path, monkeypatch):
    """Every file is flushed under the hidden name, then the rename: a power cut never leaves
    checkpoint-N naming files the disk does not hold."""
    output = tmp_path / "out"
    checkpointer, model = small_checkpointer(
        output, lambda models, folder: save_file(models[0].state_dict(), folder / "model.safetensors"))
    flushed = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: flushed.append(Path(os.readlink(f"/proc/self/fd/{fd}"))) or
                        real_fsync(fd))
    final = checkpointer.save(TrainState(global_step=3), [model])
    hidden = output / ".checkpoint-3.tmp"
    written = {path.relative_to(final) for path in final.rglob("*") if path.is_file()}
    assert {"model.safetensors", "optimizer.bin", MARKER} <= {path.name for path in written}
    assert {path.relative_to(hidden) for path in flushed if path.is_relative_to(hidden)} == written
    assert flushed[-1] == output  # the rename itself


def test_a_checkpoint_is_saved_and_flushed_with_windows_file_semantics(tmp_path, monkeypatch):
    """On Windows a folder cannot be opened to fsync it, and fsync needs a descriptor open for writing
    (FlushFileBuffers): neither may fail the save, and every file still reaches the disk."""
    output = tmp_path / "out"
    checkpointer, model = small_checkpointer(
        output, lambda models, folder: save_file(models[0].state_dict(), folder / "model.safetensors"))
    real_open, real_fsync = os.open, os.fsync
    access, flushed = {}, []

    def windows_open(path, flags, *args, **kwargs):
        if os.path.isdir(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        descriptor = real_open(path, flags, *args, **kwargs)
        access[descriptor] = flags & os.O_ACCMODE
        return descriptor

    def windows_fsync(descriptor):
        if access.get(descriptor) == os.O_RDONLY:
            raise OSError(errno.EBADF, "Bad file descriptor")
        flushed.append(Path(os.readlink(f"/proc/self/fd/{descriptor}")))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "open", windows_open)
    monkeypatch.setattr(os, "fsync", windows_fsync)
    final = checkpointer.save(TrainState(global_step=3), [model])
    hidden = output / ".checkpoint-3.tmp"
    written = {path.relative_to(final) for path in final.rglob("*") if path.is_file()}
    assert {"model.safetensors", "optimizer.bin", MARKER} <= {path.name for path in written}
    assert {path.relative_to(hidden) for path in flushed if path.is_relative_to(hidden)} == written


def test_a_checkpointer_removes_the_saves_a_kill_left_unfinished(tmp_path):
    output = tmp_path / "out"
    for name in (".checkpoint-6.tmp", ".checkpoint-500.tmp"):
        (output / name / "unet").mkdir(parents=True)
        (output / name / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 1024)
    (output / ".checkpoint-notes.txt").write_text("not a save")
    small_checkpointer(output, lambda models, folder: None)
    assert sorted(path.name for path in output.iterdir()) == [".checkpoint-notes.txt"]


@pytest.mark.parametrize("error", list(DISK_FULL))
def test_a_full_disk_while_saving_the_trained_model_is_a_one_line_error(tiny_model, tmp_path, monkeypatch, error):
    from diffusers import DiffusionPipeline
    from transformers import AutoTokenizer

    from dreambooth.models import publish_file, save_pipeline

    def fails_midway(self, folder, **kwargs):
        write_half_then_fail(Path(folder) / "unet" / "diffusion_pytorch_model.safetensors", error)

    monkeypatch.setattr(DiffusionPipeline, "save_pretrained", fails_midway)
    output = tmp_path / "out"
    output.mkdir()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model, subfolder="tokenizer")
    with pytest.raises(DreamBoothError, match=rf"^could not save the pipeline to {re.escape(str(output))} "
                                              rf"\({DISK_FULL[error][1]}\)$"):
        save_pipeline(output, tiny_model, {}, tokenizer)
    assert list(output.iterdir()) == []
    with pytest.raises(DreamBoothError, match=rf"^could not save to {re.escape(str(output))} \({DISK_FULL[error][1]}\)$"):
        publish_file(lambda folder: write_half_then_fail(folder / "pytorch_lora_weights.safetensors", error), output)
    assert list(output.iterdir()) == []


def fake_checkpoint(output, step: int, serial: int):
    """A checkpoint folder as Checkpointer.save leaves it, with small files."""
    folder = output / f"checkpoint-{step}"
    (folder / "unet").mkdir(parents=True)
    save_file({"conv.weight": torch.ones(64, 64)}, folder / "unet" / "diffusion_pytorch_model.safetensors")
    (folder / "unet" / "config.json").write_text("{}")
    torch.save({"state": {}, "param_groups": []}, folder / "optimizer.bin")
    (folder / LOSS_HISTORY).write_text(json.dumps([[s, 0.5] for s in range(1, step + 1)]))
    (folder / MARKER).write_text(json.dumps({"step": step, "serial": serial, "train_state": {"global_step": step}}))
    return folder


def cut_in_half(path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_damaged_checkpoint_files_are_named_and_latest_skips_a_malformed_marker(tmp_path, caplog):
    output = tmp_path / "out"
    older, newest = fake_checkpoint(output, 2, serial=1), fake_checkpoint(output, 4, serial=2)
    check_checkpoint_fits(newest, use_lora=False, train_text_encoder=False)
    cut_in_half(newest / MARKER)
    assert resolve_resume(output, "latest") == older
    assert f"{newest / MARKER} is malformed (" in caplog.text
    with pytest.raises(DreamBoothError, match=rf"^--resume_from_checkpoint: {re.escape(str(newest / MARKER))} is "
                                              r"malformed \(.*\); resume from another checkpoint$"):
        read_state(newest)

    for damaged, message in [(LOSS_HISTORY, rf"{re.escape(str(older / LOSS_HISTORY))} is malformed \(.*\); remove it"),
                             ("unet/diffusion_pytorch_model.safetensors", r"unet/diffusion_pytorch_model.safetensors "
                                                                          r"cannot be read \(.*header.*\)"),
                             ("optimizer.bin", r"optimizer.bin cannot be read \(.*zip.*\)")]:
        saved = (older / damaged).read_bytes()
        cut_in_half(older / damaged)
        with pytest.raises(DreamBoothError, match=rf"^--resume_from_checkpoint.*{message}") as caught:
            check_checkpoint_fits(older, use_lora=False, train_text_encoder=False)
        assert "\n" not in str(caught.value) and "does not fit" not in str(caught.value)
        (older / damaged).write_bytes(saved)


def test_a_checkpoint_that_fails_to_load_for_another_reason_than_a_mismatch_is_not_said_to_misfit(tmp_path):
    from types import SimpleNamespace

    checkpoint = fake_checkpoint(tmp_path, 2, serial=1)

    def load_state(folder):
        raise RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory")

    accelerator = SimpleNamespace(is_main_process=True, register_save_state_pre_hook=lambda hook: None,
                                  register_load_state_pre_hook=lambda hook: None, load_state=load_state)
    checkpointer = Checkpointer(accelerator, tmp_path, save_models=None, load_models=None)
    with pytest.raises(DreamBoothError, match=rf"^--resume_from_checkpoint {re.escape(str(checkpoint))}: its files "
                                              r"cannot be read \(PytorchStreamReader failed .*\); resume from another"):
        checkpointer.load(checkpoint)


def test_a_checkpoint_position_moves_to_another_process_count_by_the_batches_seen():
    from dreambooth.checkpoints import adapt_to_process_count

    saved = TrainState(global_step=10, epoch=1, batches_in_epoch=3, data_seed=7, num_processes=2)
    # 3 batches on each of 2 processes: 6 batches of the epoch trained.
    assert adapt_to_process_count(saved, 1, Path("c")) == TrainState(10, 1, 6, 7, 1)
    assert adapt_to_process_count(saved, 3, Path("c")) == TrainState(10, 1, 2, 7, 3)
    assert adapt_to_process_count(saved, 2, Path("c")) == saved
    with pytest.raises(DreamBoothError, match="cannot be split evenly over 4 processes"):
        adapt_to_process_count(saved, 4, Path("c"))


class _Items(torch.utils.data.Dataset):
    def __len__(self):
        return 5

    def __getitem__(self, index):
        return index  # (epoch, item), as the training samplers give it

    def set_epoch(self, epoch):
        pass


def _items_trained(state: TrainState, max_steps: int) -> tuple[list[tuple[int, int]], TrainState]:
    """The (epoch, item) pairs a loop over 5 items (shuffled each epoch, batch 1) trains from ``state`` on."""
    from accelerate import Accelerator

    from dreambooth.data import EpochShuffleSampler
    from dreambooth.training import Schedule

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    batches = torch.utils.data.DataLoader(_Items(), batch_size=1, sampler=EpochShuffleSampler(5, seed=3),
                                          collate_fn=lambda items: {"item": items[0], "prompts": ["p"]})
    model, optimizer, batches = accelerator.prepare(model, optimizer, batches)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    seen = []

    def loss_fn(batch):
        seen.append(batch["item"])
        return {"loss": model.weight.sum() * 0}

    trainer = Trainer(accelerator, [model], optimizer, schedule, batches, Schedule(1, 5, max_steps, 2), loss_fn,
                      max_grad_norm=0, state=state)
    trainer.train()
    return seen, trainer.state


def test_a_resumed_loop_goes_on_with_the_batch_after_the_checkpoint_in_its_epoch_order():
    whole, state = _items_trained(TrainState(), max_steps=10)
    assert state == TrainState(global_step=10, epoch=2, batches_in_epoch=0)
    first, second = whole[:5], whole[5:]
    assert sorted(first) == [(0, item) for item in range(5)] and sorted(second) == [(1, item) for item in range(5)]
    assert [item for _, item in first] != [item for _, item in second]  # each epoch is shuffled anew
    # A checkpoint 3 batches into the first epoch, and one 2 batches into the second.
    assert _items_trained(TrainState(global_step=3, epoch=0, batches_in_epoch=3), 10)[0] == whole[3:]
    assert _items_trained(TrainState(global_step=7, epoch=1, batches_in_epoch=2), 10)[0] == whole[7:]
