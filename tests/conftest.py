"""Shared fixtures: tiny random-weight pipelines built once per session, offline."""

from __future__ import annotations

import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dreambooth.tiny_model import make_tiny_pipeline  # noqa: E402

TOY_SUBJECT = ROOT / "examples" / "toy_subject"


def bitsandbytes_adamw_8bit_on_cpu():
    """bitsandbytes' AdamW8bit class, where this bitsandbytes can step it on the CPU (0.50 and later)."""
    bnb = pytest.importorskip("bitsandbytes")
    probe = torch.nn.Parameter(torch.ones(64, 64))
    probe.grad = torch.ones_like(probe)
    try:
        bnb.optim.AdamW8bit([probe]).step()
    except Exception as error:  # noqa: BLE001 - any failure means: no CPU support in this version
        pytest.skip(f"this bitsandbytes cannot step 8-bit AdamW on the CPU ({type(error).__name__})")
    return bnb.optim.AdamW8bit


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return str(make_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd"))


@pytest.fixture(scope="session")
def tiny_model_v(tmp_path_factory) -> str:
    return str(make_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd-v", prediction_type="v_prediction"))


@pytest.fixture
def instance_dir(tmp_path) -> Path:
    folder = tmp_path / "instance"
    shutil.copytree(TOY_SUBJECT, folder)
    return folder


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process run builds its own Accelerator, as a fresh process would."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def assert_readable_by_all(path: Path) -> None:
    """``path``'s .safetensors files (or ``path`` itself) have the mode a new file gets under umask 022."""
    files = [path] if path.is_file() else list(path.rglob("*.safetensors"))
    modes = {file.relative_to(path.parent).as_posix(): oct(file.stat().st_mode & 0o777) for file in files}
    assert files and set(modes.values()) == {"0o644"}, modes


def committed_files(operations) -> dict[str, bytes]:
    """What a commit's operations put in the repo, by path: a file's bytes, or the bytes given."""
    files = {}
    for operation in operations:
        content = operation.path_or_fileobj
        files[operation.path_in_repo] = content if isinstance(content, bytes) else Path(content).read_bytes()
    return files


def train_args(model: str, instance: Path, output: Path, *extra: str) -> list[str]:
    """A fast tiny-model training command line; ``extra`` flags override."""
    return [
        "--pretrained_model_name_or_path", model,
        "--instance_data_dir", str(instance),
        "--instance_prompt", "a photo of sks toy",
        "--output_dir", str(output),
        "--resolution", "32",
        "--train_batch_size", "1",
        "--max_train_steps", "2",
        "--learning_rate", "1e-4",
        "--lr_warmup_steps", "0",
        "--report_to", "none",
        "--seed", "0",
        "--num_validation_images", "0",
        *extra,
    ]


@pytest.fixture
def prompts_seen(monkeypatch) -> list[list[str]]:
    """The prompts of every training batch, as they reach the text encoder."""
    from dreambooth.training import PromptEncoder

    seen = []
    original = PromptEncoder.__call__

    def spy(self, batch):
        if "num_instance" in batch:  # a training batch, not the up-front encoding of every prompt
            seen.append(list(batch["prompts"]))
        return original(self, batch)

    monkeypatch.setattr(PromptEncoder, "__call__", spy)
    return seen


@pytest.fixture(scope="session")
def tiny_dino(tmp_path_factory) -> str:
    """A ViT in DINO's layout (no pooler) with a PIL image processor, as facebook/dino-vits16 ships."""
    from transformers import ViTConfig, ViTImageProcessorPil, ViTModel

    folder = tmp_path_factory.mktemp("models") / "tiny-dino"
    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=37)
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    """CLIP model, tokenizer and image processor in one folder, as openai/clip-vit-base-patch32 ships."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    folder = tmp_path_factory.mktemp("models") / "tiny-clip"
    from dreambooth.tiny_model import build_tokenizer

    tokenizer = build_tokenizer(folder)
    torch.manual_seed(1)
    layers = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    text = dict(vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **layers)
    config = CLIPConfig(text_config=text, vision_config=dict(image_size=32, patch_size=8, **layers),
                        projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return str(folder)


HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
HUB_COMMITS = {"main": "a" * 40, "other": "b" * 40}


def write_sd15_like(folder: Path) -> Path:
    """A tiny pipeline laid out like the stable-diffusion-v1-5 repo: a safety checker and feature extractor
    (the checker flags every image, so images it checks come out black), plain and .fp16 weights."""
    import tempfile

    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    from dreambooth.tiny_model import build_components, build_tokenizer

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = build_tokenizer(Path(scratch) / "tokenizer")
        layers = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4)
        checker = StableDiffusionSafetyChecker(CLIPConfig(
            text_config=dict(vocab_size=99, **layers), vision_config=dict(image_size=32, patch_size=8, **layers),
            projection_dim=16))
        checker.concept_embeds_weights.data.fill_(-1.0)
        pipeline = StableDiffusionPipeline(
            **build_components(tokenizer), safety_checker=checker, requires_safety_checker=True,
            feature_extractor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}))
        pipeline.to(torch.float16).save_pretrained(folder, variant="fp16")
        pipeline.to(torch.float32).save_pretrained(folder)
        # The real repo's tokenizer/ is vocab.json + merges.txt + tokenizer_config.json, no tokenizer.json.
        shutil.rmtree(folder / "tokenizer")
        shutil.copytree(Path(scratch) / "tokenizer", folder / "tokenizer")
        (folder / "tokenizer" / "tokenizer_config.json").write_text(
            '{"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>", '
            '"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}')
    return folder


def write_to_hub_cache(cache: Path, repo_id: str, snapshot: Path, commit: str, refs: tuple[str, ...]) -> None:
    """``snapshot``'s files as huggingface_hub caches a download: blobs by hash, linked from snapshots/<commit>/."""
    import hashlib

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for file in sorted(path for path in snapshot.rglob("*") if path.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / file.relative_to(snapshot)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)


@pytest.fixture(scope="session")
def hub_cache_dir(tmp_path_factory) -> Path:
    """A Hugging Face cache holding HUB_ID at two commits (branch 'main', and 'other' with another VAE),
    'someone/unet-fp16-only' (only the UNet has .fp16 files) and 'someone/no-checker-cached' (the
    safety checker was never downloaded)."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("hub")
    cache = root / "hub"
    main = write_sd15_like(root / "sd15")
    other = shutil.copytree(main, root / "sd15-other")
    for vae in (other / "vae").glob("*.safetensors"):
        save_file({key: tensor + 1 for key, tensor in load_file(vae).items()}, vae, metadata={"format": "pt"})
    write_to_hub_cache(cache, HUB_ID, main, HUB_COMMITS["main"], ("main",))
    write_to_hub_cache(cache, HUB_ID, other, HUB_COMMITS["other"], ("other",))
    partial = shutil.copytree(main, root / "partial")
    for part in ("text_encoder", "vae", "safety_checker"):
        for file in (partial / part).glob("*.fp16.*"):
            file.unlink()
    write_to_hub_cache(cache, "someone/unet-fp16-only", partial, "c" * 40, ("main",))
    no_checker = shutil.copytree(main, root / "no-checker")
    shutil.rmtree(no_checker / "safety_checker")
    write_to_hub_cache(cache, "someone/no-checker-cached", no_checker, "d" * 40, ("main",))
    return cache


@pytest.fixture
def hub_cache(hub_cache_dir, monkeypatch) -> Path:
    """Offline, with ``hub_cache_dir`` as the Hugging Face cache (as HF_HUB_CACHE would set it)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache_dir))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub_cache_dir


HUB_LORA = "someone/sks-toy-lora"


@pytest.fixture(scope="session")
def hub_lora(hub_cache_dir, tiny_model, tmp_path_factory) -> Path:
    """A LoRA run's folder over ``tiny_model`` as push_to_hub.py uploads it (weights with non-zero adapters,
    train_config.yaml, README.md), added to ``hub_cache_dir`` as HUB_LORA, with 'someone/readme-only' (a model
    card and a LoRA under another name, no pytorch_lora_weights.safetensors)."""
    from diffusers import UNet2DConditionModel

    from dreambooth.lora import add_lora_adapters, save_lora

    root = tmp_path_factory.mktemp("hub-lora")
    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    add_lora_adapters(unet, None, rank=2, alpha=2, dropout=0.0)
    torch.manual_seed(0)
    for name, parameter in unet.named_parameters():
        if "lora_B" in name:  # gaussian init leaves lora_B at zero: a no-op adapter
            torch.nn.init.normal_(parameter, std=0.5)
    folder = save_lora([unet], root / "sks-toy-lora").parent
    (folder / "train_config.yaml").write_text("pretrained_model_name_or_path: tiny-sd\nuse_lora: true\n")
    (folder / "README.md").write_text("---\nbase_model: tiny-sd\n---\n# sks toy\n")
    write_to_hub_cache(hub_cache_dir, HUB_LORA, folder, "e" * 40, ("main",))
    other = root / "readme-only"
    other.mkdir()
    (other / "README.md").write_text("# a LoRA under its own name\n")
    shutil.copy(folder / "pytorch_lora_weights.safetensors", other / "sks.safetensors")
    write_to_hub_cache(hub_cache_dir, "someone/readme-only", other, "f" * 40, ("main",))
    return folder


@contextmanager
def one_thread():
    """In-process runs on one thread, as each launched process is (OMP_NUM_THREADS=1): on a
    busy 2-core machine, more threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def draw_class_images(monkeypatch, draw) -> None:
    """Class images drawn by ``draw(pipeline, prompt, seeds, height, width, *settings, **more)`` (a list
    of images) instead of the pipeline's denoising steps and decoding."""
    from dreambooth import generation

    class Drawn:
        on_host = True

        def __init__(self, pipeline, images):
            self._images = images

        def images(self):
            return self._images

    monkeypatch.setattr(generation, "sample_latents", draw)
    monkeypatch.setattr(generation, "DecodedImages", Drawn)


class ListDataset(torch.utils.data.Dataset):
    """A dataset of given values, for loops that train on plain numbers."""

    def __init__(self, values):
        self.values = values

    def __len__(self):
        return len(self.values)

    def __getitem__(self, index):
        return self.values[index]

    def set_epoch(self, epoch):
        pass


def linear_trainer(values=(1.0,) * 4, lr: float = 0.1, loss=None, accumulation: int = 1, **trainer_kwargs):
    """A Trainer of one Linear over ``values``, one per batch, on the CPU, with plain SGD (which
    cannot skip a step on the device): ``loss(model, batch)`` (default: the mean square of the
    model's outputs), ``accumulation`` batches a step, no clipping unless ``trainer_kwargs`` say."""
    from accelerate import Accelerator

    from dreambooth.training import Schedule, Trainer

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    batches = torch.utils.data.DataLoader(ListDataset(list(values)), batch_size=1,
                                          collate_fn=lambda batch: {"value": torch.tensor(batch), "prompts": ["p"]})
    model, optimizer, batches = accelerator.prepare(model, optimizer, batches)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    loss = loss or (lambda model, batch: (model(batch["value"][:, None]) ** 2).mean())
    steps = len(values) // accumulation
    return Trainer(accelerator, [model], optimizer, schedule, batches, Schedule(accumulation, steps, steps, 1),
                   lambda batch: {"loss": loss(model, batch)}, **{"max_grad_norm": 0, **trainer_kwargs})


# A script's main under `accelerate launch`, each process noting every image batch it draws.
_NOTING_SCRIPT = """
import json, sys
sys.path.insert(0, {root!r})
import {module}
from dreambooth import generation, monitor
from dreambooth.cli import run_cli

generate = generation.generate

def noted(pipeline, prompt, seeds, *args, **kwargs):
    with open(f"{notes}-{{generation.launch_state().process_index}}.jsonl", "a", encoding="utf-8") as file:
        file.write(json.dumps([prompt, list(seeds)]) + "\\n")
    return generate(pipeline, prompt, seeds, *args, **kwargs)

generation.generate = monitor.generate = noted
sys.exit(run_cli({module}.main))
"""


def noting_script(folder: Path, module: str) -> tuple[Path, Path]:
    """A copy of ``module``'s entry point (evaluate, train_dreambooth) whose processes each note
    the batches they draw, [prompt, seeds] a line, in ``notes-<process>.jsonl``; returns the
    script and ``notes``."""
    script, notes = folder / f"noting_{module}.py", folder / "draws"
    script.write_text(_NOTING_SCRIPT.format(root=str(ROOT), module=module, notes=str(notes)), encoding="utf-8")
    return script, notes


def drawn_batches(notes: Path, process: int) -> list[list]:
    """What ``noting_script``'s process ``process`` drew, in order."""
    return [json.loads(line) for line in Path(f"{notes}-{process}.jsonl").read_text(encoding="utf-8").splitlines()]
