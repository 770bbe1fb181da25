"""Checkpoints that survive kills, and the exact resumption of a run from them.

A checkpoint is Accelerate's ``save_state`` (optimizer, lr schedule, gradient scaler, every
RNG state) plus the trained models in diffusers format (``unet/``, ``text_encoder/``, so
``infer.py --checkpoint`` can sample it), the loop's counters and the loss of every step so
far. It is written to a hidden temporary folder, marked complete, and only then renamed to
``checkpoint-<step>``; old ones are pruned after that. A folder without the marker (a kill mid-save) is never resumed from.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from accelerate.utils import DistributedType
from safetensors import SafetensorError

from .errors import DreamBoothError, first_reason
from .models import WRITE_ERRORS, seal, sync_folder, whole_model, write_failure, writing
from .optimizers import check_resumed_state

logger = logging.getLogger(__name__)

PREFIX = "checkpoint-"
MARKER = "checkpoint_complete.json"
LOSS_HISTORY = "loss_history.json"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")
_FOREIGN = (f"no {MARKER}, so not a checkpoint of this suite (diffusers' train_dreambooth.py writes such "
            "folders, which this suite cannot resume)")


@dataclass
class TrainState:
    """The loop's position: what a checkpoint needs besides Accelerate's state."""

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # per process
    data_seed: int = 0
    num_processes: int = 1


def adapt_to_process_count(state: TrainState, num_processes: int, checkpoint: Path) -> TrainState:
    """A checkpoint's position for another number of processes: the same samples already seen
    in this epoch, counted in batches of the new per-process shards."""
    if state.num_processes == num_processes:
        return state
    seen = state.batches_in_epoch * state.num_processes
    if seen % num_processes:
        raise DreamBoothError(
            f"{checkpoint} was saved by {state.num_processes} processes {state.batches_in_epoch} batches into an "
            f"epoch; that position cannot be split evenly over {num_processes} processes. Resume with "
            f"{state.num_processes} processes, or from a checkpoint at an epoch boundary"
        )
    logger.info("resuming a %d-process checkpoint on %d processes", state.num_processes, num_processes)
    return TrainState(state.global_step, state.epoch, seen // num_processes, state.data_seed, num_processes)


def any_process(accelerator, flag: bool) -> bool:
    """Whether ``flag`` is set on any process; every process gets the same answer. It waits for the
    device, so it is for rare moments, not every step (see training.StopAgreement)."""
    if accelerator.num_processes == 1:
        return flag
    total = accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), reduction="sum")
    return bool(total.item() > 0)


def first_failure(accelerator, failure: str | None) -> str | None:
    """The reason of the first process that failed (``failure`` is this process's, or None), the same
    on every process: where one process writes alone, all stop with its reason instead of waiting."""
    if accelerator.num_processes == 1:
        return failure
    from accelerate.utils import gather_object

    return next((reason for reason in gather_object([failure]) if reason), None)


def find_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of ``output_dir`` as (step, path), in the order they were written
    (their markers' serial numbers): a run resumed from an earlier checkpoint, or started afresh
    with --overwrite_output_dir, writes after the higher-numbered checkpoints it abandoned, so
    ``latest`` and pruning follow it. A ``checkpoint-<step>`` folder without a marker was not
    written by this suite (its saves are renamed into place after the marker is written) and is
    skipped with a warning, as is one whose marker is malformed; other folders and files are ignored."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _NAME.match(path.name)
        if not match or not path.is_dir():
            continue
        if not (path / MARKER).is_file():
            logger.warning("%s: %s; ignoring it", path, _FOREIGN)
            continue
        try:
            serial = _serial(_read_marker(path))
        except DreamBoothError as error:
            logger.warning("%s; ignoring %s", error, path.name)
            continue
        found.append((serial, int(match.group(1)), path))
    return [(step, path) for _, step, path in sorted(found)]


def _read_marker(checkpoint: Path) -> dict:
    """The checkpoint's marker, its train state and serial checked; an error naming it where it cannot be
    read or is malformed (a disk that filled up or a hand edit)."""
    path = checkpoint / MARKER
    try:
        marker = json.loads(path.read_text())
        if not isinstance(marker, dict):
            raise TypeError("not a JSON object")
        TrainState(**marker["train_state"])
        _serial(marker)
        return marker
    except OSError as error:
        problem = f"cannot be read ({error.strerror or error})"
    except KeyError as error:
        problem = f"is malformed (no {error} in it)"
    except (ValueError, TypeError, AttributeError) as error:  # JSONDecodeError is a ValueError
        problem = f"is malformed ({first_reason(error)})"
    raise DreamBoothError(f"{path} {problem}")


def _serial(marker: dict) -> int:
    """The checkpoint's place in the order of writing (0 for a marker from before serials)."""
    return int(marker.get("serial", 0))


def check_checkpoint_fits(checkpoint: Path, use_lora: bool, train_text_encoder: bool) -> None:
    """A checkpoint resumes only the kind of run that saved it: LoRA or full weights, with or
    without the text encoder; and only when its files can be read."""
    from safetensors import safe_open

    from .lora import LORA_WEIGHTS

    check_checkpoint_files(checkpoint)
    lora_file = checkpoint / LORA_WEIGHTS
    saved_lora = lora_file.is_file()
    if saved_lora:
        with safe_open(lora_file, "pt") as handle:
            saved_text_encoder = any(key.startswith("text_encoder.") for key in handle.keys())
    else:
        saved_text_encoder = (checkpoint / "text_encoder").is_dir()

    def kind(lora: bool, text_encoder: bool) -> str:
        return f"{'LoRA on the ' if lora else ''}UNet{' and text encoder' if text_encoder else ''}"

    if (saved_lora, saved_text_encoder) != (use_lora, train_text_encoder):
        raise DreamBoothError(
            f"--resume_from_checkpoint {checkpoint}: it trains {kind(saved_lora, saved_text_encoder)}, these flags "
            f"{kind(use_lora, train_text_encoder)}; resume with the flags it was saved with (--use_lora, "
            "--train_text_encoder)"
        )


def check_checkpoint_files(checkpoint: Path) -> None:
    """Every file of ``checkpoint`` is whole, as far as can be told without loading it: the headers of
    safetensors files cover their data, torch.save's zip archives have their directory at the end, JSON
    files parse. A truncated file (a full disk, an interrupted copy) is an error naming it."""
    from safetensors import safe_open

    read_state(checkpoint)
    read_loss_history(checkpoint)
    for path in sorted(checkpoint.rglob("*")):
        if not path.is_file() or path.name in (MARKER, LOSS_HISTORY):
            continue
        try:
            if path.suffix == ".safetensors":
                with safe_open(path, "pt") as handle:
                    handle.keys()
            elif path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix in (".bin", ".pkl", ".pt"):
                _check_zip_archive(path)
        except (OSError, ValueError, SafetensorError, zipfile.BadZipFile) as error:
            raise DreamBoothError(f"--resume_from_checkpoint {checkpoint}: {path.relative_to(checkpoint)} cannot be "
                                  f"read ({first_reason(error)}); resume from another checkpoint") from None


def _check_zip_archive(path: Path) -> None:
    """torch.save writes a zip archive (starting with "PK"), its directory at the end; files in older
    formats are left to torch.load."""
    with path.open("rb") as file:
        if file.read(2) not in (b"PK", b""):
            return
    with zipfile.ZipFile(path):
        pass


def resolve_resume(output_dir: str | Path, resume_from: str | None) -> Path | None:
    """The checkpoint folder to resume from: ``latest``, a path, or a name inside ``output_dir``."""
    if not resume_from:
        return None
    if resume_from == "latest":
        checkpoints = find_checkpoints(output_dir)
        foreign = sorted((int(match.group(1)), path) for path in Path(output_dir).glob(f"{PREFIX}*/")
                         if (match := _NAME.match(path.name)))
        if not checkpoints and foreign and (foreign[-1][1] / MARKER).is_file():
            raise DreamBoothError(
                f"--resume_from_checkpoint latest: {foreign[-1][1] / MARKER} is malformed, and no other checkpoint "
                f"can be resumed; remove {foreign[-1][1]}, or start a new run in another --output_dir")
        if not checkpoints and foreign:
            raise DreamBoothError(
                f"--resume_from_checkpoint latest: {foreign[-1][1]} has {_FOREIGN}; start a new run in another "
                "--output_dir (its trained UNet is in its unet/ folder)")
        if not checkpoints:
            logger.info("--resume_from_checkpoint latest: no checkpoint in %s yet; starting a fresh run", output_dir)
            return None
        return checkpoints[-1][1]
    path = Path(resume_from)
    if not path.exists() and (Path(output_dir) / resume_from).exists():
        path = Path(output_dir) / resume_from
    if not path.is_dir():
        raise DreamBoothError(f"--resume_from_checkpoint {resume_from}: no such checkpoint folder")
    if not (path / MARKER).is_file():
        raise DreamBoothError(f"--resume_from_checkpoint {resume_from}: {_FOREIGN}")
    return path


def read_state(checkpoint: Path) -> TrainState:
    try:
        return TrainState(**_read_marker(checkpoint)["train_state"])
    except DreamBoothError as error:
        raise DreamBoothError(f"--resume_from_checkpoint: {error}; resume from another checkpoint") from None


def read_loss_history(checkpoint: Path) -> list[tuple[int, float]]:
    """The (step, loss) of every step up to the checkpoint; none from a checkpoint without them."""
    path = checkpoint / LOSS_HISTORY
    if not path.is_file():
        return []
    try:
        return [(int(step), float(loss)) for step, loss in json.loads(path.read_text())]
    except OSError as error:
        problem = f"cannot be read ({error.strerror or error})"
    except (ValueError, TypeError) as error:
        problem = f"is malformed ({first_reason(error)})"
    raise DreamBoothError(f"--resume_from_checkpoint: {path} {problem}; remove it to resume without the loss "
                          "curve of the steps before the checkpoint")


def all_finite(tensors) -> bool:
    """Whether every floating-point tensor of ``tensors`` is finite."""
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


class Checkpointer:
    """Saves and restores checkpoints through ``accelerator.save_state`` / ``load_state``.

    ``save_models(models, folder)`` writes the trained models (full weights in diffusers
    format, or LoRA adapters); ``load_models(models, folder)`` loads them back in place.
    Accelerate's own copy of the weights is skipped, so a checkpoint holds them once; under FSDP,
    Accelerate writes its copy anyway, and resuming reads that one.
    """

    def __init__(self, accelerator, output_dir: str | Path,
                 save_models: Callable[[list[torch.nn.Module], Path], object],
                 load_models: Callable[[list[torch.nn.Module], Path], None],
                 total_limit: int | None = None):
        self.accelerator, self.output_dir, self.total_limit = accelerator, Path(output_dir), total_limit
        self._save_models, self._load_models = save_models, load_models
        accelerator.register_save_state_pre_hook(self._save_hook)
        accelerator.register_load_state_pre_hook(self._load_hook)
        if accelerator.is_main_process:
            self._remove_unfinished_saves()

    def _remove_unfinished_saves(self) -> None:
        """A kill mid-save leaves a hidden ``.checkpoint-<step>.tmp`` folder, of any step and gigabytes big;
        nothing ever resumes from one."""
        for path in sorted(self.output_dir.glob(f".{PREFIX}*.tmp")):
            logger.info("removing %s, left by a save that did not finish", path)
            shutil.rmtree(path, ignore_errors=True)

    def _save_hook(self, models, weights, folder) -> None:
        accelerator = self.accelerator
        models = [accelerator.unwrap_model(model) for model in models]
        if accelerator.distributed_type == DistributedType.FSDP:
            # Accelerate saved the sharded models for resuming; the diffusers copy needs them
            # whole, gathered by every process into the main one.
            models = [whole_model(model, accelerator.get_state_dict(model)) for model in models]
        if accelerator.is_main_process:
            self._save_models(models, Path(folder))
        weights.clear()

    def _load_hook(self, models, folder) -> None:
        self._load_models([self.accelerator.unwrap_model(model) for model in models], Path(folder))
        models.clear()

    def save(self, state: TrainState, trained: list[torch.nn.Module],
             loss_history: Sequence[tuple[int, float]] = ()) -> Path:
        """Write ``checkpoint-<step>`` atomically, then prune the oldest beyond the limit. The loss
        of every step so far goes with it, so a resumed run's loss curve starts at step 1."""
        accelerator = self.accelerator
        final = self.output_dir / f"{PREFIX}{state.global_step}"
        temporary = self.output_dir / f".{final.name}.tmp"
        if not all_finite(p for model in trained for p in accelerator.unwrap_model(model).parameters()):
            raise DreamBoothError(f"step {state.global_step}: weights are not finite; not saving a checkpoint")
        failure = None
        try:
            if accelerator.is_main_process:
                shutil.rmtree(temporary, ignore_errors=True)
                temporary.mkdir(parents=True)
            accelerator.wait_for_everyone()
            with writing():
                accelerator.save_state(str(temporary))
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                (temporary / LOSS_HISTORY).write_text(json.dumps([list(entry) for entry in loss_history]))
                written = find_checkpoints(self.output_dir)
                serial = 1 + max((_serial(_read_marker(path)) for _, path in written), default=0)
                marker = {"step": state.global_step, "serial": serial,
                          "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "train_state": asdict(state)}
                (temporary / MARKER).write_text(json.dumps(marker, indent=1))
                seal(temporary)
                if final.exists():
                    shutil.rmtree(final)
                temporary.rename(final)
                sync_folder(self.output_dir)
        except WRITE_ERRORS as error:
            if accelerator.is_main_process:
                shutil.rmtree(temporary, ignore_errors=True)
            failure = write_failure(error)
        failure = first_failure(accelerator, failure)
        if failure:
            previous = find_checkpoints(self.output_dir)
            kept = f"; {previous[-1][1]} is intact" if previous else ""
            raise DreamBoothError(f"could not write checkpoint {final} ({failure}){kept}")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            self.prune()
        return final

    def prune(self) -> None:
        """Remove all but the ``total_limit`` checkpoints written last."""
        if not self.total_limit:
            return
        checkpoints = find_checkpoints(self.output_dir)
        for _, path in checkpoints[: max(0, len(checkpoints) - self.total_limit)]:
            logger.info("removing old checkpoint %s (--checkpoints_total_limit %d)", path, self.total_limit)
            shutil.rmtree(path)

    def load(self, checkpoint: Path, lr_scheduler=None, optimizer=None) -> list[tuple[int, float]]:
        """Restore the models, optimizer, schedule and RNG states saved in ``checkpoint``; returns
        the loss history saved with it. ``optimizer``: checked to have loaded state of its own kind."""
        state, history = read_state(checkpoint), read_loss_history(checkpoint)
        try:
            self.accelerator.load_state(str(checkpoint))
        except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as error:
            if _is_mismatch(error):
                raise DreamBoothError(
                    f"--resume_from_checkpoint {checkpoint}: does not fit this run ({first_reason(error)}); resume "
                    "with the flags it was saved with (--rank, --lora_target_modules, --train_text_encoder, ...)"
                ) from None
            raise DreamBoothError(f"--resume_from_checkpoint {checkpoint}: its files cannot be read "
                                  f"({first_reason(error)}); resume from another checkpoint") from None
        if optimizer is not None:
            check_resumed_state(optimizer, checkpoint)
        if lr_scheduler is not None and state.num_processes != self.accelerator.num_processes:
            _rescale_schedule(lr_scheduler, state.global_step * self.accelerator.num_processes)
        logger.info("resumed from %s at step %d", checkpoint, state.global_step)
        return history


_MISMATCHES = ("mismatch", "Missing key", "Unexpected key", "doesn't match", "different number of parameter groups")


def _is_mismatch(error: BaseException) -> bool:
    """Whether loading failed because the checkpoint's weights or optimizer state have other shapes or names
    than this run's (other flags), rather than because its files are damaged."""
    return isinstance(error, KeyError) or any(text in str(error) for text in _MISMATCHES)


def _rescale_schedule(lr_scheduler, last_epoch: int) -> None:
    """Accelerate steps the schedule once per process per optimizer step, so a schedule saved by
    another number of processes is at another count: move it to ``last_epoch``."""
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # diffusers' schedules are all LambdaLR
    scheduler.last_epoch = last_epoch
    for group, base_lr, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * factor(last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
