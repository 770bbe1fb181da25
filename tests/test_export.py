"""export.py: a pipeline folder as one original-layout checkpoint, a LoRA run as a kohya LoRA."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open

from conftest import ROOT, assert_readable_by_all
from dreambooth.errors import DreamBoothError
from dreambooth.export import lora_to_kohya
from export import main

LORA_RANK, LORA_ALPHA = 4, 8  # alpha != rank, so a lost alpha (scale 2 -> 1) shows in the images


def read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as file:
        return {key: file.get_tensor(key) for key in file.keys()}, file.metadata()


def generate(pipeline, seed: int = 0) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    return pipeline("a photo of sks toy", num_inference_steps=2, height=32, width=32, generator=generator,
                    output_type="np").images


def load_pipeline(folder):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(folder)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def load_single_file(path: Path, config: str):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_single_file(str(path), config=config, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def checkpoints(tiny_model, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("exports")
    main([tiny_model, "--output", str(folder / "fp32.safetensors"), "--precision", "fp32"])
    main([tiny_model, "--output", str(folder / "default.safetensors")])
    return {"fp32": folder / "fp32.safetensors", "default": folder / "default.safetensors"}


@pytest.fixture(scope="module")
def lora_run(tiny_model, tmp_path_factory) -> Path:
    """A LoRA run's output folder as the training writes it: diffusers LoRA file and train_config.yaml."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    folder = tmp_path_factory.mktemp("lora-run")
    pipeline = load_pipeline(tiny_model)
    torch.manual_seed(0)
    settings = dict(r=LORA_RANK, lora_alpha=LORA_ALPHA, init_lora_weights="gaussian")
    unet_config = LoraConfig(target_modules=["to_q", "to_k", "to_v", "to_out.0"], **settings)
    text_config = LoraConfig(target_modules=["q_proj", "k_proj", "v_proj", "out_proj"], **settings)
    pipeline.unet.add_adapter(unet_config)
    # transformers' own add_adapter wants peft >= 0.22; PEFT's injection is the same adapter.
    inject_adapter_in_model(text_config, pipeline.text_encoder)
    for model in (pipeline.unet, pipeline.text_encoder):
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # gaussian init leaves lora_B at zero: a no-op adapter
                torch.nn.init.normal_(parameter, std=0.2)
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipeline.unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipeline.text_encoder)),
        unet_lora_adapter_metadata=unet_config.to_dict(),
        text_encoder_lora_adapter_metadata=text_config.to_dict(),
    )
    run_config = {"pretrained_model_name_or_path": tiny_model, "use_lora": True, "lora_alpha": LORA_ALPHA,
                  "instance_prompt": "a photo of sks toy"}
    (folder / "train_config.yaml").write_text(yaml.safe_dump(run_config))
    return folder


def test_sd_export_loads_in_diffusers_with_every_tensor_unchanged_and_the_same_image(tiny_model, checkpoints):
    original = load_pipeline(tiny_model)
    single = load_single_file(checkpoints["fp32"], tiny_model)
    for name in ("unet", "vae", "text_encoder"):
        expected, loaded = getattr(original, name).state_dict(), getattr(single, name).state_dict()
        assert loaded.keys() == expected.keys(), name
        for key, tensor in expected.items():
            assert torch.equal(loaded[key], tensor), f"{name}.{key}"
    np.testing.assert_allclose(generate(single), generate(original), atol=1e-6)


def test_sd_export_uses_the_original_key_names(checkpoints):
    tensors, metadata = read_file(checkpoints["fp32"])
    for key in ("model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.out.2.weight",
                "model.diffusion_model.time_embed.0.weight", "model.diffusion_model.middle_block.1.proj_in.weight",
                "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
                "model.diffusion_model.input_blocks.2.0.op.weight",  # the one downsampler of the 2-block UNet
                "model.diffusion_model.output_blocks.1.1.conv.weight",  # upsampler after an UpBlock2D
                "model.diffusion_model.output_blocks.2.0.in_layers.2.weight",
                "first_stage_model.encoder.conv_in.weight", "first_stage_model.encoder.down.0.downsample.conv.weight",
                "first_stage_model.decoder.up.1.upsample.conv.weight", "first_stage_model.encoder.norm_out.weight",
                "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
                "cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight"):
        assert key in tensors, key
    assert all(key.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."))
               for key in tensors)
    assert tensors["first_stage_model.decoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 conv in the original VAE
    assert metadata["format"] == "pt" and metadata["modelspec.architecture"] == "stable-diffusion-v1"


def test_sd_export_warns_when_loaders_would_guess_the_prediction_type_wrong(tiny_model, tmp_path, caplog):
    folder = Path(shutil.copytree(tiny_model, tmp_path / "tiny-sd-v"))
    config_file = folder / "scheduler" / "scheduler_config.json"
    config_file.write_text(config_file.read_text().replace('"epsilon"', '"v_prediction"'))
    main([str(folder), "--output", str(tmp_path / "v.safetensors")])
    _, metadata = read_file(tmp_path / "v.safetensors")
    assert metadata["modelspec.prediction_type"] == "v"
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert len(warnings) == 1 and "v.safetensors predicts v, but single-file loaders assume epsilon" in warnings[0]
    caplog.clear()
    main([tiny_model, "--output", str(tmp_path / "eps.safetensors")])
    assert not [record for record in caplog.records if record.levelname == "WARNING"]


def test_sd_export_is_fp16_by_default_at_half_the_size(checkpoints):
    tensors, _ = read_file(checkpoints["default"])
    assert {tensor.dtype for tensor in tensors.values()} == {torch.float16}
    ratio = checkpoints["default"].stat().st_size / checkpoints["fp32"].stat().st_size
    assert 0.5 <= ratio < 0.56  # the JSON header does not halve


def test_sd2_text_encoder_exports_in_the_open_clip_layout(tiny_model, tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(shutil.copytree(tiny_model, tmp_path / "tiny-sd2"))
    config = CLIPTextConfig.from_pretrained(folder / "text_encoder").to_dict()
    torch.manual_seed(1)
    CLIPTextModel(CLIPTextConfig(**{**config, "hidden_act": "gelu"})).save_pretrained(folder / "text_encoder")
    main([str(folder), "--output", str(tmp_path / "sd2.safetensors"), "--precision", "fp32"])

    tensors, metadata = read_file(tmp_path / "sd2.safetensors")
    assert tensors["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (96, 32)
    assert "cond_stage_model.model.token_embedding.weight" in tensors
    assert not any(key.startswith("cond_stage_model.transformer.") for key in tensors)
    assert metadata["modelspec.architecture"] == "stable-diffusion-v2-512"
    expected = CLIPTextModel.from_pretrained(folder / "text_encoder").state_dict()
    loaded = load_single_file(tmp_path / "sd2.safetensors", str(folder)).text_encoder.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[key], expected[key]) for key in expected)


KOHYA_KEY = re.compile(
    r"^lora_(unet_(down|mid|up)_blocks?_[0-9a-z_]+_to_(q|k|v|out_0)"
    r"|te_text_model_encoder_layers_\d+_self_attn_(q|k|v|out)_proj)\.(lora_down\.weight|lora_up\.weight|alpha)$"
)


def test_kohya_export_names_counts_and_alphas(lora_run, tmp_path):
    main([str(lora_run), "--output", str(tmp_path / "lora.safetensors")])
    tensors, metadata = read_file(tmp_path / "lora.safetensors")
    assert [key for key in tensors if not KOHYA_KEY.match(key)] == []
    downs, ups, alphas = ([key for key in tensors if key.endswith(end)]
                          for end in (".lora_down.weight", ".lora_up.weight", ".alpha"))
    source, _ = read_file(lora_run / "pytorch_lora_weights.safetensors")
    assert len(downs) == len(ups) == len(alphas) == len(source) // 2
    assert sum(key.startswith("lora_te_") for key in alphas) == 2 * 4  # 2 layers x q, k, v, out
    assert {tensors[key].item() for key in alphas} == {LORA_ALPHA}
    assert {tensors[key].shape[0] for key in downs} == {LORA_RANK}
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors
    assert metadata["ss_network_dim"] == str(LORA_RANK) and metadata["ss_network_alpha"] == str(LORA_ALPHA)
    assert metadata["format"] == "pt"
    # AUTOMATIC1111 lists a LoRA for SD 2.x models only when ss_v2 says "True".
    assert (metadata["ss_base_model_version"], metadata["ss_v2"]) == ("sd_v1", "False")


def test_kohya_export_names_the_sd2_base_from_its_config_or_the_lora_shapes(tiny_model, tmp_path):
    from safetensors.torch import save_file

    base = Path(shutil.copytree(tiny_model, tmp_path / "tiny-sd2-v"))
    for part, old, new in (("text_encoder/config.json", '"quick_gelu"', '"gelu"'),
                           ("scheduler/scheduler_config.json", '"epsilon"', '"v_prediction"')):
        (base / part).write_text((base / part).read_text().replace(old, new))
    module = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    lora = tmp_path / "lora.safetensors"
    for width, run_config, expected in ((32, {"pretrained_model_name_or_path": str(base)}, ("sd_v2_v", "True")),
                                        (1024, {}, ("sd_v2", "True")), (768, {}, ("sd_v1", "False"))):
        save_file({f"{module}.lora_A.weight": torch.ones(4, width), f"{module}.lora_B.weight": torch.ones(32, 4)}, lora)
        _, metadata = lora_to_kohya(lora, run_config)
        assert (metadata["ss_base_model_version"], metadata["ss_v2"]) == expected, width
    save_file({f"{module}.lora_A.weight": torch.ones(4, 32), f"{module}.lora_B.weight": torch.ones(32, 4)}, lora)
    assert "ss_v2" not in lora_to_kohya(lora, {})[1]  # neither a readable base nor an SD width: no guess


def test_kohya_lora_gives_the_same_image_as_the_diffusers_lora(tiny_model, lora_run, tmp_path):
    main([str(lora_run), "--output", str(tmp_path / "lora.safetensors"), "--format", "kohya"])
    base = generate(load_pipeline(tiny_model))
    from_folder, from_kohya = load_pipeline(tiny_model), load_pipeline(tiny_model)
    from_folder.load_lora_weights(str(lora_run))
    from_kohya.load_lora_weights(str(tmp_path / "lora.safetensors"))
    expected = generate(from_folder)
    assert np.abs(expected - base).max() > 1e-2  # the LoRA changes the image
    np.testing.assert_allclose(generate(from_kohya), expected, atol=1e-5)


def test_kohya_alpha_comes_from_the_run_config_when_the_file_has_none(tmp_path):
    from safetensors.torch import save_file

    weights = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight": torch.ones(4, 16),
               "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.up.weight": torch.ones(16, 4)}
    save_file(weights, tmp_path / "lora.safetensors")
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha"
    assert lora_to_kohya(tmp_path / "lora.safetensors", {"lora_alpha": 2})[0][name].item() == 2
    assert lora_to_kohya(tmp_path / "lora.safetensors", {})[0][name].item() == 4  # diffusers' default: scale 1


@pytest.mark.parametrize("case, message", [
    ("empty", "neither a diffusers pipeline folder"),
    ("both", "holds both a pipeline and LoRA weights; pass --format sd or --format kohya"),
    ("sd_of_lora", "a LoRA run has no full weights to export; use --format kohya"),
    ("kohya_of_pipeline", "has no LoRA weights .*use --format sd"),
    ("exists", "file exists; pass --overwrite"),
    ("own_lora", "would overwrite the run's own pytorch_lora_weights.safetensors"),
    ("own_unet", "would overwrite the run's own unet"),
    ("suffix", "must end in .safetensors"),
    ("no_output", "--output is required"),
    ("missing_dir", "no such folder"),
    ("bad_precision", "invalid choice"),
])
def test_bad_input_is_a_one_line_error(case, message, tiny_model, lora_run, tmp_path):
    output = tmp_path / "out.safetensors"
    (tmp_path / "empty").mkdir()
    argv = {
        "empty": [str(tmp_path / "empty"), "--output", str(output)],
        "both": [str(tmp_path / "both"), "--output", str(output)],
        "sd_of_lora": [str(lora_run), "--output", str(output), "--format", "sd"],
        "kohya_of_pipeline": [tiny_model, "--output", str(output), "--format", "kohya"],
        "exists": [tiny_model, "--output", str(output)],
        "own_lora": [str(lora_run), "--output", str(lora_run / "pytorch_lora_weights.safetensors"), "--overwrite"],
        "own_unet": [tiny_model, "--output", str(Path(tiny_model) / "unet" / "x.safetensors")],
        "suffix": [tiny_model, "--output", str(tmp_path / "out.ckpt")],
        "no_output": [tiny_model],
        "missing_dir": [str(tmp_path / "nowhere"), "--output", str(output)],
        "bad_precision": [tiny_model, "--output", str(output), "--precision", "fp8"],
    }[case]
    if case == "exists":
        output.write_bytes(b"keep me")
    if case == "both":
        shutil.copytree(lora_run, tmp_path / "both")
        shutil.copy(Path(tiny_model) / "model_index.json", tmp_path / "both")
    with pytest.raises(DreamBoothError, match=message) as error:
        main(argv)
    assert "\n" not in str(error.value)
    if case == "exists":
        assert output.read_bytes() == b"keep me"


def test_overwrite_replaces_the_file_and_leaves_no_temporary_files(lora_run, tmp_path, umask_022):
    output = tmp_path / "lora.safetensors"
    output.write_bytes(b"old")
    main([str(lora_run), "--output", str(output), "--overwrite", "--precision", "fp16"])
    tensors, _ = read_file(output)
    assert {tensor.dtype for tensor in tensors.values()} == {torch.float16}
    assert [path.name for path in tmp_path.iterdir()] == ["lora.safetensors"]
    assert_readable_by_all(output)  # not the temporary file's owner-only mode


def test_a_failed_write_is_one_line_and_leaves_nothing(lora_run, tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(DreamBoothError, match="could not write .*No space left on device") as error:
        main([str(lora_run), "--output", str(tmp_path / "lora.safetensors")])
    assert "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_script_prints_one_error_line_and_exits_1(tmp_path):
    (tmp_path / "empty").mkdir()
    result = subprocess.run(
        [sys.executable, str(ROOT / "export.py"), str(tmp_path / "empty"), "--output", str(tmp_path / "x.safetensors")],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "neither a diffusers pipeline folder" in errors[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_sd_export_records_the_image_resolution(checkpoints):
    # The tiny UNet works on 32 x 32 latents; its VAE's 2 blocks downsample once: 64 x 64 images.
    _, metadata = read_file(checkpoints["fp32"])
    assert metadata["modelspec.resolution"] == "64x64"


def test_kohya_alpha_keeps_the_scale_of_rslora_and_alpha_patterns_from_the_file(tmp_path):
    """PEFT scales a LoRA by alpha / r, by alpha / sqrt(r) with rsLoRA, with a module's own alpha
    from alpha_pattern; kohya by alpha / rank. The file's adapter metadata wins over the run's config."""
    import json

    from peft import LoraConfig, inject_adapter_in_model
    from safetensors.torch import save_file

    settings = dict(r=4, lora_alpha=8, use_rslora=True, alpha_pattern={"to_k": 2})
    attention = torch.nn.Module()
    attention.to_q, attention.to_k = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
    inject_adapter_in_model(LoraConfig(target_modules=["to_q", "to_k"], **settings), attention)
    # By hand: to_q 8 / sqrt(4) = 4, to_k 2 / sqrt(4) = 1; PEFT agrees.
    assert (attention.to_q.scaling["default"], attention.to_k.scaling["default"]) == (4.0, 1.0)

    module = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    weights = {}
    for projection in ("to_q", "to_k"):
        weights[f"unet.{module}.{projection}.lora_A.weight"] = torch.ones(4, 16)
        weights[f"unet.{module}.{projection}.lora_B.weight"] = torch.ones(16, 4)
    kohya = f"lora_unet_{module.replace('.', '_')}"
    for rslora, expected in ((True, (16.0, 4.0)), (False, (8.0, 2.0))):  # kohya alpha = scale x rank
        metadata = {f"unet.{key}": value for key, value in {**settings, "use_rslora": rslora}.items()}
        save_file(weights, tmp_path / "lora.safetensors", {"lora_adapter_metadata": json.dumps(metadata)})
        tensors, file_metadata = lora_to_kohya(tmp_path / "lora.safetensors", {"lora_alpha": 1})
        assert (tensors[f"{kohya}_to_q.alpha"].item(), tensors[f"{kohya}_to_k.alpha"].item()) == expected, rslora
        assert "ss_network_alpha" not in file_metadata  # two alphas: no single one to show
