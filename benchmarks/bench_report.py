"""The Markdown tables of a bench_train.py results file, for benchmarks/RESULTS.md.

    python benchmarks/bench_report.py benchmarks/results.json >> benchmarks/RESULTS.md

Every figure comes from the file: the card, the versions, each config's speed and memory beside
the reference and the goal, class-image generation, and each goal met or not met.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def goal_cell(name: str, summary: dict) -> str:
    goal = None if summary["tiny"] else summary["goals"].get(name)
    if not goal:
        return ""
    parts = []
    if goal["max_seconds_per_step"] is not None:
        parts.append(f"<= {goal['max_seconds_per_step']:.3f} s")
    elif name == "L1":
        parts.append("faster than C2")
    parts.append(f"<= {goal['max_peak_gib']:g} GiB")
    return ", ".join(parts)


def verdict(name: str, summary: dict) -> str:
    """'met', 'not met: ...' over the goal checks that name this config."""
    checks = [check for check in summary["goal_checks"] if check["goal"].startswith(f"{name} ")]
    if not checks:
        return ""
    missed = [check["goal"].removeprefix(f"{name} ") for check in checks if not check["met"]]
    return "met" if not missed else "not met: " + "; ".join(missed)


def spread(result: dict) -> str:
    """The measured steps' 10th to 90th percentile (runs from before per-step timing have none)."""
    if result.get("step_p10_seconds") is None:
        return "-"
    return f"{result['step_p10_seconds']:.3f}-{result['step_p90_seconds']:.3f}"


def interval_means(result: dict) -> str:
    """Each logging interval's mean s/step over the measured steps: what runs before per-step timing reported."""
    if "measured_steps" not in result:
        return "-"
    first, last = result["measured_steps"]
    means = [interval["seconds_per_step"] for interval in result.get("intervals", [])
             if interval["first_step"] >= first and interval["last_step"] <= last]
    return " / ".join(f"{mean:.3f}" for mean in means) or "-"


def config_table(summary: dict) -> str:
    rows = ["| config | flags | s/step | steps/s | p10-p90 s | 10-step means s | peak GiB | reserved GiB | UNet TFLOP/s "
            "| MFU | reference (H200) | goal | goal met |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, result in summary["configs"].items():
        flags = " ".join(flag for flag in result["flags"]) or "(base)"
        # A variant (C1c, C4b, ...) shows the reference row of the config it varies, named by its first two characters.
        reference = None if summary["tiny"] else summary["reference_h200"].get(name[:2])
        reference_cell = f"{reference['seconds_per_step']:.3f} s, {reference['peak_gib']:g} GiB" if reference else ""
        if "seconds_per_step" not in result:
            why = result.get("skipped") or f"failed: {result.get('error')}"
            rows.append(f"| {name} | `{flags}` | {why} | | | | | | | | {reference_cell} | {goal_cell(name, summary)} | |")
            continue
        mfu = result.get("mfu")
        rows.append(
            f"| {name} | `{flags}` | {result['seconds_per_step']:.3f} | {result['steps_per_second']:.2f} | "
            f"{spread(result)} | {interval_means(result)} | "
            f"{fmt(result.get('peak_memory_gib'), '.1f')} | {fmt(result.get('peak_reserved_gib'), '.1f')} | "
            f"{fmt(result.get('unet_tflops'), '.3g')} | {'-' if mfu is None else f'{100 * mfu:.1f}%'} | "
            f"{reference_cell} | {goal_cell(name, summary)} | {verdict(name, summary)} |"
        )
    return "\n".join(rows)


def generation_table(generation: dict) -> str:
    if "error" in generation:
        return f"Class-image generation failed: {generation['error']}"
    rows = [f"Class-image generation at {generation['resolution']} px (warm-up: loading and the first batch, "
            "compilation included):", "",
            "| path | flags | sampler | batch | images/s | x reference | warm-up s |", "|---|---|---|---|---|---|---|"]
    parts = [("reference script", generation["reference"])]
    parts += [(f"suite, {name}", part) for name, part in generation["suite"].items()]
    for label, part in parts:
        rows.append(f"| {label} | {part.get('flags', '')} | {part['scheduler']} {part['steps']} steps, {part['dtype']} "
                    f"| {part['batch_size']} | {part['images_per_second']:.2f} | {part.get('speedup', 1.0):.2f} | "
                    f"{fmt(part.get('load_and_warmup_seconds'), '.0f')} |")
    return "\n".join(rows)


def markdown(summary: dict) -> str:
    versions = ", ".join(f"{name} {version}" for name, version in summary["versions"].items() if version)
    lines = [f"### {summary['card']}", "",
             f"{versions}. `bench_train.py`, {summary['steps']} steps per config"
             + (f", extra flags `{summary['extra_flags']}`" if summary["extra_flags"] else "")
             + f"; the whole run took {summary['total_seconds']:.0f} s"
             + ("" if summary.get("finished", True) else " and was cut short") + ".", "",
             config_table(summary), ""]
    if summary.get("generation"):
        lines += [generation_table(summary["generation"]), ""]
    if summary["goal_checks"]:
        met = [check for check in summary["goal_checks"] if check["met"]]
        lines.append(f"Goals met: {len(met)} of {len(summary['goal_checks'])}.")
        lines += [f"- {'met' if check['met'] else 'NOT met'}: {check['goal']} ({fmt(check['value'], '.3f')})"
                  for check in summary["goal_checks"]]
    else:
        lines.append("Goals: not checked (they are checked on a GPU with the full model only).")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="a results JSON written by bench_train.py")
    args = parser.parse_args(argv)
    try:
        summary = json.loads(Path(args.results).read_text())
    except (OSError, json.JSONDecodeError) as error:
        print(f"error: {args.results}: {error}", file=sys.stderr)
        return 1
    sys.stdout.write(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
