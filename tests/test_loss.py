"""The objective against hand computations: DreamBooth loss, targets, Min-SNR weights."""

from __future__ import annotations

import pytest
import torch

from conftest import ListDataset
from dreambooth.data import tokenize_prompts
from dreambooth.caching import VaeLatents
from dreambooth.models import load_components
from dreambooth.training import (
    LossSettings,
    PromptEncoder,
    diffusion_target,
    dreambooth_loss,
    min_snr_weights,
    training_loss,
)


def scaled_linear_alphas_cumprod(steps: int = 1000) -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


@pytest.fixture(scope="module")
def components(tiny_model):
    return load_components(tiny_model)


def prior_batch(tokenizer, resolution: int = 32) -> dict:
    generator = torch.Generator().manual_seed(3)
    prompts = ["a photo of sks toy", "a photo of sks toy", "a photo of a toy", "a photo of a toy"]
    batch = {"pixel_values": torch.rand(4, 3, resolution, resolution, generator=generator) * 2 - 1,
             "prompts": prompts, "num_instance": 2}
    batch.update(tokenize_prompts(tokenizer, prompts))
    return batch


def test_one_step_loss_matches_hand_computation(components):
    batch = prior_batch(components.tokenizer)
    encoder = PromptEncoder(components.text_encoder, trainable=False)
    torch.manual_seed(11)
    with torch.no_grad():
        losses = training_loss(batch, components.unet, VaeLatents(components.vae), components.noise_scheduler, encoder,
                               LossSettings(prior_loss_weight=0.7))

    # By hand, drawing the same random numbers in the same order.
    torch.manual_seed(11)
    with torch.no_grad():
        latents = components.vae.encode(batch["pixel_values"]).latent_dist.sample() * components.vae.config.scaling_factor
        noise = torch.randn(latents.shape)
        timesteps = torch.randint(0, 1000, (4,))
        alpha_bar = scaled_linear_alphas_cumprod()[timesteps].float().view(4, 1, 1, 1)
        noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
        text = components.text_encoder(batch["input_ids"])[0]
        prediction = components.unet(noisy, timesteps, text).sample
    instance_mse = ((prediction[:2] - noise[:2]) ** 2).mean()
    class_mse = ((prediction[2:] - noise[2:]) ** 2).mean()

    torch.testing.assert_close(losses["instance_loss"], instance_mse, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["prior_loss"], class_mse, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["loss"], instance_mse + 0.7 * class_mse, rtol=1e-5, atol=1e-6)


def test_loss_without_prior_is_the_plain_mse():
    prediction, target = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    losses = dreambooth_loss(prediction, target, num_instance=3, prior_loss_weight=5.0)
    torch.testing.assert_close(losses["loss"], ((prediction - target) ** 2).mean())
    assert "prior_loss" not in losses


def test_instance_then_class_split_and_prior_weight():
    prediction = torch.zeros(4, 1, 2, 2)
    target = torch.tensor([1.0, 1.0, 2.0, 2.0]).view(4, 1, 1, 1).expand(4, 1, 2, 2)
    losses = dreambooth_loss(prediction, target, num_instance=2, prior_loss_weight=0.5)
    assert losses["instance_loss"].item() == pytest.approx(1.0)
    assert losses["prior_loss"].item() == pytest.approx(4.0)
    assert losses["loss"].item() == pytest.approx(1.0 + 0.5 * 4.0)


def test_v_prediction_target(tiny_model_v):
    scheduler = load_components(tiny_model_v).noise_scheduler
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    timesteps = torch.tensor([10, 500, 990])
    alpha_bar = scaled_linear_alphas_cumprod()[timesteps].float().view(3, 1, 1, 1)
    expected = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    torch.testing.assert_close(diffusion_target(scheduler, latents, noise, timesteps), expected, rtol=1e-5, atol=1e-5)


def test_epsilon_target_is_the_noise(components):
    noise = torch.randn(2, 4, 8, 8)
    assert diffusion_target(components.noise_scheduler, torch.randn(2, 4, 8, 8), noise, torch.tensor([1, 2])) is noise


def test_min_snr_weights(components, tiny_model_v):
    timesteps = torch.tensor([0, 100, 500, 999])
    alpha_bar = scaled_linear_alphas_cumprod()[timesteps]
    snr = alpha_bar / (1 - alpha_bar)
    gamma = 5.0
    epsilon = min_snr_weights(components.noise_scheduler, timesteps, gamma)
    torch.testing.assert_close(epsilon.double(), torch.clamp(snr, max=gamma) / snr, rtol=1e-4, atol=0)
    velocity = min_snr_weights(load_components(tiny_model_v).noise_scheduler, timesteps, gamma)
    torch.testing.assert_close(velocity.double(), torch.clamp(snr, max=gamma) / (snr + 1), rtol=1e-4, atol=0)


def test_frozen_prompt_encoder_caches_each_prompt_once(components):
    calls = []
    text_encoder = components.text_encoder
    encoder = PromptEncoder(text_encoder, trainable=False)
    original = encoder._encode
    encoder._encode = lambda ids, mask: calls.append(len(ids)) or original(ids, mask)
    batch = prior_batch(components.tokenizer)
    first, second = encoder(batch), encoder(batch)
    assert calls == [2]  # two distinct prompts, encoded on first sight only
    torch.testing.assert_close(first, second)
    with torch.no_grad():
        torch.testing.assert_close(first, text_encoder(batch["input_ids"])[0])


def test_each_process_draws_its_own_rows_of_the_global_batch():
    from dreambooth.training import BatchDraws

    def draw(draws: BatchDraws):
        torch.manual_seed(5)  # --seed: every process starts from the same RNG state
        return draws.randn((2, 4, 8, 8), torch.device("cpu")), draws.randint(1000, 2, torch.device("cpu"))

    alone = draw(BatchDraws(0, 1))
    torch.manual_seed(5)
    assert torch.equal(alone[0], torch.randn(2, 4, 8, 8))  # one process: the plain draws
    assert torch.equal(alone[1], torch.randint(0, 1000, (2,)))
    shares = [draw(BatchDraws(rank, 2)) for rank in (0, 1)]
    torch.manual_seed(5)
    four_noise, four_steps = torch.randn(4, 4, 8, 8), torch.randint(0, 1000, (4,))

    assert torch.equal(torch.cat([noise for noise, _ in shares]), four_noise)
    assert torch.equal(torch.cat([steps for _, steps in shares]), four_steps)
    assert not torch.equal(shares[0][0], shares[1][0])  # the processes' samples get different noise


@pytest.fixture(scope="module")
def components_v(tiny_model_v):
    return load_components(tiny_model_v)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_min_snr_offset_noise_loss_matches_hand_computation(components, components_v, prediction):
    """--snr_gamma and --offset_noise together, by hand: the offset noise is part of the noise the
    latents get and the target is made of, and each sample's MSE is weighted by min(SNR, gamma) / SNR
    (epsilon) or / (SNR + 1) (v) before the instance and class means."""
    models = components if prediction == "epsilon" else components_v
    batch = prior_batch(models.tokenizer)
    gamma, prior_weight = 1.0, 0.7
    torch.manual_seed(5)
    with torch.no_grad():
        losses = training_loss(batch, models.unet, VaeLatents(models.vae), models.noise_scheduler,
                               PromptEncoder(models.text_encoder, trainable=False),
                               LossSettings(prior_loss_weight=prior_weight, snr_gamma=gamma, offset_noise=True))

    torch.manual_seed(5)
    with torch.no_grad():
        posterior = models.vae.encode(batch["pixel_values"]).latent_dist
        latents = (posterior.mean + posterior.std * torch.randn(posterior.mean.shape)) * models.vae.config.scaling_factor
        noise = torch.randn(latents.shape) + 0.1 * torch.randn(4, latents.shape[1], 1, 1)
        timesteps = torch.randint(0, 1000, (4,))
        alpha_bar = scaled_linear_alphas_cumprod()[timesteps].float().view(4, 1, 1, 1)
        noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
        prediction_ = models.unet(noisy, timesteps, models.text_encoder(batch["input_ids"])[0]).sample
    if prediction == "epsilon":
        target = noise
    else:
        target = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    snr = (alpha_bar / (1 - alpha_bar)).flatten()
    weights = torch.minimum(snr, torch.tensor(gamma)) / (snr if prediction == "epsilon" else snr + 1)
    assert len(set(weights.tolist())) > 1  # the draw weights the samples differently
    mse = ((prediction_ - target) ** 2).mean(dim=(1, 2, 3)) * weights
    instance, prior = mse[:2].mean(), mse[2:].mean()

    torch.testing.assert_close(losses["instance_loss"], instance, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["prior_loss"], prior, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["loss"], instance + prior_weight * prior, rtol=1e-5, atol=1e-6)


def _scalar_trainer(values, accumulation: int, max_steps: int, seen: list | None = None):
    """A Trainer of one weight w (starting at 1) on loss (w x - 1)^2 per batch x, with SGD at lr 1."""
    from accelerate import Accelerator

    from dreambooth.training import Schedule, Trainer

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.ones_(model.weight)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    batches = torch.utils.data.DataLoader(ListDataset(values), batch_size=1,
                                          collate_fn=lambda xs: {"x": torch.tensor(xs), "prompts": ["p"]})
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer, batches, schedule = accelerator.prepare(model, optimizer, batches, schedule)
    weights = []

    def loss_fn(batch):
        if seen is not None:
            seen.append(batch["x"].item())
        return {"loss": ((model(batch["x"][:, None]) - 1) ** 2).mean()}

    derived = Schedule.derive(len(batches), 1, 1, accumulation, max_steps, 1)
    trainer = Trainer(accelerator, [model], optimizer, schedule, batches, derived, loss_fn, max_grad_norm=0)
    trainer.step_callbacks.append(lambda state: weights.append(model.weight.item()))
    trainer.train()
    return trainer, weights


def test_an_accumulated_step_follows_the_mean_gradient_of_its_window():
    # d/dw (w x - 1)^2 = 2 x (w x - 1). From w = 1, window (0.5, 1.5): gradients -0.5 and 1.5, mean 0.5.
    trainer, weights = _scalar_trainer([0.5, 1.5, 1.0, 2.0], accumulation=2, max_steps=2)
    assert trainer.state.global_step == 2
    w = 1.0 - 0.5
    assert weights[0] == pytest.approx(w)
    # Window (1.0, 2.0) from w = 0.5: gradients 2 x (0.5 - 1) = -1 and 4 x (1 - 1) = 0, mean -0.5.
    assert weights[1] == pytest.approx(w + 0.5)


def test_an_epoch_of_five_batches_accumulated_by_two_is_three_steps():
    from dreambooth.training import Schedule

    # 5 batches in windows of 2: (1, 2), (3, 4), (5), the last window short.
    schedule = Schedule.derive(5, batch_size=3, num_processes=2, accumulation=2, max_train_steps=None,
                               num_train_epochs=2)
    assert (schedule.steps_per_epoch, schedule.max_train_steps, schedule.num_epochs) == (3, 6, 2)
    assert schedule.total_batch_size == 3 * 2 * 2
    assert Schedule.derive(5, 1, 1, 2, 7, 1).num_epochs == 3  # 7 steps of 3 per epoch
    # The loop agrees: two epochs are 6 steps, and the run ends at the end of the second epoch.
    seen = []
    trainer, _ = _scalar_trainer([1.0, 2.0, 3.0, 4.0, 5.0], accumulation=2, max_steps=6, seen=seen)
    assert trainer.state.global_step == 6 and seen == [1.0, 2.0, 3.0, 4.0, 5.0] * 2
    assert (trainer.state.epoch, trainer.state.batches_in_epoch) == (2, 0)
