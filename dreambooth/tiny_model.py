"""Write a tiny random-weight Stable Diffusion pipeline in diffusers format.

The folder has the layout of a real Stable Diffusion 1.x/2.x model (model_index.json,
unet/, vae/, text_encoder/, tokenizer/, scheduler/), so every loading path of the suite
runs on it offline, in seconds, on a CPU. It draws noise, not pictures.

    python -m dreambooth.tiny_model tiny-sd
    python -m dreambooth.tiny_model tiny-sd-v --prediction_type v_prediction
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Sequence

import torch

# The tokenizer's vocabulary: CLIP's byte-level alphabet (every byte maps to a printable
# character) with and without the end-of-word marker, so any prompt tokenizes without
# unknown tokens; no merges, so words split into characters.
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


def _byte_alphabet() -> list[str]:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def tiny_vocabulary() -> dict[str, int]:
    alphabet = _byte_alphabet()
    tokens = [BOS_TOKEN, EOS_TOKEN] + alphabet + [char + "</w>" for char in alphabet]
    return {token: index for index, token in enumerate(tokens)}


def build_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(tiny_vocabulary()))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)


def build_components(tokenizer, prediction_type: str = "epsilon", seed: int = 0) -> dict:
    """Tiny UNet, VAE and CLIP text encoder with random weights (channels 16-32)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        sample_size=64,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
    )
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=32,
    )
    text_encoder = CLIPTextModel(text_config)
    # Stable Diffusion's training noise schedule (scaled linear betas, 1000 steps).
    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def make_tiny_pipeline(output_dir: str | Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Write the tiny pipeline to ``output_dir`` and return its path."""
    from diffusers import StableDiffusionPipeline

    output_dir = Path(output_dir)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = build_tokenizer(Path(scratch))
        pipeline = StableDiffusionPipeline(
            **build_components(tokenizer, prediction_type, seed),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipeline.save_pretrained(output_dir, safe_serialization=True)
    return output_dir


def main(argv: Sequence[str] | None = None) -> Path:
    from .cli import setup_logging

    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", help="folder to write the pipeline to")
    parser.add_argument("--prediction_type", choices=["epsilon", "v_prediction"], default="epsilon")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = make_tiny_pipeline(args.output_dir, args.prediction_type, args.seed)
    print(f"tiny Stable Diffusion pipeline written to {path}")
    return path


if __name__ == "__main__":
    main()
