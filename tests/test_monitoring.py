"""Validation samples, tracking, the model card and the Hub push, as a finished run leaves them."""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from PIL import Image
from safetensors.torch import load_file

import train_dreambooth
from conftest import ListDataset, committed_files, drawn_batches, linear_trainer, noting_script, one_thread, train_args
from dreambooth.errors import DreamBoothError

TOKEN = "hf_PLANTEDsecretTOKEN1234567890abcdefXYZ"
SAMPLES = ["--num_validation_images", "2", "--validation_inference_steps", "2"]


def unet(folder):
    return load_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))


def test_validation_does_not_change_the_training_result(tiny_model, instance_dir, tmp_path):
    args = ["--max_train_steps", "4", "--save_precision", "fp32", "--random_flip"]
    train_dreambooth.main(train_args(tiny_model, instance_dir, tmp_path / "plain", *args))
    train_dreambooth.main(train_args(tiny_model, instance_dir, tmp_path / "sampled", *args, *SAMPLES,
                                     "--validation_steps", "1"))
    plain, sampled = unet(tmp_path / "plain"), unet(tmp_path / "sampled")
    assert all(torch.equal(plain[key], sampled[key]) for key in plain)


def test_sample_grids_at_the_validation_steps(tiny_model, instance_dir, tmp_path, monkeypatch):
    from dreambooth.monitor import ValidationSampler

    drawn = []
    original = ValidationSampler._sample
    monkeypatch.setattr(ValidationSampler, "_sample",
                        lambda self, name, step: drawn.append(name) or original(self, name, step))
    output = tmp_path / "out"
    prompts = ["--validation_prompt", "a photo of sks toy", "--validation_prompt", "sks toy in the snow",
               "--validation_prompt", "a toy"]
    train_dreambooth.main(train_args(tiny_model, instance_dir, output, "--max_train_steps", "5", *SAMPLES,
                                     "--validation_steps", "2", *prompts))
    assert sorted(path.name for path in (output / "samples").iterdir()) == [
        "final.png", "final_0.png", "final_1.png", "final_2.png", "step_2.png", "step_4.png"]
    grid = Image.open(output / "samples" / "final.png")
    assert grid.size == (2 * 32, 3 * (32 + 20))  # 2 images a row, one labelled row per prompt
    assert_first_images_of_rows(output / "samples" / "final.png", output / "samples", 3)
    # When the last step drew a grid, final.png is that grid, not drawn twice.
    drawn.clear()
    again = tmp_path / "again"
    train_dreambooth.main(train_args(tiny_model, instance_dir, again, "--max_train_steps", "4", *SAMPLES,
                                     "--validation_steps", "2", *prompts))
    assert drawn == ["step_2", "step_4"]
    assert (again / "samples" / "final.png").read_bytes() == (again / "samples" / "step_4.png").read_bytes()
    assert_first_images_of_rows(again / "samples" / "step_4.png", again / "samples", 3)


def test_a_sample_that_cannot_be_written_or_logged_is_a_warning_and_training_goes_on(tiny_model, instance_dir,
                                                                                   tmp_path, monkeypatch, caplog):
    from dreambooth.monitor import ValidationSampler

    write_bytes = Path.write_bytes

    def disk_full_for_step_1(self, data):
        if self.name == ".step_1.png.tmp":
            write_bytes(self, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_bytes(self, data)

    def tracker_fails(self, step, rows, grid):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(Path, "write_bytes", disk_full_for_step_1)
    monkeypatch.setattr(ValidationSampler, "_log", tracker_fails)
    output = tmp_path / "out"
    trainer = train_dreambooth.main(train_args(tiny_model, instance_dir, output, *SAMPLES, "--validation_steps", "1"))
    assert trainer.state.global_step == 2 and (output / "model_index.json").is_file()
    assert sorted(path.name for path in (output / "samples").iterdir()) == [
        "final.png", "final_0.png", "final_1.png", "step_2.png"]
    assert f"{output / 'samples'}: could not write step_1.png (No space left on device)" in caplog.text
    assert "could not log the samples step_1 to the trackers (Input/output error)" in caplog.text


def test_mlflow_and_comet_get_the_sample_grid_at_its_step(monkeypatch):
    import sys
    from types import ModuleType, SimpleNamespace

    from dreambooth.monitor import ValidationSampler, labelled_grid

    logged = []
    mlflow = ModuleType("mlflow")
    mlflow.log_image = lambda image, key=None, step=None, artifact_file=None: logged.append(("mlflow", image, key, step))
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    comet = SimpleNamespace(name="comet_ml", writer=SimpleNamespace(
        log_image=lambda image, name=None, step=None: logged.append(("comet_ml", image, name, step))))
    sampler = SimpleNamespace(accelerator=SimpleNamespace(trackers=[SimpleNamespace(name="mlflow"), comet]))
    rows = [("a photo of sks toy", [Image.new("RGB", (32, 32), (200, 0, 0))] * 2)]
    grid = labelled_grid(rows)

    ValidationSampler._log(sampler, 40, rows, grid)
    assert logged == [("mlflow", grid, "samples", 40), ("comet_ml", grid, "samples", 40)]


def test_a_tracker_library_that_fails_to_log_the_samples_is_a_warning(monkeypatch, caplog):
    from types import SimpleNamespace

    from dreambooth.monitor import ValidationSampler

    def old_library(image, name=None):  # takes no step
        pass

    sampler = ValidationSampler.__new__(ValidationSampler)
    sampler.accelerator = SimpleNamespace(trackers=[SimpleNamespace(name="comet_ml",
                                                                    writer=SimpleNamespace(log_image=old_library))],
                                          is_main_process=True, state=SimpleNamespace(num_processes=1))
    sampler.settings = SimpleNamespace(seed=0, num_images=1, prompts=["a toy"], resolution=32, num_inference_steps=1)
    sampler.samples_dir = Path("unused")
    monkeypatch.setattr(ValidationSampler, "sampling", lambda self: contextlib.nullcontext(None))
    monkeypatch.setattr("dreambooth.monitor.generate", lambda *args: [Image.new("RGB", (32, 32))])
    monkeypatch.setattr(ValidationSampler, "_save", lambda self, image, name: None)
    with caplog.at_level("WARNING", logger="dreambooth.monitor"):
        sampler._sample("step_3", 3)
    assert "could not log the samples step_3 to the trackers (" in caplog.text
    assert "old_library() got an unexpected keyword argument 'step'); training goes on" in caplog.text


def assert_first_images_of_rows(grid_path, samples, rows: int, size: int = 32) -> None:
    """samples/final_<i>.png is the first image of row i of the labelled grid (20 px label above each row)."""
    grid = Image.open(grid_path).convert("RGB")
    for row in range(rows):
        top = row * (size + 20) + 20
        first = grid.crop((0, top, size, top + size))
        assert list(Image.open(samples / f"final_{row}.png").convert("RGB").getdata()) == list(first.getdata())


def test_tracking_logs_interval_metrics_and_a_loss_curve(tiny_model, instance_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output = tmp_path / "out"
    train_dreambooth.main(train_args(tiny_model, instance_dir, output, "--max_train_steps", "6",
                                     "--logging_steps", "2", "--report_to", "tensorboard", *SAMPLES,
                                     "--validation_steps", "4"))
    runs = [path.parent for path in (output / "logs").rglob("events.out.tfevents.*")]
    events = EventAccumulator(str(runs[0])).Reload()
    for tag in ("loss", "lr", "seconds_per_step", "images_per_second"):
        assert [event.step for event in events.Scalars(tag)] == [2, 4, 6], tag
    # The labelled grids, prompts written above their rows, one tag along the run.
    logged = events.Images("samples")
    assert [event.step for event in logged] == [4, 6]
    grid = Image.open(output / "samples" / "final.png")
    assert (logged[-1].width, logged[-1].height) == grid.size
    assert Image.open(output / "loss_curve.png").size[0] > 100


def test_model_cards_of_full_and_lora_runs(tiny_model, instance_dir, tmp_path, monkeypatch):
    # The full run's --output_dir is relative, as on most command lines: its card still shows the samples.
    monkeypatch.chdir(tmp_path)
    full, lora = Path("full"), tmp_path / "lora"
    train_dreambooth.main(train_args(tiny_model, instance_dir, full, *SAMPLES, "--validation_prompt", "a sks toy in Paris"))
    train_dreambooth.main(train_args(tiny_model, instance_dir, lora, *SAMPLES, "--use_lora",
                                     "--instance_prompt", "a photo of sks toy, [filewords]"))
    prompts = {full: ["a sks toy in Paris"], lora: ["a photo of sks toy", "a photo of sks toy on the beach"]}
    for output, is_lora in ((full, False), (lora, True)):
        text = (output / "README.md").read_text()
        card = ModelCard.load(output / "README.md")
        assert card.data.instance_prompt == "a photo of sks toy" and "filewords" not in text
        assert ("lora" in card.data.tags) is is_lora and "dreambooth" in card.data.tags
        # One widget entry per row of samples/final.png: its prompt and the row's first image.
        assert card.data.widget == [{"text": prompt, "output": {"url": f"samples/final_{index}.png"}}
                                    for index, prompt in enumerate(prompts[output])]
        assert_first_images_of_rows(output / "samples" / "final.png", output / "samples", len(prompts[output]))
        assert "".join(f"{number}. `{prompt}`\n" for number, prompt in enumerate(prompts[output], 1)) in text
        assert "2 images a row (seeds 0 to 1 in every row), 2 steps of the `dpm++` sampler, 32x32 px" in text
        assert ("load_lora_weights" in text) is is_lora
        assert str(tmp_path) not in text and "| Training steps | 2 |" in text


@pytest.fixture
def hub_calls(monkeypatch):
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def create_commit(self, **kwargs):
        calls.append(("create_commit", kwargs["repo_id"], {**kwargs, "files": committed_files(kwargs["operations"])}))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return calls


def test_push_to_hub_uploads_the_finished_output_and_the_token_leaks_nowhere(tiny_model, instance_dir, tmp_path,
                                                                             hub_calls, capfd):
    output = tmp_path / "out"
    train_dreambooth.main(train_args(tiny_model, instance_dir, output, *SAMPLES, "--report_to", "tensorboard",
                                     "--checkpointing_steps", "1", "--push_to_hub", "--hub_model_id", "me/sks-toy",
                                     "--hub_token", TOKEN, "--hub_private_repo"))
    (create, repo, create_args), (commit, commit_repo, commit_args) = hub_calls
    assert (create, repo, commit, commit_repo) == ("create_repo", "me/sks-toy", "create_commit", "me/sks-toy")
    assert create_args["private"] is True and create_args["token"] == TOKEN and commit_args["token"] == TOKEN
    uploaded = commit_args["files"]
    assert "model_index.json" in uploaded and not any(name.startswith("checkpoint-") for name in uploaded)
    # The configs recording the local base, data and output folders go up without those paths.
    rewritten = {name for name, content in uploaded.items() if content != (output / name).read_bytes()}
    assert rewritten == {"train_config.yaml", "model_index.json", "unet/config.json", "vae/config.json"}
    for content in uploaded.values():
        assert str(tmp_path).encode() not in content and TOKEN.encode() not in content
    assert b"pretrained_model_name_or_path: tiny-sd\n" in uploaded["train_config.yaml"]
    captured = capfd.readouterr()
    assert TOKEN not in captured.out + captured.err
    for path in output.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    assert "me/sks-toy" in (output / "README.md").read_text()


def test_failed_push_keeps_the_output_and_says_so(tiny_model, instance_dir, tmp_path, monkeypatch):
    def refuse(self, repo_id, **kwargs):
        raise OSError(f"connection refused while sending token {kwargs.get('token')}")

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    output = tmp_path / "out"
    with pytest.raises(DreamBoothError) as caught:
        train_dreambooth.main(train_args(tiny_model, instance_dir, output, "--push_to_hub", "--hub_model_id",
                                         "me/sks-toy", "--hub_token", TOKEN))
    message = str(caught.value)
    assert "me/sks-toy" in message and "complete" in message and TOKEN not in message
    assert (output / "model_index.json").is_file() and (output / "README.md").is_file()


def test_eval_steps_log_the_paper_metrics_without_changing_training(tiny_model, instance_dir, tmp_path,
                                                                   tiny_dino, tiny_clip):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = ["--max_train_steps", "4", "--save_precision", "fp32", "--validation_inference_steps", "2"]
    evaluated = tmp_path / "evaluated"
    train_dreambooth.main(train_args(tiny_model, instance_dir, evaluated, *args, "--eval_steps", "2",
                                     "--eval_num_prompts", "2", "--eval_images_per_prompt", "2",
                                     "--eval_dino_model", tiny_dino, "--eval_clip_model", tiny_clip,
                                     "--report_to", "tensorboard"))
    train_dreambooth.main(train_args(tiny_model, instance_dir, tmp_path / "plain", *args))
    events = EventAccumulator(str(next((evaluated / "logs").rglob("events.out.tfevents.*")).parent)).Reload()
    for metric in ("dino", "clip_i", "clip_t", "div"):
        values = events.Scalars(f"eval/{metric}")
        assert [event.step for event in values] == [2, 4], metric
        assert all(-1.0 <= event.value <= 2.0 for event in values)
    plain, evaluated_weights = unet(tmp_path / "plain"), unet(evaluated)
    assert all(torch.equal(plain[key], evaluated_weights[key]) for key in plain)


def two_concepts(tmp_path, instance_dir) -> str:
    """The toy (sks toy) and a second subject of noise images (zwx cat, with its own class prompt)."""
    import json

    import numpy as np

    cat = tmp_path / "cat"
    cat.mkdir()
    rng = np.random.default_rng(7)
    for index in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(cat / f"cat_{index}.png")
    concepts = tmp_path / "concepts.json"
    concepts.write_text(json.dumps([
        {"instance_data_dir": str(instance_dir), "instance_prompt": "a photo of sks toy"},
        {"instance_data_dir": str(cat), "instance_prompt": "zwx cat on a sofa, [filewords]",
         "class_prompt": "a photo of a cat"},
    ]))
    return str(concepts)


def test_eval_steps_score_every_concept_of_a_list(tiny_model, instance_dir, tmp_path, tiny_dino, tiny_clip):
    """Each concept with its own identifier, class noun and real images, logged under its name, and
    their mean; each the number evaluate_pipeline gives that concept with the trained weights."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dreambooth.evaluation import evaluate_pipeline, load_encoders, load_real_images
    from dreambooth.generation import load_pipeline

    output = tmp_path / "out"
    args = ["--pretrained_model_name_or_path", tiny_model, "--concepts_list", two_concepts(tmp_path, instance_dir),
            "--output_dir", str(output), "--resolution", "32", "--train_batch_size", "1", "--max_train_steps", "2",
            "--learning_rate", "1e-4", "--lr_warmup_steps", "0", "--seed", "0", "--num_validation_images", "0",
            "--save_precision", "fp32", "--validation_inference_steps", "1", "--eval_steps", "2",
            "--eval_num_prompts", "1", "--eval_images_per_prompt", "2", "--eval_dino_model", tiny_dino,
            "--eval_clip_model", tiny_clip, "--report_to", "tensorboard"]
    train_dreambooth.main(args)

    events = EventAccumulator(str(next((output / "logs").rglob("events.out.tfevents.*")).parent)).Reload()
    logged = {tag: events.Scalars(tag) for tag in events.Tags()["scalars"] if tag.startswith("eval/")}
    metrics = ("dino", "clip_i", "clip_t", "div")
    assert sorted(logged) == sorted(f"eval/{name}/{metric}" for name in ("sks_toy", "zwx_cat", "mean")
                                    for metric in metrics)
    assert all([event.step for event in values] == [2] for values in logged.values())

    pipeline = load_pipeline(str(output), torch.device("cpu"), torch.float32)
    encoders = load_encoders(tiny_dino, tiny_clip, torch.device("cpu"))
    settings = dict(num_images_per_prompt=2, seed=0, resolution=32, num_inference_steps=1, with_class_prompts=False,
                    progress=False)
    expected = {}
    for name, folder, identifier, noun in (("sks_toy", instance_dir, "sks", "toy"),
                                           ("zwx_cat", tmp_path / "cat", "zwx", "cat")):
        expected[name], _ = evaluate_pipeline(pipeline, encoders, load_real_images(folder), ["a {} in the jungle"],
                                              identifier, noun, **settings)
    for metric in metrics:
        for name in ("sks_toy", "zwx_cat"):
            assert logged[f"eval/{name}/{metric}"][0].value == pytest.approx(expected[name][metric], abs=1e-5)
        mean = (expected["sks_toy"][metric] + expected["zwx_cat"][metric]) / 2
        assert logged[f"eval/mean/{metric}"][0].value == pytest.approx(mean, abs=1e-5)
    assert expected["sks_toy"]["dino"] != pytest.approx(expected["zwx_cat"]["dino"], abs=1e-3)


def test_eval_subjects_are_read_off_each_concepts_prompts(tmp_path, instance_dir):
    from dreambooth.config import TrainConfig

    assert TrainConfig(instance_prompt="a photo of sks dog", class_prompt="a photo of a dog").eval_subjects() == [
        ("sks", "dog")]
    assert TrainConfig(instance_prompt="a photo of zwx robot").eval_subjects() == [("zwx", "robot")]
    assert TrainConfig(instance_prompt="sks toy, on a table", eval_class_noun="toy").eval_subjects() == [
        ("sks", "toy")]
    # Each concept of a list with its own class prompt; [filewords] is no word of the subject.
    assert TrainConfig(concepts_list=two_concepts(tmp_path, instance_dir)).eval_subjects() == [
        ("sks", "toy"), ("zwx", "cat")]


def test_eval_identifier_of_an_instance_prompt_without_the_class_noun(tmp_path, instance_dir):
    """'a photo of sks' names no class noun: the identifier is not 'of', a word the class prompt has too."""
    import json

    from dreambooth.config import TrainConfig

    assert TrainConfig(instance_prompt="a photo of sks", class_prompt="a photo of a dog").eval_subjects() == [
        ("sks", "dog")]
    assert TrainConfig(instance_prompt="sks", class_prompt="a dog").eval_subjects() == [("sks", "dog")]
    # Another noun in the instance prompt than the class prompt's: the word before it, as before.
    assert TrainConfig(instance_prompt="a photo of sks dog", class_prompt="a photo of a puppy").eval_subjects() == [
        ("sks", "puppy")]
    # In a list of several concepts, where --eval_identifier is refused.
    concepts = tmp_path / "concepts.json"
    concepts.write_text(json.dumps([
        {"instance_data_dir": str(instance_dir), "instance_prompt": "a photo of sks toy"},
        {"instance_data_dir": str(tmp_path), "instance_prompt": "photo of zwx, [filewords]",
         "class_prompt": "a photo of a cat"}]))
    assert TrainConfig(concepts_list=str(concepts)).eval_subjects() == [("sks", "toy"), ("zwx", "cat")]


def test_eval_subject_of_prompts_that_share_words_after_the_class_noun():
    """The class prompt is the instance prompt without its identifier: the one word it lacks is the
    identifier, and the word after it the class noun, not the last word the two prompts share."""
    from dreambooth.config import TrainConfig

    assert TrainConfig(instance_prompt="a photo of sks dog, best quality",
                       class_prompt="a photo of dog, best quality").eval_subjects() == [("sks", "dog")]
    assert TrainConfig(instance_prompt="sks dog on a beach", class_prompt="dog on a beach").eval_subjects() == [
        ("sks", "dog")]
    # The flags still name what they name.
    assert TrainConfig(instance_prompt="a photo of sks dog, best quality", class_prompt="a photo of dog, best quality",
                       eval_class_noun="dog").eval_subjects() == [("sks", "dog")]


def test_concept_names_in_the_trackers_are_readable_and_distinct():
    from dreambooth.monitor import EvalSubject, subject_names

    subjects = [EvalSubject(identifier, noun, ()) for identifier, noun in
                [("sks", "dog"), ("<zwx>", "teddy bear"), ("sks", "dog"), ("ohwx", "cat")]]
    assert subject_names(subjects) == ["sks_dog_0", "zwx_teddy_bear", "sks_dog_2", "ohwx_cat"]


def test_eval_steps_refuse_an_instance_prompt_of_captions_alone(tmp_path, instance_dir, tiny_model, tiny_dino,
                                                                 tiny_clip):
    import json

    from dreambooth.config import TrainConfig, parse_config

    concepts = tmp_path / "captions.json"
    concepts.write_text(json.dumps([{"instance_data_dir": str(instance_dir), "instance_prompt": "[filewords]"}]))
    cfg = parse_config(TrainConfig, ["--pretrained_model_name_or_path", tiny_model, "--output_dir",
                                     str(tmp_path / "out"), "--concepts_list", str(concepts), "--eval_steps", "2",
                                     "--eval_dino_model", tiny_dino, "--eval_clip_model", tiny_clip])
    with pytest.raises(DreamBoothError, match=r"^--eval_steps: the instance prompt '\[filewords\]' has no word"):
        cfg.validate()


@pytest.mark.parametrize("flag, value, subject", [("--eval_identifier", "sks", ("sks", "box")),
                                                   ("--eval_class_noun", "toy", ("sks", "toy"))])
def test_eval_subject_flags_are_refused_beside_a_list_of_several_concepts(tmp_path, instance_dir, tiny_model,
                                                                          tiny_dino, tiny_clip, flag, value, subject):
    import json

    from dreambooth.config import TrainConfig, parse_config

    base = ["--pretrained_model_name_or_path", tiny_model, "--output_dir", str(tmp_path / "out"), "--eval_steps",
            "2", "--eval_dino_model", tiny_dino, "--eval_clip_model", tiny_clip, flag, value]
    several = parse_config(TrainConfig, [*base, "--concepts_list", two_concepts(tmp_path, instance_dir)])
    with pytest.raises(DreamBoothError, match=rf"^{flag}: --concepts_list .* has 2 concepts, each scored with "
                                              rf"the identifier and class noun of its own prompts \(or its own "
                                              rf"{flag[2:]} key\); leave out"):
        several.validate()
    # A list of one concept is a single concept: the flag names its subject.
    one = tmp_path / "one.json"
    one.write_text(json.dumps([{"instance_data_dir": str(instance_dir),
                                "instance_prompt": "a photo of sks toy in a box"}]))
    assert parse_config(TrainConfig, ["--concepts_list", str(one)]).eval_subjects() == [("a", "box")]
    assert parse_config(TrainConfig, [*base, "--concepts_list", str(one)]).eval_subjects() == [subject]


def test_a_concept_names_its_own_eval_subject_where_its_prompts_do_not(tmp_path, instance_dir, tiny_model, tiny_dino,
                                                                        tiny_clip):
    """'a photo of zwx' with no class prompt reads as 'of' and 'zwx': the concept's keys say it."""
    import json
    import shutil

    from dreambooth.config import TrainConfig, parse_config

    second = shutil.copytree(instance_dir, tmp_path / "zwx")

    def concepts(**keys) -> str:
        listed = tmp_path / "concepts.json"
        listed.write_text(json.dumps([
            {"instance_data_dir": str(instance_dir), "instance_prompt": "a photo of sks toy"},
            {"instance_data_dir": str(second), "instance_prompt": "a photo of zwx", **keys}]))
        return str(listed)

    assert TrainConfig(concepts_list=concepts()).eval_subjects() == [("sks", "toy"), ("of", "zwx")]
    assert TrainConfig(concepts_list=concepts(eval_identifier="zwx", eval_class_noun="cat")).eval_subjects() == [
        ("sks", "toy"), ("zwx", "cat")]
    base = ["--pretrained_model_name_or_path", tiny_model, "--output_dir", str(tmp_path / "out"), "--eval_steps", "2",
            "--eval_dino_model", tiny_dino, "--eval_clip_model", tiny_clip]
    parse_config(TrainConfig, [*base, "--concepts_list", concepts(eval_identifier="zwx")]).validate()
    with pytest.raises(DreamBoothError, match=r"^--concepts_list .*, concept 1: eval_identifier zxw: not a word of "
                                              r"the instance prompt 'a photo of zwx'$"):
        parse_config(TrainConfig, [*base, "--concepts_list", concepts(eval_identifier="zxw")]).validate()
    # A single concept's flag, checked alike.
    single = [*base, "--instance_data_dir", str(instance_dir), "--instance_prompt", "a photo of sks toy"]
    parse_config(TrainConfig, [*single, "--eval_identifier", "sks"]).validate()
    with pytest.raises(DreamBoothError, match=r"^--eval_identifier skz: not a word of the instance prompt "
                                              r"'a photo of sks toy'$"):
        parse_config(TrainConfig, [*single, "--eval_identifier", "skz"]).validate()


@pytest.mark.parametrize("prior", [False, True])
def test_logged_loss_is_the_mean_over_the_accumulation_window(prior):
    from accelerate import Accelerator

    from dreambooth.training import Schedule, Trainer

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    batches = torch.utils.data.DataLoader(ListDataset([float(i + 1) for i in range(8)]), batch_size=1,
                                          collate_fn=lambda values: {"value": torch.tensor(values), "prompts": ["p"]})
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer, batches, schedule = accelerator.prepare(model, optimizer, batches, schedule)

    def loss_fn(batch):  # micro-batch k has loss k + 1; with prior preservation, instance 1 and prior k
        loss = batch["value"].mean() + 0 * model.weight.sum()
        return {"loss": loss, "instance_loss": loss ** 0, "prior_loss": loss - 1} if prior else {"loss": loss}

    trainer = Trainer(accelerator, [model], optimizer, schedule, batches, Schedule(1, 1, 4, 1), loss_fn,
                      max_grad_norm=0, logging_steps=2)
    trainer.train()
    assert trainer.metrics.history == [(1, 1.5), (2, 3.5), (3, 5.5), (4, 7.5)]
    intervals = trainer.metrics.intervals
    assert [interval["loss"] for interval in intervals] == [2.5, 6.5]
    if prior:
        assert [(interval["instance_loss"], interval["prior_loss"]) for interval in intervals] == [(1, 1.5), (1, 5.5)]
    else:
        assert not any("prior_loss" in interval or "instance_loss" in interval for interval in intervals)


def test_a_resumed_run_hides_from_tensorboard_what_the_interrupted_run_logged_after_its_checkpoint(tmp_path):
    from accelerate.tracking import TensorBoardTracker
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dreambooth.monitor import tracker_init_kwargs

    def log_run(steps, loss: float, resumed_step: int) -> None:
        kwargs = tracker_init_kwargs(resumed_step, tmp_path, ["tensorboard"]).get("tensorboard", {})
        tracker = TensorBoardTracker("dreambooth", tmp_path, **kwargs)
        tracker.start()
        for step in steps:
            tracker.log({"loss": loss}, step=step)
        tracker.finish()

    log_run(range(1, 7), 1.0, resumed_step=0)  # killed at step 6, its last checkpoint at step 3
    log_run(range(4, 9), 2.0, resumed_step=3)
    events = EventAccumulator(str(tmp_path / "dreambooth"))
    events.Reload()
    assert [(event.step, event.value) for event in events.Scalars("loss")] == [
        (1, 1.0), (2, 1.0), (3, 1.0), (4, 2.0), (5, 2.0), (6, 2.0), (7, 2.0), (8, 2.0)]


def test_a_resumed_run_continues_the_wandb_run_its_first_start_chose(tmp_path, monkeypatch, caplog):
    import json

    from dreambooth.monitor import TRACKER_RUN_FILE, tracker_init_kwargs

    monkeypatch.delenv("WANDB_DIR", raising=False)
    logs, both = tmp_path / "out" / "logs", ["tensorboard", "wandb"]
    fresh = tracker_init_kwargs(0, logs, both)
    run_id = fresh["wandb"]["id"]
    assert fresh == {"wandb": {"id": run_id, "resume": "allow", "dir": str(logs)}}
    assert json.loads((logs / TRACKER_RUN_FILE).read_text()) == {"id": run_id}

    resumed = tracker_init_kwargs(300, logs, both)
    assert resumed == {"tensorboard": {"purge_step": 301}, "wandb": {"id": run_id, "resume": "allow", "dir": str(logs)}}
    assert tracker_init_kwargs(600, logs, both)["wandb"]["id"] == run_id

    # A fresh start in the folder (--overwrite_output_dir) is a new run, and resumes of it continue that one.
    restarted = tracker_init_kwargs(0, logs, both)["wandb"]["id"]
    assert restarted != run_id and tracker_init_kwargs(100, logs, both)["wandb"]["id"] == restarted

    (logs / TRACKER_RUN_FILE).write_text("{not json")
    with caplog.at_level("WARNING", logger="dreambooth.monitor"):
        replaced = tracker_init_kwargs(100, logs, both)["wandb"]["id"]
    assert replaced != restarted and f"{logs / TRACKER_RUN_FILE}: is malformed" in caplog.text
    assert tracker_init_kwargs(200, logs, both)["wandb"]["id"] == replaced

    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
    assert "dir" not in tracker_init_kwargs(200, logs, both)["wandb"]
    # Without wandb nothing is kept: a TensorBoard run's logging folder holds only its own logs.
    assert tracker_init_kwargs(0, tmp_path / "tb", ["tensorboard"]) == {}
    assert not (tmp_path / "tb").exists()


FAKE_MLFLOW = Path(__file__).parent / "fixtures" / "fake_mlflow"


def test_a_resumed_run_continues_the_mlflow_run_of_its_first_start(tiny_model, instance_dir, tmp_path):
    """Against a stand-in for MLflow's API (tests/fixtures/fake_mlflow, which refuses what MLflow
    refuses): one run from step 1 to the end, its parameters those of the first start."""
    import json
    import subprocess
    import sys

    from conftest import ROOT
    from dreambooth.monitor import TRACKER_RUN_FILE

    store, output = tmp_path / "mlflow.json", tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FAKE_MLFLOW_STORE": str(store), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(FAKE_MLFLOW), os.environ.get("PYTHONPATH", "")])}
    args = train_args(tiny_model, instance_dir, output, "--report_to", "mlflow", "--logging_steps", "1",
                      "--checkpointing_steps", "2")

    def train(*extra: str) -> None:
        finished = subprocess.run([sys.executable, str(ROOT / "train_dreambooth.py"), *args, *extra], cwd=ROOT,
                                  env=env, capture_output=True, text=True, timeout=300)
        assert finished.returncode == 0, finished.stderr[-3000:]

    train("--max_train_steps", "4")
    train("--max_train_steps", "6", "--resume_from_checkpoint", "latest")

    runs = json.loads(store.read_text())["runs"]
    assert len(runs) == 1
    (run_id, run), = runs.items()
    assert run["starts"] == 2
    assert [step for name, _, step in run["metrics"] if name == "loss"] == [1, 2, 3, 4, 5, 6]
    # MLflow refuses a parameter logged again with another value: the continued run keeps the first start's.
    assert run["params"]["max_train_steps"] == "4" and "resume_from_checkpoint" not in run["params"]
    assert json.loads((output / "logs" / TRACKER_RUN_FILE).read_text()) == {"mlflow_run_id": run_id}
    # A fresh start in the folder is a new run.
    train("--max_train_steps", "2", "--checkpointing_steps", "1", "--overwrite_output_dir")
    assert len(json.loads(store.read_text())["runs"]) == 2

    # A kept run the tracking server no longer has: one line saying so, and how to go on.
    store.unlink()
    failed = subprocess.run([sys.executable, str(ROOT / "train_dreambooth.py"), *args, "--max_train_steps", "3",
                             "--resume_from_checkpoint", "latest"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    last = failed.stderr.strip().splitlines()[-1]
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert last.startswith("error: --report_to mlflow: the tracker could not start (Run with id=") and last.endswith(
        f"continues the MLflow run kept in {output / 'logs' / TRACKER_RUN_FILE}: delete that file to log it as a new run")


def test_a_resumed_run_without_a_kept_mlflow_run_starts_a_new_one(tmp_path, caplog):
    from dreambooth.monitor import tracker_init_kwargs

    with caplog.at_level("INFO", logger="dreambooth.monitor"):
        assert tracker_init_kwargs(300, tmp_path, ["mlflow"]) == {"tensorboard": {"purge_step": 301}}
    assert "keeps no MLflow run" in caplog.text
    (tmp_path / "tracker_run.json").write_text('{"mlflow_run_id": "0123abcd"}')
    assert tracker_init_kwargs(300, tmp_path, ["mlflow"])["mlflow"] == {"run_id": "0123abcd"}
    # A first start: MLflow chooses, and the run of an earlier start is forgotten.
    assert "mlflow" not in tracker_init_kwargs(0, tmp_path, ["mlflow"])
    assert "mlflow" not in tracker_init_kwargs(300, tmp_path, ["mlflow"])


@pytest.mark.parametrize("takes_keys", [True, False])
def test_a_resumed_run_continues_the_comet_experiment_of_its_first_start(tmp_path, monkeypatch, takes_keys):
    from dreambooth import monitor

    monkeypatch.setattr(monitor, "comet_takes_experiment_keys", lambda: takes_keys)
    fresh = monitor.tracker_init_kwargs(0, tmp_path, ["comet_ml"])
    if not takes_keys:  # an older comet_ml: accelerate gives its keyword arguments to comet_ml.Experiment
        assert fresh == {}
        return
    key = fresh["comet_ml"]["experiment_key"]
    # Comet takes 32 to 50 letters and digits.
    assert fresh == {"comet_ml": {"experiment_key": key, "mode": "get_or_create"}}
    assert len(key) == 32 and key.isalnum()
    assert monitor.tracker_init_kwargs(300, tmp_path, ["comet_ml"])["comet_ml"]["experiment_key"] == key
    assert monitor.tracker_init_kwargs(0, tmp_path, ["comet_ml"])["comet_ml"]["experiment_key"] != key


@pytest.mark.parametrize("installed, takes_keys", [("3.41.0", True), ("3.47.2", True), ("3.40.9", False),
                                                  (None, False)])
def test_experiment_keys_go_to_a_comet_ml_that_accelerate_starts_with_comet_ml_start(monkeypatch, installed,
                                                                                      takes_keys):
    import importlib.metadata

    from dreambooth.monitor import comet_takes_experiment_keys

    def version(name):
        if installed is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed if name == "comet_ml" else "0"

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert comet_takes_experiment_keys() is takes_keys


def _wandb_offline_steps(run_file: Path) -> tuple[set[str], list[int]]:
    """The run ids and the history steps an offline run file (``run-<id>.wandb``) records: a log of
    length-prefixed records in 32 KiB blocks (LevelDB's log format) after a 7-byte header."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, position, pending, run_ids, steps = run_file.read_bytes(), 7, b"", set(), []
    assert data.startswith(b":W&B")
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last part of one
            record = wandb_internal_pb2.Record.FromString(pending)
            pending = b""
            if record.HasField("run"):
                run_ids.add(record.run.run_id)
            if record.HasField("history"):
                steps.append(record.history.step.num)
    return run_ids, steps


def test_a_resumed_offline_wandb_run_logs_to_the_same_run(tiny_model, instance_dir, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    import json

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    output = tmp_path / "out"
    args = train_args(tiny_model, instance_dir, output, "--report_to", "wandb", "--logging_steps", "1",
                      "--checkpointing_steps", "1")
    train_dreambooth.main(args)
    train_dreambooth.main(args + ["--resume_from_checkpoint", "checkpoint-1"])  # as after a kill past step 1
    wandb.teardown()  # an offline run's file is complete once wandb's service has stopped

    run_id = json.loads((output / "logs" / "tracker_run.json").read_text())["id"]
    halves = sorted((output / "logs" / "wandb").glob("offline-run-*"))
    assert [folder.name.rsplit("-", 1)[-1] for folder in halves] == [run_id, run_id]
    recorded = [_wandb_offline_steps(folder / f"run-{run_id}.wandb") for folder in halves]
    assert recorded == [({run_id}, [1, 2]), ({run_id}, [2])]


def test_a_log_line_during_training_goes_above_the_progress_bar_not_onto_its_line(capsys, monkeypatch):
    import logging

    from dreambooth.cli import setup_logging

    monkeypatch.setattr(logging.root, "handlers", list(logging.root.handlers))
    setup_logging()
    trainer = linear_trainer(lr=0.0)
    trainer.step_callbacks.append(lambda state: logging.getLogger("dreambooth.checkpoints").info(
        "removing old checkpoint checkpoint-%d", state.global_step - 1) if state.global_step == 2 else None)
    trainer.train()
    console = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert "INFO: removing old checkpoint checkpoint-1" in console, console


def test_a_run_stopped_by_a_signal_logs_the_steps_since_its_last_logging_step():
    import signal

    trainer = linear_trainer([float(i + 1) for i in range(8)], lr=0.0,
                             loss=lambda model, batch: batch["value"].mean() + 0 * model.weight.sum(), logging_steps=4)
    trainer.step_callbacks.append(lambda state: signal.raise_signal(signal.SIGTERM) if state.global_step == 6 else None)
    trainer.train()
    assert trainer.interrupted and trainer.state.global_step == 6
    assert [(interval["last_step"], interval["loss"]) for interval in trainer.metrics.intervals] == [(4, 2.5), (6, 5.5)]
    assert trainer.metrics.history == [(step, float(step)) for step in range(1, 7)]


def test_speed_figures_leave_out_sampling_and_saving(monkeypatch):
    from dreambooth import monitor

    clock = iter([0.0, 10.0, 40.0, 42.0]).__next__  # restart, pause start, pause end, read
    monkeypatch.setattr(monitor.time, "perf_counter", clock)
    metrics = monitor.Metrics()
    metrics.restart_clock()
    metrics.add(torch.tensor(1.0), images=4)
    with metrics.paused():  # 30 s of sampling
        pass
    logs = metrics.read(1)
    assert logs["seconds_per_step"] == 12.0 and logs["images_per_second"] == 4 / 12.0


def test_a_row_label_longer_than_its_row_is_cut_with_an_ellipsis():
    from PIL import ImageDraw

    from dreambooth.generation import fit_text
    from dreambooth.monitor import labelled_grid

    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    prompt = "a photo of sks toy on the beach at sunset"
    assert fit_text(draw, prompt, 1000) == prompt
    cut = fit_text(draw, prompt, 60)
    assert cut.endswith("...") and prompt.startswith(cut[:-3]) and draw.textlength(cut) <= 60
    tiles = [Image.new("RGB", (32, 32), "gray")] * 2
    grid = labelled_grid([(prompt, tiles)])
    expected = Image.new("RGB", grid.size, "white")
    ImageDraw.Draw(expected).text((4, 4), fit_text(draw, prompt, 64 - 8), fill="black")
    assert list(grid.crop((0, 0, 64, 20)).getdata()) == list(expected.crop((0, 0, 64, 20)).getdata())


def test_several_trackers_comma_separated_each_log_the_run(tiny_model, instance_dir, tmp_path):
    import json
    import subprocess
    import sys

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from conftest import ROOT

    store, output = tmp_path / "mlflow.json", tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FAKE_MLFLOW_STORE": str(store), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(FAKE_MLFLOW), os.environ.get("PYTHONPATH", "")])}
    args = train_args(tiny_model, instance_dir, output, "--logging_steps", "1", "--report_to",
                      " tensorboard, mlflow,tensorboard")
    finished = subprocess.run([sys.executable, str(ROOT / "train_dreambooth.py"), *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]

    events = EventAccumulator(str(output / "logs" / "dreambooth")).Reload()
    assert [event.step for event in events.Scalars("loss")] == [1, 2]
    (run,) = json.loads(store.read_text())["runs"].values()
    assert [step for name, _, step in run["metrics"] if name == "loss"] == [1, 2]


def test_report_to_names_the_trackers_of_the_run():
    from dreambooth.config import TrainConfig

    assert TrainConfig(report_to="none").trackers() == []
    assert TrainConfig(report_to="all").trackers() == "all"
    assert TrainConfig(report_to="wandb").trackers() == ["wandb"]
    assert TrainConfig(report_to="tensorboard,wandb, mlflow").trackers() == ["tensorboard", "wandb", "mlflow"]


@pytest.mark.slow
def test_two_processes_share_the_validation_and_eval_drawing_and_the_main_process_keeps_it(
        tiny_model, instance_dir, tmp_path, tiny_dino, tiny_clip):
    """The grid's rows and the evaluation's batches are dealt out in turn; the main process writes
    and scores what one process draws from the trained weights."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_multiprocess import launch

    from dreambooth.evaluation import evaluate_pipeline, load_encoders, load_real_images
    from dreambooth.generation import generate, load_pipeline
    from dreambooth.monitor import labelled_grid

    output = tmp_path / "out"
    script, notes = noting_script(tmp_path, "train_dreambooth")
    validation_prompts = ["a photo of sks toy", "sks toy in the snow"]
    launched = launch(train_args(tiny_model, instance_dir, output, "--save_precision", "fp32",
                                 "--num_validation_images", "2", "--validation_steps", "2",
                                 "--validation_prompt", validation_prompts[0], "--validation_prompt",
                                 validation_prompts[1], "--validation_inference_steps", "1", "--eval_steps", "2",
                                 "--eval_num_prompts", "2", "--eval_images_per_prompt", "2", "--eval_dino_model",
                                 tiny_dino, "--eval_clip_model", tiny_clip, "--report_to", "tensorboard"),
                      script=script)

    # Step 2 draws the grid (final.png is a copy of it) and the evaluation: each process one grid row
    # and one evaluation prompt's batch, seeds 0 and 1.
    drawn = [drawn_batches(notes, process) for process in (0, 1)]
    assert [[prompt for prompt, _ in each[:1]] for each in drawn] == [[validation_prompts[0]], [validation_prompts[1]]], drawn
    assert [len(each) for each in drawn] == [2, 2] and all(seeds == [0, 1] for each in drawn for _, seeds in each)
    eval_prompts = [drawn[0][1][0], drawn[1][1][0]]
    assert eval_prompts[0] != eval_prompts[1] and all("sks toy" in prompt for prompt in eval_prompts)
    assert (launched.stdout + launched.stderr).count("step 2: eval/dino") == 1

    pipeline = load_pipeline(str(output), torch.device("cpu"), torch.float32)
    with one_thread():
        rows = [(prompt, generate(pipeline, prompt, [0, 1], 32, 32, 1)) for prompt in validation_prompts]
        expected, _ = evaluate_pipeline(pipeline, load_encoders(tiny_dino, tiny_clip, torch.device("cpu")),
                                        load_real_images(instance_dir),
                                        [prompt.replace("sks toy", "{}") for prompt in eval_prompts], "sks", "toy",
                                        num_images_per_prompt=2, seed=0, resolution=32, num_inference_steps=1,
                                        with_class_prompts=False, progress=False)
    grid = np.asarray(labelled_grid(rows).convert("RGB"))
    for name in ("step_2.png", "final.png"):
        assert np.array_equal(np.asarray(Image.open(output / "samples" / name).convert("RGB")), grid), name
    events = EventAccumulator(str(next((output / "logs").rglob("events.out.tfevents.*")).parent)).Reload()
    for metric in ("dino", "clip_i", "clip_t", "div"):
        assert [(event.step, event.value) for event in events.Scalars(f"eval/{metric}")] == [
            (2, pytest.approx(expected[metric], abs=1e-5))], metric
