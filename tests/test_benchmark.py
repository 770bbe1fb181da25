"""benchmarks/bench_train.py end to end on the tiny model: every config runs the real training
path in its own process, and the JSON holds what the GPU run will report. No timing assertions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import bitsandbytes_adamw_8bit_on_cpu

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tiny_benchmark_writes_results_for_each_config(tmp_path):
    output = tmp_path / "results.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--tiny", "--cpu", "--configs", "C1,L1,lean",
               "--steps", "6", "--profile_steps", "2", "--extra_flags=--logging_steps 3", "--gen", "--gen_images", "4", "--gen_batch_size", "2",
               "--gen_variants", "default,no_channels_last,batch8", "--output", str(output)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    finished = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]

    results = json.loads(output.read_text())
    assert set(results["configs"]) == {"C1", "L1", "lean"}
    assert results["device"] == "cpu" and results["tiny"] is True
    assert results["versions"]["torch"] and results["versions"]["diffusers"]
    for name, flags in (("C1", ["--logging_steps", "3"]), ("L1", ["--gradient_checkpointing", "--use_lora"])):
        config = results["configs"][name]
        assert "error" not in config, config
        assert config["seconds_per_step"] > 0 and config["steps_per_second"] > 0
        assert config["unet_tflop_per_step"] > 0 and config["unet_tflops"] > 0
        assert config["measured_steps"] == [4, 6]  # the first logging interval (steps 1-3) is warm-up
        # The issue's measure: the median of the measured steps' own lengths, beside the logging interval's mean.
        lengths = sorted(config["step_seconds"].values())
        assert list(config["step_seconds"]) == ["4", "5", "6"] and config["seconds_per_step"] == lengths[1]
        assert config["step_p10_seconds"] <= config["seconds_per_step"] <= config["step_p90_seconds"]
        assert config["interval_seconds_per_step"] == config["intervals"][1]["seconds_per_step"] > 0
        assert config["peak_memory_gib"] is None and config["mfu"] is None  # CUDA only
        for flag in flags:
            assert flag in config["flags"] and flag in config["argv"]
        assert config["argv"][config["argv"].index("--max_train_steps") + 1] == "8"  # 6 timed + 2 profiled
        profile = config["profile"]
        assert profile["steps"] == 2 and profile["device_busy_ms_per_step"] is None  # no device on the CPU
        assert profile["host_waits_per_step"] is None
        phases = profile["host_ms_per_step"]
        assert set(phases) == {"forward", "backward", "update"} and all(ms > 0 for ms in phases.values())
        assert sum(phases.values()) < profile["wall_ms_per_step"]  # the phases are parts of the step
        assert profile["top_ops"][0]["name"].startswith("aten::") and profile["top_ops"][0]["calls_per_step"] >= 1
    # The plain loop does C1's work (the same UNet FLOPs) and is timed the same way.
    lean = results["configs"]["lean"]
    assert "error" not in lean, lean
    assert lean["flags"] == ["--channels_last"] and lean["unet_tflop_per_step"] == results["configs"]["C1"]["unet_tflop_per_step"]
    assert list(lean["step_seconds"]) == ["4", "5", "6"] and lean["seconds_per_step"] == sorted(lean["step_seconds"].values())[1]
    assert 0 < lean["final_loss"] < 10
    # LoRA trains no weight gradients of the base UNet: fewer FLOPs than the full fine-tune.
    assert results["configs"]["L1"]["unet_tflop_per_step"] < results["configs"]["C1"]["unet_tflop_per_step"]
    assert "C1" in finished.stdout and "s/step" in finished.stdout and "C1 heaviest" in finished.stdout

    generation = results["generation"]
    assert set(generation["suite"]) == {"default", "no_channels_last", "batch8"} and generation["best"] in generation["suite"]
    assert generation["reference"]["scheduler"] == "PNDMScheduler" and generation["reference"]["steps"] == 50
    for name, part in generation["suite"].items():
        assert part["images"] == 4 and part["batch_size"] == (8 if name == "batch8" else 2) and part["steps"] == 25
        assert part["speedup"] == pytest.approx(part["images_per_second"] / generation["reference"]["images_per_second"])
    assert generation["suite"]["no_channels_last"]["flags"] == "--no_channels_last"
    assert generation["suite"]["batch8"]["flags"] == "--sample_batch_size 8"
    assert generation["speedup"] == generation["suite"]["default"]["speedup"]


def load_bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_train
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return bench_train


class FakeEvent:
    """A CUDA event's timing interface: milliseconds between two recorded points of the stream."""

    def __init__(self, milliseconds: float):
        self.milliseconds = milliseconds

    def elapsed_time(self, other: "FakeEvent") -> float:
        return other.milliseconds - self.milliseconds


@pytest.mark.parametrize("clock", [lambda seconds: seconds, lambda seconds: FakeEvent(seconds * 1e3)],
                         ids=["cpu_clock", "cuda_events"])
def test_each_step_is_timed_from_the_end_of_the_one_before_and_a_slow_step_leaves_the_median(clock):
    bench = load_bench()
    # Steps 1-10 warm up; steps 11-16 take 0.1 s but step 13 takes 0.35 s (a collector pass, a read-back).
    lengths = {step: 1.0 if step <= 10 else 0.35 if step == 13 else 0.1 for step in range(1, 17)}
    ends, now = {}, 0.0
    for step, length in lengths.items():
        now += length
        ends[step] = clock(now)

    measured = bench.step_seconds(ends, 11, 16)
    assert list(measured) == list(range(11, 17))
    assert measured == pytest.approx({step: lengths[step] for step in range(11, 17)})
    summary = bench.summarize_steps(measured)
    assert summary["seconds_per_step"] == pytest.approx(0.1) and summary["step_p90_seconds"] == pytest.approx(0.35)
    assert summary["step_mean_seconds"] == pytest.approx(0.85 / 6)  # what a 10-step interval's mean would say
    assert summary["measured_steps"] == [11, 16]
    # The first step has no end before it to be timed from.
    assert list(bench.step_seconds(ends, 1, 3)) == [2, 3]


def test_generation_is_timed_with_the_suites_defaults():
    from dreambooth.config import GenerateClassImagesConfig

    import dataclasses

    from dreambooth.generation import ClassImageJob

    args = load_bench().parse_args([])
    assert args.gen_batch_size == GenerateClassImagesConfig().sample_batch_size
    # The benchmark builds a ClassImageJob: its defaults must be the script's.
    cli = GenerateClassImagesConfig()
    shared = {field.name for field in dataclasses.fields(ClassImageJob)} & set(vars(cli))
    assert {"num_inference_steps", "guidance_scale", "scheduler", "channels_last", "compile"} <= shared
    for field in dataclasses.fields(ClassImageJob):
        if field.name in shared and field.default is not dataclasses.MISSING:
            assert field.default == getattr(cli, field.name), field.name


@pytest.mark.parametrize("flags, cuda, order", [
    ([], True, ["C1", "C2", "C3", "C4", "L1", "C1c", "gen"]),  # the configs
    ([], False, ["C1", "C2", "C3", "C4", "L1", "C1c"]),  # generation is on by default with CUDA only
    (["--configs", "all"], True, ["C1", "C2", "C3", "C4", "L1", "C1c", "gen", "C1w", "C2w", "C4w", "C3w", "L1w", "C4b", "C1l",
                                  "C1b", "C2o", "C4o", "C1g", "C1n", "lean", "lean_nchw", "C2c", "C3c", "C4c", "C4bc"]),
    (["--configs", "L1,gen,C1"], True, ["L1", "gen", "C1"]),
    (["--configs", "L1,gen,C1", "--no-gen"], True, ["L1", "C1"]),
    (["--configs", "C2,C1", "--gen"], False, ["C2", "C1", "gen"]),
])
def test_the_run_follows_the_order_of_configs(flags, cuda, order):
    bench = load_bench()
    plan = bench.plan_run(bench.parse_args(flags), cuda)
    assert [item if item == "gen" else item.name for item in plan] == order


def test_a_run_past_its_deadline_skips_the_rest_and_still_writes_its_results(tmp_path):
    output = tmp_path / "results.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--tiny", "--cpu", "--configs", "C1,gen,L1",
               "--gen", "--deadline", "0", "--output", str(output)]
    finished = subprocess.run(command, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                              text=True, timeout=300)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]

    results = json.loads(output.read_text())
    assert results["finished"] is True and results["generation"] is None
    assert {name: config["skipped"] for name, config in results["configs"].items()} == {
        "C1": "past the --deadline", "L1": "past the --deadline"}
    assert "gen: skipped (past the --deadline of 0 s)" in finished.stdout


def test_the_report_shows_each_goal_met_or_not_from_the_results():
    bench = load_bench()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_report
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    def measured(seconds, gib, flags=()):
        return {"description": "", "flags": list(flags), "seconds_per_step": seconds, "steps_per_second": 1 / seconds,
                "peak_memory_gib": gib, "peak_reserved_gib": gib + 1, "unet_tflops": 4.94 / seconds,
                "mfu": 4.94 / seconds / 989}

    configs = {"C1": {**measured(0.090, 15.2), "measured_steps": [11, 40], "step_p10_seconds": 0.085,
                      "step_p90_seconds": 0.131,
                      "intervals": [{"first_step": first, "last_step": first + 9, "seconds_per_step": mean}
                                    for first, mean in ((1, 0.9), (11, 0.096), (21, 0.112), (31, 0.093))]},
               "C2": measured(0.140, 12.0, ["--gradient_checkpointing"]),
               "L1": measured(0.150, 3.1, ["--use_lora"]), "C4": {"description": "", "flags": ["--use_8bit_adam"],
                                                                  "error": "ImportError: bitsandbytes"},
               "C4b": measured(0.160, 7.5, ["--bf16_gradients"])}
    generation = {"resolution": 512, "best": "default",
                  "reference": {"images_per_second": 3.0, "scheduler": "PNDMScheduler", "steps": 50, "dtype": "float16",
                                "batch_size": 4, "images": 16, "seconds": 5.3},
                  "suite": {"default": {"images_per_second": 8.1, "speedup": 2.7, "scheduler": "DPMSolverMultistepScheduler",
                                        "steps": 25, "dtype": "float16", "batch_size": 8, "images": 16, "seconds": 2.0,
                                        "flags": "(defaults)", "load_and_warmup_seconds": 4.0}}}
    summary = {"card": "NVIDIA H100 80GB HBM3", "tiny": False, "steps": 40, "extra_flags": "", "total_seconds": 400,
               "versions": {"torch": "2.11.0", "bitsandbytes": None},
               "reference_h200": {name: {"seconds_per_step": s, "peak_gib": gib} for name, (s, gib) in bench.REFERENCE.items()},
               "goals": {name: {"max_seconds_per_step": s, "max_peak_gib": gib} for name, (s, gib) in bench.GOALS.items()},
               "configs": configs, "generation": generation, "goal_checks": bench.check_goals(configs, generation)}

    text = bench_report.markdown(summary)
    rows = {line.split(" | ")[0][2:]: line for line in text.splitlines() if line.startswith("| ")}
    assert text.startswith("### NVIDIA H100 80GB HBM3\n") and "torch 2.11.0." in text
    assert rows["C1"].endswith("| 0.181 s, 17.4 GiB | <= 0.100 s, <= 14 GiB | not met: peak allocated <= 14.0 GiB |")
    # The per-step spread and each measured logging interval's mean; runs from before per-step timing show neither.
    assert "| 0.090 | 11.11 | 0.085-0.131 | 0.096 / 0.112 / 0.093 | 15.2 | 16.2 | 54.9 | 5.5% |" in rows["C1"]
    assert "| 0.140 | 7.14 | - | - | 12.0 |" in rows["C2"]
    assert rows["C2"].endswith("| met |")
    assert rows["L1"].endswith("| faster than C2, <= 4 GiB | not met: s/step < C2 s/step |")
    assert "failed: ImportError: bitsandbytes" in rows["C4"]
    # A variant is shown beside the reference row of the config it varies.
    assert rows["C4b"].endswith("| 0.303 s, 10.6 GiB | <= 0.150 s, <= 8 GiB | not met: s/step <= 0.15 |")
    assert "| suite, default | (defaults) | DPMSolverMultistepScheduler 25 steps, float16 | 8 | 8.10 | 2.70 | 4 |" in text
    assert "Goals met: 6 of 9." in text


def test_every_config_runs_on_a_gpu_and_those_needing_cuda_say_why_on_the_cpu():
    bench = load_bench()
    fields = bench.train_fields()
    assert not [config.name for config in bench.CONFIGS if bench.skip_reason(config, fields, "cuda")]
    on_cpu = {config.name: bench.skip_reason(config, fields, "cpu") for config in bench.CONFIGS}
    assert {name for name, reason in on_cpu.items() if reason} == {"C4", "C4o", "C4b", "C4c", "C4bc", "C1b", "C1w",
                                                                   "C2w", "C3w", "C4w", "L1w"}
    assert "needs CUDA" in on_cpu["C4b"] and "bf16" in on_cpu["C1b"] and "bf16" in on_cpu["C2w"]
    assert set(bench.GOALS) <= {config.name for config in bench.CONFIGS}
    everything = bench.select_configs("all")
    assert len(everything) == len(bench.CONFIGS) and set(everything) == set(bench.CONFIGS)  # "all" leaves none out


def test_a_profile_that_fails_is_reported_and_keeps_the_configs_figures(monkeypatch):
    import torch

    from conftest import linear_trainer
    from dreambooth.training import Trainer

    class BrokenProfiler:
        def __init__(self, **kwargs):
            pass

        def start(self):
            raise RuntimeError("no CUPTI")

    bench = load_bench()
    monkeypatch.setattr(Trainer, "train", Trainer.train)  # put back after the test
    monkeypatch.setattr(torch.profiler, "profile", BrokenProfiler)
    marks = {}
    bench.watch_profiled_steps(3, 2, marks)
    trainer = linear_trainer(logging_steps=2)
    trainer.train()
    assert trainer.state.global_step == 4 and len(trainer.metrics.intervals) == 2  # the run and its figures
    assert marks["profile"] == {"error": "RuntimeError: no CUPTI"}
    results = {"C1": {"seconds_per_step": 0.1, "profile": {"error": "RuntimeError: no CUPTI"}}, "C2": {}}
    assert bench.profile_lines(results) == "  C1: profile failed: RuntimeError: no CUPTI"
    assert bench.profile_lines({"C2": {}}) == ""


def test_optimizer_benchmark_compares_the_8bit_steps_on_the_same_weights(tmp_path):
    bitsandbytes_adamw_8bit_on_cpu()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_optimizer
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    output = tmp_path / "optimizer.json"
    assert bench_optimizer.main(["--tiny", "--cpu", "--steps", "2", "--output", str(output)]) == 0
    summary = json.loads(output.read_text())
    variants = summary["variants"]
    assert list(variants) == ["bitsandbytes", "suite", "torch_fused"] and summary["device"] == "cpu"
    # bitsandbytes' own step waits after every weight (all have gradients here); the suite's never,
    # and it ends on the same weights to the bit.
    assert variants["bitsandbytes"]["waits_per_step"] == summary["weights"] > 100
    assert variants["suite"]["waits_per_step"] == variants["torch_fused"]["waits_per_step"] == 0
    assert variants["suite"]["max_abs_difference_from_bitsandbytes"] == 0
    assert "max_abs_difference_from_bitsandbytes" not in variants["torch_fused"]
    assert all(row["host_ms_per_step"] > 0 for row in variants.values())
    from bitsandbytes.optim import optimizer as bitsandbytes_optimizer
    assert bitsandbytes_optimizer.sync_gpu.__name__ == "sync_gpu"  # the counter is gone again


def test_a_cuda_profile_counts_the_device_time_launches_and_the_host_s_waits_per_step():
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    bench = load_bench()

    def event(key, count, device=DeviceType.CPU, device_us=0.0, cpu_us=0.0, annotation=False):
        return SimpleNamespace(key=key, count=count, device_type=device, self_device_time_total=device_us,
                               self_cpu_time_total=cpu_us, cpu_time_total=cpu_us, is_user_annotation=annotation)

    averages = [event(bench.PHASES["forward"], 10, cpu_us=30_000.0, annotation=True),
                event("ampere_bf16_gemm", 200, DeviceType.CUDA, device_us=40_000.0),
                event("aten::mm", 200, cpu_us=8_000.0),
                event("cudaLaunchKernel", 600, cpu_us=3_000.0),
                event("cudaStreamSynchronize", 2, cpu_us=900.0),
                event("cudaEventSynchronize", 10, cpu_us=500.0),
                event("cudaDeviceSynchronize", 1, cpu_us=100.0),
                event("cudaMemcpyAsync", 12, cpu_us=50.0)]  # not a wait by itself
    summary = bench.profile_summary(averages, steps=10, wall_seconds=0.1)
    assert summary["wall_ms_per_step"] == pytest.approx(10.0)
    assert summary["device_busy_ms_per_step"] == pytest.approx(4.0) and summary["device_busy_fraction"] == pytest.approx(0.4)
    assert summary["kernel_launches_per_step"] == 60 and summary["host_waits_per_step"] == pytest.approx(1.3)
    assert summary["host_ms_per_step"]["forward"] == pytest.approx(3.0)
    assert summary["top_ops"][0]["name"] == "ampere_bf16_gemm" and summary["top_ops"][0]["kind"] == "kernel"
    lines = bench.profile_lines({"C4": {"profile": summary}})
    assert "waits" in lines and lines.splitlines()[2].split()[-1] == "1.3"


def test_logging_intervals_give_the_warm_up_and_the_peaks_even_with_none_among_the_timed_steps():
    bench = load_bench()

    def interval(first, last, seconds, peak):
        return {"first_step": first, "last_step": last, "seconds_per_step": seconds, "peak_memory_gib": peak,
                "peak_reserved_gib": peak + 1}

    # Steps 1-10 warm up, 11-40 are timed, 41-50 profiled (slower, left out).
    logged = [interval(1, 10, 0.9, 9.0), interval(11, 20, 0.2, 5.0), interval(21, 30, 0.3, 5.5),
              interval(31, 40, 0.25, 5.2), interval(41, 50, 2.0, 6.0)]
    summary = bench.summarize_intervals(logged, last_step=40)
    assert summary["seconds_per_step"] == 0.25 and summary["measured_steps"] == [11, 40]
    assert summary["peak_memory_gib"] == 9.0 and summary["steady_peak_memory_gib"] == 5.5
    assert summary["interval_note"] is None
    # 6 timed steps under a logging interval of 10, then 2 profiled: the first logging step is the 8th.
    summary = bench.summarize_intervals([interval(1, 8, 0.5, 4.0)], last_step=6)
    assert summary["seconds_per_step"] is None and summary["measured_steps"] == [1, 6]
    assert summary["peak_memory_gib"] == 4.0 and summary["peak_reserved_gib"] == 5.0
    assert "no logging interval among the timed steps" in summary["interval_note"]


def test_the_operator_count_sees_the_weights_cast_once_replace_autocasts_casts(tiny_model, tmp_path):
    """benchmarks/count_ops.py on the tiny model, in this process: step 2 of C1 and of C1w. With the
    flag, the casts of each trained Linear and Conv weight (forward, and backward for its gradient)
    are gone and a multi-tensor copy each way takes their place; nothing else changes."""
    import shutil

    from accelerate.state import AcceleratorState, GradientState
    from diffusers import UNet2DConditionModel

    from dreambooth.gradients import BF16_LAYERS

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import count_ops
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    args = count_ops.parse_args(["--tiny"])
    shutil.copytree(tiny_model, tmp_path / "model")
    count_ops.bench_train.write_images(tmp_path, 32)
    counts = {}
    for name in ("C1", "C1w"):
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        counts[name] = count_ops.count_worker(count_ops.bench_train.select_configs(name)[0], args, tmp_path)

    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    weights = sum(1 for layer in unet.modules() if isinstance(layer, BF16_LAYERS) for p in layer.parameters(False))
    plain, once = counts["C1"], counts["C1w"]
    assert plain["weight_casts"] - once["weight_casts"] >= 2 * weights > 0
    assert once["multi_tensor"] - plain["multi_tensor"] == 2  # the tiny UNet is one bucket: a copy each way
    assert plain["computing"] - once["computing"] == (plain["weight_casts"] - once["weight_casts"]) - 2
    assert "| C1w | `--cast_weights_once` |" in count_ops.table(counts)
