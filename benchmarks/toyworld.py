"""A toy world where DreamBooth can be measured without downloading a model.

The world: 32x32 pictures of one shape (circle, square, triangle) in one colour (red,
green, blue, yellow) on one background (white, black, gray), captioned like "a photo of
a red circle on a white background". Captions vary their wording and leave attributes
out ("a picture of the nice circle"), so that a word before the noun may say nothing and
"a photo of a circle" means any circle. A hand-written pixel measure (``describe``)
reads the attributes back from any image.

``pretrain`` trains a small model of the Stable Diffusion architecture (AutoencoderKL,
UNet2DConditionModel, CLIP text encoder, a word-level CLIP tokenizer) from scratch on the
world and writes it as a diffusers pipeline; the copy in tests/fixtures/toyworld-sd was
made with the defaults below (seed 0). ``accuracy`` measures whether captions control the
pictures. ``study`` runs DreamBooth with the real train_dreambooth.py on a subject the
world never shows (a circle, left half red and right half blue) and measures subject
fidelity, prior preservation and recontextualisation, with and without
--with_prior_preservation, over several seeds.

    python benchmarks/toyworld.py pretrain toyworld-sd              # ~30 min on 2 CPU cores
    python benchmarks/toyworld.py accuracy tests/fixtures/toyworld-sd
    python benchmarks/toyworld.py study tests/fixtures/toyworld-sd --output study.json   # 5 seeds, ~27 min
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SIZE = 32
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 205, 40)}
BACKGROUNDS = {"white": (240, 240, 240), "black": (20, 20, 20), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
# Words that never change the picture: they teach the text encoder that the word before the
# noun may carry nothing, the slot where DreamBooth's identifier goes.
FILLERS = ("nice", "lovely", "simple", "plain", "neat", "fine", "good", "cool", "my", "this")
OPENINGS = ("a photo of", "a picture of", "an image of", "a drawing of")
ARTICLES = ("a", "the", "one")
# Tokens in the vocabulary that pretraining never shows, for identifiers ("sks").
RARE_WORDS = ("sks", "zwx", "ohwx", "qlp")

SUBJECT_SHAPE = "circle"
SUBJECT_COLOURS = ("red", "blue")  # left half, right half


# ---------------------------------------------------------------- drawing


Colour = Union[str, tuple[int, int, int]]  # a palette name or RGB


def rgb(colour: Colour) -> tuple[int, int, int]:
    return COLOURS.get(colour) or BACKGROUNDS.get(colour) if isinstance(colour, str) else colour


@dataclass(frozen=True)
class Picture:
    shape: str
    colour: Colour
    background: Colour
    size: float  # side or diameter, pixels
    cx: float
    cy: float
    two_tone: tuple[Colour, Colour] | None = None  # the subject: left and right halves (top and bottom
    split_vertically: bool = True  # with split_vertically=False)


def _shape_mask(shape: str, size: float, cx: float, cy: float, resolution: int) -> np.ndarray:
    """Boolean mask of ``shape`` on a ``resolution`` grid whose unit is one output pixel / scale."""
    scale = resolution / SIZE
    ys, xs = (np.mgrid[0:resolution, 0:resolution] + 0.5) / scale
    half = size / 2
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= half**2
    if shape == "square":
        return (np.abs(xs - cx) <= half) & (np.abs(ys - cy) <= half)
    if shape == "triangle":  # apex up, base at the bottom, width = height = size
        top, bottom = cy - half, cy + half
        inside_height = (ys >= top) & (ys <= bottom)
        half_width = (ys - top) / size * half
        return inside_height & (np.abs(xs - cx) <= half_width)
    raise ValueError(f"unknown shape {shape}")


def draw(picture: Picture, supersample: int = 4) -> Image.Image:
    """The picture, anti-aliased by drawing at ``supersample`` x the size and averaging."""
    resolution = SIZE * supersample
    canvas = np.empty((resolution, resolution, 3), dtype=np.float32)
    canvas[:] = rgb(picture.background)
    mask = _shape_mask(picture.shape, picture.size, picture.cx, picture.cy, resolution)
    if picture.two_tone:
        ys, xs = (np.mgrid[0:resolution, 0:resolution] + 0.5) / supersample
        first = xs < picture.cx if picture.split_vertically else ys < picture.cy
        canvas[mask & first] = rgb(picture.two_tone[0])
        canvas[mask & ~first] = rgb(picture.two_tone[1])
    else:
        canvas[mask] = rgb(picture.colour)
    small = canvas.reshape(SIZE, supersample, SIZE, supersample, 3).mean(axis=(1, 3))
    return Image.fromarray(np.round(small).astype(np.uint8))


def random_picture(rng: np.random.Generator, **fixed) -> Picture:
    size = float(rng.uniform(15, 23))
    margin = size / 2 + 2
    values = dict(
        shape=SHAPES[rng.integers(len(SHAPES))],
        colour=list(COLOURS)[rng.integers(len(COLOURS))],
        background=list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
        size=size,
        cx=float(rng.uniform(margin, SIZE - margin)),
        cy=float(rng.uniform(margin, SIZE - margin)),
    )
    values.update(fixed)
    return Picture(**values)


def subject_picture(rng: np.random.Generator, background: str = "white", shape: str = SUBJECT_SHAPE,
                    colours: tuple[str, str] = SUBJECT_COLOURS) -> Picture:
    return random_picture(rng, shape=shape, colour=colours[0], background=background, two_tone=colours)


def any_picture(rng: np.random.Generator) -> Picture:
    """A flat-colour picture outside the world: any RGB colours, half of them split in two
    halves. The VAE learns from these too, as Stable Diffusion's VAE saw far more than the
    captioned data, so that it can encode pictures the world never shows (the subject)."""
    def any_rgb():
        return tuple(int(v) for v in rng.integers(0, 256, size=3))

    two_tone = (any_rgb(), any_rgb()) if rng.random() < 0.5 else None
    return random_picture(rng, colour=any_rgb(), background=any_rgb(), two_tone=two_tone,
                          split_vertically=bool(rng.random() < 0.5))


def caption(picture: Picture, rng: np.random.Generator, drop_attribute: float = 0.3) -> str:
    """A varied caption: opening, optional article and filler, optional colour, the shape,
    optional background."""
    words = [OPENINGS[rng.integers(len(OPENINGS))]]
    if rng.random() < 0.8:
        words.append(ARTICLES[rng.integers(len(ARTICLES))])
    if rng.random() < 0.4:
        words.append(FILLERS[rng.integers(len(FILLERS))])
    if rng.random() >= drop_attribute:
        words.append(picture.colour)
    words.append(picture.shape)
    if rng.random() >= drop_attribute:
        words.append(f"on a {picture.background} background")
    return " ".join(words)


def vocabulary_words() -> list[str]:
    words = {"on", "background", *COLOURS, *BACKGROUNDS, *SHAPES, *FILLERS, *ARTICLES, *RARE_WORDS}
    for opening in OPENINGS:
        words.update(opening.split())
    return sorted(words)


# ---------------------------------------------------------------- measuring


@dataclass(frozen=True)
class Description:
    background: str
    colour: str | None
    shape: str | None
    signature: float  # 1: the subject's left-red, right-blue halves; 0: one colour


def _nearest(value: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    return min(palette, key=lambda name: float(np.sum((value - np.array(palette[name])) ** 2)))


def _template_masks(x0: int, y0: int, x1: int, y1: int) -> dict[str, np.ndarray]:
    size = max(x1 - x0, y1 - y0) + 1
    cx, cy = (x0 + x1 + 1) / 2, (y0 + y1 + 1) / 2
    return {shape: _shape_mask(shape, size, cx, cy, SIZE) for shape in SHAPES}


def describe(image: Image.Image, subject_colours: tuple[str, str] = SUBJECT_COLOURS) -> Description:
    """Read background, colour, shape and the subject signature back from a picture.

    Background: median colour of the 2-pixel border. Object: pixels further than 80 (RGB
    distance) from it. Colour: nearest palette colour to the object's median. Shape: the
    template (circle, square, triangle fitted to the object's bounding box) with the highest
    IoU. Signature: the difference of the object's left- and right-half mean colours,
    projected on red - blue and scaled so that the subject scores 1."""
    pixels = np.asarray(image.convert("RGB").resize((SIZE, SIZE)), dtype=np.float32)
    border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                             pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    background_colour = np.median(border, axis=0)
    background = _nearest(background_colour, BACKGROUNDS)
    mask = np.linalg.norm(pixels - background_colour, axis=-1) > 80
    if mask.sum() < 12:
        return Description(background, None, None, 0.0)
    colour = _nearest(np.median(pixels[mask], axis=0), COLOURS)
    ys, xs = np.nonzero(mask)
    x0, x1 = np.percentile(xs, [1, 99]).round().astype(int)
    y0, y1 = np.percentile(ys, [1, 99]).round().astype(int)
    templates = _template_masks(x0, y0, x1, y1)
    iou = {shape: (mask & t).sum() / max((mask | t).sum(), 1) for shape, t in templates.items()}
    shape = max(iou, key=iou.get)
    centre = xs.mean()
    left, right = pixels[mask & (np.arange(SIZE)[None, :] < centre)], pixels[mask & (np.arange(SIZE)[None, :] >= centre)]
    signature = 0.0
    if len(left) and len(right):
        axis = np.array(COLOURS[subject_colours[0]], dtype=np.float32) - np.array(COLOURS[subject_colours[1]])
        signature = float((left.mean(0) - right.mean(0)) @ axis / (axis @ axis))
    return Description(background, colour, shape, signature)


def summarise(descriptions: Sequence[Description], expected: dict[str, str] | None = None) -> dict:
    """Mean signature, share of subject-like images (signature > 0.5), and attribute
    accuracies against ``expected`` ({"shape": "circle", ...})."""
    signatures = np.array([d.signature for d in descriptions])
    summary = {"n": len(descriptions), "signature": float(signatures.mean()),
               "subject_share": float((signatures > 0.5).mean())}
    for attribute, value in (expected or {}).items():
        summary[f"{attribute}_accuracy"] = float(np.mean([getattr(d, attribute) == value for d in descriptions]))
    for attribute in ("colour", "background", "shape"):
        values = [getattr(d, attribute) for d in descriptions]
        summary[f"{attribute}_counts"] = {name: values.count(name) for name in sorted(set(map(str, values)))}
    return summary


# ---------------------------------------------------------------- the model


def build_tokenizer(folder: Path, max_length: int = 16):
    """A CLIP tokenizer whose words are single tokens: BPE merges that build each word of the
    world (and the rare identifiers) letter by letter. Other words split into letters."""
    from transformers import CLIPTokenizer

    from dreambooth.tiny_model import tiny_vocabulary

    vocab = tiny_vocabulary()
    merges: list[str] = []

    def add(token: str) -> None:
        if token not in vocab:
            vocab[token] = len(vocab)

    for word in vocabulary_words():
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            add(pieces[0])
    folder.mkdir(parents=True, exist_ok=True)
    for _ in range(10):  # BPE applies merges by rank across words: add the merges a word still needs
        (folder / "vocab.json").write_text(json.dumps(vocab))
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
        tokenizer = CLIPTokenizer.from_pretrained(str(folder), model_max_length=max_length)
        broken = [w for w in vocabulary_words() if len(tokenizer.tokenize(w)) != 1]
        if not broken:
            return tokenizer
        for word in broken:
            pieces = tokenizer.tokenize(word)
            while len(pieces) > 1:
                merges.append(f"{pieces[0]} {pieces[1]}")
                pieces = [pieces[0] + pieces[1]] + pieces[2:]
                add(pieces[0])
    raise RuntimeError(f"words that do not tokenize to one token: {broken}")


def build_components(tokenizer, seed: int = 0) -> dict:
    """Stable Diffusion's architecture, small: a 3-level VAE (32 px -> 8x8x4 latents), a 2-level
    UNet with cross-attention at both levels, a 2-layer CLIP text encoder (width 64)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        sample_size=SIZE, in_channels=3, out_channels=3, block_out_channels=(16, 32, 64), layers_per_block=1,
        norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
    )
    unet = UNet2DConditionModel(
        sample_size=SIZE // 4, in_channels=4, out_channels=4, block_out_channels=(64, 128), layers_per_block=1,
        norm_num_groups=16, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64, attention_head_dim=8,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=64,
    ))
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False, steps_offset=1)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def _to_tensor(images: Sequence[Image.Image]):
    import torch

    from dreambooth.data import image_to_tensor

    return torch.stack([image_to_tensor(image, SIZE, center_crop=True, random_flip=False) for image in images])


def _cosine_lr(step: int, total: int, peak: float, warmup: int = 200) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def train_vae(vae, rng: np.random.Generator, steps: int, batch_size: int = 32, lr: float = 1e-3) -> float:
    """Reconstruction (MSE) plus a small KL term, as Stable Diffusion's VAE without its
    perceptual and adversarial losses. Returns the final reconstruction MSE."""
    import torch

    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    recent = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = _cosine_lr(step, steps, lr, warmup=50)
        images = _to_tensor([draw(random_picture(rng) if i % 2 else any_picture(rng)) for i in range(batch_size)])
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        mse = torch.nn.functional.mse_loss(reconstruction, images)
        loss = mse + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        recent = (recent + [mse.item()])[-50:]
        if step % 100 == 0 or step == steps - 1:
            print(f"vae step {step}/{steps} mse {np.mean(recent):.5f}", flush=True)
    return float(np.mean(recent))


def reconstruction_error(vae, pictures: Sequence[Picture]) -> float:
    """Mean squared error (images in [-1, 1]) of encoding and decoding ``pictures``."""
    import torch

    images = _to_tensor([draw(p) for p in pictures])
    with torch.no_grad():
        decoded = vae.decode(vae.encode(images).latent_dist.mean).sample
    return float(torch.nn.functional.mse_loss(decoded, images))


def encode_world(vae, pictures: Sequence[Picture], batch_size: int = 256):
    """Posterior mean and std of every picture's latent."""
    import torch

    means, stds = [], []
    with torch.no_grad():
        for start in range(0, len(pictures), batch_size):
            posterior = vae.encode(_to_tensor([draw(p) for p in pictures[start:start + batch_size]])).latent_dist
            means.append(posterior.mean)
            stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def train_unet(components: dict, pictures: Sequence[Picture], means, stds, rng: np.random.Generator, steps: int,
               batch_size: int = 64, lr: float = 1e-3, caption_dropout: float = 0.1) -> list[float]:
    """UNet and text encoder from scratch: epsilon prediction with Min-SNR-5 weights (the
    suite's own loss), captions drawn afresh each step, 10% empty for classifier-free guidance."""
    import torch

    from dreambooth.training import dreambooth_loss, min_snr_weights

    unet, text_encoder, tokenizer, scheduler = (components[k] for k in ("unet", "text_encoder", "tokenizer", "scheduler"))
    scaling = components["vae"].config.scaling_factor
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=1e-2)
    generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
    token_cache: dict[str, list[int]] = {}
    losses, recent, started = [], [], time.time()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = _cosine_lr(step, steps, lr)
        index = torch.from_numpy(rng.integers(len(pictures), size=batch_size))
        latents = (means[index] + stds[index] * torch.randn(means[index].shape, generator=generator)) * scaling
        prompts = ["" if rng.random() < caption_dropout else caption(pictures[i], rng) for i in index.tolist()]
        for prompt in prompts:
            if prompt not in token_cache:
                token_cache[prompt] = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                                                truncation=True).input_ids
        input_ids = torch.tensor([token_cache[p] for p in prompts])
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, text_encoder(input_ids)[0]).sample
        loss = dreambooth_loss(prediction, noise, batch_size, weights=min_snr_weights(scheduler, timesteps, 5.0))["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        recent = (recent + [loss.item()])[-100:]
        if step % 200 == 0 or step == steps - 1:
            losses.append(float(np.mean(recent)))
            print(f"unet step {step}/{steps} loss {losses[-1]:.4f} ({time.time() - started:.0f} s)", flush=True)
    return losses


def pretrain(output_dir: Path, seed: int = 0, vae_steps: int = 1200, unet_steps: int = 4000, world_size: int = 20000,
             batch_size: int = 64) -> dict:
    import torch
    from diffusers import StableDiffusionPipeline

    from dreambooth.models import save_pipeline

    started = time.time()
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = build_tokenizer(Path(scratch) / "tokenizer")
        components = build_components(tokenizer, seed)
        vae_mse = train_vae(components["vae"], rng, vae_steps)
        components["vae"].eval().requires_grad_(False)
        check = np.random.default_rng(seed + 1)
        vae_errors = {"world": reconstruction_error(components["vae"], [random_picture(check) for _ in range(64)]),
                      "subject": reconstruction_error(components["vae"], [subject_picture(check) for _ in range(64)])}
        print(f"vae reconstruction mse: {vae_errors}", flush=True)
        pictures = [random_picture(rng) for _ in range(world_size)]
        means, stds = encode_world(components["vae"], pictures)
        components["vae"].register_to_config(scaling_factor=float(1 / means.std()))
        losses = train_unet(components, pictures, means, stds, rng, unet_steps, batch_size)
        pipeline = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
        pipeline.save_pretrained(Path(scratch) / "fp32", safe_serialization=True)
        save_pipeline(output_dir, str(Path(scratch) / "fp32"), {}, tokenizer, dtype=torch.float16)
    report = dict(seed=seed, vae_steps=vae_steps, unet_steps=unet_steps, world_size=world_size, batch_size=batch_size,
                  vae_training_mse=vae_mse, vae_reconstruction_mse=vae_errors, loss_every_200_steps=losses, minutes=(time.time() - started) / 60,
                  parameters={name: sum(p.numel() for p in components[name].parameters())
                              for name in ("unet", "vae", "text_encoder")})
    (Path(output_dir) / "pretraining.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


# ---------------------------------------------------------------- sampling and measuring


def load(model: str | Path, **components):
    import torch

    from dreambooth.generation import load_pipeline

    return load_pipeline(str(model), torch.device("cpu"), torch.float32, **components)


def sample(pipeline, prompt: str, count: int, seed: int = 0, guidance_scale: float = 4.0, steps: int = 25):
    from dreambooth.generation import generate

    images = []
    for start in range(0, count, 64):
        seeds = [seed * 100_000 + i for i in range(start, min(count, start + 64))]
        images += generate(pipeline, prompt, seeds, SIZE, SIZE, num_inference_steps=steps, guidance_scale=guidance_scale)
    return images


def attribute_accuracy(pipeline, per_prompt: int = 4, seed: int = 0) -> dict:
    """Generate every colour x shape x background prompt and read the attributes back."""
    hits = {"colour": [], "shape": [], "background": []}
    for colour in COLOURS:
        for shape in SHAPES:
            for background in BACKGROUNDS:
                prompt = f"a photo of a {colour} {shape} on a {background} background"
                for d in map(describe, sample(pipeline, prompt, per_prompt, seed)):
                    hits["colour"].append(d.colour == colour)
                    hits["shape"].append(d.shape == shape)
                    hits["background"].append(d.background == background)
    return {attribute: float(np.mean(values)) for attribute, values in hits.items()}


def other_shape(shape: str) -> str:
    """The unrelated prompt's shape: not the subject's, so a subject that leaks into it shows."""
    return "triangle" if shape == "square" else "square"


def study_prompts(shape: str) -> tuple[str, str, str, str]:
    """Instance, class, recontextualisation and unrelated prompts for a subject of ``shape``."""
    return (f"a photo of sks {shape}", f"a photo of a {shape}", f"a photo of sks {shape} on a black background",
            f"a photo of a green {other_shape(shape)} on a gray background")


INSTANCE_PROMPT, CLASS_PROMPT, RECONTEXT_PROMPT, OTHER_PROMPT = study_prompts(SUBJECT_SHAPE)


@dataclass(frozen=True)
class StudySettings:
    """One DreamBooth run on the toy model, as a user would make it."""

    prior_preservation: bool = True
    train_text_encoder: bool = False
    steps: int = 400
    learning_rate: float = 2e-4
    num_subject_images: int = 5
    num_class_images: int = 50
    samples_per_prompt: int = 32
    # Which of the study's prompts are sampled and measured (see study_prompts); a check that needs
    # only some of the measures samples only their prompts, each drawing the same images as in a full run.
    measured: tuple[str, ...] = ("instance", "class", "recontext", "other")
    guidance_scale: float = 4.0
    subject_shape: str = SUBJECT_SHAPE
    subject_colours: tuple[str, str] = SUBJECT_COLOURS  # left half, right half


def write_subject_images(folder: Path, count: int, seed: int, shape: str = SUBJECT_SHAPE,
                         colours: tuple[str, str] = SUBJECT_COLOURS) -> Path:
    """``count`` pictures of the subject (a two-tone shape) on the white background."""
    rng = np.random.default_rng(10_000 + seed)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        draw(subject_picture(rng, shape=shape, colours=colours)).save(folder / f"subject_{index}.png")
    return folder


def train_subject(model: str | Path, workdir: Path, settings: StudySettings, seed: int) -> Path:
    """generate_class_images.py, then train_dreambooth.py, in-process; returns the trained pipeline."""
    import generate_class_images
    import train_dreambooth

    instance_prompt, class_prompt, _, _ = study_prompts(settings.subject_shape)
    instance_dir = write_subject_images(workdir / "subject", settings.num_subject_images, seed,
                                        settings.subject_shape, settings.subject_colours)
    output_dir = workdir / "trained"
    argv = ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(instance_dir),
            "--instance_prompt", instance_prompt, "--output_dir", str(output_dir), "--resolution", str(SIZE),
            "--train_batch_size", "1", "--learning_rate", str(settings.learning_rate), "--lr_scheduler", "constant",
            "--max_train_steps", str(settings.steps), "--checkpointing_steps", str(settings.steps + 1),
            "--seed", str(seed), "--num_validation_images", "0", "--save_precision", "fp32"]
    if settings.train_text_encoder:
        argv.append("--train_text_encoder")
    if settings.prior_preservation:
        class_dir = workdir / "class"
        generate_class_images.main(["--pretrained_model_name_or_path", str(model), "--class_prompt", class_prompt,
                                    "--class_data_dir", str(class_dir), "--num_class_images",
                                    str(settings.num_class_images), "--resolution", str(SIZE), "--sample_batch_size",
                                    "25", "--guidance_scale", str(settings.guidance_scale), "--seed", str(seed)])
        argv += ["--with_prior_preservation", "--class_prompt", class_prompt, "--class_data_dir", str(class_dir),
                 "--num_class_images", str(settings.num_class_images)]
    train_dreambooth.main(argv)
    return output_dir


def measure_model(pipeline, settings: StudySettings, seed: int) -> dict:
    """The study's prompts, each read back with ``describe``."""
    count, scale, shape = settings.samples_per_prompt, settings.guidance_scale, settings.subject_shape
    instance, class_prompt, recontext, other = study_prompts(shape)
    expected = {
        "instance": (instance, {"shape": shape}),
        "class": (class_prompt, {"shape": shape}),
        "recontext": (recontext, {"shape": shape, "background": "black"}),
        "other": (other, {"shape": other_shape(shape), "colour": "green", "background": "gray"}),
    }
    return {prompt: summarise([describe(image, settings.subject_colours)
                               for image in sample(pipeline, prompt, count, seed, scale)], wanted)
            for role, (prompt, wanted) in expected.items() if role in settings.measured}


def colour_drift(before: dict, after: dict) -> float:
    """Total variation distance between the colour distributions of two sets of generations."""
    names = set(before["colour_counts"]) | set(after["colour_counts"])
    return 0.5 * sum(abs(before["colour_counts"].get(n, 0) / before["n"] - after["colour_counts"].get(n, 0) / after["n"])
                     for n in names)


def study_run(model: str | Path, settings: StudySettings, seed: int, base: dict | None = None) -> dict:
    """Train on the subject and report fidelity, binding, prior preservation and recontextualisation.

    fidelity: share of "a photo of sks circle" images that show the subject (signature > 0.5);
    class_subject_share: the same share for "a photo of a circle" (it should stay at the
    pretrained model's level, about 0); binding: fidelity - class_subject_share; class_drift:
    total variation distance between the colour distributions of "a photo of a circle" before
    and after training; recontext: for "sks circle on a black background", the share showing the
    subject times the share with a black background; other_shape_accuracy: share of "a photo of a
    green square on a gray background" images that show a square (the pretrained model: 0.84).
    The prompts name ``settings.subject_shape`` (a triangle stands in for the square when the
    subject is a square)."""
    base = base or measure_model(load(model), settings, seed)
    with tempfile.TemporaryDirectory() as scratch:
        trained = train_subject(model, Path(scratch), settings, seed)
        after = measure_model(load(trained), settings, seed)
    instance, class_prompt, recontext, other = study_prompts(settings.subject_shape)
    run = dict(seed=seed, settings=settings.__dict__, base=base, after=after)
    if instance in after:
        run.update(fidelity=after[instance]["subject_share"], base_fidelity=base[instance]["subject_share"])
    if class_prompt in after:
        run.update(class_subject_share=after[class_prompt]["subject_share"],
                   class_drift=colour_drift(base[class_prompt], after[class_prompt]))
    if instance in after and class_prompt in after:
        run.update(binding=run["fidelity"] - run["class_subject_share"])
    if recontext in after:
        run.update(recontext=after[recontext]["subject_share"] * after[recontext]["background_accuracy"],
                   recontext_background=after[recontext]["background_accuracy"])
    if other in after:
        run.update(other_prompt_accuracy={k: after[other][f"{k}_accuracy"] for k in ("shape", "colour", "background")},
                   other_shape_accuracy=after[other]["shape_accuracy"],
                   base_other_shape_accuracy=base[other]["shape_accuracy"])
    return run


STUDY_KEYS = ("fidelity", "class_subject_share", "binding", "class_drift", "recontext", "recontext_background",
              "other_shape_accuracy")


def study_table(runs: Sequence[dict]) -> str:
    """Markdown: one row per setting, mean +- standard deviation over seeds."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        s = run["settings"]
        name = ("prior preservation" if s["prior_preservation"] else "no prior preservation") + (
            " + text encoder" if s["train_text_encoder"] else "")
        groups.setdefault(name, []).append(run)
    lines = ["| setting | seeds | " + " | ".join(STUDY_KEYS) + " |", "|---" * (len(STUDY_KEYS) + 2) + "|"]
    for name, group in groups.items():
        cells = []
        for key in STUDY_KEYS:
            values = np.array([run[key] for run in group])
            cells.append(f"{values.mean():.2f} +- {values.std():.2f}")
        lines.append(f"| {name} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("pretrain", help="train the toy model from scratch")
    p.add_argument("output_dir", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae_steps", type=int, default=1200)
    p.add_argument("--unet_steps", type=int, default=4000)
    a = commands.add_parser("accuracy", help="how well captions control the pictures")
    a.add_argument("model")
    a.add_argument("--per_prompt", type=int, default=4)
    a.add_argument("--save_grid", type=Path)
    st = commands.add_parser("study", help="DreamBooth on the subject, with and without prior preservation")
    st.add_argument("model")
    st.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    st.add_argument("--steps", type=int, default=StudySettings.steps)
    st.add_argument("--learning_rate", type=float, default=StudySettings.learning_rate)
    st.add_argument("--subject_shape", choices=SHAPES, default=SUBJECT_SHAPE)
    st.add_argument("--subject_colours", nargs=2, choices=list(COLOURS), default=list(SUBJECT_COLOURS),
                    metavar="COLOUR", help="left and right halves of the subject (default: red blue)")
    st.add_argument("--output", type=Path, default=Path("toyworld-study.json"))
    args = parser.parse_args(argv)

    if args.command == "pretrain":
        import torch

        torch.manual_seed(args.seed)
        report = pretrain(args.output_dir, args.seed, args.vae_steps, args.unet_steps)
        report["accuracy"] = attribute_accuracy(load(args.output_dir))
        (args.output_dir / "pretraining.json").write_text(json.dumps(report, indent=2) + "\n")
    elif args.command == "accuracy":
        pipeline = load(args.model)
        report = attribute_accuracy(pipeline, args.per_prompt)
        if args.save_grid:
            from dreambooth.generation import make_grid

            images = [image for shape in SHAPES for image in sample(pipeline, f"a photo of a red {shape}", 8)]
            make_grid(images, columns=8).save(args.save_grid)
    elif args.command == "study":
        runs, bases = [], {}  # the pretrained model's measures, per seed, shared by the settings
        for text_encoder in (False, True):
            for prior in (True, False):
                settings = StudySettings(prior_preservation=prior, train_text_encoder=text_encoder, steps=args.steps,
                                         learning_rate=args.learning_rate, subject_shape=args.subject_shape,
                                         subject_colours=tuple(args.subject_colours))
                for seed in args.seeds:
                    if seed not in bases:
                        bases[seed] = measure_model(load(args.model), settings, seed)
                    runs.append(study_run(args.model, settings, seed, bases[seed]))
                    print(f"{settings} seed {seed}: " + ", ".join(f"{k} {runs[-1][k]:.2f}" for k in STUDY_KEYS),
                          flush=True)
        report = {"runs": runs, "table": study_table(runs)}
        args.output.write_text(json.dumps(report, indent=2) + "\n")
        print(report["table"])
        return report
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
