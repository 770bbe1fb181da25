"""Several subjects in one run (--concepts_list) of uneven sizes: batches, class images, outputs, errors."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import yaml
from PIL import Image

from dreambooth.concepts import build_dataset
from dreambooth.config import TrainConfig, parse_config


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
