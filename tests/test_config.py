"""Configuration: YAML + CLI precedence, unknown keys, wrong types, the saved config."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import yaml

from dreambooth.config import TrainConfig, config_to_dict, parse_config
from dreambooth.errors import DreamBoothError


def write_yaml(path, values) -> str:
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_cli_wins_over_yaml(tmp_path):
    config = write_yaml(tmp_path / "run.yaml", {
        "learning_rate": 1e-3, "max_train_steps": 7, "with_prior_preservation": True, "instance_prompt": "a sks toy",
    })
    cfg = parse_config(TrainConfig, ["--config", config, "--max_train_steps", "3"])
    assert cfg.learning_rate == 1e-3
    assert cfg.max_train_steps == 3
    assert cfg.with_prior_preservation is True
    assert cfg.instance_prompt == "a sks toy"
    assert cfg.train_batch_size == TrainConfig().train_batch_size


def test_yaml_booleans_can_be_turned_off_from_the_cli(tmp_path):
    config = write_yaml(tmp_path / "run.yaml", {"center_crop": True})
    assert parse_config(TrainConfig, ["--config", config]).center_crop is True
    assert parse_config(TrainConfig, ["--config", config, "--center_crop", "false"]).center_crop is False


def test_unknown_yaml_key_is_named(tmp_path):
    config = write_yaml(tmp_path / "run.yaml", {"learning_rate": 1e-4, "learning_rat": 1e-4})
    with pytest.raises(DreamBoothError, match="unknown key 'learning_rat'"):
        parse_config(TrainConfig, ["--config", config])


def test_wrong_type_in_yaml_names_file_and_flag(tmp_path):
    config = write_yaml(tmp_path / "run.yaml", {"max_train_steps": "many"})
    with pytest.raises(DreamBoothError, match=r"run\.yaml.*--max_train_steps"):
        parse_config(TrainConfig, ["--config", config])


def test_unknown_flag_is_named():
    with pytest.raises(DreamBoothError, match="--learning_rat"):
        parse_config(TrainConfig, ["--learning_rat", "1e-4"])


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(DreamBoothError, match="file not found"):
        parse_config(TrainConfig, ["--config", str(tmp_path / "nope.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: [1, 2\n")
    with pytest.raises(DreamBoothError, match="not valid YAML"):
        parse_config(TrainConfig, ["--config", str(bad)])


def test_diffusers_test_flags_run_unchanged(tiny_model, instance_dir, tmp_path):
    # The arguments of diffusers' examples/dreambooth/test_dreambooth.py (both spellings), with
    # only the model and the image folder replaced by local ones.
    import train_dreambooth

    argv = f"""--pretrained_model_name_or_path {tiny_model}
        --instance_data_dir {instance_dir} --instance_prompt photo --resolution 64
        --train_batch_size 1 --gradient_accumulation_steps 1 --max_train_steps 2 --learning_rate 5.0e-04
        --scale_lr --lr_scheduler constant --lr_warmup_steps 0 --output_dir {tmp_path} --checkpointing_steps=2
        --seed=0 --pre_compute_text_embeddings --tokenizer_max_length=77 --text_encoder_use_attention_mask""".split()
    cfg = parse_config(TrainConfig, argv)
    assert (cfg.learning_rate, cfg.scale_lr, cfg.seed, cfg.tokenizer_max_length) == (5e-4, True, 0, 77)
    train_dreambooth.main(argv + ["--report_to", "none"])
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "scheduler" / "scheduler_config.json").is_file()
    assert (tmp_path / "checkpoint-2").is_dir()


def test_config_is_frozen_and_dumps_to_plain_yaml():
    cfg = parse_config(TrainConfig, ["--instance_prompt", "a sks toy"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.learning_rate = 1.0
    assert yaml.safe_load(yaml.safe_dump(config_to_dict(cfg)))["instance_prompt"] == "a sks toy"


def test_every_flag_has_help():
    for field in dataclasses.fields(TrainConfig):
        assert field.metadata.get("help"), field.name


def test_a_bare_first_argument_can_stand_for_a_flag():
    from dreambooth.config import ExportConfig

    cfg = parse_config(ExportConfig, ["run", "--output", "a.safetensors"], positional="output_dir")
    assert (cfg.output_dir, cfg.output) == ("run", "a.safetensors")
    assert parse_config(ExportConfig, ["--output_dir", "run"], positional="output_dir").output_dir == "run"
    with pytest.raises(DreamBoothError, match="not both"):
        parse_config(ExportConfig, ["run", "--output_dir", "other"], positional="output_dir")


def test_secret_values_never_reach_parse_errors():
    secret = "hf_PLANTEDsecret123"
    with pytest.raises(DreamBoothError) as caught:
        parse_config(TrainConfig, ["--hub_tokn", secret])
    assert secret not in str(caught.value) and "--hub_tokn" in str(caught.value)


def test_help_keeps_the_script_examples_and_shows_only_meaningful_defaults(capsys):
    import train_dreambooth

    with pytest.raises(SystemExit) as exit_info:
        train_dreambooth.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    # The docstring's shell lines stay as written, so they can be copied as a command.
    assert "--pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\\n" in text
    assert "(default: None)" not in text and "(default: [])" not in text
    assert "(default: 100)" in text  # --num_class_images
    # A --no_<flag> switch says what it does, not its own store_false default.
    no_cache = text.split("--no_cache_latents, --no-cache-latents")[1].split("\n  --")[0]
    assert "Turn --cache_latents off." in no_cache and "default" not in no_cache
    # A help text that names its own default is not followed by the parser's.
    assert "fp32 on CPU). (default" not in " ".join(text.split())


def test_help_usage_names_the_positional_argument(capsys):
    import export

    with pytest.raises(SystemExit):
        export.main(["--help"])
    usage = capsys.readouterr().out.splitlines()[0]
    assert usage.startswith("usage: ") and usage.endswith(" OUTPUT_DIR [--config FILE.yaml] [--flag value ...]")


def test_a_saved_config_feeds_back_without_its_redacted_token(tmp_path):
    from dreambooth.config import save_config

    cfg = parse_config(TrainConfig, ["--instance_prompt", "a sks toy", "--hub_token", "hf_secretsecretsecret",
                                     "--mixed_precision", "no", "--validation_prompt", "a", "--validation_prompt", "b"])
    saved = save_config(cfg, tmp_path / "train_config.yaml")
    assert "hf_secret" not in saved.read_text()
    again = parse_config(TrainConfig, ["--config", str(saved)])
    assert again.hub_token is None  # not the literal '<redacted>': HF_TOKEN or the login apply
    assert dataclasses.replace(again, hub_token=cfg.hub_token) == cfg


def test_yaml_no_and_command_line_lists_replace_the_file(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("mixed_precision: no\nvalidation_prompt: [a sks toy, a sks toy on the beach]\n")  # bare no: false
    assert parse_config(TrainConfig, ["--config", str(config)]).mixed_precision == "no"
    cfg = parse_config(TrainConfig, ["--config", str(config), "--validation_prompt", "a sks toy in snow"])
    assert cfg.validation_prompt == ["a sks toy in snow"]


def test_learning_rate_defaults_to_the_full_or_the_lora_rate():
    assert parse_config(TrainConfig, []).peak_learning_rate() == 5e-6  # diffusers' train_dreambooth.py
    assert parse_config(TrainConfig, ["--use_lora"]).peak_learning_rate() == 1e-4
    assert parse_config(TrainConfig, ["--use_lora", "--learning_rate", "3e-4"]).peak_learning_rate() == 3e-4


def test_prior_generation_precision_no_means_the_default():
    import torch

    from dreambooth.generation import pick_dtype

    for device, default in ((torch.device("cuda"), torch.float16), (torch.device("cpu"), torch.float32)):
        assert pick_dtype(device, "no") == pick_dtype(device, None) == default
    assert pick_dtype(torch.device("cuda"), "fp32") == torch.float32


def test_a_saved_config_records_local_paths_absolutely_and_hub_ids_as_they_are(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    cfg = parse_config(TrainConfig, ["--pretrained_model_name_or_path", "org/model", "--instance_data_dir", "photos",
                                     "--output_dir", "runs/dog", "--resume_from_checkpoint", "latest"])
    saved = cfg.with_absolute_paths()
    assert (saved.instance_data_dir, saved.output_dir) == (str(tmp_path / "photos"), str(tmp_path / "runs" / "dog"))
    assert (saved.pretrained_model_name_or_path, saved.resume_from_checkpoint) == ("org/model", "latest")
    assert dataclasses.replace(saved, instance_data_dir="photos", output_dir="runs/dog") == cfg


def _path_flags():
    from dreambooth.config import EvaluateConfig, ExportConfig, GenerateClassImagesConfig, InferConfig, PushToHubConfig

    model = ["pretrained_model_name_or_path", "checkpoint", "lora"]
    return {
        TrainConfig: ["pretrained_model_name_or_path", "tokenizer_name", "instance_data_dir", "class_data_dir",
                      "concepts_list", "dataset_name", "output_dir", "logging_dir", "resume_from_checkpoint",
                      "eval_dino_model", "eval_clip_model"],
        GenerateClassImagesConfig: ["pretrained_model_name_or_path", "class_data_dir", "concepts_list"],
        InferConfig: [*model, "prompts_file", "output_dir"],
        EvaluateConfig: [*model, "generated_dir", "instance_data_dir", "prompts_file", "dino_model", "clip_model",
                         "output_dir"],
        ExportConfig: ["output_dir", "output"],
        PushToHubConfig: ["output_dir"],
    }


def test_a_tilde_in_any_path_flag_is_the_home_folder_as_a_shell_would_have_it(tmp_path, monkeypatch):
    """`--flag=~/x` reaches the script unexpanded (the shell expands only a word that starts with ~)."""
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    for config_class, names in _path_flags().items():
        for name in names:
            value = getattr(parse_config(config_class, [f"--{name}=~/{name}"]), name)
            assert value == ([str(home / name)] if name == "lora" else str(home / name)), (config_class, name)
            # Only a leading ~ is the home folder: a Hub id, or a path with a ~ further on, is left alone.
            for kept in ("org/model", "runs/~x"):
                value = getattr(parse_config(config_class, [f"--{name}={kept}"]), name)
                assert value == ([kept] if name == "lora" else kept), (config_class, name)


def test_a_tilde_output_dir_and_yaml_config_land_in_the_home_folder(tiny_model, instance_dir, tmp_path, monkeypatch):
    from dreambooth.config import save_train_config

    home, work = tmp_path / "home", tmp_path / "work"
    (home / "lists").mkdir(parents=True), work.mkdir()
    shutil.copytree(instance_dir, home / "photos")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    base = ["--pretrained_model_name_or_path", tiny_model, "--report_to", "none"]

    cfg = parse_config(TrainConfig, [*base, "--instance_data_dir=~/photos", "--instance_prompt", "a sks toy",
                                     "--output_dir=~/runs/x"])
    cfg.validate()
    save_train_config(cfg)
    saved = yaml.safe_load((home / "runs" / "x" / "train_config.yaml").read_text())
    assert (saved["output_dir"], saved["instance_data_dir"]) == (str(home / "runs" / "x"), str(home / "photos"))

    (home / "lists" / "concepts.yaml").write_text("- {instance_data_dir: ~/photos, instance_prompt: a sks toy}\n")
    (home / "run.yaml").write_text("output_dir: ~/runs/y\nconcepts_list: ~/lists/concepts.yaml\n")
    cfg = parse_config(TrainConfig, [*base, "--config=~/run.yaml"])
    cfg.validate()
    save_train_config(cfg)
    assert cfg.concepts_list == str(home / "lists" / "concepts.yaml")
    assert yaml.safe_load((home / "runs" / "y" / "concepts_list.yaml").read_text())[0]["instance_data_dir"] == str(
        home / "photos")
    assert list(work.iterdir()) == []  # no folder named ~ in the working folder
