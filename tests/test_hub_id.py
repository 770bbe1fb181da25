"""The path users take: the base model named by Hub id (with --variant fp16, --revision), its weights
read offline from the Hugging Face cache, through every script the README shows."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import export
import generate_class_images
import infer
import train_dreambooth
from conftest import HUB_COMMITS, HUB_ID, HUB_LORA, one_thread, train_args
from dreambooth.errors import DreamBoothError
from dreambooth.models import load_components, save_pipeline

FEW_STEPS = ["--num_inference_steps", "2", "--num_images_per_prompt", "1", "--seed", "0"]


def brightest(paths) -> list[int]:
    """Each image's brightest pixel: 0 for the black image a safety checker leaves."""
    return [int(np.asarray(Image.open(path)).max()) for path in paths]


def snapshot(cache: Path, ref: str) -> Path:
    return cache / f"models--{HUB_ID.replace('/', '--')}" / "snapshots" / HUB_COMMITS[ref]


def test_full_fine_tune_from_a_hub_id_at_a_revision(hub_cache, instance_dir, tmp_path):
    class_dir, output = tmp_path / "class", tmp_path / "out"
    generate_class_images.main(["--pretrained_model_name_or_path", HUB_ID, "--class_prompt", "a toy",
                                "--class_data_dir", str(class_dir), "--num_class_images", "1", "--resolution", "32",
                                "--num_inference_steps", "2", "--variant", "fp16"])
    train_dreambooth.main(train_args(
        HUB_ID, instance_dir, output, "--max_train_steps", "1", "--variant", "fp16", "--revision", "other",
        "--with_prior_preservation", "--class_data_dir", str(class_dir), "--class_prompt", "a toy",
        "--num_class_images", "1", "--num_validation_images", "1", "--validation_inference_steps", "2",
        "--checkpointing_steps", "1"))

    # The safety checker never runs in the suite's own sampling: no black class or validation images.
    assert min(brightest(class_dir.glob("*.png")) + brightest((output / "samples").glob("*.png"))) > 0
    # The saved pipeline has no safety checker (and says so), and the standard loaders load it.
    index = json.loads((output / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    assert index["requires_safety_checker"] is False and not (output / "safety_checker").exists()
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    for loader in (StableDiffusionPipeline.from_pretrained, DiffusionPipeline.from_pretrained):
        assert loader(output).safety_checker is None
    # --revision reached the frozen weights: the VAE is revision 'other''s fp16 one.
    saved_vae = load_file(output / "vae" / "diffusion_pytorch_model.safetensors")
    other_vae = load_file(snapshot(hub_cache, "other") / "vae" / "diffusion_pytorch_model.fp16.safetensors")
    main_vae = load_file(snapshot(hub_cache, "main") / "vae" / "diffusion_pytorch_model.fp16.safetensors")
    assert all(torch.equal(saved_vae[key], other_vae[key]) for key in other_vae)
    assert not all(torch.equal(saved_vae[key], main_vae[key]) for key in main_vae)
    assert "base_model: stable-diffusion-v1-5/stable-diffusion-v1-5" in (output / "README.md").read_text()

    images = infer.main(["--pretrained_model_name_or_path", str(output), "--prompt", "sks toy",
                         "--output_dir", str(tmp_path / "samples"), *FEW_STEPS])
    assert min(brightest(images)) > 0
    exported = export.main([str(output), "--output", str(tmp_path / "sks.safetensors")])
    assert exported.num_tensors > 100

    # A checkpoint samples over the base at the revision its run trained on, not over main's weights.
    def checkpoint_sample(*flags):
        folder = tmp_path / f"checkpoint-samples{'-'.join(flags)}"
        paths = infer.main(["--checkpoint", str(output / "checkpoint-1"), "--prompt", "sks toy",
                            "--output_dir", str(folder), *FEW_STEPS, *flags])
        return np.asarray(Image.open(paths[0]), dtype=np.int16)

    recorded = checkpoint_sample()
    assert np.array_equal(recorded, checkpoint_sample("--revision", "other"))
    assert np.abs(recorded - checkpoint_sample("--revision", "main")).max() > 0


def test_lora_over_a_hub_id(hub_cache, instance_dir, tmp_path):
    output = tmp_path / "lora"
    train_dreambooth.main(train_args(HUB_ID, instance_dir, output, "--use_lora", "--max_train_steps", "1",
                                     "--checkpointing_steps", "1"))

    lora_images = infer.main(["--pretrained_model_name_or_path", HUB_ID, "--lora", str(output), "--prompt", "sks toy",
                              "--output_dir", str(tmp_path / "samples"), *FEW_STEPS])
    checkpoint_images = infer.main(["--checkpoint", str(output / "checkpoint-1"), "--prompt", "sks toy",
                                    "--output_dir", str(tmp_path / "checkpoint-samples"), *FEW_STEPS])
    assert min(brightest(lora_images + checkpoint_images)) > 0
    export.main([str(output), "--output", str(tmp_path / "sks-lora.safetensors")])
    with safe_open(str(tmp_path / "sks-lora.safetensors"), "pt") as exported:
        metadata = exported.metadata()
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_sd_model_name"] == HUB_ID


def test_variant_where_only_the_unet_has_it(hub_cache, caplog):
    with caplog.at_level(logging.WARNING, logger="dreambooth.models"):
        components = load_components("someone/unet-fp16-only", variant="fp16")
    fallbacks = [record.getMessage() for record in caplog.records if "has no fp16 weights" in record.getMessage()]
    assert len(fallbacks) == 2 and not any("UNet" in message for message in fallbacks)
    assert components.text_encoder is not None

    with pytest.raises(DreamBoothError, match="--variant bf16: .* has no bf16 weights"):
        load_components(HUB_ID, variant="bf16")


def test_save_needs_no_safety_checker_in_the_cache(hub_cache, tmp_path):
    model = "someone/no-checker-cached"
    components = load_components(model)
    save_pipeline(tmp_path / "out", model, {"unet": components.unet.state_dict()}, components.tokenizer)
    assert (tmp_path / "out" / "unet").is_dir() and (tmp_path / "out" / "model_index.json").is_file()


@pytest.mark.parametrize("revision", [None, "v2"])
def test_a_hub_id_not_in_the_cache_is_one_line_naming_the_download(hub_cache, instance_dir, tmp_path, revision):
    model = "someone/not-downloaded" if revision is None else HUB_ID
    extra = ["--revision", revision] if revision else []
    with pytest.raises(DreamBoothError) as raised:
        train_dreambooth.main(train_args(model, instance_dir, tmp_path / "out", *extra))
    message = str(raised.value)
    assert "\n" not in message and "not fully in the Hugging Face cache" in message
    # Given a revision, the model is a Hub repo; without one, it may be a mistyped local path.
    assert ("no local folder of that name" in message) is (revision is None)
    assert f"`hf download {model}{' --revision ' + revision if revision else ''}`" in message
    with pytest.raises(DreamBoothError, match="hf download someone/not-downloaded`"):
        infer.main(["--pretrained_model_name_or_path", "someone/not-downloaded", "--prompt", "x",
                    "--output_dir", str(tmp_path / "samples")])




def sample_with_lora(model: str, lora: list[str], output: Path) -> Path:
    with one_thread():  # on a busy machine, more threads only contend
        return infer.main(["--pretrained_model_name_or_path", model, *lora, "--prompt", "a sks toy", "--height", "32",
                           "--width", "32", "--output_dir", str(output), *FEW_STEPS])[0]


def test_lora_given_as_a_hub_id_draws_and_is_named_as_its_local_folder(hub_cache, hub_lora, tiny_model, tmp_path,
                                                                       tmp_path_factory):
    from dreambooth.lora import LORA_WEIGHTS

    scale = ["--lora_scale", "0.8"]
    from_hub = sample_with_lora(tiny_model, ["--lora", HUB_LORA, *scale], tmp_path / "hub")
    local = sample_with_lora(tiny_model, ["--lora", str(hub_lora), *scale], tmp_path / "local")
    without = sample_with_lora(tiny_model, [], tmp_path / "without")

    def pixels(path):
        return np.asarray(Image.open(path), dtype=np.int16)

    assert np.array_equal(pixels(from_hub), pixels(local))
    assert np.abs(pixels(from_hub) - pixels(without)).max() > 0
    # Named by the repo's name part and hashed over the same tensor data: the metadata of a local run.
    data = (hub_lora / LORA_WEIGHTS).read_bytes()
    short_hash = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]
    recorded = Image.open(from_hub).text
    assert json.loads(recorded["loras"]) == [{"name": "sks-toy-lora", "scale": 0.8, "hash": short_hash,
                                              "repo": HUB_LORA}]
    assert recorded["parameters"].startswith("a sks toy <lora:sks-toy-lora:0.8>\n")
    assert f'Lora hashes: "sks-toy-lora: {short_hash}"' in recorded["parameters"]
    local_recorded = Image.open(local).text
    assert json.loads(local_recorded.pop("loras")) == [{"name": "sks-toy-lora", "scale": 0.8, "hash": short_hash}]
    assert {key: value for key, value in recorded.items() if key != "loras"} == local_recorded
    local_paths = (str(tmp_path_factory.getbasetemp()), str(hub_cache), "e" * 40)
    assert not [value for value in recorded.values() if any(path in value for path in local_paths)]


@pytest.mark.parametrize("lora, message", [
    ("someone/not-downloaded", r"--lora someone/not-downloaded: no local file or folder of that name, and not fully "
                               r"in the Hugging Face cache .*offline.*`hf download someone/not-downloaded`"),
    (HUB_ID, f"--lora {HUB_ID}: a full pipeline, not LoRA weights; pass it as --pretrained_model_name_or_path"),
    ("someone/readme-only", r"--lora someone/readme-only: the repo has no pytorch_lora_weights\.safetensors"),
    ("loras/sks.safetensors", r"--lora loras/sks\.safetensors: no such file or folder"),
])
def test_a_hub_lora_that_cannot_be_used_is_one_line(hub_cache, hub_lora, tiny_model, tmp_path, lora, message):
    with pytest.raises(DreamBoothError, match=f"^{message}") as raised:
        sample_with_lora(tiny_model, ["--lora", lora], tmp_path / "samples")
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "samples").exists() or not any((tmp_path / "samples").iterdir())
