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
    script.write_text(NOTING_DRAWS.format(root=str(ROOT), notes=str(notes / "draws")), encoding="utf-8")
    notes.mkdir()
    # An earlier run's image in both folders: the numbering carries on after it, at 004.
    for folder in (two, one):
        folder.mkdir()
        Image.new("RGB", (32, 32)).save(folder / "003-earlier-seed0.png")
    # Batches of 2 of 3 images a prompt, [s, s+1] and [s+2], dealt to processes 0, 1, 0, 1: every
    # prompt has images from both processes, and its grid is made from their files. No --seed: the
    # main process's random one serves all.
    prompts = ["a sks toy", "a sks toy in the snow"]
    launched = launch(args(tiny_model, two, prompts, 3, seed=None), script=script)

    seeds = sorted({int(path.name.rsplit("-seed", 1)[1][:-4]) for path in two.glob("00[45]-*-seed*.png")})
    assert len(seeds) == 3 and seeds == list(range(seeds[0], seeds[0] + 3)), seeds
    assert draws(notes / "draws", 0) == [(prompt, seeds[:2]) for prompt in prompts]
    assert draws(notes / "draws", 1) == [(prompt, seeds[2:]) for prompt in prompts]
    with one_thread():  # as each launched process runs (OMP_NUM_THREADS=1)
        infer.main(args(tiny_model, one, prompts, 3, seed=seeds[0]))

    made_by_two, made_by_one = files(two), files(one)
    assert list(made_by_two) == list(made_by_one)
    assert len(made_by_one) == 1 + 2 * (3 + 1)
    assert sorted({name[:3] for name in made_by_one}) == ["003", "004", "005"]
    for name, data in made_by_one.items():
        assert np.array_equal(pixels(made_by_two[name]), pixels(data)), name
        assert made_by_two[name] == data, f"{name}: same pixels, other metadata"

    # The main process alone prints: each grid's line once, and the summary once.
    assert [line for line in launched.stdout.splitlines() if line.startswith("wrote ")] == [
        f"wrote 6 image(s) to {two} by 2 processes (seeds from {seeds[0]})"], launched.stdout
    for prompt in prompts:
        assert launched.stdout.count(f"{prompt!r}: 3 image(s) and ") == 1, launched.stdout
