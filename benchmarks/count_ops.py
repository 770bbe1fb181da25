"""The operators one training step dispatches, per config: on a GPU, its kernel launches.

Where the GPU waits for the host to queue its kernels (C1 to C4 ran at 1.7-3.9% of an H200's bf16
rate), a step's time follows the number of operators it launches, and that number is the same on
any machine. This runs the project's training (``train_dreambooth.main``) for 3 steps of each
config of bench_train.py, each in its own process, under bf16 mixed precision (on the CPU too),
and counts every operator PyTorch dispatches in step 2: forward, backward, clipping and the update.
It counts below autograd and after composite operators are split, where an operator is a kernel
on a GPU; views, detaches and allocations launch none and are counted apart. A table, and JSON.

    HF_HUB_OFFLINE=1 python benchmarks/count_ops.py --tiny                  # the tiny model: a minute
    HF_HUB_OFFLINE=1 python benchmarks/count_ops.py --resolution 64         # SD 1.5's architecture
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import bench_train

# 8-bit Adam needs CUDA; C4's step is C2's plus its update.
DEFAULT_CONFIGS = "C1,C1w,C2,C2w,C3,C3w,L1,L1w"
# Operators that allocate without computing (views are told apart by their schema).
ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_unsafe_view", "lift_fresh"}
COUNTED_STEP = 2


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny test model instead of SD 1.5's architecture")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"bench_train.py configs (default: {DEFAULT_CONFIGS})")
    parser.add_argument("--resolution", type=int, default=None,
                        help="training resolution (default: 32 with --tiny, else 64: the count does not depend on it)")
    parser.add_argument("--output", default=None, help="JSON results (default: benchmarks/ops.json, ops_tiny.json)")
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def bench_args(args: argparse.Namespace) -> argparse.Namespace:
    """bench_train's settings for these runs (its worker flags and train_argv read them)."""
    return bench_train.parse_args(["--steps", str(COUNTED_STEP), "--cpu"] + ["--tiny"] * args.tiny)


def count_argv(config: bench_train.BenchConfig, args: argparse.Namespace, workdir: Path) -> list[str]:
    resolution = args.resolution or (32 if args.tiny else 64)
    return bench_train.train_argv(config, bench_args(args), workdir) + [
        # One step more than counted: the run's last step also logs, which is not a step's work.
        "--mixed_precision", "bf16", "--resolution", str(resolution), "--max_train_steps", str(COUNTED_STEP + 1)]


def operator_counter():
    """A dispatch mode counting operators by name, and which of them compute."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.by_name: collections.Counter = collections.Counter()
            self.computing = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            self.by_name[name] += 1
            if not (func.is_view or name in ALLOCATIONS or name == "detach"):
                self.computing += 1
            return func(*args, **(kwargs or {}))

    return Counter()


def count_worker(config: bench_train.BenchConfig, args: argparse.Namespace, workdir: Path) -> dict:
    """Train 3 steps of ``config`` and count step 2's operators (step 1 warms the caches up)."""
    import train_dreambooth
    from dreambooth.training import Trainer

    counter, original = operator_counter(), Trainer.train

    def train(self):
        def around(state) -> None:
            if state.global_step == COUNTED_STEP - 1:
                counter.__enter__()
            elif state.global_step == COUNTED_STEP:
                counter.__exit__(None, None, None)

        self.step_callbacks.insert(0, around)
        return original(self)

    finish = train_dreambooth.finish
    Trainer.train, train_dreambooth.finish = train, lambda *unused, **unused_too: None  # the final save is no step
    try:
        train_dreambooth.main(count_argv(config, args, workdir))
    finally:
        Trainer.train, train_dreambooth.finish = original, finish
    return {"config": config.name, "flags": list(config.flags), "operators": sum(counter.by_name.values()),
            "computing": counter.computing, "weight_casts": counter.by_name["_to_copy"],
            "multi_tensor": sum(n for name, n in counter.by_name.items() if name.startswith("_foreach_")),
            "top": counter.by_name.most_common(12)}


def table(results: dict[str, dict]) -> str:
    lines = ["| config | flags | operators | computing (kernels on a GPU) | `_to_copy` | multi-tensor |",
             "|---|---|---|---|---|---|"]
    for name, result in results.items():
        if "error" in result:
            lines.append(f"| {name} | | failed: {result['error']} | | | |")
            continue
        flags = " ".join(result["flags"]) or "(base)"
        lines.append(f"| {name} | `{flags}` | {result['operators']} | {result['computing']} | "
                     f"{result['weight_casts']} | {result['multi_tensor']} |")
    return "\n".join(lines)


def spawn(name: str, args: argparse.Namespace, workdir: Path) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--workdir", str(workdir)]
    command += ["--tiny"] * args.tiny + (["--resolution", str(args.resolution)] if args.resolution else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    finished = subprocess.run(command, capture_output=True, text=True, cwd=bench_train.ROOT, env=env, timeout=1800)
    result = bench_train.last_json_line(finished.stdout)
    if finished.returncode != 0 or result is None:
        return {"error": (result or {}).get("error") or f"exit status {finished.returncode}: "
                + "\n".join(finished.stderr.splitlines()[-5:])}
    return result


def run(args: argparse.Namespace, workdir: Path) -> dict:
    configs = bench_train.select_configs(args.configs)
    start = time.perf_counter()
    build = bench_train.build_worker(bench_args(args), workdir)
    bench_train.write_images(workdir, args.resolution or (32 if args.tiny else 64))
    results = {config.name: spawn(config.name, args, workdir) for config in configs}
    return {"card": build["card"], "tiny": args.tiny, "versions": bench_train.versions(),
            "counted_step": COUNTED_STEP, "configs": results, "total_seconds": time.perf_counter() - start}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        try:
            config = bench_train.select_configs(args.worker)[0]
            result = count_worker(config, args, Path(args.workdir))
        except Exception as error:  # reported to the parent, which goes on with the next config
            print(json.dumps({"error": f"{type(error).__name__}: {error}".splitlines()[0]}))
            return 1
        print(json.dumps(result))
        return 0
    default = bench_train.ROOT / "benchmarks" / ("ops_tiny.json" if args.tiny else "ops.json")
    output = Path(args.output) if args.output else default
    with tempfile.TemporaryDirectory() as temporary:
        summary = run(args, Path(args.workdir or temporary))
    output.write_text(json.dumps(summary, indent=1))
    print(f"operators dispatched in training step {COUNTED_STEP}, bf16 mixed precision; {summary['card']}, "
          f"torch {summary['versions']['torch']}, diffusers {summary['versions']['diffusers']}")
    print(table(summary["configs"]))
    print(f"results written to {output}")
    return 0 if all("error" not in result for result in summary["configs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
