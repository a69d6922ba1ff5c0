#!/usr/bin/env bash
# The reference's LoRA launcher: scripts/run_gpt_mft_peft.sh PER_DEVICE_BATCH TP DP EPOCHS
# Same environment as run_gpt_mft.sh; LoRA with the model family's target modules, lr 2e-4
# (LORA_LEARNING_RATE overrides it). Checkpoints hold the adapter; merge it with `mftcoder merge`.
set -euo pipefail
PEFT_TYPE=lora OUTPUT_DIR="${OUTPUT_DIR:-$(cd "$(dirname "$0")/.." && pwd)/outputs/run_gpt_mft_peft}" \
  exec bash "$(dirname "$0")/run_gpt_mft.sh" "$@"
