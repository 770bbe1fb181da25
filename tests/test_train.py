"""End-to-end training on the tiny model: outputs load and generate, only trained weights move,
loss falls on an overfit run, v-prediction models train."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

import train_dreambooth
from conftest import ROOT, TOY_SUBJECT, assert_readable_by_all, train_args
from dreambooth.data import DreamBoothCollator, DreamBoothDataset, examples_from_folder, list_image_files
from dreambooth.caching import VaeLatents
from dreambooth.models import load_components
from dreambooth.training import LossSettings, PromptEncoder, training_loss


def weights(folder, component: str) -> dict[str, torch.Tensor]:
    name = "model.safetensors" if component == "text_encoder" else "diffusion_pytorch_model.safetensors"
    return load_file(os.path.join(folder, component, name))


def half(state: dict) -> dict:
    return {key: value.half() if value.is_floating_point() else value for key, value in state.items()}


def changed(before: dict, after: dict) -> bool:
    assert before.keys() == after.keys()
    return any(not torch.equal(before[key], after[key]) for key in before)


def generate_one(folder) -> np.ndarray:
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(folder)
    image = pipeline("a photo of sks toy", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                     output_type="np").images[0]
    return image


def test_full_fine_tune_output_loads_and_generates(tiny_model, instance_dir, tmp_path, umask_022):
    output = tmp_path / "out"
    train_dreambooth.main(train_args(tiny_model, instance_dir, output))
    assert_readable_by_all(output)
    image = generate_one(output)
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
    for part in ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/tokenizer_config.json"):
        assert (output / part).is_file()
    assert changed(half(weights(tiny_model, "unet")), weights(output, "unet"))
    # Frozen models are saved exactly as they were, in the default fp16 save precision.
    for component in ("unet", "vae", "text_encoder"):
        assert all(tensor.dtype == torch.float16 for tensor in weights(output, component).values())
    assert not changed(half(weights(tiny_model, "vae")), weights(output, "vae"))
    assert not changed(half(weights(tiny_model, "text_encoder")), weights(output, "text_encoder"))
    saved = yaml.safe_load((output / "train_config.yaml").read_text())
    assert saved["instance_prompt"] == "a photo of sks toy" and saved["max_train_steps"] == 2


def test_train_text_encoder_changes_it_too(tiny_model, instance_dir, tmp_path):
    output = tmp_path / "out"
    train_dreambooth.main(train_args(tiny_model, instance_dir, output, "--train_text_encoder", "--save_precision",
                                     "fp32"))
    assert changed(weights(tiny_model, "text_encoder"), weights(output, "text_encoder"))
    assert not changed(weights(tiny_model, "vae"), weights(output, "vae"))
    assert np.isfinite(generate_one(output)).all()


def test_prior_preservation_tops_up_an_empty_class_dir_and_trains(tiny_model, instance_dir, tmp_path):
    output, class_dir = tmp_path / "out", tmp_path / "class"
    class_dir.mkdir()
    train_dreambooth.main(train_args(
        tiny_model, instance_dir, output, "--with_prior_preservation", "--class_data_dir", str(class_dir),
        "--class_prompt", "a photo of a toy", "--num_class_images", "3", "--sample_batch_size", "3",
    ))
    assert len(list_image_files(class_dir, "class")) == 3
    assert np.isfinite(generate_one(output)).all()


def test_prior_batches_reach_the_text_encoder_instance_then_class(tiny_model, instance_dir, tmp_path, prompts_seen):
    class_dir = tmp_path / "class"
    shutil.copytree(TOY_SUBJECT, class_dir)
    train_dreambooth.main(train_args(
        tiny_model, instance_dir, tmp_path / "out", "--with_prior_preservation", "--class_data_dir",
        str(class_dir), "--class_prompt", "a photo of a toy", "--num_class_images", "5", "--train_batch_size", "2",
    ))
    assert prompts_seen
    assert all(prompts == ["a photo of sks toy"] * 2 + ["a photo of a toy"] * 2 for prompts in prompts_seen)


def fixed_evaluation_loss(model_folder, image_folder, repeats: int = 16) -> float:
    """The objective averaged over fixed noise draws: comparable before and after training."""
    components = load_components(str(model_folder))
    dataset = DreamBoothDataset(examples_from_folder(image_folder, "a photo of sks toy"), 32, center_crop=True)
    batch = DreamBoothCollator(components.tokenizer)([dataset[0]] * repeats)
    encoder = PromptEncoder(components.text_encoder, trainable=False)
    torch.manual_seed(1234)
    with torch.no_grad():
        return training_loss(batch, components.unet, VaeLatents(components.vae), components.noise_scheduler, encoder,
                             LossSettings())["loss"].item()


def test_overfit_on_one_image_lowers_the_loss(tiny_model, tmp_path):
    one_image = tmp_path / "one"
    one_image.mkdir()
    shutil.copy(TOY_SUBJECT / "toy_01.png", one_image)
    output = tmp_path / "out"
    train_dreambooth.main(train_args(tiny_model, one_image, output, "--max_train_steps", "60", "--learning_rate",
                                     "2e-3", "--center_crop", "--train_batch_size", "4"))
    before, after = fixed_evaluation_loss(tiny_model, one_image), fixed_evaluation_loss(output, one_image)
    assert after < 0.5 * before, (before, after)


def test_v_prediction_model_trains(tiny_model_v, instance_dir, tmp_path):
    output = tmp_path / "out"
    train_dreambooth.main(train_args(tiny_model_v, instance_dir, output, "--snr_gamma", "5.0", "--offset_noise"))
    scheduler = load_components(str(output)).noise_scheduler
    assert scheduler.config.prediction_type == "v_prediction"
    assert np.isfinite(generate_one(output)).all()


def test_gradient_accumulation_checkpointing_and_bf16(tiny_model, instance_dir, tmp_path):
    output = tmp_path / "out"
    trainer = train_dreambooth.main(train_args(
        tiny_model, instance_dir, output, "--gradient_accumulation_steps", "2", "--gradient_checkpointing",
        "--mixed_precision", "bf16", "--max_train_steps", "3", "--lr_scheduler", "cosine", "--lr_warmup_steps", "1",
        "--scale_lr", "--save_precision", "fp32",
    ))
    assert trainer.state.global_step == 3
    # --scale_lr: 1e-4 x batch 1 x 1 process x 2 accumulation steps.
    assert trainer.optimizer.param_groups[0]["initial_lr"] == pytest.approx(2e-4)
    unet = weights(output, "unet")
    assert all(tensor.dtype == torch.float32 for tensor in unet.values())
    assert np.isfinite(generate_one(output)).all()


def test_pre_computed_text_embeddings_match_a_live_encoder(tiny_model, instance_dir, tmp_path):
    train_dreambooth.main(train_args(tiny_model, instance_dir, tmp_path / "a", "--save_precision", "fp32"))
    train_dreambooth.main(train_args(tiny_model, instance_dir, tmp_path / "b", "--pre_compute_text_embeddings",
                                     "--save_precision", "fp32"))
    assert not changed(weights(tmp_path / "a", "unet"), weights(tmp_path / "b", "unet"))


def test_same_seed_same_weights(tiny_model, instance_dir, tmp_path):
    train_dreambooth.main(train_args(tiny_model, instance_dir, tmp_path / "a", "--random_flip", "--save_precision", "fp32"))
    train_dreambooth.main(train_args(tiny_model, instance_dir, tmp_path / "b", "--random_flip", "--save_precision", "fp32"))
    assert not changed(weights(tmp_path / "a", "unet"), weights(tmp_path / "b", "unet"))


@pytest.mark.slow
def test_accelerate_launch_with_the_project_config(tiny_model, instance_dir, tmp_path):
    output = tmp_path / "out"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_config.yaml"),
               str(ROOT / "train_dreambooth.py"), *train_args(tiny_model, instance_dir, output)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (output / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert np.isfinite(generate_one(output)).all()


def test_fp16_on_a_run_that_uses_the_cpu_of_a_gpu_machine_is_refused_before_loading(tiny_model, instance_dir, tmp_path,
                                                                                     monkeypatch):
    """On a machine with a GPU, a run can still use the CPU (ACCELERATE_USE_CPU, `accelerate launch --cpu`).
    Accelerate then turns fp16 autocast and loss scaling off without a word, and the first step met
    the frozen fp16 weights with fp32 ones in a traceback ("mat1 and mat2 must have the same dtype")."""
    from dreambooth import models
    from dreambooth.errors import DreamBoothError

    monkeypatch.setattr(models, "_has_xpu", lambda: True)  # the machine has a GPU; this run's device is the CPU

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the precision was checked")

    monkeypatch.setattr(train_dreambooth, "load_components", refuse)
    for flags, source in ((["--mixed_precision", "fp16"], "--mixed_precision fp16"),
                          ([], r"mixed_precision fp16 \(from the accelerate config\)")):
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # what `accelerate launch` sets from its config
        with pytest.raises(DreamBoothError, match=rf"^{source} needs a GPU, and this run uses the CPU .*bf16") as caught:
            train_dreambooth.main(train_args(tiny_model, instance_dir, tmp_path / "out", *flags))
        assert "\n" not in str(caught.value)
    assert not (tmp_path / "out" / "model_index.json").exists()
