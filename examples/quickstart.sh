#!/usr/bin/env bash
# Offline quickstart: build the tiny model, train on examples/toy_subject, generate with the result.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
python -m dreambooth.tiny_model tiny-sd
python train_dreambooth.py --config examples/quickstart_cpu.yaml
python infer.py --pretrained_model_name_or_path quickstart-output --prompt "a photo of sks robot on the moon" \
    --num_images_per_prompt 4 --seed 0 --output_dir quickstart-output/samples
