"""Several processes: real `accelerate launch` runs with 2 processes on the CPU (gloo).

`accelerate launch --cpu --num_processes 2` starts a single process unless given an mpirun
hostfile; `--multi_gpu` launches through torchrun, and with no GPU visible the processes meet
over gloo on the CPU (the script passes ``cpu=True`` to its Accelerator when no accelerator
is present).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import generate_class_images
import train_dreambooth
from conftest import ROOT, TOY_SUBJECT, one_thread, train_args
from dreambooth.checkpoints import MARKER
from dreambooth.config import TrainConfig, parse_config
from dreambooth.engine import check_engine_support, with_engine_defaults
from dreambooth.errors import DreamBoothError

pytestmark = pytest.mark.slow

ACCELERATE_CONFIGS = sorted((ROOT / "examples" / "accelerate").glob("*.yaml")) + [ROOT / "accelerate_config.yaml"]
ENGINES = {"accelerate_config.yaml": "NO", "multi_gpu.yaml": "MULTI_GPU", "two_nodes.yaml": "MULTI_GPU",
           "deepspeed_zero2.yaml": "DEEPSPEED", "fsdp.yaml": "FSDP"}
LR_LINE = re.compile(r"training [^\n]* accumulation\), lr (\S+)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(args: list[str], num_processes: int = 2, check: bool = True,
           script: Path = ROOT / "train_dreambooth.py", engine: tuple[str, ...] = ("--multi_gpu",)
           ) -> subprocess.CompletedProcess:
    """``script`` (train_dreambooth.py) under `accelerate launch` with ``num_processes`` CPU processes."""
    command = [sys.executable, "-m", "accelerate.commands.launch", *engine,
               "--num_processes", str(num_processes), "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               str(script), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    if check:
        assert result.returncode == 0, f"accelerate launch failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def unet_weights(output: Path) -> dict[str, torch.Tensor]:
    return load_file(output / "unet" / "diffusion_pytorch_model.safetensors")


def text_encoder_weights(output: Path) -> dict[str, torch.Tensor]:
    return load_file(output / "text_encoder" / "model.safetensors")


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_two_processes_of_one_equal_one_process_of_two(tiny_model, tmp_path, caplog):
    """DDP over 2 processes with batch 1 trains exactly like 1 process with batch 2.

    Why an exact comparison is possible: the data order is a seeded permutation that Accelerate
    deals out, so process 0 gets samples [0, 2, ...] and process 1 gets [1, 3, ...], while the
    single process gets batches [0, 1], [2, 3]: the same samples in each step. The random draws
    of the objective (VAE sample, noise, timesteps) come from the global RNG, which `--seed`
    seeds identically on every process; each process draws for the global batch of 2 and keeps
    its own row (training.BatchDraws), so its sample gets what the single process draws for it,
    and the two samples of a step get different noise and timesteps. The batch loss is the mean of
    the per-sample losses, and DDP averages the two processes' gradients: the same objective.

    To make the check see the gradient's scale (averaged, not summed), clipping is off and
    AdamW's epsilon is large, so an update is nearly proportional to the gradient. --scale_lr
    must give both runs the same learning rate: 1 x 2 processes = 2 x 1 process.
    """
    data = tmp_path / "instance"
    shutil.copytree(TOY_SUBJECT, data)
    common = ["--center_crop", "--save_precision", "fp32", "--scale_lr", "--learning_rate", "1e-2",
              "--max_grad_norm", "0", "--adam_epsilon", "1", "--adam_weight_decay", "0", "--max_train_steps", "2"]

    two = launch(train_args(tiny_model, data, tmp_path / "two", *common, "--train_batch_size", "1"))
    with caplog.at_level(logging.INFO, logger="dreambooth"), one_thread():
        train_dreambooth.main(train_args(tiny_model, data, tmp_path / "one", *common, "--train_batch_size", "2"))

    two_lr = LR_LINE.findall(two.stderr + two.stdout)
    one_lr = LR_LINE.findall(caplog.text)
    assert two_lr == ["0.02"] and one_lr == ["0.02"], (two_lr, one_lr)
    assert "batch 1 (x2 processes x1 accumulation)" in two.stderr + two.stdout

    base = load_file(Path(tiny_model) / "unet" / "diffusion_pytorch_model.safetensors")
    one, two_weights = unet_weights(tmp_path / "one"), unet_weights(tmp_path / "two")
    one_change = torch.cat([(one[name].float() - base[name].float()).flatten() for name in sorted(base)])
    two_change = torch.cat([(two_weights[name].float() - base[name].float()).flatten() for name in sorted(base)])
    assert one_change.abs().max() > 1e-5, "the reference run did not train"
    assert (two_change - one_change).abs().max() <= 1e-4 * one_change.abs().max(), (
        f"largest difference {(two_change - one_change).abs().max():.3g}, largest change {one_change.abs().max():.3g}"
    )


def test_weights_cast_once_train_under_ddp_as_autocast_casts_them(tiny_model, tmp_path):
    """--cast_weights_once over 2 DDP processes: DDP reduces the fp32 gradients the casts give back
    as it reduces autocast's, so the weights end bitwise the same (gradient checkpointing on)."""
    data = tmp_path / "instance"
    shutil.copytree(TOY_SUBJECT, data)
    common = ["--center_crop", "--save_precision", "fp32", "--mixed_precision", "bf16", "--learning_rate", "1e-3",
              "--gradient_checkpointing", "--max_train_steps", "2"]
    launch(train_args(tiny_model, data, tmp_path / "once", *common, "--cast_weights_once"))
    launch(train_args(tiny_model, data, tmp_path / "autocast", *common))
    once = unet_weights(tmp_path / "once")
    base = load_file(Path(tiny_model) / "unet" / "diffusion_pytorch_model.safetensors")
    assert max((once[name].float() - base[name].float()).abs().max() for name in base) > 1e-4, "no training"
    assert_bitwise_equal(once, unet_weights(tmp_path / "autocast"))


def ddp_and_sharded_runs(tiny_model, tmp_path, config: str, engine_files: str, resume_atol: float = 0.0):
    """A DDP run and a run under ``config`` (tests/engine_on_cpu.py), 4 steps with checkpoints at
    2 and 4: the two end with the same UNet to float precision, the engine saved its own state
    (``engine_files``, its way) beside the whole UNet in diffusers format, and a run resumed from
    checkpoint-2 ends bitwise equal to the uninterrupted one (within ``resume_atol`` if given)."""
    data = tmp_path / "instance"
    shutil.copytree(TOY_SUBJECT, data)
    engine = ("--config_file", str(ROOT / "examples" / "accelerate" / config))
    wrapper = ROOT / "tests" / "engine_on_cpu.py"

    def run(output: Path, *extra: str, engine: tuple[str, ...] = engine) -> None:
        args = train_args(tiny_model, data, output, "--center_crop", "--save_precision", "fp32",
                          "--learning_rate", "1e-3", "--max_train_steps", "4", "--checkpointing_steps", "2", *extra)
        if engine == ("--multi_gpu",):
            launch(args, engine=engine)
        else:
            launch([str(ROOT / "train_dreambooth.py"), *args], script=wrapper, engine=engine)

    run(tmp_path / "ddp", engine=("--multi_gpu",))
    run(tmp_path / "sharded")
    checkpoint = tmp_path / "sharded" / "checkpoint-2"
    assert list(checkpoint.glob(engine_files)), f"Accelerate did not save the model its {config} way"
    ddp, sharded = unet_weights(tmp_path / "ddp"), unet_weights(tmp_path / "sharded")
    base = load_file(Path(tiny_model) / "unet" / "diffusion_pytorch_model.safetensors")
    assert max((ddp[name] - base[name]).abs().max() for name in base) > 1e-4, "the DDP run did not train"
    for name in ddp:
        # FSDP's reduce-scatter sums the gradients in another order than DDP's all-reduce, and Adam's
        # m / sqrt(v) enlarges such last-bit differences where a gradient is near zero: 1e-5 is 1% of
        # one step's update at this learning rate (1.8e-6 was seen on one CPU).
        torch.testing.assert_close(sharded[name], ddp[name], rtol=1e-5, atol=1e-5, msg=name)
    from diffusers import UNet2DConditionModel

    at_step_2 = UNet2DConditionModel.from_pretrained(checkpoint / "unet").state_dict()
    assert at_step_2.keys() == base.keys() and not torch.equal(at_step_2["conv_in.weight"], base["conv_in.weight"])

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(checkpoint, resumed / checkpoint.name)
    run(resumed, "--resume_from_checkpoint", "latest")
    if resume_atol:
        for name, weight in unet_weights(resumed).items():
            torch.testing.assert_close(weight, sharded[name], rtol=0, atol=resume_atol, msg=name)
    else:
        assert_bitwise_equal(unet_weights(resumed), sharded)


def test_fsdp_config_trains_like_ddp_and_resumes_exactly(tiny_model, tmp_path):
    """examples/accelerate/fsdp.yaml: FSDP2 shards the UNet block by block and trains as DDP does;
    its checkpoints gather the UNet whole in diffusers format."""
    ddp_and_sharded_runs(tiny_model, tmp_path, "fsdp.yaml", "pytorch_model_fsdp.bin")


def test_deepspeed_config_trains_like_ddp_and_resumes_exactly(tiny_model, tmp_path):
    """examples/accelerate/deepspeed_zero2.yaml: ZeRO-2 shards the gradients and the optimizer
    states, which DeepSpeed's CPU Adam keeps in CPU memory, and clips at the config's 1.0 as
    --max_grad_norm 1.0 does under DDP. Needs deepspeed (not in requirements.txt); DeepSpeed
    compiles its CPU Adam with the system's C++ compiler on first use (about a minute).

    Resuming is exact to 1e-6 (weights move by ~4e-3 here), not bitwise: DeepSpeed's CPU Adam
    updates its float32 bias corrections step by step, but computes them afresh (pow) after
    loading its state, so a resumed update differs in the last bits; DeepSpeedCPUAdam alone,
    reloaded after 2 of 4 steps, differs by 2.4e-7 from an uninterrupted one."""
    pytest.importorskip("deepspeed")
    ddp_and_sharded_runs(tiny_model, tmp_path, "deepspeed_zero2.yaml", "pytorch_model/*optim_states.pt",
                         resume_atol=1e-6)


@pytest.fixture(scope="module")
def checkpointed_two_process_run(tiny_model, tmp_path_factory) -> tuple[Path, list[str]]:
    """A 2-process run of 4 steps training the UNet and the text encoder, with checkpoints at 2 and
    4 and validation samples at each."""
    root = tmp_path_factory.mktemp("two-process-run")
    data = root / "instance"
    shutil.copytree(TOY_SUBJECT, data)
    args = train_args(tiny_model, data, root / "out", "--save_precision", "fp32", "--max_train_steps", "4",
                      "--checkpointing_steps", "2", "--lr_scheduler", "linear", "--train_text_encoder")
    launch(args + ["--num_validation_images", "1", "--validation_inference_steps", "2", "--validation_steps", "2"])
    return root / "out", args


def test_only_the_main_process_writes_files(checkpointed_two_process_run, tiny_model):
    output, _ = checkpointed_two_process_run
    entries = list(output.rglob("*"))
    leftovers = [path for path in entries if path.name.startswith(".") or path.name.endswith((".tmp", ".staging"))]
    assert not leftovers, leftovers
    assert sorted(path.name for path in output.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    for checkpoint in output.glob("checkpoint-*"):
        assert [path.name for path in checkpoint.rglob(MARKER)] == [MARKER]
        assert sorted(path.name for path in checkpoint.glob("random_states_*.pkl")) == [
            "random_states_0.pkl", "random_states_1.pkl"]
        assert sorted(path.name for path in checkpoint.iterdir() if path.is_dir()) == ["text_encoder", "unet"]
    assert [path.relative_to(output) for path in output.rglob("model_index.json")] == [Path("model_index.json")]
    assert [path.relative_to(output) for path in output.rglob("README.md")] == [Path("README.md")]
    assert [path.relative_to(output) for path in output.rglob("train_config.yaml")] == [Path("train_config.yaml")]
    assert sorted(path.name for path in (output / "samples").iterdir()) == [
        "final.png", "final_0.png", "final_1.png", "step_2.png", "step_4.png"]
    # Both models were trained (and saved in fp32 by the main process).
    for weights, base in ((unet_weights(output), unet_weights(Path(tiny_model))),
                          (text_encoder_weights(output), text_encoder_weights(Path(tiny_model)))):
        assert any(not torch.equal(weights[name], base[name]) for name in base)


def test_two_process_checkpoint_resumes_on_two_and_on_one_process(checkpointed_two_process_run, tmp_path):
    output, args = checkpointed_two_process_run
    checkpoint = output / "checkpoint-2"

    # Same process count: the same weights as the uninterrupted run (which also drew validation
    # samples; they leave training undisturbed). A copy keeps the shared run's folder intact.
    resumed = tmp_path / "on-two"
    shutil.copytree(checkpoint, resumed / checkpoint.name)
    launch(args + ["--output_dir", str(resumed), "--resume_from_checkpoint", "latest"])
    assert_bitwise_equal(unet_weights(resumed), unet_weights(output))
    assert_bitwise_equal(text_encoder_weights(resumed), text_encoder_weights(output))

    # One process takes over the position (2 batches x 2 processes = 4 batches) and the linear
    # schedule, which Accelerate steps once per process: 4 steps x 1 process, not 2 x 2 + 2.
    with one_thread():
        trainer = train_dreambooth.main(args + ["--output_dir", str(tmp_path / "on-one"),
                                                "--resume_from_checkpoint", str(checkpoint)])
    assert trainer.state.global_step == 4 and trainer.state.num_processes == 1
    assert trainer.lr_scheduler.scheduler.last_epoch == 4
    assert (tmp_path / "on-one" / "model_index.json").is_file()


SIGNAL_ONE_PROCESS = """
import signal, sys
sys.path.insert(0, {root!r})
import train_dreambooth
from dreambooth.cli import run_cli
from dreambooth.training import Trainer

after_step = Trainer._after_step

def signalled_after_step(self, losses, progress):
    after_step(self, losses, progress)
    if self.state.global_step == {step} and self.accelerator.process_index == {process}:
        signal.raise_signal(signal.SIGTERM)

Trainer._after_step = signalled_after_step
sys.exit(run_cli(train_dreambooth.main))
"""


def test_sigterm_to_one_process_stops_all_at_the_same_step(tiny_model, tmp_path):
    """Preemption may reach one process only: it tells the others through the per-step sum of
    stop flags, and all save one checkpoint together StopAgreement.LAG steps later, the lag that
    spares them a read-back each step."""
    from dreambooth.training import StopAgreement

    script = tmp_path / "signal_one_process.py"
    script.write_text(SIGNAL_ONE_PROCESS.format(root=str(ROOT), step=2, process=1))
    data = tmp_path / "instance"
    shutil.copytree(TOY_SUBJECT, data)
    output = tmp_path / "out"
    result = launch(train_args(tiny_model, data, output, "--max_train_steps", "10", "--checkpointing_steps", "100"),
                    script=script, check=False)
    text = result.stdout + result.stderr
    assert result.returncode != 0  # stopped, not finished: `train && push` goes no further
    stop_step = 2 + StopAgreement.LAG
    assert f"SIGTERM: finishing this step and at most {StopAgreement.LAG} more" in text
    assert "--resume_from_checkpoint latest" in text
    assert sorted(path.name for path in output.glob("checkpoint-*")) == [f"checkpoint-{stop_step}"]
    assert sorted(path.name for path in (output / f"checkpoint-{stop_step}").glob("random_states_*.pkl")) == [
        "random_states_0.pkl", "random_states_1.pkl"]
    assert not (output / "model_index.json").exists()


FULL_DISK_ON_THE_MAIN_PROCESS = """
import errno, sys
from pathlib import Path
sys.path.insert(0, {root!r})
import train_dreambooth
from dreambooth.cli import run_cli

write_text = Path.write_text

def full_disk(self, *args, **kwargs):
    if self.name == "loss_history.json":  # written by the main process alone
        raise OSError(errno.ENOSPC, "No space left on device")
    return write_text(self, *args, **kwargs)

Path.write_text = full_disk
sys.exit(run_cli(train_dreambooth.main))
"""


def test_a_checkpoint_the_main_process_cannot_write_stops_every_process(tiny_model, tmp_path):
    script = tmp_path / "full_disk.py"
    script.write_text(FULL_DISK_ON_THE_MAIN_PROCESS.format(root=str(ROOT)))
    data = tmp_path / "instance"
    shutil.copytree(TOY_SUBJECT, data)
    result = launch(train_args(tiny_model, data, tmp_path / "out", "--max_train_steps", "4", "--checkpointing_steps",
                               "2"), script=script, check=False)  # a process left waiting would time out
    # Every process that got to say it gives the main process's reason (the launcher may end one first).
    reasons = set(re.findall(r"error: could not write checkpoint \S+ \(([^)]*)\)", result.stderr))
    assert result.returncode != 0 and reasons == {"No space left on device"}, result.stderr[-3000:]


@pytest.fixture(scope="module")
def checkpointed_one_process_run(tiny_model, tmp_path_factory) -> tuple[Path, list[str]]:
    """One epoch of the 5 toy images on 1 process, batch 1, a checkpoint after every step."""
    root = tmp_path_factory.mktemp("one-process-run")
    data = root / "instance"
    shutil.copytree(TOY_SUBJECT, data)
    args = train_args(tiny_model, data, root / "out", "--max_train_steps", "5", "--checkpointing_steps", "1")
    with one_thread():
        train_dreambooth.main(args)
    return root / "out", args


def test_one_process_checkpoint_resumes_on_two_processes_when_it_divides(checkpointed_one_process_run, tmp_path):
    output, args = checkpointed_one_process_run

    # After 2 batches of one sample, the 2 samples seen are one batch on each of 2 processes.
    launch(args + ["--output_dir", str(tmp_path / "even"), "--max_train_steps", "4",
                   "--resume_from_checkpoint", str(output / "checkpoint-2")])
    assert (tmp_path / "even" / "model_index.json").is_file()
    assert (tmp_path / "even" / "checkpoint-4" / "random_states_1.pkl").is_file()

    # After 1 batch, the 1 sample seen cannot be split over 2 processes: a clear refusal.
    odd = output / "checkpoint-1"
    refused = launch(args + ["--output_dir", str(tmp_path / "odd"), "--max_train_steps", "4",
                             "--resume_from_checkpoint", str(odd)], check=False)
    assert refused.returncode != 0
    assert (f"error: {odd} was saved by 1 processes 1 batches into an epoch; that position cannot be split "
            "evenly over 2 processes") in refused.stderr, refused.stderr[-3000:]
    assert not (tmp_path / "odd" / "model_index.json").exists()


def test_checkpoint_at_the_end_of_an_epoch_resumes_on_any_process_count(checkpointed_one_process_run, tmp_path):
    output, args = checkpointed_one_process_run
    launch(args + ["--output_dir", str(tmp_path / "next-epoch"), "--max_train_steps", "6",
                   "--resume_from_checkpoint", str(output / "checkpoint-5")])
    assert (tmp_path / "next-epoch" / "model_index.json").is_file()


def test_class_images_are_split_across_processes(tiny_model, tmp_path):
    data, classes = tmp_path / "instance", tmp_path / "class"
    shutil.copytree(TOY_SUBJECT, data)
    classes.mkdir()
    prior = ["--with_prior_preservation", "--class_data_dir", str(classes), "--class_prompt", "a photo of a toy",
             "--num_class_images", "2", "--sample_batch_size", "1"]
    launch(train_args(tiny_model, data, tmp_path / "out", *prior))
    assert (tmp_path / "out" / "model_index.json").is_file()

    names = sorted(path.name for path in classes.iterdir())
    assert [name[:5] for name in names] == ["00000", "00001"], names
    # Batches of one are dealt out one per process; each image is the one a single process makes
    # for its index (its seed depends on the index alone), so no image was made twice.
    reference = tmp_path / "reference"
    with one_thread():
        generate_class_images.main(["--pretrained_model_name_or_path", tiny_model, "--class_prompt",
                                    "a photo of a toy", "--class_data_dir", str(reference), "--num_class_images", "2",
                                    "--sample_batch_size", "1", "--resolution", "32", "--seed", "0"])
    assert names == sorted(path.name for path in reference.iterdir())


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda path: path.name)
def test_accelerate_configs_load(path, monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    config = load_config_from_file(str(path))
    assert config.distributed_type.value == ENGINES[path.name]
    assert config.mixed_precision == "no", "mixed precision is left to the script's --mixed_precision"
    assert config.num_processes >= config.num_machines >= 1
    if config.num_machines > 1:
        assert config.main_process_ip and config.main_process_port and config.num_processes % config.num_machines == 0
    # Accelerate copies nested keys onto its launch arguments without checking them: a misspelt
    # key would be ignored silently, so each must name an `accelerate launch` option.
    options = vars(launch_command_parser().parse_args([str(ROOT / "train_dreambooth.py")]))
    for section in (config.deepspeed_config, config.fsdp_config):
        unknown = [key for key in section if key not in options]
        assert not unknown, f"{path.name}: unknown keys {unknown}"
    if config.deepspeed_config:
        assert config.deepspeed_config["zero_stage"] == 2
        assert config.deepspeed_config["offload_optimizer_device"] == "cpu"
    if config.fsdp_config:
        # The environment `accelerate launch` would give the processes builds Accelerate's FSDP plugin.
        args = launch_command_parser().parse_args(["--config_file", str(path), str(ROOT / "train_dreambooth.py")])
        args, _, _ = _validate_launch_command(args)
        for name, value in prepare_multi_gpu_env(args).items():
            monkeypatch.setenv(name, value)
        plugin = FullyShardedDataParallelPlugin()
        assert plugin.state_dict_type.name == "FULL_STATE_DICT" and plugin.cpu_ram_efficient_loading is False
        assert_fsdp2_can_wrap_what_the_policy_picks(plugin)


def assert_fsdp2_can_wrap_what_the_policy_picks(plugin) -> None:
    """On SD 1.5's UNet (built on the meta device), the wrap policy picks its transformer and ResNet
    blocks, each with a forward of its own: FSDP2 refuses a plain ModuleList, which wrapping by
    size picks too."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from diffusers import UNet2DConditionModel

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from bench_train import SD15_UNET
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
    plugin.set_auto_wrap_policy(unet)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, unet)
    picked = [module for module in unet.modules() if policy(module)]
    no_forward = [type(module).__name__ for module in picked if type(module).forward is torch.nn.Module.forward]
    assert not no_forward, f"FSDP2 cannot wrap {sorted(set(no_forward))}"
    # SD 1.5: 16 transformer blocks, 22 ResNet blocks.
    assert len(picked) == 38, sorted({type(module).__name__ for module in picked})


@pytest.mark.parametrize("engine, flags, message", [
    ("FSDP", ["--train_text_encoder"], "--train_text_encoder trains two models"),
    ("FSDP", ["--use_lora"], "--use_lora trains adapters of a few MB"),
    ("FSDP", ["--num_validation_images", "2"], "drop --num_validation_images and --eval_steps"),
    ("FSDP", ["--eval_steps", "100"], "drop --num_validation_images and --eval_steps"),
    ("DEEPSPEED", ["--use_8bit_adam"], "--use_8bit_adam cannot be combined with DeepSpeed"),
    ("DEEPSPEED", ["--train_text_encoder"], "Accelerate's DeepSpeed engine takes one"),
    ("FSDP", ["--cast_weights_once"], "--cast_weights_once cannot be combined with DeepSpeed or FSDP"),
    ("DEEPSPEED", ["--cast_weights_once"], "--cast_weights_once cannot be combined with DeepSpeed or FSDP"),
])
def test_engines_refuse_what_they_cannot_run_before_loading(tiny_model, tmp_path, engine, flags, message):
    from accelerate.utils import DistributedType

    cfg = parse_config(TrainConfig, train_args(tiny_model, TOY_SUBJECT, tmp_path / "out", *flags))
    cfg.validate()
    with pytest.raises(DreamBoothError, match=re.escape(message)):
        check_engine_support(cfg, SimpleNamespace(distributed_type=DistributedType[engine], num_processes=2,
                                                  mixed_precision="bf16"))
    # DDP runs them all.
    check_engine_support(cfg, SimpleNamespace(distributed_type=DistributedType.MULTI_GPU, num_processes=2,
                                              mixed_precision="bf16"))


def test_fsdp_runs_without_validation_samples_unless_asked(tiny_model, tmp_path):
    from accelerate.utils import DistributedType

    args = train_args(tiny_model, TOY_SUBJECT, tmp_path / "out")
    at = args.index("--num_validation_images")
    del args[at:at + 2]
    cfg = parse_config(TrainConfig, args)
    cfg.validate()
    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP, num_processes=2)
    ddp = SimpleNamespace(distributed_type=DistributedType.MULTI_GPU, num_processes=2)
    assert with_engine_defaults(cfg, ddp).num_validation_images == 4
    check_engine_support(with_engine_defaults(cfg, fsdp), fsdp)
    assert with_engine_defaults(cfg, fsdp).num_validation_images == 0
    assert cfg.num_validation_images is None  # the parsed config itself is left as given
