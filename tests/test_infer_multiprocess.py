"""infer.py under a real `accelerate launch` of 2 CPU processes (gloo): the files of one process."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import infer
from conftest import ROOT, one_thread
from test_multiprocess import launch

pytestmark = pytest.mark.slow

# infer.py, each process noting what it draws (prompt and seeds of each batch) and where.
NOTING_DRAWS = """
import json, sys
sys.path.insert(0, {root!r})
import infer
from dreambooth.cli import run_cli
from dreambooth.generation import launch_state

generate = infer.generate

def noted(pipeline, prompt, seeds, *args, **kwargs):
    with open(f"{notes}-{{launch_state().process_index}}.jsonl", "a", encoding="utf-8") as notes:
        notes.write(json.dumps([str(pipeline.device), prompt, list(seeds)]) + "\\n")
    return generate(pipeline, prompt, seeds, *args, **kwargs)

infer.generate = noted
sys.exit(run_cli(infer.main))
"""


def args(model: str, output: Path, prompts: list[str], images: int, seed: int | None) -> list[str]:
    return ["--pretrained_model_name_or_path", model, "--output_dir", str(output), "--height", "32", "--width", "32",
            "--num_inference_steps", "2", "--num_images_per_prompt", str(images), "--batch_size", "2",
            *(["--seed", str(seed)] if seed is not None else []), *(flag for p in prompts for flag in ("--prompt", p))]


def files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def draws(notes: Path, process: int) -> list[tuple[str, list[int]]]:
    lines = Path(f"{notes}-{process}.jsonl").read_text(encoding="utf-8").splitlines()
    assert {json.loads(line)[0] for line in lines} == {"cpu"}
    return [(json.loads(line)[1], json.loads(line)[2]) for line in lines]


def test_two_processes_share_the_work_and_write_the_files_of_one(tiny_model, tmp_path):
    two, one, notes = tmp_path / "two", tmp_path / "one", tmp_path / "notes"
    script = tmp_path / "noting_infer.py"
    script.write_text(NOTING_DRAWS.format(root=str(ROOT), notes=str(notes / "first")), encoding="utf-8")
    notes.mkdir()
    # Batches of 2 of 3 images a prompt, [7, 8] and [9], dealt to processes 0, 1, 0, 1: every
    # prompt has images from both processes, and its grid is made from their files.
    first = (["a sks toy", "a sks toy in the snow"], 3)
    # Then one batch a prompt, 3 over 2 processes: process 0 draws the 1st and 3rd prompts, grids
    # at hand, and process 1 the 2nd. No --seed: the main process's random one serves all.
    second = (["a sks toy on the moon", "a red sks toy", "a sks toy at night"], 2)

    launched = [launch(args(tiny_model, two, *first, seed=7), script=script)]
    script.write_text(NOTING_DRAWS.format(root=str(ROOT), notes=str(notes / "second")), encoding="utf-8")
    launched.append(launch(args(tiny_model, two, *second, seed=None), script=script))

    second_seeds = {int(path.name.rsplit("-seed", 1)[1][:-4]) for path in two.glob("00[234]-*-seed*.png")}
    assert len(second_seeds) == 2 and max(second_seeds) == min(second_seeds) + 1, second_seeds
    drawn = sorted(second_seeds)
    assert draws(notes / "first", 0) == [("a sks toy", [7, 8]), ("a sks toy in the snow", [7, 8])]
    assert draws(notes / "first", 1) == [("a sks toy", [9]), ("a sks toy in the snow", [9])]
    assert draws(notes / "second", 0) == [("a sks toy on the moon", drawn), ("a sks toy at night", drawn)]
    assert draws(notes / "second", 1) == [("a red sks toy", drawn)]
    with one_thread():  # as each launched process runs (OMP_NUM_THREADS=1)
        infer.main(args(tiny_model, one, *first, seed=7))
        infer.main(args(tiny_model, one, *second, seed=min(second_seeds)))

    made_by_two, made_by_one = files(two), files(one)
    assert list(made_by_two) == list(made_by_one)
    assert len(made_by_one) == 2 * (3 + 1) + 3 * (2 + 1)
    assert sorted({name[:3] for name in made_by_one}) == ["000", "001", "002", "003", "004"]
    for name, data in made_by_one.items():
        assert np.array_equal(pixels(made_by_two[name]), pixels(data)), name
        assert made_by_two[name] == data, f"{name}: same pixels, other metadata"

    # The main process alone prints: each grid's line once, and the summary once.
    for result, (prompts, images), seeds in zip(launched, (first, second), ("7", str(min(second_seeds)))):
        assert [line for line in result.stdout.splitlines() if line.startswith("wrote ")] == [
            f"wrote {len(prompts) * images} image(s) to {two} by 2 processes (seeds from {seeds})"], result.stdout
        for prompt in prompts:
            assert result.stdout.count(f"{prompt!r}: {images} image(s) and ") == 1, result.stdout
