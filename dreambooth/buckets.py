"""Aspect-ratio buckets: portrait and landscape photos train at their own shape, not cropped square.

The buckets are sizes within 12.5% of ``resolution``² pixels whose sides are multiples of 64
(of 8 for the tiny test models below 256 px), between half and twice the resolution; the
tolerance lets the common ratios exist exactly (2:1 at 512 px is 768x384). Each image goes to
the bucket nearest its aspect ratio, and every batch is drawn from one bucket.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from .data import DatasetRow, Example, derived_seed, with_epoch


AREA_TOLERANCE = 0.125


def bucket_sizes(resolution: int) -> list[tuple[int, int]]:
    """(width, height) pairs of about ``resolution``² pixels, square first."""
    step = 64 if resolution >= 256 else 8
    area = resolution * resolution
    sides = range(step * math.ceil(resolution / 2 / step), 2 * resolution + 1, step)
    sizes = {(width, height) for width in sides for height in sides
             if abs(width * height / area - 1) <= AREA_TOLERANCE}
    sizes.add((resolution, resolution))
    return sorted(sizes, key=lambda size: (size != (resolution, resolution), size[0] / size[1], size[0]))


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket closest in aspect ratio, then in pixel count to the square one."""
    aspect, area = math.log(width / height), buckets[0][0] * buckets[0][1]
    return min(buckets, key=lambda size: (round(abs(math.log(size[0] / size[1]) - aspect), 9),
                                          abs(size[0] * size[1] - area)))


def image_size(source: Path | DatasetRow) -> tuple[int, int]:
    """Width and height as trained (EXIF rotation applied), read from the header where possible."""
    if isinstance(source, DatasetRow):
        image = source.dataset[source.row][source.column]
        return _oriented(image)
    with Image.open(source) as image:
        return _oriented(image)


def _oriented(image: Image.Image) -> tuple[int, int]:
    width, height = image.size
    orientation = image.getexif().get(0x0112, 1)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def assign_buckets(examples: Sequence[Example], resolution: int) -> list[Example]:
    buckets = bucket_sizes(resolution)
    return [Example(e.source, e.prompt, e.concept, nearest_bucket(*image_size(e.source), buckets)) for e in examples]


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of items of one size each. Each epoch shuffles the items of every bucket and the
    order of the batches with a generator seeded by (seed, epoch): resumable, like the dataset."""

    def __init__(self, sizes: Sequence[tuple[int, int]], batch_size: int, seed: int = 0):
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0
        self.buckets: dict[tuple[int, int], list[int]] = {}
        for index, size in enumerate(sizes):
            self.buckets.setdefault(size, []).append(index)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(math.ceil(len(items) / self.batch_size) for items in self.buckets.values())

    def batches(self, epoch: int) -> list[list[int]]:
        """The batches of ``epoch``, in the order they train."""
        generator = torch.Generator().manual_seed(derived_seed(self.seed, epoch))
        batches = []
        for items in self.buckets.values():
            order = [items[i] for i in torch.randperm(len(items), generator=generator).tolist()]
            batches += [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        return [batches[position] for position in torch.randperm(len(batches), generator=generator).tolist()]

    def __iter__(self):
        yield from self.batches(self.epoch)


class BucketBatches(Dataset):
    """The epoch's bucket batches as items: item ``(epoch, k)`` is batch k of ``BucketBatchSampler``
    in ``epoch``, whole (an ``EpochSampler`` yields these; a bare k is one of the epoch set).

    Loaded one item at a time, a batch is what Accelerate shards across processes, so each
    process gets whole one-bucket batches. (Given the sampler as a ``batch_sampler``, Accelerate
    cuts its batches to a fixed size: a bucket's short last batch would be merged with another
    bucket's images, or a group of batches dropped.)"""

    def __init__(self, items, batch_size: int, seed: int = 0):
        self.items, self.epoch = items, 0
        self.sampler = BucketBatchSampler(items.sizes(), batch_size, seed)
        self._batches: tuple[int | None, list[list[int]]] = (None, [])  # those of the last epoch asked for

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.items.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __getitem__(self, index: int | tuple[int, int]) -> list:
        epoch, index = with_epoch(index, self.epoch)
        if self._batches[0] != epoch:
            self._batches = (epoch, self.sampler.batches(epoch))
        return [self.items[(epoch, item)] for item in self._batches[1][index]]


class OneBatch:
    """Collate a loader batch of one ``BucketBatches`` item: that item's examples."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, batches: list[list]) -> dict:
        (examples,) = batches
        return self.collate(examples)
