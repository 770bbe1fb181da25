"""Several subjects in one run (--concepts_list) of uneven sizes: batches, class images, outputs, errors."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
import yaml
from PIL import Image

import train_dreambooth
from dreambooth.concepts import build_dataset, check_concepts, load_concepts_list
from dreambooth.config import TrainConfig, parse_config
from dreambooth.errors import DreamBoothError


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
    args = [*quick(tiny_model, tmp_path), "--concepts_list", write_list(tmp_path / "concepts.yaml", entries), "--with_prior_preservation"]
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
