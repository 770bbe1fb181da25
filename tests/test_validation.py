"""Bad input to train_dreambooth.py: one-line errors naming the problem, before any model loads."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_dreambooth
from conftest import ROOT, train_args
from dreambooth.errors import DreamBoothError


@pytest.fixture
def no_model_loading(monkeypatch):
    """Validation must fail before any weights are read."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before validation finished")

    monkeypatch.setattr(train_dreambooth, "load_components", refuse)
    monkeypatch.setattr(train_dreambooth, "top_up_class_images", refuse)


def run_expecting_error(argv, pattern):
    with pytest.raises(DreamBoothError, match=pattern) as caught:
        train_dreambooth.main(argv)
    assert "\n" not in str(caught.value)


def test_missing_instance_dir(tiny_model, tmp_path, no_model_loading):
    run_expecting_error(train_args(tiny_model, tmp_path / "nope", tmp_path / "out"), r"--instance_data_dir .*not found")


def test_empty_instance_dir(tiny_model, tmp_path, no_model_loading):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no pictures here")
    run_expecting_error(train_args(tiny_model, tmp_path / "empty", tmp_path / "out"), "no images")


def test_resolution_not_a_multiple_of_8(tiny_model, instance_dir, tmp_path, no_model_loading):
    run_expecting_error(train_args(tiny_model, instance_dir, tmp_path / "out", "--resolution", "30"),
                        r"--resolution 30: must be a positive multiple of 8")


@pytest.mark.parametrize("missing, pattern", [
    (["--class_prompt", "a photo of a toy"], "needs --class_data_dir"),
    (["--class_data_dir", "classes"], "needs --class_prompt"),
])
def test_prior_preservation_needs_class_prompt_and_dir(tiny_model, instance_dir, tmp_path, no_model_loading,
                                                       missing, pattern):
    run_expecting_error(train_args(tiny_model, instance_dir, tmp_path / "out", "--with_prior_preservation", *missing),
                        pattern)


def test_empty_instance_prompt(tiny_model, instance_dir, tmp_path, no_model_loading):
    run_expecting_error(train_args(tiny_model, instance_dir, tmp_path / "out", "--instance_prompt", "  "),
                        "--instance_prompt")


def test_output_dir_not_writable(tiny_model, instance_dir, tmp_path, no_model_loading):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    run_expecting_error(train_args(tiny_model, instance_dir, blocker / "out"), r"--output_dir .*not writable")
    run_expecting_error(train_args(tiny_model, instance_dir, blocker), r"--output_dir .*not a folder")


@pytest.mark.parametrize("model, pattern", [
    ("{tmp}", "no model_index.json"),
    ("./no/such/folder", "no such folder"),
    ("not a hub id!", "not a Hub id"),
])
def test_model_that_is_neither_folder_nor_hub_id(instance_dir, tmp_path, no_model_loading, model, pattern):
    run_expecting_error(train_args(model.format(tmp=tmp_path), instance_dir, tmp_path / "out"), pattern)


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, b"not an image at all"])
def test_bad_image_is_named(tiny_model, instance_dir, tmp_path, no_model_loading, content):
    (instance_dir / "broken.png").write_bytes(content)
    run_expecting_error(train_args(tiny_model, instance_dir, tmp_path / "out"), "broken.png")


def test_truncated_image_is_named(tiny_model, instance_dir, tmp_path, no_model_loading):
    data = (instance_dir / "toy_01.png").read_bytes()
    (instance_dir / "toy_01.png").write_bytes(data[: len(data) // 2])
    run_expecting_error(train_args(tiny_model, instance_dir, tmp_path / "out"), "toy_01.png")


def test_fp16_on_cpu_is_refused(tiny_model, instance_dir, tmp_path, no_model_loading):
    run_expecting_error(train_args(tiny_model, instance_dir, tmp_path / "out", "--mixed_precision", "fp16"),
                        "fp16 needs a GPU")


def test_fp16_from_the_accelerate_config_on_cpu_is_refused(tiny_model, instance_dir, tmp_path, no_model_loading,
                                                           monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # what `accelerate launch` sets from its config
    run_expecting_error(train_args(tiny_model, instance_dir, tmp_path / "out"),
                        r"mixed_precision fp16 \(from the accelerate config\) needs a GPU")


@pytest.mark.parametrize("flags, message", [
    (["--validation_scheduler", "euler_ancestral"], "--validation_scheduler euler_ancestral: choose one of"),
    (["--validation_inference_steps", "0"], "--validation_inference_steps 0: must be at least 1"),
])
def test_validation_sampler_errors_name_their_own_flags(tiny_model, instance_dir, tmp_path, no_model_loading,
                                                        flags, message):
    run_expecting_error(train_args(tiny_model, instance_dir, tmp_path / "out", "--num_validation_images", "1",
                                   *flags), message)


def test_non_image_files_are_skipped_with_a_warning(tiny_model, instance_dir, tmp_path, capfd):
    (instance_dir / "notes.txt").write_text("shot on a sunny day")
    train_dreambooth.main(train_args(tiny_model, instance_dir, tmp_path / "out", "--max_train_steps", "1"))
    assert "notes.txt" in capfd.readouterr().err
    assert (tmp_path / "out" / "unet").is_dir()


def test_command_line_error_is_one_line_without_traceback(tiny_model, instance_dir, tmp_path):
    command = [sys.executable, str(ROOT / "train_dreambooth.py"),
               *train_args(tiny_model, instance_dir, tmp_path / "out", "--resolution", "30")]
    result = subprocess.run(command, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "error: --resolution 30: must be a positive multiple of 8"


@pytest.mark.parametrize("flag, module", [
    ("--enable_xformers_memory_efficient_attention", "xformers"),
])
def test_missing_optional_package_is_named(tiny_model, instance_dir, tmp_path, no_model_loading, monkeypatch,
                                           flag, module):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real_find_spec(name, *a))
    run_expecting_error(train_args(tiny_model, instance_dir, tmp_path / "out", flag), f"{flag}: {module} is not installed")


def test_compile_on_a_cuda_gpu_without_triton_is_named(tiny_model, instance_dir, tmp_path, no_model_loading,
                                                      monkeypatch):
    """PyTorch's Windows wheels come without Triton, which torch.compile needs for a CUDA GPU."""
    import importlib.util

    import generate_class_images

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real_find_spec(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("dreambooth.models.cpu_only", lambda: False)
    message = r"--compile: torch.compile on a CUDA GPU needs Triton, .*pip install triton-windows"
    run_expecting_error(train_args(tiny_model, instance_dir, tmp_path / "out", "--compile"), message)
    with pytest.raises(DreamBoothError, match=message):
        generate_class_images.main(["--pretrained_model_name_or_path", tiny_model, "--class_prompt", "a toy",
                                    "--class_data_dir", str(tmp_path / "class"), "--compile"])


@pytest.mark.parametrize("flags, message", [
    (["--report_to", "neptune"], "--report_to neptune: 'neptune' is not a tracker; choose aim, comet_ml, mlflow, "
                                 "tensorboard, wandb"),
    (["--report_to", "comet_ml"], r"--report_to comet_ml: comet_ml is not installed \(pip install comet_ml\)"),
    (["--report_to", "tensorboard,nope"], "--report_to tensorboard,nope: 'nope' is not a tracker"),
    (["--push_to_hub", "--hub_model_id", "me/bad id!", "--hub_token", "hf_x"], "--hub_model_id me/bad id!: not a repo id"),
    (["--push_to_hub"], "--push_to_hub: no Hub token"),
])
def test_tracker_and_hub_problems_are_found_before_training(tiny_model, instance_dir, tmp_path, no_model_loading,
                                                           monkeypatch, flags, message):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no cached login
    monkeypatch.setattr("accelerate.tracking.get_available_trackers", lambda: [])  # none installed
    run_expecting_error(train_args(tiny_model, instance_dir, tmp_path / "out", *flags), message)


def test_class_flags_without_prior_preservation_are_named_in_a_warning(tiny_model, instance_dir, tmp_path, caplog):
    from dreambooth.config import TrainConfig, parse_config

    parse_config(TrainConfig, train_args(tiny_model, instance_dir, tmp_path / "out", "--class_prompt",
                                         "a photo of a toy")).validate()
    assert "used only with --with_prior_preservation" in caplog.text


@pytest.fixture
def denied(monkeypatch):
    """``denied(folder, what)``: reading ``folder`` fails as it does without permission, whether listing it
    (chmod 000) or looking at a file inside (chmod 444: is_dir on an entry); tests run as root, which
    chmod does not stop."""
    def deny(folder: Path, what: str) -> None:
        def refuse(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))

        if what == "listing":
            iterdir = Path.iterdir
            monkeypatch.setattr(Path, "iterdir", lambda self: refuse(self) if self == folder else iterdir(self))
        else:
            is_dir = Path.is_dir
            monkeypatch.setattr(Path, "is_dir", lambda self: refuse(self) if self.parent == folder else is_dir(self))

    return deny


@pytest.mark.parametrize("flag, what", [("--instance_data_dir", "listing"), ("--instance_data_dir", "entries"),
                                        ("--class_data_dir", "listing")])
def test_an_unreadable_folder_is_named_with_its_flag(tiny_model, instance_dir, tmp_path, no_model_loading, denied,
                                                     flag, what):
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    folder = instance_dir if flag == "--instance_data_dir" else class_dir
    denied(folder, what)
    run_expecting_error(train_args(tiny_model, instance_dir, tmp_path / "out", "--with_prior_preservation",
                                   "--class_data_dir", str(class_dir), "--class_prompt", "a photo of a toy"),
                        rf"^{flag} {re.escape(str(folder))}: cannot read the folder \(Permission denied\)")


def test_a_class_folder_to_top_up_must_be_writable_before_anything_is_generated(tiny_model, instance_dir, tmp_path,
                                                                                no_model_loading, monkeypatch):
    import tempfile

    from dreambooth.config import GenerateClassImagesConfig, TrainConfig, parse_config

    class_dir = tmp_path / "class"
    class_dir.mkdir()
    for name in sorted(os.listdir(instance_dir))[:2]:
        (class_dir / name).write_bytes((instance_dir / name).read_bytes())
    temporary_file = tempfile.NamedTemporaryFile

    def read_only_class_dir(*args, dir=None, **kwargs):
        if Path(dir) == class_dir:
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return temporary_file(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only_class_dir)
    args = train_args(tiny_model, instance_dir, tmp_path / "out", "--with_prior_preservation", "--class_data_dir",
                      str(class_dir), "--class_prompt", "a photo of a toy")
    run_expecting_error(args + ["--num_class_images", "3"],
                        rf"^--class_data_dir {re.escape(str(class_dir))}: not writable \(Permission denied\)$")
    # A folder that already holds enough class images is only read, by training and by the script.
    parse_config(TrainConfig, args + ["--num_class_images", "2"]).validate()
    script = ["--pretrained_model_name_or_path", tiny_model, "--class_data_dir", str(class_dir), "--class_prompt",
              "a photo of a toy"]
    parse_config(GenerateClassImagesConfig, script + ["--num_class_images", "2"]).validate()
    with pytest.raises(DreamBoothError, match=r"^--class_data_dir .*: not writable \(Permission denied\)$"):
        parse_config(GenerateClassImagesConfig, script + ["--num_class_images", "3"]).validate()
