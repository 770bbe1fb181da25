"""LoRA DreamBooth: frozen base, adapters trained and saved in diffusers' format, exact resume."""

from __future__ import annotations

import signal

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import infer
import train_dreambooth
from conftest import assert_readable_by_all, train_args
from dreambooth.errors import DreamBoothError
from dreambooth.lora import LORA_WEIGHTS
from dreambooth.training import Trainer

LORA = ["--use_lora", "--rank", "4", "--lora_alpha", "8", "--learning_rate", "1e-2"]


def image(pipeline) -> np.ndarray:
    return pipeline("a photo of sks toy", num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                    output_type="np").images[0]


def test_lora_trains_only_adapters_and_loads_with_load_lora_weights(tiny_model, instance_dir, tmp_path, monkeypatch,
                                                                  umask_022):
    from diffusers import StableDiffusionPipeline

    seen = {}
    original_train = Trainer.train

    def spy(self):
        unet = self.accelerator.unwrap_model(self.trained[0])
        text_encoder = self.accelerator.unwrap_model(self.trained[1])
        seen["before"] = {name: p.detach().clone() for model in (unet, text_encoder)
                          for name, p in model.named_parameters()}
        seen["trainable"] = {name for model in (unet, text_encoder)
                             for name, p in model.named_parameters() if p.requires_grad}
        state = original_train(self)
        seen["after"] = {name: p.detach().clone() for model in (unet, text_encoder)
                         for name, p in model.named_parameters()}
        return state

    monkeypatch.setattr(Trainer, "train", spy)
    output = tmp_path / "out"
    train_dreambooth.main(train_args(tiny_model, instance_dir, output, *LORA, "--train_text_encoder",
                                     "--max_train_steps", "3"))
    assert seen["trainable"] and all("lora" in name for name in seen["trainable"])
    base = [name for name in seen["before"] if "lora" not in name]
    assert all(torch.equal(seen["before"][name], seen["after"][name]) for name in base)
    assert all(not torch.equal(seen["before"][name], seen["after"][name])
               for name in seen["trainable"] if "lora_B" in name)

    weights = load_file(output / LORA_WEIGHTS)
    assert any(key.startswith("unet.") for key in weights) and any(key.startswith("text_encoder.") for key in weights)
    assert not (output / "model_index.json").exists()
    assert (output / LORA_WEIGHTS).stat().st_size < 200_000
    assert_readable_by_all(output / LORA_WEIGHTS)

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    plain = image(pipeline)
    pipeline.load_lora_weights(str(output))
    with_lora = image(pipeline)
    assert np.abs(with_lora - plain).max() > 1e-3


def test_lora_on_more_modules_than_attention_loads_whole(tiny_model, instance_dir, tmp_path):
    """A file must keep one key style: diffusers' loader reads it off the first key and drops the rest."""
    from diffusers import StableDiffusionPipeline

    output = tmp_path / "out"
    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "time_emb_proj"]
    train_dreambooth.main(train_args(tiny_model, instance_dir, output, *LORA, "--max_train_steps", "3",
                                     "--lora_target_modules", *targets))
    adapted = {key[len("unet."):].split(".lora")[0] for key in load_file(output / LORA_WEIGHTS)}
    assert {name.split(".")[-1] for name in adapted} >= {"to_q", "proj_in", "conv1", "time_emb_proj"}
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    before = {name: pipeline.unet.get_submodule(name).weight.detach().clone() for name in adapted}
    pipeline.load_lora_weights(str(output))
    pipeline.fuse_lora()
    unchanged = [name for name in adapted if torch.equal(pipeline.unet.get_submodule(name).weight, before[name])]
    assert not unchanged


def test_lora_resume_is_exact(tiny_model, instance_dir, tmp_path, monkeypatch):
    args = [*LORA, "--max_train_steps", "6", "--checkpointing_steps", "3", "--gradient_accumulation_steps", "2"]
    train_dreambooth.main(train_args(tiny_model, instance_dir, tmp_path / "whole", *args))
    original = Trainer._after_step

    def stop_at_three(self, losses, progress):
        original(self, losses, progress)
        if self.state.global_step == 3:
            signal.raise_signal(signal.SIGTERM)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_after_step", stop_at_three)
        assert train_dreambooth.main(train_args(tiny_model, instance_dir, tmp_path / "parts", *args)).interrupted
    checkpoint = tmp_path / "parts" / "checkpoint-3"
    assert sorted(p.name for p in checkpoint.iterdir() if p.suffix == ".safetensors") == [LORA_WEIGHTS]
    train_dreambooth.main(train_args(tiny_model, instance_dir, tmp_path / "parts", *args,
                                     "--resume_from_checkpoint", "latest"))
    whole, parts = load_file(tmp_path / "whole" / LORA_WEIGHTS), load_file(tmp_path / "parts" / LORA_WEIGHTS)
    assert whole.keys() == parts.keys() and all(torch.equal(whole[key], parts[key]) for key in whole)


def test_lora_records_rank_alpha_and_base(tiny_model, instance_dir, tmp_path):
    import yaml

    output = tmp_path / "out"
    train_dreambooth.main(train_args(tiny_model, instance_dir, output, *LORA))
    with safe_open(output / LORA_WEIGHTS, "pt") as handle:
        assert '"unet.lora_alpha": 8' in handle.metadata()["lora_adapter_metadata"]
    saved = yaml.safe_load((output / "train_config.yaml").read_text())
    assert saved["pretrained_model_name_or_path"] == tiny_model and saved["use_lora"] is True


def test_infer_with_lora_and_scale(tiny_model, instance_dir, tmp_path):
    output = tmp_path / "out"
    train_dreambooth.main(train_args(tiny_model, instance_dir, output, *LORA, "--max_train_steps", "3"))
    common = ["--pretrained_model_name_or_path", tiny_model, "--prompt", "a photo of sks toy", "--seed", "0",
              "--num_images_per_prompt", "1", "--num_inference_steps", "3"]

    def pixels(*extra):
        written = infer.main(common + ["--output_dir", str(tmp_path / "s" / str(len(extra)) / "_".join(extra)[-20:]),
                                       *extra])
        return np.asarray(Image.open(written[0]), dtype=np.int16)

    plain, full, off = pixels(), pixels("--lora", str(output)), pixels("--lora", str(output), "--lora_scale", "0")
    assert np.abs(full - plain).max() > 0
    assert np.abs(off - plain).max() <= 1


def test_infer_stacks_a_lora_checkpoint_and_scaled_loras_additively(tiny_model, instance_dir, tmp_path):
    output = tmp_path / "out"
    train_dreambooth.main(train_args(tiny_model, instance_dir, output, *LORA, "--max_train_steps", "2",
                                     "--checkpointing_steps", "1"))
    common = ["--checkpoint", str(output / "checkpoint-1"), "--prompt", "a photo of sks toy", "--seed", "0",
              "--num_images_per_prompt", "1", "--num_inference_steps", "3"]

    def pixels(name, *extra):
        written = infer.main([*common, "--output_dir", str(tmp_path / name), *extra])
        return np.asarray(Image.open(written[0]), dtype=np.int16)

    # The checkpoint's adapter at full strength, the --lora files at theirs: 0.5 + 0.8 of one LoRA is 1.3 of it.
    twice = pixels("twice", "--lora", str(output), "--lora", str(output), "--lora_scale", "0.5", "0.8")
    once = pixels("once", "--lora", str(output), "--lora_scale", "1.3")
    assert np.abs(twice - once).max() <= 1
    assert np.abs(twice - pixels("alone")).max() > 1


def test_lora_bad_inputs(tiny_model, instance_dir, tmp_path):
    with pytest.raises(DreamBoothError, match="--rank 0: must be at least 1"):
        train_dreambooth.main(train_args(tiny_model, instance_dir, tmp_path / "a", "--use_lora", "--rank", "0"))
    with pytest.raises(DreamBoothError, match="--lora_target_modules no_such_module"):
        train_dreambooth.main(train_args(tiny_model, instance_dir, tmp_path / "b", "--use_lora",
                                         "--lora_target_modules", "no_such_module"))
    mismatched = tmp_path / "mismatched"
    mismatched.mkdir()
    from safetensors.torch import save_file

    save_file({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight": torch.zeros(4, 7),
               "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.up.weight": torch.zeros(7, 4)},
              mismatched / LORA_WEIGHTS)
    with pytest.raises(DreamBoothError, match="--lora .*does not fit this base model"):
        infer.main(["--pretrained_model_name_or_path", tiny_model, "--lora", str(mismatched), "--prompt", "x",
                    "--num_images_per_prompt", "1", "--num_inference_steps", "2", "--output_dir", str(tmp_path / "s")])


def test_adapters_sit_on_every_attention_projection_and_round_trip_through_the_file(tiny_model, tmp_path):
    from dreambooth.lora import add_lora_adapters, load_lora_into, save_lora
    from dreambooth.models import load_components

    def adapted_models():
        components = load_components(tiny_model)
        add_lora_adapters(components.unet, components.text_encoder, rank=4, alpha=8, dropout=0.1)
        return [components.unet, components.text_encoder]

    torch.manual_seed(0)
    models = adapted_models()
    layers = [{name: module for name, module in model.named_modules() if hasattr(module, "lora_A")}
              for model in models]
    # The tiny UNet has 4 transformer blocks (down 1, mid 1, up 2) of 2 attentions x q, k, v, out;
    # the text encoder 2 layers x q, k, v, out.
    assert [len(found) for found in layers] == [4 * 2 * 4, 2 * 4]
    assert {name.rsplit(".", 1)[-1] for name in layers[1]} == {"q_proj", "k_proj", "v_proj", "out_proj"}
    for layer in [*layers[0].values(), *layers[1].values()]:
        assert layer.scaling["default"] == 8 / 4  # alpha / rank
        assert layer.lora_dropout["default"].p == 0.1
        assert layer.lora_A["default"].weight.shape[0] == 4
    trained = {name: p for model in models for name, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in name and p.dtype == torch.float32 for name, p in trained.items())
    for p in trained.values():  # lora_B starts at zero; give the round trip something to carry
        torch.nn.init.normal_(p)

    save_lora(models, tmp_path / "fp32")
    save_lora(models, tmp_path / "fp16", torch.float16)
    full, half = load_file(tmp_path / "fp32" / LORA_WEIGHTS), load_file(tmp_path / "fp16" / LORA_WEIGHTS)
    assert len(full) == len(half) == 2 * (32 + 8)
    assert {t.dtype for t in full.values()} == {torch.float32} and {t.dtype for t in half.values()} == {torch.float16}
    for folder, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        loaded = adapted_models()
        load_lora_into(loaded, tmp_path / folder)
        state = {name: p for model in loaded for name, p in model.named_parameters() if p.requires_grad}
        assert state.keys() == trained.keys()
        different = [name for name in trained if not torch.equal(state[name], trained[name].to(dtype).float())]
        assert not different, (folder, different[:3])
