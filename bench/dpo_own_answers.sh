#!/usr/bin/env bash
# SmolLM2-135M-Instruct trained with DPO on its own tested answers (docs/dpo_own_answers.md):
# held-out pass@1 before; sample N answers per practice problem and run their tests (eval --pairs writes a pair
# for a passing and a failing answer); DPO with LoRA on those pairs; held-out and HumanEval pass@1 after.
# LIMIT practice problems are sampled (45: all) and HUMANEVAL HumanEval problems scored (164: all).
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT=${LIMIT:-45} N=${N:-4} HUMANEVAL=${HUMANEVAL:-164}
OUT=outputs/dpo_own
MODEL=models/SmolLM2-135M-Instruct
mkdir -p "$OUT/practice_pairs"
run() { /usr/bin/time -f "%e s wall, %M kB peak RSS" "$@"; }
[ -f "$OUT/heldout-base.jsonl" ] || run .venv/bin/mftcoder eval --model "$MODEL" \
    --benchmark mftcoder/assets/problems/practice_heldout.jsonl --batch_size 16 --output "$OUT/heldout-base.jsonl"
run .venv/bin/mftcoder eval --model "$MODEL" --benchmark mftcoder/assets/problems/practice.jsonl --limit "$LIMIT" \
    --n "$N" --k 1 --temperature 0.8 --max_new_tokens 256 --batch_size 4 \
    --output "$OUT/practice-samples.jsonl" --pairs "$OUT/practice_pairs/train.jsonl"
run .venv/bin/mftcoder train configs/smollm2_dpo_own_answers.yaml
ADAPTER=$(ls -d "$OUT"/run/checkpoint-* | sort -t- -k2 -n | tail -1)
run .venv/bin/mftcoder eval --model "$MODEL" --adapter "$ADAPTER" \
    --benchmark mftcoder/assets/problems/practice_heldout.jsonl --batch_size 16 --output "$OUT/heldout-dpo.jsonl"
run .venv/bin/mftcoder eval --model "$MODEL" --adapter "$ADAPTER" --benchmark humaneval --limit "$HUMANEVAL" \
    --batch_size 16 --output "$OUT/humaneval-dpo.jsonl"
