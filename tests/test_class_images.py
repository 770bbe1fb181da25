"""Class-image top-up: only the missing images, resumable, deterministic, split across processes."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import socket
import subprocess
import threading
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import generate_class_images
from conftest import ROOT, draw_class_images, one_thread
from dreambooth.data import derived_seed, load_image
from dreambooth.errors import DreamBoothError

CLASS_IMAGE_NAME = re.compile(r"(\d{5})-([0-9a-f]{12})\.png")


def class_args(model: str, folder: Path, *extra: str) -> list[str]:
    """A fast tiny-model command line for 4 images in batches of 2; ``extra`` flags override."""
    return [
        "--pretrained_model_name_or_path", model,
        "--class_prompt", "a photo of a toy",
        "--class_data_dir", str(folder),
        "--num_class_images", "4",
        "--resolution", "32",
        "--num_inference_steps", "2",
        "--sample_batch_size", "2",
        "--seed", "0",
        *extra,
    ]


def contents(folder: Path) -> dict[str, bytes]:
    """Every file of ``folder``, hidden ones included, by name."""
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def generated_indices(files: dict[str, bytes]) -> list[int]:
    """Indices of our class images, after checking each name against its content hash."""
    indices = []
    for name, data in files.items():
        match = CLASS_IMAGE_NAME.fullmatch(name)
        assert match, f"unexpected file {name}"
        assert hashlib.sha1(data).hexdigest()[:12] == match.group(2), name
        indices.append(int(match.group(1)))
    return indices


def write_user_image(path: Path, color: tuple[int, int, int]) -> bytes:
    Image.new("RGB", (40, 40), color).save(path)
    return path.read_bytes()


@pytest.fixture
def generation_log(caplog):
    """caplog for 'dreambooth.generation': setup_logging stops our records before the root logger."""
    logger = logging.getLogger("dreambooth.generation")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


def test_top_up_generates_only_the_missing_images(tiny_model, tmp_path):
    folder = tmp_path / "class"
    folder.mkdir()
    user_images = {
        "mine1.png": write_user_image(folder / "mine1.png", (200, 30, 30)),
        "mine2.png": write_user_image(folder / "mine2.png", (30, 30, 200)),
    }

    written = generate_class_images.main(class_args(tiny_model, folder, "--num_class_images", "5"))

    after = contents(folder)
    new_names = sorted(set(after) - set(user_images))
    assert written == 3
    assert len(new_names) == 3
    assert sorted(generated_indices({name: after[name] for name in new_names})) == [0, 1, 2]
    assert {name: after[name] for name in user_images} == user_images
    assert all(load_image(folder / name).size == (32, 32) for name in new_names)


def test_images_record_their_settings_and_a_changed_prompt_is_warned_about(tiny_model, tmp_path, capsys,
                                                                             tmp_path_factory):
    folder = tmp_path / "class"
    folder.mkdir()
    write_user_image(folder / "photo.png", (200, 30, 30))  # records no prompt: never warned about
    generate_class_images.main(class_args(tiny_model, folder))
    assert "WARNING" not in capsys.readouterr().err
    next(folder.glob("00001-*.png")).unlink()

    written = generate_class_images.main(class_args(tiny_model, folder, "--class_prompt", "a photo of a CAT"))

    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"WARNING: --class_data_dir {folder}: 2 image(s) were generated from another prompt "
                                  "(2 from 'a photo of a toy'), not --class_prompt 'a photo of a CAT'")
    assert written == 1
    with Image.open(next(folder.glob("00001-*.png"))) as image:
        fields = dict(image.text)
    seed = derived_seed(0, 1)
    assert fields["parameters"].splitlines() == [
        "a photo of a CAT", f"Steps: 2, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: {seed}, Size: 32x32, Model: tiny-sd"]
    assert {key: fields[key] for key in ("prompt", "seed", "steps", "scheduler", "width", "height", "base_model")} == {
        "prompt": "a photo of a CAT", "seed": str(seed), "steps": "2", "scheduler": "dpm++", "width": "32",
        "height": "32", "base_model": "tiny-sd"}
    assert not [value for value in fields.values() if str(tmp_path_factory.getbasetemp()) in value]


def test_without_resolution_class_images_take_the_model_s_own_size(tiny_model, tmp_path):
    """The pipeline's default size, as diffusers' script draws its class images: 768 for SD 2.x 768-v,
    whose images at 512 (the old default) come out poor."""
    import json

    unet = json.loads((Path(tiny_model) / "unet" / "config.json").read_text())
    vae = json.loads((Path(tiny_model) / "vae" / "config.json").read_text())
    native = unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)
    args = class_args(tiny_model, tmp_path / "class", "--num_class_images", "1")
    del args[args.index("--resolution"):args.index("--resolution") + 2]
    generate_class_images.main(args)
    image = Image.open(next((tmp_path / "class").glob("*.png")))
    assert native != 512 and image.size == (native, native)
    assert f"Size: {native}x{native}" in image.text["parameters"]


def test_rerun_generates_nothing(tiny_model, tmp_path):
    folder = tmp_path / "class"
    generate_class_images.main(class_args(tiny_model, folder))
    before = {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in folder.iterdir()}

    written = generate_class_images.main(class_args(tiny_model, folder))

    assert written == 0
    assert {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in folder.iterdir()} == before


def test_corrupt_image_is_reported_and_replaced(tiny_model, tmp_path, generation_log):
    folder = tmp_path / "class"
    generate_class_images.main(class_args(tiny_model, folder, "--num_class_images", "3"))
    original = contents(folder)
    # Image 2 was made alone (batches of 2); remade alone, it comes out bit for bit the same.
    truncated = next(folder.glob("00002-*.png"))
    truncated.write_bytes(original[truncated.name][:40])
    (folder / "junk.png").write_bytes(b"not a png at all")

    written = generate_class_images.main(class_args(tiny_model, folder, "--num_class_images", "3"))

    warnings = [record.getMessage() for record in generation_log.records
                if record.name == "dreambooth.generation" and record.levelno == logging.WARNING]
    assert any(truncated.name in message for message in warnings)
    assert any("junk.png" in message for message in warnings)
    assert written == 1
    assert sorted(generated_indices(contents(folder))) == [0, 1, 2]
    assert all(load_image(path) for path in folder.iterdir())
    assert contents(folder) == original


def test_a_valid_image_that_cannot_be_read_is_an_error_and_kept(tiny_model, tmp_path, monkeypatch):
    folder = tmp_path / "class"
    folder.mkdir()
    big = write_user_image(folder / "panorama.png", (10, 20, 30))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # the image is now too large to decode safely
    with pytest.raises(DreamBoothError, match=r"panorama\.png: too large to decode safely"):
        generate_class_images.main(class_args(tiny_model, folder, "--num_class_images", "1"))
    assert contents(folder) == {"panorama.png": big}


def test_a_corrupt_image_that_cannot_be_removed_is_an_error(tiny_model, tmp_path, monkeypatch):
    folder = tmp_path / "class"
    folder.mkdir()
    (folder / "junk.png").write_bytes(b"not a png at all")

    def read_only(self, missing_ok=False):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "unlink", read_only)
    with pytest.raises(DreamBoothError, match=r"--class_data_dir .*: cannot remove the corrupt junk\.png"):
        generate_class_images.main(class_args(tiny_model, folder, "--num_class_images", "1"))


def test_resume_after_interruption_matches_one_uninterrupted_run(tiny_model, tmp_path):
    generate_class_images.main(class_args(tiny_model, tmp_path / "a", "--num_class_images", "4"))
    generate_class_images.main(class_args(tiny_model, tmp_path / "b", "--num_class_images", "2"))
    written = generate_class_images.main(class_args(tiny_model, tmp_path / "b", "--num_class_images", "4"))

    assert written == 2
    assert contents(tmp_path / "b") == contents(tmp_path / "a")
    assert sorted(generated_indices(contents(tmp_path / "a"))) == [0, 1, 2, 3]


def test_same_command_gives_identical_files_and_another_seed_does_not(tiny_model, tmp_path):
    for name, seed in (("first", "0"), ("second", "0"), ("other-seed", "1")):
        generate_class_images.main(class_args(tiny_model, tmp_path / name, "--num_class_images", "2", "--seed", seed))

    assert contents(tmp_path / "first") == contents(tmp_path / "second")
    assert not set(contents(tmp_path / "first")) & set(contents(tmp_path / "other-seed"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_processes_make_the_same_set_as_one(tiny_model, tmp_path):
    # `accelerate launch --cpu --num_processes 2` starts a single process unless given an mpirun
    # hostfile; --multi_gpu launches through torchrun, and with no GPU visible the processes meet
    # over gloo on the CPU.
    folder = tmp_path / "two"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()),
               str(ROOT / "generate_class_images.py"), *class_args(tiny_model, folder, "--num_class_images", "5")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    # Each process reports its own share; together they are the 5 images, each made once.
    shares = [int(count) for count in re.findall(r"(\d+) new class image\(s\) from this process", result.stdout)]
    assert sorted(shares) == [2, 3]
    with one_thread():  # as each launched process (OMP_NUM_THREADS=1): float sums depend on the thread count
        generate_class_images.main(class_args(tiny_model, tmp_path / "one", "--num_class_images", "5"))
    two = contents(folder)
    assert sorted(generated_indices(two)) == [0, 1, 2, 3, 4]
    assert two == contents(tmp_path / "one")


@pytest.mark.parametrize("change, message", [
    (["--class_prompt", ""], "--class_prompt is required"),
    (["--num_class_images", "0"], "--num_class_images 0"),
    (["--pretrained_model_name_or_path", "{empty}"], "model_index.json"),
])
def test_bad_input_is_a_one_line_error(tiny_model, tmp_path, change, message):
    empty_model = tmp_path / "not-a-model"
    empty_model.mkdir()
    extra = [value.format(empty=empty_model) for value in change]

    with pytest.raises(DreamBoothError, match=re.escape(message)):
        generate_class_images.main(class_args(tiny_model, tmp_path / "class", *extra))


def test_missing_class_prompt_flag_is_an_error(tiny_model, tmp_path):
    argv = class_args(tiny_model, tmp_path / "class")
    del argv[argv.index("--class_prompt"):argv.index("--class_prompt") + 2]

    with pytest.raises(DreamBoothError, match="--class_prompt is required"):
        generate_class_images.main(argv)


def test_a_batch_is_written_while_the_next_is_generated(tiny_model, tmp_path, monkeypatch):
    from dreambooth import generation

    calls, second_batch_started, waits = [], threading.Event(), []
    generate = generation.sample_latents
    save = generation.save_png_atomically

    def counting_generate(*args, **kwargs):
        calls.append(len(calls))
        if len(calls) == 2:
            second_batch_started.set()
        return generate(*args, **kwargs)

    def save_after_the_next_batch_starts(*args, **kwargs):
        # Written in line, the first batch's images would wait here in vain.
        waits.append(second_batch_started.wait(timeout=20))
        return save(*args, **kwargs)

    monkeypatch.setattr(generation, "sample_latents", counting_generate)
    monkeypatch.setattr(generation, "save_png_atomically", save_after_the_next_batch_starts)
    written = generate_class_images.main(class_args(tiny_model, tmp_path / "threaded"))
    monkeypatch.undo()
    generate_class_images.main(class_args(tiny_model, tmp_path / "plain"))

    assert written == 4 and len(calls) == 2
    assert waits == [True] * 4
    assert contents(tmp_path / "threaded") == contents(tmp_path / "plain")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_images_finished_on_the_device_are_the_pipelines_own_bitwise(tiny_model, dtype):
    """Class images are decoded and made 8-bit on the device, so the next batch can be queued before
    they reach the host: the same pixels as the pipeline's own "pil" output, in each precision."""
    from dreambooth import generation

    pipeline = generation.load_pipeline(tiny_model, torch.device("cpu"), dtype)
    settings = ("a photo of a toy", [3, 11, 12], 32, 32, 3, 7.5, "blurry")
    with one_thread():
        own = generation.generate(pipeline, *settings)
        latents = generation.sample_latents(pipeline, *settings)
        finished = generation.DecodedImages(pipeline, latents).images()

    assert latents.shape == (3, pipeline.unet.config.in_channels, 32 // pipeline.vae_scale_factor,
                             32 // pipeline.vae_scale_factor)
    assert [image.mode for image in finished] == ["RGB"] * 3
    assert [image.tobytes() for image in finished] == [image.tobytes() for image in own]
    assert len({image.tobytes() for image in finished}) == 3  # three seeds, three images


@pytest.mark.parametrize("on_host", [True, False], ids=["cpu", "copy_under_way"])
def test_a_failure_mid_run_keeps_the_images_already_made(tiny_model, tmp_path, monkeypatch, on_host):
    """Including a batch still on its way to the host (on a GPU) when the next one fails."""
    from dreambooth import generation

    class Decoded(generation.DecodedImages):
        pass

    Decoded.on_host = on_host
    monkeypatch.setattr(generation, "DecodedImages", Decoded)
    generate = generation.sample_latents
    calls = []

    def out_of_memory_on_the_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory")
        return generate(*args, **kwargs)

    monkeypatch.setattr(generation, "sample_latents", out_of_memory_on_the_second_batch)
    with pytest.raises(RuntimeError, match="out of memory"):
        generate_class_images.main(class_args(tiny_model, tmp_path / "class"))

    assert sorted(generated_indices(contents(tmp_path / "class"))) == [0, 1]


def test_a_full_disk_is_a_one_line_error_naming_the_folder(tiny_model, tmp_path, monkeypatch):
    write_bytes = Path.write_bytes

    def disk_full_for_image_3(self, data):
        if self.name.startswith(".00003-"):
            write_bytes(self, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", disk_full_for_image_3)
    folder = tmp_path / "class"
    with pytest.raises(DreamBoothError, match=rf"^--class_data_dir {re.escape(str(folder))}: could not write "
                                              r"00003-[0-9a-f]{12}\.png \(No space left on device\)$"):
        generate_class_images.main(class_args(tiny_model, folder))

    # The half-written temporary file is gone with the error.
    assert sorted(generated_indices(contents(folder))) == [0, 1, 2]


def pixels(folder: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(path), dtype=np.int16) for path in sorted(folder.iterdir())]


@pytest.mark.parametrize("flag", ["--channels_last", pytest.param("--compile", marks=pytest.mark.slow)])
def test_speed_flags_make_the_same_images(tiny_model, tmp_path, flag):
    """channels_last is on by default (--no_channels_last turns it off); --compile comes on top of it."""
    from dreambooth import generation

    prepared = []
    speed_up = generation.speed_up

    def recording_speed_up(pipeline, *flags):
        speed_up(pipeline, *flags)
        prepared.append((pipeline.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last),
                         isinstance(pipeline.unet, torch._dynamo.eval_frame.OptimizedModule)))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(generation, "speed_up", recording_speed_up)
        generate_class_images.main(class_args(tiny_model, tmp_path / "plain", "--no_channels_last"))
        generate_class_images.main(class_args(tiny_model, tmp_path / "fast", *([flag] if flag == "--compile" else [])))

    assert prepared == [(False, False), (True, flag == "--compile")]
    plain, fast = pixels(tmp_path / "plain"), pixels(tmp_path / "fast")
    assert len(plain) == len(fast) == 4
    # Other kernels round differently: a pixel may move by a level or two, the picture not at all.
    assert max(int(np.abs(a - b).max()) for a, b in zip(plain, fast)) <= 2


# ---------------------------------------------------------------- several concepts (--concepts_list)

# The seeds of class images 0 and 1 of a single-concept run at --seed 0 (derived_seed(0, i)), as the
# suite has drawn them all along: folders made before stay reproducible.
SINGLE_CONCEPT_SEEDS = [2968811710, 3964924996]


def recorded_seeds(folder: Path) -> list[int]:
    """The seed each class image of ``folder`` records, in the order of the images' indices."""
    return [int(Image.open(path).text["seed"]) for path in sorted(folder.glob("0*.png"))]


def concepts_file(path: Path, *concepts: tuple[str, Path, int]) -> str:
    """A --concepts_list of (class prompt, class folder, count); the instance folders need not exist
    on a machine that only makes class images."""
    import yaml

    path.write_text(yaml.safe_dump([
        {"instance_data_dir": str(path.parent / f"photos-{number}"), "instance_prompt": f"a photo of sks{number} thing",
         "class_prompt": prompt, "class_data_dir": str(folder), "num_class_images": count}
        for number, (prompt, folder, count) in enumerate(concepts)]))
    return str(path)


def list_args(model: str, concepts_list: str, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", model, "--concepts_list", concepts_list, "--resolution", "32",
            "--num_inference_steps", "2", "--sample_batch_size", "2", *extra]


def test_single_concept_seeds_are_the_ones_drawn_before_lists_had_seeds_of_their_own(tiny_model, tmp_path):
    generate_class_images.main(class_args(tiny_model, tmp_path / "class", "--num_class_images", "2"))
    assert recorded_seeds(tmp_path / "class") == SINGLE_CONCEPT_SEEDS


def test_a_concepts_list_fills_each_class_folder_as_training_would(tiny_model, tmp_path, monkeypatch):
    """Same files (names, pixels, seeds, PNG text) as training's top-up; training then makes none."""
    from types import SimpleNamespace

    from accelerate import PartialState

    import train_dreambooth
    from dreambooth import generation
    from dreambooth.config import TrainConfig, parse_config

    def concepts(where: Path) -> str:
        return concepts_file(where / "concepts.yaml", ("a photo of a cat", where / "cats", 2),
                             ("a photo of a dog", where / "dogs", 3))

    def draw(pipeline, *settings, **more):
        """Images that depend on every setting they are drawn with (the pipeline's 25 denoising steps
        of 5 images, twice, take a minute here): prompt, seeds, size, steps, guidance."""
        prompt, seeds, height, width, *rest = settings
        key = hashlib.sha1(repr((prompt, height, width, rest, sorted(more.items()))).encode()).digest()
        return [Image.frombytes("RGB", (width, height), np.random.default_rng([seed, *key]).bytes(width * height * 3))
                for seed in seeds]

    draw_class_images(monkeypatch, draw)
    loads = []
    load_pipeline = generation.load_pipeline
    monkeypatch.setattr(generation, "load_pipeline", lambda *args, **kwargs: loads.append(args) or load_pipeline(
        *args, **kwargs))
    (tmp_path / "script").mkdir()
    (tmp_path / "training").mkdir()
    # Training draws its class images at --resolution with the script's defaults otherwise.
    written = generate_class_images.main(["--pretrained_model_name_or_path", tiny_model, "--resolution", "32",
                                          "--concepts_list", concepts(tmp_path / "script"), "--seed", "3"])
    training_flags = ["--pretrained_model_name_or_path", tiny_model, "--resolution", "32", "--seed", "3",
                      "--with_prior_preservation", "--output_dir", str(tmp_path / "out")]
    trained = parse_config(TrainConfig, [*training_flags, "--concepts_list", concepts(tmp_path / "training")])
    train_dreambooth.top_up_class_images(trained, SimpleNamespace(state=PartialState()))

    assert written == 5
    assert len(loads) == 2  # one pipeline for both folders, in the script and in training
    for name, count in (("cats", 2), ("dogs", 3)):
        made = contents(tmp_path / "script" / name)
        assert sorted(generated_indices(made)) == list(range(count))
        assert made == contents(tmp_path / "training" / name)
    # A training run over the script's folders finds them complete: it loads no pipeline.
    monkeypatch.setattr(generation, "load_pipeline", lambda *args, **kwargs: pytest.fail("generated again"))
    before = {name: contents(tmp_path / "script" / name) for name in ("cats", "dogs")}
    again = parse_config(TrainConfig, [*training_flags, "--concepts_list", str(tmp_path / "script" / "concepts.yaml")])
    train_dreambooth.top_up_class_images(again, SimpleNamespace(state=PartialState()))
    assert {name: contents(tmp_path / "script" / name) for name in ("cats", "dogs")} == before


def test_each_concept_draws_its_class_images_from_seeds_of_its_own(tiny_model, tmp_path):
    # Two subjects of one class, each with a folder of its own: from the same seeds they would be the
    # same pictures twice, and from one prompt, the same files.
    listed = concepts_file(tmp_path / "concepts.yaml", ("a photo of a dog", tmp_path / "dogs-a", 2),
                           ("a photo of a dog", tmp_path / "dogs-b", 2))
    generate_class_images.main(list_args(tiny_model, listed, "--seed", "0"))

    first, second = recorded_seeds(tmp_path / "dogs-a"), recorded_seeds(tmp_path / "dogs-b")
    assert first == SINGLE_CONCEPT_SEEDS  # concept 0 keeps the single-concept seeds
    assert not set(first) & set(second) and len(set(second)) == 2
    first_images, second_images = pixels(tmp_path / "dogs-a"), pixels(tmp_path / "dogs-b")
    assert all(np.abs(a - b).mean() > 1 for a, b in zip(first_images, second_images))


def test_a_class_folder_shared_by_two_concepts_gets_one_set(tiny_model, tmp_path):
    # Concepts 1 and 2 share a folder and prompt: one set, the size of the larger count, from the
    # seeds of concept 1, the first to name the folder.
    listed = concepts_file(tmp_path / "concepts.yaml", ("a photo of a cat", tmp_path / "cats", 1),
                           ("a photo of a dog", tmp_path / "dogs", 2), ("a photo of a dog", tmp_path / "dogs", 3))
    generate_class_images.main(list_args(tiny_model, listed))
    alone = concepts_file(tmp_path / "alone.yaml", ("a photo of a cat", tmp_path / "cats", 1),  # complete
                          ("a photo of a dog", tmp_path / "dogs-alone", 3))
    generate_class_images.main(list_args(tiny_model, alone))

    assert sorted(generated_indices(contents(tmp_path / "dogs"))) == [0, 1, 2]
    assert contents(tmp_path / "dogs") == contents(tmp_path / "dogs-alone")
    assert not set(recorded_seeds(tmp_path / "dogs")) & set(recorded_seeds(tmp_path / "cats"))


@pytest.mark.parametrize("flags, message", [
    (["--class_prompt", "a photo of a cat"],
     "--class_prompt: a --concepts_list gives each concept its own; set class_prompt in {listed} and leave out the flag"),
    (["--class_data_dir", "{tmp}/cats"], "--class_data_dir: a --concepts_list gives each concept its own"),
])
def test_single_concept_flags_beside_a_list_are_refused(tiny_model, tmp_path, flags, message):
    listed = concepts_file(tmp_path / "concepts.yaml", ("a photo of a cat", tmp_path / "cats", 1))
    args = list_args(tiny_model, listed, *[flag.format(tmp=tmp_path) for flag in flags])
    with pytest.raises(DreamBoothError, match="^" + re.escape(message.format(listed=listed))):
        generate_class_images.main(args)
    assert not (tmp_path / "cats").exists()


def test_a_list_concept_without_a_class_folder_is_named(tiny_model, tmp_path):
    import yaml

    listed = tmp_path / "concepts.yaml"
    listed.write_text(yaml.safe_dump([{"instance_data_dir": "cat", "instance_prompt": "a photo of sks cat",
                                       "class_prompt": "a photo of a cat"}]))
    with pytest.raises(DreamBoothError, match=re.escape(
            f"--concepts_list {listed}, concept 0: class_data_dir (missing): prior preservation needs it")):
        generate_class_images.main(list_args(tiny_model, str(listed)))


@pytest.mark.parametrize("device, applied", [("cuda", True), ("cpu", False)])
def test_cudnn_benchmark_is_set_for_class_images_on_a_cuda_device_only(device, applied):
    from types import SimpleNamespace

    from dreambooth.generation import speed_up

    before = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        speed_up(SimpleNamespace(device=torch.device(device)))
        assert torch.backends.cudnn.benchmark is False  # off unless asked
        speed_up(SimpleNamespace(device=torch.device(device)), cudnn_benchmark=True)
        assert torch.backends.cudnn.benchmark is applied
    finally:
        torch.backends.cudnn.benchmark = before


@pytest.mark.parametrize("flags, expected", [([], False), (["--cudnn_benchmark"], True)])
def test_the_scripts_give_their_cudnn_benchmark_flag_to_the_class_image_jobs(tiny_model, instance_dir, tmp_path,
                                                                             monkeypatch, flags, expected):
    from types import SimpleNamespace

    import train_dreambooth
    from conftest import train_args
    from dreambooth.config import TrainConfig, parse_config

    jobs = []
    monkeypatch.setattr(generate_class_images, "generate_class_images", lambda job, **kwargs: jobs.append(job) or 0)
    monkeypatch.setattr(train_dreambooth, "generate_class_images", lambda job, *args: jobs.append(job) or 0)
    generate_class_images.main(class_args(tiny_model, tmp_path / "script", *flags))
    config = parse_config(TrainConfig, train_args(
        tiny_model, instance_dir, tmp_path / "out", "--with_prior_preservation", "--class_data_dir",
        str(tmp_path / "training"), "--class_prompt", "a photo of a toy", *flags))
    train_dreambooth.top_up_class_images(config, SimpleNamespace(state=None))
    assert [job.cudnn_benchmark for job in jobs] == [expected, expected]


@pytest.mark.parametrize("script", ["generate", "train"])
def test_fp16_class_images_on_the_cpu_are_refused_in_one_line_before_any_image(tiny_model, instance_dir, tmp_path,
                                                                                script):
    import train_dreambooth
    from conftest import train_args

    folder = tmp_path / "class"
    fp16 = ["--prior_generation_precision", "fp16"]
    message = (r"^--prior_generation_precision fp16 needs a GPU, and this run uses the CPU; use fp32 or bf16 "
               r"\(or leave the flag out: fp32 on the CPU\)$")
    with pytest.raises(DreamBoothError, match=message):
        if script == "generate":
            generate_class_images.main(class_args(tiny_model, folder, *fp16))
        else:
            train_dreambooth.main(train_args(tiny_model, instance_dir, tmp_path / "out", "--with_prior_preservation",
                                             "--class_prompt", "a photo of a toy", "--class_data_dir", str(folder),
                                             "--num_class_images", "2", *fp16))
    assert not folder.exists() or not any(folder.iterdir())
    # bf16 is fine on the CPU.
    assert generate_class_images.main(class_args(tiny_model, folder, "--prior_generation_precision", "bf16")) == 4
