"""The base models users pass, right and wrong: every script that loads a base refuses a wrong one at start,
with one line saying what to pass instead; our own full run is a base; SD 2.x v-prediction runs end to end."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
import yaml
from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
from PIL import Image
from safetensors.torch import load_file, safe_open, save_file

import evaluate
import export
import generate_class_images
import infer
import train_dreambooth
from conftest import HUB_ID, HUB_LORA, one_thread, train_args, write_to_hub_cache
from dreambooth.errors import DreamBoothError


def edit_json(file: Path, **changes) -> None:
    """Set (or, for None, remove) keys of a JSON file."""
    values = json.loads(file.read_text())
    values.update(changes)
    file.write_text(json.dumps({key: value for key, value in values.items() if value is not None}))


def make_sdxl(folder: Path) -> None:
    shutil.copytree(folder / "text_encoder", folder / "text_encoder_2")
    shutil.copytree(folder / "tokenizer", folder / "tokenizer_2")
    edit_json(folder / "model_index.json", _class_name="StableDiffusionXLPipeline",
              text_encoder_2=["transformers", "CLIPTextModelWithProjection"], tokenizer_2=["transformers", "CLIPTokenizer"])
    edit_json(folder / "unet" / "config.json", addition_embed_type="text_time", addition_time_embed_dim=8,
              projection_class_embeddings_input_dim=80)


def make_sdxl_unet_only(folder: Path) -> None:
    """A repo whose model_index.json says nothing of SDXL, but whose UNet wants SDXL's extra conditioning."""
    edit_json(folder / "unet" / "config.json", addition_embed_type="text_time", addition_time_embed_dim=8,
              projection_class_embeddings_input_dim=80)


def make_inpainting(folder: Path) -> None:
    edit_json(folder / "unet" / "config.json", in_channels=9)


def make_unclip(folder: Path) -> None:
    edit_json(folder / "model_index.json", _class_name="StableUnCLIPPipeline")
    edit_json(folder / "unet" / "config.json", class_embed_type="projection", projection_class_embeddings_input_dim=64)


def make_sd3(folder: Path) -> None:
    """SD3 has three text encoders (two CLIPs and a T5) and a transformer where SD has its UNet."""
    (folder / "unet").rename(folder / "transformer")
    for number in (2, 3):
        shutil.copytree(folder / "text_encoder", folder / f"text_encoder_{number}")
    edit_json(folder / "model_index.json", _class_name="StableDiffusion3Pipeline", unet=None,
              transformer=["diffusers", "SD3Transformer2DModel"],
              text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
              text_encoder_3=["transformers", "T5EncoderModel"])


def make_flux(folder: Path) -> None:
    (folder / "unet").rename(folder / "transformer")
    shutil.copytree(folder / "text_encoder", folder / "text_encoder_2")
    edit_json(folder / "model_index.json", _class_name="FluxPipeline", unet=None,
              transformer=["diffusers", "FluxTransformer2DModel"], text_encoder_2=["transformers", "T5EncoderModel"])


def without_vae(folder: Path) -> None:
    shutil.rmtree(folder / "vae")


def without_unet_weights(folder: Path) -> None:
    for weights in (folder / "unet").glob("*.safetensors"):
        weights.unlink()


def broken_index(folder: Path) -> None:
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", ')


# case: (how the tiny pipeline is edited, what the one-line error says)
WRONG_PIPELINES = {
    "sdxl": (make_sdxl, "an SDXL model .StableDiffusionXLPipeline.*Stable Diffusion 1.x/2.x text-to-image models only"),
    "sdxl_unet": (make_sdxl_unet_only, "an SDXL model .*Stable Diffusion 1.x/2.x"),
    "inpainting": (make_inpainting, "an inpainting model, its UNet takes 9 input channels, not the 4 of text-to-image"),
    "unclip": (make_unclip, "StableUnCLIPPipeline, its UNet wants an image embedding besides the text"),
    "sd3": (make_sd3, "a transformer-based model .*StableDiffusion3Pipeline with no unet; .*stable-diffusion-v1-5"),
    "flux": (make_flux, "a transformer-based model .*FluxPipeline with no unet"),
    "missing_vae": (without_vae, "model_index.json names vae, but the folder has no vae/ .*copy the whole model again"),
    "unet_without_weights": (without_unet_weights, "unet/ holds no weights"),
    "broken_index": (broken_index, "cannot read model_index.json"),
}


@pytest.fixture(scope="module")
def wrong_bases(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """Each wrong base as users pass it: the tiny pipeline with its configs edited, and the folders and files
    that are not pipelines at all."""
    root = tmp_path_factory.mktemp("wrong-bases")
    bases = {}
    for case, (edit, _) in WRONG_PIPELINES.items():
        bases[case] = shutil.copytree(tiny_model, root / case)
        edit(bases[case])
    unet_weights = load_file(Path(tiny_model) / "unet" / "diffusion_pytorch_model.safetensors")
    bases["single_file"] = root / "v1-5-pruned-emaonly.safetensors"
    save_file({f"model.diffusion_model.{key}": value for key, value in unet_weights.items()}, bases["single_file"])
    bases["ckpt"] = root / "model.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.conv_in.weight": torch.zeros(1)}}, bases["ckpt"])
    bases["civitai_folder"] = root / "civitai-download"
    bases["civitai_folder"].mkdir()
    shutil.copy(bases["single_file"], bases["civitai_folder"] / "dreamshaper_8.safetensors")
    lora = {"unet.down_blocks.0.attentions.0.to_q.lora_A.weight": torch.zeros(4, 16)}
    bases["lora_file"] = root / "sks-dog-lora.safetensors"
    save_file(lora, bases["lora_file"])
    bases["lora_run"] = root / "lora-run"
    bases["lora_run"].mkdir()
    save_file(lora, bases["lora_run"] / "pytorch_lora_weights.safetensors")
    (bases["lora_run"] / "train_config.yaml").write_text(yaml.safe_dump({"pretrained_model_name_or_path": HUB_ID}))
    bases["lora_checkpoint"] = shutil.copytree(bases["lora_run"], root / "lora-run-2" / "checkpoint-4")
    (bases["lora_checkpoint"] / "train_config.yaml").rename(bases["lora_checkpoint"].parent / "train_config.yaml")
    (bases["lora_checkpoint"] / "checkpoint_complete.json").write_text('{"step": 4}')
    bases["checkpoint"] = root / "full-run" / "checkpoint-4"
    shutil.copytree(Path(tiny_model) / "unet", bases["checkpoint"] / "unet")
    (bases["checkpoint"] / "checkpoint_complete.json").write_text('{"step": 4}')
    bases["component"] = root / "sdxl" / "unet"
    bases["unfinished_run"] = root / "unfinished-run"
    shutil.copytree(bases["checkpoint"], bases["unfinished_run"] / "checkpoint-4")
    (bases["unfinished_run"] / "train_config.yaml").write_text(yaml.safe_dump({"pretrained_model_name_or_path": "x"}))
    return bases


NOT_PIPELINES = {
    "single_file": "a single-file checkpoint; the base must be a diffusers folder or Hub id: convert it once with "
                   "python -c .*from_single_file.*v1-5-pruned-emaonly.safetensors'.*save_pretrained",
    "ckpt": "model.ckpt: a single-file checkpoint; .*from_single_file",
    "civitai_folder": "folder has no model_index.json but holds dreamshaper_8.safetensors: a single-file checkpoint",
    "lora_file": "a LoRA file, not a base model: pass the base model it was trained on, and this file as infer.py's --lora",
    "lora_run": f"a LoRA run's output .adapters only., not a base model: pass its base model .{HUB_ID}. as "
                "--pretrained_model_name_or_path",
    "lora_checkpoint": f"a LoRA checkpoint .adapters only., not a base model: pass its base model .{HUB_ID}.",
    "checkpoint": "a training checkpoint .only the trained weights., not a base model: sample it with infer.py "
                  "--checkpoint, continue its run with --resume_from_checkpoint",
    "component": "sdxl/unet: one component of the pipeline in .*sdxl; pass that folder",
    "unfinished_run": "the run did not finish.: continue it with --resume_from_checkpoint latest",
}
ALL_CASES = {**{case: message for case, (_, message) in WRONG_PIPELINES.items()}, **NOT_PIPELINES}


def run_script(script: str, base: str, tmp_path: Path, instance: Path):
    if script == "train":
        return train_dreambooth.main(train_args(base, instance, tmp_path / "out"))
    if script == "class_images":
        return generate_class_images.main(["--pretrained_model_name_or_path", base, "--class_prompt", "a toy",
                                           "--class_data_dir", str(tmp_path / "class"), "--resolution", "32"])
    if script == "infer":
        return infer.main(["--pretrained_model_name_or_path", base, "--prompt", "a toy", "--output_dir",
                           str(tmp_path / "samples")])
    if script == "evaluate":
        return evaluate.main(["--pretrained_model_name_or_path", base, "--instance_data_dir", str(instance),
                              "--identifier", "sks", "--class_noun", "toy", "--output_dir", str(tmp_path / "eval")])
    return export.main([base, "--output", str(tmp_path / "exported.safetensors")])


@pytest.fixture
def no_loading(monkeypatch):
    """Loading any model or tokenizer fails the test: a wrong base must be refused before."""
    from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    def refuse(cls, *args, **kwargs):
        raise AssertionError(f"{cls.__name__} loaded a wrong base")

    for cls in (DiffusionPipeline, UNet2DConditionModel, AutoencoderKL, CLIPTextModel, AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", classmethod(refuse))


@pytest.mark.parametrize("script", ["train", "class_images", "infer", "evaluate"])
@pytest.mark.parametrize("case", list(ALL_CASES))
def test_a_wrong_base_stops_every_script_at_start_with_one_line(case, script, wrong_bases, instance_dir, tmp_path,
                                                                no_loading):
    with pytest.raises(DreamBoothError, match=ALL_CASES[case]) as error:
        run_script(script, str(wrong_bases[case]), tmp_path, instance_dir)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"--pretrained_model_name_or_path {wrong_bases[case]}: ")
    assert not (tmp_path / "out" / "model_index.json").exists()


@pytest.mark.parametrize("case", list(WRONG_PIPELINES))
def test_export_refuses_a_pipeline_it_cannot_be_a_run_of(case, wrong_bases, tmp_path, no_loading):
    with pytest.raises(DreamBoothError, match=WRONG_PIPELINES[case][1]) as error:
        run_script("export", str(wrong_bases[case]), tmp_path, tmp_path)
    assert str(error.value).startswith(f"OUTPUT_DIR {wrong_bases[case]}: ")
    assert not (tmp_path / "exported.safetensors").exists()


@pytest.mark.parametrize("case", ["single_file", "ckpt"])
def test_export_of_a_single_file_says_it_takes_a_run_folder(case, wrong_bases, tmp_path):
    with pytest.raises(DreamBoothError, match="a file; export.py turns a training run's output folder into one"):
        run_script("export", str(wrong_bases[case]), tmp_path, tmp_path)


def test_a_lora_run_is_refused_as_a_base_but_infer_takes_it_as_lora(wrong_bases, tmp_path, no_loading):
    with pytest.raises(DreamBoothError, match="and this folder as --lora$"):
        infer.main(["--pretrained_model_name_or_path", str(wrong_bases["lora_run"]), "--prompt", "x",
                    "--output_dir", str(tmp_path)])
    with pytest.raises(DreamBoothError, match="; infer.py and evaluate.py take this folder as --lora over it$"):
        generate_class_images.main(["--pretrained_model_name_or_path", str(wrong_bases["lora_run"]),
                                    "--class_prompt", "a toy", "--class_data_dir", str(tmp_path / "class")])


def test_a_full_run_given_as_lora_is_pointed_to_the_base_flag(tiny_model, wrong_bases, tmp_path, no_loading):
    argv = ["--pretrained_model_name_or_path", tiny_model, "--prompt", "x", "--output_dir", str(tmp_path)]
    with pytest.raises(DreamBoothError, match="^--lora .*: a full pipeline, not LoRA weights; pass it as "
                                              "--pretrained_model_name_or_path$"):
        infer.main([*argv, "--lora", tiny_model])
    with pytest.raises(DreamBoothError, match="full-run: the folder has no pytorch_lora_weights.safetensors"):
        infer.main([*argv, "--lora", str(wrong_bases["checkpoint"].parent)])


def test_a_wrong_hub_model_is_refused_before_its_weights_load(tiny_model, hub_cache, instance_dir, tmp_path,
                                                              no_loading):
    """A Hub id is checked by its model_index.json and UNet config, read from the cache (or the Hub)."""
    sdxl = shutil.copytree(tiny_model, tmp_path / "sdxl")
    make_sdxl(sdxl)
    inpainting = shutil.copytree(tiny_model, tmp_path / "inpainting")
    make_inpainting(inpainting)
    write_to_hub_cache(hub_cache, "someone/sdxl-base", sdxl, "e" * 40, ("main",))
    write_to_hub_cache(hub_cache, "someone/sd-inpainting", inpainting, "f" * 40, ("main",))

    with pytest.raises(DreamBoothError, match="^--pretrained_model_name_or_path someone/sdxl-base: an SDXL model"):
        train_dreambooth.main(train_args("someone/sdxl-base", instance_dir, tmp_path / "out"))
    with pytest.raises(DreamBoothError, match="someone/sd-inpainting: an inpainting model"):
        infer.main(["--pretrained_model_name_or_path", "someone/sd-inpainting", "--prompt", "x",
                    "--output_dir", str(tmp_path / "samples")])


def test_hub_models_that_cannot_be_looked_at_are_left_to_the_loading(hub_cache, tmp_path):
    """A Hub id whose model_index.json is not in the cache (offline) passes the check; loading then says why."""
    from dreambooth.bases import check_base_model

    check_base_model(HUB_ID)
    check_base_model("someone/not-downloaded")
    with pytest.raises(DreamBoothError, match="not fully in the Hugging Face cache .*hf download someone/not-downloaded"):
        generate_class_images.main(["--pretrained_model_name_or_path", "someone/not-downloaded", "--class_prompt", "a",
                                    "--class_data_dir", str(tmp_path / "class"), "--num_class_images", "1"])


def test_a_folder_with_only_fp16_weights_asks_for_the_variant_that_then_loads(tiny_model, tmp_path):
    """`hf download ... --include "*.fp16.*"` leaves only variant files, which diffusers loads only when asked."""
    folder = shutil.copytree(tiny_model, tmp_path / "fp16-only")
    for weights in folder.glob("*/*.safetensors"):
        weights.rename(weights.with_name(weights.name.replace(".safetensors", ".fp16.safetensors")))
    argv = ["--pretrained_model_name_or_path", str(folder), "--prompt", "a toy", "--num_images_per_prompt", "1",
            "--num_inference_steps", "1", "--height", "32", "--width", "32", "--output_dir", str(tmp_path / "samples")]

    with pytest.raises(DreamBoothError, match="unet/ holds only fp16 weights .diffusion_pytorch_model.fp16.safetensors.; "
                                              "pass --variant fp16$"):
        infer.main(argv)
    assert len(infer.main([*argv, "--variant", "fp16"])) == 1


def unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(Path(folder) / "unet" / "diffusion_pytorch_model.safetensors")


def test_a_full_runs_output_is_a_base_to_train_over(tiny_model, instance_dir, tmp_path):
    """Our own output (with its checkpoints, train_config.yaml and logs beside the pipeline) is a diffusers
    pipeline: training over it starts from its weights, not from its base's."""
    first = tmp_path / "first"
    train_dreambooth.main(train_args(tiny_model, instance_dir, first, "--max_train_steps", "1",
                                     "--checkpointing_steps", "1"))
    assert (first / "checkpoint-1").is_dir()
    second = tmp_path / "second"
    train_dreambooth.main(train_args(str(first), instance_dir, second, "--learning_rate", "1e-12",
                                     "--max_train_steps", "1"))

    started_from, base, trained = unet_weights(first), unet_weights(tiny_model), unet_weights(second)
    assert max((trained[key].float() - started_from[key].float()).abs().max() for key in trained) < 1e-6
    assert max((started_from[key].float() - base[key].float()).abs().max() for key in base) > 1e-5
    assert yaml.safe_load((second / "train_config.yaml").read_text())["pretrained_model_name_or_path"] == str(first)


def test_v_prediction_end_to_end(tiny_model_v, instance_dir, tmp_path, monkeypatch, caplog):
    """SD 2.x 768-v: the loss targets the velocity, validation and infer.py sample with v_prediction,
    and the export records v."""
    import dreambooth.monitor
    import dreambooth.training

    targets, sampled = [], []
    original_target, original_generate = dreambooth.training.diffusion_target, dreambooth.monitor.generate

    def target_spy(noise_scheduler, latents, noise, timesteps):
        target = original_target(noise_scheduler, latents, noise, timesteps)
        targets.append(torch.allclose(target, noise_scheduler.get_velocity(latents, noise, timesteps)))
        return target

    def generate_spy(pipeline, *args, **kwargs):
        sampled.append(pipeline.scheduler.config.prediction_type)
        return original_generate(pipeline, *args, **kwargs)

    monkeypatch.setattr(dreambooth.training, "diffusion_target", target_spy)
    monkeypatch.setattr(dreambooth.monitor, "generate", generate_spy)
    monkeypatch.setattr(infer, "generate", generate_spy)
    output = tmp_path / "out"
    train_dreambooth.main(train_args(tiny_model_v, instance_dir, output, "--num_validation_images", "1",
                                     "--validation_prompt", "a photo of sks toy", "--validation_inference_steps", "2"))
    assert targets == [True, True]
    assert sampled == ["v_prediction"]
    assert json.loads((output / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"

    infer.main(["--pretrained_model_name_or_path", str(output), "--prompt", "a photo of sks toy", "--seed", "0",
                "--num_images_per_prompt", "1", "--num_inference_steps", "2", "--output_dir", str(tmp_path / "samples")])
    assert sampled == ["v_prediction", "v_prediction"]

    exported = tmp_path / "sks.safetensors"
    export.main([str(output), "--output", str(exported)])
    with safe_open(str(exported), framework="pt") as opened:
        assert opened.metadata()["modelspec.prediction_type"] == "v"
    # The tiny model's text encoder has SD 1.x's layout, which single-file loaders read as epsilon.
    assert "predicts v, but single-file loaders assume epsilon" in caplog.text


# ---------------------------------------------------------------- --lora from the Hub, --lora_revision


http_client = importlib.import_module("httpx2" if int(huggingface_hub.__version__.split(".")[0]) >= 2 else "httpx")


def hub_error(kind, status: int):
    request = http_client.Request("GET", "https://huggingface.co/api/models/runs/sks-dgo")
    return kind(f"{status} Client Error", response=http_client.Response(status, request=request))


@pytest.fixture
def lora_fetches():
    """Each test fetches its Hub LoRAs afresh (a process fetches a repo once)."""
    from dreambooth.bases import _fetch_hub_lora

    _fetch_hub_lora.cache_clear()
    yield
    _fetch_hub_lora.cache_clear()


def draw_with_loras(model: str, lora_flags: list[str], output: Path) -> Path:
    with one_thread():
        return infer.main(["--pretrained_model_name_or_path", model, *lora_flags, "--prompt", "a sks toy",
                           "--height", "32", "--width", "32", "--num_inference_steps", "2",
                           "--num_images_per_prompt", "1", "--seed", "0", "--output_dir", str(output)])[0]


def test_lora_revision_reaches_the_hub_download_and_the_images_metadata(tiny_model, hub_lora, tmp_path, monkeypatch,
                                                                        lora_fetches):
    from dreambooth.image_metadata import lora_hash
    from dreambooth.lora import LORA_WEIGHTS

    downloads = []

    def snapshot_download(repo_id, **kwargs):
        downloads.append((repo_id, kwargs.get("revision")))
        return str(hub_lora)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    # A local LoRA beside the Hub one takes '' (no revision) in its place.
    image = draw_with_loras(tiny_model, ["--lora", str(hub_lora), "--lora", HUB_LORA, "--lora_scale", "0.5", "0.8",
                                         "--lora_revision", "", "v1.0"], tmp_path / "samples")
    assert set(downloads) == {(HUB_LORA, "v1.0")}
    short_hash = lora_hash(hub_lora / LORA_WEIGHTS)
    assert json.loads(Image.open(image).text["loras"]) == [
        {"name": "sks-toy-lora", "scale": 0.5, "hash": short_hash},
        {"name": "sks-toy-lora", "scale": 0.8, "hash": short_hash, "repo": HUB_LORA, "revision": "v1.0"}]


def test_evaluate_passes_lora_revision_to_its_model_and_records_it():
    from types import SimpleNamespace

    from dreambooth.config import EvaluateConfig
    from dreambooth.evaluation import Generation, describe_run

    cfg = EvaluateConfig(pretrained_model_name_or_path=HUB_ID, lora=["sks-toy-lora", HUB_LORA], lora_revision=["", "v1.0"])
    assert cfg.model_source().lora_revisions() == [None, "v1.0"]
    encoder = SimpleNamespace(name="encoder", preprocessing=lambda: "", variant=lambda: "")
    drawn = [Generation(Image.new("RGB", (32, 32)), "a sks toy", 0)]
    models = describe_run(cfg, SimpleNamespace(dino=encoder, clip=encoder), drawn, 0)["models"]
    assert (models["lora"], models["lora_revision"]) == (["sks-toy-lora", HUB_LORA], ["", "v1.0"])


def test_lora_revision_is_read_from_the_cache_offline(hub_cache, hub_lora, lora_fetches):
    """Offline, a branch or commit of the cached repo is its snapshot; another revision is not there."""
    from dreambooth.bases import check_lora_source

    snapshot = hub_cache / f"models--{HUB_LORA.replace('/', '--')}" / "snapshots" / ("e" * 40)
    assert check_lora_source(HUB_LORA, "--lora", "main") == snapshot
    assert check_lora_source(HUB_LORA, "--lora", "e" * 40) == snapshot
    with pytest.raises(DreamBoothError, match=rf"^--lora {HUB_LORA}: not fully in the Hugging Face cache at revision "
                                              rf"v2 .*offline.*`hf download {HUB_LORA} --revision v2`$"):
        check_lora_source(HUB_LORA, "--lora", "v2")


@pytest.mark.parametrize("flags, message", [
    (["--lora", "LOCAL", "--lora_revision", "v1"],
     r"--lora_revision v1 for --lora .*sks-toy-lora, a local folder: only a Hub repo has revisions \(drop it, "
     r"or give one --lora_revision per --lora with '' for a local one\)"),
    (["--lora", "LOCAL", "--lora", HUB_LORA, "--lora_revision", "v1"],  # one value is for every --lora
     r"--lora_revision v1 for --lora .*sks-toy-lora, a local folder: .*"),
    (["--lora", "LOCAL", "--lora", HUB_LORA, "--lora_revision", "a", "b", "c"],
     r"--lora_revision: give one value, or one per --lora \(2\)"),
    (["--lora_revision", "v1"], r"--lora_revision v1: needs a --lora given by Hub repo id"),
], ids=["local", "one-for-every-lora", "count", "no-lora"])
def test_lora_revision_beside_a_local_lora_or_without_one_is_one_line(tiny_model, hub_lora, tmp_path, flags, message,
                                                                      no_loading):
    flags = [str(hub_lora) if flag == "LOCAL" else flag for flag in flags]
    with pytest.raises(DreamBoothError, match=f"^{message}$"):
        infer.main(["--pretrained_model_name_or_path", tiny_model, *flags, "--prompt", "x",
                    "--output_dir", str(tmp_path / "samples")])


def test_a_mistyped_lora_path_that_reads_as_a_hub_id_says_both(hub_cache, tmp_path, monkeypatch, lora_fetches):
    """'runs/sks-dgo' for runs/sks-dog: no such folder here, and no such repo on the Hub (or in the cache
    offline), said together, so that the typo shows whichever was meant."""
    from dreambooth.bases import check_lora_source

    with pytest.raises(DreamBoothError, match=r"^--lora runs/sks-dgo: no local file or folder of that name, and "
                                              r"not fully in the Hugging Face cache with the Hub unreachable "
                                              r"\(offline\): check the path or the id, or download it first with "
                                              r"`hf download runs/sks-dgo`$"):
        check_lora_source("runs/sks-dgo", "--lora")

    def fails(error):
        def snapshot_download(repo_id, **kwargs):
            raise error
        monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)

    fails(hub_error(RepositoryNotFoundError, 404))  # online: the Hub answers that it has no such repo
    with pytest.raises(DreamBoothError, match=r"^--lora runs/sks-dgo: no local file or folder of that name, and no "
                                              r"such repo on the Hub \(check the path or the id; a private repo needs "
                                              r"`hf auth login`\)$"):
        check_lora_source("runs/sks-dgo", "--lora")
    fails(hub_error(RevisionNotFoundError, 404))  # a revision says a Hub repo is meant: only the revision is wrong
    with pytest.raises(DreamBoothError, match=rf"^--lora_revision v9: no such branch, tag or commit in {HUB_LORA}$"):
        check_lora_source(HUB_LORA, "--lora", "v9")
    with pytest.raises(DreamBoothError, match=rf"^--lora {HUB_LORA}: the repo has no main branch; name a branch, tag "
                                              r"or commit with --lora_revision$"):
        check_lora_source(HUB_LORA, "--lora")


def test_a_mistyped_base_model_path_that_reads_as_a_hub_id_says_both(tmp_path, monkeypatch):
    """'runs/sks-dgo' for 'runs/sks-dog': the Hub has no such repo, and there is no such folder either."""
    from dreambooth.models import hub_failure, load_pretrained

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "sks-dog").mkdir(parents=True)

    def loader(source, **kwargs):
        raise OSError(f"{source} is not a local folder and is not a valid model identifier") from hub_error(
            RepositoryNotFoundError, 404)

    with pytest.raises(DreamBoothError) as raised:
        load_pretrained("tokenizer", loader, "runs/sks-dgo")
    assert str(raised.value) == (
        "could not load the tokenizer of runs/sks-dgo: no local folder of that name, and no such model on the Hub "
        "(check the path or the id; a private repo needs `hf auth login`)")
    # A folder that is there failed for a reason of its own, not the Hub's.
    error = OSError("x")
    error.__cause__ = hub_error(RepositoryNotFoundError, 404)
    assert hub_failure(error, "runs/sks-dog") is None
