#!/usr/bin/env bash
# Offline quickstart: build the tiny model, train on examples/toy_subject, generate with the result.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
python -m dreambooth.tiny_model tiny-sd
# --overwrite_output_dir: a second run of this script trains afresh instead of refusing the folder the
# first one filled (its class images are kept and reused).
python train_dreambooth.py --config examples/quickstart_cpu.yaml --overwrite_output_dir
python infer.py --pretrained_model_name_or_path quickstart-output --prompt "a photo of sks robot on the moon" \
    --num_images_per_prompt 4 --seed 0 --output_dir quickstart-output/samples
