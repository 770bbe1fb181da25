"""What a run learns: one or several concepts, their images and their captions.

The single-concept flags (--instance_data_dir, --instance_prompt, --class_data_dir, ...) are the
one-concept case of --concepts_list. A caption comes from a sidecar file beside the image
(``photo1.jpg`` + ``photo1.txt``) or from the folder's ``metadata.jsonl`` (the datasets
imagefolder format); without one, the image trains with its concept's instance prompt.
``build_dataloader`` turns a training config's concepts into batches.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import yaml

from .buckets import BucketBatches, OneBatch, assign_buckets
from .data import (
    DatasetRow,
    DreamBoothCollator,
    DreamBoothDataset,
    EpochSampler,
    EpochShuffleSampler,
    Example,
    examples_from_folder,
    list_image_files,
    path_kind,
    warn_once,
)
from .errors import DreamBoothError

PROMPT_PLACEHOLDER = "{instance_prompt}"
FILEWORDS = "[filewords]"


@dataclasses.dataclass(frozen=True)
class Concept:
    instance_prompt: str
    instance_data_dir: Optional[str] = None
    class_data_dir: Optional[str] = None
    class_prompt: Optional[str] = None
    num_class_images: int = 100
    repeats: int = 1
    eval_identifier: Optional[str] = None  # for --eval_steps, where the prompts do not tell it
    eval_class_noun: Optional[str] = None


_REQUIRED = ("instance_data_dir", "instance_prompt")
_WHOLE_NUMBERS = ("num_class_images", "repeats")


def load_concepts_list(path: str, num_class_images: int = 100, repeats: int = 1) -> list[Concept]:
    """Parse and check a --concepts_list file (JSON or YAML: a list of mappings). A concept that sets
    no ``num_class_images`` or ``repeats`` takes the ones given (the flags'), as ShivamShrirao's
    script applies its --num_class_images to every concept of its lists, which carry no such key."""
    file = Path(path)
    if path_kind(file, f"--concepts_list {path}") != "file":
        raise DreamBoothError(f"--concepts_list {path}: file not found")
    try:
        entries = yaml.safe_load(file.read_text(encoding="utf-8"))  # JSON is YAML too
    except OSError as error:
        raise DreamBoothError(f"--concepts_list {path}: cannot read it ({error.strerror or error})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise DreamBoothError(f"--concepts_list {path}: not valid JSON or YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(entries, list) or not entries:
        raise DreamBoothError(f"--concepts_list {path}: expected a non-empty list of concepts")
    known = {field.name for field in dataclasses.fields(Concept)}
    concepts = []
    for number, entry in enumerate(entries):
        where = f"--concepts_list {path}, concept {number}"
        if not isinstance(entry, dict):
            raise DreamBoothError(f"{where}: expected a mapping of keys to values")
        unknown = sorted(set(entry) - known)
        if unknown:
            raise DreamBoothError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(sorted(known))})")
        entry = {key: value for key, value in entry.items() if value is not None}  # `repeats:` left empty
        for key, value in entry.items():
            wanted = int if key in _WHOLE_NUMBERS else str
            if not isinstance(value, wanted) or isinstance(value, bool):
                what = "a whole number" if wanted is int else "text"
                raise DreamBoothError(f"{where}: {key} {value!r}: must be {what}")
        missing = [key for key in _REQUIRED if not entry.get(key)]
        if missing:
            raise DreamBoothError(f"{where}: missing key '{missing[0]}'")
        for key in ("instance_data_dir", "class_data_dir"):  # a leading ~ is the home folder, as in a shell
            if key in entry:
                entry[key] = os.path.expanduser(entry[key])
        concepts.append(Concept(**{"num_class_images": num_class_images, "repeats": repeats, **entry}))
    return concepts


def save_concepts_list(concepts: Sequence[Concept], path: str | Path) -> Path:
    """``concepts`` as a --concepts_list file whose folders are absolute: it gives the same images
    whatever the current folder (relative folders in a list are relative to it, as in diffusers)."""
    entries = []
    for concept in concepts:
        entry = {key: value for key, value in dataclasses.asdict(concept).items() if value is not None}
        for key in ("instance_data_dir", "class_data_dir"):
            if key in entry:
                entry[key] = str(Path(entry[key]).resolve())
        entries.append(entry)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(entries, sort_keys=False), encoding="utf-8")
    return path


def check_concepts(concepts: Sequence[Concept], with_prior_preservation: bool, concepts_list: str | None) -> None:
    """Problems a concept can have before any image is read: missing folders, duplicates, bad numbers.
    Errors name the flag for the single-concept flags, or the file and concept for a list."""
    with_classes = [str(number) for number, concept in enumerate(concepts)
                    if concept.class_data_dir or concept.class_prompt]
    if concepts_list is not None and with_classes and not with_prior_preservation:
        warn_once(f"--concepts_list {concepts_list}: the class_data_dir and class_prompt of concepts "
                  f"{', '.join(with_classes)} are used only with --with_prior_preservation; training without class images")
    seen: dict[Path, int] = {}
    for number, concept in enumerate(concepts):
        problem = _problem_of(concepts_list, number)
        if not str(concept.instance_prompt).strip():
            raise problem("instance_prompt", repr(concept.instance_prompt), "must not be empty")
        if concept.repeats < 1:
            raise problem("repeats", concept.repeats, "must be at least 1")
        if concept.instance_data_dir is not None:
            folder = Path(concept.instance_data_dir).resolve()
            kind = path_kind(folder, _named(concepts_list, number, "instance_data_dir", concept.instance_data_dir))
            if kind != "folder":
                raise problem("instance_data_dir", concept.instance_data_dir,
                              "folder not found" if kind is None else "a file; give the folder that holds the images")
            if folder in seen:
                raise problem("instance_data_dir", concept.instance_data_dir,
                              f"also concept {seen[folder]}'s; give each folder once (use repeats to weight it)")
            seen[folder] = number
    if with_prior_preservation:
        check_class_folders(concepts, concepts_list)


def check_class_folders(concepts: Sequence[Concept], concepts_list: str | None) -> None:
    """What prior preservation needs of each concept, checked before any class image is made: a class
    folder and prompt, a count, a folder shared only with the same prompt and no instance folder. The
    instance folders need not exist (generate_class_images.py may run where they are not)."""
    class_folders: dict[Path, int] = {}
    instance_folders = {Path(concept.instance_data_dir).resolve(): number for number, concept in enumerate(concepts)
                        if concept.instance_data_dir is not None}
    for number, concept in enumerate(concepts):
        problem = _problem_of(concepts_list, number)
        for key in ("class_data_dir", "class_prompt"):
            if not str(getattr(concept, key) or "").strip():
                raise (DreamBoothError(f"--with_prior_preservation needs --{key}") if concepts_list is None
                       else problem(key, "(missing)", "prior preservation needs it"))
        if concept.num_class_images < 1:
            raise problem("num_class_images", concept.num_class_images, "must be at least 1")
        class_folder = Path(concept.class_data_dir).resolve()
        first = concepts[class_folders.setdefault(class_folder, number)]
        if first.class_prompt.strip() != concept.class_prompt.strip():
            # The top-up would add this prompt's images after the other's, and this concept would train
            # on both as this class (a cat's class folder topped up with dogs, all of them called dogs).
            raise problem("class_data_dir", concept.class_data_dir,
                          f"also concept {class_folders[class_folder]}'s, for class_prompt {first.class_prompt!r}; "
                          "give each class prompt a folder of its own")
        owner = instance_folders.get(class_folder)
        if owner is not None:
            whose = ("the --instance_data_dir" if concepts_list is None else
                     "its instance_data_dir" if owner == number else f"concept {owner}'s instance_data_dir")
            raise problem("class_data_dir", concept.class_data_dir,
                          f"also {whose}; generated class images would train as the subject, so give them a "
                          "folder of their own")


def _named(concepts_list: str | None, number: int, key: str, value: Any) -> str:
    """A concept's setting as errors name it: the single-concept flag, or the list file and concept."""
    if concepts_list is None:
        return f"--{key} {value}"
    return f"--concepts_list {concepts_list}, concept {number}: {key} {value}"


def _problem_of(concepts_list: str | None, number: int):
    """A maker of one-line errors about concept ``number``'s settings."""
    def problem(key: str, value: Any, text: str) -> DreamBoothError:
        return DreamBoothError(f"{_named(concepts_list, number, key, value)}: {text}")

    return problem


def compose_prompt(instance_prompt: str, caption: str | None) -> str:
    """The prompt of a captioned image. A caption holding ``{instance_prompt}`` gets the concept's
    prompt put in (without ``[filewords]``: the caption is the image's filewords); an instance prompt
    holding ``[filewords]`` gets the caption put in; otherwise the caption replaces the instance
    prompt. An image without a caption trains with the trigger phrase, the prompt that validation
    samples and the model card use."""
    if caption is None:
        return trigger_phrase(instance_prompt)
    if PROMPT_PLACEHOLDER in caption:
        return caption.replace(PROMPT_PLACEHOLDER, trigger_phrase(instance_prompt))
    if FILEWORDS in instance_prompt:
        return instance_prompt.replace(FILEWORDS, caption)
    return caption


def without_filewords(prompt: str) -> str:
    """``prompt`` for an image without a caption: the ``[filewords]`` placeholder taken out."""
    return " ".join(prompt.replace(FILEWORDS, " ").split()) if FILEWORDS in prompt else prompt


def trigger_phrase(prompt: str) -> str:
    """``prompt`` as a user would type it to get the subject: ``[filewords]`` taken out with the
    comma that joined it ('a photo of sks toy, [filewords]' -> 'a photo of sks toy')."""
    if FILEWORDS not in prompt:
        return prompt
    parts = (without_filewords(part) if FILEWORDS in part else part.strip() for part in prompt.split(","))
    return ", ".join(part for part in parts if part)


def _read_text(path: Path) -> str:
    try:
        # utf-8-sig: a byte-order mark (Windows Notepad's "UTF-8 with BOM") is not part of the caption.
        return path.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError:
        raise DreamBoothError(f"{path}: caption file is not UTF-8 text; re-save it as UTF-8") from None
    except OSError as error:
        raise DreamBoothError(f"{path}: cannot read it ({error.strerror or error}); check its permissions") from None


def metadata_captions(folder: Path, column: str) -> dict[str, str | None]:
    """Captions of an imagefolder-style ``metadata.jsonl``: {"file_name": ..., column: ...} per line."""
    file = folder / "metadata.jsonl"
    if not file.is_file():
        return {}
    captions = {}
    for number, line in enumerate(_read_text(file).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            caption = record[column]
            captions[Path(record["file_name"]).name] = None if caption is None else str(caption)
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise DreamBoothError(f"{file}, line {number}: needs 'file_name' and '{column}' ({error})") from None
    return captions


def clean_captions(captions: Sequence[str | None], names: Sequence[str], where: str) -> list[str | None]:
    """Captions as prompts take them: line breaks and runs of spaces become one space, and an empty
    caption is none, so its image gets the instance prompt, not the empty prompt of an unconditional
    sample (said once, naming the images)."""
    cleaned = [None if caption is None else " ".join(caption.split()) or None for caption in captions]
    empty = [name for name, caption, clean in zip(names, captions, cleaned) if caption is not None and clean is None]
    if empty:
        warn_once(f"{where}: {len(empty)} image(s) with an empty caption train with the instance prompt: "
                  f"{', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''}")
    return cleaned


def instance_examples(concept: Concept, number: int, caption_extension: str, caption_column: str) -> list[Example]:
    """The concept's images with their prompts (captions cleaned), repeated ``repeats`` times."""
    folder = Path(concept.instance_data_dir)
    from_metadata = metadata_captions(folder, caption_column)
    paths, captions = list_image_files(folder, "--instance_data_dir"), []
    for path in paths:
        named_like = (path.with_suffix(caption_extension), path.with_name(path.name + caption_extension))
        sidecars = [file for file in named_like if file.is_file()]
        captions.append(_read_text(sidecars[0]) if sidecars else from_metadata.get(path.name))
    captions = clean_captions(captions, [path.name for path in paths], f"--instance_data_dir {folder}")
    return [Example(path, compose_prompt(concept.instance_prompt, caption), number)
            for path, caption in zip(paths, captions)] * concept.repeats


def dataset_examples(name: str, image_column: str, caption_column: Optional[str], instance_prompt: str,
                     repeats: int = 1) -> list[Example]:
    """The images of a ``datasets`` dataset (a Hub name or a local folder, e.g. an imagefolder)."""
    dataset = load_image_dataset(name)
    columns = list(dataset.column_names)
    for flag, column in (("--image_column", image_column), ("--caption_column", caption_column)):
        if column is not None and column not in columns:
            raise DreamBoothError(f"--dataset_name {name}: no column '{column}' for {flag} "
                                  f"(columns: {', '.join(columns)})")
    captions = dataset[caption_column] if caption_column else [None] * len(dataset)
    captions = [None if caption is None else str(caption) for caption in captions]  # a label column holds numbers
    captions = clean_captions(captions, [f"row {row}" for row in range(len(captions))], f"--dataset_name {name}")
    return [Example(DatasetRow(dataset, row, image_column), compose_prompt(instance_prompt, caption), 0)
            for row, caption in enumerate(captions)] * repeats


def load_image_dataset(name: str) -> Any:
    import datasets

    try:
        loaded = datasets.load_dataset(name, split="train")
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DreamBoothError(f"--dataset_name {name}: cannot load it ({first})") from None
    if len(loaded) == 0:
        raise DreamBoothError(f"--dataset_name {name}: the train split is empty")
    return loaded


def build_dataset(cfg, data_seed: int) -> DreamBoothDataset:
    """Every concept's images with their prompts (captions applied), class images per concept."""
    concepts = cfg.concepts()
    if cfg.dataset_name:
        instances = dataset_examples(cfg.dataset_name, cfg.image_column, cfg.caption_column, cfg.instance_prompt,
                                     cfg.repeats)
    else:
        instances = [example for number, concept in enumerate(concepts) for example in
                     instance_examples(concept, number, cfg.caption_extension, cfg.caption_column or "text")]
    classes = None
    if cfg.with_prior_preservation:
        # The first num_class_images of the folder, as diffusers' script takes: a shared folder may hold more.
        classes = [examples_from_folder(concept.class_data_dir, concept.class_prompt, number,
                                        "--class_data_dir")[:concept.num_class_images]
                   for number, concept in enumerate(concepts)]
    if cfg.enable_bucket:
        instances = assign_buckets(instances, cfg.resolution)
        classes = [assign_buckets(examples, cfg.resolution) for examples in classes] if classes else None
    return DreamBoothDataset(instances, cfg.resolution, cfg.center_crop, cfg.random_flip, classes, data_seed,
                             cfg.caption_dropout)


def training_items(dataloader) -> DreamBoothDataset:
    """The dataset of a ``build_dataloader`` loader's items (under its bucket batches, if any)."""
    dataset = dataloader.dataset
    return dataset.items if isinstance(dataset, BucketBatches) else dataset


def build_dataloader(cfg, tokenizer, data_seed: int, pin_memory: bool = False):
    """The training batches of a ``TrainConfig``: bucketed, or a seeded shuffle of the dataset.
    ``pin_memory`` (for a CUDA device): batches in pinned memory, which a non-blocking copy to the
    GPU needs; a blocking one waits for every queued kernel first."""
    from torch.utils.data import DataLoader

    dataset = build_dataset(cfg, data_seed)
    # A frozen text encoder's prompts are all encoded before training: the batches need no tokens.
    needs_tokens = cfg.train_text_encoder or not cfg.pre_compute_text_embeddings
    # The loader draws its workers' base seed from this generator, not from the global one.
    common = dict(collate_fn=DreamBoothCollator(tokenizer if needs_tokens else None, cfg.tokenizer_max_length),
                  num_workers=cfg.dataloader_num_workers, generator=torch.Generator().manual_seed(data_seed),
                  pin_memory=pin_memory)
    if cfg.dataloader_num_workers:
        # Workers start once, not at every epoch (of a few steps): a start under spawn (macOS, Windows)
        # or forkserver re-imports torch and the project. The samplers give each index its epoch.
        common["persistent_workers"] = True
    if cfg.enable_bucket:
        common["collate_fn"] = OneBatch(common["collate_fn"])
        batches = BucketBatches(dataset, cfg.train_batch_size, data_seed)
        return DataLoader(batches, batch_size=1, sampler=EpochSampler(len(batches)), **common)
    return DataLoader(dataset, batch_size=cfg.train_batch_size, sampler=EpochShuffleSampler(len(dataset), data_seed),
                      **common)
