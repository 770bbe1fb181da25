"""Model card and Hub upload: metadata that parses back, no paths or tokens leaked, a failed push
leaves the output intact and says how to retry. The Hub is replaced by stand-ins for HfApi."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import yaml
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import HfHubHTTPError

import push_to_hub
from conftest import ROOT, committed_files
from dreambooth.errors import DreamBoothError
from dreambooth.errors import redact
from dreambooth.hub import CardInfo, card_info_from_config, push_output, write_model_card

# The HTTP client of the installed huggingface_hub: httpx2 from 2.0, httpx in 1.x.
http_client = importlib.import_module("httpx2" if int(huggingface_hub.__version__.split(".")[0]) >= 2 else "httpx")

TOKEN = "hf_PLANTEDsecret123"


@pytest.fixture
def finished_output(tmp_path) -> Path:
    """A folder shaped like a finished full run, plus what a push must leave behind."""
    output = tmp_path / "sks-dog"
    (output / "unet").mkdir(parents=True)
    (output / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (output / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00weights\x01")
    (output / "samples").mkdir()
    (output / "samples" / "final.png").write_bytes(b"\x89PNG fake")
    (output / "train_config.yaml").write_text("instance_prompt: a photo of sks dog\nhub_token: <redacted>\n")
    for skipped in ("checkpoint-200/unet/weights.bin", "class_images/00000.png", ".tmp-save/unet.bin",
                    "logs/dreambooth/events.out", "unet/.partial"):
        (output / skipped).parent.mkdir(parents=True, exist_ok=True)
        (output / skipped).write_bytes(b"skip")
    return output


def snapshot(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def card_info(base_model: str, **overrides) -> CardInfo:
    values = dict(base_model=base_model, instance_prompt="a photo of sks dog", class_prompt="a photo of a dog",
                  max_train_steps=400, learning_rate=5e-6, train_batch_size=2, gradient_accumulation_steps=2,
                  with_prior_preservation=True, prior_loss_weight=1.0, resolution=512, mixed_precision="fp16",
                  num_processes=2, sample_images=["samples/final.png"])
    values.update(overrides)
    return CardInfo(**values)


def local_base(tmp_path: Path, readme: str | None = None, recorded: str | None = None) -> Path:
    base = tmp_path / "bases" / "my-base"
    base.mkdir(parents=True)
    index = {"_class_name": "StableDiffusionPipeline", **({"_name_or_path": recorded} if recorded else {})}
    (base / "model_index.json").write_text(json.dumps(index))
    if readme is not None:
        (base / "README.md").write_text(readme)
    return base


def assert_no_local_path(text: str, tmp_path: Path) -> None:
    assert str(tmp_path) not in text and str(tmp_path.resolve()) not in text
    assert TOKEN not in text


# --- Model card ---------------------------------------------------------------------------------


def test_full_run_card_parses_back_with_metadata(finished_output, tmp_path):
    info = card_info("runwayml/stable-diffusion-v1-5", hub_model_id="me/sks-dog")
    path = write_model_card(finished_output, info)

    assert path == finished_output / "README.md"
    card = ModelCard.load(path)
    meta = card.data.to_dict()
    assert meta["license"] == "creativeml-openrail-m"
    assert meta["base_model"] == "runwayml/stable-diffusion-v1-5"
    assert meta["library_name"] == "diffusers"
    assert meta["instance_prompt"] == "a photo of sks dog"
    assert meta["tags"] == ["text-to-image", "diffusers", "dreambooth", "stable-diffusion",
                            "stable-diffusion-diffusers", "diffusers-training"]
    assert "widget" not in meta  # a grid of several prompts is no single prompt's picture
    assert 'StableDiffusionPipeline.from_pretrained("me/sks-dog"' in card.text
    assert "load_lora_weights" not in card.text
    assert "full fine-tune" in card.text and "![final](samples/final.png)" in card.text
    assert "| Batch size | 2 x 2 accumulation x 2 process(es) = 8 |" in card.text
    assert_no_local_path(path.read_text(), tmp_path)


def test_lora_card_loads_base_then_lora_and_inherits_license_from_local_base(finished_output, tmp_path):
    base = local_base(tmp_path, readme="---\nlicense: mit\ntags: [x]\n---\n# My base\n",
                      recorded="/root/.cache/huggingface/hub/models--someone--base-model/snapshots/0123abc")
    path = write_model_card(finished_output, card_info(str(base), use_lora=True, rank=8, sample_images=[]))

    card = ModelCard.load(path)
    meta = card.data.to_dict()
    assert meta["license"] == "mit"
    assert meta["base_model"] == "someone/base-model"
    assert "lora" in meta["tags"] and "dreambooth" in meta["tags"]
    assert "widget" not in meta
    # No hub_model_id: the snippet names the folder, never its absolute path.
    assert 'from_pretrained("someone/base-model"' in card.text
    assert 'pipe.load_lora_weights("sks-dog")' in card.text
    assert "| LoRA rank | 8 |" in card.text
    assert_no_local_path(path.read_text(), tmp_path)


def test_local_base_without_hub_id_is_called_a_local_model(finished_output, tmp_path):
    base = local_base(tmp_path, recorded=str(tmp_path / "bases" / "my-base"))
    path = write_model_card(finished_output, card_info(str(base), use_lora=True))

    meta = ModelCard.load(path).data.to_dict()
    assert "base_model" not in meta and "license" not in meta
    text = path.read_text()
    assert "a local model" in text and "my-base" not in text
    assert_no_local_path(text, tmp_path)


@pytest.mark.parametrize("base_model, license_id", [
    ("stable-diffusion-v1-5/stable-diffusion-v1-5", "creativeml-openrail-m"),
    ("CompVis/stable-diffusion-v1-4", "creativeml-openrail-m"),
    ("stabilityai/stable-diffusion-2-1-base", "openrail++"),
    ("someone/unknown-model", None),
])
def test_license_from_known_base_ids(finished_output, base_model, license_id):
    meta = ModelCard.load(write_model_card(finished_output, card_info(base_model))).data.to_dict()
    assert meta.get("license") == license_id
    assert meta["base_model"] == base_model


def test_explicit_license_wins_and_missing_samples_are_left_out(finished_output):
    info = card_info("runwayml/stable-diffusion-v1-5", license="other",
                     sample_images=[str(finished_output / "samples" / "final.png"), "samples/gone.png"],
                     prompt_samples=[("a sks dog", str(finished_output / "samples" / "final.png")),
                                     ("a sks dog, gone", "samples/gone.png")])
    meta = ModelCard.load(write_model_card(finished_output, info)).data.to_dict()
    assert meta["license"] == "other"
    assert meta["widget"] == [{"text": "a sks dog", "output": {"url": "samples/final.png"}}]


def test_samples_name_each_rows_prompt_and_the_widget_pairs_each_prompt_with_its_image(finished_output):
    for index in range(2):
        (finished_output / "samples" / f"final_{index}.png").write_bytes(b"\x89PNG fake")
    prompts = ["a sks dog in Paris", "a sks dog on the moon"]
    info = card_info("runwayml/stable-diffusion-v1-5", num_validation_images=4, validation_seed=7,
                     validation_inference_steps=25, validation_scheduler="euler",
                     prompt_samples=[(prompt, f"samples/final_{index}.png") for index, prompt in enumerate(prompts)])
    card = ModelCard.load(write_model_card(finished_output, info))

    assert card.data.to_dict()["widget"] == [{"text": "a sks dog in Paris", "output": {"url": "samples/final_0.png"}},
                                             {"text": "a sks dog on the moon",
                                              "output": {"url": "samples/final_1.png"}}]
    samples = card.text.split("## Samples")[1]
    assert "1. `a sks dog in Paris`\n2. `a sks dog on the moon`\n\n![final](samples/final.png)" in samples
    assert "4 images a row (seeds 7 to 10 in every row), 25 steps of the `euler` sampler, 512x512 px" in samples
    assert "a photo of sks dog" not in samples


def test_filewords_placeholder_stays_out_of_the_card(finished_output):
    info = card_info("runwayml/stable-diffusion-v1-5", instance_prompt="a photo of sks dog, [filewords]",
                     hub_model_id="me/sks-dog")
    path = write_model_card(finished_output, info)

    text = path.read_text()
    assert "filewords" not in text
    assert ModelCard.load(path).data.to_dict()["instance_prompt"] == "a photo of sks dog"
    assert "Trigger phrase: **`a photo of sks dog`**." in text and 'pipe("a photo of sks dog",' in text
    assert "| Instance prompt | `a photo of sks dog` |" in text


def test_multi_concept_card_lists_every_trigger_phrase_and_class_prompt(finished_output):
    # As a --concepts_list run records it: no single-concept class prompt.
    info = card_info("runwayml/stable-diffusion-v1-5", class_prompt=None, concepts=[
        ("a photo of sks dog", "a photo of a dog"), ("a photo of zwx cup, [filewords]", "a photo of a cup")])
    path = write_model_card(finished_output, info)

    text = path.read_text()
    assert ModelCard.load(path).data.to_dict()["instance_prompt"] == "a photo of sks dog"
    assert ("- **`a photo of sks dog`** (class prompt `a photo of a dog`)\n"
            "- **`a photo of zwx cup`** (class prompt `a photo of a cup`)\n") in text
    assert "| Instance prompts | `a photo of sks dog`; `a photo of zwx cup` |" in text
    assert "| Class prompts | `a photo of a dog`; `a photo of a cup` |" in text
    assert "filewords" not in text


def test_card_info_from_a_training_config_dict():
    info = card_info_from_config({"pretrained_model_name_or_path": "runwayml/stable-diffusion-v1-5",
                                  "instance_prompt": "a photo of sks dog", "hub_token": TOKEN, "max_train_steps": 9},
                                 num_processes=4, sample_images=["samples/final.png"])
    assert info.base_model == "runwayml/stable-diffusion-v1-5" and info.max_train_steps == 9
    assert info.num_processes == 4 and TOKEN not in repr(info)


# --- Upload -------------------------------------------------------------------------------------


@pytest.fixture
def hub_calls(monkeypatch) -> list[tuple[str, dict]]:
    """Stand-ins for the two HfApi calls a push makes, recording their arguments."""
    calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def create_commit(self, **kwargs):
        calls.append(("create_commit", {**kwargs, "files": committed_files(kwargs.pop("operations"))}))
        return "commit"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return calls


def test_push_creates_repo_and_uploads_the_finished_files(finished_output, hub_calls):
    before = snapshot(finished_output)
    url = push_output(finished_output, "me/sks-dog", token=TOKEN, private=True)

    assert url == "https://huggingface.co/me/sks-dog"
    (create_name, create), (commit_name, commit) = hub_calls
    assert create_name == "create_repo" and commit_name == "create_commit"  # one commit: never half a model
    assert create == {"repo_id": "me/sks-dog", "token": TOKEN, "private": True, "exist_ok": True}
    assert commit["repo_id"] == "me/sks-dog" and commit["token"] == TOKEN
    assert commit["files"] == {name: before[name] for name in (
        "model_index.json", "unet/diffusion_pytorch_model.safetensors", "samples/final.png", "train_config.yaml")}
    assert snapshot(finished_output) == before


@pytest.mark.parametrize("use_lora", [False, True])
def test_push_names_the_repo_in_the_card_it_uploads(finished_output, hub_calls, use_lora):
    # Trained without --push_to_hub: the card names the output folder; pushed later under another name.
    write_model_card(finished_output, card_info("stable-diffusion-v1-5/stable-diffusion-v1-5", use_lora=use_lora))
    call = "pipe.load_lora_weights" if use_lora else "StableDiffusionPipeline.from_pretrained"
    written = (finished_output / "README.md").read_text()
    assert f'{call}("sks-dog"' in written
    before = snapshot(finished_output)

    push_output(finished_output, "me/robot", token=TOKEN)

    (_, _), (_, commit) = hub_calls
    uploaded = commit["files"]["README.md"].decode()
    assert f'{call}("me/robot"' in uploaded and "# DreamBooth " + ("LoRA " if use_lora else "") + "- robot" in uploaded
    assert uploaded.replace("me/robot", "sks-dog").replace("- robot", "- sks-dog") == written
    assert snapshot(finished_output) == before
    hub_calls.clear()
    write_model_card(finished_output, card_info("stable-diffusion-v1-5/stable-diffusion-v1-5", use_lora=use_lora,
                                                hub_model_id="me/robot"))
    push_output(finished_output, "me/robot")  # the card already names the repo: uploaded as it is
    assert hub_calls[1][1]["files"]["README.md"] == (finished_output / "README.md").read_bytes()


def test_pushed_configs_name_local_folders_only_by_their_last_component(finished_output, hub_calls, tmp_path):
    base = tmp_path / "home" / "alice" / "models" / "sd15"
    recorded = {"pretrained_model_name_or_path": str(base), "output_dir": str(finished_output),
                "instance_data_dir": str(tmp_path / "photos"), "concepts_list": str(tmp_path / "concepts.yaml"),
                "tokenizer_name": "/root/.cache/huggingface/hub/models--openai--clip-vit-large-patch14/snapshots/0a1b",
                "resume_from_checkpoint": "C:\\Users\\alice\\runs\\checkpoint-10", "logging_dir": "logs",
                "eval_dino_model": "facebook/dino-vits16", "instance_prompt": "/imagine sks dog",
                "validation_prompt": ["/imagine sks dog on the beach"], "hub_token": "<redacted>", "seed": 0}
    (finished_output / "train_config.yaml").write_text(yaml.safe_dump(recorded, sort_keys=False))
    configs = {"model_index.json": str(base), "unet/config.json": str(base / "unet"),
               "vae/config.json": str(base / "vae"), "text_encoder/config.json": str(base / "text_encoder"),
               "scheduler/scheduler_config.json": "stable-diffusion-v1-5/stable-diffusion-v1-5"}
    for name, name_or_path in configs.items():
        (finished_output / name).parent.mkdir(exist_ok=True)
        (finished_output / name).write_text(json.dumps({"_class_name": "X", "_name_or_path": name_or_path}))
    before = snapshot(finished_output)

    push_output(finished_output, "me/sks-dog", token=TOKEN)

    (_, _), (_, commit) = hub_calls
    uploaded = {name: content.decode() for name, content in commit["files"].items() if content != before[name]}
    assert set(uploaded) == {"train_config.yaml", "model_index.json", "unet/config.json", "vae/config.json",
                             "text_encoder/config.json"}
    assert "scheduler/scheduler_config.json" in commit["files"]  # a Hub id is no local path: as it is
    assert yaml.safe_load(uploaded["train_config.yaml"]) == {
        **recorded, "pretrained_model_name_or_path": "sd15", "output_dir": "sks-dog", "instance_data_dir": "photos",
        "concepts_list": "concepts.yaml", "tokenizer_name": "openai/clip-vit-large-patch14",
        "resume_from_checkpoint": "checkpoint-10"}
    assert [json.loads(uploaded[name])["_name_or_path"] for name in configs if name in uploaded] == [
        "sd15", "unet", "vae", "text_encoder"]
    for text in uploaded.values():
        assert_no_local_path(text, tmp_path)
    assert snapshot(finished_output) == before


def test_push_checkpoints_on_request_and_token_none_left_to_huggingface_hub(finished_output, hub_calls):
    push_output(finished_output, "me/sks-dog", include_checkpoints=True)

    (_, create), (_, commit) = hub_calls
    assert create["token"] is None and commit["token"] is None and create["private"] is None
    kept = set(commit["files"])
    assert "checkpoint-200/unet/weights.bin" in kept
    assert not {"class_images/00000.png", ".tmp-save/unet.bin", "unet/.partial"} & kept


def http_error(status: int) -> HfHubHTTPError:
    request = http_client.Request("POST", "https://huggingface.co/api/repos/create",
                             headers={"authorization": f"Bearer {TOKEN}"})
    return HfHubHTTPError(f"{status} Client Error for token {TOKEN}\nsecond line {TOKEN}",
                          response=http_client.Response(status, request=request))


@pytest.mark.parametrize("failing, error, expected", [
    ("create_repo", http_error(401), "401"),
    ("create_repo", http_error(403), "403"),
    ("create_commit", http_error(500), "500 Client Error"),
    ("create_commit", http_client.ConnectError(f"cannot connect with {TOKEN}"), "ConnectError"),
    ("create_repo", OSError(f"disk trouble {TOKEN}"), "disk trouble"),
])
def test_failed_push_names_the_repo_hides_the_token_and_keeps_the_output(finished_output, monkeypatch,
                                                                        failing, error, expected):
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: f"https://huggingface.co/{repo_id}")
    monkeypatch.setattr(HfApi, "create_commit", lambda self, **kwargs: "commit")

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(HfApi, failing, fail)
    before = snapshot(finished_output)
    with pytest.raises(DreamBoothError) as raised:
        push_output(finished_output, "me/sks-dog", token=TOKEN)

    message = str(raised.value)
    assert "\n" not in message and TOKEN not in message
    assert "me/sks-dog" in message and expected in message
    assert f"python push_to_hub.py {finished_output} --hub_model_id me/sks-dog" in message
    assert snapshot(finished_output) == before


@pytest.mark.parametrize("platform, quoted", [("linux", "'{}'"), ("darwin", "'{}'"), ("win32", '"{}"')])
def test_the_retry_command_is_quoted_for_the_users_shell(finished_output, monkeypatch, platform, quoted):
    """cmd.exe keeps single quotes as part of a path; double quotes work there and in PowerShell."""
    spaced = finished_output.rename(finished_output.parent / "sks dog")

    def fail(self, repo_id, **kwargs):
        raise http_error(401)

    monkeypatch.setattr(HfApi, "create_repo", fail)
    monkeypatch.setattr(sys, "platform", platform)
    with pytest.raises(DreamBoothError) as raised:
        push_output(spaced, "me/sks-dog")
    assert str(raised.value).endswith(f"python push_to_hub.py {quoted.format(spaced)} --hub_model_id me/sks-dog")


def test_failed_push_hides_a_token_taken_from_the_environment(finished_output, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)

    def fail(self, repo_id, **kwargs):
        raise http_error(401)

    monkeypatch.setattr(HfApi, "create_repo", fail)
    with pytest.raises(DreamBoothError) as raised:
        push_output(finished_output, "me/sks-dog", private=True)
    assert TOKEN not in str(raised.value) and "401" in str(raised.value)
    assert str(raised.value).endswith("--hub_model_id me/sks-dog --private")


def test_redact_hides_the_given_token_and_token_shaped_strings():
    long_token = "hf_" + "a1B2" * 9
    assert redact(f"bad {TOKEN} and {long_token}", TOKEN) == "bad <redacted> and <redacted>"
    assert redact("nothing secret", None) == "nothing secret"


# --- push_to_hub.py -----------------------------------------------------------------------------


def test_script_pushes_a_folder_given_first(finished_output, hub_calls, capsys):
    url = push_to_hub.main([str(finished_output), "--hub_model_id", "me/sks-dog", "--hub_token", TOKEN,
                            "--private", "--push_checkpoints"])

    assert url == "https://huggingface.co/me/sks-dog"
    (_, create), (_, commit) = hub_calls
    assert create["private"] is True and create["token"] == TOKEN
    assert "checkpoint-200/unet/weights.bin" in commit["files"]
    out, err = capsys.readouterr()
    assert TOKEN not in out + err and "https://huggingface.co/me/sks-dog" in out


def test_script_accepts_output_dir_flag(finished_output, hub_calls):
    push_to_hub.main(["--hub_model_id", "me/sks-dog", "--output_dir", str(finished_output)])
    assert "model_index.json" in hub_calls[1][1]["files"]


@pytest.mark.parametrize("make_args, expected", [
    (lambda out: [str(out / "unet"), "--hub_model_id", "me/x"], "not a finished output"),
    (lambda out: [str(out / "nope"), "--hub_model_id", "me/x"], "no such folder"),
    (lambda out: [str(out)], "--hub_model_id is required"),
    (lambda out: [str(out), "--hub_model_id", "me/bad name"], "--hub_model_id me/bad name"),
    (lambda out: ["--hub_model_id", "me/x"], "give the output folder"),
    (lambda out: [str(out), "--output_dir", str(out), "--hub_model_id", "me/x"], "once"),
    (lambda out: [str(out), "--hub_model_id", "me/x", "--hub_tokn", TOKEN], "unrecognized arguments"),
    (lambda out: [str(out), "--hub_model_id", "me/x", f"--token={TOKEN}"], "unrecognized arguments"),
])
def test_script_refuses_bad_input_before_any_push(finished_output, hub_calls, make_args, expected):
    with pytest.raises(DreamBoothError) as raised:
        push_to_hub.main(make_args(finished_output))
    assert expected in str(raised.value) and TOKEN not in str(raised.value)
    assert hub_calls == []


def test_script_offline_fails_with_one_line_and_no_token(finished_output, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    env.pop("HF_TOKEN", None)
    before = snapshot(finished_output)
    result = subprocess.run(
        [sys.executable, str(ROOT / "push_to_hub.py"), str(finished_output), "--hub_model_id", "me/sks-dog",
         "--hub_token", TOKEN],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )

    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "me/sks-dog" in errors[0] and "HF_HUB_OFFLINE" in errors[0]
    assert "Traceback" not in result.stderr
    assert TOKEN not in result.stdout and TOKEN not in result.stderr
    assert snapshot(finished_output) == before
