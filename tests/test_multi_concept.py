"""Several subjects in one run (--concepts_list) of uneven sizes: batches, class images, outputs, errors."""

from __future__ import annotations

import json
import re
from collections import Counter
from types import SimpleNamespace

import pytest
import yaml
from PIL import Image

from conftest import draw_class_images

import train_dreambooth
from dreambooth.concepts import (Concept, build_dataset, check_concepts, instance_examples, load_concepts_list,
                                 training_items, trigger_phrase)
from dreambooth.config import TrainConfig, parse_config
from dreambooth.errors import DreamBoothError
from dreambooth.image_metadata import recorded_prompt


def make_images(folder, count: int, colour=(200, 40, 40), size=(40, 40)):
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        Image.new("RGB", size, colour).save(folder / f"img_{index}.png")
    return str(folder)


def write_list(path, concepts) -> str:
    path.write_text(json.dumps(concepts) if path.suffix == ".json" else yaml.safe_dump(concepts))
    return str(path)


def cat_and_dog(tmp_path, cat_classes=4, dog_classes=9, **dog):
    """A cat of 3 photos and a dog of 7, each with a class folder of its own (of the sizes given)."""
    return write_list(tmp_path / "concepts.json", [
        {"instance_data_dir": make_images(tmp_path / "cat", 3), "instance_prompt": "a photo of sks cat",
         "class_data_dir": make_images(tmp_path / "cats", cat_classes, (90, 0, 0)),
         "class_prompt": "a photo of a cat", "num_class_images": cat_classes},
        {"instance_data_dir": make_images(tmp_path / "dog", 7, (40, 200, 40)), "instance_prompt": "a photo of zwx dog",
         "class_data_dir": make_images(tmp_path / "dogs", dog_classes, (0, 90, 0)),
         "class_prompt": "a photo of a dog", "num_class_images": dog_classes, **dog},
    ])


def quick(model, tmp_path, *extra):
    """The flags of a short tiny-model run into tmp_path/out, with no single-concept flags."""
    return ["--pretrained_model_name_or_path", model, "--output_dir", str(tmp_path / "out"), "--resolution", "32",
            "--train_batch_size", "1", "--max_train_steps", "2", "--learning_rate", "1e-4", "--lr_warmup_steps", "0",
            "--report_to", "none", "--seed", "0", "--num_validation_images", "0", *extra]


def epoch_pairs(dataset, epoch):
    """(instance image, class image) of every item of ``epoch``, as the items load them."""
    pairs = []
    for index in range(len(dataset)):
        item = dataset.instances[index % len(dataset.instances)]
        pairs.append((item, dataset.class_for(index, epoch)))
    return pairs


@pytest.mark.parametrize("dog_repeats", [1, 2])
def test_each_image_trains_as_often_as_the_others_and_pairs_its_own_class(tmp_path, dog_repeats):
    # 13 class images against 10 (or 17) instance images: an epoch that covered 13 items would give
    # the first three (the cat's) a second turn and the dog's one, every epoch.
    flags = ["--concepts_list", cat_and_dog(tmp_path, repeats=dog_repeats), "--with_prior_preservation",
             "--resolution", "32"]
    dataset = build_dataset(parse_config(TrainConfig, flags), 0)
    photos = 3 + 7 * dog_repeats
    assert len(dataset.instances) == photos
    assert len(dataset) == photos * -(-13 // photos)  # whole passes over the photos, covering the 13
    for epoch in range(3):
        pairs = epoch_pairs(dataset, epoch)
        per_photo = Counter(instance.source for instance, _ in pairs)
        repeats = {source: dog_repeats if source.parent.name == "dog" else 1 for source in per_photo}
        assert {count / repeats[source] for source, count in per_photo.items()} == {len(dataset) / photos}
        per_concept = Counter(instance.prompt for instance, _ in pairs)
        assert per_concept["a photo of sks cat"] * 7 * dog_repeats == per_concept["a photo of zwx dog"] * 3
        for instance, image in pairs:
            subject = instance.source.parent.name
            assert image.source.parent.name == subject + "s"
            assert image.prompt == f"a photo of a {subject}"
    # Every class image of each concept is trained within two epochs.
    used = {image.source for epoch in (0, 1) for _, image in epoch_pairs(dataset, epoch)}
    assert len(used) == 13


def test_num_class_images_and_repeats_flags_serve_the_concepts_that_set_none(tmp_path):
    # As in ShivamShrirao's script, whose lists carry neither key: --num_class_images 50 --concepts_list ...
    concepts = write_list(tmp_path / "concepts.yaml", [
        {"instance_data_dir": make_images(tmp_path / "cat", 3), "instance_prompt": "a photo of sks cat",
         "class_data_dir": make_images(tmp_path / "cats", 6), "class_prompt": "a photo of a cat"},
        {"instance_data_dir": make_images(tmp_path / "dog", 7), "instance_prompt": "a photo of zwx dog",
         "class_data_dir": make_images(tmp_path / "dogs", 6), "class_prompt": "a photo of a dog",
         "num_class_images": 5, "repeats": 1},
    ])
    cfg = parse_config(TrainConfig, ["--concepts_list", concepts, "--with_prior_preservation", "--resolution", "32",
                                     "--num_class_images", "2", "--repeats", "3"])
    assert [(concept.num_class_images, concept.repeats) for concept in cfg.concepts()] == [(2, 3), (5, 1)]
    dataset = build_dataset(cfg, 0)
    assert [len(images) for images in dataset.classes] == [2, 5]
    assert Counter(example.prompt for example in dataset.instances) == {"a photo of sks cat": 9,
                                                                        "a photo of zwx dog": 7}
    # Without the flags, the defaults: 100 class images, no repeats.
    plain = parse_config(TrainConfig, ["--concepts_list", concepts])
    assert [(concept.num_class_images, concept.repeats) for concept in plain.concepts()] == [(100, 1), (5, 1)]


@pytest.mark.parametrize("flags, message", [
    (["--instance_data_dir", "{tmp}/cat"], "give one of --instance_data_dir and --concepts_list, not both"),
    (["--instance_prompt", "a photo of sks cat"], "--instance_prompt: a --concepts_list gives each concept its own"),
    (["--class_prompt", "a photo of a cat"], "--class_prompt: a --concepts_list gives each concept its own"),
    (["--class_data_dir", "{tmp}/cats"], "--class_data_dir: a --concepts_list gives each concept its own"),
])
def test_single_concept_flags_beside_a_list_are_refused_not_ignored(tiny_model, tmp_path, flags, message):
    args = [*quick(tiny_model, tmp_path), "--concepts_list", cat_and_dog(tmp_path), "--with_prior_preservation",
            *[flag.format(tmp=tmp_path) for flag in flags]]
    with pytest.raises(DreamBoothError, match=re.escape(message)):
        train_dreambooth.main(args)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("entries, message", [
    ([], "expected a non-empty list of concepts"),
    ([{"instance_data_dir": "{tmp}/cat"}], "concept 0: missing key 'instance_prompt'"),
    ([{"instance_data_dir": "{tmp}/cat", "instance_prompt": "a photo of sks cat", "class_prompt": "a photo of a cat"}],
     "concept 0: class_data_dir (missing): prior preservation needs it"),
    ([{"instance_data_dir": "{tmp}/cat", "instance_prompt": "a photo of sks cat", "class_data_dir": "{tmp}/cats",
       "class_prompt": "a photo of a cat"},
      {"instance_data_dir": "{tmp}/cat", "instance_prompt": "a photo of zwx dog", "class_data_dir": "{tmp}/dogs",
       "class_prompt": "a photo of a dog"}], "concept 1: instance_data_dir {tmp}/cat: also concept 0's"),
])
def test_bad_lists_are_one_line_naming_the_concept(tiny_model, tmp_path, entries, message):
    make_images(tmp_path / "cat", 3)
    entries = [{key: value.format(tmp=tmp_path) for key, value in entry.items()} for entry in entries]
    args = [*quick(tiny_model, tmp_path), "--concepts_list", write_list(tmp_path / "concepts.yaml", entries),
            "--with_prior_preservation"]
    with pytest.raises(DreamBoothError, match=re.escape(message.format(tmp=tmp_path))):
        train_dreambooth.main(args)


def test_a_class_folder_shared_by_two_class_prompts_is_refused_and_by_one_is_not(tmp_path):
    def concepts(dog_class_prompt):
        return write_list(tmp_path / "concepts.yaml", [
            {"instance_data_dir": make_images(tmp_path / "cat", 3), "instance_prompt": "a photo of sks cat",
             "class_data_dir": str(tmp_path / "animals"), "class_prompt": "a photo of a cat", "num_class_images": 2},
            {"instance_data_dir": make_images(tmp_path / "dog", 7), "instance_prompt": "a photo of zwx dog",
             "class_data_dir": str(tmp_path / "animals") + "/", "class_prompt": dog_class_prompt,
             "num_class_images": 4},
        ])

    # The top-up would fill the folder with 2 cats, then 2 dogs, and the dog would take all 4 as dogs.
    with pytest.raises(DreamBoothError, match=re.escape(
            f"concept 1: class_data_dir {tmp_path}/animals/: also concept 0's, for class_prompt 'a photo of a cat'")):
        check_concepts(load_concepts_list(concepts("a photo of a dog")), True, "concepts.yaml")
    check_concepts(load_concepts_list(concepts(" a photo of a cat")), True, "concepts.yaml")  # kohya-style sharing
    check_concepts(load_concepts_list(concepts("a photo of a dog")), False, "concepts.yaml")  # no class images used


def test_a_run_of_uneven_concepts_pairs_samples_and_records_each_its_own(tiny_model, tmp_path, prompts_seen):
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "img_0.txt").write_text("on grass")
    concepts = write_list(tmp_path / "concepts.yaml", [
        {"instance_data_dir": make_images(tmp_path / "cat", 3), "instance_prompt": "a photo of sks cat",
         "class_data_dir": make_images(tmp_path / "cats", 2, (90, 0, 0)), "class_prompt": "a photo of a cat",
         "num_class_images": 2},
        {"instance_data_dir": make_images(tmp_path / "dog", 7, (40, 200, 40)),
         "instance_prompt": "a photo of zwx dog, [filewords]", "class_data_dir": make_images(tmp_path / "dogs", 4),
         "class_prompt": "a photo of a dog"},
    ])
    trainer = train_dreambooth.main(quick(
        tiny_model, tmp_path, "--concepts_list", concepts, "--with_prior_preservation", "--num_class_images", "3",
        "--train_batch_size", "2", "--max_train_steps", "5", "--num_validation_images", "1",
        "--validation_inference_steps", "1"))
    # One epoch of 10 photos against 5 class images: each photo once, with its own concept's class image.
    assert len(training_items(trainer.dataloader)) == 10
    assert all(len(prompts) == 4 for prompts in prompts_seen)  # instance, instance, class, class
    pairs = [(prompts[i], prompts[i + 2]) for prompts in prompts_seen for i in (0, 1)]
    assert Counter(pairs) == {
        ("a photo of sks cat", "a photo of a cat"): 3, ("a photo of zwx dog, on grass", "a photo of a dog"): 1,
        ("a photo of zwx dog", "a photo of a dog"): 6}
    # Samples, card and saved configuration name every concept by its trigger phrase.
    output = tmp_path / "out"
    prompts = ["a photo of sks cat", "a photo of sks cat on the beach", "a photo of zwx dog",
               "a photo of zwx dog on the beach"]
    card = (output / "README.md").read_text()
    assert yaml.safe_load(card.split("---")[1])["widget"] == [
        {"text": prompt, "output": {"url": f"samples/final_{number}.png"}} for number, prompt in enumerate(prompts)]
    assert "- **`a photo of sks cat`** (class prompt `a photo of a cat`)\n" \
           "- **`a photo of zwx dog`** (class prompt `a photo of a dog`)" in card
    assert all((output / "samples" / f"final_{number}.png").is_file() for number in range(4))
    saved = yaml.safe_load((output / "train_config.yaml").read_text())
    assert saved["concepts_list"] == str(output / "concepts_list.yaml")
    assert [(entry["instance_prompt"], entry["class_data_dir"], entry["num_class_images"])
            for entry in yaml.safe_load((output / "concepts_list.yaml").read_text())] == [
        ("a photo of sks cat", str(tmp_path / "cats"), 2), ("a photo of zwx dog, [filewords]", str(tmp_path / "dogs"), 3)]


def test_an_uncaptioned_image_trains_with_the_trigger_phrase_samples_and_card_use(tmp_path):
    folder = make_images(tmp_path / "dog", 2)
    (tmp_path / "dog" / "img_0.txt").write_text("on grass")
    examples = instance_examples(Concept("a photo of zwx dog, [filewords]", folder), 0, ".txt", "text")
    # Not 'a photo of zwx dog,': the comma is a token of its own, which the validation prompt lacks.
    assert [example.prompt for example in examples] == ["a photo of zwx dog, on grass", "a photo of zwx dog"]
    assert trigger_phrase("a photo of zwx dog, [filewords]") == examples[1].prompt


def test_each_class_folder_is_topped_up_with_its_own_prompt_to_its_own_count(tiny_model, tmp_path, monkeypatch):
    from accelerate import PartialState


    drawn = []

    def draw(pipeline, prompt, seeds, height, width, *args, **kwargs):  # the pipeline's drawing, without its steps
        drawn.append((prompt, len(seeds)))
        return [Image.new("RGB", (width, height), (len(drawn), 0, 0)) for _ in seeds]

    draw_class_images(monkeypatch, draw)
    concepts = cat_and_dog(tmp_path, cat_classes=0, dog_classes=1)  # the dog has a photo there already
    entries = json.loads((tmp_path / "concepts.json").read_text())
    entries[0]["num_class_images"], entries[1]["num_class_images"] = 2, 4
    write_list(tmp_path / "concepts.json", entries)
    cfg = parse_config(TrainConfig, quick(tiny_model, tmp_path, "--concepts_list", concepts, "--with_prior_preservation",
                                          "--sample_batch_size", "2"))
    train_dreambooth.top_up_class_images(cfg, SimpleNamespace(state=PartialState()))
    assert drawn == [("a photo of a cat", 2), ("a photo of a dog", 2), ("a photo of a dog", 1)]
    made = {name: sorted(recorded_prompt(path) for path in (tmp_path / name).glob("0*.png")) for name in ("cats", "dogs")}
    assert made == {"cats": ["a photo of a cat"] * 2, "dogs": ["a photo of a dog"] * 3}
    assert [len(images) for images in build_dataset(cfg, 0).classes] == [2, 4]


def test_a_resumed_run_of_uneven_concepts_gets_the_batches_of_an_uninterrupted_one(tiny_model, tmp_path, monkeypatch,
                                                                                   prompts_seen):
    from test_checkpoints import assert_bitwise_equal, stop_after_step, unet_weights

    # 10 photos in batches of 2 against 13 class images: epochs of 20 items, 10 steps; resumed mid-epoch.
    concepts = cat_and_dog(tmp_path)
    args = ["--concepts_list", concepts, "--with_prior_preservation", "--train_batch_size", "2", "--random_flip",
            "--max_train_steps", "4", "--checkpointing_steps", "2", "--save_precision", "fp32"]
    train_dreambooth.main(quick(tiny_model, tmp_path / "whole", *args))
    whole = list(prompts_seen)
    with monkeypatch.context() as patch:
        stop_after_step(patch, 2)
        train_dreambooth.main(quick(tiny_model, tmp_path / "parts", *args))
    resumed = train_dreambooth.main(quick(tiny_model, tmp_path / "parts", *args, "--resume_from_checkpoint", "latest"))
    assert resumed.state.global_step == 4
    assert prompts_seen[4:] == whole and len(whole) == 4
    assert_bitwise_equal(unet_weights(tmp_path / "whole" / "out"), unet_weights(tmp_path / "parts" / "out"))


def test_class_folders_of_a_list_without_prior_preservation_are_named_in_a_warning(tmp_path, caplog):
    listed = cat_and_dog(tmp_path)  # a path of this test's own: the warning is given once per process
    concepts = load_concepts_list(listed)
    check_concepts(concepts, False, listed)
    assert (f"--concepts_list {listed}: the class_data_dir and class_prompt of concepts 0, 1 are used only with "
            "--with_prior_preservation; training without class images") in caplog.text
    caplog.clear()
    check_concepts(concepts, True, listed)
    assert "training without class images" not in caplog.text


def test_the_top_up_draws_each_concept_s_class_images_from_seeds_of_its_own(tiny_model, tmp_path, monkeypatch):
    from accelerate import PartialState

    from dreambooth.data import derived_seed

    seeds_drawn = {}

    def draw(pipeline, prompt, seeds, height, width, *args, **kwargs):
        seeds_drawn.setdefault(len(seeds_drawn), list(seeds))
        return [Image.new("RGB", (width, height), (0, 0, 0)) for _ in seeds]

    draw_class_images(monkeypatch, draw)
    concepts = cat_and_dog(tmp_path, cat_classes=0, dog_classes=0)
    entries = json.loads((tmp_path / "concepts.json").read_text())
    for entry in entries:  # two subjects of one class, a folder each
        entry["class_prompt"], entry["num_class_images"] = "a photo of a pet", 3
    write_list(tmp_path / "concepts.json", entries)
    cfg = parse_config(TrainConfig, quick(tiny_model, tmp_path, "--concepts_list", concepts, "--with_prior_preservation",
                                          "--seed", "5"))
    train_dreambooth.top_up_class_images(cfg, SimpleNamespace(state=PartialState()))

    # Concept 0 keeps the seeds a single-concept run draws; concept 1's noise is its own.
    assert seeds_drawn[0] == [derived_seed(5, index) for index in range(3)]
    assert len(set(seeds_drawn[1])) == 3 and not set(seeds_drawn[0]) & set(seeds_drawn[1])
