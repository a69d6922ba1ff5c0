#!/usr/bin/env bash
# The reference's full-parameter launcher: scripts/run_gpt_mft.sh PER_DEVICE_BATCH TP DP EPOCHS
# Environment (as in the reference): DATA_PATHS="[dir1,dir2]", MODEL_NAME_OR_PATH (a local HF model;
# unset: a random-initialised tiny GPT-NeoX), OUTPUT_DIR, TensorBoard_DIR. MFTCODER_ARGS adds key=value
# overrides (e.g. "seq_length=1024 max_steps=100"). DP > 1 starts DP processes with torchrun.
# ENGINE picks the engine as in the reference: ddp (default), fsdp, or atorch (ATorch's auto_accelerate; install it
# with `bash scripts/setup.sh atorch`); ATORCH_STRATEGY sets its strategy list, e.g. "[parallel_mode, zero1]".
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
if [ "$#" -ne 4 ]; then
  echo "usage: $0 PER_DEVICE_BATCH TP DP EPOCHS" >&2
  exit 2
fi
batch=$1 tp=$2 dp=$3 epochs=$4
if [ "$tp" != "1" ]; then
  echo "error: TP must be 1: tensor parallelism is not supported (the reference supports only 1 too)" >&2
  exit 2
fi
python="${PYTHON:-python3}"
[ -x "$root/.venv/bin/python" ] && [ -z "${PYTHON:-}" ] && python="$root/.venv/bin/python"
demo="$root/mftcoder/assets/demo_data"
data_paths="${DATA_PATHS:-[$demo/code_generation,$demo/code_docstring,$demo/code_multiturn]}"
output_dir="${OUTPUT_DIR:-$root/outputs/run_gpt_mft}"
args=("data_paths=$data_paths" "output_dir=$output_dir" "tensorboard_dir=${TensorBoard_DIR:-$output_dir/runs}"
      "per_device_train_batch_size=$batch" "per_device_valid_batch_size=$batch" "tp=$tp" "dp=$dp"
      "num_train_epochs=$epochs")
if [ -n "${MODEL_NAME_OR_PATH:-}" ]; then
  args+=("pretrained_model_path=$MODEL_NAME_OR_PATH")
else
  args+=("model_config=tiny-demo")
fi
[ -n "${ENGINE:-}" ] && args+=("distributed_strategy=$ENGINE")
[ -n "${ATORCH_STRATEGY:-}" ] && args+=("atorch_strategy=$ATORCH_STRATEGY")
[ -n "${PEFT_TYPE:-}" ] && args+=("peft_type=$PEFT_TYPE" "learning_rate=${LORA_LEARNING_RATE:-2e-4}" "min_lr=2e-5")
# shellcheck disable=SC2206  # MFTCODER_ARGS is a space-separated list of key=value overrides
args+=(${MFTCODER_ARGS:-})
mkdir -p "$output_dir"
if [ "$dp" = "1" ]; then
  cmd=("$python" -m mftcoder train "$root/configs/reference_gpt_mft.yaml" "${args[@]}")
else
  cmd=("$python" -m torch.distributed.run --nproc_per_node="$dp" -m mftcoder train
       "$root/configs/reference_gpt_mft.yaml" "${args[@]}")
fi
echo "${cmd[*]}"
"${cmd[@]}" 2>&1 | tee "$output_dir/master-0-output.txt"
