"""Subject and prompt fidelity of a DreamBooth model, measured as in the paper.

Ruiz et al., "DreamBooth", CVPR 2023, section 4.1 and table 1:

- DINO: mean pairwise cosine similarity of DINO ViT-S/16 embeddings between every generated
  image and every real subject image (subject fidelity; the CLS token of the last hidden state,
  each image prepared as DINO's own evaluation does: short side to 256, centre 224 x 224,
  ImageNet mean and std).
- CLIP-I: the same with CLIP image embeddings (each image prepared as CLIP's own transform does:
  short side to 224, centre 224 x 224, CLIP's mean and std).
- CLIP-T: cosine similarity of each generated image with its prompt in CLIP space (a plain
  cosine, not CLIPScore's 2.5 x max(cos, 0) nor x100), averaged over each prompt's images and
  then over the prompts, so that every prompt weighs the same however many images it has. The
  identifier is left out of the text: 'sks' is a rare token that means nothing to CLIP, so
  'a sks dog in the snow' is read as 'a dog in the snow'.
- PRES: prior preservation, the DINO similarity of class-prompt generations ('a dog in the snow',
  no identifier) to the real subject images. Lower is better: the class prior is kept.
- DIV: diversity, the mean pairwise DINO distance (1 - cosine) between the distinct generations of
  one prompt, averaged over prompts. The paper measures DIV with LPIPS; this is the DINO variant.
- Real images (table 1's last row): DINO and CLIP-I between the distinct real subject images.

The metric functions work on embeddings alone, so they can be checked against direct
computations; the encoders and the generation around them are for evaluate.py and for a small
fixed-seed evaluation during training (``evaluate_pipeline``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps
from PIL.PngImagePlugin import PngInfo
from tqdm.auto import tqdm

from .data import list_image_files, load_image
from .errors import DreamBoothError

logger = logging.getLogger(__name__)

PROMPTS_DIR = Path(__file__).resolve().parents[1] / "examples" / "prompts"
PROMPT_SETS = {"object": "dreambooth_object_prompts.txt", "live": "dreambooth_live_prompts.txt"}
METRICS = ("dino", "clip_i", "clip_t", "pres", "div")
METRIC_LABELS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "pres": "PRES", "div": "DIV"}
# Table 1 of the paper (mean over its 30 subjects and 25 prompts x 4 images each).
PAPER_REFERENCE = {
    "paper: DreamBooth (SD)": {"dino": 0.668, "clip_i": 0.803, "clip_t": 0.305},
    "paper: real images": {"dino": 0.774, "clip_i": 0.885},
}
DEFINITIONS = {
    "dino": "mean pairwise cosine of DINO embeddings (CLS token; short side resized to 256, centre 224 crop, "
            "ImageNet mean/std), generated x real subject images",
    "clip_i": "mean pairwise cosine of CLIP image embeddings (short side resized to 224, centre 224 crop, CLIP "
              "mean/std), generated x real subject images",
    "clip_t": "plain cosine (not x100, not CLIPScore) of CLIP image and prompt embeddings, identifier removed, "
              "averaged over each prompt's images, then over prompts",
    "pres": "mean pairwise DINO cosine, class-prompt generations x real subject images; lower is better",
    "div": "mean pairwise DINO distance (1 - cosine) within each prompt's generations (self-pairs excluded), "
           "averaged over prompts",
    "real_images": "DINO and CLIP-I between distinct real subject images (self-pairs excluded): the paper's "
                   "'real images' row for this subject",
}
EMBED_BATCH_SIZE = 32
SHEET_IMAGES_PER_PROMPT = 4


def read_templates(path: Path, flag: str) -> list[str]:
    """Prompt templates, one a line, ``{}`` where the subject goes; blank and # lines skipped."""
    from .generation import read_prompts

    templates = read_prompts(path, flag)
    for template in templates:
        if "{}" not in template:
            raise DreamBoothError(f"{flag}: prompt '{template}' has no {{}} where the subject goes")
    return templates


def check_encoder_source(name: str, flag: str) -> None:
    path = Path(name).expanduser()
    if path.exists() and not path.is_dir():
        raise DreamBoothError(f"{flag} {name}: not a folder; give a model folder or a Hub id")
    if not path.exists() and (name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1):
        raise DreamBoothError(f"{flag} {name}: no such folder")


# ---------------------------------------------------------------- metrics on embeddings


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every row of ``a`` with every row of ``b``."""
    return F.normalize(a.double(), dim=-1) @ F.normalize(b.double(), dim=-1).T


def subject_fidelity(generated: torch.Tensor, real: torch.Tensor) -> float:
    """DINO, CLIP-I and PRES: mean cosine over all (generated, real) pairs."""
    return cosine_matrix(generated, real).mean().item()


def prompt_fidelity(groups: Sequence[torch.Tensor], text_embeddings: torch.Tensor) -> float:
    """CLIP-T: the mean cosine of prompt p's images ``groups[p]`` with its text ``text_embeddings[p]``,
    averaged over the prompts (the paper's average over prompts; a mean over all images would weigh
    a prompt by its number of images)."""
    per_prompt = [cosine_matrix(images, text[None]).mean() for images, text in zip(groups, text_embeddings)]
    return torch.stack(per_prompt).mean().item()


def mean_similarity_within(embeddings: torch.Tensor) -> float | None:
    """Mean cosine over the pairs of distinct rows (an image with itself is no pair); None with
    fewer than two rows."""
    count = len(embeddings)
    if count < 2:
        return None
    similarities = cosine_matrix(embeddings, embeddings)
    return (similarities.sum() - similarities.diagonal().sum()).item() / (count * (count - 1))


def diversity(groups: Sequence[torch.Tensor]) -> float | None:
    """DIV: mean pairwise distance (1 - cosine) within each group, averaged over the groups of
    two or more; None when no group has two."""
    per_group = [1.0 - similarity for similarity in map(mean_similarity_within, groups) if similarity is not None]
    return sum(per_group) / len(per_group) if per_group else None


# ---------------------------------------------------------------- encoders


def _batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def prepare_images(images: Sequence[Image.Image], short_side: int, crop: int, mean: Sequence[float],
                   std: Sequence[float]) -> torch.Tensor:
    """RGB images as a (N, 3, crop, crop) batch, exactly as torchvision's Resize(short_side, bicubic),
    CenterCrop(crop), ToTensor and Normalize(mean, std) make it: the reference transforms of DINO
    and CLIP. transformers' processors differ: facebook/dino-vits16's squashes to a square, and CLIP's
    crops a pixel off-centre where the margin is odd and, with torchvision installed, resamples
    otherwise; the same images must score the same wherever they are scored."""
    mean, std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    rows = []
    for image in images:
        width, height = image.size
        if width <= height:
            size = (short_side, int(short_side * height / width))
        else:
            size = (int(short_side * width / height), short_side)
        resized = image.convert("RGB").resize(size, Image.BICUBIC)
        left, top = int(round((size[0] - crop) / 2.0)), int(round((size[1] - crop) / 2.0))
        pixels = torch.from_numpy(np.asarray(resized.crop((left, top, left + crop, top + crop)), dtype=np.float32))
        rows.append((pixels.permute(2, 0, 1) / 255.0 - mean) / std)
    return torch.stack(rows)


# DINO's own evaluation transform (facebookresearch/dino eval_linear.py; DINOv2 and public DreamBooth
# metric code use it too): the short side resized to 256/224 of the crop, the centre crop, and the
# ImageNet mean/std DINO was trained with. The Hub's facebook/dino-vits16 processor instead squashes
# every image to 224x224 (a 4:3 photo of the subject comes out distorted) and normalises with mean
# 0.5, std 0.5, which DINO never saw; only its size is read.
DINO_MEAN = (0.485, 0.456, 0.406)
DINO_STD = (0.229, 0.224, 0.225)


def dino_short_side(crop: int) -> int:
    return int(256 * crop / 224)


def _processor_size(processor, config) -> int:
    """The square a model's processor feeds it (its centre crop, else its resize), else the model's size."""
    size = processor.crop_size if getattr(processor, "do_center_crop", False) else getattr(processor, "size", None)
    size = dict(size or {})
    return int(size.get("height") or size.get("shortest_edge") or config.image_size)


class DinoEncoder:
    """Image embeddings of a self-supervised ViT: the CLS token of the last hidden state (after the
    final layer norm), as DINO's own evaluation uses it; ViTModel's pooler is not part of DINO.
    Images are prepared as DINO's evaluation does."""

    def __init__(self, name: str, device: torch.device):
        from transformers import AutoImageProcessor, AutoModel

        config = _load_config(name, "--dino_model")
        if hasattr(config, "text_config"):
            raise DreamBoothError(f"--dino_model {name}: a text-image model ({config.model_type}); give an image "
                                  "model such as facebook/dino-vits16")
        extra = {"add_pooling_layer": False} if config.model_type == "vit" else {}
        self.name, self.device = name, device
        self.model = _load(name, "--dino_model", AutoModel.from_pretrained, **extra).to(device).eval()
        self.crop = _processor_size(_load(name, "--dino_model", AutoImageProcessor.from_pretrained), config)

    def preprocessing(self) -> str:
        return (f"short side resized to {dino_short_side(self.crop)} (bicubic), centre {self.crop} x {self.crop} "
                "crop, ImageNet mean/std")

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image], batch_size: int = EMBED_BATCH_SIZE) -> torch.Tensor:
        rows = []
        for batch in _batches(list(images), batch_size):
            pixels = prepare_images(batch, dino_short_side(self.crop), self.crop, DINO_MEAN, DINO_STD)
            hidden = self.model(pixel_values=pixels.to(self.device, self.model.dtype)).last_hidden_state
            rows.append(hidden[:, 0].float().cpu())
        return F.normalize(torch.cat(rows), dim=-1)


class ClipEncoder:
    """CLIP's projected image and text features (get_image_features / get_text_features), L2-normalised;
    images prepared as CLIP's own transform does (short side to the crop size, bicubic, centre crop,
    the processor's mean/std)."""

    def __init__(self, name: str, device: torch.device):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        config = _load_config(name, "--clip_model")
        if config.model_type != "clip":
            raise DreamBoothError(f"--clip_model {name}: a '{config.model_type}' model, not CLIP; "
                                  "give one such as openai/clip-vit-base-patch32")
        self.name, self.device = name, device
        self.model = _load(name, "--clip_model", CLIPModel.from_pretrained).to(device).eval()
        processor = _load(name, "--clip_model", AutoImageProcessor.from_pretrained)
        self.crop = _processor_size(processor, config.vision_config)
        self.mean, self.std = tuple(processor.image_mean), tuple(processor.image_std)
        self.tokenizer = _load(name, "--clip_model", AutoTokenizer.from_pretrained)
        self.max_length = min(self.tokenizer.model_max_length, config.text_config.max_position_embeddings)

    def preprocessing(self) -> str:
        return (f"short side resized to {self.crop} (bicubic), centre {self.crop} x {self.crop} crop, "
                "the model's mean/std")

    def variant(self) -> str:
        vision = self.model.config.vision_config
        return (f"{self.name} (ViT, patch {vision.patch_size}, {vision.image_size} px, "
                f"{self.model.config.projection_dim}-d embeddings)")

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image], batch_size: int = EMBED_BATCH_SIZE) -> torch.Tensor:
        rows = []
        for batch in _batches(list(images), batch_size):
            pixels = prepare_images(batch, self.crop, self.crop, self.mean, self.std)
            rows.append(_features(self.model.get_image_features(pixel_values=pixels.to(self.device))))
        return F.normalize(torch.cat(rows), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str], batch_size: int = EMBED_BATCH_SIZE) -> torch.Tensor:
        rows = []
        for batch in _batches(list(texts), batch_size):
            tokens = self.tokenizer(list(batch), padding=True, truncation=True, max_length=self.max_length,
                                    return_tensors="pt").to(self.device)
            rows.append(_features(self.model.get_text_features(**tokens)))
        return F.normalize(torch.cat(rows), dim=-1)


def _features(output) -> torch.Tensor:
    """transformers 4 returns the projected features; 5 wraps them in an output's pooler_output."""
    if not torch.is_tensor(output):
        output = output.pooler_output
    return output.float().cpu()


def _load_hint(name: str, flag: str) -> str:
    if Path(name).expanduser().is_dir():
        return f"give {flag} a transformers model folder (config.json and weights)"
    return (f"the default models need one download with network access (then they are cached), "
            f"or point {flag} at a local folder")


def _load_config(name: str, flag: str):
    from transformers import AutoConfig

    return _load(name, flag, AutoConfig.from_pretrained)


def _load(name: str, flag: str, loader, **kwargs):
    try:
        return loader(name, **kwargs)
    except (OSError, ValueError, KeyError) as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = lines[0] if lines else type(error).__name__
        raise DreamBoothError(f"{flag} {name}: cannot be loaded ({reason}); {_load_hint(name, flag)}") from None


@dataclasses.dataclass
class Encoders:
    dino: DinoEncoder
    clip: ClipEncoder


def load_encoders(dino_model: str, clip_model: str, device: torch.device) -> Encoders:
    """The DINO and CLIP models, in fp32 (they are small, and the metrics are cosines)."""
    return Encoders(DinoEncoder(dino_model, device), ClipEncoder(clip_model, device))


# ---------------------------------------------------------------- generations


@dataclasses.dataclass
class Generation:
    image: Image.Image
    prompt: str
    seed: Optional[int] = None
    subject: bool = True  # False: a class prompt without the identifier, scored by PRES


def mentions(prompt: str, identifier: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(identifier)}(?!\w)", prompt) is not None


def without_identifier(prompt: str, identifier: str) -> str:
    """The prompt CLIP-T scores against: 'a sks dog in the snow' -> 'a dog in the snow'."""
    return " ".join(re.sub(rf"(?<!\w){re.escape(identifier)}(?!\w)", " ", prompt).split())


def generate_evaluation_set(pipeline, templates: Sequence[str], identifier: str, class_noun: str,
                            num_images_per_prompt: int = 4, seed: int = 0, resolution: int | None = None,
                            num_inference_steps: int = 25, guidance_scale: float = 7.5, batch_size: int = 4,
                            with_class_prompts: bool = True, progress: bool = True, state=None) -> list[Generation]:
    """K images per subject prompt ('a sks dog in the snow') and, for PRES, per class prompt
    ('a dog in the snow'), with the same seeds: image j of every prompt uses seed + j.

    Under `accelerate launch` (``state``, an accelerate PartialState of several processes) the
    batches are dealt out among the processes, each drawing its own on its own device, and every
    process gets all the generations back, in the order one process draws them: the same images."""
    from .generation import generate, native_size, shared_out

    size = resolution or native_size(pipeline)
    prompts = [(template.replace("{}", f"{identifier} {class_noun}"), True) for template in templates]
    if with_class_prompts:
        prompts += [(template.replace("{}", class_noun), False) for template in templates]
    seeds = [seed + j for j in range(num_images_per_prompt)]
    jobs = [(prompt, subject, batch) for prompt, subject in prompts for batch in _batches(seeds, batch_size)]
    helper = state is not None and state.num_processes > 1 and not state.is_local_main_process

    def draw(mine: list) -> list[list[Generation]]:
        made = []
        with tqdm(total=sum(len(batch) for _, _, batch in mine), desc="Generating", unit="img",
                  disable=not progress or helper) as bar:
            for prompt, subject, batch in mine:
                images = generate(pipeline, prompt, batch, size, size, num_inference_steps, guidance_scale)
                made.append([Generation(image, prompt, s, subject) for s, image in zip(batch, images)])
                bar.update(len(batch))
        return made

    return [generation for generations in shared_out(jobs, state, draw) for generation in generations]


def save_generations(generations: Sequence[Generation], folder: Path) -> Path:
    """PNGs with their prompt and seed in the text metadata, and a prompts.json listing them, so
    that ``--generated_dir`` scores the folder again."""
    from .generation import save_png_atomically

    folder.mkdir(parents=True, exist_ok=True)
    entries, numbers = [], defaultdict(int)
    for item in generations:
        kind = "subject" if item.subject else "class"
        name = f"{kind}-{numbers[kind]:04d}-seed{item.seed}.png"
        numbers[kind] += 1
        info = PngInfo()
        info.add_text("prompt", item.prompt)
        info.add_text("seed", str(item.seed))
        save_png_atomically(item.image, folder, lambda _, name=name: name, info)
        entries.append({"file": name, "prompt": item.prompt, "seed": item.seed})
    (folder / "prompts.json").write_text(json.dumps(entries, indent=1), encoding="utf-8")
    return folder


def read_generated_dir(folder: str | Path, identifier: str) -> list[Generation]:
    """The images of a folder with their prompts, from prompts.json ([{"file", "prompt"}, ...] or
    {file: prompt}) or else each PNG's 'prompt' text (infer.py's). Prompts without the identifier
    are class prompts. infer.py's grids and other images without a prompt are skipped."""
    folder, flag = Path(folder), "--generated_dir"
    listing = folder / "prompts.json"
    if listing.is_file():
        entries = _read_prompts_json(listing)
    else:
        entries = [(path.name, *_png_prompt_and_seed(path)) for path in list_image_files(folder, flag)]
        unlabeled = [name for name, prompt, _ in entries if prompt is None and not name.endswith("-grid.png")]
        if unlabeled:
            logger.warning("%s %s: skipping %d image(s) without a prompt (e.g. %s); a prompts.json names them",
                           flag, folder, len(unlabeled), unlabeled[0])
    generations = []
    for name, prompt, seed in entries:
        if prompt is None:
            continue
        if not (folder / name).is_file():
            raise DreamBoothError(f"{flag} {folder}: prompts.json names {name}, which is not in the folder")
        generations.append(Generation(load_image(folder / name), prompt, seed, mentions(prompt, identifier)))
    if not any(item.subject for item in generations):
        raise DreamBoothError(f"{flag} {folder}: no image with a prompt naming the identifier '{identifier}' "
                              "(prompts come from prompts.json or the PNGs' 'prompt' metadata)")
    return generations


def _read_prompts_json(path: Path) -> list[tuple[str, str, Optional[int]]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            return [(str(name), str(prompt), None) for name, prompt in data.items()]
        return [(str(entry["file"]), str(entry["prompt"]), entry.get("seed")) for entry in data]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise DreamBoothError(f"{path}: expected [{{\"file\": ..., \"prompt\": ...}}, ...] or "
                              "{\"file name\": \"prompt\"}") from None


def _png_prompt_and_seed(path: Path) -> tuple[Optional[str], Optional[int]]:
    """infer.py's 'prompt' and 'seed' text fields, or the first line of a web UI's 'parameters'."""
    try:
        with Image.open(path) as image:
            text = dict(getattr(image, "text", {}) or {})
    except (OSError, SyntaxError, ValueError) as error:  # PIL's UnidentifiedImageError is an OSError
        raise DreamBoothError(f"--generated_dir: {path}: cannot read it as an image ({error}); "
                              "remove or replace it") from None
    prompt = text.get("prompt") or (text["parameters"].splitlines()[0] if text.get("parameters") else None)
    seed = text.get("seed", "")
    return prompt, int(seed) if seed.lstrip("-").isdigit() else None


# ---------------------------------------------------------------- scoring


def score(generations: Sequence[Generation], real_images: Sequence[Image.Image], encoders: Encoders,
          identifier: str) -> dict[str, float | None]:
    """DINO, CLIP-I, CLIP-T, PRES and DIV of the generations (PRES None without class prompts,
    DIV None without two images of one prompt)."""
    subject = [item for item in generations if item.subject]
    class_images = [item.image for item in generations if not item.subject]
    if not subject or not real_images:
        raise DreamBoothError("scoring needs subject generations and real subject images")
    real_dino = encoders.dino.embed_images(real_images)
    dino = encoders.dino.embed_images([item.image for item in subject])
    clip_images = encoders.clip.embed_images([item.image for item in subject])
    groups = defaultdict(list)
    for index, item in enumerate(subject):
        groups[item.prompt].append(index)
    texts = encoders.clip.embed_texts([without_identifier(prompt, identifier) for prompt in groups])
    return {
        "dino": subject_fidelity(dino, real_dino),
        "clip_i": subject_fidelity(clip_images, encoders.clip.embed_images(real_images)),
        "clip_t": prompt_fidelity([clip_images[indices] for indices in groups.values()], texts),
        "pres": subject_fidelity(encoders.dino.embed_images(class_images), real_dino) if class_images else None,
        "div": diversity([dino[indices] for indices in groups.values()]),
    }


def score_real_images(real_images: Sequence[Image.Image], encoders: Encoders) -> dict[str, float | None]:
    """The paper's 'real images' row for this subject: DINO and CLIP-I between its distinct real
    images, what other photos of the subject score (None with one image)."""
    return {"dino": mean_similarity_within(encoders.dino.embed_images(real_images)),
            "clip_i": mean_similarity_within(encoders.clip.embed_images(real_images))}


def evaluate_pipeline(pipeline, encoders: Encoders | None, real_images: Sequence[Image.Image], templates: Sequence[str],
                      identifier: str, class_noun: str, **generation) -> tuple[dict | None, list[Generation]]:
    """Generate the evaluation set with ``pipeline`` and score it: what a training loop calls every
    N steps with a few templates, a fixed seed and encoders loaded once. With several processes
    (``state`` in ``generation``) each draws its share; a process without ``encoders`` draws only
    (the metrics None)."""
    generations = generate_evaluation_set(pipeline, templates, identifier, class_noun, **generation)
    return (None if encoders is None else score(generations, real_images, encoders, identifier)), generations


def load_real_images(folder: str | Path) -> list[Image.Image]:
    return [load_image(path) for path in list_image_files(folder, "--instance_data_dir")]


# ---------------------------------------------------------------- report


def format_table(metrics: dict[str, float | None], real: dict[str, float | None] | None = None) -> str:
    """This model's row, with ``real`` (``score_real_images``) the subject's real images' row, and the paper's."""
    rows = [("this model", metrics), *([("your real images", real)] if real else []), *PAPER_REFERENCE.items()]
    width = max(len(name) for name, _ in rows)
    lines = [" " * width + "".join(f"{METRIC_LABELS[key]:>8}" for key in METRICS)]
    for name, values in rows:
        cells = "".join(f"{values[key]:8.3f}" if values.get(key) is not None else f"{'-':>8}" for key in METRICS)
        lines.append(f"{name:<{width}}{cells}")
    lines.append("Higher is better except PRES. CLIP-T is the plain cosine (identifier removed from the prompt), "
                 "averaged within a prompt, then over prompts; DIV is the mean pairwise DINO distance (1 - cos) "
                 "within a prompt, averaged over prompts.")
    return "\n".join(lines)


def contact_sheet(generations: Sequence[Generation], per_prompt: int = SHEET_IMAGES_PER_PROMPT,
                  thumb: int = 128, label_height: int = 16) -> Image.Image:
    """One row per prompt, in order: its prompt as a label above its first ``per_prompt`` images."""
    from .generation import fit_text

    rows: dict[str, list[Image.Image]] = {}
    for item in generations:
        rows.setdefault(item.prompt, []).append(item.image)
    columns = min(per_prompt, max(len(images) for images in rows.values()))
    row_height = label_height + thumb
    sheet = Image.new("RGB", (columns * thumb, len(rows) * row_height), "white")
    draw = ImageDraw.Draw(sheet)
    for number, (prompt, images) in enumerate(rows.items()):
        top = number * row_height
        draw.text((2, top + 2), fit_text(draw, prompt, columns * thumb - 4), fill="black")
        for column, image in enumerate(images[:columns]):
            sheet.paste(ImageOps.fit(image, (thumb, thumb)), (column * thumb, top + label_height))
    return sheet


def _rounded(metrics: dict[str, float | None]) -> dict[str, float | None]:
    return {key: (None if value is None or math.isnan(value) else round(value, 6)) for key, value in metrics.items()}


def write_report(output_dir: str | Path, metrics: dict, generations: Sequence[Generation], description: dict,
                 real: dict | None = None) -> Path:
    """metrics.json (metrics, the real images' row ``real``, definitions, paper rows and
    ``description``: models, counts, seeds) and contact_sheet.png; returns the JSON's path."""
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    report = {
        "metrics": _rounded(metrics),
        **({"real_images": _rounded(real)} if real else {}),
        "definitions": DEFINITIONS,
        "paper_reference": PAPER_REFERENCE,
        **description,
    }
    path = output / "metrics.json"
    path.write_text(json.dumps(report, indent=2), encoding="utf-8")
    contact_sheet(generations).save(output / "contact_sheet.png")
    return path


def describe_run(cfg, encoders: Encoders, generations: Sequence[Generation],
                 real_count: int) -> dict:
    """What metrics.json records about the run besides the numbers."""
    subject_prompts = list(dict.fromkeys(item.prompt for item in generations if item.subject))
    class_prompts = list(dict.fromkeys(item.prompt for item in generations if not item.subject))
    models = {"generated_dir": cfg.generated_dir} if cfg.generated_dir else {
        "pipeline": cfg.model_source().base_model(), "checkpoint": cfg.checkpoint, "lora": list(cfg.lora),
        "lora_scale": list(cfg.lora_scale), "lora_revision": list(cfg.lora_revision),
    }
    return {
        "models": {
            **models,
            "dino": encoders.dino.name, "dino_embedding": "CLS token of the last hidden state",
            "dino_preprocessing": encoders.dino.preprocessing(),
            "clip": encoders.clip.name, "clip_variant": encoders.clip.variant(),
            "clip_embedding": "get_image_features / get_text_features, L2-normalised",
            "clip_preprocessing": encoders.clip.preprocessing(),
        },
        "counts": {
            "subject_prompts": len(subject_prompts), "class_prompts": len(class_prompts),
            "subject_images": sum(item.subject for item in generations),
            "class_images": sum(not item.subject for item in generations), "real_images": real_count,
        },
        "seeds": {"seed": cfg.seed, "rule": "image j of every prompt uses seed + j",
                  "used": sorted({item.seed for item in generations if item.seed is not None})},
        "generation": None if cfg.generated_dir else {
            "num_images_per_prompt": cfg.num_images_per_prompt, "num_inference_steps": cfg.num_inference_steps,
            "guidance_scale": cfg.guidance_scale, "scheduler": cfg.scheduler,
            "image_size": list(generations[0].image.size),
        },
        "identifier": cfg.identifier, "class_noun": cfg.class_noun,
        "prompts": subject_prompts, "class_prompts": class_prompts,
    }
