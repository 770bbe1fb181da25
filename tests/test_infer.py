"""infer.py: files, grids and metadata written; images deterministic for a seed; bad input named."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import infer
from conftest import ROOT
from dreambooth.errors import DreamBoothError


def infer_args(model: str | None, output: Path, *extra: str, size: int | None = 32) -> list[str]:
    """A fast tiny-model command line for one image a prompt (``model`` None: no base model flag;
    ``size`` None: the model's size); ``extra`` flags override."""
    return [
        *(["--pretrained_model_name_or_path", model] if model else []),
        "--output_dir", str(output),
        "--num_images_per_prompt", "1",
        "--num_inference_steps", "2",
        "--seed", "7",
        *(["--height", str(size), "--width", str(size)] if size else []),
        *extra,
    ]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def text(path: Path) -> dict[str, str]:
    with Image.open(path) as image:
        return dict(image.text)


def images_by_seed(paths) -> dict[int, np.ndarray]:
    return {int(text(path)["seed"]): pixels(path) for path in paths}


def test_writes_images_with_metadata_and_one_grid_per_prompt(tiny_model, tmp_path):
    prompts = ["a photo of sks toy", "a sks toy on the moon"]
    written = infer.main(infer_args(tiny_model, tmp_path, "--prompt", prompts[0], "--prompt", prompts[1],
                                    "--num_images_per_prompt", "2", "--seed", "11", size=None))

    assert len(written) == 4
    assert sorted(path.name for path in tmp_path.glob("*-grid.png")) == ["000-a-photo-of-sks-toy-grid.png",
                                                                          "001-a-sks-toy-on-the-moon-grid.png"]
    assert len(list(tmp_path.iterdir())) == 6
    for number, prompt in enumerate(prompts):
        mine = sorted(path for path in written if path.name.startswith(f"{number:03d}-"))
        assert len(mine) == 2
        for seed, path in zip((11, 12), mine):
            with Image.open(path) as image:
                assert image.format == "PNG" and image.size == (64, 64)
                assert image.text["prompt"] == prompt
                assert image.text["seed"] == str(seed)
                parameters = image.text["parameters"]
            assert parameters.startswith(prompt + "\n")
            assert f"Seed: {seed}" in parameters and "Steps: 2" in parameters and "Size: 64x64" in parameters
        grid_path = next(tmp_path.glob(f"{number:03d}-*-grid.png"))
        grid = pixels(grid_path)
        assert grid.shape == (64, 128, 3)
        assert np.array_equal(grid[:, :64], pixels(mine[0])) and np.array_equal(grid[:, 64:], pixels(mine[1]))


def test_images_are_deterministic_for_a_seed(tiny_model, tmp_path):
    two = ["--num_images_per_prompt", "2", "--prompt", "a sks toy"]
    batched = images_by_seed(infer.main(infer_args(tiny_model, tmp_path / "batched", *two, "--batch_size", "2")))
    again = images_by_seed(infer.main(infer_args(tiny_model, tmp_path / "again", *two, "--batch_size", "2")))
    one_by_one = images_by_seed(infer.main(infer_args(tiny_model, tmp_path / "single", *two, "--batch_size", "1")))
    # Image j of a prompt uses seed + j: seed 8 alone is the second image of the seed-7 run.
    seed_8 = images_by_seed(infer.main(infer_args(tiny_model, tmp_path / "seed8", "--prompt", "a sks toy",
                                                  "--seed", "8")))

    assert sorted(batched) == [7, 8]
    assert all(np.array_equal(batched[seed], again[seed]) for seed in (7, 8))
    assert np.array_equal(seed_8[8], one_by_one[8])
    assert np.abs(batched[7].astype(int) - batched[8].astype(int)).mean() > 5
    # Each image has its own generator, so the batch changes only float rounding: on the CPU a
    # batch of 2 and a batch of 1 differ by at most one level in a few pixels.
    for seed in (7, 8):
        assert np.abs(batched[seed].astype(int) - one_by_one[seed].astype(int)).max() <= 1


def test_prompts_file_is_read_one_prompt_a_line_without_comments(tiny_model, tmp_path):
    # The reader evaluate.py uses for its templates: comment and blank lines are not prompts.
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("# sks toy prompts\na photo of sks toy\n\n   \n  # in the snow:\n  a sks toy in the snow  \n",
                            encoding="utf-8")

    written = infer.main(infer_args(tiny_model, tmp_path / "out", "--prompts_file", str(prompts_file)))

    assert [text(path)["prompt"] for path in written] == ["a photo of sks toy", "a sks toy in the snow"]
    assert len(list((tmp_path / "out").glob("*-grid.png"))) == 2


@pytest.mark.parametrize("encoding", ["utf-8-sig", "cp1252", "utf-16"])
def test_a_prompts_file_saved_by_windows_tools_is_read_or_named(tmp_path, encoding):
    """Notepad's "UTF-8 with BOM": the mark is not part of the first line, so a comment stays a comment.
    Windows PowerShell 5.1 writes UTF-16 (>) or the ANSI code page (Set-Content): an error saying what to do."""
    from dreambooth.generation import read_prompts

    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("# sks toy prompts\na photo of sks toy at the café\n", encoding=encoding)
    if encoding == "utf-8-sig":
        assert read_prompts(prompts_file, "--prompts_file p") == ["a photo of sks toy at the café"]
    else:
        with pytest.raises(DreamBoothError, match=r"^--prompts_file p: not UTF-8 text; re-save it as UTF-8$"):
            read_prompts(prompts_file, "--prompts_file p")


@pytest.fixture
def lora_run(tiny_model, tmp_path) -> tuple[Path, Path]:
    """A LoRA folder, and a LoRA run's checkpoint whose train_config.yaml gives the base model's path."""
    from diffusers import UNet2DConditionModel

    from dreambooth.checkpoints import MARKER
    from dreambooth.lora import LORA_WEIGHTS, add_lora_adapters, save_lora

    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    add_lora_adapters(unet, None, rank=2, alpha=2, dropout=0.0)
    lora = save_lora([unet], tmp_path / "sks-toy-lora").parent
    checkpoint = tmp_path / "run" / "checkpoint-400"
    checkpoint.mkdir(parents=True)
    shutil.copy(lora / LORA_WEIGHTS, checkpoint / LORA_WEIGHTS)
    (checkpoint / MARKER).write_text("{}")
    (checkpoint.parent / "train_config.yaml").write_text(f"pretrained_model_name_or_path: {tiny_model}\n")
    return lora, checkpoint


def test_metadata_names_the_weights_and_lora_scale_but_no_local_path(tiny_model, lora_run, tmp_path,
                                                                      tmp_path_factory):
    from dreambooth.lora import LORA_WEIGHTS

    lora, checkpoint = lora_run
    runs = {scale: text(infer.main(infer_args(None, tmp_path / "out", "--checkpoint", str(checkpoint),
                                              "--lora", str(lora), "--lora_scale", scale, "--prompt", "a sks toy",
                                              "--negative_prompt", "blurry"))[0])
            for scale in ("0.5", "1.0")}

    # A1111's LoRA hash: the sha256 of the tensor data after the safetensors header, 12 hex digits.
    data = (lora / LORA_WEIGHTS).read_bytes()
    short_hash = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]
    half, full = runs["0.5"], runs["1.0"]
    assert half["parameters"] != full["parameters"] and half["loras"] != full["loras"]
    assert half["parameters"].splitlines() == [
        "a sks toy <lora:checkpoint-400:1> <lora:sks-toy-lora:0.5>",
        "Negative prompt: blurry",
        "Steps: 2, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 7, Size: 32x32, Model: tiny-sd, "
        f'Lora hashes: "checkpoint-400: {short_hash}, sks-toy-lora: {short_hash}"',
    ]
    assert json.loads(half["loras"]) == [{"name": "checkpoint-400", "scale": 1.0, "hash": short_hash},
                                         {"name": "sks-toy-lora", "scale": 0.5, "hash": short_hash}]
    assert json.loads(full["loras"])[1]["scale"] == 1.0
    assert (half["checkpoint"], half["base_model"], half["model"], half["dtype"]) == (
        "checkpoint-400", "tiny-sd", "tiny-sd", "fp32")
    local = str(tmp_path_factory.getbasetemp())
    assert not [(key, value) for image in runs.values() for key, value in image.items() if local in value]


def test_numbering_carries_on_after_the_folder_s_highest_so_nothing_is_overwritten(tiny_model, tmp_path):
    earlier = {name: name.encode() for name in ("000-a-sks-toy-seed7.png", "000-a-sks-toy-grid.png",
                                                "002-a-sks-toy-seed7.png")}
    for name, data in earlier.items():
        (tmp_path / name).write_bytes(data)

    written = infer.main(infer_args(tiny_model, tmp_path, "--prompt", "a sks toy", "--prompt", "a sks toy in the snow"))

    assert [path.name for path in written] == ["003-a-sks-toy-seed7.png", "004-a-sks-toy-in-the-snow-seed7.png"]
    assert (tmp_path / "003-a-sks-toy-grid.png").is_file() and (tmp_path / "004-a-sks-toy-in-the-snow-grid.png").is_file()
    assert {name: (tmp_path / name).read_bytes() for name in earlier} == earlier
    assert len(list(tmp_path.iterdir())) == 7


@pytest.fixture
def bad_inputs(tmp_path) -> dict[str, Path]:
    empty_prompts = tmp_path / "empty.txt"
    empty_prompts.write_text("\n  \n", encoding="utf-8")
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    regular_file = tmp_path / "file.txt"
    regular_file.write_text("x")
    return {"empty": empty_prompts, "missing": tmp_path / "missing.txt", "not_a_model": not_a_model,
            "under_a_file": regular_file / "samples"}


@pytest.mark.parametrize("change, message", [
    (["--prompts_file", "{empty}"], r"--prompts_file .*empty\.txt: no prompts"),
    (["--prompts_file", "{missing}"], r"--prompts_file .*missing\.txt: file not found"),
    (["--prompt", "a toy", "--pretrained_model_name_or_path", "{not_a_model}"], r"not-a-model: .*model_index\.json"),
    (["--prompt", "a toy", "--num_images_per_prompt", "0"], r"--num_images_per_prompt 0"),
    (["--prompt", "a toy", "--output_dir", "{under_a_file}"], r"--output_dir .*file\.txt.*not writable"),
    ([], r"--prompt .*--prompts_file"),
    (["--prompt", "a toy", "--device", "bogus"], r"--device bogus: choose cuda, mps, cpu or auto"),
    (["--prompt", "a toy", "--device", "cuda:99"], r"--device cuda:99: not present on this machine"),
    (["--prompt", "a toy", "--device", "cpu", "--dtype", "fp16"], r"^--dtype fp16 needs a GPU, and this run uses the CPU"),
])
def test_bad_input_is_a_one_line_error_naming_the_flag(tiny_model, tmp_path, bad_inputs, change, message):
    extra = [value.format(**bad_inputs) for value in change]

    with pytest.raises(DreamBoothError, match=message) as error:
        infer.main(infer_args(tiny_model, tmp_path / "out", *extra))
    assert "\n" not in str(error.value)


def test_bad_flag_prints_one_error_line_and_exits_1(tiny_model, tmp_path):
    command = [sys.executable, str(ROOT / "infer.py"), *infer_args(tiny_model, tmp_path, "--prompt", "a toy"),
               "--num_images_per_promt", "2"]
    result = subprocess.run(command, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            capture_output=True, text=True, timeout=120)

    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["error: unrecognized arguments: --num_images_per_promt 2"]
    assert not list(tmp_path.iterdir())


def test_every_scheduler_samples_at_two_steps(tiny_model, tmp_path):
    # PNDM's Runge-Kutta warm-up needs more steps than this unless skipped, as Stable Diffusion's config does.
    for name in ("pndm", "ddim", "euler_a", "unipc"):
        written = infer.main(infer_args(tiny_model, tmp_path / name, "--prompt", "a toy", "--scheduler", name))
        assert pixels(written[0]).shape == (32, 32, 3)


@pytest.mark.parametrize("device, expected", [("auto", "cuda:1"), ("cuda", "cuda:1"), ("cpu", "cpu"),
                                              ("cuda:0", None)])
def test_each_launched_process_samples_on_its_own_device(device, expected):
    """Under `accelerate launch` with several processes, process 1 of a GPU node takes cuda:1; an
    indexed --device would put every process on one GPU."""
    from types import SimpleNamespace

    import torch

    from dreambooth.generation import process_device

    second = SimpleNamespace(num_processes=2, device=torch.device("cuda", 1))
    if expected:
        assert process_device(device, second) == torch.device(expected)
    else:
        with pytest.raises(DreamBoothError, match=r"^--device cuda:0: each of the 2 processes uses its own device; "
                                                  r"use --device auto or cuda$"):
            process_device(device, second)
    alone = SimpleNamespace(num_processes=1, device=torch.device("cuda", 0))
    assert process_device("cpu", alone) == torch.device("cpu")
