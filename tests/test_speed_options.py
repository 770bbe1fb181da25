"""Each speed option keeps the training the same: loss curves and weights match without it."""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import os
import sys
import traceback
import weakref

import pytest
import torch

import train_dreambooth
from conftest import TOY_SUBJECT, bitsandbytes_adamw_8bit_on_cpu, linear_trainer, train_args

BASE = ["--max_train_steps", "4", "--logging_steps", "1", "--save_precision", "fp32", "--center_crop",
        "--random_flip"]


def run(tiny_model, data, output, *extra):
    trainer = train_dreambooth.main(train_args(tiny_model, data, output, *BASE, *extra))
    unet = trainer.accelerator.unwrap_model(trainer.trained[0])
    return [loss for _, loss in trainer.metrics.history], {k: v.detach().clone() for k, v in unet.state_dict().items()}


@pytest.fixture
def prior(tmp_path):
    return ["--with_prior_preservation", "--class_data_dir", str(TOY_SUBJECT), "--class_prompt", "a photo of a toy",
            "--num_class_images", "5"]


@pytest.mark.parametrize("option, baseline", [
    (["--cache_latents"], ["--no_cache_latents"]),
    (["--pre_compute_text_embeddings"], ["--no_pre_compute_text_embeddings"]),
    (["--set_grads_to_none"], ["--no_set_grads_to_none"]),
    (["--channels_last"], []),
    (["--optimizer_in_backward", "--max_grad_norm", "0"], ["--max_grad_norm", "0"]),
], ids=["cache_latents", "pre_compute_text_embeddings", "set_grads_to_none", "channels_last", "optimizer_in_backward"])
def test_option_keeps_the_loss_curve_and_weights(tiny_model, instance_dir, tmp_path, prior, option, baseline):
    losses, weights = run(tiny_model, instance_dir, tmp_path / "with", *prior, *option)
    reference_losses, reference_weights = run(tiny_model, instance_dir, tmp_path / "without", *prior, *baseline)
    assert len(losses) == 4
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference_losses), rtol=1e-4, atol=1e-5)
    for key in weights:
        torch.testing.assert_close(weights[key], reference_weights[key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("extra", [[], ["--use_lora"]], ids=["full", "lora"])
def test_frozen_weights_in_bf16_train_like_frozen_weights_in_fp32(tiny_model, instance_dir, tmp_path, monkeypatch,
                                                                   extra):
    """Under --mixed_precision bf16 the frozen VAE and text encoder are loaded in bf16, at half the
    memory, and compute in bf16 (outside autocast, as in diffusers' scripts); LoRA's frozen UNet too,
    under autocast, which computes its layers in bf16 anyway. The loss curves agree with fp32 frozen
    weights to bf16 precision."""
    loaded, load = [], train_dreambooth.load_components

    def recording_load(*args, **kwargs):
        components = load(*args, **kwargs)
        loaded.append((components.vae.dtype, components.text_encoder.dtype, components.unet.dtype))
        return components

    monkeypatch.setattr(train_dreambooth, "load_components", recording_load)
    flags = ["--mixed_precision", "bf16", "--learning_rate", "1e-3", *extra]
    losses, _ = run(tiny_model, instance_dir, tmp_path / "bf16", *flags)
    monkeypatch.setattr(train_dreambooth, "mixed_precision_dtype", lambda precision: torch.float32)
    reference, _ = run(tiny_model, instance_dir, tmp_path / "fp32", *flags)

    unet_dtype = torch.bfloat16 if extra else torch.float32  # a fully trained UNet keeps fp32 weights
    assert loaded == [(torch.bfloat16, torch.bfloat16, unet_dtype), (torch.float32,) * 3]
    # The first loss differs by bf16 rounding alone; training then carries the difference on
    # (on torch 2.11's CPU kernels, LoRA's fourth loss by 1.5%).
    torch.testing.assert_close(losses[0], reference[0], rtol=2e-3, atol=0)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), rtol=3e-2, atol=0)


def test_optimizer_in_backward_frees_each_bucket_of_gradients_as_it_goes(tiny_model, instance_dir, tmp_path,
                                                                         monkeypatch):
    from dreambooth import gradients
    from dreambooth.gradients import StepInBackward

    flushes, flush = [], StepInBackward.flush

    def watched_flush(self):
        stepped = list(self._bucket)
        live = sum(p.numel() for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None)
        flush(self)
        flushes.append((stepped, live))

    monkeypatch.setattr(StepInBackward, "flush", watched_flush)
    monkeypatch.setattr(gradients, "BUCKET", 20_000)  # the tiny UNet and text encoder: 236K values
    flags = ["--max_grad_norm", "0", "--train_text_encoder", "--text_encoder_lr", "3e-4"]
    trainer = train_dreambooth.main(train_args(tiny_model, instance_dir, tmp_path / "hooks", *BASE, *flags,
                                               "--optimizer_in_backward"))
    trained = trainer.parameters()
    stepped = [p for bucket, _ in flushes for p in bucket]
    assert len(stepped) == 4 * len(trained) and {id(p) for p in stepped} == {id(p) for p in trained}
    assert len([bucket for bucket, _ in flushes if bucket]) >= 4 * 10  # many buckets a step, not one at the end
    # Only the bucket being stepped holds gradients: at most BUCKET values plus the weight that filled it.
    assert max(live for _, live in flushes) <= 20_000 + max(p.numel() for p in trained)
    reference = train_dreambooth.main(train_args(tiny_model, instance_dir, tmp_path / "plain", *BASE, *flags))
    for ours, theirs in zip(trained, reference.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def adamw_8bit_stepping_without_waits():
    """The suite's 8-bit AdamW (``dreambooth.optimizers.adamw_8bit``), the one training uses on a GPU."""
    import bitsandbytes

    from dreambooth.optimizers import adamw_8bit

    return adamw_8bit(bitsandbytes)


def test_optimizer_in_backward_steps_8bit_adamw_as_after_backward():
    # --use_8bit_adam --optimizer_in_backward (C4o) takes the path for optimizers that cannot skip
    # on the device: a read-back before backward, then a step per weight.
    from dreambooth.gradients import StepInBackward

    adamw_8bit = bitsandbytes_adamw_8bit_on_cpu()
    suite_adamw_8bit = adamw_8bit_stepping_without_waits()
    torch.manual_seed(0)
    # 8-bit state for the weights (>= 4096 values), 32-bit for the biases, as on a GPU.
    model = torch.nn.Sequential(torch.nn.Linear(96, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))
    twin, initial = copy.deepcopy(model), copy.deepcopy(model)
    inputs = [torch.randn(8, 96) for _ in range(4)]
    after_backward = adamw_8bit(twin.parameters(), lr=1e-2, weight_decay=1e-2)
    in_backward = suite_adamw_8bit(model.parameters(), lr=1e-2, weight_decay=1e-2)
    hooks = StepInBackward(in_backward, list(model.parameters()))
    for step, batch in enumerate(inputs):
        loss = model(batch).pow(2).mean() * (float("nan") if step == 2 else 1.0)
        hooks.arm(~torch.isfinite(loss.detach()))
        loss.backward()
        hooks.flush()
        assert all(p.grad is None for p in model.parameters())
        twin_loss = twin(batch).pow(2).mean()
        twin_loss.backward()
        if step != 2:  # the non-finite step is skipped: no update at all
            after_backward.step()
        after_backward.zero_grad(set_to_none=True)

    assert in_backward.state[model[0].weight]["state1"].dtype == torch.uint8
    for ours, theirs in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert not torch.equal(model[0].weight, initial[0].weight)


@pytest.mark.parametrize("flags, message", [
    ([], "--max_grad_norm 0"),
    (["--max_grad_norm", "0", "--gradient_accumulation_steps", "2"], "--gradient_accumulation_steps 1"),
])
def test_optimizer_in_backward_refuses_what_needs_every_gradient(tiny_model, instance_dir, tmp_path, flags, message):
    from dreambooth.errors import DreamBoothError

    with pytest.raises(DreamBoothError, match=message):
        train_dreambooth.main(train_args(tiny_model, instance_dir, tmp_path / "out", "--optimizer_in_backward", *flags))
    assert not (tmp_path / "out" / "unet").exists()


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient_checkpointing"])
def test_under_bf16_autocast_linear_and_conv_gradients_are_bf16_values(tiny_model, checkpointing):
    """What --bf16_gradients rests on: autocast casts Linear and Conv weights to bf16, so their
    gradients (UNet and text encoder) come back as bf16 values; norms and embeddings stay in fp32."""
    from dreambooth.gradients import BF16_LAYERS
    from dreambooth.models import load_components

    components = load_components(tiny_model)
    unet, text_encoder = components.unet.train(), components.text_encoder.train()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    size = unet.config.sample_size
    generator = torch.Generator().manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        states = text_encoder(torch.randint(0, text_encoder.config.vocab_size, (2, 77), generator=generator))[0]
        prediction = unet(torch.randn(2, 4, size, size, generator=generator), torch.tensor([10, 900]), states).sample
    torch.nn.functional.mse_loss(prediction.float(), torch.randn(prediction.shape, generator=generator)).backward()

    for model in (unet, text_encoder):
        in_layers = {id(p) for layer in model.modules() if isinstance(layer, BF16_LAYERS) for p in layer.parameters()}
        exact = {id(p): torch.equal(p.grad, p.grad.bfloat16().float()) for p in model.parameters()}
        assert in_layers and all(exact[key] for key in in_layers)
        assert not any(exact[id(p)] for p in model.parameters() if id(p) not in in_layers)


@pytest.mark.parametrize("extra", [[], ["--train_text_encoder", "--gradient_checkpointing"], ["--use_lora"]],
                         ids=["unet", "text_encoder_checkpointing", "lora"])
def test_bf16_gradients_train_like_fp32_gradients_with_clipping(tiny_model, instance_dir, tmp_path, monkeypatch,
                                                                extra):
    from dreambooth import gradients
    from dreambooth.gradients import Bf16Gradients

    # Buckets of 1024 values: the tiny UNet's gradients are converted in several buckets during backward.
    monkeypatch.setattr(gradients, "BUCKET", 1024)
    updates, update = [], Bf16Gradients.update

    def watched_update(self, skip):
        held = list(self._held)
        updates.append({"bytes": sum(g.numel() * g.element_size() for g in self._held.values()),
                        "weights": sum(p.numel() for p in held),
                        "fp32_left": any(p.grad is not None for p in held),
                        "waiting": sum(p.numel() for p in self._waiting)})
        total_norm = update(self, skip)
        updates[-1]["norm"] = float(total_norm)
        updates[-1]["left"] = len(self._held) + len(self._waiting) + sum(p.grad is not None for p in self.parameters)
        return total_norm

    monkeypatch.setattr(Bf16Gradients, "update", watched_update)
    flags = ["--mixed_precision", "bf16", "--learning_rate", "1e-3", "--max_grad_norm", "0.05", *extra]
    losses, weights = run(tiny_model, instance_dir, tmp_path / "bf16", *flags, "--bf16_gradients")
    reference_losses, reference_weights = run(tiny_model, instance_dir, tmp_path / "fp32", *flags)

    assert len(updates) == 4
    for update_seen in updates:
        # 2 bytes per held gradient and no fp32 copy of them left; at most a bucket's worth waits in
        # fp32 for the update to convert; the norm exceeds 0.05, so clipping acted; nothing is left after.
        assert update_seen["bytes"] == 2 * update_seen["weights"] > 0 and not update_seen["fp32_left"]
        assert update_seen["waiting"] < 1024 < update_seen["weights"]
        assert update_seen["norm"] > 0.05 and update_seen["left"] == 0
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference_losses), rtol=1e-6, atol=0)
    for key in weights:
        torch.testing.assert_close(weights[key], reference_weights[key], rtol=1e-6, atol=1e-9)


def test_bf16_gradients_clip_and_step_8bit_adamw_as_fp32_gradients_do(monkeypatch):
    # --use_8bit_adam --bf16_gradients (C4b): bitsandbytes' 8-bit AdamW stepped a bucket at a time (the
    # first layer's weight and bias, then the rest) after clipping with the norm of all the gradients.
    from dreambooth import gradients
    from dreambooth.gradients import Bf16Gradients

    monkeypatch.setattr(gradients, "BUCKET", 128 * 96 + 128)

    adamw_8bit = bitsandbytes_adamw_8bit_on_cpu()
    suite_adamw_8bit = adamw_8bit_stepping_without_waits()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(96, 128), torch.nn.LayerNorm(128), torch.nn.Linear(128, 64))
    twin = copy.deepcopy(model)
    held_optimizer = suite_adamw_8bit(model.parameters(), lr=1e-2, weight_decay=1e-2)
    reference_optimizer = adamw_8bit(twin.parameters(), lr=1e-2, weight_decay=1e-2)
    held = Bf16Gradients(held_optimizer, [model], max_grad_norm=0.1)
    norms = []
    for _ in range(3):
        batch = torch.randn(8, 96)
        for network in (model, twin):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                prediction = network(batch)
            prediction.float().pow(2).mean().backward()
        # Converted to bf16 during backward, a bucket at a time: the last layer's weight and bias, then
        # the first layer's weight; its bias (arriving last, under a bucket) waits in fp32 for the
        # update, as do the LayerNorm's gradients, which stay fp32.
        assert [p.grad is None for p in model.parameters()] == [True, False, False, False, True, True]
        norms.append(held.update(skip=False))
        reference_norm = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.1)
        reference_optimizer.step()
        reference_optimizer.zero_grad(set_to_none=True)
        torch.testing.assert_close(norms[-1], reference_norm, rtol=1e-6, atol=0)

    assert all(norm > 0.1 for norm in norms)  # every step was clipped
    assert held_optimizer.state[model[0].weight]["state1"].dtype == torch.uint8
    for ours, theirs in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("flags, message", [
    (["--mixed_precision", "no"], "needs --mixed_precision bf16"),
    (["--mixed_precision", "bf16", "--optimizer_in_backward", "--max_grad_norm", "0"], "pass one of them"),
    (["--mixed_precision", "bf16", "--gradient_accumulation_steps", "2"], "--gradient_accumulation_steps 1"),
])
def test_bf16_gradients_refuses_what_it_cannot_hold_exactly(tiny_model, instance_dir, tmp_path, flags, message):
    from dreambooth.errors import DreamBoothError

    with pytest.raises(DreamBoothError, match=message):
        train_dreambooth.main(train_args(tiny_model, instance_dir, tmp_path / "out", "--bf16_gradients", *flags))
    assert not (tmp_path / "out" / "unet").exists()


def test_cached_latents_are_used_only_with_fixed_crops(tiny_model, instance_dir, tmp_path, caplog):
    from dreambooth.caching import CachedLatents

    train_dreambooth.main(train_args(tiny_model, instance_dir, tmp_path / "random-crop", "--random_flip"))
    assert "cached the VAE latents" not in caplog.text
    train_dreambooth.main(train_args(tiny_model, instance_dir, tmp_path / "center-crop", "--center_crop",
                                     "--random_flip"))
    # Five images, each unflipped and flipped.
    assert "cached the VAE latents of 10 image variant(s)" in caplog.text
    assert CachedLatents.__doc__


def test_the_cache_encodes_no_more_images_at_once_than_a_training_step(tiny_model, instance_dir, tmp_path, prior,
                                                                        monkeypatch):
    """Its memory peak is then no higher than encoding every step would make it."""
    from diffusers import AutoencoderKL

    encoded = []
    encode = AutoencoderKL.encode
    monkeypatch.setattr(AutoencoderKL, "encode", lambda vae, pixels, *args, **kwargs: encoded.append(len(pixels)) or
                        encode(vae, pixels, *args, **kwargs))
    train_dreambooth.main(train_args(tiny_model, instance_dir, tmp_path / "out", "--center_crop", "--random_flip",
                                     "--train_batch_size", "2", "--max_train_steps", "1", *prior))
    # 5 instance and 5 class images, each unflipped and flipped: 20 variants, 2 + 2 images a step.
    assert sum(encoded) == 20 and max(encoded) == 4


@pytest.mark.parametrize("extra", [[], ["--train_text_encoder", "--gradient_checkpointing"], ["--use_lora"],
                                   ["--gradient_accumulation_steps", "2", "--max_train_steps", "2"],
                                   ["--bf16_gradients"], ["--optimizer_in_backward", "--max_grad_norm", "0"]],
                         ids=["unet", "text_encoder_checkpointing", "lora", "accumulation", "bf16_gradients",
                              "optimizer_in_backward"])
def test_weights_cast_once_train_as_autocast_casts_them(tiny_model, instance_dir, tmp_path, extra):
    flags = ["--mixed_precision", "bf16", "--learning_rate", "1e-3", "--max_grad_norm", "0.05", *extra]
    losses, weights = run(tiny_model, instance_dir, tmp_path / "once", *flags, "--cast_weights_once")
    reference_losses, reference_weights = run(tiny_model, instance_dir, tmp_path / "autocast", *flags)
    assert losses == reference_losses
    for key in weights:
        torch.testing.assert_close(weights[key], reference_weights[key], rtol=0, atol=0)


def test_weights_cast_once_take_no_cast_per_layer_and_are_let_go_during_backward(tiny_model, monkeypatch):
    from torch.utils._python_dispatch import TorchDispatchMode

    from dreambooth import gradients
    from dreambooth.casting import CastWeightsOnce
    from dreambooth.gradients import BF16_LAYERS
    from dreambooth.models import load_components

    monkeypatch.setattr(gradients, "BUCKET", 4096)
    unet = load_components(tiny_model).unet.train()
    unet.enable_gradient_checkpointing()
    slots = [(layer, name) for layer in unet.modules() if isinstance(layer, BF16_LAYERS)
             for name, weight in layer._parameters.items() if weight is not None]
    trained = {id(layer._parameters[name]) for layer, name in slots}
    generator = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, 4, 32, 32, generator=generator), torch.tensor([10, 900]),
              torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator))
    target = torch.randn(2, 4, 32, 32, generator=generator)

    class WeightCasts(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("_to_copy", "copy_") and any(id(a) in trained for a in args):
                self.count += 1
            return func(*args, **(kwargs or {}))

    def step(context, on_entry=lambda: None):
        unet.zero_grad(set_to_none=True)
        casts = WeightCasts()
        with casts, context:
            on_entry()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                prediction = unet(*inputs).sample
            torch.nn.functional.mse_loss(prediction.float(), target).backward()
        return casts.count, {name: p.grad.clone() for name, p in unet.named_parameters()}

    reference_casts, reference = step(contextlib.nullcontext())
    once = CastWeightsOnce([unet], torch.bfloat16)
    assert len(once.buckets) > 3
    copies, freed_before_the_end = [], []
    last = once.buckets[-1][0][2]  # used last in forward: its gradient comes first
    last.register_post_accumulate_grad_hook(lambda _: freed_before_the_end.append(sum(c() is None for c in copies)))
    casts, cast_once = step(once.during_step(),
                            lambda: copies.extend(weakref.ref(layer._parameters[name]) for layer, name in slots))

    # Autocast casts every weight in each forward and recompute; cast once, no weight is cast on its own.
    assert reference_casts >= len(slots) and casts == 0
    assert cast_once.keys() == reference.keys()
    for name in cast_once:
        torch.testing.assert_close(cast_once[name], reference[name], rtol=0, atol=0)
    # The last bucket's copies were freed while backward went on, the others still held for it;
    # afterwards the layers hold their weights.
    assert len(copies) == len(slots) and len(freed_before_the_end) == 1
    assert 0 < freed_before_the_end[0] < len(slots)
    assert all(layer._parameters[name].dtype == torch.float32 and id(layer._parameters[name]) in trained
               for layer, name in slots)


@pytest.mark.parametrize("flags, message", [
    (["--mixed_precision", "no"], "needs --mixed_precision bf16 or fp16"),
    (["--mixed_precision", "bf16", "--compile"], "--compile cannot be combined"),
])
def test_weights_cast_once_refuses_what_it_cannot_replace(tiny_model, instance_dir, tmp_path, flags, message):
    from dreambooth.errors import DreamBoothError

    with pytest.raises(DreamBoothError, match=message):
        train_dreambooth.main(train_args(tiny_model, instance_dir, tmp_path / "out", "--cast_weights_once", *flags))
    assert not (tmp_path / "out" / "unet").exists()


@pytest.mark.slow
def test_compiled_unet_trains_the_same(tiny_model, instance_dir, tmp_path):
    losses, weights = run(tiny_model, instance_dir, tmp_path / "compiled", "--compile")
    reference_losses, _ = run(tiny_model, instance_dir, tmp_path / "eager")
    # Inductor fuses and reorders floating-point work, so the curves agree to about 1e-3, not
    # bitwise; Adam's normalised steps then move near-zero-gradient weights by +-lr either way, so
    # the weights are compared by the loss they give, not element by element.
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference_losses), rtol=5e-3, atol=1e-3)
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())


# Each of these waits for the GPU to finish everything queued when called on a GPU tensor.
READ_BACKS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__")
DATA_LOADER = os.path.join("torch", "utils", "data")


@pytest.mark.parametrize("extra", [[], ["--use_lora", "--train_text_encoder"], ["--mixed_precision", "bf16",
                                                                             "--bf16_gradients"]],
                         ids=["full", "lora_text_encoder", "bf16_gradients"])
def test_only_logging_steps_read_anything_back_from_the_device(tiny_model, instance_dir, tmp_path, prior,
                                                               monkeypatch, extra):
    from dreambooth.training import Trainer

    reads, step = [], {"now": None}

    def recording(name):
        original = getattr(torch.Tensor, name)

        def read_back(tensor, *args, **kwargs):
            frames = traceback.extract_stack()[:-1]
            # The data loader's index tensors live on the CPU; reading them waits for nothing.
            if step["now"] is not None and not any(DATA_LOADER in frame.filename for frame in frames):
                reads.append((step["now"], name, f"{frames[-1].filename}:{frames[-1].lineno}"))
            return original(tensor, *args, **kwargs)

        return read_back

    for name in READ_BACKS:
        monkeypatch.setattr(torch.Tensor, name, recording(name))
    train = Trainer.train

    def watched_train(trainer):
        trainer.before_step_callbacks.append(lambda state: step.update(now=state.global_step + 1))
        return train(trainer)

    monkeypatch.setattr(Trainer, "train", watched_train)
    train_dreambooth.main(train_args(tiny_model, instance_dir, tmp_path / "out", "--max_train_steps", "7",
                                     "--logging_steps", "3", "--center_crop", *prior, *extra))

    assert {at for at, _, _ in reads} <= {3, 6, 7}, [read for read in reads if read[0] not in (3, 6, 7)]
    assert {at for at, name, _ in reads if name == "tolist"} == {3, 6, 7}  # the logged losses, read once each


SEND_TO_DEVICE = os.path.join("accelerate", "utils", "operations.py")


@pytest.mark.parametrize("extra, copies_per_step", [
    ([], 0),  # latents cached, prompts encoded: nothing to copy
    (["--no_cache_latents", "--train_text_encoder"], 3),  # pixel values, token ids, attention mask
], ids=["cached", "pixels_and_tokens"])
def test_batches_reach_the_device_without_waiting_for_it(tiny_model, instance_dir, tmp_path, prior, monkeypatch,
                                                         extra, copies_per_step):
    """A blocking copy to a GPU first waits for every kernel queued before it, as a read-back
    does: each step's batch is copied non-blocking (from pinned memory on CUDA), and with cached
    latents and pre-computed text embeddings it holds no tensor to copy at all."""
    copies, to = [], torch.Tensor.to

    def recording_to(tensor, *args, **kwargs):
        if any(SEND_TO_DEVICE in frame.filename for frame in traceback.extract_stack()[:-1]):
            copies.append(kwargs.get("non_blocking", False))
        return to(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    args = train_args(tiny_model, instance_dir, tmp_path / "out", "--center_crop", "--checkpointing_steps", "2",
                      *prior, *extra)
    train_dreambooth.main(args + ["--max_train_steps", "3"])
    assert copies == [True] * (3 * copies_per_step)
    # A run resumed in mid-epoch (from step 2 of 5 images a batch) copies the same way.
    copies.clear()
    resumed = train_dreambooth.main(args + ["--max_train_steps", "4", "--resume_from_checkpoint", "checkpoint-2"])
    assert resumed.state.global_step == 4 and copies == [True] * (2 * copies_per_step)



def test_xformers_on_a_run_without_cuda_is_refused_before_loading(tiny_model, instance_dir, tmp_path, monkeypatch):
    """xformers is installed, but this run has no CUDA GPU: said before the weights load, not by
    diffusers after loading them."""
    from dreambooth import config
    from dreambooth.errors import DreamBoothError

    importable = config._importable
    monkeypatch.setattr(config, "_importable", lambda module: module == "xformers" or importable(module))

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before xformers was checked")

    monkeypatch.setattr(train_dreambooth, "load_components", refuse)
    with pytest.raises(DreamBoothError, match=r"^--enable_xformers_memory_efficient_attention needs a CUDA GPU, and "
                                              r"this run uses the CPU; drop the flag"):
        train_dreambooth.main(train_args(tiny_model, instance_dir, tmp_path / "out",
                                         "--enable_xformers_memory_efficient_attention"))


# What xformers built for another torch or CUDA raises from the attention diffusers tries first.
XFORMERS_FAILURE = NotImplementedError(
    "No operator found for `memory_efficient_attention_forward` with inputs:\n"
    "     query       : shape=(1, 2, 1, 40) (torch.float32)\n"
    "`cutlassF-pt` is not supported because:\n"
    "    xFormers wasn't build with CUDA support")


def test_xformers_that_cannot_run_is_one_line_naming_the_flag():
    from dreambooth.errors import DreamBoothError
    from dreambooth.models import enable_xformers

    class Unet(torch.nn.Module):
        def enable_xformers_memory_efficient_attention(self):
            raise XFORMERS_FAILURE

    with pytest.raises(DreamBoothError) as caught:
        enable_xformers(Unet())
    assert str(caught.value) == (
        "--enable_xformers_memory_efficient_attention: xformers cannot run here (No operator found for "
        "`memory_efficient_attention_forward` with inputs:); install the xformers build for this torch and CUDA, "
        "or drop the flag to use PyTorch's SDPA attention")


def test_bitsandbytes_that_cannot_load_is_one_line_naming_the_flag(tmp_path, monkeypatch):
    """A bitsandbytes built for another CUDA fails on import, on the GPU where --use_8bit_adam uses it:
    said before any model loads (check_cuda_libraries) and where the optimizer is built."""
    from dreambooth.config import TrainConfig
    from dreambooth.errors import DreamBoothError
    from dreambooth.optimizers import build_optimizer

    broken = tmp_path / "site" / "bitsandbytes"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text('raise RuntimeError("CUDA Setup failed despite GPU being available.\\n"\n'
                                        '                   "Please run python -m bitsandbytes")\n')
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "bitsandbytes", raising=False)
    message = (r"^--use_8bit_adam: bitsandbytes cannot be loaded \(CUDA Setup failed despite GPU being available.\); "
               r"install the build for this torch and CUDA \(pip install -U bitsandbytes\), or drop the flag$")
    with pytest.raises(DreamBoothError, match=message):
        build_optimizer([torch.nn.Parameter(torch.ones(4))], 1e-4, (0.9, 0.999), 0.0, 1e-8, use_8bit_adam=True,
                        device=torch.device("cuda"))
    from dreambooth.engine import check_cuda_libraries

    with pytest.raises(DreamBoothError, match=message):
        check_cuda_libraries(TrainConfig(use_8bit_adam=True), torch.device("cuda"))
    check_cuda_libraries(TrainConfig(use_8bit_adam=True), torch.device("cpu"))  # the CPU falls back to AdamW


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_gradient_checkpointing_recomputes_the_text_encoder_layers_and_trains_them(tiny_model, lora):
    """--gradient_checkpointing --train_text_encoder: the text encoder is in train mode, each of its
    layers (and each UNet attention block) runs twice, once in backward, and the gradient reaches every
    weight it trains; LoRA adapters too, behind frozen embeddings. Quietly: transformers 5 warns that
    gradient_checkpointing_enable goes in v6."""
    import warnings

    from diffusers.models.attention import BasicTransformerBlock
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    from dreambooth.lora import add_lora_adapters
    from dreambooth.models import load_components, prepare_for_training

    components = load_components(tiny_model, train_text_encoder=True, use_lora=lora)
    if lora:
        add_lora_adapters(components.unet, components.text_encoder, rank=4, alpha=4, dropout=0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepare_for_training(components, True, torch.device("cpu"), gradient_checkpointing=True)
    assert not [str(w.message) for w in caught if "checkpointing" in str(w.message)]
    unet, text_encoder = components.unet, components.text_encoder
    assert unet.training and text_encoder.training

    # Calls of each layer's attention: inside the checkpointed forward (transformers keeps the layer's own
    # hooks outside it), and at its start (the recomputation stops once it has what backward needs).
    runs = {}
    attentions = [layer.self_attn for layer in text_encoder.modules() if isinstance(layer, CLIPEncoderLayer)]
    attentions += [block.attn1 for block in unet.modules() if isinstance(block, BasicTransformerBlock)]
    for attention in attentions:
        attention.register_forward_pre_hook(lambda module, args: runs.update({module: runs.get(module, 0) + 1}))
    generator = torch.Generator().manual_seed(0)
    states = text_encoder(torch.randint(0, text_encoder.config.vocab_size, (2, 77), generator=generator))[0]
    size = unet.config.sample_size
    prediction = unet(torch.randn(2, 4, size, size, generator=generator), torch.tensor([10, 900]), states).sample
    torch.nn.functional.mse_loss(prediction, torch.randn(prediction.shape, generator=generator)).backward()

    layers = sum(isinstance(m, CLIPEncoderLayer) for m in text_encoder.modules())
    assert len(runs) == len(attentions) > layers >= 2 and set(runs.values()) == {2}
    trained = {name: p for name, p in text_encoder.named_parameters() if p.requires_grad}
    assert trained and all(p.grad is not None for p in trained.values())
    # LoRA's B matrices start at zero, so only they receive a non-zero gradient in the first step.
    moving = {name for name, p in trained.items() if p.grad.abs().sum() > 0}
    assert moving == ({name for name in trained if "lora_B" in name} if lora else set(trained))


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_gpu_without_bf16_arithmetic_is_warned_about(monkeypatch, caplog, native):
    """A T4 or V100 takes bf16 (PyTorch emulates it), so Accelerate lets the run start, several times
    slower than fp16 would be: the run says so. A GPU with bf16 arithmetic, the CPU and fp16 get no warning."""
    from dreambooth import models

    asked = []

    def is_bf16_supported(including_emulation=True):
        asked.append(including_emulation)
        return native or including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with caplog.at_level(logging.WARNING, logger="dreambooth"):
        models.check_precision_supported("bf16", device=torch.device("cuda", 0))
        models.check_precision_supported("bf16", device=torch.device("cpu"))
        models.check_precision_supported("no", device=torch.device("cuda", 0))
    warnings = [record.getMessage() for record in caplog.records]
    assert asked == [False]
    assert warnings == ([] if native else ["Tesla T4 has no native bf16: PyTorch emulates it, several times slower; "
                                           "use --mixed_precision fp16 on this GPU"])


class Node:
    pass


def test_training_sets_the_objects_made_before_it_aside_from_the_garbage_collector():
    """Full collections during training walk only what training made (no pauses over the
    libraries' objects), its reference cycles are still collected, and afterwards nothing stays aside."""
    trainer = linear_trainer()
    made_before = Node()
    seen = {}

    def look(state) -> None:
        if state.global_step != 2:
            return
        walked = {id(tracked) for tracked in gc.get_objects()}
        seen["setup walked"] = id(made_before) in walked or id(trainer) in walked
        cycle = Node()
        cycle.me = cycle
        gone = weakref.ref(cycle)
        del cycle
        gc.collect()
        seen["cycle collected"] = gone() is None

    trainer.step_callbacks.append(look)
    trainer.train()
    assert seen == {"setup walked": False, "cycle collected": True}
    assert gc.get_freeze_count() == 0 and id(made_before) in {id(tracked) for tracked in gc.get_objects()}


@pytest.mark.parametrize("device, applied", [("cuda", True), ("cpu", False)])
def test_cuda_backend_flags_are_set_for_a_cuda_run_only(device, applied):
    import dataclasses

    from dreambooth.config import TrainConfig
    from dreambooth.engine import use_backend_flags

    before = torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.benchmark = torch.backends.cuda.matmul.allow_tf32 = False
        use_backend_flags(dataclasses.replace(TrainConfig(), cudnn_benchmark=True), torch.device(device))
        assert torch.backends.cudnn.benchmark is applied and torch.backends.cuda.matmul.allow_tf32 is False
        use_backend_flags(dataclasses.replace(TrainConfig(), allow_tf32=True), torch.device(device))
        assert torch.backends.cuda.matmul.allow_tf32 is applied
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32 = before


def test_objects_the_caller_set_aside_from_the_garbage_collector_stay_aside_after_training():
    trainer = linear_trainer()
    set_aside = Node()
    gc.freeze()
    try:
        trainer.train()
        assert gc.get_freeze_count() > 0 and id(set_aside) not in {id(tracked) for tracked in gc.get_objects()}
    finally:
        gc.unfreeze()


def test_an_optimizer_that_cannot_skip_on_the_device_skips_a_window_with_a_nonfinite_loss(caplog):
    """SGD has no ``found_inf``: the skip is read back on the host, from a flag made before the
    window's last backward, and it covers every loss of the window (here the first of two)."""
    def loss(model, batch):
        value = batch["value"][:, None]
        return (model(value) ** 2).mean() * (float("nan") if batch["value"].item() == 3.0 else 1.0)

    trainer = linear_trainer([float(i + 1) for i in range(8)], loss=loss, accumulation=2, logging_steps=1)
    weights = {}
    trainer.step_callbacks.append(lambda state: weights.update(
        {state.global_step: [p.detach().clone() for p in trainer.parameters()]}))
    with caplog.at_level(logging.WARNING, logger="dreambooth"):
        trainer.train()
    assert sorted(weights) == [1, 2, 3, 4]
    changed = {step: not all(torch.equal(a, b) for a, b in zip(weights[step - 1], weights[step])) for step in (2, 3, 4)}
    assert changed == {2: False, 3: True, 4: True}  # batches 3 and 4 made step 2: skipped
    assert all(torch.isfinite(p).all() for p in trainer.parameters())
    assert [r.getMessage() for r in caplog.records] == ["step 2: loss is not finite; the update was skipped"]


def test_under_deepspeed_a_nonfinite_loss_stops_the_run_before_backward_reaches_the_weights():
    """DeepSpeed updates the weights inside accelerator.backward, where no skip can reach: the run
    stops before that backward, with the weights of the step before."""
    from dreambooth.errors import DreamBoothError

    def loss(model, batch):
        value = batch["value"][:, None]
        return (model(value) ** 2).mean() * (float("nan") if batch["value"].item() == 3.0 else 1.0)

    trainer = linear_trainer([float(i + 1) for i in range(4)], loss=loss, logging_steps=1)
    assert not trainer.updates_in_backward  # a plain CPU run skips such a step instead
    trainer.updates_in_backward = True
    weights = {}
    trainer.step_callbacks.append(lambda state: weights.update(
        {state.global_step: [p.detach().clone() for p in trainer.parameters()]}))
    with pytest.raises(DreamBoothError, match=r"^step 3: the loss is not finite, and DeepSpeed updates the weights "
                                              r"inside backward.*--resume_from_checkpoint latest"):
        trainer.train()
    assert trainer.state.global_step == 2 and not any(p.grad is not None and p.grad.any() for p in trainer.parameters())
    assert all(torch.equal(a, b) for a, b in zip(weights[2], trainer.parameters()))
