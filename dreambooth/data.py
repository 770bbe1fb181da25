"""Images in, training batches out: folder scanning, robust decoding, transforms, batching."""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler

from .errors import DreamBoothError


class CorruptImageError(DreamBoothError):
    """The file itself is broken (empty, truncated, not an image): regenerating it is safe."""


logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Phone and web formats that Pillow reads only with a plugin (HEIC) or in recent builds (AVIF).
PLUGIN_EXTENSIONS = (".heic", ".heif", ".avif")
HEIF_EXTENSIONS = (".heic", ".heif")  # iPhone photos: read through pillow-heif's plugin
# What Windows leaves in a folder of photos; skipped without a word, like macOS's hidden files.
SYSTEM_FILES = ("thumbs.db", "desktop.ini")
_warned: set[str] = set()


def path_kind(path: str | Path, name: str) -> str | None:
    """"folder", "file", or None when nothing is there. A path that cannot be looked at, as when a
    folder above it may not be entered, is a DreamBoothError beginning with ``name``."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as error:
        raise DreamBoothError(f"{name}: cannot reach it ({error.strerror or error}); check the permissions of "
                              "the folders above it") from None
    return "folder" if stat.S_ISDIR(mode) else "file"


def list_image_files(folder: str | Path, flag: str) -> list[Path]:
    """Image files of ``folder`` in name order. Other files are skipped with a warning (a video, a
    caption named unlike its image, a HEIC photo this Pillow cannot read), except an image's own
    companions (photo1.txt or photo1.jpg.txt beside photo1.jpg), metadata.jsonl, hidden files and
    folders, and Windows' Thumbs.db and desktop.ini."""
    folder = Path(folder)
    try:
        if not folder.is_dir():
            raise DreamBoothError(f"{flag} {folder}: folder not found")
        files = [path for path in sorted(folder.iterdir())
                 if not (path.name.startswith(".") or path.name.lower() in SYSTEM_FILES or path.is_dir())]
    except OSError as error:  # no permission to list the folder (r) or to look at its files (x)
        raise DreamBoothError(f"{flag} {folder}: cannot read the folder ({error.strerror or error}); "
                              "check the permissions of it and of the folders above it") from None
    if any(path.suffix.lower() in HEIF_EXTENSIONS for path in files):
        read_heif()
    readable = IMAGE_EXTENSIONS + tuple(set(PLUGIN_EXTENSIONS) & set(Image.registered_extensions()))
    images, others = [], []
    for path in files:
        (images if path.suffix.lower() in readable else others).append(path)
    companions_of = {path.stem for path in images} | {path.name for path in images} | {"metadata"}
    photos = [path for path in others if path.suffix.lower() in PLUGIN_EXTENSIONS]
    skipped = [path for path in others if path.stem not in companions_of and path not in photos]
    if photos:
        heif = any(path.suffix.lower() in HEIF_EXTENSIONS for path in photos)
        warn_once(f"{flag} {folder}: skipping {_some(photos)}: this Pillow cannot read "
                  f"{'/'.join(sorted({path.suffix.upper()[1:] for path in photos}))} images; "
                  + ("pip install pillow-heif, or " if heif else "") + "convert them to JPEG")
    if skipped:
        warn_once(f"{flag} {folder}: skipping {len(skipped)} non-image file(s): {_some(skipped)}")
    return images


def read_heif() -> bool:
    """Whether Pillow reads HEIC/HEIF images, registering pillow-heif's plugin where it is installed.
    Called where such a file is met, so that every process reading images (DataLoader workers
    started by spawn included) registers it for itself."""
    if ".heic" in Image.registered_extensions():
        return True
    try:
        from pillow_heif import register_heif_opener
    except (ImportError, OSError):  # not installed, or its libheif cannot load
        return False
    register_heif_opener()
    return True


def _some(paths: Sequence[Path]) -> str:
    return ", ".join(path.name for path in paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")


def warn_once(message: str) -> None:
    """Log ``message`` once per process: the start checks list a folder, and the dataset again."""
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def load_image(path: str | Path, min_side: int | None = None) -> Image.Image:
    """Decode an image fully, apply its EXIF orientation and convert it to 8-bit RGB.

    Transparent images are composited on white; 16-bit and float images are rescaled.
    A zero-byte, truncated or undecodable file is a DreamBoothError naming the file.
    With ``min_side``, a JPEG may be decoded at 1/2, 1/4 or 1/8 scale, its sides kept at least
    ``min_side``: a 6000x4000 phone photo trained at 512 px decodes several times faster.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as error:  # a broken link, or no permission
        raise DreamBoothError(f"{path}: cannot read it ({error.strerror or error}); remove or replace it") from None
    if size == 0:
        raise CorruptImageError(f"{path}: empty file (0 bytes); remove or replace it")
    if path.suffix.lower() in HEIF_EXTENSIONS:
        read_heif()
    try:
        with Image.open(path) as opened:
            if min_side:
                opened.draft(None, (min_side, min_side))
            opened.load()
            image = ImageOps.exif_transpose(opened)
    except Image.DecompressionBombError as error:
        raise DreamBoothError(f"{path}: too large to decode safely ({error}); downscale it") from None
    except PermissionError as error:
        raise DreamBoothError(f"{path}: cannot read it ({error.strerror}); remove or replace it") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise CorruptImageError(f"{path}: corrupt or truncated image ({error}); remove or replace it") from None
    return _to_rgb(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        # An I;16 file is 16-bit even when every value fits in 8 bits (a dark scan); the
        # 32-bit and float modes carry no depth, so their range is guessed from the values.
        peak = 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
        image = Image.fromarray(np.clip(pixels / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("P", "L", "RGB") and "transparency" in image.info:
        # A palette entry, or one grey level or colour (PNG's tRNS chunk), marks the transparent pixels.
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def check_image_folder(folder: str | Path | None, flag: str, resolution: int, allow_empty: bool = False) -> list[Path]:
    """Decode every image of ``folder`` once, so that a bad file stops the run before any model loads."""
    images = list_image_files(folder, flag)
    if not images and not allow_empty:
        subfolders = sorted(path.name for path in Path(folder).iterdir() if path.is_dir() and path.name[0] != ".")
        inside = f"; images in its subfolders ({', '.join(subfolders[:3])}) are not read" if subfolders else ""
        raise DreamBoothError(f"{flag} {folder}: no images found ({', '.join(IMAGE_EXTENSIONS)}){inside}")
    small = []
    for path in images:
        width, height = load_image(path, resolution).size  # any image at least this large keeps it
        if min(width, height) < resolution:
            small.append(f"{path.name} ({width}x{height})")
    if small:
        logger.warning(
            "%s: %d image(s) smaller than --resolution %d will be upscaled: %s",
            flag, len(small), resolution, ", ".join(small[:5]) + (" ..." if len(small) > 5 else ""),
        )
    return images


def image_to_tensor(
    image: Image.Image, size: int | tuple[int, int], center_crop: bool, random_flip: bool,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Resize to cover ``size`` (a square side, or (width, height) of a bucket) keeping the aspect
    ratio, crop it (centered or at random), maybe flip; CHW float in [-1, 1]."""
    target_w, target_h = (size, size) if isinstance(size, int) else size
    width, height = image.size
    scale = max(target_w / width, target_h / height)
    resized = (max(target_w, round(width * scale)), max(target_h, round(height * scale)))
    image = image.resize(resized, Image.Resampling.BILINEAR)
    spare_x, spare_y = resized[0] - target_w, resized[1] - target_h
    if center_crop:
        left, top = spare_x // 2, spare_y // 2
    else:
        left = int(torch.randint(0, spare_x + 1, (1,), generator=generator))
        top = int(torch.randint(0, spare_y + 1, (1,), generator=generator))
    image = image.crop((left, top, left + target_w, top + target_h))
    if random_flip and float(torch.rand(1, generator=generator)) < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)
    return pixels / 127.5 - 1.0


@dataclass(frozen=True)
class DatasetRow:
    """An image inside a ``datasets`` dataset (``--dataset_name``)."""

    dataset: object
    row: int
    column: str

    @property
    def name(self) -> str:
        return f"row {self.row}"


@dataclass(frozen=True)
class Example:
    """One training image, its prompt, its concept and the (width, height) it trains at."""

    source: Path | DatasetRow
    prompt: str
    concept: int = 0
    size: tuple[int, int] | None = None


def load_source(source: Path | DatasetRow, min_side: int | None = None) -> Image.Image:
    if isinstance(source, DatasetRow):
        try:
            image = source.dataset[source.row][source.column]
            return _to_rgb(ImageOps.exif_transpose(image))
        except (OSError, ValueError, AttributeError) as error:
            raise DreamBoothError(f"--dataset_name {source.name}: cannot decode the image ({error})") from None
    return load_image(source, min_side)


def examples_from_folder(folder: str | Path, prompt: str, concept: int = 0, flag: str = "--instance_data_dir"):
    """Every image of ``folder`` with the same prompt (class images, or uncaptioned instances)."""
    return [Example(path, prompt, concept) for path in list_image_files(folder, flag)]


class DreamBoothDataset(Dataset):
    """Item ``i`` pairs instance example ``i mod n`` with a class image of the same concept (of the
    same size bucket when there is one) when prior preservation is on, as in the paper and
    diffusers; an epoch covers the larger of the two sets in whole passes over the instances, so
    every instance image (and every concept, in proportion to images x repeats) trains equally
    often. The items sharing a concept's (or bucket's) class images take them in turn, continuing
    from epoch to epoch, so every class image is trained on however the concepts and buckets divide
    the items. Repeated concepts simply appear several times in ``instances``.

    Random crops, flips and caption dropout draw from a generator seeded by (seed, epoch, item),
    never from the global one: the same item looks the same in a resumed run, in any worker.
    The loader's samplers give the epoch with each index, ``dataset[(epoch, i)]``: a persistent
    worker's copy of the dataset, made when the loader is first iterated, never sees ``set_epoch``
    (nor any other change made in the main process after that).
    """

    def __init__(
        self,
        instances: Sequence[Example],
        resolution: int,
        center_crop: bool = False,
        random_flip: bool = False,
        classes: Sequence[Sequence[Example]] | None = None,
        seed: int = 0,
        caption_dropout: float = 0.0,
    ):
        if not instances:
            raise DreamBoothError("no instance images")
        if classes is not None and not all(classes[example.concept] for example in instances):
            raise DreamBoothError("prior preservation is on but a concept has no class images")
        self.instances, self.classes = list(instances), classes
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.seed, self.epoch, self.caption_dropout = seed, 0, caption_dropout
        # With cached latents (center crops only), items name their image variant instead of decoding it.
        self.yield_latent_keys = False
        if classes is not None:
            self._class_pools = self._pool_classes_by_size()
            self._class_turns, self._pool_items = self._take_turns()

    def _pool_classes_by_size(self) -> dict[tuple[int, Any], list[Example]]:
        """Class images by (concept, size); (concept, "any") holds all of a concept's, for an
        instance whose bucket has no class image of its size (they are fitted to the bucket)."""
        pools: dict = {}
        for concept, examples in enumerate(self.classes):
            pools[(concept, "any")] = list(examples)
            for example in examples:
                pools.setdefault((concept, example.size), []).append(example)
        return pools

    def _take_turns(self) -> tuple[list[tuple[tuple, int]], dict[tuple, int]]:
        """Each item's class pool and its turn there, and how many items of an epoch use each pool."""
        turns, pool_items = [], {}
        for index in range(len(self)):
            instance = self.instances[index % len(self.instances)]
            pool = (instance.concept, instance.size)
            pool = pool if pool in self._class_pools else (instance.concept, "any")
            turns.append((pool, pool_items.get(pool, 0)))
            pool_items[pool] = pool_items.get(pool, 0) + 1
        return turns, pool_items

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def prompts(self) -> list[str]:
        """Every prompt an item can carry (for pre-computing text embeddings)."""
        prompts = [example.prompt for example in self.instances] + (["" if self.caption_dropout else None])
        if self.classes is not None:
            prompts += [example.prompt for examples in self.classes for example in examples]
        return list(dict.fromkeys(prompt for prompt in prompts if prompt is not None))

    def sizes(self) -> list[tuple[int, int]]:
        """The (width, height) each item trains at."""
        return [self.instances[i % len(self.instances)].size or (self.resolution,) * 2 for i in range(len(self))]

    def __len__(self) -> int:
        # Whole passes over the instances: the items past the last whole one would go, every epoch, to
        # the first images (the first concept's), training them more often than the rest.
        passes = -(-sum(map(len, self.classes)) // len(self.instances)) if self.classes is not None else 1
        return len(self.instances) * max(passes, 1)

    def class_pairings(self):
        """Every (class image, size) an item can pair, in any epoch."""
        seen = {}
        for index, (pool, _) in enumerate(self._class_turns):
            seen.setdefault((pool, self.instances[index % len(self.instances)].size or (self.resolution,) * 2))
        for pool, size in seen:
            for example in self._class_pools[pool]:
                yield example, size

    def class_for(self, index: int, epoch: int | None = None) -> Example:
        """The class image item ``index`` pairs in ``epoch`` (by default the one set)."""
        epoch = self.epoch if epoch is None else epoch
        pool, turn = self._class_turns[index]
        images = self._class_pools[pool]
        return images[(epoch * self._pool_items[pool] + turn) % len(images)]

    def _load(self, example: Example, size: tuple[int, int], generator: torch.Generator, dropout: bool) -> dict:
        if self.yield_latent_keys:
            # The same draw image_to_tensor makes for a centered crop: only the flip.
            flipped = self.random_flip and float(torch.rand(1, generator=generator)) < 0.5
            part = {"latent_key": (str(example.source), tuple(size), flipped)}
        else:
            part = {"pixel_values": image_to_tensor(load_source(example.source, max(size)), size, self.center_crop,
                                                    self.random_flip, generator)}
        drop = dropout and self.caption_dropout and float(torch.rand(1, generator=generator)) < self.caption_dropout
        return {**part, "prompt": "" if drop else example.prompt}

    def __getitem__(self, index: int | tuple[int, int]) -> dict:
        """Item ``index`` of the epoch set, or ``(epoch, index)``: item ``index`` of ``epoch``."""
        epoch, index = with_epoch(index, self.epoch)
        generator = torch.Generator().manual_seed(derived_seed(self.seed, epoch, index))
        instance = self.instances[index % len(self.instances)]
        size = instance.size or (self.resolution, self.resolution)
        item = {"instance": self._load(instance, size, generator, dropout=True)}
        if self.classes is not None:
            item["class"] = self._load(self.class_for(index, epoch), size, generator, dropout=False)
        return item


def with_epoch(index: int | tuple[int, int], epoch: int) -> tuple[int, int]:
    """``(epoch, index)`` as an ``EpochSampler`` yields it; a bare index is one of ``epoch``."""
    return (int(index[0]), int(index[1])) if isinstance(index, (tuple, list)) else (epoch, int(index))


def derived_seed(*numbers: int) -> int:
    """A seed that depends only on ``numbers``: the same on every process and in every run."""
    return int(np.random.SeedSequence(list(numbers)).generate_state(1)[0])


class EpochSampler(Sampler[tuple[int, int]]):
    """Indices 0 to ``length`` - 1 in order, each with the epoch: ``(epoch, index)``. The dataset
    makes the epoch's random choices from the pair, not from an epoch set on it, so a worker
    that lives through every epoch (``persistent_workers``) makes the main process's choices.
    Accelerate shards the indices across processes and calls ``set_epoch``."""

    def __init__(self, length: int):
        self.length, self.epoch = length, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def order(self) -> list[int]:
        return list(range(self.length))

    def __iter__(self):
        epoch = self.epoch
        for index in self.order():
            yield epoch, index


class EpochShuffleSampler(EpochSampler):
    """A new permutation each epoch that depends on (seed, epoch) alone, so a resumed run
    sees the same order."""

    def __init__(self, length: int, seed: int = 0):
        super().__init__(length)
        self.seed = seed

    def order(self) -> list[int]:
        generator = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch))
        return torch.randperm(self.length, generator=generator).tolist()


def tokenize_prompts(tokenizer, prompts: Sequence[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
    tokens = tokenizer(
        list(prompts),
        truncation=True,
        padding="max_length",
        max_length=max_length or tokenizer.model_max_length,
        return_tensors="pt",
    )
    return {"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask}


class DreamBoothCollator:
    """Stack a batch instance-first, then class: the loss splits it in these two halves. With
    ``tokenizer`` None the batch carries no tokens, for a run whose prompts were all encoded
    before training (then, with cached latents, it holds no tensor to copy to the GPU at all)."""

    def __init__(self, tokenizer, max_length: int | None = None):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, examples: list[dict]) -> dict:
        parts = [example["instance"] for example in examples]
        parts += [example["class"] for example in examples if "class" in example]
        prompts = [part["prompt"] for part in parts]
        batch = {"prompts": prompts, "num_instance": len(examples)}
        if "latent_key" in parts[0]:
            batch["latent_keys"] = [part["latent_key"] for part in parts]
        else:
            batch["pixel_values"] = torch.stack([part["pixel_values"] for part in parts]).contiguous()
        if self.tokenizer is not None:
            batch.update(tokenize_prompts(self.tokenizer, prompts, self.max_length))
        return batch
