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
from conftest import ROOT, TOY_SUBJECT, drawn_batches, noting_script
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
    score_real_images,
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
    generated, real, texts = (torch.randn(n, 8, generator=g) for n in (5, 3, 2))

    pairs = [F.cosine_similarity(x, y, dim=0).item() for x in generated for y in real]
    assert subject_fidelity(generated, real) == pytest.approx(sum(pairs) / len(pairs), abs=1e-6)
    # CLIP-T: images 0-3 are of prompt 0, image 4 of prompt 1; each prompt's mean, then their mean.
    paired = [[F.cosine_similarity(x, texts[0], dim=0).item() for x in generated[:4]],
              [F.cosine_similarity(generated[4], texts[1], dim=0).item()]]
    assert prompt_fidelity([generated[:4], generated[4:]], texts) == pytest.approx(
        (np.mean(paired[0]) + np.mean(paired[1])) / 2, abs=1e-6)

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


# The tiny DINO takes 32 px: DINO's evaluation resizes the short side to int(256 * 32 / 224) = 36.
DINO_CROP, DINO_SHORT_SIDE = 32, 36
IMAGENET_MEAN, IMAGENET_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
CLIP_MEAN, CLIP_STD = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])


def resize_and_crop(image: Image.Image, short_side: int, crop: int, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """torchvision's Resize(short_side, bicubic), CenterCrop(crop), ToTensor, Normalize, written out:
    the reference transforms of DINO and CLIP (CenterCrop rounds a half margin with Python's round)."""
    width, height = image.size
    if width <= height:
        size = (short_side, short_side * height // width)
    else:
        size = (short_side * width // height, short_side)
    pixels = np.asarray(image.resize(size, Image.BICUBIC), dtype=np.float64) / 255
    top, left = round((size[1] - crop) / 2), round((size[0] - crop) / 2)
    return ((pixels[top:top + crop, left:left + crop] - mean) / std).transpose(2, 0, 1)


def clip_image_by_hand(clip, images: list[Image.Image]) -> np.ndarray:
    """CLIP's encode_image: its transform (short side 32, centre 32, CLIP mean/std), ln_post of the
    CLS token, then the projection."""
    pixels = torch.tensor(np.stack([resize_and_crop(image, 32, 32, CLIP_MEAN, CLIP_STD) for image in images]))
    with torch.no_grad():
        cls = clip.vision_model(pixel_values=pixels.float()).last_hidden_state[:, 0]
        return clip.visual_projection(clip.vision_model.post_layernorm(cls)).numpy()


def random_image(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return a @ b.T


def test_dino_prepares_images_as_dinos_evaluation_does(encoders, tiny_dino):
    """Short side to 256/224 of the crop, centre crop, ImageNet mean/std (which DINO was trained with,
    whatever the Hub processor says): not the processor's squash to a square with mean/std 0.5."""
    from transformers import ViTModel

    sizes = ((48, 48), (72, 48), (40, 50))  # the last resized to 36 x 45: an odd margin
    images = [random_image(width, height, seed) for seed, (width, height) in enumerate(sizes)]
    vit = ViTModel.from_pretrained(tiny_dino, add_pooling_layer=False)
    pixels = np.stack([resize_and_crop(image, DINO_SHORT_SIDE, DINO_CROP, IMAGENET_MEAN, IMAGENET_STD)
                       for image in images])
    with torch.no_grad():
        cls = vit(pixel_values=torch.from_numpy(pixels).float()).last_hidden_state[:, 0].numpy()

    embedded = encoders.dino.embed_images(images).numpy()

    np.testing.assert_allclose(embedded, cls / np.linalg.norm(cls, axis=1, keepdims=True), atol=1e-5)


def test_dino_sees_only_the_centre_of_a_non_square_image(encoders):
    """A photo taller than wide scores as its centre square: nothing is squashed."""
    tall = noise_images(1, 5, size=60)[0].crop((12, 0, 12 + DINO_SHORT_SIDE, 60))  # 36 x 60, no resize needed
    centre = tall.crop((0, 12, DINO_SHORT_SIDE, 12 + DINO_SHORT_SIDE))

    tall_embedding, centre_embedding = encoders.dino.embed_images([tall, centre])

    assert torch.dot(tall_embedding, centre_embedding).item() == pytest.approx(1.0, abs=1e-6)


def test_clip_prepares_images_as_clips_transform_does(encoders, tiny_clip):
    """Short side to 32, centre 32 x 32 (an odd margin split as torchvision splits it, not a pixel
    off as transformers' processor does), CLIP's mean/std."""
    from transformers import CLIPModel

    sizes = ((40, 64), (64, 40), (48, 48))  # the first two resized to 32 x 51: an odd margin
    images = [random_image(width, height, seed) for seed, (width, height) in enumerate(sizes)]
    by_hand = clip_image_by_hand(CLIPModel.from_pretrained(tiny_clip), images)

    embedded = encoders.clip.embed_images(images).numpy()

    np.testing.assert_allclose(embedded, by_hand / np.linalg.norm(by_hand, axis=1, keepdims=True), atol=1e-5)


def test_each_metric_is_its_definition_computed_by_hand(encoders, tiny_dino, tiny_clip):
    """Every metric from the models' raw layers, the preprocessing and the means written out in
    numpy: DINO and CLIP-I over all generated x real pairs, CLIP-T image i with the identifier-free
    prompt i (averaged within a prompt, then over prompts), PRES class generations x real, DIV within
    a prompt without self-pairs."""
    from transformers import AutoTokenizer, CLIPModel, ViTModel

    toy = load_real_images(TOY_SUBJECT)
    real = [toy[0].crop((0, 0, 192, 256)), toy[1].crop((0, 64, 256, 256)), toy[2]]  # tall, wide, square
    images = noise_images(7, 2)
    prompts = ["a sks toy in the snow"] * 3 + ["a red sks toy"] * 2
    generations = [Generation(image, prompt, 0) for image, prompt in zip(images, prompts)]
    generations += [Generation(image, "a toy in the snow", 0, subject=False) for image in images[5:]]

    metrics = score(generations, real, encoders, "sks")

    vit = ViTModel.from_pretrained(tiny_dino, add_pooling_layer=False)
    clip, tokenizer = CLIPModel.from_pretrained(tiny_clip), AutoTokenizer.from_pretrained(tiny_clip)
    with torch.no_grad():
        def dino(batch):
            pixels = [resize_and_crop(image, DINO_SHORT_SIDE, DINO_CROP, IMAGENET_MEAN, IMAGENET_STD)
                      for image in batch]
            return vit(pixel_values=torch.tensor(np.stack(pixels)).float()).last_hidden_state[:, 0].numpy()

        def clip_text(prompt):  # CLIP's encode_text: the end-of-text token's state, then the projection
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            assert ids[0, -1] == tokenizer.eos_token_id
            return clip.text_projection(clip.text_model(input_ids=ids).last_hidden_state[0, -1]).numpy()

        generated_dino, real_dino, class_dino = dino(images[:5]), dino(real), dino(images[5:])
        generated_clip = clip_image_by_hand(clip, images[:5])
        text = np.stack([clip_text(prompt.replace("sks ", "")) for prompt in prompts])
        real_clip = clip_image_by_hand(clip, real)

    def mean_off_diagonal(similarity):
        return (similarity.sum() - np.trace(similarity)) / (len(similarity) * (len(similarity) - 1))

    assert metrics["dino"] == pytest.approx(cosines(generated_dino, real_dino).mean(), abs=1e-5)
    assert metrics["clip_i"] == pytest.approx(cosines(generated_clip, real_clip).mean(), abs=1e-5)
    # CLIP-T per prompt, then over prompts: the 3 snow images weigh no more than the 2 red ones.
    image_text = np.diag(cosines(generated_clip, text))
    assert metrics["clip_t"] == pytest.approx(np.mean([image_text[:3].mean(), image_text[3:].mean()]), abs=1e-5)
    assert metrics["pres"] == pytest.approx(cosines(class_dino, real_dino).mean(), abs=1e-5)
    per_prompt = [1 - mean_off_diagonal(cosines(group, group)) for group in (generated_dino[:3], generated_dino[3:])]
    assert metrics["div"] == pytest.approx(np.mean(per_prompt), abs=1e-5)
    # The paper's 'real images' row: the real images against each other, an image with itself no pair.
    assert score_real_images(real, encoders) == pytest.approx(
        {"dino": mean_off_diagonal(cosines(real_dino, real_dino)),
         "clip_i": mean_off_diagonal(cosines(real_clip, real_clip))}, abs=1e-5)
    assert score_real_images(real[:1], encoders) == {"dino": None, "clip_i": None}


def test_clip_t_is_the_mean_over_prompts_of_each_prompts_mean_similarity(encoders):
    """The paper's CLIP-T averages over prompts: a prompt with three images counts as much as one
    with a single image (as in a --generated_dir where some images were removed)."""
    images = noise_images(4, 15)
    prompts = ["a sks toy in the snow"] * 3 + ["a red sks toy"]
    generations = [Generation(image, prompt, 0) for image, prompt in zip(images, prompts)]

    metrics = score(generations, load_real_images(TOY_SUBJECT)[:1], encoders, "sks")

    image_embeddings = encoders.clip.embed_images(images).numpy().astype(np.float64)
    snow, red = encoders.clip.embed_texts(["a toy in the snow", "a red toy"]).numpy().astype(np.float64)
    image_text = cosines(image_embeddings, np.stack([snow, snow, snow, red]))[np.arange(4), np.arange(4)]
    per_prompt = (image_text[:3].mean() + image_text[3]) / 2
    assert metrics["clip_t"] == pytest.approx(per_prompt, abs=1e-6)
    # The mean over images weighs the snow prompt 3:1; here it is 0.017 higher.
    assert image_text.mean() - per_prompt > 0.01


def test_metrics_do_not_depend_on_the_order_of_the_images(encoders):
    """Means over pairs, each image with its own prompt: shuffling the generations changes nothing."""
    real = load_real_images(TOY_SUBJECT)[:2]
    prompts = ["a sks toy in the snow", "a red sks toy", "a sks toy on the beach"] * 2 + ["a toy in the snow"] * 2
    generations = [Generation(image, prompt, 0, "sks" in prompt)
                   for image, prompt in zip(noise_images(8, 6), prompts)]
    order = np.random.default_rng(0).permutation(len(generations))

    metrics = score(generations, real, encoders, "sks")
    shuffled = score([generations[i] for i in order], real[::-1], encoders, "sks")

    assert list(order) != sorted(order)
    assert shuffled == pytest.approx(metrics, abs=1e-6)


def test_a_prompts_text_embedding_does_not_depend_on_its_batch(encoders):
    """Padding a short prompt to a long one's length leaves its CLIP embedding as it is alone."""
    short, long = "a red toy", "a toy on top of green grass with sunflowers around it in the snow"

    together = encoders.clip.embed_texts([short, long])

    assert torch.allclose(together[0], encoders.clip.embed_texts([short])[0], atol=1e-6)
    assert torch.allclose(together[1], encoders.clip.embed_texts([long])[0], atol=1e-6)


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
    assert report["metrics"] == pytest.approx(metrics, abs=1e-6)
    real = score_real_images(load_real_images(TOY_SUBJECT), load_encoders(tiny_dino, tiny_clip, torch.device("cpu")))
    assert report["real_images"] == pytest.approx(real, abs=1e-6)
    assert report["prompts"] == ["a sks toy in the snow", "a red sks toy"]
    assert report["class_prompts"] == ["a toy in the snow", "a red toy"]
    assert report["counts"] == {"subject_prompts": 2, "class_prompts": 2, "subject_images": 4, "class_images": 4,
                                "real_images": 5}
    assert report["seeds"]["used"] == [5, 6]
    assert report["models"]["clip"] == tiny_clip and tiny_clip in report["models"]["clip_variant"]
    assert report["models"]["dino"] == tiny_dino and report["models"]["pipeline"] == tiny_model
    assert report["models"]["dino_preprocessing"].startswith("short side resized to 36 (bicubic), centre 32 x 32")
    assert report["models"]["clip_preprocessing"].startswith("short side resized to 32 (bicubic), centre 32 x 32")
    assert len(list((output / "images").glob("*.png"))) == 8
    with Image.open(output / "contact_sheet.png") as sheet:
        assert sheet.size == (2 * 128, 4 * (16 + 128))
        # Row 2 (the second subject prompt), column 2: that prompt's second image, seed 6.
        thumbnail = np.asarray(sheet.convert("RGB").crop((128, 144 + 16, 256, 2 * 144)), dtype=np.int16)
    with Image.open(output / "images" / "subject-0003-seed6.png") as image:
        assert image.text["prompt"] == "a red sks toy"
        expected = np.asarray(image.convert("RGB").resize((128, 128), Image.BICUBIC), dtype=np.int16)
    assert np.abs(thumbnail - expected).max() <= 1
    printed = capsys.readouterr().out.splitlines()
    assert printed[1].split() == ["this", "model", *(f"{metrics[key]:.3f}" for key in METRICS)]
    assert printed[2].split() == ["your", "real", "images", f"{real['dino']:.3f}", f"{real['clip_i']:.3f}", "-",
                                  "-", "-"]
    assert printed[3].split()[-5:] == ["0.668", "0.803", "0.305", "-", "-"]

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


@pytest.mark.slow
def test_two_processes_share_the_drawing_and_score_what_one_process_would(tiny_model, tiny_dino, tiny_clip, tmp_path):
    from conftest import one_thread
    from test_multiprocess import launch

    templates = tmp_path / "templates.txt"
    templates.write_text("a {} in the snow\na red {}\n", encoding="utf-8")
    script, notes = noting_script(tmp_path, "evaluate")
    flags = ["--pretrained_model_name_or_path", tiny_model, "--class_noun", "toy", "--prompts_file", str(templates),
             "--num_images_per_prompt", "3", "--batch_size", "2", "--resolution", "32", "--num_inference_steps", "2",
             "--seed", "5"]

    launched = launch(eval_args(tiny_dino, tiny_clip, tmp_path / "two", *flags), script=script)
    with one_thread():  # as each launched process runs (OMP_NUM_THREADS=1)
        metrics = evaluate.main(eval_args(tiny_dino, tiny_clip, tmp_path / "one", *flags))

    # Batches of 2 of 3 seeds, [5, 6] and [7], for each of 2 subject and 2 class prompts, dealt in turn.
    prompts = ["a sks toy in the snow", "a red sks toy", "a toy in the snow", "a red toy"]
    for process, seeds in ((0, [5, 6]), (1, [7])):
        assert drawn_batches(notes, process) == [[prompt, seeds] for prompt in prompts]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text(encoding="utf-8"))
    one = json.loads((tmp_path / "one" / "metrics.json").read_text(encoding="utf-8"))
    assert two["metrics"] == one["metrics"] == pytest.approx(metrics, abs=1e-6)
    assert two["counts"] == one["counts"] and one["counts"]["subject_images"] == 6
    made_by_two = {path.name: path.read_bytes() for path in sorted((tmp_path / "two" / "images").iterdir())}
    made_by_one = {path.name: path.read_bytes() for path in sorted((tmp_path / "one" / "images").iterdir())}
    assert made_by_two == made_by_one and len(made_by_one) == 12 + 1  # and prompts.json
    assert launched.stdout.count("wrote ") == 1, launched.stdout  # the main process alone reports


@pytest.mark.slow
def test_a_bad_real_image_stops_every_process_before_drawing(tiny_model, tiny_dino, tiny_clip, tmp_path):
    import shutil

    from test_multiprocess import launch

    subject = tmp_path / "subject"
    shutil.copytree(TOY_SUBJECT, subject)
    (subject / "broken.jpg").write_bytes(b"not a JPEG")
    flags = ["--pretrained_model_name_or_path", tiny_model, "--class_noun", "toy", "--num_prompts", "1",
             "--num_images_per_prompt", "2", "--resolution", "32", "--num_inference_steps", "2"]
    args = eval_args(tiny_dino, tiny_clip, tmp_path / "out", *flags)
    args[args.index("--instance_data_dir") + 1] = str(subject)

    launched = launch(args, script=ROOT / "evaluate.py", check=False)  # the main process alone reads the images

    errors = [line for line in launched.stderr.splitlines() if line.startswith("error: ")]
    assert launched.returncode == 1 and len(errors) == 2 and "broken.jpg" in errors[0], launched.stderr[-3000:]
    # Each process says it in one line (the launcher then reports its failed process with a traceback of its own).
    assert errors[0] == errors[1] and "DreamBoothError" not in launched.stderr
    assert not (tmp_path / "out" / "images").exists()
