"""Several concepts, captions, datasets, aspect-ratio buckets and the text-encoder schedule."""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
from collections import Counter

import pytest
import torch
import yaml
from PIL import Image

import train_dreambooth
from conftest import TOY_SUBJECT, train_args
from dreambooth.buckets import BucketBatchSampler, assign_buckets, bucket_sizes, nearest_bucket
from dreambooth.concepts import (Concept, build_dataset, check_concepts, compose_prompt, dataset_examples,
                                 instance_examples, load_concepts_list, trigger_phrase)
from dreambooth.config import TrainConfig, parse_config
from dreambooth.data import DreamBoothDataset, examples_from_folder
from dreambooth.errors import DreamBoothError


def make_images(folder, count: int, size=(48, 48), colour=(200, 40, 40)):
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        Image.new("RGB", size, colour).save(folder / f"img_{index}.png")
    return folder


def test_two_concepts_train_together_each_with_its_class(tiny_model, tmp_path, prompts_seen):
    concepts = [
        {"instance_data_dir": str(make_images(tmp_path / "toy", 2)), "instance_prompt": "a photo of sks toy",
         "class_data_dir": str(make_images(tmp_path / "toys", 2, colour=(0, 0, 200))), "class_prompt": "a toy",
         "num_class_images": 2, "repeats": 2},
        {"instance_data_dir": str(make_images(tmp_path / "cup", 2)), "instance_prompt": "a photo of zwx cup",
         "class_data_dir": str(make_images(tmp_path / "cups", 2, colour=(0, 200, 0))), "class_prompt": "a cup",
         "num_class_images": 2},
    ]
    (tmp_path / "concepts.json").write_text(json.dumps(concepts))
    flags = ["--concepts_list", str(tmp_path / "concepts.json"), "--with_prior_preservation"]
    train_dreambooth.main([*without_single_concept(train_args(tiny_model, TOY_SUBJECT, tmp_path / "out")), *flags,
                           "--max_train_steps", "6"])
    pairs = Counter(tuple(prompts) for prompts in prompts_seen)
    assert set(pairs) == {("a photo of sks toy", "a toy"), ("a photo of zwx cup", "a cup")}
    card = (tmp_path / "out" / "README.md").read_text()
    assert "- **`a photo of sks toy`** (class prompt `a toy`)\n- **`a photo of zwx cup`** (class prompt `a cup`)" in card
    assert "| Class prompts | `a toy`; `a cup` |" in card
    # 2 toy images x 2 repeats against 2 cup images: an epoch of 6 items, 4 of them the toy's.
    dataset = build_dataset(parse_config(TrainConfig, flags), 0)
    assert Counter(example.prompt for example in dataset.instances) == {"a photo of sks toy": 4,
                                                                         "a photo of zwx cup": 2}


def without_single_concept(args: list[str]) -> list[str]:
    """``args`` less --instance_data_dir and --instance_prompt and their values."""
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in ("--instance_data_dir", "--instance_prompt"):
            skip = True
        else:
            kept.append(arg)
    return kept


def test_sidecar_captions_metadata_and_placeholders(tmp_path):
    folder = make_images(tmp_path / "photos", 4)
    (folder / "img_0.txt").write_text("sks toy on a red chair")
    (folder / "img_1.txt").write_text("{instance_prompt}, close-up")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "img_2.png", "text": "sks toy from above"}) + "\n")
    examples = instance_examples(Concept("a photo of sks toy", str(folder)), 0, ".txt", "text")
    assert [example.prompt for example in examples] == [
        "sks toy on a red chair", "a photo of sks toy, close-up", "sks toy from above", "a photo of sks toy"]
    assert compose_prompt("a photo of sks toy, [filewords]", "on a chair") == "a photo of sks toy, on a chair"


def test_default_validation_prompts_cover_every_concept_without_filewords(tmp_path):
    assert trigger_phrase("a photo of sks toy, [filewords]") == "a photo of sks toy"
    assert trigger_phrase("[filewords], a photo of sks toy, close-up") == "a photo of sks toy, close-up"
    assert trigger_phrase("a photo of [filewords] sks toy") == "a photo of sks toy"
    assert trigger_phrase("a photo of sks toy,close-up") == "a photo of sks toy,close-up"  # no placeholder: as given
    single = parse_config(TrainConfig, ["--instance_prompt", "a photo of sks toy, [filewords]"])
    assert single.validation_prompts() == ["a photo of sks toy", "a photo of sks toy on the beach"]
    concepts = [{"instance_data_dir": "toy", "instance_prompt": "a photo of sks toy, [filewords]"},
                {"instance_data_dir": "cup", "instance_prompt": "a photo of zwx cup"}]
    (tmp_path / "concepts.json").write_text(json.dumps(concepts))
    several = parse_config(TrainConfig, ["--concepts_list", str(tmp_path / "concepts.json")])
    assert several.validation_prompts() == ["a photo of sks toy", "a photo of sks toy on the beach",
                                            "a photo of zwx cup", "a photo of zwx cup on the beach"]
    chosen = parse_config(TrainConfig, ["--concepts_list", str(tmp_path / "concepts.json"),
                                        "--validation_prompt", "a sks toy in Paris"])
    assert chosen.validation_prompts() == ["a sks toy in Paris"]


def test_caption_oddities_byte_order_mark_null_numbers_and_lone_filewords(tmp_path):
    folder = make_images(tmp_path / "photos", 3)
    (folder / "img_0.txt").write_text("\ufeffsks toy, café", encoding="utf-8")  # Notepad's "UTF-8 with BOM"
    (folder / "metadata.jsonl").write_text("\ufeff" + json.dumps({"file_name": "img_1.png", "text": None}) + "\n"
                                           + json.dumps({"file_name": "img_2.png", "text": 1990}) + "\n",
                                           encoding="utf-8")
    examples = instance_examples(Concept("a photo of [filewords] sks toy", str(folder)), 0, ".txt", "text")
    # No caption (a null one included): the instance prompt without the placeholder.
    assert [example.prompt for example in examples] == [
        "a photo of sks toy, café sks toy", "a photo of sks toy", "a photo of 1990 sks toy"]


def test_captions_from_windows_editors_and_empty_ones(tmp_path, caplog):
    folder = make_images(tmp_path / "photos", 5)
    (folder / "img_0.txt").write_bytes(b"\xef\xbb\xbfsks toy\r\non a red chair  \r\n")  # BOM, CRLF, trailing spaces
    (folder / "img_1.txt").write_bytes(b"")
    (folder / "img_2.txt").write_bytes(b"  \r\n")
    (folder / "img_3.png.txt").write_text("sks toy from above")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "img_4.png", "text": ""}) + "\n")
    examples = instance_examples(Concept("a photo of sks toy", str(folder)), 0, ".txt", "text")
    # An empty caption is no caption: the image still teaches the subject, not the unconditional prompt.
    assert [example.prompt for example in examples] == [
        "sks toy on a red chair", "a photo of sks toy", "a photo of sks toy", "sks toy from above",
        "a photo of sks toy"]
    assert "3 image(s) with an empty caption train with the instance prompt: img_1.png, img_2.png, img_4.png" \
        in caplog.text


def test_training_takes_the_first_num_class_images_of_a_fuller_folder(tmp_path):
    instance, classes = make_images(tmp_path / "toy", 2), make_images(tmp_path / "toys", 5, colour=(0, 0, 200))
    cfg = parse_config(TrainConfig, ["--instance_data_dir", str(instance), "--instance_prompt", "a sks toy",
                                     "--with_prior_preservation", "--class_data_dir", str(classes),
                                     "--class_prompt", "a toy", "--num_class_images", "3"])
    dataset = build_dataset(cfg, 0)
    assert [example.source.name for example in dataset.classes[0]] == ["img_0.png", "img_1.png", "img_2.png"]
    assert len(dataset) == 4  # whole passes over the 2 photos that cover the 3 class images


def test_caption_dropout_is_seeded_and_listed(tmp_path):
    examples = examples_from_folder(make_images(tmp_path / "photos", 8), "a photo of sks toy")
    dataset = DreamBoothDataset(examples, 16, center_crop=True, seed=3, caption_dropout=0.5)
    prompts = [dataset[i]["instance"]["prompt"] for i in range(8)]
    assert set(prompts) == {"", "a photo of sks toy"}
    assert prompts == [dataset[i]["instance"]["prompt"] for i in range(8)]
    assert "" in dataset.prompts()


def test_sidecar_caption_reaches_the_text_encoder(tiny_model, tmp_path, prompts_seen):
    folder = make_images(tmp_path / "photos", 1)
    (folder / "img_0.caption").write_text("sks toy in the garden")
    train_dreambooth.main(train_args(tiny_model, folder, tmp_path / "out", "--caption_extension", ".caption"))
    assert prompts_seen and all(prompts == ["sks toy in the garden"] for prompts in prompts_seen)


def test_local_imagefolder_dataset_with_metadata_trains(tiny_model, tmp_path, prompts_seen):
    folder = make_images(tmp_path / "dataset", 2)
    lines = [json.dumps({"file_name": f"img_{i}.png", "caption": f"sks toy number {i}"}) for i in range(2)]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    blank = make_images(tmp_path / "blank", 2)
    (blank / "metadata.jsonl").write_text(json.dumps({"file_name": "img_0.png", "caption": "sks toy\nasleep"}) + "\n"
                                          + json.dumps({"file_name": "img_1.png", "caption": " "}) + "\n")
    # As in a folder: line breaks read as spaces, and an empty caption trains with the instance prompt.
    assert [example.prompt for example in dataset_examples(str(blank), "image", "caption", "a sks toy")] == [
        "sks toy asleep", "a sks toy"]
    args = train_args(tiny_model, folder, tmp_path / "out")
    args = [arg if arg != "--instance_data_dir" else "--dataset_name" for arg in args]
    train_dreambooth.main([*args, "--caption_column", "caption"])
    assert {prompt for prompts in prompts_seen for prompt in prompts} <= {"sks toy number 0", "sks toy number 1"}
    with pytest.raises(DreamBoothError, match="no column 'label' for --caption_column"):
        train_dreambooth.main([*args[:-2], "--output_dir", str(tmp_path / "b"), "--caption_column", "label"])


def test_buckets_keep_the_aspect_ratio_and_never_mix(tmp_path):
    assert nearest_bucket(1024, 512, bucket_sizes(512)) == (768, 384)
    assert nearest_bucket(600, 800, bucket_sizes(512)) == (448, 576)
    assert nearest_bucket(512, 512, bucket_sizes(512)) == (512, 512)
    assert all(width % 64 == 0 and height % 64 == 0 and abs(width * height / 512**2 - 1) <= 0.125
               for width, height in bucket_sizes(512))
    wide = make_images(tmp_path / "wide", 3, size=(96, 48))
    tall = make_images(tmp_path / "tall", 3, size=(48, 96))
    square = make_images(tmp_path / "square", 2)
    examples = assign_buckets(examples_from_folder(wide, "w") + examples_from_folder(tall, "t")
                              + examples_from_folder(square, "s"), 32)
    sizes = {example.prompt: example.size for example in examples}
    assert sizes["w"][0] / sizes["w"][1] == pytest.approx(2.0) and sizes["t"][1] / sizes["t"][0] == pytest.approx(2.0)
    assert sizes["s"] == (32, 32)
    dataset = DreamBoothDataset(examples, 32, center_crop=True)
    sampler = BucketBatchSampler(dataset.sizes(), batch_size=2, seed=0)
    batches = list(sampler)
    assert sorted(i for batch in batches for i in batch) == list(range(len(examples)))
    assert all(len({dataset.sizes()[i] for i in batch}) == 1 for batch in batches)
    assert dataset[0]["instance"]["pixel_values"].shape == (3, sizes["w"][1], sizes["w"][0])


@pytest.mark.parametrize("seed", range(4))
def test_bucket_batches_reach_each_process_whole(tmp_path, seed):
    """Sharded by Accelerate over 2 processes, the batches stay one bucket each and cover every image."""
    from accelerate.data_loader import prepare_data_loader

    from dreambooth.concepts import build_dataloader

    folder = make_images(tmp_path / "photos", 3)
    for index in range(3):
        Image.new("RGB", (96, 24), (0, 0, 200)).save(folder / f"wide_{index}.png")
    for image in folder.glob("*.png"):
        image.with_suffix(".txt").write_text(image.stem)
    cfg = parse_config(TrainConfig, ["--instance_data_dir", str(folder), "--instance_prompt", "a sks toy",
                                     "--enable_bucket", "--resolution", "32", "--train_batch_size", "2"])
    trained, batch_counts = Counter(), []
    for rank in range(2):
        shard = prepare_data_loader(build_dataloader(cfg, None, seed), num_processes=2, process_index=rank,
                                    put_on_device=False)
        shard.set_epoch(0)
        batches = list(shard)  # a batch mixing two buckets cannot be stacked
        for batch in batches:
            wide = batch["pixel_values"].shape[-1] > batch["pixel_values"].shape[-2]
            assert all(prompt.startswith("wide") == wide for prompt in batch["prompts"])
            trained.update(batch["prompts"])
        batch_counts.append(len(batches))
    assert set(trained) == {f"img_{i}" for i in range(3)} | {f"wide_{i}" for i in range(3)}
    assert batch_counts[0] == batch_counts[1]


def test_bucketed_training_with_prior_preservation(tiny_model, tmp_path):
    instance = make_images(tmp_path / "wide", 2, size=(96, 48))
    shutil.copy(TOY_SUBJECT / "toy_01.png", instance / "square.png")
    classes = make_images(tmp_path / "classes", 2)
    trainer = train_dreambooth.main(train_args(
        tiny_model, instance, tmp_path / "out", "--enable_bucket", "--train_batch_size", "2", "--max_train_steps", "3",
        "--with_prior_preservation", "--class_data_dir", str(classes), "--class_prompt", "a toy",
        "--num_class_images", "2"))
    assert trainer.state.global_step == 3


@pytest.mark.parametrize("extra", [[], ["--mixed_precision", "bf16", "--cast_weights_once"]],
                         ids=["fp32", "weights_cast_once"])
def test_text_encoder_stops_after_the_given_step(tiny_model, instance_dir, tmp_path, extra):
    from safetensors.torch import load_file

    output = tmp_path / "out"
    trainer = train_dreambooth.main(train_args(
        tiny_model, instance_dir, output, "--train_text_encoder", "--stop_text_encoder_training", "2",
        "--max_train_steps", "4", "--checkpointing_steps", "2", "--text_encoder_lr", "3e-4", "--learning_rate",
        "1e-3", "--save_precision", "fp32", *extra))
    at_stop = load_file(output / "checkpoint-2" / "text_encoder" / "model.safetensors")
    final = load_file(output / "text_encoder" / "model.safetensors")
    assert all(torch.equal(at_stop[key], final[key]) for key in at_stop)
    unet_at_stop = load_file(output / "checkpoint-2" / "unet" / "diffusion_pytorch_model.safetensors")
    unet_final = load_file(output / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(unet_at_stop[key], unet_final[key]) for key in unet_final)
    text_params = list(trainer.accelerator.unwrap_model(trainer.trained[1]).parameters())
    assert not any(p.requires_grad for p in text_params)
    assert {id(p) for p in text_params}.isdisjoint(id(p) for p in trainer.parameters())  # no longer clipped
    assert not any(p in trainer.optimizer.optimizer.state for p in text_params)
    assert [group["initial_lr"] for group in trainer.optimizer.param_groups] == [1e-3, 3e-4]
    if trainer.cast_weights:  # the frozen text encoder's weights are no longer cast for the step
        cast = {id(weight) for bucket in trainer.cast_weights.buckets for _, _, weight in bucket}
        assert cast and cast.isdisjoint(id(p) for p in text_params)


@pytest.mark.parametrize("entry, message", [
    ({"instance_prompt": "a sks toy"}, "missing key 'instance_data_dir'"),
    ({"instance_data_dir": "{toy}", "instance_prompt": "a sks toy", "colour": "red"}, "unknown key 'colour'"),
    ({"instance_data_dir": "{tmp}/nope", "instance_prompt": "a sks toy"}, "concept 0: instance_data_dir .*folder not found"),
])
def test_bad_concepts_files(tiny_model, tmp_path, entry, message):
    entry = {key: value.format(toy=TOY_SUBJECT, tmp=tmp_path) for key, value in entry.items()}
    (tmp_path / "concepts.yaml").write_text(json.dumps([entry]))
    args = ["--pretrained_model_name_or_path", tiny_model, "--concepts_list", str(tmp_path / "concepts.yaml"),
            "--output_dir", str(tmp_path / "out")]
    with pytest.raises(DreamBoothError, match=message):
        train_dreambooth.main(args)


@pytest.mark.parametrize("key, value, message", [
    ("repeats", "2", "repeats '2': must be a whole number"),
    ("repeats", 1.5, "repeats 1.5: must be a whole number"),
    ("num_class_images", True, "num_class_images True: must be a whole number"),
    ("class_prompt", 7, "class_prompt 7: must be text"),
])
def test_concepts_file_values_of_the_wrong_type(tmp_path, key, value, message):
    entry = {"instance_data_dir": str(TOY_SUBJECT), "instance_prompt": "a sks toy", "repeats": None, key: value}
    (tmp_path / "concepts.json").write_text(json.dumps([entry]))
    with pytest.raises(DreamBoothError, match=f"concept 0: {re.escape(message)}"):
        load_concepts_list(str(tmp_path / "concepts.json"))
    entry[key] = None  # left empty: the default
    (tmp_path / "concepts.json").write_text(json.dumps([entry]))
    assert load_concepts_list(str(tmp_path / "concepts.json"))[0].repeats == 1


def test_caption_extension_needs_its_dot(tiny_model, tmp_path):
    with pytest.raises(DreamBoothError, match="--caption_extension txt: give an extension with its dot"):
        train_dreambooth.main(train_args(tiny_model, TOY_SUBJECT, tmp_path / "out", "--caption_extension", "txt"))


def test_duplicate_instance_dir_and_non_utf8_caption(tiny_model, tmp_path):
    folder = make_images(tmp_path / "photos", 1)
    twice = [{"instance_data_dir": str(folder), "instance_prompt": "a"}, {"instance_data_dir": str(folder) + "/",
                                                                           "instance_prompt": "b"}]
    (tmp_path / "concepts.json").write_text(json.dumps(twice))
    base = ["--pretrained_model_name_or_path", tiny_model, "--output_dir", str(tmp_path / "out")]
    with pytest.raises(DreamBoothError, match="concept 1: instance_data_dir .* also concept 0's"):
        train_dreambooth.main([*base, "--concepts_list", str(tmp_path / "concepts.json")])
    (folder / "img_0.txt").write_bytes("sks toy caf\xe9".encode("latin-1"))
    with pytest.raises(DreamBoothError, match=r"img_0\.txt: caption file is not UTF-8"):
        train_dreambooth.main([*base, "--instance_data_dir", str(folder), "--instance_prompt", "a"])


@pytest.fixture
def as_a_user():
    """Permissions apply to this test as to any user: a root run drops, for this thread, the
    capabilities that let root read and enter any folder (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH)."""
    if os.geteuid() != 0:
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    sets = (ctypes.c_uint32 * 6)()  # (effective, permitted, inheritable) for capabilities 0-31, then 32-63
    if libc.capget(header, sets) != 0:
        pytest.skip("cannot read this thread's capabilities")
    effective = sets[0]
    sets[0] &= ~(1 << 1 | 1 << 2)
    if libc.capset(header, sets) != 0:
        pytest.skip("cannot drop root's permission override")
    yield
    sets[0] = effective
    libc.capset(header, sets)


@pytest.mark.parametrize("locked", ["instance_data_dir", "class_data_dir", "concepts_list"])
def test_a_folder_inside_one_that_cannot_be_entered_is_one_line_naming_it(tiny_model, tmp_path, as_a_user, locked):
    inside = tmp_path / "locked"
    paths = {"instance_data_dir": make_images(tmp_path / "toy", 1), "class_data_dir": tmp_path / "toys",
             "concepts_list": tmp_path / "concepts.yaml"}
    paths[locked] = make_images(inside / "folder", 1) if locked != "concepts_list" else inside / "concepts.yaml"
    inside.mkdir(exist_ok=True)
    paths["concepts_list"].write_text(json.dumps([{
        "instance_data_dir": str(paths["instance_data_dir"]), "instance_prompt": "a sks toy",
        "class_data_dir": str(paths["class_data_dir"]), "class_prompt": "a toy"}]))
    inside.chmod(0)
    try:
        with pytest.raises(DreamBoothError) as caught:
            parse_config(TrainConfig, ["--pretrained_model_name_or_path", tiny_model, "--output_dir",
                                       str(tmp_path / "out"), "--concepts_list", str(paths["concepts_list"]),
                                       "--with_prior_preservation"]).validate()
    finally:
        inside.chmod(0o755)
    assert re.search(rf"{locked} {re.escape(str(paths[locked]))}: cannot reach it \(Permission denied\); check "
                     "the permissions of the folders above it$", str(caught.value)), caught.value


def test_an_unreadable_caption_file_is_one_line_naming_it(tmp_path, as_a_user):
    folder = make_images(tmp_path / "photos", 1)
    (folder / "img_0.txt").write_text("sks toy")
    (folder / "img_0.txt").chmod(0)
    with pytest.raises(DreamBoothError, match=r"img_0\.txt: cannot read it \(Permission denied\)"):
        instance_examples(Concept("a sks toy", str(folder)), 0, ".txt", "text")


def test_a_saved_concepts_run_finds_its_folders_from_anywhere_and_uploads_none_of_them(tmp_path, monkeypatch):
    from dreambooth.config import save_train_config
    from dreambooth.hub import public_copies, upload_list

    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    make_images(project / "toy", 1), make_images(elsewhere / "toy", 1, colour=(0, 0, 200))
    (project / "lists").mkdir()
    (project / "lists" / "concepts.yaml").write_text(
        "- {instance_data_dir: toy, instance_prompt: a sks toy, class_data_dir: toys, class_prompt: a toy}\n")
    monkeypatch.chdir(project)
    cfg = parse_config(TrainConfig, ["--concepts_list", "lists/concepts.yaml", "--output_dir", "out"])
    save_train_config(cfg)

    monkeypatch.chdir(elsewhere)  # holds a toy/ of its own, which a resumed run must not take
    resumed = parse_config(TrainConfig, ["--config", str(project / "out" / "train_config.yaml")])
    assert resumed.concepts_list == str(project / "out" / "concepts_list.yaml")
    assert [(concept.instance_data_dir, concept.class_data_dir) for concept in resumed.concepts()] == [
        (str(project / "toy"), str(project / "toys"))]
    assert load_concepts_list(str(project / "lists" / "concepts.yaml"))[0].instance_data_dir == "toy"  # untouched
    uploaded = public_copies(project / "out", upload_list(project / "out", []))
    assert yaml.safe_load(uploaded["concepts_list.yaml"]) == [
        {"instance_prompt": "a sks toy", "instance_data_dir": "toy", "class_data_dir": "toys", "class_prompt": "a toy",
         "num_class_images": 100, "repeats": 1}]
    assert yaml.safe_load(uploaded["train_config.yaml"])["concepts_list"] == "concepts_list.yaml"
    assert str(tmp_path) not in uploaded["concepts_list.yaml"].decode() + uploaded["train_config.yaml"].decode()


def test_class_images_never_go_into_an_instance_folder(tmp_path):
    toy, cup = make_images(tmp_path / "toy", 1), make_images(tmp_path / "cup", 1)
    single = ["--instance_data_dir", str(toy), "--instance_prompt", "a sks toy", "--with_prior_preservation",
              "--class_data_dir", str(toy) + "/", "--class_prompt", "a toy"]
    with pytest.raises(DreamBoothError, match=r"^--class_data_dir .*/toy/: also the --instance_data_dir; generated"):
        check_concepts(parse_config(TrainConfig, single).concepts(), True, None)
    concepts = [Concept("a sks toy", str(toy), str(tmp_path / "toys"), "a toy"),
                Concept("a zwx cup", str(cup), str(toy), "a cup")]
    with pytest.raises(DreamBoothError, match=r"concept 1: class_data_dir .*/toy: also concept 0's instance_data_dir"):
        check_concepts(concepts, True, "concepts.yaml")
    check_concepts(concepts, False, "concepts.yaml")  # without prior preservation the class folders go unused


def test_an_instance_dir_that_is_a_photo_says_so(tmp_path):
    photo = make_images(tmp_path / "photos", 1) / "img_0.png"
    with pytest.raises(DreamBoothError, match=r"^--instance_data_dir .*img_0\.png: a file; give the folder that "):
        check_concepts([Concept("a sks toy", str(photo))], False, None)


def test_a_tilde_in_a_concepts_list_folder_is_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    concepts = tmp_path / "concepts.yaml"
    concepts.write_text("- {instance_data_dir: ~/toy, instance_prompt: a sks toy, class_data_dir: ~/toys}\n"
                        "- {instance_data_dir: cups/~1, instance_prompt: a zwx cup}\n")
    assert [(concept.instance_data_dir, concept.class_data_dir) for concept in load_concepts_list(str(concepts))] == [
        (str(tmp_path / "home" / "toy"), str(tmp_path / "home" / "toys")), ("cups/~1", None)]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_photo_goes_to_the_bucket_of_its_shape_as_shown_after_exif_rotation(tmp_path, orientation):
    """A phone photo stored 96 x 48 with EXIF orientation 5-8 (a quarter turn, maybe mirrored) is a
    48 x 96 portrait once rotated, as the training loads it; 1-4 (none, a flip, a half turn) keep the shape."""
    from dreambooth.buckets import image_size

    path = tmp_path / "photo.jpg"
    image = Image.new("RGB", (96, 48), (200, 40, 40))
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(path, exif=exif)
    portrait = orientation in (5, 6, 7, 8)
    assert image_size(path) == ((48, 96) if portrait else (96, 48))
    (example,) = assign_buckets(examples_from_folder(tmp_path, "p"), 32)
    width, height = example.size
    assert width / height == pytest.approx(0.5 if portrait else 2.0)


def test_bucket_sizes_reach_a_quarter_and_four_times_the_square():
    sizes = bucket_sizes(512)
    assert sizes[0] == (512, 512)
    # Sides from 256 to 1024 in steps of 64: 1024 x 256 is exactly 512², the widest shape there is.
    assert {(1024, 256), (256, 1024), (768, 384), (384, 768), (576, 448)} <= set(sizes)
    assert {side for size in sizes for side in size} == set(range(256, 1025, 64))
    assert nearest_bucket(4000, 1000, sizes) == (1024, 256) and nearest_bucket(100, 400, sizes) == (256, 1024)
    # From 256 px up, sides are multiples of 64 (latents of multiples of 8 for the UNet's three downsamplings).
    assert all(side % 64 == 0 for resolution in (256, 384, 768) for size in bucket_sizes(resolution) for side in size)


def test_bucket_batches_mix_the_images_of_a_bucket_differently_each_epoch():
    sampler = BucketBatchSampler([(32, 32)] * 8, batch_size=2, seed=0)
    pairings = set()
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert sorted(i for batch in batches for i in batch) == list(range(8))
        pairings.add(frozenset(frozenset(batch) for batch in batches))
    assert len(pairings) == 3  # not the same pairs of images in every epoch


def test_a_caption_placing_an_instance_prompt_with_filewords_gets_it_without_them():
    # "{instance_prompt}" in a caption puts in the instance prompt; the caption is that image's
    # filewords, so no literal "[filewords]" may reach the text encoder.
    assert compose_prompt("a photo of sks toy, [filewords]", "{instance_prompt}, close-up") == \
        "a photo of sks toy, close-up"
    assert compose_prompt("a photo of [filewords] sks toy", "{instance_prompt} from above") == \
        "a photo of sks toy from above"
    assert compose_prompt("a photo of sks toy", "{instance_prompt}, close-up") == "a photo of sks toy, close-up"


def test_dataset_images_repeat_as_folder_images_do(tmp_path):
    folder = make_images(tmp_path / "dataset", 2)
    lines = [json.dumps({"file_name": f"img_{i}.png", "caption": f"sks toy number {i}"}) for i in range(2)]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    examples = dataset_examples(str(folder), "image", "caption", "a sks toy", repeats=3)
    assert [example.prompt for example in examples] == ["sks toy number 0", "sks toy number 1"] * 3
