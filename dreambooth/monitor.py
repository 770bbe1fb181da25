"""Watching a run: validation samples from the weights being trained, metrics, the loss curve."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import string
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from .errors import DreamBoothError, first_reason, redact
from .generation import fit_text, generate, make_grid, save_png_atomically, set_scheduler, shared_out
from .models import on_device

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampleSettings:
    prompts: tuple[str, ...]
    num_images: int = 4
    seed: int = 0
    num_inference_steps: int = 25
    scheduler: str = "dpm++"
    resolution: int = 512


@dataclass(frozen=True)
class FinalSamples:
    """What the final sampling left in ``samples/``: the labelled grid, and per prompt (in the grid's
    row order) the first image of its row, with its own file for a Hub widget. Absolute paths: the
    model card takes a relative path as relative to the output folder, not to the working one."""

    grid: Path
    by_prompt: tuple[tuple[str, Path], ...]


@dataclass(frozen=True)
class _Drawn:
    step: int | None
    grid: Image.Image
    firsts: tuple[tuple[str, Image.Image], ...]


def labelled_grid(rows: list[tuple[str, list[Image.Image]]]) -> Image.Image:
    """One row of images per prompt, the prompt written above its row."""
    label_height = 20
    row_images = [make_grid(images, columns=len(images)) for _, images in rows]
    width = max(image.width for image in row_images)
    sheet = Image.new("RGB", (width, sum(image.height + label_height for image in row_images)), "white")
    draw, top = ImageDraw.Draw(sheet), 0
    for (prompt, _), image in zip(rows, row_images):
        draw.text((4, top + 4), fit_text(draw, prompt, width - 8), fill="black")
        sheet.paste(image, (0, top + label_height))
        top += image.height + label_height
    return sheet


class ValidationSampler:
    """Draws validation samples from the models being trained, leaving training undisturbed:
    every random number comes from the samples' own seeded generators (and the global RNG
    state is restored regardless), and the models go back to train mode. Samples are optional:
    one that cannot be written or logged (a full disk) is a warning, and training goes on. Under
    `accelerate launch` each prompt's row is drawn by one process, from its own copy of the
    weights, and the main process writes and logs the grid."""

    def __init__(self, accelerator, components, trained: list[torch.nn.Module], settings: SampleSettings,
                 output_dir: str | Path):
        self.accelerator, self.components, self.trained = accelerator, components, trained
        self.settings, self.samples_dir = settings, Path(output_dir).resolve() / "samples"
        self._latest: _Drawn | None = None  # the last grid drawn (main process)
        self._drawn_step: int | None = None  # the step of the last grid drawn (every process)

    def _pipeline(self):
        from diffusers import StableDiffusionPipeline

        unwrap = self.accelerator.unwrap_model
        pipeline = StableDiffusionPipeline(
            vae=self.components.vae, text_encoder=unwrap(self.trained[1]) if len(self.trained) > 1 else
            self.components.text_encoder, tokenizer=self.components.tokenizer, unet=unwrap(self.trained[0]),
            scheduler=self.components.noise_scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
        set_scheduler(pipeline, self.settings.scheduler)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    @contextlib.contextmanager
    def sampling(self):
        """A pipeline over the models being trained, for drawing images without disturbing
        training: global RNG state restored after, models in eval mode and back, offloaded
        frozen models brought back to the device for the while, memory freed after."""
        accelerator = self.accelerator
        devices = [accelerator.device] if accelerator.device.type == "cuda" else []
        modes = [module.training for module in self.trained]
        pipeline = self._pipeline()
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad(), accelerator.autocast(), \
                    on_device([self.components.vae, pipeline.text_encoder], accelerator.device):
                for module in self.trained:
                    module.eval()
                yield pipeline
        finally:
            for module, mode in zip(self.trained, modes):
                module.train(mode)
            del pipeline
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def sample(self, name: str, step: int | None = None) -> Path | None:
        """Write ``samples/<name>.png`` (main process) and log it to the trackers at ``step``."""
        path = self._sample(name, step)
        self.accelerator.wait_for_everyone()
        return path

    def final(self, step: int) -> FinalSamples | None:
        """``samples/final.png``, the grid of the last step (a copy where that step already drew one),
        and ``samples/final_<i>.png``, the first image of prompt i's row; None on other processes."""
        grid = None
        if self._drawn_step is None or self._drawn_step != step:
            grid = self._sample("final", step)
        elif self.accelerator.is_main_process:
            grid = self._save(self._latest.grid, "final.png")
        samples = self._final_samples(grid) if self.accelerator.is_main_process else None
        self.accelerator.wait_for_everyone()
        return samples

    def _final_samples(self, grid: Path | None) -> FinalSamples | None:
        """The final grid with the first image of each row in a file of its own; None where a file
        could not be written."""
        if grid is None:
            return None
        by_prompt = []
        for index, (prompt, image) in enumerate(self._latest.firsts):
            path = self._save(image, f"final_{index}.png")
            if path is None:
                return None
            by_prompt.append((prompt, path))
        return FinalSamples(grid, tuple(by_prompt))

    def _save(self, image: Image.Image, name: str) -> Path | None:
        """``samples/<name>``, or None with a warning where it cannot be written (samples are optional)."""
        try:
            self.samples_dir.mkdir(parents=True, exist_ok=True)
            return save_png_atomically(image, self.samples_dir, lambda _: name)
        except OSError as error:
            problem = f"{self.samples_dir / name}: could not write it ({error.strerror or error})"
        except DreamBoothError as error:
            problem = str(error)  # names the folder, the file and why
        logger.warning("%s; the run goes on without it", problem)
        return None

    def _draw_rows(self) -> list[tuple[str, list[Image.Image]]]:
        """Each prompt's row of images. With several processes the rows are dealt out in turn, each
        drawn whole by one process (the images one process draws), and gathered in prompt order."""
        settings = self.settings
        seeds = [settings.seed + j for j in range(settings.num_images)]

        def draw(prompts: list[str]) -> list[list[Image.Image]]:
            with self.sampling() as pipeline:
                return [generate(pipeline, prompt, seeds, settings.resolution, settings.resolution,
                                 settings.num_inference_steps) for prompt in prompts]

        rows = shared_out(list(settings.prompts), self.accelerator.state, draw)
        return list(zip(settings.prompts, rows))

    def _sample(self, name: str, step: int | None) -> Path | None:
        """Draw the grid (every process its share), then save and log it (main process; None on the others)."""
        rows = self._draw_rows()
        self._drawn_step = step
        if not self.accelerator.is_main_process:
            return None
        grid = labelled_grid(rows)
        path = self._save(grid, f"{name}.png")
        try:
            self._log(step, rows, grid)
        except Exception as error:  # noqa: BLE001 - samples are optional: whatever a tracker raises, training goes on
            reason = error.strerror if isinstance(error, OSError) and error.strerror else first_reason(error)
            logger.warning("could not log the samples %s to the trackers (%s); training goes on", name, reason)
        self._latest = _Drawn(step, grid, tuple((prompt, images[0]) for prompt, images in rows))
        return path

    def evaluate(self, step: int, evaluation: "TrainingEvaluation") -> dict[str, float] | None:
        """The paper's metrics on a small fixed-seed set, logged as eval/<metric>, or with several concepts
        eval/<concept>/<metric> and eval/mean/<metric>. Every process draws its share of the images
        from its own copy of the weights (as evaluate.py deals them out); the main process scores
        and logs them (None on the others)."""
        with self.sampling() as pipeline:
            metrics = evaluation.run(pipeline, self.settings, self.accelerator.state)
        if self.accelerator.is_main_process:
            logged = {f"eval/{name}": value for name, value in metrics.items() if value is not None}
            self.accelerator.log(logged, step=step)
            logger.info("step %d: %s", step, ", ".join(f"{k} {v:.3f}" for k, v in logged.items()))
        self.accelerator.wait_for_everyone()
        return metrics

    def _log(self, step: int | None, rows, grid: Image.Image) -> None:
        """TensorBoard gets the labelled grid under one tag, so its step slider goes through the run,
        and so do MLflow (an image key with steps) and Comet; wandb gets each image with its prompt as
        caption."""
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image("samples", np.asarray(grid.convert("RGB")), step, dataformats="HWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({"samples": [wandb.Image(image, caption=prompt) for prompt, images in rows
                                         for image in images]}, step=step)
            elif tracker.name == "mlflow":
                import mlflow

                mlflow.log_image(grid, key="samples", step=step)
            elif tracker.name == "comet_ml":
                tracker.writer.log_image(grid, name="samples", step=step)


@dataclass(frozen=True)
class EvalSubject:
    """One concept as ``--eval_steps`` scores it: its identifier, class noun and real images."""

    identifier: str
    class_noun: str
    real_images: tuple[Image.Image, ...]


def subject_names(subjects: list[EvalSubject]) -> list[str]:
    """What each concept's metrics are logged under: 'sks_dog' for 'sks' 'dog', in the letters a
    TensorBoard tag keeps; concepts that would share a name (or take 'mean') get their number."""
    names = [re.sub(r"[^-\w.]+", "_", f"{subject.identifier} {subject.class_noun}").strip("_") or "concept"
             for subject in subjects]
    taken = Counter([*names, "mean"])
    return [f"{name}_{number}" if taken[name] > 1 else name for number, name in enumerate(names)]


class TrainingEvaluation:
    """What ``--eval_steps`` measures: the first prompts of the paper's set, a few images each, for
    every concept with its own identifier and class noun, scored against its own real images with
    DINO and CLIP loaded once. A single concept's metrics are named as evaluate.py names them
    ('dino'); several concepts' are '<concept>/dino' (``subject_names``), with 'mean/dino' their mean.
    Every process draws; the one with ``encoders`` (the main process) scores."""

    def __init__(self, encoders, subjects: list[EvalSubject], templates: list[str], images_per_prompt: int,
                 with_class_prompts: bool):
        self.encoders, self.subjects, self.templates = encoders, subjects, templates
        self.names = subject_names(subjects)
        self.images_per_prompt, self.with_class_prompts = images_per_prompt, with_class_prompts

    def run(self, pipeline, settings: SampleSettings, state=None) -> dict[str, float | None] | None:
        """The metrics (None on a process that draws only); ``state`` (accelerate's) deals the images out."""
        scored = [self._score(pipeline, settings, subject, state) for subject in self.subjects]
        if self.encoders is None:
            return None
        if len(scored) == 1:
            return scored[0]
        metrics = {f"{name}/{key}": value for name, each in zip(self.names, scored) for key, value in each.items()}
        for key in scored[0]:
            values = [each[key] for each in scored]
            metrics[f"mean/{key}"] = None if None in values else sum(values) / len(values)
        return metrics

    def _score(self, pipeline, settings: SampleSettings, subject: EvalSubject, state) -> dict[str, float | None] | None:
        from .evaluation import evaluate_pipeline

        metrics, _ = evaluate_pipeline(
            pipeline, self.encoders, subject.real_images, self.templates, subject.identifier, subject.class_noun,
            num_images_per_prompt=self.images_per_prompt, seed=settings.seed, resolution=settings.resolution,
            num_inference_steps=settings.num_inference_steps, with_class_prompts=self.with_class_prompts,
            progress=False, state=state,
        )
        return metrics


@dataclass
class Metrics:
    """Per-interval training metrics; losses stay on the device until a logging step reads them."""

    PARTS = ("instance_loss", "prior_loss")  # logged beside the loss when the steps give them

    pending: list[torch.Tensor] = field(default_factory=list)
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) for every step
    intervals: list[dict[str, float]] = field(default_factory=list)  # what each logging step logged
    _last_time: float = field(default_factory=time.perf_counter)
    _images: int = 0

    def restart_clock(self) -> None:
        """Time the interval from now (training starts after loading, resuming, ...)."""
        self._last_time = time.perf_counter()

    @contextlib.contextmanager
    def paused(self):
        """Leave the time spent inside (sampling, evaluating, saving) out of the speed figures."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._last_time += time.perf_counter() - start

    def add(self, loss: torch.Tensor, images: int) -> None:
        """One optimizer step: its loss (or the loss followed by its PARTS) and the images it trained
        on (class images and all processes included)."""
        self.pending.append(loss.detach().float().reshape(-1))
        self._images += images

    def _pending_rows(self) -> list[list[float]]:
        """The pending steps' losses, each [loss, *parts]; one device sync."""
        return torch.stack(self.pending).tolist() if self.pending else []

    @staticmethod
    def _numbered(step: int, rows: list[list[float]]) -> list[tuple[int, float]]:
        """(step, loss) of pending ``rows``, the last being ``step``."""
        return list(zip(range(step - len(rows) + 1, step + 1), (row[0] for row in rows)))

    def losses_so_far(self, step: int) -> list[tuple[int, float]]:
        """(step, loss) of every step up to ``step``, the ones not yet logged included."""
        return self.history + self._numbered(step, self._pending_rows())

    def read(self, step: int) -> dict[str, float]:
        """Average of the pending losses and the interval's speed; one device sync."""
        rows = self._pending_rows()
        pending = self._numbered(step, rows)
        self.history.extend(pending)
        losses, first = [loss for _, loss in pending], pending[0][0]
        now = time.perf_counter()
        elapsed = now - self._last_time
        logs = {"loss": sum(losses) / len(losses)}
        for column, name in enumerate(self.PARTS[:len(rows[0]) - 1], start=1):
            logs[name] = sum(row[column] for row in rows) / len(rows)
        logs.update(seconds_per_step=elapsed / len(losses), images_per_second=self._images / elapsed)
        self._last_time, self.pending, self._images = now, [], 0
        if torch.cuda.is_available():
            logs["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            logs["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
            torch.cuda.reset_peak_memory_stats()
        self.intervals.append({"first_step": first, "last_step": step, **logs})
        return logs


# In the logging folder: the id the trackers know the run by, chosen at its first start.
TRACKER_RUN_FILE = "tracker_run.json"


def tracker_config(values: dict[str, Any]) -> dict[str, Any]:
    """Trackers (TensorBoard hparams) take only scalars and strings."""
    return {key: value for key, value in values.items() if isinstance(value, (int, float, str, bool))}


def tracker_init_kwargs(resumed_step: int, logging_dir: str | Path, trackers: list[str]) -> dict[str, dict]:
    """What ``init_trackers`` passes each tracker (main process), so that a resumed run goes on with the
    curves of the run it continues. TensorBoard hides what the interrupted run logged after the checkpoint
    (SummaryWriter's purge_step): after a kill 40 steps past it, those steps would be on the curves twice.
    wandb and Comet go on in the same run, whose id the first start chose and kept in the logging folder;
    MLflow, which chooses its runs' ids, in the run whose id the first start kept there
    (``remember_tracker_runs``). wandb takes no step below the last one it has (a warning says so), and
    MLflow and Comet keep every value logged, so each keeps the interrupted run's steps past the checkpoint,
    which the resumed run logs again. wandb's files go to the logging folder too, unless WANDB_DIR says
    otherwise."""
    kwargs: dict[str, dict] = {}
    if resumed_step:
        kwargs["tensorboard"] = {"purge_step": resumed_step + 1}
    run_id = tracker_run_id(logging_dir, resumed=bool(resumed_step)) if {"wandb", "comet_ml"} & set(trackers) else None
    if "wandb" in trackers:
        kwargs["wandb"] = {"id": run_id, "resume": "allow"}
        if not os.environ.get("WANDB_DIR"):
            kwargs["wandb"]["dir"] = str(logging_dir)
    if "comet_ml" in trackers and comet_takes_experiment_keys():
        kwargs["comet_ml"] = {"experiment_key": comet_experiment_key(run_id), "mode": "get_or_create"}
    if "mlflow" in trackers and not resumed_step and run_id is None:
        _keep_runs(logging_dir, {})  # a first start: the runs of an earlier one are forgotten
    elif "mlflow" in trackers and resumed_step:
        mlflow_run = _kept_runs(logging_dir).get("mlflow_run_id")
        if isinstance(mlflow_run, str) and mlflow_run:
            kwargs["mlflow"] = {"run_id": mlflow_run}
        else:
            logger.info("%s keeps no MLflow run: MLflow logs this resumed run as a new one",
                        Path(logging_dir) / TRACKER_RUN_FILE)
    return kwargs


def comet_experiment_key(run_id: str) -> str:
    """The run's Comet experiment key: Comet takes 32 to 50 letters and digits."""
    return hashlib.sha256(f"dreambooth-{run_id}".encode()).hexdigest()[:32]


def comet_takes_experiment_keys() -> bool:
    """Whether accelerate starts Comet with ``comet_ml.start`` (comet_ml 3.41 and later), which takes an
    experiment key and continues the experiment of that key; with an older comet_ml, a resumed run is a
    new experiment."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    try:
        return Version(version("comet_ml")) >= Version("3.41.0")
    except PackageNotFoundError:
        return False


def init_trackers(accelerator, config: dict[str, Any], init_kwargs: dict[str, dict]) -> None:
    """``accelerator.init_trackers`` with the run's config, and its tracker runs kept for a resume
    (``remember_tracker_runs``). An MLflow run that is continued keeps the parameters its first start
    logged: MLflow refuses a parameter logged again with another value (--resume_from_checkpoint has
    one, and a resume may change --max_train_steps), so the config goes to the other trackers only."""
    continued = "run_id" in init_kwargs.get("mlflow", {})
    try:
        accelerator.init_trackers("dreambooth", config=None if continued else config, init_kwargs=init_kwargs)
        if continued:
            for tracker in accelerator.trackers:
                if tracker.name != "mlflow":
                    tracker.store_init_configuration(config)
    except Exception as error:  # noqa: BLE001 - whatever a tracker's library raises, said in one line
        names = ", ".join(str(getattr(tracker, "value", tracker)) for tracker in accelerator.log_with)
        kept = (f"; this resume continues the MLflow run kept in {Path(accelerator.logging_dir) / TRACKER_RUN_FILE}"
                ": delete that file to log it as a new run") if continued else ""
        raise DreamBoothError(f"--report_to {names}: the tracker could not start "
                              f"({redact(first_reason(error), None)}){kept}") from None
    remember_tracker_runs(accelerator, accelerator.logging_dir)


def remember_tracker_runs(accelerator, logging_dir: str | Path) -> None:
    """Keep the MLflow run's id in ``<logging_dir>/tracker_run.json`` (MLflow chooses it when the run
    starts), for a resumed run to continue it."""
    if "mlflow" not in {tracker.name for tracker in accelerator.trackers}:
        return
    run_id = getattr(getattr(accelerator.get_tracker("mlflow", unwrap=True), "info", None), "run_id", None)
    if run_id:
        _keep_runs(logging_dir, {**_kept_runs(logging_dir), "mlflow_run_id": run_id})


def _kept_runs(logging_dir: str | Path) -> dict[str, Any]:
    """What ``tracker_run.json`` holds; nothing where it is missing or unreadable."""
    try:
        kept = json.loads((Path(logging_dir) / TRACKER_RUN_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return kept if isinstance(kept, dict) else {}


def _keep_runs(logging_dir: str | Path, runs: dict[str, Any]) -> None:
    path = Path(logging_dir) / TRACKER_RUN_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(runs))
    except OSError as error:
        logger.warning("%s: could not write it (%s); a resumed run will log to a new tracker run", path,
                       error.strerror or error)


def tracker_run_id(logging_dir: str | Path, resumed: bool) -> str:
    """The run's id: on a resume, the one kept in ``<logging_dir>/tracker_run.json``; at a first start (or
    where the file is gone), a new one, kept there (a first start forgets the runs of an earlier one)."""
    path = Path(logging_dir) / TRACKER_RUN_FILE
    if resumed and not path.is_file():
        logger.info("no %s: the trackers log this resumed run as a new one", path)
    elif resumed:
        try:
            run_id = json.loads(path.read_text())["id"]
            if isinstance(run_id, str) and run_id:
                return run_id
            problem = "no run id in it"
        except OSError as error:
            problem = f"cannot be read ({error.strerror or error})"
        except (ValueError, KeyError, TypeError) as error:
            problem = f"is malformed ({error})"
        logger.warning("%s: %s; the trackers log this run as a new one", path, problem)
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(12))
    _keep_runs(logging_dir, {"id": run_id})
    return run_id


def plot_loss_curve(history: list[tuple[int, float]], path: str | Path, smoothing: float = 0.9) -> Path | None:
    """Raw per-step loss and its exponential moving average."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = zip(*history)
    smoothed, average = [], losses[0]
    for value in losses:
        average = smoothing * average + (1 - smoothing) * value
        smoothed.append(average)
    figure, axes = plt.subplots(figsize=(8, 4.5))
    axes.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=1, label="loss")
    axes.plot(steps, smoothed, color="tab:blue", linewidth=2, label=f"EMA ({smoothing})")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return Path(path)
