"""The commands README.md, the scripts' docstrings and examples/ show run as written: their flags exist,
the example configs load, the steps of a walk-through agree, and the quickstart can be run twice."""

from __future__ import annotations

import ast
import re
import shlex
import shutil

import pytest

import train_dreambooth
from conftest import ROOT, TOY_SUBJECT
from dreambooth.config import (
    EvaluateConfig,
    ExportConfig,
    GenerateClassImagesConfig,
    InferConfig,
    PushToHubConfig,
    TrainConfig,
    parse_config,
)

SCRIPTS = {  # script: (config class, positional flag)
    "train_dreambooth.py": (TrainConfig, None),
    "generate_class_images.py": (GenerateClassImagesConfig, None),
    "infer.py": (InferConfig, None),
    "export.py": (ExportConfig, "output_dir"),
    "push_to_hub.py": (PushToHubConfig, "output_dir"),
    "evaluate.py": (EvaluateConfig, None),
}
EXAMPLE_CONFIGS = sorted((ROOT / "examples").glob("*.yaml"))


def shell_commands(text: str) -> list[list[str]]:
    """The python and accelerate command lines of ``text`` (a README bash block, a docstring, a shell
    script, YAML comments), continuation lines joined, each split as a shell would; lines that
    leave arguments out ('...') are skipped."""
    lines = [line.strip().lstrip("#").strip() for line in text.splitlines()]
    lines = [re.sub(r"\[(--[^]]+)\]", r"\1", line) for line in lines]  # an optional flag: [--lora_scale 0.8]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [shlex.split(line, comments=True) for line in joined.splitlines()
            if re.match(r"(python3?|accelerate) ", line) and "..." not in line]


def script_arguments(command: list[str]) -> tuple[str, list[str]] | None:
    """The suite's script a command runs (with python or accelerate launch) and its arguments."""
    for index, word in enumerate(command):
        if word in SCRIPTS:
            return word, command[index + 1:]
    return None


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(where, script, arguments) of every command of the README's bash blocks, every script's docstring
    and every file of examples/."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    inline = re.findall(r"`((?:python3?|accelerate launch) [^`]+)`", readme)
    sources = {"README.md": "\n".join(blocks + inline)}
    for script in SCRIPTS:
        sources[script] = ast.get_docstring(ast.parse((ROOT / script).read_text(encoding="utf-8")))
    for path in [*EXAMPLE_CONFIGS, ROOT / "examples" / "quickstart.sh"]:
        sources[str(path.relative_to(ROOT))] = path.read_text(encoding="utf-8")
    found = []
    for where, text in sources.items():
        for command in shell_commands(text):
            parsed = script_arguments(command)
            if parsed:
                found.append((where, *parsed))
    return found


def parse_documented(script: str, arguments: list[str], monkeypatch):
    """Parse a documented command's arguments with its script's config, from the repository root
    (where the commands' relative --config files are)."""
    monkeypatch.chdir(ROOT)
    config_class, positional = SCRIPTS[script]
    return parse_config(config_class, arguments, positional=positional)


def test_every_documented_command_parses(monkeypatch):
    commands = documented_commands()
    assert {script for _, script, _ in commands} == set(SCRIPTS)
    assert len(commands) >= 25
    for where, script, arguments in commands:
        if "my-run.yaml" in arguments:
            arguments = [arg for arg in arguments if arg not in ("--config", "my-run.yaml")]
        try:
            parse_documented(script, arguments, monkeypatch)
        except Exception as error:
            pytest.fail(f"{where}: {script} {shlex.join(arguments)}: {error}")


# What the README's table of ready-made configurations says each runs.
CONFIG_CLAIMS = {
    "quickstart_cpu.yaml": dict(pretrained_model_name_or_path="tiny-sd", resolution=64),
    "sd15_full.yaml": dict(pretrained_model_name_or_path="stable-diffusion-v1-5/stable-diffusion-v1-5",
                           train_text_encoder=True, mixed_precision="bf16", use_8bit_adam=False),
    "sd15_12gb.yaml": dict(pretrained_model_name_or_path="stable-diffusion-v1-5/stable-diffusion-v1-5",
                           train_text_encoder=False, mixed_precision="fp16", use_8bit_adam=True,
                           gradient_checkpointing=True),
}


@pytest.mark.parametrize("path", EXAMPLE_CONFIGS, ids=lambda path: path.name)
def test_example_configs_load_and_run_what_the_readme_says(path, monkeypatch):
    cfg = parse_documented("train_dreambooth.py", ["--config", str(path)], monkeypatch)
    assert {name: getattr(cfg, name) for name in CONFIG_CLAIMS[path.name]} == CONFIG_CLAIMS[path.name]
    assert cfg.with_prior_preservation and cfg.class_data_dir and cfg.class_prompt
    if path.name.startswith("sd15"):
        assert cfg.center_crop and cfg.cache_latents  # the comment's fixed crops, latents cached once


def test_the_readme_walkthrough_trains_on_the_class_images_it_generates(monkeypatch):
    """Step 1 fills the class folder that step 2 trains on, with the count step 2 takes from it."""
    readme = [(script, args) for where, script, args in documented_commands() if where == "README.md"]
    generate = next(args for script, args in readme if script == "generate_class_images.py")
    train = next(args for script, args in readme if script == "train_dreambooth.py" and "--class_data_dir" in args)
    made = parse_documented("generate_class_images.py", generate, monkeypatch)
    trained = parse_documented("train_dreambooth.py", train, monkeypatch)
    assert trained.class_data_dir == made.class_data_dir and trained.class_prompt == made.class_prompt
    assert trained.num_class_images == made.num_class_images


def test_the_quickstart_training_runs_again_in_its_own_folder(tiny_model, tmp_path, monkeypatch):
    """A second `bash examples/quickstart.sh` trains afresh in quickstart-output instead of stopping."""
    script = (ROOT / "examples" / "quickstart.sh").read_text()
    [quickstart] = [args for script_name, args in (script_arguments(c) or (None, None) for c in shell_commands(script))
                    if script_name == "train_dreambooth.py"]
    class_images = tmp_path / "quickstart-output" / "class_images"
    class_images.mkdir(parents=True)
    shutil.copy(next(TOY_SUBJECT.glob("*.png")), class_images)  # a class image there already: none to generate
    monkeypatch.chdir(ROOT)
    argv = quickstart + [
        "--pretrained_model_name_or_path", tiny_model,
        "--instance_data_dir", str(TOY_SUBJECT),
        "--output_dir", str(tmp_path / "quickstart-output"),
        "--class_data_dir", str(class_images),
        "--num_class_images", "1", "--resolution", "32", "--max_train_steps", "1",
        "--num_validation_images", "0", "--report_to", "none",
    ]
    train_dreambooth.main(argv)
    first = (tmp_path / "quickstart-output" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    train_dreambooth.main(argv)
    second = (tmp_path / "quickstart-output" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert second > first


def test_the_readme_layout_names_every_module_and_script():
    layout = (ROOT / "README.md").read_text(encoding="utf-8").split("## Layout", 1)[1]
    named = set(re.findall(r"`([^`]+)`", layout))
    modules = {f"dreambooth/{path.name}" for path in (ROOT / "dreambooth").glob("*.py") if path.name != "__init__.py"}
    assert modules - named == set()
    assert set(SCRIPTS) - named == set()
