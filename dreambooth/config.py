"""Typed configuration: dataclasses filled from CLI flags and an optional YAML file.

Each script has one dataclass. ``parse_config`` reads ``--config FILE.yaml`` first,
turns its keys into flags placed before the command line (so the command line wins),
and parses both with transformers' HfArgumentParser. Unknown flags, unknown YAML
keys and values of the wrong type fail at start with a one-line error.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, TypeVar

import yaml
from transformers import HfArgumentParser

from .errors import DreamBoothError, redact

ConfigT = TypeVar("ConfigT")
logger = logging.getLogger(__name__)
# In a run's output folder: the resolved config, which --config and --resume_from_checkpoint read back.
TRAIN_CONFIG = "train_config.yaml"

# Keys whose values must never be written to disk or logs, and what is written instead.
SECRET_FIELDS = ("hub_token",)
REDACTED = "<redacted>"


class _Parser(HfArgumentParser):
    """HfArgumentParser that raises instead of printing usage and exiting."""

    def error(self, message: str):
        raise DreamBoothError(message)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` keeps the script docstring's lines and shows a default only where it says something.

    A default of None or [] is left out, and so is one the help text already explains ("default: ...")
    and that of a ``--no_<flag>`` switch.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        explained = any(says in help for says in ("(default", "default:", "by default"))
        switch_off = isinstance(action, argparse._StoreFalseAction)
        if explained or switch_off or action.default in (None, [], argparse.SUPPRESS):
            return help
        return f"{help} (default: %(default)s)"


def build_parser(config_class: type, description: str | None = None,
                 positional: str | None = None) -> HfArgumentParser:
    usage = f"%(prog)s {positional.upper() + ' ' if positional else ''}[--config FILE.yaml] [--flag value ...]"
    parser = _Parser(config_class, description=description, allow_abbrev=False, formatter_class=_HelpFormatter,
                     usage=usage)
    for action in parser._actions:
        if isinstance(action, argparse._StoreFalseAction):  # HfArgumentParser's --no_<flag> for a flag that defaults on
            action.help = f"Turn --{action.dest} off."
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of flag values; flags given on the command line win")
    return parser


def _yaml_to_flags(path: str, config_class: type, given: Sequence[str] = ()) -> list[str]:
    """Turn ``key: value`` pairs into ``--key value`` tokens, rejecting unknown keys. Keys among
    ``given`` (flags on the command line) are left out: the command line replaces them, lists too."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DreamBoothError(f"--config {path}: file not found")
    try:
        values = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise DreamBoothError(f"--config {path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise DreamBoothError(f"--config {path}: expected a mapping of flag names to values")
    fields = {field.name: field for field in dataclasses.fields(config_class)}
    flags: list[str] = []
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            raise DreamBoothError(f"--config {path}: unknown key '{key}'")
        if value is None or name in given or (name in SECRET_FIELDS and value == REDACTED):
            continue  # a saved config's redacted token means none, not the token '<redacted>'
        items = value if isinstance(value, list) else [value]
        if not items:
            continue
        flags.append(f"--{name}")
        flags.extend(_yaml_scalar(item, fields[name]) for item in items)
    return flags


def _yaml_scalar(value: Any, field: dataclasses.Field) -> str:
    if not isinstance(value, bool):
        return str(value)
    if field.type in (bool, "bool"):
        return str(value).lower()
    return "yes" if value else "no"  # YAML reads a bare `no` (mixed_precision: no) as false


def parse_config(config_class: type[ConfigT], argv: Sequence[str] | None, description: str | None = None,
                 positional: str | None = None) -> ConfigT:
    """Parse ``argv`` (and the YAML file it names with --config) into ``config_class``.

    With ``positional``, a bare first argument is that flag's value (``export.py OUTPUT_DIR``).
    Values of secret flags never appear in the errors.
    """
    argv = list(_sys_argv() if argv is None else argv)
    if positional:
        argv = _positional_to_flag(argv, positional)
    try:
        return _parse(config_class, argv, description, positional)
    except DreamBoothError as error:
        message = str(error)
        for secret in _possible_secrets(argv):
            message = redact(message, secret)
        raise DreamBoothError(message) from None


def _positional_to_flag(argv: list[str], flag: str) -> list[str]:
    if not argv or argv[0].startswith("-"):
        return argv
    if any(arg.split("=")[0] in (f"--{flag}", f"--{flag.replace('_', '-')}") for arg in argv[1:]):
        raise DreamBoothError(f"give {flag.upper()} once: {argv[0]} or --{flag}, not both")
    return [f"--{flag}", argv[0], *argv[1:]]


def _possible_secrets(argv: Sequence[str]) -> list[str]:
    """Values of flags named like a token (argparse echoes a mistyped '--hub_tokn VALUE')."""
    secrets = []
    for index, arg in enumerate(argv):
        flag, sep, value = arg.partition("=")
        if flag.startswith("-") and "tok" in flag.lower() and "tokenizer" not in flag.lower():
            secrets.append(value if sep else (argv[index + 1] if index + 1 < len(argv) else ""))
    return [secret for secret in secrets if secret]


def _parse(config_class: type[ConfigT], argv: list[str], description: str | None,
           positional: str | None) -> ConfigT:
    parser = build_parser(config_class, description, positional)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    yaml_flags: list[str] = []
    if known.config:
        given = {arg.lstrip("-").split("=")[0].replace("-", "_") for arg in argv if arg.startswith("--")}
        yaml_flags = _yaml_to_flags(known.config, config_class, given)
        try:
            parser.parse_args(yaml_flags)
        except DreamBoothError as error:
            raise DreamBoothError(f"--config {known.config}: {error}") from None
    namespace = parser.parse_args(yaml_flags + argv)
    values = {field.name: getattr(namespace, field.name) for field in dataclasses.fields(config_class)}
    return config_class(**_with_home_expanded(values, getattr(config_class, "PATH_FIELDS", ())))


def _with_home_expanded(values: dict[str, Any], path_fields: Sequence[str]) -> dict[str, Any]:
    """``values`` with a leading ``~`` in each path field made the home folder, as a shell does for
    ``--flag ~/x`` but not for ``--flag=~/x`` or a YAML value. Only a leading ``~`` counts, so a Hub id
    (never one) or a path with a ``~`` further on is left as it is."""
    expanded = dict(values)
    for name in path_fields:
        value = values[name]
        if isinstance(value, str):
            expanded[name] = os.path.expanduser(value)
        elif isinstance(value, list):
            expanded[name] = [os.path.expanduser(item) for item in value]
    return expanded


def _sys_argv() -> list[str]:
    import sys

    return sys.argv[1:]


def config_to_dict(config: Any) -> dict[str, Any]:
    """The config as plain data, secrets redacted, ready for YAML, trackers and model cards."""
    values = dataclasses.asdict(config)
    for key in SECRET_FIELDS:
        if values.get(key):
            values[key] = REDACTED
    return values


def save_config(config: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False), encoding="utf-8")
    return path


def save_train_config(cfg: "TrainConfig") -> Path:
    """The run's ``train_config.yaml`` in its output folder, local paths absolute, so that ``--config``
    repeats the run from any current folder. A --concepts_list is saved beside it with absolute
    folders, and the saved config names that copy."""
    from .concepts import save_concepts_list

    output = Path(cfg.output_dir)
    saved = cfg.with_absolute_paths()
    if cfg.concepts_list:
        concepts_list = save_concepts_list(cfg.concepts(), output / SAVED_CONCEPTS_LIST)
        saved = dataclasses.replace(saved, concepts_list=str(concepts_list.resolve()))
    return save_config(saved, output / TRAIN_CONFIG)


def _field(default: Any, help: str, **metadata: Any) -> Any:
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help, **metadata})
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


# A --concepts_list run's concepts as train_config.yaml's --concepts_list gives them, beside it.
SAVED_CONCEPTS_LIST = "concepts_list.yaml"

MixedPrecision = Literal["no", "fp16", "bf16"]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Flags of train_dreambooth.py; names and meanings follow diffusers' train_dreambooth.py."""

    # Model
    pretrained_model_name_or_path: Optional[str] = _field(None, "Base model: a diffusers folder or a Hub id (required).")
    revision: Optional[str] = _field(None, "Revision (branch, tag or commit) of the base model on the Hub.")
    variant: Optional[str] = _field(None, "Weight file variant of the base model, e.g. fp16.")
    tokenizer_name: Optional[str] = _field(None, "Tokenizer folder or Hub id, if not the base model's.")
    # Data
    instance_data_dir: Optional[str] = _field(
        None, "Folder of subject images (required, unless --dataset_name or --concepts_list).")
    instance_prompt: Optional[str] = _field(
        None, "Prompt with the identifier for the subject, e.g. 'a photo of sks dog' (required, unless --concepts_list).")
    class_data_dir: Optional[str] = _field(None, "Folder of class images for prior preservation; topped up to --num_class_images.")
    class_prompt: Optional[str] = _field(None, "Prompt for the class, e.g. 'a photo of a dog'.")
    with_prior_preservation: bool = _field(False, "Add the prior-preservation loss on class images.")
    prior_loss_weight: float = _field(1.0, "Weight of the prior-preservation loss.")
    num_class_images: int = _field(100, "Class images wanted in --class_data_dir; missing ones are generated "
                                   "(also each --concepts_list concept's that sets none).")
    sample_batch_size: int = _field(4, "Batch size when generating class images.")
    prior_generation_precision: Optional[Literal["no", "fp32", "fp16", "bf16"]] = _field(
        None, "Precision for generating class images (default or no: fp16 on GPU, fp32 on CPU)."
    )
    concepts_list: Optional[str] = _field(
        None, "JSON or YAML list of concepts (instance_data_dir, instance_prompt, class_data_dir, class_prompt, "
        "num_class_images, repeats; eval_identifier, eval_class_noun for --eval_steps) to train several subjects in "
        "one run, instead of the single-concept flags."
    )
    repeats: int = _field(1, "Times each instance image appears per epoch (weights small sets; also each "
                          "--concepts_list concept's that sets none).")
    caption_extension: str = _field(".txt", "Extension of the caption file beside each image (photo1.jpg + photo1.txt).")
    caption_column: Optional[str] = _field(
        None, "Caption column of --dataset_name, or of metadata.jsonl in an image folder (default there: 'text')."
    )
    caption_dropout: float = _field(0.0, "Probability of training an instance image with an empty caption.")
    dataset_name: Optional[str] = _field(
        None, "A datasets dataset (Hub name, or local folder such as an imagefolder) instead of --instance_data_dir."
    )
    image_column: str = _field("image", "Image column of --dataset_name.")
    enable_bucket: bool = _field(False, "Aspect-ratio buckets: train each image near its own shape, not a square crop.")
    resolution: int = _field(512, "Training resolution in pixels (multiple of 8).")
    center_crop: bool = _field(False, "Center-crop images after resizing (default: random crop).")
    random_flip: bool = _field(False, "Flip images horizontally at random.")
    tokenizer_max_length: Optional[int] = _field(None, "Token length of prompts (default: the tokenizer's maximum).")
    text_encoder_use_attention_mask: bool = _field(False, "Pass the attention mask to the text encoder.")
    dataloader_num_workers: int = _field(0, "Data loading worker processes (0: in the main process).")
    # Output and logging
    output_dir: str = _field("dreambooth-model", "Folder for the trained pipeline, checkpoints and logs.")
    logging_dir: str = _field("logs", "Tracker log folder, relative to --output_dir.")
    report_to: str = _field(
        "tensorboard", "Tracker: tensorboard, wandb, any other Accelerate tracker (comet_ml, mlflow, ...), several "
        "of them comma-separated (tensorboard,wandb), all or none."
    )
    seed: Optional[int] = _field(None, "Random seed for a reproducible run.")
    # LoRA
    use_lora: bool = _field(False, "Train LoRA adapters (peft) instead of the full weights; the base stays frozen.")
    lora_target_modules: list[str] = _field(
        ["to_q", "to_k", "to_v", "to_out.0"], "UNet modules that get adapters (with --use_lora)."
    )
    rank: int = _field(4, "LoRA rank.")
    lora_alpha: Optional[float] = _field(None, "LoRA alpha; the update is scaled by alpha/rank (default: the rank).")
    lora_dropout: float = _field(0.0, "Dropout on the LoRA adapters.")
    save_precision: Optional[Literal["fp32", "fp16", "bf16"]] = _field(
        None, "Precision of the saved weights (default: fp16 for full fine-tunes, fp32 for LoRA)."
    )
    # Validation samples and tracking
    validation_prompt: list[str] = _field(
        [], "Prompt for samples during training; repeat the flag for several "
        "(default: each concept's instance prompt, and that prompt 'on the beach').", action="extend",
    )
    num_validation_images: Optional[int] = _field(
        None, "Samples per validation prompt (default 4, none under FSDP; 0 turns sampling off).")
    validation_steps: int = _field(100, "Sample every N steps; a final grid is always made.")
    validation_seed: int = _field(0, "Seed of the validation samples (image j uses seed + j).")
    validation_scheduler: str = _field("dpm++", "Sampler for validation samples.")
    validation_inference_steps: int = _field(25, "Denoising steps of validation samples.")
    logging_steps: int = _field(10, "Read the loss back and log it every N steps (each read waits for the GPU).")
    eval_steps: Optional[int] = _field(
        None, "Every N steps, score a small fixed-seed set with the DreamBooth paper's metrics (DINO, CLIP-I, "
        "CLIP-T, PRES, DIV; see evaluate.py) and log them to the trackers. With a --concepts_list, every concept "
        "is scored against its own images, so each evaluation generates concepts x --eval_num_prompts x "
        "--eval_images_per_prompt images (twice that with --with_prior_preservation)."
    )
    eval_prompt_set: Literal["object", "live"] = _field("object", "The paper's prompt set for --eval_steps.")
    eval_num_prompts: int = _field(3, "Prompts of the set used by --eval_steps.")
    eval_images_per_prompt: int = _field(2, "Images per prompt for --eval_steps.")
    eval_identifier: Optional[str] = _field(
        None, "The identifier token for --eval_steps (default: the one word of the instance prompt that the class "
        "prompt lacks, else the word before the class noun in the instance prompt). "
        "A --concepts_list of several concepts reads each concept's off its own prompts (or its eval_identifier "
        "key) and refuses this flag."
    )
    eval_class_noun: Optional[str] = _field(
        None, "The class noun for --eval_steps (default: the word after the identifier where the class prompt lacks "
        "only the identifier, else the last word of the class prompt, else of the instance prompt). A --concepts_list "
        "of several concepts reads each concept's off its own prompts (or its eval_class_noun key) and refuses this flag."
    )
    eval_dino_model: str = _field("facebook/dino-vits16", "DINO model for --eval_steps (Hub id or local folder).")
    eval_clip_model: str = _field("openai/clip-vit-base-patch32", "CLIP model for --eval_steps (Hub id or local folder).")
    # Hub
    push_to_hub: bool = _field(False, "Upload the finished output (model, card, samples) to the Hugging Face Hub.")
    hub_model_id: Optional[str] = _field(None, "Hub repo id, e.g. you/sks-dog (default: the output folder's name).")
    # repr=False: the token stays out of reprs and tracebacks.
    hub_token: Optional[str] = dataclasses.field(
        default=None, repr=False,
        metadata={"help": "Hub token (default: HF_TOKEN or the cached login); never logged or saved."},
    )
    hub_private_repo: bool = _field(False, "Create the Hub repo as private.")
    push_checkpoints: bool = _field(False, "Upload the checkpoint folders too.")
    # Checkpoints
    checkpointing_steps: int = _field(500, "Save a resumable checkpoint every N optimizer steps.")
    checkpoints_total_limit: Optional[int] = _field(None, "Keep only the newest N checkpoints.")
    resume_from_checkpoint: Optional[str] = _field(
        None, "Continue a run: 'latest', a checkpoint folder, or a checkpoint name inside --output_dir."
    )
    overwrite_output_dir: bool = _field(False, "Start afresh in an --output_dir that holds an earlier run.")
    # Training
    train_text_encoder: bool = _field(False, "Train the text encoder as well as the UNet.")
    train_batch_size: int = _field(4, "Instance images per batch and process (class images are added on top).")
    num_train_epochs: int = _field(1, "Epochs; ignored when --max_train_steps is set.")
    max_train_steps: Optional[int] = _field(None, "Optimizer steps in total; overrides --num_train_epochs.")
    gradient_accumulation_steps: int = _field(1, "Batches accumulated per optimizer step.")
    gradient_checkpointing: bool = _field(False, "Recompute activations in backward to save memory.")
    learning_rate: Optional[float] = _field(None, "Peak learning rate (default: 5e-6, or 1e-4 with --use_lora).")
    text_encoder_lr: Optional[float] = _field(None, "Learning rate of the text encoder (default: --learning_rate).")
    stop_text_encoder_training: Optional[int] = _field(
        None, "Freeze the text encoder after this many steps and free its optimizer state."
    )
    scale_lr: bool = _field(False, "Multiply the learning rate by batch size x processes x accumulation steps.")
    lr_scheduler: str = _field(
        "constant",
        "Schedule: linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup.",
    )
    lr_warmup_steps: int = _field(500, "Warm-up steps of the schedule.")
    lr_num_cycles: int = _field(1, "Hard restarts for cosine_with_restarts.")
    lr_power: float = _field(1.0, "Power of the polynomial schedule.")
    use_8bit_adam: bool = _field(False, "8-bit AdamW from bitsandbytes (CUDA).")
    adam_beta1: float = _field(0.9, "AdamW beta1.")
    adam_beta2: float = _field(0.999, "AdamW beta2.")
    adam_weight_decay: float = _field(1e-2, "AdamW weight decay.")
    adam_epsilon: float = _field(1e-8, "AdamW epsilon.")
    max_grad_norm: float = _field(1.0, "Gradient clipping norm (0 turns clipping off).")
    optimizer_in_backward: bool = _field(
        False, "Step the optimizer on the weights inside backward as their gradients complete (64 MB of "
        "gradients at a time) and free those gradients at once: saves the "
        "gradients' memory; one process, with --max_grad_norm 0 and no accumulation or fp16."
    )
    bf16_gradients: bool = _field(
        False, "Hold the gradients in bf16 from backward to the update: under --mixed_precision bf16 they are "
        "bf16 values, so this halves their memory and keeps clipping and the update the same; one process, "
        "no accumulation."
    )
    cast_weights_once: bool = _field(
        False, "Cast the trained Linear and Conv weights to the mixed-precision dtype once a step, 64 MB of "
        "weights per kernel, and their gradients back the same way, instead of autocast's cast at every "
        "layer (and again at each gradient-checkpointing recompute): fewer kernels, the same values; "
        "needs --mixed_precision bf16 or fp16, not with --compile, DeepSpeed or FSDP."
    )
    mixed_precision: Optional[MixedPrecision] = _field(
        None, "no, fp16 or bf16 (default: the accelerate config's). Trainable weights stay in fp32."
    )
    allow_tf32: bool = _field(False, "Allow TF32 matmuls on Ampere and newer GPUs.")
    cudnn_benchmark: bool = _field(
        False, "Let cuDNN time its convolution algorithms for each input shape and keep the fastest (CUDA; "
        "the first step at each new image size is slower). Not bit-reproducible from run to run."
    )
    enable_xformers_memory_efficient_attention: bool = _field(False, "Use xformers attention instead of PyTorch SDPA.")
    set_grads_to_none: bool = _field(
        True, "Free gradients between steps instead of zeroing them (--no_set_grads_to_none to zero them)."
    )
    offset_noise: bool = _field(False, "Add offset noise (0.1 x per-channel noise) to the training noise.")
    snr_gamma: Optional[float] = _field(None, "Min-SNR loss weighting gamma (5.0 is recommended); off by default.")
    pre_compute_text_embeddings: bool = _field(
        True, "With a frozen text encoder, encode every prompt once before training and move the text encoder "
        "off the GPU (--no_pre_compute_text_embeddings keeps it there and encodes on first use)."
    )
    cache_latents: bool = _field(
        True, "With --center_crop, encode every training image (and its flip) with the VAE once before training "
        "and move the VAE off the GPU; a random crop changes the pixels every step, so it is never cached."
    )
    channels_last: bool = _field(False, "Keep the UNet in channels_last memory format (often faster on GPUs).")
    compile: bool = _field(False, "torch.compile the UNet (the first steps are slower while it compiles).")
    compile_mode: str = _field(
        "default", "torch.compile mode: default, reduce-overhead (CUDA graphs) or max-autotune."
    )
    local_rank: int = _field(-1, "Set by torch.distributed launchers; not needed with accelerate launch.")

    def validate(self) -> None:
        """Every check that needs no model: one-line errors naming the flag or file."""
        from .bases import check_base_model

        if not self.pretrained_model_name_or_path:
            raise DreamBoothError("--pretrained_model_name_or_path is required")
        check_base_model(self.pretrained_model_name_or_path, revision=self.revision, variant=self.variant)
        self._check_data_source()
        if not self.with_prior_preservation and (self.class_data_dir or self.class_prompt):
            logger.warning("--class_data_dir and --class_prompt are used only with --with_prior_preservation; "
                           "training without class images")
        if self.resolution <= 0 or self.resolution % 8:
            raise DreamBoothError(f"--resolution {self.resolution}: must be a positive multiple of 8")
        for name in ("train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "sample_batch_size"):
            if getattr(self, name) < 1:
                raise DreamBoothError(f"--{name} {getattr(self, name)}: must be at least 1")
        if self.max_train_steps is not None and self.max_train_steps < 1:
            raise DreamBoothError(f"--max_train_steps {self.max_train_steps}: must be at least 1")
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise DreamBoothError(f"--learning_rate {self.learning_rate}: must be positive")
        if self.lr_warmup_steps < 0 or self.dataloader_num_workers < 0 or self.max_grad_norm < 0:
            raise DreamBoothError("--lr_warmup_steps, --dataloader_num_workers and --max_grad_norm must not be negative")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise DreamBoothError(f"--snr_gamma {self.snr_gamma}: must be positive")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise DreamBoothError(f"--lr_scheduler {self.lr_scheduler}: choose one of {', '.join(LR_SCHEDULERS)}")
        if self.lr_scheduler == "polynomial" and self.peak_learning_rate() <= 1e-7:
            raise DreamBoothError(f"--learning_rate {self.peak_learning_rate()}: --lr_scheduler polynomial decays to 1e-7, "
                                  "so the rate must be above it")
        self._check_tracker()
        if self.enable_xformers_memory_efficient_attention and not _importable("xformers"):
            raise DreamBoothError(
                "--enable_xformers_memory_efficient_attention: xformers is not installed (pip install xformers, "
                "matching your torch), or drop the flag to use PyTorch's SDPA attention"
            )
        # --use_8bit_adam needs bitsandbytes only on a CUDA GPU (elsewhere torch's AdamW steps): the
        # engine checks it once the run's device is known (check_cuda_libraries).
        if self.compile_mode not in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
            raise DreamBoothError(f"--compile_mode {self.compile_mode}: choose default, reduce-overhead or max-autotune")
        if self.compile:
            check_compile_support()
        if self.with_prior_preservation and self.prior_loss_weight < 0:
            raise DreamBoothError(f"--prior_loss_weight {self.prior_loss_weight}: must not be negative")
        try:
            Path("photo1.jpg").with_suffix(self.caption_extension)
        except ValueError:
            raise DreamBoothError(f"--caption_extension {self.caption_extension}: give an extension with its dot, "
                                  "e.g. .txt") from None
        if not 0 <= self.caption_dropout < 1:
            raise DreamBoothError(f"--caption_dropout {self.caption_dropout}: must be in [0, 1)")
        if self.text_encoder_lr is not None and self.text_encoder_lr <= 0:
            raise DreamBoothError(f"--text_encoder_lr {self.text_encoder_lr}: must be positive")
        if self.stop_text_encoder_training is not None and self.stop_text_encoder_training < 0:
            raise DreamBoothError(
                f"--stop_text_encoder_training {self.stop_text_encoder_training}: must not be negative")
        if self.stop_text_encoder_training is not None and not self.train_text_encoder:
            raise DreamBoothError("--stop_text_encoder_training needs --train_text_encoder")
        self._check_concepts()
        if self.use_lora and self.rank < 1:
            raise DreamBoothError(f"--rank {self.rank}: must be at least 1")
        if self.use_lora and not self.lora_target_modules:
            raise DreamBoothError("--lora_target_modules: name at least one module")
        if not 0 <= self.lora_dropout < 1:
            raise DreamBoothError(f"--lora_dropout {self.lora_dropout}: must be in [0, 1)")
        if (self.num_validation_images or 0) < 0 or self.validation_steps < 1 or self.logging_steps < 1:
            raise DreamBoothError(
                "--num_validation_images must not be negative; --validation_steps and --logging_steps must be at least 1"
            )
        if self.num_validation_images != 0 or self.eval_steps:
            _check_generation_numbers(None, self.validation_inference_steps, self.validation_scheduler,
                                      flags=("--resolution", "--validation_inference_steps", "--validation_scheduler"))
        if self.eval_steps is not None:
            self._check_evaluation()
        if self.checkpointing_steps < 1:
            raise DreamBoothError(f"--checkpointing_steps {self.checkpointing_steps}: must be at least 1")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise DreamBoothError(f"--checkpoints_total_limit {self.checkpoints_total_limit}: must be at least 1")
        check_writable_dir(self.output_dir, "--output_dir")
        if self.push_to_hub:
            self._check_hub()
        self._refuse_to_overwrite()

    # Flags that may name a local file or folder; a saved config records those as absolute paths.
    PATH_FLAGS = ("pretrained_model_name_or_path", "tokenizer_name", "instance_data_dir", "class_data_dir",
                  "concepts_list", "dataset_name", "output_dir", "resume_from_checkpoint", "eval_dino_model",
                  "eval_clip_model")
    # Those and --logging_dir (relative to --output_dir, so never made absolute) take ~ for the home folder.
    PATH_FIELDS = PATH_FLAGS + ("logging_dir",)

    def with_absolute_paths(self) -> "TrainConfig":
        """This config with every local path made absolute, so the saved ``train_config.yaml`` works as
        ``--config`` from any folder (and ``infer.py --checkpoint`` finds a local base). A Hub id, or a
        name that is no local path, stays as it is; the Hub upload reduces local paths to their names."""
        resolved = {name: str(Path(value).expanduser().resolve()) for name in self.PATH_FLAGS
                    if (value := getattr(self, name)) and (name == "output_dir" or Path(value).expanduser().exists())}
        return dataclasses.replace(self, **resolved)

    def peak_learning_rate(self) -> float:
        """--learning_rate, or its default: 5e-6 for the full weights (diffusers' train_dreambooth.py),
        1e-4 for LoRA adapters, which start at zero and need larger steps."""
        if self.learning_rate is not None:
            return self.learning_rate
        return 1e-4 if self.use_lora else 5e-6

    def trackers(self) -> list[str] | str:
        """The trackers --report_to names: a list (empty for none), or "all" (every one installed)."""
        if self.report_to.strip() == "all":
            return "all"
        names = [name.strip() for name in self.report_to.split(",") if name.strip()]
        return [] if names == ["none"] else list(dict.fromkeys(names))

    def _check_tracker(self) -> None:
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

        trackers = self.trackers()
        if trackers == "all":
            return
        unknown = [name for name in trackers if name not in LOGGER_TYPE_TO_CLASS]
        if unknown:
            raise DreamBoothError(f"--report_to {self.report_to}: {unknown[0]!r} is not a tracker; choose "
                                  f"{', '.join(LOGGER_TYPE_TO_CLASS)} (several comma-separated), all or none")
        installed = {str(tracker.value) for tracker in get_available_trackers()}
        missing = [name for name in trackers if name not in installed]
        if missing:
            raise DreamBoothError(f"--report_to {self.report_to}: {missing[0]} is not installed (pip install {missing[0]})")

    def hub_repo_id(self) -> str:
        """The repo a push goes to: --hub_model_id, else the output folder's name."""
        return self.hub_model_id or Path(self.output_dir).resolve().name

    def _check_hub(self) -> None:
        """What the push after training needs, checked before training: a repo id and a token."""
        from huggingface_hub import get_token

        check_repo_id(self.hub_repo_id(), "--hub_model_id" if self.hub_model_id else
                      "--push_to_hub without --hub_model_id: the --output_dir name")
        if not (self.hub_token or get_token()):
            raise DreamBoothError("--push_to_hub: no Hub token; run `hf auth login`, set HF_TOKEN or pass --hub_token")

    def _check_data_source(self) -> None:
        given = [flag for flag, value in (("--instance_data_dir", self.instance_data_dir),
                                          ("--dataset_name", self.dataset_name),
                                          ("--concepts_list", self.concepts_list)) if value]
        if not given:
            raise DreamBoothError("--instance_data_dir is required (or --dataset_name, or --concepts_list)")
        if len(given) > 1:
            raise DreamBoothError(f"give one of {' and '.join(given)}, not both")
        refuse_beside_concepts_list(self, ("instance_prompt", "class_data_dir", "class_prompt"))
        if not self.concepts_list and (not self.instance_prompt or not self.instance_prompt.strip()):
            raise DreamBoothError("--instance_prompt is required and must not be empty")
        if self.repeats < 1:
            raise DreamBoothError(f"--repeats {self.repeats}: must be at least 1")

    def concepts(self) -> list:
        """The concepts to learn: the --concepts_list file's, or the single-concept flags'."""
        from .concepts import Concept, load_concepts_list

        if self.concepts_list:
            return load_concepts_list(self.concepts_list, self.num_class_images, self.repeats)
        return [Concept(self.instance_prompt, self.instance_data_dir, self.class_data_dir, self.class_prompt,
                        self.num_class_images, self.repeats)]

    def _check_concepts(self) -> None:
        """Every concept's folders, images and captions, read once before any model loads."""
        from .concepts import check_concepts, dataset_examples, instance_examples
        from .data import check_image_folder, path_kind

        concepts = self.concepts()
        check_concepts(concepts, self.with_prior_preservation, self.concepts_list)
        for number, concept in enumerate(concepts):
            if concept.instance_data_dir:
                check_image_folder(concept.instance_data_dir, "--instance_data_dir", self.resolution)
                instance_examples(concept, number, self.caption_extension, self.caption_column or "text")
            if concept.class_data_dir and path_kind(concept.class_data_dir,
                                                    f"--class_data_dir {concept.class_data_dir}") == "file":
                raise DreamBoothError(f"--class_data_dir {concept.class_data_dir}: exists and is not a folder")
            if self.with_prior_preservation:
                _check_class_folder(concept.class_data_dir, concept.num_class_images)
        if self.dataset_name:
            dataset_examples(self.dataset_name, self.image_column, self.caption_column, self.instance_prompt)

    def _check_evaluation(self) -> None:
        from .evaluation import check_encoder_source

        if self.eval_steps < 1 or self.eval_num_prompts < 1 or self.eval_images_per_prompt < 1:
            raise DreamBoothError("--eval_steps, --eval_num_prompts and --eval_images_per_prompt must be at least 1")
        concepts = self.concepts()
        if not concepts[0].instance_data_dir:
            raise DreamBoothError("--eval_steps compares with the subject images of an --instance_data_dir")
        for flag in ("eval_identifier", "eval_class_noun"):
            if len(concepts) > 1 and getattr(self, flag) is not None:
                raise DreamBoothError(
                    f"--{flag}: --concepts_list {self.concepts_list} has {len(concepts)} concepts, each scored with "
                    f"the identifier and class noun of its own prompts (or its own {flag} key); leave out the flag")
        for concept in concepts:
            if not _prompt_words(concept.instance_prompt):
                raise DreamBoothError(f"--eval_steps: the instance prompt '{concept.instance_prompt}' has no word beside "
                                      "[filewords] to read the identifier and class noun off; write them into it")
        # One read off the prompt is a word of it; one given (a key, or the flag) may not be.
        for number, (concept, (identifier, _)) in enumerate(zip(concepts, self.eval_subjects())):
            if identifier not in _prompt_words(concept.instance_prompt):
                given = (f"--concepts_list {self.concepts_list}, concept {number}: eval_identifier"
                         if concept.eval_identifier else "--eval_identifier")
                raise DreamBoothError(f"{given} {identifier}: not a word of the instance prompt "
                                      f"'{concept.instance_prompt}'")
        for flag in ("eval_dino_model", "eval_clip_model"):
            check_encoder_source(getattr(self, flag), f"--{flag}")

    def eval_subjects(self) -> list[tuple[str, str]]:
        """(identifier, class noun) of each concept for --eval_steps, read off its instance and class
        prompts ('a photo of sks dog', 'a photo of a dog' -> 'sks', 'dog'); a concept's own
        eval_identifier and eval_class_noun keys, or a single concept's flags, take precedence."""
        concepts = self.concepts()
        single = len(concepts) == 1
        return [_eval_subject(concept.instance_prompt, concept.class_prompt,
                              concept.eval_identifier or (self.eval_identifier if single else None),
                              concept.eval_class_noun or (self.eval_class_noun if single else None))
                for concept in concepts]

    def validation_prompts(self) -> list[str]:
        if self.validation_prompt:
            return list(self.validation_prompt)
        from .concepts import trigger_phrase

        prompts = dict.fromkeys(trigger_phrase(concept.instance_prompt) for concept in self.concepts())
        return [text for prompt in prompts for text in (prompt, f"{prompt} on the beach")]

    def save_dtype(self):
        import torch

        default = "fp32" if self.use_lora else "fp16"
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.save_precision or default]

    def _refuse_to_overwrite(self) -> None:
        from .checkpoints import find_checkpoints

        if self.overwrite_output_dir:
            return
        output = Path(self.output_dir)
        finished = (output / "model_index.json").is_file() or (output / "pytorch_lora_weights.safetensors").is_file()
        if self.resume_from_checkpoint == "latest" and finished and not find_checkpoints(output):
            raise DreamBoothError(
                f"--resume_from_checkpoint latest: {output} holds a trained model and no checkpoint to resume; "
                "choose another --output_dir, or pass --overwrite_output_dir to train it afresh"
            )
        if self.resume_from_checkpoint:
            return
        if finished:
            raise DreamBoothError(
                f"--output_dir {output} already holds a trained model; choose another folder, or pass "
                "--overwrite_output_dir to replace it"
            )
        if find_checkpoints(output):
            raise DreamBoothError(
                f"--output_dir {output} holds checkpoints of an earlier run; pass --resume_from_checkpoint latest "
                "to continue it, or --overwrite_output_dir to start afresh"
            )


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def check_compile_support(flag: str = "--compile") -> None:
    """torch.compile of a model on a CUDA GPU needs Triton, which PyTorch's Windows wheels do not bring
    along: said now, not in a traceback at the first step."""
    import torch

    from .models import cpu_only

    if torch.cuda.is_available() and not cpu_only() and not _importable("triton"):
        raise DreamBoothError(f"{flag}: torch.compile on a CUDA GPU needs Triton, which is not installed "
                              "(on Windows: pip install triton-windows; elsewhere: pip install triton), or drop the flag")


SCHEDULER_NAMES = ("dpm++", "unipc", "ddim", "euler", "euler_a", "pndm", "ddpm")
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


def refuse_beside_concepts_list(cfg: Any, flags: Sequence[str]) -> None:
    """Flags that name one concept are refused beside a --concepts_list, not ignored."""
    for flag in flags:
        if cfg.concepts_list and getattr(cfg, flag):
            raise DreamBoothError(f"--{flag}: a --concepts_list gives each concept its own; set {flag} in "
                                  f"{cfg.concepts_list} and leave out the flag")


def _prompt_words(prompt: str | None) -> list[str]:
    """The words of a prompt as a user types it: commas and a [filewords] caption left out."""
    from .concepts import trigger_phrase

    return trigger_phrase(prompt or "").replace(",", " ").split()


def _eval_subject(instance_prompt: str, class_prompt: str | None, identifier: str | None,
                  class_noun: str | None) -> tuple[str, str]:
    """(identifier, class noun) of one concept: those given, else read off the prompts. A class prompt
    that lacks one word of the instance prompt is that prompt without its identifier ('a photo of sks
    dog, best quality' and 'a photo of dog, best quality'): that word is the identifier, and the class
    noun the word after it where the class prompt has it, else the class prompt's last word. Otherwise
    the class noun is the last word of the class prompt (else of the instance prompt) and the
    identifier the word before it in the instance prompt ('a photo of sks dog' -> 'sks', 'dog'); an
    instance prompt without the class noun ends with its identifier or a noun of its own: the word
    before the last, unless the class prompt has it too ('of' of 'a photo of sks' beside 'a photo of
    a dog'), which a rare identifier is not; then the last word the class prompt lacks."""
    words = _prompt_words(instance_prompt)
    class_words = _prompt_words(class_prompt)
    rare = [word for word in words if word not in class_words] if class_words else []
    if len(set(rare)) == 1:
        identifier = identifier or rare[0]
        following = words[words.index(identifier) + 1:][:1] if identifier in words else []
        return identifier, class_noun or (following[0] if following and following[0] in class_words
                                          else class_words[-1])
    class_noun = class_noun or (class_words or words)[-1]
    if identifier is None:
        position = words.index(class_noun) if class_noun in words else len(words) - 1
        identifier = words[max(position - 1, 0)]
        if class_noun not in words and identifier in class_words and rare:
            identifier = rare[-1]
    return identifier, class_noun


def _check_class_folder(folder: str, num_class_images: int) -> None:
    """A class folder that class images will be generated into must take them: found now, not after a
    first batch was generated."""
    from .data import list_image_files, path_kind

    if (path_kind(folder, f"--class_data_dir {folder}") != "folder"
            or len(list_image_files(folder, "--class_data_dir")) < num_class_images):
        check_writable_dir(folder, "--class_data_dir")


def check_writable_dir(path: str, flag: str) -> Path:
    """Create ``path`` if needed and prove that a file can be written in it."""
    from .data import path_kind

    folder = Path(path)
    if path_kind(folder, f"{flag} {path}") == "file":
        raise DreamBoothError(f"{flag} {path}: exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as error:
        raise DreamBoothError(f"{flag} {path}: not writable ({error.strerror or error})") from None
    return folder


@dataclasses.dataclass(frozen=True)
class GenerateClassImagesConfig:
    """Flags of generate_class_images.py."""

    PATH_FIELDS = ("pretrained_model_name_or_path", "class_data_dir", "concepts_list")  # ~ is the home folder in them

    pretrained_model_name_or_path: Optional[str] = _field(None, "Base model: a diffusers folder or a Hub id (required).")
    revision: Optional[str] = _field(None, "Revision of the base model on the Hub.")
    variant: Optional[str] = _field(None, "Weight file variant of the base model, e.g. fp16.")
    class_prompt: Optional[str] = _field(
        None, "Prompt for the class, e.g. 'a photo of a dog' (required, unless --concepts_list).")
    class_data_dir: Optional[str] = _field(None, "Folder to fill with class images (required, unless --concepts_list).")
    concepts_list: Optional[str] = _field(
        None, "A --concepts_list file of train_dreambooth.py: fill every concept's class_data_dir with its "
        "class_prompt, as training would, instead of --class_prompt and --class_data_dir."
    )
    num_class_images: int = _field(100, "Images wanted in the folder; only the missing ones are generated "
                                   "(also each --concepts_list concept's that sets none).")
    sample_batch_size: int = _field(4, "Images per pipeline call.")
    resolution: Optional[int] = _field(
        None, "Image size in pixels (multiple of 8; default: the model's, 512 for SD 1.x, 768 for SD 2.x 768-v)."
    )
    num_inference_steps: int = _field(25, "Denoising steps.")
    guidance_scale: float = _field(7.5, "Classifier-free guidance scale.")
    scheduler: str = _field("dpm++", f"Sampler: {', '.join(SCHEDULER_NAMES)}.")
    prior_generation_precision: Optional[Literal["no", "fp32", "fp16", "bf16"]] = _field(
        None, "Precision (default or no: fp16 on GPU, fp32 on CPU)."
    )
    seed: int = _field(0, "Base seed; image i uses a seed derived from (seed, i), and that of --concepts_list "
                       "concept k > 0 one from (seed, i, k).")
    channels_last: bool = _field(
        True, "Keep the UNet and VAE in channels_last memory format (1.3x the images/s on an H200; "
        "--no_channels_last keeps the default layout)."
    )
    compile: bool = _field(
        False, "torch.compile the UNet: faster images after a compilation of a minute or so, so worth it for "
        "hundreds of images."
    )
    cudnn_benchmark: bool = _field(
        False, "Let cuDNN time its convolution algorithms for the batch's shapes and keep the fastest (CUDA; "
        "the first batch is slower). Not bit-reproducible from run to run."
    )

    def validate(self) -> None:
        from .bases import check_base_model
        from .concepts import check_class_folders

        required = ("pretrained_model_name_or_path",) if self.concepts_list else (
            "pretrained_model_name_or_path", "class_prompt", "class_data_dir")
        for flag in required:
            if not getattr(self, flag) or not str(getattr(self, flag)).strip():
                raise DreamBoothError(f"--{flag} is required")
        refuse_beside_concepts_list(self, ("class_prompt", "class_data_dir"))
        check_base_model(self.pretrained_model_name_or_path, revision=self.revision, variant=self.variant)
        _check_generation_numbers(self.resolution, self.num_inference_steps, self.scheduler)
        for name in ("num_class_images", "sample_batch_size"):
            if getattr(self, name) < 1:
                raise DreamBoothError(f"--{name} {getattr(self, name)}: must be at least 1")
        if self.compile:
            check_compile_support()
        concepts = self.concepts()
        if self.concepts_list:
            # What training with --with_prior_preservation asks of the list's class folders; the
            # instance folders may be on another machine.
            check_class_folders(concepts, self.concepts_list)
        for concept in concepts:
            _check_class_folder(concept.class_data_dir, concept.num_class_images)  # a full folder is only read

    def concepts(self) -> list:
        """The concepts whose class folders to fill: the --concepts_list file's, read as
        train_dreambooth.py reads it, or the one of --class_prompt and --class_data_dir (with no
        instance prompt: class images need none)."""
        from .concepts import Concept, load_concepts_list

        if self.concepts_list:
            return load_concepts_list(self.concepts_list, self.num_class_images)
        return [Concept("", class_data_dir=self.class_data_dir, class_prompt=self.class_prompt,
                        num_class_images=self.num_class_images)]


def _check_generation_numbers(resolution: int | None, steps: int, scheduler: str,
                              flags: tuple[str, str, str] = ("--resolution", "--num_inference_steps", "--scheduler"),
                              ) -> None:
    resolution_flag, steps_flag, scheduler_flag = flags
    if resolution is not None and (resolution <= 0 or resolution % 8):  # None: the model's own size
        raise DreamBoothError(f"{resolution_flag} {resolution}: must be a positive multiple of 8")
    if steps < 1:
        raise DreamBoothError(f"{steps_flag} {steps}: must be at least 1")
    if scheduler not in SCHEDULER_NAMES:
        raise DreamBoothError(f"{scheduler_flag} {scheduler}: choose one of {', '.join(SCHEDULER_NAMES)}")


def check_device(device: str) -> None:
    """``--device`` names a device this machine has (or auto)."""
    import torch

    if device == "auto":
        return
    try:
        chosen = torch.device(device)
    except RuntimeError:
        chosen = None
    present = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if chosen is None or chosen.type not in present:
        raise DreamBoothError(f"--device {device}: choose cuda, mps, cpu or auto")
    count = torch.cuda.device_count() if chosen.type == "cuda" else 1
    if not present[chosen.type] or (chosen.index or 0) >= count:
        raise DreamBoothError(f"--device {device}: not present on this machine; use --device auto or cpu")


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """The model to sample: a trained folder or Hub id, or a checkpoint or LoRAs over a base."""

    PATH_FIELDS = ("pretrained_model_name_or_path", "checkpoint", "lora")  # ~ is the home folder in them

    pretrained_model_name_or_path: Optional[str] = _field(
        None, "Trained output folder or Hub id; with --checkpoint or --lora, the base model "
        "(with --checkpoint, default: the base its run recorded)."
    )
    checkpoint: Optional[str] = _field(None, "A checkpoint-<step> folder, over the base model.")
    lora: list[str] = _field([], "LoRA weights (a folder, a .safetensors file, or a LoRA run's Hub repo id) over "
                             "the model; repeatable.", action="extend")
    lora_scale: list[float] = _field([], "Strength of each --lora (one value for all, or one per --lora; default 1).",
                                     action="extend")
    lora_revision: list[str] = _field([], "Revision (branch, tag or commit) of each --lora given by Hub repo id "
                                      "(one value for all, or one per --lora, '' for a local one; default: main).",
                                      action="extend")
    revision: Optional[str] = _field(None, "Revision of the model on the Hub (with --checkpoint over the base its "
                                           "run recorded, default: the run's).")
    variant: Optional[str] = _field(None, "Weight file variant, e.g. fp16 (with --checkpoint, default: the run's).")

    def lora_revisions(self) -> list[str | None]:
        """--lora_revision for each --lora: none, one value for all, or one per --lora ('' for none)."""
        revisions = list(self.lora_revision) * len(self.lora) if len(self.lora_revision) == 1 else self.lora_revision
        return [revision or None for revision in revisions] or [None] * len(self.lora)


@dataclasses.dataclass(frozen=True)
class InferConfig(ModelSource):
    """Flags of infer.py."""

    PATH_FIELDS = ModelSource.PATH_FIELDS + ("prompts_file", "output_dir")

    prompt: list[str] = _field([], "Prompt; repeat the flag for several.", action="extend")
    prompts_file: Optional[str] = _field(None, "Text file with one prompt a line (blank and # lines skipped).")
    negative_prompt: Optional[str] = _field(None, "What the images should not show.")
    num_images_per_prompt: int = _field(4, "Images per prompt.")
    seed: Optional[int] = _field(None, "Seed of the first image of each prompt; image j uses seed + j (default: random).")
    guidance_scale: float = _field(7.5, "Classifier-free guidance scale.")
    num_inference_steps: int = _field(25, "Denoising steps.")
    scheduler: str = _field("dpm++", f"Sampler: {', '.join(SCHEDULER_NAMES)}.")
    height: Optional[int] = _field(None, "Image height (default: the model's).")
    width: Optional[int] = _field(None, "Image width (default: the model's).")
    batch_size: int = _field(4, "Images per pipeline call.")
    output_dir: str = _field("samples", "Folder for the images and grids.")
    device: str = _field("auto", "cuda, mps, cpu or auto (CUDA, else MPS, else CPU); under `accelerate launch`, "
                         "each process takes its own GPU.")
    dtype: str = _field("auto", "fp32, fp16, bf16 or auto (fp16 on GPU, fp32 on CPU).")

    def validate(self) -> None:
        from .bases import check_base_model, check_lora_source
        from .checkpoints import MARKER

        if self.checkpoint and not (Path(self.checkpoint) / MARKER).is_file():
            raise DreamBoothError(f"--checkpoint {self.checkpoint}: not a complete checkpoint folder (no {MARKER})")
        if not self.base_model():
            raise DreamBoothError("--pretrained_model_name_or_path is required")
        check_base_model(self.base_model(), revision=self.base_revision(), variant=self.base_variant(),
                         takes_lora=True)
        if not self.prompt and not self.prompts_file:
            raise DreamBoothError("give --prompt (repeatable) or --prompts_file")
        if self.prompts_file and not Path(self.prompts_file).is_file():
            raise DreamBoothError(f"--prompts_file {self.prompts_file}: file not found")
        if self.num_images_per_prompt < 1:
            raise DreamBoothError(f"--num_images_per_prompt {self.num_images_per_prompt}: must be at least 1")
        if self.lora_revision and not self.lora:
            raise DreamBoothError(f"--lora_revision {' '.join(self.lora_revision)}: needs a --lora given by Hub repo id")
        if len(self.lora_revision) not in (0, 1, len(self.lora)):
            raise DreamBoothError(f"--lora_revision: give one value, or one per --lora ({len(self.lora)})")
        for path, revision in zip(self.lora, self.lora_revisions()):
            check_lora_source(path, "--lora", revision)
        if len(self.lora_scale) not in (0, 1, len(self.lora)):
            raise DreamBoothError(f"--lora_scale: give one value, or one per --lora ({len(self.lora)})")
        if self.batch_size < 1:
            raise DreamBoothError(f"--batch_size {self.batch_size}: must be at least 1")
        _check_generation_numbers(None, self.num_inference_steps, self.scheduler)
        for flag in ("height", "width"):
            value = getattr(self, flag)
            if value is not None and (value <= 0 or value % 8):
                raise DreamBoothError(f"--{flag} {value}: must be a positive multiple of 8")
        if self.dtype not in ("auto", "fp32", "fp16", "bf16"):
            raise DreamBoothError(f"--dtype {self.dtype}: choose auto, fp32, fp16 or bf16")
        check_device(self.device)
        check_writable_dir(self.output_dir, "--output_dir")

    def base_model(self) -> str | None:
        """The model to load: the flag, or for a checkpoint the base model its run recorded."""
        return self._base_setting("pretrained_model_name_or_path")

    def base_revision(self) -> str | None:
        """--revision, or for a checkpoint over its recorded base, the revision its run trained on."""
        return self.revision or self._base_setting("revision")

    def base_variant(self) -> str | None:
        """--variant, or for a checkpoint over its recorded base, the variant its run loaded."""
        return self.variant or self._base_setting("variant")

    def _base_setting(self, name: str) -> str | None:
        """``name`` from the checkpoint's train_config.yaml, when the base model is the one it recorded."""
        if self.pretrained_model_name_or_path or not self.checkpoint:
            return getattr(self, name)
        run_config = Path(self.checkpoint).parent / TRAIN_CONFIG
        if run_config.is_file():
            return (yaml.safe_load(run_config.read_text(encoding="utf-8")) or {}).get(name)
        return None

    def prompts(self) -> list[str]:
        from .generation import read_prompts

        prompts = list(self.prompt)
        if self.prompts_file:
            prompts += read_prompts(self.prompts_file, f"--prompts_file {self.prompts_file}")
        return prompts


@dataclasses.dataclass(frozen=True)
class PushToHubConfig:
    """Flags of push_to_hub.py (the output folder may also come first, without --output_dir)."""

    PATH_FIELDS = ("output_dir",)  # ~ is the home folder in it

    output_dir: Optional[str] = _field(None, "Finished output folder of train_dreambooth.py (required).")
    hub_model_id: Optional[str] = _field(None, "Repo to push to: 'owner/name', or 'name' in your account (required).")
    # repr=False: the token stays out of reprs and tracebacks.
    hub_token: Optional[str] = dataclasses.field(
        default=None, repr=False,
        metadata={"help": "Hugging Face token with write access (default: HF_TOKEN or `hf auth login`)."},
    )
    private: bool = _field(False, "Create a new repo as private (default: the account's default visibility).")
    push_checkpoints: bool = _field(False, "Upload the checkpoint-* folders too.")

    def validate(self) -> None:
        if not self.output_dir:
            raise DreamBoothError("give the output folder: python push_to_hub.py OUTPUT_DIR --hub_model_id owner/name")
        from .hub import check_finished_output

        check_finished_output(self.output_dir)
        if not self.hub_model_id:
            raise DreamBoothError("--hub_model_id is required, e.g. --hub_model_id your-name/sks-dog")
        check_repo_id(self.hub_model_id, "--hub_model_id")


def check_repo_id(repo_id: str, what: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise DreamBoothError(
            f"{what} {repo_id}: not a repo id like 'owner/name' (letters, digits, '-', '_', '.')"
        ) from None


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """Flags of export.py."""

    PATH_FIELDS = ("output_dir", "output")  # ~ is the home folder in them

    output_dir: Optional[str] = _field(None, "The training run's output folder (or the positional OUTPUT_DIR).")
    output: Optional[str] = _field(None, "The .safetensors file to write (required).")
    format: Literal["auto", "sd", "kohya"] = _field(
        "auto", "sd: one original-layout checkpoint of a full fine-tune; kohya: a LoRA run as a kohya/A1111 LoRA; "
        "auto: sd for a pipeline folder, kohya for a LoRA run."
    )
    precision: Optional[Literal["fp32", "fp16", "bf16"]] = _field(
        None, "Tensor precision (default: fp16 for --format sd, half the size and what web UIs load; "
        "for kohya, the LoRA's own precision)."
    )
    overwrite: bool = _field(False, "Replace an existing --output file.")

    def validate(self) -> None:
        if not self.output_dir:
            raise DreamBoothError("give the training output folder: export.py OUTPUT_DIR --output FILE.safetensors")
        if Path(self.output_dir).is_file():
            raise DreamBoothError(f"OUTPUT_DIR {self.output_dir}: a file; export.py turns a training run's output "
                                  "folder into one .safetensors file")
        if not Path(self.output_dir).is_dir():
            raise DreamBoothError(f"OUTPUT_DIR {self.output_dir}: no such folder")
        if not self.output:
            raise DreamBoothError("--output is required (the .safetensors file to write)")
        output = Path(self.output)
        if output.suffix != ".safetensors":
            raise DreamBoothError(f"--output {self.output}: must end in .safetensors")
        if output.is_dir():
            raise DreamBoothError(f"--output {self.output}: is a folder; give a file name")
        if output.exists() and not self.overwrite:
            raise DreamBoothError(f"--output {self.output}: file exists; pass --overwrite to replace it")
        if self.format not in ("auto", "sd", "kohya"):
            raise DreamBoothError(f"--format {self.format}: choose auto, sd or kohya")
        if self.precision is not None and self.precision not in ("fp32", "fp16", "bf16"):
            raise DreamBoothError(f"--precision {self.precision}: choose fp32, fp16 or bf16")
        if self.resolved_format() == "sd":
            from .bases import check_base_model

            check_base_model(self.output_dir, "OUTPUT_DIR")

    def resolved_format(self) -> str:
        """``sd`` or ``kohya``: --format, or for auto what the output folder holds."""
        from .export import resolve_format

        return resolve_format(Path(self.output_dir), self.format)


@dataclasses.dataclass(frozen=True)
class EvaluateConfig(ModelSource):
    """Flags of evaluate.py."""

    PATH_FIELDS = ModelSource.PATH_FIELDS + ("generated_dir", "instance_data_dir", "prompts_file", "dino_model",
                                             "clip_model", "output_dir")

    generated_dir: Optional[str] = _field(
        None, "Score this folder of generated images instead of generating (prompts from prompts.json "
        "or the PNGs' text metadata, as infer.py writes them)."
    )
    instance_data_dir: Optional[str] = _field(None, "Folder of real subject images (required).")
    identifier: Optional[str] = _field(None, "The subject's identifier token, e.g. sks (required).")
    class_noun: Optional[str] = _field(None, "The subject's class, e.g. dog (required when generating).")
    prompt_set: Literal["object", "live"] = _field("object", "The paper's 25 prompts: object, or live for pets.")
    prompts_file: Optional[str] = _field(
        None, "Prompt templates, one a line, {} for the subject; overrides --prompt_set."
    )
    num_prompts: Optional[int] = _field(None, "Use only the first N prompts (a quick run).")
    num_images_per_prompt: int = _field(4, "Images per prompt, for the subject and for the class prompts.")
    seed: int = _field(0, "Image j of every prompt uses seed + j.")
    num_inference_steps: int = _field(25, "Denoising steps.")
    guidance_scale: float = _field(7.5, "Classifier-free guidance scale.")
    scheduler: str = _field("dpm++", "Sampler: dpm++, unipc, ddim, euler, euler_a, pndm or ddpm.")
    resolution: Optional[int] = _field(None, "Image size in pixels (default: the model's).")
    batch_size: int = _field(4, "Images per pipeline call.")
    dino_model: str = _field("facebook/dino-vits16", "DINO model (Hub id or local folder) for DINO, PRES and DIV.")
    clip_model: str = _field(
        "openai/clip-vit-base-patch32", "CLIP model (Hub id or local folder) for CLIP-I and CLIP-T."
    )
    output_dir: str = _field("eval", "Folder for metrics.json, the contact sheet and the generated images.")
    device: str = _field("auto", "cuda, mps, cpu or auto (CUDA, else MPS, else CPU).")
    dtype: str = _field("auto", "Pipeline precision: fp32, fp16, bf16 or auto (fp16 on GPU, fp32 on CPU).")

    def validate(self) -> None:
        from .data import list_image_files
        from .evaluation import check_encoder_source

        if not self.instance_data_dir:
            raise DreamBoothError("--instance_data_dir is required (the real subject images)")
        if not list_image_files(self.instance_data_dir, "--instance_data_dir"):
            raise DreamBoothError(f"--instance_data_dir {self.instance_data_dir}: no images found")
        if not self.identifier or not self.identifier.strip():
            raise DreamBoothError("--identifier is required, e.g. --identifier sks")
        for flag in ("dino_model", "clip_model"):
            check_encoder_source(getattr(self, flag), f"--{flag}")
        check_device(self.device)
        if self.generated_dir:
            if self.pretrained_model_name_or_path or self.checkpoint or self.lora or self.lora_revision:
                raise DreamBoothError("give --generated_dir or a model to generate with, not both")
            if not Path(self.generated_dir).is_dir():
                raise DreamBoothError(f"--generated_dir {self.generated_dir}: folder not found")
        else:
            self._validate_generation()
        check_writable_dir(self.output_dir, "--output_dir")

    def _validate_generation(self) -> None:
        if not self.class_noun or not self.class_noun.strip():
            raise DreamBoothError("--class_noun is required to build the prompts, e.g. --class_noun dog")
        for name in ("num_images_per_prompt", "batch_size"):
            if getattr(self, name) < 1:
                raise DreamBoothError(f"--{name} {getattr(self, name)}: must be at least 1")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise DreamBoothError(f"--num_prompts {self.num_prompts}: must be at least 1")
        _check_generation_numbers(self.resolution, self.num_inference_steps, self.scheduler)
        self.model_source().validate()
        self.templates()

    def model_source(self) -> InferConfig:
        """The model and sampler settings as infer.py's config, so both check and load them alike."""
        return InferConfig(
            pretrained_model_name_or_path=self.pretrained_model_name_or_path, checkpoint=self.checkpoint,
            lora=list(self.lora), lora_scale=list(self.lora_scale), lora_revision=list(self.lora_revision),
            revision=self.revision, variant=self.variant,
            prompt=["(evaluation prompts)"], num_images_per_prompt=self.num_images_per_prompt, seed=self.seed,
            guidance_scale=self.guidance_scale, num_inference_steps=self.num_inference_steps,
            scheduler=self.scheduler, batch_size=self.batch_size, output_dir=self.output_dir,
            device=self.device, dtype=self.dtype,
        )

    def templates(self) -> list[str]:
        from .evaluation import PROMPT_SETS, PROMPTS_DIR, read_templates

        path = Path(self.prompts_file) if self.prompts_file else PROMPTS_DIR / PROMPT_SETS[self.prompt_set]
        flag = f"--prompts_file {path}" if self.prompts_file else f"--prompt_set {self.prompt_set} ({path})"
        return read_templates(path, flag)[: self.num_prompts]
