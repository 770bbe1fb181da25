"""dreambooth/data.py: what a folder of user images turns into, down to the pixel."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth.data import (
    DreamBoothCollator,
    DreamBoothDataset,
    Example,
    check_image_folder,
    examples_from_folder,
    image_to_tensor,
    list_image_files,
    load_image,
)
from dreambooth.errors import DreamBoothError

RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)
EXIF_ORIENTATION = 0x0112


def solid(path: Path, colour=RED, size=(16, 16)) -> Path:
    Image.new("RGB", size, colour).save(path)
    return path


def halves(width: int, height: int, left=RED, right=BLUE) -> Image.Image:
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = left
    pixels[:, width // 2 :] = right
    return Image.fromarray(pixels)


def pixel(image: Image.Image, x: int, y: int) -> np.ndarray:
    return np.asarray(image)[y, x].astype(int)


def assert_close(actual, expected, tolerance=0):
    assert np.abs(np.asarray(actual, int) - np.asarray(expected, int)).max() <= tolerance, (actual, expected)


# load_image


@pytest.mark.parametrize("orientation, top, bottom", [(6, RED, BLUE), (8, BLUE, RED)])
def test_load_image_applies_exif_orientation(tmp_path, orientation, top, bottom):
    # Stored 32 wide, 16 high, red left, blue right. Orientation 6 is displayed turned 90
    # degrees clockwise (left edge goes to the top), 8 counter-clockwise (left goes to the bottom).
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    path = tmp_path / "phone.jpg"
    halves(32, 16).save(path, quality=95, exif=exif.tobytes())

    image = load_image(path)

    assert image.mode == "RGB" and image.size == (16, 32)
    assert_close(pixel(image, 8, 4), top, tolerance=40)
    assert_close(pixel(image, 8, 27), bottom, tolerance=40)


def test_load_image_composites_transparency_on_white(tmp_path):
    pixels = np.zeros((8, 8, 4), np.uint8)
    pixels[:, :4] = (0, 0, 0, 0)  # fully transparent black
    pixels[:, 4:6] = (0, 0, 255, 255)  # opaque blue
    pixels[:, 6:] = (255, 0, 0, 128)  # half-transparent red
    path = tmp_path / "cutout.png"
    Image.fromarray(pixels, "RGBA").save(path)

    image = load_image(path)

    assert image.mode == "RGB"
    assert_close(pixel(image, 1, 1), WHITE)
    assert_close(pixel(image, 4, 1), BLUE)
    assert_close(pixel(image, 7, 1), (255, 127, 127), tolerance=1)


def test_load_image_grayscale(tmp_path):
    path = tmp_path / "gray.png"
    Image.new("L", (8, 8), 100).save(path)

    image = load_image(path)

    assert image.mode == "RGB"
    assert np.array_equal(np.asarray(image), np.full((8, 8, 3), 100, np.uint8))


def palette_image() -> Image.Image:
    image = Image.new("P", (8, 8), 0)
    image.putpalette([*RED, *GREEN, *BLUE] + [0] * (256 - 3) * 3)
    image.paste(1, (0, 0, 4, 8))
    image.paste(2, (4, 0, 8, 8))
    return image


def test_load_image_palette(tmp_path):
    path = tmp_path / "palette.png"
    palette_image().save(path)

    image = load_image(path)

    assert image.mode == "RGB"
    assert_close(pixel(image, 0, 0), GREEN)
    assert_close(pixel(image, 7, 7), BLUE)


def test_load_image_palette_with_transparent_index_becomes_white(tmp_path):
    path = tmp_path / "palette.png"
    palette_image().save(path, transparency=1)

    image = load_image(path)

    assert image.mode == "RGB"
    assert_close(pixel(image, 0, 0), WHITE)
    assert_close(pixel(image, 7, 7), BLUE)


def test_load_image_cmyk_jpeg(tmp_path):
    path = tmp_path / "print.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=95)
    with Image.open(path) as stored:
        assert stored.mode == "CMYK"

    image = load_image(path)

    assert image.mode == "RGB"
    assert_close(pixel(image, 8, 8), RED, tolerance=10)


def test_load_image_16_bit_grayscale_is_rescaled_to_8_bit(tmp_path):
    values = np.array([[65535, 32768, 257, 200, 0]], np.uint16).repeat(4, axis=0)
    path = tmp_path / "scan16.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as stored:
        assert stored.mode.startswith("I;16")

    image = load_image(path)

    assert image.mode == "RGB"
    assert np.asarray(image)[0, :, 0].tolist() == [255, 128, 1, 1, 0]
    assert np.array_equal(np.asarray(image)[..., 0], np.asarray(image)[..., 2])


def test_load_image_dark_16_bit_image_stays_dark(tmp_path):
    # Every value is at most 255 here, yet the file is 16-bit: 255 of 65535 is near black.
    path = tmp_path / "dark16.png"
    Image.fromarray(np.full((4, 4), 255, np.uint16)).save(path)

    assert np.asarray(load_image(path)).max() == 1


def test_a_large_jpeg_decodes_at_a_reduced_scale_that_still_covers_the_training_size(tmp_path, monkeypatch):
    path = tmp_path / "phone.jpg"
    halves(640, 480).save(path, quality=95)

    reduced = load_image(path, min_side=64)

    assert reduced.size == (160, 120)  # 1/4 scale: 1/8 would make the short side 60
    full = image_to_tensor(load_image(path), 64, center_crop=True, random_flip=False)
    assert (image_to_tensor(reduced, 64, center_crop=True, random_flip=False) - full).abs().mean() < 0.01
    solid(tmp_path / "scan.png", size=(640, 480))
    assert load_image(tmp_path / "scan.png", min_side=64).size == (640, 480)
    # The dataset asks for the size it trains at, its bucket's longer side included.
    asked = []
    monkeypatch.setattr("dreambooth.data.load_image", lambda path, min_side: asked.append(min_side) or reduced)
    DreamBoothDataset([Example(path, "p"), Example(path, "p", size=(96, 48))], 64)[1]
    assert asked == [96]


@pytest.mark.parametrize("name", ["clip.gif", "clip.webp"])
def test_load_image_of_an_animation_is_its_first_frame(tmp_path, name):
    frames = [Image.new("RGB", (8, 8), colour) for colour in (RED, BLUE, GREEN)]
    frames[0].save(tmp_path / name, save_all=True, append_images=frames[1:], lossless=True)

    assert_close(pixel(load_image(tmp_path / name), 4, 4), RED, tolerance=2)


def encoded(image_format: str) -> bytes:
    buffer = BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)).save(buffer, image_format)
    return buffer.getvalue()


def first_half(data: bytes) -> bytes:
    return data[: len(data) // 2]


@pytest.mark.parametrize("mode, colour", [("RGB", (200, 30, 30)), ("L", 90)])
def test_load_image_colour_key_transparency_becomes_white(tmp_path, mode, colour):
    # PNG's tRNS chunk marks one colour (or grey level) transparent; optimisers write it for binary alpha.
    key = (0, 0, 0) if mode == "RGB" else 0
    image = Image.new(mode, (8, 8), key)
    image.paste(colour, (0, 0, 4, 8))
    path = tmp_path / "keyed.png"
    image.save(path, transparency=key)

    loaded = load_image(path)

    assert_close(pixel(loaded, 7, 0), WHITE)
    assert_close(pixel(loaded, 0, 0), colour if mode == "RGB" else (colour,) * 3)


def test_load_image_broken_link_and_oversized_image_are_errors_naming_them(tmp_path, monkeypatch):
    link = tmp_path / "gone.png"
    link.symlink_to(tmp_path / "deleted.png")
    with pytest.raises(DreamBoothError, match=r"gone\.png: cannot read it"):
        load_image(link)
    solid(tmp_path / "huge.png", size=(32, 32))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL refuses over twice this many pixels
    with pytest.raises(DreamBoothError, match=r"huge\.png: too large to decode safely"):
        load_image(tmp_path / "huge.png")


@pytest.mark.parametrize(
    "name, content",
    [
        ("empty.png", lambda: b""),
        ("half.png", lambda: first_half(encoded("PNG"))),
        ("half.jpg", lambda: first_half(encoded("JPEG"))),
        ("noise.png", lambda: np.random.default_rng(0).integers(0, 256, 512, np.uint8).tobytes()),
    ],
)
def test_load_image_bad_file_is_a_user_error_naming_it(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content())

    with pytest.raises(DreamBoothError, match=re.escape(name)):
        load_image(path)


# list_image_files


def test_list_image_files_accepts_extensions_in_any_case_sorted(tmp_path, caplog):
    names = ["a.jpg", "b.JPEG", "c.png", "D.PNG", "e.webp", "f.Bmp", "g.jpeg", "h.GIF", "i.tif", "j.TIFF", "k.WEBP"]
    for name in names + ["notes.txt", "a.txt", "c.png.txt", "metadata.jsonl", "clip.mp4", ".hidden.png",
                         ".DS_Store", "._a.jpg", "Thumbs.db", "desktop.ini"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "album.png").mkdir()
    solid(tmp_path / "album.png" / "inner.png")

    with caplog.at_level(logging.WARNING, logger="dreambooth.data"):
        images = list_image_files(tmp_path, "--instance_data_dir")

    assert [path.name for path in images] == sorted(names)
    assert all(path.parent == tmp_path for path in images)
    warnings = [record for record in caplog.records if record.name == "dreambooth.data"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    message = warnings[0].getMessage()
    assert "clip.mp4" in message and "notes.txt" in message and "--instance_data_dir" in message
    # An image's own caption and the folder's metadata belong there: no warning for them.
    assert "a.txt" not in message and "c.png.txt" not in message and "metadata" not in message
    # Nor for what macOS and Windows leave in a folder of photos, or a subfolder.
    for name in ("hidden", "DS_Store", "._a", "Thumbs", "desktop", "album"):
        assert name not in message


def test_list_image_files_names_heic_photos_it_cannot_read_once(tmp_path, caplog, monkeypatch):
    # A Pillow without pillow-heif: not installed, and no plugin registered for .heic.
    monkeypatch.setitem(sys.modules, "pillow_heif", None)
    registered = Image.registered_extensions
    monkeypatch.setattr(Image, "registered_extensions",
                        lambda: {ext: name for ext, name in registered().items() if not ext.startswith(".hei")})
    solid(tmp_path / "IMG_0001.jpg")
    (tmp_path / "IMG_0002.HEIC").write_bytes(b"\0\0\0\x18ftypheic")
    with caplog.at_level(logging.WARNING, logger="dreambooth.data"):
        assert check_image_folder(tmp_path, "--instance_data_dir", 8) == [tmp_path / "IMG_0001.jpg"]
        list_image_files(tmp_path, "--instance_data_dir")  # listed again to build the dataset
    assert [record.getMessage() for record in caplog.records] == [
        f"--instance_data_dir {tmp_path}: skipping IMG_0002.HEIC: this Pillow cannot read HEIC images; "
        "pip install pillow-heif, or convert them to JPEG"]


def save_heic(image: Image.Image, path: Path) -> Path:
    pillow_heif = pytest.importorskip("pillow_heif")  # in requirements.txt
    pillow_heif.from_pillow(image).save(str(path), quality=95)  # without registering Pillow's plugin
    return path


def test_heic_photos_are_listed_and_read_like_jpegs(tmp_path):
    save_heic(halves(64, 48), tmp_path / "IMG_0001.HEIC")
    solid(tmp_path / "IMG_0002.jpg")
    assert list_image_files(tmp_path, "--instance_data_dir") == [tmp_path / "IMG_0001.HEIC", tmp_path / "IMG_0002.jpg"]
    decoded = np.asarray(load_image(tmp_path / "IMG_0001.HEIC"), dtype=np.float64)
    assert decoded.shape == (48, 64, 3)
    assert np.abs(decoded - np.asarray(halves(64, 48), dtype=np.float64)).mean() < 8  # lossy, but the same picture


def test_a_portrait_heic_photo_is_turned_upright_once_as_its_jpeg_is(tmp_path):
    """A phone stores a portrait photo sideways with an orientation; HEIC keeps it as a rotation of
    the image (irot), which the plugin applies: no second turn from the EXIF tag."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    halves(64, 48).save(tmp_path / "portrait.jpg", exif=exif.tobytes(), quality=95)
    save_heic_with_exif = pytest.importorskip("pillow_heif").from_pillow(halves(64, 48))
    save_heic_with_exif.save(str(tmp_path / "portrait.heic"), quality=95, exif=exif.tobytes())
    jpeg, heic = (np.asarray(load_image(tmp_path / name), dtype=np.float64) for name in ("portrait.jpg", "portrait.heic"))
    assert jpeg.shape == heic.shape == (64, 48, 3)
    assert np.abs(jpeg - heic).mean() < 8


def test_a_fresh_process_reads_a_heic_photo_without_listing_its_folder_first(tmp_path):
    """DataLoader workers started by spawn load images in a process that never listed the folder."""
    path = save_heic(halves(64, 48), tmp_path / "IMG_0001.heic")
    code = ("import sys; from dreambooth.data import load_image; "
            "print(load_image(sys.argv[1]).getpixel((5, 5)), load_image(sys.argv[1]).getpixel((60, 5)))")
    finished = subprocess.run([sys.executable, "-c", code, str(path)], cwd=Path(__file__).resolve().parents[1],
                              capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr[-2000:]
    left, right = (tuple(int(v) for v in re.findall(r"\d+", part)) for part in finished.stdout.split(") ("))
    assert left[0] > 200 and left[2] < 50 and right[2] > 200 and right[0] < 50


def test_list_image_files_without_strays_logs_nothing(tmp_path, caplog):
    solid(tmp_path / "a.png")
    with caplog.at_level(logging.WARNING, logger="dreambooth.data"):
        assert list_image_files(tmp_path, "--instance_data_dir") == [tmp_path / "a.png"]
    assert not caplog.records


def test_list_image_files_missing_folder_names_the_flag(tmp_path):
    with pytest.raises(DreamBoothError, match="--class_data_dir"):
        list_image_files(tmp_path / "missing", "--class_data_dir")


# check_image_folder


def test_check_image_folder_empty_is_an_error(tmp_path):
    (tmp_path / "readme.txt").write_text("no pictures here")
    with pytest.raises(DreamBoothError, match="--instance_data_dir.*no images"):
        check_image_folder(tmp_path, "--instance_data_dir", 16)


def test_check_image_folder_with_images_only_in_subfolders_says_so(tmp_path):
    for album in ("2023", "2024", ".thumbnails"):
        (tmp_path / album).mkdir()
        solid(tmp_path / album / "dog.jpg")
    with pytest.raises(DreamBoothError, match=r": no images found \(.*\); images in its subfolders \(2023, 2024\) "
                                              "are not read$"):
        check_image_folder(tmp_path, "--instance_data_dir", 16)


def test_check_image_folder_empty_is_allowed_when_asked(tmp_path):
    assert check_image_folder(tmp_path, "--class_data_dir", 16, allow_empty=True) == []


def test_check_image_folder_names_the_corrupt_file(tmp_path):
    solid(tmp_path / "good.png")
    (tmp_path / "broken.jpg").write_bytes(encoded("JPEG")[:100])

    with pytest.raises(DreamBoothError, match=re.escape("broken.jpg")):
        check_image_folder(tmp_path, "--instance_data_dir", 16)


def test_check_image_folder_warns_about_small_images(tmp_path, caplog):
    solid(tmp_path / "big.png", size=(32, 40))
    solid(tmp_path / "thin.png", size=(64, 20))
    solid(tmp_path / "tiny.png", size=(8, 8))

    with caplog.at_level(logging.WARNING, logger="dreambooth.data"):
        images = check_image_folder(tmp_path, "--instance_data_dir", 32)

    assert [path.name for path in images] == ["big.png", "thin.png", "tiny.png"]
    message = " ".join(record.getMessage() for record in caplog.records if record.name == "dreambooth.data")
    assert "thin.png" in message and "tiny.png" in message and "big.png" not in message


# image_to_tensor


@pytest.mark.parametrize("size", [(32, 32), (40, 24), (24, 50)])
def test_image_to_tensor_shape_dtype_and_range(size):
    rgb = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), np.uint8)
    tensor = image_to_tensor(Image.fromarray(rgb), 16, center_crop=False, random_flip=True)

    assert tensor.shape == (3, 16, 16) and tensor.dtype == torch.float32
    assert tensor.min() >= -1.0 and tensor.max() <= 1.0


@pytest.mark.parametrize("colour, value", [(WHITE, 1.0), (BLACK, -1.0)])
def test_image_to_tensor_maps_white_to_one_and_black_to_minus_one(colour, value):
    tensor = image_to_tensor(Image.new("RGB", (24, 20), colour), 16, center_crop=True, random_flip=False)
    assert torch.equal(tensor, torch.full((3, 16, 16), value))


def test_image_to_tensor_center_crop_keeps_the_middle():
    # 96x32 at resolution 32: no resize, the center crop is exactly the green middle third.
    pixels = np.zeros((32, 96, 3), np.uint8)
    pixels[:] = RED
    pixels[:, 32:64] = GREEN
    tensor = image_to_tensor(Image.fromarray(pixels), 32, center_crop=True, random_flip=False)

    green = torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand(3, 32, 32)
    assert torch.equal(tensor, green)


def gradient_image(width=64, height=48) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], axis=-1).astype(np.uint8))


def test_image_to_tensor_random_crop_is_reproducible_for_a_seed():
    def crop(seed):
        generator = torch.Generator().manual_seed(seed)
        return image_to_tensor(gradient_image(), 16, center_crop=False, random_flip=False, generator=generator)

    assert torch.equal(crop(7), crop(7))
    assert any(not torch.equal(crop(0), crop(seed)) for seed in range(1, 10))


def test_image_to_tensor_random_flip_mirrors_along_width():
    results = [
        image_to_tensor(gradient_image(), 16, center_crop=True, random_flip=True,
                        generator=torch.Generator().manual_seed(seed))
        for seed in range(20)
    ]
    unflipped = image_to_tensor(gradient_image(), 16, center_crop=True, random_flip=False)
    flipped = torch.flip(unflipped, dims=[2])

    assert any(torch.equal(result, unflipped) for result in results)
    assert any(torch.equal(result, flipped) for result in results)
    assert all(torch.equal(result, unflipped) or torch.equal(result, flipped) for result in results)


# DreamBoothDataset + DreamBoothCollator

RESOLUTION = 16
INSTANCE_PROMPT, CLASS_PROMPT = "a photo of sks dog", "a photo of a dog"


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model, subfolder="tokenizer")


def image_set(folder: Path, colours, prompt: str) -> list[Example]:
    folder.mkdir()
    for index, colour in enumerate(colours):
        solid(folder / f"{index:02d}.png", colour, size=(24, 20))
    return examples_from_folder(folder, prompt)


def expected_pixels(path: Path) -> torch.Tensor:
    return image_to_tensor(load_image(path), RESOLUTION, center_crop=True, random_flip=False)


@pytest.mark.parametrize("instances, classes, length", [(3, 5, 6), (3, 6, 6), (4, 2, 4), (3, 0, 3)])
def test_dataset_length_covers_the_larger_set_in_whole_passes_over_the_instances(tmp_path, instances, classes, length):
    instance = image_set(tmp_path / "instance", [RED] * instances, INSTANCE_PROMPT)
    prior = image_set(tmp_path / "class", [BLUE] * classes, CLASS_PROMPT) if classes else None

    assert len(DreamBoothDataset(instance, RESOLUTION, classes=[prior] if prior else None)) == length


def test_dataset_item_cycles_the_smaller_set(tmp_path):
    instance = image_set(tmp_path / "instance", [RED, GREEN, BLUE], INSTANCE_PROMPT)
    prior = image_set(tmp_path / "class", [BLACK, WHITE, (10, 20, 30), (40, 50, 60), (70, 80, 90)], CLASS_PROMPT)
    dataset = DreamBoothDataset(instance, RESOLUTION, center_crop=True, classes=[prior])

    item = dataset[4]

    assert torch.equal(item["instance"]["pixel_values"], expected_pixels(instance[1].source))
    assert torch.equal(item["class"]["pixel_values"], expected_pixels(prior[4].source))
    assert item["instance"]["prompt"] == INSTANCE_PROMPT and item["class"]["prompt"] == CLASS_PROMPT


def test_every_class_image_is_trained_whatever_the_concepts_and_buckets(tmp_path):
    """Items sharing a concept's (or a bucket's) class images take them in turn, across epochs."""
    toy = image_set(tmp_path / "toy", [RED] * 2, "a sks toy")
    cup = [Example(e.source, "a zwx cup", 1) for e in image_set(tmp_path / "cup", [GREEN] * 2, "")]
    toys = image_set(tmp_path / "toys", [BLUE, BLACK, WHITE, (9, 9, 9)], "a toy")
    cups = [Example(e.source, "a cup", 1) for e in image_set(tmp_path / "cups", [(1, 2, 3), (4, 5, 6), (7, 8, 9)], "")]
    dataset = DreamBoothDataset(toy + cup, RESOLUTION, classes=[toys, cups])
    assert len(dataset) == 8

    def pairs(epoch):
        dataset.set_epoch(epoch)
        return [(dataset.instances[i % 4].concept, dataset.class_for(i)) for i in range(len(dataset))]

    for concept, images in enumerate((toys, cups)):
        first = [image for owner, image in pairs(0) if owner == concept]
        # The first epoch takes the concept's class images in order; none is left out for good.
        assert first == (images * 2)[:len(first)]
        assert set(first + [image for owner, image in pairs(1) if owner == concept]) == set(images)
    # Buckets: the square instance's class images and the wide one's are pooled apart.
    square, wide = (Example(toy[0].source, "a sks toy", 0, (16, 16)), Example(toy[1].source, "a sks toy", 0, (32, 8)))
    sized = [Example(e.source, e.prompt, 0, (16, 16) if n < 3 else (32, 8)) for n, e in enumerate(toys)]
    dataset = DreamBoothDataset([square, wide], RESOLUTION, classes=[sized])
    used = set()
    for epoch in range(2):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            image = dataset.class_for(index)
            assert image.size == dataset.instances[index % 2].size
            used.add(image)
    assert used == set(sized)


def test_dataset_rejects_empty_image_sets(tmp_path):
    instance = image_set(tmp_path / "instance", [RED], INSTANCE_PROMPT)
    with pytest.raises(DreamBoothError, match="instance"):
        DreamBoothDataset([], RESOLUTION)
    with pytest.raises(DreamBoothError, match="class images"):
        DreamBoothDataset(instance, RESOLUTION, classes=[[]])


def expected_ids(tokenizer, prompts) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    return torch.tensor(ids)


def test_prior_preservation_batch_is_instance_then_class(tmp_path, tokenizer):
    instance = image_set(tmp_path / "instance", [RED, GREEN], INSTANCE_PROMPT)
    prior = image_set(tmp_path / "class", [BLUE, WHITE, BLACK], CLASS_PROMPT)
    dataset = DreamBoothDataset(instance, RESOLUTION, center_crop=True, classes=[prior])

    batch = DreamBoothCollator(tokenizer)([dataset[0], dataset[1]])

    assert batch["pixel_values"].shape == (4, 3, RESOLUTION, RESOLUTION)
    expected = [instance[0].source, instance[1].source, prior[0].source, prior[1].source]
    for row, path in zip(batch["pixel_values"], expected):
        assert torch.equal(row, expected_pixels(path))
    assert batch["prompts"] == [INSTANCE_PROMPT, INSTANCE_PROMPT, CLASS_PROMPT, CLASS_PROMPT]
    assert batch["num_instance"] == 2
    assert batch["input_ids"].shape == (4, tokenizer.model_max_length)
    assert torch.equal(batch["input_ids"], expected_ids(tokenizer, batch["prompts"]))
    assert torch.equal(batch["input_ids"][0], batch["input_ids"][1])
    assert not torch.equal(batch["input_ids"][1], batch["input_ids"][2])
    assert batch["attention_mask"].shape == batch["input_ids"].shape


def test_batch_without_prior_is_only_the_instance_part(tmp_path, tokenizer):
    instance = image_set(tmp_path / "instance", [RED, GREEN], INSTANCE_PROMPT)
    dataset = DreamBoothDataset(instance, RESOLUTION, center_crop=True)

    batch = DreamBoothCollator(tokenizer)([dataset[0], dataset[1]])

    assert batch["pixel_values"].shape == (2, 3, RESOLUTION, RESOLUTION)
    assert torch.equal(batch["pixel_values"][1], expected_pixels(instance[1].source))
    assert batch["prompts"] == [INSTANCE_PROMPT, INSTANCE_PROMPT]
    assert batch["num_instance"] == 2
    assert torch.equal(batch["input_ids"], expected_ids(tokenizer, batch["prompts"]))


def test_collator_max_length_overrides_the_tokenizer(tmp_path, tokenizer):
    instance = image_set(tmp_path / "instance", [RED], INSTANCE_PROMPT)
    batch = DreamBoothCollator(tokenizer, max_length=8)([DreamBoothDataset(instance, RESOLUTION)[0]])

    assert batch["input_ids"].shape == (1, 8)


# The training loader with worker processes (build_dataloader)

def photo_flags(tmp_path: Path) -> list[str]:
    """A small captioned set (5 square and 3 wide noise photos) with 3 class images, trained with
    every per-epoch choice on: random crops and flips, caption dropout, class turns, the order."""
    rng = np.random.default_rng(0)
    instance, classes = tmp_path / "instance", tmp_path / "class"
    instance.mkdir()
    classes.mkdir()
    for index in range(8):
        width, height = (24, 20) if index < 5 else (40, 16)
        Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8)).save(instance / f"{index}.png")
        (instance / f"{index}.txt").write_text(f"photo {index} of sks dog")
    for index in range(3):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), np.uint8)).save(classes / f"{index}.png")
    return ["--instance_data_dir", str(instance), "--instance_prompt", INSTANCE_PROMPT, "--resolution", str(RESOLUTION),
            "--train_batch_size", "2", "--random_flip", "--caption_dropout", "0.5", "--with_prior_preservation",
            "--class_data_dir", str(classes), "--class_prompt", CLASS_PROMPT, "--num_class_images", "3"]


def training_loader(flags: list[str], workers: int, context: str | None = None, num_processes: int = 1,
                    process_index: int = 0):
    """``build_dataloader``'s loader as Accelerate prepares it (``context``: the workers' start method)."""
    from accelerate.data_loader import prepare_data_loader

    from dreambooth.concepts import build_dataloader
    from dreambooth.config import TrainConfig, parse_config

    loader = build_dataloader(parse_config(TrainConfig, [*flags, "--dataloader_num_workers", str(workers)]), None, 7)
    if context:
        loader.multiprocessing_context = context
    return prepare_data_loader(loader, num_processes=num_processes, process_index=process_index, put_on_device=False)


def contents(batches) -> list[tuple[list[str], torch.Tensor]]:
    return [(batch["prompts"], batch["pixel_values"]) for batch in batches]


def epoch_batches(loader, epoch: int) -> list[tuple[list[str], torch.Tensor]]:
    loader.set_epoch(epoch)
    return contents(loader)


def same_batches(actual, expected) -> bool:
    return len(actual) == len(expected) and all(
        prompts == wanted_prompts and torch.equal(pixels, wanted_pixels)
        for (prompts, pixels), (wanted_prompts, wanted_pixels) in zip(actual, expected))


def worker_pids(loader) -> list[int] | None:
    """The process ids of the loader's live workers; None when none outlived the last epoch."""
    iterator = loader.base_dataloader._iterator
    return None if iterator is None else [worker.pid for worker in iterator._workers if worker.is_alive()]


@pytest.mark.parametrize("context", ["fork", "spawn"])
@pytest.mark.parametrize("bucket", [False, True], ids=["plain", "bucketed"])
def test_workers_load_the_batches_of_the_main_process_epoch_after_epoch(tmp_path, bucket, context):
    """Same images, crops, flips, captions, class images and order with 2 workers as without, over
    3 epochs; the workers start once and live through every epoch."""
    flags = photo_flags(tmp_path) + (["--enable_bucket"] if bucket else [])
    alone, with_workers = training_loader(flags, 0), training_loader(flags, 2, context)
    expected = [epoch_batches(alone, epoch) for epoch in range(3)]
    assert not same_batches(expected[1], expected[0]) and not same_batches(expected[2], expected[1])

    pids = []
    for epoch in range(3):
        assert same_batches(epoch_batches(with_workers, epoch), expected[epoch]), f"epoch {epoch}"
        pids.append(worker_pids(with_workers))
    assert pids[0] is not None and len(pids[0]) == 2 and pids[0] == pids[1] == pids[2]


@pytest.mark.parametrize("num_processes", [1, 2])
@pytest.mark.parametrize("bucket", [False, True], ids=["plain", "bucketed"])
def test_a_run_resumed_mid_epoch_gets_the_rest_of_that_epoch_from_its_workers(tmp_path, bucket, num_processes):
    """The trainer's batches of a run resumed one batch into epoch 2 (Accelerate's skipping copy of
    each process's loader), then of epochs 3 and 4: those of an uninterrupted run without workers."""
    from types import SimpleNamespace

    from accelerate.data_loader import skip_first_batches

    from dreambooth.checkpoints import TrainState
    from dreambooth.training import Trainer

    flags = photo_flags(tmp_path) + (["--enable_bucket"] if bucket else [])
    for rank in range(num_processes):
        uninterrupted = training_loader(flags, 0, num_processes=num_processes, process_index=rank)
        expected = {epoch: epoch_batches(uninterrupted, epoch) for epoch in (2, 3, 4)}
        resumed = SimpleNamespace(state=TrainState(epoch=2, batches_in_epoch=1, num_processes=num_processes),
                                  dataloader=training_loader(flags, 2, num_processes=num_processes, process_index=rank),
                                  accelerator=SimpleNamespace(skip_first_batches=skip_first_batches))
        assert same_batches(contents(Trainer._epoch_batches(resumed)), expected[2][1:]), f"process {rank}, epoch 2"
        for epoch in (3, 4):
            resumed.state = TrainState(epoch=epoch, num_processes=num_processes)
            assert same_batches(contents(Trainer._epoch_batches(resumed)), expected[epoch]), f"process {rank}, epoch {epoch}"
