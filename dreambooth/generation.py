"""Image generation shared by class-image top-up, infer.py and sampling during training."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import logging
import math
import re
import warnings
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from .data import CorruptImageError, derived_seed, list_image_files, load_image
from .errors import DreamBoothError, first_reason
from .image_metadata import LoraUse, Sampling, Weights, model_label, png_metadata, recorded_prompt

logger = logging.getLogger(__name__)

# Sampler names users know (A1111's in the metadata), mapped to diffusers schedulers.
SCHEDULERS = {
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}, "DPM++ 2M"),
    "unipc": ("UniPCMultistepScheduler", {}, "UniPC"),
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    # skip_prk_steps: PLMS as Stable Diffusion samples with it (its own config says so), at any step count.
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}, "PLMS"),
    "ddpm": ("DDPMScheduler", {}, "DDPM"),
}
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_device(device: str | None = None) -> torch.device:
    """The requested device, or the best one present: CUDA, then MPS, then CPU."""
    if device and device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device, precision: str | None = None, flag: str = "--dtype") -> torch.dtype:
    """The requested precision, or fp16 on a GPU and fp32 on the CPU (where half is slow). "no" is the
    default too, as in diffusers' --prior_generation_precision. fp16 on the CPU is refused, as
    training refuses it: PyTorch computes half there slowly, and diffusers warns at every load that
    it may fail."""
    if precision and precision not in ("auto", "no"):
        if precision not in PRECISIONS:
            raise DreamBoothError(f"{flag} {precision}: choose fp32, fp16 or bf16")
        if precision == "fp16" and device.type == "cpu":
            raise DreamBoothError(f"{flag} fp16 needs a GPU, and this run uses the CPU; use fp32 or bf16 "
                                  "(or leave the flag out: fp32 on the CPU)")
        return PRECISIONS[precision]
    return torch.float32 if device.type == "cpu" else torch.float16


def set_scheduler(pipeline, name: str) -> None:
    import diffusers

    if name not in SCHEDULERS:
        raise DreamBoothError(f"--scheduler {name}: choose one of {', '.join(SCHEDULERS)}")
    class_name, options, _ = SCHEDULERS[name]
    pipeline.scheduler = getattr(diffusers, class_name).from_config(pipeline.scheduler.config, **options)


def load_pipeline(model: str, device: torch.device, dtype: torch.dtype, scheduler: str = "dpm++",
                  revision: str | None = None, variant: str | None = None, **components):
    """A Stable Diffusion pipeline ready to sample: no safety checker, quiet progress bar."""
    from diffusers import StableDiffusionPipeline

    from .models import load_pretrained

    pipeline = load_pretrained("pipeline", StableDiffusionPipeline.from_pretrained, model, dtype=dtype,
                               revision=revision, variant=variant, safety_checker=None,
                               requires_safety_checker=False, **components)
    set_scheduler(pipeline, scheduler)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def speed_up(pipeline, channels_last: bool = False, compile: bool = False, cudnn_benchmark: bool = False) -> None:
    """Same images, sooner: the UNet and VAE in channels_last (the layout of tensor-core
    convolutions), the UNet compiled (the first call compiles, and a batch of another size
    compiles again), and on a CUDA device cuDNN's convolution algorithms timed for the batch's
    shapes (for the whole process: the same images up to cuDNN's rounding)."""
    if cudnn_benchmark and pipeline.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if channels_last:
        pipeline.unet.to(memory_format=torch.channels_last)
        pipeline.vae.to(memory_format=torch.channels_last)
    if compile:
        pipeline.unet = torch.compile(pipeline.unet)


def checkpoint_components(checkpoint: str | Path, dtype: torch.dtype) -> dict:
    """The trained models of a full fine-tune's checkpoint (unet/, text_encoder/ when trained), to
    load a pipeline with them over its base model. A LoRA checkpoint has none: load it as a LoRA."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = Path(checkpoint)
    if not is_full_checkpoint(folder):
        return {}
    components = {"unet": UNet2DConditionModel.from_pretrained(folder / "unet", dtype=dtype)}
    if (folder / "text_encoder").is_dir():
        components["text_encoder"] = CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=dtype)
    return components


def apply_loras(pipeline, loras: Sequence[InferenceLora]) -> None:
    """Load LoRA weights over the pipeline, each as its own adapter at its strength."""
    from .lora import LORA_WEIGHTS

    names, weights = [], []
    for number, lora in enumerate(loras):
        name = f"lora_{number}"
        folder, weight_name = (lora.path, LORA_WEIGHTS) if lora.path.is_dir() else (lora.path.parent, lora.path.name)
        try:
            with warnings.catch_warnings():  # stacking adapters is the point here
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                pipeline.load_lora_weights(str(folder), weight_name=weight_name, adapter_name=name)
        except (ValueError, KeyError, RuntimeError, OSError) as error:
            raise DreamBoothError(f"{lora.flag} {lora.repo_id or lora.path}: does not fit this base model "
                                  f"({first_reason(error)})") from None
        names.append(name)
        weights.append(lora.scale)
    if names:
        pipeline.set_adapters(names, adapter_weights=weights)


def lora_scales(scales: Sequence[float], count: int) -> list[float]:
    """--lora_scale for each of ``count`` --lora: none means 1, one value is for all."""
    return list(scales) * count if len(scales) == 1 else list(scales) or [1.0] * count


def is_full_checkpoint(checkpoint: str | Path) -> bool:
    """A full fine-tune's checkpoint (trained unet/), not a LoRA run's (an adapter file)."""
    return (Path(checkpoint) / "unet").is_dir()


class InferenceLora(NamedTuple):
    """A LoRA over the sampled model: the flag that gave it, its local file or folder, its strength, and
    the Hub repo it was fetched from (whose name names it in the images' metadata) at its revision."""

    flag: str
    path: Path
    scale: float
    repo_id: str | None = None
    revision: str | None = None


def inference_loras(cfg) -> list[InferenceLora]:
    """The LoRAs an ``InferConfig`` puts over its model; a --lora Hub id is read from its cached snapshot."""
    from .bases import check_lora_source

    # A LoRA run's checkpoint is an adapter at full strength; --lora_scale is for the --lora files.
    loras = ([InferenceLora("--checkpoint", Path(cfg.checkpoint), 1.0)]
             if cfg.checkpoint and not is_full_checkpoint(cfg.checkpoint) else [])
    for source, scale, revision in zip(cfg.lora, lora_scales(cfg.lora_scale, len(cfg.lora)), cfg.lora_revisions()):
        path = check_lora_source(source, "--lora", revision)
        from_hub = not Path(source).exists()
        loras.append(InferenceLora("--lora", path, scale, source if from_hub else None, revision))
    return loras


def load_inference_pipeline(cfg, device: torch.device | None = None):
    """The pipeline an ``InferConfig`` names: a trained folder, or a checkpoint over its base,
    with any LoRAs applied, on ``device`` (default: the one its --device picks)."""
    device = device or pick_device(cfg.device)
    dtype = pick_dtype(device, cfg.dtype)
    trained = checkpoint_components(cfg.checkpoint, dtype) if cfg.checkpoint else {}
    pipeline = load_pipeline(cfg.base_model(), device, dtype, cfg.scheduler, cfg.base_revision(), cfg.base_variant(),
                             **trained)
    apply_loras(pipeline, inference_loras(cfg))
    return pipeline


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, known in PRECISIONS.items() if known == dtype)


def describe_weights(cfg, pipeline) -> Weights:
    """The weights an ``InferConfig``'s pipeline samples with, by name, for the images' metadata."""
    base = model_label(cfg.base_model())
    checkpoint = model_label(cfg.checkpoint) if cfg.checkpoint else None
    return Weights(model=checkpoint if checkpoint and is_full_checkpoint(cfg.checkpoint) else base, base_model=base,
                   dtype=dtype_name(pipeline.unet.dtype), checkpoint=checkpoint,
                   loras=tuple(LoraUse.of(lora.path, lora.scale, lora.repo_id, lora.revision)
                               for lora in inference_loras(cfg)))


def release(pipeline) -> None:
    """Free a pipeline's memory (GPU memory included) before training starts."""
    pipeline.to("cpu")
    del pipeline
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def native_size(pipeline) -> int:
    """The image size the pipeline's UNet was trained at (512 for SD 1.x, 768 for SD 2.x 768-v), the
    size its pipeline draws by default."""
    return pipeline.unet.config.sample_size * pipeline.vae_scale_factor


def generate(pipeline, prompt: str, seeds: Sequence[int], height: int, width: int, num_inference_steps: int = 25,
             guidance_scale: float = 7.5, negative_prompt: str | None = None) -> list[Image.Image]:
    """One image per seed, each from its own generator, so an image depends on its seed alone."""
    return _sample(pipeline, prompt, seeds, height, width, num_inference_steps, guidance_scale, negative_prompt, "pil")


def sample_latents(pipeline, prompt: str, seeds: Sequence[int], height: int, width: int, num_inference_steps: int = 25,
                   guidance_scale: float = 7.5, negative_prompt: str | None = None) -> torch.Tensor:
    """``generate``'s images as denoised latents, left on the device (``DecodedImages`` finishes them).
    The call returns once the work is queued, not when the device has done it."""
    return _sample(pipeline, prompt, seeds, height, width, num_inference_steps, guidance_scale, negative_prompt,
                   "latent")


def _sample(pipeline, prompt: str, seeds: Sequence[int], height: int, width: int, num_inference_steps: int,
            guidance_scale: float, negative_prompt: str | None, output_type: str):
    generator_device = "cpu" if pipeline.device.type == "mps" else pipeline.device
    generators = [torch.Generator(generator_device).manual_seed(int(seed)) for seed in seeds]
    return pipeline(
        [prompt] * len(seeds),
        negative_prompt=[negative_prompt] * len(seeds) if negative_prompt else None,
        height=height, width=width, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
        generator=generators, output_type=output_type,
    ).images


class DecodedImages:
    """A Stable Diffusion pipeline's latents made into its 8-bit images on the device (its VAE
    decode and its post-processing's arithmetic: the pixels are bitwise its own "pil" output's),
    then copied to the host without waiting for the device. The pipeline's own output waits for
    the device and converts on the host while the device idles; this way the next batch can be
    queued first, and the device works on it while this one reaches the host."""

    def __init__(self, pipeline, latents: torch.Tensor):
        vae = pipeline.vae
        with torch.no_grad():
            decoded = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
            # As VaeImageProcessor.postprocess does, in float32: denormalize, x 255, round half to even.
            unit = pipeline.image_processor.denormalize(decoded).float()
            pixels = (unit * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
        self._copied = None
        if pixels.device.type == "cuda":
            self._pixels = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
            self._pixels.copy_(pixels, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        else:
            self._pixels = pixels.cpu()

    @property
    def on_host(self) -> bool:
        """Whether the pixels are on the host already (no copy under way: a CPU's)."""
        return self._copied is None

    def images(self) -> list[Image.Image]:
        """The images, once their copy is done (waiting for that alone, not for work queued after it)."""
        if self._copied is not None:
            self._copied.synchronize()
        return [Image.fromarray(array) for array in self._pixels.numpy()]


def read_prompts(path: str | Path, flag: str) -> list[str]:
    """The prompts of a text file, one a line; blank lines and ``#`` comment lines are skipped.
    ``flag`` names the file in errors, e.g. '--prompts_file prompts.txt'."""
    path = Path(path)
    if not path.is_file():
        raise DreamBoothError(f"{flag}: file not found")
    try:
        # utf-8-sig: a byte-order mark (Windows Notepad's "UTF-8 with BOM") is not part of the first prompt.
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise DreamBoothError(f"{flag}: not UTF-8 text; re-save it as UTF-8") from None
    except OSError as error:
        raise DreamBoothError(f"{flag}: cannot read ({error})") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not prompts:
        raise DreamBoothError(f"{flag}: no prompts in the file")
    return prompts


def fit_text(draw: ImageDraw.ImageDraw, text: str, width: int) -> str:
    """``text`` as it fits in ``width`` pixels, cut with "..." where it is longer."""
    if draw.textlength(text) <= width:
        return text
    while text and draw.textlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def make_grid(images: Sequence[Image.Image], columns: int | None = None) -> Image.Image:
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for index, image in enumerate(images):
        grid.paste(image, ((index % columns) * width, (index // columns) * height))
    return grid


# ---------------------------------------------------------------- class images


_CLASS_IMAGE_NAME = re.compile(r"^(\d+)-[0-9a-f]{12}\.png$")


@dataclass(frozen=True)
class ClassImageJob:
    """Top ``class_data_dir`` up to ``num_class_images`` images of ``class_prompt``. Each image
    records its prompt and settings in its PNG text. Image i is drawn from
    ``class_image_seed(seed, i, concept)``."""

    model: str
    class_prompt: str
    class_data_dir: str
    num_class_images: int
    resolution: int | None = None  # None: the model's native size
    sample_batch_size: int = 4
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    scheduler: str = "dpm++"
    precision: str | None = None
    seed: int = 0
    revision: str | None = None
    variant: str | None = None
    channels_last: bool = True  # 1.3x the images/s of the default layout on an H200 (benchmarks/RESULTS.md)
    compile: bool = False
    cudnn_benchmark: bool = False
    negative_prompt: str | None = None
    concept: int = 0  # the place in its --concepts_list of the first concept with this class folder


def class_image_seed(seed: int, index: int, concept: int = 0) -> int:
    """The seed of class image ``index`` of the concept at place ``concept`` of a --concepts_list.
    Concept 0, and so a single-concept run, draws the seeds (seed, index) that every class image was
    drawn from before concepts had seeds of their own, so a folder made then is made again the same.
    Every other concept draws from (seed, index, concept): class image i of a dog and of a cat no
    longer start from the same noise (and come out with the same composition)."""
    return derived_seed(seed, index) if concept == 0 else derived_seed(seed, index, concept)


def class_image_jobs(concepts: Sequence, **settings) -> list[ClassImageJob]:
    """The class images of a run's concepts (``Concept``s of dreambooth/concepts.py), one job per class
    folder: its prompt, and the largest count of the concepts that share it (they all train on its
    first images), drawn from the seeds of the first of them. ``settings`` are the other
    ``ClassImageJob`` fields, the same for every folder. train_dreambooth.py tops its class folders up
    with these jobs and generate_class_images.py fills them, so either makes the same files."""
    jobs: dict[Path, ClassImageJob] = {}
    for number, concept in enumerate(concepts):
        folder = Path(concept.class_data_dir).resolve()
        shared = jobs.get(folder)
        if shared is None:
            jobs[folder] = ClassImageJob(class_prompt=concept.class_prompt, class_data_dir=concept.class_data_dir,
                                         num_class_images=concept.num_class_images, concept=number, **settings)
        elif concept.num_class_images > shared.num_class_images:
            jobs[folder] = replace(shared, num_class_images=concept.num_class_images)
    return list(jobs.values())


def _scan_class_folder(folder: Path, remove_corrupt: bool) -> tuple[list[Path], set[int]]:
    """The valid images, and the indices our own file names already use."""
    valid, used = [], set()
    for path in list_image_files(folder, "--class_data_dir"):
        try:
            load_image(path)
        except CorruptImageError as error:  # an unreadable or oversized image is an error, kept on disk
            if remove_corrupt:
                logger.warning("%s; removing it, a new class image replaces it", error)
                try:
                    path.unlink(missing_ok=True)
                except OSError as unlink_error:
                    raise DreamBoothError(f"--class_data_dir {folder}: cannot remove the corrupt {path.name} "
                                          f"({unlink_error.strerror}); remove or replace it") from None
            continue
        valid.append(path)
        match = _CLASS_IMAGE_NAME.match(path.name)
        if match:
            used.add(int(match.group(1)))
    return valid, used


def missing_class_indices(job: ClassImageJob, remove_corrupt: bool = False,
                          check_prompts: bool = False) -> list[int]:
    """Indices of the images still to generate: the lowest ones no existing file uses. With
    ``check_prompts``, warn about images that record another prompt than ``job.class_prompt``."""
    folder = Path(job.class_data_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DreamBoothError(f"--class_data_dir {folder}: cannot create it ({error.strerror or error})") from None
    valid, used = _scan_class_folder(folder, remove_corrupt)
    if check_prompts:
        _warn_about_other_prompts(folder, valid, job.class_prompt)
    missing, index = [], 0
    while len(missing) < job.num_class_images - len(valid):
        if index not in used:
            missing.append(index)
        index += 1
    return missing


_NUMBERED_NAME = re.compile(r"^(\d+)-")


def next_output_number(folder: Path) -> int:
    """One past the highest number that starts a file name in ``folder`` ('007-...'), 0 in a new
    folder: AUTOMATIC1111's numbering, so a new run into the same folder overwrites nothing."""
    if not folder.is_dir():
        return 0
    numbers = [int(match.group(1)) for path in folder.iterdir() if (match := _NUMBERED_NAME.match(path.name))]
    return max(numbers, default=-1) + 1


def _warn_about_other_prompts(folder: Path, images: list[Path], class_prompt: str) -> None:
    """One warning for the images made from another prompt (a changed --class_prompt): they stay
    in the folder and prior preservation trains on them. Images that record no prompt (photos) pass."""
    recorded = Counter(recorded_prompt(path) for path in images)
    other = Counter({prompt: count for prompt, count in recorded.items()
                     if prompt is not None and prompt.strip() != class_prompt.strip()})
    if other:
        made = ", ".join(f"{count} from {prompt!r}" for prompt, count in other.most_common())
        logger.warning("--class_data_dir %s: %d image(s) were generated from another prompt (%s), not --class_prompt "
                       "%r; they count as class images: remove them or use another folder",
                       folder, sum(other.values()), made, class_prompt)


def save_png_atomically(image: Image.Image, folder: Path, name_for_hash, pnginfo=None, flag: str | None = None) -> Path:
    """Write a PNG under a temporary name, then rename: a kill never leaves half a file behind, nor does
    a failed write (a full disk), which is an error naming ``folder`` (and the ``flag`` that gave it)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=pnginfo)
    data = buffer.getvalue()
    path = folder / name_for_hash(hashlib.sha1(data).hexdigest()[:12])
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        temporary.write_bytes(data)
        temporary.replace(path)
    except OSError as error:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        where = f"{flag} {folder}" if flag else str(folder)
        raise DreamBoothError(f"{where}: could not write {path.name} ({error.strerror or error})") from None
    return path


def launch_state():
    """accelerate's PartialState for this launch, on the CPU when no accelerator is present.

    PartialState() alone stays single-process on a CPU-only machine even under torchrun or
    ``accelerate launch --multi_gpu``: every process would then make every image. With
    ``cpu=True`` it joins the launch through gloo. ``accelerate launch --cpu`` sets
    ACCELERATE_USE_CPU but starts one process unless given an mpirun hostfile.
    """
    from accelerate import PartialState

    from .models import cpu_only

    return PartialState(cpu=cpu_only())


def hide_library_progress_bars() -> None:
    """No loading or download bars from diffusers, transformers and the Hub client in this process:
    under `accelerate launch`, those of the processes other than the main one."""
    import diffusers
    import huggingface_hub
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


def process_device(device: str | None, state) -> torch.device:
    """The device this process samples on: --device as ``pick_device`` reads it in a run of one
    process; under `accelerate launch` with several, each process's own (``state.device``: cuda:0,
    cuda:1, ...), for --device auto or a device type without an index. An indexed device (cuda:1)
    would put every process on one GPU, so several processes refuse it."""
    if state.num_processes == 1:
        return pick_device(device)
    if device in (None, "auto"):
        return state.device
    chosen = torch.device(device)
    if chosen.type == state.device.type and chosen.index is None:
        return state.device
    if chosen.type == "cpu":
        return chosen
    raise DreamBoothError(f"--device {device}: each of the {state.num_processes} processes uses its own device; "
                          f"use --device auto or {state.device.type}")


def decided_by_main(state, decide):
    """``decide()``'s answer, reached by the main process alone and sent to every other one: a choice
    that all must share (a random seed, the next free file number) made once. The others wait for it,
    so nothing they write afterwards can change it."""
    from accelerate.utils import broadcast_object_list

    answer = [decide() if state.is_main_process else None]
    if state.num_processes > 1:
        broadcast_object_list(answer, from_process=0)
    return answer[0]


def deal(batches: Sequence, state) -> list:
    """This process's share of ``batches``, dealt round-robin: every process gets a disjoint share.

    Cut the batches from the whole list of jobs before dealing them, so each image is made in the
    same batch (and so bitwise the same) whatever the number of processes. On a CPU the thread
    count matters too: torchrun sets OMP_NUM_THREADS=1, which moves some pixels by 1 level."""
    return list(batches[state.process_index::state.num_processes])


def shared_out(jobs: Sequence, state, draw: Callable[[list], list]) -> list:
    """``draw``'s result for each of ``jobs`` (``draw`` takes a list of jobs and returns one result
    for each), the jobs dealt out among the processes of ``state`` (accelerate's; None or one
    process: all drawn here). Every process gets every result back, in the jobs' order."""
    shared = state is not None and state.num_processes > 1
    numbered = list(enumerate(jobs))
    mine = deal(numbered, state) if shared else numbered
    made = list(zip([number for number, _ in mine], draw([job for _, job in mine]) if mine else []))
    if shared:
        from accelerate.utils import gather_object

        made = sorted(gather_object(made), key=lambda result: result[0])
    return [result for _, result in made]


PRECISION_FLAG = "--prior_generation_precision"


class SharedPipeline:
    """The class-image pipeline of one job, kept for the next job with the same model and settings:
    the class folders of a --concepts_list load the model once. Released when the block ends."""

    def __init__(self):
        self._key, self._pipeline = None, None

    def get(self, job: ClassImageJob, device: torch.device):
        dtype = pick_dtype(device, job.precision, PRECISION_FLAG)
        key = (job.model, device, dtype, job.scheduler, job.revision, job.variant, job.channels_last, job.compile,
               job.cudnn_benchmark)
        if key != self._key:
            self.release()
            self._pipeline = load_pipeline(job.model, device, key[2], job.scheduler, job.revision, job.variant)
            speed_up(self._pipeline, job.channels_last, job.compile, job.cudnn_benchmark)
            self._key = key
        return self._pipeline

    def release(self) -> None:
        if self._pipeline is not None:
            pipeline, self._key, self._pipeline = self._pipeline, None, None
            release(pipeline)

    def __enter__(self) -> "SharedPipeline":
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def generate_class_images(job: ClassImageJob, state=None, pipelines: SharedPipeline | None = None) -> int:
    """Generate the missing class images, split across the processes of ``state``
    (an accelerate PartialState), with the pipeline of ``pipelines`` (else one loaded for this job).
    Returns how many this process wrote."""
    state = state or launch_state()
    # Before any process waits for another: every one refuses alike (fp16 on the CPU).
    pick_dtype(state.device, job.precision, PRECISION_FLAG)
    if state.is_main_process:
        missing_class_indices(job, remove_corrupt=True, check_prompts=True)
    state.wait_for_everyone()
    missing = missing_class_indices(job)
    # Every process reads the folder before any of them writes to it, so all agree on the list.
    state.wait_for_everyone()
    if not missing:
        return 0
    batches = [missing[i:i + job.sample_batch_size] for i in range(0, len(missing), job.sample_batch_size)]
    mine = deal(batches, state)
    if state.is_main_process:
        logger.info("generating %d class image(s) of %r in %s", len(missing), job.class_prompt, job.class_data_dir)
    written = 0
    if mine:
        with SharedPipeline() if pipelines is None else contextlib.nullcontext(pipelines) as shared:
            written = _run_class_batches(job, mine, state, shared.get(job, state.device))
    state.wait_for_everyone()
    return written


# PNG encoding takes about as long as a 512 px image takes on a fast GPU; Pillow lets go of the GIL
# while it compresses, so worker threads write one batch while the GPU makes the next.
_WRITER_THREADS = 4


def _run_class_batches(job: ClassImageJob, batches: list[list[int]], state, pipeline) -> int:
    weights = Weights(model=model_label(job.model), base_model=model_label(job.model),
                      dtype=dtype_name(pipeline.unet.dtype))
    folder, size = Path(job.class_data_dir), job.resolution or native_size(pipeline)
    progress = tqdm(total=sum(map(len, batches)), desc="Class images", unit="img",
                    disable=not state.is_local_main_process)
    # Leaving the block waits for every write, so an error while generating keeps the images made.
    with ThreadPoolExecutor(_WRITER_THREADS, thread_name_prefix="class-image-writer") as writer:
        pending: deque[Future] = deque()

        def write(batch: list[int], seeds: list[int], decoded: DecodedImages) -> None:
            for index, seed, image in zip(batch, seeds, decoded.images()):
                metadata = png_metadata(Sampling(job.class_prompt, seed, size, size,
                                                 job.num_inference_steps, job.guidance_scale, job.scheduler,
                                                 job.negative_prompt), weights)
                pending.append(writer.submit(_save_class_image, image, folder, index, metadata))

        # At most one batch in flight: its images are taken from the device once the next batch is
        # queued (a CPU's are on the host at once, and written at once).
        in_flight = None
        try:
            for batch in batches:
                seeds = [class_image_seed(job.seed, index, job.concept) for index in batch]
                latents = sample_latents(pipeline, job.class_prompt, seeds, size, size,
                                         job.num_inference_steps, job.guidance_scale, job.negative_prompt)
                done, in_flight = in_flight, (batch, seeds, DecodedImages(pipeline, latents))
                if done:
                    write(*done)
                if in_flight[2].on_host:
                    done, in_flight = in_flight, None
                    write(*done)
                while len(pending) > len(batch):  # at most one batch waits to be written
                    pending.popleft().result()
                    progress.update(1)
        except BaseException:
            if in_flight:  # made before the failure: written, as the batches before it are
                with contextlib.suppress(Exception):
                    write(*in_flight)
            raise
        if in_flight:
            write(*in_flight)
        for future in pending:
            future.result()
            progress.update(1)
    progress.close()
    return sum(map(len, batches))


def _save_class_image(image: Image.Image, folder: Path, index: int, metadata) -> Path:
    return save_png_atomically(image, folder, lambda digest: f"{index:05d}-{digest}.png", metadata, "--class_data_dir")
