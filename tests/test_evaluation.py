"""evaluate.py and dreambooth.evaluation: each metric is its definition on the embeddings, identical
images score the maximum, the script writes its report, and bad input is a one-line error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import evaluate
import infer
from conftest import TOY_SUBJECT
from dreambooth.config import EvaluateConfig
from dreambooth.errors import DreamBoothError
from dreambooth.evaluation import (
    METRICS,
    Generation,
    diversity,
    evaluate_pipeline,
    load_encoders,
    load_real_images,
    prompt_fidelity,
    score,
    subject_fidelity,
)


@pytest.fixture(scope="session")
def encoders(tiny_dino, tiny_clip):
    return load_encoders(tiny_dino, tiny_clip, torch.device("cpu"))


def noise_images(count: int, seed: int, size: int = 48) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def pairwise_mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a[:, None].double(), b[None].double(), dim=-1).mean().item()


def test_metric_functions_match_their_definitions():
    g = torch.Generator().manual_seed(0)
    generated, real, texts = (torch.randn(n, 8, generator=g) for n in (5, 3, 5))

    pairs = [F.cosine_similarity(x, y, dim=0).item() for x in generated for y in real]
    assert subject_fidelity(generated, real) == pytest.approx(sum(pairs) / len(pairs), abs=1e-6)
    paired = [F.cosine_similarity(x, t, dim=0).item() for x, t in zip(generated, texts)]
    assert prompt_fidelity(generated, texts) == pytest.approx(sum(paired) / len(paired), abs=1e-6)

    def mean_distance(group):
        return np.mean([1 - F.cosine_similarity(group[i], group[j], dim=0).item()
                        for i in range(len(group)) for j in range(len(group)) if i != j])

    # A group of one has no pairs and is left out of the average.
    assert diversity([generated[:3], generated[3:], real[:1]]) == pytest.approx(
        (mean_distance(generated[:3]) + mean_distance(generated[3:])) / 2, abs=1e-6)
    assert diversity([real[:1]]) is None


def test_identical_images_score_the_maximum_and_others_score_lower(encoders):
    subject = load_real_images(TOY_SUBJECT)[0]
    copies = [Generation(subject, "a sks toy on the beach", seed) for seed in range(3)]
    copies.append(Generation(subject, "a toy on the beach", 0, subject=False))

    best = score(copies, [subject, subject], encoders, "sks")
    noise = [Generation(image, "a sks toy on the beach", seed) for seed, image in enumerate(noise_images(3, 0))]
    noise.append(Generation(noise_images(1, 1)[0], "a toy on the beach", 0, subject=False))
    worse = score(noise, [subject, subject], encoders, "sks")

    for key in ("dino", "clip_i", "pres"):
        assert best[key] == pytest.approx(1.0, abs=1e-5)
        assert worse[key] < best[key] - 1e-3
    assert best["div"] == pytest.approx(0.0, abs=1e-5)
    assert worse["div"] > 1e-3


def test_each_metric_is_its_definition_on_embeddings_computed_directly(encoders, tiny_dino, tiny_clip):
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel, ViTImageProcessorPil, ViTModel

    real = load_real_images(TOY_SUBJECT)[:3]
    images = noise_images(6, 2)
    prompts = ["a sks toy in the snow", "a sks toy in the snow", "a red sks toy", "a red sks toy"]
    generations = [Generation(image, prompt, 0) for image, prompt in zip(images, prompts)]
    generations += [Generation(image, "a toy in the snow", 0, subject=False) for image in images[4:]]

    metrics = score(generations, real, encoders, "sks")

    vit, vit_processor = ViTModel.from_pretrained(tiny_dino), ViTImageProcessorPil.from_pretrained(tiny_dino)
    clip, clip_processor = CLIPModel.from_pretrained(tiny_clip), CLIPImageProcessorPil.from_pretrained(tiny_clip)
    tokenizer = AutoTokenizer.from_pretrained(tiny_clip)
    with torch.no_grad():
        def dino(batch):
            return vit(**vit_processor(images=batch, return_tensors="pt")).last_hidden_state[:, 0]

        def clip_image(batch):
            pixels = clip_processor(images=batch, return_tensors="pt")["pixel_values"]
            return clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output)

        tokens = tokenizer(["a toy in the snow", "a toy in the snow", "a red toy", "a red toy"],
                           padding=True, return_tensors="pt")
        text = clip.text_projection(clip.text_model(**tokens).pooler_output)
        generated_dino, real_dino = dino(images[:4]), dino(real)
        generated_clip = clip_image(images[:4])

    assert metrics["dino"] == pytest.approx(pairwise_mean_cosine(generated_dino, real_dino), abs=1e-5)
    assert metrics["clip_i"] == pytest.approx(pairwise_mean_cosine(generated_clip, clip_image(real)), abs=1e-5)
    assert metrics["clip_t"] == pytest.approx(
        F.cosine_similarity(generated_clip, text, dim=-1).mean().item(), abs=1e-5)
    assert metrics["pres"] == pytest.approx(pairwise_mean_cosine(dino(images[4:]), real_dino), abs=1e-5)
    same_prompt = [1 - F.cosine_similarity(generated_dino[i], generated_dino[i + 1], dim=0).item() for i in (0, 2)]
    assert metrics["div"] == pytest.approx(sum(same_prompt) / 2, abs=1e-5)


def test_prompt_sets_are_the_papers_25_templates():
    live = EvaluateConfig(prompt_set="live").templates()
    objects = EvaluateConfig().templates()

    assert len(live) == len(objects) == 25 and all("{}" in prompt for prompt in live + objects)
    assert objects[0] == live[0] == "a {} in the jungle" and objects[-1] == live[-1] == "a cube shaped {}"
    assert "a {} wearing a santa hat" in live and "a {} wearing a santa hat" not in objects
    assert "a {} on top of a mirror" in objects
    assert EvaluateConfig(num_prompts=3).templates() == objects[:3]


def eval_args(tiny_dino, tiny_clip, output: Path, *extra: str) -> list[str]:
    return ["--instance_data_dir", str(TOY_SUBJECT), "--identifier", "sks", "--dino_model", tiny_dino,
            "--clip_model", tiny_clip, "--output_dir", str(output), *extra]


def test_evaluate_writes_metrics_sheet_and_images_that_score_again(tiny_model, tiny_dino, tiny_clip, tmp_path,
                                                                    capsys):
    templates = tmp_path / "templates.txt"
    templates.write_text("# two of the paper's prompts\na {} in the snow\na red {}\n", encoding="utf-8")
    output = tmp_path / "eval"
    generate = ["--pretrained_model_name_or_path", tiny_model, "--class_noun", "toy", "--prompts_file",
                str(templates), "--num_images_per_prompt", "2", "--resolution", "32", "--num_inference_steps", "2",
                "--seed", "5"]

    metrics = evaluate.main(eval_args(tiny_dino, tiny_clip, output, *generate))

    report = json.loads((output / "metrics.json").read_text(encoding="utf-8"))
    assert set(report["metrics"]) == set(METRICS)
    assert all(-1 <= report["metrics"][key] <= 2 for key in METRICS)
    assert report["prompts"] == ["a sks toy in the snow", "a red sks toy"]
    assert report["class_prompts"] == ["a toy in the snow", "a red toy"]
    assert report["counts"] == {"subject_prompts": 2, "class_prompts": 2, "subject_images": 4, "class_images": 4,
                                "real_images": 5}
    assert report["seeds"]["used"] == [5, 6]
    assert report["models"]["clip"] == tiny_clip and tiny_clip in report["models"]["clip_variant"]
    assert report["models"]["dino"] == tiny_dino and report["models"]["pipeline"] == tiny_model
    with Image.open(output / "contact_sheet.png") as sheet:
        assert sheet.size == (2 * 128, 4 * (16 + 128))
    assert len(list((output / "images").glob("*.png"))) == 8
    printed = capsys.readouterr().out
    assert "this model" in printed and "paper: DreamBooth (SD)" in printed and "0.668" in printed

    rescored = eval_args(tiny_dino, tiny_clip, tmp_path / "again", "--generated_dir", str(output / "images"))
    again = evaluate.main(rescored)
    assert again == pytest.approx(metrics, abs=1e-6)


def test_generated_dir_scores_what_infer_wrote(tiny_model, tiny_dino, tiny_clip, tmp_path):
    samples = tmp_path / "samples"
    infer.main(["--pretrained_model_name_or_path", tiny_model, "--output_dir", str(samples), "--prompt",
                "a photo of sks toy", "--prompt", "a photo of a toy", "--num_images_per_prompt", "2",
                "--num_inference_steps", "2", "--seed", "3", "--height", "32", "--width", "32"])

    metrics = evaluate.main(eval_args(tiny_dino, tiny_clip, tmp_path / "eval", "--generated_dir", str(samples)))

    report = json.loads((tmp_path / "eval" / "metrics.json").read_text(encoding="utf-8"))
    assert report["counts"]["subject_images"] == 2 and report["counts"]["class_images"] == 2  # grids skipped
    assert report["prompts"] == ["a photo of sks toy"] and report["seeds"]["used"] == [3, 4]
    assert all(metrics[key] is not None for key in METRICS)


def test_evaluate_pipeline_is_deterministic_for_a_seed(tiny_model, encoders):
    from dreambooth.generation import load_pipeline

    pipeline = load_pipeline(tiny_model, torch.device("cpu"), torch.float32)
    real = load_real_images(TOY_SUBJECT)[:2]
    settings = dict(num_images_per_prompt=2, seed=1, resolution=32, num_inference_steps=2, with_class_prompts=False,
                    progress=False)

    first, generations = evaluate_pipeline(pipeline, encoders, real, ["a {} in the snow"], "sks", "toy", **settings)
    second, _ = evaluate_pipeline(pipeline, encoders, real, ["a {} in the snow"], "sks", "toy", **settings)

    assert [(item.prompt, item.seed) for item in generations] == [("a sks toy in the snow", 1),
                                                                   ("a sks toy in the snow", 2)]
    assert first == second and first["pres"] is None and first["div"] is not None


@pytest.fixture
def bad(tmp_path) -> dict[str, str]:
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n", encoding="utf-8")
    no_placeholder = tmp_path / "plain.txt"
    no_placeholder.write_text("a dog on the beach\n", encoding="utf-8")
    unlabeled = tmp_path / "unlabeled"
    unlabeled.mkdir()
    noise_images(1, 0)[0].save(unlabeled / "image.png")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "001-partial.png").write_bytes(b"")
    return {"empty": str(empty), "plain": str(no_placeholder), "unlabeled": str(unlabeled),
            "missing": str(tmp_path / "missing"), "broken": str(broken)}


@pytest.mark.parametrize("change, message", [
    (["--instance_data_dir", "{missing}"], r"--instance_data_dir .*missing: folder not found"),
    (["--identifier", " "], r"--identifier is required"),
    (["--prompts_file", "{empty}"], r"--prompts_file .*empty\.txt: no prompts"),
    (["--prompts_file", "{plain}"], r"--prompts_file .*plain\.txt: prompt 'a dog on the beach' has no \{\}"),
    (["--class_noun", ""], r"--class_noun is required"),
    (["--prompt_set", "people"], r"--prompt_set.*invalid choice: 'people'"),
    (["--generated_dir", "{missing}"], r"--generated_dir .*missing: folder not found"),
    (["--generated_dir", "{unlabeled}"], r"--generated_dir .*no image with a prompt"),
    (["--generated_dir", "{broken}"], r"--generated_dir: .*001-partial\.png: cannot read it as an image"),
    (["--dino_model", "{missing}"], r"--dino_model .*missing: no such folder"),
    (["--clip_model", r"C:\models\clip"], r"--clip_model C:\\models\\clip: no such folder"),  # a Windows path
    (["--generated_dir", "{unlabeled}", "--dino_model", "nobody/no-dino"],
     r"--dino_model nobody/no-dino: cannot be loaded \(.*\); the default models need one download.*local folder"),
    (["--generated_dir", "{unlabeled}", "--clip_model", "{dino}"],
     r"--clip_model .*tiny-dino: a 'vit' model, not CLIP"),
    (["--generated_dir", "{unlabeled}", "--pretrained_model_name_or_path", "{model}"],
     r"--generated_dir or a model .*not both"),
])
def test_bad_input_is_a_one_line_error(tiny_model, tiny_dino, tiny_clip, tmp_path, bad, change, message):
    values = {**bad, "dino": tiny_dino, "model": tiny_model}
    generating = "--generated_dir" not in change
    base = ["--pretrained_model_name_or_path", tiny_model, "--class_noun", "toy"] if generating else []
    with pytest.raises(DreamBoothError, match=message) as error:
        evaluate.main(eval_args(tiny_dino, tiny_clip, tmp_path / "eval", *base,
                                *[value.format(**values) for value in change]))
    assert "\n" not in str(error.value)
